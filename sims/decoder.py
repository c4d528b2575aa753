r"""Llama-family decoder-only LMs in Flax NNX (Llama, Qwen2, Gemma, OLMo), Hugging Face layout.

One module, :class:`DecoderLM`, covers the four families; a frozen :class:`DecoderConfig` records
what differs between them (read from a Hugging Face ``config.json`` by
:func:`decoder_config_from_hf`):

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
convention (``default``, ``linear`` and Llama-3.1 ``llama3`` frequencies). Positions are
``0..T-1``: sequences are right-padded and attention is causal, so pads never reach a real token.

Parameters are stored in Hugging Face's layout (a linear map's ``weight`` is ``[out, in]``) under
Hugging Face's names (``layers.3.self_attn.q_proj.weight``), so checkpoints load and save without
transposes (:mod:`sims.checkpoints`). Numerics follow the HF implementations: norms and the
attention softmax in float32 (float64 for float64 models), everything else in the parameter dtype;
logits are float32 or wider (the unembedding product accumulates in float32, as DPO trainers upcast
logits).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from theory.checks import check_positive_int

#: Architectures (HF ``model_type``) this module implements.
MODEL_TYPES = ("llama", "qwen2", "gemma", "olmo")
#: Rotary frequency schemes implemented (HF ``rope_type``).
ROPE_TYPES = ("default", "linear", "llama3")
#: HF ``hidden_act`` names -> (jax function, tanh approximation?).
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
      norm_eps: the norm's epsilon.
      activation: ``"silu"``, ``"gelu_tanh"`` or ``"gelu"`` (the gated MLP's activation).
      qkv_bias, o_bias, mlp_bias: which linear maps carry a bias.
      tied: the unembedding is the token-embedding matrix.
      embed_scale: factor on the token embeddings (Gemma: ``sqrt(d)``; else 1).
      clip_qkv: OLMo's clamp of q/k/v to ``[-c, c]`` (``None``: off).
      rope_theta: rotary base.
      rope_type: one of :data:`ROPE_TYPES`.
      rope_factor, rope_low_freq_factor, rope_high_freq_factor, rope_original_max_len: scaling
        parameters (``linear``: ``factor``; ``llama3``: all four).
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


def rope_inv_freq(config: DecoderConfig, dtype=np.float32) -> np.ndarray:
    r"""Return the rotary inverse frequencies ``[head_dim / 2]``, as HF computes them.

    .. math:: \omega_i = \theta^{-2i/d_h},\quad i = 0..d_h/2-1

    ``linear`` divides every :math:`\omega_i` by ``factor``; ``llama3`` (Llama 3.1) divides the
    low frequencies (wavelength above ``original_max_len / low_freq_factor``) by ``factor``, keeps
    the high ones (wavelength below ``original_max_len / high_freq_factor``) and interpolates
    between.

    Computed in float64 and rounded to ``dtype`` (HF: float32; float64 models use float64).

    Source: Su et al. 2021 (RoPE); HF ``modeling_rope_utils._compute_llama3_parameters``.

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
    """HF ``apply_rotary_pos_emb`` on ``x`` ``[..., T, heads, hd]``; ``cos``/``sin`` ``[T, hd]``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = _lead(x, cos[:, None, :]), _lead(x, sin[:, None, :])
    return x * cos + rotated * sin


class _Attention(nnx.Module):
    def __init__(self, c: DecoderConfig, window: int | None, *, rngs: nnx.Rngs, dtype):
        d, hd, std = c.hidden_size, c.head_dim, c.initializer_range
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, hd
        self.clip, self.window = c.clip_qkv, window
        self.q_proj = _Linear(d, c.num_heads * hd, bias=c.qkv_bias, std=std, rngs=rngs, dtype=dtype)
        self.k_proj = _Linear(
            d, c.num_kv_heads * hd, bias=c.qkv_bias, std=std, rngs=rngs, dtype=dtype
        )
        self.v_proj = _Linear(
            d, c.num_kv_heads * hd, bias=c.qkv_bias, std=std, rngs=rngs, dtype=dtype
        )
        self.o_proj = _Linear(c.num_heads * hd, d, bias=c.o_bias, std=std, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        *lead, T, _ = x.shape
        H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.clip is not None:
            q, k, v = (jnp.clip(a, -self.clip, self.clip) for a in (q, k, v))
        q = _rotate(q.reshape(*lead, T, H, hd), cos, sin)  # [..., T, H, hd]
        k = _rotate(k.reshape(*lead, T, KV, hd), cos, sin)  # [..., T, KV, hd]
        v = v.reshape(*lead, T, KV, hd)
        q = q.reshape(*lead, T, KV, H // KV, hd)  # head h reads kv head h // (H / KV), as repeat_kv
        scores = jnp.einsum("...qkgd,...skd->...kgqs", q, k) * (hd**-0.5)  # [..., KV, G, T, T]
        i, j = np.arange(T)[:, None], np.arange(T)[None, :]
        allowed = j <= i
        if self.window is not None:
            allowed &= j > i - self.window  # HF sliding_window_overlay
        scores = jnp.where(_lead(scores, jnp.asarray(allowed)), scores, -jnp.inf)
        probs = jax.nn.softmax(scores.astype(_compute_dtype(q.dtype)), axis=-1).astype(q.dtype)
        out = jnp.einsum("...kgqs,...skd->...qkgd", probs, v).reshape(*lead, T, H * hd)
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


class _Layer(nnx.Module):
    def __init__(self, c: DecoderConfig, window: int | None, *, rngs: nnx.Rngs, dtype):
        self.input_layernorm = _Norm(c.hidden_size, kind=c.norm, eps=c.norm_eps, dtype=dtype)
        self.self_attn = _Attention(c, window, rngs=rngs, dtype=dtype)
        self.post_attention_layernorm = _Norm(
            c.hidden_size, kind=c.norm, eps=c.norm_eps, dtype=dtype
        )
        self.mlp = _MLP(c, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Embedding(nnx.Module):
    def __init__(self, V: int, d: int, *, std: float, rngs: nnx.Rngs, dtype):
        self.weight = nnx.Param(std * jax.random.normal(rngs.params(), (V, d), dtype))


def _apply_layer(layer: _Layer, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    return layer(x, cos, sin)


class DecoderLM(nnx.Module):
    r"""Decoder-only causal LM :math:`\pi(\cdot|x, y_{<k}) = \mathrm{softmax}(W h_{x, y_{<k}})`.

    Args:
      config: the architecture (:class:`DecoderConfig`; from a checkpoint:
        :func:`decoder_config_from_hf`).
      rngs: ``nnx.Rngs`` for the random initialisation (normal, std ``initializer_range``; norms
        at their identity; biases 0). Checkpoints overwrite every parameter.
      dtype: parameter dtype (``jnp.float32`` or ``jnp.bfloat16``).
      remat: recompute each block in the backward pass (``nnx.remat``): activation memory of one
        block instead of all, for full fine-tuning of large models.

    Calling the model on int32 token ids ``[..., T]`` returns next-token **logits**
    ``[..., T, V]`` (float32), like :class:`sims.transformer.CausalTransformer`;
    :meth:`hidden_states` returns the final-norm hidden states and :meth:`unembedding_matrix`
    ``W`` ``[V, d]``.

    Example:
      >>> m = DecoderLM(DecoderConfig.llama(11, hidden_size=8, num_heads=2), rngs=nnx.Rngs(0))
      >>> m(jnp.zeros((3, 5), dtype=jnp.int32)).shape
      (3, 5, 11)
    """

    def __init__(
        self, config: DecoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, remat: bool = False
    ):
        c = config
        self.config, self.remat = c, remat
        self.embed_tokens = _Embedding(
            c.vocab_size, c.hidden_size, std=c.initializer_range, rngs=rngs, dtype=dtype
        )
        windows = c.sliding_windows or (None,) * c.num_layers
        self.layers = nnx.List([_Layer(c, w, rngs=rngs, dtype=dtype) for w in windows])
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

    def hidden_states(self, tokens: jax.Array) -> jax.Array:
        """Return the final-norm hidden state at every position, ``tokens.shape + (d,)``."""
        table = self.embed_tokens.weight[...]
        x = jnp.take(table, tokens, axis=0)  # [..., T, d]
        if self.config.embed_scale != 1.0:
            x = x * jnp.asarray(self.config.embed_scale, table.dtype)
        T = tokens.shape[-1]
        wide = np.dtype(_compute_dtype(x.dtype))  # HF: float32 phases, cast to the model dtype
        angles = np.arange(T, dtype=wide)[:, None] * rope_inv_freq(self.config, wide)[None, :]
        angles = np.concatenate([angles, angles], axis=-1)  # [T, hd]
        cos, sin = jnp.asarray(np.cos(angles), x.dtype), jnp.asarray(np.sin(angles), x.dtype)
        apply = nnx.remat(_apply_layer) if self.remat else _apply_layer
        for layer in self.layers:
            x = apply(layer, x, cos, sin)
        return self.norm(x)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Return next-token logits (float32) at every position, ``tokens.shape + (V,)``."""
        return jnp.einsum(
            "...d,vd->...v",
            self.hidden_states(tokens),
            self.unembedding_matrix(),
            preferred_element_type=_compute_dtype(self.embed_tokens.weight.dtype),
        )


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
