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
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from experiments.framework import (
    ConfigError,
    ExperimentConfig,
    cli,
    each,
    enable_x64,
    experiment_main,
    number_in,
    progress,
    provenance,
)
from experiments.framework.plots import bar_min_max
from sims.analysis.scores import (
    dataset_ches,
    normalized_edit_distance,
    percentile_subsets,
    spearman,
)
from sims.analysis.summaries import stack, statistic_text, statistics
from sims.data.synthetic import synthetic_preferences
from sims.flows.core import preference_flow, stack_models
from sims.models.prefix_tree import restrict, with_reference
from theory.losses import make_loss

NAME = "ches_vs_displacement"
SCORES = ("ches", "ches_length_normalized", "neg_edit_distance", "last_hidden_inner_product")


_rule_percentile = number_in(0, 100)


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

    RULES = {"percentiles": each(_rule_percentile)}

    def check(self) -> None:
        if self.subset_size > self.num_pairs:
            raise ConfigError("--subset-size must be <= --num-pairs")
        if self.vocab_size < 2:
            raise ConfigError(f"--vocab-size must be >= 2 (token 0 is EOS), got {self.vocab_size}")

    @classmethod
    def smoke(cls) -> Config:
        return cls(num_seeds=2, num_pairs=60, subset_size=10, num_steps=4, max_len=4)


def _scores(data, pairs) -> dict[str, np.ndarray]:
    edit = [
        normalized_edit_distance(a, b)
        for a, b in zip(data.chosen_tokens, data.rejected_tokens, strict=True)
    ]
    return {
        "ches": np.asarray(dataset_ches(data.model, pairs)),
        "ches_length_normalized": np.asarray(
            dataset_ches(data.model, pairs, length_normalized=True)
        ),
        "neg_edit_distance": -np.asarray(edit),  # higher = more similar, like the other scores
        "last_hidden_inner_product": np.sum(data.last_hidden_chosen * data.last_hidden_rejected, 1),
    }


def _subset_changes(config: Config, model, pairs, rows: np.ndarray) -> tuple:
    """DPO on every subset of ``rows`` ``[runs, size]`` in one vmapped flow: the change of each
    subset's mean preferred log-prob and of its loss, ``[runs]`` each."""
    P = 2 * config.subset_size * (config.max_len + 1)  # bound on a subset's distinct prefixes
    subsets = [restrict(model, pairs, r, num_prefixes=P) for r in rows]
    res = preference_flow(
        stack_models([m for m, _ in subsets]),
        stack([p for _, p in subsets]),
        make_loss("dpo", beta=config.beta),
        dt=config.dt,
        num_steps=config.num_steps,
        record_every=config.num_steps,
        in_axes=(0, 0),
    ).run()
    lp = res.observables.logprob_chosen
    change = np.asarray(jnp.mean(lp[:, -1] - lp[:, 0], axis=1))
    return change, np.asarray(res.loss[:, -1] - res.loss[:, 0])


def _one_seed(config: Config, seed: int) -> dict:
    data = synthetic_preferences(
        jax.random.key(seed),
        num_pairs=config.num_pairs,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        max_len=config.max_len,
        head_scale=config.head_scale,
    )
    pairs = with_reference(data.model, data.pairs)
    scores = _scores(data, pairs)
    subsets = {
        s: percentile_subsets(scores[s], config.percentiles, config.subset_size) for s in SCORES
    }
    rows = np.concatenate([subsets[s] for s in SCORES])  # [scores * percentiles, size]
    change, loss_change = _subset_changes(config, data.model, pairs, rows)
    shape = (len(SCORES), len(config.percentiles))
    length_difference = [
        len(y) - len(c) for c, y in zip(data.chosen_tokens, data.rejected_tokens, strict=True)
    ]
    return {
        "change_mean_logprob_chosen": change.reshape(shape),
        "loss_change": loss_change.reshape(shape),
        "subset_mean_score": np.array([[scores[s][r].mean() for r in subsets[s]] for s in SCORES]),
        "score_length_spearman": statistics(
            spearman, {s: (scores[s], length_difference) for s in SCORES}
        ),
    }


def run(config: Config) -> dict:
    enable_x64()  # float64 flows, however run() is called
    per_seed = []
    for r in range(config.num_seeds):
        per_seed.append(_one_seed(config, config.seed + r))
        progress(
            f"[{NAME}] seed {r + 1}/{config.num_seeds} done (t = {config.num_steps * config.dt})"
        )
    change = np.stack([s["change_mean_logprob_chosen"] for s in per_seed])  # [R, scores, pct]
    mean = change.mean(axis=0)
    pct = list(config.percentiles)
    return {
        "config": config,
        "scores": list(SCORES),
        "change_per_seed": change,
        "change_mean": mean,
        "change_min": change.min(axis=0),
        "change_max": change.max(axis=0),
        "loss_change_per_seed": np.stack([s["loss_change"] for s in per_seed]),
        "subset_mean_score_per_seed": np.stack([s["subset_mean_score"] for s in per_seed]),
        "spearman_percentile_vs_change": statistics(
            spearman, {s: (pct, mean[i]) for i, s in enumerate(SCORES)}
        ),
        "spearman_pooled_over_seeds": statistics(
            spearman,
            {s: (pct * config.num_seeds, change[:, i].ravel()) for i, s in enumerate(SCORES)},
        ),
        "spearman_score_vs_length_difference": {  # per seed; None where undefined
            s: [p["score_length_spearman"][s] for p in per_seed] for s in SCORES
        },
        "provenance": provenance(dtype_of=change),
    }


def plot(results: dict) -> plt.Figure:
    pct = (
        results["config"]["percentiles"]
        if isinstance(results["config"], dict)
        else list(results["config"].percentiles)
    )
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
    return experiment_main(NAME, Config, run, plot, argv, summary=_summary)


if __name__ == "__main__":
    cli(main)
