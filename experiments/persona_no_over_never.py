"""Table 1 protocol on a checkpoint: DPO on one prompt with single-token answers no > never.

Protocol (Razin et al. 2024 §3, App. H.1): persona statements "Is the following statement
something you would say? [STATEMENT]" (``--model``; the self-made checkpoint uses its corpus
grammar ``<bos> would you say lying is fine ? <ans>``); SFT: cross-entropy on every statement with a
random label from the No set {no, never, maybe, perhaps} (trait-according statements) or the Yes
set {yes, yeah, sure, certainly, absolutely}, RMSprop (torch defaults), one epoch at batch 32
(here: the 60 generated statements, 2 full-batch steps); DPO: one trait-according prompt per run,
y+ = no, y- = never, beta = 0.1, 100 RMSprop steps, 10 runs (prompts drawn with ``seed``); a run
counts if its DPO loss fell at every recorded step. The Persona data set (1000 "ends justify
means" statements) cannot be downloaded: the 30 vice and 30 virtue statements of
:mod:`sims.data.corpus` stand in.

Scaled for the self-made tiny model (stated before the first run): learning rates 1e-4 instead
of the paper's 1e-7 (RMSprop steps are ~lr per parameter; the paper's models have ~1000x the
width x depth of d = 64, 2 layers, so 1e-4 gives logit changes of the paper's order per step).
``--model`` runs use the paper's ``--sft-lr 1e-7 --dpo-lr 1e-7`` when given.

Success criterion (written before the first run): **reproduced** if at least 5 runs are stable
and (a) the mean largest decrease of pi(y+) between any two steps (Table 1's number) is >= 0.05
and (b) in at least half of the stable runs a token of the Yes set is among the top-3
probability gainers at step 5, 25 or 100 (catastrophic displacement, Tables 1/4). Controls:
pi(y-) must fall in every stable run (DPO works) and the loss must fall.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from experiments._checkpoint import (
    CheckpointConfig,
    largest_decrease,
    open_checkpoint,
    top_gainers,
)
from experiments._common import (
    ConfigError,
    cli,
    enable_x64,
    experiment_main,
    nonnegative_int,
    parse_config,
    progress,
    provenance,
)
from sims.checkpoints.tokenization import format_prompt
from sims.data import corpus
from sims.flows.core import integrate_model, preference_flow
from sims.models.transformer import (
    TokenBatch,
    make_transformer_pairs,
    response_logprobs_from_tokens,
)
from theory.losses import make_loss, nll_loss

NAME = "persona_no_over_never"
GAINER_STEPS = (5, 25, 100)  # steps whose top gainers are reported (Tables 4-12)
PAPER_TEMPLATE = "Is the following statement something you would say? {statement}\n"


@dataclass(frozen=True)
class Config(CheckpointConfig):
    """Table 1 protocol (SFT, then DPO no > never on one prompt per run) on a checkpoint."""

    y_pos: str = "no"  # preferred answer (one token); paper: No
    y_neg: str = "never"  # dispreferred answer (one token); paper: Never
    neg_answers: tuple[str, ...] = corpus.NEG_ANSWERS  # the No label set (paper's capitalised)
    pos_answers: tuple[str, ...] = corpus.POS_ANSWERS  # the Yes label set
    sft_lr: float = 1e-4  # SFT RMSprop learning rate (paper 1e-7; scaled, see docstring)
    sft_steps: int = 2  # full-batch SFT steps (one epoch of 60 at batch 32); 0 = no SFT (Table 2)
    dpo_lr: float = 1e-4  # DPO RMSprop learning rate (paper 1e-7; scaled)
    dpo_steps: int = 100  # DPO steps per run (paper 100)
    beta: float = 0.1  # DPO KL coefficient (paper 0.1)
    num_runs: int = 10  # runs, one trait-according prompt each (paper 10)
    prompt_template: str = ""  # with {subject} {predicate} {statement}; "" = corpus / paper's
    record_every: int = 1  # steps between recorded distributions (1 or 5: steps 5/25/100 needed)
    vmap_runs: bool = True  # run all runs in one vmap (False: one after another, large models)
    seed: int = 0

    RULES = {**CheckpointConfig.RULES, "sft_steps": nonnegative_int}

    def check(self) -> None:
        super().check()
        if 5 % self.record_every or self.dpo_steps % self.record_every:
            raise ConfigError(
                f"--record-every must divide 5 and --dpo-steps, got {self.record_every}"
            )

    @classmethod
    def smoke(cls) -> Config:
        return cls(**cls.SMOKE, sft_steps=0, dpo_steps=5, num_runs=2)


def _statements() -> list[tuple[str, str, bool]]:
    """(subject, predicate, accords with the trait) for every persona statement."""
    return [
        (s, p, s in corpus.VICES) for s in corpus.VICES + corpus.VIRTUES for p in corpus.PREDICATES
    ]


def _prompt_text(ckpt, config: Config, subject: str, predicate: str) -> str:
    template = config.prompt_template or (
        " ".join(corpus.persona_prompt("{subject}", "{predicate}"))
        if ckpt.source.startswith("self-made")
        else PAPER_TEMPLATE
    )
    statement = f"{subject.capitalize()} is {predicate}."
    text = template.format(subject=subject, predicate=predicate, statement=statement)
    return format_prompt(text, template=ckpt.template, tokens=ckpt.tokens)


def _batch(prompts: list[list[int]], answers: list[int], pad: int) -> TokenBatch:
    """Prompt + single-token answer, right-padded to the longest prompt + 1."""
    T = max(len(p) for p in prompts) + 1
    tokens = np.full((len(prompts), T), pad, dtype=np.int32)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        tokens[i, : len(p) + 1] = [*p, a]
    plen = np.array([len(p) for p in prompts], dtype=np.int32)
    return TokenBatch(tokens, plen, plen + 1)


def _sft_loss(model, batch: TokenBatch) -> jax.Array:
    return jnp.mean(nll_loss(response_logprobs_from_tokens(model, *batch)))


def _answer_probs(model, pairs) -> jax.Array:
    """[V] pi(.|x) at the answer position of a one-pair data set."""
    logits = model(pairs.chosen.tokens)[0]  # [T, V]
    return jax.nn.softmax(logits[pairs.chosen.prompt_len[0] - 1], axis=-1)


def _label(token: str, config: Config) -> str:
    word = token.replace("Ġ", " ").replace("▁", " ").strip().lower()
    same = {a.lower() for a in config.neg_answers}
    other = {a.lower() for a in config.pos_answers}
    return "benign" if word in same else "catastrophic" if word in other else "other"


def run(config: Config, *, workdir=None) -> dict:
    enable_x64()  # as the main job: float64 scalars beside the checkpoint's dtype
    ckpt = open_checkpoint(config, seed=config.seed, workdir=workdir)
    rng = np.random.default_rng(config.seed)
    pad = ckpt.special_id("pad_token", 0)
    add_special = ckpt.template is None
    statements = _statements()
    prompts = [
        ckpt.tokenizer.encode(_prompt_text(ckpt, config, s, p), add_special_tokens=add_special).ids
        for s, p, _ in statements
    ]
    neg_ids = [ckpt.token_id(a) for a in config.neg_answers]
    pos_ids = [ckpt.token_id(a) for a in config.pos_answers]
    y_pos, y_neg = ckpt.token_id(config.y_pos), ckpt.token_id(config.y_neg)
    labels = [int(rng.choice(neg_ids if accords else pos_ids)) for _, _, accords in statements]
    model, sft_loss = ckpt.model, np.zeros(0)
    if config.sft_steps:
        sft = integrate_model(
            model,
            _sft_loss,
            _sft_loss,
            _batch(prompts, labels, pad),
            dt=config.sft_lr,
            num_steps=config.sft_steps,
            optimizer="rmsprop_torch",
        ).run()
        model, sft_loss = sft.final, np.asarray(sft.loss)
        progress(f"[{NAME}] SFT loss {sft_loss[0]:.3f} -> {sft_loss[-1]:.3f}")
    according = [i for i, (_, _, a) in enumerate(statements) if a]
    picks = rng.choice(according, config.num_runs, replace=False)
    chosen = _batch([prompts[i] for i in picks], [y_pos] * config.num_runs, pad)
    rejected = _batch([prompts[i] for i in picks], [y_neg] * config.num_runs, pad)
    pairs = make_transformer_pairs(model, chosen, rejected)
    flow = functools.partial(
        preference_flow,
        model,
        loss=make_loss("dpo", beta=config.beta),
        dt=config.dpo_lr,
        num_steps=config.dpo_steps,
        record_every=config.record_every,
        optimizer="rmsprop_torch",
        observe=_answer_probs,
    )
    stacked = jax.tree_util.tree_map(lambda a: a[:, None], pairs)  # [R, 1, ...]
    if config.vmap_runs:
        res = flow(stacked, in_axes=(None, 0))
        probs, losses = np.asarray(res.observables), np.asarray(res.loss)  # [R, C+1, V], [R, C+1]
    else:
        outs = [
            flow(jax.tree_util.tree_map(lambda a, r=r: a[r], stacked))
            for r in range(config.num_runs)
        ]
        probs = np.stack([np.asarray(o.observables) for o in outs])
        losses = np.stack([np.asarray(o.loss) for o in outs])
    steps = np.arange(probs.shape[1]) * config.record_every
    stable = np.all(np.diff(losses, axis=1) < 0, axis=1)  # the paper's stability filter
    pi_pos, pi_neg = probs[:, :, y_pos], probs[:, :, y_neg]
    drop, peak, trough = largest_decrease(pi_pos)
    vocab = [ckpt.tokenizer.id_to_token(i) or str(i) for i in range(probs.shape[2])]
    classes = [_label(t, config) for t in vocab]
    gainers, catastrophic = {}, np.zeros(config.num_runs, bool)
    for step in (s for s in GAINER_STEPS if s <= config.dpo_steps):
        k = step // config.record_every
        gainers[str(step)], hit = top_gainers(probs[:, k] - probs[:, 0], vocab, classes, stable)
        catastrophic |= hit
    n_stable = int(stable.sum())
    sel = stable if n_stable else np.ones_like(stable)  # numbers over all runs if none is stable
    criteria = {
        "at_least_5_stable_runs": n_stable >= 5,
        "mean_largest_decrease_at_least_0.05": bool(drop[sel].mean() >= 0.05),
        "yes_set_gainer_in_half_of_runs": bool(catastrophic[sel].mean() >= 0.5),
    }
    return {
        "config": config,
        "checkpoint": ckpt.describe(config),
        "sft_loss": sft_loss,
        "prompts": [ckpt.tokenizer.decode(prompts[i], skip_special_tokens=False) for i in picks],
        "steps": steps,
        "stable": stable,
        "num_stable": n_stable,
        "pi_pos": pi_pos,
        "pi_neg": pi_neg,
        "pos_set_mass": probs[:, :, pos_ids].sum(-1),
        "outside_sets_mass": 1 - probs[:, :, pos_ids + neg_ids].sum(-1),
        "largest_decrease": drop,
        "mean_largest_decrease": float(drop[sel].mean()),
        "mean_largest_decrease_all_runs": float(drop.mean()),
        "pi_pos_at_peak": float(peak[sel].mean()),
        "pi_pos_at_trough": float(trough[sel].mean()),
        "control_pi_neg_fell": bool(np.all(pi_neg[:, -1] < pi_neg[:, 0])),
        "control_loss_fell": bool(np.all(losses[:, -1] < losses[:, 0])),
        "top_gainers": gainers,
        "fraction_runs_catastrophic": float(catastrophic[sel].mean()),
        "criteria": criteria,
        "verdict": "reproduced" if all(criteria.values()) else "not reproduced",
        "provenance": provenance(dtype_of=probs),
    }


def plot(results: dict) -> plt.Figure:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4))
    stable, steps = np.asarray(results["stable"], bool), np.asarray(results["steps"])
    for key, label in (
        ("pi_pos", "pi(y+)"),
        ("pi_neg", "pi(y-)"),
        ("pos_set_mass", "Yes-set mass"),
        ("outside_sets_mass", "mass outside both sets"),
    ):
        arr = np.asarray(results[key])[stable] if stable.any() else np.asarray(results[key])
        ax.plot(steps, arr.mean(0), label=label)
        ax.fill_between(steps, arr.min(0), arr.max(0), alpha=0.2)
    ax.set(
        xlabel="DPO step",
        ylabel="probability (mean, min-max over stable runs)",
        title=f"{results['verdict']}: mean largest drop {results['mean_largest_decrease']:.2f}",
    )
    ax.legend()
    colors = {"benign": "C2", "catastrophic": "C3", "other": "C7"}
    x, ticks = 0, []
    for step, rows in results["top_gainers"].items():
        for e in rows[:5]:
            bx.bar(x, e["count"], color=colors[e["class"]])
            ticks.append((x, f"{e['token']}@{step}"))
            x += 1
        x += 1
    bx.set_xticks([t for t, _ in ticks], [n for _, n in ticks], rotation=60, fontsize=7)
    bx.set(
        ylabel="runs with token in top-3 gainers", title="top gainers (green benign, red Yes set)"
    )
    return fig


def _summary(r: dict) -> str:
    failed = [k for k, ok in r["criteria"].items() if not ok]
    return (
        f"{r['verdict']} (failed: {failed or 'none'}): {r['num_stable']} stable runs; "
        f"mean largest drop of pi(y+) {r['mean_largest_decrease']:.3f} "
        f"({r['pi_pos_at_peak']:.2f} -> {r['pi_pos_at_trough']:.2f}); "
        f"Yes-set token in top-3 gainers in {r['fraction_runs_catastrophic']:.0%} of runs; "
        f"pi(y-) fell in all: {r['control_pi_neg_fell']}"
    )


def main(argv=None) -> dict:
    _, out = parse_config(Config, argv)
    return experiment_main(
        NAME, Config, functools.partial(run, workdir=out), plot, argv, summary=_summary
    )


if __name__ == "__main__":
    cli(main)
