"""Tests of Theorem 2's counterexample search (theory.kl_counterexample) and exact check
(theory.kl_exact).

The hand-made instance below is checked three independent ways: exact fractions written out in
the test, float64 ``math.exp``, and the library's log-space TPM.
"""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from theory.kl_counterexample import (
    MixtureInstances,
    random_instances,
    search_counterexamples,
    theorem2_census,
    theorem2_status,
)
from theory.kl_exact import exact_check, exp_bounds, rational_counterexample, rationalize
from theory.kl_optimum import support_covariances, total_probability_mass

# Counterexample to Theorem 2 as stated (found by the search, rounded by hand to small fractions):
# three outputs, beta = 1, any alpha in (0, 1).
P_A = [Fraction(0), Fraction(1, 10), Fraction(9, 10)]
P_U = [Fraction(11, 20), Fraction(3, 10), Fraction(3, 20)]
R = [Fraction(-4), Fraction(9, 2), Fraction(5, 2)]
ALPHA = Fraction(17, 20)

#: |TPM(A) - alpha| of the hand instance is ~0.05; float64 rounding of three exps is ~1e-15.
MARGIN = 1e-3


def _f(xs):
    return jnp.asarray([float(x) for x in xs])


def test_stated_theorem_counterexample_by_hand():
    n = 3  # support = all three outputs (p_U > 0 everywhere)
    cov_A = sum(r * p for r, p in zip(R, P_A, strict=True)) / n - sum(R) / n**2
    cov_U = sum(r * p for r, p in zip(R, P_U, strict=True)) / n - sum(R) / n**2
    assert cov_A == Fraction(17, 30) and cov_U == Fraction(-59, 120)  # hypotheses hold exactly
    m_A = sum(float(p) * math.exp(float(r)) for p, r in zip(P_A, R, strict=True))
    m_U = sum(float(p) * math.exp(float(r)) for p, r in zip(P_U, R, strict=True))
    tpm_A = float(ALPHA) * m_A / (float(ALPHA) * m_A + (1 - float(ALPHA)) * m_U)
    assert m_A < m_U - 1.0 and tpm_A < float(ALPHA) - MARGIN  # conclusion fails by a wide margin
    lib = total_probability_mass(float(ALPHA), _f(P_A), _f(P_U), _f(R), 1.0)
    assert abs(float(lib.tpm_A) - tpm_A) < 1e-14
    c = support_covariances(_f(P_A), _f(P_U), _f(R), 1.0)
    assert bool(c.stated_conditions) and not bool(c.tilt_conditions)


def test_exact_check_proves_the_violation():
    check = exact_check(ALPHA, P_A, P_U, R, 1)
    assert check.cov_r_A == Fraction(17, 30) and check.cov_r_U == Fraction(-59, 120)
    assert check.tpm_A[0] <= check.tpm_A[1] < ALPHA
    assert check.violates_stated_theorem
    # any alpha: M_A < M_U rigorously
    assert check.m_A[1] < check.m_U[0]


def test_exp_bounds_bracket_math_exp():
    rng = np.random.default_rng(0)
    for num, den in zip(rng.integers(-400, 400, 150), rng.integers(1, 20, 150), strict=True):
        x = Fraction(int(num), int(den))
        lo, hi = exp_bounds(x)
        # float(x) and math.exp each round by <= 1 ulp; e^x magnifies x's rounding by |x|
        slack = 1e-15 * (2 + abs(float(x)))
        ref = math.exp(float(x))
        assert float(lo) <= ref * (1 + slack) and float(hi) >= ref * (1 - slack), x
        assert lo <= hi and (hi - lo) / lo <= Fraction(2, 10**30)


def test_exp_bounds_reject_huge_exponent():
    with pytest.raises(ValueError, match=r"\|x\| must be <= 2000"):
        exp_bounds(Fraction(5000))


