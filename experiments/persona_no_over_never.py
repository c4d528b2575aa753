"""Table 1 protocol on a real checkpoint (default: the packaged SmolLM2-135M-Instruct).

Protocol (Razin et al. 2024 §3, App. H.1), choices fixed before the first DPO run on SmolLM2:
* Prompts: "ends justify the means" statements (sims.data.persona) in the paper's question, in
  the chat template (its default system prompt too); label words, maybe several tokens, follow.
* SFT: each trait-according prompt gets a random word of the No set {No, Never, Maybe, Perhaps},
  each other prompt one of the Yes set {Yes, Yeah, Sure, Certainly, Absolutely}; cross-entropy
  on the whole word, torch RMSprop, batch 32. Budget: the smallest number of epochs (at most
  ``sft_max_epochs``) that brings the mean probability of each prompt's trained set to >= 0.8.
  Amended before any DPO run (SFT outcomes only): at the paper's lr 1e-7 the mean set prob rose
  0.049 -> 0.065 in 3 epochs, at 1e-6 0.144 -> 0.270 in 6; the SFT lr is 1e-5 (usual at 135M).
* DPO (beta 0.1; lr 1e-7 and 10x) and IPO (tau 0.01; lr 1e-8 and 10x): one prompt per run, 100
  torch-RMSprop steps; rows No>Never, Yes>No, Never>No, Sure>Yes; a No-set y+ draws a trait-
  according prompt, a Yes-set y+ another. lr factors: SmolLM2 is 7-60x smaller than the paper's.
* Deviation, stated: if a row's runs start at mean pi(y+) < 0.5 after label-set SFT, the row is
  also run after SFT on y+ itself (its side's prompts all labelled y+, same budget rule on
  pi(y+)). Both are reported.
* Default (main job) amended after the first default run, for run time only (the criterion is
  unchanged): that run (label-set path, 32 statements per side, lr x1 and x10, 3 runs) took
  ~80 min on 2 loaded cores and every label-set row started below pi(y+) = 0.5 (uninformative;
  numbers in docs/findings.md). The default now runs the deviation's path only (``sft=y_pos``),
  16 statements per side, lr x1, 5 runs per row (the fewest that can give a verdict); ``--full``
  is the whole protocol above (label-set SFT first, both losses, lr x1 and x10, 10 runs).

Criterion (pre-registered; sims.protocols.persona.row_verdict): a row is "catastrophic
displacement reproduced" if it has >= 5 informative runs (stable: the loss fell at every step,
the paper's filter; and starting at pi(y+) >= 0.5), their mean largest decrease of pi(y+) is
>= 0.2, and in at least half of them a token of the opposite set (first tokens of its words'
case and leading-space variants) is among the top-3 gainers at step 5, 25 or 100; "benign
displacement" with the drop but not those gainers; else "not reproduced". Fewer than 5
informative runs: "uninformative" (a run starting below 0.5 is no evidence either way).
Controls: pi(y-) must fall and the loss fall in every stable run; Yes>No is the paper's benign
row. t = 0 predictor, also pre-registered: "some opposite-set token's first-step change exceeds
y+'s" by the kernel form with RMSprop's first-step preconditioner (matrix-free), against the
observed "an opposite-set token among the top-3 gainers at step 5": a confusion table.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np

from experiments.framework import (
    ExperimentConfig,
    cli,
    each,
    existing_path,
    experiment_main,
    nonnegative_int,
    one_of,
    progress,
    provenance,
)
from experiments.framework.plots import grouped_bars
from sims.checkpoints.opened import open_checkpoint, tiny_random_checkpoint
from sims.protocols.persona import SIDES, run_persona_protocol

NAME = "persona_no_over_never"
CONCLUSIONS = {"verdict": ("verdict", ("rows", "*", "verdict", "verdict")),
               "largest_decrease": ("rate", ("rows", "*", "largest_decrease"))}  # fmt: skip
ROWS = ("No>Never", "Yes>No", "Never>No", "Sure>Yes")


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """Table 1 protocol on a checkpoint: label-set SFT, then single-prompt DPO / IPO runs."""

    model: str = "smollm2"  # folder, .gguf or packaged name; "" = tiny random model (smoke)
    dtype: str = "float32"  # parameter dtype
    rows: tuple[str, ...] = ("No>Never", "Yes>No")  # y+>y- pairs (full: all four)
    losses: tuple[str, ...] = ("dpo",)  # dpo (beta 0.1, lr 1e-7) and ipo (tau 0.01, lr 1e-8)
    lr_factors: tuple[float, ...] = (1.0,)  # multiples of the paper's learning rate (full: 1, 10)
    num_runs: int = 5  # runs per row, loss and lr, one prompt each (paper and --full: 10)
    dpo_steps: int = 100  # preference steps per run (paper 100)
    num_statements: int = 16  # statements per side for SFT and the DPO prompts (0 = all)
    sft: str = "y_pos"  # label_set: the paper's SFT (then y_pos where pi(y+) < 0.5); y_pos only
    sft_lr: float = 1e-5  # label-set SFT learning rate (paper 1e-7; amended, see docstring)
    sft_max_epochs: int = 20  # cap of the SFT budget rule
    seed: int = 0

    RULES = {
        "model": existing_path(allow=("", "smollm2")),
        "dtype": one_of(("float32", "bfloat16")),
        "sft": one_of(("label_set", "y_pos")),
        "rows": each(one_of(ROWS)),
        "losses": each(one_of(("dpo", "ipo"))),
        "num_statements": nonnegative_int,
    }

    @classmethod
    def full(cls) -> Config:
        full = dict(rows=ROWS, losses=("dpo", "ipo"), lr_factors=(1.0, 10.0), num_runs=10)
        return cls(**full, num_statements=0, sft="label_set")

    @classmethod
    def smoke(cls) -> Config:
        small = dict(model="", rows=("No>Never",), lr_factors=(1.0,), num_runs=2, dpo_steps=5)
        return cls(**small, num_statements=4, sft_max_epochs=1, sft="label_set")


def run(config: Config) -> dict:
    if config.model:
        ckpt = open_checkpoint(config.model, dtype=config.dtype)
    else:  # smoke only: the label words are whole tokens of an untrained byte-level model
        ckpt = tiny_random_checkpoint(seed=config.seed, words=SIDES["no"] + SIDES["yes"])
    progress(f"[{NAME}] {ckpt.source}: {ckpt.weights}")
    fields = {k: v for k, v in vars(config).items() if k not in ("model", "dtype")}
    results = run_persona_protocol(ckpt, **fields, log=progress)
    prov = provenance(dtype_of=next(iter(results["rows"].values()))["pi_pos"])
    return {"config": config, "criterion": __doc__, **results, "provenance": prov}


def plot(results: dict) -> plt.Figure:
    rows = results["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, (key, r) in enumerate(rows.items()):
        p = np.asarray(r["pi_pos"])
        axes[0].plot(p.mean(0), color=f"C{i}", label=f"{key}: {r['verdict']['verdict']}")
        axes[0].fill_between(range(p.shape[1]), p.min(0), p.max(0), color=f"C{i}", alpha=0.15)
    title = f"SFT {results['sft']['mode']}, {results['sft']['epochs']} epochs"
    axes[0].set(xlabel="preference step", ylabel="pi(y+) (mean, min-max over runs)", title=title)
    axes[0].legend(fontsize=6)
    frac = [r["verdict"]["opposite_gainer_fraction"] or 0.0 for r in rows.values()]
    drop = [r["verdict"]["mean_largest_decrease"] or 0.0 for r in rows.values()]
    bars = {"mean largest decrease of pi(y+)": drop, "fraction with an opposite top-3 gainer": frac}
    grouped_bars(axes[1], list(rows), bars, fontsize=6)
    axes[1].axhline(0.2, color="k", lw=0.5)
    axes[1].set(title="informative runs (stable, pi(y+) >= 0.5 at the start)")
    return fig


def _summary(r: dict) -> str:
    verdicts = "; ".join(f"{k}: {v['verdict']['verdict']}" for k, v in r["rows"].items())
    sft = r["sft"]
    sft = f"{sft['epochs']} epochs (reached {sft['reached']})" if sft["epochs"] else "on y+ only"
    return (
        f"SFT {sft}; {verdicts}; "
        f"predictor agreement {r['predictor_agreement']:.2f}; kernel-form first-step error "
        f"median {r['kernel_form_first_step_error']['median']:.2e}"
    )


def main(argv=None) -> dict:
    return experiment_main(NAME, Config, run, plot, argv, summary=_summary, conclusions=CONCLUSIONS)


if __name__ == "__main__":
    cli(main)
