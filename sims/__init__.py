"""Flax NNX models, the one gradient-flow integrator, sweeps, and the data generators.

Modules:

* ``flow`` -- the integrator (``FlowResult``, ``integrate``, ``preference_flow``, ``sft_flow``);
* model families and their pairs types: ``models`` (unconstrained features, single-token
  ``PreferencePairs``), ``prefix_tree`` (multi-token ``PrefixTreePairs``), ``transformer``
  (``CausalTransformer``, ``TransformerPairs``), ``logit_model`` (DPOP edit pairs), ``tabular``
  (KL objective);
* ``reduced`` (exact reduced flow), ``sweep`` (sharded, resumable sweeps), ``scores`` (CHES and
  baselines per pair);
* ``decoder`` (``DecoderLM``: Llama / Qwen2 / Gemma / OLMo in NNX) and ``checkpoints`` (Hugging
  Face folders: ``load_causal_lm``, ``save_causal_lm``, ``shard_model``), ``tokenization``
  (``tokenizer.json``, chat templates), ``audit`` (per-pair displacement audit);
* ``data`` -- generators: ``vocab``, ``corpus``, ``synthetic``, ``real_embeddings``.
"""

from sims.audit import PairAudit, audit_pairs
from sims.checkpoints import (
    decoder_config_from_hf,
    hf_config,
    load_causal_lm,
    param_sharding,
    save_causal_lm,
    shard_model,
    step_memory,
)
from sims.decoder import DecoderConfig, DecoderLM, rope_inv_freq
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
from sims.tokenization import (
    chat_template,
    format_prompt,
    load_tokenizer,
    special_tokens,
    word_level_tokenizer,
)
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
    "DecoderConfig",
    "DecoderLM",
    "EditPairData",
    "EditPrefixes",
    "EditRecord",
    "FlowResult",
    "MovingRows",
    "OPTIMIZERS",
    "PairAudit",
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
    "audit_pairs",
    "chat_template",
    "check_margin_loss",
    "check_optimizer",
    "check_schedule",
    "compiled_flow",
    "dataset_ches",
    "decoder_config_from_hf",
    "default_record",
    "edit_pair_flow",
    "edit_pair_prefixes",
    "extend_prefixes",
    "flow_fn",
    "flow_velocity",
    "format_prompt",
    "hf_config",
    "index_prefixes",
    "integrate",
    "integrate_model",
    "kl_objective_flow",
    "load_causal_lm",
    "load_tokenizer",
    "make_optimizer",
    "make_pairs",
    "make_transformer_pairs",
    "normalized_edit_distance",
    "pair_index",
    "pair_logprobs",
    "param_sharding",
    "percentile_subsets",
    "preference_flow",
    "prefix_hidden_states",
    "pretrain",
    "raise_on_nonfinite",
    "reduced_flow_fn",
    "reduced_preference_flow",
    "response_logprobs_from_prefixes",
    "response_logprobs_from_tokens",
    "restrict",
    "rope_inv_freq",
    "run_mesh",
    "sample",
    "save_causal_lm",
    "sft_flow",
    "shard_model",
    "sharded_map",
    "sharded_runner",
    "softmax_logprobs",
    "spearman",
    "step_memory",
    "special_tokens",
    "stack_models",
    "stack_runs",
    "sweep",
    "transformer_pair_scores",
    "with_reference",
    "word_level_tokenizer",
]
