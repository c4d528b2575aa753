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
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

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
from sims.analysis.gainers import gainers_at, largest_decrease
from sims.analysis.scores import spearman
from sims.analysis.summaries import (
    groups,
    mean_gain,
    mean_of,
    mean_peak_gain,
    statistic,
    statistic_text,
    top_names,
)
from sims.data.vocab import (
    BENIGN_FOR_NO,
    CATASTROPHIC_FOR_NO,
    GEOMETRIES,
    NO_SET,
    YES_SET,
    semantic_unembeddings,
)
from sims.flows.core import SFTData, preference_flow, sft_flow
from sims.models.unconstrained import UnconstrainedFeatures, make_pairs
from theory import losses
from theory.single_token import displacement_terms, logprob_velocity

NAME = "no_over_never"
#: Probability curves of the trajectory panels and their colours.
CURVES = {
    "p_no": "tab:blue",
    "p_catastrophic": "tab:red",
    "p_benign": "tab:green",
    "p_never": "0.5",
}


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


def _sft_model(config: Config, geometry: str, seed: int):
    """Return ``(model, tokens)``: the SFT model of one run and its vocabulary."""
    k_vocab, k_hidden, _ = jax.random.split(jax.random.key(config.seed * 1000 + seed), 3)
    d, P = config.hidden_size, config.prompts
    W, tokens = semantic_unembeddings(
        k_vocab,
        geometry=geometry,
        hidden_size=d,
        concept_scale=config.concept_scale,
        num_filler=config.num_filler,
    )
    idx = {t: i for i, t in enumerate(tokens)}
    H = jax.random.normal(k_hidden, (P, d)) / jnp.sqrt(d)
    sft_prompts, labels = zip(
        *[(p, idx[t]) for p in range(P) for t in (NO_SET if p < P // 2 else YES_SET)], strict=True
    )
    model = UnconstrainedFeatures.from_arrays(W, H)
    sft = sft_flow(
        model,
        SFTData(jnp.array(sft_prompts), jnp.array(labels)),
        dt=config.sft_dt,
        num_steps=config.sft_steps,
    ).run()
    return sft.final, tokens


def _one_run(config: Config, geometry: str, seed: int) -> dict:
    model, tokens = _sft_model(config, geometry, seed)
    idx = {t: i for i, t in enumerate(tokens)}
    y_pos, y_neg = idx["No"], idx["Never"]
    pairs = make_pairs(model, [0], [y_pos], [y_neg])
    loss = losses.make_loss("dpo", beta=config.beta)
    W0, h0 = model.unembedding[...], model.hidden[...][0]
    terms = displacement_terms(W0, h0, y_pos, y_neg)
    lp0 = model(jnp.array([0]))[0]
    ell_prime = losses.margin_derivative(loss, lp0[y_pos], lp0[y_neg], lp0[y_pos], lp0[y_neg])
    predicted = logprob_velocity(W0, h0, y_pos, y_neg, ell_prime)
    traj = preference_flow(
        model, pairs, loss, dt=config.dt, num_steps=config.steps, record_every=config.record_every
    ).run()
    logprobs = np.asarray(traj.observables.logprobs[:, 0])  # [C + 1, V]
    probs = np.exp(logprobs)
    # instantaneous velocity at t = 0: one Euler step of flow time probe_dt
    probe = preference_flow(model, pairs, loss, dt=config.probe_dt, num_steps=1).run()
    step = probe.observables.logprobs[1, 0] - probe.observables.logprobs[0, 0]
    instant = np.asarray(step / config.probe_dt)
    n_ckpt = probs.shape[0] - 1
    early = logprobs[max(1, round(0.05 * n_ckpt))] - logprobs[0]
    checkpoints = [max(1, round(frac * n_ckpt)) for frac in (0.05, 0.25, 1.0)]
    gainers = gainers_at(probs, tokens, k=config.top_k, checkpoints=checkpoints)
    others = np.array([i for i in range(len(tokens)) if i not in (y_pos, y_neg)])
    align = terms.token_alignment[others]
    p_no = probs[:, y_pos]
    return {
        "geometry": geometry,
        "seed": seed,
        "t": traj.t,
        "loss": traj.loss,
        "p_no": p_no,
        "p_never": probs[:, y_neg],
        "p_catastrophic": probs[:, [idx[t] for t in CATASTROPHIC_FOR_NO]].sum(1),
        "p_benign": probs[:, [idx[t] for t in BENIGN_FOR_NO]].sum(1),
        "no_decrease_max": float(largest_decrease(p_no)),
        "no_change": float(p_no[-1] - p_no[0]),
        "theorem4_velocity_no": float(predicted[y_pos]),
        "observed_velocity_no": float(instant[y_pos]),
        "m_plus_S": float(terms.m + terms.S),
        "theorem5_alignment": {tokens[i]: float(terms.token_alignment[i]) for i in others},
        "early_logprob_change": {tokens[i]: float(early[i]) for i in others},
        **statistic("spearman_alignment_vs_instant", spearman, align, instant[others]),
        **statistic("spearman_alignment_vs_early", spearman, align, early[others]),
        **statistic(
            "spearman_alignment_vs_final",
            spearman,
            align,
            logprobs[-1, others] - logprobs[0, others],
        ),
        "top_gainers": {
            f"t={float(traj.t[c]):g}": g for c, g in zip(checkpoints, gainers, strict=True)
        },
        "top_predicted": top_names(predicted[others], [tokens[i] for i in others], config.top_k),
    }


def _geometry_summary(rs: list[dict]) -> dict:
    """Per-geometry means of the per-run numbers."""
    signs = [np.sign(r["theorem4_velocity_no"]) == np.sign(r["observed_velocity_no"]) for r in rs]
    return {
        "runs_with_no_falling": sum(r["no_change"] < 0 for r in rs),
        "mean_no_decrease_max": mean_of(rs, "no_decrease_max"),
        "mean_catastrophic_gain": mean_gain(rs, "p_catastrophic"),
        "mean_benign_gain": mean_gain(rs, "p_benign"),
        "theorem4_sign_matches": int(sum(signs)),
        "mean_spearman_alignment_vs_instant": mean_of(rs, "spearman_alignment_vs_instant"),
        "mean_spearman_alignment_vs_early": mean_of(rs, "spearman_alignment_vs_early"),
        "mean_catastrophic_peak_gain": mean_peak_gain(rs, "p_catastrophic"),
        "mean_benign_peak_gain": mean_peak_gain(rs, "p_benign"),
        "mean_spearman_alignment_vs_final": mean_of(rs, "spearman_alignment_vs_final"),
        "runs": len(rs),
    }


def run(config: Config) -> dict:
    enable_x64()  # float64 flows, however run() is called
    runs = []
    for geometry in GEOMETRIES:
        for seed in range(config.seeds):
            runs.append(r := _one_run(config, geometry, seed))
            progress(
                f"  {geometry} seed {seed}: pi(No) {r['p_no'][0]:.3f} -> {r['p_no'][-1]:.3f}, "
                f"Yes set {r['p_catastrophic'][0]:.3f} -> {r['p_catastrophic'][-1]:.3f}, "
                f"top gainer {r['top_gainers'][list(r['top_gainers'])[-1]][0][0]}"
            )
    return {
        "config": config,
        "runs": runs,
        "summary": {g: _geometry_summary(rs) for g, rs in groups(runs, "geometry").items()},
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
    return experiment_main(NAME, Config, run, plot, argv, summary=lambda r: str(r["summary"]))


if __name__ == "__main__":
    cli(main)
