"""Benchmark: reduced flow vs full-parameter JAX vs a PyTorch CPU loop; sweeps; roofline.

Not part of the main job (``python -m experiments bench``; several minutes). float32 throughout.
Timings depend on the machine and its load: the JSON records the load average before and after.
See docs/performance.md; what is timed: experiments/framework/bench_flows.py and roofline.py.
``main`` makes one JAX CPU device per core (``jax_num_cpu_devices``) for the sweep.
"""

from __future__ import annotations

import dataclasses
import gc
import os
from dataclasses import dataclass

import jax
import matplotlib.pyplot as plt
import numpy as np

from experiments.framework import (
    ExperimentConfig,
    cli,
    each,
    experiment_main,
    nonnegative_int,
    progress,
    provenance,
)
from experiments.framework import bench_flows as bm
from experiments.framework import roofline as rf

NAME = "bench"


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """Benchmark grid and time boxes."""

    vocab_sizes: tuple[int, ...] = (1000, 32000, 128256)  # V values
    hidden_sizes: tuple[int, ...] = (256, 2048, 4096)  # d values
    reduced_steps: int = 100_000  # Euler steps of each timed reduced flow
    reduced_checkpoints: int = 100  # full-vocabulary log-prob checkpoints per reduced flow
    budget_s: float = 2.0  # target seconds of one timed call of a slow baseline
    min_steps: int = 2  # fewest timed steps of a baseline
    max_steps: int = 2000  # most timed steps of a baseline
    repeats: int = 2  # timed calls per measurement (minimum taken)
    sweep_runs: int = 256  # trajectories of the generic sweep (DPO + SFT term, random inits)
    sweep_vocab: int = 1000  # V of the sweep
    sweep_hidden: int = 256  # d of the sweep
    sweep_steps: int = 500  # Euler steps per trajectory (amortises the random init)
    # low-rank sweep: trajectories vmapped together per device (1: one after another, lax.map
    # without a batch; a vmap of 2 or 4 keeps that many W in cache at once)
    sweep_batch_size: int = 1
    sweep_fold_every: int = 16  # low-rank sweep: steps between folds of the factors into W
    # interleaved timed calls of each sweep and of its torch loop (the fastest of each counts:
    # under a varying load each side's least disturbed call is the comparable one)
    sweep_repeats: int = 3
    autodiff_batch_size: int = 4  # autodiff sweep: vmap batch per device (its best, per notes)
    torch_sweep_runs: int = 8  # trajectories timed for the PyTorch per-trajectory loop
    # PyTorch intra-op threads of the single-trajectory cells. 1: on the shared 2-core machine,
    # 2 OpenMP threads spin-waited and collapsed (14 vs 260-540 steps/s at V=1000, d=256)
    torch_threads: int = 1
    # the sweep's PyTorch loop is timed with each of these thread counts; the fastest is the
    # baseline (0: one per core)
    torch_sweep_threads: tuple[int, ...] = (1, 0)
    peaks_scale: float = 1.0  # size factor of the roofline kernels (machine_peaks)
    peaks_repeats: int = 5  # timed calls of each roofline kernel (the fastest counts)
    seed: int = 0  # geometry seed

    RULES = {"torch_sweep_threads": each(nonnegative_int)}

    @classmethod
    def smoke(cls) -> Config:
        small = dict(vocab_sizes=(64,), hidden_sizes=(8,), reduced_steps=200, repeats=1)
        small |= dict(reduced_checkpoints=4, budget_s=0.05, min_steps=2, max_steps=20)
        small |= dict(sweep_runs=8, sweep_vocab=64, sweep_hidden=8, sweep_steps=5)
        small |= dict(sweep_batch_size=2, sweep_fold_every=2, sweep_repeats=1)
        small |= dict(autodiff_batch_size=2, torch_sweep_runs=2, peaks_scale=0.02)
        return cls(**small, peaks_repeats=1)


def run(config: Config) -> dict:
    load_before = os.getloadavg()
    if bm.torch_available():
        __import__("torch").set_num_threads(config.torch_threads)
    cells = [bm.bench_cell(config, V, d) for V in config.vocab_sizes for d in config.hidden_sizes]
    gc.collect()
    peaks_before = rf.machine_peaks(repeats=config.peaks_repeats, scale=config.peaks_scale)
    sweep = bm.sweep_rates(config)
    roofline = rf.roofline(config, sweep, peaks_before)
    targets = bm.bench_targets(cells, sweep)
    prov = provenance(dtype_of=np.zeros(0, sweep["dtype"]))  # the sweeps' computed dtype
    prov["torch"] = __import__("torch").__version__ if bm.torch_available() else "not installed"
    prov["cpu_count"] = os.cpu_count()
    return {
        "config": dataclasses.asdict(config),
        "cells": cells,
        "sweep": sweep,
        "roofline": roofline,
        "targets": targets,
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "provenance": prov,
    }


def plot(results: dict) -> plt.Figure:
    cells = results["cells"]
    labels = [f"{c['V']}x{c['d']}" for c in cells]
    x = np.arange(len(cells))
    fig, (ax, ax2, ax3) = plt.subplots(
        1, 3, figsize=(15, 4.4), gridspec_kw={"width_ratios": [3, 1.2, 1.4]}
    )
    series = [("reduced", "reduced flow"), ("jax_full", "JAX full-parameter")]
    series.append(("torch", "PyTorch loop"))
    for i, (key, label) in enumerate(series):
        rates = [c[key]["steps_per_s"] if key in c else np.nan for c in cells]
        ax.bar(x + (i - 1) * 0.27, rates, 0.27, label=label)
    ax.set(yscale="log", ylabel="steps / s (float32, CPU)", xticks=x, title="one DPO pair")
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.legend(fontsize=8)
    bm.sweep_panel(ax2, results["sweep"])
    rf.roofline_panel(ax3, results["roofline"])
    fig.tight_layout()
    return fig


def _summary(results: dict) -> str:
    t = results["targets"]
    return (
        f"reduced wall at {t['largest_cell']}: {t['reduced_wall_s']:.3f} s; targets met: "
        f"<=1s {t['reduced_wall_le_1s']}, >=1e4x torch {t['reduced_over_torch_ge_1e4']}, "
        f"sweep >=10x torch {t['sweep_over_torch_ge_10']}"
    )


def main(argv=None) -> dict:
    # one CPU device per core, so that the sweep can shard its runs over every core; only possible
    # before JAX starts its backend (else the devices stay as they are; the JSON records them)
    try:
        jax.config.update("jax_num_cpu_devices", os.cpu_count())
    except RuntimeError:
        progress(f"[bench] JAX already started: the sweep uses its {jax.device_count()} device(s)")
    # float32 benchmark: x64 is left as the caller set it; every array here is created float32
    return experiment_main(NAME, Config, run, plot, argv, summary=_summary)


if __name__ == "__main__":
    cli(main)
