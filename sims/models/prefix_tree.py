r"""The unconstrained-features model over a prefix tree: multi-token preference data and its flow.

Razin et al. 2024 (§4.1) train one free hidden embedding per prefix :math:`(x, y_{<k})`. Here a
dataset of ``(prompt, chosen tokens, rejected tokens)`` is mapped to rows of
:class:`sims.models.unconstrained.UnconstrainedFeatures`'s ``hidden`` table: one row per *distinct*
prefix, so
responses sharing their first tokens (or pairs sharing a prompt) share rows. Responses are padded
to one length with masks; summed response log-probs are masked sums, so everything is jit/vmap
friendly with static shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sims.flows.core import PairObjective, velocity_along_flow
from sims.models.unconstrained import UnconstrainedFeatures
from theory.checks import check_token_ids
from theory.losses import PairLoss


class PairRecord(NamedTuple):
    """Observables of a sequence flow: ``logprob_chosen`` and ``logprob_rejected``, each ``[N]``."""

    logprob_chosen: jax.Array
    logprob_rejected: jax.Array


class PrefixTreePairs(NamedTuple):
    """Padded multi-token preference pairs indexed into a prefix table (TRL names).

    The pairs type of the multi-token unconstrained-features family (one hidden row per distinct
    prefix); :func:`sims.flows.core.preference_flow` trains on it.

    Attributes:
      chosen: ``[N, Lc]`` token ids of :math:`y^+` (0 where padded).
      chosen_prefix: ``[N, Lc]`` hidden-table row of the prefix predicting each token.
      chosen_mask: ``[N, Lc]`` bool, real positions.
      rejected, rejected_prefix, rejected_mask: ``[N, Lr]`` likewise for :math:`y^-`.
      ref_logprob_chosen: ``[N]`` :math:`\\ln\\pi_{ref}(y^+|x)` (0 until set).
      ref_logprob_rejected: ``[N]`` likewise.
      weight: ``[N]`` sample weights, or ``None`` (all 1).
      weight: ``[N]`` sample weights, or ``None`` (all 1).
    """

    chosen: jax.Array
    chosen_prefix: jax.Array
    chosen_mask: jax.Array
    rejected: jax.Array
    rejected_prefix: jax.Array
    rejected_mask: jax.Array
    ref_logprob_chosen: jax.Array
    ref_logprob_rejected: jax.Array
    weight: jax.Array | None = None

    def logprobs(self, model: UnconstrainedFeatures) -> tuple[jax.Array, jax.Array]:
        """Return ``(logprob_chosen, logprob_rejected)``, each ``[N]``."""
        return (
            response_logprobs_from_prefixes(
                model, self.chosen, self.chosen_prefix, self.chosen_mask
            ),
            response_logprobs_from_prefixes(
                model, self.rejected, self.rejected_prefix, self.rejected_mask
            ),
        )

    def record(self, model: UnconstrainedFeatures) -> PairRecord:
        """Return the default flow observables: both responses' log-probs."""
        return PairRecord(*self.logprobs(model))

    def validate(self, model: UnconstrainedFeatures) -> None:
        """Raise ``ValueError`` for token ids outside ``model``'s vocabulary or prefix table."""
        for name in ("chosen", "rejected"):
            check_token_ids(name, getattr(self, name), model.vocab_size)
            check_token_ids(f"{name}_prefix", getattr(self, f"{name}_prefix"), model.num_prefixes)


