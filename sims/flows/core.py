r"""The one gradient-flow integrator: a prepared :class:`Flow`, one result type, one failure path.

Gradient flow :math:`\dot\theta = -\nabla L(\theta)` is integrated by an optax optimiser inside
one compiled core: ``optimizer="sgd"`` is the explicit Euler step of size ``dt``, so ``n`` steps
reach ``t = n * dt``. ``"rmsprop_torch"`` reproduces ``torch.optim.RMSprop`` defaults (the paper's
optimiser, App. H): ``decay=0.99``, ``eps=1e-8`` added *outside* the square root, zero initial
scale; its ``t`` is ``n * lr`` but it is not gradient flow. An optimiser is always named by a string
of :data:`OPTIMIZERS`.

**State each run once.** Every front end (:func:`integrate`, :func:`integrate_model`,
:func:`preference_flow`, :func:`sft_flow`, ...) returns a prepared :class:`Flow`, as
``jax.jit(f)`` returns a staged function: ``flow.run()`` validates and executes it and returns a
:class:`FlowResult`; ``flow.lower()`` / ``flow.compile()`` give the ahead-of-time program it runs
(``flow.memory()`` its XLA memory analysis) without running it, also on abstract inputs
(``nnx.eval_shape`` models, ``jax.ShapeDtypeStruct`` data). There is no second description of a
run's shapes: a memory estimate is the run's own program.

**Compile once.** The compiled core advances a run by one *chunk* of :data:`CHUNK_RECORDS`
checkpoints, each after a run-time number of steps, and is keyed only by structure: the loss
family and the observable (hashable objects), the optimiser family, the batching and the chunk
size. Everything numeric is a run-time argument: ``dt`` (the learning rate), the loss's
hyperparameters (``beta``, ``tau``, ``lam``, ... through :meth:`theory.losses.BoundLoss.numbers`),
``num_steps`` and ``record_every``. So a sweep over ``beta``, ``dt`` or the run length compiles
once per shapes. Long runs print their progress (steps done, steps/s, time left) every
:data:`PROGRESS_SECONDS`, and a non-finite step stops the run at the end of its chunk.

Layers, from the bottom:

* :func:`flow_fn` -- the pure ``run(params, data, dt) -> FlowResult`` of a fixed schedule (steps in
  a ``lax.scan``), for callers that batch or shard whole runs themselves (:mod:`sims.flows.sweep`,
  :mod:`sims.flows.reduced`, :mod:`sims.flows.lowrank`).
* :class:`Flow` -- the prepared, chunked, compile-once flow of every front end.
* :func:`raise_on_nonfinite` -- the one failure path of the package.

Every integrator returns a :class:`FlowResult`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from theory.checks import (
    check_finite,
    check_ndim,
    check_positive,
    check_positive_int,
    check_token_ids,
)
from theory.losses import BoundLoss, PairLoss, mean_pair_loss, nll_loss

#: Optimiser names accepted everywhere (``optimizer=...``); see :func:`make_optimizer`.
OPTIMIZERS = ("sgd", "rmsprop_torch", "adam")
#: torch.optim.RMSprop defaults (the paper's optimiser, App. H): decay ``alpha`` and ``eps``
#: (added outside the square root).
RMSPROP_TORCH = {"decay": 0.99, "eps": 1e-8}
#: Checkpoints per compiled chunk: a run of any length is a loop of chunks of this many
#: checkpoints (the last one padded), so ``num_steps`` never recompiles.
CHUNK_RECORDS = 16
#: Seconds between progress lines of a long run.
PROGRESS_SECONDS = 30.0


def check_optimizer(optimizer: str) -> None:
    """Raise ``ValueError`` unless ``optimizer`` is a name of :data:`OPTIMIZERS`."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got optimizer={optimizer!r}")


def make_optimizer(name: str, *, dt: float | jax.Array) -> optax.GradientTransformation:
    """Return the optax optimiser ``name`` with step size ``dt`` (a float, or traced in a flow).

    ``"sgd"`` is explicit Euler for gradient flow; ``"rmsprop_torch"`` matches
    ``torch.optim.RMSprop(lr=dt)`` (:data:`RMSPROP_TORCH`: alpha 0.99, eps 1e-8 outside the
    square root); ``"adam"`` is ``optax.adam(dt)``.

    Raises:
      ValueError: unknown ``name`` or a concrete ``dt <= 0``.

    Example:
      >>> tx = make_optimizer("sgd", dt=0.1)
      >>> u, _ = tx.update(jnp.array([2.0]), tx.init(jnp.array([0.0])))
      >>> float(u[0])  # -dt * gradient
      -0.2
    """
    check_optimizer(name)
    check_positive("dt", dt)
    if name == "sgd":
        return optax.sgd(dt)
    if name == "rmsprop_torch":
        return optax.rmsprop(dt, eps_in_sqrt=False, **RMSPROP_TORCH)
    return optax.adam(dt)


class FlowResult(NamedTuple):
    """A recorded flow: ``C + 1`` checkpoints (``t = 0`` first). Every integrator returns one.

    Attributes:
      final: the parameters after the last step (a pytree; from a front end, the trained model
        or, for :func:`sims.flows.reduced.reduced_preference_flow`, the
        :class:`~sims.flows.reduced.MovingRows`).
      t: ``[C + 1]`` flow time ``k * record_every * dt``.
      loss: ``[..., C + 1]`` loss at each checkpoint (a leading run axis for stacked runs).
      observables: pytree whose leaves have the checkpoint axis after any run axis.
      first_nonfinite_step: ``[...]`` int, the first step (1-based) whose parameters or loss were
        NaN/inf, or -1; all -1 once :func:`raise_on_nonfinite` has passed.
    """

    final: Any
    t: Any
    loss: Any
    observables: Any
    first_nonfinite_step: Any


