r"""The DPO vs DPOP edit-distance-1 protocol (Pal et al. 2024, §3): setup, flows and sign checks.

On one pair :math:`y_w, y_l` that differ only at position :math:`m` (``"2+2=4"`` vs ``"2+2=5"``):

* :func:`arithmetic_ids`: the pair's tokens over :data:`ARITHMETIC_TOKENS`;
* :func:`reference_context_logits`: an "SFT" reference in the per-position logit model that
  satisfies Pal et al.'s well-optimised assumption exactly at every position after the edit;
* :func:`edit_pair_models`: three models at that reference (position logits with tied contexts,
  free per-context logits, unconstrained features fitted to the logits);
* :func:`edit_flow_summary`: the per-position numbers of a DPO/DPOP flow
  (:func:`sims.models.logit_model.edit_pair_flow`), with the Proposition 2 check;
* :func:`sign_checks`: the source's sign predictions against the exact per-position gradient
  (:func:`theory.dpop.position_logit_gradients`) on a :math:`\lambda` grid and on perturbed states;
* :func:`edit_distance_protocol`: all of it for one pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from sims.flows.core import FlowResult
from sims.models.logit_model import EditPrefixes, PositionLogits, edit_pair_flow, edit_pair_prefixes
from sims.models.unconstrained import UnconstrainedFeatures
from theory.dpop import pair_logprobs_from_logits, position_logit_gradients
from theory.dpop_signs import (
    LambdaThresholds,
    lambda_thresholds,
    predicted_signs,
    well_optimised,
)

#: The character vocabulary of the arithmetic pairs (Pal et al.'s "2+2=4" example), ``<eos>`` last.
ARITHMETIC_TOKENS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "+", "=", ";", "<eos>")
#: Factors of lambda*_k at which :func:`sign_checks` tests DPOP's signs just above and below the
#: threshold (the 1e-9 keeps a zero threshold strictly below the tested lambda).
THRESHOLD_ABOVE, THRESHOLD_BELOW, THRESHOLD_ATOL = 1.001, 0.999, 1e-9


def arithmetic_ids(text: str) -> np.ndarray:
    """Return the token ids of ``text`` over :data:`ARITHMETIC_TOKENS`, one character per token,
    ``<eos>`` appended.

    Raises:
      ValueError: a character outside the vocabulary.

    Example:
      >>> arithmetic_ids("2+2=4").tolist()
      [2, 10, 2, 11, 4, 13]
    """
    bad = sorted(set(text) - set(ARITHMETIC_TOKENS[:-1]))
    if bad:
        raise ValueError(f"text must use only {ARITHMETIC_TOKENS[:-1]}, got {bad} in {text!r}")
    return np.array([ARITHMETIC_TOKENS.index(ch) for ch in text] + [len(ARITHMETIC_TOKENS) - 1])


def reference_context_logits(
    key: jax.Array,
    chosen: np.ndarray,
    rejected: np.ndarray,
    prefixes: EditPrefixes,
    *,
    vocab_size: int,
    confidence_chosen: float,
    confidence_rejected: float,
    edit_logits: tuple[float, float],
    noise: float,
) -> jax.Array:
    """Return ``[P, V]`` reference logits: Gaussian noise plus a boost on each next correct token.

    The boost is ``confidence_chosen`` in shared and :math:`y_w` contexts and
    ``confidence_rejected`` in :math:`y_l` contexts (same noise), so the well-optimised
    assumption holds at every :math:`k > m` when ``confidence_chosen > confidence_rejected``; at
    the edit the correct and wrong tokens get ``edit_logits``.

    Source: the "SFT then DPO" setting of Pal et al. 2024, §3 (its well-optimised assumption).

    Raises:
      ValueError: ``vocab_size < 2``, ``noise < 0``, ``edit_logits`` not two numbers.

    Example:
      >>> from sims.models.logit_model import edit_pair_prefixes
      >>> c, r = np.array([0, 1, 2]), np.array([0, 2, 2])
      >>> b = reference_context_logits(jax.random.key(0), c, r, edit_pair_prefixes(c, r),
      ...     vocab_size=3, confidence_chosen=2.0, confidence_rejected=1.0,
      ...     edit_logits=(1.0, 0.5), noise=0.0)
      >>> b.tolist()  # rows: k=0, k=1 (edit), y_w^{<2}, y_l^{<2}
      [[2.0, 0.0, 0.0], [0.0, 1.0, 0.5], [0.0, 0.0, 2.0], [0.0, 0.0, 1.0]]
    """
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an integer >= 2, got vocab_size={vocab_size!r}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got noise={noise!r}")
    if len(edit_logits) != 2:
        raise ValueError(f"edit_logits must be (correct, wrong), got edit_logits={edit_logits!r}")
    m, P = prefixes.edit, len(prefixes.position)
    logits = noise * np.asarray(jax.random.normal(key, (P, vocab_size)))
    for k in range(m):
        logits[k, chosen[k]] += confidence_chosen
    logits[m, chosen[m]] += edit_logits[0]
    logits[m, rejected[m]] += edit_logits[1]
    for k in range(m + 1, len(chosen)):  # y_l context: same noise, smaller boost
        logits[prefixes.rejected[k]] = logits[prefixes.chosen[k]]
        logits[prefixes.chosen[k], chosen[k]] += confidence_chosen
        logits[prefixes.rejected[k], chosen[k]] += confidence_rejected
    return jnp.asarray(logits)


def edit_pair_models(
    key: jax.Array, context: ArrayLike, prefixes: EditPrefixes, *, length: int, hidden_size: int
) -> dict[str, PositionLogits | UnconstrainedFeatures]:
    """Return the three models of the protocol, each at the reference ``context`` ``[P, V]``.

    ``"logit"``: :class:`~sims.models.logit_model.PositionLogits` with the contexts of one
    position tied (trainable per position); ``"free_logit"``: the same with every context free;
    ``"features"``: :class:`~sims.models.unconstrained.UnconstrainedFeatures` with random
    unembeddings :math:`W \\sim \\mathcal N(0, I/d)` ``[V, d]`` and hidden rows fitted by least
    squares, so :math:`W h_p` equals the reference logits when ``d >= V``.

    Example:
      >>> from sims.models.logit_model import edit_pair_prefixes
      >>> pre = edit_pair_prefixes(np.array([0, 1]), np.array([1, 1]))
      >>> ms = edit_pair_models(jax.random.key(0), jnp.zeros((3, 2)), pre, length=2, hidden_size=4)
      >>> sorted(ms), ms["features"].hidden.shape
      (['features', 'free_logit', 'logit'], (3, 4))
    """
    context = jnp.asarray(context)
    V = context.shape[1]
    W = jax.random.normal(key, (V, hidden_size)) / np.sqrt(hidden_size)
    H = jnp.linalg.lstsq(W, context.T)[0].T  # [P, d]: W H^T = reference logits when d >= V
    return {
        "logit": PositionLogits(context, prefixes.position, length),
        "free_logit": PositionLogits(context, prefixes.position, length, trainable="context"),
        "features": UnconstrainedFeatures.from_arrays(W, H),
    }


class EditFlowSummary(NamedTuple):
    """Per-position numbers of a DPO/DPOP flow, one run per :math:`\\lambda` (``R`` runs).

    Attributes:
      lams: ``[R]`` the runs' :math:`\\lambda`.
      t: ``[C + 1]`` flow times.
      logprob_chosen: ``[R, C + 1, L]`` :math:`\\ln\\pi(t_k|y_w^{<k})`.
      delta_sequence: ``[R, C + 1]`` change of :math:`\\ln\\pi(y_w)` since ``t = 0``.
      delta_final: ``[R, L]`` per-position change at the end.
      hinge_active_fraction: ``[R]`` fraction of checkpoints ``t > 0`` with DPOP's hinge active.
      prop2_max_abs_error: max over runs and checkpoints ``t > 0`` of
        :math:`|\\frac{d}{dt}\\ln\\pi(y_w)|_{jvp} - \\text{Proposition 2's split}|`.
      prop2_scale: the largest sum of the split's absolute terms (the error's scale).
    """

    lams: np.ndarray
    t: np.ndarray
    logprob_chosen: np.ndarray
    delta_sequence: np.ndarray
    delta_final: np.ndarray
    hinge_active_fraction: np.ndarray
    prop2_max_abs_error: float
    prop2_scale: float


def edit_flow_summary(result: FlowResult, lams: ArrayLike) -> EditFlowSummary:
    """Return the numbers of an :func:`~sims.models.logit_model.edit_pair_flow` result.

    ``prop2_max_abs_error`` excludes ``t = 0``, which sits on the hinge's kink (there autodiff
    averages the two one-sided gradients while the closed form takes the inactive side).

    Source: Razin et al. 2024, Proposition 2 (the split of the velocity under DPOP).
    """
    flow = result.observables  # EditRecord of [R, C+1, ...] arrays
    err = np.abs(np.asarray(flow.velocity) - np.asarray(flow.split.velocity))
    dpo_part = np.asarray(flow.split.dpo_part)
    scale = np.abs(dpo_part) + np.abs(np.asarray(flow.split.velocity) - dpo_part)
    lp = np.asarray(flow.logprob_chosen)  # [R, C+1, L]
    delta = lp - lp[:, :1]
    return EditFlowSummary(
        lams=np.asarray(lams),
        t=np.asarray(result.t),
        logprob_chosen=lp,
        delta_sequence=delta.sum(-1),
        delta_final=delta[:, -1],
        hinge_active_fraction=np.asarray(flow.hinge_active)[:, 1:].mean(-1),
        prop2_max_abs_error=float(np.max(err[:, 1:])),
        prop2_scale=float(np.max(scale[:, 1:])),
    )


def _signs_right(lw, lr, chosen, rejected, lam, penalised, beta, inside, *, entrywise=False):
    """[L] (or [L, V]) bool: exact descent signs equal the source's prediction, hinge active."""
    lp_c, lp_r = pair_logprobs_from_logits(lw, lr, jnp.asarray(chosen), jnp.asarray(rejected))
    g = position_logit_gradients(
        lw, lr, chosen, rejected, lp_c + 1.0, lp_r, beta=beta, lam=lam, penalty_inside_beta=inside
    )
    pred = predicted_signs(chosen, rejected, lw.shape[1], penalised=penalised)
    same = jnp.sign(g.descent) == pred
    return same if entrywise else jnp.all(same, axis=-1)


