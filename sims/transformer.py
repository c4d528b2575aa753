r"""A small causal transformer (Flax NNX) whose per-prefix hidden states feed the theory.

Architecture (GPT-2 style, pre-LayerNorm): token embedding + learned positions, ``num_layers``
blocks of causal multi-head self-attention and a GELU MLP (4x), a final LayerNorm. The output of
the final LayerNorm at position ``t`` is the hidden embedding :math:`h_{x, y_{<k}}` of the prefix
ending at ``t`` (Razin et al. 2024, Eq. 1; like HF's last ``hidden_states`` after the final norm)
and the logits are :math:`W h`.

Unembedding: ``tied=True`` uses the token-embedding matrix as ``W`` (one parameter, explicit: the
module holds no second reference); ``tied=False`` has a separate ``unembedding`` parameter
``[V, d]``. :meth:`CausalTransformer.unembedding_matrix` returns ``W`` in both cases.

Sequences are right-padded; causal attention means pads only influence later positions, which
every loss here masks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.typing import ArrayLike

from theory._checks import check_positive, check_positive_int


class _Block(nnx.Module):
    def __init__(self, d: int, num_heads: int, *, rngs: nnx.Rngs, dtype):
        self.num_heads = num_heads
        self.ln1 = nnx.LayerNorm(d, rngs=rngs, param_dtype=dtype)
        self.qkv = nnx.Linear(d, 3 * d, rngs=rngs, param_dtype=dtype)
        self.proj = nnx.Linear(d, d, rngs=rngs, param_dtype=dtype)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs, param_dtype=dtype)
        self.fc = nnx.Linear(d, 4 * d, rngs=rngs, param_dtype=dtype)
        self.out = nnx.Linear(4 * d, d, rngs=rngs, param_dtype=dtype)

    def __call__(self, x):  # x [..., T, d]
        T, d = x.shape[-2:]
        H = self.num_heads
        q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
        # [..., T, d] -> [..., H, T, d/H]
        q, k, v = (jnp.swapaxes(a.reshape(*a.shape[:-1], H, d // H), -2, -3) for a in (q, k, v))
        scores = q @ jnp.swapaxes(k, -1, -2) / np.sqrt(d // H)  # [..., H, T, T]
        causal = jnp.tril(jnp.ones((T, T), dtype=bool)).reshape((1,) * (scores.ndim - 2) + (T, T))
        scores = jnp.where(causal, scores, -jnp.inf)
        att = jax.nn.softmax(scores, axis=-1) @ v  # [..., H, T, d/H]
        x = x + self.proj(jnp.swapaxes(att, -2, -3).reshape(*x.shape))
        return x + self.out(jax.nn.gelu(self.fc(self.ln2(x))))


class CausalTransformer(nnx.Module):
    r"""Causal transformer LM :math:`\pi(\cdot|x, y_{<k}) = \mathrm{softmax}(W h_{x, y_{<k}})`.

    Args:
      vocab_size: ``V``.
      d_model: hidden size ``d`` (divisible by ``num_heads``).
      num_layers: transformer blocks.
      num_heads: attention heads.
      max_len: longest sequence (learned positions).
      tied: use the token embedding as unembedding ``W`` (else a separate ``[V, d]`` parameter).
      rngs: ``nnx.Rngs`` supplying ``params``.
      dtype: parameter dtype.

    Example:
      >>> m = CausalTransformer(11, d_model=8, num_layers=1, num_heads=2, max_len=6,
      ...                       rngs=nnx.Rngs(0))
      >>> m(jnp.zeros((3, 6), dtype=jnp.int32)).shape  # log-probs per position
      (3, 6, 11)
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        d_model: int,
        num_layers: int,
        num_heads: int,
        max_len: int,
        tied: bool = True,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        for name, value in (
            ("vocab_size", vocab_size),
            ("d_model", d_model),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("max_len", max_len),
        ):
            check_positive_int(name, value)
        if d_model % num_heads:
            raise ValueError(f"d_model must be divisible by num_heads, got {d_model}, {num_heads}")
        self.tied = tied
        self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs, param_dtype=dtype)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, d_model), dtype))
        self.blocks = nnx.List(
            [_Block(d_model, num_heads, rngs=rngs, dtype=dtype) for _ in range(num_layers)]
        )
        self.ln_f = nnx.LayerNorm(d_model, rngs=rngs, param_dtype=dtype)
        if not tied:
            self.unembedding = nnx.Param(
                jax.random.normal(rngs.params(), (vocab_size, d_model), dtype) / np.sqrt(d_model)
            )

    def unembedding_matrix(self) -> jax.Array:
        """Return ``W`` ``[V, d]`` (the embedding table when tied)."""
        return self.embed.embedding[...] if self.tied else self.unembedding[...]

    def hidden_states(self, tokens: jax.Array) -> jax.Array:
        """Return the final-norm hidden state at every position, ``tokens.shape + (d,)``."""
        T = tokens.shape[-1]
        pos = self.pos[...][:T].reshape((1,) * (tokens.ndim - 1) + (T, -1))  # [1.., T, d]
        x = self.embed(tokens) + pos
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Return next-token log-probs at every position, ``tokens.shape + (V,)``."""
        return jax.nn.log_softmax(self.hidden_states(tokens) @ self.unembedding_matrix().T, axis=-1)


def response_mask(prompt_len: ArrayLike, length: ArrayLike, T: int) -> jax.Array:
    """Return ``[N, T]`` booleans: position ``t`` holds a response token
    (``prompt_len <= t < length``)."""
    t = jnp.arange(T)[None, :]
    return (t >= jnp.asarray(prompt_len)[:, None]) & (t < jnp.asarray(length)[:, None])


def sequence_logprob(model: CausalTransformer, tokens, prompt_len, length) -> jax.Array:
    r"""Return :math:`\ln\pi(y|x) = \sum_k \ln\pi(y_k|x, y_{<k})` per sequence, ``[N]`` (Eq. 1).

    ``tokens`` ``[N, T]`` hold prompt then response (``<eos>`` counted as a response token).
    """
    logprobs = model(tokens[:, :-1])  # [N, T-1, V], position t predicts token t+1
    picked = jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]  # [N, T-1]
    mask = response_mask(prompt_len, length, tokens.shape[1])[:, 1:]
    return jnp.sum(jnp.where(mask, picked, 0.0), axis=-1)


def prefix_hidden_states(
    model: CausalTransformer, tokens, prompt_len: int, length: int
) -> jax.Array:
    r"""Return :math:`[h_{x, y_{<k}}]_{k=1..L}` ``[L, d]`` (``L = length - prompt_len``).

    Row 0 is the prompt's last position; row ``k-1`` the position before response token ``k``
    (the inputs of Razin et al. 2024's CHES, Definition 2; the final ``<eos>`` position is not a
    prefix of any response token and is dropped, as in the official code).

    Raises:
      ValueError: ``tokens`` not 1-D, or not ``1 <= prompt_len < length <= T``.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must have shape [T], got shape {tokens.shape}")
    if not 1 <= int(prompt_len) < int(length) <= tokens.shape[0]:
        raise ValueError(
            f"need 1 <= prompt_len < length <= T={tokens.shape[0]}, got {prompt_len}, {length}"
        )
    return model.hidden_states(tokens)[int(prompt_len) - 1 : int(length) - 1]


