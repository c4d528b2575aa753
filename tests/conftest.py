"""Shared test helpers. JAX configuration (x64, rank promotion, 8 fake CPU devices) is in the
repository-root ``conftest.py`` so that it also covers the library doctests."""

import jax
import numpy as np
import pytest


@pytest.fixture
def key():
    """A typed PRNG key; tests split it for their random instances."""
    return jax.random.key(20241011)


def random_keys(seed: int, n: int):
    """``n`` typed keys from ``seed`` (for vmapped random instances)."""
    return jax.random.split(jax.random.key(seed), n)


def worst_index(errors) -> int:
    """Index of the largest error, for ``err_msg`` naming the worst instance."""
    return int(np.argmax(np.asarray(errors)))
