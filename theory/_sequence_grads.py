r"""Private helpers of :mod:`theory.multi_token`: sequence gradients over a prefix tree, validation.

A response ``y`` of length ``L`` has hidden embeddings ``h`` ``[L, d]`` (row ``k`` is the prefix
``(x, y[:k])``). Two responses share prefix row ``k`` iff their first ``k`` tokens agree; in the
unconstrained-features model that prefix is one parameter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from theory.checks import (
    all_valid,
    check_finite,
    check_ndim,
    check_token_ids,
    is_concrete,
    valid_token_ids,
)


def shared_prefixes(u, v):
    """``[min(Lu, Lv)]`` bool: prefix ``k`` (0-based row) is shared, i.e. ``u[:k] == v[:k]``."""
    m = min(u.shape[0], v.shape[0])
    equal = (u[: m - 1] == v[: m - 1]).astype(jnp.int32)
    return jnp.concatenate([jnp.ones(1, jnp.int32), jnp.cumprod(equal)]).astype(bool)


def tie(h_src, src, h_dst, dst):
    """``h_dst`` with its rows for prefixes shared with ``src`` replaced by ``h_src``'s rows."""
    m = min(src.shape[0], dst.shape[0])
    shared = shared_prefixes(src, dst)[:, None]  # [m, 1]
    return h_dst.at[:m].set(jnp.where(shared, h_src[:m], h_dst[:m]))


def residuals(W, h, y):
    """``[L, V]`` rows :math:`e_{y_k} - \\pi(\\cdot|x, y_{<k})`."""
    probs = jax.nn.softmax(h @ W.T, axis=-1)  # [L, V]
    return jax.nn.one_hot(y, W.shape[0], dtype=probs.dtype) - probs


def sequence_logprob(W, h, y):
    logprobs = jax.nn.log_softmax(h @ W.T, axis=-1)  # [L, V]
    return jnp.sum(jnp.take_along_axis(logprobs, y[:, None], axis=1))


def grad_inner(W, h_u, u, h_v, v):
    """(W-part, h-part) of <grad ln pi(u|x), grad ln pi(v|x)>, from Eq. 9."""
    r_u, r_v = residuals(W, h_u, u), residuals(W, h_v, v)
    w_part = jnp.sum((r_u @ r_v.T) * (h_u @ h_v.T))
    m = min(u.shape[0], v.shape[0])
    # grad wrt a shared prefix's hidden embedding: W^T (e - pi), same pi on both sides
    g_u, g_v = r_u[:m] @ W, r_v[:m] @ W  # [m, d]
    h_part = jnp.sum(jnp.where(shared_prefixes(u, v), jnp.sum(g_u * g_v, axis=1), 0.0))
    return w_part, h_part


def validate_response(W, name_h, h, name_y, y) -> None:
    check_ndim(name_h, h, 2, "[L, d]")
    check_ndim(name_y, y, 1, "[L]")
    if jnp.shape(h)[0] < 1:
        raise ValueError(
            f"{name_h} must hold at least one prefix (non-empty response), got {jnp.shape(h)}"
        )
    if jnp.shape(h)[1] != jnp.shape(W)[1]:
        raise ValueError(
            f"{name_h} must have the hidden size d={jnp.shape(W)[1]} of W, got shape {jnp.shape(h)}"
        )
    if jnp.shape(y)[0] != jnp.shape(h)[0]:
        raise ValueError(
            f"{name_y} must have one token per row of {name_h} (L={jnp.shape(h)[0]}), "
            f"got shape {jnp.shape(y)}"
        )
    check_token_ids(name_y, y, jnp.shape(W)[0])
    check_finite(name_h, h)


