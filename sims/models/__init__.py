"""Model families (Flax NNX modules) and their pairs and supervised data types.

* :mod:`~sims.models.unconstrained` -- the unconstrained-features model (free ``h``, Razin et al.
  2024 §4.1), single-token :class:`PreferencePairs`; :class:`MLPFeatures`.
* :mod:`~sims.models.mlp_features` -- a centred MLP over prompt features, lazy or mean field.
* :mod:`~sims.models.prefix_tree` -- multi-token responses on a prefix tree of free ``h``.
* :mod:`~sims.models.transformer` -- a small GPT-2-style causal transformer and the causal-LM
  pairs / SFT types (:class:`TransformerPairs`, :class:`PromptAnswerPairs`,
  :class:`SequenceSFTData`), pre-training, sampling.
* :mod:`~sims.models.decoder` -- :class:`DecoderLM`: Llama / Qwen2 / Gemma / OLMo with stacked,
  scanned layers and a key/value cache (real checkpoints load into it).
* :mod:`~sims.models.bert` -- the MiniLM / BERT encoder with a tied ``[MASK]`` readout.
* :mod:`~sims.models.logit_model` -- per-position logits for DPOP's edit pairs.
* :mod:`~sims.models.tabular` -- a tabular policy for the KL-regularised objective.
"""

from sims.models.bert import (
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
from sims.models.decoder import (
    DecoderConfig,
    DecoderLM,
    KVCache,
    causal_mask,
    init_decoder,
    rope_inv_freq,
)
from sims.models.logit_model import (
    EditPairData,
    EditPrefixes,
    EditRecord,
    PositionLogits,
    edit_pair_flow,
    edit_pair_prefixes,
)
from sims.models.mlp_features import (
    PARAMETRISATIONS,
    FeaturePairs,
    FeatureSFTData,
    FixedArray,
    ScaledMLPFeatures,
    feature_sft_flow,
    make_feature_pairs,
    output_multiplier,
)
from sims.models.prefix_tree import (
    PairRecord,
    PrefixTreePairs,
    extend_prefixes,
    flow_velocity,
    index_prefixes,
    response_logprobs_from_prefixes,
    restrict,
    with_reference,
)
from sims.models.tabular import (
    TabularPolicy,
    TiltDistance,
    kl_objective_flow,
)
from sims.models.transformer import (
    CausalTransformer,
    PromptAnswerPairs,
    SequenceSFTData,
    TokenBatch,
    TransformerPairs,
    make_prompt_answer_pairs,
    make_transformer_pairs,
    next_token_logprobs,
    prefix_hidden_states,
    pretrain,
    response_logprobs_from_tokens,
    sample,
)
from sims.models.unconstrained import (
    MLPFeatures,
    PreferencePairs,
    PreferenceRecord,
    UnconstrainedFeatures,
    make_pairs,
    softmax_logprobs,
)

__all__ = [
    "BertConfig",
    "BertEncoder",
    "causal_mask",
    "CausalTransformer",
    "DecoderConfig",
    "DecoderLM",
    "edit_pair_flow",
    "edit_pair_prefixes",
    "EditPairData",
    "EditPrefixes",
    "EditRecord",
    "encode_masked_prompts",
    "extend_prefixes",
    "feature_sft_flow",
    "FeaturePairs",
    "FeatureSFTData",
    "FixedArray",
    "flow_velocity",
    "index_prefixes",
    "init_decoder",
    "kl_objective_flow",
    "KVCache",
    "load_bert",
    "load_bert_tokenizer",
    "make_feature_pairs",
    "make_masked_lm_pairs",
    "make_pairs",
    "make_prompt_answer_pairs",
    "make_transformer_pairs",
    "masked_lm_label_logprobs",
    "masked_lm_nll",
    "MaskedLMLabels",
    "MaskedLMPairs",
    "MaskedPrompts",
    "MLPFeatures",
    "next_token_logprobs",
    "output_multiplier",
    "PairRecord",
    "PARAMETRISATIONS",
    "persona_question",
    "PositionLogits",
    "PreferencePairs",
    "PreferenceRecord",
    "prefix_hidden_states",
    "PrefixTreePairs",
    "pretrain",
    "PromptAnswerPairs",
    "response_logprobs_from_prefixes",
    "response_logprobs_from_tokens",
    "restrict",
    "rope_inv_freq",
    "sample",
    "ScaledMLPFeatures",
    "SequenceSFTData",
    "softmax_logprobs",
    "TabularPolicy",
    "TiltDistance",
    "TokenBatch",
    "TransformerPairs",
    "UnconstrainedFeatures",
    "with_reference",
]
