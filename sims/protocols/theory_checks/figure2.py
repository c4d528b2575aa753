r"""Figure 2 of Razin et al. 2024 in the theory model: which similarity predicts displacement.

:func:`pair_similarity_scores` (CHES, length-normalised CHES, edit distance, last-hidden inner
product per pair of a synthetic data set) and :func:`percentile_subset_changes` (training on the
subset at each percentile of each score, one vmapped flow).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from sims.analysis.scores import dataset_ches, normalized_edit_distance, percentile_subsets
from sims.data.synthetic import SyntheticPreferences
from sims.models.prefix_tree import PrefixTreePairs, restrict
from sims.models.unconstrained import UnconstrainedFeatures
from sims.protocols.theory_checks.pair_runs import logprob_chosen_change
from theory import losses as _losses

#: The similarity scores of :func:`pair_similarity_scores` (higher = more similar, each of them).
SIMILARITY_SCORES = (
    "ches",
    "ches_length_normalized",
    "neg_edit_distance",
    "last_hidden_inner_product",
)


def pair_similarity_scores(data: SyntheticPreferences, pairs: PrefixTreePairs) -> dict:
    r"""Return ``{score: [N]}`` for the :data:`SIMILARITY_SCORES` of every pair of ``data``.

    CHES and length-normalised CHES (:func:`sims.analysis.scores.dataset_ches`) on ``data.model``'s
    hidden embeddings, minus the normalised token edit distance (negated so that, as for the
    others, higher is more similar) and :math:`\langle h_{y^+}, h_{y^-}\rangle` of the last hidden
    embeddings of the complete responses.

    Source: the scores of Razin et al. 2024, Figure 2 (§5; Definitions 2-3).

    Args:
      data: a synthetic preference data set (:func:`sims.data.synthetic.synthetic_preferences`).
      pairs: its pairs (``data.pairs``, typically with reference log-probs set).

    Returns:
      dict of ``[N]`` NumPy arrays keyed by :data:`SIMILARITY_SCORES`.
    """
    edit = [
        normalized_edit_distance(a, b)
        for a, b in zip(data.chosen_tokens, data.rejected_tokens, strict=True)
    ]
    return {
        "ches": np.asarray(dataset_ches(data.model, pairs)),
        "ches_length_normalized": np.asarray(
            dataset_ches(data.model, pairs, length_normalized=True)
        ),
        "neg_edit_distance": -np.asarray(edit),  # higher = more similar, like the other scores
        "last_hidden_inner_product": np.sum(data.last_hidden_chosen * data.last_hidden_rejected, 1),
    }


class PercentileChanges(NamedTuple):
    """Per score and percentile (``[S, Q]`` arrays), over the subset trained on.

    Attributes:
      logprob_chosen: change of the subset's mean :math:`\\ln\\pi(y^+|x)`.
      loss: change of the subset's training loss.
      mean_score: the subset's mean score.
    """

    logprob_chosen: np.ndarray
    loss: np.ndarray
    mean_score: np.ndarray


def percentile_subset_changes(
    model: UnconstrainedFeatures,
    pairs: PrefixTreePairs,
    scores: dict[str, ArrayLike],
    loss: _losses.PairLoss,
    *,
    percentiles: Sequence[float],
    subset_size: int,
    num_prefixes: int,
    dt: float,
    num_steps: int,
) -> PercentileChanges:
    """Return the changes of training on the subset at each percentile of each score.

    For each score (in the order of ``scores``) and percentile, the ``subset_size`` pairs centred
    on that percentile (:func:`sims.analysis.scores.percentile_subsets`) are trained from
    ``model`` with ``loss``; every subset runs in one vmapped flow
    (:func:`~sims.protocols.theory_checks.logprob_chosen_change`) with a compact prefix table of
    ``num_prefixes`` rows (:func:`sims.models.prefix_tree.restrict`).

    Source: the protocol of Razin et al. 2024, Figure 2 (§5, App. H.2), in the
    unconstrained-features model.

    Raises:
      ValueError: a subset has more than ``num_prefixes`` distinct prefixes; as
        :func:`~sims.analysis.scores.percentile_subsets` and
        :func:`sims.flows.core.preference_flow`.
    """
    names = list(scores)
    subsets = {s: percentile_subsets(scores[s], percentiles, subset_size) for s in names}
    rows = np.concatenate([subsets[s] for s in names])  # [S * Q, size]
    restricted = [restrict(model, pairs, r, num_prefixes=num_prefixes) for r in rows]
    change = logprob_chosen_change(*zip(*restricted, strict=True), loss, dt=dt, num_steps=num_steps)
    shape = (len(names), len(percentiles))
    return PercentileChanges(
        np.asarray(jnp.mean(change.logprob_chosen, axis=1)).reshape(shape),
        np.asarray(change.loss).reshape(shape),
        np.array([[np.asarray(scores[s])[r].mean() for r in subsets[s]] for s in names]),
    )
