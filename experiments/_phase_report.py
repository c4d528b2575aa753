"""Tables and figure of the displacement phase diagram (``experiments/displacement_phase_diagram``).

:func:`analyse` turns the per-run sweep outputs into JSON-ready summaries (confusion tables of the
t = 0 prediction against the observed outcome, failure rates per axis value, where the mass went,
heatmap slices with fine-grid Theorem-4 boundaries); :func:`plot` draws the figure from that JSON
alone.
"""

from __future__ import annotations

import numpy as np
from matplotlib import pyplot as plt
from matplotlib.patches import Patch

from experiments import _phase_diagram as ph

PREDICTIONS = ("down", "up", "flat")  # sign of d/dt ln pi(y+) at t = 0
OUTCOMES = ("none", "transient", "lasting")
AXES = ("rho", "omega", "kappa", "prob_pos", "beta", "loss", "optimizer", "lam")
GEOMETRY_AXES = AXES[:4]  # heatmap slices fix these at their middle value, the rest at the first
OPTIMIZERS = ("sgd", "rmsprop_torch")
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


def prediction_codes(velocity: np.ndarray, tol: float) -> np.ndarray:
    """0 down, 1 up, 2 flat (``|v| <= tol``), -1 NaN."""
    v = np.asarray(velocity)
    codes = np.where(v < -tol, 0, np.where(v > tol, 1, 2))
    return np.where(np.isfinite(v), codes, -1)


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


def _slice(full: np.ndarray, shape, axes_order, x: str, y: str, fixed: dict) -> np.ndarray:
    """``[ny, nx]`` slice of a flat grid array at ``fixed`` indices of the other axes."""
    grid = full.reshape(shape)
    index = tuple(slice(None) if a in (x, y) else fixed[a] for a in axes_order)
    part = grid[index]  # dims in AXES order of (x, y)
    return part.T if axes_order.index(x) < axes_order.index(y) else part


def _panel_requests(config, axes: dict, specs) -> list[dict]:
    """Fine-grid inputs of the boundary of each panel (other axes at their base values)."""
    requests = []
    for loss, optimizer, x, y in specs:
        values = {}
        for a in AXES:
            base = axes[a][_base_index(a, len(axes[a]))]
            if a == "loss":
                values[a] = np.array([ph.LOSS_NAMES.index(loss)])
            elif a == "optimizer":
                values[a] = np.array([OPTIMIZERS.index(optimizer)])
            elif a in (x, y) and len(axes[a]) > 1:
                values[a] = np.linspace(axes[a].min(), axes[a].max(), config.boundary_points)
            else:
                values[a] = np.array([base])
        requests.append(values)
    return requests


def _boundaries(config, geometry, predict, axes, specs) -> list[dict]:
    """Predicted velocity on each panel's fine grid (one prediction call for all panels)."""
    requests, flat = _panel_requests(config, axes, specs), []
    for values in requests:
        solved = ph.cell_inputs(*(values[a] for a in GEOMETRY_AXES), geometry=geometry)
        shape = tuple(len(values[a]) for a in AXES)
        index = np.indices(shape).reshape(len(AXES), -1)
        x = {a: values[a][i] for a, i in zip(AXES, index, strict=True)}
        geo = tuple(index[:4])
        x["phi"], x["cos"], ok = solved["phi"][geo], solved["cos"][geo], solved["feasible"][geo]
        x["loss_id"] = x["loss"].astype(np.int32)
        flat.append((shape, ok, {k: x[k] for k in ph.PREDICTION_INPUTS}))
    stacked = {k: np.concatenate([f[2][k][f[1]] for f in flat]) for k in ph.PREDICTION_INPUTS}
    velocity = predict(stacked)["velocity"]
    out, at = [], 0
    for (shape, ok, _), values, (_, _, x, y) in zip(flat, requests, specs, strict=True):
        v = np.full(ok.shape, np.nan)
        v[ok] = velocity[at : at + int(ok.sum())]
        at += int(ok.sum())
        fixed = {a: 0 for a in AXES}
        out.append(
            {
                "x": values[x].tolist(),
                "y": values[y].tolist(),
                "velocity": _none_where_nan(_slice(v, shape, AXES, x, y, fixed)),
            }
        )
    return out


