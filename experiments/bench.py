"""Benchmark: reduced flow vs full-parameter JAX vs a PyTorch CPU loop; sweeps; roofline.

Not part of the main job (``python -m experiments bench``; several minutes). float32 throughout.
Timings depend on the machine and its load: the JSON records the load average before and after.
See docs/performance.md for how to read the numbers and experiments/_bench.py for what is timed.
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
from experiments._common import experiment_main, progress, provenance

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


def _sweep(config: Config) -> dict:
    """Time the low-rank and autodiff sweeps and the PyTorch loop on the sweep's loss.

    The timed calls are interleaved (low-rank, autodiff, torch per thread count; repeated
    ``sweep_repeats`` times) and each side's fastest call counts, so that JAX and torch sample
    the same stretches of the shared machine's load.
    """
    V, d, n, R = config.sweep_vocab, config.sweep_hidden, config.sweep_steps, config.sweep_runs
    seeds = np.arange(R, dtype=np.uint32)
    sweep = {"runs": R, "steps": n, "devices": jax.device_count(), "loss": repr(bm.sweep_loss())}
    jax_paths = {
        "lowrank": (bm.lowrank_run_fn(V, d, n, config.sweep_fold_every), config.sweep_batch_size),
        "autodiff": (bm.autodiff_run_fn(V, d, n), config.autodiff_batch_size),
    }
    runners = {key: bm.sweep_runner(fn, b) for key, (fn, b) in jax_paths.items()}
    margins = {key: f(seeds) for key, f in runners.items()}  # compiles; host arrays: blocks
    times = {key: [] for key in runners}
    threads = [t or os.cpu_count() for t in config.torch_sweep_threads]
    torch_runs = {t: [] for t in threads} if bm.torch_available() else {}
    for _ in range(config.sweep_repeats):
        for key, f in runners.items():
            times[key].append(bm.best_wall_and_cpu(lambda f=f: f(seeds), repeats=1))
        for t in torch_runs:
            torch_runs[t].append(
                bm.torch_sweep_rate(
                    V,
                    d,
                    num_runs=config.torch_sweep_runs,
                    num_steps=n,
                    repeats=1,
                    threads=t,
                    budget_s=config.budget_s,
                )
            )
    for key, (_, b) in jax_paths.items():
        wall, cpu = min(w for w, _ in times[key]), min(c for _, c in times[key])
        sweep[key] = {
            "trajectory_steps_per_s": R * n / wall,
            "trajectory_steps_per_cpu_s": R * n / cpu,
            "wall_s": wall,
            "batch_size": b,
        }
    sweep["lowrank"]["fold_every"] = config.sweep_fold_every
    # float32 agreement of the two exact paths on every run (sums in different orders)
    sweep["lowrank_vs_autodiff_max_rel_diff"] = float(
        np.max(np.abs(margins["lowrank"] - margins["autodiff"]))
        / np.max(np.abs(margins["autodiff"]))
    )
    if torch_runs:
        runs = [
            {
                "threads": t,
                "runs": calls[0]["runs"],
                "trajectory_steps_per_s": max(c["trajectory_steps_per_s"] for c in calls),
                "trajectory_steps_per_cpu_s": max(c["trajectory_steps_per_cpu_s"] for c in calls),
            }
            for t, calls in torch_runs.items()
        ]
        sweep["torch_variants"] = runs
        sweep["torch"] = max(runs, key=lambda r: r["trajectory_steps_per_s"])
        torch_rate = sweep["torch"]["trajectory_steps_per_s"]
        sweep["over_torch"] = sweep["lowrank"]["trajectory_steps_per_s"] / torch_rate
        sweep["autodiff_over_torch"] = sweep["autodiff"]["trajectory_steps_per_s"] / torch_rate
        one_thread = [r for r in runs if r["threads"] == 1]
        if one_thread:  # one JAX device (core) against one torch thread
            sweep["over_torch_per_core"] = (
                sweep["lowrank"]["trajectory_steps_per_s"]
                / sweep["devices"]
                / one_thread[0]["trajectory_steps_per_s"]
            )
            # the same per second of CPU time: less sensitive to other jobs on the machine
            sweep["over_torch_per_cpu_s"] = (
                sweep["lowrank"]["trajectory_steps_per_cpu_s"]
                / one_thread[0]["trajectory_steps_per_cpu_s"]
            )
    progress(
        f"[bench] sweep: low-rank {sweep['lowrank']['trajectory_steps_per_s']:.3g} "
        f"trajectory-steps/s, autodiff {sweep['autodiff']['trajectory_steps_per_s']:.3g}, "
        f"x{sweep.get('over_torch', float('nan')):.3g} over torch"
    )
    return sweep


def _best_peaks(*measurements: dict) -> dict:
    """The larger of each measured rate: the machine's peak shows in its least disturbed run."""
    first = measurements[0]
    return {k: {f: max(m[k][f] for m in measurements) for f in first[k]} for k in first}


