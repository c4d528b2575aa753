r"""Tables and figure of the displacement phase diagram (experiments/displacement_phase_diagram).

:func:`analyse` turns the per-run sweep outputs into JSON-ready summaries: confusion tables of each
t = 0 criterion (:data:`CRITERIA`) against the observed outcome, failure rates per axis value,
where the mass went, and heatmap slices with fine-grid criterion boundaries;
:func:`experiments._phase_plot.plot` draws the figure from that JSON alone.

Criteria (both from :func:`experiments._phase_diagram.prediction`):

* ``theorem4``: the sign of :math:`\frac{d}{dt}\ln\pi(y^+)` at t = 0 (fixed before the first run);
* ``relative`` (added after the first run, exploratory): "down" also where some token's
  log-probability grows faster than :math:`\ln\pi(y^+)` at t = 0 (Theorem 5 / the kernel
  corollary), i.e. :math:`\frac{d}{dt}\ln\pi(y^+) < 0` or :math:`\max_z\frac{d}{dt}(\ln\pi_z
  - \ln\pi(y^+)) > 0`.
"""

from __future__ import annotations

import numpy as np

from experiments import _phase_diagram as ph
from experiments import _phase_instances as pi
from experiments._phase_diagram import AXES, OPTIMIZERS, OUTCOMES, outcome_codes

PREDICTIONS = ("down", "up", "flat")  # predicted direction of ln pi(y+)
CRITERIA = ("theorem4", "relative")
GEOMETRY_AXES = AXES[:4]  # heatmap slices fix these at their middle value, the rest at the first
EARLY_TOL = 1e-12  # |first-checkpoint change| (nats) below which its sign is not compared
#: Heatmap panels: (loss, optimizer, x axis, y axis); kept when the loss and optimizer are swept.
PANEL_SPECS = (
    ("dpo", "sgd", "rho", "omega"),
    ("ipo", "sgd", "rho", "omega"),
    ("slic", "sgd", "rho", "omega"),
    ("dpo_sft", "sgd", "rho", "omega"),
    ("dpo", "rmsprop_torch", "rho", "omega"),
    ("dpo", "sgd", "kappa", "prob_pos"),
    ("dpo", "sgd", "rho", "kappa"),
    ("dpo", "sgd", "omega", "lam"),
)
LABELS = {
    "rho": "rho = <W+, W-> / |W+|^2",
    "omega": "omega = |(W+ - W-) perp W+| / |W+|",
    "kappa": "kappa = |h0|^2 / |W+|^2",
    "prob_pos": "pi(y+) at t = 0",
    "lam": "kernel gain lambda (lambda_eff = 1 + lambda)",
}


def prediction_codes(velocity, relative, tol: float, criterion: str) -> np.ndarray:
    """0 down, 1 up, 2 flat, -1 NaN, per :data:`CRITERIA` (``tol`` resolves a sign)."""
    v, r = np.asarray(velocity), np.asarray(relative)
    if criterion == "theorem4":
        codes = np.where(v < -tol, 0, np.where(v > tol, 1, 2))
    else:
        codes = np.where((v < -tol) | (r > tol), 0, np.where((v > tol) & (r < -tol), 1, 2))
    return np.where(np.isfinite(v) & np.isfinite(r), codes, -1)


def _rate(num, den):
    return float(num / den) if den else None


