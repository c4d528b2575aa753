"""The synthetic multi-token preference generator (sims/data/synthetic.py)."""

import jax
import numpy as np
import pytest

from sims.analysis.scores import dataset_ches
from sims.data.synthetic import synthetic_preferences
from theory.multi_token import ches


def test_synthetic_preferences_properties():
    data = synthetic_preferences(jax.random.key(2), num_pairs=200, vocab_size=16, hidden_size=8)
    again = synthetic_preferences(jax.random.key(2), num_pairs=200, vocab_size=16, hidden_size=8)
    np.testing.assert_array_equal(
        np.asarray(data.model.hidden[...]), np.asarray(again.model.hidden[...])
    )
    H = np.asarray(data.model.hidden[...])
    c, r = np.asarray(data.pairs.chosen_prefix), np.asarray(data.pairs.rejected_prefix)
    inner = np.sum(H[c[:, 0]] * H[r[:, -1]], axis=1)  # prompt vs some rejected prefix
    assert np.mean(inner > 0) > 0.9  # positive inner products, as in real models (§5)
    for y_c, y_r in zip(data.chosen_tokens, data.rejected_tokens, strict=True):
        assert y_c[-1] == 0 and y_r[-1] == 0 and y_c != y_r  # EOS-terminated, distinct
    # dataset CHES equals the single-pair function on the gathered rows
    scores = np.asarray(dataset_ches(data.model, data.pairs))
    m_c, m_r = np.asarray(data.pairs.chosen_mask), np.asarray(data.pairs.rejected_mask)
    for i in range(5):
        np.testing.assert_allclose(
            scores[i], float(ches(H[c[i]][m_c[i]], H[r[i]][m_r[i]])), rtol=1e-10
        )


def test_synthetic_preferences_rejects_bad_input():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"min_len must be <= max_len"):
        synthetic_preferences(key, num_pairs=2, min_len=5, max_len=3)
    with pytest.raises(ValueError, match=r"rho must be in \[0, 1\)"):
        synthetic_preferences(key, num_pairs=2, rho=1.0)
    with pytest.raises(ValueError, match=r"num_pairs must be a positive integer"):
        synthetic_preferences(key, num_pairs=0)
