"""Theorems 6-7, Propositions 1-2 (Razin et al. 2024) vs autodiff of the flow, multi-token.

Random single-pair instances of the unconstrained-features model over the prefix tree, several
lengths, with and without shared prefixes; the closed forms of ``theory.multi_token`` /
``theory.regularized`` against ``sims.models.prefix_tree.flow_velocity`` (jax.grad + jax.jvp),
float64.
"""

from __future__ import annotations

from dataclasses import dataclass

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
from experiments.framework.plots import symlog_identity
from sims.protocols.theory_checks import (
    error_summary,
    multi_token_instance,
    multi_token_velocity_check,
)
from theory.losses import make_loss

NAME = "multi_token_theorem_check"
#: Loss -> (the result checked for y+: a loss of the class gives Theorem 6, the others
#: Propositions 1-2; its hyperparameters). SimPO also gets the case's lengths.
LOSSES = {
    "dpo": ("Theorem 6", {"beta": 0.5}),
    "sft_term": ("Proposition 1", {"base_loss": "dpo", "sft_coef": 0.5}),
    "dpop": ("Proposition 2", {"beta": 0.5, "lam": 5.0}),
    "simpo": ("Proposition 2", {"beta": 2.0, "gamma": 0.5}),
}
#: What the check concludes (experiments.framework.conclusions): each result's float64 error.
CONCLUSIONS = {"max_rel_error": ("error", ("summary", "*", "max_rel_error"))}


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """Closed forms vs autodiff on random multi-token instances."""

    seed: int = 0  # PRNG seed of the instances
    instances_per_case: int = 100  # random instances per length case (6 cases)
    vocab_size: int = 16  # V
    hidden_size: int = 8  # d
    cases: tuple = ("1,1,0", "3,2,0", "2,5,0", "4,4,1", "5,3,2")  # "L+,L-,shared tokens"
    z_length: int = 4  # length of the other response z

    def check(self) -> None:
        for case in self.cases:
            parts = case.split(",")
            ok = len(parts) == 3 and all(p.strip().isdigit() for p in parts)
            if not ok or min(int(parts[0]), int(parts[1])) < 1:
                raise ConfigError(
                    f"--cases entries must be 'L+,L-,shared' with L+-, >= 1, got {case!r}"
                )
            if int(parts[2]) >= min(int(parts[0]), int(parts[1])):
                raise ConfigError(f"--cases: shared tokens must be < min(L+, L-), got {case!r}")
        if self.vocab_size < 3:
            raise ConfigError(f"--vocab-size must be >= 3, got {self.vocab_size}")

    @classmethod
    def smoke(cls) -> Config:
        return cls(instances_per_case=2, cases=("2,2,0",))


def _label(what: str, loss_name: str, z_fresh: bool) -> str:
    """The result a check verifies: y+ by the loss's result, z by Theorem 7 or the general form."""
    if what == "y_pos":
        return LOSSES[loss_name][0]
    if what == "z_theorem7":
        return "Theorem 7"
    return "general form, z fresh" if z_fresh else "general form, z shares y+ prefix"


def run(config: Config) -> dict:
    enable_x64()  # a theorem check in float64, however run() is called
    rng = np.random.default_rng(config.seed)
    checks: dict[str, dict[str, list]] = {}
    for case in config.cases:
        Lp, Ln, common = (int(v) for v in case.split(","))
        z_fresh = common == 0
        lengths = dict(chosen_length=Lp, rejected_length=Ln, shared=common, z_fresh=z_fresh)
        dims = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size, **lengths)
        insts = [
            multi_token_instance(rng, **dims, z_length=config.z_length)
            for _ in range(config.instances_per_case)
        ]
        lengths = {"length_chosen": float(Lp), "length_rejected": float(Ln)}
        losses = {
            name: make_loss(name, **hyper, **(lengths if name == "simpo" else {}))
            for name, (_, hyper) in LOSSES.items()
        }
        out = multi_token_velocity_check(insts, losses, z_fresh=z_fresh)
        for (loss_name, what), (got, want) in sorted(out.items()):
            entry = checks.setdefault(
                _label(what, loss_name, z_fresh), {"closed_form": [], "autodiff": [], "case": []}
            )
            entry["closed_form"] += np.asarray(got).tolist()
            entry["autodiff"] += np.asarray(want).tolist()
            entry["case"] += [f"{case}:{loss_name}"] * len(got)
        progress(f"[{NAME}] case L+,L-,shared={case} done")
    return {
        "config": config,
        "checks": checks,
        "summary": {
            label: error_summary(e["closed_form"], e["autodiff"], e["case"])._asdict()
            for label, e in checks.items()
        },
        "provenance": provenance(dtype_of=[np.array(e["closed_form"]) for e in checks.values()]),
    }


def plot(results: dict) -> plt.Figure:
    labels = sorted(results["checks"])
    fig, axes = plt.subplots(1, len(labels), figsize=(3.6 * len(labels), 3.4), squeeze=False)
    for ax, label in zip(axes[0], labels, strict=True):
        e, s = results["checks"][label], results["summary"][label]
        ax.scatter(e["autodiff"], e["closed_form"], s=5, alpha=0.5)
        symlog_identity(ax, max(np.abs(e["autodiff"]).max(), 1e-12), linthresh=1e-2)
        ax.set_title(f"{label}\nn={s['count']}, max rel err {s['max_rel_error']:.1e}", fontsize=8)
        ax.set_xlabel("autodiff d/dt ln pi")
    axes[0][0].set_ylabel("closed form")
    fig.tight_layout()
    return fig


def _summary(results: dict) -> str:
    return "; ".join(
        f"{k}: n={v['count']} max rel err {v['max_rel_error']:.2e}"
        for k, v in sorted(results["summary"].items())
    )


def main(argv=None) -> dict:
    return experiment_main(NAME, Config, run, plot, argv, summary=_summary, conclusions=CONCLUSIONS)


if __name__ == "__main__":
    cli(main)
