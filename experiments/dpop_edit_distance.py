"""DPO vs DPOP on an edit-distance-1 pair ("2+2=4" vs "2+2=5"): per-position displacement."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import jax
import matplotlib.pyplot as plt
import numpy as np

from experiments.framework import ConfigError, ExperimentConfig, cli, each, experiment_main
from experiments.framework.config import finite, nonnegative
from experiments.framework.output import enable_x64, provenance
from sims.protocols.dpop import ARITHMETIC_TOKENS as TOKENS
from sims.protocols.dpop import arithmetic_ids, edit_distance_protocol

NAME = "dpop_edit_distance"
#: DPOP's sign predictions and Proposition 2's float64 error per model (conclusions).
CONCLUSIONS = {
    **{f"prop2_error/{m}": ("error", (m, "prop2_max_abs_error")) for m in ("logit", "features")},
    **{k: ("rate", ("signs", k)) for k in ("dpop_right_above_threshold",
       "dpo_all_signs_assumption_holds", "dpo_correct_lowered_assumption_fails")},
}  # fmt: skip


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """DPO vs DPOP flows on one edit-distance-1 pair (logit and unconstrained-features models)."""

    chosen: str = "2+2=4;4=2+2"  # y_w, one character per token, <eos> appended
    rejected: str = "2+2=5;4=2+2"  # y_l, differs from chosen in one character
    beta: float = 0.1  # DPO/DPOP beta
    penalty_inside_beta: bool = True  # paper's Eq. 3 placement
    dt: float = 0.5  # Euler step (flow time per step)
    num_steps: int = 2000  # steps per flow
    record_every: int = 40  # steps between checkpoints
    lam_factors: tuple = (0.0, 0.1, 0.25, 0.5, 0.9, 1.1, 2.0, 4.0)  # lambda / max_k lambda*_k
    confidence_chosen: float = 3.0  # correct-token logit boost in y_w contexts (reference model)
    confidence_rejected: float = 1.0  # the same in y_l contexts (less sure after the wrong token)
    edit_logits: tuple = (2.0, 1.0)  # reference logits of the correct and wrong token at the edit
    noise: float = 0.5  # std of the random part of every context's logits
    hidden_size: int = 16  # d of the unconstrained-features model
    num_lam_grid: int = 200  # lambdas for the t = 0 sign check (log grid around lambda*)
    num_random_states: int = 1000  # perturbed reference states for the sign-agreement rates
    state_noise: float = 0.3  # std of the perturbation of y_l-context logits (breaks assumption)
    seed: int = 0

    RULES = {"lam_factors": each(nonnegative), "edit_logits": each(finite), "noise": nonnegative}

    def check(self) -> None:
        for name in ("chosen", "rejected"):
            bad = sorted(set(getattr(self, name)) - set(TOKENS))
            if bad or not getattr(self, name):
                raise ConfigError(f"--{name} must be non-empty over {TOKENS[:-1]}, got bad {bad}")
        diff = sum(a != b for a, b in zip(self.chosen, self.rejected, strict=False))
        if len(self.chosen) != len(self.rejected) or diff != 1:
            raise ConfigError("--chosen and --rejected must differ in exactly one character")
        if self.num_steps % self.record_every:
            raise ConfigError("--record-every must divide --num-steps")
        if len(self.edit_logits) != 2:
            raise ConfigError("--edit-logits must be two numbers (correct, wrong)")

    @classmethod
    def smoke(cls) -> Config:
        pair = dict(chosen="2+2=4;4", rejected="2+2=5;4", lam_factors=(0.0, 2.0))
        sizes = dict(hidden_size=4, num_lam_grid=8, num_random_states=16)
        return cls(**pair, **sizes, num_steps=40, record_every=20)


def run(config: Config) -> dict:
    enable_x64()  # float64 flows and sign checks, however run() is called
    ids = [arithmetic_ids(s) for s in (config.chosen, config.rejected)]
    # every other Config field is a keyword of edit_distance_protocol
    rest = {k: v for k, v in asdict(config).items() if k not in ("chosen", "rejected", "seed")}
    r = edit_distance_protocol(jax.random.key(config.seed), *ids, vocab_size=len(TOKENS), **rest)
    return {
        "config": config,
        "tokens": TOKENS,
        "edit": r.edit,
        "thresholds": r.thresholds._asdict(),
        "lambda_star": r.lambda_star,
        "well_optimised": r.well_optimised,
        "signs": r.signs._asdict(),
        **{name: flow._asdict() for name, flow in r.flows.items()},
        "provenance": provenance(dtype_of=r.context),
    }


def _plot_model(top, bottom, name: str, r: dict, m: int, lam_star: float) -> None:
    """One model's column: per-position log-prob changes over t; changes at t_end vs lambda."""
    t, lp, lams = np.asarray(r["t"]), np.asarray(r["logprob_chosen"]), np.asarray(r["lams"])
    for i, style in ((0, "-"), (len(lams) - 1, "--")):
        for k in range(lp.shape[2]):
            color = "tab:red" if k > m else ("tab:green" if k == m else "0.6")
            top.plot(t, lp[i, :, k] - lp[i, 0, k], style, color=color, lw=1)
    title = f"{name}: ln pi(t_k|y_w^<k) - ref\nsolid DPO, dashed lam={lams[-1]:.3g}; "
    top.set(title=title + "red k>m, green k=m", xlabel="t")
    delta, x = np.asarray(r["delta_final"]), lams / lam_star
    bottom.plot(x, delta[:, m + 1 :].min(-1), "o-", label="min over k>m")
    bottom.plot(x, delta[:, m + 1 :].max(-1), "^-", label="max over k>m")
    bottom.plot(x, delta.sum(-1), "s-", label="sequence ln pi(y_w)")
    bottom.axvline(1.0, color="k", ls=":", label="lambda = max_k lambda*_k")
    bottom.axhline(0, color="0.7")
    bottom.set(xscale="symlog", xlabel="lambda / max_k lambda*_k", title=f"{name}: change at t_end")
    bottom.legend(fontsize=7)


