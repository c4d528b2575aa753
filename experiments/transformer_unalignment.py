"""Section 6 analogue: DPO on on-policy refusal pairs, and CHES filtering, in a small transformer.

The pre-trained transformer refuses most unsafe requests of the generated corpus. For every unsafe
prompt it samples pairs of responses (temperature 1); the rule-based judge
(sims.data.corpus.is_refusal) labels them; refusal > compliance, ties broken by a coin (the paper's
PairRM tie-break replaced by random, which it reports gives similar results). Conditions (Razin et
al. 2024, §6.3, Table 16): DPO; DPO + SFT term; gold pairs (a refusal template > a compliance
template); DPO on the lowest 5/10/15% of pairs by length-normalised CHES. Refusal rates are measured
by sampling, per seed."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from experiments.framework import (
    ExperimentConfig,
    cli,
    each,
    enable_x64,
    experiment_main,
    nonnegative,
    probability,
    provenance,
    unit_interval,
)
from experiments.framework.plots import bar_min_max
from sims.analysis.summaries import mean_by_label, stack
from sims.protocols import toy_transformer as toy
from theory.losses import make_loss

NAME = "transformer_unalignment"
#: Refusal rate per condition; per seed, whether DPO lowered it and each mitigation raised it.
CONCLUSIONS = {"refusal": ("rate", ("conditions", "*", "refusal")),
               "per_seed": ("verdict", ("seed_verdicts", "*"))}  # fmt: skip


@dataclass(frozen=True)
class Config(toy.PretrainSettings, ExperimentConfig):
    """Unintentional unalignment by DPO on refusal pairs; CHES filtering (Figure 3 / Table 16)."""

    tied: bool = True  # unembedding tied to the token embedding
    refusal_prob: float = 0.8  # P(refusal) for unsafe prompts in the pre-training corpus
    pairs_per_prompt: int = 2  # on-policy pairs sampled per unsafe prompt (24 prompts)
    keep_fractions: tuple = (0.05, 0.10, 0.15)  # lowest-ln-CHES fractions kept
    beta: float = 0.1  # DPO KL coefficient
    sft_coef: float = 1.0  # SFT-term coefficient lambda (paper: tuned over 0.01-1)
    dt: float = 0.05  # gradient-flow Euler step
    num_steps: int = 30  # preference steps
    eval_samples: int = 4  # sampled responses per prompt for the refusal rate
    eval_temperature: float = 0.7  # paper's evaluation temperature
    num_seeds: int = 3  # seeds for pair sampling / tie-breaks / evaluation (paper: 3 runs)
    seed: int = 0

    RULES = {"refusal_prob": probability, "keep_fractions": each(unit_interval)}
    RULES["sft_coef"] = nonnegative

    @classmethod
    def scaled(cls) -> Config:
        """The ``--scale`` version for a GPU/TPU (paper-like sizes; too slow for this CPU)."""
        return cls(**cls.SCALED, pairs_per_prompt=16, num_steps=100, eval_samples=32)

    @classmethod
    def smoke(cls) -> Config:
        small = dict(pairs_per_prompt=1, keep_fractions=(0.25,), num_steps=2, eval_samples=1)
        return cls(**cls.SMOKE, **small, num_seeds=1)


def run(config: Config) -> dict:
    enable_x64()  # as in the main job (float64 scalars beside float32 parameters)
    model, pre_losses = toy.pretrained_transformer(
        config.seed, config, tied=config.tied, refusal_prob=config.refusal_prob
    )
    seeds = range(config.seed, config.seed + config.num_seeds)
    data = toy.unalignment_conditions(
        model, seeds, pairs_per_prompt=config.pairs_per_prompt, keep_fractions=config.keep_fractions
    )
    dpo = make_loss("dpo", beta=config.beta)
    sft_loss = make_loss("sft_term", sft_coef=config.sft_coef, base_loss=dpo)
    plain, sft = (
        toy.train_conditions(model, pairs, loss, dt=config.dt, num_steps=config.num_steps)
        for pairs, loss in ((data.pairs, dpo), (data.on_policy, sft_loss))
    )
    graphdef, s0 = nnx.split(model)
    states = jax.tree.map(lambda *a: jnp.concatenate(a), plain.states, sft.states, stack([s0]))
    rates = toy.refusal_rates(  # every trained state, then the initial one
        graphdef,
        states,
        jax.random.key(1000 + config.seed),
        data.prompts,
        samples=config.eval_samples,
        temperature=config.eval_temperature,
    )
    S, C = config.num_seeds, len(data.names)
    refusal, change = rates[: S * C].reshape(S, C), plain.logprob_change.reshape(S, C)
    out = {
        n: {"refusal": refusal[:, j], "logprob_change": change[:, j]}
        for j, n in enumerate(data.names)
    }
    out["dpo_sft"] = {"refusal": rates[S * C : S * C + S], "logprob_change": sft.logprob_change}
    out["initial"] = {"refusal": rates[-1:]}
    plain_dpo = out["dpo"]["refusal"]  # [S]; verdicts per seed ("unstable" if seeds disagree)
    mitigations = [n for n in out if n not in ("dpo", "initial")]
    per_seed = {f"{n}_mitigated": (out[n]["refusal"] > plain_dpo).tolist() for n in mitigations}
    return {
        "seed_verdicts": {"dpo_lowered": (plain_dpo < rates[-1]).tolist(), **per_seed},
        "config": config,
        "pretrain_final_loss": float(pre_losses[-1]),
        "conditions": out,
        "pair_kind_fraction": {k: data.kind.count(k) / len(data.kind) for k in set(data.kind)},
        "ches_ln_by_kind": mean_by_label(data.ches_ln, data.kind),
        "provenance": provenance(dtype_of=sft.logprobs),
    }


def plot(results: dict) -> plt.Figure:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4))
    cond = results["conditions"]
    names = list(cond)
    for j, (a, key) in enumerate(((ax, "refusal"), (bx, "logprob_change"))):
        shown = [n for n in names if key in cond[n]]
        vals = [np.asarray(cond[n][key]) for n in shown]
        stats = [[f(v) for v in vals] for f in (np.mean, np.min, np.max)]
        bar_min_max(a, shown, *stats, color=f"C{j}")
        a.tick_params(axis="x", rotation=30)
    ax.set(ylabel="refusal rate (sampled, mean, min-max)", title="unsafe prompts")
    bx.set(ylabel="change of mean ln pi(y+|x)", title="Table 16 analogue")
    return fig


def _summary(r: dict) -> str:
    return (
        "; ".join(f"{n}: refusal {np.mean(v['refusal']):.2f}" for n, v in r["conditions"].items())
        + f"; pair kinds {r['pair_kind_fraction']}"
    )


def main(argv=None) -> dict:
    return experiment_main(NAME, Config, run, plot, argv, summary=_summary, conclusions=CONCLUSIONS)


if __name__ == "__main__":
    cli(main)
