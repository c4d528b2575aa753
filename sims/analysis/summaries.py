"""Summaries of recorded runs (NumPy): agreement, errors, group means, statistics.

Each is written once here: sign agreement (counted only where a value is resolved, or over every
entry), relative errors (normwise and pointwise), the top names by a score, per-group means of
per-run numbers, lowest-fraction subsets of a score order, stacking of pytrees, and summary
statistics that are reported as ``null`` with a reason when undefined (one point, a constant
input) instead of losing the run behind them. The largest drop of a probability and the top
gainers are in :mod:`sims.analysis.gainers`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sims.analysis.scores import UndefinedStatistic


def sign_agreement(
    predicted: Any, actual: Any, *, threshold: float | np.ndarray, magnitude: Any = None
) -> tuple[float | None, int]:
    """Return ``(rate, count)``: how often ``sign(predicted) == sign(actual)`` where ``|magnitude| >
    threshold`` (default ``magnitude = actual``: signs below the tolerance are not resolved), and
    how many entries were compared. ``rate`` is ``None`` when nothing was resolved.

    Example:
      >>> sign_agreement([1.0, -2.0, 3.0], [0.5, 1.0, 1e-12], threshold=1e-9)
      (0.5, 2)
    """
    p, a = np.asarray(predicted), np.asarray(actual)
    resolved = np.abs(a if magnitude is None else np.asarray(magnitude)) > threshold
    count = int(np.sum(resolved))
    if count == 0:
        return None, 0
    return float(np.mean((np.sign(p) == np.sign(a))[resolved])), count


def sign_match_rate(predicted: Any, actual: Any) -> float:
    """Return the fraction of entries with ``sign(predicted) == sign(actual)``, over every entry.

    No resolution threshold (an exact 0 matches only 0): use :func:`sign_agreement` where values
    near round-off or truncation error should not count.

    Example:
      >>> sign_match_rate([1.0, -2.0, 3.0, 0.0], [0.5, 1.0, 2.0, 0.0])
      0.75
    """
    return float(np.mean(np.sign(np.asarray(predicted)) == np.sign(np.asarray(actual))))


def relative_error(
    got: Any, want: Any, axis: int | tuple[int, ...] | None = None, *, scale: Any = None
) -> np.ndarray:
    """Return ``max |got - want| / scale`` over ``axis`` (normwise relative error).

    ``scale`` defaults to ``max |want|`` over ``axis``; pass it to measure several estimates
    against one reference scale.

    Example:
      >>> float(relative_error([1.0, 2.5], [1.0, 2.0]))
      0.25
    """
    g, w = np.asarray(got), np.asarray(want)
    if scale is None:
        scale = np.max(np.abs(w), axis=axis)
    return np.max(np.abs(g - w), axis=axis) / scale


def pointwise_relative_error(got: Any, want: Any, *, floor: Any) -> np.ndarray:
    """Return ``|got - want| / max(|want|, floor)`` entry by entry (``floor`` keeps zeros finite).

    Example:
      >>> pointwise_relative_error([1.0, 1e-20], [2.0, 0.0], floor=1e-12).tolist()
      [0.5, 1e-08]
    """
    g, w = np.asarray(got), np.asarray(want)
    return np.abs(g - w) / np.maximum(np.abs(w), floor)


def top_names(scores: Any, names: Sequence[str], k: int) -> list[str]:
    """Return the names of the ``k`` largest ``scores`` in decreasing order (ties: lower index).

    Example:
      >>> top_names([0.1, 0.7, 0.2], ["a", "b", "c"], 2)
      ['b', 'c']
    """
    return [names[i] for i in np.argsort(-np.asarray(scores), kind="stable")[:k]]


def stack(trees: Sequence[Any]) -> Any:
    """Stack equally-shaped pytrees on a new leading axis (a run axis for vmapped flows)."""
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def groups(rows: Sequence[dict], key: str) -> dict[Hashable, list[dict]]:
    """Return ``rows`` grouped by ``row[key]``, groups in order of first appearance.

    Example:
      >>> groups([{"g": "a", "x": 1}, {"g": "b", "x": 2}, {"g": "a", "x": 3}], "g")["a"]
      [{'g': 'a', 'x': 1}, {'g': 'a', 'x': 3}]
    """
    out: dict[Hashable, list[dict]] = {}
    for r in rows:
        out.setdefault(r[key], []).append(r)
    return out


def mean_of(rows: Sequence[dict], key: str) -> float | None:
    """Return the mean of ``row[key]`` over ``rows`` (a summary of per-run numbers).

    Rows whose value is ``None`` (an undefined :func:`statistic`) are left out; ``None`` when
    every row's is.

    Example:
      >>> mean_of([{"r": 0.5}, {"r": None}, {"r": 1.0}], "r")
      0.75
    """
    values = [r[key] for r in rows if r[key] is not None]
    return float(np.mean(values)) if values else None


def statistic(key: str, fn: Callable[..., float], *args: Any) -> dict[str, float | str | None]:
    """Return ``{key: fn(*args)}``, or ``{key: None, key + "_undefined_reason": why}`` when the
    statistic is undefined for this input (:class:`sims.analysis.scores.UndefinedStatistic`).

    Every summary statistic of a run goes through this: a Spearman correlation over one pair or
    a constant input is reported as ``null`` with its reason, and the run's numbers are kept.

    Example:
      >>> from sims.analysis.scores import spearman
      >>> statistic("rho", spearman, [1, 2, 3], [3, 2, 1])
      {'rho': -1.0}
      >>> statistic("rho", spearman, [1.0], [2.0])
      {'rho': None, 'rho_undefined_reason': "Spearman's correlation needs >= 2 points, got 1"}
    """
    try:
        return {key: fn(*args)}
    except UndefinedStatistic as err:
        return {key: None, f"{key}_undefined_reason": str(err)}


def statistics(fn: Callable[..., float], args_by_key: dict[str, tuple]) -> dict[str, Any]:
    """Return the :func:`statistic` of every ``key: args`` entry, merged into one dict.

    Example:
      >>> from sims.analysis.scores import spearman
      >>> statistics(spearman, {"a": ([1, 2], [1, 2]), "b": ([1, 2], [5, 5])})["b_undefined_reason"]
      "Spearman's correlation is undefined: y is constant (5)"
    """
    return {k: v for key, args in args_by_key.items() for k, v in statistic(key, fn, *args).items()}


def statistic_per_row(key: str, fn: Callable[..., float], rows: Sequence[tuple]) -> dict[str, list]:
    """Return ``{key: [fn(*row) or None, ...]}`` (:func:`statistic` per row), with
    ``key + "_undefined_reason"`` (a reason or ``None`` per row) when any row's is undefined.

    Example:
      >>> from sims.analysis.scores import pearson
      >>> out = statistic_per_row("r", pearson, [([1, 2], [2, 1]), ([1, 1], [1, 2])])
      >>> out["r"], out["r_undefined_reason"][1]
      ([-1.0, None], "Pearson's correlation is undefined: x is constant (1)")
    """
    entries = [statistic(key, fn, *row) for row in rows]
    reason = f"{key}_undefined_reason"
    out: dict[str, list] = {key: [e[key] for e in entries]}
    if any(reason in e for e in entries):
        out[reason] = [e.get(reason) for e in entries]
    return out


def statistic_text(value: float | None, spec: str = "+.2f") -> str:
    """Return ``value`` formatted by ``spec``, or ``"undefined"`` for ``None`` (figure titles).

    Example:
      >>> statistic_text(-0.5), statistic_text(None)
      ('-0.50', 'undefined')
    """
    return "undefined" if value is None else format(value, spec)


def mean_gain(rows: Sequence[dict], key: str, *, at: int = -1) -> float:
    """Return the mean over ``rows`` of ``row[key][at] - row[key][0]`` (change of a series).

    Example:
      >>> mean_gain([{"p": [0.1, 0.3]}, {"p": [0.2, 0.2]}], "p")
      0.1
    """
    return float(np.mean([r[key][at] - r[key][0] for r in rows]))


def mean_peak_gain(rows: Sequence[dict], key: str) -> float:
    """Return the mean over ``rows`` of ``max(row[key]) - row[key][0]`` (rise to a series' peak).

    Example:
      >>> mean_peak_gain([{"p": [0.1, 0.5, 0.3]}, {"p": [0.2, 0.1]}], "p")
      0.2
    """
    return float(np.mean([max(r[key]) - r[key][0] for r in rows]))


def mean_by_label(values: Any, labels: Any) -> dict[Any, float]:
    """Return ``{label: float64 mean of the values with that label}``, labels in order of first
    appearance.

    Example:
      >>> mean_by_label([1.0, 2.0, 4.0], ["a", "b", "a"])
      {'a': 2.5, 'b': 2.0}
    """
    v, lab = np.asarray(values, dtype=float), np.asarray(labels)
    return {k: float(np.mean(v[lab == k])) for k in dict.fromkeys(lab.tolist())}


def lowest_fraction(scores: Any, fraction: float) -> np.ndarray:
    """Return the indices of the lowest ``fraction`` of ``scores`` (at least one; ties: by index).

    Example:
      >>> lowest_fraction([0.3, 0.1, 0.2, 0.4], 0.5).tolist()
      [1, 2]
    """
    order = np.argsort(np.asarray(scores), kind="stable")
    return order[: max(1, int(round(fraction * len(order))))]
