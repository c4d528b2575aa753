"""sims.protocols.kl_mixture against hand-derived values and the theory it runs, in float64.

References: limits derived by hand (beta -> infinity keeps the reference, gamma = -1 samples the
reference, temperature 1 is the tilt itself), per-instance evaluation of the theory functions for
the vmapped sweeps, exact fractions for the printed counterexample, and the corrected Theorem 2
and residual bound themselves (no failures expected).
"""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sims.protocols.kl_mixture import (
    StatedTheoremCheck,
    amplification,
    beta_sweep,
    corrected_theorem_check,
    exact_record,
    float_instance,
    stated_theorem_check,
    theorem2_checks,
    tilt_flow,
)
from theory.kl_counterexample import MixtureInstances, SearchResult
from theory.kl_exact import rational_counterexample
from theory.kl_optimum import residual_mass_bound, total_probability_mass
from theory.kl_optimum import tilt as optimum_tilt

#: vmapped vs per-instance float64 evaluation of the same closed form: ulps.
RTOL_VMAP = 1e-12
ALPHA = 0.3
P_A = jnp.array([0.5, 0.5, 0.0, 0.0])
P_U = jnp.array([0.0, 0.2, 0.3, 0.5])
R = jnp.array([1.0, -0.5, 2.0, 0.3])


def test_beta_sweep_equals_per_beta_evaluation_and_keeps_the_reference_at_large_beta():
    betas = jnp.array([0.1, 1.0, 10.0, 1e6])
    s = beta_sweep(ALPHA, P_A, P_U, R, betas)
    for i, b in enumerate(betas):
        tpm = total_probability_mass(ALPHA, P_A, P_U, R, b).tpm_A
        np.testing.assert_allclose(s.tpm_A[i], tpm, rtol=RTOL_VMAP)
        np.testing.assert_allclose(
            s.upper_bound[i], 1 - residual_mass_bound(ALPHA, P_A, P_U, R, b), rtol=RTOL_VMAP
        )
    # beta -> infinity: the tilt is the reference, whose aligned mass is alpha (to O(1/beta))
    np.testing.assert_allclose(s.tpm_A[-1], ALPHA, atol=1e-5)
    assert s.alpha == ALPHA and np.all(np.asarray(s.tpm_A) <= np.asarray(s.upper_bound) + 1e-12)


def test_amplification_limits():
    a = amplification(
        ALPHA, P_A, P_U, R, 0.5, temperatures=jnp.array([1.0, 4.0]), gammas=jnp.array([-1.0, 0.0])
    )
    # gamma = -1: softmax(0 * l_theta + l_ref) = p_ref, unaligned mass 1 - alpha
    np.testing.assert_allclose(a.tpm_U_gamma[0], 1 - ALPHA, rtol=1e-12)
    # temperature 1 and gamma 0 both sample the tuned model: the tilt's TPM(U)
    want = total_probability_mass(ALPHA, P_A, P_U, R, 0.5).tpm_U
    np.testing.assert_allclose([a.tpm_U_temperature[0], a.tpm_U_gamma[1]], [want, want], rtol=1e-12)
    assert a.tpm_U_reference == pytest.approx(1 - ALPHA)
    with pytest.raises(ValueError, match="r must have shape"):
        amplification(ALPHA, P_A, P_U, R[:3], 0.5, temperatures=jnp.ones(1), gammas=jnp.ones(1))


def test_tilt_flow_approaches_the_tilt():
    flow = tilt_flow(ALPHA, P_A, P_U, R, beta=1.0, dt=0.5, num_steps=200, record_every=50)
    np.testing.assert_allclose(flow.t, [0.0, 25.0, 50.0, 75.0, 100.0])
    kl = np.asarray(flow.kl)
    # gradient flow on a strictly concave objective: beta KL(p || p*) is the objective gap,
    # which the flow decreases
    assert np.all(np.diff(kl) < 0) and kl[-1] < 1e-4 * kl[0]
    # t = 0 is the uniform policy on the support: its total variation to the tilt, by hand
    p_ref = ALPHA * P_A + (1 - ALPHA) * P_U
    p_star = np.asarray(optimum_tilt(p_ref, R, 1.0))
    np.testing.assert_allclose(flow.total_variation[0], 0.5 * np.abs(0.25 - p_star).sum())


def _rational_instance():
    inst = MixtureInstances(
        jnp.array([0.85]),
        jnp.array([[0.0, 0.1, 0.9]]),
        jnp.array([[0.55, 0.3, 0.15]]),
        jnp.array([[-4.0, 4.5, 2.5]]),
        jnp.array([1.0]),
    )
    return inst, rational_counterexample(inst, [0], denominator=20, reward_grid=2)


def test_exact_record_and_float_instance_round_trip_the_fractions():
    inst, ce = _rational_instance()
    search = SearchResult(inst, 1, np.array([0]), np.array([0.25]))
    rec = exact_record(StatedTheoremCheck(search, ce))
    c = rec["counterexample"]
    assert [Fraction(v) for v in c["p_A"]] == ce.p_A and Fraction(c["alpha"]) == Fraction(17, 20)
    assert Fraction(c["r"][1]) == Fraction(9, 2) and c["beta"] == "1"
    assert c["violates_stated_theorem"] is True and c["tpm_A_upper_minus_alpha"] < 0
    assert c["tpm_A"][0] <= c["tpm_A"][1] < 0.85
    assert rec["search"] == {
        "instances": 1,
        "float32_hits": 1,
        "float64_confirmed": 1,
        "best_float64_margin": 0.25,
    }
    alpha, p_A, p_U, r = float_instance(ce)
    assert alpha == 0.85 and p_A.tolist() == [0.0, 0.1, 0.9] and r.tolist() == [-4.0, 4.5, 2.5]


def test_corrected_theorem_check_finds_no_failure_and_reports_python_numbers():
    chk = corrected_theorem_check(
        jax.random.key(3), num_instances=3000, num_outcomes=4, zero_fraction=0.2
    )
    assert chk.census.instances == 3000 and isinstance(chk.census.tilt_failures, int)
    assert chk.census.tilt_failures == 0 and chk.census.tilt_conditions > 0
    res = chk.residual
    assert res.violations == 0 and res.min_ratio >= 1 - 1e-12 and res.tpm_U.shape == (3000,)
    head = res.head(10)
    assert head.tpm_U.shape == (10,) and (head.violations, head.min_ratio) == (0, res.min_ratio)


def test_stated_theorem_check_finds_an_exact_counterexample():
    chk = stated_theorem_check(
        jax.random.key(0),
        num_instances=20_000,
        num_outcomes=5,
        zero_fraction=0.2,
        denominator=20,
        reward_grid=2,
    )
    assert chk.counterexample.check.violates_stated_theorem
    assert np.all(chk.search.margin[chk.search.confirmed] > 0)
    with pytest.raises(ValueError, match="no float64-confirmed counterexample"):
        stated_theorem_check(
            jax.random.key(0),
            num_instances=2,
            num_outcomes=2,
            zero_fraction=0.0,
            denominator=20,
            reward_grid=2,
        )


def test_theorem2_checks_logs_both_parts():
    lines = []
    stated, corrected = theorem2_checks(
        jax.random.key(0),
        search_instances=20_000,
        corrected_instances=500,
        num_outcomes=5,
        zero_fraction=0.2,
        denominator=20,
        reward_grid=2,
        log=lines.append,
    )
    assert len(lines) == 2 and lines[0].startswith("search:") and "fail" in lines[1]
    assert corrected.census.instances == 500 and stated.counterexample.check.violates_stated_theorem
