"""The phase-diagram report (sims.protocols.phase_report): codes and tables by hand, and the
report of a synthetic swept grid (random predictions and outcomes) against loops over its runs."""

import json

import numpy as np
import pytest
from _phase_setup import SMALL_GEOMETRY

from sims.protocols.phase_diagram import phase_axes
from sims.protocols.phase_flows import PHASE_AXES, phase_predictor
from sims.protocols.phase_instances import make_phase_geometry
from sims.protocols.phase_report import (
    PHASE_PREDICTIONS,
    confusion_table,
    phase_diagram_report,
    prediction_codes,
)

TOL = 1e-3  # displacement threshold of the synthetic report (nats)
GEOMETRY = SMALL_GEOMETRY
AXES = dict(
    rhos=(0.5, 1.5),
    omegas=(0.0, 1.0),
    kappas=(0.25,),
    probs=(0.2, 0.5),
    betas=(0.1, 0.5),
    losses=("dpo", "ipo"),
    optimizers=("sgd", "rmsprop_torch"),
    lambdas=(0.0,),
)


def test_prediction_codes_and_confusion_table_by_hand():
    v = np.array([-1.0, 1.0, 0.0, 1.0, np.nan])
    r = np.array([-1.0, -1.0, 0.0, 0.5, 0.0])
    assert prediction_codes(v, r, 1e-9, "theorem4").tolist() == [0, 1, 2, 1, -1]
    # relative: down if ln pi(y+) falls or some token outpaces it
    assert prediction_codes(v, r, 1e-9, "relative").tolist() == [0, 1, 2, 0, -1]
    with pytest.raises(ValueError, match="criterion must be one of"):
        prediction_codes(v, r, 1e-9, "theorem5")
    outcome = np.array([2, 0, 1, 1])  # lasting, none, transient, transient
    t = confusion_table(np.array([0, 1, 1, 0]), outcome, np.array([True, False, False, False]))
    # (down, lasting), (up, none), (down, transient) agree on "displaced"; (up, transient) not
    assert t["resolved"] == 4 and t["agreement_displaced"] == 3 / 4
    assert t["displaced_given_up"] == 1 / 2 and t["displaced_given_down"] == 1.0
    # on "lasting": (down, transient) now misses and (up, transient) agrees
    assert t["agreement_lasting"] == 3 / 4
    # below start: only run 0 went below; run 3 (down) did not
    assert t["agreement_below_start"] == 3 / 4
    empty = confusion_table(np.array([2, -1]), np.array([0, 1]), np.zeros(2, bool))
    assert empty["resolved"] == 0 and empty["agreement_displaced"] is None and empty["flat"] == 1


@pytest.fixture(scope="module")
def synthetic():
    """A real grid's axes and geometry with random predictions and outcomes per run."""
    geometry = make_phase_geometry(**GEOMETRY)
    axes = phase_axes(**AXES)
    shape = tuple(len(axes[a]) for a in PHASE_AXES)
    R = int(np.prod(shape))
    rng = np.random.default_rng(0)
    feasible = rng.random(R) < 0.8
    grid = {
        "feasible": feasible,
        "path": np.where(feasible, rng.integers(0, 3, R), -1),
        "pred_velocity": np.where(feasible, rng.normal(size=R), np.nan),
        "pred_relative": np.where(feasible, rng.normal(size=R), np.nan),
        "pred_top_gainer": np.where(feasible, rng.integers(0, 8, R), -1),
    }
    grid["pred_velocity"][feasible & (rng.random(R) < 0.1)] = 0.0  # some flat predictions
    status = np.where(feasible, np.where(rng.random(R) < 0.05, "nonfinite", "ok"), "infeasible")
    drop = np.where(rng.random(R) < 0.5, rng.uniform(0, 0.1, R), 0.0)
    final = rng.uniform(-0.1, 0.1, R)
    ok = status == "ok"
    outputs = {
        "status": status,
        "max_drop": np.where(ok, drop, np.nan),
        "final_change": np.where(ok, final, np.nan),
        "min_change": np.where(ok, np.minimum(final, -drop / 2), np.nan),
        "early_change": np.where(ok, rng.normal(size=R), np.nan),
        "drop_checkpoint": np.where(ok, rng.integers(0, 21, R), -1),
        "top_gainer_drop": np.where(ok, rng.integers(0, 8, R), -1),
        "top_gainer_end": np.where(ok, rng.integers(0, 8, R), -1),
        "opposite_mass_start": rng.random(R),
        "opposite_mass_end": rng.random(R),
        "opposite_mass_peak": rng.random(R) + 1.0,
    }
    predict = phase_predictor(geometry, sft_ratio=1.0)
    report = phase_diagram_report(
        geometry,
        predict,
        axes,
        grid,
        outputs,
        displacement_tol=TOL,
        velocity_tol=1e-9,
        num_checkpoints=20,
        boundary_points=5,
    )
    return axes, shape, grid, outputs, report


