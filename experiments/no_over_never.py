"""Razin et al. 2024 Table 1 in the theory model: preferring ``No`` over ``Never`` raises ``Yes``.

Protocol (App. H.1 analogue): a vocabulary with meaningful unembeddings (:mod:`sims.data.vocab`),
``P`` prompts, half "trait" prompts labelled from {No, Never, Maybe, Perhaps}, half from the Yes
set; an SFT flow on all prompts; then a DPO flow on one trait prompt with ``No > Never`` (reference
= the SFT model). Reading: the paper draws one random label per prompt over 1000 prompts; in the
unconstrained-features model each prompt's hidden embedding is free and would memorise its one
label, so the SFT here is the expectation of that loss: every prompt is trained on every label of
its set (pi spreads over the set, as a network shared across prompts does).

For three geometries (catastrophic / benign / none) and several seeds: pi(No) over time; the mass
on the Yes set (catastrophic) and on the rest of the No set plus No-synonyms (benign); the tokens
gaining most at t = 5, 25, 100 (the paper's steps 5/25/100); Theorem 4's sign at t = 0 against a
one-step probe; and Theorem 5's ranking ``<W_z, W_No - W_Never>`` beside the observed ranking.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import matplotlib.pyplot as plt

from experiments.framework import (
    ConfigError,
    ExperimentConfig,
    cli,
    enable_x64,
    experiment_main,
    progress,
    provenance,
)
from experiments.framework.plots import annotated_scatter
from sims.analysis.summaries import groups, statistic_text
from sims.data.vocab import GEOMETRIES
from sims.protocols.theory_checks import (
    no_over_never_model,
    no_over_never_record,
    no_over_never_summary,
)
from theory import losses

NAME = "no_over_never"
#: Probability curves of the trajectory panels and their colours.
CURVES = dict(p_no="tab:blue", p_catastrophic="tab:red", p_benign="tab:green", p_never="0.5")
#: Config fields of the SFT model (:func:`no_over_never_model`).
SFT_FIELDS = ("hidden_size", "concept_scale", "num_filler", "prompts", "sft_dt", "sft_steps")
#: Per geometry (experiments.framework.conclusions): gains, runs where No fell, Theorem 4 signs.
CONCLUSIONS = {
    k: ("rate", ("summary", "*", k))
    for k in ("mean_catastrophic_peak_gain", "mean_benign_peak_gain", "runs_with_no_falling",
              "theorem4_sign_matches")
}  # fmt: skip


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """DPO with No > Never after SFT, in three unembedding geometries."""

    seed: int = 0
    seeds: int = 3  # runs per geometry (vocabulary noise, prompts, SFT labels)
    hidden_size: int = 32  # d
    concept_scale: float = 3.0  # norm scale of the concept part of answer unembeddings
    num_filler: int = 40  # unrelated tokens
    prompts: int = 16  # P; the first half are "trait" prompts
    sft_dt: float = 0.5  # Euler step of the SFT flow
    sft_steps: int = 200  # SFT Euler steps
    beta: float = 0.1  # DPO KL coefficient (paper: 0.1)
    dt: float = 0.2  # Euler step of the DPO flow
    steps: int = 500  # DPO steps; flow time t = steps * dt (checkpoints t = 5, 25, 100)
    record_every: int = 10  # DPO steps between recorded checkpoints
    top_k: int = 5  # gainers listed per checkpoint
    probe_dt: float = 1e-4  # flow time of the one-step probe of the t = 0 velocity

    @classmethod
    def smoke(cls) -> Config:
        return cls(seeds=1, num_filler=8, prompts=4, sft_steps=20, steps=40, record_every=10)

    def check(self) -> None:
        if self.steps % self.record_every:
            raise ConfigError(
                f"--record-every must divide --steps, got {self.record_every} and {self.steps}"
            )
        if self.prompts < 2:
            raise ConfigError(f"--prompts must be >= 2 (half trait, half not), got {self.prompts}")


def run(config: Config) -> dict:
    enable_x64()  # float64 flows, however run() is called
    sft = {k: getattr(config, k) for k in SFT_FIELDS}
    dpo = dict(dt=config.dt, num_steps=config.steps, record_every=config.record_every)
    loss = losses.make_loss("dpo", beta=config.beta)
    runs = []
    for geometry in GEOMETRIES:
        for seed in range(config.seeds):
            key = jax.random.key(config.seed * 1000 + seed)
            model, tokens = no_over_never_model(key, geometry=geometry, **sft)
            record = no_over_never_record(
                model, tokens, loss, probe_dt=config.probe_dt, top_k=config.top_k, **dpo
            )
            runs.append(r := {"geometry": geometry, "seed": seed, **record})
            progress(
                f"  {geometry} seed {seed}: pi(No) {r['p_no'][0]:.3f} -> {r['p_no'][-1]:.3f}, "
                f"Yes set {r['p_catastrophic'][0]:.3f} -> {r['p_catastrophic'][-1]:.3f}, "
                f"top gainer {r['top_gainers'][list(r['top_gainers'])[-1]][0][0]}"
            )
    return {
        "config": config,
        "runs": runs,
        "summary": {g: no_over_never_summary(rs) for g, rs in groups(runs, "geometry").items()},
        "provenance": provenance(dtype_of=runs[0]["p_no"]),
    }


def plot(results: dict) -> plt.Figure:
    by_geometry = groups(results["runs"], "geometry")
    geometries = list(results["summary"])
    fig, axes = plt.subplots(2, len(geometries), figsize=(5 * len(geometries), 8), squeeze=False)
    for j, geometry in enumerate(geometries):
        rs, ax = by_geometry[geometry], axes[0, j]
        for k, r in enumerate(rs):
            for key, color in CURVES.items():
                ax.plot(r["t"], r[key], color=color, alpha=0.7, label=key if k == 0 else None)
        ax.set(title=f"{geometry}: DPO with No > Never", xlabel="flow time t", ylabel="probability")
        ax.legend(fontsize=8)
        r, ax = rs[0], axes[1, j]
        names = list(r["theorem5_alignment"])
        x = [r["theorem5_alignment"][n] for n in names]
        y = [r["early_logprob_change"][n] for n in names]
        annotated_scatter(ax, x, y, names, named=lambda n: not n.startswith("<"))
        ax.set(
            xlabel="<W_z, W_No - W_Never> at t=0 (Theorem 5)",
            ylabel="observed change of ln pi(z) over t <= 5",
            title=f"seed 0: Spearman = {statistic_text(r['spearman_alignment_vs_early'], '.3f')}",
        )
    fig.tight_layout()
    return fig


def main(argv=None) -> dict:
    return experiment_main(
        NAME, Config, run, plot, argv, summary=lambda r: str(r["summary"]), conclusions=CONCLUSIONS
    )


if __name__ == "__main__":
    cli(main)
