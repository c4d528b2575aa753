r"""Edit-distance-1 preference pairs in two models, and the DPO / DPOP flows on them.

* :class:`PositionLogits`: the per-position logit model of Pal et al. 2024 §3: the logits in
  prefix :math:`p` at position :math:`k` are ``context_logits[p] + position_logits[k]``; the
  position logits :math:`\theta_k` (the source's "logits :math:`\theta_j`") are shared by the
  two contexts at a position. ``trainable="position"`` (default) trains only them, the source's
  setting; ``trainable="context"`` trains only the context logits (one free vector per context).
* :class:`sims.models.unconstrained.UnconstrainedFeatures` with one hidden row per distinct prefix.

:func:`edit_pair_prefixes` gives each distinct prefix of the two sequences its own row: prefixes
up to the edit are shared, later ones come in pairs. (A general prefix tree is out of scope here.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from sims.flows.core import Flow, check_schedule, integrate_model
from theory.checks import check_finite, check_ndim, check_positive, check_positive_int
from theory.dpop import dpop_coefficients, edit_position, weighted_split
from theory.losses import dpop_loss


class FrozenLogits(nnx.Variable):
    """Logits that gradient flow does not move (not an ``nnx.Param``)."""


class PositionIndex(nnx.Variable):
    """Integer position of each prefix row (constant)."""


class PositionLogits(nnx.Module):
    r"""Next-token model :math:`\pi(\cdot|p) = \mathrm{softmax}(b_p + \theta_{k(p)})`.

    Source: Pal et al. 2024, §3 (gradients restricted to the logits :math:`\theta_j`).

    Args:
      context_logits: ``[P, V]`` offsets :math:`b_p`, one per prefix row.
      prefix_position: ``[P]`` integer position :math:`k(p)` of each prefix, in ``[0, L)``.
      num_positions: ``L``.
      trainable: ``"position"`` (train :math:`\theta`, the default) or ``"context"`` (train
        :math:`b`; one free logit vector per context, untied across contexts).

    Raises:
      ValueError: bad shapes, positions out of range, unknown ``trainable``.

    Example:
      >>> model = PositionLogits(jnp.zeros((3, 4)), jnp.array([0, 1, 1]), 2)
      >>> model(jnp.array([0, 2])).shape
      (2, 4)
    """

    def __init__(
        self,
        context_logits: ArrayLike,
        prefix_position: ArrayLike,
        num_positions: int,
        *,
        trainable: str = "position",
    ):
        if trainable not in ("position", "context"):
            raise ValueError(
                f"trainable must be 'position' or 'context', got trainable={trainable!r}"
            )
        check_ndim("context_logits", context_logits, 2, "[P, V]")
        check_ndim("prefix_position", prefix_position, 1, "[P]")
        check_positive_int("num_positions", num_positions)
        check_finite("context_logits", context_logits)
        P, V = np.shape(context_logits)
        pos = np.asarray(prefix_position)
        if pos.shape != (P,) or np.any(pos < 0) or np.any(pos >= num_positions):
            raise ValueError(
                f"prefix_position must be [P]=({P},) ids in [0, {num_positions}), "
                f"got {pos.tolist()}"
            )
        logits = jnp.array(context_logits)
        theta = jnp.zeros((num_positions, V), logits.dtype)
        if trainable == "position":
            self.context_logits, self.position_logits = FrozenLogits(logits), nnx.Param(theta)
        else:
            self.context_logits, self.position_logits = nnx.Param(logits), FrozenLogits(theta)
        self.prefix_position = PositionIndex(jnp.asarray(pos))

    def logits(self, prefix_ids: jax.Array) -> jax.Array:
        """Return logits ``prefix_ids.shape + (V,)``."""
        pos = self.prefix_position[...][prefix_ids]
        return self.context_logits[...][prefix_ids] + self.position_logits[...][pos]

    def __call__(self, prefix_ids: jax.Array) -> jax.Array:
        """Return next-token log-probs, shape ``prefix_ids.shape + (V,)``."""
        return jax.nn.log_softmax(self.logits(prefix_ids), axis=-1)


class EditPrefixes(NamedTuple):
    """Prefix rows of an edit-distance-1 pair.

    Attributes:
      chosen: ``[L]`` row of :math:`y_w^{<k}`; rejected: ``[L]`` row of :math:`y_l^{<k}`;
      position: ``[P]`` position of each row; edit: ``m``.
    """

    chosen: np.ndarray
    rejected: np.ndarray
    position: np.ndarray
    edit: int


def edit_pair_prefixes(chosen: ArrayLike, rejected: ArrayLike) -> EditPrefixes:
    """Return the prefix rows: ``0..m`` shared, then one row each for ``y_w^{<k}``, ``y_l^{<k}``.

    ``P = 2 L - m - 1`` rows.

    Raises:
      ValueError: as :func:`theory.dpop.edit_position`.

    Example:
      >>> e = edit_pair_prefixes(jnp.array([1, 2, 3]), jnp.array([1, 0, 3]))
      >>> e.chosen.tolist(), e.rejected.tolist(), e.position.tolist()
      ([0, 1, 2], [0, 1, 3], [0, 1, 2, 2])
    """
    m = edit_position(chosen, rejected)
    L = np.shape(chosen)[0]
    k = np.arange(L)
    post = k - m - 1  # index among positions after the edit
    row_c = np.where(k <= m, k, m + 1 + 2 * post)
    row_r = np.where(k <= m, k, m + 2 + 2 * post)
    position = np.concatenate([np.arange(m + 1), np.repeat(np.arange(m + 1, L), 2)])
    return EditPrefixes(row_c, row_r, position, m)


class EditRecord(NamedTuple):
    r"""Observables of a DPO/DPOP flow on one edit-distance-1 pair at one checkpoint.

    Attributes:
      logprob_chosen: ``[L]`` :math:`\ln\pi(t_k|y_w^{<k})`.
      logprob_rejected: ``[L]`` :math:`\ln\pi(t'_k|y_l^{<k})`.
      hinge_active: scalar bool, DPOP's penalty is active.
      velocity: :math:`\frac{d}{dt}\ln\pi(y_w)` by ``jax.jvp`` along :math:`-\nabla L`.
      split: :class:`theory.dpop.WeightedSplit` (Proposition 2).
    """

    logprob_chosen: jax.Array
    logprob_rejected: jax.Array
    hinge_active: jax.Array
    velocity: jax.Array
    split: Any


class EditPairData(NamedTuple):
    """Arrays of :func:`edit_pair_flow`'s objective: pair, prefix rows, reference, ``lam``,
    ``beta`` (a run-time value: a new ``beta`` reuses the compiled flow)."""

    chosen: jax.Array
    rejected: jax.Array
    rows_chosen: jax.Array
    rows_rejected: jax.Array
    ref_chosen: jax.Array
    ref_rejected: jax.Array
    lam: jax.Array
    beta: jax.Array


def _tree_dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _per_position(model: nnx.Module, data: EditPairData):
    """Per-position log-probs ``[L]`` of the chosen and rejected tokens."""
    pos = jnp.arange(data.chosen.shape[0])
    lp_c = jax.nn.log_softmax(model.logits(data.rows_chosen), axis=-1)[pos, data.chosen]
    lp_r = jax.nn.log_softmax(model.logits(data.rows_rejected), axis=-1)[pos, data.rejected]
    return lp_c, lp_r


@dataclasses.dataclass(frozen=True)
class _DPOPObjective:
    """DPOP loss of one edit pair as ``(model, data) -> scalar`` (``beta`` and ``lam`` from the
    data: only the penalty's placement keys the compile cache)."""

    penalty_inside_beta: bool

    def __call__(self, model: nnx.Module, data: EditPairData) -> jax.Array:
        lp_c, lp_r = (jnp.sum(x) for x in _per_position(model, data))
        return dpop_loss(
            lp_c,
            lp_r,
            data.ref_chosen,
            data.ref_rejected,
            beta=data.beta,
            lam=data.lam,
            penalty_inside_beta=self.penalty_inside_beta,
        )


@dataclasses.dataclass(frozen=True)
class _DPOPRecord:
    """The observables of :class:`_DPOPObjective`'s flow (hashable by value: a bound method would
    compare its instance by identity and defeat the compile cache)."""

    objective: _DPOPObjective

    def __call__(self, model: nnx.Module, data: EditPairData) -> EditRecord:
        beta, inside = data.beta, self.objective.penalty_inside_beta
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def chosen_lp(p):
            return jnp.sum(_per_position(nnx.merge(graphdef, p, rest), data)[0])

        def rejected_lp(p):
            return jnp.sum(_per_position(nnx.merge(graphdef, p, rest), data)[1])

        pc, pr = _per_position(model, data)
        g_c, g_r = jax.grad(chosen_lp)(params), jax.grad(rejected_lp)(params)
        down = jax.grad(lambda p: -self.objective(nnx.merge(graphdef, p, rest), data))(params)
        velocity = jax.jvp(chosen_lp, (params,), (down,))[1]
        coef = dpop_coefficients(
            jnp.sum(pc),
            jnp.sum(pr),
            data.ref_chosen,
            data.ref_rejected,
            beta=beta,
            lam=data.lam,
            penalty_inside_beta=inside,
        )
        split = weighted_split(
            coef.coef_chosen, coef.coef_rejected, _tree_dot(g_c, g_c), _tree_dot(g_c, g_r)
        )
        return EditRecord(pc, pr, coef.hinge_active, velocity, split)


def edit_pair_flow(
    model: nnx.Module,
    chosen: ArrayLike,
    rejected: ArrayLike,
    prefixes: EditPrefixes,
    lams: ArrayLike,
    *,
    beta: float,
    dt: float,
    num_steps: int,
    record_every: int,
    penalty_inside_beta: bool = True,
) -> Flow:
    r"""Return the :class:`~sims.flows.core.Flow` on :func:`theory.losses.dpop_loss`, one run per
    ``lam`` (vmapped); ``.run()`` executes it.

    :math:`\pi_{\mathrm{ref}}` is ``model`` at :math:`t = 0`; ``lam = 0`` is DPO. Every
    ``nnx.Param`` of ``model`` trains (explicit Euler, ``optax.sgd(dt)``). ``model`` is
    :class:`PositionLogits` or :class:`sims.models.unconstrained.UnconstrainedFeatures` (anything
    with
    ``logits(prefix_ids)``).

    Source: Pal et al. 2024, Eq. 3; Razin et al. 2024, Proposition 2 (recorded split).

    Returns:
      :class:`~sims.flows.core.Flow` whose result has a leading ``[R]`` run axis (one run per
      ``lam``); observables are :class:`EditRecord`.

    Raises:
      ValueError: bad schedule, ``lams`` not 1-D or negative, ``beta <= 0``.
      FloatingPointError: a run became non-finite (names the run, step and t).
    """
    check_ndim("lams", lams, 1, "[R]")
    check_positive("beta", beta)
    check_schedule(dt, num_steps, record_every)
    if np.any(np.asarray(lams) < 0):
        raise ValueError(f"lams must be >= 0, got lams={np.asarray(lams).tolist()}")
    c_tok, r_tok = jnp.asarray(chosen), jnp.asarray(rejected)
    rows_c, rows_r = jnp.asarray(prefixes.chosen), jnp.asarray(prefixes.rejected)
    probe = EditPairData(c_tok, r_tok, rows_c, rows_r, 0.0, 0.0, 0.0, 0.0)
    ref_c, ref_r = (jnp.sum(x) for x in _per_position(model, probe))
    data = probe._replace(
        ref_chosen=ref_c,
        ref_rejected=ref_r,
        lam=jnp.asarray(lams, dtype=ref_c.dtype),
        beta=jnp.asarray(beta, dtype=ref_c.dtype),
    )
    objective = _DPOPObjective(bool(penalty_inside_beta))
    return integrate_model(
        model,
        objective,
        _DPOPRecord(objective),
        data,
        dt=dt,
        num_steps=num_steps,
        record_every=record_every,
        in_axes=(None, EditPairData(None, None, None, None, None, None, 0, None)),
    )
