"""Audit a preference data set before training: which pairs will displace their preferred response?

``python -m experiments audit --model DIR --pairs FILE.jsonl --out DIR [--keep-fraction 0.05]``

For every row of a TRL-style JSONL file (default: pairs generated from the corpus, on the
self-made checkpoint of :mod:`sims.checkpoints.selfmade`) this reports CHES, length-normalised
CHES, normalised edit distance, last-hidden inner product, the exact d/dt ln pi(y+|x) at t = 0 of
gradient flow on the pair's own DPO loss and, for single-token responses, the tokens predicted to
gain probability fastest (:func:`sims.protocols.filtering.audit_rows`). A negative velocity: the
pair, trained alone, lowers its preferred response's likelihood. Writes ``audit.png``/``.json``,
``audit_pairs.csv``/``.jsonl`` (one row per pair, by input line) and with ``--keep-fraction F``
``audit_filtered.jsonl``: the fraction F of pairs with the lowest length-normalised CHES (the §6
filter, which kept 5%). Unusable rows are listed by line number, never dropped silently. Prompts
and responses are concatenated as they are, or rendered by the chat template (``--chat-template``).
"""

from __future__ import annotations

import dataclasses
import functools

import matplotlib.pyplot as plt
import numpy as np

from experiments import framework as fw
from sims.analysis.scores import spearman
from sims.analysis.summaries import statistic, statistic_text
from sims.checkpoints.hf import DTYPES
from sims.checkpoints.packaged import PACKAGED_MODELS
from sims.checkpoints.selfmade import SelfMadeSpec, open_or_make, read_pairs
from sims.protocols.filtering import audit_rows, lowest_ches_lines, write_audit_files

NAME = "audit"


@dataclasses.dataclass(frozen=True)
class Config(fw.ExperimentConfig, SelfMadeSpec):
    """Per-pair displacement audit of a preference data set (CHES, exact t = 0 velocity)."""

    model: str = ""  # folder, GGUF file or packaged name; "" = the self-made tiny Llama (made here)
    dtype: str = "float32"  # parameter dtype
    chat_template: bool = False  # render prompts with the checkpoint's chat template (else plain)
    pairs: str = ""  # TRL-style JSONL (prompt, chosen, rejected); "" = generated from the corpus
    pairs_per_prompt: int = 4  # generated data: pairs per request prompt (48 prompts)
    max_len: int = 512  # longest sequence (prompt + response + eos), tokens; longer rows skipped
    beta: float = 0.1  # DPO KL coefficient of the pair loss whose velocity is reported
    chunk_size: int = 8  # pairs per jitted vmap chunk (per-pair gradients: 1 for 8B models)
    top_k: int = 5  # predicted gainers kept per single-token pair
    keep_fraction: float = 0.0  # > 0: write the fraction with lowest ln-CHES (paper §6: 0.05)
    seed: int = 0

    RULES = {
        "pretrain_steps": fw.nonnegative_int,
        "refusal_prob": fw.probability,
        "dtype": fw.one_of(sorted(DTYPES)),
        "model": fw.existing_path(allow=("", *PACKAGED_MODELS)),
        "keep_fraction": fw.probability,
        "pairs": fw.existing_file(),
    }

    def check(self) -> None:
        self.check_spec()

    @classmethod
    def smoke(cls) -> Config:
        return cls.tiny(pairs_per_prompt=1, max_len=24, keep_fraction=0.25)


def run(config: Config, *, workdir=None) -> dict:
    fw.enable_x64()  # as the main job: float64 scalars beside the checkpoint's dtype
    rows, bad = read_pairs(  # before any pre-training: a file without a usable row stops here
        config.pairs,
        seed=config.seed,
        pairs_per_prompt=config.pairs_per_prompt,
        log=lambda line: fw.progress(f"[{NAME}] {line}"),
    )
    made = open_or_make(
        config.model,
        config.spec(),
        seed=config.seed,
        dtype=config.dtype,
        use_chat_template=config.chat_template,
        workdir=workdir,
    )
    fw.progress(f"[{NAME}] checkpoint: {made.describe()}")
    audited = audit_rows(
        made.checkpoint,
        rows,
        beta=config.beta,
        max_len=config.max_len,
        batch_size=config.chunk_size,
        top_k=config.top_k,
        progress=fw.progress,
    )
    kept = lowest_ches_lines(audited, config.keep_fraction)
    if workdir is not None:  # the per-pair files first: no summary below can lose them
        files = write_audit_files(workdir, NAME, audited, rows, kept)
        fw.progress(f"[{NAME}] wrote {', '.join(f.name for f in files)} ({len(kept)} pairs kept)")
    a = audited.audit
    setup = {k: getattr(config, k) for k in ("model", "dtype", "chat_template")}
    return {
        "config": config,
        "checkpoint": {**made.describe(), **setup, **dataclasses.asdict(config.spec())},
        "num_pairs": len(audited.records),
        "skipped_rows": [b._asdict() for b in sorted(bad + audited.bad)],
        "pairs": audited.records,
        "fraction_predicted_displacing": float((a.velocity_chosen < 0).mean()),
        **statistic("spearman_velocity_vs_ches", spearman, a.ches, a.velocity_chosen),
        **statistic("spearman_velocity_vs_ches_ln", spearman, a.ches_ln, a.velocity_chosen),
        "kept_lines": kept,
        "provenance": fw.provenance(dtype_of=a.velocity_chosen),
    }


def plot(results: dict) -> plt.Figure:
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    pairs = results["pairs"]
    col = {k: np.array([p[k] for p in pairs]) for k in ("ches", "ches_ln", "velocity_chosen")}
    vel = "d/dt ln pi(y+|x)"
    labels = ("CHES", "length-normalised CHES", f"{vel} at t=0")
    for ax, key, label in zip(axes[:3], col, labels, strict=True):
        ax.hist(col[key], bins=30, color="C0")
        ax.set(xlabel=label, ylabel="pairs")
    axes[2].axvline(0, color="k", lw=0.5)
    v = col["velocity_chosen"]
    axes[3].scatter(col["ches_ln"], v, s=8, c=np.where(v < 0, "C3", "C2"))
    axes[3].axhline(0, color="k", lw=0.5)
    rho = statistic_text(results["spearman_velocity_vs_ches_ln"])
    axes[3].set(xlabel=labels[1], ylabel=vel, yscale="symlog", title=f"Spearman {rho}")
    head = f"{results['checkpoint']['source']}: {results['num_pairs']} pairs"
    fig.suptitle(f"{head}, {results['fraction_predicted_displacing']:.0%} predicted to displace y+")
    fig.tight_layout()
    return fig


def _summary(r: dict) -> str:
    rho = [statistic_text(r[f"spearman_velocity_vs_{k}"]) for k in ("ches", "ches_ln")]
    done = f"{r['num_pairs']} pairs ({len(r['skipped_rows'])} rows skipped)"
    share = f"{r['fraction_predicted_displacing']:.1%} predicted to displace y+"
    return f"{done}; {share}; Spearman (velocity, CHES) {rho[0]}, (velocity, ln-CHES) {rho[1]}"


def main(argv=None) -> dict:
    _, out = fw.parse_config(Config, argv)  # experiment_main makes and checks the folder
    run_in_out = functools.partial(run, workdir=out)
    return fw.experiment_main(NAME, Config, run_in_out, plot, argv, summary=_summary)


if __name__ == "__main__":
    fw.cli(main)
