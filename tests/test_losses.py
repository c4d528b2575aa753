"""Each loss against a value computed by hand (math module, no JAX), plus derivatives and errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from theory import losses

# Hand values below use Python floats; float64 JAX agrees to round-off.
RTOL_HAND = 1e-12


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x))


LP_C, LP_R, REF_C, REF_R = -1.3, -2.9, -1.1, -1.7  # margin u = 1.6, reference margin 0.6


@pytest.mark.parametrize(
    "name,hyper,expected",
    [
        ("dpo", {"beta": 0.5}, -_log_sigmoid(0.5 * (1.6 - 0.6))),
        ("ipo", {"tau": 0.25}, (1.6 - 0.6 - 2.0) ** 2),
        ("slic", {"delta": 2.0}, max(0.0, 2.0 - 1.6)),  # reference-free
        ("rebel", {"eta": 2.0, "reward_margin": 0.3}, ((1.6 - 0.6) / 2.0 - 0.3) ** 2),
        ("gpo", {"beta": 0.5}, math.exp(-0.5 * (1.6 - 0.6))),
        ("gpo", {"beta": 0.5, "f": "truncated_quadratic"}, max(0.0, 1 - 0.5) ** 2),
        ("sft_term", {"base_loss": "dpo", "sft_coef": 0.2}, -_log_sigmoid(0.1 * 1.0) + 0.2 * 1.3),
        (
            "weighted",
            {"base_loss": "dpo", "weight_chosen": 2.0, "weight_rejected": 0.5},
            -_log_sigmoid(0.1 * ((2 * -1.3 - 0.5 * -2.9) - (2 * -1.1 - 0.5 * -1.7))),
        ),
        (
            "simpo",
            {"beta": 2.0, "gamma": 0.5, "length_chosen": 2.0, "length_rejected": 4.0},
            -_log_sigmoid(2.0 * (-1.3 / 2 - -2.9 / 4) - 0.5),
        ),
        # hinge active: lp+ = -1.3 < ref -1.1, penalty 0.2
        ("dpop", {"beta": 0.5, "lam": 5.0}, -_log_sigmoid(0.5 * (1.0 - 5.0 * 0.2))),
        (
            "dpop",
            {"beta": 0.5, "lam": 5.0, "penalty_inside_beta": False},
            -_log_sigmoid(0.5 * 1.0 - 5.0 * 0.2),
        ),
    ],
)
def test_loss_matches_hand_value(name, hyper, expected):
    value = losses.make_loss(name, **hyper)(LP_C, LP_R, REF_C, REF_R)
    np.testing.assert_allclose(float(value), expected, rtol=RTOL_HAND)


def test_dpop_equals_dpo_when_chosen_above_reference():
    args = (-1.0, -3.0, -1.5, -2.0)  # lp+ > ref+: hinge inactive
    np.testing.assert_allclose(
        losses.dpop_loss(*args, beta=0.3, lam=50.0), losses.dpo_loss(*args, beta=0.3), rtol=1e-15
    )


def test_dpop_active_hinge_is_weighted_dpo():
    """Pal et al. Eq. 3 with an active hinge = Eq. 5 with lambda+ = 1 + lambda, lambda- = 1."""
    args = (LP_C, LP_R, REF_C, REF_R)
    np.testing.assert_allclose(
        losses.dpop_loss(*args, beta=0.5, lam=5.0),
        losses.weighted_loss(
            *args, base_loss=lambda *a: losses.dpo_loss(*a, beta=0.5), weight_chosen=6.0
        ),
        rtol=1e-14,
    )


def test_dpo_margin_derivative_is_lemma1():
    """l'(u) = -beta sigma(beta (u_ref - u)) < 0 (Razin et al. Lemma 1), at random margins."""
    u = jnp.linspace(-20, 20, 101)
    loss = losses.make_loss("dpo", beta=0.7)
    derivative = losses.margin_derivative(loss, u, jnp.zeros_like(u), 0.3, 0.0)
    np.testing.assert_allclose(derivative, -0.7 * jax.nn.sigmoid(0.7 * (0.3 - u)), rtol=1e-12)
    assert bool(jnp.all(derivative < 0))


@pytest.mark.parametrize("name", losses.MARGIN_CLASS)
def test_margin_class_losses_depend_on_margin_only(name):
    """For the class, dL/dlp+ = -dL/dlp- (so a+ = a- = -l')."""
    hyper = {"slic": {"delta": 5.0}}.get(name, {})
    coef = losses.loss_coefficients(
        losses.make_loss(name, **hyper),
        jnp.array([-1.0, -4.0]),
        jnp.array([-2.0, -0.5]),
        -1.2,
        -1.9,
    )
    np.testing.assert_allclose(coef.coef_chosen, coef.coef_rejected, rtol=1e-14)


