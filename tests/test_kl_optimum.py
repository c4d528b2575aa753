"""Tests of theory.kl_optimum: the tilt, Lemma 1, TPM, the exact criterion, covariances, the bound.

Independent computations: NumPy float64 brute force of the defining sums (no logsumexp), jax.grad
of the objective, and the Lemma 1 weights summed by hand.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import worst_index
from theory.kl_counterexample import random_instances
from theory.kl_optimum import (
    log_residual_mass_bound,
    mixture_weights,
    objective,
    residual_mass_bound,
    support_covariances,
    tilt,
    tilt_moments,
    total_probability_mass,
)

#: Closed form (log space) vs direct float64 sums of a few O(1..e^10) terms: rounding only.
RTOL = 1e-12
#: Absolute floor for entries that are (near) zero in both computations.
ATOL = 1e-14
#: float32 vs float64 (style table).
RTOL_F32 = 1e-4
#: float32 absolute floor for probabilities near 0 (float32 eps 1.2e-7 times O(1) log-weights).
ATOL_F32 = 1e-7
#: |TPM(A) - alpha| above this is a decided sign (float64 rounding of sigmoid/logsumexp ~1e-16).
SIGN_ATOL = 1e-12
#: Number of random instances per property.
NUM = 2000


def _jv(fn):
    """jit(vmap(fn)): one compiled batch (validation of values runs only on concrete calls)."""
    return jax.jit(jax.vmap(fn))


@functools.cache
def _batch(V=6, zero_fraction=0.25, reward_scale=3.0, num=20_000):
    """One compiled draw per setting, shared by the tests (each draw compiles once)."""
    return random_instances(
        jax.random.key(20241011),
        num_instances=num,
        num_outcomes=V,
        zero_fraction=zero_fraction,
        reward_scale=reward_scale,
    )


def _instances(seed, num=NUM, **kw):
    """Rows ``[seed * num, (seed + 1) * num)`` of the shared batch: disjoint per test."""
    start = (seed * num) % 20_000
    return jax.tree.map(lambda x: x[start : start + num], _batch(**kw))


def _brute(inst):
    """NumPy float64 direct sums: p_ref, tilt, M_A, M_U, TPM(A) (moderate r / beta only)."""
    a, pa, pu, r, b = (np.asarray(x, np.float64) for x in inst)
    p_ref = a[:, None] * pa + (1 - a[:, None]) * pu
    w = np.exp(r / b[:, None])
    z = np.sum(p_ref * w, axis=1)
    m_A, m_U = np.sum(pa * w, axis=1), np.sum(pu * w, axis=1)
    return p_ref, p_ref * w / z[:, None], m_A, m_U, a * m_A / z


def test_tilt_matches_direct_formula_and_sums_to_one():
    inst = _instances(1)
    p_ref, expected, *_ = _brute(inst)
    got = np.asarray(_jv(tilt)(jnp.asarray(p_ref), inst.r, inst.beta))
    err = np.max(np.abs(got - expected) / (np.abs(expected) + ATOL), axis=1)
    np.testing.assert_allclose(
        got, expected, rtol=RTOL, atol=ATOL, err_msg=f"worst {worst_index(err)}"
    )
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=RTOL)
    assert np.all(got[p_ref == 0] == 0) and np.all(got[p_ref > 0] > 0)  # supp p_theta = supp p_ref


def test_tilt_is_the_maximiser_of_the_objective():
    inst = _instances(2, num=500, zero_fraction=0.0)
    p_ref = inst.alpha[:, None] * inst.p_A + (1 - inst.alpha[:, None]) * inst.p_U
    opt = _jv(tilt)(p_ref, inst.r, inst.beta)
    # L(p*) = beta ln Z (sources' proof of Lemma 1), Z by direct sum
    z = np.sum(np.asarray(p_ref) * np.exp(np.asarray(inst.r / inst.beta[:, None])), axis=1)
    value = np.asarray(_jv(objective)(opt, p_ref, inst.r, inst.beta))
    np.testing.assert_allclose(value, np.asarray(inst.beta) * np.log(z), rtol=1e-10, atol=1e-12)

    # stationary in logits: grad of L(softmax(l)) vanishes at l = log p*
    def grad_norm(p, q, r, b):
        g = jax.grad(lambda l: objective(jax.nn.softmax(l), q, r, b))(jnp.log(p))
        return jnp.max(jnp.abs(g)) / (jnp.max(jnp.abs(r)) + b)

    np.testing.assert_array_less(_jv(grad_norm)(opt, p_ref, inst.r, inst.beta), 1e-12)
    # any other distribution does worse
    other = jnp.asarray(np.random.default_rng(3).dirichlet(np.ones(6), 500))
    assert np.all(np.asarray(_jv(objective)(other, p_ref, inst.r, inst.beta)) <= value)


def test_tilt_stable_for_large_rewards():
    p_ref = jnp.array([0.2, 0.0, 0.3, 0.5])
    r = jnp.array([3000.0, 1e6, 2990.0, -4000.0])  # r / beta up to 1e7; output 1 off-support
    got = tilt(p_ref, r, 1.0)
    # by shift invariance, tilt(r) = tilt(r - 2990): weights 0.2 e^10, 0, 0.3, 0.5 e^-6990 (= 0)
    w = np.array([0.2 * np.exp(10.0), 0.0, 0.3, 0.0])
    np.testing.assert_allclose(np.asarray(got), w / w.sum(), rtol=RTOL, atol=0)
    assert np.all(np.isfinite(np.asarray(got)))
    m = total_probability_mass(
        0.5, jnp.array([0.4, 0.0, 0.6, 0.0]), jnp.array([0.0, 0.0, 0.0, 1.0]), r, 1e-3
    )
    assert float(m.tpm_A) == 1.0 and float(m.tpm_U) == 0.0  # e^{-7e6}: underflows, no NaN


def test_mixture_weights_lemma1_identity():
    inst = _instances(4)
    w = _jv(mixture_weights)(*inst)
    p_ref, expected, *_ = _brute(inst)
    got = np.asarray(w.alpha_A * inst.p_A + w.alpha_U * inst.p_U)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    on = p_ref > 0
    ratio = np.asarray(w.alpha_A)[on] / np.asarray(w.alpha_U)[on]
    a = np.broadcast_to(np.asarray(inst.alpha)[:, None], on.shape)[on]
    np.testing.assert_allclose(ratio, a / (1 - a), rtol=RTOL)
    assert np.all(np.asarray(w.alpha_A)[~on] == 0)  # Reading: 0 off the support


def test_total_probability_mass_matches_lemma1_sums():
    inst = _instances(5)
    m = _jv(total_probability_mass)(*inst)
    w = _jv(mixture_weights)(*inst)
    *_, tpm_brute = _brute(inst)
    np.testing.assert_allclose(m.tpm_A, np.sum(w.alpha_A * inst.p_A, axis=1), rtol=RTOL)
    np.testing.assert_allclose(m.tpm_U, np.sum(w.alpha_U * inst.p_U, axis=1), rtol=1e-10)
    np.testing.assert_allclose(m.tpm_A, tpm_brute, rtol=RTOL)
    np.testing.assert_allclose(m.tpm_A + m.tpm_U, 1.0, rtol=RTOL)


def test_tilt_moments_criterion_agrees_with_tpm():
    inst = _instances(0, num=20_000)
    m = _jv(total_probability_mass)(*inst)
    crit = _jv(tilt_moments)(inst.p_A, inst.p_U, inst.r, inst.beta)
    gap = np.asarray(m.tpm_A - inst.alpha)
    decided = np.abs(gap) > SIGN_ATOL
    assert (
        decided.sum() > 19_000
        and (gap[decided] > 0).sum() > 1000
        and (gap[decided] < 0).sum() > 1000
    )
    np.testing.assert_array_equal(np.asarray(crit.aligned_mass_rises)[decided], gap[decided] > 0)
    # covariance form: M_A - M_U = N Cov_unif(p_A - p_U, e^{r/beta}), by direct sums
    _, _, m_A, m_U, _ = _brute(inst)
    np.testing.assert_allclose(np.exp(np.asarray(crit.log_M_A)), m_A, rtol=RTOL)
    on = np.asarray((inst.p_A > 0) | (inst.p_U > 0))
    d = np.asarray(inst.p_A - inst.p_U)
    w = np.where(on, np.exp(np.asarray(inst.r / inst.beta[:, None])), 0.0)
    n = on.sum(1)
    cov = np.sum(d * w, axis=1) / n - np.sum(d, axis=1) * np.sum(w, axis=1) / n**2
    # atol per instance: 1e-12 * S with S = sum of |terms| (style rule)
    err = np.abs((m_A - m_U) - n * cov) / (1e-9 * np.abs(m_A - m_U) + 1e-12 * np.sum(w, axis=1))
    assert np.all(err <= 1), f"worst instance {worst_index(err)}"


def test_support_covariances_match_numpy():
    inst = _instances(7)
    c = _jv(support_covariances)(inst.p_A, inst.p_U, inst.r, inst.beta)
    for i in range(0, NUM, 7):
        on = np.asarray((inst.p_A[i] > 0) | (inst.p_U[i] > 0))
        r = np.asarray(inst.r[i])[on]
        w = np.exp((r - r.max()) / float(inst.beta[i]))
        for f, name_A, name_U in ((r, "cov_r_A", "cov_r_U"), (w, "cov_w_A", "cov_w_U")):
            for p, name in ((inst.p_A, name_A), (inst.p_U, name_U)):
                expected = np.cov(f, np.asarray(p[i])[on], bias=True)[0, 1] if on.sum() > 1 else 0.0
                got = float(getattr(c, name)[i])
                scale = np.abs(f).max() / on.sum()
                assert abs(got - expected) <= 1e-12 * scale, f"{name} instance {i}"
        assert int(c.num_support[i]) == on.sum()


def test_corrected_theorem_never_fails():
    """Tilt-weight covariance conditions => TPM(A) > alpha: >= 10^5 instances meeting them."""
    inst = random_instances(
        jax.random.key(8), num_instances=420_000, num_outcomes=5, zero_fraction=0.2
    )
    c = (_jv(support_covariances))(inst.p_A, inst.p_U, inst.r, inst.beta)
    m = (_jv(total_probability_mass))(*inst)
    hyp = np.asarray(c.tilt_conditions)
    assert hyp.sum() >= 100_000, hyp.sum()
    gap = np.asarray(m.tpm_A - inst.alpha)[hyp]
    assert np.all(gap > 0), (
        f"{np.sum(gap <= 0)} failures, worst {np.flatnonzero(hyp)[np.argmin(gap)]}"
    )


def test_residual_mass_bound_holds():
    inst = _instances(0, num=20_000, reward_scale=10.0)
    bound = np.asarray(_jv(residual_mass_bound)(*inst))
    tpm_U = np.asarray(_jv(total_probability_mass)(*inst).tpm_U)
    # TPM(U) by logsumexp vs the bound by one exp: equality cases differ by rounding only
    np.testing.assert_array_less(bound * (1 - 1e-12), tpm_U)
    on = np.asarray((inst.p_A > 0) | (inst.p_U > 0))
    r = np.asarray(inst.r)
    loose = (1 - np.asarray(inst.alpha)) * np.exp(
        (np.where(on, r, np.inf).min(1) - np.where(on, r, -np.inf).max(1)) / np.asarray(inst.beta)
    )
    np.testing.assert_array_less(loose * (1 - 1e-12), bound)  # the sources' form is looser
    assert np.all(bound > 0) and np.all(bound <= 1 - np.asarray(inst.alpha))


def test_float32_matches_float64():
    inst = _instances(3, num=500)
    m64 = _jv(total_probability_mass)(*inst)
    m32 = _jv(total_probability_mass)(*(x.astype(jnp.float32) for x in inst))
    assert m32.tpm_A.dtype == jnp.float32
    np.testing.assert_allclose(m32.tpm_A, m64.tpm_A, rtol=RTOL_F32)
    np.testing.assert_allclose((_jv(total_probability_mass))(*inst).tpm_A, m64.tpm_A, rtol=RTOL)


P = jnp.array([0.5, 0.5])
Q = jnp.array([0.2, 0.8])
R = jnp.array([1.0, 0.0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(p_A=jnp.array([1.2, -0.2])), "p_A must be >= 0"),
        (dict(p_U=jnp.array([0.5, 0.6])), "p_U must sum to 1 within"),
        (dict(beta=0.0), "beta must be > 0"),
        (dict(beta=-1.0), "beta must be > 0"),
        (dict(alpha=0.0), r"alpha must be in \(0, 1\)"),
        (dict(alpha=1.0), r"alpha must be in \(0, 1\)"),
        (dict(alpha=float("nan")), r"alpha must be in \(0, 1\)"),
        (dict(r=jnp.array([1.0, jnp.nan])), "r must be finite"),
        (dict(r=jnp.array([jnp.inf, 0.0])), "r must be finite"),
        (dict(r=jnp.array([1.0, 0.0, 2.0])), r"r must have shape \[V\]"),
        (dict(p_U=jnp.array([0.2, 0.3, 0.5])), "p_A and p_U must have one shape"),
    ],
)
def test_mixture_functions_reject_bad_input(kwargs, match):
    args = dict(alpha=0.3, p_A=P, p_U=Q, r=R, beta=0.5) | kwargs
    for fn in (mixture_weights, total_probability_mass, residual_mass_bound):
        with pytest.raises(ValueError, match=match):
            fn(**args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(p_ref=jnp.array([1.5, -0.5])), "p_ref must be >= 0"),
        (dict(p_ref=jnp.array([0.5, 0.4])), "p_ref must sum to 1 within"),
        (dict(p_ref=jnp.ones((2, 2)) / 4), r"p_ref must have shape \[V\]"),
        (dict(beta=0.0), "beta must be > 0"),
        (dict(r=jnp.array([jnp.nan, 0.0])), "r must be finite"),
    ],
)
def test_tilt_rejects_bad_input(kwargs, match):
    args = dict(p_ref=P, r=R, beta=1.0) | kwargs
    with pytest.raises(ValueError, match=match):
        tilt(**args)
    with pytest.raises(ValueError, match=match):
        objective(P, **args)


def test_covariance_functions_reject_bad_input():
    with pytest.raises(ValueError, match="beta must be > 0"):
        support_covariances(P, Q, R, -0.1)
    with pytest.raises(ValueError, match="p_A must sum to 1"):
        tilt_moments(jnp.array([0.5, 0.49]), Q, R, 1.0)
    with pytest.raises(ValueError, match="p and p_ref must have one shape"):
        objective(jnp.array([1.0, 0.0, 0.0]), P, R, 1.0)


def test_objective_is_minus_infinity_off_the_support():
    # p puts mass 0.1 where p_ref = 0: KL(p || p_ref) = +inf (definition of KL)
    p_ref, r = jnp.array([0.5, 0.5, 0.0]), jnp.array([0.0, 1.0, 5.0])
    assert float(objective(jnp.array([0.45, 0.45, 0.1]), p_ref, r, 1.0)) == -np.inf
    # p = p_ref: KL = 0 and E[r] = 1/2; zeros of p contribute 0 (0 log 0 = 0)
    assert float(objective(p_ref, p_ref, r, 1.0)) == 0.5


def test_tilt_float32_matches_float64():
    inst = _instances(6, num=500)
    p_ref = inst.alpha[:, None] * inst.p_A + (1 - inst.alpha[:, None]) * inst.p_U
    t64 = _jv(tilt)(p_ref, inst.r, inst.beta)
    t32 = _jv(tilt)(*(x.astype(jnp.float32) for x in (p_ref, inst.r, inst.beta)))
    assert t32.dtype == jnp.float32
    np.testing.assert_allclose(t32, t64, rtol=RTOL_F32, atol=ATOL_F32)


# Traced invalid values (the rule of theory): NaN, never a renormalised or plausible result.
# float64 eager vs jit of the same closed form: rounding only.
RTOL_JIT_VS_EAGER = 1e-12
P_REF = jnp.array([0.2, 0.3, 0.5, 0.0])
REWARD = jnp.array([1.0, -0.5, 2.0, 7.0])

_JIT_TILT = jax.jit(tilt)


@pytest.mark.parametrize(
    "p_ref,r,beta",
    [
        (jnp.array([0.3, 0.3, 0.5, 0.0]), REWARD, 1.0),  # sums to 1.1: was renormalised
        (jnp.array([0.6, -0.1, 0.5, 0.0]), REWARD, 1.0),  # negative entry
        (jnp.array([0.2, 0.3, jnp.nan, 0.5]), REWARD, 1.0),
        (P_REF, REWARD, -1.0),  # beta < 0: was a wrong (reversed) distribution
        (P_REF, REWARD, 0.0),
        (P_REF, REWARD.at[1].set(-jnp.inf), 1.0),  # was a plausible zero
    ],
    ids=["sum", "negative", "nan", "beta<0", "beta=0", "r=-inf"],
)
def test_tilt_traced_invalid_input_gives_all_nan(p_ref, r, beta):
    """Probe: jit(tilt) renormalised a bad p and returned a wrong distribution for beta < 0."""
    assert np.all(np.isnan(np.asarray(_JIT_TILT(p_ref, r, beta))))
    assert np.isnan(float(jax.jit(objective)(P_REF, p_ref, r, beta)))
    grad = jax.jit(jax.grad(lambda p, q, b: tilt(p, q, b)[0], argnums=(0, 1, 2)))(p_ref, r, beta)
    assert all(np.all(np.isnan(np.asarray(g))) for g in grad)


def test_tilt_valid_traced_equals_eager_with_finite_gradients():
    inst = _instances(7, num=64)
    p_refs = inst.alpha[:, None] * inst.p_A + (1 - inst.alpha[:, None]) * inst.p_U
    grad = jax.jit(jax.grad(lambda p, r, b: tilt(p, r, b)[0], argnums=(0, 1, 2)))
    for i in range(8):
        args = (p_refs[i], inst.r[i], inst.beta[i])
        np.testing.assert_allclose(
            _JIT_TILT(*args), tilt(*args), rtol=RTOL_JIT_VS_EAGER, atol=ATOL, err_msg=f"{i}"
        )
        assert all(np.all(np.isfinite(np.asarray(g))) for g in grad(*args)), i


@pytest.mark.parametrize(
    "override",
    [
        dict(alpha=1.0),
        dict(alpha=-0.2),
        dict(p_A=jnp.array([0.5, 0.6])),
        dict(p_U=jnp.array([1.2, -0.2])),
        dict(r=jnp.array([jnp.inf, 0.0])),
        dict(beta=-0.5),
    ],
    ids=["alpha=1", "alpha<0", "p_A sum", "p_U negative", "r inf", "beta<0"],
)
def test_mixture_functions_traced_invalid_input_give_nan(override):
    args = dict(alpha=0.3, p_A=P, p_U=Q, r=R, beta=0.5) | override
    order = ("alpha", "p_A", "p_U", "r", "beta")
    values = [jnp.asarray(args[k]) for k in order]
    for fn in (mixture_weights, total_probability_mass, residual_mass_bound):
        out = jax.jit(fn)(*values)
        assert all(np.all(np.isnan(np.asarray(x))) for x in jax.tree.leaves(out)), fn.__name__
    if "alpha" not in override:  # tilt_moments and support_covariances take no alpha
        moments = jax.jit(tilt_moments)(*values[1:])
        assert np.isnan(float(moments.log_M_A)) and not bool(moments.aligned_mass_rises)
        cov = jax.jit(support_covariances)(*values[1:])
        assert np.isnan(float(cov.cov_w_A)) and not bool(cov.stated_conditions)
        assert not bool(cov.tilt_conditions)
    # the same values are valid when the rule holds (no false positives)
    good = [jnp.asarray(x) for x in (0.3, P, Q, R, 0.5)]
    assert np.isfinite(float(jax.jit(total_probability_mass)(*good).tpm_A))


def test_tilt_accepts_python_lists():
    """Probe: tilt with Python lists failed inside jax._src.dtypes after validation passed."""
    p_ref, r = [0.25, 0.75, 0.0], [0.0, 1.0, 3.0]
    np.testing.assert_array_equal(tilt(p_ref, r, 0.5), tilt(jnp.array(p_ref), jnp.array(r), 0.5))
    np.testing.assert_array_equal(
        total_probability_mass(0.5, [1.0, 0.0, 0.0], [0.0, 0.5, 0.5], r, 1.0),
        total_probability_mass(0.5, jnp.array([1.0, 0, 0]), jnp.array([0, 0.5, 0.5]), r, 1.0),
    )


def test_residual_mass_bound_underflows_and_log_bound_does_not():
    """B = (1 - alpha) e^{(r_min^U - r_max) / beta} > 0 exactly, but 0.0 once the exponent is below
    about -745 (float64); ln B = ln(1 - alpha) - (r_max - r_min^U) / beta stays finite."""
    args = (0.5, jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]), jnp.array([800.0, 0.0]), 1.0)
    assert float(residual_mass_bound(*args)) == 0.0  # underflow: the documented [0, 1 - alpha]
    # hand value: ln 0.5 - 800 / 1
    np.testing.assert_allclose(float(log_residual_mass_bound(*args)), np.log(0.5) - 800.0, rtol=0)


def test_log_residual_mass_bound_matches_bound_and_lies_below_log_tpm():
    inst = _instances(9, num=20_000, reward_scale=10.0)
    log_bound = np.asarray(_jv(log_residual_mass_bound)(*inst))
    bound = np.asarray(_jv(residual_mass_bound)(*inst))
    np.testing.assert_allclose(np.exp(log_bound), bound, rtol=RTOL)
    # ln TPM(U) in NumPy float64 log space, independently: ln((1-a) M_U) - ln(a M_A + (1-a) M_U)
    a, pa, pu, r, b = (np.asarray(x, np.float64) for x in inst)
    with np.errstate(divide="ignore"):
        log_m = [np.logaddexp.reduce(np.log(p) + r / b[:, None], axis=1) for p in (pa, pu)]
    log_tpm_U = (
        np.log1p(-a) + log_m[1] - np.logaddexp(np.log(a) + log_m[0], np.log1p(-a) + log_m[1])
    )
    np.testing.assert_array_less(log_bound - 1e-12 * np.abs(log_bound), log_tpm_U)
    # ln B <= ln(1 - alpha), equality where r_min^U = r_max (JAX vs NumPy log1p: rounding only)
    np.testing.assert_array_less(log_bound, np.log1p(-a) + 1e-12 * np.abs(np.log1p(-a)))
