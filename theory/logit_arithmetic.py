r"""Logit arithmetic between a KL-tuned model and its reference: decoding-time re-amplification.

Source 001 ends with ``logits = alpha * logits_theta - beta * logits_ref``; its symbols are not the
mixture weight and KL coefficient, so here the coefficients are ``a`` and ``b``:
:math:`q = \mathrm{softmax}(a\,l_\theta - b\,l_{ref})`. With the KL optimum
:math:`l_\theta = l_{ref} + r/\beta - \ln Z`,

.. math:: q(y) \propto p_{ref}(y)^{a-b}\,e^{a\,r(y)/\beta}.

Sampling at temperature ``T`` is ``a = 1/T, b = 0``; reward extrapolation with coefficient
``gamma`` (``softmax((1+gamma) l_theta - gamma l_ref)``) is ``a = 1 + gamma, b = gamma``: the KL
optimum with ``beta / (1 + gamma)``; ``gamma = -1`` returns ``p_ref`` and ``gamma < -1`` reverses
the tuning. Outputs outside the support of ``p_ref`` stay outside.

Invalid values follow the rule of :mod:`theory` (and of :mod:`theory.kl_optimum`): concrete ones
raise, traced ones make every floating entry of the result NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from jax.typing import ArrayLike

from theory.checks import (
    all_valid,
    check_finite,
    check_ndim,
    check_positive,
    enforce,
    is_concrete,
    valid_finite,
)
from theory.kl_optimum import (
    TotalProbabilityMass,
    _check_distribution,
    _check_mixture,
    _check_reward,
    _checked_arrays,
    _distribution_rules,
    _mixture_rules,
    _reward_beta_rules,
    _tpm_from_log_moments,
)


def _check_coefficients(a, b) -> None:
    for name, value in (("a", a), ("b", b)):
        check_ndim(name, value, 0, "[] (a scalar)")
        check_finite(name, value)


def _coefficient_rules(a, b) -> list:
    return [
        (all_valid(valid_finite(x)), f"{name} must be finite") for name, x in (("a", a), ("b", b))
    ]


def _logit_rules(logits_theta, logits_ref) -> list:
    """Traced rules of ``(logits_theta, logits_ref)``, in that order: ``logits_ref`` in
    [-inf, inf) with one entry finite; ``logits_theta`` finite there."""
    theta_rule = "logits_theta must be finite wherever logits_ref is finite (same support)"
    ref_rule = "logits_ref must be finite or -inf (off the support), with one finite"
    if is_concrete((logits_theta, logits_ref)):
        return [(True, theta_rule), (True, ref_rule)]  # checked in Python
    l_theta, l_ref = jnp.asarray(logits_theta), jnp.asarray(logits_ref)
    on = l_ref > -jnp.inf
    ref_ok = ~jnp.any(jnp.isnan(l_ref) | (l_ref == jnp.inf)) & jnp.any(on)
    theta_ok = jnp.all(jnp.where(on, jnp.isfinite(l_theta), True))
    return [(theta_ok, theta_rule), (ref_ok, ref_rule)]


def logit_arithmetic(
    logits_theta: ArrayLike, logits_ref: ArrayLike, *, a: ArrayLike, b: ArrayLike
) -> jax.Array:
    r"""Return :math:`\mathrm{softmax}(a\,l_\theta - b\,l_{ref})`, ``[V]``.

    .. math:: q = \mathrm{softmax}(a\,l_\theta - b\,l_{ref}),\quad q(y) = 0 \text{ where }
       l_{ref}(y) = -\infty

    Source: source 001, §1.4, last line (``logits = alpha*logits_theta - beta*logits_ref``).
    Reading: the line is unexplained; taken as decoding from a linear combination of the tuned and
    reference log-probabilities (contrastive decoding / reward extrapolation). An output with
    ``l_ref = -inf`` is kept outside the support (``a*(-inf) - b*(-inf)`` is undefined).

    Args:
      logits_theta: ``[V]`` tuned logits or log-probs (``-inf`` allowed only where ``logits_ref``
        is ``-inf``).
      logits_ref: ``[V]`` reference logits or log-probs, ``< inf``, at least one finite.
      a, b: finite scalar coefficients (keyword-only).

    Returns:
      ``[V]`` distribution.

    Raises:
      ValueError: shapes differ, NaN or ``+inf`` logits, ``logits_theta`` not finite on the
        support of ``logits_ref``, non-finite ``a``/``b`` (traced values: all entries NaN).

    Example:
      >>> l = jnp.log(jnp.array([0.2, 0.8]))
      >>> [round(float(x), 6) for x in logit_arithmetic(l, l, a=2.0, b=1.0)]  # (2 - 1) l = l
      [0.2, 0.8]
    """
    check_ndim("logits_theta", logits_theta, 1, "[V]")
    check_ndim("logits_ref", logits_ref, 1, "[V]")
    if np.shape(logits_theta) != np.shape(logits_ref):
        raise ValueError(
            "logits_theta and logits_ref must have one shape [V], got "
            f"{np.shape(logits_theta)}, {np.shape(logits_ref)}"
        )
    if is_concrete((logits_theta, logits_ref)):
        l_theta, l_ref = np.asarray(logits_theta), np.asarray(logits_ref)
        on = l_ref > -np.inf
        if np.any(np.isnan(l_ref) | (l_ref == np.inf)) or not np.any(on):
            raise ValueError("logits_ref must be finite or -inf (off the support), with one finite")
        if not np.all(np.isfinite(l_theta[on])):
            raise ValueError(
                "logits_theta must be finite wherever logits_ref is finite (same support)"
            )
    _check_coefficients(a, b)
    rules = _logit_rules(logits_theta, logits_ref) + _coefficient_rules(a, b)
    l_theta, l_ref, a, b = _checked_arrays(rules, logits_theta, logits_ref, a, b)
    on = l_ref > -jnp.inf
    mixed = a * jnp.where(on, l_theta, 0.0) - b * jnp.where(on, l_ref, 0.0)
    return enforce(jax.nn.softmax(jnp.where(on, mixed, -jnp.inf)), rules)


def _log_weight(p_ref, r, beta, a, b):
    """log of q / p_ref up to a constant: (a - b - 1) ln p_ref + a r / beta on the support."""
    on = p_ref > 0
    return jnp.where(on, (a - b - 1) * jnp.log(jnp.where(on, p_ref, 1.0)) + a * r / beta, 0.0)


def arithmetic_tilt(
    p_ref: ArrayLike, r: ArrayLike, beta: ArrayLike, *, a: ArrayLike, b: ArrayLike
) -> jax.Array:
    r"""Return the closed form of logit arithmetic applied to the KL optimum, ``[V]``.

    .. math:: q(y) = \frac{p_{ref}(y)^{a-b}\,e^{a\,r(y)/\beta}}
       {\sum_{y'\in\mathrm{supp}\,p_{ref}} p_{ref}(y')^{a-b}\,e^{a\,r(y')/\beta}}

    Source: derived here from source 001's last line and Lemma 1's optimum
    (:math:`l_\theta = l_{ref} + r/\beta - \ln Z`; the constant cancels in the softmax).

    Args:
      p_ref: ``[V]`` reference distribution; r: ``[V]`` finite rewards; beta: ``> 0``.
      a, b: finite scalar coefficients (keyword-only).

    Returns:
      ``[V]`` distribution on the support of ``p_ref``.

    Raises:
      ValueError: bad ``p_ref``, non-finite ``r``/``a``/``b``, ``beta <= 0`` (traced: all
        entries NaN instead).

    Example:
      >>> p_ref, r = jnp.array([0.5, 0.5]), jnp.array([1.0, 0.0])
      >>> q = arithmetic_tilt(p_ref, r, 1.0, a=2.0, b=1.0)  # a - b = 1: the optimum at beta / 2
      >>> round(float(q[0]), 6) == round(float(jnp.exp(2.0) / (jnp.exp(2.0) + 1.0)), 6)
      True
    """
    _check_distribution("p_ref", p_ref)
    _check_reward(r, np.shape(p_ref)[0])
    check_positive("beta", beta)
    _check_coefficients(a, b)
    rules = [
        *_distribution_rules("p_ref", p_ref),
        *_reward_beta_rules(r, beta),
        *_coefficient_rules(a, b),
    ]
    p_ref, r, beta, a, b = _checked_arrays(rules, p_ref, r, beta, a, b)
    return enforce(jax.nn.softmax(jnp.log(p_ref) + _log_weight(p_ref, r, beta, a, b)), rules)


def arithmetic_mass(
    alpha: ArrayLike,
    p_A: ArrayLike,
    p_U: ArrayLike,
    r: ArrayLike,
    beta: ArrayLike,
    *,
    a: ArrayLike,
    b: ArrayLike,
) -> TotalProbabilityMass:
    r"""Return :math:`(\mathrm{TPM}(A), \mathrm{TPM}(U))` of logit arithmetic on the KL optimum.

    .. math:: q = \frac{\alpha\,w\,p_A + (1-\alpha)\,w\,p_U}{Z_w},\quad
       w = p_{ref}^{a-b-1}e^{a r/\beta},\quad
       \mathrm{TPM}(A) = \frac{\alpha E_{p_A}[w]}{\alpha E_{p_A}[w] + (1-\alpha)E_{p_U}[w]}

    ``a = 1, b = 0`` is :func:`theory.kl_optimum.total_probability_mass`; ``a = 1/T, b = 0`` is
    temperature-``T`` sampling from the tuned model ("jailbreak budget": how much unaligned mass
    decoding alone recovers).

    Source: Lemma 1's decomposition (sources 000/001) applied to :func:`arithmetic_tilt`; the
    jailbreak link is §"Takeaways" of source 000 (high-temperature decoding re-amplifies).

    Args:
      alpha, p_A, p_U, r, beta: as in :func:`theory.kl_optimum.mixture_weights`.
      a, b: finite scalar coefficients (keyword-only).

    Returns:
      :class:`theory.kl_optimum.TotalProbabilityMass`.

    Raises:
      ValueError: as :func:`theory.kl_optimum.mixture_weights`; non-finite ``a``/``b`` (traced:
        both fields NaN instead).

    Example:
      >>> m = arithmetic_mass(0.5, jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]),
      ...                     jnp.array([1.0, 0.0]), 1.0, a=0.0, b=0.0)
      >>> round(float(m.tpm_U), 6)  # a = b = 0: uniform over the support
      0.5
    """
    _check_mixture(alpha, p_A, p_U, r, beta)
    _check_coefficients(a, b)
    rules = _mixture_rules(alpha, p_A, p_U, r, beta) + _coefficient_rules(a, b)
    alpha, p_A, p_U, r, beta, a, b = _checked_arrays(rules, alpha, p_A, p_U, r, beta, a, b)
    log_w = _log_weight(alpha * p_A + (1 - alpha) * p_U, r, beta, a, b)
    tpm = _tpm_from_log_moments(
        alpha, logsumexp(jnp.log(p_A) + log_w), logsumexp(jnp.log(p_U) + log_w)
    )
    return enforce(tpm, rules)
