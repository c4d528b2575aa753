"""Plotting idioms shared by the experiment scripts (matplotlib, drawing from result dicts).

Each is written once here: measured-vs-predicted scatter against the identity line (optionally on
symlog axes), bars of a mean with min/max error bars, a trajectory's mean with its min-max band,
and a scatter with labelled points.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np


def identity_line(ax: plt.Axes, lo: float, hi: float, style: str = "k--", **kwargs: Any) -> None:
    """Draw the line ``y = x`` from ``lo`` to ``hi`` (thin; ``kwargs`` go to ``ax.plot``)."""
    ax.plot([lo, hi], [lo, hi], style, **{"lw": 0.8, **kwargs})


def symlog_identity(
    ax: plt.Axes, lim: float, *, linthresh: float, ticks: Sequence[float] | None = None
) -> None:
    """Draw ``y = x`` over ``[-lim, lim]`` and put both axes on a symlog scale (``ticks`` on both).

    The frame of a closed-form-vs-measured scatter whose values span many decades of both signs.
    """
    identity_line(ax, -lim, lim)
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_yscale("symlog", linthresh=linthresh)
    if ticks is not None:
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)


def bar_min_max(ax: plt.Axes, x: Any, mean: Any, lo: Any, hi: Any, **kwargs: Any) -> None:
    """Draw bars of ``mean`` with error bars reaching ``lo`` and ``hi`` (min and max over runs)."""
    mean, lo, hi = (np.asarray(v, dtype=float) for v in (mean, lo, hi))
    ax.bar(x, mean, yerr=[mean - lo, hi - mean], **kwargs)


def mean_band(ax: plt.Axes, series: Any, label: str) -> None:
    """Plot the mean over runs of ``series`` ``[R, T]`` against the step, with its min-max band."""
    arr = np.asarray(series)
    ax.plot(arr.mean(0), label=label)
    ax.fill_between(np.arange(arr.shape[1]), arr.min(0), arr.max(0), alpha=0.2)


def annotated_scatter(
    ax: plt.Axes,
    x: Any,
    y: Any,
    names: Sequence[str],
    *,
    named: Callable[[str], bool],
    color: str = "tab:purple",
) -> None:
    """Scatter ``(x, y)``; points whose name passes ``named`` get ``color`` and a text label, the
    rest are grey and unlabelled."""
    ax.scatter(x, y, s=8, c=[color if named(n) else "0.6" for n in names])
    for n, xi, yi in zip(names, x, y, strict=True):
        if named(n):
            ax.annotate(n, (xi, yi), fontsize=7)


def grouped_bars(
    ax: plt.Axes, groups: Sequence[str], series: dict[str, Sequence[float]], *, fontsize: int = 7
) -> None:
    """Draw grouped bars: one group per entry of ``groups`` (rotated tick labels), one bar per
    entry of ``series`` (name -> one value per group), and a legend of the series."""
    width = 0.8 / len(series)
    for j, (name, vals) in enumerate(series.items()):
        ax.bar(np.arange(len(groups)) + j * width, vals, width, label=name)
    ticks = np.arange(len(groups)) + 0.4 - width / 2
    ax.set_xticks(ticks, groups, rotation=30, ha="right", fontsize=fontsize)
    ax.legend(fontsize=fontsize)


# --- the displacement phase diagram (drawn from sims.protocols.phase_report's JSON)


def cell_edges(values: Any) -> np.ndarray:
    """Return the cell edges around (possibly non-uniform) axis ``values``, for ``pcolormesh``."""
    v = np.asarray(values, np.float64)
    if v.size == 1:
        half = 0.1 * max(abs(v[0]), 1.0)
        return np.array([v[0] - half, v[0] + half])
    mid = 0.5 * (v[1:] + v[:-1])
    return np.concatenate([[v[0] - (mid[0] - v[0])], mid, [v[-1] + (v[-1] - mid[-1])]])


def nan_array(rows: Sequence[Sequence[float | None]]) -> np.ndarray:
    """Return a float array of JSON rows, ``None`` (a missing value) read as NaN."""
    return np.array([[np.nan if v is None else v for v in row] for row in rows], np.float64)


def zero_contour(ax: plt.Axes, x: Any, y: Any, rows: Any, style: str) -> None:
    """Draw the red zero level of ``rows`` ``[ny, nx]`` (NaN masked) where it changes sign."""
    v = np.ma.masked_invalid(nan_array(rows))
    if v.shape[0] > 1 and v.shape[1] > 1 and v.count() and v.min() < 0.0 < v.max():
        ax.contour(x, y, v, levels=[0.0], colors="r", linestyles=style)


def phase_heatmap(ax: plt.Axes, panel: dict, labels: dict[str, str]) -> None:
    """Draw one phase-diagram panel: the largest drop of ln pi(y+) per cell (grey: infeasible),
    transient (o) and lasting (x) outcomes, and both criteria's t = 0 boundaries (red)."""
    xv, yv = np.asarray(panel["x_values"]), np.asarray(panel["y_values"])
    drop = np.ma.masked_invalid(nan_array(panel["max_drop"]))
    ax.set_facecolor("0.8")  # grey: infeasible (or non-finite) cells
    mesh = ax.pcolormesh(cell_edges(xv), cell_edges(yv), drop, cmap="viridis", vmin=0.0)
    plt.colorbar(mesh, ax=ax, fraction=0.046, pad=0.02, label="largest drop of ln pi(y+)")
    outcome = np.asarray(panel["outcome"])
    X, Y = np.meshgrid(xv, yv)
    m = outcome == 1
    ax.scatter(X[m], Y[m], marker="o", s=30, facecolors="none", edgecolors="w")
    m = outcome == 2
    ax.scatter(X[m], Y[m], marker="x", s=30, color="w")
    b = panel["boundary"]
    zero_contour(ax, b["x"], b["y"], b["theorem4"], "solid")
    zero_contour(ax, b["x"], b["y"], b["relative"], "dashed")
    fixed = ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{v}"
        for k, v in panel["fixed"].items()
        if k not in ("loss", "optimizer")
    )
    ax.set_title(f"{panel['loss']}, {panel['optimizer']}\n{fixed}", fontsize=8)
    ax.set_xlabel(labels[panel["x"]], fontsize=8)
    ax.set_ylabel(labels[panel["y"]], fontsize=8)


