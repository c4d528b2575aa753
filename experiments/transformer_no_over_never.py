"""Section 3 analogue on a real architecture: does preferring `no` over `never` raise `yes`?

A small causal transformer is pre-trained on the generated corpus (sims.data.corpus), where
trait-according persona statements are answered from {no, never, maybe, perhaps}. DPO on the
single-token pair no > never runs on one such prompt per run (gradient flow, all parameters).
At t = 0, Theorems 4/5 are evaluated with the model's actual W and h (the unconstrained-features
prediction) and compared with the transformer's true velocity d/dt ln pi(z|x) (a JVP of the
log-probs along -grad L).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from experiments.framework import ExperimentConfig, cli, experiment_main
from experiments.framework.output import enable_x64, progress, provenance
from experiments.framework.plots import mean_band
from sims.analysis.scores import pearson
from sims.analysis.summaries import sign_match_rate, statistic_per_row
from sims.data import corpus
from sims.flows.core import preference_flow
from sims.models.transformer import make_transformer_pairs
from sims.protocols import kernel_checks as kc
from sims.protocols import toy_transformer as toy
from theory.losses import make_loss

NAME = "transformer_no_over_never"
#: Fractions of runs (conclusions); Theorem 4's sign agreement; the correlation per run.
CONCLUSIONS = {
    **{k: ("rate", k) for k in ("yes_rose", "yes_set_rose", "pos_decreased", "sign_agreement_yes",
       "sign_agreement_pos", "sign_agreement_all_tokens")},
    "velocity_correlation": ("rate", "velocity_correlation"),
}  # fmt: skip
Y_POS, Y_NEG = "no", "never"
#: Curves of the probability panel: result key -> label.
CURVES = dict(pi_pos="no (y+)", pi_neg="never (y-)", pi_yes="yes", pi_pos_set_mass="Y set mass")


@dataclass(frozen=True)
class Config(toy.PretrainSettings, ExperimentConfig):
    """Transformer persona task: DPO on no > never (Table 1 analogue, Theorems 4/5 at t = 0)."""

    tied: bool = True  # unembedding tied to the token embedding
    beta: float = 0.1  # DPO KL coefficient
    dt: float = 0.02  # gradient-flow Euler step of the preference phase (t = 2 at the end)
    num_steps: int = 100  # preference steps
    num_runs: int = 10  # runs, each on one trait-according prompt (distinct)
    seed: int = 0

    @classmethod
    def scaled(cls) -> Config:
        """The ``--scale`` version for a GPU/TPU (paper-like sizes; too slow for this CPU)."""
        return cls(**cls.SCALED, num_runs=20)

    @classmethod
    def smoke(cls) -> Config:
        return cls(**cls.SMOKE, num_steps=4, num_runs=2)


def run(config: Config) -> dict:
    enable_x64()  # as in the main job (float64 scalars beside float32 parameters)
    model, pre_losses = toy.pretrained_transformer(  # float32-trained, theory in float64
        config.seed, config, tied=config.tied, dtype=jnp.float64
    )
    progress(f"[{NAME}] pre-trained: final LM loss {pre_losses[-1]:.3f}")
    prompts = toy.trait_prompts(np.random.default_rng(config.seed), config.num_runs)
    chosen, rejected = (corpus.pack(prompts, [[w]] * len(prompts)) for w in (Y_POS, Y_NEG))
    pairs = make_transformer_pairs(model, chosen, rejected)
    P = len(prompts[0])  # the answer is predicted at P - 1
    loss = make_loss("dpo", beta=config.beta)
    flow = preference_flow(
        model,
        jax.tree_util.tree_map(lambda a: a[:, None], pairs),  # [R, 1, ...]: one prompt a run
        loss,
        dt=config.dt,
        num_steps=config.num_steps,
        observe=toy.AnswerLogprobs(P),
        in_axes=(None, 0),
    )
    logp = np.asarray(flow.run().observables)  # [R, T+1, V]
    predicted, actual = kc.answer_velocities(model, loss, pairs, prompt_len=P)
    probs = np.exp(logp)
    pos, neg, yes = corpus.INDEX[Y_POS], corpus.INDEX[Y_NEG], corpus.INDEX["yes"]
    mass = probs[:, :, [corpus.INDEX[w] for w in corpus.POS_ANSWERS]].sum(-1)  # [R, T+1]
    return {
        "config": config,
        "pretrain_final_loss": float(pre_losses[-1]),
        "prompts": [" ".join(p) for p in prompts],
        "pi_pos": probs[:, :, pos],
        "pi_neg": probs[:, :, neg],
        "pi_yes": probs[:, :, yes],
        "pi_pos_set_mass": mass,
        "yes_rose": float(np.mean(probs[:, -1, yes] > probs[:, 0, yes])),
        "yes_set_rose": float(np.mean(mass[:, -1] > mass[:, 0])),
        "pos_decreased": float(np.mean(probs[:, -1, pos] < probs[:, 0, pos])),
        "velocity_actual": actual[:, [pos, neg, yes]],
        "velocity_predicted": predicted[:, [pos, neg, yes]],
        "sign_agreement_yes": sign_match_rate(predicted[:, yes], actual[:, yes]),
        "sign_agreement_pos": sign_match_rate(predicted[:, pos], actual[:, pos]),
        "sign_agreement_all_tokens": sign_match_rate(predicted, actual),
        **statistic_per_row(
            "velocity_correlation", pearson, list(zip(actual, predicted, strict=True))
        ),
        "provenance": provenance(dtype_of=logp),
    }


def plot(results: dict) -> plt.Figure:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in CURVES.items():
        mean_band(ax, results[key], label)
    ax.set(xlabel="DPO step", ylabel="probability (mean, min-max)", title="transformer: no > never")
    ax.legend()
    act, pre = np.asarray(results["velocity_actual"]), np.asarray(results["velocity_predicted"])
    for j, name in enumerate(("no", "never", "yes")):
        bx.scatter(pre[:, j], act[:, j], label=name)
    bx.axhline(0, color="k", lw=0.5)
    bx.axvline(0, color="k", lw=0.5)
    bx.set(
        xlabel="Theorems 4/5 prediction (model's W, h)",
        ylabel="true d/dt ln pi at t=0",
        title=f"sign agreement, all tokens: {results['sign_agreement_all_tokens']:.2f}",
    )
    bx.legend()
    return fig


def _summary(r: dict) -> str:
    return (
        f"yes rose in {r['yes_rose']:.0%} of runs, Y-set mass rose in {r['yes_set_rose']:.0%}, "
        f"pi(no) fell in {r['pos_decreased']:.0%}; t=0 sign agreement yes "
        f"{r['sign_agreement_yes']:.2f}, no {r['sign_agreement_pos']:.2f}, all "
        f"{r['sign_agreement_all_tokens']:.2f}"
    )


def main(argv=None) -> dict:
    return experiment_main(NAME, Config, run, plot, argv, summary=_summary, conclusions=CONCLUSIONS)


if __name__ == "__main__":
    cli(main)
