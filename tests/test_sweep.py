"""Sharded, chunked, resumable sweeps (sims/flows/sweep.py)."""

import fcntl
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import _sweep_job as job
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from sims.flows import sweep_store as store
from sims.flows.sweep import run_mesh, sharded_map, stack_runs, sweep

ROOT = Path(__file__).resolve().parent.parent
SUBPROCESS_TIMEOUT_S = 150  # one fresh JAX process compiling a small sweep, on a shared 2-core CPU


def _job_env():
    env = dict(os.environ)
    # this process's XLA flags (the root conftest's 8 fake devices and optimisation level): the
    # resume tests compare chunks computed there with chunks computed here bit for bit
    env["XLA_FLAGS"] = os.environ["XLA_FLAGS"]
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    return env


def _run_job(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_sweep_job.py"), *args],
        env=_job_env(),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )


def _assert_trees_equal(got, want, what):
    for path, a in jax.tree_util.tree_leaves_with_path(got):
        b = want
        for key in path:
            b = b[key.key]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{what}: {path}")


@pytest.mark.slow
def test_sharded_map_on_8_devices_equals_unsharded_vmap_in_subprocess():
    proc = _run_job("compare")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    assert report["max_abs_diff"] == 0.0  # runs are independent: sharding must not change a bit


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_sweep_on_8_devices_equals_unsharded_vmap():
    # the root conftest fakes 8 CPU devices for this process
    assert jax.device_count() == 8
    inputs = job.inputs()
    want = jax.jit(jax.vmap(job.run_fn))(inputs)
    for mesh, chunk_size, batch_size in ((run_mesh(), 8, 1), (run_mesh(3), 5, None)):
        res = sweep(
            job.run_fn, inputs, name="eq", chunk_size=chunk_size, batch_size=batch_size, mesh=mesh
        )
        _assert_trees_equal(res.outputs, want, f"{mesh.devices.size} devices, chunk {chunk_size}")
        assert res.status.tolist() == ["ok"] * 20


def _jaxpr_with_a_fresh_check():
    def run_fn(x):  # a new function: tracing it draws a new checkify error code
        checkify.debug_check(x > 0, "x must be > 0")
        return 2.0 * x

    return jax.make_jaxpr(run_fn)(1.0)


def test_fingerprint_ignores_checkify_error_codes_drawn_by_earlier_traces():
    # every traced checkify check (theory.checks.poison) draws the next code of a process-wide
    # counter: the same run_fn must fingerprint the same whatever was traced before it
    first, again = _jaxpr_with_a_fresh_check(), _jaxpr_with_a_fresh_check()
    assert str(first) != str(again)  # the codes did change (else this test checks nothing)
    assert store.jaxpr_sha256(first) == store.jaxpr_sha256(again)
    edited = jax.make_jaxpr(lambda x: 3.0 * x)(1.0)
    assert store.jaxpr_sha256(edited) != store.jaxpr_sha256(jax.make_jaxpr(lambda x: 2.0 * x)(1.0))


@pytest.fixture(scope="module")
def uninterrupted():
    """The DPO job's sweep run in memory, start to finish (reference for the resume tests)."""
    return sweep(job.run_fn, job.inputs(), name=job.NAME, chunk_size=job.CHUNK_SIZE)


# (stage at which the subprocess kills itself, chunk it dies in or after, chunks left to compute)
KILL_CASES = [("saved", 1, (2,)), ("writing", 2, (2,)), ("unindexed", 2, (2,))]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "kill_chunk", "left"), KILL_CASES)
def test_sweep_resumes_after_kill_without_recomputing(
    tmp_path, uninterrupted, stage, kill_chunk, left
):
    out = tmp_path / "sweep"
    proc = _run_job("kill", str(out), str(kill_chunk), stage)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    index = json.loads((out / "index.json").read_text())
    assert sorted(index["chunks"]) == ["0", "1"]  # chunk 2 unfinished or never started
    last = out / "chunk_00002.npz"
    stale = sorted(p.name for p in out.glob("*.tmp"))
    # what the kill left: only the writing stage leaves half a chunk in its temporary file
    pid = json.loads(proc.stdout.strip().splitlines()[0])["pid"]
    assert stale == ([f"chunk_00002.npz.{pid}.tmp"] if stage == "writing" else [])
    assert last.exists() == (stage == "unindexed")

    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # finished chunks must load cleanly
        resumed = sweep(
            job.run_fn,
            job.inputs(),
            name=job.NAME,
            out_dir=out,
            chunk_size=job.CHUNK_SIZE,
            on_chunk=lambda k, n, c: seen.append((k, c)),
        )
    assert resumed.computed_chunks == left
    assert seen == [(0, False), (1, False), (2, True)]
    assert not list(out.glob("*.tmp"))  # the killed run's temporary file was cleaned up
    _assert_trees_equal(resumed.outputs, uninterrupted.outputs, "resumed vs uninterrupted")
    assert resumed.status.tolist() == uninterrupted.status.tolist()
    again = sweep(job.run_fn, job.inputs(), name=job.NAME, out_dir=out, chunk_size=job.CHUNK_SIZE)
    assert again.computed_chunks == ()  # everything loaded


