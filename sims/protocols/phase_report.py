r"""The report of a swept phase-diagram grid: confusion tables, failures by axis, mass, panels.

:func:`phase_diagram_report` turns the per-run outputs of :func:`sims.protocols.phase_diagram.
run_phase_sweeps` into JSON-ready summaries: confusion tables of each t = 0 criterion
(:data:`PHASE_CRITERIA`) against the observed outcome (:func:`~sims.protocols.phase_flows.
displacement_outcomes`), failure rates per axis value, where the mass went, and heatmap slices
with fine-grid criterion boundaries.

Criteria (both from :func:`sims.protocols.phase_flows.phase_prediction`):

* ``theorem4``: the sign of :math:`\frac{d}{dt}\ln\pi(y^+)` at t = 0 (Razin et al. 2024,
  Theorem 4);
* ``relative``: "down" also where some token's log-probability grows faster than
  :math:`\ln\pi(y^+)` at t = 0 (Theorem 5 / the kernel corollary), i.e.
  :math:`\frac{d}{dt}\ln\pi(y^+) < 0` or :math:`\max_z\frac{d}{dt}(\ln\pi_z - \ln\pi(y^+)) > 0`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sims.protocols.phase_flows import (
    PHASE_AXES,
    PHASE_LOSSES,
    PHASE_OPTIMIZERS,
    PHASE_OUTCOMES,
    PHASE_PATHS,
    PREDICTION_INPUTS,
    displacement_outcomes,
    grid_cells,
)
from sims.protocols.phase_instances import TOKEN_CATEGORIES, PhaseGeometry, token_category

PHASE_PREDICTIONS = ("down", "up", "flat")  # predicted direction of ln pi(y+)
PHASE_CRITERIA = ("theorem4", "relative")
GEOMETRY_AXES = PHASE_AXES[:4]  # heatmap slices fix these at their middle value, the rest first
EARLY_TOL = 1e-12  # |first-checkpoint change| (nats) below which its sign is not compared
#: Heatmap panels: (loss, optimizer, x axis, y axis); kept when the loss and optimizer are swept.
PHASE_PANELS = (
    ("dpo", "sgd", "rho", "omega"),
    ("ipo", "sgd", "rho", "omega"),
    ("slic", "sgd", "rho", "omega"),
    ("dpo_sft", "sgd", "rho", "omega"),
    ("dpo", "rmsprop_torch", "rho", "omega"),
    ("dpo", "sgd", "kappa", "prob_pos"),
    ("dpo", "sgd", "rho", "kappa"),
    ("dpo", "sgd", "omega", "lam"),
)


def prediction_codes(velocity, relative, tol: float, criterion: str) -> np.ndarray:
    r"""Return the :data:`PHASE_PREDICTIONS` code per run: 0 down, 1 up, 2 flat, -1 NaN.

    Args:
      velocity: ``[R]`` predicted :math:`\frac{d}{dt}\ln\pi(y^+)` (in units of the margin rate).
      relative: ``[R]`` :math:`\max_{z\ne y^+}\frac{d}{dt}(\ln\pi_z - \ln\pi(y^+))`, same
        units.
      tol: magnitude below which a sign is not resolved (flat).
      criterion: one of :data:`PHASE_CRITERIA`.

    Raises:
      ValueError: an unknown ``criterion``.

    Example:
      >>> prediction_codes([-1.0, 1.0, 0.0, 1.0], [-1.0, -1.0, 0.0, 0.5], 1e-9, "relative")
      array([0, 1, 2, 0])
    """
    if criterion not in PHASE_CRITERIA:
        raise ValueError(f"criterion must be one of {PHASE_CRITERIA}, got {criterion!r}")
    v, r = np.asarray(velocity), np.asarray(relative)
    if criterion == "theorem4":
        codes = np.where(v < -tol, 0, np.where(v > tol, 1, 2))
    else:
        codes = np.where((v < -tol) | (r > tol), 0, np.where((v > tol) & (r < -tol), 1, 2))
    return np.where(np.isfinite(v) & np.isfinite(r), codes, -1)


def _rate(num, den) -> float | None:
    return float(num / den) if den else None


def confusion_table(pred: np.ndarray, outcome: np.ndarray, below_start: np.ndarray) -> dict:
    r"""Return the confusion counts of prediction vs outcome, and agreement rates.

    Args:
      pred: ``[R]`` :func:`prediction_codes`.
      outcome: ``[R]`` :func:`~sims.protocols.phase_flows.displacement_outcomes` codes.
      below_start: ``[R]`` bool, :math:`\ln\pi(y^+)` ever below its start by more than the tol.

    Returns:
      ``counts[prediction][outcome]``; ``resolved`` (predicted down or up, outcome known) and
      ``flat`` run counts; over resolved runs, ``agreement_displaced`` = (down and displaced + up
      and not displaced) / resolved, likewise ``agreement_below_start`` and
      ``agreement_lasting``; ``displaced_given_down`` / ``_up``. A rate over no run is ``None``.

    Example:
      >>> t = confusion_table(np.array([0, 1, 1, 0]), np.array([2, 0, 1, 1]), np.zeros(4, bool))
      >>> t["resolved"], t["agreement_displaced"], t["displaced_given_up"]
      (4, 0.75, 0.5)
    """
    counts = {
        p: {o: int(np.sum((pred == i) & (outcome == j))) for j, o in enumerate(PHASE_OUTCOMES)}
        for i, p in enumerate(PHASE_PREDICTIONS)
    }
    resolved = (pred <= 1) & (pred >= 0) & (outcome >= 0)
    n = int(np.sum(resolved))
    down, up = resolved & (pred == 0), resolved & (pred == 1)

    def agreement(event):
        return _rate(np.sum(down & event) + np.sum(up & ~event), n)

    return {
        "counts": counts,
        "resolved": n,
        "flat": int(np.sum((pred == 2) & (outcome >= 0))),
        "agreement_displaced": agreement(outcome >= 1),
        "agreement_below_start": agreement(below_start),
        "agreement_lasting": agreement(outcome == 2),
        "displaced_given_down": _rate(np.sum(down & (outcome >= 1)), np.sum(down)),
        "displaced_given_up": _rate(np.sum(up & (outcome >= 1)), np.sum(up)),
    }


def _none_where_nan(a) -> list:
    a = np.asarray(a, np.float64)
    return np.where(np.isfinite(a), a, None).tolist()


def _base_index(axis: str, n: int) -> int:
    return n // 2 if axis in GEOMETRY_AXES else 0


def _slice(full: np.ndarray, shape, x: str, y: str, fixed: dict) -> np.ndarray:
    """``[ny, nx]`` slice of a flat grid array (row-major over the axes) at ``fixed``."""
    index = tuple(slice(None) if a in (x, y) else fixed[a] for a in PHASE_AXES)
    part = np.asarray(full).reshape(shape)[index]  # dims in axis order of (x, y)
    return part.T if PHASE_AXES.index(x) < PHASE_AXES.index(y) else part


def _boundaries(geometry, predict, axes, specs, points: int) -> list[dict]:
    """Both criteria's t = 0 numbers on each panel's fine grid (one prediction call for all).

    ``theorem4`` is the predicted velocity of ln pi(y+); ``relative`` is ``max(-velocity,
    relative)``, negative exactly where the relative criterion predicts "up".
    """
    requests = []
    for loss, optimizer, x, y in specs:
        values = {}
        for a in PHASE_AXES:
            if a == "loss":
                values[a] = np.array([PHASE_LOSSES.index(loss)], np.int32)
            elif a == "optimizer":
                values[a] = np.array([PHASE_OPTIMIZERS.index(optimizer)])
            elif a in (x, y) and len(axes[a]) > 1:
                values[a] = np.linspace(axes[a].min(), axes[a].max(), points)
            else:
                values[a] = np.array([axes[a][_base_index(a, len(axes[a]))]])
        cell, ok, shape = grid_cells(geometry, values)
        requests.append((values, shape, ok, cell))
    stacked = {k: np.concatenate([c[k][ok] for _, _, ok, c in requests]) for k in PREDICTION_INPUTS}
    pred = predict(stacked)
    out, at = [], 0
    for (values, shape, ok, _), (_, _, x, y) in zip(requests, specs, strict=True):
        n = int(ok.sum())
        entry = {"x": values[x].tolist(), "y": values[y].tolist()}
        velocity, relative = np.full(ok.shape, np.nan), np.full(ok.shape, np.nan)
        velocity[ok], relative[ok] = pred["velocity"][at : at + n], pred["relative"][at : at + n]
        at += n
        fixed = dict.fromkeys(PHASE_AXES, 0)
        entry["theorem4"] = _none_where_nan(_slice(velocity, shape, x, y, fixed))
        both = np.maximum(-velocity, relative)
        entry["relative"] = _none_where_nan(_slice(both, shape, x, y, fixed))
        out.append(entry)
    return out


class _Grid:
    """Per-run coordinates and labels of a grid (row-major over :data:`PHASE_AXES`)."""

    def __init__(self, axes: dict[str, np.ndarray]):
        self.axes = axes
        self.shape = tuple(len(axes[a]) for a in PHASE_AXES)
        self.coords = dict(
            zip(PHASE_AXES, np.indices(self.shape).reshape(len(PHASE_AXES), -1), strict=True)
        )
        self.names = {
            "loss": [PHASE_LOSSES[i] for i in axes["loss"]],
            "optimizer": [PHASE_OPTIMIZERS[i] for i in axes["optimizer"]],
        }

    def labels(self, axis: str) -> list[str]:
        return self.names.get(axis) or [f"{v:g}" for v in self.axes[axis]]

    def value(self, axis: str, i: int):
        return self.names[axis][i] if axis in self.names else float(self.axes[axis][i])


def _confusion(g: _Grid, grid, pred, outcome, below) -> dict:
    c = g.coords

    def by(axis):
        return {
            label: confusion_table(pred[c[axis] == i], outcome[c[axis] == i], below[c[axis] == i])
            for i, label in enumerate(g.labels(axis))
        }

    groups = {}
    for li, loss in enumerate(g.names["loss"]):
        for oi, opt in enumerate(g.names["optimizer"]):
            for ki, lam in enumerate(g.axes["lam"]):
                m = (c["loss"] == li) & (c["optimizer"] == oi) & (c["lam"] == ki)
                entry = confusion_table(pred[m], outcome[m], below[m])
                entry["path"] = [
                    PHASE_PATHS[p] for p in np.unique(grid["path"][m & grid["feasible"]])
                ]
                groups[f"{loss}/{opt}/lam={lam:g}"] = entry
    return {
        "all": confusion_table(pred, outcome, below),
        **{f"by_{a}": by(a) for a in ("loss", "optimizer", "lam", "beta")},
        "by_group": groups,
    }


def _failures(g: _Grid, pred, outcome) -> tuple[dict, dict]:
    """Failure rate of the theorem4 sign per optimizer and axis value, and per (loss, optimizer)
    along omega."""
    c = g.coords
    resolved = (pred >= 0) & (pred <= 1) & (outcome >= 0)
    wrong = resolved & ((pred == 0) != (outcome >= 1))

    def failure_rate(mask):
        return _rate(np.sum(wrong & mask), np.sum(resolved & mask))

    failure = {
        opt: {
            a: {
                "values": g.names.get(a) or g.axes[a].tolist(),
                "failure_rate": [
                    failure_rate((c["optimizer"] == oi) & (c[a] == i))
                    for i in range(len(g.axes[a]))
                ],
                "resolved": [
                    int(np.sum(resolved & (c["optimizer"] == oi) & (c[a] == i)))
                    for i in range(len(g.axes[a]))
                ],
            }
            for a in PHASE_AXES
            if a != "optimizer"
        }
        for oi, opt in enumerate(g.names["optimizer"])
    }
    vs_omega = {
        f"{loss}/{opt}": [
            failure_rate((c["loss"] == li) & (c["optimizer"] == oi) & (c["omega"] == i))
            for i in range(len(g.axes["omega"]))
        ]
        for li, loss in enumerate(g.names["loss"])
        for oi, opt in enumerate(g.names["optimizer"])
    }
    return failure, vs_omega


def _early(g: _Grid, pred, outcome, outputs) -> dict:
    """Control (1): the first checkpoint's sign against the prediction, per optimizer."""
    resolved = (pred >= 0) & (pred <= 1) & (outcome >= 0)
    early = {}
    for oi, opt in enumerate(g.names["optimizer"]):
        m = resolved & (g.coords["optimizer"] == oi) & (np.abs(outputs["early_change"]) > EARLY_TOL)
        same = np.sign(outputs["early_change"][m]) == np.where(pred[m] == 0, -1.0, 1.0)
        early[opt] = {"agreement": _rate(np.sum(same), np.sum(m)), "compared": int(np.sum(m))}
    return early


