"""The phase-diagram grid and its sweeps (sims.protocols.phase_diagram): the per-run flows through
the sweep against the same flows run one by one, the exact reduced path against the full
``(W, theta)`` path, the cells' step and path rules by hand, and kill-and-resume of the sweeps."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from _phase_setup import DEFAULT_GEOMETRY

from sims.protocols import phase_diagram as pd
from sims.protocols.phase_flows import (
    PHASE_LOSSES,
    PHASE_PATHS,
    RUN_INPUTS,
    PhaseSchedule,
    phase_predictor,
    phase_run_fn,
)
from sims.protocols.phase_instances import make_phase_geometry

ROOT = Path(__file__).resolve().parent.parent
FLOW_RTOL = 1e-9  # reduced vs full-parameter flow: the same Euler steps up to round-off
# vmapped (sweep) vs unbatched XLA kernels may order float64 reductions differently
BATCHING_RTOL = 1e-12
SUBPROCESS_TIMEOUT_S = 300  # a fresh JAX process compiling two flows on a shared 2-core CPU
GEOMETRY = DEFAULT_GEOMETRY
#: A small grid with two paths (reduced: DPO at lambda = 0; generic_sgd: the rest).
SMALL_AXES = dict(
    rhos=(0.5, 1.5),
    omegas=(0.0, 1.0),
    kappas=(0.25,),
    probs=(0.5,),
    betas=(0.1,),
    losses=("dpo", "dpo_sft"),
    optimizers=("sgd",),
    lambdas=(0.0, 4.0),
)
SMALL = PhaseSchedule(num_steps=100, record_every=10, sft_ratio=1.0)
HORIZON = 100.0
#: Settings of SMALL's schedule (``pd.PhaseSettings`` fields; no reruns, no controls).
SETTINGS = dict(
    seed=0,
    sft_ratio=SMALL.sft_ratio,
    horizon=HORIZON,
    num_steps=SMALL.num_steps,
    record_every=SMALL.record_every,
    rmsprop_lr=2e-3,
    displacement_tol=1e-3,
    velocity_tol=1e-9,
    chunk_size=4,
    batch_size=0,
    control_runs=0,
    control_factor=4,
    boundary_points=5,
    report_tols=(1e-3, 0.01),
    roundoff=0.0,
)


@pytest.fixture(scope="module")
def small_grid():
    geometry = make_phase_geometry(**GEOMETRY)
    predict = phase_predictor(geometry, sft_ratio=SMALL.sft_ratio)
    axes = pd.phase_axes(**SMALL_AXES)
    grid = pd.phase_cells(
        geometry, predict, axes, horizon=HORIZON, num_steps=SMALL.num_steps, rmsprop_lr=2e-3
    )
    return geometry, grid, pd.run_phase_sweeps(geometry, grid, schedule=SMALL, chunk_size=4)


def test_phase_axes_rejects_unknown_names():
    with pytest.raises(ValueError, match="losses must be among"):
        pd.phase_axes(**{**SMALL_AXES, "losses": ("dpo", "kto")})
    with pytest.raises(ValueError, match="optimizers must be among"):
        pd.phase_axes(**{**SMALL_AXES, "optimizers": ("adam",)})


def test_phase_cells_step_and_path_rules_by_hand():
    geometry = make_phase_geometry(**GEOMETRY)
    predict = phase_predictor(geometry, sft_ratio=1.0)
    axes = pd.phase_axes(
        **{**SMALL_AXES, "losses": PHASE_LOSSES, "optimizers": ("sgd", "rmsprop_torch")}
    )
    grid = pd.phase_cells(geometry, predict, axes, horizon=50.0, num_steps=200, rmsprop_lr=3e-3)
    ok = grid["feasible"]
    assert 0 < ok.sum() < ok.size
    sgd = grid["optimizer"] == 0
    unit = predict(
        {k: grid[k][ok] for k in ("rho", "omega", "kappa", "phi", "cos", "lam", "beta", "loss_id")}
    )["unit"]
    np.testing.assert_array_equal(grid["dt"][ok & ~sgd], 3e-3)
    np.testing.assert_allclose(grid["dt"][ok], np.where(sgd[ok], 50.0 / 200 / unit, 3e-3), rtol=0)
    margin_loss = np.isin(grid["loss_id"], [0, 1, 2])
    want = np.where(~sgd, 2, np.where(margin_loss & (grid["lam"] == 0.0), 0, 1))
    np.testing.assert_array_equal(grid["path"][ok], want[ok])
    assert np.all(grid["path"][~ok] == -1) and np.all(np.isnan(grid["dt"][~ok]))
    assert set(np.unique(grid["path"][ok])) == {0, 1, 2}


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_run_phase_sweeps_equal_the_same_runs_one_by_one(small_grid):
    geometry, grid, outputs = small_grid
    assert {0, 1} <= set(np.unique(grid["path"]))  # both paths of this grid are exercised
    for p, path in enumerate(PHASE_PATHS):
        runs = np.flatnonzero(grid["path"] == p)
        if runs.size == 0:
            continue
        one = jax.jit(phase_run_fn(geometry, path, SMALL))
        for r in runs:
            got = one({k: grid[k][r] for k in RUN_INPUTS})
            for key, value in got.items():
                want = outputs[key][r]
                if np.issubdtype(np.asarray(value).dtype, np.integer):
                    assert int(value) == int(want), f"{path} run {r}: {key}"
                else:
                    np.testing.assert_allclose(
                        value, want, rtol=BATCHING_RTOL, atol=1e-14, err_msg=f"{path} run {r} {key}"
                    )
    assert set(outputs["status"]) <= {"ok", "infeasible"}
    assert np.all((outputs["status"] == "infeasible") == ~grid["feasible"])


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_reduced_and_generic_paths_agree(small_grid):
    geometry, grid, outputs = small_grid
    runs = np.flatnonzero(grid["path"] == 0)
    assert runs.size >= 2
    generic = jax.jit(jax.vmap(phase_run_fn(geometry, "generic_sgd", SMALL)))
    got = generic({k: grid[k][runs] for k in RUN_INPUTS})
    for key, value in got.items():
        if key == "first_nonfinite_step" or np.issubdtype(np.asarray(value).dtype, np.integer):
            np.testing.assert_array_equal(value, outputs[key][runs], err_msg=key)
        else:
            scale = np.maximum(np.abs(outputs[key][runs]), 1.0)
            err = np.abs(np.asarray(value) - outputs[key][runs]) / scale
            assert np.max(err) <= FLOW_RTOL, f"{key}: worst run {runs[np.argmax(err)]}"


@pytest.mark.slow  # 15-40 s on the shared 2-core CPU: a sweep and two one-by-one compiles
def test_sweep_phase_grids_stack_grids_and_round_off_reruns(small_grid):
    """Two grids swept together with round-off reruns: every run equals the same run alone, and
    every rerun equals its run from the start perturbed with the key of its index in the stack."""
    geometry, grid, outputs = small_grid
    predict = phase_predictor(geometry, sft_ratio=SMALL.sft_ratio)
    extra = {**SMALL_AXES, "rhos": (1.2,), "kappas": (0.5,), "probs": (0.8,)}
    axes = {"grid": pd.phase_axes(**SMALL_AXES), "slice": pd.phase_axes(**extra)}
    settings = pd.PhaseSettings(**{**SETTINGS, "roundoff": 2.0**-23})
    swept = pd.sweep_phase_grids(geometry, axes, settings, predict)
    assert swept["slice"].grid["feasible"].sum() >= 2
    np.testing.assert_array_equal(swept["grid"].outputs["status"], outputs["status"])
    ok = outputs["status"] == "ok"
    for key in ("max_drop", "final_change", "margin_end"):  # the grid as swept alone
        got = swept["grid"].outputs[key][ok]
        np.testing.assert_allclose(got, outputs[key][ok], rtol=BATCHING_RTOL, atol=1e-14)
    offsets = {"grid": 0, "slice": grid["feasible"].size}
    for p, path in enumerate(PHASE_PATHS):
        if not any(np.any(part.grid["path"] == p) for part in swept.values()):
            continue
        one = jax.jit(phase_run_fn(geometry, path, SMALL, seed=settings.seed))
        for source, part in swept.items():
            for r in np.flatnonzero(part.grid["path"] == p):
                x = {k: part.grid[k][r] for k in RUN_INPUTS}
                rerun = {"roundoff": settings.roundoff, "run_index": np.int32(offsets[source] + r)}
                for got, want in ((one(x), part.outputs), (one(x | rerun), part.perturbed)):
                    for key in ("max_drop", "final_change", "margin_end"):
                        np.testing.assert_allclose(
                            got[key],
                            want[key][r],
                            rtol=BATCHING_RTOL,
                            atol=1e-14,
                            err_msg=f"{source} run {r} {key}",
                        )
                # the perturbation moved the run, by round-off (these runs are well conditioned)
                change = abs(part.perturbed["margin_end"][r] - part.outputs["margin_end"][r])
                assert 0.0 < change < 1e-6 * max(1.0, abs(part.outputs["margin_end"][r])), r


def test_phase_run_fn_rejects_unknown_path():
    with pytest.raises(ValueError, match="path must be one of"):
        phase_run_fn(make_phase_geometry(**GEOMETRY), "adam", SMALL)


@pytest.mark.slow
def test_phase_diagram_sweeps_resume_after_kill_without_recomputing(tmp_path, monkeypatch):
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
    first = out / PHASE_PATHS[0]
    index = json.loads((first / "index.json").read_text())
    assert sorted(index["chunks"]) == ["0"]  # killed right after the first chunk was saved
    assert not (out / PHASE_PATHS[1]).exists()

    computed, original = {}, pd.sweep

    def recording(run_fn, inputs, *, name, **kwargs):
        res = original(run_fn, inputs, name=name, **kwargs)
        computed[name] = (res.computed_chunks, -(-len(inputs["rho"]) // kwargs["chunk_size"]))
        return res

    monkeypatch.setattr(pd, "sweep", recording)
    resumed = job.run(out)
    monkeypatch.undo()
    paths = {name.split("/")[1]: value for name, value in computed.items()}
    chunks, n = paths[PHASE_PATHS[0]]
    assert n >= 2 and chunks == tuple(range(1, n))  # only the missing chunks were computed
    chunks, n = paths[PHASE_PATHS[1]]
    assert chunks == tuple(range(n))
    fresh = job.run(None)  # uninterrupted, in memory
    assert json.dumps(resumed, sort_keys=True) == json.dumps(fresh, sort_keys=True)
