r"""Glue for the transformer experiments: pre-training on the generated corpus, sequence pairs, and
preference flow of the transformer through :func:`sims.flow.flow_fn` with a loss of
:mod:`theory.losses`.

A preference run trains every transformer parameter on the weighted mean
:math:`L = \sum_i w_i\,\ell(\ln\pi(y^+_i|x_i), \ln\pi(y^-_i|x_i), \mathrm{ref}) / \sum_i w_i`
(Razin et al. 2024, Eq. 2 with sample weights; a weight of 0 drops a padded pair, so data sets of
different sizes stack on one ``vmap`` axis).

CHES scores come from :mod:`theory.multi_token` on the transformer's per-prefix hidden states.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sims import corpus
from sims.flow import flow_fn, make_optimizer
from sims.scores import normalized_edit_distance
from sims.transformer import CausalTransformer, pretrain, sample_tokens, sequence_logprob
from theory.losses import PairLoss
from theory.multi_token import ches, ches_length_normalized


def pretrained_model(
    seed: int,
    *,
    d_model: int,
    num_layers: int,
    num_heads: int,
    tied: bool,
    copies: int,
    refusal_prob: float,
    lr: float,
    num_steps: int,
    batch_size: int,
) -> tuple[CausalTransformer, np.ndarray]:
    """Return a :class:`CausalTransformer` pre-trained on :func:`sims.corpus.pretraining_corpus`.

    Returns:
      ``(model, losses)``; ``losses`` ``[num_steps]`` minibatch LM losses.
    """
    data = corpus.pretraining_corpus(
        np.random.default_rng(seed), copies=copies, refusal_prob=refusal_prob
    )
    model = CausalTransformer(
        len(corpus.VOCAB),
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        max_len=corpus.MAX_LEN,
        tied=tied,
        rngs=nnx.Rngs(seed),
    )
    model, losses = pretrain(
        model,
        jax.random.key(seed),
        data.tokens,
        data.length,
        lr=lr,
        num_steps=num_steps,
        batch_size=batch_size,
    )
    return model, np.asarray(losses)


class SequencePairs(NamedTuple):
    """Multi-token preference pairs (fields have a leading axis ``N``).

    Attributes:
      chosen, rejected: :class:`sims.corpus.Batch` of prompt + preferred / dispreferred response.
      ref_logprob_chosen, ref_logprob_rejected: ``[N]`` log-probs under the reference model.
      weight: ``[N]`` sample weights (0 drops a pair).
    """

    chosen: corpus.Batch
    rejected: corpus.Batch
    ref_logprob_chosen: jax.Array
    ref_logprob_rejected: jax.Array
    weight: jax.Array


def make_sequence_pairs(
    model: CausalTransformer, chosen: corpus.Batch, rejected: corpus.Batch, weight=None
) -> SequencePairs:
    """Return :class:`SequencePairs`, reference log-probs from ``model`` now (default weights 1)."""
    chosen = corpus.Batch(*(jnp.asarray(a) for a in chosen))
    rejected = corpus.Batch(*(jnp.asarray(a) for a in rejected))
    if chosen.tokens.shape != rejected.tokens.shape:
        raise ValueError(
            f"chosen and rejected must have one shape, got {chosen.tokens.shape}, "
            f"{rejected.tokens.shape}"
        )
    weight = jnp.ones(chosen.tokens.shape[0]) if weight is None else jnp.asarray(weight, float)
    return SequencePairs(
        chosen,
        rejected,
        sequence_logprob(model, *chosen),
        sequence_logprob(model, *rejected),
        weight,
    )


def pair_loss_fn(graphdef, loss: PairLoss) -> Callable[[Any, SequencePairs], jax.Array]:
    """Return ``(state, pairs) -> L``, the weighted mean pair loss of the merged model."""

    def loss_fn(state, pairs: SequencePairs):
        model = nnx.merge(graphdef, state)
        lp_c = sequence_logprob(model, *pairs.chosen)
        lp_r = sequence_logprob(model, *pairs.rejected)
        per_pair = loss(lp_c, lp_r, pairs.ref_logprob_chosen, pairs.ref_logprob_rejected)
        return jnp.sum(pairs.weight * per_pair) / jnp.sum(pairs.weight)

    return loss_fn


def preference_runs(
    model: CausalTransformer,
    pairs: SequencePairs,
    loss: PairLoss,
    *,
    dt: float,
    num_steps: int,
    record_every: int,
    optimizer: str = "sgd",
    observe: Callable | None = None,
) -> tuple[Any, np.ndarray, Any]:
    """Train copies of ``model`` on a stack of data sets (``pairs`` fields ``[R, N, ...]``).

    Each run is :func:`sims.flow.flow_fn` on :func:`pair_loss_fn`; runs are ``vmap``-ed. The
    default observable is the per-pair chosen log-prob ``[N]``.

    Returns:
      ``(final_states, losses [R, C+1], observables [R, C+1, ...])``.

    Raises:
      FloatingPointError: a run became non-finite (names the runs and first steps).
    """
    graphdef, state = nnx.split(model)
    if observe is None:

        def observe(state, pairs):
            return sequence_logprob(nnx.merge(graphdef, state), *pairs.chosen)

    fn = flow_fn(
        pair_loss_fn(graphdef, loss),
        observe,
        optimizer=make_optimizer(optimizer, dt=dt),
        num_steps=num_steps,
        record_every=record_every,
    )
    final, losses, obs, first_bad = jax.jit(jax.vmap(fn, in_axes=(None, 0)))(state, pairs)
    bad = np.flatnonzero(np.asarray(first_bad) >= 0)
    if bad.size:
        raise FloatingPointError(
            f"preference runs {bad.tolist()} became non-finite at steps "
            f"{np.asarray(first_bad)[bad].tolist()}; reduce dt"
        )
    return final, np.asarray(losses), jax.tree_util.tree_map(np.asarray, obs)


def pair_similarities(model: CausalTransformer, chosen: corpus.Batch, rejected: corpus.Batch):
    """Return per-pair CHES, length-normalised CHES, edit distance and last-hidden inner product.

    CHES uses :math:`h_{x, y_{<k}}` for ``k = 1..L`` (:func:`sims.transformer.prefix_hidden_states`
    convention: from the prompt's last position, the final ``<eos>`` position dropped); the
    inner-product baseline uses the hidden state at the last position of each full sequence.

    Returns:
      dict of ``[N]`` NumPy arrays: ``ches``, ``ches_ln``, ``edit_distance``, ``last_inner``.
    """
    graphdef, state = nnx.split(model)
    hidden = jax.jit(lambda tok: nnx.merge(graphdef, state).hidden_states(tok))
    H_pos, H_neg = np.asarray(hidden(chosen.tokens)), np.asarray(hidden(rejected.tokens))
    out = {k: [] for k in ("ches", "ches_ln", "edit_distance", "last_inner")}
    for i in range(H_pos.shape[0]):
        (p0, l0), (p1, l1) = (
            (int(chosen.prompt_len[i]), int(chosen.length[i])),
            (int(rejected.prompt_len[i]), int(rejected.length[i])),
        )
        h_pos, h_neg = H_pos[i, p0 - 1 : l0 - 1], H_neg[i, p1 - 1 : l1 - 1]  # [L+, d], [L-, d]
        out["ches"].append(float(ches(h_pos, h_neg)))
        out["ches_ln"].append(float(ches_length_normalized(h_pos, h_neg)))
        out["edit_distance"].append(
            normalized_edit_distance(
                np.asarray(chosen.tokens[i, p0:l0]), np.asarray(rejected.tokens[i, p1:l1])
            )
        )
        out["last_inner"].append(float(H_pos[i, l0 - 1] @ H_neg[i, l1 - 1]))
    return {k: np.array(v) for k, v in out.items()}


def response_batch(tokens, prompt_len: int) -> corpus.Batch:
    """Return the :class:`~sims.corpus.Batch` of sampled ``tokens`` ``[N, T]`` (ends at ``<eos>``,
    or at ``T`` when none was sampled)."""
    tokens = np.asarray(tokens)
    N, T = tokens.shape
    is_eos = tokens[:, prompt_len:] == corpus.EOS
    length = np.where(is_eos.any(1), prompt_len + np.argmax(is_eos, 1) + 1, T)
    return corpus.Batch(tokens, np.full(N, prompt_len, np.int32), length.astype(np.int32))


def refusal_rates(
    graphdef, states, key, prompts, prompt_len: int, *, samples: int, temperature: float
) -> np.ndarray:
    """Return the judged refusal rate of each stacked model state (leading axis ``R``).

    Each state samples ``samples`` responses to every prompt; :func:`sims.corpus.is_refusal`
    judges them.
    """
    rep = jnp.repeat(jnp.asarray(prompts), samples, axis=0)  # [P * samples, T]
    fn = jax.jit(
        jax.vmap(lambda st: sample_tokens(graphdef, st, key, rep, prompt_len, temperature))
    )
    toks = np.asarray(fn(states))  # [R, P * samples, T]
    return np.array(
        [np.mean([corpus.is_refusal(corpus.decode(t[prompt_len:])) for t in run]) for run in toks]
    )