def raise_on_nonfinite(
    first_nonfinite_step: Any, *, dt: float, what: str = "gradient flow"
) -> None:
    """Raise ``FloatingPointError`` if any run's ``first_nonfinite_step`` is ``>= 0``.

    The one failure path of the package's flows: the message names the step, its time ``t`` and,
    for stacked runs (``[R]`` or any shape), which runs.

    Raises:
      FloatingPointError: a run produced NaN/inf.

    Example:
      >>> raise_on_nonfinite(np.array([-1, 7, -1]), dt=0.5)
      Traceback (most recent call last):
        ...
      FloatingPointError: gradient flow produced a non-finite value in 1 of 3 runs; first: run ...
    """
    steps = np.asarray(first_nonfinite_step)
    hint = "reduce dt or check the loss's domain"
    if steps.ndim == 0:
        if steps >= 0:
            raise FloatingPointError(
                f"{what} produced a non-finite value at step {int(steps)} "
                f"(t = {int(steps) * dt:g}); {hint}"
            )
        return
    bad = np.argwhere(steps >= 0)
    if bad.size:
        run = tuple(int(i) for i in bad[0])
        step = int(steps[run])
        raise FloatingPointError(
            f"{what} produced a non-finite value in {bad.shape[0]} of {steps.size} runs; "
            f"first: run {run} at step {step} (t = {step * dt:g}); {hint}"
        )


def _all_finite(tree) -> jax.Array:
    # isfinite(sum(x * 0)) is all(isfinite(x)) (NaN * 0 and inf * 0 are NaN; a NaN makes the sum
    # NaN) in one pass that XLA's CPU backend vectorises: 3x faster than jnp.all(jnp.isfinite(x))
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.isfinite(jnp.sum(x * 0)) for x in leaves]))


#: :func:`_all_finite` compiled: checks large arrays on their device before a flow starts (NumPy's
#: check of a 2 GB ``W`` takes seconds; measured 0.32 s here against 1.04 s for ``jnp.isfinite``).
all_finite = jax.jit(_all_finite)


def _step_fn(objective, optimizer: str):
    """One optimiser step ``(carry, data, hyper) -> carry`` of ``objective(params, data, hyper)``,
    tracking the first non-finite step; shared by :func:`flow_fn` and :class:`Flow`."""

    def step(carry, data, hyper):
        params, opt_state, k, first_bad = carry
        tx = make_optimizer(optimizer, dt=hyper["dt"])
        loss, grads = jax.value_and_grad(objective)(params, data, {**hyper, "step": k})
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        finite = _all_finite(params) & jnp.isfinite(loss)
        first_bad = jnp.where((first_bad < 0) & ~finite, k + 1, first_bad)
        return params, opt_state, k + 1, first_bad

    return step


@dataclasses.dataclass(frozen=True)
class _NoHyper:
    """``fn(params, data)`` as an objective/observable of ``(params, data, hyper)`` (hashable)."""

    fn: Callable[[Any, Any], Any]

    def __call__(self, params, data, hyper=None):
        return self.fn(params, data)


