r"""DPO vs DPO-Positive on an edit-distance-1 pair, in the per-position logit model.

Setting (Pal et al. 2024, §3 "Edit Distance 1"): :math:`y_w = (t_1..t_L)` and :math:`y_l` differ
only at position :math:`m` (0-based here). Position :math:`k` is predicted in the context
:math:`y^{<k}`; contexts :math:`k \le m` are shared, contexts :math:`k > m` differ
(:math:`y_w^{<k} \ne y_l^{<k}`). ``logits_chosen[k]`` / ``logits_rejected[k]`` are the next-token
logits in :math:`y_w^{<k}` / :math:`y_l^{<k}` (equal rows for :math:`k \le m`), and
:math:`s^w_k = \mathrm{softmax}` of ``logits_chosen[k]``, :math:`s^l_k` likewise.

Parameterisation. The source "restricts attention to the logits :math:`\theta_j`": one logit
vector :math:`\theta_k \in \mathbb R^V` per position, added to the logits of *both* contexts at
that position (the contexts differ through fixed offsets). Gradients here are with respect to
:math:`\theta_k`. Reading: with a separate free logit vector per context instead, DPO's flow
raises :math:`\ln\pi(t_k|y_w^{<k})` at every position (its gradient in the :math:`y_w` context is
:math:`a^+(e_{t_k} - s^w_k)`); the failure mode needs the tie across contexts, which is what the
source's formula :math:`s_j(y_l^{<k}) - s_j(y_w^{<k})` computes.

All functions are pure JAX, jit- and vmap-safe. Validation raises on concrete inputs; traced
invalid inputs (ids out of range, a pair not at edit distance 1, ``beta <= 0``, ``lam < 0``,
non-finite logits) make the floating fields of the result NaN (the rule of :mod:`theory`).
Shared rows that differ are caught only when concrete (exact float equality inside a compiled
program is not reliable). Sign predictions and the smallest :math:`\lambda` per position are in
:mod:`theory.dpop_signs`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from theory.checks import (
    all_valid,
    check_bool,
    check_finite,
    check_ndim,
    check_nonnegative,
    check_positive,
    check_token_ids,
    enforce,
    guard,
    is_concrete,
    report,
    rules_valid,
    valid_finite,
    valid_nonnegative,
    valid_positive,
    valid_token_ids,
)


def edit_position(chosen: ArrayLike, rejected: ArrayLike) -> int:
    """Return the one position ``m`` where ``chosen`` and ``rejected`` differ.

    Source: Pal et al. 2024, §3 (edit distance 1, Hamming distance between equal-length
    completions).

    Args:
      chosen: ``[L]`` integer token ids of :math:`y_w` (concrete).
      rejected: ``[L]`` integer token ids of :math:`y_l` (concrete).

    Returns:
      The 0-based edit position ``m``.

    Raises:
      ValueError: not 1-D, lengths differ, or the pair differs in zero or several positions.
      TypeError: ids are not integers.

    Example:
      >>> edit_position(jnp.array([2, 10, 2, 11, 4]), jnp.array([2, 10, 2, 11, 5]))
      4
    """
    check_ndim("chosen", chosen, 1, "[L]")
    check_ndim("rejected", rejected, 1, "[L]")
    if np.shape(chosen) != np.shape(rejected):
        raise ValueError(
            "chosen and rejected must have the same length L, got lengths "
            f"{np.shape(chosen)[0]} and {np.shape(rejected)[0]}"
        )
    if not (is_concrete(chosen) and is_concrete(rejected)):
        raise ValueError("chosen and rejected must be concrete token ids to find the edit position")
    for name, ids in (("chosen", chosen), ("rejected", rejected)):
        if not np.issubdtype(np.asarray(ids).dtype, np.integer):
            raise TypeError(
                f"{name} must hold integer token ids, got dtype {np.asarray(ids).dtype}"
            )
    diff = np.flatnonzero(np.asarray(chosen) != np.asarray(rejected))
    if diff.size != 1:
        raise ValueError(
            "chosen and rejected must differ in exactly one position (edit distance 1), "
            f"got {diff.size} differing positions {diff.tolist()}"
        )
    return int(diff[0])


class DPOPCoefficients(NamedTuple):
    r"""Weights of :math:`\nabla lp^\pm` in :math:`-\nabla L = a^+\nabla lp^+ - a^-\nabla lp^-`.

    Attributes:
      coef_chosen: :math:`a^+`.
      coef_rejected: :math:`a^-`.
      hinge_active: whether :math:`\ln\pi_{ref}(y_w) > \ln\pi_\theta(y_w)` (penalty active).
    """

    coef_chosen: jax.Array
    coef_rejected: jax.Array
    hinge_active: jax.Array


def _coefficients(lp_c, lp_r, ref_c, ref_r, beta, lam, penalty_inside_beta):
    active = ref_c - lp_c > 0
    lam_on = jnp.where(active, lam, 0.0)
    margin = (lp_c - ref_c) - (lp_r - ref_r)
    if penalty_inside_beta:
        q = jax.nn.sigmoid(-beta * (margin - lam_on * (ref_c - lp_c)))
        return DPOPCoefficients(beta * q * (1.0 + lam_on), beta * q, active)
    q = jax.nn.sigmoid(-(beta * margin - lam_on * (ref_c - lp_c)))
    return DPOPCoefficients((beta + lam_on) * q, beta * q, active)


def dpop_coefficients(
    logprob_chosen: ArrayLike,
    logprob_rejected: ArrayLike,
    ref_logprob_chosen: ArrayLike = 0.0,
    ref_logprob_rejected: ArrayLike = 0.0,
    *,
    beta: float = 0.1,
    lam: float,
    penalty_inside_beta: bool = True,
) -> DPOPCoefficients:
    r"""Return the closed-form :math:`(a^+, a^-)` of :func:`theory.losses.dpop_loss`.

    .. math:: a^- = \beta\,\sigma(-\beta v),\quad a^+ = (1 + \lambda\,\mathbb 1[P>0])\,a^-,\quad
              v = \Delta - \lambda\max(0, P),\ P = lp^+_{ref} - lp^+

    with :math:`\Delta` the log-ratio margin (penalty inside :math:`\beta[\cdot]`, the default).
    Outside (the source note's form): :math:`a^- = \beta\sigma(-x)`,
    :math:`a^+ = (\beta + \lambda\mathbb 1[P>0])\sigma(-x)`,
    :math:`x = \beta\Delta - \lambda\max(0,P)`,
    i.e. the inside form with :math:`\lambda/\beta` in place of :math:`\lambda` in the weights.

    Source: Pal et al. 2024, Eq. 3 (chain rule, derived here). While the hinge is active this is
    Razin et al. 2024's weighted loss (Eq. 5) with :math:`\lambda^+ = 1+\lambda`,
    :math:`\lambda^- = 1`.
    Reading: at the kink :math:`P = 0` the hinge counts as inactive (JAX's autodiff of ``max``
    takes half of each side there).

    Args:
      logprob_chosen, logprob_rejected, ref_logprob_chosen, ref_logprob_rejected: summed
        log-probs, as in :func:`theory.losses.dpop_loss` (broadcastable).
      beta: :math:`\beta > 0`.
      lam: :math:`\lambda \ge 0`, required (``lam=0`` gives DPO's coefficients), as in
        :func:`theory.losses.dpop_loss`.
      penalty_inside_beta: placement of the penalty (default: inside, as the paper's Eq. 3).

    Returns:
      :class:`DPOPCoefficients`.

    Raises:
      ValueError: ``beta <= 0``, ``lam < 0`` or non-finite log-probs. A traced ``beta <= 0`` or
        ``lam < 0`` makes both coefficients NaN (``hinge_active`` is boolean: then False).
      TypeError: ``penalty_inside_beta`` is not a bool.

    Example:
      >>> c = dpop_coefficients(-2.0, -2.0, -1.0, -2.0, beta=1.0, lam=1.0)
      >>> # P = 1, v = -1 - 1 = -2: a- = sigma(2), a+ = 2 sigma(2)
      >>> round(float(c.coef_rejected), 6), round(float(c.coef_chosen), 6)
      (0.880797, 1.761594)
    """
    check_positive("beta", beta)
    check_nonnegative("lam", lam)
    check_bool("penalty_inside_beta", penalty_inside_beta)
    raw = (logprob_chosen, logprob_rejected, ref_logprob_chosen, ref_logprob_rejected)
    names = ("logprob_chosen", "logprob_rejected", "ref_logprob_chosen", "ref_logprob_rejected")
    for name, a in zip(names, raw, strict=True):
        check_finite(name, a)
    rules = [
        (all_valid(valid_positive(beta)), "beta must be > 0 and finite"),
        (all_valid(valid_nonnegative(lam)), "lam must be >= 0 and finite"),
    ]
    # poisoning by input: NaN log-probs make q, hence both coefficients, NaN (no output select)
    report(rules)
    lps = guard(raw, rules_valid(rules))
    return _coefficients(*(jnp.asarray(a) for a in lps), beta, lam, penalty_inside_beta)


def _validate_pair(logits_chosen, logits_rejected, chosen, rejected) -> None:
    check_ndim("logits_chosen", logits_chosen, 2, "[L, V]")
    check_ndim("logits_rejected", logits_rejected, 2, "[L, V]")
    check_ndim("chosen", chosen, 1, "[L]")
    check_ndim("rejected", rejected, 1, "[L]")
    # traced ids (inside jit/vmap) cannot be checked for edit distance 1; concrete ones are
    m = edit_position(chosen, rejected) if is_concrete((chosen, rejected)) else None
    L, V = np.shape(logits_chosen)
    if np.shape(logits_rejected) != (L, V):
        raise ValueError(
            f"logits_rejected must have the shape {(L, V)} of logits_chosen, "
            f"got {np.shape(logits_rejected)}"
        )
    for name, ids in (("chosen", chosen), ("rejected", rejected)):
        if np.shape(ids) != (L,):
            raise ValueError(
                f"{name} must have length L={L} (rows of logits_chosen), got {np.shape(ids)}"
            )
    check_token_ids("chosen", chosen, V)
    check_token_ids("rejected", rejected, V)
    check_finite("logits_chosen", logits_chosen)
    check_finite("logits_rejected", logits_rejected)
    if (
        m is not None
        and is_concrete((logits_chosen, logits_rejected))
        and not np.array_equal(
            np.asarray(logits_chosen)[: m + 1], np.asarray(logits_rejected)[: m + 1]
        )
    ):
        raise ValueError(
            "logits_rejected[:m+1] must equal logits_chosen[:m+1] (contexts up to the edit at "
            f"m={m} are shared), got different rows"
        )


def _pair_rules(logits_chosen, logits_rejected, chosen, rejected) -> list:
    """Traced validity of an edit pair as (predicate, message) (Python ``True`` if concrete)."""
    V = np.shape(logits_chosen)[1]
    rules = [
        (all_valid(valid_token_ids(chosen, V)), "chosen must be token ids in [0, V)"),
        (all_valid(valid_token_ids(rejected, V)), "rejected must be token ids in [0, V)"),
        (all_valid(valid_finite(logits_chosen)), "logits_chosen must be finite"),
        (all_valid(valid_finite(logits_rejected)), "logits_rejected must be finite"),
    ]
    if not is_concrete((chosen, rejected)):  # concrete: edit distance checked in Python
        distance = jnp.sum(jnp.asarray(chosen) != jnp.asarray(rejected))
        rules.append((distance == 1, "chosen and rejected must differ in exactly one position"))
    # Shared rows (logits_rejected[:m+1] == logits_chosen[:m+1]) are checked only when concrete:
    # exact float equality of values computed inside one compiled program is not reliable (XLA
    # may round one expression differently in two fusions), so a traced check could give NaN
    # for valid input. Traced, each context uses its own rows as given.
    return rules


def _post_edit(chosen, rejected):
    """Return ``[L]`` bool: position ``k`` lies after the edit (its contexts differ)."""
    diff = (chosen != rejected).astype(jnp.int32)
    return jnp.cumsum(diff) - diff > 0


def pair_logprobs_from_logits(
    logits_chosen: ArrayLike, logits_rejected: ArrayLike, chosen: ArrayLike, rejected: ArrayLike
) -> tuple[jax.Array, jax.Array]:
    r"""Return the summed :math:`(\ln\pi(y_w), \ln\pi(y_l))` of ``[L, V]`` per-position logits.

    .. math:: \ln\pi(y) = \sum_k \ln\mathrm{softmax}(z_k)[y_k]

    Source: autoregressive factorisation with teacher forcing (Pal et al. 2024, §3). Only the
    ids are validated (concrete: ``ValueError``; traced ids out of ``[0, V)``: both results NaN);
    the public functions below validate the pair.

    Args:
      logits_chosen, logits_rejected: ``[L, V]`` per-position logits.
      chosen, rejected: ``[L]`` integer token ids.

    Returns:
      ``(lp_chosen, lp_rejected)``, scalars.

    Raises:
      ValueError: ids out of ``[0, V)``.

    Example:
      >>> lp = pair_logprobs_from_logits(jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.array([0, 1]),
      ...                        jnp.array([2, 1]))
      >>> [round(float(x), 6) for x in lp]  # 2 ln(1/4)
      [-2.772589, -2.772589]
    """
    V = np.shape(logits_chosen)[-1]
    check_token_ids("chosen", chosen, V)
    check_token_ids("rejected", rejected, V)
    rules = [
        (all_valid(valid_token_ids(chosen, V)), "chosen must be token ids in [0, V)"),
        (all_valid(valid_token_ids(rejected, V)), "rejected must be token ids in [0, V)"),
    ]
    lp = _pair_logprobs(logits_chosen, logits_rejected, jnp.asarray(chosen), jnp.asarray(rejected))
    return enforce(lp, rules)


def _pair_logprobs(logits_chosen, logits_rejected, chosen, rejected):
    rows = jnp.arange(chosen.shape[0])
    lp_c = jnp.sum(jax.nn.log_softmax(logits_chosen, axis=-1)[rows, chosen])
    lp_r = jnp.sum(jax.nn.log_softmax(logits_rejected, axis=-1)[rows, rejected])
    return lp_c, lp_r


class PositionGradients(NamedTuple):
    r"""Per-position logit velocities :math:`-\partial L/\partial\theta_k` of a pair.

    Attributes:
      descent: ``[L, V]``; entry ``[k, j] > 0`` means gradient descent raises logit ``j`` at ``k``.
      coef_chosen, coef_rejected, hinge_active: as in :class:`DPOPCoefficients`.
    """

    descent: jax.Array
    coef_chosen: jax.Array
    coef_rejected: jax.Array
    hinge_active: jax.Array


def _gradients(logits_c, logits_r, chosen, rejected, ref_c, ref_r, beta, lam, inside):
    V = logits_c.shape[1]
    lp_c, lp_r = _pair_logprobs(logits_c, logits_r, chosen, rejected)
    coef = _coefficients(lp_c, lp_r, ref_c, ref_r, beta, lam, inside)
    onehot_c = jax.nn.one_hot(chosen, V, dtype=logits_c.dtype)  # [L, V]
    onehot_r = jax.nn.one_hot(rejected, V, dtype=logits_c.dtype)
    s_c = jax.nn.softmax(logits_c, axis=-1)
    s_r = jax.nn.softmax(logits_r, axis=-1)
    descent = coef.coef_chosen * (onehot_c - s_c) - coef.coef_rejected * (onehot_r - s_r)
    return PositionGradients(descent, *coef)


def position_logit_gradients(
    logits_chosen: ArrayLike,
    logits_rejected: ArrayLike,
    chosen: ArrayLike,
    rejected: ArrayLike,
    ref_logprob_chosen: ArrayLike = 0.0,
    ref_logprob_rejected: ArrayLike = 0.0,
    *,
    beta: float = 0.1,
    lam: float,
    penalty_inside_beta: bool = True,
) -> PositionGradients:
    r"""Return :math:`-\partial L/\partial\theta_k` at every position (DPO at ``lam=0``, else DPOP).

    .. math:: -\frac{\partial L}{\partial\theta_k} = a^+(e_{t_k} - s^w_k) - a^-(e_{t'_k} - s^l_k)
              \ \overset{k>m}{=}\ a^-\big[\lambda\,\mathbb 1[P>0]\,(e_{t_k} - s^w_k)
              + s^l_k - s^w_k\big]

    (inside placement; :math:`a^\pm` from :func:`dpop_coefficients`). It vanishes at :math:`k<m`
    for DPO, is :math:`a^-(e_{t_m} - e_{t'_m})` at :math:`k=m`, and for :math:`k>m` the DPO part
    is :math:`a^-(s^l_k - s^w_k)`: the correct token's logit is lowered whenever
    :math:`s^w_{k,t_k} > s^l_{k,t_k}`.

    Source: Pal et al. 2024, §3 (DPO gradient :math:`s_j^{\{y_l^{<k}\}} - s_j^{\{y_w^{<k}\}}`;
    DPOP cases :math:`\lambda(1 - s_1^{w}) + s_1^{l} - s_1^{w}` and
    :math:`-(\lambda+1)s_j^{w} + s_j^{l}`).
    Reading: the source's display drops the positive factor :math:`a^- = \beta\sigma(-\beta v)`
    (signs unchanged) and writes the bracket with :math:`-\lambda\log\pi(t_k|y_w^{<k})`; its
    result corresponds to :math:`+\lambda`, which is what the loss gives (the penalty lowers the
    objective when :math:`\pi_\theta(y_w)` falls). With the penalty outside :math:`\beta`, the
    factor :math:`\lambda` becomes :math:`\lambda/\beta`.

    Args:
      logits_chosen: ``[L, V]`` logits in the contexts :math:`y_w^{<k}`.
      logits_rejected: ``[L, V]`` logits in :math:`y_l^{<k}`; rows ``<= m`` equal to
        ``logits_chosen``'s (shared contexts).
      chosen, rejected: ``[L]`` integer ids, differing in exactly one position ``m``.
      ref_logprob_chosen, ref_logprob_rejected: summed reference log-probs (scalars).
      beta: :math:`\beta > 0`.
      lam: :math:`\lambda \ge 0`, required (``lam=0`` is DPO), as in
        :func:`theory.losses.dpop_loss`.
      penalty_inside_beta: placement of the penalty (default inside, the paper's Eq. 3).

    Returns:
      :class:`PositionGradients`.

    Raises:
      ValueError: bad shapes or lengths, edit distance not 1, shared rows differ (concrete
        only), ids out of range, non-finite logits or reference log-probs, ``beta <= 0``,
        ``lam < 0``. Traced values breaking a rule (inside ``jit``/``vmap``) give ``descent``
        and both coefficients all NaN instead (``hinge_active`` is boolean and stays).
      TypeError: ``penalty_inside_beta`` is not a bool.

    Example:
      >>> lw = jnp.array([[0.0, 0.0], [2.0, 0.0]]); lr = jnp.array([[0.0, 0.0], [0.0, 0.0]])
      >>> g = position_logit_gradients(lw, lr, jnp.array([0, 0]), jnp.array([1, 0]), beta=1.0,
      ...                              lam=0.0)
      >>> # k=1 > m=0: a (s^l - s^w) with s^w_0 = sigma(2) > s^l_0 = 1/2: correct logit lowered
      >>> bool(g.descent[1, 0] < 0), bool(g.descent[1, 1] > 0)
      (True, True)
    """
    _validate_pair(logits_chosen, logits_rejected, chosen, rejected)
    check_positive("beta", beta)
    check_nonnegative("lam", lam)
    check_bool("penalty_inside_beta", penalty_inside_beta)
    refs = (
        ("ref_logprob_chosen", ref_logprob_chosen),
        ("ref_logprob_rejected", ref_logprob_rejected),
    )
    for name, a in refs:
        check_ndim(name, a, 0, "[] (a scalar)")
        check_finite(name, a)
    rules = _pair_rules(logits_chosen, logits_rejected, chosen, rejected)
    scalar_rules = [(all_valid(valid_finite(a)), f"{name} must be finite") for name, a in refs]
    scalar_rules += [
        (all_valid(valid_positive(beta)), "beta must be > 0 and finite"),
        (all_valid(valid_nonnegative(lam)), "lam must be >= 0 and finite"),
    ]
    rules += scalar_rules
    # scalars through guard, each with its own rule (see theory.checks.guard); arrays as passed
    scalars = (ref_logprob_chosen, ref_logprob_rejected, beta, lam)
    ref_logprob_chosen, ref_logprob_rejected, beta, lam = (
        guard(x, valid) for x, (valid, _) in zip(scalars, scalar_rules, strict=True)
    )
    gradients = _gradients(
        jnp.asarray(logits_chosen),
        jnp.asarray(logits_rejected),
        jnp.asarray(chosen),
        jnp.asarray(rejected),
        jnp.asarray(ref_logprob_chosen),
        jnp.asarray(ref_logprob_rejected),
        beta,
        lam,
        penalty_inside_beta,
    )
    return enforce(gradients, rules)


class WeightedSplit(NamedTuple):
    r"""Proposition 2's split of :math:`\frac{d}{dt}\ln\pi(y^+)` for a weighted loss.

    Attributes:
      dpo_part: :math:`\rho\,\mathcal E
        = a^-(\|\nabla lp^+\|^2 - \langle\nabla lp^+,\nabla lp^-\rangle)`.
      gamma: :math:`\gamma = (\lambda^+-\lambda^-)(-\mu') = a^+ - a^-`.
      velocity: :math:`\rho\,\mathcal E + \gamma\|\nabla lp^+\|^2`.
    """

    dpo_part: jax.Array
    gamma: jax.Array
    velocity: jax.Array


def weighted_split(
    coef_chosen: ArrayLike,
    coef_rejected: ArrayLike,
    grad_sq_chosen: ArrayLike,
    grad_inner: ArrayLike,
) -> WeightedSplit:
    r"""Return Proposition 2's terms from the loss coefficients and the gradient Gram entries.

    .. math:: \frac{d}{dt}\ln\pi(y^+) = \rho\,\mathcal E + \gamma\|\nabla\ln\pi(y^+)\|^2,\quad
              \rho\,\mathcal E = -\lambda^-\mu'\langle\nabla lp^+, \nabla lp^+ - \nabla lp^-\rangle,
              \quad \gamma = (\lambda^+ - \lambda^-)(-\mu')

    With :math:`a^+ = -\lambda^+\mu'`, :math:`a^- = -\lambda^-\mu'` and :math:`\lambda^- = 1`
    (DPOP: :math:`\lambda^+ = 1+\lambda` while the hinge is active, inside placement).

    Source: Razin et al. 2024, Proposition 2 (App. E, Eq. 5); DPOP as a weighted loss, their
    footnote 10.

    Args:
      coef_chosen, coef_rejected: :math:`a^\pm` (e.g. :func:`dpop_coefficients`).
      grad_sq_chosen: :math:`\|\nabla_\theta lp^+\|^2`.
      grad_inner: :math:`\langle\nabla_\theta lp^+, \nabla_\theta lp^-\rangle`.

    Returns:
      :class:`WeightedSplit` (broadcast shape of the inputs).

    Raises:
      ValueError: ``grad_sq_chosen < 0`` or non-finite inputs, when concrete. Traced inputs are
        used as given: they are computed quantities, outside the rule of :mod:`theory`.

    Example:
      >>> w = weighted_split(3.0, 1.0, 2.0, 1.5)  # 1 * (2 - 1.5) + 2 * 2
      >>> float(w.velocity), float(w.gamma)
      (4.5, 2.0)
    """
    check_nonnegative("grad_sq_chosen", grad_sq_chosen)
    for name, a in (
        ("coef_chosen", coef_chosen),
        ("coef_rejected", coef_rejected),
        ("grad_inner", grad_inner),
    ):
        check_finite(name, a)
    # No traced rule: the inputs are computed quantities (coefficients, Gram entries), not ids,
    # hyperparameters or probabilities, and any check reading them next to the reductions that
    # produce them changed their compiled summation order (an ulp in dpop_edit_distance's JSON).
    a_c, a_r = jnp.asarray(coef_chosen), jnp.asarray(coef_rejected)
    g_sq, g_in = jnp.asarray(grad_sq_chosen), jnp.asarray(grad_inner)
    dpo_part = a_r * (g_sq - g_in)
    gamma = a_c - a_r
    return WeightedSplit(dpo_part, gamma, dpo_part + gamma * g_sq)
