"""Flax NNX models, the one gradient-flow integrator, sweeps, and the data generators.

Modules:

* ``flow`` -- the integrator (``FlowResult``, ``integrate``, ``preference_flow``, ``sft_flow``);
* model families and their pairs types: ``models`` (unconstrained features, single-token
  ``PreferencePairs``; ``MLPFeatures``, an MLP backbone), ``prefix_tree`` (multi-token
  ``PrefixTreePairs``), ``transformer`` (``CausalTransformer``, ``TransformerPairs``),
  ``logit_model`` (DPOP edit pairs), ``tabular`` (KL objective);
* ``bert`` (the MiniLM / BERT encoder loaded from a Hugging Face folder, tied ``[MASK]`` readout,
  prompt tokenization);
* ``kernel`` (hidden-state kernel K = J P J^T, tied cross terms, velocity channels);
* ``mlp_features`` (``ScaledMLPFeatures``: a centred MLP over prompt features, lazy or mean
  field, rate-scaled unembeddings; ``FeaturePairs``, ``feature_sft_flow``);
* ``reduced`` (exact reduced flow), ``sweep`` (sharded, resumable sweeps), ``scores`` (CHES and
  ``PreferencePairs``), ``prefix_tree`` (multi-token ``PrefixTreePairs``), ``transformer``
  (``CausalTransformer``, ``TransformerPairs``), ``logit_model`` (DPOP edit pairs), ``tabular``
  (KL objective);
* ``reduced`` (exact reduced flow, margin losses), ``lowrank`` (exact fast full-parameter flow,
  any pair loss, SGD), ``sweep`` (sharded, resumable sweeps), ``scores`` (CHES and
  baselines per pair);
* ``decoder`` (``DecoderLM``: Llama / Qwen2 / Gemma / OLMo in NNX) and ``checkpoints`` (Hugging
  Face folders: ``load_causal_lm``, ``save_causal_lm``, ``shard_model``), ``tokenization``
  (``tokenizer.json``, chat templates), ``audit`` (per-pair displacement audit);
* ``refusal`` (rule-based refusal judge for chat replies: ``refusal.is_refusal``,
  ``refusal_evidence``, ``judge_agreement``; used module-qualified, since
  ``sims.data.is_refusal`` is the toy grammar's judge);
* ``data`` -- generators: ``vocab``, ``corpus``, ``synthetic``, ``real_embeddings``; prompts of
  the refusal experiment (``prompts``) and hand-labelled replies (``refusal_labels``).
"""

from sims.audit import PairAudit, audit_pairs
from sims.bert import (
    BertConfig,
    BertEncoder,
    MaskedLMLabels,
    MaskedLMPairs,
    MaskedPrompts,
    encode_masked_prompts,
    load_bert,
    load_bert_tokenizer,
    make_masked_lm_pairs,
    masked_lm_label_logprobs,
    masked_lm_nll,
    persona_question,
)
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
    Program,
    SFTData,
    check_optimizer,
    check_schedule,
    compiled_flow,
    default_record,
    flow_fn,
    flow_program,
    integrate,
    integrate_model,
    make_optimizer,
    model_flow_program,
    pair_logprobs,
    preference_flow,
    preference_flow_program,
    raise_on_nonfinite,
    sft_flow,
    sft_flow_program,
    stack_models,
)
from sims.kernel import (
    TiedCrossTerms,
    VelocityChannels,
    hidden_kernel,
    param_paths,
    rmsprop_preconditioner,
    tied_cross_terms,
    velocity_channels,
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
from sims.mlp_features import (
    PARAMETRISATIONS,
    FeaturePairs,
    FeatureSFTData,
    FixedArray,
    ScaledMLPFeatures,
    feature_sft_flow,
    feature_sft_flow_program,
    label_logprobs,
    make_feature_pairs,
    output_multiplier,
)
from sims.models import (
    MLPFeatures,
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
from sims.sweep import (
    SweepResult,
    chunk_program,
    run_mesh,
    sharded_map,
    sharded_program,
    sharded_runner,
    stack_runs,
    sweep,
)
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
    pretrain_program,
    response_logprobs_from_tokens,
    sample,
)

__all__ = [
    "apply_moving_rows",
    "audit_pairs",
    "BertConfig",
    "BertEncoder",
    "CausalTransformer",
    "chat_template",
    "check_margin_loss",
    "check_optimizer",
    "check_schedule",
    "chunk_program",
    "compiled_flow",
    "dataset_ches",
    "decoder_config_from_hf",
    "DecoderConfig",
    "DecoderLM",
    "default_record",
    "edit_pair_flow",
    "edit_pair_prefixes",
    "EditPairData",
    "EditPrefixes",
    "EditRecord",
    "encode_masked_prompts",
    "extend_prefixes",
    "feature_sft_flow",
    "feature_sft_flow_program",
    "FeaturePairs",
    "FeatureSFTData",
    "FixedArray",
    "flow_fn",
    "flow_program",
    "flow_velocity",
    "FlowResult",
    "FOLD_EVERY",
    "format_prompt",
    "hf_config",
    "hidden_kernel",
    "index_prefixes",
    "integrate",
    "integrate_model",
    "kl_objective_flow",
    "label_logprobs",
    "load_bert",
    "load_bert_tokenizer",
    "load_causal_lm",
    "load_tokenizer",
    "lowrank_flow_fn",
    "lowrank_preference_flow",
    "make_feature_pairs",
    "make_masked_lm_pairs",
    "make_optimizer",
    "make_pairs",
    "make_transformer_pairs",
    "masked_lm_label_logprobs",
    "masked_lm_nll",
    "MaskedLMLabels",
    "MaskedLMPairs",
    "MaskedPrompts",
    "MLPFeatures",
    "model_flow_program",
    "MovingRows",
    "normalized_edit_distance",
    "OPTIMIZERS",
    "output_multiplier",
    "pair_index",
    "pair_logprobs",
    "PairAudit",
    "PairIndex",
    "PairObjective",
    "PairRecord",
    "param_paths",
    "param_sharding",
    "PARAMETRISATIONS",
    "percentile_subsets",
    "persona_question",
    "PositionLogits",
    "preference_flow",
    "preference_flow_program",
    "preference_record",
    "PreferencePairs",
    "PreferenceRecord",
    "prefix_hidden_states",
    "PrefixTreePairs",
    "pretrain",
    "pretrain_program",
    "Program",
    "raise_on_nonfinite",
    "reduced_flow_fn",
    "reduced_preference_flow",
    "ReducedState",
    "response_logprobs_from_prefixes",
    "response_logprobs_from_tokens",
    "restrict",
    "rmsprop_preconditioner",
    "rope_inv_freq",
    "run_mesh",
    "sample",
    "save_causal_lm",
    "ScaledMLPFeatures",
    "sft_flow",
    "sft_flow_program",
    "SFTData",
    "shard_model",
    "sharded_map",
    "sharded_program",
    "sharded_runner",
    "softmax_logprobs",
    "spearman",
    "special_tokens",
    "stack_models",
    "stack_runs",
    "step_memory",
    "sweep",
    "SweepResult",
    "TabularPolicy",
    "tied_cross_terms",
    "TiedCrossTerms",
    "TiltDistance",
    "TokenBatch",
    "transformer_pair_scores",
    "TransformerPairs",
    "UnconstrainedFeatures",
    "velocity_channels",
    "VelocityChannels",
    "with_reference",
    "word_level_tokenizer",
]