def _mass(g: _Grid, geometry, grid, outputs, pred, outcome, ok, num_checkpoints) -> tuple:
    """Where the mass went in displaced runs, and when the deepest drop came."""
    displaced = ok & (outcome >= 1)
    category = token_category(np.maximum(outputs["top_gainer_drop"], 0), geometry)
    predicted = token_category(np.maximum(grid["pred_top_gainer"], 0), geometry)
    category_end = token_category(np.maximum(outputs["top_gainer_end"], 0), geometry)
    gain = outputs["opposite_mass_peak"] - outputs["opposite_mass_start"]
    gain_end = outputs["opposite_mass_end"] - outputs["opposite_mass_start"]
    drop_fraction = outputs["drop_checkpoint"] / num_checkpoints
    mass, timing = {}, {}
    for oi, opt in enumerate(g.names["optimizer"]):
        m = displaced & (g.coords["optimizer"] == oi)
        mass[opt] = {
            "displaced_runs": int(np.sum(m)),
            "top_gainer_at_drop": {
                c: int(np.sum(m & (category == k))) for k, c in enumerate(TOKEN_CATEGORIES)
            },
            "top_gainer_at_end": {
                c: int(np.sum(m & (category_end == k))) for k, c in enumerate(TOKEN_CATEGORIES)
            },
            "theorem5_top_gainer_matches": _rate(np.sum(m & (category == predicted)), np.sum(m)),
            "mean_opposite_peak_gain": _rate(np.sum(gain[m]), np.sum(m)),
            "mean_opposite_end_gain": _rate(np.sum(gain_end[m]), np.sum(m)),
        }
        # when the deepest point comes, as a fraction of the run, per (prediction, outcome)
        for pi_, p in enumerate(PHASE_PREDICTIONS[:2]):
            for oi_, o in enumerate(PHASE_OUTCOMES[1:], start=1):
                sel = m & (pred == pi_) & (outcome == oi_)
                when = drop_fraction[sel]
                timing[f"{opt}/{p}/{o}"] = {
                    "runs": int(sel.sum()),
                    "median": float(np.median(when)) if when.size else None,
                    "q10": float(np.quantile(when, 0.1)) if when.size else None,
                    "q90": float(np.quantile(when, 0.9)) if when.size else None,
                }
    return mass, timing


