r"""Ancestral sampling from a :class:`~sims.models.decoder.DecoderLM` with a key/value cache.

:func:`sample` draws responses for a batch of right-padded prompts: the prompts are re-packed
left-padded (so every row's next token sits in the same column), one prefill pass fills the
cache, then a ``jax.lax.scan`` appends one token per step at temperature ``T`` (no top-k or
nucleus, as Razin et al. 2024 §6 sample: temperature 1, ``max_new_tokens``). A row stops at its
first stop token (EOS or the chat template's end-of-turn); later positions are padding. Compiled
once per (model structure, batch, prompt width, ``max_new_tokens``); the temperature and the key
are run-time values.

:func:`cached_logits` runs the same prefill + decode path with given continuation tokens
(teacher forcing): its logits equal a full forward pass's to float round-off (tested), which is
what makes the cache path trustworthy.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sims.models.transformer import TokenBatch
from theory.checks import check_positive, check_positive_int


class Samples(NamedTuple):
    """Sampled responses after their prompts.

    Attributes:
      batch: right-padded :class:`~sims.models.transformer.TokenBatch` of prompt + response
        (the stop token included in ``length``, when one was drawn).
      logprob: ``[N]`` summed log-probability of each response under the sampling model at
        temperature 1 (the policy's own log-probability, not the tempered one).
      stopped: ``[N]`` whether a stop token ended the response (else it hit ``max_new_tokens``).
    """

    batch: TokenBatch
    logprob: np.ndarray
    stopped: np.ndarray


def left_pack(tokens: np.ndarray, prompt_len: np.ndarray, pad_id: int):
    """Return ``(tokens, valid, positions)`` of right-padded prompts moved to the right edge.

    Example:
      >>> t, v, p = left_pack(np.array([[5, 6, 0], [7, 0, 0]]), np.array([2, 1]), 0)
      >>> t.tolist(), v.tolist(), p.tolist()
      ([[0, 5, 6], [0, 0, 7]], [[False, True, True], [False, False, True]], [[0, 0, 1], [0, 0, 0]])
    """
    tokens, prompt_len = np.asarray(tokens), np.asarray(prompt_len)
    N, P = tokens.shape
    out = np.full((N, P), pad_id, np.int32)
    valid = np.zeros((N, P), bool)
    for r in range(N):
        n = int(prompt_len[r])
        out[r, P - n :] = tokens[r, :n]
        valid[r, P - n :] = True
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    return out, valid, positions


def _prefill(model, tokens, valid, positions, cache_len):
    cache = model.init_cache(tokens.shape[0], cache_len)
    h, cache = model.decode(tokens, positions, valid, cache)
    return model.logits(h[:, -1]), cache  # [N, V] next-token logits after the prompt


@functools.partial(jax.jit, static_argnames=("max_new_tokens",))
def _sample_core(
    model, tokens, valid, positions, key, temperature, stop_ids, pad_id, *, max_new_tokens
):
    N, P = tokens.shape
    logits, cache = _prefill(model, tokens, valid, positions, P + max_new_tokens)
    next_pos = positions[:, -1] + 1

    def step(carry, k):
        logits, cache, done, pos = carry
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        draw = jax.random.categorical(jax.random.fold_in(key, k), logp / temperature)
        tok = jnp.where(done, pad_id, draw).astype(jnp.int32)
        lp = jnp.where(done, 0.0, jnp.take_along_axis(logp, draw[:, None], axis=1)[:, 0])
        stop = jnp.any(tok[:, None] == stop_ids[None, :], axis=1) & ~done
        h, cache = model.decode(tok[:, None], pos[:, None], ~done[:, None], cache)
        return (model.logits(h[:, 0]), cache, done | stop, pos + 1), (tok, lp, done)

    init = (logits, cache, jnp.zeros(N, bool), next_pos)
    (_, _, done, _), (toks, lps, was_done) = jax.lax.scan(step, init, jnp.arange(max_new_tokens))
    return toks.T, lps.T, ~was_done.T, done  # [N, M] tokens, log-probs, kept mask; [N] stopped


def sample(
    model: nnx.Module,
    prompts: TokenBatch,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    stop_ids: tuple[int, ...] = (),
    pad_id: int = 0,
) -> Samples:
    """Return responses sampled after each right-padded prompt of ``prompts``.

    Args:
      model: a :class:`~sims.models.decoder.DecoderLM` (anything with ``init_cache``,
        ``decode`` and ``logits``).
      prompts: right-padded prompts (``prompt_len`` their lengths).
      key: a typed PRNG key; step ``k`` draws with ``fold_in(key, k)``.
      max_new_tokens: the longest response, ``>= 1``.
      temperature: ``> 0``; ``1`` samples the policy itself.
      stop_ids: tokens that end a response (kept in it).
      pad_id: the padding id.

    Returns:
      :class:`Samples`.

    Raises:
      ValueError: ``max_new_tokens < 1`` or ``temperature <= 0``; a prompt longer than the
        model's ``max_position_embeddings`` together with ``max_new_tokens``.
    """
    check_positive_int("max_new_tokens", max_new_tokens)
    check_positive("temperature", temperature)
    plen = np.asarray(prompts.prompt_len)
    limit = model.config.max_position_embeddings
    if int(plen.max()) + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({int(plen.max())} tokens) + max_new_tokens ({max_new_tokens}) must fit "
            f"max_position_embeddings={limit}"
        )
    tokens, valid, positions = left_pack(prompts.tokens, plen, pad_id)
    toks, lps, kept, stopped = _sample_core(
        model,
        jnp.asarray(tokens),
        jnp.asarray(valid),
        jnp.asarray(positions),
        key,
        jnp.asarray(temperature, jnp.float32),
        jnp.asarray(np.array(stop_ids or (-1,)), jnp.int32),
        jnp.int32(pad_id),
        max_new_tokens=max_new_tokens,
    )
    toks, lps, kept = np.asarray(toks), np.asarray(lps, np.float64), np.asarray(kept)
    N, P = np.asarray(prompts.tokens).shape
    out = np.full((N, P + max_new_tokens), pad_id, np.int32)
    lengths = np.zeros(N, np.int32)
    for r in range(N):
        n, m = int(plen[r]), int(kept[r].sum())
        out[r, :n] = np.asarray(prompts.tokens)[r, :n]
        out[r, n : n + m] = toks[r, :m]
        lengths[r] = n + m
    return Samples(
        TokenBatch(out, plen.astype(np.int32), lengths), lps.sum(axis=1), np.asarray(stopped)
    )


@jax.jit
def _cached_core(model, tokens, valid, positions, continuation):
    N, P = tokens.shape
    M = continuation.shape[1]
    logits, cache = _prefill(model, tokens, valid, positions, P + M)
    pos = positions[:, -1] + 1

    def step(carry, tok):
        logits, cache, pos = carry
        h, cache = model.decode(tok[:, None], pos[:, None], jnp.ones((N, 1), bool), cache)
        return (model.logits(h[:, 0]), cache, pos + 1), logits

    _, out = jax.lax.scan(step, (logits, cache, pos), continuation.T)
    return jnp.swapaxes(out, 0, 1)  # [N, M, V]: logits before each continuation token


def cached_logits(
    model: nnx.Module, prompts: TokenBatch, continuation: np.ndarray, *, pad_id: int = 0
) -> jax.Array:
    """Return ``[N, M, V]`` next-token logits before each token of ``continuation`` ``[N, M]``,
    computed through the key/value cache (prefill, then one token at a time), as :func:`sample`
    does -- for checking the cache against a full forward pass."""
    tokens, valid, positions = left_pack(prompts.tokens, prompts.prompt_len, pad_id)
    return _cached_core(
        model,
        jnp.asarray(tokens),
        jnp.asarray(valid),
        jnp.asarray(positions),
        jnp.asarray(continuation, jnp.int32),
    )
