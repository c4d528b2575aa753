"""Tests of sims.models.logit_model: prefix rows, per-position logits, the DPO/DPOP flows."""

import logging
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sims.flows.core import integrate
from sims.models.logit_model import PositionLogits, edit_pair_flow, edit_pair_prefixes
from sims.models.unconstrained import UnconstrainedFeatures
from tests.conftest import worst_index
from theory.dpop import position_logit_gradients
from theory.losses import dpo_loss, dpop_loss

RTOL = 1e-9  # closed form vs autodiff, float64 rounding only
ATOL_PER_TERM = 1e-12  # times S, the sum of absolute values of the terms
CHOSEN = np.array([1, 2, 3, 4, 5])
REJECTED = np.array([1, 2, 0, 4, 5])  # edit at m = 2
V, N = 6, 200  # vocabulary, random instances


def test_edit_pair_prefixes_shares_rows_up_to_the_edit():
    pre = edit_pair_prefixes(CHOSEN, REJECTED)
    L, m = len(CHOSEN), 2
    assert pre.edit == m
    assert len(pre.position) == 2 * L - m - 1  # m + 1 shared rows, then pairs
    np.testing.assert_array_equal(pre.chosen[: m + 1], pre.rejected[: m + 1])
    assert set(pre.chosen[m + 1 :]).isdisjoint(pre.rejected[m + 1 :])
    np.testing.assert_array_equal(pre.position[pre.chosen], np.arange(L))
    np.testing.assert_array_equal(pre.position[pre.rejected], np.arange(L))


@pytest.mark.parametrize(
    ("rejected", "match"),
    [
        (CHOSEN, "exactly one position"),
        (np.array([0, 2, 0, 4, 5]), "exactly one position"),
        (np.array([1, 2, 0, 4]), "same length"),
    ],
)
def test_edit_pair_prefixes_rejects_bad_pairs(rejected, match):
    with pytest.raises(ValueError, match=match):
        edit_pair_prefixes(CHOSEN, rejected)


def test_position_logits_rejects_bad_input():
    with pytest.raises(ValueError, match="trainable must be"):
        PositionLogits(jnp.zeros((2, 3)), jnp.array([0, 1]), 2, trainable="all")
    with pytest.raises(ValueError, match="prefix_position must be"):
        PositionLogits(jnp.zeros((2, 3)), jnp.array([0, 2]), 2)


def _random_context(seed):
    pre = edit_pair_prefixes(CHOSEN, REJECTED)
    rng = np.random.default_rng(seed)
    ctx = rng.standard_normal((N, len(pre.position), V)) * rng.uniform(0.3, 3.0, (N, 1, 1))
    ref = rng.standard_normal((N, 2)) * 2.0 - 6.0
    return pre, jnp.asarray(ctx), jnp.asarray(ref)


def _lp(model, pre):
    pos = jnp.arange(len(CHOSEN))
    lp_c = jnp.sum(model(jnp.asarray(pre.chosen))[pos, CHOSEN])
    lp_r = jnp.sum(model(jnp.asarray(pre.rejected))[pos, REJECTED])
    return lp_c, lp_r


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
@pytest.mark.parametrize("inside", [True, False])
def test_position_logits_gradient_matches_theory(inside):
    pre, ctx, ref = _random_context(1)
    lam, beta = 2.0, 0.3
    loss = partial(dpop_loss, beta=beta, lam=lam, penalty_inside_beta=inside)

    def one(c, r):
        graphdef, params, rest = nnx.split(PositionLogits(c, pre.position, 5), nnx.Param, ...)
        g = jax.grad(lambda p: loss(*_lp(nnx.merge(graphdef, p, rest), pre), r[0], r[1]))(params)
        closed = position_logit_gradients(
            c[pre.chosen],
            c[pre.rejected],
            CHOSEN,
            REJECTED,
            r[0],
            r[1],
            beta=beta,
            lam=lam,
            penalty_inside_beta=inside,
        )
        return -g["position_logits"][...], closed.descent, closed.coef_chosen + closed.coef_rejected

    auto, closed, S = jax.vmap(one)(ctx, ref)
    excess = np.max(np.abs(auto - closed) - RTOL * np.abs(auto), axis=(1, 2))
    bound = ATOL_PER_TERM * 2 * len(CHOSEN) * np.asarray(S)  # S bound: each |e - s| row sums <= 2
    i = worst_index(excess - bound)
    assert np.all(excess <= bound), f"worst instance {i}: excess {excess[i]:.3e} > {bound[i]:.3e}"


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_free_context_logits_never_displace_under_dpo():
    # untied logits: d/dt ln pi(t_k|y_w^<k) = a+ ||e_t - s^w_k||^2 (+ a- ... only at shared k <= m);
    # for k > m the y_w context has its own vector, so the velocity is a+ ||e_t - s^w_k||^2 > 0
    pre, ctx, ref = _random_context(2)
    beta = 0.5

    def one(c, r):
        graphdef, params, rest = nnx.split(
            PositionLogits(c, pre.position, 5, trainable="context"), nnx.Param, ...
        )

        def loss(p):
            return dpo_loss(*_lp(nnx.merge(graphdef, p, rest), pre), r[0], r[1], beta=beta)

        down = jax.tree.map(jnp.negative, jax.grad(loss)(params))

        def per_pos(p):
            return nnx.merge(graphdef, p, rest)(jnp.asarray(pre.chosen))[jnp.arange(5), CHOSEN]

        vel = jax.jvp(per_pos, (params,), (down,))[1]
        lp_c, lp_r = _lp(nnx.merge(graphdef, params, rest), pre)
        a = beta * jax.nn.sigmoid(-beta * ((lp_c - r[0]) - (lp_r - r[1])))
        s = jax.nn.softmax(c[pre.chosen], axis=-1)
        return vel, a * jnp.sum((jax.nn.one_hot(CHOSEN, V) - s) ** 2, axis=-1)

    vel, closed = jax.vmap(one)(ctx, ref)
    np.testing.assert_allclose(vel[:, 3:], closed[:, 3:], rtol=RTOL, atol=1e-14)
    assert np.all(np.asarray(vel[:, 3:]) > 0)


