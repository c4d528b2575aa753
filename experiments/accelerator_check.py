"""One command for a lent GPU/TPU: bench, a sharded sweep, memory estimates, the --scale runs.

``python -m experiments accelerator_check`` runs, within ``--budget-s`` seconds of wall clock:
the bench (:mod:`experiments.bench`, a reduced grid), a sharded sweep over every local device
(:func:`experiments._accelerator.sweep_stage`), the device-memory estimate of every ``--scale``
experiment (compiled ahead of time on the accelerator, :mod:`experiments._aot`), then the
``--scale`` experiments one by one. It writes ``<out>/accelerator_check.json`` (+ ``.png``): the
device kind, platform and counts, the bench's and the sweep's timings, the estimates (per
program), and per experiment its wall time or why it was skipped; the bench's and every finished
experiment's own PNG + JSON go to ``<out>/accelerator_check/`` (not over the main job's figures).

Every stage runs in its own process (:func:`experiments._accelerator.in_child`) with the budget
left as its time limit: a stage that runs past it is stopped ("timed out"), one that crashes
("failed", e.g. out of memory) costs only itself. An experiment is skipped when its estimated
peak memory exceeds the device's memory, or when less than ``min_experiment_s`` of the budget is
left. Experiments run in increasing order of the flops XLA counts in their programs: a proxy of
cost that orders them (a loop's body is counted once), not a prediction of their time.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from experiments import _accelerator as acc
from experiments import bench
from experiments.framework import (
    FIGURES_DIR,
    ExperimentConfig,
    cli,
    each,
    experiment_main,
    one_of,
    parse_config,
    progress,
    provenance,
)

NAME = "accelerator_check"
GIB = 2.0**30  # bytes per GiB
#: Every experiment with a ``--scale`` version (tests/test_aot.py keeps this list complete).
SCALED = (
    "real_token_geometry",
    "transformer_no_over_never",
    "transformer_ches",
    "transformer_unalignment",
    "kernel_theorem_check",
    "learned_features_no_over_never",
    "displacement_phase_diagram",
    "minilm_encoder_no_over_never",
)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """Bench, sharded sweep, memory estimates and --scale runs on a lent accelerator."""

    budget_s: float = 1500.0  # wall-clock seconds for the whole check (stages get what is left)
    min_experiment_s: float = 60.0  # an experiment starts only with this much budget left
    experiments: tuple = SCALED  # --scale experiments to estimate and run
    smoke_experiments: bool = False  # run the experiments' --smoke configs instead (CPU tests)
    bench_vocab_sizes: tuple = (1000, 32000, 128256)  # V of the bench's single-trajectory cells
    bench_hidden_sizes: tuple = (256, 4096)  # d of the bench's cells
    bench_smoke: bool = False  # the bench's --smoke config instead of the grid above
    sweep_runs_per_device: int = 64  # sharded sweep: trajectories per device
    sweep_vocab: int = 32000  # V of the sweep's trajectories
    sweep_hidden: int = 1024  # d of the sweep's trajectories
    sweep_steps: int = 500  # Euler steps per trajectory
    sweep_repeats: int = 3  # timed repeat calls of the sweep (the fastest counts)

    RULES = {"experiments": each(one_of(SCALED))}

    @classmethod
    def smoke(cls) -> Config:
        return cls(
            budget_s=240.0,
            min_experiment_s=5.0,
            experiments=("displacement_phase_diagram",),
            smoke_experiments=True,
            bench_smoke=True,
            sweep_runs_per_device=2,
            sweep_vocab=64,
            sweep_hidden=8,
            sweep_steps=5,
            sweep_repeats=1,
        )


def _bench_config(config: Config) -> bench.Config:
    if config.bench_smoke:
        return bench.Config.smoke()
    return bench.Config(
        vocab_sizes=config.bench_vocab_sizes, hidden_sizes=config.bench_hidden_sizes
    )


def _flops(estimate: dict | None) -> float:
    if not estimate:
        return float("inf")
    return float(sum(r.get("flops") or 0.0 for r in estimate["programs"]))


def run(config: Config, *, out_dir: str | Path = FIGURES_DIR / NAME) -> dict:
    start = time.perf_counter()

    def left() -> float:
        return config.budget_s - (time.perf_counter() - start)

    def stage(label, fn, **kwargs):
        out = acc.in_child(fn, left(), **kwargs)
        progress(f"[{NAME}] {label}: {out['status']} in {out['wall_s']:.1f} s")
        return out

    out = str(out_dir)
    device = stage("device", acc.device_stage)
    bench_out = stage("bench", acc.bench_stage, config=_bench_config(config), out_dir=out)
    sweep = stage(
        "sharded sweep", acc.sweep_stage, runs_per_device=config.sweep_runs_per_device,
        vocab=config.sweep_vocab, hidden=config.sweep_hidden, num_steps=config.sweep_steps,
        repeats=config.sweep_repeats,
    )  # fmt: skip
    names = list(config.experiments)
    estimates = stage("memory estimates", acc.estimate_stage, names=names,
                      smoke=config.smoke_experiments)  # fmt: skip
    found = estimates.get("result", {})
    limit = device.get("result", {}).get("bytes_limit")
    runs = {}
    for name in sorted(names, key=lambda n: _flops(found.get(n))):
        peak = (found.get(name) or {}).get("peak_bytes")
        if peak is not None and limit is not None and peak > limit:
            reason = f"estimated {peak / GIB:.1f} GiB > device memory {limit / GIB:.1f} GiB"
            runs[name] = {"status": "skipped", "reason": reason}
        elif left() < config.min_experiment_s:
            runs[name] = {"status": "skipped", "reason": f"budget: {max(left(), 0):.0f} s left"}
        else:
            runs[name] = stage(name, acc.experiment_stage, name=name,
                               smoke=config.smoke_experiments, out_dir=out)  # fmt: skip
        runs[name]["estimated_peak_bytes"] = peak
        if runs[name]["status"] == "skipped":
            progress(f"[{NAME}] {name}: skipped ({runs[name]['reason']})")
    return {
        "config": config,
        "budget_s": config.budget_s,
        "out_dir": out,
        "device": device,
        "bench": bench_out,
        "sweep": sweep,
        "memory": estimates,
        "experiments": runs,
        "elapsed_s": time.perf_counter() - start,
        "provenance": provenance(dtype_of=np.zeros(0, np.float32)),
    }


def plot(results: dict) -> plt.Figure:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5))
    runs = results["experiments"]
    names = list(runs)
    x = np.arange(len(names))
    peaks = [(runs[n]["estimated_peak_bytes"] or 0) / GIB for n in names]
    ax.bar(x, peaks, color="C0")
    limit = results["device"].get("result", {}).get("bytes_limit")
    if limit:
        ax.axhline(limit / GIB, color="k", ls="--", lw=0.8, label="device memory")
        ax.legend(fontsize=8)
    ax.set(ylabel="estimated peak (GiB)", title="memory estimate (ahead-of-time compile)")
    ax.set_xticks(x, names, rotation=35, ha="right", fontsize=7)
    stages = {"bench": results["bench"], "sweep": results["sweep"], "estimates": results["memory"]}
    stages.update(runs)
    colors = {"ok": "C2", "failed": "C3", "timed out": "C1", "skipped": "0.7"}
    labels = list(stages)
    bx.bar(
        np.arange(len(labels)),
        [s.get("wall_s", 0.0) for s in stages.values()],
        color=[colors[s["status"]] for s in stages.values()],
    )
    for i, s in enumerate(stages.values()):
        bx.text(i, 0, s["status"], rotation=90, va="bottom", ha="center", fontsize=7)
    bx.set_xticks(np.arange(len(labels)), labels, rotation=35, ha="right", fontsize=7)
    kind = results["device"].get("result", {}).get("device_kind", "?")
    bx.set(ylabel="wall time (s)", title=f"{kind}: stages within {results['budget_s']:g} s")
    fig.tight_layout()
    return fig


def _summary(r: dict) -> str:
    device = r["device"].get("result", {})
    counts = {}
    for v in r["experiments"].values():
        counts[v["status"]] = counts.get(v["status"], 0) + 1
    sweep = r["sweep"].get("result", {}).get("all_devices", {})
    return (
        f"{device.get('device_count', '?')} x {device.get('device_kind', '?')}: sweep "
        f"{sweep.get('trajectory_steps_per_s', float('nan')):.3g} trajectory-steps/s; "
        f"experiments {counts}; {r['elapsed_s']:.0f} s of {r['budget_s']:g} s"
    )


def main(argv=None) -> dict:
    config, out_dir = parse_config(Config, argv, prog=f"python -m experiments.{NAME}")
    run_fn = functools.partial(run, out_dir=Path(out_dir) / NAME)
    return experiment_main(NAME, Config, run_fn, plot, argv, summary=_summary)


if __name__ == "__main__":
    cli(main)
