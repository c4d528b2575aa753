"""Input validation shared by the public functions of ``theory`` and ``sims`` (public helpers).

The rule is stated once, in :mod:`theory` (the package docstring, "Invalid values"): values are
validated in Python before tracing, and invalid values that arrive traced give NaN. This module
holds both halves.

* ``check_*`` run in Python before tracing and raise. Shape and dtype checks always run (shapes
  and dtypes are static under ``jax.jit``); value checks (finiteness, ranges, token ids) run only
  on concrete values, because a traced value has no value yet. Messages name the argument, the
  rule and what was received.
* ``valid_*`` return the same rules as a predicate: a Python ``bool`` for concrete inputs (already
  checked, so ``True``), a traced boolean array otherwise. :func:`poison` turns a traced ``False``
  into NaN in the result (and in its derivatives); :func:`checked` runs a function under
  ``jax.experimental.checkify`` so that a traced ``False`` raises instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify


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


def check_bool(name: str, value: Any) -> None:
    """Raise ``TypeError`` unless ``value`` is a real boolean (``True``/``False``, NumPy bool).

    A flag such as ``"no"`` or ``0`` is truthy or falsy by accident; only real booleans pass.
    """
    if not isinstance(value, bool | np.bool_):
        raise TypeError(
            f"{name} must be a bool (True or False), got {name}={value!r} "
            f"of type {type(value).__name__}"
        )


Valid = bool | jax.Array  # a validity predicate: Python bool (concrete) or traced bool array


def _concrete(*xs: Any) -> bool:
    return all(is_concrete(x) for x in xs)


def valid_finite(value: Any) -> Valid:
    """Elementwise ``isfinite(value)`` (traced), or whether all entries are finite (concrete)."""
    if _concrete(value):
        return bool(np.all(np.isfinite(np.asarray(value))))
    return jnp.isfinite(value)


def valid_positive(value: Any) -> Valid:
    """Elementwise ``value > 0`` and finite, the predicate of :func:`check_positive`."""
    if _concrete(value):
        arr = np.asarray(value)
        return bool(np.all(np.isfinite(arr)) and np.all(arr > 0))
    return jnp.isfinite(value) & (value > 0)


def valid_nonnegative(value: Any) -> Valid:
    """Elementwise ``value >= 0`` and finite, the predicate of :func:`check_nonnegative`."""
    if _concrete(value):
        arr = np.asarray(value)
        return bool(np.all(np.isfinite(arr)) and np.all(arr >= 0))
    return jnp.isfinite(value) & (value >= 0)


def valid_open_interval(value: Any, low: float, high: float) -> Valid:
    """Elementwise ``low < value < high`` (NaN fails)."""
    if _concrete(value):
        arr = np.asarray(value)
        return bool(np.all((arr > low) & (arr < high)))
    return (value > low) & (value < high)


def valid_token_ids(ids: Any, vocab_size: int) -> Valid:
    """Elementwise ``0 <= ids < vocab_size``, the predicate of :func:`check_token_ids`."""
    if _concrete(ids):
        arr = np.asarray(ids)
        return bool(np.all((arr >= 0) & (arr < vocab_size)))
    return (ids >= 0) & (ids < vocab_size)


def valid_distinct(a: Any, b: Any) -> Valid:
    """Elementwise ``a != b``, the predicate of :func:`check_distinct`."""
    if _concrete(a, b):
        return bool(np.all(np.asarray(a) != np.asarray(b)))
    return jnp.asarray(a) != jnp.asarray(b)


def valid_distribution(p: Any, *, atol: float) -> Valid:
    r"""Scalar: ``p`` ``[V]`` is finite, ``>= 0`` and sums to 1 within ``atol`` (traced: see below).

    .. math:: p_y \ge 0,\ p_y < \infty,\quad \Big|\sum_y p_y - 1\Big| \le
              \mathrm{atol} + V\,\epsilon

    Concrete ``p`` is summed in float64 with tolerance ``atol``. Traced ``p`` is summed in its own
    dtype, whose rounding error is at most :math:`(V-1)\,\epsilon\sum_y p_y` (:math:`\epsilon`
    the dtype's machine epsilon), so the traced tolerance adds :math:`V\epsilon`: every ``p``
    accepted concretely is accepted traced.
    """
    if _concrete(p):
        arr = np.asarray(p, dtype=np.float64)
        return bool(
            np.all(np.isfinite(arr)) and np.all(arr >= 0) and abs(np.sum(arr) - 1.0) <= atol
        )
    p = jnp.asarray(p)
    eps = float(jnp.finfo(jnp.result_type(p, jnp.float32)).eps)
    in_range = jnp.all(jnp.isfinite(p) & (p >= 0))
    return in_range & (jnp.abs(jnp.sum(p) - 1.0) <= atol + p.shape[-1] * eps)


def all_valid(*preds: Valid) -> Valid:
    """Scalar AND of predicates, each reduced over all its entries (Python ``True`` if concrete)."""
    out: Valid = True
    for pred in preds:
        if isinstance(pred, bool | np.bool_):
            if not pred:
                return False
            continue
        reduced = jnp.all(pred)
        out = reduced if out is True else out & reduced
    return out


Rule = tuple[Valid, str]  # (predicate, what it requires), e.g. (valid_positive(beta), "beta > 0")


@jax.custom_jvp
def _poison_leaf(value: jax.Array, valid: jax.Array) -> jax.Array:
    return jnp.where(valid, value, jnp.nan)


@_poison_leaf.defjvp
def _poison_leaf_jvp(primals, tangents):
    value, valid = primals
    tangent, _ = tangents
    # NaN times the tangent (not a NaN select): linear in the tangent, so reverse mode carries
    # the NaN too; on valid entries the factor is exactly 1 and the tangent is unchanged.
    factor = jnp.where(valid, 1.0, jnp.nan).astype(tangent.dtype)
    return _poison_leaf(value, valid), tangent * factor


def _replace_invalid(value: Any, valid: jax.Array, *, is_guard: bool) -> Any:
    def leaf(x):
        x = jnp.asarray(x)
        mask = jnp.broadcast_to(valid, x.shape)
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return _poison_leaf(x, mask)
        return jnp.where(mask, x, jnp.zeros((), x.dtype)) if is_guard else x

    return jax.tree.map(leaf, value)


def poison(value: Any, valid: Valid, message: str | None = None) -> Any:
    r"""Return ``value`` with NaN wherever ``valid`` is false: jit-safe failure for traced input.

    .. math:: \mathrm{poison}(x, v) = \begin{cases} x & v \\ \mathrm{NaN} & \lnot v\end{cases}

    ``valid`` from the ``valid_*`` helpers: a Python bool (concrete input; ``True`` returns
    ``value`` itself, untouched) or a traced boolean array broadcastable to every floating leaf of
    ``value`` (entrywise NaN). Integer and boolean leaves cannot hold NaN and pass unchanged.
    Derivatives: on valid entries the tangent is unchanged (bit for bit); on invalid entries it is
    NaN too, so ``jax.grad`` of a poisoned result is NaN, never a plausible number (a plain
    ``jnp.where`` would give a zero cotangent there). ``message`` (argument, rule) is reported by
    :func:`checked`; it is a no-op otherwise. Apply it to results; see :func:`guard` for the
    arguments the predicate reads.

    Args:
      value: a pytree of arrays (e.g. a ``NamedTuple`` result).
      valid: Python bool, or traced bool array broadcastable to each floating leaf.
      message: what failed, e.g. ``"beta must be > 0"``.

    Returns:
      ``value`` with the same structure, shapes and dtypes.

    Example:
      >>> f = jax.jit(lambda x, beta: poison(x * beta, valid_positive(beta), "beta must be > 0"))
      >>> float(f(2.0, 0.5)), float(f(2.0, -0.5))
      (1.0, nan)
    """
    if isinstance(valid, bool | np.bool_):
        if valid:
            return value
        valid = jnp.asarray(False)
    valid = jnp.asarray(valid, dtype=bool)
    if message is not None:
        # braces would be read as format fields by checkify
        checkify.debug_check(jnp.all(valid), message.replace("{", "{{").replace("}", "}}"))
    return _replace_invalid(value, valid, is_guard=False)


def guard(value: Any, valid: Valid) -> Any:
    r"""Return an argument as a computation should read it: NaN (floats) or 0 (ints) if invalid.

    .. math:: \mathrm{guard}(x, v) = \begin{cases} x & v \\ \mathrm{NaN}\ (0) & \lnot v\end{cases}

    Two uses. (1) Scalar hyperparameters: compute with the guarded copy, then :func:`poison` (or
    :func:`enforce`) the output with the same predicate. XLA's simplifier rewrites by counting
    users (``x / beta`` becomes ``x * (1 / beta)``, an ulp apart, only while the divide is
    ``beta``'s sole user), so a predicate reading ``beta`` next to the computation can change the
    compiled arithmetic; through the guarded copy it compiles as before. (2) Poisoning by input:
    guard one floating argument whose NaN reaches every floating output (the functions that do
    this say so, and tests pin it), and :func:`report` the rules instead of selecting on the
    output, where a select fused after a reduction can change its compiled summation order.
    A Python ``True`` returns ``value`` untouched (pass each scalar its own rule, so that a
    concrete argument stays a constant).
    Derivatives as in :func:`poison`.

    Args:
      value: a pytree of arrays (an argument, or several).
      valid: Python bool, or traced bool array broadcastable to each leaf.

    Returns:
      ``value`` with the same structure, shapes and dtypes.

    Example:
      >>> f = jax.jit(lambda x, beta: x / guard(beta, valid_positive(beta)))
      >>> float(f(1.0, 0.5)), float(f(1.0, -0.5))
      (2.0, nan)
    """
    if isinstance(valid, bool | np.bool_):
        if valid:
            return value
        valid = jnp.asarray(False)
    return _replace_invalid(value, jnp.asarray(valid, dtype=bool), is_guard=True)


def enforce(result: Any, rules: list[Rule]) -> Any:
    """Return ``result`` poisoned by every traced rule ``(valid, message)`` (see :func:`poison`).

    Example:
      >>> f = jax.jit(lambda x, b: enforce(x * b, [(valid_positive(b), "b must be > 0")]))
      >>> float(f(2.0, 3.0)), float(f(2.0, -3.0))
      (6.0, nan)
    """
    for valid, message in rules:
        result = poison(result, valid, message)
    return result


def report(rules: list[Rule]) -> None:
    """Register the traced rules with ``checkify`` (for :func:`checked`) without touching values.

    For functions whose NaN reaches every floating output through a guarded input (see
    :func:`guard`), so that no select is added after the computation.

    Example:
      >>> f = checked(jax.jit(lambda b: (report([(valid_positive(b), "b must be > 0")]), b)[1]))
      >>> float(f(1.0))
      1.0
    """
    for valid, message in rules:
        if not isinstance(valid, bool | np.bool_):
            checkify.debug_check(jnp.all(valid), message.replace("{", "{{").replace("}", "}}"))


def rules_valid(rules: list[Rule]) -> Valid:
    """Scalar AND of the rules' predicates (Python ``True`` when all are concrete), for
    :func:`guard`."""
    return all_valid(*(valid for valid, _ in rules))


def checked(fn: Callable) -> Callable:
    """Return ``fn`` run under ``checkify``: traced invalid values raise instead of giving NaN.

    The checks are the ``message`` s of :func:`poison` (``jax.experimental.checkify`` debug
    checks); they raise ``checkify.JaxRuntimeError``, a ``ValueError``, naming the argument and
    rule. Use at the top level, around a jitted or vmapped function: ``checked(jax.jit(f))(...)``.
    Concrete invalid values raise as before, when ``fn`` is traced.

    Example:
      >>> from theory.losses import dpo_loss
      >>> f = checked(jax.jit(lambda beta: dpo_loss(0.0, 0.0, beta=beta)))
      >>> round(float(f(0.5)), 6)
      0.693147
      >>> f(-1.0)
      Traceback (most recent call last):
      ...
      jax._src.checkify.JaxRuntimeError: beta must be > 0 and finite ...
    """
    functionalized = checkify.checkify(fn)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        error, out = functionalized(*args, **kwargs)
        error.throw()
        return out

    return run


def _show(arr: np.ndarray) -> str:
    return str(arr.tolist()) if arr.size <= 8 else f"array of shape {arr.shape}"
