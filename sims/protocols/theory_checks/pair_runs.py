r"""Flows used by several theory checks, and Theorems 4-5 on one single-token pair.

:func:`logprob_chosen_change` (vmapped runs: change of each preferred log-prob),
:func:`sft_on_label_sets` (SFT on every label of each prompt's set), :func:`single_pair_run` (the
flow on one pair with Theorems 4-5 at ``t = 0`` beside a one-step probe) and
:func:`token_ranking` (Theorem 5's ranking of the other tokens beside the observed one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sims.analysis.summaries import stack
from sims.flows.core import SFTData, preference_flow, sft_flow, stack_models
from sims.models.unconstrained import UnconstrainedFeatures, make_pairs
from theory import losses as _losses
from theory.single_token import DisplacementTerms, displacement_terms, logprob_velocity


class RunChanges(NamedTuple):
    """Changes over vmapped runs from ``t = 0`` to the end.

    Attributes:
      logprob_chosen: ``[R, N]`` change of each pair's :math:`\\ln\\pi(y^+|x)`.
      loss: ``[R]`` change of the training loss.
    """

    logprob_chosen: jax.Array
    loss: jax.Array


def logprob_chosen_change(
    models: Sequence[nnx.Module],
    datasets: Sequence[Any],
    loss: _losses.PairLoss,
    *,
    dt: float,
    num_steps: int,
) -> RunChanges:
    """Return the change of every pair's preferred log-prob and of the loss over ``R`` flows.

    Run ``r`` trains ``models[r]`` on ``datasets[r]`` (equal shapes; pairs whose record has
    ``logprob_chosen``, such as :class:`~sims.models.prefix_tree.PrefixTreePairs`) with
    :func:`sims.flows.core.preference_flow`; all runs are one vmapped, compiled flow recording only
    the start and the end.

    Raises:
      ValueError: ``models`` and ``datasets`` differ in length or are empty; as
        :func:`sims.flows.core.preference_flow`.
    """
    if len(models) != len(datasets) or not models:
        raise ValueError(
            f"models and datasets must be non-empty and of one length, got {len(models)} and "
            f"{len(datasets)}"
        )
    res = preference_flow(
        stack_models(list(models)),
        stack(list(datasets)),
        loss,
        dt=dt,
        num_steps=num_steps,
        record_every=num_steps,
        in_axes=(0, 0),
    ).run()
    lp = res.observables.logprob_chosen  # [R, 2, N]
    return RunChanges(lp[:, -1] - lp[:, 0], res.loss[:, -1] - res.loss[:, 0])


def sft_on_label_sets(
    model: UnconstrainedFeatures,
    label_sets: Sequence[Sequence[int]],
    *,
    dt: float,
    num_steps: int,
) -> UnconstrainedFeatures:
    r"""Return ``model`` after SFT of prompt ``p`` on every label of ``label_sets[p]``.

    .. math:: L = -\frac1N\sum_p\sum_{y\in S_p}\ln\pi(y|p), \qquad N = \sum_p |S_p|

    the expectation of the SFT loss when each prompt draws one label of its set uniformly and
    every set has one size (the reading of App. H.1 for the unconstrained-features model, whose
    free hidden embeddings would otherwise memorise the one drawn label). Gradient flow
    (:func:`sims.flows.core.sft_flow`, Euler steps of ``dt``).

    Raises:
      ValueError: no label sets, an empty set, ids out of range.
    """
    if not label_sets or any(len(s) == 0 for s in label_sets):
        raise ValueError(f"label_sets must be non-empty sets of token ids, got {label_sets!r}")
    prompts, labels = zip(*[(p, y) for p, s in enumerate(label_sets) for y in s], strict=True)
    data = SFTData(jnp.array(prompts), jnp.array(labels))
    return sft_flow(model, data, dt=dt, num_steps=num_steps).run().final


class SinglePairRun(NamedTuple):
    """Preference flow of one single-token pair, with Theorems 4-5 at ``t = 0``.

    Attributes:
      t: ``[C + 1]`` flow times of the checkpoints.
      loss: ``[C + 1]`` loss at the checkpoints.
      logprobs: ``[C + 1, V]`` :math:`\\ln\\pi(\\cdot|x)` at the checkpoints.
      predicted_velocity: ``[V]`` the closed form at ``t = 0`` (Theorem 4 at ``y_pos``, Theorem 5
        at the other tokens).
      probed_velocity: ``[V]`` the log-prob change of one Euler step of flow time ``probe_dt``,
        divided by ``probe_dt``.
      terms: Theorems 4-5's :class:`~theory.single_token.DisplacementTerms` at ``t = 0``.
    """

    t: jax.Array
    loss: jax.Array
    logprobs: jax.Array
    predicted_velocity: jax.Array
    probed_velocity: jax.Array
    terms: DisplacementTerms


def single_pair_run(
    model: UnconstrainedFeatures,
    loss: _losses.PairLoss,
    *,
    prompt: int,
    y_pos: int,
    y_neg: int,
    dt: float,
    num_steps: int,
    record_every: int,
    probe_dt: float,
) -> SinglePairRun:
    r"""Return the flow on one pair ``(prompt, y_pos, y_neg)`` and Theorems 4-5 at its start.

    The reference is ``model`` (so :math:`\ell'` is taken at margin = reference margin). The
    closed form :math:`\frac{d}{dt}\ln\pi(z|x)` (:func:`theory.single_token.logprob_velocity`) is
    set beside the rate of one Euler step of flow time ``probe_dt`` (error :math:`O(\delta)`).

    Source: Razin et al. 2024, Theorems 4-5 (App. D.1).

    Raises:
      ValueError: ids out of range, ``y_pos == y_neg``; as :func:`sims.flows.core.preference_flow`.
    """
    pairs = make_pairs(model, [prompt], [y_pos], [y_neg])
    W0, h0 = model.unembedding[...], model.hidden[...][prompt]
    terms = displacement_terms(W0, h0, y_pos, y_neg)
    lp0 = model(jnp.array([prompt]))[0]
    ell_prime = _losses.margin_derivative(loss, lp0[y_pos], lp0[y_neg], lp0[y_pos], lp0[y_neg])
    predicted = logprob_velocity(W0, h0, y_pos, y_neg, ell_prime)
    traj = preference_flow(
        model, pairs, loss, dt=dt, num_steps=num_steps, record_every=record_every
    ).run()
    probe = preference_flow(model, pairs, loss, dt=probe_dt, num_steps=1).run()
    step = probe.observables.logprobs[1, 0] - probe.observables.logprobs[0, 0]
    return SinglePairRun(
        traj.t, traj.loss, traj.observables.logprobs[:, 0], predicted, step / probe_dt, terms
    )


class TokenRanking(NamedTuple):
    """Theorem 5's ranking of the tokens other than ``y_pos`` and ``y_neg``, beside the observed.

    Attributes:
      others: ``[V - 2]`` ids of the other tokens, increasing.
      alignment: ``[V - 2]`` :math:`\\langle W_z, W_{y^+} - W_{y^-}\\rangle` at ``t = 0``.
      instant: ``[V - 2]`` probed velocity at ``t = 0``.
      early: ``[V - 2]`` change of :math:`\\ln\\pi(z|x)` up to the early checkpoint.
      final: ``[V - 2]`` change over the whole run.
    """

    others: np.ndarray
    alignment: np.ndarray
    instant: np.ndarray
    early: np.ndarray
    final: np.ndarray


def token_ranking(run: SinglePairRun, *, y_pos: int, y_neg: int, early: int) -> TokenRanking:
    r"""Return Theorem 5's alignments and the observed changes of every other token of ``run``.

    Theorem 5: :math:`\frac{d}{dt}\ln\pi(z|x) = -\ell'\,[\langle W_z, W_{y^+} - W_{y^-}\rangle
    + c]` with ``c`` the same for every :math:`z\notin\{y^+, y^-\}`, so at ``t = 0`` the
    alignment orders the other tokens as their velocities do; the observed orders are the probed
    velocity, the change up to checkpoint ``early`` and the change over the run.

    Source: Razin et al. 2024, Theorem 5 (App. D.1).

    Raises:
      ValueError: ``early`` not a checkpoint index of ``run``.
    """
    logprobs = np.asarray(run.logprobs)  # [C + 1, V]
    if not 0 <= early < logprobs.shape[0]:
        raise ValueError(
            f"early must be a checkpoint index in [0, {logprobs.shape[0]}), got early={early}"
        )
    others = np.array([i for i in range(logprobs.shape[1]) if i not in (y_pos, y_neg)])
    return TokenRanking(
        others,
        np.asarray(run.terms.token_alignment)[others],
        np.asarray(run.probed_velocity)[others],
        (logprobs[early] - logprobs[0])[others],
        logprobs[-1, others] - logprobs[0, others],
    )