def _pad(rows: Sequence[Sequence[int]], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def index_prefixes(
    prompt: Sequence[int], chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]]
) -> tuple[PrefixTreePairs, list[tuple]]:
    r"""Return padded pairs whose prefix ids give one row per distinct prefix, and the prefixes.

    Prefix :math:`(x, y_{<k})` is the key ``(prompt, tuple(y[:k-1]))``; ids are assigned in order
    of first appearance (chosen before rejected, pair by pair), so the result is deterministic.

    Source: the unconstrained-features model over all prefixes, Razin et al. 2024 §4.1.

    Args:
      prompt: ``N`` hashable prompt keys (equal keys are one prompt, shared by its pairs).
      chosen: ``N`` non-empty token-id sequences :math:`y^+`.
      rejected: ``N`` non-empty token-id sequences :math:`y^-`.

    Returns:
      ``(pairs, prefixes)``: :class:`PrefixTreePairs` (reference log-probs 0) and the list of
      prefix keys, ``prefixes[i]`` being row ``i``.

    Raises:
      ValueError: lengths differ, an empty response, or a negative token id.

    Example:
      >>> pairs, prefixes = index_prefixes([7], [[1, 2]], [[1, 3, 4]])
      >>> pairs.chosen_prefix.tolist(), pairs.rejected_prefix.tolist()  # (x) and (x,1) shared
      ([[0, 1]], [[0, 1, 2]])
    """
    if not len(prompt) == len(chosen) == len(rejected):
        raise ValueError(
            "prompt, chosen and rejected must have one length N, got "
            f"{len(prompt)}, {len(chosen)}, {len(rejected)}"
        )
    ids: dict[tuple, int] = {}
    paths = {"chosen": [], "rejected": []}
    for i, x in enumerate(prompt):
        for name, y in (("chosen", chosen[i]), ("rejected", rejected[i])):
            y = [int(t) for t in y]
            if not y:
                raise ValueError(f"{name}[{i}] must be a non-empty response, got an empty one")
            if min(y) < 0:
                raise ValueError(f"{name}[{i}] must hold token ids >= 0, got {y}")
            paths[name].append([ids.setdefault((x, tuple(y[:k])), len(ids)) for k in range(len(y))])
    Lc = max(len(y) for y in chosen)
    Lr = max(len(y) for y in rejected)
    mask_c = np.arange(Lc)[None, :] < np.array([len(y) for y in chosen])[:, None]
    mask_r = np.arange(Lr)[None, :] < np.array([len(y) for y in rejected])[:, None]
    n = len(prompt)
    pairs = PrefixTreePairs(
        jnp.asarray(_pad(chosen, Lc)),
        jnp.asarray(_pad(paths["chosen"], Lc)),
        jnp.asarray(mask_c),
        jnp.asarray(_pad(rejected, Lr)),
        jnp.asarray(_pad(paths["rejected"], Lr)),
        jnp.asarray(mask_r),
        jnp.zeros(n),
        jnp.zeros(n),
    )
    return pairs, list(ids)


def response_logprobs_from_prefixes(
    model: UnconstrainedFeatures, tokens: jax.Array, prefix: jax.Array, mask: jax.Array
) -> jax.Array:
    r"""Return summed response log-probs :math:`\sum_k \mathrm{mask}_k\ln\pi(y_k|x,y_{<k})`.

    Source: Razin et al. 2024, Eq. 1.

    Args:
      model: the unconstrained-features model.
      tokens: ``[..., L]`` token ids.
      prefix: ``[..., L]`` hidden-table rows of the prefixes.
      mask: ``[..., L]`` bool, real positions.

    Returns:
      ``[...]`` log-probs.

    Example:
      >>> from flax import nnx
      >>> model = UnconstrainedFeatures(4, 2, 3, rngs=nnx.Rngs(0))
      >>> lp = response_logprobs_from_prefixes(model, jnp.array([[1, 0]]), jnp.array([[0, 0]]),
      ...                                      jnp.array([[True, False]]))
      >>> bool(jnp.allclose(lp[0], model(jnp.array([0]))[0, 1]))  # the padded position is ignored
      True
    """
    logprobs = model(prefix)  # [..., L, V]
    picked = jnp.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0]  # [..., L]
    return jnp.sum(jnp.where(mask, picked, 0.0), axis=-1)


def with_reference(model: UnconstrainedFeatures, pairs: PrefixTreePairs) -> PrefixTreePairs:
    """Return ``pairs`` with reference log-probs taken from ``model`` now.

    Raises:
      ValueError: prefix ids outside the model's table or token ids outside its vocabulary.
    """
    pairs.validate(model)
    lp_c, lp_r = pairs.logprobs(model)
    return pairs._replace(ref_logprob_chosen=lp_c, ref_logprob_rejected=lp_r)


