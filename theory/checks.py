"""Input validation shared by the public functions of ``theory`` and ``sims`` (public helpers).

Every check runs in Python before tracing. Shape checks always run (shapes are static under
``jax.jit``); value checks (finiteness, ranges, token ids) run only on concrete values, because a
traced value has no value yet. Messages name the argument, the rule and what was received.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def is_concrete(x: Any) -> bool:
    """Whether ``x`` holds a value now (is not a tracer inside ``jit``/``vmap``/``grad``)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x))


def check_positive(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless every entry of ``value`` is finite and ``> 0``."""
    if not is_concrete(value):
        return
    arr = np.asarray(value)
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be > 0 and finite, got {name}={_show(arr)}")


def check_nonnegative(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless every entry of ``value`` is finite and ``>= 0``."""
    if not is_concrete(value):
        return
    arr = np.asarray(value)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name} must be >= 0 and finite, got {name}={_show(arr)}")


def check_positive_int(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a Python/NumPy integer ``>= 1``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")


def check_finite(name: str, value: Any) -> None:
    """Raise ``ValueError`` if a concrete ``value`` has a NaN or infinite entry."""
    if not is_concrete(value):
        return
    arr = np.asarray(value)
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))
        first = tuple(int(i) for i in bad[0]) if arr.ndim else ()
        raise ValueError(
            f"{name} must be finite, got {bad.shape[0]} non-finite entries (first at index {first})"
        )


def check_ndim(name: str, value: Any, ndim: int, axes: str) -> None:
    """Raise ``ValueError`` unless ``value`` has ``ndim`` axes (``axes`` names them)."""
    shape = np.shape(value)
    if len(shape) != ndim:
        raise ValueError(f"{name} must have shape {axes}, got shape {shape}")


def check_token_ids(name: str, value: Any, vocab_size: int) -> None:
    """Raise ``ValueError`` unless concrete ids are integers in ``[0, vocab_size)``."""
    arr = np.asarray(value) if is_concrete(value) else None
    dtype = arr.dtype if arr is not None else value.dtype
    if not np.issubdtype(dtype, np.integer):
        raise TypeError(f"{name} must hold integer token ids, got dtype {dtype}")
    if arr is None:
        return
    if np.any(arr < 0) or np.any(arr >= vocab_size):
        raise ValueError(
            f"{name} must be token ids in [0, V) with V={vocab_size}, got {_show(arr)}"
        )


def check_distinct(name_a: str, a: Any, name_b: str, b: Any) -> None:
    """Raise ``ValueError`` where concrete ``a == b`` entrywise (a theorem needs them distinct)."""
    if not (is_concrete(a) and is_concrete(b)):
        return
    same = np.asarray(a) == np.asarray(b)
    if np.any(same):
        where = np.argwhere(np.atleast_1d(same))[0].tolist()
        raise ValueError(
            f"{name_a} and {name_b} must differ (the theorem assumes y+ != y-), "
            f"got equal ids {np.atleast_1d(np.asarray(a))[tuple(where)]} at index {where}"
        )


def _show(arr: np.ndarray) -> str:
    return str(arr.tolist()) if arr.size <= 8 else f"array of shape {arr.shape}"
