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
    """beta may be a traced array (sweeps vmap over it); validation then defers to the caller."""
    betas = jnp.array([0.1, 1.0])
    out = jax.vmap(lambda b: losses.dpo_loss(0.0, -1.0, beta=b))(betas)
    np.testing.assert_allclose(out, -jax.nn.log_sigmoid(betas), rtol=1e-14)