def _loop_codes(grid, outputs, r):
    """(prediction, outcome) of run ``r`` by the definitions, one run at a time."""
    if outputs["status"][r] != "ok":
        return -1, -1
    v = grid["pred_velocity"][r]
    pred = 0 if v < -1e-9 else 1 if v > 1e-9 else 2
    drop, final = outputs["max_drop"][r], outputs["final_change"][r]
    outcome = 0 if not drop > TOL else 2 if final < -TOL else 1
    return pred, outcome


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_phase_diagram_report_counts_match_a_loop_over_runs(synthetic):
    axes, shape, grid, outputs, report = synthetic
    json.dumps(report, allow_nan=False)  # JSON-ready: plain types, no NaN
    coords = np.array(list(np.ndindex(shape)))  # [R, 8] row-major
    counts = {p: {o: 0 for o in ("none", "transient", "lasting")} for p in PHASE_PREDICTIONS}
    by_loss = {0: [0, 0], 1: [0, 0]}  # loss index -> [agreeing, resolved] (theorem4)
    for r in range(coords.shape[0]):
        pred, outcome = _loop_codes(grid, outputs, r)
        if pred >= 0:
            counts[PHASE_PREDICTIONS[pred]][("none", "transient", "lasting")[outcome]] += 1
        if pred in (0, 1):
            loss = coords[r, PHASE_AXES.index("loss")]
            by_loss[loss][1] += 1
            by_loss[loss][0] += (pred == 0) == (outcome >= 1)
    assert report["confusion"]["theorem4"]["all"]["counts"] == counts
    for i, name in enumerate(AXES["losses"]):
        got = report["confusion"]["theorem4"]["by_loss"][name]
        assert got["resolved"] == by_loss[i][1]
        assert got["agreement_displaced"] == pytest.approx(by_loss[i][0] / by_loss[i][1])
    s = report["summary"]
    assert s["cells"] == coords.shape[0] and s["runs_ok"] == int(np.sum(outputs["status"] == "ok"))
    assert s["infeasible"] == int(np.sum(~grid["feasible"]))


def test_phase_diagram_report_failure_rates_match_a_loop_over_runs(synthetic):
    axes, shape, grid, outputs, report = synthetic
    coords = np.array(list(np.ndindex(shape)))
    for oi, opt in enumerate(AXES["optimizers"]):
        for a in ("rho", "beta", "loss"):
            ai = PHASE_AXES.index(a)
            for i in range(len(axes[a])):
                wrong = resolved = 0
                at = (coords[:, PHASE_AXES.index("optimizer")] == oi) & (coords[:, ai] == i)
                for r in np.flatnonzero(at):
                    pred, outcome = _loop_codes(grid, outputs, r)
                    if pred in (0, 1):
                        resolved += 1
                        wrong += (pred == 0) != (outcome >= 1)
                entry = report["failure_by_axis"][opt][a]
                assert entry["resolved"][i] == resolved, (opt, a, i)
                assert entry["failure_rate"][i] == pytest.approx(wrong / resolved), (opt, a, i)


def test_phase_plot_helpers_by_hand():
    """The figure's cell edges and JSON rows (experiments.framework.plots), by hand."""
    from experiments.framework.plots import cell_edges, nan_array

    # edges at the midpoints 0.5, 1.5, 3; the outer ones mirrored: 0 - 0.5 and 4 + (4 - 3)
    np.testing.assert_allclose(cell_edges([0.0, 1.0, 2.0, 4.0]), [-0.5, 0.5, 1.5, 3.0, 5.0])
    np.testing.assert_allclose(cell_edges([2.0]), [1.8, 2.2])  # one value: +-10% of it
    got = nan_array([[1.0, None], [None, 2.0]])
    np.testing.assert_array_equal(np.isnan(got), [[False, True], [True, False]])