RACE_REPEATS = 3  # independent races, each in a fresh folder


@pytest.mark.slow
def test_sweep_lock_refuses_concurrent_sweep_into_same_folder(tmp_path):
    env = _job_env()
    for trial in range(RACE_REPEATS):
        out, sync = tmp_path / f"out{trial}", tmp_path / f"sync{trial}"
        sync.mkdir()
        procs = {
            tag: subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "tests" / "_sweep_job.py"),
                    "race",
                    str(out),
                    tag,
                    str(sync),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for tag in ("a", "b")
        }
        reports = {}
        for tag, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
            assert proc.returncode == 0, f"trial {trial}, racer {tag}: {stderr[-2000:]}"
            reports[tag] = json.loads(stdout.strip().splitlines()[-1])
        outcomes = sorted(r["outcome"] for r in reports.values())
        assert outcomes == ["done", "refused"], f"trial {trial}: {reports}"
        winner = next(t for t, r in reports.items() if r["outcome"] == "done")
        loser = reports["b" if winner == "a" else "a"]
        assert "is in use by another sweep" in loser["error"], loser["error"]
        assert str(out) in loser["error"] and f"pid {procs[winner].pid} " in loser["error"]

        # the folder holds the winner's sweep only, every chunk valid, nothing half-written
        names = sorted(p.name for p in out.iterdir())
        assert names == [".lock", "chunk_00000.npz", "chunk_00001.npz", "chunk_00002.npz"] + [
            "index.json"
        ]
        index = json.loads((out / "index.json").read_text())
        assert index["fingerprint"]["name"] == f"tiny-{winner}"
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            resumed = job.tiny_sweep(winner, out)
        assert resumed.computed_chunks == ()
        _assert_trees_equal(resumed.outputs, job.tiny_sweep(winner, None).outputs, f"trial {trial}")
        with pytest.raises(ValueError, match="holds a different sweep"):
            job.tiny_sweep("b" if winner == "a" else "a", out)


def test_sweep_lock_names_holder_and_is_released(tmp_path):
    fd = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242\n")
        with pytest.raises(RuntimeError, match=r"is in use by another sweep \(pid 4242 holds"):
            job.tiny_sweep("a", tmp_path)
        assert not (tmp_path / "index.json").exists()  # refused before touching the folder
    finally:
        os.close(fd)  # releases the lock
    failing = []

    def fail_after_first_chunk(k, n, computed):
        failing.append(k)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        job.tiny_sweep("a", tmp_path, on_chunk=fail_after_first_chunk)
    assert (tmp_path / ".lock").read_text() == ""  # released; no stale pid left
    res = job.tiny_sweep("a", tmp_path)  # the interrupted sweep let the lock go
    assert res.computed_chunks == (1, 2)

    def nested(k, n, computed):
        job.tiny_sweep("a", tmp_path)

    job.tiny_sweep("a", tmp_path / "other", on_chunk=nested)  # the lock is per folder
    with pytest.raises(RuntimeError, match=rf"pid {os.getpid()} holds"):
        job.tiny_sweep("a", tmp_path, on_chunk=lambda *_: job.tiny_sweep("a", tmp_path))


def _shift(v):
    return v + 1.0


def _shift_again(v):
    w = v + 1.0  # another Python function, same computation: same jaxpr
    return w


