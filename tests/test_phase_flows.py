"""t = 0 prediction and per-run flow of a phase-diagram cell (sims.protocols.phase_flows).

The prediction is compared with autodiff of the actual loss on ``(W, theta)`` (``jax.jvp`` of the
log-probs along ``-grad L``) and, without a kernel, with Theorems 4-5 (theory.single_token) and
Proposition 1 (theory.regularized); the run summary with a NumPy loop over the checkpoints; the
outcome codes and the grid enumeration by hand.
"""

import itertools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _phase_setup import DEFAULT_GEOMETRY

from sims.protocols.phase_flows import (
    PHASE_AXES,
    PHASE_LOSSES,
    PhaseSchedule,
    displacement_outcomes,
    grid_cells,
    phase_pair_loss,
    phase_prediction,
    phase_run_fn,
    phase_run_summary,
    predicted_velocities,
    roundoff_perturbation,
)
from sims.protocols.phase_instances import make_phase_geometry, phase_instance
from theory.losses import loss_coefficients
from theory.regularized import preferred_logprob_velocity
from theory.single_token import logprob_velocity

CLOSED_FORM_RTOL = 1e-9  # closed form vs autodiff of the actual loss, float64 (style guide)
NUM_INSTANCES = 256  # random instances of the prediction checks (vmapped)
GEOMETRY = DEFAULT_GEOMETRY


@pytest.fixture(scope="module")
def geometry():
    return make_phase_geometry(**GEOMETRY)


def _random_cells(seed: int, n: int) -> dict:
    """``n`` random cells (not solved: ``c`` drawn directly), every loss, half with a kernel."""
    rng = np.random.default_rng(seed)
    return {
        "rho": rng.uniform(-0.5, 2.5, n),
        "omega": rng.uniform(0.0, 2.5, n),
        "kappa": rng.uniform(0.05, 1.5, n),
        "phi": rng.uniform(-np.pi, np.pi, n),
        "cos": rng.uniform(-0.95, 0.95, n),
        "lam": np.where(rng.random(n) < 0.5, 0.0, rng.uniform(0.0, 9.0, n)),
        "beta": rng.uniform(0.05, 1.0, n),
        "loss_id": rng.integers(0, len(PHASE_LOSSES), n).astype(np.int32),
    }


def _instance(geometry, x):
    return phase_instance(geometry, x["rho"], x["omega"], x["kappa"], x["phi"], x["cos"], x["lam"])


def _autodiff_velocities(geometry, x, sft_ratio):
    """d/dt ln pi(.|x) at t = 0 by jax.jvp along -grad of the actual loss on (W, theta)."""
    inst = _instance(geometry, x)
    lp0 = jax.nn.log_softmax(inst.unembedding @ inst.hidden)
    sft_coef = sft_ratio * x["beta"] / 2.0

    def logprobs(params):
        h = inst.hidden + inst.basis @ params["theta"]
        return jax.nn.log_softmax(params["unembedding"] @ h)

    def loss(params):
        lp = logprobs(params)
        return phase_pair_loss(
            x["loss_id"], lp[0], lp[1], lp0[0], lp0[1], beta=x["beta"], sft_coef=sft_coef
        )

    params = {"unembedding": inst.unembedding, "theta": jnp.zeros_like(inst.hidden)}
    descent = jax.tree_util.tree_map(jnp.negative, jax.grad(loss)(params))
    return jax.jvp(logprobs, (params,), (descent,))[1]


def _closed_form_velocities(geometry, x, sft_ratio):
    inst = _instance(geometry, x)
    W, h = inst.unembedding, inst.hidden
    lp0 = jax.nn.log_softmax(W @ h)
    loss = partial(
        phase_pair_loss, x["loss_id"], beta=x["beta"], sft_coef=sft_ratio * x["beta"] / 2
    )
    coef = loss_coefficients(loss, lp0[0], lp0[1], lp0[0], lp0[1])
    K = inst.basis @ inst.basis.T
    return predicted_velocities(W, h, K, *coef), coef, W, h