def flow_fn(
    loss_fn: Callable[[Any, Any], jax.Array],
    observe_fn: Callable[[Any, Any], Any],
    *,
    optimizer: str,
    num_steps: int,
    record_every: int,
) -> Callable[[Any, Any, Any], FlowResult]:
    """Return the pure ``run(params, data, dt) -> FlowResult`` of a fixed schedule.

    ``loss`` and ``observables`` have ``num_steps // record_every + 1`` rows (``t = 0`` first);
    ``first_nonfinite_step`` is the first step (1-based) whose parameters or loss were non-finite,
    or -1. jit-, vmap- and shard-friendly: batch runs by ``jax.vmap`` over ``params``, ``data``
    and/or ``dt``. For whole runs that callers batch or shard themselves (sweeps); front ends use
    :class:`Flow`. Callers validate.

    Example:
      >>> run = flow_fn(lambda x, _: 0.5 * x**2, lambda x, _: x, optimizer="sgd", num_steps=2,
      ...               record_every=1)
      >>> [float(x) for x in run(jnp.array(1.0), None, 0.5).observables]  # x <- (1 - dt) x
      [1.0, 0.5, 0.25]
    """
    check_optimizer(optimizer)
    step = _step_fn(_NoHyper(loss_fn), optimizer)

    def run(params, data, dt):
        hyper = {"dt": dt}

        def checkpoint(carry, _):
            carry = jax.lax.fori_loop(0, record_every, lambda _, c: step(c, data, hyper), carry)
            return carry, (loss_fn(carry[0], data), observe_fn(carry[0], data))

        tx = make_optimizer(optimizer, dt=dt)
        carry0 = (params, tx.init(params), jnp.int32(0), jnp.int32(-1))
        carry, (losses, observables) = jax.lax.scan(
            checkpoint, carry0, None, length=num_steps // record_every
        )
        first = (loss_fn(params, data), observe_fn(params, data))
        losses = jnp.concatenate([first[0][None], losses])
        observables = jax.tree_util.tree_map(
            lambda a, b: jnp.concatenate([a[None], b]), first[1], observables
        )
        t = dt * record_every * jnp.arange(num_steps // record_every + 1)
        return FlowResult(carry[0], t, losses, observables, carry[3])

    return run


def check_schedule(dt: float, num_steps: int, record_every: int) -> None:
    """Raise ``ValueError`` unless ``dt > 0``, ``num_steps >= 1`` and ``record_every`` divides it.

    Example:
      >>> check_schedule(0.1, 10, 3)
      Traceback (most recent call last):
        ...
      ValueError: record_every must divide num_steps, got num_steps=10, record_every=3
    """
    check_positive("dt", dt)
    check_positive_int("num_steps", num_steps)
    check_positive_int("record_every", record_every)
    if num_steps % record_every:
        raise ValueError(
            "record_every must divide num_steps, "
            f"got num_steps={num_steps}, record_every={record_every}"
        )


# --- the prepared flow -------------------------------------------------------------------------

_MEMORY_REPORTS: list[Callable[[str], None]] = []


@contextlib.contextmanager
def report_memory(printer: Callable[[str], None] = print) -> Iterator[None]:
    """Within the block, every :meth:`Flow.run` prints its compiled program's memory first.

    ``experiment_main`` wraps ``--scale`` runs in it: the estimate is of the very program each
    run then executes (XLA's memory analysis of the compiled chunk, before any step runs).
    """
    _MEMORY_REPORTS.append(printer)
    try:
        yield
    finally:
        _MEMORY_REPORTS.pop()


class MemoryEstimate(NamedTuple):
    """XLA's memory analysis of a compiled program, in bytes.

    Attributes:
      arguments: argument buffers (parameters, optimiser state, data).
      outputs: output buffers not aliased to donated arguments.
      temporaries: scratch (gradients as produced, activations).
      peak: ``arguments + outputs + temporaries`` (an upper bound on device memory in use).
    """

    arguments: int
    outputs: int
    temporaries: int
    peak: int

    def describe(self) -> str:
        """One line in GiB."""
        g = 2.0**30
        return (
            f"peak {self.peak / g:.2f} GiB (arguments {self.arguments / g:.2f}, temporaries "
            f"{self.temporaries / g:.2f}, outputs {self.outputs / g:.2f})"
        )


def memory_estimate(compiled: jax.stages.Compiled) -> MemoryEstimate:
    """Return the :class:`MemoryEstimate` of a compiled program (``jit(f).lower(...).compile()``).

    Example:
      >>> c = jax.jit(lambda x: x * 2).lower(jax.ShapeDtypeStruct((256,), jnp.float32)).compile()
      >>> memory_estimate(c).arguments  # one float32 [256]
      1024
    """
    mem = compiled.memory_analysis()
    args, temps = int(mem.argument_size_in_bytes), int(mem.temp_size_in_bytes)
    outs = int(mem.output_size_in_bytes) - int(mem.alias_size_in_bytes)
    return MemoryEstimate(args, outs, temps, args + outs + temps)


def _abstract(tree):
    return jax.tree_util.tree_map(
        lambda a: (
            a
            if isinstance(a, jax.ShapeDtypeStruct)
            else jax.ShapeDtypeStruct(
                np.shape(a), jnp.result_type(a), sharding=getattr(a, "sharding", None)
            )
        ),
        tree,
    )


@functools.lru_cache(maxsize=256)
def _cores(objective, observe, optimizer: str, in_axes: Any, chunk_records: int, record_loss: bool):
    """The jitted ``(init, observe0, chunk)`` of one flow structure (cached: compile once)."""
    step = _step_fn(objective, optimizer)

    def init(params, data, hyper):
        tx = make_optimizer(optimizer, dt=hyper["dt"])
        params = jax.tree_util.tree_map(jnp.copy, params)  # fresh buffers: the chunks donate
        return params, tx.init(params), jnp.int32(0), jnp.int32(-1)

    def measure(params, data, hyper):
        obs = observe(params, data, hyper)
        if not record_loss:
            return jnp.full((), jnp.nan, jnp.result_type(float)), obs
        return objective(params, data, hyper), obs

    def observe0(params, data, hyper):
        return measure(params, data, {**hyper, "step": jnp.int32(0)})

    def chunk(carry, data, hyper, steps_per_record, num_records):
        def record(carry, i):
            active = i < num_records
            n = jnp.where(active, steps_per_record, 0)
            carry = jax.lax.fori_loop(0, n, lambda _, c: step(c, data, hyper), carry)
            now = {**hyper, "step": carry[2]}
            shape = jax.eval_shape(measure, carry[0], data, now)
            out = jax.lax.cond(
                active,
                lambda: measure(carry[0], data, now),
                lambda: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shape),
            )
            return carry, out

        return jax.lax.scan(record, carry, jnp.arange(chunk_records))

    if in_axes is not None:
        p_axis, d_axis = in_axes
        init = jax.vmap(init, in_axes=(p_axis, d_axis, None))
        observe0 = jax.vmap(observe0, in_axes=(p_axis, d_axis, None))
        chunk = jax.vmap(chunk, in_axes=(0, d_axis, None, None, None))
    return jax.jit(init), jax.jit(observe0), jax.jit(chunk, donate_argnums=0)


