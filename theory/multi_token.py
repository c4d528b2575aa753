r"""Multi-token responses: CHES and log-probability velocities (Razin et al. 2024, App. D.2, E).

Setting: the unconstrained-features model, :math:`\pi(y|x) = \prod_k \mathrm{softmax}(W
h_{x,y_{<k}})_{y_k}`, with unembeddings ``W`` ``[V, d]`` and one free hidden embedding per distinct
prefix. A response ``y`` of length ``L`` comes with ``h`` ``[L, d]``: row ``k-1`` is
:math:`h_{x,y_{<k}}` (row 0 is the prompt's last position). Prefixes shared by two responses are
one parameter, so their rows must agree.

Every function is pure JAX, jit- and vmap-safe, float32 and float64. Public functions validate
shapes always and values (ids, finiteness, shared rows) when concrete; traced values that break a
rule (ids out of ``[0, V)``, responses that must differ and do not, masks that are not 0/1 or
select nothing) make the floating fields of the result NaN (the rule of :mod:`theory`). Shared
rows are checked only when concrete: traced, the rows of ``h_pos`` (then ``h_neg``) are used for
every shared prefix (exact float equality inside a compiled program is not reliable).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from theory._sequence_grads import (
    check_differ_within,
    check_mask_1d,
    check_tied,
    differ_rules,
    first_difference,
    grad_inner,
    id_rules,
    pair_rules,
    residuals,
    tie,
    validate_pair,
    validate_response,
)
from theory.checks import (
    check_bool,
    check_finite,
    check_ndim,
    enforce,
    is_concrete,
)


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


def _valid_mask_rows(mask):
    """``[N]`` traced: row ``i`` of ``mask`` is 0/1 and selects something (``True`` if concrete)."""
    if is_concrete(mask):
        return True  # checked by _check_masks
    m = jnp.asarray(mask)
    return jnp.all((m == 0) | (m == 1), axis=1) & jnp.any(m != 0, axis=1)


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
        some pair, non-0/1 masks, non-finite embeddings. Traced masks breaking a rule make the
        scores of the pairs concerned NaN.
      TypeError: ``length_normalized`` is not a bool.

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
    check_bool("length_normalized", length_normalized)
    rules = [
        (_valid_mask_rows(mask_pos), "mask_pos must be 0/1 and select a prefix in every pair"),
        (_valid_mask_rows(mask_neg), "mask_neg must be 0/1 and select a prefix in every pair"),
    ]
    h_pos, h_neg = jnp.asarray(h_pos), jnp.asarray(h_neg)
    m_pos = jnp.asarray(mask_pos).astype(h_pos.dtype)
    m_neg = jnp.asarray(mask_neg).astype(h_neg.dtype)
    sum_pos = jnp.einsum("nl,nld->nd", m_pos, h_pos)  # [N, d]
    sum_neg = jnp.einsum("nl,nld->nd", m_neg, h_neg)  # [N, d]
    if length_normalized:
        sum_pos = sum_pos / jnp.sum(m_pos, axis=1)[:, None]
        sum_neg = sum_neg / jnp.sum(m_neg, axis=1)[:, None]
    return enforce(jnp.sum(sum_pos * (sum_neg - sum_pos), axis=1), rules)


class GradientInnerProduct(NamedTuple):
    r"""Parts of :math:`\langle\nabla\ln\pi(u|x), \nabla\ln\pi(v|x)\rangle` (Eq. 9).

    Attributes:
      unembedding_part: :math:`\sum_{k,k'}\langle e_{u_k}-\pi_k, e_{v_{k'}}-\pi'_{k'}\rangle
        \langle h_{x,u_{<k}}, h_{x,v_{<k'}}\rangle` (the ``W`` gradients).
      hidden_part: :math:`\sum_{k:\,u_{<k}=v_{<k}}\langle W_{u_k}-\bar W_k, W_{v_k}-\bar W_k\rangle`
        over shared prefixes, :math:`\bar W_k = \sum_z\pi(z|x,u_{<k})W_z`.
      total: their sum.
    """

    unembedding_part: jax.Array
    hidden_part: jax.Array
    total: jax.Array


def gradient_inner_product(
    W: ArrayLike, h_u: ArrayLike, u: ArrayLike, h_v: ArrayLike, v: ArrayLike
) -> GradientInnerProduct:
    r"""Return :math:`\langle\nabla\ln\pi(u|x), \nabla\ln\pi(v|x)\rangle` and its two parts.

    .. math::
       \langle\nabla\ln\pi(u|x),\nabla\ln\pi(v|x)\rangle
       = \sum_{k,k'}\langle e_{u_k}-\pi_{u,k}, e_{v_{k'}}-\pi_{v,k'}\rangle
         \langle h_{x,u_{<k}}, h_{x,v_{<k'}}\rangle
       + \sum_{k\le\min(|u|,|v|):\ u_{<k}=v_{<k}}\langle W_{u_k}-\bar W_k, W_{v_k}-\bar W_k\rangle

    Source: Razin et al. 2024, Eq. 9 (gradients of sequence log-probs, App. F.3); the hidden part
    counts every prefix shared by ``u`` and ``v`` (one parameter each), not only the prompt.

    Args:
      W: ``[V, d]`` unembeddings.
      h_u: ``[Lu, d]`` hidden embeddings of the prefixes of ``u`` (row 0: the prompt).
      u: ``[Lu]`` token ids.
      h_v: ``[Lv, d]`` likewise for ``v``; rows of prefixes shared with ``u`` must equal ``h_u``'s.
      v: ``[Lv]`` token ids.

    Returns:
      :class:`GradientInnerProduct`.

    Raises:
      ValueError: bad shapes, empty responses, ids out of range, non-finite input, shared rows
        that differ (concrete only). Traced ids out of range: all fields NaN.

    Example:
      >>> W, h = jnp.eye(2), jnp.zeros((1, 2))  # pi uniform: e_0 - pi = (1/2, -1/2)
      >>> g = gradient_inner_product(W, h, jnp.array([0]), h, jnp.array([0]))
      >>> float(g.unembedding_part), float(g.hidden_part)  # |h|^2 = 0; |W^T(e_0 - pi)|^2 = 1/2
      (0.0, 0.5)
    """
    check_ndim("W", W, 2, "[V, d]")
    check_finite("W", W)
    validate_response(W, "h_u", h_u, "u", u)
    validate_response(W, "h_v", h_v, "v", v)
    check_tied("h_u", h_u, u, "h_v", h_v, v)
    rules = [*id_rules(W, "u", u), *id_rules(W, "v", v)]
    W, h_u, u, h_v, v = (jnp.asarray(x) for x in (W, h_u, u, h_v, v))
    w_part, h_part = grad_inner(W, h_u, u, tie(h_u, u, h_v, v), v)
    return enforce(GradientInnerProduct(w_part, h_part, w_part + h_part), rules)


def _response_velocity(W, h_pos, h_neg, y_pos, y_neg, h_z, z, coef_chosen, coef_rejected):
    h_neg = tie(h_pos, y_pos, h_neg, y_neg)
    h_z = tie(h_pos, y_pos, tie(h_neg, y_neg, h_z, z), z)
    g_pos = sum(grad_inner(W, h_z, z, h_pos, y_pos))
    g_neg = sum(grad_inner(W, h_z, z, h_neg, y_neg))
    return coef_chosen * g_pos - coef_rejected * g_neg


def response_logprob_velocity(
    W: ArrayLike,
    h_pos: ArrayLike,
    h_neg: ArrayLike,
    y_pos: ArrayLike,
    y_neg: ArrayLike,
    h_z: ArrayLike,
    z: ArrayLike,
    coef_chosen: ArrayLike,
    coef_rejected: ArrayLike,
) -> jax.Array:
    r"""Return :math:`\frac{d}{dt}\ln\pi(z|x)` for any response ``z`` and loss, prefixes shared.

    .. math::
       \frac{d}{dt}\ln\pi(z|x) = a^+\langle\nabla\ln\pi(z|x),\nabla\ln\pi(y^+|x)\rangle
                                - a^-\langle\nabla\ln\pi(z|x),\nabla\ln\pi(y^-|x)\rangle

    with :math:`-\nabla L = a^+\nabla\ln\pi(y^+|x) - a^-\nabla\ln\pi(y^-|x)` and each inner
    product from :func:`gradient_inner_product`. For a loss of the class :math:`a^\pm = -\ell'`
    (Eq. 7): with ``z = y_pos`` this is Theorem 6 and with :math:`z_1\notin\{y^+_1,y^-_1\}`
    Theorem 7; with the SFT-term or weighted losses it is Propositions 1-2.

    Source: Razin et al. 2024, Eq. 7 with the Eq. 9 gradients (App. D.2, E, F.3-F.4).
    Reading: the theorems assume :math:`y^+_1\ne y^-_1`; here every prefix shared by two of
    ``z``, ``y_pos``, ``y_neg`` is one parameter, whose gradient enters the hidden part. No
    distinctness is needed (``z``, ``y_pos``, ``y_neg`` may coincide).

    Args:
      W: ``[V, d]`` unembeddings.
      h_pos, h_neg: ``[L+, d]``, ``[L-, d]`` hidden embeddings of the prefixes of ``y_pos``,
        ``y_neg``.
      y_pos, y_neg: ``[L+]``, ``[L-]`` token ids.
      h_z: ``[Lz, d]`` hidden embeddings of the prefixes of ``z`` (shared rows must agree).
      z: ``[Lz]`` token ids.
      coef_chosen: :math:`a^+ = -\partial L/\partial\ln\pi(y^+|x)` (see
        :func:`theory.losses.loss_coefficients`).
      coef_rejected: :math:`a^- = \partial L/\partial\ln\pi(y^-|x)`.

    Returns:
      Scalar velocity.

    Raises:
      ValueError: as :func:`gradient_inner_product`, for each pair of responses (traced: NaN).

    Example:
      >>> W, h, y = jnp.eye(2), jnp.zeros((1, 2)), jnp.array([0])
      >>> float(response_logprob_velocity(W, h, h, y, jnp.array([1]), h, y, 1.0, 1.0))
      1.0
    """
    validate_pair(W, h_pos, h_neg, y_pos, y_neg)
    validate_response(W, "h_z", h_z, "z", z)
    check_tied("h_pos", h_pos, y_pos, "h_z", h_z, z)
    check_tied("h_neg", h_neg, y_neg, "h_z", h_z, z)
    for name, value in (("coef_chosen", coef_chosen), ("coef_rejected", coef_rejected)):
        check_ndim(name, value, 0, "[] (a scalar)")
        check_finite(name, value)
    rules = [
        *pair_rules(W, h_pos, h_neg, y_pos, y_neg),
        *id_rules(W, "z", z),
    ]
    args = (W, h_pos, h_neg, y_pos, y_neg, h_z, z, coef_chosen, coef_rejected)
    return enforce(_response_velocity(*(jnp.asarray(a) for a in args)), rules)


class MultiTokenTerms(NamedTuple):
    r"""Named terms of Theorem 6 (Razin et al. 2024, App. D.2) at one instant.

    With ``j`` the first position where :math:`y^+` and :math:`y^-` differ (0 in the paper),
    Theorem 6 reads :math:`\frac{d}{dt}\ln\pi(y^+|x) = -\ell'\,[m + S - \mathrm{cross} +
    \mathrm{self}]`.

    Attributes:
      alpha_pos: ``[L+, L+]`` :math:`\alpha^+_{k,k'}`.
      alpha_neg: ``[L+, L-]`` :math:`\alpha^-_{k,k'}`.
      self_alignment: :math:`\sum\alpha^+_{k,k'}\langle h_{x,y^+_{<k}},h_{x,y^+_{<k'}}\rangle`.
      cross_alignment: :math:`\sum\alpha^-_{k,k'}\langle h_{x,y^+_{<k}},h_{x,y^-_{<k'}}\rangle`.
      m: :math:`m(t)\ge 0` (first-token terms at position ``j``, plus the sum over ``k > j``).
      S: :math:`S_{y^+_j,y^-_j}(t)` of Eq. 3 under :math:`\pi(\cdot|x,y_{<j})`.
      bracket: :math:`m + S - \mathrm{cross} + \mathrm{self}`.
      grad_sq_norm_pos: :math:`\|\nabla\ln\pi(y^+|x)\|^2` (Propositions 1-2).
      first_difference: ``j`` (0-based).
    """

    alpha_pos: jax.Array
    alpha_neg: jax.Array
    self_alignment: jax.Array
    cross_alignment: jax.Array
    m: jax.Array
    S: jax.Array
    bracket: jax.Array
    grad_sq_norm_pos: jax.Array
    first_difference: jax.Array


def _terms(W, h_pos, h_neg, y_pos, y_neg) -> MultiTokenTerms:
    h_neg = tie(h_pos, y_pos, h_neg, y_neg)
    r_pos, r_neg = residuals(W, h_pos, y_pos), residuals(W, h_neg, y_neg)  # [L+, V], [L-, V]
    alpha_pos, alpha_neg = r_pos @ r_pos.T, r_pos @ r_neg.T
    self_alignment = jnp.sum(alpha_pos * (h_pos @ h_pos.T))
    cross_alignment = jnp.sum(alpha_neg * (h_pos @ h_neg.T))
    j = first_difference(y_pos, y_neg)
    probs = jax.nn.one_hot(y_pos[j], W.shape[0], dtype=r_pos.dtype) - r_pos[j]  # pi(.|x, y_<j)
    w_pos, w_neg = W[y_pos[j]], W[y_neg[j]]
    p_pos, p_neg = probs[y_pos[j]], probs[y_neg[j]]
    alignment = W @ (w_pos - w_neg)  # [V]
    others = probs @ alignment - p_pos * alignment[y_pos[j]] - p_neg * alignment[y_neg[j]]
    S = -(1.0 - p_pos + p_neg) * (w_pos @ w_neg) - others
    hidden_sq = jnp.sum((r_pos @ W) ** 2, axis=1)  # [L+] |W_{y_k} - Wbar_k|^2
    later = jnp.sum(jnp.where(jnp.arange(y_pos.shape[0]) > j, hidden_sq, 0.0))
    m = (1.0 - p_pos) * (w_pos @ w_pos) + p_neg * (w_neg @ w_neg) + later
    bracket = m + S - cross_alignment + self_alignment
    grad_sq = self_alignment + jnp.sum(hidden_sq)
    return MultiTokenTerms(
        alpha_pos, alpha_neg, self_alignment, cross_alignment, m, S, bracket, grad_sq, j
    )


def multi_token_terms(
    W: ArrayLike, h_pos: ArrayLike, h_neg: ArrayLike, y_pos: ArrayLike, y_neg: ArrayLike
) -> MultiTokenTerms:
    r"""Return the named terms of Theorem 6 (``alpha``, ``m``, ``S``, the bracket) for one pair.

    .. math::
       \frac{d}{dt}\ln\pi(y^+|x) = -\ell'\Big[m + S_{y^+_1,y^-_1}
       - \sum_{k,k'}\alpha^-_{k,k'}\langle h_{x,y^+_{<k}},h_{x,y^-_{<k'}}\rangle
       + \sum_{k,k'}\alpha^+_{k,k'}\langle h_{x,y^+_{<k}},h_{x,y^+_{<k'}}\rangle\Big]

    :math:`\alpha^\pm_{k,k'} = \langle e_{y^+_k}-\pi(\cdot|x,y^+_{<k}),
    e_{y^\pm_{k'}}-\pi(\cdot|x,y^\pm_{<k'})\rangle`, :math:`m = (1-\pi(y^+_1|x))\|W_{y^+_1}\|^2
    + \pi(y^-_1|x)\|W_{y^-_1}\|^2 + \sum_{k\ge 2}\|W_{y^+_k} - \bar W_k\|^2`, S of Eq. 3.

    Source: Razin et al. 2024, Theorem 6 (App. D.2, proof F.3) and Eq. 3.
    Reading (shared prefixes): the paper assumes :math:`y^+_1\ne y^-_1` and says shared prefixes
    replace the first-token terms by those of the first differing tokens. Derived from Eq. 7/9
    and pinned against autodiff in the tests: with ``j`` the first differing position, the
    first-token terms of ``m`` and ``S`` use :math:`y^\pm_j` and :math:`\pi(\cdot|x,y_{<j})`,
    **and the sum in m runs over k > j only** (the hidden gradients of the shared prefixes
    ``k < j`` cancel between :math:`\nabla\ln\pi(y^+)` and :math:`\nabla\ln\pi(y^-)`); the
    ``alpha`` sums are unchanged, with shared rows tied.

    Args:
      W: ``[V, d]`` unembeddings.
      h_pos: ``[L+, d]`` hidden embeddings of :math:`(x, y^+_{<k})`, ``k = 1..L+``.
      h_neg: ``[L-, d]`` likewise for :math:`y^-`; rows of shared prefixes must equal ``h_pos``'s.
      y_pos: ``[L+]`` token ids of :math:`y^+`.
      y_neg: ``[L-]`` token ids of :math:`y^-`.

    Returns:
      :class:`MultiTokenTerms`.

    Raises:
      ValueError: bad shapes, empty responses, ids out of range, non-finite input, shared rows
        that differ, responses that do not differ within ``min(L+, L-)`` tokens (identical, or
        one a prefix of the other: use :func:`response_logprob_velocity`). Traced values
        breaking a rule make every floating field NaN (``first_difference`` is an integer).

    Example:
      >>> W, h = jnp.eye(2), jnp.zeros((1, 2))  # single tokens, uniform pi: Theorem 4
      >>> t = multi_token_terms(W, h, h, jnp.array([0]), jnp.array([1]))
      >>> float(t.m), float(t.S), float(t.bracket)  # m = 1/2 + 1/2, S = 0, alpha sums 0
      (1.0, 0.0, 1.0)
    """
    validate_pair(W, h_pos, h_neg, y_pos, y_neg)
    check_differ_within(y_pos, y_neg, first=False)
    rules = pair_rules(W, h_pos, h_neg, y_pos, y_neg) + differ_rules(y_pos, y_neg, first=False)
    return enforce(_terms(*(jnp.asarray(a) for a in (W, h_pos, h_neg, y_pos, y_neg))), rules)


class OtherResponseTerms(NamedTuple):
    r"""Named terms of Theorem 7: :math:`\frac{d}{dt}\ln\pi(z|x) = -\ell'\,\mathrm{bracket}`.

    Attributes:
      c: :math:`-\sum_{z'}\pi(z'|x)\langle W_{z'}, W_{y^+_1}-W_{y^-_1}\rangle` (independent of z).
      first_token_alignment: :math:`\langle W_{z_1}, W_{y^+_1}-W_{y^-_1}\rangle`.
      beta_pos: ``[Lz, L+]`` :math:`\beta^+_{k,k'}`.
      beta_neg: ``[Lz, L-]`` :math:`\beta^-_{k,k'}`.
      pos_alignment: :math:`\sum\beta^+_{k,k'}\langle h_{x,z_{<k}}, h_{x,y^+_{<k'}}\rangle`.
      neg_alignment: :math:`\sum\beta^-_{k,k'}\langle h_{x,z_{<k}}, h_{x,y^-_{<k'}}\rangle`.
      bracket: ``c + first_token_alignment - neg_alignment + pos_alignment``.
    """

    c: jax.Array
    first_token_alignment: jax.Array
    beta_pos: jax.Array
    beta_neg: jax.Array
    pos_alignment: jax.Array
    neg_alignment: jax.Array
    bracket: jax.Array


def other_response_terms(
    W: ArrayLike,
    h_pos: ArrayLike,
    h_neg: ArrayLike,
    y_pos: ArrayLike,
    y_neg: ArrayLike,
    h_z: ArrayLike,
    z: ArrayLike,
) -> OtherResponseTerms:
    r"""Return the named terms of Theorem 7 for a response ``z`` starting with a third token.

    .. math::
       \frac{d}{dt}\ln\pi(z|x) = -\ell'\Big[c + \langle W_{z_1}, W_{y^+_1}-W_{y^-_1}\rangle
       - \sum_{k,k'}\beta^-_{k,k'}\langle h_{x,z_{<k}},h_{x,y^-_{<k'}}\rangle
       + \sum_{k,k'}\beta^+_{k,k'}\langle h_{x,z_{<k}},h_{x,y^+_{<k'}}\rangle\Big]

    :math:`\beta^\pm_{k,k'} = \langle e_{z_k}-\pi(\cdot|x,z_{<k}),
    e_{y^\pm_{k'}}-\pi(\cdot|x,y^\pm_{<k'})\rangle`.

    Source: Razin et al. 2024, Theorem 7 (App. D.2, proof F.4).
    Reading: the theorem needs :math:`y^+_1\ne y^-_1` and :math:`z_1\notin\{y^+_1,y^-_1\}`, so
    only the prompt's hidden embedding is shared; for other cases (shared prefixes, extra terms
    the paper only describes) use :func:`response_logprob_velocity`.

    Args:
      W, h_pos, h_neg, y_pos, y_neg: as in :func:`multi_token_terms`.
      h_z: ``[Lz, d]`` hidden embeddings of the prefixes of ``z``; row 0 must equal ``h_pos[0]``.
      z: ``[Lz]`` token ids.

    Returns:
      :class:`OtherResponseTerms`.

    Raises:
      ValueError: bad shapes, ids, non-finite input, differing prompt rows,
        ``y_pos[0] == y_neg[0]`` or ``z[0]`` in ``{y_pos[0], y_neg[0]}`` (traced: every field
        NaN instead).

    Example:
      >>> W, h = jnp.eye(3), jnp.zeros((1, 3))  # uniform pi; <W_2, W_0 - W_1> = 0
      >>> t = other_response_terms(W, h, h, jnp.array([0]), jnp.array([1]), h, jnp.array([2]))
      >>> round(float(t.bracket), 12)  # c = -(1/3)(1 - 1) = 0, h = 0
      0.0
    """
    validate_pair(W, h_pos, h_neg, y_pos, y_neg)
    validate_response(W, "h_z", h_z, "z", z)
    check_differ_within(y_pos, y_neg, first=True)
    if is_concrete(z) and is_concrete(y_pos) and is_concrete(y_neg):
        z0 = int(np.asarray(z)[0])
        if z0 in (int(np.asarray(y_pos)[0]), int(np.asarray(y_neg)[0])):
            raise ValueError(
                f"z[0] must differ from y_pos[0] and y_neg[0] (Theorem 7), got z[0]={z0}"
            )
    check_tied("h_pos", h_pos, y_pos, "h_z", h_z, z)
    check_tied("h_pos", h_pos, y_pos, "h_neg", h_neg, y_neg)
    rules = [
        *pair_rules(W, h_pos, h_neg, y_pos, y_neg),
        *id_rules(W, "z", z),
        *differ_rules(y_pos, y_neg, first=True),
    ]
    if not (is_concrete(z) and is_concrete(y_pos) and is_concrete(y_neg)):
        z0, p0, n0 = (jnp.asarray(x)[0] for x in (z, y_pos, y_neg))
        rules.append(((z0 != p0) & (z0 != n0), "z[0] must differ from y_pos[0] and y_neg[0]"))
    W, h_pos, h_neg, y_pos, y_neg, h_z, z = (
        jnp.asarray(a) for a in (W, h_pos, h_neg, y_pos, y_neg, h_z, z)
    )
    h_neg, h_z = h_neg.at[0].set(h_pos[0]), h_z.at[0].set(h_pos[0])
    r_z = residuals(W, h_z, z)
    beta_pos, beta_neg = r_z @ residuals(W, h_pos, y_pos).T, r_z @ residuals(W, h_neg, y_neg).T
    delta = W[y_pos[0]] - W[y_neg[0]]
    c = -(jax.nn.softmax(W @ h_pos[0]) @ (W @ delta))
    first = W[z[0]] @ delta
    pos_alignment = jnp.sum(beta_pos * (h_z @ h_pos.T))
    neg_alignment = jnp.sum(beta_neg * (h_z @ h_neg.T))
    bracket = c + first - neg_alignment + pos_alignment
    terms = OtherResponseTerms(c, first, beta_pos, beta_neg, pos_alignment, neg_alignment, bracket)
    return enforce(terms, rules)


def positive_alpha_fraction(
    W: ArrayLike,
    h_pos: ArrayLike,
    h_neg: ArrayLike,
    y_pos: ArrayLike,
    y_neg: ArrayLike,
    mask_pos: ArrayLike | None = None,
    mask_neg: ArrayLike | None = None,
) -> jax.Array:
    r"""Return the fraction of positive :math:`\alpha^\pm_{k,k'}` coefficients of Theorem 6.

    .. math:: \frac{\#\{\alpha^+_{k,k'}>0\} + \#\{\alpha^-_{k,k'}>0\}}{|y^+|^2 + |y^+||y^-|}

    Source: Razin et al. 2024, App. G.2 ("on average over 69% of the coefficients are positive").
    Reading: every entry of both matrices counts (the symmetric :math:`\alpha^+` in full, its
    diagonal :math:`\|e_{y_k}-\pi_k\|^2 > 0` included); the paper does not say which entries.
    With masks (padding), only entries between real positions count; padded ids must be valid.

    Args:
      W, h_pos, h_neg, y_pos, y_neg: as in :func:`multi_token_terms` (no distinctness needed).
      mask_pos: optional ``[L+]`` boolean, real positions of ``y_pos`` (default all).
      mask_neg: optional ``[L-]`` boolean, likewise.

    Returns:
      Scalar fraction in ``[0, 1]``.

    Raises:
      ValueError: as :func:`gradient_inner_product`; masks of the wrong shape or selecting nothing
        (traced ids out of range: NaN).

    Example:
      >>> W, h = jnp.eye(2), jnp.zeros((1, 2))  # alpha+ = 1/2 > 0, alpha- = -1/2
      >>> float(positive_alpha_fraction(W, h, h, jnp.array([0]), jnp.array([1])))
      0.5
    """
    validate_pair(W, h_pos, h_neg, y_pos, y_neg)
    masks = [
        check_mask_1d("mask_pos", mask_pos, jnp.shape(y_pos)[0]),
        check_mask_1d("mask_neg", mask_neg, jnp.shape(y_neg)[0]),
    ]
    rules = pair_rules(W, h_pos, h_neg, y_pos, y_neg)
    W, h_pos, h_neg, y_pos, y_neg = (jnp.asarray(a) for a in (W, h_pos, h_neg, y_pos, y_neg))
    r_pos = residuals(W, h_pos, y_pos)
    r_neg = residuals(W, tie(h_pos, y_pos, h_neg, y_neg), y_neg)
    valid_pos = masks[0][:, None] & masks[0][None, :]  # [L+, L+]
    valid_neg = masks[0][:, None] & masks[1][None, :]  # [L+, L-]
    positive = jnp.sum(((r_pos @ r_pos.T) > 0) & valid_pos) + jnp.sum(
        ((r_pos @ r_neg.T) > 0) & valid_neg
    )
    return enforce(positive / (jnp.sum(valid_pos) + jnp.sum(valid_neg)), rules)