def _small_model(kind):
    pre = edit_pair_prefixes(CHOSEN, REJECTED)
    ctx = jnp.asarray(np.random.default_rng(3).standard_normal((len(pre.position), V)))
    if kind == "logit":
        return pre, PositionLogits(ctx, pre.position, 5)
    rng = np.random.default_rng(4)
    W, H = rng.standard_normal((V, 3)), rng.standard_normal((len(pre.position), 3))
    return pre, UnconstrainedFeatures.from_arrays(W, H)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
@pytest.mark.parametrize("kind", ["logit", "features"])
def test_edit_pair_flow_satisfies_proposition_2_and_matches_integrate(kind):
    pre, model = _small_model(kind)
    kw = dict(beta=0.5, dt=0.05, num_steps=24, record_every=6)
    result = edit_pair_flow(model, CHOSEN, REJECTED, pre, jnp.array([0.0, 3.0]), **kw).run()
    flow = result.observables
    # Proposition 2 (t = 0 sits on the hinge's kink, where autodiff averages the two sides)
    v, split = np.asarray(flow.velocity)[:, 1:], flow.split
    dpo_part = np.asarray(split.dpo_part)
    S = np.abs(dpo_part) + np.abs(np.asarray(split.velocity) - dpo_part)  # |rho E| + |gamma g^2|
    np.testing.assert_allclose(
        v, np.asarray(split.velocity)[:, 1:], rtol=RTOL, atol=ATOL_PER_TERM * float(np.max(S))
    )
    # lam = 0 is DPO: the same run through sims.flows.core.integrate with dpo_loss
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ref = _lp(model, pre)

    def loss(p, _):
        return dpo_loss(*_lp(nnx.merge(graphdef, p, rest), pre), *ref, beta=0.5)

    def obs(p, _):
        return nnx.merge(graphdef, p, rest)(jnp.asarray(pre.chosen))[jnp.arange(5), CHOSEN]

    traj = integrate(loss, obs, params, dt=0.05, num_steps=24, record_every=6).run()
    np.testing.assert_allclose(flow.logprob_chosen[0], traj.observables, rtol=1e-12)
    np.testing.assert_allclose(result.t, traj.t, rtol=1e-15)


def test_edit_pair_flow_rejects_bad_lams():
    pre, model = _small_model("logit")
    kw = dict(beta=0.5, dt=0.05, num_steps=4, record_every=2)
    with pytest.raises(ValueError, match="lams must be >= 0"):
        edit_pair_flow(model, CHOSEN, REJECTED, pre, jnp.array([-1.0]), **kw).run()
    with pytest.raises(ValueError, match=r"lams must have shape \[R\]"):
        edit_pair_flow(model, CHOSEN, REJECTED, pre, jnp.array(1.0), **kw).run()
    with pytest.raises(ValueError, match="record_every must divide"):
        edit_pair_flow(
            model, CHOSEN, REJECTED, pre, jnp.array([1.0]), **{**kw, "record_every": 3}
        ).run()


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_edit_pair_flow_new_beta_reuses_the_compiled_flow(caplog):
    """beta is a run-time value (in the data): a new beta, dt and length compile nothing, and the
    run equals the lam = 0 reference of the new beta."""
    pre, model = _small_model("logit")
    lams = jnp.array([0.0, 3.0])
    kw = dict(beta=0.5, dt=0.05, num_steps=4, record_every=2)
    edit_pair_flow(model, CHOSEN, REJECTED, pre, lams, **kw).run()
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING, logger="jax"):
            caplog.clear()
            kw = dict(beta=1.7, dt=0.02, num_steps=12, record_every=6)
            result = edit_pair_flow(model, CHOSEN, REJECTED, pre, lams, **kw).run()
    finally:
        jax.config.update("jax_log_compiles", False)
    assert [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()] == []
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ref = _lp(model, pre)

    def loss(p, _):
        return dpo_loss(*_lp(nnx.merge(graphdef, p, rest), pre), *ref, beta=1.7)

    def obs(p, _):
        return nnx.merge(graphdef, p, rest)(jnp.asarray(pre.chosen))[jnp.arange(5), CHOSEN]

    traj = integrate(loss, obs, params, dt=0.02, num_steps=12, record_every=6).run()
    np.testing.assert_allclose(result.observables.logprob_chosen[0], traj.observables, rtol=1e-12)
