r"""Sign predictions and the smallest DPOP :math:`\lambda` for an edit-distance-1 pair.

Setting and notation as in :mod:`theory.dpop` (per-position logits :math:`\theta_k` shared by the
two contexts at a position; :math:`s^w_k`, :math:`s^l_k` the next-token distributions after
:math:`y_w^{<k}`, :math:`y_l^{<k}`; edit at position :math:`m`). The exact gradient is
:func:`theory.dpop.position_logit_gradients`; this module gives Pal et al.'s qualitative
predictions, their "well-optimised" assumption, and the per-position thresholds.

Invalid values as in :mod:`theory.dpop`: concrete ones raise; traced ones give NaN thresholds.
:func:`well_optimised` returns booleans, which cannot be NaN: for traced pairs run it under
:func:`theory.checks.checked` to have invalid ones raise.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from theory.checks import (
    all_valid,
    check_bool,
    check_positive,
    check_token_ids,
    enforce,
    guard,
    valid_positive,
)
from theory.dpop import _pair_rules, _post_edit, _validate_pair, edit_position


class LambdaThresholds(NamedTuple):
    r"""Per-position :math:`\lambda` thresholds of DPOP (hinge active), each ``[L]``.

    Attributes:
      correct: :math:`\lambda` above which the correct token's logit rises,
        :math:`(s^w_{t} - s^l_{t})/(1 - s^w_{t})` (may be negative: DPO already raises it).
      others: :math:`\lambda` above which every other logit falls,
        :math:`\max_{j\ne t} s^l_j/s^w_j - 1`.
      threshold: :math:`\lambda^*_k = \max(0, \mathrm{others}) \ge \mathrm{correct}`: for
        :math:`\lambda > \lambda^*_k` every sign at position ``k`` is right, strictly.
    """

    correct: jax.Array
    others: jax.Array
    threshold: jax.Array


def _thresholds(logits_c, logits_r, chosen, rejected, beta, inside):
    V = logits_c.shape[1]
    s_c = jax.nn.softmax(logits_c, axis=-1)  # [L, V]
    s_r = jax.nn.softmax(logits_r, axis=-1)
    rows = jnp.arange(chosen.shape[0])
    sw_t, sl_t = s_c[rows, chosen], s_r[rows, chosen]
    correct = (sw_t - sl_t) / (1.0 - sw_t)
    is_correct = jax.nn.one_hot(chosen, V, dtype=bool)  # [L, V]
    others = jnp.max(jnp.where(is_correct, -jnp.inf, s_r / s_c), axis=-1) - 1.0
    scale = 1.0 if inside else beta  # outside beta the weight is lambda / beta
    post = _post_edit(chosen, rejected)
    zero = jnp.zeros_like(correct)
    correct, others = jnp.where(post, correct, zero), jnp.where(post, others, zero)
    return LambdaThresholds(scale * correct, scale * others, scale * jnp.maximum(others, 0.0))


def lambda_thresholds(
    logits_chosen: ArrayLike,
    logits_rejected: ArrayLike,
    chosen: ArrayLike,
    rejected: ArrayLike,
    *,
    beta: float = 0.1,
    penalty_inside_beta: bool = True,
) -> LambdaThresholds:
    r"""Return the smallest :math:`\lambda` per position giving DPOP's gradient the right signs.

    .. math:: \lambda^*_k = \max\Big(0,\ \max_{j\ne t_k}\frac{s^l_{k,j}}{s^w_{k,j}} - 1\Big)
              \ \ge\ \frac{s^w_{k,t_k} - s^l_{k,t_k}}{1 - s^w_{k,t_k}}

    For :math:`k > m` with the hinge active, :math:`\lambda > \lambda^*_k` makes the correct
    token's descent entry positive and every other entry negative; at :math:`\lambda = \lambda^*_k`
    the binding entry is zero. The correct-token bound never binds: the entries sum to zero, and
    the ratio :math:`(1-s^l_t)/(1-s^w_t)` is an :math:`s^w`-weighted mean of
    :math:`s^l_j/s^w_j` over :math:`j\ne t`. At :math:`k \le m` every :math:`\lambda > 0` works
    (threshold 0). With the penalty outside :math:`\beta`, thresholds are multiplied by
    :math:`\beta`.

    Source: Pal et al. 2024, §3, DPOP case analysis ("guaranteed ... for a large enough
    :math:`\lambda`"); the explicit minimum is derived here.

    Args:
      logits_chosen, logits_rejected, chosen, rejected: as in :func:`position_logit_gradients`.
      beta: :math:`\beta > 0` (used only when ``penalty_inside_beta=False``).
      penalty_inside_beta: placement of the penalty.

    Returns:
      :class:`LambdaThresholds`, each ``[L]``.

    Raises:
      ValueError: as :func:`position_logit_gradients` (traced: all thresholds NaN instead).
      TypeError: ``penalty_inside_beta`` is not a bool.

    Example:
      >>> lw = jnp.log(jnp.array([[1.0, 1.0], [3.0, 1.0]]))  # s^w_1 = (3/4, 1/4)
      >>> lr = jnp.log(jnp.array([[1.0, 1.0], [1.0, 1.0]]))  # s^l_1 = (1/2, 1/2)
      >>> th = lambda_thresholds(lw, lr, jnp.array([0, 0]), jnp.array([1, 0]))
      >>> [round(float(x), 6) for x in th.threshold]  # k = 1: (1/2) / (1/4) - 1 = 1
      [0.0, 1.0]
    """
    _validate_pair(logits_chosen, logits_rejected, chosen, rejected)
    check_positive("beta", beta)
    check_bool("penalty_inside_beta", penalty_inside_beta)
    rules = _pair_rules(logits_chosen, logits_rejected, chosen, rejected)
    beta_valid = all_valid(valid_positive(beta))
    rules.append((beta_valid, "beta must be > 0 and finite"))
    beta = guard(beta, beta_valid)  # a scalar, its own rule: see theory.checks.guard
    thresholds = _thresholds(
        jnp.asarray(logits_chosen),
        jnp.asarray(logits_rejected),
        jnp.asarray(chosen),
        jnp.asarray(rejected),
        beta,
        penalty_inside_beta,
    )
    return enforce(thresholds, rules)


def well_optimised(
    logits_chosen: ArrayLike, logits_rejected: ArrayLike, chosen: ArrayLike, rejected: ArrayLike
) -> jax.Array:
    r"""Return ``[L]`` bool: the source's "well-optimised" assumption holds at position ``k``.

    .. math:: s^w_{k,t_k} \ge s^l_{k,t_k}\quad\text{and}\quad s^w_{k,j} \le s^l_{k,j}\ (j\ne t_k)

    Source: Pal et al. 2024, §3 ("as we typically run DPO after SFT ..."). It holds trivially
    (with equality) at :math:`k \le m`, where the contexts coincide.

    Raises:
      ValueError: as :func:`position_logit_gradients`. A boolean result cannot be NaN: traced
        invalid pairs give booleans; :func:`theory.checks.checked` makes them raise.

    Example:
      >>> lw = jnp.array([[0.0, 0.0], [2.0, 0.0]]); lr = jnp.zeros((2, 2))
      >>> well_optimised(lw, lr, jnp.array([0, 0]), jnp.array([1, 0])).tolist()
      [True, True]
    """
    _validate_pair(logits_chosen, logits_rejected, chosen, rejected)
    rules = _pair_rules(logits_chosen, logits_rejected, chosen, rejected)
    s_c = jax.nn.softmax(jnp.asarray(logits_chosen), axis=-1)
    s_r = jax.nn.softmax(jnp.asarray(logits_rejected), axis=-1)
    is_correct = jax.nn.one_hot(jnp.asarray(chosen), s_c.shape[1], dtype=bool)
    ok = jnp.where(is_correct, s_c >= s_r, s_c <= s_r)
    # booleans cannot carry NaN: the rules only reach checkify (theory.checks.checked)
    return enforce(jnp.all(ok, axis=-1), rules)


def predicted_signs(
    chosen: ArrayLike, rejected: ArrayLike, vocab_size: int, *, penalised: bool
) -> jax.Array:
    r"""Return the source's predicted signs of :math:`-\partial L/\partial\theta_k`, ``[L, V]`` int.

    For :math:`k > m`: DPO (``penalised=False``) lowers the correct token (``-1``) and raises
    the others (``+1``); DPOP with an active hinge and :math:`\lambda > \lambda^*_k`
    (``penalised=True``) does the reverse. Positions :math:`k \le m` get ``0`` (no prediction).

    Source: Pal et al. 2024, §3 (DPO: "decreasing in the correct logit dimension and increasing
    in the wrong logit dimensions"; DPOP: "guaranteed to be positive ... negative").

    Raises:
      ValueError: as :func:`edit_position` (the ids must be concrete); ``vocab_size`` below 2 or
        ids out of range.
      TypeError: ``penalised`` is not a bool.

    Example:
      >>> predicted_signs(jnp.array([0, 0]), jnp.array([1, 0]), 3, penalised=False).tolist()
      [[0, 0, 0], [-1, 1, 1]]
    """
    edit_position(chosen, rejected)
    check_bool("penalised", penalised)
    if (
        isinstance(vocab_size, bool)
        or not isinstance(vocab_size, int | np.integer)
        or vocab_size < 2
    ):
        raise ValueError(f"vocab_size must be an integer >= 2, got vocab_size={vocab_size!r}")
    check_token_ids("chosen", chosen, vocab_size)
    check_token_ids("rejected", rejected, vocab_size)
    chosen, rejected = jnp.asarray(chosen), jnp.asarray(rejected)
    sign = jnp.where(jax.nn.one_hot(chosen, vocab_size, dtype=bool), -1, 1)  # DPO pattern
    sign = -sign if penalised else sign
    return jnp.where(_post_edit(chosen, rejected)[:, None], sign, 0)