def _rate(x) -> float | None:
    return float(np.mean(x)) if np.size(x) else None


class SignChecks(NamedTuple):
    """Agreement of Pal et al.'s sign predictions with the exact gradient (``K`` = positions after
    the edit; rates are ``None`` where nothing was counted).

    Attributes:
      lam_grid: ``[G]`` the :math:`\\lambda` grid.
      grid_signs_right: ``[G, K]`` at the given state, hinge active: every sign at position ``k``
        right for each :math:`\\lambda`.
      num_states: perturbed states.
      num_position_checks: states times ``K``.
      assumption_rate: fraction of position checks where the well-optimised assumption holds.
      dpo_all_signs_assumption_holds: DPO's predicted signs all right, where it holds.
      dpo_all_signs_assumption_fails: the same where it fails.
      dpo_entries_assumption_fails: fraction of right entries where it fails.
      dpo_correct_lowered_assumption_fails: the correct token lowered, where it fails.
      dpop_right_above_threshold: DPOP's signs all right at :math:`1.001\\lambda^*_k`.
      dpop_right_below_positive_threshold: ... at :math:`0.999\\lambda^*_k` (where
        :math:`\\lambda^*_k > 0`).
    """

    lam_grid: np.ndarray
    grid_signs_right: np.ndarray
    num_states: int
    num_position_checks: int
    assumption_rate: float
    dpo_all_signs_assumption_holds: float | None
    dpo_all_signs_assumption_fails: float | None
    dpo_entries_assumption_fails: float | None
    dpo_correct_lowered_assumption_fails: float | None
    dpop_right_above_threshold: float | None
    dpop_right_below_positive_threshold: float | None


