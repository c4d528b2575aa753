"""Theorems 4, 5, 8, 9 (Razin et al. 2024) against independent computations, in float64.

The independent computation is autodiff of the *actual* loss: ``jax.grad`` gives ``-grad L`` and
``jax.jvp`` of ``log_softmax(W h)`` along it gives ``d/dt ln pi(z|x)`` for every token. It shares no
code with the closed forms (which never differentiate).
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from theory import losses
from theory.single_token import (
    displacement_terms,
    logprob_velocity,
    multi_sample_logprob_velocity,
)

# Closed form vs autodiff, both float64, same parameters: differences are pure round-off.
RTOL_AUTODIFF = 1e-9
# Absolute floor relative to the size S of the terms being summed (sums over V entries round).
ATOL_PER_SCALE = 1e-12
# Central finite difference (step 1e-5) vs autodiff: truncation O(dt^2 |third derivative|).
RTOL_FINITE_DIFF = 1e-7
# float32 closed form vs float64 closed form.
RTOL_FLOAT32 = 1e-4

SHAPES = [(2, 1), (16, 8), (300, 32)]  # (V, d)
LOSS_CASES = {
    "dpo": losses.make_loss("dpo", beta=0.7),
    "ipo": losses.make_loss("ipo", tau=0.3),
    "slic": losses.make_loss("slic", delta=50.0),  # margin < delta: hinge active, l' = -1
    "rebel": losses.make_loss("rebel", eta=2.0, reward_margin=1.5),
    "gpo": losses.make_loss("gpo", beta=0.5),
}


def _instance(key, V, d):
    """A random instance; half of them have W- = 1.2 W+ + noise and a small h,
    the geometry of Theorem 4 in which displacement is likely."""
    kW, kh, kp, kn, kr, ks, kc = jax.random.split(key, 7)
    scale = jnp.exp(jax.random.uniform(ks, (), minval=jnp.log(0.3), maxval=jnp.log(3.0)))
    W = scale * jax.random.normal(kW, (V, d)) / jnp.sqrt(d)
    h = scale * jax.random.normal(kh, (d,))
    y_pos = jax.random.randint(kp, (), 0, V)
    y_neg = (y_pos + jax.random.randint(kn, (), 1, V)) % V
    aligned = jax.random.bernoulli(kc)
    W = W.at[y_neg].set(jnp.where(aligned, 1.2 * W[y_pos] + 0.3 * W[y_neg], W[y_neg]))
    h = jnp.where(aligned, 0.1 * h / jnp.sqrt(d), h)
    ref = jax.random.normal(kr, (2,)) - 2.0
    return W, h, y_pos, y_neg, ref


def _autodiff_velocity(loss, W, h, y_pos, y_neg, ref):
    def logprobs(W, h):
        return jax.nn.log_softmax(W @ h)

    def total_loss(W, h):
        lp = logprobs(W, h)
        return loss(lp[y_pos], lp[y_neg], ref[0], ref[1])

    gW, gh = jax.grad(total_loss, (0, 1))(W, h)
    return jax.jvp(logprobs, (W, h), (-gW, -gh))[1]


def _ell_prime(loss, W, h, y_pos, y_neg, ref):
    lp = jax.nn.log_softmax(W @ h)
    return losses.margin_derivative(loss, lp[y_pos], lp[y_neg], ref[0], ref[1])


def _scale(W, h, y_pos, y_neg, ell_prime):
    """|l'| times the sizes of the inner products entering the closed form (|h|^2, the largest
    |<W_z, W+ - W->|, |W+|^2, |W-|^2, |<W+, W->|), computed here from W and h: the tolerance does
    not come from theory.single_token."""
    w_pos, w_neg = W[y_pos], W[y_neg]
    size = (
        h @ h
        + jnp.max(jnp.abs(W @ (w_pos - w_neg)))
        + w_pos @ w_pos
        + w_neg @ w_neg
        + jnp.abs(w_pos @ w_neg)
    )
    return jnp.abs(ell_prime) * size


@partial(jax.jit, static_argnums=(0, 1, 2))
def _closed_and_autodiff(loss, V, d, keys):
    """Closed form, autodiff reference and term scale on the instances drawn from ``keys``."""

    def one(key):
        W, h, y_pos, y_neg, ref = _instance(key, V, d)
        ell_prime = _ell_prime(loss, W, h, y_pos, y_neg, ref)
        return (
            logprob_velocity(W, h, y_pos, y_neg, ell_prime),
            _autodiff_velocity(loss, W, h, y_pos, y_neg, ref),
            _scale(W, h, y_pos, y_neg, ell_prime),
        )

    return jax.vmap(one)(keys)


@pytest.mark.parametrize(
    ("loss_name", "V", "d"),
    [
        # DPO on every shape and every loss on the middle one by default; the rest with -m slow
        pytest.param(n, V, d, marks=[pytest.mark.slow] * ((V, d) != SHAPES[1] and n != "dpo"))
        for V, d in SHAPES
        for n in sorted(LOSS_CASES)
    ],
)
def test_logprob_velocity_matches_autodiff(loss_name, V, d):
    loss = LOSS_CASES[loss_name]
    n = 80  # per (loss, shape); 5 losses x 3 shapes x 80 = 1200 instances
    closed, auto, scale = _closed_and_autodiff(
        loss, V, d, jax.random.split(jax.random.key(V * 1000 + d), n)
    )
    err = jnp.abs(closed - auto) - (RTOL_AUTODIFF * jnp.abs(auto) + ATOL_PER_SCALE * scale[:, None])
    worst = int(jnp.argmax(jnp.max(err, axis=1)))
    np.testing.assert_array_less(
        np.asarray(jnp.max(err, axis=1)),
        0.0,
        err_msg=f"{loss_name} V={V} d={d}: worst instance {worst}",
    )
    assert np.all(np.isfinite(np.asarray(closed)))


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_logprob_velocity_ell_prime_reading_is_pinned():
    """Theorem 5 prints -l(t) as the prefactor; the proof has -l'(t). Only l' matches autodiff."""
    loss = LOSS_CASES["dpo"]
    W, h, y_pos, y_neg, ref = _instance(jax.random.key(7), 20, 6)
    lp = jax.nn.log_softmax(W @ h)
    ell = loss(lp[y_pos], lp[y_neg], ref[0], ref[1])
    ell_prime = _ell_prime(loss, W, h, y_pos, y_neg, ref)
    auto = _autodiff_velocity(loss, W, h, y_pos, y_neg, ref)
    np.testing.assert_allclose(logprob_velocity(W, h, y_pos, y_neg, ell_prime), auto, rtol=1e-9)
    assert not np.allclose(logprob_velocity(W, h, y_pos, y_neg, -ell), auto, rtol=1e-3)


def test_autodiff_velocity_matches_central_finite_difference():
    """The autodiff reference itself vs a central difference of ln pi along -grad L."""
    loss = LOSS_CASES["dpo"]
    step = 1e-5
    keys = jax.random.split(jax.random.key(3), 200)

    def one(key):
        W, h, y_pos, y_neg, ref = _instance(key, 12, 4)

        def total_loss(W, h):
            lp = jax.nn.log_softmax(W @ h)
            return loss(lp[y_pos], lp[y_neg], ref[0], ref[1])

        gW, gh = jax.grad(total_loss, (0, 1))(W, h)
        plus = jax.nn.log_softmax((W - step * gW) @ (h - step * gh))
        minus = jax.nn.log_softmax((W + step * gW) @ (h + step * gh))
        return (plus - minus) / (2 * step), _autodiff_velocity(loss, W, h, y_pos, y_neg, ref)

    fd, auto = jax.jit(jax.vmap(one))(keys)
    scale = jnp.max(jnp.abs(auto), axis=1, keepdims=True)
    np.testing.assert_allclose(fd, auto, rtol=RTOL_FINITE_DIFF, atol=1e-9 * float(jnp.max(scale)))


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_logprob_velocity_sign_of_displacement_varies():
    """The instances cover both displacement (d/dt ln pi(y+) < 0) and none, with clear margins."""
    loss = LOSS_CASES["dpo"]
    keys = jax.random.split(jax.random.key(11), 1000)
    closed, auto, _ = _closed_and_autodiff(loss, 16, 2, keys)
    y_pos = jax.vmap(lambda k: _instance(k, 16, 2)[2])(keys)
    v_pos = closed[jnp.arange(1000), y_pos]
    a_pos = auto[jnp.arange(1000), y_pos]
    clear = jnp.abs(a_pos) > 1e-6
    assert int(jnp.sum(clear & (a_pos < 0))) >= 50, "too few displacement instances to test signs"
    assert int(jnp.sum(clear & (a_pos > 0))) >= 50
    assert bool(jnp.all(jnp.sign(v_pos[clear]) == jnp.sign(a_pos[clear])))


def test_displacement_terms_m_nonnegative_and_theorem4_bracket():
    W, h, y_pos, y_neg, _ = jax.jit(jax.vmap(lambda k: _instance(k, 30, 5)))(
        jax.random.split(jax.random.key(5), 500)
    )
    terms = jax.jit(jax.vmap(displacement_terms))(W, h, y_pos, y_neg)
    assert bool(jnp.all(terms.m >= 0))
    # Thm 4's bracket, written out from the statement's three pieces.
    probs = jax.nn.softmax(jnp.einsum("nvd,nd->nv", W, h), axis=-1)
    rows = jnp.arange(500)
    mask = 1.0 - jax.nn.one_hot(y_pos, 30) - jax.nn.one_hot(y_neg, 30)
    others = jnp.sum(mask * probs * terms.token_alignment, axis=1)
    weight = 1 - probs[rows, y_pos] + probs[rows, y_neg]
    np.testing.assert_allclose(terms.S, -weight * terms.unembedding_alignment - others, rtol=1e-12)


@pytest.mark.parametrize("N,V,d", [(1, 5, 3), (3, 8, 4), (6, 20, 8), (12, 40, 3)])
def test_multi_sample_logprob_velocity_matches_autodiff(N, V, d):
    loss = losses.make_loss("dpo", beta=0.4)
    n = 40  # instances per shape

    def one(key):
        kW, kH, kp, kn, kr = jax.random.split(key, 5)
        W = jax.random.normal(kW, (V, d)) / jnp.sqrt(d) * 1.5
        H = jax.random.normal(kH, (N, d)) + 0.5  # positive inner products on average, as observed
        y_pos = jax.random.randint(kp, (N,), 0, V)
        y_neg = (y_pos + jax.random.randint(kn, (N,), 1, V)) % V
        ref = jax.random.normal(kr, (N, 2)) - 2.0
        rows = jnp.arange(N)

        def logprobs(W, H):
            return jax.nn.log_softmax(H @ W.T, axis=-1)  # [N, V]

        def total_loss(W, H):
            lp = logprobs(W, H)
            return jnp.mean(loss(lp[rows, y_pos], lp[rows, y_neg], ref[:, 0], ref[:, 1]))

        gW, gH = jax.grad(total_loss, (0, 1))(W, H)
        auto = jax.jvp(logprobs, (W, H), (-gW, -gH))[1]
        lp = logprobs(W, H)
        ell_prime = losses.margin_derivative(
            loss, lp[rows, y_pos], lp[rows, y_neg], ref[:, 0], ref[:, 1]
        )
        closed = multi_sample_logprob_velocity(W, H, y_pos, y_neg, ell_prime)
        scale = jnp.max(jnp.abs(ell_prime)) * (
            jnp.max(jnp.sum(H * H, 1)) + jnp.max(jnp.sum(W * W, 1))
        )
        return closed, auto, scale

    closed, auto, scale = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(N * 100 + V), n))
    err = jnp.max(jnp.abs(closed - auto) - RTOL_AUTODIFF * jnp.abs(auto), axis=(1, 2)) - (
        ATOL_PER_SCALE * N * scale
    )
    np.testing.assert_array_less(np.asarray(err), 0.0, err_msg=f"worst {int(jnp.argmax(err))}")


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_multi_sample_reduces_to_single_sample_for_one_prompt():
    W, h, y_pos, y_neg, _ = _instance(jax.random.key(2), 9, 4)
    single = logprob_velocity(W, h, y_pos, y_neg, -0.3)
    multi = multi_sample_logprob_velocity(W, h[None], y_pos[None], y_neg[None], jnp.array([-0.3]))
    np.testing.assert_allclose(multi[0], single, rtol=1e-13)


def test_logprob_velocity_float32_matches_float64():
    W, h, y_pos, y_neg, _ = _instance(jax.random.key(4), 50, 8)
    v64 = logprob_velocity(W, h, y_pos, y_neg, -0.2)
    v32 = logprob_velocity(
        W.astype(jnp.float32), h.astype(jnp.float32), y_pos, y_neg, jnp.float32(-0.2)
    )
    assert v32.dtype == jnp.float32
    np.testing.assert_allclose(
        v32, v64, rtol=RTOL_FLOAT32, atol=RTOL_FLOAT32 * float(jnp.max(jnp.abs(v64)))
    )


def test_logprob_velocity_is_jittable():
    W, h, y_pos, y_neg, _ = _instance(jax.random.key(8), 10, 3)
    np.testing.assert_allclose(
        jax.jit(logprob_velocity)(W, h, y_pos, y_neg, -0.5),
        logprob_velocity(W, h, y_pos, y_neg, -0.5),
        rtol=1e-14,
    )


W3, H3 = jnp.ones((4, 3)), jnp.ones(3)


@pytest.mark.parametrize(
    "args,match",
    [
        ((W3, H3, 1, 1, -1.0), "must differ"),
        ((W3, H3, 0, 4, -1.0), r"y_neg must be token ids in \[0, V\)"),
        ((W3, H3, -1, 2, -1.0), r"y_pos must be token ids"),
        ((W3, jnp.ones(2), 0, 1, -1.0), "h must have the hidden size d=3"),
        ((jnp.ones(3), H3, 0, 1, -1.0), r"W must have shape \[V, d\]"),
        ((W3.at[0, 0].set(jnp.nan), H3, 0, 1, -1.0), "W must be finite"),
        ((W3, H3.at[1].set(jnp.inf), 0, 1, -1.0), "h must be finite"),
        ((W3, H3, 0, 1, jnp.nan), "ell_prime must be finite"),
        ((W3, H3, 0, 1, jnp.ones(2)), r"ell_prime must have shape \[\]"),
    ],
)
def test_logprob_velocity_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        logprob_velocity(*args)


def test_logprob_velocity_rejects_float_token_ids():
    with pytest.raises(TypeError, match="integer token ids"):
        logprob_velocity(W3, H3, 0.0, 1, -1.0)


def test_multi_sample_rejects_bad_input():
    H = jnp.ones((2, 3))
    ids = jnp.array([0, 1])
    with pytest.raises(ValueError, match="must differ"):
        multi_sample_logprob_velocity(W3, H, ids, ids, jnp.array([-1.0, -1.0]))
    with pytest.raises(ValueError, match=r"ell_prime must have shape \[N\]"):
        multi_sample_logprob_velocity(W3, H, ids, ids[::-1], jnp.array([-1.0]))
    with pytest.raises(ValueError, match="H must have the hidden size"):
        multi_sample_logprob_velocity(W3, jnp.ones((2, 2)), ids, ids[::-1], jnp.array([-1.0, -1.0]))


# Traced invalid ids (the rule of theory): NaN, never a clamped plausible velocity.
# float64 op-by-op (eager) vs one fused jit: same formula, rounding of reordered sums only.
RTOL_JIT_VS_EAGER = 1e-12

_JIT_VELOCITY = jax.jit(logprob_velocity)
_JIT_TERMS = jax.jit(displacement_terms)
_JIT_GRAD = jax.jit(
    jax.grad(lambda W, h, p, n: jnp.sum(logprob_velocity(W, h, p, n, -0.7) ** 2), (0, 1))
)


@pytest.mark.parametrize("y_pos,y_neg", [(99, 1), (1, 99), (3, 3), (-1, 2), (2, -10)], ids=str)
def test_logprob_velocity_traced_invalid_ids_give_all_nan(y_pos, y_neg):
    """Probe: jit(logprob_velocity)(W, h, 99, 1, -0.5) with V = 10 clamped the id (finite)."""
    W = jax.random.normal(jax.random.key(30), (10, 3))
    h = jnp.array([0.3, -1.0, 0.5])
    out = _JIT_VELOCITY(W, h, y_pos, y_neg, -0.5)
    assert out.shape == (10,) and np.all(np.isnan(np.asarray(out)))
    terms = _JIT_TERMS(W, h, y_pos, y_neg)
    assert all(np.all(np.isnan(np.asarray(x))) for x in terms)
    assert np.all(np.isnan(np.asarray(_JIT_GRAD(W, h, y_pos, y_neg)[0])))


def test_logprob_velocity_valid_traced_equals_eager_with_finite_gradients():
    W = jax.random.normal(jax.random.key(31), (10, 3))
    H = jax.random.normal(jax.random.key(32), (8, 3))
    pairs = [(0, 1), (9, 0), (4, 7), (2, 3), (5, 8), (8, 5), (1, 9), (6, 2)]
    for i, (p, n) in enumerate(pairs):
        eager = logprob_velocity(W, H[i], p, n, -0.7)
        np.testing.assert_allclose(
            _JIT_VELOCITY(W, H[i], p, n, -0.7),
            eager,
            rtol=RTOL_JIT_VS_EAGER,
            atol=RTOL_JIT_VS_EAGER * float(jnp.max(jnp.abs(eager))),
            err_msg=f"pair {i}",
        )
        gW, gh = _JIT_GRAD(W, H[i], p, n)
        assert np.all(np.isfinite(np.asarray(gW))) and np.all(np.isfinite(np.asarray(gh))), i


def test_multi_sample_traced_invalid_sample_poisons_every_entry():
    W, H = jnp.ones((5, 3)), jnp.ones((3, 3))
    good_pos, good_neg = jnp.array([0, 1, 2]), jnp.array([1, 2, 3])
    ell = jnp.full(3, -0.5)
    run = jax.jit(multi_sample_logprob_velocity)
    assert np.all(np.isfinite(np.asarray(run(W, H, good_pos, good_neg, ell))))
    for y_pos, y_neg in (
        (good_pos.at[1].set(7), good_neg),  # out of range
        (good_pos, good_neg.at[2].set(2)),  # equal ids in sample 2
    ):
        assert np.all(np.isnan(np.asarray(run(W, H, y_pos, y_neg, ell))))
