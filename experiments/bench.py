"""Benchmark: reduced flow vs full-parameter JAX vs a PyTorch CPU loop; sweeps; roofline.

Not part of the main job (``python -m experiments bench``; several minutes). float32 throughout.
Timings depend on the machine and its load: the JSON records the load average before and after.
See docs/performance.md for how to read the numbers, experiments/_bench.py for what is timed
and experiments/_roofline.py for the roofline.
``main`` makes one JAX CPU device per core (``jax_num_cpu_devices``) so that the sweep can use
every core; single-trajectory timings run on one device.
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
from experiments import _roofline as rf
from experiments.framework import (
    ExperimentConfig,
    cli,
    each,
    experiment_main,
    nonnegative_int,
    progress,
    provenance,
)

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
            sweep_fold_every=2,
            sweep_repeats=1,
            autodiff_batch_size=2,
            torch_sweep_runs=2,
            peaks_scale=0.02,
            peaks_repeats=1,
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
    peaks_before = rf.machine_peaks(repeats=config.peaks_repeats, scale=config.peaks_scale)
    sweep = bm.sweep_rates(config)
    roofline = rf.roofline(config, sweep, peaks_before)
    big = max(cells, key=lambda c: (c["V"] * c["d"], c["V"]))
    targets = {
        "largest_cell": [big["V"], big["d"]],
        "reduced_wall_s": big["reduced"]["wall_s"],
        "reduced_wall_le_1s": big["reduced"]["wall_s"] <= 1.0,
        "reduced_over_torch_ge_1e4": big.get("reduced_over_torch", 0.0) >= 1e4,
        "sweep_over_torch_ge_10": sweep.get("over_torch", 0.0) >= 10.0,
    }
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
    bars = [("low-rank", sweep["lowrank"]["trajectory_steps_per_s"])]
    bars.append(("autodiff", sweep["autodiff"]["trajectory_steps_per_s"]))
    for r in sweep.get("torch_variants", []):
        bars.append((f"torch {r['threads']}t", r["trajectory_steps_per_s"]))
    ax2.bar(
        [b[0] for b in bars], [b[1] for b in bars], color=["C0", "C1"] + ["C2"] * (len(bars) - 2)
    )
    ax2.set(
        yscale="log",
        ylabel="trajectory-steps / s",
        title=f"DPO + SFT sweep, {sweep['runs']} runs, {sweep['devices']} device(s)",
    )
    ax2.tick_params(axis="x", rotation=45)
    roof = results["roofline"]
    peaks = roof["peaks"]
    intensity = np.logspace(-2, 2, 50)
    flops = peaks["flop_rate"]["per_cpu_s"]
    for key, style in (("cache_bandwidth", "-"), ("dram_bandwidth", "--")):
        bw = peaks[key]["per_cpu_s"]
        label = f"{key.split('_')[0]} {bw / 1e9:.3g} GB/s"
        ax3.plot(intensity, np.minimum(flops, bw * intensity), "k" + style, lw=1, label=label)
    for key, color in (("lowrank", "C0"), ("autodiff", "C1")):
        ax3.plot(
            roof[key]["intensity"], roof[key]["flop_rate_per_core"], "o", color=color, label=key
        )
    ax3.set(
        xscale="log",
        yscale="log",
        xlabel="flop / byte",
        ylabel="flop / s per core (CPU time)",
        title="sweep roofline (one core)",
    )
    ax3.legend(fontsize=7)
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
