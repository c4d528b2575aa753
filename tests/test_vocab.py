"""The semantic vocabulary (sims/data/vocab.py): each geometry has the properties its docstring
promises, checked with Theorems 4-5's quantities computed here in NumPy."""

import jax
import numpy as np
import pytest

from sims.data.vocab import GEOMETRIES, YES_SET, semantic_unembeddings

SEEDS = range(20)  # random rotations and noise draws per geometry


def _rows(geometry: str, seed: int):
    W, tokens = semantic_unembeddings(jax.random.key(seed), geometry=geometry)
    W = np.asarray(W)
    return W, {t: W[i] for i, t in enumerate(tokens)}


@pytest.mark.parametrize("seed", SEEDS)
def test_catastrophic_geometry_sends_mass_to_yes_tokens(seed):
    W, row = _rows("catastrophic", seed)
    diff = row["No"] - row["Never"]
    assert row["No"] @ row["Never"] > row["No"] @ row["No"]  # Theorem 4's negative term wins
    other = [t for t in row if t not in ("No", "Never")]
    top = sorted(other, key=lambda t: -(row[t] @ diff))[:3]  # Theorem 5's top gainers
    assert set(top) <= set(YES_SET), top


@pytest.mark.parametrize("seed", SEEDS)
def test_benign_geometry_keeps_mass_off_yes_tokens(seed):
    _, row = _rows("benign", seed)
    diff = row["No"] - row["Never"]
    assert row["No"] @ row["Never"] > row["No"] @ row["No"]
    assert all(row[t] @ diff < 0 for t in YES_SET)
    assert max(row[t] @ diff for t in ("Maybe", "Perhaps", "Nope", "Nah", "no")) > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_none_geometry_no_is_far_from_never(seed):
    _, row = _rows("none", seed)
    assert row["No"] @ row["Never"] < row["No"] @ row["No"]


def test_semantic_unembeddings_shape_names_and_determinism():
    W, tokens = semantic_unembeddings(jax.random.key(1), geometry="none", num_filler=5)
    assert W.shape == (12 + 5, 32) and len(tokens) == 17 and tokens[-1] == "<filler4>"
    again, _ = semantic_unembeddings(jax.random.key(1), geometry="none", num_filler=5)
    np.testing.assert_array_equal(np.asarray(W), np.asarray(again))
    assert set(GEOMETRIES) == {"catastrophic", "benign", "none"}


def test_semantic_unembeddings_rejects_bad_input():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="geometry must be one of"):
        semantic_unembeddings(key, geometry="bogus")
    with pytest.raises(ValueError, match="hidden_size must be >= 6"):
        semantic_unembeddings(key, geometry="none", hidden_size=4)
    with pytest.raises(ValueError, match="concept_scale must be > 0"):
        semantic_unembeddings(key, geometry="none", concept_scale=0.0)