def analyse(
    config, geometry, predict, axes: dict, grid: dict, outputs: dict, outcome_codes
) -> dict:
    """Return the JSON-ready analysis of a swept grid (see the module docstring); ``predict`` is
    :func:`experiments._phase_diagram.make_predictor`'s function (its compile is reused)."""
    tol = config.displacement_tol
    ok = outputs["status"] == "ok"
    pred = np.where(ok, prediction_codes(grid["pred_velocity"], config.velocity_tol), -1)
    outcome = np.where(ok, outcome_codes(outputs, tol), -1)
    below = ok & (outputs["min_change"] < -tol)
    shape = tuple(len(axes[a]) for a in AXES)
    coords = {a: i for a, i in zip(AXES, np.indices(shape).reshape(len(AXES), -1), strict=True)}
    names = {
        "loss": [ph.LOSS_NAMES[i] for i in axes["loss"]],
        "optimizer": [OPTIMIZERS[i] for i in axes["optimizer"]],
    }

    def by(axis):
        labels = names.get(axis) or [f"{v:g}" for v in axes[axis]]
        return {
            label: table(
                pred[coords[axis] == i], outcome[coords[axis] == i], below[coords[axis] == i]
            )
            for i, label in enumerate(labels)
        }

    groups = {}
    for li, loss in enumerate(names["loss"]):
        for oi, opt in enumerate(names["optimizer"]):
            for ki, lam in enumerate(axes["lam"]):
                m = (coords["loss"] == li) & (coords["optimizer"] == oi) & (coords["lam"] == ki)
                entry = table(pred[m], outcome[m], below[m])
                paths = np.unique(grid["path"][m & grid["feasible"]])
                entry["path"] = [ph.PATHS[p] for p in paths]
                groups[f"{loss}/{opt}/lam={lam:g}"] = entry
    resolved = (pred >= 0) & (pred <= 1) & (outcome >= 0)
    wrong = resolved & ((pred == 0) != (outcome >= 1))
    failure = {}
    for oi, opt in enumerate(names["optimizer"]):
        sel = coords["optimizer"] == oi
        failure[opt] = {
            a: {
                "values": names.get(a) or axes[a].tolist(),
                "failure_rate": [
                    _rate(
                        np.sum(wrong & sel & (coords[a] == i)),
                        np.sum(resolved & sel & (coords[a] == i)),
                    )
                    for i in range(len(axes[a]))
                ],
                "resolved": [
                    int(np.sum(resolved & sel & (coords[a] == i))) for i in range(len(axes[a]))
                ],
            }
            for a in AXES
            if a != "optimizer"
        }
    early = {}
    for oi, opt in enumerate(names["optimizer"]):
        m = resolved & (coords["optimizer"] == oi) & (np.abs(outputs["early_change"]) > EARLY_TOL)
        same = np.sign(outputs["early_change"][m]) == np.where(pred[m] == 0, -1.0, 1.0)
        early[opt] = {"agreement": _rate(np.sum(same), np.sum(m)), "compared": int(np.sum(m))}
    displaced = ok & (outcome >= 1)
    category = ph.token_category(np.maximum(outputs["top_gainer_drop"], 0), geometry)
    predicted_category = ph.token_category(np.maximum(grid["pred_top_gainer"], 0), geometry)
    mass = {}
    for oi, opt in enumerate(names["optimizer"]):
        m = displaced & (coords["optimizer"] == oi)
        mass[opt] = {
            "displaced_runs": int(np.sum(m)),
            "top_gainer_at_drop": {
                c: int(np.sum(m & (category == k))) for k, c in enumerate(ph.CATEGORIES)
            },
            "theorem5_top_gainer_matches": _rate(
                np.sum(m & (category == predicted_category)), np.sum(m)
            ),
            "mean_opposite_peak_gain": _rate(
                np.sum((outputs["opposite_mass_peak"] - outputs["opposite_mass_start"])[m]),
                np.sum(m),
            ),
        }
    specs = [s for s in PANEL_SPECS if s[0] in config.losses and s[1] in config.optimizers]
    boundaries = _boundaries(config, geometry, predict, axes, specs)
    panels = []
    for (loss, opt, x, y), boundary in zip(specs, boundaries, strict=True):
        fixed = {a: _base_index(a, len(axes[a])) for a in AXES}
        fixed["loss"] = config.losses.index(loss)
        fixed["optimizer"] = config.optimizers.index(opt)

        def sl(full, x=x, y=y, fixed=fixed):
            return _slice(full, shape, AXES, x, y, fixed)

        panels.append(
            {
                "loss": loss,
                "optimizer": opt,
                "x": x,
                "y": y,
                "x_values": axes[x].tolist(),
                "y_values": axes[y].tolist(),
                "fixed": {
                    a: (names[a][fixed[a]] if a in names else float(axes[a][fixed[a]]))
                    for a in AXES
                    if a not in (x, y)
                },
                "max_drop": _none_where_nan(sl(np.where(ok, outputs["max_drop"], np.nan))),
                "outcome": sl(outcome).tolist(),
                "prediction": sl(pred).tolist(),
                "boundary": boundary,
            }
        )
    status = outputs["status"]
    nonfinite = np.flatnonzero(status == "nonfinite")
    overall = table(pred, outcome, below)
    return {
        "grid": {a: (names.get(a) or axes[a].tolist()) for a in AXES},
        "vocab_size": geometry.vocab_size,
        "feasible": grid["feasible"].reshape(shape)[:, :, :, :, 0, 0, 0, 0].tolist(),
        "confusion": {
            "all": overall,
            "by_loss": by("loss"),
            "by_optimizer": by("optimizer"),
            "by_kernel": by("lam"),
            "by_beta": by("beta"),
            "by_group": groups,
        },
        "failure_by_axis": failure,
        "early_change_vs_prediction": early,
        "mass": mass,
        "panels": panels,
        "nonfinite_runs": [
            {
                a: (names[a][coords[a][r]] if a in names else float(axes[a][coords[a][r]]))
                for a in AXES
            }
            for r in nonfinite[:20]
        ],
        "summary": {
            "cells": int(status.size),
            "infeasible": int(np.sum(status == "infeasible")),
            "runs_ok": int(np.sum(ok)),
            "nonfinite": int(nonfinite.size),
            "runs_by_path": {p: int(np.sum(grid["path"] == i)) for i, p in enumerate(ph.PATHS)},
            "resolved": overall["resolved"],
            "agreement_displaced": overall["agreement_displaced"],
            "agreement_below_start": overall["agreement_below_start"],
            "agreement_lasting": overall["agreement_lasting"],
            "agreement_by_optimizer": {
                k: v["agreement_displaced"] for k, v in by("optimizer").items()
            },
        },
    }


