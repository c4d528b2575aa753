"""Benchmark: reduced flow vs jitted full-parameter JAX flow vs a PyTorch CPU loop; vmap sweeps.

Not part of the main job (``python -m experiments bench``; several minutes). float32 throughout.
Timings depend on the machine and its load: the JSON records the load average before and after.
See docs/performance.md for how to read the numbers and sims/benchmark.py for what is timed.
"""

from __future__ import annotations

import dataclasses
import gc
import os
from dataclasses import dataclass

import jax
import matplotlib.pyplot as plt
import numpy as np

from experiments import _bench as bm
from experiments._common import experiment_main, progress, provenance
from sims.sweep import sharded_runner

NAME = "bench"


@dataclass(frozen=True)
class Config:
    """Benchmark grid and time boxes."""

    vocab_sizes: tuple[int, ...] = (1000, 32000, 128256)  # V values
    hidden_sizes: tuple[int, ...] = (256, 2048, 4096)  # d values
    reduced_steps: int = 100_000  # Euler steps of each timed reduced flow
    reduced_checkpoints: int = 100  # full-vocabulary log-prob checkpoints per reduced flow
    budget_s: float = 2.0  # target seconds of one timed call of a slow baseline
    min_steps: int = 2  # fewest timed steps of a baseline
    max_steps: int = 2000  # most timed steps of a baseline
    repeats: int = 2  # timed calls per measurement (minimum taken)
    sweep_runs: int = 256  # trajectories of the generic vmap sweep
    sweep_vocab: int = 1000  # V of the sweep
    sweep_hidden: int = 256  # d of the sweep
    sweep_steps: int = 500  # Euler steps per trajectory (amortises the random init)
    sweep_batch_size: int = 4  # trajectories vmapped together per device (lax.map batch)
    torch_sweep_runs: int = 8  # trajectories timed for the PyTorch per-trajectory loop
    # PyTorch intra-op threads. 1: on the shared 2-core machine, 2 OpenMP threads spin-waited and
    # collapsed (measured 14 vs 260-540 steps/s at V=1000, d=256), which would flatter the ratios
    torch_threads: int = 1
    seed: int = 0  # geometry seed

    @classmethod
    def smoke(cls) -> Config:
        return cls(
            vocab_sizes=(64,),
            hidden_sizes=(8,),
            reduced_steps=200,
            reduced_checkpoints=4,
            budget_s=0.05,
            min_steps=2,
            max_steps=20,
            repeats=1,
            sweep_runs=8,
            sweep_vocab=64,
            sweep_hidden=8,
            sweep_steps=5,
            sweep_batch_size=2,
            torch_sweep_runs=2,
        )


def _cell(config: Config, V: int, d: int) -> dict:
    W, H = bm.random_geometry(V, d, config.seed)
    box = dict(
        budget_s=config.budget_s,
        min_steps=config.min_steps,
        max_steps=config.max_steps,
        repeats=config.repeats,
    )
    cell = {"V": V, "d": d}
    cell["reduced"] = bm.reduced_rate(
        W,
        H,
        num_steps=config.reduced_steps,
        num_checkpoints=config.reduced_checkpoints,
        repeats=config.repeats,
    )
    cell["jax_full"] = bm.full_jax_rate(W, H, **box)
    if bm.torch_available():
        W_np, H_np = np.array(W), np.array(H)
        del W, H  # one copy of a 2 GB W at a time
        gc.collect()
        cell["torch"] = bm.torch_rate(W_np, H_np, **box)
        torch_rate = cell["torch"]["steps_per_s"]
        cell["reduced_over_torch"] = cell["reduced"]["steps_per_s"] / torch_rate
        cell["jax_full_over_torch"] = cell["jax_full"]["steps_per_s"] / torch_rate
    cell["reduced_over_jax_full"] = cell["reduced"]["steps_per_s"] / cell["jax_full"]["steps_per_s"]
    progress(
        f"[bench] V={V} d={d}: reduced {cell['reduced']['steps_per_s']:.3g} steps/s "
        f"({cell['reduced']['wall_s']:.3f} s), jax full {cell['jax_full']['steps_per_s']:.3g}, "
        f"torch {cell.get('torch', {}).get('steps_per_s', float('nan')):.3g}"
    )
    return cell