def test_exact_check_rejects_bad_input():
    with pytest.raises(ValueError, match="sum to exactly 1"):
        exact_check(ALPHA, [Fraction(1, 2), Fraction(1, 3), 0], P_U, R, 1)
    with pytest.raises(ValueError, match="sum to exactly 1"):
        exact_check(ALPHA, [Fraction(3, 2), Fraction(-1, 2), 0], P_U, R, 1)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        exact_check(1, P_A, P_U, R, 1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        exact_check(ALPHA, P_A, P_U, R, 0)
    with pytest.raises(ValueError, match="one length"):
        exact_check(ALPHA, P_A, P_U, R[:2], 1)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_search_finds_counterexamples_confirmed_by_public_functions():
    res = search_counterexamples(
        jax.random.key(1), num_instances=20_000, num_outcomes=4, zero_fraction=0.1
    )
    assert len(res.confirmed) >= 20, len(res.confirmed)
    inst = jax.tree.map(lambda x: x[res.confirmed], res.instances)
    assert inst.alpha.dtype == jnp.float64
    c = jax.jit(jax.vmap(support_covariances))(inst.p_A, inst.p_U, inst.r, inst.beta)
    m = jax.jit(jax.vmap(total_probability_mass))(*inst)
    assert np.all(np.asarray(c.stated_conditions))
    assert np.all(np.asarray(m.tpm_A < inst.alpha))
    # the proof's missing step fails in each: a tilt-weight covariance has the wrong sign
    assert not np.any(np.asarray(c.tilt_conditions))
    # and each is rounded to a rational instance that still violates the theorem exactly
    ce = rational_counterexample(res.instances, res.confirmed[:5], denominator=50, reward_grid=4)
    assert ce.check.violates_stated_theorem and ce.index in set(res.confirmed[:5].tolist())


def test_two_outcome_supports_have_no_counterexample():
    # with N = 2, sign Cov(r, p_A - p_U) = sign Cov(e^{r/beta}, p_A - p_U): the theorem holds
    inst = random_instances(jax.random.key(2), num_instances=20_000, num_outcomes=2)
    st = jax.jit(jax.vmap(theorem2_status))(*inst)
    assert not np.any(np.asarray(st.margin > 0))


def test_census_counts_match_direct_counts():
    inst = random_instances(jax.random.key(3), num_instances=20_000, num_outcomes=5)
    census = theorem2_census(inst, criterion_atol=1e-9)
    c = jax.jit(jax.vmap(support_covariances))(inst.p_A, inst.p_U, inst.r, inst.beta)
    below = np.asarray(jax.jit(jax.vmap(total_probability_mass))(*inst).tpm_A < inst.alpha)
    assert int(census.stated_conditions) == int(np.sum(c.stated_conditions))
    assert int(census.stated_failures) == int(np.sum(np.asarray(c.stated_conditions) & below))
    assert int(census.stated_failures) > 0  # the stated theorem fails on random instances too
    assert int(census.tilt_conditions) == int(np.sum(c.tilt_conditions)) > 1000
    assert int(census.tilt_failures) == 0 and int(census.criterion_disagreements) == 0


def test_rationalize_is_exact_and_keeps_zeros():
    # 0.123 -> 12/100, 0.377 -> 38/100, 0.5 -> 50/100: already sums to 1, no correction
    assert rationalize([0.0, 0.123, 0.377, 0.5], denominator=100) == [
        Fraction(0),
        Fraction(3, 25),
        Fraction(19, 50),
        Fraction(1, 2),
    ]
    rng = np.random.default_rng(4)
    for _ in range(200):
        p = rng.dirichlet(np.ones(5)) * (rng.random(5) > 0.3)
        p = p / p.sum() if p.sum() > 0 else np.full(5, 0.2)
        q = rationalize(p, denominator=1000)
        assert sum(q) == 1 and min(q) >= 0 and all(q[i] == 0 for i in np.flatnonzero(p == 0))
        assert max(abs(float(a) - b) for a, b in zip(q, p, strict=True)) <= 5 * 0.0005 + 1e-12


def test_rational_counterexample_rejects_hopeless_rounding():
    inst = MixtureInstances(
        jnp.array([0.5]),
        jnp.array([[0.5, 0.5]]),
        jnp.array([[0.5, 0.5]]),
        jnp.zeros((1, 2)),
        jnp.array([1.0]),
    )
    with pytest.raises(ValueError, match="no candidate violates Theorem 2"):
        rational_counterexample(inst, [0], denominator=10, reward_grid=1)


def test_random_instances_reject_bad_arguments():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_outcomes must be >= 2"):
        random_instances(key, num_instances=3, num_outcomes=1)
    with pytest.raises(ValueError, match=r"zero_fraction must be in \[0, 1\)"):
        random_instances(key, num_instances=3, num_outcomes=3, zero_fraction=1.0)
    with pytest.raises(ValueError, match="reward_scale must be > 0"):
        random_instances(key, num_instances=3, num_outcomes=3, reward_scale=0.0)