class Flow:
    r"""A prepared gradient flow: its compiled core and its arguments, stated once.

    Built by the front ends (:func:`integrate`, :func:`integrate_model`, :func:`preference_flow`,
    :func:`sft_flow`, ...); ``run()`` validates and executes it, ``lower()`` / ``compile()`` /
    ``memory()`` give the ahead-of-time program it executes (also for abstract inputs), as
    ``jax.jit(f).lower(...)`` does.

    The run: ``init`` (fresh copies of the parameters and the optimiser state), the ``t = 0``
    observation, then chunks of :data:`CHUNK_RECORDS` checkpoints, each ``record_every`` steps
    after the last; a chunk's carry is donated (updated in place). ``num_steps``,
    ``record_every``, ``dt`` and the loss's numeric hyperparameters are run-time values.

    Args:
      objective: hashable ``(params, data, hyper) -> scalar`` loss (``hyper["loss"]`` holds the
        run-time hyperparameters, ``hyper["dt"]`` the step size, ``hyper["step"]`` the number of
        steps taken: a stochastic objective draws its minibatch from it).
      observe: hashable ``(params, data, hyper) -> pytree`` recorded at every checkpoint.
      params: pytree of arrays (or ``jax.ShapeDtypeStruct`` for :meth:`lower` only).
      data: pytree passed to ``objective`` and ``observe``.
      dt: step size (the learning rate), ``> 0``.
      num_steps: steps, ``>= 1``; ``record_every`` must divide it.
      record_every: steps between checkpoints.
      optimizer: one of :data:`OPTIMIZERS`.
      loss_numbers: run-time hyperparameters for ``hyper["loss"]`` (a dict of scalars).
      in_axes: ``None`` (one run) or ``(params_axis, data_axis)`` to vmap a stack of runs.
      finalize: maps the final parameters to what :attr:`FlowResult.final` holds (e.g. a module).
      validate: called by :meth:`run` before anything executes (raises ``ValueError``).
      check: raise on a non-finite run (default); ``False`` returns ``first_nonfinite_step``.
      what: the name used in progress and error messages.
      chunk_records: checkpoints per compiled chunk (structure: changing it recompiles).
      record_loss: evaluate the loss at every checkpoint (one more forward pass each); ``False``
        records NaN, for observables from which the loss can be computed on the host.
      until: ``(loss, observable) -> bool`` of the latest checkpoint (host values), checked after
        every chunk: ``True`` ends the run there (an SFT budget "until the target is reached";
        use ``chunk_records=1`` to stop at the first such checkpoint). The result then holds the
        checkpoints reached.

    Raises:
      ValueError: bad schedule or optimiser name (when built).
    """

    def __init__(
        self,
        objective: Callable[[Any, Any, Any], jax.Array],
        observe: Callable[[Any, Any, Any], Any],
        params: Any,
        data: Any = None,
        *,
        dt: float,
        num_steps: int,
        record_every: int = 1,
        optimizer: str = "sgd",
        loss_numbers: dict[str, Any] | None = None,
        in_axes: tuple[int | None, int | None] | None = None,
        finalize: Callable[[Any], Any] | None = None,
        validate: Callable[[], None] | None = None,
        check: bool = True,
        what: str = "gradient flow",
        chunk_records: int = CHUNK_RECORDS,
        record_loss: bool = True,
        until: Callable[[Any, Any], bool] | None = None,
    ):
        check_schedule(dt, num_steps, record_every)
        check_optimizer(optimizer)
        check_positive_int("chunk_records", chunk_records)
        if until is not None and in_axes is not None:
            raise ValueError("until stops one run; it cannot be used with in_axes (stacked runs)")
        self.objective, self.observe = objective, observe
        self.params, self.data = params, data
        self.dt, self.num_steps, self.record_every = float(dt), int(num_steps), int(record_every)
        self.optimizer, self.in_axes, self.chunk_records = optimizer, in_axes, int(chunk_records)
        self.loss_numbers = dict(loss_numbers or {})
        self.finalize, self.validate, self.check, self.what = finalize, validate, check, what
        self.record_loss = bool(record_loss)
        self.until = until

    # --- structure and arguments

    @property
    def num_records(self) -> int:
        """Checkpoints after ``t = 0``: ``num_steps // record_every``."""
        return self.num_steps // self.record_every

    def _hyper(self) -> dict[str, Any]:
        # run-time scalars in the parameters' float dtype: a float32 model's step stays float32
        # even where float64 is enabled for the process (an x64 theory check in the same run)
        floats = [
            leaf.dtype
            for leaf in jax.tree_util.tree_leaves(self.params)
            if jnp.issubdtype(leaf.dtype, jnp.floating)
        ]
        dtype = jnp.result_type(*floats) if floats else jnp.result_type(float)
        return {
            "dt": jnp.asarray(self.dt, dtype),
            "loss": {k: jnp.asarray(v, dtype) for k, v in self.loss_numbers.items()},
        }

    def _cores(self):
        return _cores(
            self.objective,
            self.observe,
            self.optimizer,
            self.in_axes,
            self.chunk_records,
            self.record_loss,
        )

    # --- ahead of time

    def lower(self) -> jax.stages.Lowered:
        """Return the lowered chunk program (abstract arguments; nothing is computed)."""
        init, _, chunk = self._cores()
        hyper = self._hyper()
        carry = jax.eval_shape(init, _abstract(self.params), _abstract(self.data), hyper)
        n = jax.ShapeDtypeStruct((), jnp.int32)
        return chunk.lower(carry, _abstract(self.data), _abstract(hyper), n, n)

    def compile(self) -> jax.stages.Compiled:
        """Return the compiled chunk program :meth:`run` executes."""
        return self.lower().compile()

    def memory(self) -> MemoryEstimate:
        """Return XLA's memory analysis of the compiled chunk (the program's device memory)."""
        return memory_estimate(self.compile())

    # --- execution

    def run(self) -> FlowResult:
        """Validate, then execute the flow; return its :class:`FlowResult`.

        Raises:
          ValueError: invalid inputs (the front end's checks; non-finite initial parameters).
          FloatingPointError: a run produced NaN/inf (names the step, its ``t`` and the run).
        """
        if self.validate is not None:
            self.validate()
        # one compiled check of the whole tree (one per leaf shape took 3.4 s on SmolLM2's first
        # call); the leaf-by-leaf pass that names the bad leaf runs only when it fails
        if not bool(all_finite(self.params)):
            for path, leaf in jax.tree_util.tree_leaves_with_path(self.params):
                check_finite(f"params{jax.tree_util.keystr(path)}", leaf)
        init, observe0, chunk = self._cores()
        hyper = self._hyper()
        if _MEMORY_REPORTS:
            _MEMORY_REPORTS[-1](f"[{self.what}] device memory: {self.memory().describe()}")
        carry = init(self.params, self.data, hyper)
        first = jax.tree_util.tree_map(np.asarray, observe0(self.params, self.data, hyper))
        losses, observables = [first[0]], [first[1]]
        done, start, last_print = 0, time.perf_counter(), time.perf_counter()
        steps = jnp.int32(self.record_every)
        while done < self.num_records:
            n = min(self.chunk_records, self.num_records - done)
            carry, out = chunk(carry, self.data, hyper, steps, jnp.int32(n))
            # the first n checkpoints, cut on the host: a device slice of a new length would
            # compile an XLA program, so a new num_steps would not be compile-free
            loss, obs = jax.tree_util.tree_map(np.asarray, out)
            if self.in_axes is None:
                loss, obs = loss[:n], jax.tree_util.tree_map(lambda a, n=n: a[:n], obs)
            else:
                loss, obs = loss[:, :n], jax.tree_util.tree_map(lambda a, n=n: a[:, :n], obs)
            losses.append(loss)
            observables.append(obs)
            done += n
            bad = np.asarray(carry[3])
            if self.check and np.any(bad >= 0):
                break
            if self.until is not None:
                last = jax.tree_util.tree_map(lambda a: a[-1], observables[-1])
                if self.until(losses[-1][-1], last):
                    break
            now = time.perf_counter()
            if now - last_print >= PROGRESS_SECONDS and done < self.num_records:
                rate = done * self.record_every / (now - start)
                left = (self.num_records - done) * self.record_every / rate
                print(
                    f"[{self.what}] step {done * self.record_every}/{self.num_steps} "
                    f"({rate:.2f} steps/s, ~{left:.0f} s left)",
                    flush=True,
                )
                last_print = now
        first_bad = np.asarray(carry[3])
        if self.check:
            raise_on_nonfinite(first_bad, dt=self.dt, what=self.what)
        axis = 0 if self.in_axes is None else 1
        loss = np.concatenate([np.expand_dims(losses[0], axis), *losses[1:]], axis=axis)
        observables = jax.tree_util.tree_map(
            lambda a, *b: np.concatenate([np.expand_dims(a, axis), *b], axis=axis),
            observables[0],
            *observables[1:],
        )
        t = self.dt * self.record_every * np.arange(done + 1)
        final = carry[0] if self.finalize is None else self.finalize(carry[0])
        return FlowResult(final, t, loss, observables, first_bad)


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
    in_axes: Any = None,
    check: bool = True,
) -> Flow:
    r"""Return the :class:`Flow` of :math:`\dot\theta = -\nabla_\theta\,\mathrm{loss\_fn}(\theta,
    \mathrm{data})`; ``.run()`` executes it.

    Source: gradient flow, Razin et al. 2024 §4.1; explicit Euler through ``optax.sgd``.
    Compiled once per (``loss_fn``, ``observe_fn``, optimiser, ``in_axes``, shapes): see
    :class:`Flow`.

    Args:
      loss_fn: ``(params, data) -> scalar``; hashable (a module-level function) to reuse compiles.
      observe_fn: ``(params, data) -> pytree`` recorded at checkpoints.
      params: pytree of arrays (e.g. an ``nnx.State``).
      data: pytree passed through to ``loss_fn``/``observe_fn``.
      dt: step size (``lr``), ``> 0``.
      num_steps: number of steps, ``>= 1``.
      record_every: steps between checkpoints, ``>= 1``; must divide ``num_steps``.
      optimizer: one of :data:`OPTIMIZERS`.
      in_axes: ``None`` (one run) or a ``vmap`` spec for ``(params, data)`` to run a stack of
        independent runs, e.g. ``(None, 0)`` for one start and stacked data.
      check: raise on a non-finite run (default); ``False`` returns the per-run
        ``first_nonfinite_step`` instead (sweeps record a status rather than abort).

    Returns:
      :class:`Flow`; its ``run()`` gives the :class:`FlowResult`.

    Raises:
      ValueError: bad schedule, unknown optimiser (now); non-finite initial parameters (at
        ``run()``).
      FloatingPointError: at ``run()``, the flow produced NaN/inf; the message names the first
        such step, t and run (see :func:`raise_on_nonfinite`).

    Example:
      >>> res = integrate(lambda x, _: 0.5 * x**2, lambda x, _: x, jnp.array(1.0),
      ...                 dt=0.1, num_steps=2, record_every=1).run()
      >>> [round(float(x), 4) for x in res.observables]  # x <- (1 - dt) x
      [1.0, 0.9, 0.81]
    """
    return Flow(
        _NoHyper(loss_fn),
        _NoHyper(observe_fn),
        params,
        data,
        dt=dt,
        num_steps=num_steps,
        record_every=record_every,
        optimizer=optimizer,
        in_axes=in_axes,
        check=check,
    )