def _panels(g: _Grid, geometry, predict, outputs, outcome, ok, points: int) -> list[dict]:
    """Heatmap slices of :data:`PHASE_PANELS` whose loss and optimizer are on the grid."""
    specs = [s for s in PHASE_PANELS if s[0] in g.names["loss"] and s[1] in g.names["optimizer"]]
    boundaries = _boundaries(geometry, predict, g.axes, specs, points)
    panels = []
    for (loss, opt, x, y), boundary in zip(specs, boundaries, strict=True):
        fixed = {a: _base_index(a, len(g.axes[a])) for a in PHASE_AXES}
        fixed["loss"] = g.names["loss"].index(loss)
        fixed["optimizer"] = g.names["optimizer"].index(opt)
        drop = np.where(ok, outputs["max_drop"], np.nan)
        panels.append(
            {
                "loss": loss,
                "optimizer": opt,
                "x": x,
                "y": y,
                "x_values": g.axes[x].tolist(),
                "y_values": g.axes[y].tolist(),
                "fixed": {a: g.value(a, fixed[a]) for a in PHASE_AXES if a not in (x, y)},
                "max_drop": _none_where_nan(_slice(drop, g.shape, x, y, fixed)),
                "outcome": _slice(outcome, g.shape, x, y, fixed).tolist(),
                "boundary": boundary,
            }
        )
    return panels


