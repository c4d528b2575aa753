"""Tests of sims.analysis.scores: per-pair CHES and baselines vs independent computations."""

import functools
import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sims.analysis.scores import (
    UndefinedStatistic,
    normalized_edit_distance,
    pearson,
    percentile_subsets,
    spearman,
    transformer_pair_scores,
)
from sims.data import corpus
from sims.models.transformer import CausalTransformer, prefix_hidden_states

RTOL = 1e-10  # float64: the same hidden states summed in a different order


@functools.cache
def _model():
    return CausalTransformer(
        len(corpus.VOCAB),
        d_model=8,
        num_layers=1,
        num_heads=2,
        max_len=corpus.MAX_LEN,
        rngs=nnx.Rngs(0),
        dtype=jnp.float64,
    )


def _pairs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    templates = corpus.REFUSALS + corpus.COMPLIANCES
    prompts, pos, neg = [], [], []
    for _ in range(n):
        v, o = corpus.VERBS[rng.integers(4)], corpus.UNSAFE[rng.integers(6)]
        a, b = rng.choice(len(templates), 2, replace=False)
        prompts.append(corpus.request_prompt(v, o))
        pos.append(corpus.response(templates[a], v, o))
        neg.append(corpus.response(templates[b], v, o))
    return corpus.pack(prompts, pos), corpus.pack(prompts, neg)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_transformer_pair_scores_equal_formula_on_extracted_states():
    m = _model()
    chosen, rejected = _pairs(12, 0)
    got = transformer_pair_scores(m, chosen, rejected)
    for i in range(12):
        hp = np.asarray(
            prefix_hidden_states(m, chosen.tokens[i], chosen.prompt_len[i], chosen.length[i])
        )  # [L+, d]
        hn = np.asarray(
            prefix_hidden_states(m, rejected.tokens[i], rejected.prompt_len[i], rejected.length[i])
        )  # [L-, d]
        # Definition 2 written as a double sum over prefix pairs (independent of the sum form)
        cross = sum(hp[k] @ hn[j] for k in range(len(hp)) for j in range(len(hn)))
        own = sum(hp[k] @ hp[j] for k in range(len(hp)) for j in range(len(hp)))
        np.testing.assert_allclose(got["ches"][i], cross - own, rtol=RTOL, err_msg=f"pair {i}")
        ln = cross / (len(hp) * len(hn)) - own / len(hp) ** 2  # Definition 3
        np.testing.assert_allclose(got["ches_ln"][i], ln, rtol=RTOL, err_msg=f"pair {i}")
        full_p = np.asarray(m.hidden_states(jnp.asarray(chosen.tokens[i])))
        full_n = np.asarray(m.hidden_states(jnp.asarray(rejected.tokens[i])))
        last = full_p[chosen.length[i] - 1] @ full_n[rejected.length[i] - 1]
        np.testing.assert_allclose(got["last_inner"][i], last, rtol=RTOL, err_msg=f"pair {i}")


def test_normalized_edit_distance_hand_values():
    # kitten -> sitting: 3 edits (Levenshtein's classic), max length 7
    assert normalized_edit_distance("kitten", "sitting") == 3 / 7
    assert normalized_edit_distance([1, 2], [1, 2]) == 0.0
    assert normalized_edit_distance([], [5, 6]) == 1.0


def test_normalized_edit_distance_matches_brute_force():
    # brute force: minimum over all alignments is hard; use known small cases by hand
    assert normalized_edit_distance([1, 2, 3], [1, 2, 3]) == 0.0
    assert normalized_edit_distance([1, 2], [3, 4, 5]) == 1.0  # 2 substitutions + 1 insertion
    assert normalized_edit_distance([1, 2, 3, 4], [2, 3, 4]) == 0.25  # one deletion
    with pytest.raises(ValueError, match=r"must not both be empty"):
        normalized_edit_distance([], [])


def test_spearman_and_percentile_subsets():
    x = np.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -np.exp(x)) == pytest.approx(-1.0)
    ties = spearman([1, 2, 2, 3], [1, 2, 3, 4])  # ranks 0, 1.5, 1.5, 3 vs 0..3
    r1, r2 = np.array([0, 1.5, 1.5, 3]), np.arange(4.0)
    assert ties == pytest.approx(np.corrcoef(r1, r2)[0, 1])
    with pytest.raises(UndefinedStatistic, match=r"x is constant"):
        spearman([1, 1, 1], [1, 2, 3])
    scores = np.random.default_rng(0).normal(size=101)
    subsets = percentile_subsets(scores, [0, 50, 100], 11)
    order = np.argsort(scores)
    assert set(subsets[0]) == set(order[:11]) and set(subsets[2]) == set(order[-11:])
    assert set(subsets[1]) == set(order[45:56])  # centred on rank 50
    for a, b in itertools.combinations(range(3), 2):
        assert not set(subsets[a]) & set(subsets[b])
    with pytest.raises(ValueError, match=r"size must be in \[1, N=101\]"):
        percentile_subsets(scores, [0], 200)


def test_spearman_hand_values():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ranks (0, 1, 2) vs (0.5, 0.5, 2) (a tie): covariance 1.5 / sqrt(2 * 1.5)
    assert spearman([1, 2, 3], [5, 5, 9]) == pytest.approx(1.5 / math.sqrt(2 * 1.5))
    with pytest.raises(ValueError, match="must be 1-D of one length"):
        spearman([1, 2], [2, 3, 4])


def test_correlations_are_undefined_for_one_point_or_a_constant_input():
    """The probe of issue 21: an audit with one usable pair (or only duplicate pairs) crashed in
    ``spearman`` with a plain ValueError; an undefined statistic is now its own error type, which
    the experiments report as ``null`` with its reason (``sims.analysis.summaries.statistic``)."""
    for correlation, name in ((spearman, "Spearman"), (pearson, "Pearson")):
        with pytest.raises(UndefinedStatistic, match=f"{name}'s correlation needs >= 2 points"):
            correlation([0.5], [1.0])
        with pytest.raises(UndefinedStatistic, match=r"y is constant \(4\)"):
            correlation([1.0, 2.0, 3.0], [4.0, 4.0, 4.0])  # e.g. duplicate pairs
        with pytest.raises(ValueError, match="1-D of one length"):  # a bug, not undefined
            correlation([[1.0, 2.0]], [[1.0, 2.0]])
    assert issubclass(UndefinedStatistic, ValueError)


def test_pearson_hand_values():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    # centred x = (-1, 0, 1), y = (-1, -1, 2): covariance 3 / sqrt(2 * 6) = sqrt(3) / 2
    assert pearson([0, 1, 2], [0, 0, 3]) == pytest.approx(math.sqrt(3) / 2)
    assert pearson([0, 1, 2], [0, 1, 0]) == pytest.approx(0.0, abs=1e-15)  # covariance 0