def test_predicted_velocities_match_autodiff_of_the_actual_loss(geometry):
    x = _random_cells(3, NUM_INSTANCES)
    truth = np.asarray(jax.jit(jax.vmap(partial(_autodiff_velocities, geometry, sft_ratio=1.0)))(x))
    pred = jax.jit(jax.vmap(partial(_closed_form_velocities, geometry, sft_ratio=1.0)))(x)[0]
    size = np.max(np.abs(truth), axis=-1)
    moving = size > 0  # SLiC past its margin does not move (l' = 0): both are exactly 0
    assert moving.sum() >= 0.8 * NUM_INSTANCES
    np.testing.assert_array_equal(np.asarray(pred)[~moving], 0.0)
    err = np.max(np.abs(np.asarray(pred) - truth), axis=-1)[moving] / size[moving]
    assert np.max(err) <= CLOSED_FORM_RTOL, (
        f"worst instance {np.flatnonzero(moving)[np.argmax(err)]}"
    )
    # every loss and both model kinds were covered among the moving instances
    assert set(x["loss_id"][moving]) == set(range(len(PHASE_LOSSES)))
    assert np.any(x["lam"][moving] == 0.0) and np.any(x["lam"][moving] > 0.0)


def test_predicted_velocities_are_theorem4_and_prop1_without_a_kernel(geometry):
    n = 64
    x = _random_cells(4, n)
    x["lam"] = np.zeros(n)
    closed = jax.jit(jax.vmap(partial(_closed_form_velocities, geometry, sft_ratio=1.0)))
    pred, coef, W, h = closed(x)
    theorem45 = jax.jit(jax.vmap(lambda W, h, a: logprob_velocity(W, h, 0, 1, -a)))(W, h, coef[1])

    def prop1_velocity(W, h, a_pos, a_neg):
        one = jnp.array([0]), jnp.array([1])
        return preferred_logprob_velocity(W, h[None], h[None], *one, a_pos, a_neg).velocity

    prop1 = jax.jit(jax.vmap(prop1_velocity))(W, h, *coef)
    sft = x["loss_id"] == PHASE_LOSSES.index("dpo_sft")
    moving = np.asarray(coef.coef_rejected) > 0  # SLiC at rest has nothing to compare
    assert np.sum(moving & sft) >= 8 and np.sum(moving & ~sft) >= 30
    # margin losses: Theorems 4-5 for every token; SFT term: Proposition 1 (ln pi(y+) only)
    want = np.where(sft[:, None], np.asarray(prop1)[:, None], np.asarray(theorem45))
    got = np.where(sft[:, None], np.asarray(pred)[:, :1], np.asarray(pred))
    np.testing.assert_allclose(got[moving], want[moving], rtol=CLOSED_FORM_RTOL, atol=1e-12)


def test_phase_prediction_velocity_is_the_velocity_over_the_margin_rate(geometry):
    """``velocity * unit`` is autodiff's d/dt ln pi(y+); ``unit`` is autodiff's margin rate."""
    x = _random_cells(6, 64)
    x["loss_id"] = np.zeros(64, np.int32)  # DPO: a^- > 0 always, so unit = du/dt at t = 0
    pred = jax.jit(jax.vmap(partial(phase_prediction, geometry, sft_ratio=1.0)))(x)
    truth = np.asarray(jax.jit(jax.vmap(partial(_autodiff_velocities, geometry, sft_ratio=1.0)))(x))
    margin_rate = truth[:, 0] - truth[:, 1]
    np.testing.assert_allclose(pred["unit"], margin_rate, rtol=CLOSED_FORM_RTOL)
    np.testing.assert_allclose(
        pred["velocity"] * pred["unit"], truth[:, 0], rtol=CLOSED_FORM_RTOL, atol=1e-12
    )
    relative = np.max(truth[:, 1:] - truth[:, :1], axis=-1) / margin_rate
    np.testing.assert_allclose(pred["relative"], relative, rtol=CLOSED_FORM_RTOL, atol=1e-12)


def test_phase_run_summary_matches_a_loop_over_checkpoints(geometry):
    rng = np.random.default_rng(7)
    for trial in range(20):
        logits = rng.normal(size=(12, geometry.vocab_size)).cumsum(0)  # a random walk
        lp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        got = {k: np.asarray(v) for k, v in phase_run_summary(jnp.asarray(lp), geometry).items()}
        best, drop, at = -np.inf, 0.0, 0
        for c, v in enumerate(lp[:, 0]):
            best = max(best, v)
            if best - v > drop:
                drop, at = best - v, c
        probs = np.exp(lp)
        opposite = probs[:, 2:5].sum(-1)  # ids 2..4 are the opposite set of this geometry
        want = {
            "max_drop": drop,
            "drop_checkpoint": at,
            "final_change": lp[-1, 0] - lp[0, 0],
            "min_change": lp[:, 0].min() - lp[0, 0],
            "early_change": lp[1, 0] - lp[0, 0],
            "opposite_mass_start": opposite[0],
            "opposite_mass_end": opposite[-1],
            "opposite_mass_peak": opposite.max(),
            "top_gainer_end": np.argmax(probs[-1] - probs[0]),
            "top_gainer_drop": np.argmax(probs[at] - probs[0]),
            "margin_start": lp[0, 0] - lp[0, 1],
            "margin_end": lp[-1, 0] - lp[-1, 1],
        }
        assert set(got) == set(want)
        for k, v in want.items():
            np.testing.assert_allclose(got[k], v, rtol=1e-12, atol=1e-14, err_msg=f"{trial} {k}")


