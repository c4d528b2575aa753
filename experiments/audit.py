"""Audit a preference data set before training: which pairs will displace their preferred response?

``python -m experiments audit --model DIR --pairs FILE.jsonl --out DIR [--keep-fraction 0.05]``

For every row of a TRL-style JSONL file (``prompt``, ``chosen``, ``rejected``; default: pairs
generated from the corpus, on the self-made checkpoint) this reports CHES, length-normalised CHES,
normalised edit distance, the last-hidden inner product, the exact d/dt ln pi(y+|x) at t = 0 of
gradient flow on the pair's own DPO loss (one grad + one jvp,
:func:`sims.analysis.audit.audit_pairs`) and,
for single-token responses, the tokens predicted to gain probability fastest. A negative velocity
means the pair, trained alone, lowers its preferred response's likelihood. Writes
``audit.png`` / ``audit.json`` (summary and the numbers behind the figure), ``audit_pairs.csv`` and
``audit_pairs.jsonl`` (one row per pair, by input line), and with ``--keep-fraction F``
``audit_filtered.jsonl``: the fraction F of pairs with the lowest length-normalised CHES (the
paper's §6 filter, which kept 5%). Rows that cannot be used are listed by line number, never
dropped silently. Prompts are concatenated with the responses as they are, or rendered by the
checkpoint's chat template with ``--chat-template true``.
"""

from __future__ import annotations

import csv
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from experiments._checkpoint import CheckpointConfig, open_checkpoint, read_pairs
from experiments.framework import (
    cli,
    enable_x64,
    existing_file,
    experiment_main,
    parse_config,
    probability,
    progress,
    provenance,
)
from sims.analysis.audit import audit_pairs
from sims.analysis.scores import spearman
from sims.analysis.summaries import statistic, statistic_text
from sims.data.preferences import encode_preferences, write_preference_jsonl
from theory.losses import make_loss

NAME = "audit"
NUMBERS = (
    "ches",
    "ches_ln",
    "edit_distance",
    "last_inner",
    "logprob_chosen",
    "logprob_rejected",
    "velocity_chosen",
    "velocity_rejected",
)


@dataclass(frozen=True)
class Config(CheckpointConfig):
    """Per-pair displacement audit of a preference data set (CHES, exact t = 0 velocity)."""

    pairs: str = ""  # TRL-style JSONL (prompt, chosen, rejected); "" = generated from the corpus
    pairs_per_prompt: int = 4  # generated data: pairs per request prompt (48 prompts)
    max_len: int = 512  # longest sequence (prompt + response + eos), tokens; longer rows skipped
    beta: float = 0.1  # DPO KL coefficient of the pair loss whose velocity is reported
    chunk_size: int = 8  # pairs per jitted vmap chunk (per-pair gradients: 1 for 8B models)
    top_k: int = 5  # predicted gainers kept per single-token pair
    keep_fraction: float = 0.0  # > 0: write the fraction with lowest ln-CHES (paper §6: 0.05)
    seed: int = 0

    RULES = {**CheckpointConfig.RULES, "keep_fraction": probability, "pairs": existing_file()}

    @classmethod
    def smoke(cls) -> Config:
        return cls(**cls.SMOKE, pairs_per_prompt=1, max_len=24, keep_fraction=0.25)


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
    bad = sorted(bad + enc.bad)
    audit = audit_pairs(
        ckpt.model,
        enc.chosen,
        enc.rejected,
        make_loss("dpo", beta=config.beta),
        batch_size=config.chunk_size,
        top_k=config.top_k,
        progress=progress,
    )
    single = np.all(enc.response_tokens == 1, axis=1)
    by_line = {r.line: r for r in rows}
    per_pair = []
    for i, line in enumerate(enc.lines.tolist()):
        entry = {"line": line, **{k: float(getattr(audit, k)[i]) for k in NUMBERS}}
        entry["single_token"] = bool(single[i])
        entry["gainers"] = (
            [
                {"token": ckpt.tokenizer.id_to_token(int(z)), "rate": float(v)}
                for z, v in zip(audit.gainers[i], audit.gainer_rates[i], strict=True)
            ]
            if single[i]
            else None
        )
        per_pair.append(entry)
    keep = int(math.ceil(config.keep_fraction * len(per_pair)))
    kept = sorted(enc.lines[np.argsort(audit.ches_ln, kind="stable")[:keep]].tolist())
    if workdir is not None:  # the per-pair files first: no summary below can lose them
        _write_outputs(Path(workdir), config, per_pair, [by_line[line] for line in kept])
    displacing = audit.velocity_chosen < 0
    return {
        "config": config,
        "checkpoint": ckpt.describe(config),
        "num_pairs": len(per_pair),
        "skipped_rows": [b._asdict() for b in bad],
        "pairs": per_pair,
        "fraction_predicted_displacing": float(displacing.mean()),
        **statistic("spearman_velocity_vs_ches", spearman, audit.ches, audit.velocity_chosen),
        **statistic("spearman_velocity_vs_ches_ln", spearman, audit.ches_ln, audit.velocity_chosen),
        "kept_lines": kept,
        "provenance": provenance(dtype_of=audit.velocity_chosen),
    }