def phase_diagram_report(
    geometry: PhaseGeometry,
    predict: Callable[[dict], dict[str, np.ndarray]],
    axes: dict[str, np.ndarray],
    grid: dict[str, np.ndarray],
    outputs: dict[str, np.ndarray],
    *,
    displacement_tol: float,
    velocity_tol: float,
    num_checkpoints: int,
    boundary_points: int,
) -> dict:
    """Return the JSON-ready report of a swept grid (see the module docstring).

    Args:
      geometry: the :class:`~sims.protocols.phase_instances.PhaseGeometry`.
      predict: :func:`~sims.protocols.phase_flows.phase_predictor`'s function (its compile is
        reused for the panels' boundaries).
      axes: :func:`~sims.protocols.phase_diagram.phase_axes`.
      grid: :func:`~sims.protocols.phase_diagram.phase_cells`.
      outputs: :func:`~sims.protocols.phase_diagram.run_phase_sweeps`.
      displacement_tol: drop (nats) that counts as displacement.
      velocity_tol: :math:`|v|` below which a prediction is flat.
      num_checkpoints: checkpoints per run after t = 0 (for the drop's time fraction).
      boundary_points: fine-grid points per axis of the panels' criterion boundaries.

    Returns:
      ``grid`` (axis values), ``vocab_size``, ``feasible`` (over the geometry axes),
      ``confusion`` (per criterion: ``all``, ``by_loss``, ``by_optimizer``, ``by_lam``,
      ``by_beta``, ``by_group`` with the path), ``failure_by_axis``, ``failure_vs_omega``,
      ``early_change_vs_prediction``, ``mass``, ``drop_time_fraction``, ``panels``,
      ``nonfinite_runs`` (up to 20) and ``summary``.
    """
    g = _Grid(axes)
    ok = outputs["status"] == "ok"
    preds = {
        c: np.where(
            ok,
            prediction_codes(grid["pred_velocity"], grid["pred_relative"], velocity_tol, c),
            -1,
        )
        for c in PHASE_CRITERIA
    }
    outcome = np.where(ok, displacement_outcomes(outputs, displacement_tol), -1)
    below = ok & (outputs["min_change"] < -displacement_tol)
    confusion = {c: _confusion(g, grid, pred, outcome, below) for c, pred in preds.items()}
    pred = preds["theorem4"]
    failure, failure_vs_omega = _failures(g, pred, outcome)
    mass, timing = _mass(g, geometry, grid, outputs, pred, outcome, ok, num_checkpoints)
    status = outputs["status"]
    nonfinite = np.flatnonzero(status == "nonfinite")
    summary = {
        "cells": int(status.size),
        "infeasible": int(np.sum(status == "infeasible")),
        "runs_ok": int(np.sum(ok)),
        "nonfinite": int(nonfinite.size),
        "runs_by_path": {p: int(np.sum(grid["path"] == i)) for i, p in enumerate(PHASE_PATHS)},
    }
    for c in PHASE_CRITERIA:
        t = confusion[c]["all"]
        summary[c] = {
            **{k: t[k] for k in ("resolved", "agreement_displaced", "agreement_lasting")},
            **{k: t[k] for k in ("displaced_given_down", "displaced_given_up")},
            **{
                f"agreement_by_{label}": {
                    k: v["agreement_displaced"] for k, v in confusion[c][f"by_{a}"].items()
                }
                for label, a in (("optimizer", "optimizer"), ("loss", "loss"), ("kernel", "lam"))
            },
        }
    return {
        "grid": {a: g.labels(a) if a in g.names else axes[a].tolist() for a in PHASE_AXES},
        "vocab_size": geometry.vocab_size,
        "feasible": grid["feasible"].reshape(g.shape)[:, :, :, :, 0, 0, 0, 0].tolist(),
        "confusion": confusion,
        "failure_by_axis": failure,
        "failure_vs_omega": failure_vs_omega,
        "early_change_vs_prediction": _early(g, pred, outcome, outputs),
        "mass": mass,
        "drop_time_fraction": timing,
        "panels": _panels(g, geometry, predict, outputs, outcome, ok, boundary_points),
        "nonfinite_runs": [
            {a: g.value(a, g.coords[a][r]) for a in PHASE_AXES} for r in nonfinite[:20]
        ],
        "summary": summary,
    }
