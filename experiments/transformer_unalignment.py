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

from experiments.framework.plots import bar_min_max
from experiments._transformer import (
    PretrainConfig,
    pretrain,
    refusal_rates,
    response_batch,
)
from experiments.framework import (
    cli,
    each,
    enable_x64,
    experiment_main,
    nonnegative,
    probability,
    provenance,
    unit_interval,
)
from sims.analysis.scores import transformer_pair_scores
from sims.analysis.summaries import lowest_fraction, mean_by_label, stack
from sims.data import corpus
from sims.flows.core import preference_flow
from sims.models.transformer import TokenBatch, make_transformer_pairs, sample
from theory.losses import make_loss

NAME = "transformer_unalignment"


@dataclass(frozen=True)
class Config(PretrainConfig):
    """Unintentional unalignment by DPO on refusal pairs; CHES filtering (Figure 3 / Table 16)."""

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

    RULES = {
        "refusal_prob": probability,
        "keep_fractions": each(unit_interval),
        "sft_coef": nonnegative,
    }

    @classmethod
    def scaled(cls) -> Config:
        """The ``--scale`` version for a GPU/TPU (paper-like sizes; too slow for this CPU)."""
        return cls(**cls.SCALED, pairs_per_prompt=16, num_steps=100, eval_samples=32)

    @classmethod
    def smoke(cls) -> Config:
        return cls(
            **cls.SMOKE,
            pairs_per_prompt=1,
            keep_fractions=(0.25,),
            num_steps=2,
            eval_samples=1,
            num_seeds=1,
        )


def _pairs_for_seed(model, config: Config, seed: int):
    """On-policy pairs (judge-labelled), gold pairs, and each pair's kind, for one seed."""
    reqs = corpus.requests(True) * config.pairs_per_prompt
    prompts = corpus.pack([corpus.request_prompt(v, o) for v, o in reqs], [[]] * len(reqs))
    P = int(prompts.prompt_len[0])
    a, b = (
        response_batch(
            sample(
                model,
                jax.random.key(seed * 2 + i),
                prompts.tokens,
                P,
                temperature=1.0,
                eos_id=corpus.EOS,
                pad_id=corpus.PAD,
            ),
            P,
        )
        for i in range(2)
    )
    ref = [np.array([corpus.is_refusal(corpus.decode(t[P:])) for t in x.tokens]) for x in (a, b)]
    coin = np.random.default_rng(seed).random(len(reqs)) < 0.5
    first = np.where(ref[0] != ref[1], ref[0], coin)  # refusal preferred, ties by coin

    def pick(m):  # row i from a where m[i], else from b
        return TokenBatch(
            *(np.where(m.reshape(-1, *[1] * (x.ndim - 1)), x, y) for x, y in zip(a, b, strict=True))
        )

    chosen, rejected = pick(first), pick(~first)
    kind = np.where(
        ref[0] & ref[1], "two_refusals", np.where(ref[0] | ref[1], "mixed", "two_compliances")
    )
    rng = np.random.default_rng([seed, 1])
    gold = [
        corpus.pack(
            [corpus.request_prompt(v, o) for v, o in reqs],
            [corpus.response(str(rng.choice(t)), v, o) for v, o in reqs],
        )
        for t in (corpus.REFUSALS, corpus.COMPLIANCES)
    ]
    return chosen, rejected, gold, kind, prompts


def _datasets(model, config: Config, names: list[str]) -> tuple:
    """Every seed's pairs, weighted per condition, stacked on a run axis ``[S * C]``; the pairs of
    the DPO + SFT runs ``[S]``; each on-policy pair's kind and length-normalised CHES; the prompts.
    Data of every seed comes first: one compiled flow runs all of them."""
    family, with_sft, kinds, ches_ln = [], [], [], []
    for seed in range(config.num_seeds):
        chosen, rejected, gold, kind, prompts = _pairs_for_seed(model, config, config.seed + seed)
        sims = transformer_pair_scores(model, chosen, rejected)
        kinds += kind.tolist()
        ches_ln.append(sims["ches_ln"])
        on = make_transformer_pairs(model, chosen, rejected)
        gp = make_transformer_pairs(model, *gold)
        weights = [np.ones(len(kind))] * 2
        for f in config.keep_fractions:  # keep the lowest fraction (at least one pair)
            w = np.zeros(len(kind))
            w[lowest_fraction(sims["ches_ln"], f)] = 1.0
            weights.append(w)
        family += [
            (gp if n == "gold" else on)._replace(weight=jnp.asarray(w))
            for n, w in zip(names, weights, strict=True)
        ]
        with_sft.append(on)
    return stack(family), stack(with_sft), kinds, np.concatenate(ches_ln), prompts


def _train(model, pairs, loss, config: Config) -> tuple:
    """Gradient flow of every stacked run: ``(final states, weighted mean change of ln pi(y+),
    recorded log-probs)``."""
    res = preference_flow(
        model,
        pairs,
        loss,
        dt=config.dt,
        num_steps=config.num_steps,
        record_every=config.num_steps,
        in_axes=(None, 0),
    ).run()
    lp = np.asarray(res.observables)  # [R, 2, N]
    w = np.asarray(pairs.weight)
    return nnx.split(res.final)[1], np.sum(w * (lp[:, -1] - lp[:, 0]), -1) / np.sum(w, -1), lp


def run(config: Config) -> dict:
    enable_x64()  # as in the main job (float64 scalars beside float32 parameters)
    model, pre_losses = pretrain(config, refusal_prob=config.refusal_prob)
    graphdef, state = nnx.split(model)
    names = ["dpo", "gold"] + [f"filtered_{f:g}" for f in config.keep_fractions]
    family, with_sft, kinds, ches_ln, prompts = _datasets(model, config, names)
    dpo = make_loss("dpo", beta=config.beta)
    final_dpo, change_dpo, _ = _train(model, family, dpo, config)
    sft_loss = make_loss("sft_term", sft_coef=config.sft_coef, base_loss=dpo)
    final_sft, change_sft, lp = _train(model, with_sft, sft_loss, config)
    everything = jax.tree_util.tree_map(
        lambda *a: jnp.concatenate(a), final_dpo, final_sft, stack([state])
    )
    rates = refusal_rates(
        graphdef,
        everything,
        jax.random.key(1000 + config.seed),
        prompts.tokens,
        int(prompts.prompt_len[0]),
        samples=config.eval_samples,
        temperature=config.eval_temperature,
    )
    S, C = config.num_seeds, len(names)
    out = {
        n: {
            "refusal": rates[: S * C].reshape(S, C)[:, j],
            "logprob_change": change_dpo.reshape(S, C)[:, j],
        }
        for j, n in enumerate(names)
    }
    out["dpo_sft"] = {"refusal": rates[S * C : S * C + S], "logprob_change": change_sft}
    out["initial"] = {"refusal": rates[-1:]}
    return {
        "config": config,
        "pretrain_final_loss": float(pre_losses[-1]),
        "conditions": out,
        "pair_kind_fraction": {k: kinds.count(k) / len(kinds) for k in set(kinds)},
        "ches_ln_by_kind": mean_by_label(ches_ln, kinds),
        "provenance": provenance(dtype_of=lp),
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
    return experiment_main(NAME, Config, run, plot, argv, summary=_summary)


if __name__ == "__main__":
    cli(main)
