"""Tests of sims.models.tabular: gradient flow on E[r] - beta KL reaches theory.kl_optimum.tilt."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sims.models.tabular import TabularPolicy, kl_objective_flow
from theory.kl_counterexample import random_instances
from theory.kl_optimum import objective, tilt

#: Distance to the tilt after the flow has run long past its slowest rate (1/(beta * min p*)).
LIMIT_TOL = 1e-9
#: L(p*) - L(p) vs beta KL(p || p*): two float64 evaluations of O(1) sums.
IDENTITY_ATOL = 1e-12


def _instance(seed, V=5, zero_fraction=0.0):
    inst = random_instances(
        jax.random.key(seed),
        num_instances=6,
        num_outcomes=V,
        zero_fraction=zero_fraction,
        reward_scale=1.0,
    )
    return inst


@pytest.mark.parametrize("zero_fraction", [0.0, 0.3])
def test_flow_limit_matches_tilt(zero_fraction):
    inst = _instance(1, zero_fraction=zero_fraction)
    for i in range(3):
        p_ref = inst.alpha[i] * inst.p_A[i] + (1 - inst.alpha[i]) * inst.p_U[i]
        r, beta = inst.r[i], float(inst.beta[i])
        target = np.asarray(tilt(p_ref, r, beta))
        # slowest linear rate ~ beta * min p* on the support: run to t = 60 / rate
        rate = beta * target[target > 0].min()
        dt = 0.5 / beta
        steps = int(np.ceil(60 / rate / dt / 100)) * 100
        traj = kl_objective_flow(
            TabularPolicy(logits=jnp.zeros(5)),
            p_ref,
            r,
            beta=beta,
            dt=dt,
            num_steps=steps,
            record_every=steps // 100,
        ).run()
        final = np.exp(np.asarray(traj.final(p_ref > 0)))
        # the limit compared with the closed form computed independently in NumPy
        w = np.asarray(p_ref) * np.exp(np.asarray(r) / beta)
        np.testing.assert_allclose(final, w / w.sum(), atol=LIMIT_TOL, err_msg=f"instance {i}")
        assert float(traj.observables.total_variation[-1]) < LIMIT_TOL
        assert np.all(final[np.asarray(p_ref) == 0] == 0)
        # objective gap identity L(p*) - L(p) = beta KL(p || p*) along the whole trajectory
        obs = traj.observables
        np.testing.assert_allclose(obs.objective_gap, beta * np.asarray(obs.kl), atol=IDENTITY_ATOL)
        # gradient flow ascends the objective: -L is non-increasing at the recorded times
        assert np.all(np.diff(np.asarray(traj.loss)) <= 1e-12)


def test_flow_t0_records_the_starting_policy():
    p_ref, r = jnp.array([0.25, 0.25, 0.5]), jnp.array([0.0, 1.0, -1.0])
    traj = kl_objective_flow(
        TabularPolicy(logits=jnp.zeros(3)), p_ref, r, beta=1.0, dt=0.1, num_steps=10
    ).run()
    # uniform start: TV to the tilt computed by hand from the definition
    target = np.array([0.25, 0.25 * np.e, 0.5 / np.e])
    target /= target.sum()
    expected = 0.5 * np.abs(np.full(3, 1 / 3) - target).sum()
    np.testing.assert_allclose(traj.observables.total_variation[0], expected, rtol=1e-12)
    uniform = jnp.full(3, 1 / 3)
    np.testing.assert_allclose(traj.loss[0], -objective(uniform, p_ref, r, 1.0), rtol=1e-12)
    assert float(traj.t[0]) == 0.0


def test_flow_rejects_bad_input():
    p_ref, r = jnp.array([0.5, 0.5]), jnp.array([1.0, 0.0])
    with pytest.raises(ValueError, match="policy logits must have shape"):
        kl_objective_flow(
            TabularPolicy(logits=jnp.zeros(3)), p_ref, r, beta=1.0, dt=0.1, num_steps=1
        ).run()
    with pytest.raises(ValueError, match="beta must be > 0"):
        kl_objective_flow(
            TabularPolicy(logits=jnp.zeros(2)), p_ref, r, beta=0.0, dt=0.1, num_steps=1
        ).run()
    with pytest.raises(ValueError, match="p_ref must sum to 1"):
        kl_objective_flow(
            TabularPolicy(logits=jnp.zeros(2)),
            jnp.array([0.5, 0.2]),
            r,
            beta=1.0,
            dt=0.1,
            num_steps=1,
        ).run()
    with pytest.raises(ValueError, match="logits must be finite"):
        TabularPolicy(logits=jnp.array([0.0, jnp.inf]))
