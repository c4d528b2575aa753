r"""The optimum of the KL-regularised reward objective as a tilted mixture (Huang, sources 000/001).

Setting: one prompt, a finite output set of size ``V``, a reference distribution
:math:`p_{ref} = \alpha p_A + (1-\alpha) p_U` (``0 < alpha < 1``), a finite reward ``r`` ``[V]`` and
``beta > 0``. The maximiser of :math:`E_{p}[r] - \beta\,KL(p\,\|\,p_{ref})` is the tilt
:math:`p_\theta = p_{ref}\,e^{r/\beta}/Z`.

Numerics: everything is computed in log space (``logsumexp``), so rewards with ``|r|/beta`` in the
thousands neither overflow nor underflow. A zero of a distribution is an output outside its
support: ``log 0 = -inf`` enters only through ``logsumexp``/``softmax``, never as ``0 * inf``.

Reading (support): :math:`\mathrm{supp}\,p_\theta = \mathrm{supp}\,p_{ref}
= \mathrm{supp}\,p_A \cup \mathrm{supp}\,p_U` (finite ``r``, ``0 < alpha < 1``); "the uniform
measure on the support" is the uniform distribution on those ``N`` outputs, as in the sources'
proof of Theorem 2. Outputs outside it play no role (their reward is ignored).

Invalid values (the rule of :mod:`theory`): concrete inputs raise ``ValueError``; traced ones
(inside ``jit``/``vmap``/``grad``) that break a rule - ``alpha`` outside (0, 1), a distribution
that is negative, non-finite or does not sum to 1 (within ``PROB_SUM_ATOL`` plus the rounding of
its own dtype, see :func:`theory.checks.valid_distribution`), a non-finite ``r``, ``beta <= 0`` -
make every floating field of the result NaN (boolean fields derived from them are ``False``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from jax.typing import ArrayLike

from theory.checks import (
    all_valid,
    check_finite,
    check_ndim,
    check_nonnegative,
    check_positive,
    enforce,
    guard,
    is_concrete,
    valid_distribution,
    valid_finite,
    valid_open_interval,
    valid_positive,
)

#: A distribution must sum to 1 within this absolute tolerance (float32 rounding of V <= 10^4
#: entries stays well below it; a mis-normalised input is off by far more).
PROB_SUM_ATOL = 1e-6


def _check_distribution(name: str, p) -> None:
    check_ndim(name, p, 1, "[V]")
    check_nonnegative(name, p)
    if is_concrete(p):
        total = float(np.sum(np.asarray(p, dtype=np.float64)))
        if abs(total - 1.0) > PROB_SUM_ATOL:
            raise ValueError(
                f"{name} must sum to 1 within {PROB_SUM_ATOL:g}, got sum={total!r}; normalise it"
            )


def _check_reward(r, V: int) -> None:
    check_ndim("r", r, 1, "[V]")
    if np.shape(r)[0] != V:
        raise ValueError(f"r must have shape [V]=({V},) like the distributions, got {np.shape(r)}")
    check_finite("r", r)


def _check_alpha(alpha) -> None:
    check_ndim("alpha", alpha, 0, "[] (a scalar)")
    if is_concrete(alpha):
        a = float(alpha)
        if not (np.isfinite(a) and 0.0 < a < 1.0):
            raise ValueError(f"alpha must be in (0, 1), got alpha={a!r}")


def _check_mixture(alpha, p_A, p_U, r, beta) -> None:
    _check_alpha(alpha)
    _check_distribution("p_A", p_A)
    _check_distribution("p_U", p_U)
    if np.shape(p_A) != np.shape(p_U):
        raise ValueError(
            f"p_A and p_U must have one shape [V], got {np.shape(p_A)}, {np.shape(p_U)}"
        )
    _check_reward(r, np.shape(p_A)[0])
    check_positive("beta", beta)


def _arrays(*xs):
    # lists and tuples are not JAX types: read them as NumPy arrays first
    xs = tuple(np.asarray(x) if isinstance(x, list | tuple) else x for x in xs)
    dtype = jnp.result_type(*xs, jnp.float32)
    return tuple(jnp.asarray(x, dtype) for x in xs)


# Traced validity: lists of (predicate, message), one per argument and in argument order, taken
# from the arguments as passed (inside jit, jnp.asarray of a constant is a tracer, so predicates of
# converted arrays would never be concrete).
def _distribution_rules(name: str, p) -> list:
    message = f"{name} must be a distribution: finite, >= 0, summing to 1"
    return [(valid_distribution(p, atol=PROB_SUM_ATOL), message)]


def _reward_beta_rules(r, beta) -> list:
    return [
        (all_valid(valid_finite(r)), "r must be finite"),
        (all_valid(valid_positive(beta)), "beta must be > 0 and finite"),
    ]


def _mixture_rules(alpha, p_A, p_U, r, beta) -> list:
    return [
        (all_valid(valid_open_interval(alpha, 0.0, 1.0)), "alpha must be in (0, 1)"),
        *_distribution_rules("p_A", p_A),
        *_distribution_rules("p_U", p_U),
        *_reward_beta_rules(r, beta),
    ]


def _checked_arrays(rules: list, *xs):
    """:func:`_arrays` of the arguments as the computation must read them once checked.

    ``rules[i]`` is the rule of ``xs[i]`` alone. Scalar arguments (``alpha``, ``beta``, ``a``,
    ``b``) are read through :func:`theory.checks.guard` with their own rule (so ``r / beta``
    compiles as without the check); array arguments are read as passed (a guard there moved
    ``log p`` into batched fusions under ``vmap``, an ulp apart). The output is poisoned by
    :func:`theory.checks.enforce` in every case.
    """
    guarded = (
        guard(x, valid) if np.ndim(x) == 0 else x for x, (valid, _) in zip(xs, rules, strict=True)
    )
    return _arrays(*guarded)


def _log_tilt(p_ref, r, beta):
    """Log of the tilt, ``-inf`` outside the support."""
    return jax.nn.log_softmax(jnp.log(p_ref) + r / beta)


def tilt(p_ref: ArrayLike, r: ArrayLike, beta: ArrayLike) -> jax.Array:
    r"""Return the maximiser :math:`p_\theta` of :math:`E_p[r] - \beta\,KL(p\|p_{ref})`, ``[V]``.

    .. math:: p_\theta(y) = \frac{p_{ref}(y)\,e^{r(y)/\beta}}{Z},\qquad
       Z = \sum_{y\in\mathrm{supp}\,p_{ref}} p_{ref}(y)\,e^{r(y)/\beta}

    Source: Huang, "Characterizing Output Distribution Shift under Preference Tuning" (sources
    000/001), proof of Lemma 1 (Gibbs' inequality); Rafailov et al. 2023, Eq. 4.

    Args:
      p_ref: ``[V]`` reference distribution (``>= 0``, sums to 1; zeros are outside the support).
      r: ``[V]`` finite rewards.
      beta: KL coefficient, ``> 0``.

    Returns:
      ``[V]`` distribution with the support of ``p_ref``.

    Raises:
      ValueError: negative or mis-normalised ``p_ref``, non-finite ``r``, ``beta <= 0``, shapes
        (traced: all entries NaN instead).

    Example:
      >>> p = tilt(jnp.array([0.5, 0.5, 0.0]), jnp.array([jnp.log(3.0), 0.0, 9.0]), 1.0)
      >>> [round(float(x), 6) for x in p]  # weights 3 : 1 on the support; output 2 stays at 0
      [0.75, 0.25, 0.0]
    """
    _check_distribution("p_ref", p_ref)
    _check_reward(r, np.shape(p_ref)[0])
    check_positive("beta", beta)
    rules = _distribution_rules("p_ref", p_ref) + _reward_beta_rules(r, beta)
    return enforce(jnp.exp(_log_tilt(*_checked_arrays(rules, p_ref, r, beta))), rules)


def objective(p: ArrayLike, p_ref: ArrayLike, r: ArrayLike, beta: ArrayLike) -> jax.Array:
    r"""Return the KL-regularised reward :math:`E_{y\sim p}[r(y)] - \beta\,KL(p\|p_{ref})`.

    .. math:: \mathcal L(p) = \sum_y p(y)\,r(y)
       - \beta\sum_{y:\,p(y)>0} p(y)\ln\frac{p(y)}{p_{ref}(y)}

    Source: sources 000/001, Eq. 1 (the preference-tuning objective for one prompt).

    Args:
      p: ``[V]`` distribution (the policy).
      p_ref: ``[V]`` reference distribution.
      r: ``[V]`` finite rewards.
      beta: ``> 0``.

    Returns:
      Scalar; ``-inf`` when ``p`` puts mass outside the support of ``p_ref``.

    Raises:
      ValueError: as :func:`tilt`, and for ``p`` (traced: NaN instead).

    Example:
      >>> p_ref, r = jnp.array([0.5, 0.5]), jnp.array([1.0, 0.0])
      >>> float(objective(p_ref, p_ref, r, 0.3))  # KL = 0, E[r] = 1/2
      0.5
    """
    _check_distribution("p", p)
    _check_distribution("p_ref", p_ref)
    if np.shape(p) != np.shape(p_ref):
        raise ValueError(
            f"p and p_ref must have one shape [V], got {np.shape(p)}, {np.shape(p_ref)}"
        )
    _check_reward(r, np.shape(p)[0])
    check_positive("beta", beta)
    rules = [
        *_distribution_rules("p", p),
        *_distribution_rules("p_ref", p_ref),
        *_reward_beta_rules(r, beta),
    ]
    return enforce(_objective(*_checked_arrays(rules, p, p_ref, r, beta)), rules)


def _objective(p, p_ref, r, beta):
    on = p > 0
    # double where: the unselected branch must not be NaN, or its zero cotangent turns into NaN
    log_ratio = jnp.where(on, jnp.log(jnp.where(on, p, 1.0)) - jnp.log(p_ref), 0.0)
    return jnp.sum(jnp.where(on, p * r, 0.0)) - beta * jnp.sum(jnp.where(on, p * log_ratio, 0.0))


class MixtureWeights(NamedTuple):
    r"""Lemma 1's per-output weights: :math:`p_\theta = \alpha_A p_A + \alpha_U p_U`.

    Attributes:
      alpha_A: ``[V]``, :math:`\alpha\,e^{r/\beta}/Z` on the support, 0 outside it.
      alpha_U: ``[V]``, :math:`(1-\alpha)\,e^{r/\beta}/Z` on the support, 0 outside it.
    """

    alpha_A: jax.Array
    alpha_U: jax.Array


def mixture_weights(
    alpha: ArrayLike, p_A: ArrayLike, p_U: ArrayLike, r: ArrayLike, beta: ArrayLike
) -> MixtureWeights:
    r"""Return Lemma 1's weights :math:`(\alpha_A(y), \alpha_U(y))` of the tuned model.

    .. math:: \alpha_A(y) = \frac{\alpha\,e^{r(y)/\beta}}{Z},\quad
       \alpha_U(y) = \frac{(1-\alpha)\,e^{r(y)/\beta}}{Z},\quad
       Z = \sum_{y\in\mathrm{supp}\,p_\theta} p_{ref}(y)\,e^{r(y)/\beta}

    Source: sources 000/001, Lemma 1.
    Reading: the weights matter only on :math:`\mathrm{supp}\,p_\theta` (Theorem 2's sums run over
    it); outside it they are returned as 0, which keeps them finite for any ``r`` (on the support
    :math:`e^{r/\beta}/Z \le 1/p_{ref}(y)`).

    Args:
      alpha: scalar mixture weight in ``(0, 1)``.
      p_A: ``[V]`` aligned component; p_U: ``[V]`` unaligned component (each sums to 1).
      r: ``[V]`` finite rewards.
      beta: ``> 0``.

    Returns:
      :class:`MixtureWeights`.

    Raises:
      ValueError: ``alpha`` not in (0, 1), bad distributions, non-finite ``r``, ``beta <= 0``
        (traced: both fields NaN instead).

    Example:
      >>> w = mixture_weights(0.5, jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]),
      ...                     jnp.array([jnp.log(3.0), 0.0]), 1.0)
      >>> [round(float(x), 6) for x in w.alpha_A]  # Z = (3 + 1)/2 = 2: alpha_A = 0.5 * (3, 1)/2
      [0.75, 0.25]
    """
    _check_mixture(alpha, p_A, p_U, r, beta)
    rules = _mixture_rules(alpha, p_A, p_U, r, beta)
    return enforce(_mixture_weights(*_checked_arrays(rules, alpha, p_A, p_U, r, beta)), rules)


def _mixture_weights(alpha, p_A, p_U, r, beta):
    log_ref = jnp.log(alpha * p_A + (1 - alpha) * p_U)
    log_z = logsumexp(log_ref + r / beta)
    tilt_over_z = jnp.where(log_ref > -jnp.inf, jnp.exp(r / beta - log_z), 0.0)
    return MixtureWeights(alpha * tilt_over_z, (1 - alpha) * tilt_over_z)


class TotalProbabilityMass(NamedTuple):
    r"""Theorem 2's total probability masses; they sum to 1.

    Attributes:
      tpm_A: :math:`\mathrm{TPM}(A) = \sum_y \alpha_A(y)\,p_A(y)`.
      tpm_U: :math:`\mathrm{TPM}(U) = \sum_y \alpha_U(y)\,p_U(y)`.
    """

    tpm_A: jax.Array
    tpm_U: jax.Array


def _log_moment(p, r, beta):
    return logsumexp(jnp.log(p) + r / beta)


def _tpm_from_log_moments(alpha, log_m_A, log_m_U):
    logit = jnp.log(alpha) - jnp.log1p(-alpha) + log_m_A - log_m_U
    return TotalProbabilityMass(jax.nn.sigmoid(logit), jax.nn.sigmoid(-logit))


def total_probability_mass(
    alpha: ArrayLike, p_A: ArrayLike, p_U: ArrayLike, r: ArrayLike, beta: ArrayLike
) -> TotalProbabilityMass:
    r"""Return :math:`(\mathrm{TPM}(A), \mathrm{TPM}(U))` of the KL optimum.

    .. math:: \mathrm{TPM}(A) = \sum_{y\in\mathrm{supp}\,p_\theta}\alpha_A(y)p_A(y)
       = \frac{\alpha M_A}{\alpha M_A + (1-\alpha) M_U},\qquad M_C = E_{y\sim p_C}[e^{r(y)/\beta}]

    computed as :math:`\sigma(\mathrm{logit}\,\alpha + \ln M_A - \ln M_U)` with log-sum-exp moments.

    Source: sources 000/001, Theorem 2 (definition of TPM); the closed form follows from Lemma 1
    by summing :math:`\alpha_A p_A` (``Z = alpha M_A + (1 - alpha) M_U``).

    Args:
      alpha, p_A, p_U, r, beta: as in :func:`mixture_weights`.

    Returns:
      :class:`TotalProbabilityMass` (a tuple ``(tpm_A, tpm_U)``).

    Raises:
      ValueError: as :func:`mixture_weights` (traced: both fields NaN instead).

    Example:
      >>> m = total_probability_mass(0.5, jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]),
      ...                            jnp.array([jnp.log(3.0), 0.0]), 1.0)
      >>> round(float(m.tpm_A), 6), round(float(m.tpm_U), 6)  # M_A = 3, M_U = 1
      (0.75, 0.25)
    """
    _check_mixture(alpha, p_A, p_U, r, beta)
    rules = _mixture_rules(alpha, p_A, p_U, r, beta)
    alpha, p_A, p_U, r, beta = _checked_arrays(rules, alpha, p_A, p_U, r, beta)
    tpm = _tpm_from_log_moments(alpha, _log_moment(p_A, r, beta), _log_moment(p_U, r, beta))
    return enforce(tpm, rules)


class TiltMoments(NamedTuple):
    r"""The exact criterion of Theorem 2's conclusion.

    Attributes:
      log_M_A: :math:`\ln E_{p_A}[e^{r/\beta}]`.
      log_M_U: :math:`\ln E_{p_U}[e^{r/\beta}]`.
      aligned_mass_rises: ``log_M_A >= log_M_U``, equivalent to :math:`\mathrm{TPM}(A)\ge\alpha`.
    """

    log_M_A: jax.Array
    log_M_U: jax.Array
    aligned_mass_rises: jax.Array


def tilt_moments(p_A: ArrayLike, p_U: ArrayLike, r: ArrayLike, beta: ArrayLike) -> TiltMoments:
    r"""Return the tilt moments and the exact criterion :math:`M_A \ge M_U`.

    .. math:: \mathrm{TPM}(A)\ge\alpha \iff M_A \ge M_U \iff
       \mathrm{Cov}_{\mathrm{unif}(\mathrm{supp})}\big(p_A - p_U,\ e^{r/\beta}\big) \ge 0

    for every ``alpha`` in (0, 1) (``TPM(A) - alpha`` has the sign of ``M_A - M_U``, and
    :math:`M_A - M_U = N\,\mathrm{Cov}(p_A-p_U, e^{r/\beta})` since :math:`p_A-p_U` has uniform
    mean 0). Equality cases: ``TPM(A) = alpha`` iff ``M_A = M_U``.

    Source: derived here from Theorem 2's definition of TPM (sources 000/001); it replaces the
    theorem's correlation conditions by a necessary and sufficient one.

    Args:
      p_A, p_U: ``[V]`` components; r: ``[V]`` finite rewards; beta: ``> 0``.

    Returns:
      :class:`TiltMoments`.

    Raises:
      ValueError: bad distributions, non-finite ``r``, ``beta <= 0`` (traced: the moments NaN
        and ``aligned_mass_rises`` False instead).

    Example:
      >>> t = tilt_moments(jnp.array([0.5, 0.5]), jnp.array([0.9, 0.1]), jnp.array([0.0, 1.0]), 1.0)
      >>> bool(t.aligned_mass_rises)  # p_A puts more mass on the higher reward
      True
    """
    _check_mixture(0.5, p_A, p_U, r, beta)
    rules = _mixture_rules(0.5, p_A, p_U, r, beta)[1:]  # alpha = 0.5 is not an argument
    p_A, p_U, r, beta = _checked_arrays(rules, p_A, p_U, r, beta)
    log_m_A, log_m_U = enforce((_log_moment(p_A, r, beta), _log_moment(p_U, r, beta)), rules)
    return TiltMoments(log_m_A, log_m_U, log_m_A >= log_m_U)


class SupportCovariances(NamedTuple):
    r"""Covariances under the uniform distribution on :math:`\mathrm{supp}\,p_{ref}` (``N`` points).

    Attributes:
      cov_r_A, cov_r_U: :math:`\mathrm{Cov}(r, p_A)`, :math:`\mathrm{Cov}(r, p_U)` (Theorem 2 as
        stated).
      cov_w_A, cov_w_U: :math:`\mathrm{Cov}(\tilde w, p_A)`, :math:`\mathrm{Cov}(\tilde w, p_U)` of
        the rescaled tilt weights :math:`\tilde w = e^{(r - r_{\max})/\beta} =
        e^{-r_{\max}/\beta} e^{r/\beta}` (same signs as for :math:`e^{r/\beta}`, no overflow).
      num_support: ``N``.
      stated_conditions: ``cov_r_A > 0`` and ``cov_r_U < 0`` (Theorem 2's hypotheses).
      tilt_conditions: ``cov_w_A > 0`` and ``cov_w_U < 0`` (the corrected hypotheses).
    """

    cov_r_A: jax.Array
    cov_r_U: jax.Array
    cov_w_A: jax.Array
    cov_w_U: jax.Array
    num_support: jax.Array
    stated_conditions: jax.Array
    tilt_conditions: jax.Array


def support_covariances(
    p_A: ArrayLike, p_U: ArrayLike, r: ArrayLike, beta: ArrayLike
) -> SupportCovariances:
    r"""Return the covariance conditions of Theorem 2, for ``r`` and for the tilt weights.

    .. math:: \mathrm{Cov}(f, p_C) = \frac1N\sum_{y\in S} f(y)\,p_C(y)
       - \frac{1}{N^2}\sum_{y\in S}f(y),\qquad S = \mathrm{supp}\,p_{ref},\ N = |S|

    (:math:`\sum_S p_C = 1`), for :math:`f = r` (the theorem as stated) and
    :math:`f = e^{r/\beta}` (the corrected theorem: then :math:`M_A > E_{unif}[e^{r/\beta}] > M_U`,
    so :math:`\mathrm{TPM}(A) > \alpha`).

    Source: sources 000/001, Theorem 2 and its proof ("uniform distribution over
    supp p_theta", which equals supp p_ref for finite r).
    Reading: "correlated" is the sign of the Pearson covariance under that uniform measure,
    strict (``> 0`` / ``< 0``); the proof's step "monotone maps preserve correlation" is false
    for Pearson covariance, which is why both versions are returned.

    Args:
      p_A, p_U: ``[V]`` components; r: ``[V]`` finite rewards; beta: ``> 0``.

    Returns:
      :class:`SupportCovariances`.

    Raises:
      ValueError: bad distributions, non-finite ``r``, ``beta <= 0`` (traced: the covariances
        NaN and both conditions False instead; ``num_support`` is an integer and stays).

    Example:
      >>> c = support_covariances(jnp.array([0.2, 0.8, 0.0]), jnp.array([0.8, 0.2, 0.0]),
      ...                         jnp.array([0.0, 1.0, 5.0]), 1.0)
      >>> int(c.num_support), round(float(c.cov_r_A), 6)  # output 2 is off the support: N = 2
      (2, 0.15)
    """
    _check_mixture(0.5, p_A, p_U, r, beta)
    rules = _mixture_rules(0.5, p_A, p_U, r, beta)[1:]  # alpha = 0.5 is not an argument
    c = enforce(_support_covariances(*_checked_arrays(rules, p_A, p_U, r, beta)), rules)
    return c._replace(
        stated_conditions=(c.cov_r_A > 0) & (c.cov_r_U < 0),
        tilt_conditions=(c.cov_w_A > 0) & (c.cov_w_U < 0),
    )


def _support_covariances(p_A, p_U, r, beta):
    on = (p_A > 0) | (p_U > 0)
    n = jnp.sum(on).astype(r.dtype)

    def cov(f, p):  # uniform on the support; mean of p there is 1/n
        f = jnp.where(on, f, 0.0)
        return jnp.sum(f * p) / n - jnp.sum(f) / n**2

    r_max = jnp.max(jnp.where(on, r, -jnp.inf))
    w = jnp.exp(jnp.where(on, r - r_max, 0.0) / beta)  # in (0, 1] on the support
    c_rA, c_rU, c_wA, c_wU = cov(r, p_A), cov(r, p_U), cov(w, p_A), cov(w, p_U)
    return SupportCovariances(
        c_rA, c_rU, c_wA, c_wU, jnp.sum(on), (c_rA > 0) & (c_rU < 0), (c_wA > 0) & (c_wU < 0)
    )


def residual_mass_bound(
    alpha: ArrayLike, p_A: ArrayLike, p_U: ArrayLike, r: ArrayLike, beta: ArrayLike
) -> jax.Array:
    r"""Return a lower bound on :math:`\mathrm{TPM}(U)`: unaligned mass is shrunk, not removed.

    .. math:: \mathrm{TPM}(U) = \frac{(1-\alpha) M_U}{Z} \ge B = (1-\alpha)\,
       e^{(r_{\min}^U - r_{\max})/\beta} \ge (1-\alpha)\,e^{(r_{\min} - r_{\max})/\beta} > 0

    with :math:`r_{\min}^U = \min_{\mathrm{supp}\,p_U} r`,
    :math:`r_{\max} = \max_{\mathrm{supp}\,p_{ref}} r`, :math:`M_U = E_{p_U}[e^{r/\beta}]`,
    :math:`Z = \alpha M_A + (1-\alpha) M_U`. Derivation: :math:`M_U \ge e^{r^U_{\min}/\beta}`
    (every output of :math:`\mathrm{supp}\,p_U` has :math:`r \ge r^U_{\min}` and :math:`p_U` sums
    to 1) and :math:`Z = E_{p_{ref}}[e^{r/\beta}] \le e^{r_{\max}/\beta}`. So
    :math:`0 < B \le 1 - \alpha` (:math:`r^U_{\min} \le r_{\max}`, equality iff ``r`` is constant
    on the support); the second, looser form is the sources' statement. Per output,
    :math:`p_\theta(y) \ge p_{ref}(y)e^{(r(y)-r_{\max})/\beta}`.

    Source: sources 000/001, Theorem 2 (``0 < TPM(U)``) and §1.4 ("shrunk, not truncated").
    Reading: the sources give no quantitative bound; this is the one their argument implies, with
    the minimum taken over the support of ``p_U`` (tighter, still valid).

    Floating point: :math:`B > 0` is exact, but :math:`B` is returned as a float, which is 0.0
    once :math:`(r_{\max} - r^U_{\min})/\beta` exceeds about 745 (float64; about 87 in float32,
    whose subnormals XLA's CPU backend flushes to zero) - as is the computed
    :math:`\mathrm{TPM}(U)` itself. :func:`log_residual_mass_bound` returns :math:`\ln B`, finite
    for every valid input.

    Args:
      alpha, p_A, p_U, r, beta: as in :func:`mixture_weights`.

    Returns:
      Scalar :math:`B` in ``[0, 1 - alpha]``: positive unless it underflows (see above).

    Raises:
      ValueError: as :func:`mixture_weights` (traced: NaN instead).

    Example:
      >>> b = residual_mass_bound(0.5, jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]),
      ...                         jnp.array([1.0, 0.0]), 1.0)
      >>> round(float(b), 6)  # 0.5 * e^{-1}
      0.18394
    """
    _check_mixture(alpha, p_A, p_U, r, beta)
    rules = _mixture_rules(alpha, p_A, p_U, r, beta)
    alpha, p_A, p_U, r, beta = _checked_arrays(rules, alpha, p_A, p_U, r, beta)
    return enforce(_residual_mass_bound(alpha, p_A, p_U, r, beta), rules)


def log_residual_mass_bound(
    alpha: ArrayLike, p_A: ArrayLike, p_U: ArrayLike, r: ArrayLike, beta: ArrayLike
) -> jax.Array:
    r"""Return :math:`\ln B`, the log of :func:`residual_mass_bound`, finite where ``B`` underflows.

    .. math:: \ln \mathrm{TPM}(U) \ge \ln B = \ln(1-\alpha) - \frac{r_{\max} - r^U_{\min}}{\beta}
       \in (-\infty, \ln(1-\alpha)]

    Source: as :func:`residual_mass_bound` (sources 000/001, Theorem 2; derivation there).

    Args:
      alpha, p_A, p_U, r, beta: as in :func:`mixture_weights`.

    Returns:
      Scalar :math:`\ln B \le \ln(1-\alpha)`, finite for every valid input.

    Raises:
      ValueError: as :func:`mixture_weights` (traced: NaN instead).

    Example:
      >>> lb = log_residual_mass_bound(0.5, jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]),
      ...                              jnp.array([1000.0, 0.0]), 1.0)
      >>> round(float(lb), 6)  # ln 0.5 - 1000; residual_mass_bound underflows to 0.0 here
      -1000.693147
    """
    _check_mixture(alpha, p_A, p_U, r, beta)
    rules = _mixture_rules(alpha, p_A, p_U, r, beta)
    alpha, p_A, p_U, r, beta = _checked_arrays(rules, alpha, p_A, p_U, r, beta)
    r_max, r_min_U = _reward_range(p_A, p_U, r)
    return enforce(jnp.log1p(-alpha) + (r_min_U - r_max) / beta, rules)


def _reward_range(p_A, p_U, r):
    """``(r_max over supp p_ref, r_min over supp p_U)``."""
    on = (p_A > 0) | (p_U > 0)
    return jnp.max(jnp.where(on, r, -jnp.inf)), jnp.min(jnp.where(p_U > 0, r, jnp.inf))


def _residual_mass_bound(alpha, p_A, p_U, r, beta):
    r_max, r_min_U = _reward_range(p_A, p_U, r)
    return (1 - alpha) * jnp.exp((r_min_U - r_max) / beta)