def test_sft_term_coefficients_add_lambda():
    """Eq. 4: a+ = -l' + lambda and a- = -l', with l' of the base loss (DPO, default beta 0.1)."""
    coef = losses.loss_coefficients(
        losses.make_loss("sft_term", base_loss="dpo", sft_coef=0.3), -1.0, -2.0
    )
    ell_prime = losses.margin_derivative(losses.make_loss("dpo", beta=0.1), -1.0, -2.0)
    np.testing.assert_allclose(coef.coef_chosen, -ell_prime + 0.3, rtol=1e-13)
    np.testing.assert_allclose(coef.coef_rejected, -ell_prime, rtol=1e-13)


@pytest.mark.parametrize(
    "name,hyper,match",
    [
        ("dpo", {"beta": 0.0}, "beta must be > 0"),
        ("dpo", {"beta": -0.1}, "beta must be > 0"),
        ("ipo", {"tau": 0.0}, "tau must be > 0"),
        ("slic", {"delta": -1.0}, "delta must be > 0"),
        ("rebel", {"eta": 0.0}, "eta must be > 0"),
        ("gpo", {"f": "savage"}, "f must be one of"),
        ("simpo", {"gamma": -0.5}, "gamma must be >= 0"),
        ("simpo", {"length_chosen": 0.0}, "length_chosen must be > 0"),
        ("dpop", {"lam": -1.0}, "lam must be >= 0"),
        ("sft_term", {"sft_coef": -1.0}, "sft_coef must be >= 0"),
        ("weighted", {"weight_chosen": 0.0}, "weight_chosen must be > 0"),
        ("sft_term", {"base_loss": "simpo"}, "base_loss must be one of"),
        ("dpo", {"tau": 1.0}, "bad hyperparameters"),
        ("kto", {}, "loss_type must be one of"),
        ("dpo", {"beta": float("nan")}, "beta must be > 0"),
    ],
)
def test_make_loss_rejects_bad_hyperparameters(name, hyper, match):
    with pytest.raises(ValueError, match=match):
        losses.make_loss(name, **hyper)


def test_dpo_loss_accepts_traced_beta():
    """beta may be a traced array (sweeps vmap over it); invalid entries would be NaN (below)."""
    betas = jnp.array([0.1, 1.0])
    out = jax.vmap(lambda b: losses.dpo_loss(0.0, -1.0, beta=b))(betas)
    np.testing.assert_allclose(out, -jax.nn.log_sigmoid(betas), rtol=1e-14)


# Traced invalid hyperparameters (the rule of theory): NaN, never a plausible loss.
# float64 eager vs jit of the same formula: rounding only.
RTOL_JIT_VS_EAGER = 1e-12
BASE_HYPER = {
    "dpo": {"beta": 0.5},
    "ipo": {"tau": 0.5},
    "slic": {"delta": 1.0},
    "rebel": {"eta": 2.0},
    "gpo": {"beta": 0.5},
    "sft_term": {"sft_coef": 0.2},
    "weighted": {"weight_chosen": 2.0, "weight_rejected": 0.5},
    "simpo": {"beta": 2.0, "gamma": 0.5, "length_chosen": 2.0, "length_rejected": 3.0},
    "dpop": {"beta": 0.5, "lam": 5.0},
}
BAD_TRACED = [
    ("dpo", "beta", -1.0),
    ("dpo", "beta", 0.0),
    ("dpo", "beta", float("nan")),
    ("ipo", "tau", 0.0),
    ("slic", "delta", -1.0),
    ("rebel", "eta", -2.0),
    ("gpo", "beta", -0.5),
    ("sft_term", "sft_coef", -0.1),
    ("weighted", "weight_chosen", 0.0),
    ("weighted", "weight_rejected", -1.0),
    ("simpo", "beta", -1.0),
    ("simpo", "gamma", -0.5),
    ("simpo", "length_chosen", 0.0),
    ("simpo", "length_rejected", float("inf")),
    ("dpop", "beta", -1.0),
    ("dpop", "lam", -1.0),
]


def _loss_of(name, key):
    def loss(value, lp_c, lp_r):
        return losses.LOSSES[name](lp_c, lp_r, REF_C, REF_R, **{**BASE_HYPER[name], key: value})

    return loss


