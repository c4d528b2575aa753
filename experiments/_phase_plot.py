"""Figure of the displacement phase diagram, drawn from its JSON alone (see
:mod:`experiments._phase_report` for what the JSON holds)."""

from __future__ import annotations

import numpy as np
from matplotlib import pyplot as plt
from matplotlib.patches import Patch

from experiments import _phase_diagram as ph
from experiments import _phase_instances as pi
from experiments._phase_diagram import OUTCOMES
from experiments._phase_report import CRITERIA, LABELS, PREDICTIONS


def _edges(values: np.ndarray) -> np.ndarray:
    """Cell edges around (possibly non-uniform) axis values, for ``pcolormesh``."""
    v = np.asarray(values, np.float64)
    if v.size == 1:
        half = 0.1 * max(abs(v[0]), 1.0)
        return np.array([v[0] - half, v[0] + half])
    mid = 0.5 * (v[1:] + v[:-1])
    return np.concatenate([[v[0] - (mid[0] - v[0])], mid, [v[-1] + (v[-1] - mid[-1])]])


def _array(rows) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], np.float64)


def _contour(ax, boundary: dict, key: str, style: str) -> None:
    v = np.ma.masked_invalid(_array(boundary[key]))
    if v.shape[0] > 1 and v.shape[1] > 1 and v.count() and v.min() < 0.0 < v.max():
        ax.contour(boundary["x"], boundary["y"], v, levels=[0.0], colors="r", linestyles=style)


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
    _contour(ax, panel["boundary"], "theorem4", "solid")
    _contour(ax, panel["boundary"], "relative", "dashed")
    fixed = ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{v}"
        for k, v in panel["fixed"].items()
        if k not in ("loss", "optimizer")
    )
    ax.set_title(f"{panel['loss']}, {panel['optimizer']}\n{fixed}", fontsize=8)
    ax.set_xlabel(LABELS[panel["x"]], fontsize=8)
    ax.set_ylabel(LABELS[panel["y"]], fontsize=8)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _confusion(ax, confusion: dict) -> None:
    ax.axis("off")
    rows, labels = [], []
    for c in CRITERIA:
        counts = confusion[c]["all"]["counts"]
        rows += [[str(counts[p][o]) for o in OUTCOMES] for p in PREDICTIONS]
        labels += [f"{c}: {p}" for p in PREDICTIONS]
    ax.table(cellText=rows, rowLabels=labels, colLabels=list(OUTCOMES), loc="center").scale(1, 1.3)
    lines = []
    for c in CRITERIA:
        t = confusion[c]["all"]
        lines.append(
            f"{c}: agreement {_pct(t['agreement_displaced'])} (lasting "
            f"{_pct(t['agreement_lasting'])}), P(displaced|down) {_pct(t['displaced_given_down'])}"
            f", P(displaced|up) {_pct(t['displaced_given_up'])}"
        )
    ax.set_title("t = 0 criterion vs observed outcome, all runs\n" + "\n".join(lines), fontsize=7)


def _group_bars(ax, confusion: dict) -> None:
    groups = confusion["theorem4"]["by_group"]
    keys = [k for k, v in groups.items() if v["agreement_displaced"] is not None]
    for j, c in enumerate(CRITERIA):
        rates = [confusion[c]["by_group"][k]["agreement_displaced"] for k in keys]
        colors = ["tab:blue" if "/sgd/" in k else "tab:orange" for k in keys]
        ax.barh(
            np.arange(len(keys)) + 0.4 * j - 0.2,
            rates,
            height=0.4,
            color=colors,
            alpha=1.0 if j == 0 else 0.45,
            hatch=None if j == 0 else "//",
        )
    ax.set_yticks(range(len(keys)), [f"{k} (n={groups[k]['resolved']})" for k in keys], fontsize=6)
    ax.set(xlim=(0, 1.0), xlabel="agreement with displaced (solid theorem4, hatched relative)")
    ax.invert_yaxis()


def _failure(ax, results: dict) -> None:
    omegas = results["grid"]["omega"]
    for key, rates in results["failure_vs_omega"].items():
        loss, opt = key.split("/")
        y = [np.nan if r is None else r for r in rates]
        style = "-" if opt == "sgd" else "--"
        ax.plot(omegas, y, style, marker=".", color=f"C{ph.LOSS_NAMES.index(loss)}", label=key)
    ax.set(xlabel=LABELS["omega"], ylabel="failure rate of the theorem4 sign", ylim=(0, 1))
    ax.legend(fontsize=6, ncol=2)


def _mass(ax, mass: dict) -> None:
    bottom = np.zeros(len(mass))
    for k, cat in enumerate(pi.CATEGORIES):
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
    _confusion(flat[8], results["confusion"])
    _group_bars(flat[9], results["confusion"])
    _failure(flat[10], results)
    _mass(flat[11], results["mass"])
    handles = [
        Patch(color="0.8", label="grey: infeasible cell"),
        plt.Line2D([], [], color="r", label="theorem4: d/dt ln pi(y+) = 0 at t = 0"),
        plt.Line2D([], [], color="r", ls="--", label="relative: some token outpaces y+ at t = 0"),
        plt.Line2D([], [], marker="o", ls="", mfc="none", mec="k", label="transient"),
        plt.Line2D([], [], marker="x", ls="", color="k", label="lasting"),
    ]
    fig.legend(handles=handles, loc="upper right", fontsize=8)
    s = results["summary"]["theorem4"]
    fig.suptitle(
        f"Displacement phase diagram: {results['summary']['runs_ok']} flows; the t = 0 sign of "
        f"d/dt ln pi(y+) vs eventual displacement agrees in {_pct(s['agreement_displaced'])} of "
        f"{s['resolved']} resolved runs",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 0.9, 0.97))
    return fig
