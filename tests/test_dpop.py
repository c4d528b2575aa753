"""Tests of theory.dpop and theory.dpop_signs: closed forms vs autodiff of the actual losses."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import worst_index
from theory import dpop, dpop_signs
from theory.checks import checked
from theory.losses import dpo_loss, dpop_loss, loss_coefficients, weighted_loss

RTOL = 1e-9  # closed form vs autodiff of the same float64 function: rounding only
ATOL_PER_TERM = 1e-12  # times S, the sum of absolute values of the terms
SIGN_TOL = 1e-9  # entries smaller than this (times S) carry no reliable sign
L, V = 6, 7  # sequence length, vocabulary
PAIRS = (  # (chosen, rejected) patterns: edit at m = 0, 2, 3 and L - 1
    ([1, 2, 3, 4, 5, 6], [0, 2, 3, 4, 5, 6]),
    ([1, 2, 3, 4, 5, 6], [1, 2, 0, 4, 5, 6]),
    ([3, 3, 3, 3, 3, 3], [3, 3, 3, 5, 3, 3]),
    ([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 0]),
)
N_PER_PAIR = 300  # random states per pattern (1200 in all)
BETA = 0.7


def _states(seed, chosen, rejected, n):
    """Random logit states (NumPy, seeded); half are well-optimised by construction."""
    rng = np.random.default_rng(seed)
    m = int(np.flatnonzero(np.asarray(chosen) != np.asarray(rejected))[0])
    scale = rng.uniform(0.3, 3.0, (n, 1, 1))
    lw = scale * rng.standard_normal((n, L, V))
    lr_free = scale * rng.standard_normal((n, L, V))
    # well-optimised: s^l_t = rho s^w_t, the removed mass spread over the other tokens
    sw = np.exp(lw - lw.max(-1, keepdims=True))
    sw /= sw.sum(-1, keepdims=True)
    onehot = np.eye(V)[np.asarray(chosen)][None]  # [1, L, V]
    rho = rng.uniform(0.05, 0.95, (n, L, 1))
    spread = rng.uniform(0.05, 1.0, (n, L, V)) * (1.0 - onehot)
    spread /= spread.sum(-1, keepdims=True)
    moved = np.sum(sw * onehot, axis=-1, keepdims=True) * (1.0 - rho)
    lr_opt = np.log(sw * (1.0 - onehot * (1.0 - rho)) + moved * spread)
    is_opt = (np.arange(n) % 2 == 0)[:, None, None]
    lr = np.where(is_opt, lr_opt, lr_free)
    lr = np.where((np.arange(L) <= m)[None, :, None], lw, lr)  # shared contexts up to the edit
    rows = np.arange(L)
    lp_c = np.sum((lw - np.log(np.sum(np.exp(lw), -1, keepdims=True)))[:, rows, chosen], axis=1)
    ref_c = lp_c + rng.standard_normal(n)  # hinge active about half the time
    ref_r = rng.standard_normal(n) - 8.0
    return tuple(jnp.asarray(x) for x in (lw, lr, ref_c, ref_r))


def _autodiff_descent(loss, lw, lr, chosen, rejected, ref_c, ref_r):
    """-dL/dtheta for logits b_w + theta, b_l + theta (theta shared per position), at theta = 0."""

    def total(theta):
        lp_c, lp_r = dpop.pair_logprobs_from_logits(lw + theta, lr + theta, chosen, rejected)
        return loss(lp_c, lp_r, ref_c, ref_r)

    return -jax.grad(total)(jnp.zeros_like(lw))


def _scale(g):
    """S per instance: sum of absolute values of the two terms of the closed form."""
    return g.coef_chosen + g.coef_rejected  # each |e - s| row sums to <= 2: S <= 2 L (a+ + a-)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
@pytest.mark.parametrize("inside", [True, False])
@pytest.mark.parametrize("lam", [0.0, 3.0])
def test_position_logit_gradients_matches_autodiff(inside, lam):
    for p, (chosen, rejected) in enumerate(PAIRS):
        c, r = jnp.asarray(chosen), jnp.asarray(rejected)
        lw, lr, ref_c, ref_r = _states(10 + p, chosen, rejected, N_PER_PAIR)
        closed = jax.vmap(
            lambda a, b, rc, rr, c=c, r=r: dpop.position_logit_gradients(
                a, b, c, r, rc, rr, beta=BETA, lam=lam, penalty_inside_beta=inside
            )
        )(lw, lr, ref_c, ref_r)
        loss = partial(dpop_loss, beta=BETA, lam=lam, penalty_inside_beta=inside)
        auto = jax.vmap(
            lambda a, b, rc, rr, c=c, r=r, loss=loss: _autodiff_descent(loss, a, b, c, r, rc, rr)
        )(lw, lr, ref_c, ref_r)
        S = 2 * L * _scale(closed)[:, None, None]
        err = np.max(
            np.abs(closed.descent - auto) - RTOL * np.abs(auto) - ATOL_PER_TERM * S, axis=(1, 2)
        )
        i = worst_index(err)
        np.testing.assert_array_less(err, 0.0, err_msg=f"pair {p}, worst instance {i}")
        assert 0.2 * N_PER_PAIR < int(np.sum(closed.hinge_active)) < 0.8 * N_PER_PAIR


def test_position_logit_gradients_dpo_case_matches_dpo_loss():
    for p, (chosen, rejected) in enumerate(PAIRS):
        c, r = jnp.asarray(chosen), jnp.asarray(rejected)
        lw, lr, ref_c, ref_r = _states(20 + p, chosen, rejected, N_PER_PAIR)
        closed = jax.vmap(
            lambda a, b, rc, rr, c=c, r=r: dpop.position_logit_gradients(
                a, b, c, r, rc, rr, beta=BETA, lam=0.0
            )
        )(lw, lr, ref_c, ref_r)
        auto = jax.vmap(
            lambda a, b, rc, rr, c=c, r=r: _autodiff_descent(
                partial(dpo_loss, beta=BETA), a, b, c, r, rc, rr
            )
        )(lw, lr, ref_c, ref_r)
        S = 2 * L * _scale(closed)[:, None, None]
        np.testing.assert_allclose(
            closed.descent,
            auto,
            rtol=RTOL,
            atol=ATOL_PER_TERM * float(np.max(S)),
            err_msg=f"pair {p}",
        )
        # the source's structure: zero before the edit, a (e_t - e_t') at the edit
        m = dpop.edit_position(c, r)
        np.testing.assert_allclose(auto[:, :m], 0.0, atol=ATOL_PER_TERM * float(np.max(S)))
        a = closed.coef_rejected[:, None]
        expect_m = a * (jax.nn.one_hot(c[m], V) - jax.nn.one_hot(r[m], V))[None]
        np.testing.assert_allclose(auto[:, m], expect_m, rtol=RTOL, atol=ATOL_PER_TERM * 2)


@pytest.mark.parametrize("inside", [True, False])
def test_dpop_coefficients_matches_autodiff(inside):
    key = jax.random.key(3)
    lp = jax.random.normal(key, (4, 1000)) * 3.0
    lam = 2.5
    closed = dpop.dpop_coefficients(*lp, beta=BETA, lam=lam, penalty_inside_beta=inside)
    auto = loss_coefficients(
        partial(dpop_loss, beta=BETA, lam=lam, penalty_inside_beta=inside), *lp
    )
    for name, x, y in (
        ("coef_chosen", closed.coef_chosen, auto.coef_chosen),
        ("coef_rejected", closed.coef_rejected, auto.coef_rejected),
    ):
        i = worst_index(np.abs(x - y))
        np.testing.assert_allclose(
            x, y, rtol=RTOL, atol=ATOL_PER_TERM, err_msg=f"{name}, worst instance {i}"
        )


def test_dpop_loss_matches_hand_calculation():
    # lp+ = -2, lp- = -2, ref+ = -1, ref- = -2: margin (-2+1) - 0 = -1, hinge P = 1.
    # inside beta = 1, lam = 1: -ln sigma(1 * (-1 - 1)) = ln(1 + e^2)
    np.testing.assert_allclose(
        dpop_loss(-2.0, -2.0, -1.0, -2.0, beta=1.0, lam=1.0), np.log1p(np.exp(2.0)), rtol=1e-15
    )
    # outside beta = 0.5, lam = 1: -ln sigma(0.5 * (-1) - 1) = ln(1 + e^1.5)
    np.testing.assert_allclose(
        dpop_loss(-2.0, -2.0, -1.0, -2.0, beta=0.5, lam=1.0, penalty_inside_beta=False),
        np.log1p(np.exp(1.5)),
        rtol=1e-15,
    )
    # hinge inactive (lp+ above ref): DPO, -ln sigma(1 * ((-1+2) - 0)) = ln(1 + e^-1)
    np.testing.assert_allclose(
        dpop_loss(-1.0, -3.0, -2.0, -3.0, beta=1.0, lam=5.0), np.log1p(np.exp(-1.0)), rtol=1e-15
    )


def test_dpop_loss_is_weighted_loss_while_hinge_active():
    lp = jax.random.normal(jax.random.key(4), (4, 1000))
    lp_c, lp_r, ref_c, ref_r = lp[0] - 2.0, lp[1], lp[0], lp[3]  # lp+ < ref+: active
    lam = 4.0
    got = dpop_loss(lp_c, lp_r, ref_c, ref_r, beta=BETA, lam=lam)
    want = weighted_loss(
        lp_c,
        lp_r,
        ref_c,
        ref_r,
        base_loss=partial(dpo_loss, beta=BETA),
        weight_chosen=1.0 + lam,
        weight_rejected=1.0,
    )
    np.testing.assert_allclose(got, want, rtol=1e-12)


def _signs(x, S):
    return np.where(np.abs(x) > SIGN_TOL * S, np.sign(x), 0)


def test_predicted_signs_dpo_agree_exactly_where_assumption_holds():
    n_held = n_failed = 0
    for p, (chosen, rejected) in enumerate(PAIRS):
        c, r = jnp.asarray(chosen), jnp.asarray(rejected)
        m = dpop.edit_position(c, r)
        lw, lr, ref_c, ref_r = _states(30 + p, chosen, rejected, N_PER_PAIR)
        auto = jax.vmap(
            lambda a, b, rc, rr, c=c, r=r: _autodiff_descent(
                partial(dpo_loss, beta=BETA), a, b, c, r, rc, rr
            )
        )(lw, lr, ref_c, ref_r)
        lp = jax.vmap(lambda a, b, c=c, r=r: dpop.pair_logprobs_from_logits(a, b, c, r))(lw, lr)
        coef = dpop.dpop_coefficients(*lp, ref_c, ref_r, beta=BETA, lam=0.0).coef_rejected
        got = _signs(auto, 2 * np.asarray(coef)[:, None, None])  # S = a- |e - s^w| + a- |e - s^l|
        pred = np.asarray(dpop_signs.predicted_signs(c, r, V, penalised=False))[None]
        ok = jax.vmap(partial(dpop_signs.well_optimised, chosen=c, rejected=r))(lw, lr)  # [N, L]
        post = np.arange(L) > m
        held = np.asarray(ok)[:, post]
        agree = np.all(got == pred, axis=-1)[:, post]  # [N, positions after m]
        assert np.all(agree[held]), f"pair {p}: DPO sign prediction failed where assumed"
        # where it fails, the exact sign is that of s^l - s^w (Pal et al.'s formula)
        diff = jax.nn.softmax(lr, -1) - jax.nn.softmax(lw, -1)
        np.testing.assert_array_equal(got[:, post], _signs(np.asarray(diff), 2)[:, post])
        n_held, n_failed = n_held + int(np.sum(held)), n_failed + int(np.sum(~held))
    assert n_held >= 1000 and n_failed >= 1000, (n_held, n_failed)  # both regimes exercised


@pytest.mark.parametrize("inside", [True, False])
def test_lambda_thresholds_are_tight(inside):
    checked = 0
    for p, (chosen, rejected) in enumerate(PAIRS):
        c, r = jnp.asarray(chosen), jnp.asarray(rejected)
        m = dpop.edit_position(c, r)
        if m == L - 1:
            continue  # no position after the edit
        lw, lr, ref_c, _ = _states(40 + p, chosen, rejected, N_PER_PAIR)
        ref_c = ref_c + 10.0  # hinge active everywhere
        th = jax.vmap(
            lambda a, b, c=c, r=r: dpop_signs.lambda_thresholds(
                a, b, c, r, beta=BETA, penalty_inside_beta=inside
            )
        )(lw, lr)
        assert np.all(np.asarray(th.correct) <= np.asarray(th.threshold) + 1e-12)
        k = m + 1
        lam_star = np.asarray(th.threshold[:, k])
        pred = np.asarray(dpop_signs.predicted_signs(c, r, V, penalised=True))[k]
        for factor, should_hold in ((1.0 + 1e-3, True), (1.0 - 1e-3, False)):
            lams = lam_star * factor + (1e-6 if should_hold else 0.0)

            def auto_at(a, b, rc, lam, c=c, r=r, k=k):
                loss = partial(dpop_loss, beta=BETA, lam=lam, penalty_inside_beta=inside)
                return _autodiff_descent(loss, a, b, c, r, rc, 0.0)[k]

            g = jax.vmap(auto_at)(lw, lr, ref_c, lams)
            right = np.all(np.sign(g) == pred[None], axis=-1)
            use = lam_star > 1e-3 if not should_hold else np.ones_like(lam_star, bool)
            assert np.all(right[use] == should_hold), (
                p,
                factor,
                np.flatnonzero(right[use] != should_hold)[:5],
            )
            checked += int(np.sum(use))
    assert checked >= 1000


def test_weighted_split_matches_its_definition():
    # hand numbers: a+ = 3, a- = 1, |g+|^2 = 2, <g+, g-> = 1.5: rho E = 0.5, gamma = 2, total 4.5
    w = dpop.weighted_split(3.0, 1.0, 2.0, 1.5)
    np.testing.assert_allclose([w.dpo_part, w.gamma, w.velocity], [0.5, 2.0, 4.5], rtol=1e-15)


GOOD = dict(
    logits_chosen=jnp.zeros((3, 4)),
    logits_rejected=jnp.zeros((3, 4)),
    chosen=jnp.array([0, 1, 2]),
    rejected=jnp.array([0, 3, 2]),
)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (dict(rejected=jnp.array([0, 1, 2])), "differ in exactly one position"),
        (dict(rejected=jnp.array([1, 3, 2])), "differ in exactly one position"),
        (dict(rejected=jnp.array([0, 3, 2, 1])), "same length"),
        (dict(logits_rejected=jnp.zeros((2, 4))), "logits_rejected must have the shape"),
        (dict(logits_rejected=jnp.ones((3, 4))), "are shared"),
        (dict(chosen=jnp.array([0, 9, 2])), r"token ids in \[0, V\)"),
        (dict(logits_chosen=jnp.zeros(4)), r"logits_chosen must have shape \[L, V\]"),
        (
            dict(
                logits_chosen=jnp.full((3, 4), jnp.nan), logits_rejected=jnp.full((3, 4), jnp.nan)
            ),
            "must be finite",
        ),
    ],
)
def test_position_logit_gradients_rejects_bad_pairs(override, match):
    with pytest.raises(ValueError, match=match):
        dpop.position_logit_gradients(**{**GOOD, **override}, beta=0.1, lam=1.0)
    with pytest.raises(ValueError, match=match):
        dpop_signs.lambda_thresholds(**{**GOOD, **override})


def test_position_logit_gradients_rejects_bad_lam_and_beta():
    with pytest.raises(ValueError, match="lam must be >= 0"):
        dpop.position_logit_gradients(**GOOD, beta=0.1, lam=-1.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpop.position_logit_gradients(**GOOD, beta=0.0, lam=1.0)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        dpop.dpop_coefficients(0.0, 0.0, beta=0.1, lam=-0.5)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        dpop_loss(0.0, 0.0, beta=0.1, lam=-0.5)


def test_edit_position_and_predicted_signs_reject_bad_input():
    with pytest.raises(TypeError, match="integer token ids"):
        dpop.edit_position(jnp.array([0.0, 1.0]), jnp.array([0.0, 2.0]))
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 2"):
        dpop_signs.predicted_signs(jnp.array([0, 1]), jnp.array([1, 1]), 1, penalised=True)
    with pytest.raises(ValueError, match="grad_sq_chosen must be >= 0"):
        dpop.weighted_split(1.0, 1.0, -1.0, 0.0)


def test_position_logit_gradients_jit_float32_matches_float64():
    chosen, rejected = PAIRS[1]
    c, r = jnp.asarray(chosen), jnp.asarray(rejected)
    lw, lr, ref_c, ref_r = _states(50, chosen, rejected, 8)
    f = jax.jit(
        jax.vmap(
            lambda a, b, rc, rr, c=c, r=r: (
                dpop.position_logit_gradients(a, b, c, r, rc, rr, beta=BETA, lam=2.0).descent
            )
        )
    )
    g64 = f(lw, lr, ref_c, ref_r)
    g32 = f(*(x.astype(jnp.float32) for x in (lw, lr, ref_c, ref_r)))
    assert g32.dtype == jnp.float32
    np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-6)  # float32 vs float64 reference


# Traced invalid values (the rule of theory): NaN, never a plausible gradient.
RTOL_JIT_VS_EAGER = 1e-12  # float64 eager vs jit of the same closed form: rounding only
_JIT_GRADIENTS = jax.jit(
    lambda lw, lr, c, r, beta, lam: dpop.position_logit_gradients(
        lw, lr, c, r, -1.0, -2.0, beta=beta, lam=lam
    )
)
_JIT_THRESHOLDS = jax.jit(
    lambda lw, lr, c, r, beta: dpop_signs.lambda_thresholds(lw, lr, c, r, beta=beta)
)
_VALID = (jnp.array([[0.5, -1.0, 0.2, 0.0], [0.1, 0.3, -0.4, 1.0], [0.0, 0.2, 0.9, -0.3]]),)
_VALID = (_VALID[0], _VALID[0].at[2].set(jnp.array([1.0, 0.0, 0.4, 0.2])))  # rows <= m=1 shared


@pytest.mark.parametrize(
    ("override", "what"),
    [
        (dict(r=jnp.array([0, 1, 2])), "edit distance 0"),
        (dict(r=jnp.array([1, 3, 2])), "edit distance 2"),
        (dict(r=jnp.array([0, 3, 7])), "rejected id out of range"),
        (dict(c=jnp.array([-1, 1, 2])), "negative chosen id"),
        (dict(lam=-1.0), "lam < 0"),
        (dict(beta=0.0), "beta = 0"),
    ],
)
def test_position_logit_gradients_traced_invalid_gives_nan(override, what):
    """Probe: jit(position_logit_gradients) accepted pairs at edit distance 0 or 2."""
    args = dict(lw=_VALID[0], lr=_VALID[1], c=jnp.array([0, 1, 2]), r=jnp.array([0, 3, 2]))
    args |= dict(beta=0.5, lam=2.0) | override
    g = _JIT_GRADIENTS(**args)
    for field in (g.descent, g.coef_chosen, g.coef_rejected):
        assert np.all(np.isnan(np.asarray(field))), what
    if "lam" not in override:
        th = _JIT_THRESHOLDS(*(args[k] for k in ("lw", "lr", "c", "r", "beta")))
        assert all(np.all(np.isnan(np.asarray(x))) for x in th), what


def test_position_logit_gradients_valid_traced_equals_eager_with_finite_gradients():
    lw, lr = _VALID
    c, r = jnp.array([0, 1, 2]), jnp.array([0, 3, 2])
    eager = dpop.position_logit_gradients(lw, lr, c, r, -1.0, -2.0, beta=0.5, lam=2.0)
    traced = _JIT_GRADIENTS(lw, lr, c, r, 0.5, 2.0)
    for a, b in zip(traced, eager, strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL_JIT_VS_EAGER, atol=1e-15)
    grad = jax.jit(
        jax.grad(
            lambda a, b, lam: jnp.sum(_JIT_GRADIENTS(a, b, c, r, 0.5, lam).descent ** 2), (0, 1, 2)
        )
    )(lw, lr, 2.0)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in grad)
    np.testing.assert_allclose(
        _JIT_THRESHOLDS(lw, lr, c, r, 0.5).threshold,
        dpop_signs.lambda_thresholds(lw, lr, c, r, beta=0.5).threshold,
        rtol=RTOL_JIT_VS_EAGER,
    )


def test_dpop_coefficients_traced_invalid_hyperparameter_gives_nan():
    run = jax.jit(
        lambda beta, lam: dpop.dpop_coefficients(-2.0, -2.0, -1.0, -2.0, beta=beta, lam=lam)
    )
    for beta, lam in ((1.0, -1.0), (0.0, 1.0), (-1.0, 0.0), (1.0, jnp.nan)):
        c = run(beta, lam)
        assert np.isnan(float(c.coef_chosen)) and np.isnan(float(c.coef_rejected)), (beta, lam)
    eager = dpop.dpop_coefficients(-2.0, -2.0, -1.0, -2.0, beta=1.0, lam=1.0)
    for a, b in zip(run(1.0, 1.0), eager, strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL_JIT_VS_EAGER)


def test_well_optimised_traced_invalid_pair_raises_under_checked():
    """A boolean result cannot be NaN: theory.checks.checked reports the rule instead."""
    lw, lr = _VALID
    run = checked(jax.jit(dpop_signs.well_optimised))
    c, r = jnp.array([0, 1, 2]), jnp.array([0, 3, 2])
    np.testing.assert_array_equal(run(lw, lr, c, r), dpop_signs.well_optimised(lw, lr, c, r))
    with pytest.raises(ValueError, match="differ in exactly one position"):
        run(lw, lr, jnp.array([0, 1, 2]), jnp.array([1, 3, 2]))


def test_pair_logprobs_from_logits_ids_rule():
    lw, lr = _VALID
    run = jax.jit(dpop.pair_logprobs_from_logits)
    assert all(np.isnan(float(x)) for x in run(lw, lr, jnp.array([0, 1, 9]), jnp.array([0, 3, 2])))
    with pytest.raises(ValueError, match=r"chosen must be token ids in \[0, V\)"):
        dpop.pair_logprobs_from_logits(lw, lr, jnp.array([0, 1, 9]), jnp.array([0, 3, 2]))


def test_dpop_lam_required_and_flags_must_be_bools():
    with pytest.raises(TypeError, match="lam"):
        dpop.position_logit_gradients(**GOOD, beta=0.1)
    with pytest.raises(TypeError, match="lam"):
        dpop.dpop_coefficients(0.0, 0.0, beta=0.1)
    with pytest.raises(TypeError, match="penalty_inside_beta must be a bool"):
        dpop.position_logit_gradients(**GOOD, beta=0.1, lam=1.0, penalty_inside_beta="no")
    with pytest.raises(TypeError, match="penalty_inside_beta must be a bool"):
        dpop_signs.lambda_thresholds(**GOOD, penalty_inside_beta=0)
    with pytest.raises(TypeError, match="penalised must be a bool"):
        dpop_signs.predicted_signs(jnp.array([0, 1]), jnp.array([1, 1]), 3, penalised="yes")