@dataclasses.dataclass(frozen=True)
class _OnModel:
    """``fn(model, data[, hyper])`` as a hashable function of a split model's
    ``(params, (rest, data), hyper)``."""

    graphdef: Any
    fn: Callable[..., Any]
    takes_hyper: bool = False

    def __call__(self, params, rest_and_data, hyper=None):
        rest, data = rest_and_data
        model = nnx.merge(self.graphdef, params, rest)
        return self.fn(model, data, hyper) if self.takes_hyper else self.fn(model, data)


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
    in_axes: Any = None,
    check: bool = True,
    loss_numbers: dict[str, Any] | None = None,
    validate: Callable[[], None] | None = None,
    what: str = "gradient flow",
    record_loss: bool = True,
) -> Flow:
    r"""Return the :class:`Flow` of an NNX module's ``nnx.Param`` state; its result's ``final`` is
    the trained module.

    ``loss_fn(model, data)`` and ``observe_fn(model, data)`` receive the module rebuilt from the
    flowing state (``nnx.split`` once, ``nnx.merge`` inside the compiled step), so front ends write
    their maths on the module. With ``loss_numbers``, ``loss_fn`` is called as
    ``loss_fn(model, data, hyper)`` and reads its run-time hyperparameters from ``hyper["loss"]``.
    Only ``nnx.Param`` variables train; other variables ride along unchanged. The input module is
    not modified (the flow runs on copies). With ``in_axes = (model_axis, data_axis)`` a stack of
    runs is vmapped (``model_axis=None``: every run starts from ``model``).

    Raises:
      As :func:`integrate`.

    Example:
      >>> from sims.models.unconstrained import UnconstrainedFeatures
      >>> model = UnconstrainedFeatures.from_arrays(jnp.eye(2), jnp.ones((1, 2)))
      >>> res = integrate_model(model, lambda m, _: jnp.sum(m.hidden[...] ** 2),
      ...                       lambda m, _: m.hidden[...][0, 0], dt=0.25, num_steps=1).run()
      >>> [float(x) for x in res.observables]  # h <- h - dt * 2h
      [1.0, 0.5]
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    axes = None
    if in_axes is not None:
        model_axis, data_axis = in_axes
        axes = (model_axis, (model_axis, data_axis))
    return Flow(
        _OnModel(graphdef, loss_fn, takes_hyper=loss_numbers is not None),
        _OnModel(graphdef, observe_fn),
        params,
        (rest, data),
        dt=dt,
        num_steps=num_steps,
        record_every=record_every,
        optimizer=optimizer,
        loss_numbers=loss_numbers,
        in_axes=axes,
        finalize=lambda p: nnx.merge(graphdef, p, rest),
        validate=validate,
        check=check,
        what=what,
        record_loss=record_loss,
    )


@runtime_checkable
class Pairs(Protocol):
    """What :func:`preference_flow` needs of a pairs type (one per model family).

    :class:`sims.models.unconstrained.PreferencePairs`,
    :class:`sims.models.prefix_tree.PrefixTreePairs`,
    :class:`sims.models.transformer.TransformerPairs`,
    :class:`sims.models.transformer.PromptAnswerPairs`
    and :class:`sims.models.mlp_features.FeaturePairs` implement it.

    Attributes:
      ref_logprob_chosen, ref_logprob_rejected: ``[N]`` reference log-probs.
      weight: ``[N]`` sample weights, or ``None`` (all 1).
    """

    ref_logprob_chosen: Any
    ref_logprob_rejected: Any
    weight: Any

    def logprobs(self, model: nnx.Module) -> tuple[jax.Array, jax.Array]:
        """``(logprob_chosen, logprob_rejected)``, each ``[N]``."""

    def record(self, model: nnx.Module) -> Any:
        """The default observable of a flow."""

    def validate(self, model: nnx.Module) -> None:
        """Raise ``ValueError`` if the pairs do not fit ``model``."""


@dataclasses.dataclass(frozen=True)
class PairObjective:
    r"""The preference objective :math:`L(\theta)` of a model on a pairs type (hashable).

    ``objective(model, pairs, hyper)`` is :func:`theory.losses.mean_pair_loss` of
    ``pairs.logprobs(model)`` against the pairs' reference log-probs (weighted by
    ``pairs.weight``), with the loss's numeric hyperparameters read from ``hyper["loss"]`` at
    run time; ``objective(model, pairs)`` uses ``loss`` as bound. Built from
    ``loss.structure()``, so every ``beta`` gives an equal objective: one compilation.

    Source: Razin et al. 2024, Eq. 2.

    Attributes:
      loss: a per-pair loss from :mod:`theory.losses` (``make_loss("dpo", beta=0.1)``, or its
        ``structure()``).
    """

    loss: PairLoss

    def __call__(self, model: nnx.Module, pairs: Pairs, hyper: Any = None) -> jax.Array:
        loss = self.loss
        if hyper is not None and isinstance(loss, BoundLoss):
            loss = loss.with_numbers(hyper["loss"])
        lp_c, lp_r = pairs.logprobs(model)
        return mean_pair_loss(
            loss,
            lp_c,
            lp_r,
            pairs.ref_logprob_chosen,
            pairs.ref_logprob_rejected,
            weight=pairs.weight,
        )


def velocity_along_flow(
    model: nnx.Module,
    loss_fn: Callable[[nnx.Module, Any], jax.Array],
    data: Any,
    query_fn: Callable[[nnx.Module, Any], Any],
    query_data: Any = None,
) -> Any:
    r"""Return :math:`\frac{d}{dt}q(\theta)` under gradient flow on ``loss_fn``, by autodiff.

    .. math:: \frac{d}{dt} q(\theta(t)) = \langle \nabla_\theta q, -\nabla_\theta L\rangle

    with :math:`L` = ``loss_fn(model, data)`` and :math:`q` = ``query_fn(model, query_data)`` (any
    pytree of arrays, e.g. every token's log-prob): ``jax.grad`` of the actual loss, then
    ``jax.jvp`` of the query along its negative -- the independent reference the closed forms of
    :mod:`theory` are tested against. Every ``nnx.Param`` moves. Compiled once per (model structure,
    ``loss_fn``, ``query_fn``, shapes): pass hashable functions.

    Source: gradient flow (Razin et al. 2024, §4.1).

    Example:
      >>> from sims.models.unconstrained import UnconstrainedFeatures
      >>> m = UnconstrainedFeatures.from_arrays(jnp.eye(2), jnp.ones((1, 2)))
      >>> float(velocity_along_flow(m, _half_norm, None, _first_hidden))  # d/dt h = -h
      -1.0
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return _velocity_jit(
        graphdef, params, rest, data, query_data, loss_fn=loss_fn, query_fn=query_fn
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "loss_fn", "query_fn"))
def _velocity_jit(graphdef, params, rest, data, query_data, *, loss_fn, query_fn):
    def on(fn, d):
        return lambda p: fn(nnx.merge(graphdef, p, rest), d)

    direction = jax.tree_util.tree_map(jnp.negative, jax.grad(on(loss_fn, data))(params))
    return jax.jvp(on(query_fn, query_data), (params,), (direction,))[1]