def sign_checks(
    key: jax.Array,
    logits_chosen: ArrayLike,
    logits_rejected: ArrayLike,
    chosen: np.ndarray,
    rejected: np.ndarray,
    *,
    beta: float,
    penalty_inside_beta: bool,
    lam_grid: ArrayLike,
    num_states: int,
    state_noise: float,
) -> SignChecks:
    r"""Return the sign agreement of Pal et al.'s predictions with the exact gradient.

    At the given state with the hinge active: whether every sign at each position :math:`k > m`
    is right for each :math:`\lambda` of ``lam_grid``. Then ``num_states`` states with
    :math:`\mathcal N(0, \sigma^2)` (``state_noise``) added to the :math:`y_l`-context logits after
    the edit: how often the well-optimised assumption holds per position, how often DPO's
    predicted signs (all entries; entries; the correct token lowered) hold where it holds and
    where it fails, and how often DPOP's are right at :math:`1.001\lambda^*_k` and at
    :math:`0.999\lambda^*_k` (positions with :math:`\lambda^*_k > 0`).

    Source: Pal et al. 2024, §3; thresholds from :func:`theory.dpop_signs.lambda_thresholds`.
    """
    lw, lr = jnp.asarray(logits_chosen), jnp.asarray(logits_rejected)
    post = np.arange(len(chosen)) > np.flatnonzero(chosen != rejected)[0]
    static = dict(
        chosen=tuple(int(c) for c in chosen),
        rejected=tuple(int(r) for r in rejected),
        beta=float(beta),
        inside=bool(penalty_inside_beta),
    )
    noise = state_noise * jax.random.normal(key, (num_states, *lr.shape))
    lrs = lr[None] + jnp.where(jnp.asarray(post)[None, :, None], noise, 0.0)
    held, dpo, th, above, below = (np.asarray(x) for x in _state_checks(lw, lrs, **static))
    idx = np.flatnonzero(post)  # position k's check uses lambda = threshold_k (+-0.1%)
    held, dpo = held[:, idx], dpo[:, idx]  # [N, K], [N, K, V]
    above, below, th = above[:, idx, idx], below[:, idx, idx], th[:, idx]
    dpo_correct = np.take_along_axis(dpo, np.asarray(chosen)[idx][None, :, None], -1)[..., 0]
    dpo_all = dpo.all(-1)
    grid = np.asarray(_grid_signs(lw, lr, jnp.asarray(lam_grid), **static))[:, idx]
    return SignChecks(
        lam_grid=np.asarray(lam_grid),
        grid_signs_right=grid,
        num_states=int(held.shape[0]),
        num_position_checks=int(held.size),
        assumption_rate=float(held.mean()),
        dpo_all_signs_assumption_holds=_rate(dpo_all[held]),
        dpo_all_signs_assumption_fails=_rate(dpo_all[~held]),
        dpo_entries_assumption_fails=_rate(dpo[~held]),
        dpo_correct_lowered_assumption_fails=_rate(dpo_correct[~held]),
        dpop_right_above_threshold=_rate(above),
        dpop_right_below_positive_threshold=_rate(below[th > 0]),
    )


