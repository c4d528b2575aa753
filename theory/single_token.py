r"""Closed forms for single-token responses under gradient flow (Razin et al. 2024, App. D.1, D.3).

Setting: the unconstrained-features model with unembeddings ``W`` ``[V, d]`` and a free hidden
embedding ``h`` ``[d]`` per prompt; :math:`\pi(\cdot|x) = \mathrm{softmax}(W h)`; gradient flow
:math:`\dot\theta = -\nabla L` on a loss of the class :math:`\ell(\ln\pi(y^+|x) - \ln\pi(y^-|x))`.

Every function here is pure JAX, jit- and vmap-safe, and works in float32 and float64. Public
functions validate shapes always and values (ids, finiteness, ``y_pos != y_neg``) when concrete;
traced ids out of ``[0, V)`` or equal ids give an all-NaN result (the rule of :mod:`theory`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from theory.checks import (
    all_valid,
    check_distinct,
    check_finite,
    check_ndim,
    check_token_ids,
    guard,
    poison,
    valid_distinct,
    valid_token_ids,
)

#: What a traced pair of ids must satisfy (the message :func:`theory.checks.checked` reports).
IDS_RULE = "y_pos and y_neg must be token ids in [0, V) with y_pos != y_neg"


class DisplacementTerms(NamedTuple):
    r"""The named terms of Theorems 4 and 5 (Razin et al. 2024, App. D.1) at one instant.

    Attributes:
      prob_pos: :math:`\pi(y^+|x)`, scalar.
      prob_neg: :math:`\pi(y^-|x)`, scalar.
      m: :math:`m(t) \ge 0` of Theorem 4.
      S: :math:`S_{y^+,y^-}(t)` of Eq. 3; Theorem 4 reads :math:`-\ell'\,[m + S]`.
      unembedding_alignment: :math:`\langle W_{y^+}, W_{y^-}\rangle` ("preferences unembedding
        alignment").
      token_alignment: ``[V]``, :math:`\langle W_z, W_{y^+} - W_{y^-}\rangle` for every token.
      other_tokens_alignment: :math:`\sum_{z\ne y^\pm}\pi_z\langle W_z, W_{y^+}-W_{y^-}\rangle`.
      c: the z-independent constant :math:`c(t)` of Theorem 5.
      hidden_norm_sq: :math:`\|h_x\|^2`.
    """

    prob_pos: jax.Array
    prob_neg: jax.Array
    m: jax.Array
    S: jax.Array
    unembedding_alignment: jax.Array
    token_alignment: jax.Array
    other_tokens_alignment: jax.Array
    c: jax.Array
    hidden_norm_sq: jax.Array


def _validate_single(W, h, y_pos, y_neg) -> None:
    check_ndim("W", W, 2, "[V, d]")
    check_ndim("h", h, 1, "[d]")
    if jnp.shape(h)[0] != jnp.shape(W)[1]:
        raise ValueError(
            f"h must have the hidden size d={jnp.shape(W)[1]} of W, got shape {jnp.shape(h)}"
        )
    V = jnp.shape(W)[0]
    for name, y in (("y_pos", y_pos), ("y_neg", y_neg)):
        check_ndim(name, y, 0, "[] (a scalar token id)")
        check_token_ids(name, y, V)
    check_distinct("y_pos", y_pos, "y_neg", y_neg)
    check_finite("W", W)
    check_finite("h", h)


def _valid_ids(y_pos, y_neg, vocab_size: int):
    """Traced validity of the id pair(s): in range and distinct (Python ``True`` if concrete)."""
    return all_valid(
        valid_token_ids(y_pos, vocab_size),
        valid_token_ids(y_neg, vocab_size),
        valid_distinct(y_pos, y_neg),
    )


def _terms(W, h, y_pos, y_neg) -> DisplacementTerms:
    probs = jax.nn.softmax(W @ h)  # [V]
    w_pos, w_neg = W[y_pos], W[y_neg]  # [d], [d]
    token_alignment = W @ (w_pos - w_neg)  # [V]
    p_pos, p_neg = probs[y_pos], probs[y_neg]
    hidden_norm_sq = h @ h
    unembedding_alignment = w_pos @ w_neg
    m = (
        (1.0 - p_pos) * (w_pos @ w_pos)
        + p_neg * (w_neg @ w_neg)
        + (1.0 - p_pos + p_neg) * hidden_norm_sq
    )
    # sum over z not in {y+, y-} of pi(z) <W_z, W+ - W->
    others = (
        probs @ token_alignment - p_pos * token_alignment[y_pos] - p_neg * token_alignment[y_neg]
    )
    S = -(1.0 - p_pos + p_neg) * unembedding_alignment - others
    c = (p_neg - p_pos) * hidden_norm_sq - probs @ token_alignment
    return DisplacementTerms(
        p_pos, p_neg, m, S, unembedding_alignment, token_alignment, others, c, hidden_norm_sq
    )


def displacement_terms(
    W: ArrayLike, h: ArrayLike, y_pos: ArrayLike, y_neg: ArrayLike
) -> DisplacementTerms:
    r"""Return the named terms of Theorems 4 and 5 for plots and diagnostics.

    .. math::
       m = (1-\pi^+)\|W_{y^+}\|^2 + \pi^-\|W_{y^-}\|^2 + (1-\pi^++\pi^-)\|h_x\|^2,\quad
       S = -(1-\pi^++\pi^-)\langle W_{y^+},W_{y^-}\rangle
           - \sum_{z\ne y^\pm}\pi_z\langle W_z, W_{y^+}-W_{y^-}\rangle

    Source: Razin et al. 2024, Theorem 4 (App. D.1) and Eq. 3; :math:`c` from Theorem 5.

    Args:
      W: ``[V, d]`` token unembeddings.
      h: ``[d]`` hidden embedding of the prompt.
      y_pos: integer id of :math:`y^+`.
      y_neg: integer id of :math:`y^-`, ``!= y_pos``.

    Returns:
      :class:`DisplacementTerms`.

    Raises:
      ValueError: bad shapes, ids out of ``[0, V)``, ``y_pos == y_neg``, non-finite inputs
        (traced ids out of range or equal: every field is NaN).

    Example:
      >>> t = displacement_terms(jnp.eye(3), jnp.zeros(3), 0, 1)  # uniform pi = 1/3
      >>> round(float(t.m), 6), round(float(t.S), 6)  # m = 2/3 + 1/3; S = -(1/3)*<W_2, e0-e1> = 0
      (1.0, 0.0)
    """
    _validate_single(W, h, y_pos, y_neg)
    valid = _valid_ids(y_pos, y_neg, jnp.shape(W)[0])
    y_pos, y_neg = guard((y_pos, y_neg), valid)
    terms = _terms(jnp.asarray(W), jnp.asarray(h), jnp.asarray(y_pos), jnp.asarray(y_neg))
    return poison(terms, valid, IDS_RULE)


def _rejected_bracket(W, t: DisplacementTerms, y_pos, y_neg):
    """Bracket of d/dt ln pi(y-|x) = -l' * bracket: Theorem 4 for the swapped pair, negated."""
    w_pos, w_neg = W[y_pos], W[y_neg]
    weight = 1.0 + t.prob_pos - t.prob_neg
    m_swapped = (
        (1.0 - t.prob_neg) * (w_neg @ w_neg)
        + t.prob_pos * (w_pos @ w_pos)
        + weight * t.hidden_norm_sq
    )
    # S for (y-, y+): -(1 - pi- + pi+) <W-, W+> - sum_{z != y+-} pi_z <W_z, W- - W+>
    s_swapped = -weight * t.unembedding_alignment + t.other_tokens_alignment
    return -(m_swapped + s_swapped)


def _velocity(W, h, y_pos, y_neg, ell_prime):
    t = _terms(W, h, y_pos, y_neg)
    scale = -jnp.asarray(ell_prime)
    velocity = scale * (t.token_alignment + t.c)  # Theorem 5, z not in {y+, y-}
    velocity = velocity.at[y_pos].set(scale * (t.m + t.S))  # Theorem 4
    return velocity.at[y_neg].set(scale * _rejected_bracket(W, t, y_pos, y_neg))


def logprob_velocity(
    W: ArrayLike, h: ArrayLike, y_pos: ArrayLike, y_neg: ArrayLike, ell_prime: ArrayLike
) -> jax.Array:
    r"""Return :math:`\frac{d}{dt}\ln\pi_{\theta(t)}(z|x)` for every token ``z`` (gradient flow).

    .. math::
       \frac{d}{dt}\ln\pi(z|x) = -\ell'\,\Big[\langle W_z, W_{y^+}-W_{y^-}\rangle + c\Big]
       \ (z\notin\{y^+,y^-\}),\qquad
       \frac{d}{dt}\ln\pi(y^+|x) = -\ell'\,[m + S_{y^+,y^-}],\qquad
       \frac{d}{dt}\ln\pi(y^-|x) = \ell'\,[m_{y^-,y^+} + S_{y^-,y^+}]

    Source: Razin et al. 2024, Theorem 4 (entry ``y_pos``) and Theorem 5 (other entries), App.
    D.1, from Eq. 7. The ``y_neg`` entry is derived here the same way (not stated in the paper):
    :math:`\langle\nabla\ln\pi(y^-), \nabla\ln\pi(y^+) - \nabla\ln\pi(y^-)\rangle` equals minus
    Theorem 4's bracket with the roles of :math:`y^+` and :math:`y^-` exchanged, i.e.
    :math:`m_{y^-,y^+} = (1-\pi^-)\|W_{y^-}\|^2 + \pi^+\|W_{y^+}\|^2 + (1+\pi^+-\pi^-)\|h\|^2` and
    :math:`S_{y^-,y^+} = -(1+\pi^+-\pi^-)\langle W_{y^+},W_{y^-}\rangle
    + \sum_{z\ne y^\pm}\pi_z\langle W_z,W_{y^+}-W_{y^-}\rangle`.
    Reading: Theorem 5 as printed writes :math:`-\ell(t)` for the prefactor; the proof (F.2) has
    :math:`-\ell'(t)`, which is used here (a test pins it against autodiff).

    Args:
      W: ``[V, d]`` token unembeddings (float32 or float64).
      h: ``[d]`` hidden embedding of the prompt.
      y_pos: integer id of the preferred token :math:`y^+`.
      y_neg: integer id of the dispreferred token, ``!= y_pos``.
      ell_prime: scalar :math:`\ell'` at the current margin (negative for DPO; see
        :func:`theory.losses.margin_derivative`).

    Returns:
      ``[V]`` array of log-probability velocities.

    Raises:
      ValueError: bad shapes, ids out of ``[0, V)``, ``y_pos == y_neg``, non-finite inputs.
        Traced ids out of range or equal (inside ``jit``/``vmap``) give all ``V`` entries NaN.

    Example:
      >>> W = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
      >>> v = logprob_velocity(W, jnp.zeros(2), 0, 1, -1.0)  # pi uniform, h = 0
      >>> # y+: m = (2/3)|W_0|^2 + (1/3)|W_1|^2 = 1, S = 0 since <W_2, W_0 - W_1> = 0; y- mirrors it
      >>> [round(float(x), 4) for x in v]
      [1.0, -1.0, 0.0]
    """
    _validate_single(W, h, y_pos, y_neg)
    check_ndim("ell_prime", ell_prime, 0, "[] (a scalar)")
    check_finite("ell_prime", ell_prime)
    valid = _valid_ids(y_pos, y_neg, jnp.shape(W)[0])
    y_pos, y_neg = guard((y_pos, y_neg), valid)
    velocity = _velocity(
        jnp.asarray(W), jnp.asarray(h), jnp.asarray(y_pos), jnp.asarray(y_neg), ell_prime
    )
    return poison(velocity, valid, IDS_RULE)


def multi_sample_logprob_velocity(
    W: ArrayLike, H: ArrayLike, y_pos: ArrayLike, y_neg: ArrayLike, ell_prime: ArrayLike
) -> jax.Array:
    r"""Return :math:`\frac{d}{dt}\ln\pi(z|x_i)` for every prompt ``i`` and token ``z``, ``[N, V]``.

    .. math::
       \frac{d}{dt}\ln\pi(z|x_i) = \frac{1}{N}\,v^{\mathrm{single}}_i(z)
       + \sum_{j\ne i}\frac{-\ell'_j}{N}\big(\mathbb 1[z=y^+_j]-\mathbb 1[z=y^-_j]
       + \pi(y^-_j|x_i)-\pi(y^+_j|x_i)\big)\langle h_{x_i},h_{x_j}\rangle

    where :math:`v^{\mathrm{single}}_i` is :func:`logprob_velocity` for sample ``i`` alone. The
    loss is the mean over samples, :math:`L = \frac1N\sum_j \ell_j` (Eq. 2).

    Source: Razin et al. 2024, Theorem 8 (entry :math:`z = y^+_i`: the bracket is
    :math:`\alpha_{x_i,x_j}`) and Theorem 9 (every ``z``), App. D.3, proofs F.5-F.6.
    Reading: Theorem 9's printed statement drops the primes on :math:`\ell`; the proof has
    :math:`\ell'`, used here. Each row of ``H`` is a distinct prompt with its own trainable hidden
    embedding (the theorems assume no prompt appears twice).

    Args:
      W: ``[V, d]`` token unembeddings.
      H: ``[N, d]`` hidden embeddings, one per prompt.
      y_pos: ``[N]`` integer ids of the preferred tokens.
      y_neg: ``[N]`` integer ids of the dispreferred tokens, ``y_neg[i] != y_pos[i]``.
      ell_prime: ``[N]`` per-sample :math:`\ell'` at the current margins.

    Returns:
      ``[N, V]`` array of log-probability velocities.

    Raises:
      ValueError: bad shapes, ids out of range, ``y_pos[i] == y_neg[i]``, non-finite inputs.
        Traced: any invalid sample makes all ``[N, V]`` entries NaN (every row couples to every
        sample through the Gram matrix).

    Example:
      >>> W = jnp.eye(3)
      >>> v1 = logprob_velocity(W, jnp.ones(3), 0, 1, -1.0)
      >>> vN = multi_sample_logprob_velocity(W, jnp.ones((1, 3)), jnp.array([0]), jnp.array([1]),
      ...                                     jnp.array([-1.0]))
      >>> bool(jnp.allclose(vN[0], v1))  # N = 1 is Theorems 4-5
      True
    """
    check_ndim("W", W, 2, "[V, d]")
    check_ndim("H", H, 2, "[N, d]")
    N, d = jnp.shape(H)
    V = jnp.shape(W)[0]
    if d != jnp.shape(W)[1]:
        raise ValueError(
            f"H must have the hidden size d={jnp.shape(W)[1]} of W, got shape {(N, d)}"
        )
    for name, arr in (("y_pos", y_pos), ("y_neg", y_neg), ("ell_prime", ell_prime)):
        if jnp.shape(arr) != (N,):
            raise ValueError(f"{name} must have shape [N]=({N},), got shape {jnp.shape(arr)}")
    check_token_ids("y_pos", y_pos, V)
    check_token_ids("y_neg", y_neg, V)
    check_distinct("y_pos", y_pos, "y_neg", y_neg)
    for name, arr in (("W", W), ("H", H), ("ell_prime", ell_prime)):
        check_finite(name, arr)
    valid = _valid_ids(y_pos, y_neg, V)
    velocity = _multi_velocity(
        jnp.asarray(W),
        jnp.asarray(H),
        jnp.asarray(y_pos),
        jnp.asarray(y_neg),
        jnp.asarray(ell_prime),
    )
    return poison(velocity, valid, IDS_RULE)


def _multi_velocity(W, H, y_pos, y_neg, ell_prime):
    N, V = H.shape[0], W.shape[0]
    own = jax.vmap(_velocity, in_axes=(None, 0, 0, 0, 0))(W, H, y_pos, y_neg, ell_prime)  # [N, V]
    probs = jax.nn.softmax(H @ W.T, axis=-1)  # [N, V]
    gram = H @ H.T  # [N, N]
    # K[i, j] = (-l'_j / N) <h_i, h_j> for j != i
    K = (-ell_prime / N)[None, :] * gram * (1.0 - jnp.eye(N, dtype=gram.dtype))
    signs = jax.nn.one_hot(y_pos, V, dtype=W.dtype) - jax.nn.one_hot(y_neg, V, dtype=W.dtype)
    # shift[i] = sum_j K[i, j] (pi(y-_j | x_i) - pi(y+_j | x_i))
    shift = jnp.sum(K * (probs[:, y_neg] - probs[:, y_pos]), axis=1)  # [N]
    return own / N + K @ signs + shift[:, None]