def run(config: Config) -> dict:
    load_before = os.getloadavg()
    if bm.torch_available():
        __import__("torch").set_num_threads(config.torch_threads)
    cells = [_cell(config, V, d) for V in config.vocab_sizes for d in config.hidden_sizes]
    gc.collect()
    run_fn = bm.generic_run_fn(config.sweep_vocab, config.sweep_hidden, config.sweep_steps)
    sweep_fn = sharded_runner(run_fn, batch_size=config.sweep_batch_size)
    seeds = np.arange(config.sweep_runs, dtype=np.uint32)
    sample = sweep_fn(seeds)  # compile
    wall = bm.best_time(lambda: sweep_fn(seeds), repeats=config.repeats)
    sweep = {
        "runs": config.sweep_runs,
        "steps": config.sweep_steps,
        "devices": jax.device_count(),
        "trajectory_steps_per_s": config.sweep_runs * config.sweep_steps / wall,
    }
    if bm.torch_available():
        sweep["torch"] = bm.torch_sweep_rate(
            config.sweep_vocab,
            config.sweep_hidden,
            num_runs=config.torch_sweep_runs,
            num_steps=config.sweep_steps,
            repeats=config.repeats,
        )
        sweep["over_torch"] = (
            sweep["trajectory_steps_per_s"] / sweep["torch"]["trajectory_steps_per_s"]
        )
    progress(
        f"[bench] sweep: {sweep['trajectory_steps_per_s']:.3g} trajectory-steps/s, "
        f"x{sweep.get('over_torch', float('nan')):.3g} over torch"
    )
    big = max(cells, key=lambda c: (c["V"] * c["d"], c["V"]))
    targets = {
        "largest_cell": [big["V"], big["d"]],
        "reduced_wall_s": big["reduced"]["wall_s"],
        "reduced_wall_le_2s": big["reduced"]["wall_s"] <= 2.0,
        "reduced_over_torch_ge_1e4": big.get("reduced_over_torch", 0.0) >= 1e4,
        "sweep_over_torch_ge_5": sweep.get("over_torch", 0.0) >= 5.0,
    }
    prov = provenance(dtype_of=sample)
    prov["torch"] = __import__("torch").__version__ if bm.torch_available() else "not installed"
    prov["cpu_count"] = os.cpu_count()
    return {
        "config": dataclasses.asdict(config),
        "cells": cells,
        "sweep": sweep,
        "targets": targets,
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "provenance": prov,
    }


def plot(results: dict) -> plt.Figure:
    cells = results["cells"]
    labels = [f"{c['V']}x{c['d']}" for c in cells]
    x = np.arange(len(cells))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    series = [
        ("reduced", "reduced flow"),
        ("jax_full", "JAX full-parameter"),
        ("torch", "PyTorch loop"),
    ]
    for i, (key, label) in enumerate(series):
        rates = [c[key]["steps_per_s"] if key in c else np.nan for c in cells]
        ax.bar(x + (i - 1) * 0.27, rates, 0.27, label=label)
    ax.set(yscale="log", ylabel="steps / s (float32, CPU)", xticks=x, title="one DPO pair")
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.legend(fontsize=8)
    sweep = results["sweep"]
    names = ["vmap sweep", "PyTorch loop"]
    rates = [
        sweep["trajectory_steps_per_s"],
        sweep.get("torch", {}).get("trajectory_steps_per_s", np.nan),
    ]
    ax2.bar(names, rates, color=["C0", "C2"])
    ax2.set(
        yscale="log",
        ylabel="trajectory-steps / s",
        title=f"{sweep['runs']} runs, V={results['config']['sweep_vocab']}",
    )
    fig.tight_layout()
    return fig


def _summary(results: dict) -> str:
    t = results["targets"]
    return (
        f"reduced wall at {t['largest_cell']}: {t['reduced_wall_s']:.3f} s; targets met: "
        f"<=2s {t['reduced_wall_le_2s']}, >=1e4x torch {t['reduced_over_torch_ge_1e4']}, "
        f"sweep >=5x torch {t['sweep_over_torch_ge_5']}"
    )


def main(argv=None) -> dict:
    # float32 benchmark: x64 is left as the caller set it; every array here is created float32
    return experiment_main(NAME, Config, run, plot, argv, summary=_summary)


if __name__ == "__main__":
    main()
