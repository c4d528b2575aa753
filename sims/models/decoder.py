r"""Llama-family decoder-only LMs in Flax NNX (Llama, Qwen2, Gemma, OLMo), Hugging Face layout.

One module, :class:`DecoderLM`, covers the four families; a frozen :class:`DecoderConfig` records
what differs between them (built from a checkpoint's config by :mod:`sims.checkpoints.families`):

=========  ==================  ================  ==============  ===========  ===================
family     norm                MLP activation    q/k/v bias      embeddings   other
=========  ==================  ================  ==============  ===========  ===================
llama      RMSNorm, ``w x``    SiLU (gated)      optional        tied/untied  GQA, rope scaling
qwen2      RMSNorm, ``w x``    SiLU (gated)      yes             tied/untied  sliding window opt.
gemma      RMSNorm, (1+w) x    GELU-tanh         no              tied         embed x sqrt(d)
olmo       LayerNorm, no w/b   SiLU (gated)      no              tied/untied  ``clip_qkv``
=========  ==================  ================  ==============  ===========  ===================

Every block is pre-norm: ``x += attn(norm(x)); x += mlp(norm(x))``; the final norm's output at
position ``t`` is the hidden embedding :math:`h_{x, y_{<k}}` (Razin et al. 2024, Eq. 1; HF's last
``hidden_states``) and the logits are :math:`W h`. Rotary embeddings use HF's ``rotate_half``
convention (``default``, ``linear`` and Llama-3.1 ``llama3`` frequencies, or explicit per-frequency
factors as llama.cpp stores them). Positions are ``0..T-1`` by default: sequences are right-padded
and attention is causal, so pads never reach a real token. Left-padded batches (sampling) pass
``positions`` and ``valid`` explicitly.

**Stacked layers.** The ``L`` blocks are one :class:`_Layer` whose parameters carry a leading
layer axis (``layers.self_attn.q_proj.weight`` is ``[L, H hd, d]``), and the forward pass is one
``jax.lax.scan`` over it, as MaxText and levanter do: a 30-layer model compiles one block, not 30
(SmolLM2-135M's DPO step compiled in ~67 s unrolled). Checkpoint loaders stack the per-layer
tensors (:mod:`sims.checkpoints.hf`).

Parameters are stored in Hugging Face's layout (a linear map's ``weight`` is ``[out, in]``) under
Hugging Face's names minus the layer index, so checkpoints load and save without transposes.
Numerics follow the HF implementations: norms and the attention softmax in float32 (float64 for
float64 models), everything else in the parameter dtype; logits are float32 or wider (the
unembedding product accumulates in float32, as DPO trainers upcast logits).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from theory.checks import check_positive_int

#: Architectures (HF ``model_type``) this module implements.
MODEL_TYPES = ("llama", "qwen2", "gemma", "olmo")
#: Rotary frequency schemes implemented (HF ``rope_type``).
ROPE_TYPES = ("default", "linear", "llama3")
#: HF ``hidden_act`` names -> the activation this module computes.
ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu": "gelu",
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a :class:`DecoderLM` (hashable; stored on the module).

    Attributes:
      model_type: one of :data:`MODEL_TYPES`.
      vocab_size, hidden_size, intermediate_size, num_layers: ``V``, ``d``, MLP width, blocks.
      num_heads, num_kv_heads, head_dim: attention heads, key/value heads (GQA when fewer), size.
      norm: ``"rms"`` (``w * x / rms``), ``"rms_plus_one"`` (Gemma, ``(1 + w) x / rms``) or
        ``"layernorm"`` (OLMo: no weight, no bias).
      norm_eps: the norm's epsilon (``> 0``).
      activation: ``"silu"``, ``"gelu_tanh"`` or ``"gelu"`` (the gated MLP's activation).
      qkv_bias, o_bias, mlp_bias: which linear maps carry a bias.
      tied: the unembedding is the token-embedding matrix.
      embed_scale: factor on the token embeddings (Gemma: ``sqrt(d)``; else 1).
      clip_qkv: OLMo's clamp of q/k/v to ``[-c, c]`` (``None``: off).
      rope_theta: rotary base (``> 0``).
      rope_type: one of :data:`ROPE_TYPES`.
      rope_factor, rope_low_freq_factor, rope_high_freq_factor, rope_original_max_len: scaling
        parameters (``linear``: ``factor``; ``llama3``: all four).
      rope_freq_factors: per-frequency divisors of the rotary frequencies (``head_dim / 2``
        entries), as llama.cpp stores Llama-3.1 scaling in ``rope_freqs.weight``; ``()``: none.
      sliding_windows: per layer, the attention window (``None``: full causal attention).
      max_position_embeddings: longest sequence the checkpoint was made for.
      initializer_range: std of the random initialisation (HF's ``initializer_range``).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm: str = "rms"
    norm_eps: float = 1e-6
    activation: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tied: bool = False
    embed_scale: float = 1.0
    clip_qkv: float | None = None
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    rope_freq_factors: tuple[float, ...] = ()
    sliding_windows: tuple[int | None, ...] = ()
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            check_positive_int(name, getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                "num_heads must be a multiple of num_kv_heads, "
                f"got num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary pairs), got head_dim={self.head_dim}")
        if self.norm not in ("rms", "rms_plus_one", "layernorm"):
            raise ValueError(f"norm must be rms, rms_plus_one or layernorm, got {self.norm!r}")
        if self.activation not in ("silu", "gelu_tanh", "gelu"):
            raise ValueError(f"activation must be silu, gelu_tanh or gelu, got {self.activation!r}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        for name in ("norm_eps", "rope_theta", "rope_factor", "embed_scale"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {name}={value!r}")
        if self.clip_qkv is not None and not (math.isfinite(self.clip_qkv) and self.clip_qkv > 0):
            raise ValueError(f"clip_qkv must be None or a finite number > 0, got {self.clip_qkv}")
        if self.rope_freq_factors and (
            len(self.rope_freq_factors) != self.head_dim // 2
            or not all(math.isfinite(f) and f > 0 for f in self.rope_freq_factors)
        ):
            raise ValueError(
                f"rope_freq_factors must hold head_dim / 2 = {self.head_dim // 2} finite numbers "
                f"> 0, got {len(self.rope_freq_factors)} values"
            )
        if self.sliding_windows and len(self.sliding_windows) != self.num_layers:
            raise ValueError(
                f"sliding_windows must have num_layers={self.num_layers} entries, "
                f"got {len(self.sliding_windows)}"
            )

    @classmethod
    def llama(cls, vocab_size: int, **kw) -> DecoderConfig:
        """Return a Llama config with small defaults (``d=64``, 2 layers, 4 heads, 2 KV heads).

        Example:
          >>> DecoderConfig.llama(11).head_dim
          16
        """
        kw.setdefault("hidden_size", 64)
        kw.setdefault("num_heads", 4)
        defaults = dict(
            intermediate_size=4 * kw["hidden_size"],
            num_layers=2,
            num_kv_heads=max(kw["num_heads"] // 2, 1),
            head_dim=kw["hidden_size"] // kw["num_heads"],
        )
        return cls(model_type="llama", vocab_size=vocab_size, **(defaults | kw))

    @property
    def num_parameters(self) -> int:
        """Number of parameters (the unembedding counted once when tied).

        Example:
          >>> DecoderConfig.llama(11, hidden_size=8, num_heads=2, num_layers=1).num_parameters
          1160
        """
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        attn = d * (q + 2 * kv) + q * d
        attn += (q + 2 * kv) * self.qkv_bias + d * self.o_bias
        mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
        norms = 2 * d if self.norm != "layernorm" else 0
        embed = self.vocab_size * d * (1 if self.tied else 2)
        final = d if self.norm != "layernorm" else 0
        return self.num_layers * (attn + mlp + norms) + embed + final


def rope_inv_freq(config: DecoderConfig, dtype=np.float32) -> np.ndarray:
    r"""Return the rotary inverse frequencies ``[head_dim / 2]``, as HF computes them.

    .. math:: \omega_i = \theta^{-2i/d_h},\quad i = 0..d_h/2-1

    ``linear`` divides every :math:`\omega_i` by ``factor``; ``llama3`` (Llama 3.1) divides the
    low frequencies (wavelength above ``original_max_len / low_freq_factor``) by ``factor``, keeps
    the high ones (wavelength below ``original_max_len / high_freq_factor``) and interpolates
    between. ``rope_freq_factors`` (llama.cpp's ``rope_freqs.weight``) divide :math:`\omega_i`
    one by one.

    Computed in float64 and rounded to ``dtype`` (HF: float32; float64 models use float64).

    Source: Su et al. 2021 (RoPE); HF ``modeling_rope_utils._compute_llama3_parameters``;
    llama.cpp ``ggml_rope_ext`` (``freq_factors``).

    Example:
      >>> cfg = DecoderConfig.llama(11, hidden_size=8, num_heads=2, rope_theta=100.0)
      >>> rope_inv_freq(cfg).tolist()  # 100 ** -(0/4), 100 ** -(2/4)
      [1.0, 0.10000000149011612]
    """
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if config.rope_type == "linear":
        inv = inv / config.rope_factor
    elif config.rope_type == "llama3":
        factor, low, high = (
            config.rope_factor,
            config.rope_low_freq_factor,
            config.rope_high_freq_factor,
        )
        old_len = config.rope_original_max_len
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = np.where(medium, smoothed, scaled)
    if config.rope_freq_factors:
        inv = inv / np.asarray(config.rope_freq_factors, dtype=np.float64)
    return inv.astype(dtype)


def _compute_dtype(dtype) -> jnp.dtype:
    """Dtype of norms, softmax, rotary phases and logits: float32, or wider for float64 models."""
    return jnp.promote_types(dtype, jnp.float32)


def _lead(x: jax.Array, v: jax.Array, axes_after: int = 0) -> jax.Array:
    """``v`` reshaped to broadcast against ``x`` without implicit rank promotion."""
    return v.reshape((1,) * (x.ndim - v.ndim - axes_after) + v.shape + (1,) * axes_after)


class _Linear(nnx.Module):
    """``x W^T (+ b)`` with ``W`` ``[out, in]`` (HF layout)."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, std: float, rngs: nnx.Rngs, dtype):
        self.weight = nnx.Param(std * jax.random.normal(rngs.params(), (d_out, d_in), dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,oi->...o", x, self.weight[...])
        return y if self.bias is None else y + _lead(y, self.bias[...])


class _Norm(nnx.Module):
    def __init__(self, d: int, *, kind: str, eps: float, dtype):
        self.kind, self.eps = kind, eps
        if kind == "rms":
            self.weight = nnx.Param(jnp.ones((d,), dtype))
        elif kind == "rms_plus_one":
            self.weight = nnx.Param(jnp.zeros((d,), dtype))
        else:
            self.weight = None

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(_compute_dtype(x.dtype))
        if self.kind == "layernorm":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.kind == "rms":  # HF Llama: cast, then scale in the parameter dtype
            return _lead(y, self.weight[...]) * y.astype(x.dtype)
        if self.kind == "rms_plus_one":  # HF Gemma: scale in float32, then cast
            return (y * _lead(y, 1.0 + self.weight[...].astype(y.dtype))).astype(x.dtype)
        return y.astype(x.dtype)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF ``apply_rotary_pos_emb`` on ``x`` ``[..., T, heads, hd]``; ``cos``/``sin``
    ``[..., T, hd]`` (leading axes broadcast against ``x``'s)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = _lead(x, cos[..., None, :]), _lead(x, sin[..., None, :])
    return x * cos + rotated * sin


class Mask(NamedTuple):
    """Which keys each query may attend to, before a layer's sliding window.

    Attributes:
      q_pos: ``[..., Tq]`` int32 positions of the queries.
      k_pos: ``[..., Tk]`` int32 positions of the keys.
      allowed: ``[..., Tq, Tk]`` bool: causal and key-valid (every query may also attend to the
        key at its own index when ``Tq == Tk``, so a padding query never sees an empty row).
    """

    q_pos: jax.Array
    k_pos: jax.Array
    allowed: jax.Array


def causal_mask(
    positions: jax.Array,
    valid: jax.Array | None = None,
    *,
    key_positions=None,
    segments: jax.Array | None = None,
) -> Mask:
    """Return the :class:`Mask` of causal attention over ``positions`` (``[..., T]``).

    ``valid`` (``[..., Tk]`` bool) marks real keys (``False``: padding, never attended to by
    another position). ``key_positions`` (default ``positions``) are the keys' positions, for a
    key/value cache longer than the queries. ``segments`` (``[..., T]`` int, self-attention
    only) packs several sequences that share a prefix into one row: a query sees a key only if
    the key's segment is 0 (the shared prefix) or its own (see
    :class:`sims.models.transformer.PackedPairs`).

    Example:
      >>> m = causal_mask(jnp.arange(3))
      >>> m.allowed.astype(int).tolist()
      [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    k_pos = positions if key_positions is None else key_positions
    allowed = k_pos[..., None, :] <= positions[..., :, None]
    if valid is not None:
        allowed = allowed & valid[..., None, :]
    if segments is not None:
        if key_positions is not None:
            raise ValueError("segments need self-attention (no key_positions)")
        key_seg = segments[..., None, :]
        allowed = allowed & ((key_seg == 0) | (key_seg == segments[..., :, None]))
    if key_positions is None:  # a padding query attends to itself: no empty softmax row
        allowed = allowed | _lead(allowed, jnp.eye(positions.shape[-1], dtype=bool))
    return Mask(positions, k_pos, allowed)


class _Attention(nnx.Module):
    def __init__(self, c: DecoderConfig, *, rngs: nnx.Rngs, dtype):
        d, hd, std = c.hidden_size, c.head_dim, c.initializer_range
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, hd
        self.clip = c.clip_qkv
        self.q_proj = _Linear(d, c.num_heads * hd, bias=c.qkv_bias, std=std, rngs=rngs, dtype=dtype)
        self.k_proj = _Linear(
            d, c.num_kv_heads * hd, bias=c.qkv_bias, std=std, rngs=rngs, dtype=dtype
        )
        self.v_proj = _Linear(
            d, c.num_kv_heads * hd, bias=c.qkv_bias, std=std, rngs=rngs, dtype=dtype
        )
        self.o_proj = _Linear(c.num_heads * hd, d, bias=c.o_bias, std=std, rngs=rngs, dtype=dtype)

    def project(self, x, cos, sin) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Rotated ``q`` ``[..., T, H, hd]`` and ``k``, ``v`` ``[..., T, KV, hd]`` of ``x``."""
        *lead, T, _ = x.shape
        H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.clip is not None:
            q, k, v = (jnp.clip(a, -self.clip, self.clip) for a in (q, k, v))
        q = _rotate(q.reshape(*lead, T, H, hd), cos, sin)
        k = _rotate(k.reshape(*lead, T, KV, hd), cos, sin)
        return q, k, v.reshape(*lead, T, KV, hd)

    def attend(self, q, k, v, allowed) -> jax.Array:
        """Attention output ``[..., Tq, d]`` of ``q`` over keys ``k``/``v`` where ``allowed``."""
        *lead, Tq, H, hd = q.shape
        KV = self.num_kv_heads
        q = q.reshape(*lead, Tq, KV, H // KV, hd)  # head h reads kv head h // (H / KV)
        scores = jnp.einsum("...qkgd,...skd->...kgqs", q, k) * (hd**-0.5)  # [..., KV, G, Tq, Tk]
        scores = jnp.where(_lead(scores, allowed[..., None, None, :, :]), scores, -jnp.inf)
        probs = jax.nn.softmax(scores.astype(_compute_dtype(q.dtype)), axis=-1).astype(q.dtype)
        out = jnp.einsum("...kgqs,...skd->...qkgd", probs, v).reshape(*lead, Tq, H * hd)
        return self.o_proj(out)


class _MLP(nnx.Module):
    def __init__(self, c: DecoderConfig, *, rngs: nnx.Rngs, dtype):
        d, f, b, std = c.hidden_size, c.intermediate_size, c.mlp_bias, c.initializer_range
        self.activation = c.activation
        self.gate_proj = _Linear(d, f, bias=b, std=std, rngs=rngs, dtype=dtype)
        self.up_proj = _Linear(d, f, bias=b, std=std, rngs=rngs, dtype=dtype)
        self.down_proj = _Linear(f, d, bias=b, std=std, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        g = self.gate_proj(x)
        if self.activation == "silu":
            g = jax.nn.silu(g)
        else:
            g = jax.nn.gelu(g, approximate=self.activation == "gelu_tanh")
        return self.down_proj(g * self.up_proj(x))


def _windowed(mask: Mask, window: jax.Array) -> jax.Array:
    """``mask.allowed`` restricted to keys less than ``window`` positions back (0: no window;
    HF ``sliding_window_overlay``)."""
    near = mask.q_pos[..., :, None] - mask.k_pos[..., None, :] < window
    return mask.allowed & ((window <= 0) | near)


class _Layer(nnx.Module):
    """One pre-norm block; :class:`DecoderLM` holds ``L`` of them stacked on a leading axis."""

    def __init__(self, c: DecoderConfig, *, rngs: nnx.Rngs, dtype):
        self.input_layernorm = _Norm(c.hidden_size, kind=c.norm, eps=c.norm_eps, dtype=dtype)
        self.self_attn = _Attention(c, rngs=rngs, dtype=dtype)
        self.post_attention_layernorm = _Norm(
            c.hidden_size, kind=c.norm, eps=c.norm_eps, dtype=dtype
        )
        self.mlp = _MLP(c, rngs=rngs, dtype=dtype)

    def __call__(self, x, cos, sin, mask: Mask, window) -> jax.Array:
        q, k, v = self.self_attn.project(self.input_layernorm(x), cos, sin)
        x = x + self.self_attn.attend(q, k, v, _windowed(mask, window))
        return x + self.mlp(self.post_attention_layernorm(x))

    def step(self, x, cos, sin, mask: Mask, window, cache_k, cache_v, index):
        """The block on new tokens ``x`` ``[B, Tq, d]`` with a key/value cache ``[B, S, KV, hd]``:
        writes their keys/values at ``index`` and attends over the cache; returns
        ``(x, cache_k, cache_v)``."""
        q, k, v = self.self_attn.project(self.input_layernorm(x), cos, sin)
        cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), index, 1)
        cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), index, 1)
        x = x + self.self_attn.attend(q, cache_k, cache_v, _windowed(mask, window))
        return x + self.mlp(self.post_attention_layernorm(x)), cache_k, cache_v


class _Embedding(nnx.Module):
    def __init__(self, V: int, d: int, *, std: float, rngs: nnx.Rngs, dtype):
        self.weight = nnx.Param(std * jax.random.normal(rngs.params(), (V, d), dtype))


def _stacked_layers(c: DecoderConfig, rngs: nnx.Rngs, dtype) -> _Layer:
    """``L`` independently initialised blocks as one :class:`_Layer` with stacked parameters."""
    layers = [_Layer(c, rngs=rngs, dtype=dtype) for _ in range(c.num_layers)]
    graphdef = nnx.graphdef(layers[0])
    states = [nnx.state(layer) for layer in layers]
    return nnx.merge(graphdef, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *states))


class KVCache(NamedTuple):
    """Keys and values of every layer for :meth:`DecoderLM.decode`.

    Attributes:
      k, v: ``[L, B, S, KV, hd]`` in the parameter dtype (``S`` the cache length).
      valid: ``[B, S]`` bool, the slots holding a real (non-padding) token.
      positions: ``[B, S]`` int32 rotary positions of the slots.
      length: int32 scalar, slots filled so far.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    positions: jax.Array
    length: jax.Array


class DecoderLM(nnx.Module):
    r"""Decoder-only causal LM :math:`\pi(\cdot|x, y_{<k}) = \mathrm{softmax}(W h_{x, y_{<k}})`.

    Args:
      config: the architecture (:class:`DecoderConfig`; from a checkpoint:
        :func:`sims.checkpoints.hf.load_causal_lm`).
      rngs: ``nnx.Rngs`` for the random initialisation (normal, std ``initializer_range``; norms
        at their identity; biases 0). Checkpoints overwrite every parameter.
      dtype: parameter dtype (``jnp.float32``, ``jnp.bfloat16`` or ``jnp.float64``).
      remat: recompute each block in the backward pass (``jax.checkpoint`` of the scanned
        block): activation memory of one block's input per layer instead of all its tensors.

    Calling the model on int32 token ids ``[..., T]`` returns next-token **logits**
    ``[..., T, V]`` (float32), like :class:`sims.models.transformer.CausalTransformer`;
    :meth:`hidden_states` returns the final-norm hidden states, :meth:`logits` turns hidden states
    into logits and :meth:`unembedding_matrix` gives ``W``.

    Example:
      >>> m = DecoderLM(DecoderConfig.llama(11, hidden_size=8, num_heads=2), rngs=nnx.Rngs(0))
      >>> m(jnp.zeros((3, 5), dtype=jnp.int32)).shape
      (3, 5, 11)
      >>> m.layers.self_attn.q_proj.weight.shape  # 2 layers stacked
      (2, 8, 8)
    """

    def __init__(
        self, config: DecoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, remat: bool = False
    ):
        c = config
        self.config, self.remat = c, remat
        self.embed_tokens = _Embedding(
            c.vocab_size, c.hidden_size, std=c.initializer_range, rngs=rngs, dtype=dtype
        )
        self.layers = _stacked_layers(c, rngs, dtype)
        self.norm = _Norm(c.hidden_size, kind=c.norm, eps=c.norm_eps, dtype=dtype)
        self.lm_head = (
            None
            if c.tied
            else _Embedding(
                c.vocab_size, c.hidden_size, std=c.initializer_range, rngs=rngs, dtype=dtype
            )
        )

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def unembedding_matrix(self) -> jax.Array:
        """Return ``W`` ``[V, d]`` (the token-embedding matrix when tied)."""
        return (self.embed_tokens if self.lm_head is None else self.lm_head).weight[...]

    def _windows(self) -> jax.Array:
        """``[L]`` int32 attention windows (0: full causal attention)."""
        windows = self.config.sliding_windows or (None,) * self.config.num_layers
        return jnp.asarray([w or 0 for w in windows], jnp.int32)

    def _rope(self, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
        """``cos``, ``sin`` ``[..., T, hd]`` of ``positions`` (phases in float32 or wider)."""
        wide = _compute_dtype(dtype)
        inv = jnp.asarray(rope_inv_freq(self.config, np.dtype(wide)))
        angles = positions.astype(wide)[..., None] * inv.reshape((1,) * positions.ndim + (-1,))
        angles = jnp.concatenate([angles, angles], axis=-1)
        return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)

    def _embed(self, tokens: jax.Array) -> jax.Array:
        table = self.embed_tokens.weight[...]
        x = jnp.take(table, tokens, axis=0)  # [..., T, d]
        if self.config.embed_scale != 1.0:
            x = x * jnp.asarray(self.config.embed_scale, table.dtype)
        return x

    def hidden_states(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        valid: jax.Array | None = None,
        segments: jax.Array | None = None,
    ) -> jax.Array:
        """Return the final-norm hidden state at every position, ``tokens.shape + (d,)``.

        ``positions`` (default ``0..T-1``) and ``valid`` (default all ``True``), both
        ``tokens``-shaped, describe left-padded batches; ``segments`` packed rows of sequences
        that share a prefix (see :func:`causal_mask`).
        """
        x = self._embed(tokens)
        T = tokens.shape[-1]
        if positions is None:
            positions = jnp.arange(T, dtype=jnp.int32)
        cos, sin = self._rope(positions, x.dtype)
        mask = causal_mask(positions, valid, segments=segments)
        graphdef, state = nnx.split(self.layers)

        def block(x, layer):
            state, window = layer
            return nnx.merge(graphdef, state)(x, cos, sin, mask, window), None

        if self.remat:
            block = jax.checkpoint(block)
        x, _ = jax.lax.scan(block, x, (state, self._windows()))
        return self.norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Return next-token logits (float32 or wider) of final-norm hidden states ``[..., d]``."""
        return jnp.einsum(
            "...d,vd->...v",
            hidden,
            self.unembedding_matrix(),
            preferred_element_type=_compute_dtype(self.embed_tokens.weight.dtype),
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Return next-token logits (float32) at every position, ``tokens.shape + (V,)``."""
        return self.logits(self.hidden_states(tokens))

    def init_cache(self, batch: int, length: int) -> KVCache:
        """Return an empty :class:`KVCache` of ``length`` slots for ``batch`` sequences."""
        c, dtype = self.config, self.embed_tokens.weight.dtype
        shape = (c.num_layers, batch, length, c.num_kv_heads, c.head_dim)
        return KVCache(
            jnp.zeros(shape, dtype),
            jnp.zeros(shape, dtype),
            jnp.zeros((batch, length), bool),
            jnp.zeros((batch, length), jnp.int32),
            jnp.int32(0),
        )

    def decode(
        self, tokens: jax.Array, positions: jax.Array, valid: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Append ``tokens`` ``[B, Tq]`` to ``cache``; return their final hidden states and the
        new cache.

        ``positions`` (``[B, Tq]`` int32) are their rotary positions and ``valid`` (``[B, Tq]``)
        marks real tokens; the first call with a whole left-padded prompt is the prefill, later
        calls add one sampled token each. Equal to :meth:`hidden_states` of the whole sequence
        (tested). Slots past ``cache.length + Tq`` stay masked.
        """
        x = self._embed(tokens)
        Tq = tokens.shape[-1]
        cos, sin = self._rope(positions, x.dtype)
        index = cache.length
        valid_all = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid, index, 1)
        pos_all = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, index, 1)
        slots = jnp.arange(cache.valid.shape[1])
        # keys: real, already written (slot < index + Tq) and causal (slot <= query's slot)
        q_slot = index + jnp.arange(Tq)
        allowed = (slots[None, :] <= q_slot[:, None])[None] & valid_all[:, None, :]
        allowed = allowed | (slots[None, :] == q_slot[:, None])[None]  # own slot: never empty
        mask = Mask(positions, pos_all, allowed)
        graphdef, state = nnx.split(self.layers)

        def block(x, layer):
            state, window, k, v = layer
            x, k, v = nnx.merge(graphdef, state).step(x, cos, sin, mask, window, k, v, index)
            return x, (k, v)

        x, (k, v) = jax.lax.scan(block, x, (state, self._windows(), cache.k, cache.v))
        return self.norm(x), KVCache(k, v, valid_all, pos_all, index + Tq)


def init_decoder(
    config: DecoderConfig, *, seed: int, dtype=jnp.float32, remat: bool = False
) -> DecoderLM:
    """Return ``DecoderLM(config, rngs=nnx.Rngs(seed), ...)`` initialised inside one ``jax.jit``.

    The eager constructor's random draws (equal up to a rounding of the scaling, 1 ulp), but
    compiled once per (config, seed, dtype) instead of op by op (seconds per model on a CPU).

    Example:
      >>> m = init_decoder(DecoderConfig.llama(11, hidden_size=8, num_heads=2), seed=0)
      >>> m.unembedding_matrix().shape
      (11, 8)
    """
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: _make(config, seed, dtype, remat)))
    return nnx.merge(graphdef, _init_state(config, seed, jnp.dtype(dtype), remat))


def _make(config: DecoderConfig, seed: int, dtype, remat: bool) -> DecoderLM:
    return DecoderLM(config, rngs=nnx.Rngs(seed), dtype=dtype, remat=remat)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _init_state(config: DecoderConfig, seed: int, dtype, remat: bool) -> nnx.State:
    return nnx.split(_make(config, seed, dtype, remat))[1]
