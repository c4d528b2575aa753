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
from sims.models import UnconstrainedFeatures, softmax_logprobs
from sims.tabular import TabularPolicy, TiltDistance, kl_objective_flow
from sims.vocab import semantic_unembeddings

__all__ = [
    "OPTIMIZERS",
    "PreferencePairs",
    "PreferenceRecord",
    "TabularPolicy",
    "TiltDistance",
    "Trajectory",
    "UnconstrainedFeatures",
    "flow_fn",
    "integrate",
    "kl_objective_flow",
    "make_optimizer",
    "make_pairs",
    "preference_flow",
    "semantic_unembeddings",
    "sft_flow",
    "softmax_logprobs",
]
