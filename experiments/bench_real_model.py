"""Benchmark: the real-model DPO step, this project (JAX) against PyTorch + transformers.

Not in the main job (``python -m experiments bench_real_model``; ~11 min on 2 cores). Both
sides run one DPO step (beta 0.1, RMSprop, lr 1e-7) on one GGUF file (transformers reads it with
``gguf_file=``), float32, at the persona shape (B = 1 pair, T = 24) and the multi-token one (B =
8, T = 256), timed interleaved (experiments/framework/benchmarking.py). JAX uses the packed
layout (``sims.models.transformer.PackedPairs``: the shared prompt once, logits only where a
response token is predicted; ``--layout plain``: two batches, logits everywhere, as PyTorch
does). Per shape: steps/s of each side and their ratio, first calls (JAX: trace + compile +
one step), XLA's memory analysis against the floor (parameters, gradients, RMSprop state, a
rematerialised backward's activations), the roofline position (matrix-product flops counted
by ``benchmarking.step_flops`` over the step time, against the measured matrix-product rate).
Targets (issue 22): >= 2x PyTorch at both shapes, first call <= 20 s. JSON: the load average.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from experiments.framework import ExperimentConfig, cli, existing_path, experiment_main, one_of
from experiments.framework import benchmarking as bm
from experiments.framework.output import progress, provenance
from experiments.framework.roofline import machine_peaks
from sims.checkpoints import load_causal_lm
from sims.checkpoints.packaged import resolve_model

NAME = "bench_real_model"


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """Real-model DPO step: JAX vs PyTorch + transformers on one GGUF file."""

    model: str = "smollm2"  # .gguf file or packaged name; "" = a tiny random GGUF (smoke)
    shapes: tuple[str, ...] = ("1x24", "8x256")  # BxT: pairs x tokens per sequence
    n1: int = 2  # JAX: steps of the shorter timed run (the step is the difference of two runs)
    n2: int = 6  # JAX: steps of the longer timed run
    torch_steps: int = 3  # PyTorch: steps per timed call
    repeats: int = 2  # timed rounds, both sides interleaved (the fastest round counts)
    torch_threads: int = 0  # PyTorch intra-op threads (0: its default, one per core)
    layout: str = "packed"  # JAX pairs: "packed" (shared prompt once) or "plain" (two batches)

    RULES = {"model": existing_path(allow=("", "smollm2")), "layout": one_of(("packed", "plain"))}

    @classmethod
    def smoke(cls) -> Config:
        return cls(model="", shapes=("1x8", "2x16"), n1=1, n2=8, torch_steps=1, repeats=1)


def _tiny_gguf(folder: Path) -> Path:
    from sims.checkpoints.gguf import save_gguf
    from sims.models.decoder import DecoderConfig, init_decoder

    config = DecoderConfig.llama(64, hidden_size=16, num_heads=2, num_layers=2, tied=True)
    return save_gguf(init_decoder(config, seed=0), folder / "tiny.gguf")


def run(config: Config) -> dict:
    load_before = bm.load_average()
    with tempfile.TemporaryDirectory() as tmp:
        path = _tiny_gguf(Path(tmp)) if not config.model else resolve_model(config.model)
        model = load_causal_lm(path)
        cells, layout = [], {"packed": config.layout == "packed"}
        for shape in config.shapes:
            B, T = (int(v) for v in shape.split("x"))
            progress(f"[{NAME}] B={B} T={T}: first calls, then {config.repeats} timed rounds")
            pairs = bm.bench_pairs(model, B, T, **layout)  # the JAX step's and its flop count's
            jax_side = bm.jax_side(model, pairs, n1=config.n1, n2=config.n2)
            torch_side = None
            if bm.torch_available():
                torch_side = bm.torch_side(path, B, T, n=config.torch_steps,
                                           threads=config.torch_threads)  # fmt: skip
            jx, tx = bm.compare_steps(jax_side, torch_side, repeats=config.repeats)
            ref = jx.pop("ref_logprobs")  # the reference log-probs of both sides: one model?
            cell = {"B": B, "T": T, "jax": jx, "floor": bm.memory_floor(model, B, T, **layout)}
            cost = bm.step_cost(model, pairs)
            peak = machine_peaks(repeats=2, scale=1.0 if config.model else 0.05)["flop_rate"]
            rate = cost["flops"] / jx["step_s"]  # against the peak measured after the rounds
            cell["roofline"] = cost | {"flop_rate": rate, "peak_flop_rate": peak}
            cell["roofline"]["fraction_of_peak_flop_rate"] = rate / peak["all_devices"]
            if tx is not None:
                cell["torch"], cell["jax_over_torch"] = tx, tx["step_s"] / jx["step_s"]
                cell["jax_over_torch_upper_bound_step"] = tx["step_s"] / jx["step_upper_bound_s"]
                diff = np.abs(np.subtract(tx.pop("ref_logprobs"), ref))
                cell["max_abs_logprob_difference"] = float(np.max(diff))
            progress(f"[{NAME}] B={B} T={T}: {_cell_line(cell)}")
            cells.append(cell)
    return {
        "config": dataclasses.asdict(config),
        "model": str(path) if config.model else "tiny random GGUF (smoke)",
        "cells": cells,
        "targets": {
            "jax_over_torch_ge_2_every_shape": all(c.get("jax_over_torch", 0) >= 2 for c in cells),
            "first_call_le_20s_every_shape": all(c["jax"]["first_call_s"] <= 20 for c in cells),
        },
        "load_average_before": load_before,
        "load_average_after": bm.load_average(),
        "provenance": provenance(dtype_of=np.zeros(0, np.float32)),
    }


def _cell_line(c: dict) -> str:
    j = c["jax"]
    line = f"JAX {j['steps_per_s']:.3g} steps/s (first call {j['first_call_s']:.1f} s)"
    if "torch" in c:
        line += f", torch {c['torch']['steps_per_s']:.3g}/s, x{c['jax_over_torch']:.2f}"
    return line + f"; {c['roofline']['fraction_of_peak_flop_rate']:.2f} of the peak flop rate"


def plot(results: dict) -> plt.Figure:
    cells = results["cells"]
    labels = [f"B={c['B']}, T={c['T']}" for c in cells]
    x = np.arange(len(cells))
    fig, (a, b, m) = plt.subplots(1, 3, figsize=(14, 4))
    a.bar(x - 0.2, [c["jax"]["steps_per_s"] for c in cells], 0.4, label="JAX (this project)")
    a.bar(x + 0.2, [c.get("torch", {}).get("steps_per_s", np.nan) for c in cells], 0.4,
          label="PyTorch + transformers")  # fmt: skip
    a.set(yscale="log", ylabel="DPO steps / s (float32)", xticks=x, xticklabels=labels)
    a.legend(fontsize=8)
    b.bar(x - 0.2, [c["jax"]["first_call_s"] for c in cells], 0.4, label="JAX (compile + step)")
    b.bar(x + 0.2, [c.get("torch", {}).get("first_call_s", np.nan) for c in cells], 0.4,
          label="PyTorch")  # fmt: skip
    b.axhline(20, color="k", lw=0.5)
    b.set(ylabel="first call (s)", xticks=x, xticklabels=labels)
    b.legend(fontsize=8)
    m.bar(x - 0.2, [c["jax"]["memory"]["peak"] / 2**30 for c in cells], 0.4, label="XLA")
    m.bar(x + 0.2, [c["floor"]["total"] / 2**30 for c in cells], 0.4, label="floor")
    m.set(ylabel="GiB", xticks=x, xticklabels=labels, title="step memory")
    m.legend(fontsize=8)
    fig.suptitle(Path(results["model"]).name)
    fig.tight_layout()
    return fig


def _summary(r: dict) -> str:
    return "; ".join(f"B={c['B']} T={c['T']}: {_cell_line(c)}" for c in r["cells"])


def main(argv=None) -> dict:
    return experiment_main(NAME, Config, run, plot, argv, summary=_summary)


if __name__ == "__main__":
    cli(main)
