r"""Multi-token responses: CHES and log-probability velocities (Razin et al. 2024, App. D.2, E).

Setting: the unconstrained-features model, :math:`\pi(y|x) = \prod_k \mathrm{softmax}(W
h_{x,y_{<k}})_{y_k}`, with unembeddings ``W`` ``[V, d]`` and one free hidden embedding per distinct
prefix. A response ``y`` of length ``L`` comes with ``h`` ``[L, d]``: row ``k-1`` is
:math:`h_{x,y_{<k}}` (row 0 is the prompt's last position). Prefixes shared by two responses are
one parameter, so their rows must agree.

Every function is pure JAX, jit- and vmap-safe, float32 and float64. Public functions validate
shapes always and values (ids, finiteness, shared rows) when concrete.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from theory._checks import check_finite, check_ndim, is_concrete


def _check_hidden_pair(name_a: str, a, name_b: str, b) -> None:
    """Ranks ``[L, d]``, ``L >= 1``, one hidden size ``d``, finite values."""
    check_ndim(name_a, a, 2, "[L, d]")
    check_ndim(name_b, b, 2, "[L, d]")
    for name, arr in ((name_a, a), (name_b, b)):
        if jnp.shape(arr)[0] < 1:
            raise ValueError(
                f"{name} must hold at least one prefix (responses are non-empty), "
                f"got shape {jnp.shape(arr)}"
            )
    if jnp.shape(a)[1] != jnp.shape(b)[1]:
        raise ValueError(
            f"{name_a} and {name_b} must have one hidden size d, got shapes "
            f"{jnp.shape(a)} and {jnp.shape(b)}"
        )
    check_finite(name_a, a)
    check_finite(name_b, b)


def _ches(h_pos, h_neg, length_normalized: bool):
    sum_pos = jnp.sum(h_pos, axis=0)  # [d]
    sum_neg = jnp.sum(h_neg, axis=0)  # [d]
    if length_normalized:
        sum_pos = sum_pos / h_pos.shape[0]
        sum_neg = sum_neg / h_neg.shape[0]
    return sum_pos @ (sum_neg - sum_pos)


def ches(h_pos: ArrayLike, h_neg: ArrayLike) -> jax.Array:
    r"""Return the centered hidden embedding similarity (CHES) of a preference pair.

    .. math::
       \mathrm{CHES}_x(y^+,y^-) = \Big\langle\sum_{k=1}^{|y^+|} h_{x,y^+_{<k}},
       \sum_{k'=1}^{|y^-|} h_{x,y^-_{<k'}}\Big\rangle
       - \Big\|\sum_{k=1}^{|y^+|} h_{x,y^+_{<k}}\Big\|^2

    i.e. :math:`\langle H^+, H^- - H^+\rangle` with :math:`H^\pm` the row sums of ``h_pos`` /
    ``h_neg``. Higher means more similar preferences and, per Theorem 6 with every
    :math:`\alpha` set to one, more likelihood displacement.

    Source: Razin et al. 2024, Definition 2 (§4), derived from Theorem 3 / Theorem 6.

    Args:
      h_pos: ``[L+, d]`` hidden embeddings :math:`h_{x,y^+_{<k}}`, ``k = 1..L+`` (row 0 is the
        prompt's last position).
      h_neg: ``[L-, d]`` likewise for :math:`y^-`; same ``d``.

    Returns:
      Scalar CHES score.

    Raises:
      ValueError: wrong ranks, an empty response (``L = 0``), mismatched ``d``, non-finite input.

    Example:
      >>> h_pos = jnp.array([[1.0, 0.0]])             # H+ = (1, 0)
      >>> h_neg = jnp.array([[1.0, 0.0], [1.0, 1.0]])  # H- = (2, 1)
      >>> float(ches(h_pos, h_neg))                    # <H+, H-> - |H+|^2 = 2 - 1
      1.0
    """
    _check_hidden_pair("h_pos", h_pos, "h_neg", h_neg)
    return _ches(jnp.asarray(h_pos), jnp.asarray(h_neg), False)


def ches_length_normalized(h_pos: ArrayLike, h_neg: ArrayLike) -> jax.Array:
    r"""Return the length-normalised CHES score of a preference pair.

    .. math::
       \overline{\mathrm{CHES}}_x(y^+,y^-) = \frac{1}{|y^+||y^-|}\Big\langle\sum_k h_{x,y^+_{<k}},
       \sum_{k'} h_{x,y^-_{<k'}}\Big\rangle - \frac{1}{|y^+|^2}\Big\|\sum_k h_{x,y^+_{<k}}\Big\|^2

    i.e. CHES of the mean (instead of summed) hidden embeddings.

    Source: Razin et al. 2024, Definition 3 (App. A).

    Args:
      h_pos: ``[L+, d]`` as in :func:`ches`.
      h_neg: ``[L-, d]`` as in :func:`ches`.

    Returns:
      Scalar length-normalised CHES score.

    Raises:
      ValueError: as :func:`ches`.

    Example:
      >>> h_pos = jnp.array([[1.0, 0.0]])             # mean (1, 0)
      >>> h_neg = jnp.array([[1.0, 0.0], [1.0, 1.0]])  # mean (1, 0.5)
      >>> float(ches_length_normalized(h_pos, h_neg))  # 1 - 1
      0.0
    """
    _check_hidden_pair("h_pos", h_pos, "h_neg", h_neg)
    return _ches(jnp.asarray(h_pos), jnp.asarray(h_neg), True)


def _check_masks(h, mask, name_h: str, name_mask: str) -> None:
    if jnp.shape(mask) != jnp.shape(h)[:2]:
        raise ValueError(
            f"{name_mask} must have shape [N, L]={jnp.shape(h)[:2]} (that of {name_h}), "
            f"got shape {jnp.shape(mask)}"
        )
    if is_concrete(mask):
        arr = np.asarray(mask)
        if arr.dtype != np.bool_ and not np.all((arr == 0) | (arr == 1)):
            raise ValueError(f"{name_mask} must be boolean or 0/1, got values {np.unique(arr)[:8]}")
        empty = np.flatnonzero(~np.any(arr.astype(bool), axis=1))
        if empty.size:
            raise ValueError(
                f"{name_mask} must select at least one prefix per pair (responses are non-empty), "
                f"got {empty.size} empty rows (first at pair {int(empty[0])})"
            )


def masked_ches(
    h_pos: ArrayLike,
    h_neg: ArrayLike,
    mask_pos: ArrayLike,
    mask_neg: ArrayLike,
    *,
    length_normalized: bool = False,
) -> jax.Array:
    r"""Return CHES (or length-normalised CHES) for a padded batch of pairs, ``[N]``.

    .. math::
       H^\pm_i = \sum_k \mathrm{mask}^\pm_{ik}\, h^\pm_{ik},\qquad
       \mathrm{CHES}_i = \langle H^+_i, H^-_i - H^+_i\rangle

    with :math:`H^\pm_i` divided by :math:`|y^\pm_i| = \sum_k \mathrm{mask}^\pm_{ik}` when
    ``length_normalized``. Padded rows (mask 0) are ignored whatever they hold (finite values).

    Source: Razin et al. 2024, Definitions 2 and 3; padding as in the official code's
    ``compute_ches_scores`` (prompt positions other than the last are zeroed).

    Args:
      h_pos: ``[N, L+, d]`` hidden embeddings of the preferred responses' prefixes, padded.
      h_neg: ``[N, L-, d]`` likewise for the dispreferred responses.
      mask_pos: ``[N, L+]`` boolean (or 0/1): which rows of ``h_pos`` are real prefixes.
      mask_neg: ``[N, L-]`` likewise.
      length_normalized: return Definition 3 instead of Definition 2.

    Returns:
      ``[N]`` scores.

    Raises:
      ValueError: wrong ranks or sizes, mismatched ``d`` or ``N``, a mask that selects nothing for
        some pair, non-0/1 masks, non-finite embeddings.

    Example:
      >>> h = jnp.array([[[1.0, 0.0], [5.0, 5.0]]])  # second row is padding
      >>> float(masked_ches(h, h, jnp.array([[1, 0]]), jnp.array([[1, 1]]))[0])  # 1*6 - 1
      5.0
    """
    check_ndim("h_pos", h_pos, 3, "[N, L+, d]")
    check_ndim("h_neg", h_neg, 3, "[N, L-, d]")
    if jnp.shape(h_pos)[0] != jnp.shape(h_neg)[0] or jnp.shape(h_pos)[2] != jnp.shape(h_neg)[2]:
        raise ValueError(
            "h_pos and h_neg must agree on N and d, got shapes "
            f"{jnp.shape(h_pos)} and {jnp.shape(h_neg)}"
        )
    _check_masks(h_pos, mask_pos, "h_pos", "mask_pos")
    _check_masks(h_neg, mask_neg, "h_neg", "mask_neg")
    check_finite("h_pos", h_pos)
    check_finite("h_neg", h_neg)
    h_pos, h_neg = jnp.asarray(h_pos), jnp.asarray(h_neg)
    m_pos = jnp.asarray(mask_pos).astype(h_pos.dtype)
    m_neg = jnp.asarray(mask_neg).astype(h_neg.dtype)
    sum_pos = jnp.einsum("nl,nld->nd", m_pos, h_pos)  # [N, d]
    sum_neg = jnp.einsum("nl,nld->nd", m_neg, h_neg)  # [N, d]
    if length_normalized:
        sum_pos = sum_pos / jnp.sum(m_pos, axis=1)[:, None]
        sum_neg = sum_neg / jnp.sum(m_neg, axis=1)[:, None]
    return jnp.sum(sum_pos * (sum_neg - sum_pos), axis=1)
