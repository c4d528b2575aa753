"""CHES and length-normalised CHES (Razin et al. 2024, Definitions 2-3) against direct sums.

The direct computation is the double sum over prefix pairs, written with NumPy loops, sharing no
code with ``theory.multi_token`` (which sums rows first).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from theory.multi_token import ches, ches_length_normalized, masked_ches

# Closed form vs direct double sum, float64: only the order of additions differs.
RTOL_DIRECT = 1e-9
# Absolute floor relative to S = sum of |<h_k, h_k'>| over the terms of the double sum.
ATOL_PER_SCALE = 1e-12
# float32 closed form vs float64 closed form (relative to S).
RTOL_FLOAT32 = 1e-4
N_INSTANCES = 300  # random instances per length pair


def _direct(h_pos, h_neg, normalized):
    """Definition 2/3 as written: sum_{k,k'} <h+_k, h-_k'> - sum_{k,k'} <h+_k, h+_k'>."""
    cross = sum(float(a @ b) for a in h_pos for b in h_neg)
    self_ = sum(float(a @ b) for a in h_pos for b in h_pos)
    scale = sum(abs(float(a @ b)) for a in h_pos for b in h_neg) + sum(
        abs(float(a @ b)) for a in h_pos for b in h_pos
    )
    if normalized:
        lp, ln = len(h_pos), len(h_neg)
        return cross / (lp * ln) - self_ / lp**2, scale / min(lp, ln) ** 2
    return cross - self_, scale


def _random_pair(seed, L_pos, L_neg, d):
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=d)  # a shared direction, as real models' embeddings have
    h_pos = mean + rng.normal(size=(L_pos, d)) * rng.uniform(0.2, 3.0)
    h_neg = mean + rng.normal(size=(L_neg, d)) * rng.uniform(0.2, 3.0)
    return h_pos, h_neg


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize(("L_pos", "L_neg", "d"), [(1, 1, 1), (1, 4, 3), (5, 2, 8), (7, 7, 16)])
def test_ches_matches_direct_double_sum(normalized, L_pos, L_neg, d):
    fn = ches_length_normalized if normalized else ches
    pairs = [
        _random_pair(1000 * L_pos + 10 * L_neg + i, L_pos, L_neg, d) for i in range(N_INSTANCES)
    ]
    H_pos = jnp.stack([p for p, _ in pairs])
    H_neg = jnp.stack([n for _, n in pairs])
    got = np.asarray(jax.vmap(fn)(H_pos, H_neg))
    want, scale = (
        np.array(x) for x in zip(*(_direct(p, n, normalized) for p, n in pairs), strict=True)
    )
    err = np.abs(got - want) / (np.abs(want) + ATOL_PER_SCALE / RTOL_DIRECT * scale)
    i = int(np.argmax(err))
    np.testing.assert_allclose(
        got,
        want,
        rtol=RTOL_DIRECT,
        atol=ATOL_PER_SCALE * float(scale.max()),
        err_msg=f"worst instance {i}: got {got[i]}, direct {want[i]}",
    )


@pytest.mark.parametrize("fn", [ches, ches_length_normalized])
def test_ches_of_identical_responses_is_zero(fn):
    # <H, H - H> = 0 exactly (up to round-off of a sum of zeros).
    for seed in range(50):
        h, _ = _random_pair(seed, 1 + seed % 6, 1, 4)
        assert float(fn(h, h)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("fn", [ches, ches_length_normalized])
def test_ches_scales_quadratically_and_is_rotation_invariant(fn):
    rng = np.random.default_rng(7)
    for seed in range(50):
        h_pos, h_neg = _random_pair(seed, 3, 5, 6)
        base = float(fn(h_pos, h_neg))
        c = rng.uniform(0.1, 10.0)
        np.testing.assert_allclose(float(fn(c * h_pos, c * h_neg)), c**2 * base, rtol=1e-10)
        Q, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # random orthogonal map of R^d
        np.testing.assert_allclose(float(fn(h_pos @ Q, h_neg @ Q)), base, rtol=1e-9, atol=1e-12)


def test_ches_length_normalized_is_invariant_to_repeating_rows():
    # Repeating every row r times multiplies sums by r and lengths by r: means are unchanged,
    # while plain CHES grows by r^2.
    for seed in range(30):
        h_pos, h_neg = _random_pair(seed, 2, 3, 4)
        r = 1 + seed % 4
        rep_pos, rep_neg = np.repeat(h_pos, r, axis=0), np.repeat(h_neg, r, axis=0)
        np.testing.assert_allclose(
            float(ches_length_normalized(rep_pos, rep_neg)),
            float(ches_length_normalized(h_pos, h_neg)),
            rtol=1e-10,
            atol=1e-12,
        )
        np.testing.assert_allclose(
            float(ches(rep_pos, rep_neg)), r**2 * float(ches(h_pos, h_neg)), rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize("normalized", [False, True])
def test_masked_ches_matches_unpadded_and_ignores_padding(normalized):
    rng = np.random.default_rng(3)
    N, Lmax, d = 64, 6, 5
    lens_pos, lens_neg = rng.integers(1, Lmax + 1, N), rng.integers(1, Lmax + 1, N)
    h_pos = rng.normal(size=(N, Lmax, d)) + 1.0
    h_neg = rng.normal(size=(N, Lmax, d)) + 1.0
    mask_pos = np.arange(Lmax)[None, :] < lens_pos[:, None]
    mask_neg = np.arange(Lmax)[None, :] < lens_neg[:, None]
    got = np.asarray(masked_ches(h_pos, h_neg, mask_pos, mask_neg, length_normalized=normalized))
    fn = ches_length_normalized if normalized else ches
    want = np.array([float(fn(h_pos[i, : lens_pos[i]], h_neg[i, : lens_neg[i]])) for i in range(N)])
    np.testing.assert_allclose(got, want, rtol=RTOL_DIRECT, atol=1e-12, err_msg="padded vs exact")
    garbage_pos = np.where(mask_pos[..., None], h_pos, 1e6)  # padding rows hold huge values
    again = masked_ches(garbage_pos, h_neg, mask_pos, mask_neg, length_normalized=normalized)
    np.testing.assert_allclose(np.asarray(again), got, rtol=RTOL_DIRECT, atol=1e-12)


def test_ches_float32_matches_float64():
    for seed in range(20):
        h_pos, h_neg = _random_pair(seed, 4, 6, 8)
        ref = float(ches(h_pos, h_neg))
        f32 = ches(jnp.asarray(h_pos, jnp.float32), jnp.asarray(h_neg, jnp.float32))
        assert f32.dtype == jnp.float32
        scale = _direct(h_pos, h_neg, False)[1]
        np.testing.assert_allclose(float(f32), ref, atol=RTOL_FLOAT32 * scale)


def test_ches_jits():
    h_pos, h_neg = _random_pair(0, 3, 2, 4)
    np.testing.assert_allclose(float(jax.jit(ches)(h_pos, h_neg)), float(ches(h_pos, h_neg)))


@pytest.mark.parametrize("fn", [ches, ches_length_normalized])
def test_ches_rejects_bad_input(fn):
    ok = np.ones((2, 3))
    with pytest.raises(ValueError, match=r"h_pos must hold at least one prefix"):
        fn(np.ones((0, 3)), ok)
    with pytest.raises(ValueError, match=r"h_neg must hold at least one prefix"):
        fn(ok, np.ones((0, 3)))
    with pytest.raises(ValueError, match=r"must have one hidden size d"):
        fn(ok, np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"h_pos must have shape \[L, d\]"):
        fn(np.ones(3), ok)
    with pytest.raises(ValueError, match=r"h_neg must be finite"):
        fn(ok, np.array([[1.0, np.nan, 0.0]]))


def test_masked_ches_rejects_bad_input():
    h = np.ones((2, 3, 4))
    m = np.ones((2, 3), bool)
    with pytest.raises(ValueError, match=r"mask_neg must select at least one prefix per pair"):
        masked_ches(h, h, m, np.array([[1, 0, 0], [0, 0, 0]], bool))
    with pytest.raises(ValueError, match=r"mask_pos must have shape \[N, L\]"):
        masked_ches(h, h, np.ones((2, 2), bool), m)
    with pytest.raises(ValueError, match=r"must agree on N and d"):
        masked_ches(h, np.ones((2, 3, 5)), m, m)
    with pytest.raises(ValueError, match=r"mask_pos must be boolean or 0/1"):
        masked_ches(h, h, 2 * np.ones((2, 3)), m)
    with pytest.raises(ValueError, match=r"h_pos must have shape \[N, L\+, d\]"):
        masked_ches(np.ones((3, 4)), h, m, m)


def test_masked_ches_traced_invalid_masks_poison_their_pairs_only():
    h = jax.random.normal(jax.random.key(5), (3, 2, 4))
    good = jnp.array([[1, 1], [1, 0], [1, 1]])
    run = jax.jit(masked_ches, static_argnames="length_normalized")
    np.testing.assert_allclose(
        run(h, h[::-1], good, good), masked_ches(h, h[::-1], good, good), rtol=1e-12
    )
    for bad, row in ((good.at[1].set(0), 1), (good.at[2, 0].set(2), 2)):  # empty row; a 2
        for normalized in (False, True):
            out = np.asarray(run(h, h[::-1], bad, good, length_normalized=normalized))
            assert np.isnan(out[row]) and np.all(np.isfinite(np.delete(out, row))), (
                row,
                normalized,
            )


def test_masked_ches_rejects_non_bool_flag():
    h, m = np.ones((1, 2, 3)), np.ones((1, 2), bool)
    with pytest.raises(TypeError, match="length_normalized must be a bool"):
        masked_ches(h, h, m, m, length_normalized="yes")