_STATIC = ("chosen", "rejected", "beta", "inside")


@partial(jax.jit, static_argnames=_STATIC)
def _grid_signs(lw, lr, lams, *, chosen, rejected, beta, inside):
    """[G, L]: all signs right at each lambda of the grid (hinge active). Compiled once."""
    c, r = np.array(chosen), np.array(rejected)
    return jax.vmap(lambda lam: _signs_right(lw, lr, c, r, lam, True, beta, inside))(lams)


@partial(jax.jit, static_argnames=_STATIC)
def _state_checks(lw, lrs, *, chosen, rejected, beta, inside):
    """Per perturbed state: assumption, DPO signs, thresholds, DPOP signs at 1.001 / 0.999 x."""
    c, r = np.array(chosen), np.array(rejected)

    def one_state(b):
        th = lambda_thresholds(lw, b, c, r, beta=beta, penalty_inside_beta=inside).threshold
        at = jax.vmap(lambda lam: _signs_right(lw, b, c, r, lam, True, beta, inside))
        dpo = _signs_right(lw, b, c, r, 0.0, False, beta, inside, entrywise=True)
        return (
            well_optimised(lw, b, c, r),
            dpo,
            th,
            at(th * THRESHOLD_ABOVE + THRESHOLD_ATOL),
            at(th * THRESHOLD_BELOW),
        )

    return jax.vmap(one_state)(lrs)


