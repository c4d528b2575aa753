"""The multi-process side of :func:`sims.flows.sweep.sweep`: one plan, decided by process 0,
everywhere.

Private to ``sims``. With ``jax.process_count() > 1`` every process runs the same ``sweep`` call and
every chunk's compiled program is a collective over all processes, so all processes must compute
the same chunks in the same order or they wait on each other forever. Process 0 alone owns the
folder (lock, index, chunk files): it decides which chunks are loaded, and its decision, its
loaded chunks and any error it met opening the folder reach the other processes through
``multihost_utils`` collectives. The other processes never open a file in ``out_dir`` (so it need
not be on a file system they share).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import math

import jax
import numpy as np
from jax.experimental import multihost_utils

from sims.flows.sweep_store import run_status

# errors process 0 may meet opening the folder (see sims.flows.sweep.sweep's Raises), re-raised with
# the same type on the other processes; anything else there is a bug and stops process 0 only
FOLDER_ERRORS = (OSError, RuntimeError, ValueError)


def broadcast_bytes(data: bytes, size: int | None = None) -> bytes:
    """Return process 0's ``data`` on every process (the others' ``data`` is ignored).

    ``size`` is ``len(data)`` where every process knows it; ``None`` broadcasts it first
    (``broadcast_one_to_all`` needs one shape on every process). Sent as uint8:
    ``broadcast_one_to_all`` sums the other processes' zeros into the source's value, exact for
    integers, whereas a float ``-0.0`` would arrive as ``+0.0``. A collective: every process must
    call it.
    """
    source = jax.process_index() == 0
    if size is None:
        length = np.array([len(data) if source else 0], np.int64).view(np.uint8)
        size = int(np.asarray(multihost_utils.broadcast_one_to_all(length)).view(np.int64)[0])
    if size == 0:
        return b""
    buffer = np.frombuffer(data, np.uint8) if source else np.zeros(size, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes()


def check_same_sweep(name: str, fingerprint: dict, persisted: bool) -> None:
    """Raise ``ValueError`` on every process unless all processes were given the same sweep.

    Compares the sha256 of each process's fingerprint (name, chunk size, inputs' bytes,
    ``run_fn``'s jaxpr, numerics flags, versions) and whether it saves to a folder. A collective.
    """
    text = json.dumps({"fingerprint": fingerprint, "persisted": persisted}, sort_keys=True)
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest))  # [processes, 32]
    differing = [p for p in range(digests.shape[0]) if not np.array_equal(digests[p], digests[0])]
    if differing:
        raise ValueError(
            f"sweep {name!r}: process(es) {differing} were given a different sweep from process 0 "
            "(run_fn, inputs, name, chunk_size, numerics flags, versions, or out_dir given on one "
            "process and None on another); every process must make the same sweep call"
        )


def share_folder_state(
    error: Exception | None, loaded: dict[int, tuple], rows: dict[int, int], out_leaves
) -> dict[int, tuple]:
    """Return process 0's loaded chunks ``{k: (leaves, status)}`` on every process.

    Process 0 passes the chunks it loaded and the error it met opening the folder, if any; the
    others pass ``None`` and ``{}``. An error is raised on every process (process 0's own
    exception there; the same type naming process 0 elsewhere), so no process goes on to the
    sweep's collectives alone. ``rows[k]`` is chunk ``k``'s run count; ``out_leaves`` are
    ``run_fn``'s output shapes and dtypes for one run. A collective.
    """
    source = jax.process_index() == 0
    plan = {"loaded": sorted(loaded)}
    if error is not None:
        plan["error"] = [type(error).__name__, str(error)]
    plan = json.loads(broadcast_bytes(json.dumps(plan).encode() if source else b""))
    if "error" in plan:
        if source:
            raise error
        kind, message = plan["error"]
        error_type = getattr(builtins, kind, None)
        if not (isinstance(error_type, type) and issubclass(error_type, FOLDER_ERRORS)):
            error_type = RuntimeError
        raise error_type(f"process 0 could not open the sweep folder: {message}")
    shared = {}
    for k in plan["loaded"]:  # one chunk at a time: device memory of one chunk, as computing it
        shapes = [((rows[k], *spec.shape), np.dtype(spec.dtype)) for spec in out_leaves]
        size = sum(math.prod(shape) * dtype.itemsize for shape, dtype in shapes)
        blob = broadcast_bytes(b"".join(a.tobytes() for a in loaded[k][0]) if source else b"", size)
        if source:
            continue
        leaves, offset = [], 0
        for shape, dtype in shapes:
            count = math.prod(shape)
            # copy: writeable and owning its memory, like a chunk read from its file
            leaves.append(np.frombuffer(blob, dtype, count, offset).reshape(shape).copy())
            offset += count * dtype.itemsize
        shared[k] = (leaves, run_status(leaves, rows[k]))
    return loaded if source else shared
