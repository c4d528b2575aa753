r"""Sweeps: many runs stacked on a leading "run" axis, sharded over all devices, saved per chunk.

A run is a pure function ``run_fn(x) -> pytree of arrays`` of one input pytree ``x`` (a seed's
key, a ``beta``, a learning rate, a loss index, a geometry...). :func:`sharded_map` evaluates it on
``R`` stacked inputs: the run axis is split over a 1-D device mesh (``jax.make_mesh``, axis
``"runs"``) with ``jax.shard_map``; inside each device, ``jax.lax.map(..., batch_size=b)`` runs
vmapped batches of ``b`` one after another (on CPU, ``b`` of about 4 beat one big ``vmap`` by
4x at V=1000: one batch's copies of ``W`` stay in cache). Runs are independent, so the sharded
result equals the unsharded one.

:func:`sweep` adds chunking and persistence: the runs are cut into chunks of ``chunk_size``; each
finished chunk is written to ``out_dir/chunk_<k>.npz`` and recorded in ``out_dir/index.json``, both
through a per-process temporary file (``<file>.<pid>.tmp``) and ``os.replace`` (atomic on POSIX),
so a killed sweep loses at most the chunk in flight and a rerun with the same arguments loads
finished chunks instead of recomputing them. The index records each run's status (``"ok"`` or
``"nonfinite"``) rather than aborting the other runs, and a ``summary`` of the failures.

A folder can only ever hold one sweep:

* **Fingerprint.** ``index.json`` starts with a fingerprint of the sweep, checked field by field on
  every resume; any difference raises ``ValueError`` naming the fields. It covers ``name``,
  ``chunk_size``, the input tree, dtypes, shapes and bytes, and ``run_fn`` itself through its
  jaxpr on one run (``jax.make_jaxpr`` on the first run's shapes and dtypes): the sha256 of the
  jaxpr's text (equations, nested jaxprs, static parameters, and scalar literals, which print in
  round-trip precision: ``x * 0.3`` and ``x * 0.30000000000000004`` differ), of every literal's
  and closed-over constant's bytes (a captured NumPy array is a constant the text does not show),
  and the output tree, shapes and dtypes. The error codes of ``checkify`` checks (drawn from a
  process-wide counter, so they depend on what was traced before) are left out. It also holds the
  process-wide numerics flags (``jax_enable_x64``, ``jax_default_matmul_precision``,
  ``jax_threefry_partitionable``, ``jax_default_prng_impl``), the jax/jaxlib versions and the
  device platform and kind, none of which a jaxpr shows.
  It cannot see what the jaxpr does not hold: the Python body of a host callback
  (``jax.pure_callback``, ``io_callback``), files or globals such a callback reads, XLA flags
  (``XLA_FLAGS``) and JAX flags other than those listed. Edits that leave the jaxpr unchanged
  (renamed local variables, an inlined helper) are accepted, rightly: the results are the same;
  renaming a nested ``jax.jit`` function changes the jaxpr (its name is printed) and is refused.
  ``batch_size`` and the mesh are left out on purpose: runs are independent, so they change how the
  work is spread, not the results (bit-identical on CPU, tested; other backends may differ in the
  last bits between batch sizes).
* **Lock.** Process 0 holds ``fcntl.flock`` on ``out_dir/.lock`` (holding its pid) for the whole
  sweep; a second sweep into the same folder, from any process, raises ``RuntimeError`` at once,
  naming the folder and the holder's pid (on a local file system; ``flock`` over NFS depends on
  the mount). The kernel drops the lock when the holder exits, even by
  ``SIGKILL``; stale temporary files of a killed run are deleted by the next holder.
* **Chunks are checked when loaded.** The index records each chunk's runs, statuses, leaf shapes and
  dtypes and the sha256 of its bytes. A chunk that is missing, unreadable, replaced (checksum),
  or disagrees with the index or with ``run_fn``'s outputs in leaf count, rows or dtypes is never
  used: it is recomputed, with a ``RuntimeWarning`` naming the file and the reason.
* **A damaged index is an error.** An unreadable or truncated ``index.json`` raises ``ValueError``
  naming it: without it nothing says which sweep the chunks belong to, so they are not rebuilt
  from; delete ``index.json`` to recompute every chunk in that folder, or use a fresh ``out_dir``.

Multi-process (several hosts: TPU pod slices, GPU clusters): call ``jax.distributed.initialize()``
in every process before anything else touches JAX, then make the same ``sweep`` call everywhere.
``jax.devices()`` is then the global device list and :func:`run_mesh` spans all processes; inputs
are placed with ``jax.make_array_from_callback`` (each process supplies its own shards from its
full host copy), and each chunk's results come back to every process with
``multihost_utils.process_allgather``. Every chunk is a collective over all processes, so all must
compute the same chunks in the same order: the processes first compare fingerprints (a
``ValueError`` on every process if one was given another ``run_fn``, other inputs or flags), then
process 0 alone takes the lock, reads the index, loads and checks finished chunks, and writes
chunks and index; its decision, its loaded chunks (as bytes) and any error it met opening the
folder are broadcast, so the other processes never open a file in ``out_dir`` and raise process
0's error instead of waiting on it. A process that dies mid-sweep stops the others (the
coordination service ends them, or they wait in a collective until killed); rerun every process
and the sweep resumes from process 0's folder. Tested with 2 local CPU processes (gloo
collectives, ``tests/test_multiprocess.py``): chunks bit-identical to a one-process run on as
many devices, resumed after a SIGKILL of either process. Chunk size should be a multiple of the
global device count.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from sims.flows import _sweep_hosts as hosts
from sims.flows import sweep_store as store
from theory.checks import check_positive_int

RUN_AXIS = "runs"  # the mesh axis the runs are split over


class SweepResult(NamedTuple):
    """Outputs of a sweep, on the host.

    Attributes:
      outputs: ``run_fn``'s output pytree, each leaf with a leading run axis ``R``.
      status: ``[R]`` strings, ``"ok"`` or ``"nonfinite"`` (some output leaf has NaN/inf).
      computed_chunks: indices of the chunks computed by this call (the others were loaded).
    """

    outputs: Any
    status: np.ndarray
    computed_chunks: tuple[int, ...]

    def summary(self) -> dict[str, Any]:
        """Return ``{"ok": n, "nonfinite": m, "nonfinite_runs": [run indices]}`` (JSON-ready).

        Example:
          >>> SweepResult(None, np.array(["ok", "nonfinite", "ok"]), ()).summary()
          {'ok': 2, 'nonfinite': 1, 'nonfinite_runs': [1]}
        """
        return store.status_summary(enumerate(self.status.tolist()))


def run_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """Return a 1-D mesh with axis ``"runs"`` over the first ``num_devices`` devices (default all).

    Raises:
      ValueError: ``num_devices`` is not in ``[1, jax.device_count()]``.

    Example:
      >>> run_mesh(1).axis_names
      ('runs',)
    """
    available = jax.device_count()
    n = available if num_devices is None else num_devices
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= available:
        raise ValueError(
            f"num_devices must be an integer in [1, {available}] (jax.device_count()), "
            f"got num_devices={num_devices!r}"
        )
    # Auto axis type: the mesh only splits independent runs; nothing inside run_fn is sharded
    return jax.make_mesh(
        (n,), (RUN_AXIS,), devices=jax.devices()[:n], axis_types=(jax.sharding.AxisType.Auto,)
    )


def _num_runs(inputs) -> int:
    leaves = jax.tree_util.tree_leaves(inputs)
    if not leaves:
        raise ValueError("inputs must hold at least one array with a leading run axis, got none")
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            "every leaf of inputs must have the same leading run axis R, got leading sizes "
            f"{[np.shape(leaf)[:1] for leaf in leaves]}"
        )
    return sizes.pop()


def _pad_runs(inputs, size: int):
    """Pad the run axis to ``size`` by repeating the last run (real data: no NaN from padding)."""
    return jax.tree_util.tree_map(
        lambda a: np.concatenate([a, np.repeat(a[-1:], size - a.shape[0], axis=0)]), inputs
    )


def sharded_core(
    run_fn: Callable[[Any], Any], mesh: jax.sharding.Mesh, batch_size: int | None
) -> Callable[[Any], Any]:
    """Return the jitted, sharded map ``[R, ...] -> [R, ...]`` of ``run_fn`` (R: mesh multiple).

    The compiled core of :func:`sweep` and :func:`sharded_runner`; inputs are placed on ``mesh``
    split along the run axis. See :func:`lower_chunk` for its arguments in a sweep.
    """

    def local(block):
        return jax.lax.map(run_fn, block, batch_size=batch_size)

    spec = jax.P(RUN_AXIS)
    # check_vma=False: run_fn is written for one run and knows nothing of mesh axes (e.g. the
    # integrator's scan carries an unsharded step counter); no collective is used, so no check
    # of "varying across devices" types is needed
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))


def lower_chunk(
    run_fn: Callable[[Any], Any],
    inputs: Any,
    *,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> jax.stages.Lowered:
    """Return the lowered program :func:`sweep` runs on each chunk of ``inputs`` (ahead of time).

    The very core :func:`sweep` calls (:func:`sharded_core`), lowered on one chunk padded to a
    multiple of the device count as :func:`sweep` pads it, as ``jax.ShapeDtypeStruct`` leaves
    split over ``mesh`` along the run axis: ``.compile()`` checks the sharded program and
    ``memory_analysis()`` sizes it without running anything. ``inputs`` (arrays or
    ``jax.ShapeDtypeStruct``, leading run axis ``R``) and the keywords are those of :func:`sweep`.

    Example:
      >>> lowered = lower_chunk(lambda x: x**2, jnp.zeros(10), chunk_size=3, mesh=run_mesh(2))
      >>> lowered.args_info[0][0].shape  # a chunk of 3 runs padded to a multiple of 2 devices
      (4,)
      >>> lowered.compile().output_shardings.spec
      P('runs',)
    """
    R = _num_runs(inputs)
    chunk_size = R if chunk_size is None else chunk_size
    check_positive_int("chunk_size", chunk_size)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    mesh = run_mesh() if mesh is None else mesh
    n = mesh.devices.size
    sharding = jax.NamedSharding(mesh, jax.P(RUN_AXIS))
    chunk = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(
            (-(-chunk_size // n) * n, *np.shape(a)[1:]), a.dtype, sharding=sharding
        ),
        inputs,
    )
    return sharded_core(run_fn, mesh, batch_size).lower(chunk)


def _place(inputs, mesh):
    sharding = jax.NamedSharding(mesh, jax.P(RUN_AXIS))
    return jax.tree_util.tree_map(
        lambda a: jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx]), inputs
    )


def _to_host(tree):
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree_util.tree_map(np.asarray, tree)


def sharded_runner(
    run_fn: Callable[[Any], Any],
    *,
    mesh: jax.sharding.Mesh | None = None,
    batch_size: int | None = None,
) -> Callable[[Any], Any]:
    """Return ``inputs -> outputs``: :func:`sharded_map` compiled once for repeated calls.

    Raises:
      ValueError: bad ``batch_size``.

    Example:
      >>> square = sharded_runner(lambda x: x**2, mesh=run_mesh(1))
      >>> square(jnp.arange(3.0)).tolist(), square(jnp.ones(2)).tolist()
      ([0.0, 1.0, 4.0], [1.0, 1.0])
    """
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    mesh = run_mesh() if mesh is None else mesh
    mapped = sharded_core(run_fn, mesh, batch_size)
    n = mesh.devices.size

    def call(inputs):
        inputs = jax.tree_util.tree_map(np.asarray, inputs)
        R = _num_runs(inputs)
        out = mapped(_place(_pad_runs(inputs, -(-R // n) * n), mesh))
        return jax.tree_util.tree_map(lambda a: a[:R], _to_host(out))

    return call


def sharded_map(
    run_fn: Callable[[Any], Any],
    inputs: Any,
    *,
    mesh: jax.sharding.Mesh | None = None,
    batch_size: int | None = None,
) -> Any:
    """Return ``run_fn`` applied to every run of ``inputs``, sharded over ``mesh``'s devices.

    Equivalent to ``jax.vmap(run_fn)(inputs)`` (runs are independent); host NumPy arrays out.
    The run axis is padded to a multiple of the device count by repeating the last run.

    Args:
      run_fn: pure, jittable ``x -> pytree`` for one run.
      inputs: pytree of arrays with a common leading run axis ``R``.
      mesh: a 1-D mesh with axis ``"runs"``; default :func:`run_mesh` (all devices).
      batch_size: runs vmapped together inside each device (``None``: one run at a time,
        ``jax.lax.map``'s sequential scan).

    Raises:
      ValueError: leaves disagree on ``R``; bad ``batch_size``.

    Example:
      >>> out = sharded_map(lambda x: x**2, jnp.arange(3.0), mesh=run_mesh(1))
      >>> out.tolist()
      [0.0, 1.0, 4.0]
    """
    return sharded_runner(run_fn, mesh=mesh, batch_size=batch_size)(inputs)


def sweep(
    run_fn: Callable[[Any], Any],
    inputs: Any,
    *,
    name: str,
    out_dir: str | os.PathLike | None = None,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    on_chunk: Callable[[int, int, bool], None] | None = None,
) -> SweepResult:
    """Run ``run_fn`` on every run of ``inputs`` chunk by chunk, sharded, saved and resumable.

    A folder holds one sweep only; see the module docstring for what the fingerprint covers, the
    lock, and how saved chunks are checked.

    Args:
      run_fn: pure, jittable ``x -> pytree of arrays`` for one run.
      inputs: pytree of host arrays with a common leading run axis ``R``.
      name: names the sweep; part of the fingerprint of ``out_dir`` (``run_fn`` is fingerprinted
        through its jaxpr, so an edited ``run_fn`` is refused even under the same name).
      out_dir: folder for ``chunk_<k>.npz``, ``index.json`` and ``.lock``; ``None`` keeps
        results in memory.
      chunk_size: runs per chunk (default ``R``); best a multiple of the device count.
      batch_size: runs vmapped together inside a device (see :func:`sharded_map`).
      mesh: 1-D ``"runs"`` mesh; default all devices.
      on_chunk: called as ``on_chunk(k, num_chunks, computed)`` after chunk ``k`` is saved or
        loaded (progress reports).

    Returns:
      :class:`SweepResult`.

    Raises:
      ValueError: ``out_dir`` holds a different sweep (the message names the differing fields:
        name, chunk size, inputs, ``run_fn``'s jaxpr, x64 or other numerics flags, versions,
        device); ``out_dir/index.json`` is unreadable; bad sizes; leaves disagreeing on ``R``;
        with several processes, one was given a different sweep from process 0.
      TypeError: ``name`` is not a non-empty string.
      RuntimeError: another sweep holds ``out_dir`` (its pid is named).

    With several processes, an error process 0 meets opening ``out_dir`` is raised on every
    process (same type; elsewhere the message starts ``process 0 could not open``).

    Warns:
      RuntimeWarning: a saved chunk failed its checks and is recomputed (names the file).

    Example:
      >>> res = sweep(lambda x: {"sq": x**2}, jnp.arange(5.0), name="sq", chunk_size=2,
      ...             mesh=run_mesh(1))
      >>> res.outputs["sq"].tolist(), res.status.tolist().count("ok"), res.computed_chunks
      ([0.0, 1.0, 4.0, 9.0, 16.0], 5, (0, 1, 2))
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got name={name!r}")
    inputs = jax.tree_util.tree_map(np.asarray, inputs)
    R = _num_runs(inputs)
    chunk_size = R if chunk_size is None else chunk_size
    check_positive_int("chunk_size", chunk_size)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    mesh = run_mesh() if mesh is None else mesh
    num_chunks = -(-R // chunk_size)
    padded_chunk = -(-chunk_size // mesh.devices.size) * mesh.devices.size
    fingerprint, out_shape = store.fingerprint(
        run_fn, inputs, name=name, chunk_size=chunk_size, device=mesh.devices.flat[0]
    )
    out_tree = jax.tree_util.tree_structure(out_shape)
    out_leaves = jax.tree_util.tree_leaves(out_shape)
    mapped = sharded_core(run_fn, mesh, batch_size)
    folder = None if out_dir is None else Path(out_dir)
    multiprocess = jax.process_count() > 1
    if multiprocess:
        hosts.check_same_sweep(name, fingerprint, folder is not None)
    writer = jax.process_index() == 0  # process 0 alone opens files in out_dir
    bounds = [(k * chunk_size, min((k + 1) * chunk_size, R)) for k in range(num_chunks)]

    with contextlib.ExitStack() as held:
        index = {"fingerprint": fingerprint, "chunks": {}}
        loaded, error = {}, None
        if folder is not None and writer:
            try:
                index, loaded = store.open_folder(held, folder, index, name, bounds, out_leaves)
            except hosts.FOLDER_ERRORS as e:
                if not multiprocess:
                    raise
                error = e  # raised below on every process, so none computes alone
        if multiprocess and folder is not None:
            rows = {k: hi - lo for k, (lo, hi) in enumerate(bounds)}
            loaded = hosts.share_folder_state(error, loaded, rows, out_leaves)

        chunks, computed = [], []
        for k, (lo, hi) in enumerate(bounds):
            if k in loaded:
                chunks.append(loaded.pop(k))
                if on_chunk is not None:
                    on_chunk(k, num_chunks, False)
                continue
            block = jax.tree_util.tree_map(lambda a, lo=lo, hi=hi: a[lo:hi], inputs)
            out = _to_host(mapped(_place(_pad_runs(block, padded_chunk), mesh)))
            leaves = [leaf[: hi - lo] for leaf in jax.tree_util.tree_leaves(out)]
            status = store.run_status(leaves, hi - lo)
            if folder is not None and writer:
                path = store.chunk_path(folder, k)
                index["chunks"][str(k)] = store.save_chunk(path, leaves, lo, status)
                store.write_index(folder, index, num_chunks)
            chunks.append((leaves, status))
            computed.append(k)
            if on_chunk is not None:
                on_chunk(k, num_chunks, True)

    outputs = [np.concatenate([c[0][i] for c in chunks]) for i in range(out_tree.num_leaves)]
    status = np.array([s for c in chunks for s in c[1]])
    return SweepResult(jax.tree_util.tree_unflatten(out_tree, outputs), status, tuple(computed))


def stack_runs(**axes: Any) -> dict[str, np.ndarray]:
    """Return the Cartesian product of named 1-D axes as flat ``[R]`` arrays (a sweep grid).

    Example:
      >>> grid = stack_runs(seed=jnp.arange(2), beta=jnp.array([0.1, 1.0]))
      >>> grid["seed"].tolist(), grid["beta"].tolist()
      ([0, 0, 1, 1], [0.1, 1.0, 0.1, 1.0])
    """
    names = list(axes)
    arrays = [np.asarray(axes[k]) for k in names]
    for k, a in zip(names, arrays, strict=True):
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"{k} must be a non-empty 1-D array of values, got shape {a.shape}")
    grids = np.meshgrid(*arrays, indexing="ij")
    return {k: g.reshape(-1) for k, g in zip(names, grids, strict=True)}
