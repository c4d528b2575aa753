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
from sims.reduced import (
    MovingRows,
    PairIndex,
    apply_moving_rows,
    check_margin_loss,
    pair_index,
    reduced_flow_fn,
    reduced_preference_flow,
)
from sims.sweep import SweepResult, run_mesh, sharded_map, sharded_runner, stack_runs, sweep
from sims.tabular import TabularPolicy, TiltDistance, kl_objective_flow
from sims.vocab import semantic_unembeddings

__all__ = [
    "EditFlow",
    "EditPrefixes",
    "MovingRows",
    "OPTIMIZERS",
    "PairIndex",
    "PositionLogits",
    "PreferencePairs",
    "PreferenceRecord",
    "SweepResult",
    "TabularPolicy",
    "TiltDistance",
    "Trajectory",
    "UnconstrainedFeatures",
    "apply_moving_rows",
    "check_margin_loss",
    "edit_pair_flow",
    "edit_pair_prefixes",
    "flow_fn",
    "flow_summary",
    "integrate",
    "kl_objective_flow",
    "make_optimizer",
    "make_pairs",
    "pair_index",
    "preference_flow",
    "reduced_flow_fn",
    "reduced_preference_flow",
    "reference_context_logits",
    "run_mesh",
    "semantic_unembeddings",
    "sft_flow",
    "sharded_map",
    "sharded_runner",
    "sign_checks",
    "softmax_logprobs",
    "stack_runs",
    "sweep",
]
