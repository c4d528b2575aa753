r"""Per-pair similarity scores of a preference dataset and the percentile-subset protocol.

Razin et al. 2024 §5 (Figure 2) rank preference pairs by CHES, length-normalised CHES, normalised
token edit distance and the inner product of the last hidden embeddings, train on subsets at
score percentiles and compare the change in preferred log-probability; this module supplies the
scores, the subsets and Spearman's rank correlation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sims.models.prefix_tree import PrefixTreePairs
from sims.models.transformer import TokenBatch
from sims.models.unconstrained import UnconstrainedFeatures
from theory.multi_token import ches, ches_length_normalized, masked_ches


def dataset_ches(
    model: UnconstrainedFeatures, pairs: PrefixTreePairs, *, length_normalized: bool = False
) -> jax.Array:
    """Return ``[N]`` CHES (Definition 2) or length-normalised CHES (Definition 3) of every pair.

    Source: Razin et al. 2024, Definitions 2-3, on the model's hidden embeddings of each prefix.

    Example:
      >>> from sims.models.prefix_tree import index_prefixes
      >>> pairs, _ = index_prefixes([0], [[1]], [[2]])
      >>> model = UnconstrainedFeatures.from_arrays(jnp.eye(3), jnp.ones((1, 3)))
      >>> float(dataset_ches(model, pairs)[0])  # one shared prompt row: <h, h> - |h|^2
      0.0
    """
    hidden = model.hidden[...]
    return masked_ches(
        hidden[pairs.chosen_prefix],
        hidden[pairs.rejected_prefix],
        pairs.chosen_mask,
        pairs.rejected_mask,
        length_normalized=length_normalized,
    )


def normalized_edit_distance(a: Sequence[int], b: Sequence[int]) -> float:
    """Return the Levenshtein distance of two token sequences divided by the longer length.

    Source: the edit-distance baseline of Razin et al. 2024 §5 (suggested by Pal et al. 2024);
    the official code divides by the maximum length. Lower means more similar.

    Raises:
      ValueError: both sequences empty.

    Example:
      >>> normalized_edit_distance([1, 2, 3], [1, 3])  # one deletion / 3
      0.3333333333333333
    """
    if not len(a) and not len(b):
        raise ValueError("a and b must not both be empty (the distance is normalised by length)")
    prev = np.arange(len(b) + 1)
    for i, x in enumerate(a, 1):
        cur = np.empty_like(prev)
        cur[0] = i
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return float(prev[-1]) / max(len(a), len(b))


def percentile_subsets(scores: np.ndarray, percentiles: Sequence[float], size: int) -> np.ndarray:
    """Return ``[len(percentiles), size]`` row indices of subsets centred on score percentiles.

    The subset for percentile ``q`` is ``size`` consecutive pairs in score order centred on rank
    ``q/100 * (N-1)``, clipped to the ends: 0 gives the ``size`` lowest, 100 the highest.
    Ties are broken by index (stable sort), so the result is deterministic.

    Source: Razin et al. 2024 §5 ("a subset of 512 samples centred on" each percentile).

    Raises:
      ValueError: ``size`` exceeds the number of pairs, or a percentile outside [0, 100].

    Example:
      >>> # score order: rows 1, 3, 2, 4, 0; the median window starts at rank floor(2 - 0.5 + 0.5)
      >>> percentile_subsets(np.array([5.0, 1.0, 3.0, 2.0, 4.0]), [0, 50, 100], 2).tolist()
      [[1, 3], [2, 4], [4, 0]]
    """
    scores = np.asarray(scores)
    n = scores.shape[0]
    if not 1 <= size <= n:
        raise ValueError(f"size must be in [1, N={n}], got size={size}")
    order = np.argsort(scores, kind="stable")
    out = []
    for q in percentiles:
        if not 0 <= q <= 100:
            raise ValueError(f"percentiles must be in [0, 100], got {q}")
        centre = q / 100 * (n - 1)
        start = int(np.clip(np.floor(centre - (size - 1) / 2 + 0.5), 0, n - size))
        out.append(order[start : start + size])
    return np.stack(out)


class UndefinedStatistic(ValueError):
    """A summary statistic is undefined for its input (fewer than two points, a constant input).

    Experiments report it as ``null`` with the reason (:func:`sims.analysis.summaries.statistic`)
    instead of losing the run; a wrong shape stays a plain ``ValueError`` (a bug, not data).
    """


def _paired(x: Sequence[float], y: Sequence[float], what: str) -> tuple[np.ndarray, np.ndarray]:
    """``x``, ``y`` as float arrays, checked: one 1-D shape (else ValueError), >= 2 points and
    neither constant (else :class:`UndefinedStatistic`)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of one length, got {x.shape} and {y.shape}")
    if x.size < 2:
        raise UndefinedStatistic(f"{what} needs >= 2 points, got {x.size}")
    for name, v in (("x", x), ("y", y)):
        if np.all(v == v[0]):
            raise UndefinedStatistic(f"{what} is undefined: {name} is constant ({v[0]:g})")
    return x, y


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Return Spearman's rank correlation (Pearson correlation of average ranks).

    Raises:
      UndefinedStatistic: fewer than two points, or a constant input (a ``ValueError``).
      ValueError: ``x`` and ``y`` are not 1-D of one length.

    Example:
      >>> spearman([0, 25, 50, 75, 100], [3.0, 1.0, 0.0, -2.0, -5.0])
      -1.0
    """
    x, y = _paired(x, y, "Spearman's correlation")
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Return Pearson's correlation coefficient of ``x`` and ``y``.

    Raises:
      UndefinedStatistic: fewer than two points, or a constant input (a ``ValueError``).
      ValueError: ``x`` and ``y`` are not 1-D of one length.

    Example:
      >>> pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])
      1.0
    """
    x, y = _paired(x, y, "Pearson's correlation")
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(v.size)
    ranks[order] = np.arange(v.size)
    for value in np.unique(v):  # average ranks of ties
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def transformer_pair_scores(model: nnx.Module, chosen: TokenBatch, rejected: TokenBatch) -> dict:
    """Return per-pair CHES, length-normalised CHES, edit distance and last-hidden inner product.

    ``model`` exposes ``hidden_states(tokens) -> [N, T, d]`` (final-norm hidden states), as
    :class:`sims.models.transformer.CausalTransformer` does. CHES (Razin et al. 2024, Definitions
    2-3) uses :math:`h_{x, y_{<k}}` for ``k = 1..L``
    (:func:`sims.models.transformer.prefix_hidden_states` convention: from the prompt's last
    position, the final ``<eos>`` position dropped); the
    inner-product baseline uses the hidden state at the last position of each full sequence.

    Returns:
      dict of ``[N]`` NumPy arrays: ``ches``, ``ches_ln``, ``edit_distance``, ``last_inner``.
    """
    graphdef, state = nnx.split(model)
    H_pos = np.asarray(_hidden_states(graphdef, state, jnp.asarray(chosen.tokens)))
    H_neg = np.asarray(_hidden_states(graphdef, state, jnp.asarray(rejected.tokens)))
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


@functools.partial(jax.jit, static_argnums=0)
def _hidden_states(graphdef, state, tokens):
    return nnx.merge(graphdef, state).hidden_states(tokens)
