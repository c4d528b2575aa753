r"""A tabular softmax policy trained by gradient flow on the KL-regularised reward objective.

The policy has one free logit per output; outputs outside :math:`\mathrm{supp}\,p_{ref}` are masked
to probability 0 (the objective is :math:`-\infty` if any mass leaves the support). Gradient
flow :math:`\dot l = \nabla_l\,[E_{p_l}[r] - \beta\,KL(p_l\|p_{ref})]` (through
:func:`sims.flows.core.integrate`) should reach :func:`theory.kl_optimum.tilt`; the flow records the
distance to it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from sims.flows.core import Flow, integrate_model
from theory.checks import check_finite, check_ndim
from theory.kl_optimum import objective, tilt


class TabularPolicy(nnx.Module):
    r"""Softmax policy :math:`p(y) = \mathrm{softmax}(l)_y` over ``V`` outputs with free logits.

    Attributes:
      logits: ``nnx.Param`` ``[V]``.

    Args:
      logits: ``[V]`` finite initial logits (keyword-only; zeros give the uniform policy).

    Example:
      >>> policy = TabularPolicy(logits=jnp.zeros(4))
      >>> [round(float(x), 4) for x in jnp.exp(policy())]  # uniform: 1/4 each
      [0.25, 0.25, 0.25, 0.25]
    """

    def __init__(self, *, logits: ArrayLike):
        check_ndim("logits", logits, 1, "[V]")
        check_finite("logits", logits)
        self.logits = nnx.Param(jnp.asarray(logits))

    def __call__(self, support: ArrayLike | None = None) -> jax.Array:
        """Return log-probs ``[V]``; ``support`` (bool ``[V]``) masks the rest to ``-inf``."""
        logits = self.logits[...]
        if support is not None:
            logits = jnp.where(support, logits, -jnp.inf)
        return jax.nn.log_softmax(logits)


class TiltDistance(NamedTuple):
    r"""Distance of the flow's policy :math:`p` to the optimum :math:`p^*` (``tilt``).

    Attributes:
      total_variation: :math:`\frac12\sum_y|p(y) - p^*(y)|`.
      kl: :math:`KL(p\|p^*)`.
      objective_gap: :math:`\mathcal L(p^*) - \mathcal L(p)`, which equals :math:`\beta\,KL(p\|p^*)`
        (:math:`\mathcal L(p) = \beta\ln Z - \beta KL(p\|p^*)`, sources 000/001, proof of Lemma 1).
    """

    total_variation: jax.Array
    kl: jax.Array
    objective_gap: jax.Array


class _FlowData(NamedTuple):
    p_ref: jax.Array
    r: jax.Array
    beta: jax.Array
    target: jax.Array
    support: jax.Array


def _policy_probs(policy, data):
    return jnp.exp(policy(data.support))


def _negative_objective(policy: TabularPolicy, data: _FlowData) -> jax.Array:
    return -objective(_policy_probs(policy, data), data.p_ref, data.r, data.beta)


def _tilt_distance(policy: TabularPolicy, data: _FlowData) -> TiltDistance:
    p = _policy_probs(policy, data)
    on = data.support
    log_ratio = jnp.where(on, jnp.log(jnp.where(on, p, 1.0) / jnp.where(on, data.target, 1.0)), 0.0)
    gap = objective(data.target, data.p_ref, data.r, data.beta) + _negative_objective(policy, data)
    return TiltDistance(0.5 * jnp.sum(jnp.abs(p - data.target)), jnp.sum(p * log_ratio), gap)


def kl_objective_flow(
    policy: TabularPolicy,
    p_ref: ArrayLike,
    r: ArrayLike,
    *,
    beta: float,
    dt: float,
    num_steps: int,
    record_every: int = 1,
    optimizer: str = "sgd",
) -> Flow:
    r"""Return the :class:`~sims.flows.core.Flow` on :math:`-(E_{p}[r] - \beta\,KL(p\|p_{ref}))`
    over the policy's logits; ``.run()`` executes it.

    .. math:: \dot l = \nabla_l\Big(\sum_y p_l(y) r(y)
       - \beta\sum_y p_l(y)\ln\frac{p_l(y)}{p_{ref}(y)}\Big),\qquad
       p_l = \mathrm{softmax}(l)\ \text{on}\ \mathrm{supp}\,p_{ref}

    Source: sources 000/001, Eq. 1 and Lemma 1 (the flow's only stationary point on the support is
    the tilt, since the objective is strictly concave in :math:`p`).

    Args:
      policy: starting :class:`TabularPolicy` (not modified).
      p_ref: ``[V]`` reference distribution; r: ``[V]`` finite rewards.
      beta: ``> 0`` (keyword-only).
      dt, num_steps, record_every, optimizer: as in :func:`sims.flows.core.integrate`.

    Returns:
      :class:`~sims.flows.core.Flow`; its result's ``final`` is the trained policy, observables are
      :class:`TiltDistance`; the loss column is :math:`-\mathcal L`.

    Raises:
      ValueError: as :func:`theory.kl_optimum.tilt`; logits of the wrong shape; as
        :func:`sims.flows.core.integrate`.

    Example:
      >>> p_ref, r = jnp.array([0.5, 0.5]), jnp.array([1.0, 0.0])
      >>> res = kl_objective_flow(TabularPolicy(logits=jnp.zeros(2)), p_ref, r, beta=1.0,
      ...                         dt=0.5, num_steps=400, record_every=400).run()
      >>> float(res.observables.total_variation[-1]) < 1e-6
      True
    """
    target = tilt(p_ref, r, beta)
    if policy.logits.shape != target.shape:
        raise ValueError(f"policy logits must have shape {target.shape}, got {policy.logits.shape}")
    p_ref = jnp.asarray(p_ref, target.dtype)
    data = _FlowData(
        p_ref, jnp.asarray(r, target.dtype), jnp.asarray(beta, target.dtype), target, p_ref > 0
    )

    return integrate_model(
        policy,
        _negative_objective,
        _tilt_distance,
        data,
        dt=dt,
        num_steps=num_steps,
        record_every=record_every,
        optimizer=optimizer,
    )
