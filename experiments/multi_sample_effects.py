"""Theorems 8-9 (Razin et al. 2024): extra samples that make likelihood displacement worse.

A base sample (x, y+, y-) plus one extra sample (x~, y~+, y~-) with <h_x, h_x~> > 0, single-token
responses. Contradicting: y~- = y+. Non-contradicting: y+ not in {y~+, y~-} and
pi(y~-|x) < pi(y~+|x). Theorem 8 predicts the extra sample's term in d/dt ln pi(y+|x),
alpha * <h_x, h_x~> * (-l~')/N < 0; the simulation measures it as the flow's finite-time rate with
both samples minus half the rate with the base sample alone (the mean loss halves its weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np

from experiments.framework import ConfigError, ExperimentConfig, cli, experiment_main
from experiments.framework.output import enable_x64, progress, provenance
from experiments.framework.plots import identity_line
from sims.analysis.summaries import pointwise_relative_error, sign_agreement, sign_match_rate
from sims.protocols.theory_checks import extra_sample_effect, extra_sample_instance
from theory.losses import make_loss

NAME = "multi_sample_effects"
#: Per kind of extra sample (experiments.framework.conclusions): Theorem 8's sign, the long run.
CONCLUSIONS = {
    k: ("rate", ("results", "*", k))
    for k in ("sign_agreement", "fraction_simulated_negative", "fraction_long_run_worse_with_extra")
}
KINDS = ("contradicting", "non_contradicting")
SIGN_RESOLUTION = 100.0  # |predicted| must exceed this * t_rate to count a sign (rate error O(t))


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """Predicted (Theorem 8) vs simulated effect of one extra sample on ln pi(y+|x)."""

    seed: int = 0  # PRNG seed of the instances
    instances: int = 200  # random instances per kind
    vocab_size: int = 8  # V
    hidden_size: int = 8  # d
    beta: float = 1.0  # DPO coefficient
    dt_rate: float = 1e-4  # Euler step for the rate estimate (error O(t))
    steps_rate: int = 10  # steps for the rate estimate
    dt: float = 0.05  # Euler step of the long runs
    num_steps: int = 400  # long-run steps: t = num_steps * dt

    def check(self) -> None:
        if self.vocab_size < 4:
            raise ConfigError(
                f"--vocab-size must be >= 4 (two disjoint pairs), got {self.vocab_size}"
            )

    @classmethod
    def smoke(cls) -> Config:
        return cls(instances=3, num_steps=8, steps_rate=2)


def _one_kind(config: Config, rng, kind: str, loss) -> dict:
    dims = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size)
    insts = [
        extra_sample_instance(rng, **dims, contradicting=kind == "contradicting")
        for _ in range(config.instances)
    ]
    steps = {k: getattr(config, k) for k in ("dt_rate", "steps_rate", "dt", "num_steps")}
    e = extra_sample_effect(insts, loss, **steps)
    predicted, simulated = e.predicted_extra_term, e.simulated_extra_term
    # the finite-time rate has error O(t * |d2/dt2 ln pi|): signs count where resolved
    t_rate = config.dt_rate * config.steps_rate
    resolved_rate, resolved_count = sign_agreement(
        predicted, simulated, threshold=SIGN_RESOLUTION * t_rate, magnitude=predicted
    )
    return {
        **e._asdict(),
        "fraction_predicted_negative": float(np.mean(predicted < 0)),
        "fraction_simulated_negative": float(np.mean(simulated < 0)),
        "sign_agreement": sign_match_rate(predicted, simulated),
        "resolved_count": resolved_count,
        "sign_agreement_resolved": 1.0 if resolved_rate is None else resolved_rate,
        "max_rel_diff_predicted_vs_simulated": float(
            pointwise_relative_error(simulated, predicted, floor=1e-12).max()
        ),
        "fraction_long_run_worse_with_extra": float(
            np.mean(e.long_run_change_with_extra < e.long_run_change_alone_half_weight)
        ),
        "long_run_t": config.dt * config.num_steps,
    }


def run(config: Config) -> dict:
    enable_x64()  # float64 flows and closed forms, however run() is called
    rng = np.random.default_rng(config.seed)
    loss = make_loss("dpo", beta=config.beta)
    out = {}
    for kind in KINDS:
        out[kind] = _one_kind(config, rng, kind, loss)
        progress(
            f"[{NAME}] {kind}: predicted negative {out[kind]['fraction_predicted_negative']:.2f}"
        )
    dtype_of = out[KINDS[-1]]["simulated_extra_term"]
    return {"config": config, "results": out, "provenance": provenance(dtype_of=dtype_of)}


def plot(results: dict) -> plt.Figure:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for kind, color in zip(KINDS, ("tab:red", "tab:blue"), strict=True):
        r = results["results"][kind]
        agree, worse = r["sign_agreement"], r["fraction_long_run_worse_with_extra"]
        panels = (
            ("predicted_extra_term", "simulated_extra_term", f"sign agree {agree:.2f}"),
            (
                "long_run_change_alone_half_weight",
                "long_run_change_with_extra",
                f"worse {worse:.2f}",
            ),
        )
        for ax, (x, y, note) in zip(axes, panels, strict=False):
            ax.scatter(r[x], r[y], s=6, color=color, label=f"{kind} ({note})")
        axes[2].bar(kind, r["fraction_predicted_negative"], color=color, alpha=0.6)
    lim = max(np.abs(axes[0].get_xlim()).max(), 1e-9)
    identity_line(axes[0], -lim, lim)
    axes[0].set(xlabel="Theorem 8 extra-sample term", ylabel="simulated (finite-time rate)")
    identity_line(axes[1], *axes[1].get_xlim())
    axes[1].set(xlabel="change of ln pi(y+|x), base alone", ylabel="with the extra sample")
    axes[2].set(ylabel="fraction with negative extra term", ylim=(0, 1))
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _summary(results: dict) -> str:
    return "; ".join(
        f"{k}: predicted<0 {v['fraction_predicted_negative']:.2f}, sign agreement "
        f"{v['sign_agreement']:.2f} (resolved {v['sign_agreement_resolved']:.2f} of "
        f"{v['resolved_count']}), worse after t={v['long_run_t']:g}: "
        f"{v['fraction_long_run_worse_with_extra']:.2f}"
        for k, v in results["results"].items()
    )


def main(argv=None) -> dict:
    return experiment_main(NAME, Config, run, plot, argv, summary=_summary, conclusions=CONCLUSIONS)


if __name__ == "__main__":
    cli(main)
