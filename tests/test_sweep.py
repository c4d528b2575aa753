"""Sharded, chunked, resumable sweeps (sims/sweep.py)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import _sweep_job as job
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sims.sweep import run_mesh, sharded_map, stack_runs, sweep

ROOT = Path(__file__).resolve().parent.parent
SUBPROCESS_TIMEOUT_S = 150  # one fresh JAX process compiling a small sweep, on a shared 2-core CPU


def _run_job(*args):
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # set before JAX initialises
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_sweep_job.py"), *args],
        env=env,
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


@pytest.mark.slow
def test_sweep_resumes_after_kill_without_recomputing(tmp_path):
    out = tmp_path / "sweep"
    proc = _run_job("kill", str(out), "1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    index = json.loads((out / "index.json").read_text())
    assert sorted(index["chunks"]) == ["0", "1"]  # chunks 0 and 1 saved, chunk 2 never started
    assert not list(out.glob("*.tmp"))

    seen = []
    resumed = sweep(
        job.run_fn,
        job.inputs(),
        name=job.NAME,
        out_dir=out,
        chunk_size=job.CHUNK_SIZE,
        on_chunk=lambda k, n, c: seen.append((k, c)),
    )
    assert resumed.computed_chunks == (2,)
    assert seen == [(0, False), (1, False), (2, True)]
    fresh = sweep(job.run_fn, job.inputs(), name=job.NAME, chunk_size=job.CHUNK_SIZE)
    _assert_trees_equal(resumed.outputs, fresh.outputs, "resumed vs uninterrupted")
    again = sweep(job.run_fn, job.inputs(), name=job.NAME, out_dir=out, chunk_size=job.CHUNK_SIZE)
    assert again.computed_chunks == ()  # everything loaded


def test_sweep_refuses_out_dir_of_another_sweep(tmp_path):
    x = jnp.arange(4.0)
    sweep(lambda v: v + 1, x, name="a", out_dir=tmp_path, chunk_size=2, mesh=run_mesh(1))
    with pytest.raises(ValueError, match="holds a different sweep"):
        sweep(lambda v: v + 1, x, name="b", out_dir=tmp_path, chunk_size=2, mesh=run_mesh(1))
    with pytest.raises(ValueError, match="holds a different sweep"):
        sweep(lambda v: v + 1, x + 1, name="a", out_dir=tmp_path, chunk_size=2, mesh=run_mesh(1))


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
    np.testing.assert_allclose(res.outputs["log"][[0, 2]], [0.0, np.log(2.0)], rtol=1e-15)


def test_sweep_rejects_bad_input():
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
