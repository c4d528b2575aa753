"""Tests of theory.logit_arithmetic: softmax(a l_theta - b l_ref) on the KL optimum.

Independent computations: the literal softmax of logit arithmetic on the tuned model's log-probs
(vs the closed form), NumPy float64 direct sums for the masses, and known special cases.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import worst_index
from theory.kl_counterexample import random_instances
from theory.kl_optimum import tilt, total_probability_mass
from theory.logit_arithmetic import arithmetic_mass, arithmetic_tilt, logit_arithmetic

#: Closed form vs direct float64 evaluation: rounding only.
RTOL = 1e-10
ATOL = 1e-13
NUM = 2000


@functools.cache
def _instances():
    inst = random_instances(
        jax.random.key(11), num_instances=NUM, num_outcomes=6, zero_fraction=0.25, reward_scale=2.0
    )
    coef = jax.random.uniform(jax.random.key(12), (NUM, 2), jnp.float64, -2.0, 3.0)
    return inst, coef[:, 0], coef[:, 1]


def _p_ref(inst):
    return inst.alpha[:, None] * inst.p_A + (1 - inst.alpha[:, None]) * inst.p_U


def test_closed_form_matches_logit_arithmetic_on_tuned_logprobs():
    inst, a, b = _instances()
    p_ref = _p_ref(inst)
    l_theta = jnp.log(jax.jit(jax.vmap(tilt))(p_ref, inst.r, inst.beta))  # -inf off the support
    direct = jax.jit(jax.vmap(lambda x, y, a, b: logit_arithmetic(x, y, a=a, b=b)))(
        l_theta, jnp.log(p_ref), a, b
    )
    closed = jax.jit(jax.vmap(lambda p, r, be, a, b: arithmetic_tilt(p, r, be, a=a, b=b)))(
        p_ref, inst.r, inst.beta, a, b
    )
    err = np.max(np.abs(np.asarray(direct - closed)), axis=1)
    np.testing.assert_allclose(
        direct, closed, rtol=RTOL, atol=ATOL, err_msg=f"worst {worst_index(err)}"
    )
    assert np.all(np.asarray(closed)[np.asarray(p_ref) == 0] == 0)


def test_mass_matches_direct_sums():
    inst, a, b = _instances()
    m = jax.jit(jax.vmap(lambda *x: arithmetic_mass(*x[:5], a=x[5], b=x[6])))(*inst, a, b)
    al, pa, pu, r, be = (np.asarray(x) for x in inst)
    p_ref = al[:, None] * pa + (1 - al[:, None]) * pu
    on = p_ref > 0
    a_, b_ = np.asarray(a)[:, None], np.asarray(b)[:, None]
    # q = p_ref^{a-b} e^{a r / beta} / Z; TPM(A) = sum_y q(y) * alpha p_A(y) / p_ref(y)
    log_q = np.where(
        on, (a_ - b_) * np.log(np.where(on, p_ref, 1.0)) + a_ * r / be[:, None], -np.inf
    )
    q = np.exp(log_q - log_q.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    resp = np.where(on, al[:, None] * pa / np.where(on, p_ref, 1.0), 0.0)
    np.testing.assert_allclose(m.tpm_A, np.sum(q * resp, axis=1), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(m.tpm_A + m.tpm_U, 1.0, rtol=1e-12)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_special_cases():
    inst, _, _ = _instances()
    p_ref = _p_ref(inst)
    one = jnp.ones(NUM)

    def at(a, b, beta=inst.beta):
        fn = jax.vmap(lambda p, r, be, a, b: arithmetic_tilt(p, r, be, a=a, b=b))
        return jax.jit(fn)(p_ref, inst.r, beta, a, b)

    tilt_v = jax.jit(jax.vmap(tilt))
    # a = 1, b = 0: the tuned model itself
    np.testing.assert_allclose(at(one, 0 * one), tilt_v(p_ref, inst.r, inst.beta), rtol=RTOL)
    # gamma-extrapolation a = 1 + g, b = g: the optimum at beta / (1 + g) for g > -1
    g = 0.5 * one
    np.testing.assert_allclose(
        at(1 + g, g), tilt_v(p_ref, inst.r, inst.beta / 1.5), rtol=RTOL, atol=ATOL
    )
    # gamma = -1: back to p_ref
    np.testing.assert_allclose(at(0 * one, -one), p_ref, rtol=RTOL, atol=ATOL)
    # a = 1, b = 0 mass = total_probability_mass
    m1 = jax.jit(jax.vmap(lambda *x: arithmetic_mass(*x, a=1.0, b=0.0)))(*inst)
    m0 = jax.jit(jax.vmap(total_probability_mass))(*inst)
    np.testing.assert_allclose(m1.tpm_A, m0.tpm_A, rtol=RTOL)
    # gamma = -1 mass is the reference mixture weight: TPM(U) = 1 - alpha
    mr = jax.jit(jax.vmap(lambda *x: arithmetic_mass(*x, a=0.0, b=-1.0)))(*inst)
    np.testing.assert_allclose(mr.tpm_U, 1 - inst.alpha, rtol=RTOL)


def test_temperature_re_amplifies_unaligned_mass_on_disjoint_supports():
    # aligned outputs {0, 1} with reward 1, unaligned {2, 3} with reward 0: TPM(U) rises with T
    # towards the uniform-support value 1/2 (q -> uniform over 4 outputs)
    p_A, p_U = jnp.array([0.5, 0.5, 0.0, 0.0]), jnp.array([0.0, 0.0, 0.5, 0.5])
    r = jnp.array([1.0, 1.0, 0.0, 0.0])
    temps = jnp.geomspace(0.1, 100.0, 40)
    m = jax.vmap(lambda t: arithmetic_mass(0.5, p_A, p_U, r, 0.2, a=1 / t, b=0.0).tpm_U)(temps)
    # closed form: q(U) = 1 / (1 + e^{(1/T)/0.2}) (p_ref^{1/T} is constant on the support)
    np.testing.assert_allclose(m, 1 / (1 + np.exp(5.0 / np.asarray(temps))), rtol=RTOL)
    assert np.all(np.diff(np.asarray(m)) > 0)


L = jnp.log(jnp.array([0.2, 0.8]))


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((L, L), dict(a=jnp.nan, b=0.0), "a must be finite"),
        ((L, L), dict(a=1.0, b=jnp.inf), "b must be finite"),
        ((jnp.array([jnp.nan, 0.0]), L), dict(a=1.0, b=0.0), "logits_theta must be finite"),
        ((jnp.array([-jnp.inf, 0.0]), L), dict(a=1.0, b=0.0), "logits_theta must be finite"),
        ((L, jnp.array([jnp.inf, 0.0])), dict(a=1.0, b=0.0), "logits_ref must be finite or -inf"),
        ((L, jnp.array([-jnp.inf, -jnp.inf])), dict(a=1.0, b=0.0), "logits_ref must be finite"),
        ((L, jnp.zeros(3)), dict(a=1.0, b=0.0), "must have one shape"),
    ],
)
def test_logit_arithmetic_rejects_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        logit_arithmetic(*args, **kwargs)


def test_arithmetic_functions_reject_bad_input():
    p, r = jnp.array([0.5, 0.5]), jnp.array([1.0, 0.0])
    with pytest.raises(ValueError, match="p_ref must sum to 1"):
        arithmetic_tilt(jnp.array([0.5, 0.6]), r, 1.0, a=1.0, b=0.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        arithmetic_tilt(p, r, 0.0, a=1.0, b=0.0)
    with pytest.raises(ValueError, match="a must be finite"):
        arithmetic_mass(0.5, p, p, r, 1.0, a=jnp.inf, b=0.0)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        arithmetic_mass(1.5, p, p, r, 1.0, a=1.0, b=0.0)
    with pytest.raises(ValueError, match="r must be finite"):
        arithmetic_mass(0.5, p, p, jnp.array([jnp.nan, 0.0]), 1.0, a=1.0, b=0.0)


# Traced invalid values (the rule of theory): NaN; valid traced values equal the eager ones.
RTOL_JIT_VS_EAGER = 1e-12  # float64 eager vs jit of the same closed form: rounding only


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((L, L), dict(a=jnp.nan, b=0.0)),
        ((L, L), dict(a=1.0, b=jnp.inf)),
        ((jnp.array([jnp.nan, 0.0]), L), dict(a=1.0, b=0.0)),
        ((jnp.array([-jnp.inf, 0.0]), L), dict(a=1.0, b=0.0)),
        ((L, jnp.array([jnp.inf, 0.0])), dict(a=1.0, b=0.0)),
        ((L, jnp.array([-jnp.inf, -jnp.inf])), dict(a=1.0, b=0.0)),
    ],
)
def test_logit_arithmetic_traced_invalid_input_gives_all_nan(args, kwargs):
    fn = jax.jit(lambda x, y, a, b: logit_arithmetic(x, y, a=a, b=b))
    out = np.asarray(fn(*args, jnp.asarray(kwargs["a"]), jnp.asarray(kwargs["b"])))
    assert out.shape == (2,) and np.all(np.isnan(out))


def test_arithmetic_functions_traced_invalid_input_give_nan():
    p, r = jnp.array([0.5, 0.5]), jnp.array([1.0, 0.0])
    tilt_fn = jax.jit(lambda p, r, beta, a, b: arithmetic_tilt(p, r, beta, a=a, b=b))
    mass_fn = jax.jit(lambda *x: arithmetic_mass(*x[:5], a=x[5], b=x[6]))
    for bad in (
        (jnp.array([0.5, 0.6]), r, 1.0, 1.0, 0.0),  # p_ref sums to 1.1
        (p, r, 0.0, 1.0, 0.0),  # beta = 0
        (p, r, 1.0, jnp.inf, 0.0),  # a not finite
    ):
        assert np.all(np.isnan(np.asarray(tilt_fn(*bad)))), bad
    for bad in (
        (1.5, p, p, r, 1.0, 1.0, 0.0),  # alpha outside (0, 1)
        (0.5, p, jnp.array([-0.5, 1.5]), r, 1.0, 1.0, 0.0),  # negative p_U
        (0.5, p, p, r, 1.0, 1.0, jnp.nan),  # b not finite
    ):
        assert all(np.isnan(float(x)) for x in mass_fn(*bad)), bad
    good = (0.5, p, jnp.array([0.9, 0.1]), r, 1.0, 2.0, 1.0)
    np.testing.assert_allclose(
        mass_fn(*good),
        arithmetic_mass(*good[:5], a=good[5], b=good[6]),
        rtol=RTOL_JIT_VS_EAGER,
    )