def check_tied(name_a, h_a, a, name_b, h_b, b) -> None:
    """Rows of shared prefixes must be equal: one parameter in the unconstrained-features model."""
    if not all(is_concrete(x) for x in (h_a, a, h_b, b)):
        return
    shared = np.asarray(shared_prefixes(jnp.asarray(a), jnp.asarray(b)))
    rows = np.flatnonzero(shared)
    diff = np.any(np.asarray(h_a)[rows] != np.asarray(h_b)[rows], axis=1)
    if np.any(diff):
        k = int(rows[np.argmax(diff)])
        raise ValueError(
            f"{name_a} and {name_b} must agree on the rows of shared prefixes (one hidden "
            f"embedding per prefix in the unconstrained-features model), got different row {k}"
        )


def validate_pair(W, h_pos, h_neg, y_pos, y_neg) -> None:
    check_ndim("W", W, 2, "[V, d]")
    check_finite("W", W)
    validate_response(W, "h_pos", h_pos, "y_pos", y_pos)
    validate_response(W, "h_neg", h_neg, "y_neg", y_neg)
    check_tied("h_pos", h_pos, y_pos, "h_neg", h_neg, y_neg)


def first_difference(y_pos, y_neg):
    """0-based first position where the tokens differ (within the shorter response)."""
    m = min(y_pos.shape[0], y_neg.shape[0])
    return jnp.argmax(y_pos[:m] != y_neg[:m])


def check_differ_within(y_pos, y_neg, *, first: bool) -> None:
    if not (is_concrete(y_pos) and is_concrete(y_neg)):
        return
    a, b = np.asarray(y_pos), np.asarray(y_neg)
    m = min(a.size, b.size)
    if first and a[0] == b[0]:
        raise ValueError(
            f"y_pos and y_neg must differ in their first token (y+_1 != y-_1), got {a[0]} for both"
        )
    if not np.any(a[:m] != b[:m]):
        raise ValueError(
            "y_pos and y_neg must differ at some position k <= min(L+, L-) (the theorem assumes "
            f"distinct responses, neither a prefix of the other), got {a.tolist()} and {b.tolist()}"
        )


def check_mask_1d(name: str, mask, length: int) -> jax.Array:
    """Return ``mask`` ``[L]`` as bool (all true if ``None``); it must select something."""
    if mask is None:
        return jnp.ones(length, bool)
    if jnp.shape(mask) != (length,):
        raise ValueError(f"{name} must have shape [L]=({length},), got shape {jnp.shape(mask)}")
    if is_concrete(mask) and not np.any(np.asarray(mask)):
        raise ValueError(f"{name} must select at least one position (responses are non-empty)")
    return jnp.asarray(mask, bool)


# Traced validity (the rule of theory): (predicate, message) pairs, Python True where concrete.
def id_rules(W, name_y, y) -> list:
    V = jnp.shape(W)[0]
    return [(all_valid(valid_token_ids(y, V)), f"{name_y} must be token ids in [0, V)")]


# No traced rule for tied rows (check_tied, concrete only): XLA may compute one expression twice
# in different fusions with different rounding, so exact equality of rows computed inside one
# program is not reliable (a traced check gave NaN for 162 of 200 valid instances in
# tests/test_multi_token.py). Traced, the functions use h_pos's rows for shared prefixes.
def pair_rules(W, h_pos, h_neg, y_pos, y_neg) -> list:
    """Traced version of :func:`validate_pair`'s value rules: ids in ``[0, V)``."""
    del h_pos, h_neg  # shared rows: see the note above
    return [*id_rules(W, "y_pos", y_pos), *id_rules(W, "y_neg", y_neg)]


def differ_rules(y_pos, y_neg, *, first: bool) -> list:
    """Traced version of :func:`check_differ_within`."""
    if is_concrete(y_pos) and is_concrete(y_neg):
        return []
    a, b = jnp.asarray(y_pos), jnp.asarray(y_neg)
    m = min(a.shape[0], b.shape[0])
    rules = [
        (
            jnp.any(a[:m] != b[:m]),
            "y_pos and y_neg must differ at some position k <= min(L+, L-)",
        )
    ]
    if first:
        rules.append((a[0] != b[0], "y_pos and y_neg must differ in their first token"))
    return rules
