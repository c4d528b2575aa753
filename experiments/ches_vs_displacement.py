"""Figure 2 analogue (Razin et al. 2024 §5): which similarity score predicts displacement?

Synthetic preference datasets (``sims.data.synthetic``) of ``num_pairs`` pairs, ranked by CHES,
length-normalised CHES, (negative) normalised edit distance and the last-hidden inner product;
DPO runs on a subset centred on each percentile; the change of the subset's mean preferred
log-prob is recorded. One seed = one fresh dataset and model. All subset runs of a seed share one
vmapped flow. Subsets are ``subset_size`` = 200 of 2000 pairs: the paper's 512 of 5000 (~10%).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import matplotlib.pyplot as plt
import numpy as np

from experiments.framework import ConfigError, ExperimentConfig, cli, each, experiment_main
from experiments.framework.config import number_in
from experiments.framework.output import enable_x64, progress, provenance
from experiments.framework.plots import bar_min_max
from sims.analysis.scores import spearman
from sims.analysis.summaries import statistic_text, statistics
from sims.data.synthetic import synthetic_preferences
from sims.models.prefix_tree import with_reference
from sims.protocols.theory_checks import SIMILARITY_SCORES as SCORES
from sims.protocols.theory_checks import pair_similarity_scores, percentile_subset_changes
from theory.losses import make_loss

NAME = "ches_vs_displacement"
#: Spearman(percentile, change) per score; CHES's top and bottom subsets' change, per seed.
CONCLUSIONS = {
    "spearman_percentile_vs_change": ("rate", ("spearman_percentile_vs_change", "*")),
    "ches_top_subset_change": ("rate", ("change_per_seed", "[]", 0, -1)),
    "ches_bottom_subset_change": ("rate", ("change_per_seed", "[]", 0, 0)),
}


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """DPO on score-percentile subsets of synthetic preference data (Figure 2 analogue)."""

    seed: int = 0  # base seed; run r uses seed + r for data and model
    num_seeds: int = 3  # independent datasets (bars: min/max over them)
    num_pairs: int = 2000  # pairs per dataset
    subset_size: int = 200  # pairs per percentile subset (512/5000 of the paper, scaled)
    percentiles: tuple = (0, 25, 50, 75, 100)
    vocab_size: int = 32  # V (token 0 is EOS)
    hidden_size: int = 16  # d
    max_len: int = 8  # content tokens per response at most
    head_scale: float = 3.0  # shared next-token head (sims.data.synthetic); ~62% positive alphas
    beta: float = 0.1  # DPO KL coefficient (paper's value)
    dt: float = 0.5  # Euler step of gradient flow
    num_steps: int = 60  # steps: t = num_steps * dt

    RULES = {"percentiles": each(number_in(0, 100))}

    def check(self) -> None:
        if self.subset_size > self.num_pairs:
            raise ConfigError("--subset-size must be <= --num-pairs")
        if self.vocab_size < 2:
            raise ConfigError(f"--vocab-size must be >= 2 (token 0 is EOS), got {self.vocab_size}")

    @classmethod
    def smoke(cls) -> Config:
        return cls(num_seeds=2, num_pairs=60, subset_size=10, num_steps=4, max_len=4)


def _one_seed(config: Config, seed: int) -> tuple:
    """One fresh data set and model: the subset changes, Spearman(score, length difference)."""
    sizes = ("num_pairs", "vocab_size", "hidden_size", "max_len", "head_scale")
    data = synthetic_preferences(jax.random.key(seed), **{k: getattr(config, k) for k in sizes})
    pairs = with_reference(data.model, data.pairs)
    scores = pair_similarity_scores(data, pairs)
    P = 2 * config.subset_size * (config.max_len + 1)  # bound on a subset's distinct prefixes
    schedule = {k: getattr(config, k) for k in ("percentiles", "subset_size", "dt", "num_steps")}
    loss = make_loss("dpo", beta=config.beta)
    changes = percentile_subset_changes(data.model, pairs, scores, loss, num_prefixes=P, **schedule)
    length_difference = [
        len(y) - len(c) for c, y in zip(data.chosen_tokens, data.rejected_tokens, strict=True)
    ]
    progress(f"[{NAME}] seed {seed} done (t = {config.num_steps * config.dt})")
    return changes, statistics(spearman, {s: (scores[s], length_difference) for s in SCORES})


def run(config: Config) -> dict:
    enable_x64()  # float64 flows, however run() is called
    seeds = [_one_seed(config, config.seed + r) for r in range(config.num_seeds)]
    per_seed, length_spearman = zip(*seeds, strict=True)
    change, loss_change, mean_score = (np.stack(a) for a in zip(*per_seed, strict=True))
    mean = change.mean(axis=0)  # change: [R, scores, percentiles]
    pct = list(config.percentiles)
    return {
        "config": config,
        "scores": list(SCORES),
        "change_per_seed": change,
        "change_mean": mean,
        "change_min": change.min(axis=0),
        "change_max": change.max(axis=0),
        "loss_change_per_seed": loss_change,
        "subset_mean_score_per_seed": mean_score,
        "spearman_percentile_vs_change": statistics(
            spearman, {s: (pct, mean[i]) for i, s in enumerate(SCORES)}
        ),
        "spearman_pooled_over_seeds": statistics(
            spearman,
            {s: (pct * config.num_seeds, change[:, i].ravel()) for i, s in enumerate(SCORES)},
        ),
        "spearman_score_vs_length_difference": {  # per seed; None where undefined
            s: [rho[s] for rho in length_spearman] for s in SCORES
        },
        "provenance": provenance(dtype_of=change),
    }


def plot(results: dict) -> plt.Figure:
    cfg = results["config"]  # a Config, or its dict when redrawn from the JSON
    pct = list(cfg["percentiles"] if isinstance(cfg, dict) else cfg.percentiles)
    fig, axes = plt.subplots(1, len(results["scores"]), figsize=(13, 3.2), sharey=True)
    for i, (ax, s) in enumerate(zip(axes, results["scores"], strict=True)):
        mean = np.asarray(results["change_mean"])[i]
        lo, hi = np.asarray(results["change_min"])[i], np.asarray(results["change_max"])[i]
        bar_min_max(ax, range(len(pct)), mean, lo, hi, capsize=3, color="tab:blue")
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xticks(range(len(pct)), [str(p) for p in pct])
        rho = results["spearman_percentile_vs_change"][s]
        ax.set_title(f"{s}\nSpearman {statistic_text(rho)}", fontsize=9)
        ax.set_xlabel("similarity percentile")
    axes[0].set_ylabel("change in mean ln pi(y+|x)")
    fig.tight_layout()
    return fig


def _summary(results: dict) -> str:
    return "Spearman(percentile, change): " + ", ".join(
        f"{s} {statistic_text(results['spearman_percentile_vs_change'][s])}"
        for s in results["scores"]
    )


def main(argv=None) -> dict:
    return experiment_main(NAME, Config, run, plot, argv, summary=_summary, conclusions=CONCLUSIONS)


if __name__ == "__main__":
    cli(main)
