r"""Which preference pairs will displace? Per-pair scores and exact t = 0 velocities of a causal LM.

For every pair of a data set (:class:`~sims.models.transformer.TokenBatch` chosen / rejected) and
any
model of the transformer family (:class:`sims.models.decoder.DecoderLM` from a checkpoint, or
:class:`sims.models.transformer.CausalTransformer`), :func:`audit_pairs` returns

* CHES and length-normalised CHES (Razin et al. 2024, Definitions 2-3) on the final-norm hidden
  states :math:`h_{x, y_{<k}}`, ``k = 1..|y|`` (from the prompt's last position; the final
  ``<eos>`` position is dropped, as in the official code and
  :func:`sims.models.transformer.prefix_hidden_states`);
* the last-hidden inner product :math:`\langle h_{x,y^+}, h_{x,y^-}\rangle` and the normalised
  token edit distance (the §5 baselines);
* the **exact** velocity at :math:`t = 0` of gradient flow on the pair's own loss,

  .. math:: \frac{d}{dt}\ln\pi_\theta(y^+|x)\Big|_{t=0}
            = \langle \nabla_\theta \ln\pi_\theta(y^+|x), -\nabla_\theta \ell(\theta)\rangle

  (Eq. 7's left side, for all parameters of the real architecture, not the unconstrained-features
  model): one ``jax.grad`` of the loss and one ``jax.jvp`` of the log-probs along
  :math:`-\nabla\ell`, with the reference log-probs equal to the model's (so ``t = 0``);
* from the same ``jvp``: the tokens whose probability at the first response position rises
  fastest, ranked by :math:`\frac{d}{dt}\pi(z|x) = \pi(z|x)\,\frac{d}{dt}\ln\pi(z|x)` (Theorem 5's
  question "where does the mass go"; meaningful for single-token responses).

A positive CHES / a negative velocity flags a pair that displaces its preferred response.
Pairs run in jitted, ``vmap``-ed chunks of ``batch_size`` (per-pair gradients: memory grows with
``batch_size`` times the parameter count; use 1 for multi-billion-parameter models).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sims.analysis.scores import normalized_edit_distance
from sims.flows.core import PairObjective
from sims.models.transformer import TokenBatch, TransformerPairs, response_mask
from theory.checks import check_positive_int, check_token_ids
from theory.losses import PairLoss
from theory.multi_token import masked_ches


class PairAudit(NamedTuple):
    """Per-pair audit numbers (NumPy, leading axis ``N``).

    Attributes:
      ches, ches_ln: CHES and length-normalised CHES.
      last_inner: inner product of the hidden states at each sequence's last position.
      edit_distance: normalised token edit distance of the two responses.
      logprob_chosen, logprob_rejected: :math:`\\ln\\pi(y^\\pm|x)`.
      velocity_chosen, velocity_rejected: exact :math:`\\frac{d}{dt}\\ln\\pi(y^\\pm|x)` at t = 0.
      gainers: ``[N, k]`` token ids with the largest :math:`\\frac{d}{dt}\\pi(z|x)` at the first
        response position (descending).
      gainer_rates: ``[N, k]`` their :math:`\\frac{d}{dt}\\pi(z|x)`.
    """

    ches: np.ndarray
    ches_ln: np.ndarray
    last_inner: np.ndarray
    edit_distance: np.ndarray
    logprob_chosen: np.ndarray
    logprob_rejected: np.ndarray
    velocity_chosen: np.ndarray
    velocity_rejected: np.ndarray
    gainers: np.ndarray
    gainer_rates: np.ndarray


def _sequence_stats(model: nnx.Module, batch: TokenBatch) -> tuple[jax.Array, jax.Array]:
    """``(ln pi(y|x) [N], ln pi(.|x) at the first response position [N, V])`` from one forward."""
    logp = jax.nn.log_softmax(model(batch.tokens[:, :-1]), axis=-1)  # [N, T-1, V]
    picked = jnp.take_along_axis(logp, batch.tokens[:, 1:, None], axis=-1)[..., 0]  # [N, T-1]
    mask = response_mask(batch.prompt_len, batch.length, batch.tokens.shape[1])[:, 1:]
    first = jnp.take_along_axis(logp, (batch.prompt_len - 1)[:, None, None], axis=1)[:, 0]
    return jnp.sum(jnp.where(mask, picked, 0.0), axis=-1), first


def _prefix_mask(batch: TokenBatch) -> jax.Array:
    """``[N, T]``: positions ``prompt_len - 1 .. length - 2`` (the prefixes of response tokens)."""
    t = jnp.arange(batch.tokens.shape[1])[None, :]
    return (t >= batch.prompt_len[:, None] - 1) & (t <= batch.length[:, None] - 2)


def _one_pair_velocity(graphdef, params, rest, loss, chosen: TokenBatch, rejected: TokenBatch):
    """Velocities of one pair (fields without the ``N`` axis) under its own loss at t = 0."""

    def one(b):
        return TokenBatch(b.tokens[None], b.prompt_len[None], b.length[None])

    chosen, rejected = one(chosen), one(rejected)
    model = nnx.merge(graphdef, params, rest)
    ref_c, ref_r = (jax.lax.stop_gradient(_sequence_stats(model, b)[0]) for b in (chosen, rejected))
    pairs = TransformerPairs(chosen, rejected, ref_c, ref_r, jnp.ones(1, ref_c.dtype))
    objective = PairObjective(loss)
    grad = jax.grad(lambda p: objective(nnx.merge(graphdef, p, rest), pairs))(params)

    def observe(p):
        m = nnx.merge(graphdef, p, rest)
        lp_c, first = _sequence_stats(m, chosen)
        return lp_c[0], _sequence_stats(m, rejected)[0][0], first[0]

    primal, tangent = jax.jvp(observe, (params,), (jax.tree_util.tree_map(jnp.negative, grad),))
    return primal, tangent


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _audit_chunk(graphdef, params, rest, loss, top_k: int, chosen, rejected):
    (lp_c, lp_r, first), (v_c, v_r, v_first) = jax.vmap(
        lambda c, r: _one_pair_velocity(graphdef, params, rest, loss, c, r)
    )(chosen, rejected)
    rate = jnp.exp(first) * v_first  # d/dt pi(z|x) [B, V]
    rates, gainers = jax.lax.top_k(rate, top_k)
    model = nnx.merge(graphdef, params, rest)
    h_c, h_r = model.hidden_states(chosen.tokens), model.hidden_states(rejected.tokens)  # [B,T,d]
    m_c, m_r = _prefix_mask(chosen), _prefix_mask(rejected)
    last = lambda h, b: jnp.take_along_axis(h, (b.length - 1)[:, None, None], axis=1)[:, 0]  # noqa: E731
    return dict(
        ches=masked_ches(h_c, h_r, m_c, m_r),
        ches_ln=masked_ches(h_c, h_r, m_c, m_r, length_normalized=True),
        last_inner=jnp.sum(last(h_c, chosen) * last(h_r, rejected), axis=-1),
        logprob_chosen=lp_c,
        logprob_rejected=lp_r,
        velocity_chosen=v_c,
        velocity_rejected=v_r,
        gainers=gainers,
        gainer_rates=rates,
    )


def audit_pairs(
    model: nnx.Module,
    chosen: TokenBatch,
    rejected: TokenBatch,
    loss: PairLoss,
    *,
    batch_size: int = 8,
    top_k: int = 5,
    progress: Callable[[str], None] | None = None,
) -> PairAudit:
    r"""Return the :class:`PairAudit` of every pair (see the module docstring for each number).

    Source: CHES, Razin et al. 2024 Definitions 2-3; the velocity is the left side of Eq. 7 (the
    gradient-flow derivative of :math:`\ln\pi(y^+|x)` at t = 0 for the one-pair data set).

    Args:
      model: a causal LM of the transformer family (logits ``[N, T, V]``, ``hidden_states``).
      chosen, rejected: right-padded :class:`~sims.models.transformer.TokenBatch` of one shape
      ``[N, T]``.
      loss: the pair loss (e.g. ``make_loss("dpo", beta=0.1)``); its reference log-probs are the
        model's, so the margin term is at its t = 0 value.
      batch_size: pairs per jitted ``vmap`` chunk (the last chunk is padded by repeating a pair).
      top_k: gainers kept per pair (``<= V``).
      progress: called with a progress line after every chunk (e.g. ``print``).

    Raises:
      ValueError: shapes differ, ids outside the vocabulary, bad ``batch_size``/``top_k``.
    """
    check_positive_int("batch_size", batch_size)
    check_positive_int("top_k", top_k)
    if top_k > model.vocab_size:
        raise ValueError(f"top_k must be <= V={model.vocab_size}, got top_k={top_k}")
    chosen = TokenBatch(*(np.asarray(a) for a in chosen))
    rejected = TokenBatch(*(np.asarray(a) for a in rejected))
    if chosen.tokens.shape != rejected.tokens.shape:
        raise ValueError(
            f"chosen and rejected must have one shape, got {chosen.tokens.shape}, "
            f"{rejected.tokens.shape}"
        )
    for name, b in (("chosen", chosen), ("rejected", rejected)):
        check_token_ids(f"{name}.tokens", b.tokens, model.vocab_size)
        if np.any(b.prompt_len < 1) or np.any(b.length <= b.prompt_len):
            raise ValueError(f"{name} must have 1 <= prompt_len < length (non-empty responses)")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    N = chosen.tokens.shape[0]
    parts: list[dict] = []
    start = time.perf_counter()
    first_chunk = 0.0
    for lo in range(0, N, batch_size):
        rows = np.minimum(np.arange(lo, lo + batch_size), N - 1)  # pad the last chunk
        c, r = (TokenBatch(*(jnp.asarray(a[rows]) for a in b)) for b in (chosen, rejected))
        out = _audit_chunk(graphdef, params, rest, loss, top_k, c, r)
        n = min(batch_size, N - lo)
        parts.append({k: np.asarray(v)[:n] for k, v in out.items()})
        elapsed = time.perf_counter() - start
        if lo == 0:  # the first chunk includes compilation: the rate is measured after it
            first_chunk = elapsed
        if progress is not None and lo == 0:
            progress(f"[audit] {n}/{N} pairs (first chunk, with compilation: {elapsed:.1f} s)")
        elif progress is not None:
            rate = (lo + n - batch_size) / (elapsed - first_chunk)
            progress(f"[audit] {lo + n}/{N} pairs ({rate:.1f} pairs/s after compilation)")
    res = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    res["edit_distance"] = np.array(
        [
            normalized_edit_distance(
                chosen.tokens[i, chosen.prompt_len[i] : chosen.length[i]],
                rejected.tokens[i, rejected.prompt_len[i] : rejected.length[i]],
            )
            for i in range(N)
        ]
    )
    return PairAudit(**res)