def percent(x: float | None) -> str:
    """Return ``x`` as a percentage with one decimal, or ``n/a`` for ``None``."""
    return "n/a" if x is None else f"{100 * x:.1f}%"


def phase_confusion(
    ax: plt.Axes,
    confusion: dict,
    criteria: Sequence[str],
    predictions: Sequence[str],
    outcomes: Sequence[str],
) -> None:
    """Draw the confusion counts of each criterion (rows: predictions, columns: outcomes) with
    its agreement rates in the title."""
    ax.axis("off")
    rows, row_labels = [], []
    for c in criteria:
        counts = confusion[c]["all"]["counts"]
        rows += [[str(counts[p][o]) for o in outcomes] for p in predictions]
        row_labels += [f"{c}: {p}" for p in predictions]
    table = ax.table(cellText=rows, rowLabels=row_labels, colLabels=list(outcomes), loc="center")
    table.scale(1, 1.3)
    lines = []
    for c in criteria:
        t = confusion[c]["all"]
        lines.append(
            f"{c}: agreement {percent(t['agreement_displaced'])} (lasting "
            f"{percent(t['agreement_lasting'])}), P(displaced|down) "
            f"{percent(t['displaced_given_down'])}, P(displaced|up) "
            f"{percent(t['displaced_given_up'])}"
        )
    ax.set_title("t = 0 criterion vs observed outcome, all runs\n" + "\n".join(lines), fontsize=7)


def phase_group_bars(ax: plt.Axes, confusion: dict, criteria: Sequence[str]) -> None:
    """Draw horizontal bars of the agreement with "displaced" per (loss, optimizer, lambda) group,
    one bar per criterion (the first solid, the second hatched; blue SGD, orange RMSprop)."""
    groups = confusion[criteria[0]]["by_group"]
    keys = [k for k, v in groups.items() if v["agreement_displaced"] is not None]
    for j, c in enumerate(criteria):
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
    ax.set(
        xlim=(0, 1.0),
        xlabel=f"agreement with displaced (solid {criteria[0]}, hatched {criteria[-1]})",
    )
    ax.invert_yaxis()


