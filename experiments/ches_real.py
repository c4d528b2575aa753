"""Figure 2 protocol on a checkpoint: CHES percentile subsets vs displacement under DPO.

Protocol (Razin et al. 2024 §5, App. H.2): score every pair of a TRL-style JSONL data set
(``--pairs``; default: the corpus's request prompts, each with two different refusal/compliance
responses, the preferred one by a coin, written to JSONL and read back) with CHES,
length-normalised CHES, normalised token edit distance and the last-hidden inner product on the
checkpoint's hidden states; for each score take the subsets centred on the 0/25/50/75/100th
percentiles (paper: 512 pairs of 5000; here 16 of 192), train DPO on each (beta 0.1, RMSprop; paper
one epoch at batch 32 = 16 steps at lr 1e-7; here 16 full-batch steps at lr 1e-4, scaled for the
tiny self-made model as in ``persona_no_over_never``) and report the change of the mean preferred
log-prob over the subset. Sequences are "prompt response <eos>" (plain concatenation, or the
checkpoint's chat template with ``--chat-template true``).

Success criterion (written before the first run): **reproduced** if, for CHES, the change of the
mean preferred log-prob falls with the percentile (Spearman(percentile, change) <= -0.9, i.e. at
most one adjacent swap of the paper's "perfect" ranking), the 0th-percentile subset's preferred
log-prob rises and the 100th's falls. Controls: the DPO loss falls on every subset; edit distance
and the last-hidden inner product are reported with the same statistic (the paper: they do not
rank displacement).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from experiments._analysis import statistic_text, statistics
from experiments._checkpoint import CheckpointConfig, open_checkpoint, read_pairs
from experiments.framework import (
    cli,
    enable_x64,
    existing_file,
    experiment_main,
    parse_config,
    progress,
    provenance,
)
from sims.analysis.scores import percentile_subsets, spearman, transformer_pair_scores
from sims.data.preferences import encode_preferences
from sims.flows.core import preference_flow
from sims.models.transformer import make_transformer_pairs
from theory.losses import make_loss

NAME = "ches_real"
SCORES = ("ches", "ches_ln", "edit_distance", "last_inner")
PERCENTILES = (0, 25, 50, 75, 100)


@dataclass(frozen=True)
class Config(CheckpointConfig):
    """CHES / ln-CHES / edit distance / last-hidden percentile subsets trained with DPO."""

    pairs: str = ""  # TRL-style JSONL (prompt, chosen, rejected); "" = generated from the corpus
    pairs_per_prompt: int = 4  # generated data: pairs per request prompt (48 prompts)
    max_len: int = 64  # longest sequence (prompt + response + eos), tokens (paper: 512)
    subset_size: int = 16  # pairs per percentile subset (paper: 512)
    beta: float = 0.1  # DPO KL coefficient (paper 0.1)
    lr: float = 1e-4  # RMSprop learning rate (paper 1e-7; scaled for the tiny model)
    num_steps: int = 16  # full-batch DPO steps per subset (paper: one epoch = 16 steps)
    vmap_runs: bool = True  # train all 20 subsets in one vmap (False: one after another)
    seed: int = 0

    RULES = {**CheckpointConfig.RULES, "pairs": existing_file()}

    @classmethod
    def smoke(cls) -> Config:
        return cls(**cls.SMOKE, pairs_per_prompt=1, subset_size=4, num_steps=2)


def run(config: Config, *, workdir=None) -> dict:
    enable_x64()  # as the main job: float64 scalars beside the checkpoint's dtype
    rows, bad = read_pairs(config, name=NAME, workdir=workdir)  # before any pre-training
    ckpt = open_checkpoint(config, seed=config.seed, workdir=workdir)
    enc = encode_preferences(
        ckpt.tokenizer,
        rows,
        max_len=config.max_len,
        eos_id=ckpt.special_id("eos_token"),
        pad_id=ckpt.special_id("pad_token", 0),
        template=ckpt.template,
        tokens=ckpt.tokens,
    )
    for b in enc.bad:
        progress(f"[{NAME}] skipped line {b.line}: {b.reason}")
    bad = bad + enc.bad
    model = ckpt.model
    scores = transformer_pair_scores(model, enc.chosen, enc.rejected)
    progress(f"[{NAME}] scored {len(enc.lines)} pairs ({len(bad)} rows skipped)")
    subsets = np.concatenate(
        [percentile_subsets(scores[s], PERCENTILES, config.subset_size) for s in SCORES]
    )  # [S * Q, n]
    pairs = make_transformer_pairs(model, enc.chosen, enc.rejected)
    stacked = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[subsets], pairs)  # [S * Q, n, ...]
    flow = functools.partial(
        preference_flow,
        model,
        loss=make_loss("dpo", beta=config.beta),
        dt=config.lr,
        num_steps=config.num_steps,
        record_every=config.num_steps,
        optimizer="rmsprop_torch",
    )
    if config.vmap_runs:
        res = flow(stacked, in_axes=(None, 0)).run()
        losses, lp = np.asarray(res.loss), np.asarray(res.observables)  # [S*Q, 2], [S*Q, 2, n]
    else:
        outs = [
            flow(jax.tree_util.tree_map(lambda a, i=i: a[i], stacked)).run()
            for i in range(len(subsets))
        ]
        losses = np.stack([np.asarray(o.loss) for o in outs])
        lp = np.stack([np.asarray(o.observables) for o in outs])
    change = (lp[:, -1] - lp[:, 0]).mean(-1).reshape(len(SCORES), len(PERCENTILES))
    rank = statistics(spearman, {s: (PERCENTILES, change[i]) for i, s in enumerate(SCORES)})
    criteria = {
        "ches_spearman_at_most_-0.9": rank["ches"] is not None and rank["ches"] <= -0.9,
        "ches_0th_percentile_rises": bool(change[0, 0] > 0),
        "ches_100th_percentile_falls": bool(change[0, -1] < 0),
    }
    return {
        "config": config,
        "checkpoint": ckpt.describe(config),
        "num_pairs": len(enc.lines),
        "skipped_rows": [b._asdict() for b in bad],
        "scores": scores,
        "subset_mean_score": {
            s: [float(scores[s][subsets[i * len(PERCENTILES) + j]].mean()) for j in range(5)]
            for i, s in enumerate(SCORES)
        },
        "logprob_change": {s: change[i] for i, s in enumerate(SCORES)},
        "spearman_percentile_vs_change": rank,
        "control_loss_fell_on_every_subset": bool(np.all(losses[:, -1] < losses[:, 0])),
        "criteria": criteria,
        "verdict": "reproduced" if all(criteria.values()) else "not reproduced",
        "provenance": provenance(dtype_of=lp),
    }


def plot(results: dict) -> plt.Figure:
    fig, axes = plt.subplots(1, len(SCORES), figsize=(14, 3.5), sharey=True)
    for ax, s in zip(axes, SCORES, strict=True):
        change = results["logprob_change"][s]
        ax.bar(
            [str(q) for q in PERCENTILES], change, color=["C3" if v < 0 else "C2" for v in change]
        )
        ax.axhline(0, color="k", lw=0.5)
        rho = results["spearman_percentile_vs_change"][s]
        ax.set(title=f"{s} (Spearman {statistic_text(rho)})", xlabel="score percentile")
    axes[0].set(ylabel="change of mean ln pi(y+|x)")
    fig.suptitle(f"{results['checkpoint']['source']}: {results['verdict']}", y=1.02)
    fig.tight_layout()
    return fig


def _summary(r: dict) -> str:
    changes = "; ".join(f"{s}: {np.round(r['logprob_change'][s], 2).tolist()}" for s in SCORES)
    rho = {s: statistic_text(r["spearman_percentile_vs_change"][s]) for s in SCORES}
    return f"{r['verdict']}: Spearman {rho}; changes {changes}"


def main(argv=None) -> dict:
    _, out = parse_config(Config, argv)
    return experiment_main(
        NAME, Config, functools.partial(run, workdir=out), plot, argv, summary=_summary
    )


if __name__ == "__main__":
    cli(main)
