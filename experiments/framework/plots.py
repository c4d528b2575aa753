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