def _half_norm(model, _):  # doctest helper of velocity_along_flow: L = |h|^2 / 2
    return 0.5 * jnp.sum(model.hidden[...] ** 2)


def _first_hidden(model, _):  # doctest helper of velocity_along_flow
    return model.hidden[...][0, 0]


def pair_logprobs(model: nnx.Module, pairs: Pairs) -> tuple[jax.Array, jax.Array]:
    """Return ``(logprob_chosen, logprob_rejected)`` of any pairs type on its model family."""
    return pairs.logprobs(model)


def default_record(model: nnx.Module, pairs: Pairs) -> Any:
    """The default observable of :func:`preference_flow`: ``pairs.record(model)``."""
    return pairs.record(model)


def preference_flow(
    model: nnx.Module,
    pairs: Pairs,
    loss: PairLoss,
    *,
    dt: float,
    num_steps: int,
    record_every: int = 1,
    optimizer: str = "sgd",
    observe: Callable[[nnx.Module, Any], Any] = default_record,
    in_axes: tuple[int | None, int | None] | None = None,
    record_loss: bool = True,
) -> Flow:
    r"""Return the :class:`Flow` on :math:`L = \frac1N\sum_i \ell_i` (Razin et al. 2024, Eq. 2).

    Every ``nnx.Param`` of ``model`` trains (for the unconstrained-features model: ``W`` and every
    hidden embedding). The input model is not modified. The loss's numeric hyperparameters are
    run-time values (:meth:`theory.losses.BoundLoss.numbers`): a new ``beta`` does not recompile.

    Args:
      model: the starting model of any family.
      pairs: a pairs type of that family (:class:`Pairs`), reference log-probs fixed inside.
      loss: a pair loss from :mod:`theory.losses` (e.g. ``make_loss("dpo", beta=0.1)``).
      dt, num_steps, record_every, optimizer: as in :func:`integrate`.
      observe: ``(model, pairs) -> pytree`` recorded at checkpoints; default ``pairs.record``.
        Pass a module-level function to reuse compilations.
      in_axes: ``None`` for one flow, or ``(model_axis, pairs_axis)`` to vmap ``R`` independent
        flows: ``(None, 0)`` runs every stacked data set from ``model``; ``(0, 0)`` pairs a stack of
        models (:func:`stack_models`) with a stack of data sets. Results get a leading ``[R]``.
      record_loss: as :class:`Flow` (``False`` saves a forward pass per checkpoint when the
        observable gives the log-probs the loss is computed from).

    Returns:
      :class:`Flow`; ``run()`` gives the :class:`FlowResult` whose ``final`` is the trained model.

    Raises:
      ValueError: at ``run()``, ``pairs`` invalid for ``model`` (ids out of range...); as
        :func:`integrate`.
      FloatingPointError: as :func:`integrate`.
    """
    structure, numbers = loss, None
    if isinstance(loss, BoundLoss):
        structure, numbers = loss.structure(), loss.numbers()
    return integrate_model(
        model,
        PairObjective(structure),
        observe,
        pairs,
        dt=dt,
        num_steps=num_steps,
        record_every=record_every,
        optimizer=optimizer,
        in_axes=in_axes,
        loss_numbers=numbers if numbers is not None else None,
        validate=lambda: pairs.validate(model),
        what="preference flow",
        record_loss=record_loss,
    )


