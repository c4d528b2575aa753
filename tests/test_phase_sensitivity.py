"""Robustness of the phase-diagram verdict (sims.protocols.phase_sensitivity): thresholds and
round-off tables and the paper's-regime report against loops over synthetic runs; the controls at
factor 1 against the sweep they repeat."""

import numpy as np
import pytest
from _phase_setup import SMALL_GEOMETRY

from sims.protocols import phase_diagram as pd
from sims.protocols.phase_flows import PhaseSchedule, phase_predictor
from sims.protocols.phase_instances import make_phase_geometry
from sims.protocols.phase_sensitivity import (
    phase_controls,
    regime_report,
    roundoff_sensitive,
    roundoff_summary,
    threshold_table,
)

TOLS = (1e-3, 0.01, 0.05)
# the same runs through the sweep and through the controls' runner: vmapped vs one-by-one float64
# reductions may round differently (as tests/test_phase_diagram.py's BATCHING_RTOL)
BATCHING_ATOL = 1e-12


def _synthetic(seed: int, R: int) -> tuple[np.ndarray, dict, dict]:
    """Random predictions, outcomes and reruns (some reruns moved across a threshold)."""
    rng = np.random.default_rng(seed)
    status = np.where(rng.random(R) < 0.9, "ok", "infeasible")
    ok = status == "ok"
    drop = np.where(rng.random(R) < 0.5, rng.uniform(0, 0.1, R), 0.0)
    final = rng.uniform(-0.1, 0.1, R)
    outputs = {
        "status": status,
        "max_drop": np.where(ok, drop, np.nan),
        "final_change": np.where(ok, final, np.nan),
        "min_change": np.where(ok, np.minimum(final, -drop), np.nan),
    }
    moved = np.where(rng.random(R) < 0.2, rng.uniform(-0.02, 0.02, R), 0.0)
    rerun_status = np.where(ok & (rng.random(R) < 0.02), "nonfinite", status)
    perturbed = {"status": rerun_status, "max_drop": np.maximum(outputs["max_drop"] + moved, 0.0)}
    pred = np.where(ok, rng.choice([0, 1, 2], R, p=[0.3, 0.6, 0.1]), -1)
    return pred, outputs, perturbed


def _loop_table(pred, outputs, perturbed, tol, skip_sensitive):
    """(resolved, agreeing, down, displaced-and-down, sensitive) by the definitions, run by run."""
    resolved = agree = down = displaced_down = sensitive = 0
    for r in range(pred.size):
        if outputs["status"][r] != "ok" or pred[r] not in (0, 1):
            continue
        displaced = outputs["max_drop"][r] > tol
        flips = perturbed["status"][r] != "ok" or (perturbed["max_drop"][r] > tol) != displaced
        sensitive += flips
        if skip_sensitive and flips:
            continue
        resolved += 1
        agree += (pred[r] == 0) == displaced
        down += pred[r] == 0
        displaced_down += (pred[r] == 0) and displaced
    return resolved, agree, down, displaced_down, sensitive


def test_roundoff_sensitive_flags_flips_and_failed_reruns():
    out = {
        "status": np.array(["ok", "ok", "ok", "infeasible"]),
        "max_drop": np.array([0.5, 0.01, 0.0, np.nan]),
    }
    rerun = {
        "status": np.array(["ok", "nonfinite", "ok", "infeasible"]),
        "max_drop": np.array([0.5, np.nan, 0.02, np.nan]),
    }
    # run 1: the rerun failed; run 2: 0.0 -> 0.02 crosses 0.01; run 3 was never ok
    assert roundoff_sensitive(out, rerun, 0.01).tolist() == [False, True, True, False]
    assert roundoff_sensitive(out, rerun, 0.05).tolist() == [False, True, False, False]


def test_threshold_table_matches_a_loop_over_runs():
    pred, outputs, perturbed = _synthetic(0, 400)
    table = threshold_table(pred, outputs, perturbed, TOLS)
    assert [e["tol"] for e in table] == list(TOLS)
    for e in table:
        for part, skip in (("all", False), ("without_sensitive", True)):
            n, agree, down, dd, sensitive = _loop_table(pred, outputs, perturbed, e["tol"], skip)
            got = e[part]
            assert got["resolved"] == n, (e["tol"], part)
            assert got["agreement_displaced"] == pytest.approx(agree / n), (e["tol"], part)
            assert got["displaced_given_down"] == pytest.approx(dd / down), (e["tol"], part)
        assert e["roundoff_sensitive"] == sensitive > 0
    # the numbers differ between thresholds: the table is not one row repeated
    assert len({e["all"]["agreement_displaced"] for e in table}) == len(TOLS)
    assert "without_sensitive" not in threshold_table(pred, outputs, None, TOLS)[0]


