"""Small sweeps for tests/test_sweep.py, importable and runnable in a subprocess.

``python tests/_sweep_job.py compare`` prints the device count and the largest difference between
the 8-device sharded run and a plain unsharded ``jax.vmap``;
``python tests/_sweep_job.py kill OUT K STAGE``
runs the chunked sweep into ``OUT`` and SIGKILLs itself at ``STAGE`` of chunk ``K``: ``saved``
(chunk and index written), ``writing`` (half of the chunk's bytes in its temporary file) or
``unindexed`` (chunk file in place, index not yet updated); it prints ``{"pid"}`` first;
``python tests/_sweep_job.py race OUT TAG SYNC``
waits until both racers (tags ``a`` and ``b``) are ready, then sweeps config ``TAG`` into ``OUT``;
the racer that gets the folder waits in its first ``on_chunk`` until the other has finished, so
the two always overlap. Prints ``{"pid", "outcome": "done" | "refused", "error"}``;
``python tests/_sweep_job.py x64off OUT`` resumes the tiny sweep ``a`` into ``OUT`` with
``jax_enable_x64`` off and prints the error it gets.
"""

import functools
import json
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sims.flows import sweep_store as store
from sims.flows.reduced import pair_index, reduced_flow_fn
from sims.flows.sweep import run_mesh, sharded_map, stack_runs, sweep
from sims.models.unconstrained import PreferencePairs
from theory.losses import dpo_loss

V, D = 64, 8  # vocabulary and hidden size of each run
NAME = "test-sweep-dpo-seeds-betas"
CHUNK_SIZE = 8
INDEX = pair_index(
    PreferencePairs(np.array([0, 1]), np.array([3, 4]), np.array([5, 3]), None, None)
)
TINY_CHUNK_SIZE = 4  # the tiny sweeps have 12 runs: 3 chunks
SYNC_TIMEOUT_S = 60.0  # longest wait for the other racer (a fresh JAX process on a loaded CPU)


def run_fn(x):
    """One run: random geometry from ``x["seed"]``, DPO with ``x["beta"]``, 200 Euler steps."""
    k_w, k_h = jax.random.split(jax.random.key(x["seed"]))
    W = jax.random.normal(k_w, (V, D)) / np.sqrt(D)
    H = jax.random.normal(k_h, (2, D)) / np.sqrt(D)
    loss = functools.partial(dpo_loss, beta=x["beta"])
    run = reduced_flow_fn(loss, INDEX, num_steps=200, record_every=50)
    res = run(W, H, jnp.zeros(2), jnp.zeros(2), 0.1)
    records = res.observables
    return {"loss": res.loss, "margin": records.margin, "final_logprobs": records.logprobs[-1]}


def inputs():
    """20 runs (5 seeds x 4 betas): 3 chunks of 8, the last one partial."""
    return stack_runs(seed=np.arange(5, dtype=np.uint32), beta=np.array([0.1, 0.5, 1.0, 2.0]))


def tiny_run_fn(x):
    """A run that compiles in milliseconds: two leaves from ``x["u"]`` and ``x["v"]``."""
    return {"sin": jnp.sin(x["u"]) * x["v"], "sum": x["u"] + x["v"]}


def tiny_config(tag: str) -> dict:
    """Name and inputs of tiny sweep ``tag`` ("a" or "b": different names and inputs)."""
    offset = {"a": 0.0, "b": 100.0}[tag]
    u = np.arange(12.0) + offset
    return {"name": f"tiny-{tag}", "inputs": {"u": u, "v": np.cos(u)}}


def tiny_sweep(tag: str, out_dir, **kwargs):
    """Sweep ``tiny_run_fn`` on config ``tag`` into ``out_dir`` (kwargs go to ``sweep``)."""
    config = tiny_config(tag)
    return sweep(
        tiny_run_fn,
        config["inputs"],
        name=config["name"],
        out_dir=out_dir,
        chunk_size=TINY_CHUNK_SIZE,
        **kwargs,
    )


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + SYNC_TIMEOUT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {SYNC_TIMEOUT_S} s")
        time.sleep(0.005)


def _kill(out, kill_after: int, stage: str) -> None:
    print(json.dumps({"pid": os.getpid()}), flush=True)  # the test names the temporary file
    target = f"chunk_{kill_after:05d}.npz"
    write_atomic = store.write_atomic

    def dying_write(path, data):
        if stage == "writing" and path.name == target:
            with open(store.tmp_path(path), "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        write_atomic(path, data)
        if stage == "unindexed" and path.name == target:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_chunk(k, num_chunks, computed):
        if stage == "saved" and computed and k == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    store.write_atomic = dying_write  # save_chunk and sweep look it up on the module
    sweep(run_fn, inputs(), name=NAME, out_dir=out, chunk_size=CHUNK_SIZE, on_chunk=on_chunk)


def _race(out, tag: str, sync: Path) -> None:
    other = {"a": "b", "b": "a"}[tag]
    (sync / f"ready_{tag}").touch()
    _wait_for(sync / f"ready_{other}")
    waited = []

    def hold_until_other_done(k, num_chunks, computed):
        if not waited:
            waited.append(k)
            _wait_for(sync / f"done_{other}")

    report = {"pid": os.getpid(), "outcome": "done", "error": None}
    try:
        tiny_sweep(tag, out, on_chunk=hold_until_other_done)
    except RuntimeError as e:
        report.update(outcome="refused", error=str(e))
    (sync / f"done_{tag}").touch()
    print(json.dumps(report))


def main(argv):
    if argv[0] != "x64off":
        jax.config.update("jax_enable_x64", True)
    if argv[0] == "compare":
        sharded = sharded_map(run_fn, inputs(), mesh=run_mesh(), batch_size=2)
        plain = jax.tree_util.tree_map(np.asarray, jax.jit(jax.vmap(run_fn))(inputs()))
        diff = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(
                jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(plain), strict=True
            )
        )
        print(json.dumps({"devices": jax.device_count(), "max_abs_diff": diff}))
    elif argv[0] == "kill":
        _kill(argv[1], int(argv[2]), argv[3])
    elif argv[0] == "race":
        _race(argv[1], argv[2], Path(argv[3]))
    elif argv[0] == "x64off":
        try:
            tiny_sweep("a", argv[1])
            report = {"x64": jax.config.jax_enable_x64, "error_type": None, "error": None}
        except ValueError as e:
            report = {"x64": jax.config.jax_enable_x64, "error_type": "ValueError", "error": str(e)}
        print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