def _write_outputs(out: Path, config: Config, per_pair: list[dict], kept_rows) -> None:
    fields = ["line", *NUMBERS, "single_token", "gainers"]
    with open(out / f"{NAME}_pairs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for p in per_pair:
            gainers = " ".join(g["token"] for g in p["gainers"]) if p["gainers"] else ""
            writer.writerow({**p, "gainers": gainers})
    (out / f"{NAME}_pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in per_pair))
    if config.keep_fraction > 0:
        write_preference_jsonl(out / f"{NAME}_filtered.jsonl", kept_rows)
    progress(
        f"[{NAME}] wrote {NAME}_pairs.csv, {NAME}_pairs.jsonl"
        + (f", {NAME}_filtered.jsonl ({len(kept_rows)} pairs)" if kept_rows else "")
    )


def plot(results: dict) -> plt.Figure:
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    col = {
        k: np.array([p[k] for p in results["pairs"]])
        for k in ("ches", "ches_ln", "velocity_chosen")
    }
    for ax, key, label in zip(
        axes, col, ("CHES", "length-normalised CHES", "d/dt ln pi(y+|x) at t=0"), strict=False
    ):
        ax.hist(col[key], bins=30, color="C0")
        ax.set(xlabel=label, ylabel="pairs")
    axes[2].axvline(0, color="k", lw=0.5)
    axes[3].scatter(
        col["ches_ln"],
        col["velocity_chosen"],
        s=8,
        c=np.where(col["velocity_chosen"] < 0, "C3", "C2"),
    )
    axes[3].axhline(0, color="k", lw=0.5)
    axes[3].set_yscale("symlog")
    axes[3].set(
        xlabel="length-normalised CHES",
        ylabel="d/dt ln pi(y+|x)",
        title=f"Spearman {statistic_text(results['spearman_velocity_vs_ches_ln'])}",
    )
    fig.suptitle(
        f"{results['checkpoint']['source']}: {results['num_pairs']} pairs, "
        f"{results['fraction_predicted_displacing']:.0%} predicted to displace y+"
    )
    fig.tight_layout()
    return fig


def _summary(r: dict) -> str:
    return (
        f"{r['num_pairs']} pairs ({len(r['skipped_rows'])} rows skipped); "
        f"{r['fraction_predicted_displacing']:.1%} predicted to displace y+; Spearman "
        f"(velocity, CHES) {statistic_text(r['spearman_velocity_vs_ches'])}, (velocity, ln-CHES) "
        f"{statistic_text(r['spearman_velocity_vs_ches_ln'])}"
    )


def main(argv=None) -> dict:
    _, out = parse_config(Config, argv)
    out.mkdir(parents=True, exist_ok=True)
    return experiment_main(
        NAME, Config, functools.partial(run, workdir=out), plot, argv, summary=_summary
    )


if __name__ == "__main__":
    cli(main)
