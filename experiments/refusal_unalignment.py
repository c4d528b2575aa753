"""Section 6 on a real checkpoint (default SmolLM2-135M-Instruct): DPO on refusal pairs.

Protocol (Razin et al. 2024 §6, App. H.3), fixed before the first run on SmolLM2: this project's
unsafe requests (sims.data.prompts.UNSAFE_REQUESTS over SORRY-Bench's 44 categories), split
85/15 train/test (stratified, seeded); two samples per train prompt (temperature 1, the chat
template) judged refusal / non-refusal by sims.analysis.refusal (a rule-based judge, weaker than
SORRY-Bench's: its agreement is in the JSON); refusal preferred; ties: the first draw preferred.
One epoch of DPO in minibatches (torch RMSprop, beta 0.1) at the largest stable rate of
{1e-7, 5e-7, 1e-6, 5e-6, 1e-5} (train loss after one epoch below the initial loss). Conditions:
DPO; DPO + SFT term (the smallest coefficient of {0.01, 0.1, 1} that keeps the mean preferred
log-prob from falling, else 1); DPO on the lowest-ln-CHES 5% and 15% of pairs. Refusal rates on
train and test prompts before and after, temperature 0.7, one sample per prompt, ``num_runs``.

Criterion (pre-registered): "the drop reproduced" if DPO lowers the train refusal rate by >= 10
points while the loss falls; "the mitigation reproduced" if the 5% CHES-filtered run keeps it
within 5 points of the start or raises it (15% reported too). Amended before the first run on
SmolLM2: the drop is "uninformative" when the initial rate is < 10%, and the mitigation is judged
only where the drop reproduced (else "uninformative": no drop to prevent).
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np

from experiments.framework import (
    ExperimentConfig,
    cli,
    existing_path,
    experiment_main,
    nonnegative_int,
    progress,
    provenance,
)
from sims.analysis.refusal import judge_agreement
from sims.checkpoints.opened import open_checkpoint, tiny_random_checkpoint
from sims.data.prompts import UNSAFE_REQUESTS, split_train_test
from sims.data.refusal_labels import DEV, HELD_OUT
from sims.protocols.onpolicy import encode_instructions
from sims.protocols.unalignment import unalignment

NAME = "refusal_unalignment"
CONCLUSIONS = {k: ("verdict", ("verdict", k)) for k in ("drop", "mitigation")}
CONCLUSIONS["refusal_test"] = ("rate", ("conditions", "*", "runs", "[]", "refusal_test"))


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """DPO on on-policy refusal pairs: refusal rates before and after, and the mitigations."""

    model: str = "smollm2"  # folder, .gguf or packaged name; "" = tiny random model (smoke)
    num_train: int = 32  # train prompts used (0 = all 127 of the 85% split)
    num_test: int = 8  # test prompts used (0 = all 23)
    max_new_tokens: int = 32  # longest sampled response, tokens (paper 512)
    batch_size: int = 8  # pairs per DPO step (paper 32)
    num_runs: int = 1  # runs per condition (paper and --full: 3; 1 keeps the default ~20 min)
    seed: int = 0

    RULES = {
        "model": existing_path(allow=("", "smollm2")),
        "num_train": nonnegative_int,
        "num_test": nonnegative_int,
    }

    @classmethod
    def full(cls) -> Config:
        return cls(num_train=0, num_test=0, max_new_tokens=128, num_runs=3)

    @classmethod
    def smoke(cls) -> Config:
        return cls(model="", num_train=6, num_test=2, max_new_tokens=4, batch_size=2)


def run(config: Config) -> dict:
    ckpt = open_checkpoint(config.model) if config.model else tiny_random_checkpoint(seed=0)
    progress(f"[{NAME}] {ckpt.source}: {ckpt.weights}")
    train, test = split_train_test(UNSAFE_REQUESTS, seed=config.seed)
    train, test = train[: config.num_train or None], test[: config.num_test or None]
    enc = [encode_instructions(ckpt, [r for _, r in part]) for part in (train, test)]
    runs = dict(num_runs=config.num_runs, seed=config.seed, log=progress)
    result = unalignment(
        ckpt, *enc, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
        sample_batch=16, **runs,
    )  # fmt: skip
    judge = {"written_examples (development data)": judge_agreement(DEV + HELD_OUT)}
    for part in judge.values():
        part.pop("misclassified", None)
    return {
        "config": config,
        "criterion": __doc__,
        "weights": ckpt.weights,
        "prompt_format": ckpt.prompt_format,
        "train_prompts": train,
        "test_prompts": test,
        "judge_agreement": judge,
        **result,
        "provenance": provenance(dtype_of=np.asarray(result["ches_ln"])),
    }


def plot(results: dict) -> plt.Figure:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4))
    names = ["initial", *results["conditions"]]
    for k, split in enumerate(("train", "test")):
        runs = [results["initial_refusal"][split]] + [
            [r[f"refusal_{split}"] for r in c["runs"]] for c in results["conditions"].values()
        ]
        mean = np.array([np.mean(r) for r in runs])
        err = [mean - [min(r) for r in runs], [max(r) for r in runs] - mean]
        ax.bar(np.arange(len(names)) + 0.4 * k, mean, 0.4, yerr=err, label=split)
    ax.set_xticks(np.arange(len(names)) + 0.2, names, rotation=30, fontsize=8)
    v = results["verdict"]
    ax.set(ylabel="refusal rate (%)", title=f"drop: {v['drop']}; mitigation: {v['mitigation']}")
    ax.legend()
    change = [
        np.mean([r["mean_change"] for r in c["runs"]]) for c in results["conditions"].values()
    ]
    bx.bar(list(results["conditions"]), change, color=["C3" if v < 0 else "C2" for v in change])
    bx.set(
        ylabel="mean change of ln pi(y+) (Table 16)",
        title="pair shares: "
        + ", ".join(f"{k} {v:.0%}" for k, v in results["pair_shares"].items()),
    )
    fig.tight_layout()
    return fig


def _summary(r: dict) -> str:
    c = {
        k: round(float(np.mean([x["refusal_train"] for x in v["runs"]])), 1)
        for k, v in r["conditions"].items()
    }
    return (
        f"train refusal {np.mean(r['initial_refusal']['train']):.1f}% -> {c}; "
        f"two-refusal share {r['pair_shares']['two_refusals']:.2f}; verdict {r['verdict']}"
    )


def main(argv=None) -> dict:
    return experiment_main(NAME, Config, run, plot, argv, summary=_summary, conclusions=CONCLUSIONS)


if __name__ == "__main__":
    cli(main)
