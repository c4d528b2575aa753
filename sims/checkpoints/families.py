r"""Checkpoint families: everything the loaders know about an architecture, one record each.

A :class:`Family` says, for one architecture, how its Hugging Face ``config.json`` keys and its
llama.cpp GGUF metadata keys map to :class:`sims.models.decoder.DecoderConfig` fields, how its
tensors
are named in each file format, and which value transforms the GGUF converter applied. The loaders
(:mod:`sims.checkpoints.hf` for Hugging Face folders, :mod:`sims.checkpoints.gguf` for GGUF files)
read these
records and hold no ``if model_type == ...`` branches.

Tensor names. Parameters of :class:`~sims.models.decoder.DecoderLM` have paths such as
``layers.self_attn.q_proj.weight`` (stacked over layers, leading axis ``L``); each family maps a
path to a name template per format, with ``{i}`` standing for the layer index:

================================  ======================================  ======================
parameter path                    Hugging Face (``{i}``: layer)           GGUF (llama.cpp)
================================  ======================================  ======================
``embed_tokens.weight``           ``model.embed_tokens.weight``           ``token_embd.weight``
``layers.input_layernorm.weight`` ``model.layers.{i}.input_layernorm.*``  ``blk.{i}.attn_norm.*``
``layers.self_attn.q_proj.*``     ``model.layers.{i}.self_attn.q_proj.*`` ``blk.{i}.attn_q.*``
``layers.mlp.down_proj.weight``   ``model.layers.{i}.mlp.down_proj.*``    ``blk.{i}.ffn_down.*``
``norm.weight``                   ``model.norm.weight``                   ``output_norm.weight``
``lm_head.weight``                ``lm_head.weight``                      ``output.weight``
================================  ======================================  ======================

(and likewise for k/v/o projections, biases, the post-attention norm and the gate/up MLP maps).

GGUF value transforms (Source: llama.cpp ``convert_hf_to_gguf.py`` and the rope type each
architecture is run with in ``llama-model.cpp``):

* ``llama`` and ``olmo`` run "normal" (GPT-J, interleaved-pair) rope, so the converter permutes
  the rows of the Q and K projections of each head from Hugging Face's rotate-half layout
  (``LlamaModel.permute``: ``w.reshape(n_head, 2, hd / 2, ...).swapaxes(1, 2)``, with
  ``n_head = num_kv_heads`` for K). :func:`unpermute_rope_rows` undoes it. ``qwen2`` and ``gemma``
  run NEOX rope and are stored unpermuted.
* ``gemma``'s norms compute ``(1 + w) x``; llama.cpp's compute ``w x``, so the converter stores
  ``w + 1``. The loader subtracts 1 (``gguf_norm_offset``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

#: Parameter path (stacked over layers) -> Hugging Face tensor-name template (``{i}``: layer).
HF_TENSOR_NAMES: dict[str, str] = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    **{
        f"layers.{p}.{kind}": f"model.layers.{{i}}.{p}.{kind}"
        for p in (
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
        for kind in ("weight", "bias")
    },
}

#: Parameter path -> llama.cpp GGUF tensor-name template (``gguf.TENSOR_NAMES``' spelling).
GGUF_TENSOR_NAMES: dict[str, str] = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    **{
        f"layers.{path}.{kind}": f"blk.{{i}}.{name}.{kind}"
        for path, name in (
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "ffn_norm"),
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
        )
        for kind in ("weight", "bias")
    },
}

#: Hugging Face ``hidden_act`` spellings -> the activation :mod:`sims.models.decoder` computes.
HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu": "gelu",
}

#: :class:`~sims.models.decoder.DecoderConfig` size fields -> ``config.json`` keys (shared by the
#: four
#: families); ``None`` default: required.
HF_SIZE_KEYS: dict[str, tuple[str, Any]] = {
    "vocab_size": ("vocab_size", None),
    "hidden_size": ("hidden_size", None),
    "intermediate_size": ("intermediate_size", None),
    "num_layers": ("num_hidden_layers", None),
    "num_heads": ("num_attention_heads", None),
    "num_kv_heads": ("num_key_value_heads", "num_heads"),
    "head_dim": ("head_dim", "hidden_size // num_heads"),
    "max_position_embeddings": ("max_position_embeddings", 2048),
}

#: :class:`~sims.models.decoder.DecoderConfig` size fields -> GGUF metadata keys (after
#: ``{arch}.``).
GGUF_SIZE_KEYS: dict[str, tuple[str, Any]] = {
    "vocab_size": ("vocab_size", "tokens"),
    "hidden_size": ("embedding_length", None),
    "intermediate_size": ("feed_forward_length", None),
    "num_layers": ("block_count", None),
    "num_heads": ("attention.head_count", None),
    "num_kv_heads": ("attention.head_count_kv", "num_heads"),
    "head_dim": ("attention.key_length", "hidden_size // num_heads"),
    "max_position_embeddings": ("context_length", 2048),
}


@dataclasses.dataclass(frozen=True)
class Family:
    """What the loaders need to know about one architecture (one declarative record).

    Attributes:
      model_type: Hugging Face ``model_type`` (``config.json``).
      hf_architecture: Hugging Face class written into ``architectures``.
      gguf_architecture: llama.cpp ``general.architecture``.
      norm: :class:`~sims.models.decoder.DecoderConfig` ``norm`` kind.
      activation: default activation (``hidden_act`` absent; GGUF files do not record it).
      activation_aliases: family-specific readings of ``hidden_act`` (Gemma's legacy ``gelu``).
      tied_default: ``tie_word_embeddings`` when ``config.json`` omits it.
      embed_scale_sqrt_d: token embeddings are multiplied by ``sqrt(d)`` (Gemma).
      hf_keys: ``DecoderConfig`` field -> ``(config.json key, default)`` for the fields whose key
        differs between families (``norm_eps``, biases, ``clip_qkv``); a key of ``None`` means the
        value is fixed to the default (OLMo's layer norm eps, Qwen2's q/k/v bias).
      gguf_keys: ``DecoderConfig`` field -> ``(GGUF key after "{arch}.", default)`` likewise.
      sliding_window: the family's configs may give per-layer sliding windows (Qwen2).
      gguf_permuted_qk: the GGUF converter permuted the Q/K rows for "normal" rope.
      gguf_norm_offset: added to norm weights by the GGUF converter (Gemma: 1).
    """

    model_type: str
    hf_architecture: str
    gguf_architecture: str
    norm: str = "rms"
    activation: str = "silu"
    activation_aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tied_default: bool = False
    embed_scale_sqrt_d: bool = False
    hf_keys: Mapping[str, tuple[str | None, Any]] = dataclasses.field(default_factory=dict)
    gguf_keys: Mapping[str, tuple[str | None, Any]] = dataclasses.field(default_factory=dict)
    sliding_window: bool = False
    gguf_permuted_qk: bool = False
    gguf_norm_offset: float = 0.0

    def embed_scale(self, hidden_size: int) -> float:
        """The factor on token embeddings for width ``hidden_size``."""
        return math.sqrt(hidden_size) if self.embed_scale_sqrt_d else 1.0


_RMS_EPS_HF = {"norm_eps": ("rms_norm_eps", 1e-6)}
_RMS_EPS_GGUF = {"norm_eps": ("attention.layer_norm_rms_epsilon", 1e-6)}
_BIAS_HF = {
    "qkv_bias": ("attention_bias", False),
    "o_bias": ("attention_bias", False),
    "mlp_bias": (None, False),
    "clip_qkv": (None, None),
}

#: The architectures :mod:`sims.checkpoints.hf` and :mod:`sims.checkpoints.gguf` read, by Hugging
#: Face
#: ``model_type``.
FAMILIES: dict[str, Family] = {
    "llama": Family(
        "llama",
        "LlamaForCausalLM",
        "llama",
        hf_keys=_RMS_EPS_HF | _BIAS_HF | {"mlp_bias": ("mlp_bias", False)},
        gguf_keys=_RMS_EPS_GGUF,
        gguf_permuted_qk=True,
    ),
    "qwen2": Family(
        "qwen2",
        "Qwen2ForCausalLM",
        "qwen2",
        hf_keys=_RMS_EPS_HF | _BIAS_HF | {"qkv_bias": (None, True), "o_bias": (None, False)},
        gguf_keys=_RMS_EPS_GGUF,
        sliding_window=True,
    ),
    "gemma": Family(
        "gemma",
        "GemmaForCausalLM",
        "gemma",
        norm="rms_plus_one",
        activation="gelu_tanh",
        activation_aliases={"gelu": "gelu_tanh"},  # HF GemmaConfig: legacy "gelu" is the tanh form
        tied_default=True,
        embed_scale_sqrt_d=True,
        hf_keys=_RMS_EPS_HF | _BIAS_HF,
        gguf_keys=_RMS_EPS_GGUF,
        gguf_norm_offset=1.0,
    ),
    "olmo": Family(
        "olmo",
        "OlmoForCausalLM",
        "olmo",
        norm="layernorm",
        # HF OlmoLayerNorm hard-codes eps 1e-5 (config.json has no key for it)
        hf_keys=_BIAS_HF | {"norm_eps": (None, 1e-5), "clip_qkv": ("clip_qkv", None)},
        gguf_keys={
            "norm_eps": ("attention.layer_norm_epsilon", 1e-5),
            "clip_qkv": ("attention.clamp_kqv", None),
        },
        gguf_permuted_qk=True,
    ),
}

#: GGUF ``general.architecture`` -> :class:`Family`.
GGUF_FAMILIES: dict[str, Family] = {f.gguf_architecture: f for f in FAMILIES.values()}


def family_of(model_type: Any, *, where: str = "config.json") -> Family:
    """Return the :class:`Family` of a Hugging Face ``model_type``.

    Raises:
      ValueError: an architecture the loaders do not implement (names it and the choices).

    Example:
      >>> family_of("qwen2").hf_architecture
      'Qwen2ForCausalLM'
    """
    if model_type not in FAMILIES:
        raise ValueError(
            f"{where}: model_type must be one of {tuple(FAMILIES)} (the architectures "
            f"sims.checkpoints.hf implements), got model_type={model_type!r}"
        )
    return FAMILIES[model_type]


def layer_names(template: str, num_layers: int) -> list[str]:
    """Return the per-layer names of a name template (``[template]`` when it has no ``{i}``)."""
    if "{i}" not in template:
        return [template]
    return [template.format(i=i) for i in range(num_layers)]


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    r"""Undo llama.cpp's Q/K row permutation for "normal" rope (``[out]`` or ``[out, in]``).

    The converter maps each head's rows from Hugging Face's rotate-half order
    ``(x_0..x_{hd/2-1}, y_0..y_{hd/2-1})`` to interleaved pairs ``(x_0, y_0, x_1, y_1, ...)``:
    ``w.reshape(n, 2, hd/2, ...).swapaxes(1, 2)``. This applies the inverse,
    ``w.reshape(n, hd/2, 2, ...).swapaxes(1, 2)``.

    Source: llama.cpp ``convert_hf_to_gguf.py`` ``LlamaModel.permute``.

    Example:
      >>> w = np.arange(4)  # one head, hd = 4, rows in interleaved order (x0, y0, x1, y1)
      >>> unpermute_rope_rows(w, 1).tolist()  # rotate-half order (x0, x1, y0, y1)
      [0, 2, 1, 3]
    """
    n = num_heads
    half = weight.shape[0] // n // 2
    return weight.reshape(n, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Apply llama.cpp's Q/K row permutation (the inverse of :func:`unpermute_rope_rows`).

    Example:
      >>> permute_rope_rows(unpermute_rope_rows(np.arange(8), 2), 2).tolist()
      [0, 1, 2, 3, 4, 5, 6, 7]
    """
    n = num_heads
    half = weight.shape[0] // n // 2
    return weight.reshape(n, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_keys(
    table: Mapping[str, tuple[str | None, Any]],
    get: Callable[[str], Any],
    have: Callable[[str], bool],
) -> dict[str, Any]:
    """Return ``{field: value}`` for a key table: ``get(key)`` where ``have(key)``, else the
    default (a ``None`` key means: always the default)."""
    out = {}
    for field, (key, default) in table.items():
        out[field] = get(key) if key is not None and have(key) else default
    return out
