"""Flax NNX models and the jit-compiled gradient-flow integrator."""

from sims.dpop_checks import flow_summary, reference_context_logits, sign_checks
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
from sims.logit_model import (
    EditFlow,
    EditPrefixes,
    PositionLogits,
    edit_pair_flow,
    edit_pair_prefixes,
)
from sims.models import UnconstrainedFeatures, softmax_logprobs
from sims.tabular import TabularPolicy, TiltDistance, kl_objective_flow
from sims.vocab import semantic_unembeddings

__all__ = [
    "EditFlow",
    "EditPrefixes",
    "OPTIMIZERS",
    "PositionLogits",
    "PreferencePairs",
    "PreferenceRecord",
    "TabularPolicy",
    "TiltDistance",
    "Trajectory",
    "UnconstrainedFeatures",
    "edit_pair_flow",
    "edit_pair_prefixes",
    "flow_fn",
    "flow_summary",
    "integrate",
    "kl_objective_flow",
    "make_optimizer",
    "make_pairs",
    "preference_flow",
    "reference_context_logits",
    "semantic_unembeddings",
    "sft_flow",
    "sign_checks",
    "softmax_logprobs",
]
