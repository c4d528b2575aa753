r"""Theorem 2 (sources 000/001) re-checked in exact rational arithmetic.

Covariances are exact (``fractions.Fraction``); :math:`e^{r/\beta}` is enclosed in rigorous rational
bounds (Taylor series with Lagrange remainder), so a violation :math:`\mathrm{TPM}(A) < \alpha` is
proved when the upper bound of ``TPM(A)`` is below ``alpha``. Plain Python on purpose: exact
arithmetic cannot be traced by JAX.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import NamedTuple

import jax.numpy as jnp
from jax.typing import ArrayLike

from theory.checks import check_positive_int
from theory.kl_counterexample import MixtureInstances

#: Anything ``Fraction`` accepts exactly: int, Fraction, or a string such as ``"3/10"``.
Rational = int | str | Fraction

#: Relative width of the rational enclosure of e^x (far below any margin worth reporting).
EXP_REL_TOL = Fraction(1, 10**30)
#: Largest |x| accepted by exp_bounds (the series then needs ~e*|x| terms of big fractions).
EXP_MAX_ABS = 2000


def exp_bounds(x: Fraction) -> tuple[Fraction, Fraction]:
    r"""Return rational ``(lo, hi)`` with ``lo <= e^x <= hi`` and ``(hi - lo)/lo <= 1e-30``.

    .. math:: S_n(x) \le e^x \le \frac{S_n(x)}{1 - x^{n+1}/(n+1)!}\quad (x \ge 0),\qquad
       S_n(x) = \sum_{k=0}^{n} \frac{x^k}{k!}

    (Lagrange remainder :math:`e^\xi x^{n+1}/(n+1)! \le e^x x^{n+1}/(n+1)!`), with ``n`` the first
    order where :math:`x^{n+1}/(n+1)! \le 10^{-30}/2`; for ``x < 0`` the bounds of
    :math:`e^{-x}` are inverted.

    Source: Taylor's theorem with Lagrange remainder (standard).

    Args:
      x: rational exponent, ``|x| <= 2000``.

    Returns:
      ``(lo, hi)`` as ``Fraction``.

    Raises:
      ValueError: ``|x| > 2000``.

    Example:
      >>> lo, hi = exp_bounds(Fraction(1))
      >>> float(lo) <= 2.718281828459045 <= float(hi), float(hi - lo) < 1e-29
      (True, True)
    """
    x = Fraction(x)
    if abs(x) > EXP_MAX_ABS:
        raise ValueError(f"|x| must be <= {EXP_MAX_ABS}, got x={float(x)!r}")
    if x < 0:
        lo, hi = exp_bounds(-x)
        return 1 / hi, 1 / lo
    partial, term, k = Fraction(0), Fraction(1), 0
    while True:
        partial += term
        term = term * x / (k + 1)  # x^{k+1} / (k+1)!
        k += 1
        if k > x and term <= EXP_REL_TOL / 2:  # past the peak of the terms, remainder tiny
            return partial, partial / (1 - term)


class ExactCheck(NamedTuple):
    """Theorem 2 re-checked in exact rational arithmetic.

    Attributes:
      cov_r_A, cov_r_U: exact covariances under the uniform measure on the support.
      m_A, m_U: ``(lo, hi)`` rigorous bounds on :math:`M_C = E_{p_C}[e^{r/\\beta}]`.
      tpm_A: ``(lo, hi)`` rigorous bounds on :math:`\\mathrm{TPM}(A)`.
      alpha: the mixture weight.
      violates_stated_theorem: hypotheses hold exactly and ``tpm_A[1] < alpha``.
    """

    cov_r_A: Fraction
    cov_r_U: Fraction
    m_A: tuple[Fraction, Fraction]
    m_U: tuple[Fraction, Fraction]
    tpm_A: tuple[Fraction, Fraction]
    alpha: Fraction
    violates_stated_theorem: bool


def exact_check(
    alpha: Rational,
    p_A: Sequence[Rational],
    p_U: Sequence[Rational],
    r: Sequence[Rational],
    beta: Rational,
) -> ExactCheck:
    r"""Return Theorem 2's hypotheses and conclusion for a rational instance, rigorously.

    .. math:: \mathrm{TPM}(A) = \frac{\alpha M_A}{\alpha M_A + (1-\alpha)M_U}\ \text{ is increasing
       in } M_A \text{ and decreasing in } M_U,

    so interval bounds on :math:`M_A, M_U` (from :func:`exp_bounds`) bound ``TPM(A)``.

    Source: sources 000/001, Theorem 2; exact re-verification asked for by the issue.

    Args:
      alpha: rational in (0, 1); p_A, p_U: sequences of rationals ``>= 0`` summing to exactly 1;
      r: sequence of rationals; beta: rational ``> 0`` (anything ``Fraction`` accepts: ``int``,
      ``str`` such as ``"3/10"``, ``Fraction``).

    Returns:
      :class:`ExactCheck`.

    Raises:
      ValueError: lengths differ, negative entries, sums not exactly 1, ``alpha`` not in (0, 1),
        ``beta <= 0``, ``|r / beta| > 2000``.

    Example:
      >>> c = exact_check("1/2", ["1/5", "4/5"], ["4/5", "1/5"], [0, 1], 1)
      >>> c.cov_r_A, c.violates_stated_theorem  # (1/2)(4/5) - (1/4)(1) = 3/20
      (Fraction(3, 20), False)
    """
    alpha, beta = Fraction(alpha), Fraction(beta)
    p_A, p_U, r = ([Fraction(v) for v in seq] for seq in (p_A, p_U, r))
    if not len(p_A) == len(p_U) == len(r):
        raise ValueError(
            f"p_A, p_U and r must have one length, got {len(p_A)}, {len(p_U)}, {len(r)}"
        )
    for name, p in (("p_A", p_A), ("p_U", p_U)):
        if min(p) < 0 or sum(p) != 1:
            raise ValueError(f"{name} must be >= 0 and sum to exactly 1, got sum={sum(p)}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got alpha={alpha}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got beta={beta}")
    support = [i for i in range(len(r)) if p_A[i] > 0 or p_U[i] > 0]
    n = len(support)

    def cov(p):
        return sum(r[i] * p[i] for i in support) / n - sum(r[i] for i in support) / n**2

    bounds = {i: exp_bounds(r[i] / beta) for i in support}

    def moment(p):
        return (
            sum(p[i] * bounds[i][0] for i in support),
            sum(p[i] * bounds[i][1] for i in support),
        )

    m_A, m_U = moment(p_A), moment(p_U)

    def tpm(ma, mu):
        return alpha * ma / (alpha * ma + (1 - alpha) * mu)

    tpm_A = (tpm(m_A[0], m_U[1]), tpm(m_A[1], m_U[0]))
    c_A, c_U = cov(p_A), cov(p_U)
    return ExactCheck(
        c_A, c_U, m_A, m_U, tpm_A, alpha, bool(c_A > 0 and c_U < 0 and tpm_A[1] < alpha)
    )


def rationalize(p: ArrayLike, *, denominator: int) -> list[Fraction]:
    """Return ``p`` rounded to multiples of ``1/denominator``, exactly normalised, zeros kept.

    The rounding error is put on the largest entry (so every entry stays ``>= 0`` and the support
    is unchanged when ``denominator`` is large enough for the smallest positive entry).

    Example:
      >>> [str(x) for x in rationalize([0.333, 0.333, 0.334], denominator=10)]
      ['3/10', '3/10', '2/5']
    """
    check_positive_int("denominator", denominator)
    values = [float(v) for v in jnp.asarray(p).tolist()]
    out = [Fraction(round(v * denominator), denominator) for v in values]
    big = max(range(len(values)), key=lambda i: values[i])
    out[big] += 1 - sum(out)
    return out


class RationalInstance(NamedTuple):
    """A rational instance ``(alpha, p_A, p_U, r, beta = 1)`` with its exact check.

    Attributes:
      index: row of the batch it was rounded from.
      alpha: ``Fraction``; p_A, p_U, r: lists of ``Fraction``; beta: ``Fraction(1)``.
      check: :class:`ExactCheck` of the rounded instance.
    """

    index: int
    alpha: Fraction
    p_A: list[Fraction]
    p_U: list[Fraction]
    r: list[Fraction]
    beta: Fraction
    check: ExactCheck


def rational_counterexample(
    instances: MixtureInstances, candidates, *, denominator: int, reward_grid: int
) -> RationalInstance:
    r"""Return the first candidate that, rounded to rationals, still violates Theorem 2 exactly.

    Rounding: ``alpha``, ``p_A``, ``p_U`` to multiples of ``1/denominator`` (:func:`rationalize`),
    :math:`r/\beta` to multiples of ``1/reward_grid``, then ``beta = 1``; each rounded instance is
    re-checked by :func:`exact_check`.

    Source: the issue's request for one counterexample "printed with exact rational arithmetic".

    Args:
      instances: a batch from :func:`random_instances`.
      candidates: row indices to try, best first (e.g. float64-confirmed, by ``margin``).
      denominator: ``>= 1``; reward_grid: ``>= 1``.

    Returns:
      :class:`RationalInstance`.

    Raises:
      ValueError: no candidate survives rounding (use a larger ``denominator``/``reward_grid``).

    Example:
      >>> inst = MixtureInstances(jnp.array([0.85]), jnp.array([[0.0, 0.1, 0.9]]),
      ...     jnp.array([[0.55, 0.3, 0.15]]), jnp.array([[-4.0, 4.5, 2.5]]), jnp.array([1.0]))
      >>> c = rational_counterexample(inst, [0], denominator=20, reward_grid=2)
      >>> str(c.check.cov_r_A), c.check.violates_stated_theorem
      ('17/30', True)
    """
    check_positive_int("denominator", denominator)
    check_positive_int("reward_grid", reward_grid)
    for i in (int(j) for j in candidates):
        a = float(instances.alpha[i])
        alpha = rationalize([a, 1 - a], denominator=denominator)[0]
        p_A = rationalize(instances.p_A[i], denominator=denominator)
        p_U = rationalize(instances.p_U[i], denominator=denominator)
        scaled = jnp.asarray(instances.r[i] / instances.beta[i]).tolist()
        r = [Fraction(round(v * reward_grid), reward_grid) for v in scaled]
        check = exact_check(alpha, p_A, p_U, r, 1)
        if check.violates_stated_theorem:
            return RationalInstance(i, alpha, p_A, p_U, r, Fraction(1), check)
    raise ValueError(
        "no candidate violates Theorem 2 after rounding; increase denominator or reward_grid"
    )