class EditDistanceResult(NamedTuple):
    """Everything :func:`edit_distance_protocol` measures on one pair.

    Attributes:
      edit: the edit position ``m``.
      context: ``[P, V]`` the reference logits.
      thresholds: :class:`theory.dpop_signs.LambdaThresholds` at the reference.
      lambda_star: :math:`\\max_k\\lambda^*_k`.
      well_optimised: ``[L]`` bool, the assumption per position at the reference.
      signs: :class:`SignChecks`.
      flows: ``{model name: EditFlowSummary}`` (:func:`edit_pair_models`).
    """

    edit: int
    context: jax.Array
    thresholds: LambdaThresholds
    lambda_star: float
    well_optimised: jax.Array
    signs: SignChecks
    flows: dict[str, EditFlowSummary]


def edit_distance_protocol(
    key: jax.Array,
    chosen: ArrayLike,
    rejected: ArrayLike,
    *,
    vocab_size: int,
    beta: float,
    penalty_inside_beta: bool,
    lam_factors: Sequence[float],
    dt: float,
    num_steps: int,
    record_every: int,
    confidence_chosen: float,
    confidence_rejected: float,
    edit_logits: tuple[float, float],
    noise: float,
    hidden_size: int,
    num_lam_grid: int,
    num_random_states: int,
    state_noise: float,
) -> EditDistanceResult:
    r"""Return DPO vs DPOP on one edit-distance-1 pair: flows per model, thresholds, sign checks.

    ``key`` is split in three: the reference logits (:func:`reference_context_logits`), the
    features model (:func:`edit_pair_models`), the perturbed states (:func:`sign_checks`). Each
    model trains from the reference with :math:`\lambda = f\,\max_k\lambda^*_k` for every factor
    ``f`` of ``lam_factors`` (``f = 0`` is DPO; one vmapped flow per model,
    :func:`sims.models.logit_model.edit_pair_flow`); the sign checks use the grid
    :math:`\max_k\lambda^*_k \cdot 10^{[-2, 1]}` of ``num_lam_grid`` points.

    Source: Pal et al. 2024, §3 and Eq. 3; Razin et al. 2024, Proposition 2.

    Raises:
      ValueError: ``chosen`` and ``rejected`` not an edit-distance-1 pair of one length; as the
        functions named.
    """
    chosen, rejected = np.asarray(chosen), np.asarray(rejected)
    pre = edit_pair_prefixes(chosen, rejected)
    k_logit, k_w, k_s = jax.random.split(key, 3)
    context = reference_context_logits(
        k_logit,
        chosen,
        rejected,
        pre,
        vocab_size=vocab_size,
        confidence_chosen=confidence_chosen,
        confidence_rejected=confidence_rejected,
        edit_logits=edit_logits,
        noise=noise,
    )
    lw, lr = context[pre.chosen], context[pre.rejected]  # [L, V]
    placement = dict(beta=beta, penalty_inside_beta=penalty_inside_beta)
    th = lambda_thresholds(lw, lr, chosen, rejected, **placement)
    lam_star = float(np.max(th.threshold))
    lams = jnp.asarray(lam_factors) * lam_star
    schedule = dict(dt=dt, num_steps=num_steps, record_every=record_every)
    models = edit_pair_models(k_w, context, pre, length=len(chosen), hidden_size=hidden_size)
    flows = {
        name: edit_flow_summary(
            edit_pair_flow(model, chosen, rejected, pre, lams, **placement, **schedule).run(), lams
        )
        for name, model in models.items()
    }
    signs = sign_checks(
        k_s,
        lw,
        lr,
        chosen,
        rejected,
        **placement,
        lam_grid=lam_star * jnp.logspace(-2, 1, num_lam_grid),
        num_states=num_random_states,
        state_noise=state_noise,
    )
    ok = well_optimised(lw, lr, chosen, rejected)
    return EditDistanceResult(pre.edit, context, th, lam_star, ok, signs, flows)
