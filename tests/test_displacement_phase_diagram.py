"""The displacement phase diagram (experiments/displacement_phase_diagram.py and its helpers):
instance construction, the t = 0 prediction against autodiff, the per-run flows through the sweep
against the same flows run one by one, reduced vs generic path, and kill-and-resume."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import _phase_diagram as ph
from experiments import _phase_instances as pi
from experiments import displacement_phase_diagram as exp
from experiments._phase_diagram import outcome_codes
from experiments._phase_report import prediction_codes, table
from experiments.framework import dumps
from theory.kernel import kernel_anisotropy
from theory.losses import loss_coefficients
from theory.regularized import preferred_logprob_velocity
from theory.single_token import logprob_velocity

ROOT = Path(__file__).resolve().parent.parent
# construction vs its targets: the bisection brackets c to 2^-70, so what is left is float64
# round-off in the rotation, the norms and the softmax
CONSTRUCTION_RTOL = 1e-12
CLOSED_FORM_RTOL = 1e-9  # closed form vs autodiff of the actual loss, float64 (style guide)
FLOW_RTOL = 1e-9  # reduced vs full-parameter flow: the same Euler steps up to round-off
# vmapped (sweep) vs unbatched XLA kernels may order float64 reductions differently
BATCHING_RTOL = 1e-12
SUBPROCESS_TIMEOUT_S = 300  # a fresh JAX process compiling two flows on a shared 2-core CPU
NUM_INSTANCES = 256  # random instances of the prediction checks (vmapped)


@pytest.fixture(scope="module")
def geometry():
    return ph.geometry_of(exp.Config())


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
        "loss_id": rng.integers(0, len(ph.LOSS_NAMES), n).astype(np.int32),
    }


# --- instance construction


def test_instance_realises_rho_omega_kappa_and_prob_pos(geometry):
    rng = np.random.default_rng(1)
    axes = (
        np.sort(rng.uniform(-0.5, 2.5, 5)),
        np.sort(rng.uniform(0.0, 2.5, 4)),
        np.sort(rng.uniform(0.03, 1.5, 3)),
        np.sort(rng.uniform(0.05, 0.95, 3)),
    )
    solved = pi.cell_inputs(*axes, geometry=geometry)
    grids = np.meshgrid(*axes, indexing="ij")
    ok = solved["feasible"]
    assert 20 <= ok.sum() < ok.size  # both feasible and infeasible cells are exercised
    rho, omega, kappa, prob = (g[ok] for g in grids)
    inst = jax.vmap(partial(pi.instance, geometry))(
        rho, omega, kappa, solved["phi"][ok], solved["cos"][ok], np.zeros(ok.sum())
    )
    W, h = np.asarray(inst.unembedding), np.asarray(inst.hidden)
    w_pos, w_neg = W[:, 0], W[:, 1]
    norm_sq = np.sum(w_pos**2, -1)
    diff = w_pos - w_neg
    orth = diff - (np.sum(diff * w_pos, -1) / norm_sq)[:, None] * w_pos
    logits = np.einsum("rvd,rd->rv", W, h)
    got = {
        "rho": np.sum(w_pos * w_neg, -1) / norm_sq,
        "omega": np.linalg.norm(orth, axis=-1) / np.sqrt(norm_sq),
        "kappa": np.sum(h**2, -1) / norm_sq,
        "prob_pos": np.exp(logits[:, 0] - np.logaddexp.reduce(logits, axis=-1)),
    }
    for name, want in (("rho", rho), ("omega", omega), ("kappa", kappa), ("prob_pos", prob)):
        err = np.abs(got[name] - want) / np.maximum(np.abs(want), 1.0)
        assert np.max(err) <= CONSTRUCTION_RTOL, f"{name}: worst cell {np.argmax(err)}"
    np.testing.assert_allclose(norm_sq, geometry.unembedding_norm**2, rtol=CONSTRUCTION_RTOL)


def _prob_pos_fn(geometry):
    """Jitted ``(rho, omega, kappa, phi, cos [n]) -> pi(y+) [n]`` of the built instance
    (independent of the solver's own formula)."""

    def prob_pos(rho, omega, kappa, phi, cos):
        def one(c):
            inst = pi.instance(geometry, rho, omega, kappa, phi, c, 0.0)
            return jax.nn.softmax(inst.unembedding @ inst.hidden)[0]

        return jax.vmap(one)(cos)

    return jax.jit(prob_pos)


def test_solve_hidden_cos_gives_smallest_root_and_flags_infeasible(geometry):
    axes = (np.array([0.0, 1.0, 1.5, 2.0]), np.array([0.0, 0.7, 2.0]), np.array([0.05, 1.0]))
    probs = np.array([0.2, 0.6, 0.95])
    solved = pi.cell_inputs(*axes, probs, geometry=geometry)
    dense = np.linspace(-1.0, 1.0, 20001)  # 20x finer than the solver's first-crossing grid
    prob_pos = _prob_pos_fn(geometry)
    seen = {True: 0, False: 0}
    for idx in np.ndindex(solved["feasible"].shape):
        rho, omega, kappa, p = (a[i] for a, i in zip((*axes, probs), idx, strict=True))
        phi, c, ok = solved["phi"][idx], solved["cos"][idx], bool(solved["feasible"][idx])
        seen[ok] += 1
        curve = np.asarray(prob_pos(rho, omega, kappa, phi, dense))
        if not ok:
            assert np.max(curve) < p, f"cell {idx} flagged infeasible but reaches p={p}"
            assert np.isnan(c)
            continue
        at = float(prob_pos(rho, omega, kappa, phi, np.full(dense.shape, c))[0])
        assert abs(at - p) <= CONSTRUCTION_RTOL * p, f"cell {idx}: pi(y+) = {at}, target {p}"
        below = dense < c - 1e-9
        assert not np.any(curve[below] >= p), f"cell {idx}: a smaller root exists"
    assert seen[True] >= 5 and seen[False] >= 5, seen


def test_hidden_direction_is_the_max_margin_direction(geometry):
    rng = np.random.default_rng(2)
    rho, omega = rng.uniform(-0.5, 2.5, 12), rng.uniform(0.0, 2.5, 12)
    phi, margin = pi.hidden_direction(rho, omega, geometry=geometry)
    angles = np.linspace(-np.pi, np.pi, 200001)
    for i in range(rho.size):
        inst = pi.instance(geometry, rho[i], omega[i], 1.0, 0.0, 1.0, 0.0)  # W only
        W, Q = np.asarray(inst.unembedding), geometry.rotation
        d = np.stack([np.cos(angles), np.sin(angles)], -1) @ Q[:, :2].T  # [A, d] rotated plane
        brute = np.min((W[0] - W[1:]) @ d.T, axis=0) / geometry.unembedding_norm  # [A]
        at = Q[:, :2] @ np.array([np.cos(phi[i]), np.sin(phi[i])])
        at = np.min((W[0] - W[1:]) @ at) / geometry.unembedding_norm
        assert margin[i] >= np.max(brute) - 1e-9, f"instance {i}: the grid beats the solution"
        assert abs(at - margin[i]) <= CONSTRUCTION_RTOL, f"instance {i}: margin not at phi"


def test_kernel_anisotropy_is_one_plus_lambda(geometry):
    for lam in (0.0, 0.5, 4.0, 9.0):
        inst = pi.instance(geometry, 0.8, 1.0, 0.25, -0.3, 0.4, lam)
        K = inst.basis @ inst.basis.T
        S = pi.kernel_subspace(inst, geometry)
        got = float(kernel_anisotropy(K, S).ratio)
        assert abs(got - (1.0 + lam)) <= CONSTRUCTION_RTOL * (1.0 + lam), (lam, got)
        q, _ = np.linalg.qr(np.asarray(S).T)
        want = np.eye(K.shape[0]) + lam * q @ q.T  # K = I + lambda P_S
        np.testing.assert_allclose(K, want, rtol=0, atol=CONSTRUCTION_RTOL * (1 + lam))


def test_make_geometry_rejects_bad_sizes():
    base = dict(
        seed=0,
        hidden_size=8,
        num_opposite=3,
        num_synonym=2,
        num_filler=7,
        unembedding_norm=4.0,
        opposite_scale=1.0,
        synonym_scale=0.5,
        filler_scale=1.0,
        rotate=True,
    )
    with pytest.raises(ValueError, match="hidden_size must be >= 4"):
        pi.make_geometry(**{**base, "hidden_size": 3})
    with pytest.raises(ValueError, match="synonym_scale must be < 1/1.2"):
        pi.make_geometry(**{**base, "synonym_scale": 0.9})
    with pytest.raises(ValueError, match="num_opposite must be >= 1"):
        pi.make_geometry(**{**base, "num_opposite": 0})


# --- the t = 0 prediction


def _autodiff_velocities(geometry, x, sft_ratio):
    """d/dt ln pi(.|x) at t = 0 by jax.jvp along -grad of the actual loss on (W, theta)."""
    inst = pi.instance(geometry, x["rho"], x["omega"], x["kappa"], x["phi"], x["cos"], x["lam"])
    lp0 = jax.nn.log_softmax(inst.unembedding @ inst.hidden)
    sft_coef = sft_ratio * x["beta"] / 2.0

    def logprobs(params):
        h = inst.hidden + inst.basis @ params["theta"]
        return jax.nn.log_softmax(params["unembedding"] @ h)

    def loss(params):
        lp = logprobs(params)
        return ph.pair_loss(
            x["loss_id"], lp[0], lp[1], lp0[0], lp0[1], beta=x["beta"], sft_coef=sft_coef
        )

    params = {"unembedding": inst.unembedding, "theta": jnp.zeros_like(inst.hidden)}
    descent = jax.tree_util.tree_map(jnp.negative, jax.grad(loss)(params))
    return jax.jvp(logprobs, (params,), (descent,))[1]


def _closed_form_velocities(geometry, x, sft_ratio):
    inst = pi.instance(geometry, x["rho"], x["omega"], x["kappa"], x["phi"], x["cos"], x["lam"])
    W, h = inst.unembedding, inst.hidden
    lp0 = jax.nn.log_softmax(W @ h)
    loss = partial(ph.pair_loss, x["loss_id"], beta=x["beta"], sft_coef=sft_ratio * x["beta"] / 2)
    coef = loss_coefficients(loss, lp0[0], lp0[1], lp0[0], lp0[1])
    K = inst.basis @ inst.basis.T
    return ph.predicted_velocities(W, h, K, *coef), coef, W, h


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
    assert set(x["loss_id"][moving]) == set(range(len(ph.LOSS_NAMES)))
    assert np.any(x["lam"][moving] == 0.0) and np.any(x["lam"][moving] > 0.0)


def test_predicted_velocities_are_theorem4_and_prop1_without_a_kernel(geometry):
    n = 64
    x = _random_cells(4, n)
    x["lam"] = np.zeros(n)
    pred, coef, W, h = jax.jit(jax.vmap(partial(_closed_form_velocities, geometry, sft_ratio=1.0)))(
        x
    )
    theorem45 = jax.jit(jax.vmap(lambda W, h, a: logprob_velocity(W, h, 0, 1, -a)))(W, h, coef[1])

    def prop1_velocity(W, h, a_pos, a_neg):
        one = jnp.array([0]), jnp.array([1])
        return preferred_logprob_velocity(W, h[None], h[None], *one, a_pos, a_neg).velocity

    prop1 = jax.jit(jax.vmap(prop1_velocity))(W, h, *coef)
    sft = x["loss_id"] == ph.LOSS_NAMES.index("dpo_sft")
    moving = np.asarray(coef.coef_rejected) > 0  # SLiC at rest has nothing to compare
    assert np.sum(moving & sft) >= 8 and np.sum(moving & ~sft) >= 30
    # margin losses: Theorems 4-5 for every token; SFT term: Proposition 1 (ln pi(y+) only)
    want = np.where(sft[:, None], np.asarray(prop1)[:, None], np.asarray(theorem45))
    got = np.where(sft[:, None], np.asarray(pred)[:, :1], np.asarray(pred))
    np.testing.assert_allclose(got[moving], want[moving], rtol=CLOSED_FORM_RTOL, atol=1e-12)


def test_prediction_codes_and_table_by_hand():
    v = np.array([-1.0, 1.0, 0.0, 1.0, np.nan])
    r = np.array([-1.0, -1.0, 0.0, 0.5, 0.0])
    assert prediction_codes(v, r, 1e-9, "theorem4").tolist() == [0, 1, 2, 1, -1]
    # relative: down if ln pi(y+) falls or some token outpaces it
    assert prediction_codes(v, r, 1e-9, "relative").tolist() == [0, 1, 2, 0, -1]
    outputs = {
        "max_drop": np.array([0.5, 0.0, 0.5, 2e-3, np.nan]),
        "final_change": np.array([-0.4, 0.2, 0.1, 0.0, 0.0]),
    }
    outcome = outcome_codes(outputs, 1e-3)
    assert outcome.tolist() == [2, 0, 1, 1, -1]  # lasting, none, transient, transient, NaN
    t = table(np.array([0, 1, 1, 0]), outcome[:4], np.array([True, False, False, False]))
    # (down, lasting), (up, none), (down, transient) agree on "displaced"; (up, transient) not
    assert t["resolved"] == 4 and t["agreement_displaced"] == 3 / 4
    assert t["displaced_given_up"] == 1 / 2 and t["displaced_given_down"] == 1.0
    # on "lasting": (down, transient) now misses and (up, transient) agrees
    assert t["agreement_lasting"] == 3 / 4


# --- flows through the sweep


SMALL = dataclasses.replace(
    exp.Config.smoke(), lambdas=(0.0, 4.0), chunk_size=4, num_steps=100, record_every=10
)


@pytest.fixture(scope="module")
def small_grid():
    geometry = ph.geometry_of(SMALL)
    predict = ph.make_predictor(geometry, sft_ratio=SMALL.sft_ratio)
    grid = ph.cells(SMALL, geometry, predict, ph.axes_of(SMALL))
    return geometry, grid, ph.run_sweeps(SMALL, geometry, grid)


def test_sweep_equals_the_same_runs_one_by_one(small_grid):
    geometry, grid, outputs = small_grid
    schedule = ph.Schedule(SMALL.num_steps, SMALL.record_every, SMALL.sft_ratio)
    assert {0, 1} <= set(np.unique(grid["path"]))  # both paths of this grid are exercised
    for p, path in enumerate(ph.PATHS):
        runs = np.flatnonzero(grid["path"] == p)
        if runs.size == 0:
            continue
        one = jax.jit(ph.make_run_fn(geometry, path, schedule))
        for r in runs:
            got = one({k: grid[k][r] for k in ph.RUN_INPUTS})
            for key, value in got.items():
                want = outputs[key][r]
                if np.issubdtype(np.asarray(value).dtype, np.integer):
                    assert int(value) == int(want), f"{path} run {r}: {key}"
                else:
                    np.testing.assert_allclose(
                        value, want, rtol=BATCHING_RTOL, atol=1e-14, err_msg=f"{path} run {r} {key}"
                    )
    assert set(outputs["status"]) <= {"ok", "infeasible"}


def test_reduced_and_generic_paths_agree(small_grid):
    geometry, grid, outputs = small_grid
    runs = np.flatnonzero(grid["path"] == 0)
    assert runs.size >= 2
    schedule = ph.Schedule(SMALL.num_steps, SMALL.record_every, SMALL.sft_ratio)
    generic = jax.jit(jax.vmap(ph.make_run_fn(geometry, "generic_sgd", schedule)))
    got = generic({k: grid[k][runs] for k in ph.RUN_INPUTS})
    for key, value in got.items():
        if key == "first_nonfinite_step" or np.issubdtype(np.asarray(value).dtype, np.integer):
            np.testing.assert_array_equal(value, outputs[key][runs], err_msg=key)
        else:
            scale = np.maximum(np.abs(outputs[key][runs]), 1.0)
            err = np.abs(np.asarray(value) - outputs[key][runs]) / scale
            assert np.max(err) <= FLOW_RTOL, f"{key}: worst run {runs[np.argmax(err)]}"


@pytest.mark.slow
def test_experiment_sweep_resumes_after_kill_without_recomputing(tmp_path, monkeypatch):
    import _phase_diagram_job as job

    out = tmp_path / "sweep"
    env = dict(os.environ)  # the root conftest's XLA_FLAGS: 8 devices, same optimisation level
    assert "--xla_force_host_platform_device_count=8" in env["XLA_FLAGS"]
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_phase_diagram_job.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    first = out / ph.PATHS[0]
    index = json.loads((first / "index.json").read_text())
    assert sorted(index["chunks"]) == ["0"]  # killed right after the first chunk was saved
    assert not (out / ph.PATHS[1]).exists()

    computed, original = {}, ph.sweep

    def recording(run_fn, inputs, *, name, **kwargs):
        res = original(run_fn, inputs, name=name, **kwargs)
        computed[name] = (res.computed_chunks, -(-len(inputs["rho"]) // kwargs["chunk_size"]))
        return res

    monkeypatch.setattr(ph, "sweep", recording)
    resumed = exp.run(job.JOB_CONFIG, sweep_dir=out)
    monkeypatch.undo()
    paths = {name.split("/")[1]: value for name, value in computed.items()}
    chunks, n = paths[ph.PATHS[0]]
    assert n >= 2 and chunks == tuple(range(1, n))  # only the missing chunks were computed
    chunks, n = paths[ph.PATHS[1]]
    assert chunks == tuple(range(n))
    fresh = exp.run(job.JOB_CONFIG)  # uninterrupted, in memory
    assert dumps(resumed) == dumps(fresh)