def restrict(
    model: UnconstrainedFeatures, pairs: PrefixTreePairs, rows: np.ndarray, *, num_prefixes: int
) -> tuple[UnconstrainedFeatures, PrefixTreePairs]:
    """Return a model and pairs for the subset ``rows``, with a compact prefix table.

    The subset's prefixes are renumbered ``0..P_sub-1`` in order of appearance; the table is padded
    to ``num_prefixes`` rows (unused rows copy row 0 and never receive gradient), so subsets of one
    size stack for ``vmap``. ``W`` is copied.

    Raises:
      ValueError: the subset has more distinct prefixes than ``num_prefixes``.
    """
    rows = np.asarray(rows)
    used_c = np.asarray(pairs.chosen_prefix)[rows]
    used_r = np.asarray(pairs.rejected_prefix)[rows]
    mask_c, mask_r = np.asarray(pairs.chosen_mask)[rows], np.asarray(pairs.rejected_mask)[rows]
    old = np.unique(np.concatenate([used_c[mask_c], used_r[mask_r]]))
    if old.size > num_prefixes:
        raise ValueError(f"num_prefixes must be >= {old.size} for this subset, got {num_prefixes}")
    new_of_old = np.zeros(model.num_prefixes, np.int32)
    new_of_old[old] = np.arange(old.size)
    table = np.asarray(model.hidden[...])
    hidden = np.concatenate([table[old], np.repeat(table[:1], num_prefixes - old.size, axis=0)])
    sub = UnconstrainedFeatures.from_arrays(model.unembedding[...], hidden)
    picked = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)[rows]), pairs)
    picked = picked._replace(
        chosen_prefix=jnp.asarray(np.where(mask_c, new_of_old[used_c], 0)),
        rejected_prefix=jnp.asarray(np.where(mask_r, new_of_old[used_r], 0)),
    )
    return sub, picked


def extend_prefixes(
    prefixes: list[tuple], prompt, tokens: Sequence[int]
) -> tuple[list[int], list[tuple]]:
    """Return the rows of the prefixes of ``tokens`` after ``prompt``, appending new prefixes.

    Use it to give a response outside the dataset (Theorem 7's ``z``) its prefix rows: shared
    prefixes reuse existing rows, new ones extend the table (they get no gradient from the loss).

    Example:
      >>> _, prefixes = index_prefixes([0], [[1, 2]], [[3]])
      >>> extend_prefixes(prefixes, 0, [1, 5])[0]  # (x) and (x, 1) exist; nothing new needed
      [0, 1]
    """
    row = {p: i for i, p in enumerate(prefixes)}
    out = list(prefixes)
    ids = []
    for k in range(len(tokens)):
        key = (prompt, tuple(int(t) for t in tokens[:k]))
        if key not in row:
            row[key] = len(out)
            out.append(key)
        ids.append(row[key])
    return ids, out


def flow_velocity(
    model: UnconstrainedFeatures,
    pairs: PrefixTreePairs,
    loss: PairLoss,
    tokens: jax.Array,
    prefix: jax.Array,
    mask: jax.Array,
) -> jax.Array:
    r"""Return :math:`\frac{d}{dt}\ln\pi(z|x)` of query responses under gradient flow, by autodiff.

    .. math:: \frac{d}{dt}\ln\pi(z|x) = \langle\nabla_\theta\ln\pi(z|x), -\nabla_\theta L\rangle,
       \qquad L = \frac1N\sum_i\ell_i

    computed with ``jax.grad`` of the actual loss and ``jax.jvp`` of the query log-probs: the
    independent reference for the closed forms of :mod:`theory.multi_token`.

    Source: gradient flow (Razin et al. 2024, §4.1).

    Args:
      model: the current model.
      pairs: the training pairs (loss = mean over them).
      loss: a pair loss.
      tokens, prefix, mask: ``[M, L]`` query responses (as in
        :func:`response_logprobs_from_prefixes`).

    Returns:
      ``[M]`` velocities.
    """
    query = PrefixQuery(jnp.asarray(tokens), jnp.asarray(prefix), jnp.asarray(mask))
    return velocity_along_flow(model, PairObjective(loss), pairs, _query_logprobs, query)


class PrefixQuery(NamedTuple):
    """Query responses for :func:`flow_velocity`: ``[M, L]`` tokens, prefix rows and mask."""

    tokens: jax.Array
    prefix: jax.Array
    mask: jax.Array


def _query_logprobs(model: UnconstrainedFeatures, query: PrefixQuery) -> jax.Array:
    return response_logprobs_from_prefixes(model, query.tokens, query.prefix, query.mask)