def _edges(values: np.ndarray) -> np.ndarray:
    """Cell edges around (possibly non-uniform) axis values, for ``pcolormesh``."""
    v = np.asarray(values, np.float64)
    if v.size == 1:
        half = 0.5 * max(abs(v[0]), 1.0) * 0.2
        return np.array([v[0] - half, v[0] + half])
    mid = 0.5 * (v[1:] + v[:-1])
    return np.concatenate([[v[0] - (mid[0] - v[0])], mid, [v[-1] + (v[-1] - mid[-1])]])


def _array(rows) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], np.float64)


def _heatmap(ax, panel: dict) -> None:
    xv, yv = np.asarray(panel["x_values"]), np.asarray(panel["y_values"])
    drop = np.ma.masked_invalid(_array(panel["max_drop"]))
    ax.set_facecolor("0.8")  # grey: infeasible (or non-finite) cells
    mesh = ax.pcolormesh(_edges(xv), _edges(yv), drop, cmap="viridis", vmin=0.0)
    plt.colorbar(mesh, ax=ax, fraction=0.046, pad=0.02, label="largest drop of ln pi(y+)")
    outcome = np.asarray(panel["outcome"])
    X, Y = np.meshgrid(xv, yv)
    m = outcome == 1
    ax.scatter(X[m], Y[m], marker="o", s=30, facecolors="none", edgecolors="w")
    m = outcome == 2
    ax.scatter(X[m], Y[m], marker="x", s=30, color="w")
    b = panel["boundary"]
    v = np.ma.masked_invalid(_array(b["velocity"]))
    if v.shape[0] > 1 and v.shape[1] > 1 and v.count() and v.min() < 0.0 < v.max():
        ax.contour(b["x"], b["y"], v, levels=[0.0], colors="r", linewidths=1.5)
    fixed = ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{v}"
        for k, v in panel["fixed"].items()
        if k not in ("loss", "optimizer")
    )
    ax.set_title(f"{panel['loss']}, {panel['optimizer']}\n{fixed}", fontsize=8)
    ax.set_xlabel(LABELS[panel["x"]], fontsize=8)
    ax.set_ylabel(LABELS[panel["y"]], fontsize=8)


