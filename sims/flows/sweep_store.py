"""The on-disk side of :func:`sims.flows.sweep.sweep`: fingerprint, folder lock, index and chunk
files.

Public so that tools (and tests) can read a sweep folder and check its fingerprint; the rules it
enforces are documented in ``sims.flows.sweep``'s module docstring.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import time
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

INDEX_FORMAT = 2  # layout of index.json; a folder written in another layout is refused
# process-wide JAX flags that change a run's numbers without changing its jaxpr (x64 does both)
NUMERICS_FLAGS = (
    "jax_enable_x64",
    "jax_default_matmul_precision",
    "jax_threefry_partitionable",
    "jax_default_prng_impl",
)
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")  # object addresses differ between processes
# checkify's error codes: every traced check draws the next code of a process-wide counter, so the
# same run_fn traces to different codes after other checks were traced (theory.checks.poison adds
# one per validated argument). The code is the integer literal of the select_n that feeds check.
_CHECK_CODE = re.compile(
    r"^(\s*(\w+):i(?:32|64)\[\] = select_n \S+ )-?\d+"
    r"(:i(?:32|64)\[\] -1:i(?:32|64)\[\]\n\s*check\[[^\]]*\] \w+ \2\b)",
    re.MULTILINE,
)
_TMP_NAME = re.compile(r"(chunk_\d+\.npz|index\.json)\.\d+\.tmp")  # see tmp_path


def _update(digest, value) -> None:
    """Feed an array's dtype, shape and bytes (a PRNG key array: its key data) to ``digest``."""
    dtype = getattr(value, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        value = jax.random.key_data(value)
    a = np.asarray(value)
    digest.update(f"{a.dtype}{a.shape}".encode())
    digest.update(np.ascontiguousarray(a).tobytes())


def jaxpr_sha256(closed: ClosedJaxpr) -> str:
    """Return the sha256 of a jaxpr's text and of every literal and constant in it and below."""
    text = _CHECK_CODE.sub(r"\1?\3", _ADDRESS.sub("0x?", str(closed)))
    digest = hashlib.sha256(text.encode())
    stack = [closed]
    while stack:  # depth first over nested jaxprs (scan bodies, cond branches, jit calls)
        item = stack.pop()
        if isinstance(item, ClosedJaxpr):
            for const in item.consts:
                _update(digest, const)
            stack.append(item.jaxpr)
        elif isinstance(item, Jaxpr):
            codes = {id(v) for e in item.eqns if e.primitive.name == "check" for v in e.invars[1:]}
            for eqn in item.eqns:
                if eqn.primitive.name == "select_n" and any(id(v) in codes for v in eqn.outvars):
                    continue  # a checkify error code (see _CHECK_CODE); its operands are literals
                for var in eqn.invars:
                    if isinstance(var, Literal):
                        _update(digest, var.val)
                stack.extend(reversed(list(eqn.params.values())))
            for var in item.outvars:
                if isinstance(var, Literal):
                    _update(digest, var.val)
        elif isinstance(item, tuple | list):
            stack.extend(reversed(item))
    return digest.hexdigest()


def describe(tree) -> str:
    """``"PyTreeDef(...) float64[5], int32[]"``: a tree's structure, leaf dtypes and shapes."""
    leaves = jax.tree_util.tree_leaves(tree)
    shapes = ", ".join(f"{np.dtype(a.dtype).name}{list(a.shape)}" for a in leaves)
    return f"{jax.tree_util.tree_structure(tree)} {shapes}"


def fingerprint(run_fn, inputs, *, name: str, chunk_size: int, device) -> tuple[dict, Any]:
    """Return the sweep's fingerprint (JSON-ready, see the module docstring) and output shapes."""
    example = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), inputs)
    closed, out_shape = jax.make_jaxpr(run_fn, return_shape=True)(example)
    inputs_digest = hashlib.sha256(str(jax.tree_util.tree_structure(inputs)).encode())
    for leaf in jax.tree_util.tree_leaves(inputs):
        _update(inputs_digest, leaf)
    flags = {flag: getattr(jax.config, flag) for flag in NUMERICS_FLAGS}
    fingerprint = {
        "format": INDEX_FORMAT,
        "name": name,
        "chunk_size": chunk_size,
        "inputs": describe(inputs),
        "inputs_sha256": inputs_digest.hexdigest(),
        "run_fn_jaxpr_sha256": jaxpr_sha256(closed),
        "outputs": describe(out_shape),
        **{
            k: v if v is None or isinstance(v, bool | int | str) else str(v)
            for k, v in flags.items()
        },
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "platform": device.platform,
        "device_kind": device.device_kind,
    }
    return fingerprint, out_shape