def test_displacement_outcomes_by_hand():
    outputs = {
        "max_drop": np.array([0.5, 0.0, 0.5, 2e-3, 1e-3, np.nan]),
        "final_change": np.array([-0.4, 0.2, 0.1, 0.0, -0.5, 0.0]),
    }
    # lasting, none, transient, transient, none (a drop of exactly tol is not displacement), NaN
    assert displacement_outcomes(outputs, 1e-3).tolist() == [2, 0, 1, 1, 0, -1]


def test_grid_cells_enumerate_the_product_row_major(geometry):
    values = {
        "rho": np.array([0.0, 1.5]),
        "omega": np.array([0.0, 1.0]),
        "kappa": np.array([0.25]),
        "prob_pos": np.array([0.2, 0.8]),
        "beta": np.array([0.1, 0.5]),
        "loss": np.array([0, 3], np.int32),
        "optimizer": np.array([1], np.int32),
        "lam": np.array([0.0, 4.0]),
    }
    cells, feasible, shape = grid_cells(geometry, values)
    product = list(itertools.product(*(values[a] for a in PHASE_AXES)))
    assert shape == (2, 2, 1, 2, 2, 2, 1, 2) and len(product) == feasible.size
    for r, combo in enumerate(product):
        got = tuple(cells["loss_id" if a == "loss" else a][r] for a in PHASE_AXES)
        assert got == combo, r
    # (rho 1.5, omega 0): every direction ranking y+ above y- ranks the opposite set above y+
    assert not np.any(feasible[(cells["rho"] == 1.5) & (cells["omega"] == 0.0)])
    assert np.all(np.isnan(cells["cos"][~feasible])) and np.all(np.isfinite(cells["cos"][feasible]))


def test_roundoff_perturbation_is_bounded_seeded_and_exact_at_zero():
    x = jnp.asarray(np.random.default_rng(8).normal(size=(14, 8)))
    eps = 2.0**-23  # float32's machine epsilon
    key = jax.random.key(3)
    y = np.asarray(roundoff_perturbation(key, x, scale=eps))
    rel = np.abs(y / np.asarray(x) - 1.0)
    assert np.max(rel) <= eps * (1 + 1e-6)  # |u| < 1, up to the product's own round-off
    assert np.max(rel) > eps / 2 and np.mean(rel > 0) > 0.99  # it does move (nearly) every entry
    np.testing.assert_array_equal(y, roundoff_perturbation(key, x, scale=eps))  # seeded
    assert not np.array_equal(y, roundoff_perturbation(jax.random.key(4), x, scale=eps))
    np.testing.assert_array_equal(roundoff_perturbation(key, x, scale=0.0), x)  # exact at 0


def test_phase_run_fn_roundoff_moves_the_run_by_round_off_only(geometry):
    cells, feasible, _ = grid_cells(
        geometry,
        {
            "rho": np.array([0.5]),
            "omega": np.array([1.0]),
            "kappa": np.array([0.25]),
            "prob_pos": np.array([0.5]),
            "beta": np.array([0.1]),
            "loss": np.array([0], np.int32),
            "optimizer": np.array([0], np.int32),
            "lam": np.array([0.0]),
        },
    )
    assert feasible.all()
    x = {k: cells[k][0] for k in ("rho", "omega", "kappa", "phi", "cos", "lam", "beta", "loss_id")}
    x |= {"dt": 0.05, "roundoff": 0.0, "run_index": np.int32(0)}
    run = jax.jit(phase_run_fn(geometry, "reduced", PhaseSchedule(100, 10, 1.0)))
    base = run(x)
    same = run({**x, "run_index": np.int32(5)})  # at roundoff 0 the key changes nothing
    moved = run({**x, "roundoff": 2.0**-23})
    for k in ("max_drop", "final_change", "margin_end"):
        assert float(same[k]) == float(base[k]), k
    change = abs(float(moved["margin_end"]) - float(base["margin_end"]))
    assert 0.0 < change < 1e-5, change  # a well-conditioned run moves by round-off, not more
