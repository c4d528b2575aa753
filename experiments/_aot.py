"""Ahead-of-time compilation of the experiments' programs: shapes, shardings and device memory.

An experiment with a ``--scale`` version defines ``aot_programs(config) -> list[AotProgram]``:
its main compiled programs (flows, pre-training, kernel measurements, sweep chunks), with arguments
built from shapes only (``jax.ShapeDtypeStruct``; models from ``nnx.eval_shape``; small host data
such as token ids may be built for real and abstracted). The programs come from the library's own
builders (:func:`sims.flows.core.preference_flow_program`,
:func:`sims.models.transformer.pretrain_program`,
:func:`sims.flows.sweep.chunk_program`...), through which the run's front ends call the same cached
compiled cores, so what is lowered here is what the run compiles, not a look-alike.

:func:`compile_programs` lowers and compiles each program on the current backend, without
allocating its arrays, and reads XLA's memory and cost analyses; :func:`estimate_memory` gives an
experiment's estimate. ``experiment_main`` prints it before a ``--scale`` run starts.

Reading of the numbers. A program's peak is ``argument + output - alias + temp + generated code``
bytes of XLA's ``CompiledMemoryStats`` (per device for a sharded program): every buffer it needs
while it runs. An experiment's estimate is the largest such peak over its programs (they run one
after another). It is a lower bound on the device memory the run needs: arrays the run keeps on the
device between programs, and programs a hook leaves out (small evaluations, sampling, scores), are
not counted; the backend's allocator adds its own overhead. Compiled on another backend (CPU here,
for a GPU run) the temporary sizes differ, since each backend fuses differently; arguments and
outputs do not.

:func:`recording` and :func:`unmatched` check a hook against its run (``tests/test_experiments.py``
on every smoke config): during the run every call of the compiled cores is recorded with its
arguments' shapes and dtypes, and each hook program must match one of them.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

GIB = 2.0**30  # bytes per GiB (memory is reported in GiB)


class AotProgram(NamedTuple):
    """One compiled program of an experiment: the run calls ``fn(*args, **kwargs)``.

    Attributes:
      name: what it is, e.g. ``"dpo flow [30 runs]"``.
      fn: a jitted function (it has ``.lower``).
      args, kwargs: its arguments; arrays as ``jax.ShapeDtypeStruct``.
      in_axes: ``None``, or the ``jax.vmap`` spec over ``args`` with which the run maps ``fn``
        (``jax.vmap(fn, in_axes)(*args)``; ``args`` then hold the batched shapes).
    """

    name: str
    fn: Callable[..., Any]
    args: tuple
    kwargs: dict
    in_axes: Any = None


def program(name: str, built: Any, *, in_axes: Any = None) -> AotProgram:
    """Return an :class:`AotProgram` from a library builder's :class:`sims.flows.core.Program`."""
    return AotProgram(name, built.fn, tuple(built.args), dict(built.kwargs), in_axes)


def sds(shape: tuple[int, ...], dtype: Any, sharding: Any = None) -> jax.ShapeDtypeStruct:
    """Return ``jax.ShapeDtypeStruct(shape, dtype)`` with the dtype canonicalised as JAX stores it
    (``float64`` becomes ``float32`` unless x64 is on)."""
    return jax.ShapeDtypeStruct(
        tuple(shape), jax.dtypes.canonicalize_dtype(dtype), sharding=sharding
    )


def abstract(tree: Any) -> Any:
    """Return ``tree`` with every array leaf (NumPy or JAX) as a ``jax.ShapeDtypeStruct`` with the
    dtype ``jnp.asarray`` would give it; other leaves are kept."""

    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, np.ndarray | np.generic | jax.Array):
            return sds(np.shape(x), x.dtype)
        return x

    return jax.tree_util.tree_map(one, tree)


