r"""The one gradient-flow integrator, and its preference / SFT front ends.

Gradient flow :math:`\dot\theta = -\nabla L(\theta)` is integrated by an optax optimiser inside
one ``jax.jit``: ``optax.sgd(dt)`` is the explicit Euler step of size ``dt``, so ``n`` steps reach
``t = n * dt``. ``"rmsprop_torch"`` reproduces ``torch.optim.RMSprop`` defaults (the paper's
optimiser, App. H): ``decay=0.99``, ``eps=1e-8`` added *outside* the square root, zero initial
scale; its ``t`` is ``n * lr`` but it is not gradient flow.

Steps run in a ``lax.scan`` nested in a scan over checkpoints; every ``record_every`` steps the
loss and an observable pytree are recorded (``t = 0`` included). The first step that makes the
parameters or loss non-finite is tracked in the carry; :func:`integrate` then raises
``FloatingPointError`` naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.typing import ArrayLike

from sims.models import UnconstrainedFeatures
from theory._checks import (
    check_finite,
    check_ndim,
    check_positive,
    check_positive_int,
    check_token_ids,
)
from theory.losses import PairLoss, nll_loss

OPTIMIZERS = ("sgd", "rmsprop_torch", "adam")


def make_optimizer(name: str, *, dt: float) -> optax.GradientTransformation:
    """Return the optax optimiser ``name`` with step size ``dt``.

    ``"sgd"`` is explicit Euler for gradient flow; ``"rmsprop_torch"`` matches
    ``torch.optim.RMSprop(lr=dt)`` (alpha 0.99, eps 1e-8 outside the square root); ``"adam"`` is
    ``optax.adam(dt)``.

    Raises:
      ValueError: unknown ``name`` or ``dt <= 0``.

    Example:
      >>> tx = make_optimizer("sgd", dt=0.1)
      >>> u, _ = tx.update(jnp.array([2.0]), tx.init(jnp.array([0.0])))
      >>> float(u[0])  # -dt * gradient
      -0.2
    """
    check_positive("dt", dt)
    if name == "sgd":
        return optax.sgd(dt)
    if name == "rmsprop_torch":
        return optax.rmsprop(dt, decay=0.99, eps=1e-8, eps_in_sqrt=False)
    if name == "adam":
        return optax.adam(dt)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got optimizer={name!r}")


class Trajectory(NamedTuple):
    """A recorded flow: ``C + 1`` checkpoints (``t = 0`` first).

    Attributes:
      t: ``[C + 1]`` flow time ``k * record_every * dt``.
      loss: ``[C + 1]`` loss at each checkpoint.
      observables: pytree whose leaves have leading axis ``C + 1``.
    """

    t: jax.Array
    loss: jax.Array
    observables: Any


def _all_finite(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def flow_fn(
    loss_fn: Callable[[Any, Any], jax.Array],
    observe_fn: Callable[[Any, Any], Any],
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    record_every: int,
) -> Callable[[Any, Any], tuple[Any, jax.Array, Any, jax.Array]]:
    """Return the pure ``run(params, data) -> (final_params, losses, observables, first_bad)``.

    ``losses`` and ``observables`` have ``num_steps // record_every + 1`` rows; ``first_bad`` is the
    first step (1-based) whose result was non-finite, or -1. The function is jit-, vmap- and
    shard-friendly: batch runs by ``jax.vmap`` over ``params`` and/or ``data``.
    """

    def run(params, data):
        def step(carry, _):
            params, opt_state, k, first_bad = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, data)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            finite = _all_finite(params) & jnp.isfinite(loss)
            first_bad = jnp.where((first_bad < 0) & ~finite, k + 1, first_bad)
            return (params, opt_state, k + 1, first_bad), None

        def checkpoint(carry, _):
            carry, _ = jax.lax.scan(step, carry, None, length=record_every)
            return carry, (loss_fn(carry[0], data), observe_fn(carry[0], data))

        carry0 = (params, optimizer.init(params), jnp.int32(0), jnp.int32(-1))
        carry, (losses, observables) = jax.lax.scan(
            checkpoint, carry0, None, length=num_steps // record_every
        )
        first = (loss_fn(params, data), observe_fn(params, data))
        losses = jnp.concatenate([first[0][None], losses])
        observables = jax.tree_util.tree_map(
            lambda a, b: jnp.concatenate([a[None], b]), first[1], observables
        )
        return carry[0], losses, observables, carry[3]

    return run


def _check_schedule(dt: float, num_steps: int, record_every: int) -> None:
    check_positive("dt", dt)
    check_positive_int("num_steps", num_steps)
    check_positive_int("record_every", record_every)
    if num_steps % record_every:
        raise ValueError(
            "record_every must divide num_steps, "
            f"got num_steps={num_steps}, record_every={record_every}"
        )


def integrate(
    loss_fn: Callable[[Any, Any], jax.Array],
    observe_fn: Callable[[Any, Any], Any],
    params: Any,
    data: Any = None,
    *,
    dt: float,
    num_steps: int,
    record_every: int = 1,
    optimizer: str = "sgd",
) -> tuple[Any, Trajectory]:
    r"""Integrate :math:`\dot\theta = -\nabla_\theta\,\mathrm{loss\_fn}(\theta, \mathrm{data})`.

    Source: gradient flow, Razin et al. 2024 §4.1; explicit Euler through ``optax.sgd``.

    Args:
      loss_fn: ``(params, data) -> scalar``.
      observe_fn: ``(params, data) -> pytree`` recorded at checkpoints.
      params: pytree of arrays (e.g. an ``nnx.State``).
      data: pytree passed through to ``loss_fn``/``observe_fn``.
      dt: step size (``lr``), ``> 0``.
      num_steps: number of steps, ``>= 1``.
      record_every: steps between checkpoints; must divide ``num_steps``.
      optimizer: one of :data:`OPTIMIZERS`.

    Returns:
      ``(final_params, Trajectory)``.

    Raises:
      ValueError: bad schedule, unknown optimiser, non-finite initial parameters.
      FloatingPointError: the flow produced NaN/inf; the message names the first such step and t.

    Example:
      >>> final, traj = integrate(lambda x, _: 0.5 * x**2, lambda x, _: x, jnp.array(1.0),
      ...                         dt=0.1, num_steps=2, record_every=1)
      >>> [round(float(x), 4) for x in traj.observables]  # x <- (1 - dt) x
      [1.0, 0.9, 0.81]
    """
    _check_schedule(dt, num_steps, record_every)
    tx = make_optimizer(optimizer, dt=dt)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        check_finite(f"params{jax.tree_util.keystr(path)}", leaf)
    run = jax.jit(
        flow_fn(loss_fn, observe_fn, optimizer=tx, num_steps=num_steps, record_every=record_every)
    )
    final, losses, observables, first_bad = run(params, data)
    first_bad = int(first_bad)
    if first_bad >= 0:
        raise FloatingPointError(
            f"gradient flow produced a non-finite value at step {first_bad} "
            f"(t = {first_bad * dt:g}); "
            "reduce dt or check the loss's domain"
        )
    t = dt * record_every * jnp.arange(num_steps // record_every + 1)
    return final, Trajectory(t, losses, observables)


def integrate_model(
    model: nnx.Module,
    loss_fn: Callable[[Any, Any], jax.Array],
    observe_fn: Callable[[Any, Any], Any],
    data: Any = None,
    *,
    dt: float,
    num_steps: int,
    record_every: int = 1,
    optimizer: str = "sgd",
) -> tuple[Any, Trajectory]:
    r"""Run :func:`integrate` on an NNX module's state; return ``(trained_module, Trajectory)``.

    ``loss_fn(model, data)`` and ``observe_fn(model, data)`` receive the module rebuilt from the
    flowing state (``nnx.split`` once, ``nnx.merge`` inside the compiled step), so front ends write
    their maths on the module. The input module is not modified.

    Raises:
      As :func:`integrate`.

    Example:
      >>> from sims.models import UnconstrainedFeatures
      >>> model = UnconstrainedFeatures.from_arrays(jnp.eye(2), jnp.ones((1, 2)))
      >>> _, traj = integrate_model(model, lambda m, _: jnp.sum(m.hidden[...] ** 2),
      ...                           lambda m, _: m.hidden[...][0, 0], dt=0.25, num_steps=1)
      >>> [float(x) for x in traj.observables]  # h <- h - dt * 2h
      [1.0, 0.5]
    """
    graphdef, state = nnx.split(model)
    final, traj = integrate(
        lambda s, d: loss_fn(nnx.merge(graphdef, s), d),
        lambda s, d: observe_fn(nnx.merge(graphdef, s), d),
        state,
        data,
        dt=dt,
        num_steps=num_steps,
        record_every=record_every,
        optimizer=optimizer,
    )
    return nnx.merge(graphdef, final), traj


class PreferencePairs(NamedTuple):
    """Single-token preference data for :class:`UnconstrainedFeatures` (TRL names).

    Attributes:
      prompt: ``[N]`` row of the hidden table (prefix id) of each pair.
      chosen: ``[N]`` preferred token ids :math:`y^+`.
      rejected: ``[N]`` dispreferred token ids :math:`y^-`.
      ref_logprob_chosen: ``[N]`` :math:`\\ln\\pi_{ref}(y^+|x)`.
      ref_logprob_rejected: ``[N]`` :math:`\\ln\\pi_{ref}(y^-|x)`.
    """

    prompt: jax.Array
    chosen: jax.Array
    rejected: jax.Array
    ref_logprob_chosen: jax.Array
    ref_logprob_rejected: jax.Array


def make_pairs(
    model: UnconstrainedFeatures, prompt: ArrayLike, chosen: ArrayLike, rejected: ArrayLike
) -> PreferencePairs:
    """Return :class:`PreferencePairs` with the reference log-probs taken from ``model`` now.

    Raises:
      ValueError: shapes differ, ids out of range, ``chosen == rejected`` for some pair.
    """
    prompt, chosen, rejected = (jnp.atleast_1d(jnp.asarray(a)) for a in (prompt, chosen, rejected))
    for name, arr in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        check_ndim(name, arr, 1, "[N]")
    if not prompt.shape == chosen.shape == rejected.shape:
        raise ValueError(
            "prompt, chosen and rejected must have one shape [N], got "
            f"{prompt.shape}, {chosen.shape}, {rejected.shape}"
        )
    check_token_ids("prompt", prompt, model.num_prefixes)
    check_token_ids("chosen", chosen, model.vocab_size)
    check_token_ids("rejected", rejected, model.vocab_size)
    if np.any(np.asarray(chosen) == np.asarray(rejected)):
        raise ValueError("chosen and rejected must differ in every pair (y+ != y-)")
    logprobs = model(prompt)  # [N, V]
    rows = jnp.arange(prompt.shape[0])
    return PreferencePairs(
        prompt, chosen, rejected, logprobs[rows, chosen], logprobs[rows, rejected]
    )


class PreferenceRecord(NamedTuple):
    """Observables of a preference flow at one checkpoint.

    Attributes:
      margin: ``[N]`` :math:`\\ln\\pi(y^+|x) - \\ln\\pi(y^-|x)`.
      logprobs: ``[N, V]`` :math:`\\ln\\pi(z|x)` of every token for every pair's prompt.
    """

    margin: jax.Array
    logprobs: jax.Array


def _pair_logprobs(model: UnconstrainedFeatures, pairs: PreferencePairs):
    logprobs = model(pairs.prompt)  # [N, V]
    rows = jnp.arange(pairs.prompt.shape[0])
    return logprobs, logprobs[rows, pairs.chosen], logprobs[rows, pairs.rejected]


def preference_flow(
    model: UnconstrainedFeatures,
    pairs: PreferencePairs,
    loss: PairLoss,
    *,
    dt: float,
    num_steps: int,
    record_every: int = 1,
    optimizer: str = "sgd",
) -> tuple[UnconstrainedFeatures, Trajectory]:
    r"""Run gradient flow on :math:`L = \frac1N\sum_i \ell_i` (Razin et al. 2024, Eq. 2).

    ``W`` and every hidden embedding train. The input model is not modified.

    Args:
      model: the starting model.
      pairs: :class:`PreferencePairs` (reference log-probs fixed inside).
      loss: a pair loss from :mod:`theory.losses` (e.g. ``make_loss("dpo", beta=0.1)``).
      dt, num_steps, record_every, optimizer: as in :func:`integrate`.

    Returns:
      ``(trained_model, Trajectory)`` with :class:`PreferenceRecord` observables.

    Raises:
      As :func:`integrate`.
    """

    def loss_fn(model, pairs):
        _, lp_c, lp_r = _pair_logprobs(model, pairs)
        return jnp.mean(loss(lp_c, lp_r, pairs.ref_logprob_chosen, pairs.ref_logprob_rejected))

    def observe_fn(model, pairs):
        logprobs, lp_c, lp_r = _pair_logprobs(model, pairs)
        return PreferenceRecord(lp_c - lp_r, logprobs)

    return integrate_model(
        model,
        loss_fn,
        observe_fn,
        pairs,
        dt=dt,
        num_steps=num_steps,
        record_every=record_every,
        optimizer=optimizer,
    )


def sft_flow(
    model: UnconstrainedFeatures,
    prompt: ArrayLike,
    label: ArrayLike,
    *,
    dt: float,
    num_steps: int,
    record_every: int | None = None,
    optimizer: str = "sgd",
) -> tuple[UnconstrainedFeatures, Trajectory]:
    r"""Run SFT: gradient flow on the mean cross-entropy :math:`-\frac1N\sum_i\ln\pi(y_i|x_i)`.

    Source: the SFT phase before preference learning (Razin et al. 2024, §2.1, App. H.1).
    Observables: the per-example log-prob of the label, ``[N]``.

    Raises:
      ValueError: ids out of range or shapes differ; as :func:`integrate`.
    """
    prompt, label = jnp.asarray(prompt), jnp.asarray(label)
    check_ndim("prompt", prompt, 1, "[N]")
    if label.shape != prompt.shape:
        raise ValueError(f"label must have the shape {prompt.shape} of prompt, got {label.shape}")
    check_token_ids("prompt", prompt, model.num_prefixes)
    check_token_ids("label", label, model.vocab_size)
    rows = jnp.arange(prompt.shape[0])

    def label_logprob(model, _):
        return model(prompt)[rows, label]

    return integrate_model(
        model,
        lambda m, d: jnp.mean(nll_loss(label_logprob(m, d))),
        label_logprob,
        dt=dt,
        num_steps=num_steps,
        record_every=record_every or num_steps,
        optimizer=optimizer,
    )
