"""One command for a lent GPU/TPU: bench, a sharded sweep, a real-model DPO flow, the --scale runs.

``python -m experiments accelerator_check`` runs, within ``--budget-s`` seconds of wall clock, each
stage in its own process with the budget left as its time limit (one past it is stopped: "timed
out"; one that crashes, e.g. out of memory, "failed", costs only itself;
:mod:`experiments.framework.accelerator`): the device's description; the bench; a sharded sweep
over every local device; one DPO flow of the SmolLM2-135M-Instruct architecture in bfloat16 (``B``
pairs of ``T`` tokens, torch RMSprop): its device memory from its abstract program
(``Flow.memory()``), then a few steps on an accelerator; then the ``--scale`` experiments one by
one (skipped when less than ``min_experiment_s`` is left; each records the memory of every flow it
runs). Writes ``<out>/accelerator_check.json`` (+ ``.png``); the stages' own PNG + JSON go to
``<out>/accelerator_check/`` (not over the main job's figures).
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from experiments import bench
from experiments import framework as fw
from experiments.framework import accelerator as acc

NAME = "accelerator_check"
GIB = 2.0**30  # bytes per GiB
#: Every experiment with a ``--scale`` version.
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
class Config(fw.ExperimentConfig):
    """Bench, sharded sweep, real-model DPO step and --scale runs on a lent accelerator."""

    budget_s: float = 1500.0  # wall-clock seconds for the whole check (stages get what is left)
    min_experiment_s: float = 60.0  # an experiment starts only with this much budget left
    experiments: tuple = SCALED  # --scale experiments to run
    smoke_experiments: bool = False  # run the experiments' --smoke configs instead (CPU tests)
    bench_vocab_sizes: tuple = (1000, 32000, 128256)  # V of the bench's single-trajectory cells
    bench_hidden_sizes: tuple = (256, 4096)  # d of the bench's cells
    bench_smoke: bool = False  # the bench's --smoke config instead of the grid above
    sweep_runs_per_device: int = 64  # sharded sweep: trajectories per device
    sweep_vocab: int = 32000  # V of the sweep's trajectories
    sweep_hidden: int = 1024  # d of the sweep's trajectories
    sweep_steps: int = 500  # Euler steps per trajectory
    sweep_repeats: int = 3  # timed repeat calls of the sweep (the fastest counts)
    dpo_pairs: int = 8  # real-model DPO step: preference pairs B
    dpo_seq_len: int = 512  # real-model DPO step: tokens T per sequence (prompt: the first half)
    dpo_steps: int = 3  # real-model DPO step: RMSprop steps run
    dpo_num_layers: int = 0  # real-model DPO step: blocks kept; 0 = all 30
    dpo_on_cpu: bool = False  # run the DPO steps on a CPU too (else only on an accelerator)

    RULES = {"experiments": fw.each(fw.one_of(SCALED))}

    @classmethod
    def smoke(cls) -> Config:
        sweep = {"runs_per_device": 2, "vocab": 64, "hidden": 8, "steps": 5, "repeats": 1}
        dpo = {"pairs": 2, "seq_len": 16, "steps": 2, "num_layers": 1, "on_cpu": True}
        return cls(
            budget_s=300.0,
            min_experiment_s=5.0,
            experiments=("displacement_phase_diagram",),
            smoke_experiments=True,
            bench_smoke=True,
            **{f"sweep_{k}": v for k, v in sweep.items()},
            **{f"dpo_{k}": v for k, v in dpo.items()},
        )


def run(config: Config, *, out_dir: str | Path = fw.FIGURES_DIR / NAME) -> dict:
    stages = acc.Stages(config.budget_s, log=lambda line: fw.progress(f"[{NAME}] {line}"))
    grid = {"vocab_sizes": config.bench_vocab_sizes, "hidden_sizes": config.bench_hidden_sizes}
    bench_config = bench.Config.smoke() if config.bench_smoke else bench.Config(**grid)
    out, fields = str(out_dir), functools.partial(acc.prefixed, config)
    results = {
        "device": stages.run("device", acc.device_stage),
        "bench": stages.run("bench", acc.bench_stage, config=bench_config, out_dir=out),
        "sweep": stages.run("sharded sweep", acc.sweep_stage, **fields("sweep_")),
        "real_model_dpo": stages.run("real-model DPO", acc.dpo_step_stage, **fields("dpo_")),
    }
    runs = {}
    for name in config.experiments:
        kw = {"name": name, "smoke": config.smoke_experiments, "out_dir": out}
        runs[name] = stages.run(name, acc.experiment_stage, min_s=config.min_experiment_s, **kw)
    return {
        "config": config,
        "budget_s": config.budget_s,
        "out_dir": out,
        **results,
        "experiments": runs,
        "elapsed_s": stages.elapsed(),
        "provenance": fw.provenance(dtype_of=np.zeros(0, np.float32)),
    }


def plot(results: dict) -> plt.Figure:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5))
    dpo, device = results["real_model_dpo"].get("result", {}), results["device"].get("result", {})
    parts = ("arguments", "temporaries", "outputs", "peak")
    bars = {k: dpo.get("memory", {}).get(k, 0) for k in parts}
    bars["device peak (run)"] = dpo.get("device_peak_bytes") or 0
    ax.bar(list(bars), np.array(list(bars.values())) / GIB, color=["C0"] * 4 + ["C3"])
    if device.get("bytes_limit"):
        ax.axhline(device["bytes_limit"] / GIB, color="k", ls="--", lw=0.8, label="device memory")
        ax.legend(fontsize=8)
    shapes = dpo.get("shapes", {})
    title = f"DPO flow (Flow.memory): B={shapes.get('pairs')} pairs, T={shapes.get('seq_len')}"
    ax.set(ylabel="GiB", title=title)
    stages = {k: results[k] for k in ("bench", "sweep", "real_model_dpo")} | results["experiments"]
    kind = device.get("device_kind", "?")
    acc.plot_stages(bx, stages, f"{kind}: stages within {results['budget_s']:g} s")
    fig.tight_layout()
    return fig


def _summary(r: dict) -> str:
    device = r["device"].get("result", {})
    counts = dict(Counter(v["status"] for v in r["experiments"].values()))
    sweep = r["sweep"].get("result", {}).get("all_devices", {})
    dpo = r["real_model_dpo"].get("result", {})
    peak = dpo.get("memory", {}).get("peak", float("nan")) / GIB
    return (
        f"{device.get('local_device_count', '?')} x {device.get('device_kind', '?')}: sweep "
        f"{sweep.get('trajectory_steps_per_s', float('nan')):.3g} trajectory-steps/s; DPO flow "
        f"peak {peak:.2f} GiB, {dpo.get('steps_per_s', float('nan')):.3g} steps/s; "
        f"experiments {counts}; {r['elapsed_s']:.0f} s of {r['budget_s']:g} s"
    )


def main(argv=None) -> dict:
    _, out_dir = fw.parse_config(Config, argv, prog=f"python -m experiments.{NAME}")
    run_fn = functools.partial(run, out_dir=Path(out_dir) / NAME)
    return fw.experiment_main(NAME, Config, run_fn, plot, argv, summary=_summary)


if __name__ == "__main__":
    fw.cli(main)
