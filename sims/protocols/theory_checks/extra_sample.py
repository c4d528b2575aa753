r"""Theorem 8 of Razin et al. 2024: the effect of one extra sample on ``ln pi(y+|x)``.

:func:`extra_sample_instance` draws a base sample with one contradicting or non-contradicting extra
sample; :func:`extra_sample_effect` sets Theorem 8's extra-sample term beside finite-time rates of
the simulated flow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from sims.models.prefix_tree import index_prefixes, with_reference
from sims.models.unconstrained import UnconstrainedFeatures
from sims.protocols.theory_checks._validation import check_int_at_least
from sims.protocols.theory_checks.pair_runs import logprob_chosen_change
from theory import losses as _losses
from theory.single_token import logprob_velocity, multi_sample_logprob_velocity


class ExtraSampleInstance(NamedTuple):
    """A base sample ``(x, y+, y-)`` and one extra sample ``(x~, y~+, y~-)``, single-token.

    Attributes:
      W: ``[V, d]`` unembeddings.
      H: ``[2, d]`` hidden embeddings of ``x`` and ``x~``.
      chosen: ``[2]`` ints ``(y+, y~+)``.
      rejected: ``[2]`` ints ``(y-, y~-)``.
    """

    W: np.ndarray
    H: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray


def extra_sample_instance(
    rng: np.random.Generator, *, vocab_size: int, hidden_size: int, contradicting: bool
) -> ExtraSampleInstance:
    r"""Return a random base sample with one extra sample (NumPy draws from ``rng``).

    Hidden embeddings share a :math:`\mathcal N(0, I)` component (so
    :math:`\langle h_x, h_{\tilde x}\rangle > 0` typically, the paper's observation) plus
    :math:`0.5\,\mathcal N(0, I)`; rows of ``W`` are :math:`\mathcal N(0, I/d)`. Contradicting:
    :math:`\tilde y^- = y^+`. Non-contradicting: :math:`y^+\notin\{\tilde y^+, \tilde y^-\}` and
    :math:`\pi(\tilde y^-|x) < \pi(\tilde y^+|x)` (the extra pair is swapped if needed).

    Source: Razin et al. 2024, Theorem 8 (§4.3).

    Raises:
      ValueError: ``vocab_size < 4``, ``hidden_size < 1``.

    Example:
      >>> inst = extra_sample_instance(np.random.default_rng(0), vocab_size=5, hidden_size=3,
      ...                              contradicting=True)
      >>> bool(inst.rejected[1] == inst.chosen[0])
      True
    """
    check_int_at_least("vocab_size", vocab_size, 4)
    check_int_at_least("hidden_size", hidden_size)
    V, d = vocab_size, hidden_size
    mean = rng.normal(size=d)  # shared component: <h_x, h_x~> > 0 (the paper's observation)
    H = mean[None, :] + 0.5 * rng.normal(size=(2, d))
    W = rng.normal(size=(V, d)) / np.sqrt(d)
    y_pos, y_neg = rng.choice(V, 2, replace=False)
    if contradicting:
        t_neg = y_pos
        t_pos = rng.choice(np.setdiff1d(np.arange(V), [y_pos]))
    else:
        t_pos, t_neg = rng.choice(np.setdiff1d(np.arange(V), [y_pos]), 2, replace=False)
        probs = np.exp(W @ H[0] - np.max(W @ H[0]))
        if probs[t_neg] > probs[t_pos]:  # non-contradicting (Thm 8) needs pi(y~-|x) < pi(y~+|x)
            t_pos, t_neg = t_neg, t_pos
    return ExtraSampleInstance(W, H, np.array([y_pos, t_pos]), np.array([y_neg, t_neg]))


class ExtraSampleEffect(NamedTuple):
    """Theorem 8's extra-sample term, predicted and simulated, per instance (``[R]`` arrays).

    Attributes:
      predicted_extra_term: the extra sample's term of :math:`\\frac{d}{dt}\\ln\\pi(y^+|x)` at
        ``t = 0``.
      simulated_extra_term: the same from finite-time rates of the flow (the rate with both
        samples minus half the rate with the base sample alone).
      predicted_velocity_with_extra: the closed-form velocity with both samples.
      simulated_velocity_with_extra: its finite-time rate.
      long_run_change_with_extra: change of :math:`\\ln\\pi(y^+|x)` over the long run, both
        samples.
      long_run_change_alone_half_weight: the same with the base sample alone at half the step
        (the weight 1/2 it has among two).
    """

    predicted_extra_term: np.ndarray
    simulated_extra_term: np.ndarray
    predicted_velocity_with_extra: np.ndarray
    simulated_velocity_with_extra: np.ndarray
    long_run_change_with_extra: np.ndarray
    long_run_change_alone_half_weight: np.ndarray


def extra_sample_effect(
    instances: Sequence[ExtraSampleInstance],
    loss: _losses.PairLoss,
    *,
    dt_rate: float,
    steps_rate: int,
    dt: float,
    num_steps: int,
) -> ExtraSampleEffect:
    r"""Return Theorem 8's extra-sample term vs the simulated flow, for every instance.

    .. math:: \frac{d}{dt}\ln\pi(y^+|x)\Big|_{\text{extra}} = \frac{d}{dt}\ln\pi(y^+|x)
       \Big|_{\{x, \tilde x\}} - \frac12\,\frac{d}{dt}\ln\pi(y^+|x)\Big|_{\{x\}}

    (the mean loss over two samples gives the base sample weight 1/2). Closed forms by
    :func:`theory.single_token.multi_sample_logprob_velocity` and
    :func:`~theory.single_token.logprob_velocity` at ``t = 0``, where every margin equals its
    reference margin (:math:`\ell' = \ell'(0)`, :func:`theory.losses.margin_derivative`);
    simulated rates: the change over ``steps_rate`` Euler steps of ``dt_rate`` divided by the
    flow time (error :math:`O(t)`). All runs of one kind are one vmapped flow
    (:func:`~sims.protocols.theory_checks.logprob_chosen_change`).

    Source: Razin et al. 2024, Theorem 8 (App. D.3).

    Raises:
      ValueError: no instances; as :func:`sims.flows.core.preference_flow`.
    """
    if not instances:
        raise ValueError("instances must hold at least one ExtraSampleInstance, got none")
    models = [UnconstrainedFeatures.from_arrays(i.W, i.H) for i in instances]
    both = [
        with_reference(m, index_prefixes([0, 1], [[p[0]], [p[1]]], [[n[0]], [n[1]]])[0])
        for m, (_, _, p, n) in zip(models, instances, strict=True)
    ]
    alone = [
        with_reference(m, index_prefixes([0], [[p[0]]], [[n[0]]])[0])
        for m, (_, _, p, n) in zip(models, instances, strict=True)
    ]
    ell = float(_losses.margin_derivative(loss, 0.0, 0.0))  # margins = reference margins
    pred_both = np.array(
        [
            float(multi_sample_logprob_velocity(W, H, p, n, jnp.full(2, ell))[0, p[0]])
            for W, H, p, n in instances
        ]
    )
    pred_alone = np.array(
        [float(logprob_velocity(W, H[0], p[0], n[0], ell)[p[0]]) for W, H, p, n in instances]
    )

    def change(datasets, step, steps):  # [R] change of ln pi(y+_0|x_0)
        out = logprob_chosen_change(models, datasets, loss, dt=step, num_steps=steps)
        return np.asarray(out.logprob_chosen[:, 0])

    t_rate = dt_rate * steps_rate
    sim_both = change(both, dt_rate, steps_rate) / t_rate
    sim_alone = change(alone, dt_rate, steps_rate) / t_rate
    return ExtraSampleEffect(
        predicted_extra_term=pred_both - pred_alone / 2,
        simulated_extra_term=sim_both - sim_alone / 2,
        predicted_velocity_with_extra=pred_both,
        simulated_velocity_with_extra=sim_both,
        long_run_change_with_extra=change(both, dt, num_steps),
        long_run_change_alone_half_weight=change(alone, dt / 2, num_steps),
    )