def test_sweep_refuses_changed_run_fn_under_same_name(tmp_path):
    x = np.arange(4.0)
    kw = {"name": "same", "chunk_size": 2, "mesh": run_mesh(1)}
    sweep(_shift, x, out_dir=tmp_path, **kw)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("chunk_*")}
    with pytest.raises(ValueError, match="differs in: run_fn_jaxpr_sha256"):
        sweep(lambda v: v + 2.0, x, out_dir=tmp_path, **kw)  # another literal
    with pytest.raises(ValueError, match="differs in: run_fn_jaxpr_sha256"):
        sweep(lambda v: v - 1.0, x, out_dir=tmp_path, **kw)  # another primitive
    assert {p.name: p.read_bytes() for p in tmp_path.glob("chunk_*")} == before
    res = sweep(_shift_again, x, out_dir=tmp_path, **kw)
    assert res.computed_chunks == ()  # an edit that leaves the jaxpr unchanged is accepted
    np.testing.assert_array_equal(res.outputs, x + 1.0)

    # a closed-over array is a constant the jaxpr's text does not print: hashed separately
    table = np.arange(4.0)

    def scaled(v):
        return v * jnp.sum(table)

    first = jax.make_jaxpr(scaled)(1.0)
    sweep(scaled, x, out_dir=tmp_path / "const", **kw)
    table[0] = 10.0
    assert str(jax.make_jaxpr(scaled)(1.0)) == str(first)  # the text alone cannot tell
    with pytest.raises(ValueError, match="differs in: run_fn_jaxpr_sha256"):
        sweep(scaled, x, out_dir=tmp_path / "const", **kw)

    # a run killed after chunk 0, resumed with another run_fn: refused, never mixed
    killed = tmp_path / "killed"

    def stop(k, n, computed):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep(_shift, x, out_dir=killed, on_chunk=stop, **kw)
    with pytest.raises(ValueError, match="differs in: run_fn_jaxpr_sha256"):
        sweep(lambda v: v + 2.0, x, out_dir=killed, **kw)
    res = sweep(_shift, x, out_dir=killed, **kw)
    assert res.computed_chunks == (1,)
    np.testing.assert_array_equal(res.outputs, x + 1.0)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_sweep_refuses_resume_with_x64_toggled(tmp_path):
    job.tiny_sweep("a", tmp_path)  # this process runs with x64 on (root conftest)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != ".lock"}
    proc = _run_job("x64off", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["x64"] is False and report["error_type"] == "ValueError", report
    assert "holds a different sweep" in report["error"]
    assert "jax_enable_x64 (folder: True, now: False)" in report["error"], report["error"]
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != ".lock"}
    assert after == before  # refused before writing anything


def _two_leaf_sweep(out_dir):
    """4 runs in 2 chunks of 2, two output leaves (so a chunk can lose one)."""
    return sweep(
        lambda v: {"a": v + 1.0, "b": jnp.stack([v, 2.0 * v])},
        np.arange(4.0),
        name="two-leaf",
        out_dir=out_dir,
        chunk_size=2,
        mesh=run_mesh(1),
    )