def _confusion(ax, all_runs: dict) -> None:
    ax.axis("off")
    counts = all_runs["counts"]
    cells = [[str(counts[p][o]) for o in OUTCOMES] for p in PREDICTIONS]
    table_ = ax.table(
        cellText=cells,
        rowLabels=[f"t=0 {p}" for p in PREDICTIONS],
        colLabels=list(OUTCOMES),
        loc="center",
    )
    table_.scale(1.0, 1.6)

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    ax.set_title(
        "t = 0 sign (Theorem 4) vs observed, all runs\n"
        f"agreement: displaced {pct(all_runs['agreement_displaced'])}, ever below start "
        f"{pct(all_runs['agreement_below_start'])}, lasting {pct(all_runs['agreement_lasting'])}\n"
        f"P(displaced | down) {pct(all_runs['displaced_given_down'])}, "
        f"P(displaced | up) {pct(all_runs['displaced_given_up'])}",
        fontsize=8,
    )


def _group_bars(ax, groups: dict) -> None:
    keys = [k for k, v in groups.items() if v["agreement_displaced"] is not None]
    rates = [groups[k]["agreement_displaced"] for k in keys]
    colors = ["tab:blue" if "/sgd/" in k else "tab:orange" for k in keys]
    ax.barh(range(len(keys)), rates, color=colors)
    ax.set_yticks(range(len(keys)), keys, fontsize=7)
    for i, k in enumerate(keys):
        ax.text(0.01, i, f"n={groups[k]['resolved']}", va="center", fontsize=6, color="w")
    ax.set(xlim=(0, 1.0), xlabel="agreement: t = 0 sign vs displaced (blue sgd, orange rmsprop)")
    ax.invert_yaxis()


def _failure(ax, failure: dict) -> None:
    styles = {"sgd": "-", "rmsprop_torch": "--"}
    for opt, per_axis in failure.items():
        for i, (axis, entry) in enumerate(per_axis.items()):
            rates = [np.nan if r is None else r for r in entry["failure_rate"]]
            if len(rates) < 2:
                continue
            pos = np.linspace(0.0, 1.0, len(rates))
            ax.plot(
                pos, rates, styles.get(opt, ":"), color=f"C{i}", marker=".", label=f"{axis} ({opt})"
            )
    ax.set(
        xlabel="axis value (first .. last, see JSON grid)",
        ylabel="failure rate of the t = 0 sign",
        ylim=(0, 1),
    )
    ax.legend(fontsize=6, ncol=2)


def _mass(ax, mass: dict) -> None:
    bottom = np.zeros(len(mass))
    for k, cat in enumerate(ph.CATEGORIES):
        counts = np.array([m["top_gainer_at_drop"][cat] for m in mass.values()], np.float64)
        totals = np.array([max(m["displaced_runs"], 1) for m in mass.values()], np.float64)
        ax.bar(list(mass), counts / totals, bottom=bottom, color=f"C{k}", label=cat)
        bottom += counts / totals
    ax.set(ylabel="share of displaced runs", title="top gainer at the deepest drop")
    ax.legend(fontsize=7)


def plot(results: dict) -> plt.Figure:
    """Draw the phase diagram from the JSON alone (see the module docstring)."""
    fig, axes = plt.subplots(3, 4, figsize=(21, 14))
    flat = axes.ravel()
    for ax, panel in zip(flat[:8], results["panels"], strict=False):
        _heatmap(ax, panel)
    for ax in flat[len(results["panels"]) : 8]:
        ax.axis("off")
    _confusion(flat[8], results["confusion"]["all"])
    _group_bars(flat[9], results["confusion"]["by_group"])
    _failure(flat[10], results["failure_by_axis"])
    _mass(flat[11], results["mass"])
    handles = [
        Patch(color="0.8", label="grey: infeasible cell"),
        plt.Line2D(
            [], [], color="r", label="t = 0 velocity of ln pi(y+) = 0 (Thm 4 / kernel / Prop 1)"
        ),
        plt.Line2D([], [], marker="o", ls="", mfc="none", mec="k", label="transient"),
        plt.Line2D([], [], marker="x", ls="", color="k", label="lasting"),
    ]
    fig.legend(handles=handles, loc="upper right", fontsize=8)
    s = results["summary"]
    fig.suptitle(
        f"Displacement phase diagram: {s['runs_ok']} flows; t = 0 sign vs eventual displacement "
        f"agrees in {100 * (s['agreement_displaced'] or 0):.1f}% of {s['resolved']} resolved runs",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 0.92, 0.97))
    return fig