def expand(tree: Any, axis: int, size: int = 1) -> Any:
    """Return ``abstract(tree)`` with an axis of ``size`` inserted at ``axis`` in every array leaf
    (``a[:, None]`` for ``axis=1``; ``size`` stacked runs for ``axis=0``)."""

    def one(x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        shape = list(x.shape)
        shape.insert(axis, size)
        return sds(tuple(shape), x.dtype)

    return jax.tree_util.tree_map(one, abstract(tree))


def gather(tree: Any, shape: tuple[int, ...]) -> Any:
    """Return ``abstract(tree)`` indexed on its leading axis by an index array of ``shape``
    (``a[idx]``: the leading axis becomes ``shape``)."""

    def one(x):
        return sds((*shape, *x.shape[1:]), x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x

    return jax.tree_util.tree_map(one, abstract(tree))


def with_reference(model: nnx.Module, pairs: Any, *, stacked: bool = True) -> Any:
    """Return abstract ``pairs`` with ``ref_logprob_chosen`` / ``ref_logprob_rejected`` of the
    shape and dtype ``pairs.logprobs(model)`` gives (vmapped over a leading run axis if
    ``stacked``), as the ``make_*_pairs`` builders fill them in."""

    def logprobs(m, p):
        return p.logprobs(m)

    fn = jax.vmap(logprobs, in_axes=(None, 0)) if stacked else logprobs
    lp_c, lp_r = jax.eval_shape(fn, model, pairs)
    return pairs._replace(ref_logprob_chosen=lp_c, ref_logprob_rejected=lp_r)


def abstract_model(make: Callable[[], nnx.Module], *, dtype: Any = None) -> nnx.Module:
    """Return ``nnx.eval_shape(make)``: the module with ``ShapeDtypeStruct`` values, nothing
    allocated; ``dtype`` recasts every floating-point variable (a model cast after building)."""
    model = nnx.eval_shape(make)
    if dtype is None:
        return model
    graphdef, state = nnx.split(model)
    state = jax.tree_util.tree_map(
        lambda x: sds(x.shape, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state
    )
    return nnx.merge(graphdef, state)


def _jittable(p: AotProgram) -> tuple[Callable[..., Any], tuple, dict]:
    """``(jitted, args, kwargs)`` to lower: ``p.fn`` itself, or ``jit(vmap(p.fn))`` (non-array
    positional arguments static, as the run's eager ``vmap`` treats them)."""
    if p.in_axes is None:
        return p.fn, p.args, p.kwargs
    static = tuple(i for i, a in enumerate(p.args) if not _has_arrays(a))
    mapped = jax.vmap(p.fn, in_axes=p.in_axes)
    return jax.jit(lambda *a: mapped(*a, **p.kwargs), static_argnums=static), p.args, {}


def _has_arrays(tree: Any) -> bool:
    return any(hasattr(x, "shape") and hasattr(x, "dtype") for x in jax.tree_util.tree_leaves(tree))


def _memory(compiled: Any) -> dict[str, int | None]:
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):  # backends without the analysis
        stats = None
    if stats is None:
        return {"peak_bytes": None}
    out = {
        k: int(getattr(stats, f"{k}_size_in_bytes"))
        for k in ("argument", "output", "alias", "temp", "generated_code")
    }
    out = {f"{k}_bytes": v for k, v in out.items()}
    out["peak_bytes"] = (
        out["argument_bytes"]
        + out["output_bytes"]
        - out["alias_bytes"]
        + out["temp_bytes"]
        + out["generated_code_bytes"]
    )
    return out


def _cost(compiled: Any) -> dict[str, float | None]:
    try:
        cost = compiled.cost_analysis()
    except (NotImplementedError, RuntimeError):
        cost = None
    if isinstance(cost, list | tuple):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    cost = cost or {}
    return {"flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed")}


def compile_programs(programs: list[AotProgram], *, raise_errors: bool = True) -> list[dict]:
    """Lower and compile every program on the current backend; return one row each.

    A row holds ``name``, ``lower_s``, ``compile_s``, the memory analysis in bytes (``argument``,
    ``output``, ``alias``, ``temp``, ``generated_code``, and ``peak_bytes`` as in the module
    docstring; ``peak_bytes`` is ``None`` where the backend has no analysis) and XLA's cost
    analysis (``flops``, ``bytes_accessed``; ``None`` where absent; a loop's body may be counted
    once, not per iteration). With ``raise_errors=False`` a program that fails gets
    ``error`` instead.

    Raises:
      RuntimeError: (``raise_errors``) a program failed to lower or compile; names it.
    """
    rows = []
    for p in programs:
        row: dict[str, Any] = {"name": p.name}
        try:
            fn, args, kwargs = _jittable(p)
            start = time.perf_counter()
            lowered = fn.lower(*args, **kwargs)
            row["lower_s"] = time.perf_counter() - start
            start = time.perf_counter()
            compiled = lowered.compile()
            row["compile_s"] = time.perf_counter() - start
        except Exception as err:  # noqa: BLE001 -- reported per program, or re-raised
            if raise_errors:
                raise RuntimeError(f"program {p.name!r} failed to compile: {err}") from err
            row["error"] = f"{type(err).__name__}: {err}"[:4000]
            rows.append(row)
            continue
        row.update(_memory(compiled))
        row.update(_cost(compiled))
        rows.append(row)
    return rows


def device_info() -> dict[str, Any]:
    """Return the first device's ``platform``, ``device_kind``, the ``device_count`` and its
    ``bytes_limit`` (from ``memory_stats()``; ``None`` where the backend reports none, e.g. CPU)."""
    device = jax.devices()[0]
    try:
        stats = device.memory_stats() or {}
    except (NotImplementedError, RuntimeError):
        stats = {}
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "bytes_limit": stats.get("bytes_limit"),
    }


