"""Tests of sims.models.decoder independent of transformers: causality, remat, rotary, config
checks.

Parity with the Hugging Face implementations is in tests/test_checkpoints.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sims.models.decoder import DecoderConfig, DecoderLM, init_decoder, rope_inv_freq

RTOL = 1e-12  # float64, the same arithmetic in another order (remat recomputes the forward)
ULP_RTOL = 1e-15  # the same draws; XLA may fuse "std * normal" with another rounding (1 ulp)
V, T = 13, 7


def _model(remat: bool = False, **kw) -> DecoderLM:
    config = DecoderConfig.llama(V, hidden_size=16, num_heads=4, **kw)
    return init_decoder(config, seed=0, dtype=jnp.float64, remat=remat)


@jax.jit
def _logits(model, tokens):
    return model(tokens)


def test_init_decoder_equals_eager_constructor():
    config = DecoderConfig.llama(V, hidden_size=8, num_heads=2, num_layers=1)
    eager = nnx.split(DecoderLM(config, rngs=nnx.Rngs(5), dtype=jnp.float64))[1]
    jitted = nnx.split(init_decoder(config, seed=5, dtype=jnp.float64))[1]
    for a, b in zip(
        jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=ULP_RTOL)


def test_decoder_lm_is_causal():
    m = _model()
    tokens = np.random.default_rng(0).integers(0, V, (2, T))
    changed = tokens.copy()
    changed[:, 4] = (changed[:, 4] + 1) % V
    a, b = np.asarray(_logits(m, jnp.asarray(tokens))), np.asarray(_logits(m, jnp.asarray(changed)))
    np.testing.assert_array_equal(a[:, :4], b[:, :4])  # positions before the change: bit-equal
    assert np.min(np.max(np.abs(a[:, 4:] - b[:, 4:]), axis=-1)) > 1e-6  # later ones move


def test_decoder_lm_accepts_any_leading_axes():
    m = _model()
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, V, (2, 3, T)))
    full = np.asarray(_logits(m, tokens))
    np.testing.assert_allclose(np.asarray(_logits(m, tokens[1, 2])), full[1, 2], rtol=RTOL)
    assert m.hidden_states(tokens).shape == (2, 3, T, 16)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_decoder_lm_remat_gives_same_loss_and_gradient():
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, V, (2, T)))

    def loss(model):
        return jnp.sum(jax.nn.log_softmax(model(tokens))[..., 0])

    values = []
    for remat in (False, True):
        graphdef, state = nnx.split(_model(remat=remat))
        values.append(
            jax.jit(jax.value_and_grad(lambda s, g=graphdef: loss(nnx.merge(g, s))))(state)
        )
    (l0, g0), (l1, g1) = values
    np.testing.assert_allclose(l1, l0, rtol=RTOL)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)


def test_rope_inv_freq_llama3_bands():
    # head_dim 8, theta 1e4: wavelengths 2 pi / omega = 6.3, 63, 628, 6283
    config = DecoderConfig.llama(
        V,
        hidden_size=16,
        num_heads=2,
        rope_type="llama3",
        rope_factor=8.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_len=100,
    )
    base = 1e4 ** -(np.arange(0, 8, 2) / 8)
    wavelen = 2 * np.pi / base
    # below 100/4 = 25: unchanged; above 100/1: divided by 8; between: interpolated with
    # s = (100 / wavelen - 1) / (4 - 1)
    s = (100 / wavelen[1] - 1) / 3
    expected = [base[0], (1 - s) * base[1] / 8 + s * base[1], base[2] / 8, base[3] / 8]
    np.testing.assert_allclose(rope_inv_freq(config), expected, rtol=1e-6)  # float32 result


def test_decoder_config_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_heads must be a multiple of num_kv_heads"):
        DecoderConfig.llama(V, hidden_size=16, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="model_type must be one of"):
        DecoderConfig(
            model_type="gpt2",
            vocab_size=3,
            hidden_size=4,
            intermediate_size=4,
            num_layers=1,
            num_heads=1,
            num_kv_heads=1,
            head_dim=4,
        )
    with pytest.raises(ValueError, match="rope_type must be one of"):
        DecoderConfig.llama(V, rope_type="yarn")