def _savez_bytes(**arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


# chunk 0 damaged as named; "fix sha" also rewrites index.json's checksum to the new bytes, so the
# checks behind the checksum are reached; the last item is what the warning must give as reason
BAD_CHUNKS = [
    ("truncated", False, "sha256 is not the one index.json recorded"),
    ("truncated", True, "cannot be read (BadZipFile"),
    ("swapped", False, "sha256 is not the one index.json recorded"),
    ("one_row", False, "sha256 is not the one index.json recorded"),
    ("one_row", True, "it holds leaves"),
    ("float32", True, "it holds leaves"),
    ("missing_leaf", True, "cannot be read (KeyError"),
    ("extra_leaf", True, "it holds 3 arrays, expected 2 leaves"),
    ("deleted", False, "cannot be read (FileNotFoundError"),
    ("status_edited", False, "NaN/inf pattern disagrees"),
    ("entry_rows_edited", False, "index.json records runs [0, 1]"),
]


@pytest.mark.parametrize(("damage", "fix_sha", "reason"), BAD_CHUNKS)
def test_sweep_recomputes_bad_chunk_with_warning_naming_it(tmp_path, damage, fix_sha, reason):
    want = _two_leaf_sweep(None)
    _two_leaf_sweep(tmp_path)
    path = tmp_path / "chunk_00000.npz"
    data = path.read_bytes()
    with np.load(path) as npz:
        a, b = npz["leaf_0"], npz["leaf_1"]
    new = {
        "truncated": data[: len(data) // 2],
        "swapped": (tmp_path / "chunk_00001.npz").read_bytes(),  # valid, same shapes
        "one_row": _savez_bytes(leaf_0=a[:1], leaf_1=b[:1]),
        "float32": _savez_bytes(leaf_0=a.astype(np.float32), leaf_1=b),
        "missing_leaf": _savez_bytes(leaf_0=a, other=b),
        "extra_leaf": _savez_bytes(leaf_0=a, leaf_1=b, leaf_2=a),
    }.get(damage)
    index_path = tmp_path / "index.json"
    index = json.loads(index_path.read_text())
    if new is not None:
        path.write_bytes(new)
    if damage == "deleted":
        path.unlink()
    if damage == "status_edited":
        index["chunks"]["0"]["status"] = ["ok", "nonfinite"]
    if damage == "entry_rows_edited":
        index["chunks"]["0"]["runs"] = [0, 1]
    if fix_sha:
        index["chunks"]["0"]["sha256"] = hashlib.sha256(new).hexdigest()
    index_path.write_text(json.dumps(index))

    with pytest.warns(RuntimeWarning) as record:
        res = _two_leaf_sweep(tmp_path)
    assert len(record) == 1
    message = str(record[0].message)
    assert str(path) in message and reason in message, message
    assert res.computed_chunks == (0,)
    _assert_trees_equal(res.outputs, want.outputs, damage)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert _two_leaf_sweep(tmp_path).computed_chunks == ()  # repaired on disk


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (None, "JSONDecodeError"),  # None: the real index cut in half
        (b"[]", "not a JSON object with a 'chunks' object"),
        (b"\xff\xfe", "UnicodeDecodeError"),
    ],
)
def test_sweep_rejects_unreadable_index_naming_it(tmp_path, text, reason):
    _two_leaf_sweep(tmp_path)
    index_path = tmp_path / "index.json"
    full = index_path.read_bytes()
    index_path.write_bytes(full[: len(full) // 2] if text is None else text)
    with pytest.raises(ValueError, match="cannot be read as a sweep index") as error:
        _two_leaf_sweep(tmp_path)
    message = str(error.value)
    assert str(index_path) in message and reason in message and "delete index.json" in message
    index_path.unlink()  # the fix the message gives: every chunk is recomputed
    res = _two_leaf_sweep(tmp_path)
    assert res.computed_chunks == (0, 1)
    _assert_trees_equal(res.outputs, _two_leaf_sweep(None).outputs, "after deleting the index")


def test_sweep_refuses_index_of_older_format(tmp_path):
    _two_leaf_sweep(tmp_path)
    index_path = tmp_path / "index.json"
    index = json.loads(index_path.read_text())
    index["fingerprint"] = "0" * 64  # the format-1 index held one opaque hash
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="holds a different sweep.*no format-2 fingerprint"):
        _two_leaf_sweep(tmp_path)


def test_sweep_refuses_out_dir_of_another_sweep(tmp_path):
    x = jnp.arange(4.0)
    sweep(lambda v: v + 1, x, name="a", out_dir=tmp_path, chunk_size=2, mesh=run_mesh(1))
    with pytest.raises(ValueError, match="holds a different sweep"):
        sweep(lambda v: v + 1, x, name="b", out_dir=tmp_path, chunk_size=2, mesh=run_mesh(1))
    with pytest.raises(ValueError, match="holds a different sweep; it differs in: inputs_sha256"):
        sweep(lambda v: v + 1, x + 1, name="a", out_dir=tmp_path, chunk_size=2, mesh=run_mesh(1))
    with pytest.raises(ValueError, match=r"differs in: inputs \(folder: 'PyTreeDef\(\*\) float64"):
        x32 = np.arange(4.0, dtype=np.float32)  # same values, another dtype
        sweep(lambda v: v + 1, x32, name="a", out_dir=tmp_path, chunk_size=2, mesh=run_mesh(1))
    with pytest.raises(ValueError, match="differs in: chunk_size"):
        sweep(lambda v: v + 1, x, name="a", out_dir=tmp_path, chunk_size=3, mesh=run_mesh(1))


def test_sweep_records_nonfinite_runs_without_aborting(tmp_path):
    res = sweep(
        lambda v: {"log": jnp.log(v)},
        jnp.array([1.0, -1.0, 2.0]),
        name="log",
        out_dir=tmp_path,
        chunk_size=2,
        mesh=run_mesh(2),
    )
    assert res.status.tolist() == ["ok", "nonfinite", "ok"]
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["chunks"]["0"]["status"] == ["ok", "nonfinite"]
    # log(-1) is NaN: run 1 is the only failure, summarised in the JSON and on the result
    failures = {"ok": 2, "nonfinite": 1, "nonfinite_runs": [1]}
    assert index["summary"] == {"finished_chunks": 2, "num_chunks": 2, **failures}
    assert res.summary() == failures
    np.testing.assert_allclose(res.outputs["log"][[0, 2]], [0.0, np.log(2.0)], rtol=1e-15)


def test_sweep_rejects_bad_input():
    with pytest.raises(TypeError, match="name must be a non-empty string"):
        sweep(lambda a: a, np.zeros(3), name="")
    with pytest.raises(ValueError, match="same leading run axis R"):
        sweep(lambda a: a, {"a": np.zeros(3), "b": np.zeros(4)}, name="x")
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        sweep(lambda a: a, np.zeros(3), name="x", chunk_size=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        sharded_map(lambda a: a, np.zeros(3), batch_size=0)
    with pytest.raises(ValueError, match="num_devices must be an integer in"):
        run_mesh(jax.device_count() + 1)
    with pytest.raises(ValueError, match="must be a non-empty 1-D array"):
        stack_runs(seed=np.zeros((2, 2)))