def estimate_memory(module: ModuleType | str, config: Any) -> dict[str, Any]:
    """Return the device-memory estimate of an experiment's run of ``config``.

    ``module`` is the experiment module (or its name); its ``aot_programs(config)`` gives the
    programs, compiled by :func:`compile_programs` (failures recorded, not raised).

    Returns:
      dict: ``programs`` (the rows), ``peak_bytes`` (largest program peak; ``None`` if none was
      measured), ``largest`` (its program), ``compile_s`` (lowering + compiling, all programs),
      ``errors`` (count), :func:`device_info`'s fields, and ``fits`` (``peak_bytes <=
      bytes_limit``; ``None`` where either is unknown).
    """
    if isinstance(module, str):
        module = importlib.import_module(f"experiments.{module}")
    start = time.perf_counter()
    rows = compile_programs(module.aot_programs(config), raise_errors=False)
    measured = [r for r in rows if r.get("peak_bytes") is not None]
    largest = max(measured, key=lambda r: r["peak_bytes"], default=None)
    info = device_info()
    peak = None if largest is None else largest["peak_bytes"]
    limit = info["bytes_limit"]
    return {
        "programs": rows,
        "peak_bytes": peak,
        "largest": None if largest is None else largest["name"],
        "compile_s": time.perf_counter() - start,
        "errors": sum("error" in r for r in rows),
        **info,
        "fits": None if peak is None or limit is None else bool(peak <= limit),
    }


def describe(name: str, estimate: dict[str, Any]) -> str:
    """Return the lines printed before a ``--scale`` run: the estimate and each program's peak."""
    limit = estimate["bytes_limit"]
    of = f" of {limit / GIB:.1f} GiB" if limit else " (device limit not reported)"
    if estimate["peak_bytes"] is None:
        head = f"[{name}] estimated device memory: not available on {estimate['platform']}"
    else:
        head = (
            f"[{name}] estimated device memory: {estimate['peak_bytes'] / GIB:.2f} GiB{of} on "
            f"{estimate['device_count']} x {estimate['device_kind']} (largest program: "
            f"{estimate['largest']}; a lower bound, see experiments/_aot.py; compiled in "
            f"{estimate['compile_s']:.1f} s)"
        )
    lines = [head]
    for r in estimate["programs"]:
        if "error" in r:
            lines.append(f"  {r['name']}: FAILED to compile: {r['error'].splitlines()[0]}")
        elif r.get("peak_bytes") is not None:
            lines.append(
                f"  {r['name']}: {r['peak_bytes'] / GIB:.3f} GiB (arguments "
                f"{r['argument_bytes'] / GIB:.3f}, outputs {r['output_bytes'] / GIB:.3f}, "
                f"temporaries {r['temp_bytes'] / GIB:.3f})"
            )
    if estimate["fits"] is False:
        lines.append(f"[{name}] WARNING: the estimate exceeds the device's memory")
    return "\n".join(lines)


# --- checking a hook against its run: every call of a compiled core, recorded


def signature(args: tuple, kwargs: dict, in_axes: Any = None) -> tuple:
    """Return a comparable description of a call: the tree structure and, per leaf, its shape and
    dtype (arrays, tracers, ``ShapeDtypeStruct``), its type (Python scalars) or itself (static
    values). With ``in_axes`` (a per-argument ``vmap`` spec of ints and ``None``) the mapped axis
    is dropped: the signature of the per-run call inside the ``vmap``."""
    if in_axes is not None:
        args = tuple(
            a if axis is None else jax.tree_util.tree_map(lambda x, ax=axis: _unbatch(x, ax), a)
            for a, axis in zip(args, in_axes, strict=True)
        )
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    return treedef, tuple(_leaf_signature(x) for x in leaves)


