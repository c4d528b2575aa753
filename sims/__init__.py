"""Flax NNX models and the jit-compiled gradient-flow integrator."""

from sims.flow import (
    OPTIMIZERS,
    PreferencePairs,
    PreferenceRecord,
    Trajectory,
    flow_fn,
    integrate,
    make_optimizer,
    make_pairs,
    preference_flow,
    sft_flow,
)
from sims.models import UnconstrainedFeatures

__all__ = [
    "OPTIMIZERS",
    "PreferencePairs",
    "PreferenceRecord",
    "Trajectory",
    "UnconstrainedFeatures",
    "flow_fn",
    "integrate",
    "make_optimizer",
    "make_pairs",
    "preference_flow",
    "sft_flow",
]
