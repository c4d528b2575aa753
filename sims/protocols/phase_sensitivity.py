r"""How robust is a phase-diagram verdict: controls, thresholds, round-off, the paper's regime.

* :func:`phase_controls` -- random SGD cells rerun with a finer Euler step and a longer horizon;
* :func:`threshold_table` -- agreement of a t = 0 criterion with "displaced" when displacement
  means a drop of more than ``tol`` nats, for several ``tol``; with and without the runs whose
  outcome a round-off-sized perturbation of the start changes (:func:`roundoff_sensitive`, the
  reruns of :func:`sims.protocols.phase_flows.phase_run_fn` with ``roundoff > 0``);
* :func:`roundoff_summary` -- how far the reruns moved;
* :func:`regime_report` -- the report restricted to the paper's regime, :math:`\pi(y^+) \ge`
  :data:`PAPER_MIN_PROB` at t = 0, pooled over several swept grids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from sims.flows.sweep import run_mesh, sharded_runner
from sims.protocols.phase_flows import (
    PHASE_LOSSES,
    PHASE_OPTIMIZERS,
    PHASE_OUTCOMES,
    RUN_INPUTS,
    PhaseSchedule,
    displacement_outcomes,
    phase_run_fn,
)
from sims.protocols.phase_instances import PhaseGeometry
from sims.protocols.phase_report import PHASE_CRITERIA, confusion_table, prediction_codes

#: The paper's regime: ``y+`` already the likelier answer at t = 0, :math:`\pi(y^+) \ge 1/2`.
PAPER_MIN_PROB = 0.5


def phase_controls(
    geometry: PhaseGeometry,
    grid: dict[str, np.ndarray],
    outputs: dict[str, np.ndarray],
    *,
    schedule: PhaseSchedule,
    runs: int,
    factor: int,
    seed: int,
    displacement_tol: float,
) -> dict:
    """Rerun ``runs`` random SGD cells (generic path) with the step divided by ``factor`` (same
    checkpoint times) and with the horizon multiplied by it.

    Returns:
      ``{}`` when ``runs == 0`` or no SGD run is ok; else ``runs`` (the picked run indices) and,
      for ``finer_step`` and ``longer_horizon``, the largest change of ``max_drop``, how many
      outcomes (:func:`~sims.protocols.phase_flows.displacement_outcomes` at
      ``displacement_tol``) changed and how, and the non-finite count.
    """
    ok = np.flatnonzero((outputs["status"] == "ok") & (grid["path"] < 2))
    if runs == 0 or ok.size == 0:
        return {}
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(ok, min(runs, ok.size), replace=False))
    f = factor
    longer = PhaseSchedule(schedule.num_steps * f, schedule.record_every * f, schedule.sft_ratio)
    x = {k: grid[k][pick] for k in RUN_INPUTS}
    both = {k: np.concatenate([v, v]) for k, v in x.items()}
    both["dt"] = np.concatenate([x["dt"] / f, x["dt"]])  # finer steps; longer horizon
    runner = sharded_runner(
        phase_run_fn(geometry, "generic_sgd", longer), mesh=run_mesh(), batch_size=None
    )
    out = runner(both)
    n = pick.size
    main_outcome = displacement_outcomes(outputs, displacement_tol)[pick]
    result = {"runs": pick}
    for label, sl in (("finer_step", slice(0, n)), ("longer_horizon", slice(n, 2 * n))):
        part = {k: v[sl] for k, v in out.items()}
        codes = displacement_outcomes(part, displacement_tol)
        result[label] = {
            "max_abs_diff_max_drop": float(
                np.max(np.abs(part["max_drop"] - outputs["max_drop"][pick]))
            ),
            "outcome_changed": int(np.sum(codes != main_outcome)),
            "transitions": {
                f"{PHASE_OUTCOMES[a]}->{PHASE_OUTCOMES[b]}": int(
                    np.sum((main_outcome == a) & (codes == b))
                )
                for a in range(3)
                for b in range(3)
                if a != b
            },
            "nonfinite": int(np.sum(~np.isfinite(part["max_drop"]))),
        }
    return result


def roundoff_sensitive(
    outputs: Mapping[str, np.ndarray], perturbed: Mapping[str, np.ndarray], tol: float
) -> np.ndarray:
    """Return ``[R]`` bool: runs ok in ``outputs`` whose "displaced" (``max_drop > tol``) differs in
    the rerun ``perturbed``, or whose rerun is not ok (non-finite).

    Example:
      >>> out = {"status": np.array(["ok"] * 3), "max_drop": np.array([0.5, 1e-3, 0.0])}
      >>> rerun = {"status": np.array(["ok"] * 3), "max_drop": np.array([0.4, 2e-3, 0.0])}
      >>> roundoff_sensitive(out, rerun, 1e-3).tolist()  # 1e-3 is not > 1e-3; 2e-3 is
      [False, True, False]
    """
    ok = np.asarray(outputs["status"]) == "ok"
    again = np.asarray(perturbed["status"]) == "ok"
    flipped = (outputs["max_drop"] > tol) != (perturbed["max_drop"] > tol)
    return ok & (~again | flipped)


def threshold_table(
    pred: np.ndarray,
    outputs: Mapping[str, np.ndarray],
    perturbed: Mapping[str, np.ndarray] | None,
    tols: Sequence[float],
) -> list[dict]:
    """Return, per threshold, the confusion table of ``pred`` against "displaced" at that threshold.

    Args:
      pred: ``[R]`` :func:`~sims.protocols.phase_report.prediction_codes` (-1 where not ok).
      outputs: per-run outputs with ``status``, ``max_drop``, ``final_change``, ``min_change``.
      perturbed: the round-off reruns of the same runs (``status``, ``max_drop``), or ``None``.
      tols: thresholds (nats): "displaced" is ``max_drop > tol``, "lasting" also
        ``final_change < -tol``, "below start" ``min_change < -tol``.

    Returns:
      One dict per ``tol``: ``tol``; ``all``, :func:`~sims.protocols.phase_report.confusion_table`
      over every run; with reruns, ``roundoff_sensitive`` (resolved runs whose outcome the rerun
      changes, :func:`roundoff_sensitive`) and ``without_sensitive``, the table without them.
    """
    ok = np.asarray(outputs["status"]) == "ok"
    out = []
    for tol in tols:
        outcome = np.where(ok, displacement_outcomes(outputs, tol), -1)
        below = ok & (outputs["min_change"] < -tol)
        entry = {"tol": float(tol), "all": confusion_table(pred, outcome, below)}
        if perturbed is not None:
            sensitive = roundoff_sensitive(outputs, perturbed, tol)
            resolved = (pred >= 0) & (pred <= 1) & ok
            entry["roundoff_sensitive"] = int(np.sum(sensitive & resolved))
            keep = np.where(sensitive, -1, pred)
            entry["without_sensitive"] = confusion_table(keep, outcome, below)
            entry["agreement_roundoff"] = _agreement_bounds(entry)
        out.append(entry)
    return out


def _agreement_bounds(entry: dict) -> dict:
    """Agreement with and without the round-off-sensitive runs, each with its round-off bound.

    Only a run whose outcome a float32-round-off perturbation changes can change agreement, by
    one run each, so ``bound = roundoff_sensitive / resolved``: how far another machine's
    reduction order can move the rate (``{"value", "bound"}``, read as a rate by
    :mod:`experiments.framework.conclusions`; ``None`` over no resolved run).
    """
    bounds = {}
    for name in ("all", "without_sensitive"):
        table = entry[name]
        value, n = table["agreement_displaced"], entry["all"]["resolved"]
        bound = entry["roundoff_sensitive"] / n if n else None
        bounds[name] = None if value is None or bound is None else {"value": value, "bound": bound}
    return bounds


def roundoff_summary(
    outputs: Mapping[str, np.ndarray], perturbed: Mapping[str, np.ndarray], *, roundoff: float
) -> dict:
    """Return how far the round-off reruns moved: the number of reruns (of runs ok), how many
    were not ok, and the largest and median ``|max_drop - rerun max_drop|`` (nats)."""
    ok = np.asarray(outputs["status"]) == "ok"
    again = ok & (np.asarray(perturbed["status"]) == "ok")
    change = np.abs(outputs["max_drop"] - perturbed["max_drop"])[again]
    return {
        "roundoff": float(roundoff),
        "reruns": int(np.sum(ok)),
        "rerun_not_ok": int(np.sum(ok & ~again)),
        "max_abs_change_max_drop": float(np.max(change)) if change.size else None,
        "median_abs_change_max_drop": float(np.median(change)) if change.size else None,
    }


def regime_report(
    parts: Mapping[str, Mapping],
    *,
    displacement_tol: float,
    velocity_tol: float,
    tols: Sequence[float],
    min_prob: float = PAPER_MIN_PROB,
) -> dict:
    r"""Return the report of the runs with :math:`\pi(y^+) \ge` ``min_prob`` at t = 0, pooled.

    Args:
      parts: source name -> mapping with ``grid`` (:func:`~sims.protocols.phase_diagram.
        phase_cells`), ``outputs`` (:func:`~sims.protocols.phase_diagram.run_phase_sweeps`) and
        ``perturbed`` (the round-off reruns, or ``None``).
      displacement_tol: threshold (nats) of the confusion counts.
      velocity_tol: :math:`|v|` below which a prediction is flat.
      tols: thresholds of :func:`threshold_table`.
      min_prob: the regime's lower bound on :math:`\pi(y^+)` at t = 0.

    Returns:
      ``min_prob``; ``runs`` per source (cells in the regime, runs ok, predicted down / up by
      ``theorem4``); per criterion, ``confusion`` at ``displacement_tol`` (``all``,
      ``by_optimizer``, ``by_loss``, ``by_lam``, ``by_source``) and ``thresholds``
      (:func:`threshold_table` over all pooled runs).

    Raises:
      ValueError: a part without ``grid`` or ``outputs``.
    """
    cols: dict[str, list] = {k: [] for k in ("source", "optimizer", "loss", "lam", "velocity")}
    cols |= {k: [] for k in ("relative", "status", "max_drop", "final_change", "min_change")}
    rerun: dict[str, list] = {"status": [], "max_drop": []}
    with_reruns = all(p.get("perturbed") is not None for p in parts.values())
    runs = {}
    for source, part in parts.items():
        if "grid" not in part or "outputs" not in part:
            raise ValueError(f"part {source!r} needs 'grid' and 'outputs', got {sorted(part)}")
        g, o = part["grid"], part["outputs"]
        m = g["prob_pos"] >= min_prob
        n = int(m.sum())
        cols["source"].append(np.full(n, source, object))
        cols["optimizer"].append(np.asarray(PHASE_OPTIMIZERS, object)[g["optimizer"][m]])
        loss = np.asarray((*PHASE_LOSSES, "none"), object)[g["loss_id"][m]]  # -1: infeasible
        cols["loss"].append(loss)
        cols["lam"].append(g["lam"][m])
        cols["velocity"].append(g["pred_velocity"][m])
        cols["relative"].append(g["pred_relative"][m])
        for k in ("status", "max_drop", "final_change", "min_change"):
            cols[k].append(o[k][m])
        if with_reruns:
            for k in rerun:
                rerun[k].append(part["perturbed"][k][m])
        ok = o["status"][m] == "ok"
        t4 = prediction_codes(
            g["pred_velocity"][m], g["pred_relative"][m], velocity_tol, "theorem4"
        )
        runs[source] = {
            "cells": n,
            "runs_ok": int(ok.sum()),
            "predicted_down": int(np.sum(ok & (t4 == 0))),
            "predicted_up": int(np.sum(ok & (t4 == 1))),
        }
    c = {k: np.concatenate(v) for k, v in cols.items()}
    outputs = {k: c[k] for k in ("status", "max_drop", "final_change", "min_change")}
    perturbed = {k: np.concatenate(v) for k, v in rerun.items()} if with_reruns else None
    ok = c["status"] == "ok"
    outcome = np.where(ok, displacement_outcomes(outputs, displacement_tol), -1)
    below = ok & (c["min_change"] < -displacement_tol)
    report = {"min_prob": float(min_prob), "runs": runs, "confusion": {}, "thresholds": {}}
    for criterion in PHASE_CRITERIA:
        pred = prediction_codes(c["velocity"], c["relative"], velocity_tol, criterion)
        pred = np.where(ok, pred, -1)

        def by(labels, pred=pred):
            return {
                f"{v:g}" if isinstance(v, float) else str(v): confusion_table(
                    pred[labels == v], outcome[labels == v], below[labels == v]
                )
                for v in dict.fromkeys(labels[ok].tolist())
            }

        report["confusion"][criterion] = {
            "all": confusion_table(pred, outcome, below),
            **{f"by_{k}": by(c[k]) for k in ("optimizer", "loss", "lam", "source")},
        }
        report["thresholds"][criterion] = threshold_table(pred, outputs, perturbed, tols)
    return report