def _unbatch(x: Any, axis: int) -> Any:
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        return x
    shape = list(x.shape)
    del shape[axis]
    return jax.ShapeDtypeStruct(tuple(shape), x.dtype)


def _leaf_signature(x: Any) -> Any:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return ("array", tuple(x.shape), str(x.dtype))
    if isinstance(x, bool | int | float | complex):
        return ("scalar", type(x).__name__)
    return ("static", x)


class _Recorder:
    """Stands for a jitted function: records each call's :func:`signature` under ``key``."""

    def __init__(self, fn: Callable[..., Any], key: Any, calls: list):
        self._fn, self.key, self._calls = fn, key, calls

    def __call__(self, *args, **kwargs):
        self._calls.append((self.key, signature(args, kwargs)))
        return self._fn(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fn, name)


def _is_jitted(x: Any) -> bool:
    return callable(x) and hasattr(x, "lower") and hasattr(x, "trace") and not isinstance(x, type)


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Record every call of the compiled cores while the block runs; yields the list of calls.

    Replaced for the block: every jitted function bound at module level in ``sims.*`` and
    ``experiments.*`` (keyed by the function), and the functions returned by the two builders of
    compiled cores, :func:`sims.flows.core.compiled_flow` (keyed by the returned function: equal
    arguments give the same cached one) and :func:`sims.flows.sweep.sharded_program` (keyed by the
    run function's qualified name, the batch size and the mesh shape). Call the hook inside the
    block too, so that its programs' ``fn`` carry the same keys.
    """
    # the modules themselves: the package ``sims`` binds the name ``sweep`` to the function
    flow_module = importlib.import_module("sims.flows.core")
    sweep_module = importlib.import_module("sims.flows.sweep")
    calls: list = []
    saved: list[tuple[Any, str, Any]] = []
    recorders: dict[int, _Recorder] = {}
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] not in ("sims", "experiments"):
            continue
        for attr, value in list(vars(module).items()):
            if _is_jitted(value) and not isinstance(value, _Recorder):
                rec = recorders.setdefault(id(value), _Recorder(value, ("jit", id(value)), calls))
                saved.append((module, attr, value))
                setattr(module, attr, rec)
    compiled_flow, sharded_program = flow_module.compiled_flow, sweep_module.sharded_program

    def recorded_flow(*args, **kwargs):
        fn = compiled_flow(*args, **kwargs)
        return _Recorder(fn, ("flow", id(fn)), calls)

    def recorded_sharded(run_fn, mesh, batch_size):
        key = ("sweep", getattr(run_fn, "__qualname__", repr(run_fn)), batch_size, mesh.shape)
        return _Recorder(sharded_program(run_fn, mesh, batch_size), key, calls)

    saved += [(flow_module, "compiled_flow", compiled_flow)]
    saved += [(sweep_module, "sharded_program", sharded_program)]
    flow_module.compiled_flow, sweep_module.sharded_program = recorded_flow, recorded_sharded
    try:
        yield calls
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


def unmatched(programs: list[AotProgram], calls: list) -> list[str]:
    """Return the names of the hook programs that match no recorded call of :func:`recording`.

    A program matches a call of the same compiled core (its ``fn`` was recorded under the same
    key) with the same argument :func:`signature` (for a ``vmap``-ed program: the per-run one).
    A program whose ``fn`` was not made inside the recording block does not match.
    """
    missing = []
    for p in programs:
        key = getattr(p.fn, "key", None)
        want = signature(p.args, p.kwargs, p.in_axes)
        if not any(k == key and _same(s, want) for k, s in calls):
            missing.append(p.name)
    return missing


def _same(a: tuple, b: tuple) -> bool:
    if a[0] != b[0] or len(a[1]) != len(b[1]):
        return False
    try:
        return all(bool(x == y) for x, y in zip(a[1], b[1], strict=True))
    except Exception:  # noqa: BLE001 -- static values that cannot be compared differ
        return False


def minilm_shape() -> tuple[int, int] | None:
    """``(V, d)`` of the MiniLM word embeddings from the package's ``config.json`` (no weights
    read), or ``None`` when the package is absent (the MiniLM experiments are then skipped)."""
    from sims.data.real_embeddings import minilm_available, minilm_dir
    from sims.models.bert import BertConfig

    if not minilm_available():
        return None
    cfg = BertConfig.from_file(minilm_dir())
    return cfg.vocab_size, cfg.hidden_size