def table(pred: np.ndarray, outcome: np.ndarray, below_start: np.ndarray) -> dict:
    """Confusion counts of prediction vs outcome, and agreement rates over resolved runs."""
    counts = {
        p: {o: int(np.sum((pred == i) & (outcome == j))) for j, o in enumerate(OUTCOMES)}
        for i, p in enumerate(PREDICTIONS)
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
    """``[ny, nx]`` slice of a flat grid array (row-major over :data:`AXES`) at ``fixed``."""
    index = tuple(slice(None) if a in (x, y) else fixed[a] for a in AXES)
    part = np.asarray(full).reshape(shape)[index]  # dims in AXES order of (x, y)
    return part.T if AXES.index(x) < AXES.index(y) else part


def _boundaries(config, geometry, predict, axes, specs) -> list[dict]:
    """Both criteria's t = 0 numbers on each panel's fine grid (one prediction call for all).

    ``theorem4`` is the predicted velocity of ln pi(y+); ``relative`` is ``max(-velocity,
    relative)``, negative exactly where the relative criterion predicts "up".
    """
    requests = []
    for loss, optimizer, x, y in specs:
        values = {}
        for a in AXES:
            if a == "loss":
                values[a] = np.array([ph.LOSS_NAMES.index(loss)])
            elif a == "optimizer":
                values[a] = np.array([OPTIMIZERS.index(optimizer)])
            elif a in (x, y) and len(axes[a]) > 1:
                values[a] = np.linspace(axes[a].min(), axes[a].max(), config.boundary_points)
            else:
                values[a] = np.array([axes[a][_base_index(a, len(axes[a]))]])
        solved = pi.cell_inputs(*(values[a] for a in GEOMETRY_AXES), geometry=geometry)
        shape = tuple(len(values[a]) for a in AXES)
        index = np.indices(shape).reshape(len(AXES), -1)
        cell = {a: values[a][i] for a, i in zip(AXES, index, strict=True)}
        geo = tuple(index[:4])
        cell["phi"], cell["cos"] = solved["phi"][geo], solved["cos"][geo]
        cell["loss_id"] = cell["loss"].astype(np.int32)
        requests.append((values, shape, solved["feasible"][geo], cell))
    stacked = {
        k: np.concatenate([c[k][ok] for _, _, ok, c in requests]) for k in ph.PREDICTION_INPUTS
    }
    pred = predict(stacked)
    out, at = [], 0
    for (values, shape, ok, _), (_, _, x, y) in zip(requests, specs, strict=True):
        n = int(ok.sum())
        entry = {"x": values[x].tolist(), "y": values[y].tolist()}
        velocity, relative = np.full(ok.shape, np.nan), np.full(ok.shape, np.nan)
        velocity[ok], relative[ok] = pred["velocity"][at : at + n], pred["relative"][at : at + n]
        at += n
        fixed = dict.fromkeys(AXES, 0)
        entry["theorem4"] = _none_where_nan(_slice(velocity, shape, x, y, fixed))
        both = np.maximum(-velocity, relative)
        entry["relative"] = _none_where_nan(_slice(both, shape, x, y, fixed))
        out.append(entry)
    return out


def _value(axes, names, axis, i):
    return names[axis][i] if axis in names else float(axes[axis][i])


def analyse(config, geometry, predict, axes: dict, grid: dict, outputs: dict) -> dict:
    """Return the JSON-ready analysis of a swept grid (see the module docstring); ``predict`` is
    :func:`experiments._phase_diagram.make_predictor`'s function (its compile is reused)."""
    tol = config.displacement_tol
    ok = outputs["status"] == "ok"
    preds = {
        c: np.where(
            ok,
            prediction_codes(grid["pred_velocity"], grid["pred_relative"], config.velocity_tol, c),
            -1,
        )
        for c in CRITERIA
    }
    outcome = np.where(ok, outcome_codes(outputs, tol), -1)
    below = ok & (outputs["min_change"] < -tol)
    shape = tuple(len(axes[a]) for a in AXES)
    coords = dict(zip(AXES, np.indices(shape).reshape(len(AXES), -1), strict=True))
    names = {
        "loss": [ph.LOSS_NAMES[i] for i in axes["loss"]],
        "optimizer": [OPTIMIZERS[i] for i in axes["optimizer"]],
    }

    def labels(axis):
        return names.get(axis) or [f"{v:g}" for v in axes[axis]]

    def by(pred, axis):
        return {
            label: table(
                pred[coords[axis] == i], outcome[coords[axis] == i], below[coords[axis] == i]
            )
            for i, label in enumerate(labels(axis))
        }

    confusion = {}
    for c, pred in preds.items():
        groups = {}
        for li, loss in enumerate(names["loss"]):
            for oi, opt in enumerate(names["optimizer"]):
                for ki, lam in enumerate(axes["lam"]):
                    m = (coords["loss"] == li) & (coords["optimizer"] == oi) & (coords["lam"] == ki)
                    entry = table(pred[m], outcome[m], below[m])
                    entry["path"] = [
                        ph.PATHS[p] for p in np.unique(grid["path"][m & grid["feasible"]])
                    ]
                    groups[f"{loss}/{opt}/lam={lam:g}"] = entry
        confusion[c] = {
            "all": table(pred, outcome, below),
            **{f"by_{a}": by(pred, a) for a in ("loss", "optimizer", "lam", "beta")},
            "by_group": groups,
        }
    pred = preds["theorem4"]
    resolved = (pred >= 0) & (pred <= 1) & (outcome >= 0)
    wrong = resolved & ((pred == 0) != (outcome >= 1))

    def failure_rate(mask):
        return _rate(np.sum(wrong & mask), np.sum(resolved & mask))

    failure = {
        opt: {
            a: {
                "values": names.get(a) or axes[a].tolist(),
                "failure_rate": [
                    failure_rate((coords["optimizer"] == oi) & (coords[a] == i))
                    for i in range(len(axes[a]))
                ],
                "resolved": [
                    int(np.sum(resolved & (coords["optimizer"] == oi) & (coords[a] == i)))
                    for i in range(len(axes[a]))
                ],
            }
            for a in AXES
            if a != "optimizer"
        }
        for oi, opt in enumerate(names["optimizer"])
    }
    failure_vs_omega = {
        f"{loss}/{opt}": [
            failure_rate(
                (coords["loss"] == li) & (coords["optimizer"] == oi) & (coords["omega"] == i)
            )
            for i in range(len(axes["omega"]))
        ]
        for li, loss in enumerate(names["loss"])
        for oi, opt in enumerate(names["optimizer"])
    }
    early = {}
    for oi, opt in enumerate(names["optimizer"]):
        m = resolved & (coords["optimizer"] == oi) & (np.abs(outputs["early_change"]) > EARLY_TOL)
        same = np.sign(outputs["early_change"][m]) == np.where(pred[m] == 0, -1.0, 1.0)
        early[opt] = {"agreement": _rate(np.sum(same), np.sum(m)), "compared": int(np.sum(m))}
    displaced = ok & (outcome >= 1)
    category = pi.token_category(np.maximum(outputs["top_gainer_drop"], 0), geometry)
    predicted = pi.token_category(np.maximum(grid["pred_top_gainer"], 0), geometry)
    category_end = pi.token_category(np.maximum(outputs["top_gainer_end"], 0), geometry)
    gain = outputs["opposite_mass_peak"] - outputs["opposite_mass_start"]
    gain_end = outputs["opposite_mass_end"] - outputs["opposite_mass_start"]
    drop_fraction = outputs["drop_checkpoint"] / (config.num_steps // config.record_every)
    mass, timing = {}, {}
    for oi, opt in enumerate(names["optimizer"]):
        m = displaced & (coords["optimizer"] == oi)
        mass[opt] = {
            "displaced_runs": int(np.sum(m)),
            "top_gainer_at_drop": {
                c: int(np.sum(m & (category == k))) for k, c in enumerate(pi.CATEGORIES)
            },
            "top_gainer_at_end": {
                c: int(np.sum(m & (category_end == k))) for k, c in enumerate(pi.CATEGORIES)
            },
            "theorem5_top_gainer_matches": _rate(np.sum(m & (category == predicted)), np.sum(m)),
            "mean_opposite_peak_gain": _rate(np.sum(gain[m]), np.sum(m)),
            "mean_opposite_end_gain": _rate(np.sum(gain_end[m]), np.sum(m)),
        }
        # when the deepest point comes, as a fraction of the run, per (prediction, outcome)
        for pi_, p in enumerate(PREDICTIONS[:2]):
            for oi_, o in enumerate(OUTCOMES[1:], start=1):
                sel = m & (pred == pi_) & (outcome == oi_)
                when = drop_fraction[sel]
                timing[f"{opt}/{p}/{o}"] = {
                    "runs": int(sel.sum()),
                    "median": float(np.median(when)) if when.size else None,
                    "q10": float(np.quantile(when, 0.1)) if when.size else None,
                    "q90": float(np.quantile(when, 0.9)) if when.size else None,
                }
    specs = [s for s in PANEL_SPECS if s[0] in config.losses and s[1] in config.optimizers]
    panels = []
    for (loss, opt, x, y), boundary in zip(
        specs, _boundaries(config, geometry, predict, axes, specs), strict=True
    ):
        fixed = {a: _base_index(a, len(axes[a])) for a in AXES}
        fixed["loss"], fixed["optimizer"] = config.losses.index(loss), config.optimizers.index(opt)
        panels.append(
            {
                "loss": loss,
                "optimizer": opt,
                "x": x,
                "y": y,
                "x_values": axes[x].tolist(),
                "y_values": axes[y].tolist(),
                "fixed": {a: _value(axes, names, a, fixed[a]) for a in AXES if a not in (x, y)},
                "max_drop": _none_where_nan(
                    _slice(np.where(ok, outputs["max_drop"], np.nan), shape, x, y, fixed)
                ),
                "outcome": _slice(outcome, shape, x, y, fixed).tolist(),
                "boundary": boundary,
            }
        )
    status = outputs["status"]
    nonfinite = np.flatnonzero(status == "nonfinite")
    summary = {
        "cells": int(status.size),
        "infeasible": int(np.sum(status == "infeasible")),
        "runs_ok": int(np.sum(ok)),
        "nonfinite": int(nonfinite.size),
        "runs_by_path": {p: int(np.sum(grid["path"] == i)) for i, p in enumerate(ph.PATHS)},
    }
    for c in CRITERIA:
        t = confusion[c]["all"]
        summary[c] = {
            **{k: t[k] for k in ("resolved", "agreement_displaced", "agreement_lasting")},
            **{k: t[k] for k in ("displaced_given_down", "displaced_given_up")},
            "agreement_by_optimizer": {
                k: v["agreement_displaced"] for k, v in confusion[c]["by_optimizer"].items()
            },
            "agreement_by_loss": {
                k: v["agreement_displaced"] for k, v in confusion[c]["by_loss"].items()
            },
            "agreement_by_kernel": {
                k: v["agreement_displaced"] for k, v in confusion[c]["by_lam"].items()
            },
        }
    return {
        "grid": {a: labels(a) if a in names else axes[a].tolist() for a in AXES},
        "vocab_size": geometry.vocab_size,
        "feasible": grid["feasible"].reshape(shape)[:, :, :, :, 0, 0, 0, 0].tolist(),
        "confusion": confusion,
        "failure_by_axis": failure,
        "failure_vs_omega": failure_vs_omega,
        "early_change_vs_prediction": early,
        "mass": mass,
        "drop_time_fraction": timing,
        "panels": panels,
        "nonfinite_runs": [
            {a: _value(axes, names, a, coords[a][r]) for a in AXES} for r in nonfinite[:20]
        ],
        "summary": summary,
    }
