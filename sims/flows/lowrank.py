r"""Exact full-parameter flow for single-token pairs, any pair loss: ``W`` as a base plus factors.

Setting: :class:`~sims.models.unconstrained.UnconstrainedFeatures` (``W`` ``[V, d]``, hidden table
``[P, d]``),
single-token pairs :math:`(x_i, y^+_i, y^-_i)` and *any* pair loss
:math:`L = \frac1N\sum_i \ell_i(\ln\pi(y^+_i|x_i), \ln\pi(y^-_i|x_i))` of :mod:`theory.losses`:
the margin class, but also an SFT term, DPOP, SimPO and weighted losses, whose gradient contains
:math:`\nabla\ln\pi` itself and moves every row of ``W`` (so :mod:`sims.flows.reduced` refuses
them).

Why it is exact. With :math:`Z_p = W h_p` the logits of a used prompt ``p`` and
:math:`g^\pm_i = \partial L/\partial\ln\pi(y^\pm_i|x_i)`, the chain rule through the
log-softmax gives

.. math:: G_p = \frac{\partial L}{\partial Z_p} = \sum_{i: x_i = p} g^+_i (e_{y^+_i} - \pi_p)
          + g^-_i (e_{y^-_i} - \pi_p),\qquad \nabla_W L = \sum_p G_p h_p^\top,\qquad
          \nabla_{h_p} L = W^\top G_p.

So one Euler step changes ``W`` by a matrix of rank :math:`\le P_u` (``P_u`` used prompts),
:math:`-dt\,G^\top H_u`, and after ``k`` steps of a window :math:`W = W_b + A^\top B` with
``A`` ``[k P_u, V]`` the stacked :math:`-dt\,G` and ``B`` ``[k P_u, d]`` the stacked :math:`H_u` --
exactly, not an approximation. A step then needs two passes over the *fixed* ``W_b`` (``W_b h``
and :math:`G^\top W_b`) and small products with the factors; ``W_b`` is never written inside a
window. Every ``fold_every`` steps (and at every checkpoint) one matrix product
:math:`W_b \leftarrow W_b + A^\top B` folds the factors in. Rows of the hidden table of prompts in
no pair get a zero gradient and never move. Round-off differs from autodiff of the full model
only in the order of sums (``tests/test_lowrank.py``: ``<= 1e-9`` relative in float64 over
1,000 steps).

Why it is fast (measured in ``docs/performance.md``). XLA's CPU code for the autodiff step copies
all of ``W`` every step (the gradient of ``h`` reads the old ``W`` while the update writes it in
place) and runs the rank-one update as a slow broadcast loop; here ``W_b`` is read-only inside a
window, the update is a matrix product every ``fold_every`` steps, and the factor slots are written
before they are read in a step (the previous step's factor is written at the start of the next),
so XLA inserts no copies.

Not covered -- refused, use :func:`sims.flows.core.preference_flow`: optimisers other than SGD
(RMSprop
and Adam scale each entry of the gradient of ``W``: the update is no longer low-rank), multi-token
responses, other model families.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sims.flows.core import FlowResult, all_finite, check_schedule, raise_on_nonfinite
from sims.models.unconstrained import PreferencePairs, PreferenceRecord, UnconstrainedFeatures
from theory.checks import check_finite, check_positive_int
from theory.losses import PairLoss, mean_pair_loss

#: Default steps per window between folds of the factors into ``W_b`` (8, 16 and 32 ran within 5%
#: of each other at ``V = 1000, d = 256``; any value is exact).
FOLD_EVERY = 16

_GENERAL_PATH = "use the general full-parameter path sims.flows.core.preference_flow"


def _pair_logit_grad(loss: PairLoss, Z: jax.Array, pairs: PreferencePairs, pos: jax.Array):
    """Return ``(L, G)``: the pair objective and its gradient ``dL/dZ`` ``[P_u, V]``."""
    lp = jax.nn.log_softmax(Z, axis=-1)
    rows = (pos, pairs.chosen), (pos, pairs.rejected)

    def objective(lp_c, lp_r):
        return mean_pair_loss(
            loss,
            lp_c,
            lp_r,
            pairs.ref_logprob_chosen,
            pairs.ref_logprob_rejected,
            weight=getattr(pairs, "weight", None),
        )

    L, (g_c, g_r) = jax.value_and_grad(objective, argnums=(0, 1))(lp[rows[0]], lp[rows[1]])
    share = jax.ops.segment_sum(g_c + g_r, pos, num_segments=Z.shape[0])  # [P_u]
    both = (jnp.concatenate([pos, pos]), jnp.concatenate([pairs.chosen, pairs.rejected]))  # [2N]
    G = (-share[:, None] * jnp.exp(lp)).at[both].add(jnp.concatenate([g_c, g_r]))
    return L, G


def preference_record(unembedding: jax.Array, hidden: jax.Array, pairs: PreferencePairs):
    """Return :class:`~sims.models.unconstrained.PreferenceRecord` of the arrays (the default
    observable).

    The same numbers as ``pairs.record(model)`` for ``model`` holding ``unembedding`` and
    ``hidden``: margins ``[N]`` and every token's log-prob ``[N, V]``.
    """
    logprobs = jax.nn.log_softmax(hidden[pairs.prompt] @ unembedding.T, axis=-1)  # [N, V]
    rows = jnp.arange(pairs.prompt.shape[-1])
    return PreferenceRecord(logprobs[rows, pairs.chosen] - logprobs[rows, pairs.rejected], logprobs)


def lowrank_flow_fn(
    loss: PairLoss,
    prompts: tuple[int, ...],
    *,
    num_steps: int,
    record_every: int,
    fold_every: int = FOLD_EVERY,
    observe_fn: Callable[[jax.Array, jax.Array, Any], Any] = preference_record,
) -> Callable[[jax.Array, jax.Array, PreferencePairs, Any], FlowResult]:
    r"""Return the pure ``run(unembedding, hidden, pairs, dt) -> FlowResult`` (SGD, exact).

    .. math:: W(t_0 + k\,dt) = W(t_0) - dt\sum_{s<k} G(s)^\top H_u(s),\qquad
              H_u \leftarrow H_u - dt\, G\,W

    As :func:`sims.flows.core.flow_fn` with ``optimizer="sgd"`` on the parameters ``(W, hidden)``:
    ``loss`` and ``observables`` at ``num_steps // record_every + 1`` checkpoints (``t = 0``
    first), ``final = (unembedding, hidden)``, ``first_nonfinite_step`` the first step whose
    loss or updated hidden rows were NaN/inf (``-1`` if none; a non-finite entry of ``W`` or of
    the logit gradient reaches the hidden rows through :math:`G W`, as ``inf * 0`` is NaN).
    ``observe_fn`` receives the exact arrays at each checkpoint (the factors are folded in there).
    jit-, vmap- and shard-safe (batch seeds, geometries or ``dt`` with ``jax.vmap``); ``prompts``
    and the schedule are static, ``pairs`` may be traced. Callers validate (see
    :func:`lowrank_preference_flow`): every ``pairs.prompt`` must be in ``prompts``.

    Source: Razin et al. 2024, Eq. 1-2 (softmax model, pair objective); the low-rank form of the
    update is derived in this module's docstring.

    Args:
      loss: any per-pair loss of :mod:`theory.losses` (e.g. ``make_loss("sft_term", ...)``).
      prompts: sorted distinct prompt rows that occur in the pairs (``P_u`` of them).
      num_steps, record_every: schedule; ``record_every`` divides ``num_steps``.
      fold_every: steps per window between folds (any value is exact; it trades the factor
        products, ``O(fold_every * P_u * (V + d))`` a step, against one pass over ``W`` a fold).
      observe_fn: ``(unembedding, hidden, pairs) -> pytree`` recorded at checkpoints.

    Example:
      >>> from theory.losses import make_loss
      >>> W, H = jnp.eye(4, 2), jnp.ones((1, 2))
      >>> pairs = PreferencePairs(jnp.array([0]), jnp.array([0]), jnp.array([1]),
      ...                         jnp.zeros(1), jnp.zeros(1))
      >>> run = lowrank_flow_fn(make_loss("sft_term", base_loss="dpo", sft_coef=1.0), (0,),
      ...                       num_steps=4, record_every=2, fold_every=3)
      >>> res = run(W, H, pairs, 0.5)
      >>> res.observables.logprobs.shape, res.final[0].shape
      ((3, 1, 4), (4, 2))
    """
    for name, value in (
        ("num_steps", num_steps),
        ("record_every", record_every),
        ("fold_every", fold_every),
    ):
        check_positive_int(name, value)
    used = np.asarray(prompts, dtype=np.int32)  # [P_u]
    P_u = used.shape[0]
    num_windows, remainder = divmod(record_every, fold_every)  # per checkpoint interval

    def run(unembedding, hidden, pairs, dt):
        pos = jnp.searchsorted(jnp.asarray(used), pairs.prompt)  # [N] row of H_u per pair
        V, d = unembedding.shape

        def window(carry, length):
            """``length`` steps from the folded ``W_b``; returns the next folded state."""
            Wb, H, k, first_bad = carry

            def step(carry, j):
                H, A, B, a_prev, k, first_bad = carry
                # factor slots are written before they are read within a step, so XLA updates
                # A and B in place without copies: slot j of B gets this step's H now (its A
                # slot is still zero), slot j - 1 of A the previous step's -dt G
                A = jax.lax.dynamic_update_slice(A, a_prev, (jnp.maximum(j - 1, 0) * P_u, 0))
                B = jax.lax.dynamic_update_slice(B, H, (j * P_u, 0))
                Z = (Wb @ H.T).T + (B @ H.T).T @ A  # [P_u, V] logits of W = W_b + A^T B
                L, G = _pair_logit_grad(loss, Z, pairs, pos)
                H_next = H - dt * (G @ Wb + (A @ G.T).T @ B)  # G W: [P_u, d]
                # a non-finite W, H or G shows in H_next = H - dt G W (inf * 0 is NaN): no pass
                # over W is needed
                finite = jnp.isfinite(L) & jnp.all(jnp.isfinite(H_next))
                first_bad = jnp.where((first_bad < 0) & ~finite, k + 1, first_bad)
                return (H_next, A, B, -dt * G, k + 1, first_bad), None

            zeros = (
                jnp.zeros((length * P_u, V), Wb.dtype),
                jnp.zeros((length * P_u, d), Wb.dtype),
                jnp.zeros((P_u, V), Wb.dtype),
            )
            (H, A, B, a_prev, k, first_bad), _ = jax.lax.scan(
                step, (H, *zeros, k, first_bad), jnp.arange(length)
            )
            A = jax.lax.dynamic_update_slice(A, a_prev, ((length - 1) * P_u, 0))  # last step
            return Wb + A.T @ B, H, k, first_bad

        def checkpoint(carry, _):
            if num_windows:
                carry, _ = jax.lax.scan(
                    lambda c, _: (window(c, fold_every), None), carry, None, length=num_windows
                )
            if remainder:
                carry = window(carry, remainder)
            Wb, H, _, _ = carry
            return carry, record(Wb, H)

        def record(Wb, H):
            full_hidden = hidden.at[used].set(H)
            Z = H @ Wb.T
            L, _ = _pair_logit_grad(loss, Z, pairs, pos)
            return L, observe_fn(Wb, full_hidden, pairs)

        H0 = hidden[used]  # [P_u, d]
        carry0 = (unembedding, H0, jnp.int32(0), jnp.int32(-1))
        (Wb, H, _, first_bad), (losses, observables) = jax.lax.scan(
            checkpoint, carry0, None, length=num_steps // record_every
        )
        first = record(unembedding, H0)
        losses = jnp.concatenate([first[0][None], losses])
        observables = jax.tree_util.tree_map(
            lambda a, b: jnp.concatenate([a[None], b]), first[1], observables
        )
        t = dt * record_every * jnp.arange(num_steps // record_every + 1)
        return FlowResult((Wb, hidden.at[used].set(H)), t, losses, observables, first_bad)

    return run


@functools.lru_cache(maxsize=64)
def _compiled(loss, prompts, num_steps, record_every, fold_every, observe_fn):
    run = lowrank_flow_fn(
        loss,
        prompts,
        num_steps=num_steps,
        record_every=record_every,
        fold_every=fold_every,
        observe_fn=observe_fn,
    )
    return jax.jit(run)


@dataclasses.dataclass(frozen=True)
class _ObserveModel:
    """``observe(model, pairs)`` as a hashable function of ``(unembedding, hidden, pairs)``."""

    graphdef: Any
    observe: Callable[[nnx.Module, Any], Any]

    def __call__(self, unembedding, hidden, pairs):
        state = nnx.State({"hidden": nnx.Param(hidden), "unembedding": nnx.Param(unembedding)})
        return self.observe(nnx.merge(self.graphdef, state), pairs)


def _default_observe(model: nnx.Module, pairs: Any) -> Any:
    return pairs.record(model)


def lowrank_preference_flow(
    model: UnconstrainedFeatures,
    pairs: PreferencePairs,
    loss: PairLoss,
    *,
    dt: float,
    num_steps: int,
    record_every: int = 1,
    optimizer: str = "sgd",
    observe: Callable[[nnx.Module, Any], Any] | None = None,
    fold_every: int = FOLD_EVERY,
) -> FlowResult:
    r"""Run :func:`sims.flows.core.preference_flow`'s flow exactly, with ``W`` as a base plus
    factors.

    .. math:: \dot W = -\sum_p G_p h_p^\top,\qquad \dot h_p = -W^\top G_p,\qquad
              G_p = \partial L/\partial (W h_p)

    Same arguments, steps, checkpoints and result as :func:`~sims.flows.core.preference_flow` with
    ``optimizer="sgd"`` (``final`` is the trained model; the default observable is
    ``pairs.record(model)``), for every pair loss of :mod:`theory.losses`, including those whose
    gradient moves all of ``W`` (SFT term, DPOP, SimPO, weighted). Compiled once per (loss, used
    prompts, schedule, ``observe``, shapes); ``dt`` is a run-time argument.

    Source: Razin et al. 2024, Eq. 1-2 and §4.1 (unconstrained features); the low-rank form of the
    Euler update is derived in this module's docstring.

    Args:
      model: the starting model (not modified).
      pairs: single-token :class:`~sims.models.unconstrained.PreferencePairs` (``[N]`` fields).
      loss: any per-pair loss from :mod:`theory.losses` (e.g. ``make_loss("dpop", lam=5.0)``).
      dt, num_steps, record_every: as in :func:`sims.flows.core.integrate`.
      optimizer: must be ``"sgd"`` (explicit Euler with step ``dt``).
      observe: ``(model, pairs) -> pytree`` recorded at checkpoints (a module-level function, to
        reuse compilations); default ``pairs.record(model)``.
      fold_every: steps between folds of the factors into ``W`` (exact for any value).

    Returns:
      :class:`~sims.flows.core.FlowResult` whose ``final`` is the trained model.

    Raises:
      ValueError: another model family or pairs type, multi-token or stacked pairs, an optimiser
        other than ``"sgd"``, invalid ids, bad schedule, non-finite parameters; the messages name
        the general path.
      FloatingPointError: the flow produced NaN/inf (names the first step and its time).

    Example:
      >>> from sims.models.unconstrained import make_pairs
      >>> from theory.losses import make_loss
      >>> model = UnconstrainedFeatures(50, 8, 2, rngs=nnx.Rngs(0), dtype=jnp.float64)
      >>> pairs = make_pairs(model, jnp.array([0, 1]), jnp.array([3, 4]), jnp.array([5, 3]))
      >>> loss = make_loss("sft_term", base_loss="dpo", sft_coef=0.5)
      >>> res = lowrank_preference_flow(model, pairs, loss, dt=0.1, num_steps=100,
      ...                               record_every=50)
      >>> res.observables.logprobs.shape, res.final.unembedding.shape  # 3 checkpoints
      ((3, 2, 50), (50, 8))
    """
    if not isinstance(model, UnconstrainedFeatures) or not isinstance(pairs, PreferencePairs):
        raise ValueError(
            "the low-rank flow covers UnconstrainedFeatures with single-token PreferencePairs, "
            f"got model {type(model).__name__} and pairs {type(pairs).__name__}; {_GENERAL_PATH}"
        )
    if optimizer != "sgd":
        raise ValueError(
            f"the low-rank flow supports optimizer='sgd' only, got optimizer={optimizer!r} "
            "(RMSprop and Adam rescale each entry of the gradient of W, so the update is not "
            f"low-rank); {_GENERAL_PATH}"
        )
    for name in ("prompt", "chosen", "rejected"):
        shape = np.shape(getattr(pairs, name))
        if len(shape) != 1:
            raise ValueError(
                f"the low-rank flow takes one set of single-token pairs: pairs.{name} must have "
                f"shape [N], got shape {shape} (multi-token responses move the hidden states of "
                f"every response prefix; for stacked runs vmap lowrank_flow_fn); {_GENERAL_PATH}"
            )
    check_schedule(dt, num_steps, record_every)
    check_positive_int("fold_every", fold_every)
    pairs.validate(model)
    for name, arr in (("model.unembedding", model.unembedding), ("model.hidden", model.hidden)):
        if not bool(all_finite(arr[...])):  # on device: NumPy's check of a large W is slow
            check_finite(name, arr[...])
    prompts = tuple(int(p) for p in np.unique(np.asarray(pairs.prompt)))
    graphdef, _ = nnx.split(model)
    observe_fn = _ObserveModel(graphdef, _default_observe if observe is None else observe)
    run = _compiled(loss, prompts, num_steps, record_every, fold_every, observe_fn)
    result = run(model.unembedding[...], model.hidden[...], pairs, float(dt))
    raise_on_nonfinite(result.first_nonfinite_step, dt=dt)
    trained = UnconstrainedFeatures.from_arrays(*result.final)
    t = dt * record_every * jnp.arange(num_steps // record_every + 1)
    return result._replace(final=trained, t=t)
