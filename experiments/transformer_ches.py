"""Section 5 / Figure 2 analogue: CHES percentile subsets predict displacement in a transformer.

Pairs: every request prompt of the generated corpus with two different responses drawn from the
refusal and compliance templates (varied length and wording), preferred one chosen by a coin (an
off-policy, UltraFeedback-like set). Each pair is scored by CHES, length-normalised CHES, token edit
distance and last-hidden inner product with the pre-trained transformer; for every score the
subsets centred on the 0/25/50/75/100th percentiles are trained with DPO (gradient flow, all
parameters) and the change of the mean preferred log-prob is reported (Razin et al. 2024, §5).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from experiments.framework import (
    ExperimentConfig,
    cli,
    enable_x64,
    experiment_main,
    progress,
    provenance,
)
from sims.analysis.scores import pearson, percentile_subsets, transformer_pair_scores
from sims.analysis.summaries import statistics
from sims.data import corpus
from sims.flows.core import preference_flow
from sims.models.transformer import make_transformer_pairs
from sims.protocols.ches import PERCENTILES, SCORES  # the scores and percentiles of Figure 2
from sims.protocols.toy_transformer import PretrainSettings, pretrained_transformer
from theory.losses import make_loss

NAME = "transformer_ches"
#: CHES orders the decrease (verdicts), the rank correlation per score (conclusions).
CONCLUSIONS = {
    "ches_monotone": ("verdict", "ches_monotone"),
    "loss_decreased": ("verdict", "loss_decreased"),
    "corr_percentile_vs_decrease": ("rate", ("corr_percentile_vs_decrease", "*")),
}


@dataclass(frozen=True)
class Config(PretrainSettings, ExperimentConfig):
    """CHES percentile subsets vs preferred log-prob change under DPO (Figure 2 analogue)."""

    tied: bool = True  # unembedding tied to the token embedding
    pairs_per_prompt: int = 4  # preference pairs drawn per request prompt (48 prompts)
    subset_size: int = 16  # pairs per percentile subset (paper: 512 of 5000)
    beta: float = 0.1  # DPO KL coefficient
    dt: float = 0.05  # gradient-flow Euler step
    num_steps: int = 20  # preference steps
    seed: int = 0

    @classmethod
    def scaled(cls) -> Config:
        """The ``--scale`` version for a GPU/TPU (paper-like sizes; too slow for this CPU)."""
        return cls(**cls.SCALED, pairs_per_prompt=64, subset_size=256, num_steps=100)

    @classmethod
    def smoke(cls) -> Config:
        return cls(**cls.SMOKE, pairs_per_prompt=1, subset_size=4, num_steps=2)


def _pair_texts(config: Config) -> tuple[list, list, list]:
    """Every request prompt with two different template responses, the preferred one by a coin."""
    rng = np.random.default_rng(config.seed)
    templates = corpus.REFUSALS + corpus.COMPLIANCES
    prompts, pos, neg = [], [], []
    for unsafe in (True, False):
        for verb, obj in corpus.requests(unsafe) * config.pairs_per_prompt:
            a, b = rng.choice(len(templates), 2, replace=False)
            prompts.append(corpus.request_prompt(verb, obj))
            pos.append(corpus.response(templates[a], verb, obj))
            neg.append(corpus.response(templates[b], verb, obj))
    return prompts, pos, neg


def run(config: Config) -> dict:
    enable_x64()  # as in the main job (float64 scalars beside float32 parameters)
    model, pre_losses = pretrained_transformer(config.seed, config, tied=config.tied)
    prompts, pos, neg = _pair_texts(config)
    chosen, rejected = corpus.pack(prompts, pos), corpus.pack(prompts, neg)
    scores = transformer_pair_scores(model, chosen, rejected)
    progress(f"[{NAME}] scored {len(prompts)} pairs")
    subsets = np.concatenate(
        [percentile_subsets(scores[s], PERCENTILES, config.subset_size) for s in SCORES]
    )  # [S * Q, n]
    pairs = make_transformer_pairs(model, chosen, rejected)
    stacked = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[subsets], pairs)  # [S * Q, n, ...]
    res = preference_flow(
        model,
        stacked,
        make_loss("dpo", beta=config.beta),
        dt=config.dt,
        num_steps=config.num_steps,
        record_every=config.num_steps,
        in_axes=(None, 0),
    ).run()
    losses, lp = np.asarray(res.loss), np.asarray(res.observables)  # lp [S * Q, 2, n]
    change = (lp[:, -1] - lp[:, 0]).mean(-1).reshape(len(SCORES), len(PERCENTILES))
    rank = statistics(pearson, {s: (PERCENTILES, -change[i]) for i, s in enumerate(SCORES)})
    windows = subsets.reshape(len(SCORES), len(PERCENTILES), -1)  # [S, Q, n]
    return {
        "config": config,
        "pretrain_final_loss": float(pre_losses[-1]),
        "num_pairs": len(prompts),
        "scores": scores,
        "subset_mean_score": {
            s: [float(np.mean(scores[s][w])) for w in windows[i]] for i, s in enumerate(SCORES)
        },
        "logprob_change": {s: change[i] for i, s in enumerate(SCORES)},
        "loss_decreased": bool(np.all(losses[:, -1] < losses[:, 0])),
        "corr_percentile_vs_decrease": rank,
        "ches_monotone": bool(np.all(np.diff(change[0]) < 0)),
        "provenance": provenance(dtype_of=lp),
    }


def plot(results: dict) -> plt.Figure:
    fig, axes = plt.subplots(1, len(SCORES), figsize=(14, 3.5), sharey=True)
    for ax, s in zip(axes, SCORES, strict=True):
        ax.bar(
            [str(q) for q in PERCENTILES],
            results["logprob_change"][s],
            color=["C3" if v < 0 else "C2" for v in results["logprob_change"][s]],
        )
        ax.axhline(0, color="k", lw=0.5)
        ax.set(title=s, xlabel="score percentile")
    axes[0].set(ylabel="change of mean ln pi(y+|x)")
    return fig


def _summary(r: dict) -> str:
    return "; ".join(f"{s}: {np.round(r['logprob_change'][s], 2).tolist()}" for s in SCORES)


def main(argv=None) -> dict:
    return experiment_main(NAME, Config, run, plot, argv, summary=_summary, conclusions=CONCLUSIONS)


if __name__ == "__main__":
    cli(main)
