r"""Log-probability velocity of the preferred response for every loss: Propositions 1-2.

Razin et al. 2024, App. E: with an SFT term (Eq. 4; CPO, RPO, BoNBoN) or unequal weights (Eq. 5;
SimPO, DPOP) the flow of :math:`\ln\pi(y^+|x)` gains a :math:`\|\nabla\ln\pi(y^+|x)\|^2` term.
Written with the coefficients :math:`a^\pm` of :func:`theory.losses.loss_coefficients`, so every
loss of :mod:`theory.losses` is covered. Setting and shapes as in :mod:`theory.multi_token`, and
so are invalid values: concrete ones raise, traced ones (ids out of range, responses that do not
differ) give NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from theory._sequence_grads import (
    check_differ_within,
    pair_rules,
    sequence_logprob,
    tie,
    validate_pair,
)
from theory.checks import check_finite, check_ndim, enforce
from theory.losses import PairLoss, loss_coefficients
from theory.multi_token import multi_token_terms


class PreferredVelocity(NamedTuple):
    r""":math:`\frac{d}{dt}\ln\pi(y^+|x)` for a general loss, split as in Propositions 1-2.

    Attributes:
      velocity: :math:`a^-\,\mathrm{bracket} + (a^+ - a^-)\|\nabla\ln\pi(y^+|x)\|^2`.
      bracket: Theorem 6's bracket (:attr:`MultiTokenTerms.bracket`); :math:`\mathcal E =
        -\ell'\,\mathrm{bracket}`.
      grad_sq_norm_pos: :math:`\|\nabla\ln\pi(y^+|x)\|^2`.
      extra: :math:`(a^+-a^-)\|\nabla\ln\pi(y^+|x)\|^2`: :math:`\lambda\|\cdot\|^2` (Prop. 1),
        :math:`\gamma\|\cdot\|^2` (Prop. 2), 0 for a loss of the class.
    """

    velocity: jax.Array
    bracket: jax.Array
    grad_sq_norm_pos: jax.Array
    extra: jax.Array


def preferred_logprob_velocity(
    W: ArrayLike,
    h_pos: ArrayLike,
    h_neg: ArrayLike,
    y_pos: ArrayLike,
    y_neg: ArrayLike,
    coef_chosen: ArrayLike,
    coef_rejected: ArrayLike,
) -> PreferredVelocity:
    r"""Return :math:`\frac{d}{dt}\ln\pi(y^+|x)` from Theorem 6's terms plus the Prop. 1-2 term.

    .. math::
       \frac{d}{dt}\ln\pi(y^+|x) = a^-\big[m + S - \textstyle\sum\alpha^-\langle h^+,h^-\rangle
       + \sum\alpha^+\langle h^+,h^+\rangle\big] + (a^+ - a^-)\,\|\nabla\ln\pi(y^+|x)\|^2

    A loss of the class has :math:`a^+ = a^- = -\ell'` (Theorem 6). The SFT-term loss (Eq. 4) has
    :math:`a^+ - a^- = \lambda` (Proposition 1). The weighted loss (Eq. 5; SimPO, DPOP) has
    :math:`a^\pm = -\lambda^\pm\mu'`, so :math:`a^-\,\mathrm{bracket} = \rho\,\mathcal E` and
    :math:`a^+-a^- = \gamma` (Proposition 2). Get :math:`a^\pm` for any loss of
    :mod:`theory.losses` from :func:`theory.losses.loss_coefficients`.

    Source: Razin et al. 2024, Theorem 6 (App. D.2), Propositions 1-2 (App. E).
    Reading: shared prefixes as in :func:`multi_token_terms`.

    Args:
      W, h_pos, h_neg, y_pos, y_neg: as in :func:`multi_token_terms`.
      coef_chosen: scalar :math:`a^+ = -\partial L/\partial\ln\pi(y^+|x)`.
      coef_rejected: scalar :math:`a^- = \partial L/\partial\ln\pi(y^-|x)`.

    Returns:
      :class:`PreferredVelocity`.

    Raises:
      ValueError: as :func:`multi_token_terms`; non-scalar or non-finite coefficients (traced
        values breaking a rule of :func:`multi_token_terms`: every field NaN).

    Example:
      >>> W, h = jnp.eye(2), jnp.zeros((1, 2))  # bracket 1, |grad|^2 = 1/2 (see above)
      >>> v = preferred_logprob_velocity(W, h, h, jnp.array([0]), jnp.array([1]), 3.0, 1.0)
      >>> float(v.velocity), float(v.extra)  # 1 * 1 + (3 - 1) * 1/2
      (2.0, 1.0)
    """
    validate_pair(W, h_pos, h_neg, y_pos, y_neg)
    check_differ_within(y_pos, y_neg, first=False)
    for name, value in (("coef_chosen", coef_chosen), ("coef_rejected", coef_rejected)):
        check_ndim(name, value, 0, "[] (a scalar)")
        check_finite(name, value)
    t = multi_token_terms(W, h_pos, h_neg, y_pos, y_neg)
    extra = (jnp.asarray(coef_chosen) - jnp.asarray(coef_rejected)) * t.grad_sq_norm_pos
    return PreferredVelocity(
        coef_rejected * t.bracket + extra, t.bracket, t.grad_sq_norm_pos, extra
    )


def loss_logprob_velocity(
    loss: PairLoss,
    W: ArrayLike,
    h_pos: ArrayLike,
    h_neg: ArrayLike,
    y_pos: ArrayLike,
    y_neg: ArrayLike,
    ref_logprob_chosen: ArrayLike = 0.0,
    ref_logprob_rejected: ArrayLike = 0.0,
) -> PreferredVelocity:
    r"""Return :math:`\frac{d}{dt}\ln\pi(y^+|x)` under gradient flow on ``loss`` for one pair.

    .. math:: a^\pm = \mp\partial L/\partial\ln\pi(y^\pm|x)\ \text{at the current log-probs},
       \quad\text{then :func:`preferred_logprob_velocity`}

    Source: Razin et al. 2024, Theorem 6 and Propositions 1-2; coefficients from
    :func:`theory.losses.loss_coefficients` (so every loss of :mod:`theory.losses` works).

    Args:
      loss: a pair loss, e.g. ``theory.losses.make_loss("dpop", beta=0.1, lam=5.0)``.
      W, h_pos, h_neg, y_pos, y_neg: as in :func:`multi_token_terms`.
      ref_logprob_chosen, ref_logprob_rejected: reference log-probs passed to ``loss``.

    Returns:
      :class:`PreferredVelocity`.

    Raises:
      ValueError: as :func:`preferred_logprob_velocity`.

    Example:
      >>> from theory.losses import make_loss
      >>> W, h = jnp.eye(2), jnp.zeros((1, 2))  # margin 0: a+- = beta * sigma(0) = 1/2
      >>> v = loss_logprob_velocity(make_loss("dpo", beta=1.0), W, h, h, jnp.array([0]),
      ...                           jnp.array([1]))
      >>> float(v.velocity)
      0.5
    """
    validate_pair(W, h_pos, h_neg, y_pos, y_neg)
    rules = pair_rules(W, h_pos, h_neg, y_pos, y_neg)
    W, h_pos, h_neg, y_pos, y_neg = (jnp.asarray(a) for a in (W, h_pos, h_neg, y_pos, y_neg))
    h_neg = tie(h_pos, y_pos, h_neg, y_neg)
    coefs = loss_coefficients(
        loss,
        sequence_logprob(W, h_pos, y_pos),
        sequence_logprob(W, h_neg, y_neg),
        ref_logprob_chosen,
        ref_logprob_rejected,
    )
    return enforce(preferred_logprob_velocity(W, h_pos, h_neg, y_pos, y_neg, *coefs), rules)