def stack_models(models: list[nnx.Module]) -> nnx.Module:
    """Return one module whose arrays stack ``models``' arrays on a leading run axis ``R``.

    For ``in_axes=(0, ...)`` runs of :func:`integrate_model` / :func:`preference_flow`; the models
    must share a structure and shapes.

    Raises:
      ValueError: no models, or models of different structure or shapes.

    Example:
      >>> from sims.models.unconstrained import UnconstrainedFeatures
      >>> ms = [UnconstrainedFeatures(3, 2, 1, rngs=nnx.Rngs(i)) for i in range(4)]
      >>> stack_models(ms).unembedding.shape
      (4, 3, 2)
    """
    if not models:
        raise ValueError("models must hold at least one module, got none")
    splits = [nnx.split(m) for m in models]
    graphdef = splits[0][0]
    shapes = {tuple(np.shape(x) for x in jax.tree_util.tree_leaves(state)) for g, state in splits}
    if any(g != graphdef for g, _ in splits) or len(shapes) != 1:
        raise ValueError("models must share one structure and parameter shapes to be stacked")
    states = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *(s for _, s in splits))
    return nnx.merge(graphdef, states)


@runtime_checkable
class SupervisedData(Protocol):
    """What :func:`sft_flow` needs of a supervised data set (one type per model family)."""

    def logprobs(self, model: nnx.Module) -> jax.Array:
        """``[N]`` summed log-probs of the labels."""

    def validate(self, model: nnx.Module) -> None:
        """Raise ``ValueError`` if the data do not fit ``model``."""


class SFTData(NamedTuple):
    """Supervised single-token examples for the unconstrained-features model.

    Attributes:
      prompt: ``[N]`` prefix ids.
      label: ``[N]`` token ids.
    """

    prompt: jax.Array
    label: jax.Array

    def logprobs(self, model: nnx.Module) -> jax.Array:
        r"""``[N]`` :math:`\ln\pi(\mathrm{label}|\mathrm{prompt})`."""
        return model(self.prompt)[jnp.arange(self.prompt.shape[0]), self.label]

    def validate(self, model: nnx.Module) -> None:
        """Raise ``ValueError`` unless shapes agree and ids fit ``model``."""
        check_ndim("prompt", self.prompt, 1, "[N]")
        if np.shape(self.label) != np.shape(self.prompt):
            raise ValueError(
                f"label must have the shape {np.shape(self.prompt)} of prompt, "
                f"got {np.shape(self.label)}"
            )
        check_token_ids("prompt", self.prompt, model.num_prefixes)
        check_token_ids("label", self.label, model.vocab_size)


def sft_loss(model: nnx.Module, data: SupervisedData) -> jax.Array:
    r"""Return the SFT loss :math:`-\frac1N\sum_i\ln\pi(y_i|x_i)` (mean cross-entropy).

    Source: the SFT phase before preference learning (Razin et al. 2024, §2.1, App. H.1); the
    one SFT loss of the package.
    """
    return jnp.mean(nll_loss(data.logprobs(model)))


