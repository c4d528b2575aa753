"""Figure 2 protocol on a real checkpoint (default SmolLM2-135M-Instruct): CHES vs displacement.

Protocol (Razin et al. 2024 §5, App. H.2), fixed before the first run on SmolLM2: pairs of the
model's own samples (two per instruction of sims.data.prompts.GENERAL_INSTRUCTIONS, temperature
1, the chat template; ``--pairs FILE`` reads a TRL JSONL instead). Labelling rule: the first
sample is preferred (the two are i.i.d. draws, so the order is random and unrelated to quality:
the claim is about similarity); pairs with identical responses are dropped. Scores from the
model's final hidden states: CHES, length-normalised CHES, normalised edit distance and the
last-hidden inner product. For each score, the subsets centred on the 0/25/50/75/100th
similarity percentiles are trained with DPO for one epoch (torch RMSprop, the paper's lr 1e-7,
beta 0.1, minibatches), ``num_runs`` runs each (minibatch orders).

Criterion (pre-registered; sims.protocols.ches.figure2_verdict): CHES "reproduced" if
Spearman(similarity percentile, change of the mean preferred log-prob) <= -0.8, the top subset's
preferred log-prob falls and the bottom subset's rises; the same numbers for the three baselines
(the paper: they do not rank displacement). A score whose subsets grew the DPO margin by less than
0.5 nats on average is "uninformative".
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import matplotlib.pyplot as plt
import numpy as np

from experiments.framework import (
    ExperimentConfig,
    cli,
    existing_file,
    existing_path,
    experiment_main,
    nonnegative_int,
    progress,
    provenance,
)
from sims.checkpoints.opened import open_checkpoint, tiny_random_checkpoint
from sims.data.preferences import encode_preference_file
from sims.data.prompts import GENERAL_INSTRUCTIONS
from sims.models.transformer import make_transformer_pairs
from sims.protocols.ches import PERCENTILES, SCORES, figure2
from sims.protocols.onpolicy import first_draw_pairs

NAME = "ches_real"
CONCLUSIONS = {"verdict": ("verdict", ("verdict", "*", "verdict")),
               "spearman": ("rate", ("spearman", "*"))}  # fmt: skip


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """CHES / ln-CHES / edit distance / last-hidden percentile subsets trained with DPO."""

    model: str = "smollm2"  # folder, .gguf or packaged name; "" = tiny random model (smoke)
    pairs: str = ""  # TRL JSONL (prompt, chosen, rejected); "" = the model's own samples
    num_prompts: int = 48  # instructions sampled (0 = all 204)
    max_new_tokens: int = 32  # longest sampled response, tokens (paper 512)
    max_len: int = 512  # longest sequence of a --pairs file, tokens
    subset_size: int = 12  # pairs per percentile subset (paper 512)
    batch_size: int = 4  # pairs per DPO step (paper 32)
    lr: float = 1e-7  # torch RMSprop learning rate (paper 1e-7)
    beta: float = 0.1  # DPO KL coefficient (paper 0.1)
    num_runs: int = 3  # runs per subset (minibatch orders; paper 3)
    pairs_out: str = ""  # write the sampled pairs as TRL JSONL here ("" = do not)
    seed: int = 0

    RULES = {
        "model": existing_path(allow=("", "smollm2")),
        "pairs": existing_file(),
        "num_prompts": nonnegative_int,
    }

    @classmethod
    def full(cls) -> Config:
        return cls(num_prompts=0, max_new_tokens=128, subset_size=32, batch_size=8, num_runs=3)

    @classmethod
    def smoke(cls) -> Config:
        return cls(model="", num_prompts=12, max_new_tokens=4, subset_size=3, batch_size=2)


def run(config: Config) -> dict:
    ckpt = open_checkpoint(config.model) if config.model else tiny_random_checkpoint(seed=0)
    progress(f"[{NAME}] {ckpt.source}: {ckpt.weights}")
    if config.pairs:
        chosen, rejected, rows = encode_preference_file(config.pairs, ckpt, max_len=config.max_len)
    else:  # two samples per instruction, the first draw preferred (the stated labelling rule)
        texts, key = GENERAL_INSTRUCTIONS[: config.num_prompts or None], jax.random.key(config.seed)
        sample = dict(temperature=1.0, max_new_tokens=config.max_new_tokens, batch_size=16)
        chosen, rejected, rows = first_draw_pairs(ckpt, texts, key, **sample, log=progress)
    if config.pairs_out:
        from sims.data.preferences import write_preference_jsonl

        write_preference_jsonl(config.pairs_out, rows)
    pairs = make_transformer_pairs(ckpt.model, chosen, rejected, chunk_size=8)
    progress(f"[{NAME}] {len(rows)} pairs; DPO on percentile subsets of {config.subset_size}")
    dpo = dict(batch_size=config.batch_size, lr=config.lr, beta=config.beta, seed=config.seed)
    result = figure2(
        ckpt.model, pairs, subset_size=config.subset_size, num_runs=config.num_runs, **dpo,
        log=progress,
    )  # fmt: skip
    change = {s: [float(np.mean(q["change"])) for q in result["subsets"][s]] for s in SCORES}
    return {
        "config": config,
        "criterion": __doc__,
        "weights": ckpt.weights,
        "prompt_format": ckpt.prompt_format,
        "num_pairs": len(rows),
        "pairs": rows,
        "logprob_change": change,
        **result,
        "provenance": provenance(dtype_of=np.asarray(pairs.ref_logprob_chosen)),
    }


def plot(results: dict) -> plt.Figure:
    fig, axes = plt.subplots(1, len(SCORES), figsize=(14, 3.5), sharey=True)
    for ax, s in zip(axes, SCORES, strict=True):
        runs = np.array([q["change"] for q in results["subsets"][s]])  # [5, runs]
        mean = runs.mean(1)
        ax.bar(
            [str(q) for q in PERCENTILES],
            mean,
            color=["C3" if v < 0 else "C2" for v in mean],
            yerr=[mean - runs.min(1), runs.max(1) - mean],
        )
        ax.axhline(0, color="k", lw=0.5)
        v = results["verdict"][s]
        rho = "undefined" if v["spearman"] is None else f"{v['spearman']:+.2f}"
        ax.set(title=f"{s}: Spearman {rho}\n{v['verdict']}", xlabel="similarity percentile")
    axes[0].set(ylabel="change of mean ln pi(y+|x)")
    fig.tight_layout()
    return fig


def _summary(r: dict) -> str:
    return "; ".join(f"{s}: {v['verdict']} (rho {v['spearman']})" for s, v in r["verdict"].items())


def main(argv=None) -> dict:
    return experiment_main(NAME, Config, run, plot, argv, summary=_summary, conclusions=CONCLUSIONS)


if __name__ == "__main__":
    cli(main)
