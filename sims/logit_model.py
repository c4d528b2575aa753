r"""Edit-distance-1 preference pairs in two models, and the DPO / DPOP flows on them.

* :class:`PositionLogits`: the per-position logit model of Pal et al. 2024 §3: the logits in
  prefix :math:`p` at position :math:`k` are ``context_logits[p] + position_logits[k]``; the
  position logits :math:`\theta_k` (the source's "logits :math:`\theta_j`") are shared by the
  two contexts at a position. ``trainable="position"`` (default) trains only them, the source's
  setting; ``trainable="context"`` trains only the context logits (one free vector per context).
* :class:`sims.models.UnconstrainedFeatures` with one hidden row per distinct prefix.

:func:`edit_pair_prefixes` gives each distinct prefix of the two sequences its own row: prefixes
up to the edit are shared, later ones come in pairs. (A general prefix tree is out of scope here.)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from sims.flow import flow_fn, make_optimizer
from theory._checks import check_finite, check_ndim, check_positive, check_positive_int
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


class EditFlow(NamedTuple):
    r"""A recorded DPO/DPOP flow on one pair, for every :math:`\lambda` of a sweep.

    Attributes:
      t: ``[C+1]`` flow time.
      logprob_chosen: ``[R, C+1, L]`` :math:`\ln\pi(t_k|y_w^{<k})`.
      logprob_rejected: ``[R, C+1, L]`` :math:`\ln\pi(t'_k|y_l^{<k})`.
      hinge_active: ``[R, C+1]``.
      velocity: ``[R, C+1]`` :math:`\frac{d}{dt}\ln\pi(y_w)` by ``jax.jvp`` along :math:`-\nabla L`.
      split: :class:`theory.dpop.WeightedSplit` of ``[R, C+1]`` arrays (Proposition 2).
    """

    t: jax.Array
    logprob_chosen: jax.Array
    logprob_rejected: jax.Array
    hinge_active: jax.Array
    velocity: jax.Array
    split: Any


def _tree_dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


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
) -> EditFlow:
    r"""Run gradient flow on :func:`theory.losses.dpop_loss` for every ``lam`` (vmapped).

    :math:`\pi_{\mathrm{ref}}` is ``model`` at :math:`t = 0`; ``lam = 0`` is DPO. Every
    ``nnx.Param`` of ``model`` trains (explicit Euler, ``optax.sgd(dt)``).

    Source: Pal et al. 2024, Eq. 3; Razin et al. 2024, Proposition 2 (recorded split).

    Raises:
      ValueError: bad schedule, ``lams`` not 1-D or negative, ``beta <= 0``.
      FloatingPointError: a run became non-finite.
    """
    check_ndim("lams", lams, 1, "[R]")
    check_positive("beta", beta)
    if np.any(np.asarray(lams) < 0):
        raise ValueError(f"lams must be >= 0, got lams={np.asarray(lams).tolist()}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    c_tok, r_tok = jnp.asarray(chosen), jnp.asarray(rejected)
    rows_c, rows_r = jnp.asarray(prefixes.chosen), jnp.asarray(prefixes.rejected)
    pos = jnp.arange(c_tok.shape[0])

    def per_position(p):
        m = nnx.merge(graphdef, p, rest)
        return m(rows_c)[pos, c_tok], m(rows_r)[pos, r_tok]  # [L], [L]

    ref_c, ref_r = (jnp.sum(x) for x in per_position(params))

    def lp_chosen(p):
        return jnp.sum(per_position(p)[0])

    def loss_fn(p, lam):
        lp_c, lp_r = (jnp.sum(x) for x in per_position(p))
        return dpop_loss(
            lp_c, lp_r, ref_c, ref_r, beta=beta, lam=lam, penalty_inside_beta=penalty_inside_beta
        )

    def observe_fn(p, lam):
        pc, pr = per_position(p)
        g_c = jax.grad(lp_chosen)(p)
        g_r = jax.grad(lambda q: jnp.sum(per_position(q)[1]))(p)
        down = jax.tree.map(jnp.negative, jax.grad(loss_fn)(p, lam))
        velocity = jax.jvp(lp_chosen, (p,), (down,))[1]
        coef = dpop_coefficients(
            jnp.sum(pc),
            jnp.sum(pr),
            ref_c,
            ref_r,
            beta=beta,
            lam=lam,
            penalty_inside_beta=penalty_inside_beta,
        )
        split = weighted_split(
            coef.coef_chosen, coef.coef_rejected, _tree_dot(g_c, g_c), _tree_dot(g_c, g_r)
        )
        return pc, pr, coef.hinge_active, velocity, split

    if num_steps % record_every:
        raise ValueError(f"record_every must divide num_steps, got {num_steps}, {record_every}")
    run = flow_fn(
        loss_fn,
        observe_fn,
        optimizer=make_optimizer("sgd", dt=dt),
        num_steps=num_steps,
        record_every=record_every,
    )
    lams = jnp.asarray(lams, dtype=ref_c.dtype)
    _, _, obs, first_bad = jax.jit(jax.vmap(run, in_axes=(None, 0)))(params, lams)
    if np.any(np.asarray(first_bad) >= 0):
        raise FloatingPointError(f"a flow became non-finite at steps {np.asarray(first_bad)}")
    t = dt * record_every * jnp.arange(num_steps // record_every + 1)
    return EditFlow(t, *obs)