def _differences(stored, current: dict) -> list[str]:
    if not isinstance(stored, dict):
        return [f"its index has no format-{INDEX_FORMAT} fingerprint (older sims.flows.sweep?)"]

    def show(key, value):
        return f"{value[:12]}..." if key.endswith("sha256") and isinstance(value, str) else value

    return [
        f"{key} (folder: {show(key, stored.get(key))!r}, now: {show(key, value)!r})"
        for key, value in current.items()
        if stored.get(key) != value
    ]


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on ``folder/.lock`` holding this process's pid."""
    path = folder / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = b""
            for _ in range(20):  # the holder writes its pid just after taking the lock
                holder = os.pread(fd, 32, 0).strip()
                if holder:
                    break
                time.sleep(0.01)
            raise RuntimeError(
                f"out_dir={str(folder)!r} is in use by another sweep (pid "
                f"{holder.decode('ascii', 'replace') or 'unknown'} holds the lock on {path}); "
                "wait for it to finish or use another out_dir"
            ) from None
        pid = f"{os.getpid()}\n".encode()
        os.pwrite(fd, pid, 0)
        os.ftruncate(fd, len(pid))
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # no stale pid for the next holder's rivals to read
    finally:
        os.close(fd)  # releases the flock; the kernel does the same if the process dies


def tmp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def remove_stale_tmp(folder: Path) -> None:
    """Delete temporary files a killed sweep left (call only while holding the folder lock)."""
    for stale in folder.glob("*.tmp"):
        if _TMP_NAME.fullmatch(stale.name):
            stale.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_index(folder: Path, fingerprint: dict) -> dict | None:
    """Return the folder's index, ``None`` if none; raise if unreadable or another sweep's."""
    path = folder / "index.json"
    if not path.exists():
        return None
    try:
        index = json.loads(path.read_text())
        if not isinstance(index, dict) or not isinstance(index.get("chunks"), dict):
            raise ValueError("not a JSON object with a 'chunks' object")
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError included
        raise ValueError(
            f"{path} cannot be read as a sweep index ({type(e).__name__}: {e}); it says which "
            f"sweep the chunks in {str(folder)!r} belong to, so they are not used without it: "
            "delete index.json to recompute every chunk in this folder, or use a fresh out_dir"
        ) from None
    diffs = _differences(index.get("fingerprint"), fingerprint)
    if diffs:
        raise ValueError(
            f"out_dir={str(folder)!r} holds a different sweep; it differs in: {'; '.join(diffs)}. "
            "Use a fresh out_dir, or delete this one to start over"
        )
    return index


class BadChunk(Exception):
    """A saved chunk that must not be used (the message says why)."""


def leaf_spec(shape, dtype) -> dict:
    return {"shape": [int(n) for n in shape], "dtype": np.dtype(dtype).name}


