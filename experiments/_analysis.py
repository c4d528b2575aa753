"""Analysis idioms shared by the experiment scripts (NumPy on recorded trajectories).

Each is written once here: the largest drop of a recorded probability, sign agreement counted only
where a value is resolved, relative errors, top gainers at checkpoints, stacking of pytrees.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def max_drop(series: Any, axis: int = -1) -> np.ndarray:
    """Return the largest decrease of ``series`` below its running maximum along ``axis``.

    ``max_t (max_{s <= t} x_s - x_t)``: 0 when the series never falls (Razin et al. 2024's
    "decrease of pi(y+)" in Tables 1-3, measured between any two steps, not just first to last).

    Example:
      >>> float(max_drop([0.2, 0.5, 0.1, 0.4]))
      0.4
    """
    x = np.asarray(series, dtype=float)
    return np.max(np.maximum.accumulate(x, axis=axis) - x, axis=axis)


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


def relative_error(got: Any, want: Any, axis: int | tuple[int, ...] | None = None) -> np.ndarray:
    """Return ``max |got - want| / max |want|`` over ``axis`` (normwise relative error)."""
    g, w = np.asarray(got), np.asarray(want)
    return np.max(np.abs(g - w), axis=axis) / np.max(np.abs(w), axis=axis)


def top_gainers(
    probs: Any, names: Sequence[str], *, k: int, checkpoints: Sequence[int]
) -> list[list[tuple[str, float]]]:
    """Return, at each checkpoint index, the ``k`` tokens whose probability rose most since row 0.

    ``probs`` is ``[C + 1, V]`` (row 0 the start). Entries are ``(name, gain)``.

    Example:
      >>> top_gainers([[0.5, 0.5], [0.2, 0.8]], ["a", "b"], k=1, checkpoints=[1])
      [[('b', 0.30000000000000004)]]
    """
    p = np.asarray(probs)
    out = []
    for c in checkpoints:
        gain = p[c] - p[0]
        out.append([(names[i], float(gain[i])) for i in np.argsort(-gain, kind="stable")[:k]])
    return out


def stack(trees: Sequence[Any]) -> Any:
    """Stack equally-shaped pytrees on a new leading axis (a run axis for vmapped flows)."""
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def mean_of(rows: Sequence[dict], key: str) -> float:
    """Return the mean of ``row[key]`` over ``rows`` (a summary of per-run numbers)."""
    return float(np.mean([r[key] for r in rows]))