def failure_curves(
    ax: plt.Axes, x: Sequence[float], curves: dict[str, list], losses: Sequence[str], xlabel: str
) -> None:
    """Plot failure rates ``curves["<loss>/<optimizer>"]`` against ``x`` (color by loss, solid
    SGD, dashed otherwise; ``None`` rates are gaps)."""
    for key, rates in curves.items():
        loss, opt = key.split("/")
        y = [np.nan if r is None else r for r in rates]
        style = "-" if opt == "sgd" else "--"
        ax.plot(x, y, style, marker=".", color=f"C{losses.index(loss)}", label=key)
    ax.set(xlabel=xlabel, ylabel="failure rate of the theorem4 sign", ylim=(0, 1))
    ax.legend(fontsize=6, ncol=2)


def stacked_shares(
    ax: plt.Axes, groups: dict[str, dict], categories: Sequence[str], *, key: str, total: str
) -> None:
    """Draw stacked bars, one per group, of ``group[key][category] / group[total]`` (a share)."""
    bottom = np.zeros(len(groups))
    for k, cat in enumerate(categories):
        counts = np.array([m[key][cat] for m in groups.values()], np.float64)
        totals = np.array([max(m[total], 1) for m in groups.values()], np.float64)
        ax.bar(list(groups), counts / totals, bottom=bottom, color=f"C{k}", label=cat)
        bottom += counts / totals
    ax.legend(fontsize=7)


#: Axis labels of the phase-diagram panels, by axis name.
PHASE_LABELS = {
    "rho": "rho = <W+, W-> / |W+|^2",
    "omega": "omega = |(W+ - W-) perp W+| / |W+|",
    "kappa": "kappa = |h0|^2 / |W+|^2",
    "prob_pos": "pi(y+) at t = 0",
    "lam": "kernel gain lambda (lambda_eff = 1 + lambda)",
}


def phase_legend(fig: plt.Figure) -> None:
    """Add the phase-diagram legend (infeasible cells, boundaries, outcome markers) to ``fig``."""
    from matplotlib.patches import Patch

    handles = [
        Patch(color="0.8", label="grey: infeasible cell"),
        plt.Line2D([], [], color="r", label="theorem4: d/dt ln pi(y+) = 0 at t = 0"),
        plt.Line2D([], [], color="r", ls="--", label="relative: some token outpaces y+ at t = 0"),
        plt.Line2D([], [], marker="o", ls="", mfc="none", mec="k", label="transient"),
        plt.Line2D([], [], marker="x", ls="", color="k", label="lasting"),
    ]
    fig.legend(handles=handles, loc="upper right", fontsize=8)


def threshold_lines(
    ax: plt.Axes, tables: dict[str, list[dict]], key: str, *, style: str = "-", label: str = ""
) -> None:
    """Plot ``key`` of thresholds tables against their thresholds (log x), one color per table:
    ``style`` over all runs, dotted without the round-off-sensitive runs (when the table has
    them). ``tables``: name -> :func:`sims.protocols.phase_sensitivity.threshold_table`."""
    for i, (name, table) in enumerate(tables.items()):
        tols = [e["tol"] for e in table]
        for part, ls, tag in (("all", style, ""), ("without_sensitive", ":", ", w/o sensitive")):
            if part in table[0]:
                y = [np.nan if e[part][key] is None else e[part][key] for e in table]
                ax.plot(tols, y, ls, marker=".", color=f"C{i}", label=f"{name}{label}{tag}")
    ax.set(xscale="log", xlabel='threshold of "displaced" (nats)', ylim=(0, 1.02))
    ax.legend(fontsize=6)


def phase_regime_table(
    ax: plt.Axes, regime: dict, predictions: Sequence[str], outcomes: Sequence[str]
) -> None:
    """Draw the paper's-regime confusion counts (theorem4, rows down / up / flat) with its runs
    per source and agreement per optimizer in the title."""
    ax.axis("off")
    t = regime["confusion"]["theorem4"]
    counts = t["all"]["counts"]
    rows = [[str(counts[p][o]) for o in outcomes] for p in predictions]
    table = ax.table(
        cellText=rows, rowLabels=list(predictions), colLabels=list(outcomes), loc="center"
    )
    table.scale(1, 1.3)
    runs = ", ".join(
        f"{k}: {v['predicted_down']} down / {v['predicted_up']} up"
        for k, v in regime["runs"].items()
    )
    by = ", ".join(f"{k} {percent(v['agreement_displaced'])}" for k, v in t["by_optimizer"].items())
    ax.set_title(
        f"paper's regime, pi(y+) >= {regime['min_prob']:g} at t = 0 (theorem4)\n{runs}\n"
        f"agreement {percent(t['all']['agreement_displaced'])} ({by}), P(displaced|down) "
        f"{percent(t['all']['displaced_given_down'])}",
        fontsize=7,
    )