def lm_loss(model: CausalTransformer, tokens, length) -> jax.Array:
    """Return the mean next-token cross-entropy over non-pad targets of ``tokens`` ``[N, T]``."""
    logprobs = model(tokens[:, :-1])
    picked = jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]  # [N, T-1]
    mask = jnp.arange(1, tokens.shape[1])[None, :] < jnp.asarray(length)[:, None]
    return -jnp.sum(jnp.where(mask, picked, 0.0)) / jnp.sum(mask)


def pretrain(
    model: CausalTransformer,
    key: jax.Array,
    tokens,
    length,
    *,
    lr: float,
    num_steps: int,
    batch_size: int,
) -> tuple[CausalTransformer, jax.Array]:
    """Return ``(trained_model, losses [num_steps])``: Adam on minibatch LM loss, one jitted scan.

    Minibatch ``s`` is drawn (with replacement) from ``jax.random.fold_in(key, s)``. The input
    model is not modified.
    """
    check_positive("lr", lr)
    check_positive_int("num_steps", num_steps)
    check_positive_int("batch_size", batch_size)
    graphdef, state = nnx.split(model)
    tx = optax.adam(lr)
    tokens, length = jnp.asarray(tokens), jnp.asarray(length)

    @jax.jit
    def train(state):
        def step(carry, s):
            state, opt = carry
            rows = jax.random.randint(jax.random.fold_in(key, s), (batch_size,), 0, tokens.shape[0])
            loss, grads = jax.value_and_grad(
                lambda st: lm_loss(nnx.merge(graphdef, st), tokens[rows], length[rows])
            )(state)
            updates, opt = tx.update(grads, opt, state)
            return (optax.apply_updates(state, updates), opt), loss

        (state, _), losses = jax.lax.scan(step, (state, tx.init(state)), jnp.arange(num_steps))
        return state, losses

    state, losses = train(state)
    return nnx.merge(graphdef, state), losses


def sample_tokens(graphdef, state, key: jax.Array, prompts, prompt_len: int, temperature: float):
    """Pure, jit/vmap-able core of :func:`sample` on a split model ``(graphdef, state)``."""
    m = nnx.merge(graphdef, state)
    N, T = prompts.shape

    def step(carry, t):
        tokens, done = carry
        logits = m(tokens)[:, t - 1]  # [N, V] log-probs of the token at position t
        nxt = jax.random.categorical(jax.random.fold_in(key, t), logits / temperature)
        nxt = jnp.where(done, 0, nxt).astype(tokens.dtype)
        return (tokens.at[:, t].set(nxt), done | (nxt == 2)), None

    init = (prompts.at[:, prompt_len:].set(0), jnp.zeros(N, dtype=bool))
    (tokens, _), _ = jax.lax.scan(step, init, jnp.arange(prompt_len, T))
    return tokens


def sample(
    model: CausalTransformer, key: jax.Array, prompts, prompt_len: int, *, temperature: float
) -> jax.Array:
    """Return ``[N, T]`` tokens: ``prompts`` (all of length ``prompt_len``) then sampled tokens.

    Ancestral sampling at ``temperature`` up to position ``T - 1``; everything after a sampled
    ``<eos>`` (id 2) becomes ``<pad>`` (id 0). One jitted scan over positions (no KV cache: the
    sequences are short).

    Raises:
      ValueError: ``temperature <= 0``.
    """
    check_positive("temperature", temperature)
    graphdef, state = nnx.split(model)
    run = jax.jit(sample_tokens, static_argnums=(0, 4))
    return run(graphdef, state, key, jnp.asarray(prompts), prompt_len, temperature)