@pytest.mark.parametrize("name,key,bad", BAD_TRACED, ids=lambda x: str(x))
def test_loss_traced_invalid_hyperparameter_gives_nan(name, key, bad):
    """Probe: jit(dpo_loss) with beta = -1 returned a number."""
    fn = jax.jit(_loss_of(name, key))
    assert np.isnan(float(fn(bad, LP_C, LP_R)))
    good = BASE_HYPER[name][key]
    np.testing.assert_allclose(
        float(fn(good, LP_C, LP_R)),
        float(_loss_of(name, key)(good, LP_C, LP_R)),
        rtol=RTOL_JIT_VS_EAGER,
    )
    # derivatives: NaN for the bad value (loss_coefficients differentiates the loss) ...
    grads = jax.jit(jax.grad(_loss_of(name, key), argnums=(0, 1, 2)))
    assert all(np.isnan(float(g)) for g in grads(bad, LP_C, LP_R))
    # ... finite for the valid one
    assert all(np.isfinite(float(g)) for g in grads(good, LP_C, LP_R))


def test_loss_traced_hyperparameter_poisons_only_its_pairs():
    """A per-pair beta array: NaN exactly where beta <= 0."""
    betas = jnp.array([0.5, -1.0, 2.0, 0.0])
    lp_c, lp_r = jnp.array([-1.0, -2.0, -3.0, -4.0]), jnp.full(4, -2.5)
    out = np.asarray(jax.jit(lambda b: losses.dpo_loss(lp_c, lp_r, beta=b))(betas))
    np.testing.assert_array_equal(np.isnan(out), [False, True, False, True])
    np.testing.assert_allclose(
        out[[0, 2]],
        -np.log(jax.nn.sigmoid(np.array([0.5, 2.0]) * (np.array([-1.0, -3.0]) + 2.5))),
        rtol=RTOL_JIT_VS_EAGER,
    )


def test_margin_derivative_traced_invalid_beta_is_nan():
    def ell(beta):
        return losses.margin_derivative(lambda *a: losses.dpo_loss(*a, beta=beta), -1.0, -2.0)

    assert np.isnan(float(jax.jit(ell)(-1.0)))
    np.testing.assert_allclose(float(jax.jit(ell)(0.7)), float(ell(0.7)), rtol=RTOL_JIT_VS_EAGER)


@pytest.mark.parametrize("flag", ["no", 0, 1, None])
def test_make_loss_rejects_non_bool_flag(flag):
    """Probe: make_loss("dpop", penalty_inside_beta="no") was treated as True."""
    with pytest.raises(ValueError, match="penalty_inside_beta must be a bool"):
        losses.make_loss("dpop", beta=0.1, lam=5.0, penalty_inside_beta=flag)
    with pytest.raises(TypeError, match="penalty_inside_beta must be a bool"):
        losses.dpop_loss(0.0, 0.0, beta=0.1, lam=5.0, penalty_inside_beta=flag)


def test_dpop_lam_is_required():
    """dpop_loss, dpop_coefficients and position_logit_gradients share one lam contract."""
    with pytest.raises(ValueError, match="lam"):
        losses.make_loss("dpop", beta=0.1)
    with pytest.raises(TypeError, match="lam"):
        losses.dpop_loss(0.0, 0.0, beta=0.1)


def test_mean_pair_loss_weight_rule():
    loss = losses.make_loss("dpo", beta=1.0)
    lp_c, lp_r = jnp.array([-1.0, -2.0, -0.5]), jnp.array([-1.5, -1.0, -3.0])
    per_pair = np.asarray(loss(lp_c, lp_r))
    weight = jnp.array([1.0, 0.0, 2.0])
    want = float(np.sum(np.asarray(weight) * per_pair) / 3.0)
    run = jax.jit(lambda w: losses.mean_pair_loss(loss, lp_c, lp_r, weight=w))
    np.testing.assert_allclose(float(run(weight)), want, rtol=RTOL_JIT_VS_EAGER)
    np.testing.assert_allclose(
        float(losses.mean_pair_loss(loss, lp_c, lp_r, weight=weight)), want, rtol=1e-15
    )
    for bad in ([1.0, -1.0, 2.0], [0.0, 0.0, 0.0], [1.0, float("nan"), 1.0]):
        assert np.isnan(float(run(jnp.array(bad)))), bad
    with pytest.raises(ValueError, match="weight must be >= 0"):
        losses.mean_pair_loss(loss, lp_c, lp_r, weight=jnp.array([1.0, -1.0, 2.0]))
    with pytest.raises(ValueError, match="weight must have a positive sum"):
        losses.mean_pair_loss(loss, lp_c, lp_r, weight=jnp.zeros(3))
    g = jax.jit(jax.grad(lambda c, w: losses.mean_pair_loss(loss, c, lp_r, weight=w)))
    assert np.all(np.isfinite(np.asarray(g(lp_c, weight))))
    assert np.all(np.isnan(np.asarray(g(lp_c, jnp.array([1.0, -1.0, 2.0])))))