def load_chunk(path: Path, entry, lo: int, hi: int, out_leaves) -> tuple[list, list[str]]:
    """Return a saved chunk's leaves and statuses after checking them; raise ``BadChunk``."""
    expected = [leaf_spec((hi - lo, *s.shape), s.dtype) for s in out_leaves]
    try:
        recorded = (entry["runs"], entry["leaves"], len(entry["status"]), entry["sha256"])
    except (KeyError, TypeError) as e:
        raise BadChunk(f"its index.json entry is malformed ({type(e).__name__}: {e})") from None
    if recorded[:3] != ([lo, hi], expected, hi - lo):
        raise BadChunk(
            f"index.json records runs {recorded[0]}, {recorded[2]} statuses and leaves "
            f"{recorded[1]}; this sweep expects runs {[lo, hi]} and leaves {expected}"
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadChunk(f"it cannot be read ({type(e).__name__}: {e})") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise BadChunk("its sha256 is not the one index.json recorded (replaced or corrupted)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            names = sorted(npz.files)
            leaves = [npz[f"leaf_{i}"] for i in range(len(expected))]
    except (zipfile.BadZipFile, OSError, KeyError, ValueError, EOFError) as e:
        raise BadChunk(f"it cannot be read ({type(e).__name__}: {e})") from None
    if len(names) != len(expected):
        raise BadChunk(f"it holds {len(names)} arrays, expected {len(expected)} leaves")
    got = [leaf_spec(leaf.shape, leaf.dtype) for leaf in leaves]
    if got != expected:
        raise BadChunk(f"it holds leaves {got}, expected {expected}")
    status = run_status(leaves, hi - lo)
    if status != list(entry["status"]):
        raise BadChunk("its NaN/inf pattern disagrees with the statuses in index.json")
    return leaves, status


def save_chunk(path: Path, leaves, lo: int, status: list[str]) -> dict:
    """Write a chunk's leaves atomically to ``path``; return its index entry (with checksum)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{f"leaf_{i}": leaf for i, leaf in enumerate(leaves)})
    data = buffer.getvalue()
    write_atomic(path, data)
    return {
        "file": path.name,
        "runs": [lo, lo + len(status)],
        "status": status,
        "leaves": [leaf_spec(leaf.shape, leaf.dtype) for leaf in leaves],
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def run_status(leaves, n: int) -> list[str]:
    finite = np.ones(n, dtype=bool)
    for leaf in leaves:
        if np.issubdtype(leaf.dtype, np.inexact):
            finite &= np.all(np.isfinite(leaf.reshape(n, -1)), axis=1)
    return ["ok" if f else "nonfinite" for f in finite]


def status_summary(indexed_status) -> dict[str, Any]:
    """``{"ok", "nonfinite", "nonfinite_runs"}`` from ``(run index, status)`` pairs."""
    nonfinite, ok = [], 0
    for run, status in indexed_status:
        if status == "ok":
            ok += 1
        else:
            nonfinite.append(int(run))
    return {"ok": ok, "nonfinite": len(nonfinite), "nonfinite_runs": nonfinite}


def write_index(folder: Path, index: dict, num_chunks: int) -> None:
    """Refresh ``index["summary"]`` from its chunks and write ``folder/index.json`` atomically."""
    index["summary"] = _index_summary(index["chunks"], num_chunks)
    text = json.dumps(index, sort_keys=True, indent=2, allow_nan=False)
    write_atomic(folder / "index.json", text.encode())


def _index_summary(chunks: dict, num_chunks: int) -> dict[str, Any]:
    pairs = [
        (entry["runs"][0] + i, s)
        for _, entry in sorted(chunks.items(), key=lambda item: int(item[0]))
        for i, s in enumerate(entry["status"])
    ]
    return {"finished_chunks": len(chunks), "num_chunks": num_chunks, **status_summary(pairs)}


def open_folder(held, folder: Path, index: dict, name: str, bounds, out_leaves):
    """Lock ``folder`` (released by ``held``), check or write its index, load finished chunks.

    Returns the index and ``{k: (leaves, status)}`` of the chunks that pass their checks; a chunk
    that fails is left out, with a ``RuntimeWarning`` naming its file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    held.enter_context(folder_lock(folder))
    remove_stale_tmp(folder)
    stored = read_index(folder, index["fingerprint"])
    if stored is None:  # label the folder before any chunk lands in it
        write_index(folder, index, len(bounds))
        return index, {}
    loaded = {}
    for k, (lo, hi) in enumerate(bounds):
        entry, path = stored["chunks"].get(str(k)), chunk_path(folder, k)
        if entry is None:
            continue
        try:
            loaded[k] = load_chunk(path, entry, lo, hi, out_leaves)
        except BadChunk as e:
            warnings.warn(
                f"sweep {name!r}: chunk file {path} is not used: {e}; recomputing it",
                RuntimeWarning,
                stacklevel=3,  # the caller of sweep
            )
    return stored, loaded


def chunk_path(folder: Path, k: int) -> Path:
    """``folder/chunk_<k>.npz``, the file of chunk ``k``."""
    return folder / f"chunk_{k:05d}.npz"
