"""Input checks and NaN poisoning shared by :mod:`theory.kernel` (private to ``theory``).

Checks run in Python before tracing (shapes always, values when concrete); the ``_invalid`` /
``asymmetry`` helpers give the traced conditions under which the public functions return NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from theory.checks import (
    check_distinct,
    check_finite,
    check_ndim,
    check_nonnegative,
    check_token_ids,
    is_concrete,
)


def tolerance(dtype) -> float:
    """Relative round-off allowance for symmetry / PSD checks: sqrt(eps) of the dtype."""
    return float(np.sqrt(np.finfo(dtype).eps))


def flat_kernel(K: jax.Array) -> jax.Array:
    """``[d, d]`` as is; ``[N, N, d, d]`` -> ``[N d, N d]``, row ``(i, a)``, column ``(j, b)``."""
    if K.ndim == 2:
        return K
    N, _, d, _ = K.shape
    return jnp.transpose(K, (0, 2, 1, 3)).reshape(N * d, N * d)


def asymmetry(K: jax.Array) -> jax.Array:
    """``max |K - K^T| / max |K|`` of the flat kernel (0 for K = 0)."""
    flat = flat_kernel(K)
    size = jnp.max(jnp.abs(flat))
    return jnp.max(jnp.abs(flat - flat.T)) / jnp.where(size > 0, size, 1.0)


def check_kernel(K, expected_shape: tuple[int, ...], axes: str) -> None:
    """Shape always; symmetric and PSD (relative tolerance sqrt(eps)) when concrete."""
    check_ndim("K", K, len(expected_shape), axes)
    if tuple(jnp.shape(K)) != expected_shape:
        raise ValueError(f"K must have shape {axes}={expected_shape}, got shape {jnp.shape(K)}")
    check_finite("K", K)
    if not is_concrete(K):
        return
    dtype = jnp.asarray(K).dtype
    tol = tolerance(dtype if jnp.issubdtype(dtype, jnp.floating) else np.float64)
    flat = np.asarray(K, dtype=np.float64)
    if flat.ndim == 4:  # [N, N, d, d] -> [N d, N d]
        N, _, d, _ = flat.shape
        flat = flat.transpose(0, 2, 1, 3).reshape(N * d, N * d)
    size = float(np.max(np.abs(flat))) if flat.size else 0.0
    asym = float(np.max(np.abs(flat - flat.T))) / size if size > 0 else 0.0
    if asym > tol:
        raise ValueError(
            "K must be symmetric (K[i, j] = K[j, i]^T, as J J^T is), got max |K - K^T| / "
            f"max |K| = {asym:.3g} > {tol:.3g}"
        )
    eig = np.linalg.eigvalsh(0.5 * (flat + flat.T))
    scale = max(float(np.max(np.abs(eig))), np.finfo(np.float64).tiny)
    if eig[0] < -tol * scale:
        raise ValueError(
            "K must be positive semi-definite (a Gram matrix J J^T), got smallest eigenvalue "
            f"{eig[0]:.3g} (largest |eigenvalue| {scale:.3g})"
        )


def check_hidden(W, h) -> None:
    check_ndim("W", W, 2, "[V, d]")
    check_ndim("h", h, 1, "[d]")
    if jnp.shape(h)[0] != jnp.shape(W)[1]:
        raise ValueError(
            f"h must have the hidden size d={jnp.shape(W)[1]} of W, got shape {jnp.shape(h)}"
        )
    check_finite("W", W)
    check_finite("h", h)


def check_pair(y_pos, y_neg, V: int) -> None:
    for name, y in (("y_pos", y_pos), ("y_neg", y_neg)):
        check_ndim(name, y, 0, "[] (a scalar token id)")
        check_token_ids(name, y, V)
    check_distinct("y_pos", y_pos, "y_neg", y_neg)


def check_scalar(name: str, value) -> None:
    check_ndim(name, value, 0, "[] (a scalar)")
    check_finite(name, value)


def check_gain(gain, V: int, d: int) -> None:
    """``unembedding_gain``: shape ``[]``, ``[V]`` or ``[V, d]``, entries ``>= 0``."""
    shape = tuple(jnp.shape(gain))
    if shape not in ((), (V,), (V, d)):
        raise ValueError(
            f"unembedding_gain must have shape [], [V]=({V},) or [V, d]=({V}, {d}), got {shape}"
        )
    check_nonnegative("unembedding_gain", gain)


def invalid_ids(y_pos, y_neg, V: int) -> jax.Array:
    """True where ids are out of ``[0, V)`` or equal (checked before tracing; NaN under jit)."""
    out = (y_pos < 0) | (y_pos >= V) | (y_neg < 0) | (y_neg >= V)
    return out | (y_pos == y_neg)


def poison(value: jax.Array, invalid: jax.Array) -> jax.Array:
    return jnp.where(invalid, jnp.nan, value)
