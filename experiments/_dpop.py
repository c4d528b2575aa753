r"""Setup and checks for the DPO/DPOP edit-distance-1 experiment (library side of the script).

* :func:`reference_context_logits`: an "SFT" reference in the per-position logit model that
  satisfies Pal et al.'s well-optimised assumption exactly at every position after the edit.
* :func:`sign_checks`: the source's sign predictions vs the exact per-position gradient
  (:func:`theory.dpop.position_logit_gradients`, itself tested against autodiff) on a lambda grid
  and on perturbed states.
* :func:`flow_summary`: the JSON-ready numbers of :func:`sims.models.logit_model.edit_pair_flow`'s
result.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from sims.flows.core import FlowResult
from sims.models.logit_model import EditPrefixes
from theory.dpop import pair_logprobs_from_logits, position_logit_gradients
from theory.dpop_signs import lambda_thresholds, predicted_signs, well_optimised


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

    Example:
      >>> from sims.models.logit_model import edit_pair_prefixes
      >>> c, r = np.array([0, 1, 2]), np.array([0, 2, 2])
      >>> b = reference_context_logits(jax.random.key(0), c, r, edit_pair_prefixes(c, r),
      ...     vocab_size=3, confidence_chosen=2.0, confidence_rejected=1.0,
      ...     edit_logits=(1.0, 0.5), noise=0.0)
      >>> b.tolist()  # rows: k=0, k=1 (edit), y_w^{<2}, y_l^{<2}
      [[2.0, 0.0, 0.0], [0.0, 1.0, 0.5], [0.0, 0.0, 2.0], [0.0, 0.0, 1.0]]
    """
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


def _signs_right(lw, lr, chosen, rejected, lam, penalised, beta, inside, *, entrywise=False):
    """[L] (or [L, V]) bool: exact descent signs equal the source's prediction, hinge active."""
    lp_c, lp_r = pair_logprobs_from_logits(lw, lr, jnp.asarray(chosen), jnp.asarray(rejected))
    g = position_logit_gradients(
        lw, lr, chosen, rejected, lp_c + 1.0, lp_r, beta=beta, lam=lam, penalty_inside_beta=inside
    )
    pred = predicted_signs(chosen, rejected, lw.shape[1], penalised=penalised)
    same = jnp.sign(g.descent) == pred
    return same if entrywise else jnp.all(same, axis=-1)


def _rate(x):
    return float(np.mean(x)) if np.size(x) else None


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
) -> dict:
    r"""Return the sign-agreement numbers of Pal et al.'s predictions (JSON-ready dict).

    ``grid_signs_right`` ``[G, K]``: at the given state with the hinge active, whether every
    sign at each position :math:`k > m` is right for each :math:`\lambda` of ``lam_grid``. Then
    ``num_states`` states with ``N(0, state_noise^2)`` added to the :math:`y_l`-context logits
    after the edit: how often the well-optimised assumption holds per position, how often DPO's
    predicted signs (all entries; entries; the correct token lowered) hold where it holds and where
    it fails, and how often DPOP's are right at :math:`1.001\lambda^*_k` and at
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
    return {
        "lam_grid": np.asarray(lam_grid),
        "grid_signs_right": np.asarray(_grid_signs(lw, lr, jnp.asarray(lam_grid), **static))[
            :, idx
        ],
        "num_states": int(held.shape[0]),
        "num_position_checks": int(held.size),
        "assumption_rate": float(held.mean()),
        "dpo_all_signs_assumption_holds": _rate(dpo_all[held]),
        "dpo_all_signs_assumption_fails": _rate(dpo_all[~held]),
        "dpo_entries_assumption_fails": _rate(dpo[~held]),
        "dpo_correct_lowered_assumption_fails": _rate(dpo_correct[~held]),
        "dpop_right_above_threshold": _rate(above),
        "dpop_right_below_positive_threshold": _rate(below[th > 0]),
    }


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
        return well_optimised(lw, b, c, r), dpo, th, at(th * 1.001 + 1e-9), at(th * 0.999)

    return jax.vmap(one_state)(lrs)


def flow_summary(result: FlowResult, lams: ArrayLike) -> dict:
    """Return the JSON-ready numbers of a flow: per-position log-probs, changes, Prop. 2 error.

    ``prop2_max_abs_error`` excludes ``t = 0``, which sits on the hinge's kink (there autodiff
    averages the two one-sided gradients while the closed form takes the inactive side).
    """
    flow = result.observables  # EditRecord of [R, C+1, ...] arrays
    err = np.abs(np.asarray(flow.velocity) - np.asarray(flow.split.velocity))
    dpo_part = np.asarray(flow.split.dpo_part)
    scale = np.abs(dpo_part) + np.abs(np.asarray(flow.split.velocity) - dpo_part)
    lp = np.asarray(flow.logprob_chosen)  # [R, C+1, L]
    delta = lp - lp[:, :1]
    return {
        "lams": np.asarray(lams),
        "t": np.asarray(result.t),
        "logprob_chosen": lp,
        "delta_sequence": delta.sum(-1),
        "delta_final": delta[:, -1],
        "hinge_active_fraction": np.asarray(flow.hinge_active)[:, 1:].mean(-1),
        "prop2_max_abs_error": float(np.max(err[:, 1:])),
        "prop2_scale": float(np.max(scale[:, 1:])),
    }