def phase_summary(results: dict) -> str:
    """Return the phase diagram's key numbers in one line, from its JSON (``results``): the runs,
    each criterion's agreement with "displaced" and the paper's regime's (theorem4)."""
    from sims.protocols.phase_report import PHASE_CRITERIA

    s, p = results["summary"], results["paper_regime"]["confusion"]["theorem4"]["all"]
    agree = ", ".join(f"{c} {percent(s[c]['agreement_displaced'])}" for c in PHASE_CRITERIA)
    regime = percent(p["agreement_displaced"])
    return f"{s['runs_ok']} runs; agreement {agree}; paper's regime {regime}"


def phase_diagram_figure(results: dict) -> plt.Figure:
    """Return the phase-diagram figure drawn from its JSON (``results``) alone: up to eight
    heatmap panels, the confusion table, agreement per group, failure rate vs omega, the top
    gainer at the deepest drop, agreement and P(displaced | prediction) against the threshold of
    "displaced" (all runs and the paper's regime, with and without round-off-sensitive runs), the
    round-off-sensitive counts and the paper's regime's counts (:mod:`sims.protocols.phase_report`
    names the codes)."""
    from sims.protocols.phase_flows import PHASE_LOSSES, PHASE_OUTCOMES
    from sims.protocols.phase_instances import TOKEN_CATEGORIES
    from sims.protocols.phase_report import PHASE_CRITERIA, PHASE_PREDICTIONS

    fig, axes = plt.subplots(4, 4, figsize=(21, 18))
    flat = axes.ravel()
    for ax, panel in zip(flat[:8], results["panels"], strict=False):
        phase_heatmap(ax, panel, PHASE_LABELS)
    for ax in flat[len(results["panels"]) : 8]:
        ax.axis("off")
    phase_confusion(
        flat[8], results["confusion"], PHASE_CRITERIA, PHASE_PREDICTIONS, PHASE_OUTCOMES
    )
    phase_group_bars(flat[9], results["confusion"], PHASE_CRITERIA)
    omega = results["grid"]["omega"]
    failure_curves(
        flat[10], omega, results["failure_vs_omega"], PHASE_LOSSES, PHASE_LABELS["omega"]
    )
    stacked_shares(
        flat[11],
        results["mass"],
        TOKEN_CATEGORIES,
        key="top_gainer_at_drop",
        total="displaced_runs",
    )
    flat[11].set(ylabel="share of displaced runs", title="top gainer at the deepest drop")
    regime = results["paper_regime"]
    tables = {"all runs": results["thresholds"]["theorem4"]}
    tables["paper's regime"] = regime["thresholds"]["theorem4"]
    threshold_lines(flat[12], tables, "agreement_displaced")
    flat[12].set(ylabel="agreement (theorem4)", title="agreement vs the threshold of displaced")
    threshold_lines(flat[13], tables, "displaced_given_down", label=": down")
    threshold_lines(flat[13], tables, "displaced_given_up", style="--", label=": up")
    flat[13].set(ylabel="P(displaced | predicted)", title="P(displaced | down) and (| up, dashed)")
    for j, (name, table) in enumerate(tables.items()):
        n = [e.get("roundoff_sensitive", 0) for e in table]
        flat[14].bar(np.arange(len(n)) + 0.4 * j - 0.2, n, width=0.4, color=f"C{j}", label=name)
    flat[14].set_xticks(range(len(n)), [f"{e['tol']:g}" for e in table])
    flat[14].set(xlabel='threshold of "displaced" (nats)', ylabel="resolved runs")
    change = results.get("roundoff", {}).get("max_abs_change_max_drop")
    change = "n/a" if change is None else f"{change:.3g} nats"
    flat[14].set_title(f"round-off sensitive runs (largest change of a drop {change})", fontsize=8)
    flat[14].legend(fontsize=7)
    phase_regime_table(flat[15], regime, PHASE_PREDICTIONS, PHASE_OUTCOMES)
    phase_legend(fig)
    s = results["summary"]
    fig.suptitle(
        f"Displacement phase diagram: {s['runs_ok']} flows; the t = 0 sign of d/dt ln pi(y+) vs "
        f"eventual displacement agrees in {percent(s['theorem4']['agreement_displaced'])} of "
        f"{s['theorem4']['resolved']} resolved runs",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 0.9, 0.97))
    return fig
