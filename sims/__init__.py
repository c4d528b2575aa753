"""Flax NNX models, the one gradient-flow integrator, sweeps, and the data generators.

Modules:

* ``flow`` -- the integrator (``FlowResult``, ``integrate``, ``preference_flow``, ``sft_flow``);
* model families and their pairs types: ``models`` (unconstrained features, single-token
  ``PreferencePairs``), ``prefix_tree`` (multi-token ``PrefixTreePairs``), ``transformer``
  (``CausalTransformer``, ``TransformerPairs``), ``logit_model`` (DPOP edit pairs), ``tabular``
  (KL objective);
* ``reduced`` (exact reduced flow, margin losses), ``lowrank`` (exact fast full-parameter flow,
  any pair loss, SGD), ``sweep`` (sharded, resumable sweeps), ``scores`` (CHES and
  baselines per pair);
* ``data`` -- generators: ``vocab``, ``corpus``, ``synthetic``, ``real_embeddings``.
"""

from sims.flow import (
    OPTIMIZERS,
    FlowResult,
    PairObjective,
    SFTData,
    check_optimizer,
    check_schedule,
    compiled_flow,
    default_record,
    flow_fn,
    integrate,
    integrate_model,
    make_optimizer,
    pair_logprobs,
    preference_flow,
    raise_on_nonfinite,
    sft_flow,
    stack_models,
)
from sims.logit_model import (
    EditPairData,
    EditPrefixes,
    EditRecord,
    PositionLogits,
    edit_pair_flow,
    edit_pair_prefixes,
)
from sims.lowrank import FOLD_EVERY, lowrank_flow_fn, lowrank_preference_flow, preference_record
from sims.models import (
    PreferencePairs,
    PreferenceRecord,
    UnconstrainedFeatures,
    make_pairs,
    softmax_logprobs,
)
from sims.prefix_tree import (
    PairRecord,
    PrefixTreePairs,
    extend_prefixes,
    flow_velocity,
    index_prefixes,
    response_logprobs_from_prefixes,
    restrict,
    with_reference,
)
from sims.reduced import (
    MovingRows,
    PairIndex,
    ReducedState,
    apply_moving_rows,
    check_margin_loss,
    pair_index,
    reduced_flow_fn,
    reduced_preference_flow,
)
from sims.scores import (
    dataset_ches,
    normalized_edit_distance,
    percentile_subsets,
    spearman,
    transformer_pair_scores,
)
from sims.sweep import SweepResult, run_mesh, sharded_map, sharded_runner, stack_runs, sweep
from sims.tabular import TabularPolicy, TiltDistance, kl_objective_flow
from sims.transformer import (
    CausalTransformer,
    TokenBatch,
    TransformerPairs,
    make_transformer_pairs,
    prefix_hidden_states,
    pretrain,
    response_logprobs_from_tokens,
    sample,
)

__all__ = [
    "CausalTransformer",
    "EditPairData",
    "EditPrefixes",
    "EditRecord",
    "FOLD_EVERY",
    "FlowResult",
    "MovingRows",
    "OPTIMIZERS",
    "PairIndex",
    "PairObjective",
    "PairRecord",
    "PositionLogits",
    "PreferencePairs",
    "PreferenceRecord",
    "PrefixTreePairs",
    "ReducedState",
    "SFTData",
    "SweepResult",
    "TabularPolicy",
    "TiltDistance",
    "TokenBatch",
    "TransformerPairs",
    "UnconstrainedFeatures",
    "apply_moving_rows",
    "check_margin_loss",
    "check_optimizer",
    "check_schedule",
    "compiled_flow",
    "dataset_ches",
    "default_record",
    "edit_pair_flow",
    "edit_pair_prefixes",
    "extend_prefixes",
    "flow_fn",
    "flow_velocity",
    "index_prefixes",
    "integrate",
    "integrate_model",
    "kl_objective_flow",
    "make_optimizer",
    "make_pairs",
    "lowrank_flow_fn",
    "lowrank_preference_flow",
    "make_transformer_pairs",
    "normalized_edit_distance",
    "pair_index",
    "pair_logprobs",
    "percentile_subsets",
    "preference_flow",
    "preference_record",
    "prefix_hidden_states",
    "pretrain",
    "raise_on_nonfinite",
    "reduced_flow_fn",
    "reduced_preference_flow",
    "response_logprobs_from_prefixes",
    "response_logprobs_from_tokens",
    "restrict",
    "run_mesh",
    "sample",
    "sft_flow",
    "sharded_map",
    "sharded_runner",
    "softmax_logprobs",
    "spearman",
    "stack_models",
    "stack_runs",
    "sweep",
    "transformer_pair_scores",
    "with_reference",
]