def _roofline(config: Config, sweep: dict, peaks_before: dict) -> dict:
    """Bytes and flops per trajectory-step, the machine's measured peaks, where the sweeps sit.

    Per core and per second of CPU time (sweep and peak kernels alike), which a shared machine's
    load disturbs far less than wall-clock rates; the peaks are measured before and after the
    sweep and the larger of the two counts (other jobs can still slow a core: the host's other
    tenants share its caches and memory).
    """
    peaks_after = bm.machine_peaks(repeats=config.peaks_repeats, scale=config.peaks_scale)
    peaks = _best_peaks(peaks_before, peaks_after)
    V, d = config.sweep_vocab, config.sweep_hidden
    roof = {"peaks": peaks, "peaks_before_sweep": peaks_before, "peaks_after_sweep": peaks_after}
    for key, cost in (
        ("lowrank", bm.lowrank_step_cost(V, d, config.sweep_fold_every)),
        ("autodiff", bm.autodiff_step_cost(V, d)),
    ):
        rate = sweep[key]["trajectory_steps_per_cpu_s"]  # per core while it computes
        roof[key] = {
            "flops_per_step": cost["flops"],
            "bytes_per_step": cost["bytes"],
            "intensity": cost["flops"] / cost["bytes"],
            "flop_rate_per_core": rate * cost["flops"],
            "bandwidth_per_core": rate * cost["bytes"],
            "fraction_of_flop_rate": rate * cost["flops"] / peaks["flop_rate"]["per_cpu_s"],
            "fraction_of_cache_bandwidth": rate
            * cost["bytes"]
            / peaks["cache_bandwidth"]["per_cpu_s"],
            "fraction_of_dram_bandwidth": rate
            * cost["bytes"]
            / peaks["dram_bandwidth"]["per_cpu_s"],
        }
    roof["lowrank"]["cost_source"] = "counted from the algorithm (bm.lowrank_step_cost)"
    roof["autodiff"]["cost_source"] = "XLA cost_analysis of one compiled step"
    progress(
        f"[bench] roofline per core: cache {peaks['cache_bandwidth']['per_cpu_s'] / 1e9:.3g} GB/s, "
        f"DRAM {peaks['dram_bandwidth']['per_cpu_s'] / 1e9:.3g} GB/s, "
        f"{peaks['flop_rate']['per_cpu_s'] / 1e9:.3g} GFLOP/s; low-rank sweep at "
        f"{roof['lowrank']['fraction_of_cache_bandwidth']:.2f} of the cache bandwidth, "
        f"{roof['lowrank']['fraction_of_flop_rate']:.2f} of the flop rate"
    )
    return roof


def run(config: Config) -> dict:
    load_before = os.getloadavg()
    if bm.torch_available():
        __import__("torch").set_num_threads(config.torch_threads)
    cells = [_cell(config, V, d) for V in config.vocab_sizes for d in config.hidden_sizes]
    gc.collect()
    peaks_before = bm.machine_peaks(repeats=config.peaks_repeats, scale=config.peaks_scale)
    sweep = _sweep(config)
    roofline = _roofline(config, sweep, peaks_before)
    big = max(cells, key=lambda c: (c["V"] * c["d"], c["V"]))
    targets = {
        "largest_cell": [big["V"], big["d"]],
        "reduced_wall_s": big["reduced"]["wall_s"],
        "reduced_wall_le_1s": big["reduced"]["wall_s"] <= 1.0,
        "reduced_over_torch_ge_1e4": big.get("reduced_over_torch", 0.0) >= 1e4,
        "sweep_over_torch_ge_10": sweep.get("over_torch", 0.0) >= 10.0,
    }
    prov = provenance("float32")
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
    main()