def label_logprobs(model: nnx.Module, data: SupervisedData) -> jax.Array:
    """The default observable of :func:`sft_flow`: ``data.logprobs(model)`` ``[N]``."""
    return data.logprobs(model)


def sft_flow(
    model: nnx.Module,
    data: SupervisedData,
    *,
    dt: float,
    num_steps: int,
    record_every: int = 1,
    optimizer: str = "sgd",
    observe: Callable[[nnx.Module, Any], Any] = label_logprobs,
) -> Flow:
    r"""Return the :class:`Flow` of SFT: gradient flow on :func:`sft_loss`.

    Source: the SFT phase before preference learning (Razin et al. 2024, §2.1, App. H.1).
    ``data`` is a supervised data set of the model's family (:class:`SupervisedData`:
    :class:`SFTData` for unconstrained features, :class:`sims.models.transformer.SequenceSFTData`
    for
    causal LMs, :class:`sims.models.mlp_features.FeatureSFTData`). Observables: ``observe(model,
    data)``,
    by default the per-example log-prob of the labels ``[N]``.

    Raises:
      ValueError: at ``run()``, ids out of range or shapes differ; as :func:`integrate`.
    """
    return integrate_model(
        model,
        sft_loss,
        observe,
        data,
        dt=dt,
        num_steps=num_steps,
        record_every=record_every,
        optimizer=optimizer,
        validate=lambda: data.validate(model),
        what="SFT",
    )


@dataclasses.dataclass(frozen=True)
class MinibatchObjective:
    r"""A data set's loss on minibatch ``step mod ceil(N / batch_size)`` (hashable).

    The rows (every leaf's leading axis ``N``) are taken in their given order: one epoch visits
    each once, in batches of ``batch_size``; a short last batch repeats row ``N - 1`` with weight
    0. ``loss(model, batch, hyper, weight)`` is the weighted mean loss of one batch: for pairs,
    :class:`PairObjective`'s maths with ``weight`` (:func:`minibatch_preference_flow`).

    Attributes:
      graphdef: the model's graph (``nnx.split``).
      batch_size: rows per step.
      num_rows: ``N``.
      loss: ``(model, batch, hyper, weight) -> scalar`` (hashable).
    """

    graphdef: Any
    batch_size: int
    num_rows: int
    loss: Callable[..., jax.Array]

    def __call__(self, params, rest_and_data, hyper) -> jax.Array:
        rest, data = rest_and_data
        model = nnx.merge(self.graphdef, params, rest)
        batch, weight = take_minibatch(data, hyper["step"], self.batch_size, self.num_rows)
        return self.loss(model, batch, hyper, weight)


def take_minibatch(data: Any, step: jax.Array, batch_size: int, num_rows: int):
    """Return ``(batch, weight)``: rows of minibatch ``step mod ceil(num_rows / batch_size)`` of
    ``data`` (every leaf's leading axis) and ``[batch_size]`` weights, 0 on a short last batch's
    repeated padding rows (traceable).

    Example:
      >>> b, w = take_minibatch(jnp.arange(5), jnp.int32(1), 3, 5)  # the second batch
      >>> b.tolist(), w.tolist()
      ([3, 4, 4], [1.0, 1.0, 0.0])
    """
    steps = -(-num_rows // batch_size)
    rows = (step % steps) * batch_size + jnp.arange(batch_size)
    weight = (rows < num_rows).astype(jnp.result_type(float))
    batch = jax.tree_util.tree_map(lambda a: a[jnp.minimum(rows, num_rows - 1)], data)
    return batch, weight


@dataclasses.dataclass(frozen=True)
class _WeightedPairLoss:
    objective: PairObjective

    def __call__(self, model, pairs, hyper, weight) -> jax.Array:
        w = weight if pairs.weight is None else weight * pairs.weight
        return self.objective(model, pairs._replace(weight=w), hyper)


def _no_observable(params, data, hyper) -> jax.Array:
    return jnp.zeros(())


def minibatch_preference_flow(
    model: nnx.Module,
    pairs: Pairs,
    loss: PairLoss,
    *,
    lr: float,
    batch_size: int,
    epochs: int = 1,
    optimizer: str = "rmsprop_torch",
    seed: int = 0,
) -> Flow:
    r"""Return the :class:`Flow` of preference training in minibatches, the way trainers run it.

    The pairs (a NamedTuple pairs type whose fields have a leading axis ``N``) are shuffled with
    ``seed`` once; every epoch visits them in that order in batches of ``batch_size`` (the loss of
    a step is :class:`PairObjective`'s on its batch, a short last batch weighted to its real
    rows). The recorded loss is the minibatch loss before each step (``record_loss``), so the run
    of ``epochs * ceil(N / batch_size)`` steps records every step's batch loss.

    Source: Razin et al. 2024, App. H.2-H.3 (one epoch, RMSprop, batch 32 by gradient
    accumulation): one step per batch here.

    Raises:
      ValueError: ``batch_size`` or ``epochs`` not a positive integer; as :class:`Flow`.
    """
    check_positive_int("batch_size", batch_size)
    check_positive_int("epochs", epochs)
    N = int(np.shape(pairs.ref_logprob_chosen)[0])
    order = np.random.default_rng(seed).permutation(N)
    shuffled = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)[order]), pairs)
    structure, numbers = loss, None
    if isinstance(loss, BoundLoss):
        structure, numbers = loss.structure(), loss.numbers()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    steps = -(-N // batch_size)
    return Flow(
        MinibatchObjective(graphdef, batch_size, N, _WeightedPairLoss(PairObjective(structure))),
        _no_observable,
        params,
        (rest, shuffled),
        dt=lr,
        num_steps=steps * epochs,
        record_every=1,
        optimizer=optimizer,
        loss_numbers=numbers,
        finalize=lambda p: nnx.merge(graphdef, p, rest),
        validate=lambda: pairs.validate(model),
        what="minibatch preference training",
    )