def test_roundoff_summary_by_hand():
    out = {
        "status": np.array(["ok", "ok", "ok", "infeasible"]),
        "max_drop": np.array([0.5, 0.1, 0.0, np.nan]),
    }
    rerun = {
        "status": np.array(["ok", "nonfinite", "ok", "infeasible"]),
        "max_drop": np.array([0.25, np.nan, 0.0, np.nan]),
    }
    s = roundoff_summary(out, rerun, roundoff=1e-7)
    # reruns of the 3 runs ok; one not ok; changes |0.5 - 0.25| and 0 -> max 0.25, median 0.125
    assert s == {
        "roundoff": 1e-7,
        "reruns": 3,
        "rerun_not_ok": 1,
        "max_abs_change_max_drop": 0.25,
        "median_abs_change_max_drop": 0.125,
    }


def _part(seed: int, R: int) -> dict:
    pred, outputs, perturbed = _synthetic(seed, R)
    rng = np.random.default_rng(seed + 100)
    velocity = np.where(pred == 0, -1.0, np.where(pred == 1, 1.0, 0.0))
    grid = {
        "prob_pos": rng.choice([0.2, 0.5, 0.8], R),
        "optimizer": rng.integers(0, 2, R),
        "loss_id": np.where(outputs["status"] == "ok", rng.integers(0, 4, R), -1),
        "lam": rng.choice([0.0, 4.0], R),
        "pred_velocity": np.where(pred >= 0, velocity, np.nan),
        "pred_relative": np.where(pred >= 0, -1.0, np.nan),
    }
    return {"grid": grid, "outputs": outputs, "perturbed": perturbed}


def test_regime_report_pools_the_runs_of_the_regime():
    parts = {"grid": _part(1, 300), "slice": _part(2, 200)}
    report = regime_report(parts, displacement_tol=1e-3, velocity_tol=1e-9, tols=TOLS)
    loops = {"all": [0, 0], "sgd": [0, 0], "slice": [0, 0]}  # [agreeing, resolved] (theorem4)
    counted = {"grid": 0, "slice": 0}
    for source, part in parts.items():
        g, o = part["grid"], part["outputs"]
        for r in range(g["prob_pos"].size):
            if g["prob_pos"][r] < 0.5:
                continue
            counted[source] += 1
            v = g["pred_velocity"][r]
            if o["status"][r] != "ok" or not abs(v) > 1e-9:
                continue
            agrees = (v < 0) == (o["max_drop"][r] > 1e-3)
            keys = ["all"] + (["sgd"] if g["optimizer"][r] == 0 else [])
            keys += ["slice"] if source == "slice" else []
            for k in keys:
                loops[k][0] += agrees
                loops[k][1] += 1
    t4 = report["confusion"]["theorem4"]
    for key, got in (
        ("all", t4["all"]),
        ("sgd", t4["by_optimizer"]["sgd"]),
        ("slice", t4["by_source"]["slice"]),
    ):
        assert got["resolved"] == loops[key][1], key
        assert got["agreement_displaced"] == pytest.approx(loops[key][0] / loops[key][1]), key
    assert {k: v["cells"] for k, v in report["runs"].items()} == counted
    assert [e["tol"] for e in report["thresholds"]["theorem4"]] == list(TOLS)
    assert report["thresholds"]["theorem4"][0]["all"]["resolved"] == loops["all"][1]


def test_regime_report_rejects_a_part_without_outputs():
    with pytest.raises(ValueError, match="needs 'grid' and 'outputs'"):
        regime_report({"grid": {"grid": {}}}, displacement_tol=1e-3, velocity_tol=1e-9, tols=TOLS)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_phase_controls_at_factor_one_repeat_the_sweep():
    """With factor 1 the "finer step" and "longer horizon" reruns are the runs themselves."""
    geometry = make_phase_geometry(**SMALL_GEOMETRY)
    predict = phase_predictor(geometry, sft_ratio=1.0)
    axes = pd.phase_axes(
        rhos=(0.5, 1.2),
        omegas=(1.0,),
        kappas=(0.25,),
        probs=(0.5,),
        betas=(0.1,),
        losses=("dpo", "dpo_sft"),
        optimizers=("sgd",),
        lambdas=(4.0,),
    )
    grid = pd.phase_cells(geometry, predict, axes, horizon=50.0, num_steps=60, rmsprop_lr=2e-3)
    schedule = PhaseSchedule(60, 10, 1.0)
    outputs = pd.run_phase_sweeps(geometry, grid, schedule=schedule, chunk_size=8)
    kw = dict(schedule=schedule, factor=1, seed=0, displacement_tol=1e-3)
    assert phase_controls(geometry, grid, outputs, runs=0, **kw) == {}
    got = phase_controls(geometry, grid, outputs, runs=3, **kw)
    ok = int(np.sum(outputs["status"] == "ok"))
    assert len(got["runs"]) == min(3, ok) >= 2
    for label in ("finer_step", "longer_horizon"):
        assert got[label]["max_abs_diff_max_drop"] <= BATCHING_ATOL, label
        assert got[label]["outcome_changed"] == 0 and got[label]["nonfinite"] == 0, label
