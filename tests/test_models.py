"""The unconstrained-features model: shapes, normalisation, construction from arrays, errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sims.models.unconstrained import UnconstrainedFeatures


def test_unconstrained_features_logprobs_normalised():
    model = UnconstrainedFeatures(7, 3, 4, rngs=nnx.Rngs(1), dtype=jnp.float64)
    logprobs = model(jnp.arange(4))
    assert logprobs.shape == (4, 7) and logprobs.dtype == jnp.float64
    np.testing.assert_allclose(jnp.sum(jnp.exp(logprobs), axis=-1), 1.0, rtol=1e-14)


def test_unconstrained_features_from_arrays_is_softmax_of_w_h():
    W = jnp.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]])
    H = jnp.array([[0.5, -1.0]])
    model = UnconstrainedFeatures.from_arrays(W, H)
    logits = np.array([0.5, -2.0, -1.5])  # W @ h by hand
    expected = logits - np.log(np.sum(np.exp(logits)))
    np.testing.assert_allclose(model(jnp.array([0]))[0], expected, rtol=1e-14)


def test_unconstrained_features_uniform_when_hidden_zero():
    model = UnconstrainedFeatures.from_arrays(jnp.ones((5, 2)), jnp.zeros((1, 2)))
    np.testing.assert_allclose(
        jnp.exp(model(jnp.array([0]))), 1 / 5, rtol=1e-14
    )  # softmax(0) = 1/V


def test_unconstrained_features_seed_reproducible():
    a = UnconstrainedFeatures(6, 3, 2, rngs=nnx.Rngs(3))
    b = UnconstrainedFeatures(6, 3, 2, rngs=nnx.Rngs(3))
    np.testing.assert_array_equal(a.unembedding[...], b.unembedding[...])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"vocab_size": 0}, "vocab_size must be a positive integer"),
        ({"hidden_size": 2.5}, "hidden_size must be a positive integer"),
        ({"unembedding_scale": -1.0}, "unembedding_scale must be > 0"),
    ],
)
def test_unconstrained_features_rejects_bad_sizes(kwargs, match):
    args = {"vocab_size": 4, "hidden_size": 2, "num_prefixes": 1} | kwargs
    scale = {k: args.pop(k) for k in ("unembedding_scale",) if k in args}
    with pytest.raises(ValueError, match=match):
        UnconstrainedFeatures(**args, rngs=nnx.Rngs(0), **scale)


def test_from_arrays_rejects_mismatch_and_nan():
    with pytest.raises(ValueError, match="hidden size d=2"):
        UnconstrainedFeatures.from_arrays(jnp.ones((3, 2)), jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="unembedding must be finite"):
        UnconstrainedFeatures.from_arrays(jnp.ones((3, 2)).at[0, 0].set(jnp.nan), jnp.ones((1, 2)))
