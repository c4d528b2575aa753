"""Stages of :mod:`experiments.accelerator_check`, each run in a child process with a time limit.

A stage is a module-level function ``stage(**kwargs) -> dict`` (JSON-ready). :func:`in_child`
runs it in a fresh ``spawn`` process, so that every stage initialises the accelerator itself and
gives its memory back when it ends (JAX preallocates most of a GPU's memory per process), an
out-of-memory crash or a hang costs only that stage, and the parent can stop it when the budget
runs out. The parent process never touches the accelerator.
"""

from __future__ import annotations

import importlib
import multiprocessing
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

#: Seconds a stopped child gets to exit after SIGTERM before it is killed.
TERMINATE_GRACE_S = 10.0


def _child(conn, stage: Callable[..., dict], kwargs: dict) -> None:
    from experiments.framework import sigterm_raises

    try:
        with sigterm_raises():  # stopped at its time limit: temporary folders are removed
            conn.send(("ok", stage(**kwargs)))
    except BaseException as err:  # noqa: BLE001 -- reported to the parent, whatever it was
        conn.send(("failed", f"{type(err).__name__}: {err}\n{traceback.format_exc()[-4000:]}"))
    finally:
        conn.close()


def in_child(stage: Callable[..., dict], timeout_s: float, **kwargs: Any) -> dict:
    """Run ``stage(**kwargs)`` in a spawned process for at most ``timeout_s`` seconds.

    Returns:
      ``{"status": "ok", "wall_s": ..., "result": {...}}``; or ``status`` ``"failed"`` with
      ``error`` (the exception and the end of its traceback, or the exit code of a process that
      died, e.g. killed for memory), or ``"timed out"`` (stopped at ``timeout_s``).
    """
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(send, stage, kwargs), daemon=True)
    start = time.perf_counter()
    process.start()
    send.close()
    status, payload = "timed out", None
    if receive.poll(max(timeout_s, 0.0)):
        try:
            status, payload = receive.recv()
        except EOFError:  # the child died without answering
            process.join(TERMINATE_GRACE_S)
            status, payload = "failed", f"child process exited with code {process.exitcode}"
    wall = time.perf_counter() - start
    process.join(TERMINATE_GRACE_S if status != "timed out" else 0.0)
    if process.is_alive():
        process.terminate()
        process.join(TERMINATE_GRACE_S)
        if process.is_alive():
            process.kill()
            process.join()
    out: dict[str, Any] = {"status": status, "wall_s": wall}
    if status == "ok":
        out["result"] = payload
    elif status == "failed":
        out["error"] = payload
    return out


def device_info() -> dict:
    """The first local device: platform, kind and memory limit (``None`` when not reported)."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "bytes_limit": (stats or {}).get("bytes_limit"),
    }


def device_stage() -> dict:
    """The accelerator: platform, kind, device counts, memory limit, versions."""
    info = device_info()
    info["local_device_count"] = jax.local_device_count()
    info["process_count"] = jax.process_count()
    info["jax"] = jax.__version__
    info["devices"] = [str(d) for d in jax.local_devices()]
    return info


def bench_stage(config: Any, out_dir: str) -> dict:
    """:mod:`experiments.bench` with ``config`` (its PNG + JSON written to ``out_dir``); returns
    the single-trajectory rates, the sweep rates and the targets."""
    from experiments import bench
    from experiments.framework import save

    results = bench.run(config)
    png, js = save("bench", results, bench.plot(results), out_dir)
    cells = [
        {
            "V": c["V"],
            "d": c["d"],
            **{
                f"{k}_steps_per_s": c[k]["steps_per_s"]
                for k in ("reduced", "jax_full", "torch")
                if k in c
            },
        }
        for c in results["cells"]
    ]
    sweep = {
        k: results["sweep"][k]["trajectory_steps_per_s"]
        for k in ("lowrank", "autodiff")
        if k in results["sweep"]
    }
    return {"json": str(js), "cells": cells, "sweep_trajectory_steps_per_s": sweep,
            "targets": results["targets"]}  # fmt: skip


def sweep_stage(
    *, runs_per_device: int, vocab: int, hidden: int, num_steps: int, repeats: int
) -> dict:
    """A sharded sweep over every local device: the exact low-rank DPO + SFT flow
    (:func:`experiments._bench.lowrank_run_fn`), ``R = devices x runs_per_device`` random
    trajectories, one at a time per device.

    Returns the first call's wall time (compile + run), the best of ``repeats`` repeat calls
    (trajectory-steps per second), the same on one device (the speed-up of sharding), the run
    statuses of :func:`sims.flows.sweep.sweep`, and the largest difference of the sharded final
    margins
    from a plain ``jax.vmap`` on one device (runs are independent: expected 0 up to the
    backend's batching).
    """
    from experiments._bench import lowrank_run_fn
    from sims.flows.sweep import run_mesh, sharded_runner, sweep

    n = jax.device_count()
    R = n * runs_per_device
    seeds = np.arange(R, dtype=np.uint32)
    run_fn = lowrank_run_fn(vocab, hidden, num_steps, 16)
    out: dict[str, Any] = {"devices": n, "runs": R, "steps": num_steps, "V": vocab, "d": hidden}
    for label, mesh in (("all_devices", run_mesh()), ("one_device", run_mesh(1))):
        runner = sharded_runner(run_fn, mesh=mesh)
        start = time.perf_counter()
        margins = np.asarray(runner(seeds))
        first = time.perf_counter() - start
        best = min(_timed(lambda r=runner: r(seeds)) for _ in range(repeats))
        out[label] = {
            "first_call_s": first,
            "best_call_s": best,
            "trajectory_steps_per_s": R * num_steps / best,
        }
        if label == "all_devices":
            sharded = margins
    out["speedup_all_over_one"] = (
        out["one_device"]["best_call_s"] / out["all_devices"]["best_call_s"]
    )
    result = sweep(run_fn, seeds, name="accelerator_check", chunk_size=R)
    out["sweep_status"] = result.summary()
    check = min(R, 8)
    plain = np.asarray(jax.jit(jax.vmap(run_fn))(seeds[:check]))
    out["sharded_vs_vmap_max_abs_diff"] = float(np.max(np.abs(sharded[:check] - plain)))
    out["dtype"] = str(sharded.dtype)
    return out


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    np.asarray(fn())  # host copy: waits for the devices
    return time.perf_counter() - start


def estimate_stage(names: list[str], smoke: bool) -> dict:
    """No up-front estimate: each ``--scale`` run prints the device memory of every flow it is
    about to run (:func:`sims.flows.core.report_memory`); an experiment that does not fit fails
    alone in its own process."""
    return {name: None for name in names}


def experiment_stage(name: str, smoke: bool, out_dir: str) -> dict:
    """Run experiment ``name`` on its ``--scale`` config (``--smoke`` if ``smoke``) and write its
    PNG + JSON into ``out_dir``, as ``python -m experiments.<name> --scale --out <out_dir>`` does
    (without printing the memory estimate again: :func:`estimate_stage` made it)."""
    from experiments.framework import save

    module = importlib.import_module(f"experiments.{name}")
    config = module.Config.smoke() if smoke else module.Config.scaled()
    results = module.run(config)
    png, js = save(name, results, module.plot(results), out_dir)
    return {"json": str(js), "png": str(png)}