def plot(results: dict) -> plt.Figure:
    m, models = results["edit"], ("logit", "free_logit", "features")
    fig, axes = plt.subplots(3, 3, figsize=(15, 12), constrained_layout=True)
    for col, name in enumerate(models):
        _plot_model(axes[0, col], axes[1, col], name, results[name], m, results["lambda_star"])
    ax, sg = axes[2, 0], results["signs"]
    grid, right = np.asarray(sg["lam_grid"]), np.asarray(sg["grid_signs_right"], float)
    thr = np.asarray(results["thresholds"]["threshold"])[m + 1 :]
    for j in range(right.shape[1]):
        line = ax.semilogx(grid, right[:, j] + 0.02 * j, lw=1)[0]
        ax.axvline(thr[j], color=line.get_color(), ls=":", lw=1)
    ax.set(xlabel="lambda", ylabel="all signs right at k (offset per k)")
    ax.set_title("t=0, hinge active: exact signs vs lambda*_k (dotted)")
    ax = axes[2, 1]
    for name in models:
        x = np.asarray(results[name]["lams"]) / results["lambda_star"]
        ax.plot(x, results[name]["hinge_active_fraction"], "o-", label=name)
    ax.set(xscale="symlog", xlabel="lambda / max_k lambda*_k", ylabel="fraction of checkpoints")
    ax.set_title("DPOP hinge active (else on the kink / inactive)")
    ax.legend(fontsize=7)
    axes[2, 2].axis("off")
    lines = [f"{k}: {v}" for k, v in sg.items() if v is None or isinstance(v, int | float)]
    lines += [
        f"Prop. 2 max |jvp - split| {n}: {results[n]['prop2_max_abs_error']:.2e}" for n in models
    ]
    axes[2, 2].text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=7)
    return fig


def _summary(r: dict) -> str:
    post = np.asarray(r["logit"]["delta_final"])[:, r["edit"] + 1 :].min(-1)
    head = f"lambda*={r['lambda_star']:.4g}; logit model, min post-edit change per lam: "
    return head + str(np.round(post, 3).tolist())


def main(argv=None) -> dict:
    return experiment_main(NAME, Config, run, plot, argv, summary=_summary, conclusions=CONCLUSIONS)


if __name__ == "__main__":
    cli(main)
