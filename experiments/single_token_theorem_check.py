"""Theorems 4-5 (Razin et al. 2024) vs autodiff and vs a finite difference along the simulated flow.

For each random instance (unembeddings ``W``, hidden embedding ``h``, a pair ``y+ != y-`` and a
reference margin) the closed form :func:`theory.single_token.logprob_velocity` is compared, for
every token, with (i) autodiff: ``jvp`` of the model's log-probs along ``-grad L`` of the actual
loss, and (ii) a central difference of the log-probs over one simulated Euler step of the flow and
one of the time-reversed flow (step ``fd_step``). Half of the instances have ``W- = 1.2 W+ +
noise`` and a small ``h``, so that displacement cases are well represented
(:func:`sims.protocols.theory_checks.single_token_velocity_check`).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import jax
import matplotlib.pyplot as plt
import numpy as np

from experiments.framework import ConfigError, ExperimentConfig, cli, each, experiment_main, one_of
from experiments.framework.output import enable_x64, progress, provenance
from experiments.framework.plots import symlog_identity
from sims.protocols.theory_checks import single_token_velocity_check, velocity_errors
from theory import losses

NAME = "single_token_theorem_check"
LOSSES = {"dpo": {"beta": 0.1}, "ipo": {"tau": 0.05}, "slic": {"delta": 50.0}}
#: Velocities plotted per instance (drawn in this order) and their colours.
POINT_KINDS = {"other": "0.6", "y_neg": "tab:red", "y_pos": "tab:blue"}
#: What the check concludes (experiments.framework.conclusions): float64 errors, sign agreement.
CONCLUSIONS = {
    "max_rel_err_autodiff": ("error", ("summary", "max_rel_err_autodiff")),
    "max_rel_err_fd": ("error", ("summary", "max_rel_err_fd")),
    "min_sign_agreement_fd": ("rate", ("summary", "min_sign_agreement_fd")),
}


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """Closed-form single-token velocities vs autodiff and finite differences."""

    seed: int = 0
    shapes: tuple[str, ...] = ("5x2", "50x16", "500x64")  # "VxD" vocabulary x hidden size
    loss_types: tuple[str, ...] = ("dpo", "ipo", "slic")  # keys of LOSSES
    instances: int = 128  # per (shape, loss); 3 x 3 x 128 = 1152 in all
    init_scales: tuple[float, ...] = (0.3, 1.0, 3.0)  # row-norm scales, drawn per instance
    fd_step: float = 1e-5  # flow time of the simulated step (central difference)

    RULES = {"loss_types": each(one_of(LOSSES))}

    @classmethod
    def smoke(cls) -> Config:
        return cls(shapes=("5x2",), loss_types=("dpo",), instances=8)

    def check(self) -> None:
        for shape in self.shapes:
            parts = shape.split("x")
            ok = len(parts) == 2 and all(p.isdigit() for p in parts)
            if not ok or int(parts[0]) < 2 or int(parts[1]) < 1:
                raise ConfigError(f"--shapes must be VxD with V >= 2, D >= 1, got {shape!r}")


def _points(points: dict, chk, V: int) -> None:
    """Append the velocities of y+, y- and one other token per instance (the scatter panels)."""
    rows, scale = np.arange(len(chk.y_pos)), np.max(np.abs(chk.autodiff), axis=1)
    other = (chk.y_pos + chk.y_neg) % V
    for kind, cols in zip(list(POINT_KINDS)[::-1], (chk.y_pos, chk.y_neg, other), strict=True):
        keep = (kind != "other") | ((cols != chk.y_neg) & (cols != chk.y_pos))
        for key, arr in zip(("closed", "autodiff", "finite_difference"), chk[:3], strict=True):
            points[key].extend(arr[rows, cols][keep].tolist())
        points["kind"].extend([kind] * int(keep.sum()))
        points["scale"].extend(scale[keep].tolist())


def run(config: Config) -> dict:
    enable_x64()  # a theorem check in float64, however run() is called
    grid = list(product(config.shapes, config.loss_types))
    keys = jax.random.split(jax.random.key(config.seed), len(grid))
    cells = []
    points = {"closed": [], "autodiff": [], "finite_difference": [], "kind": [], "scale": []}
    for key, (shape, loss_type) in zip(keys, grid, strict=True):
        V, d = (int(x) for x in shape.split("x"))
        chk = single_token_velocity_check(
            jax.random.split(key, config.instances),
            loss=losses.make_loss(loss_type, **LOSSES[loss_type]),
            vocab_size=V,
            hidden_size=d,
            scales=config.init_scales,
            fd_step=config.fd_step,
        )
        cells.append(
            c := {**velocity_errors(chk)._asdict(), "shape": shape, "loss_type": loss_type}
        )
        _points(points, chk, V)
        progress(
            f"  {shape} {loss_type}: max rel err autodiff {c['max_rel_err_autodiff']:.2e}, "
            f"fd {c['max_rel_err_fd']:.2e}, displacing {c['displacing_instances']}"
        )
    summary = {k: sum(c[k] for c in cells) for k in ("instances", "displacing_instances")}
    summary |= {k: max(c[k] for c in cells) for k in ("max_rel_err_autodiff", "max_rel_err_fd")}
    for k in ("sign_agreement_autodiff", "sign_agreement_fd"):
        summary[f"min_{k}"] = min(c[k] for c in cells)
    return {
        "config": config,
        "cells": cells,
        "points": points,
        "summary": summary,
        "provenance": provenance(dtype_of=chk.closed_form),
    }


def plot(results: dict) -> plt.Figure:
    p = {k: np.asarray(v) for k, v in results["points"].items()}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, ref in zip(axes[:2], ("autodiff", "finite_difference"), strict=True):
        for kind, color in POINT_KINDS.items():
            m = p["kind"] == kind
            ax.scatter(p[ref][m], p["closed"][m], s=4, c=color, label=kind, alpha=0.6)
        ticks = [-1e4, -1e2, -1, 0, 1, 1e2, 1e4]
        symlog_identity(ax, np.max(np.abs(p[ref])), linthresh=1e-3, ticks=ticks)
        ax.set(xlabel=f"measured d/dt ln pi(z) ({ref})", ylabel="closed form (Thms 4-5)")
        ax.legend(markerscale=3)
    rel = np.abs(p["closed"] - p["autodiff"]) / p["scale"]
    axes[2].hist(np.log10(np.maximum(rel, 1e-18)), bins=50)
    axes[2].set(
        xlabel="log10 |closed - autodiff| / max_z |autodiff| (exact zeros at -18)", ylabel="count"
    )
    s = results["summary"]
    fig.suptitle(
        f"{s['instances']} instances: max rel err {s['max_rel_err_autodiff']:.1e} "
        f"(autodiff), {s['max_rel_err_fd']:.1e} (finite difference); "
        f"{s['displacing_instances']} with displacement"
    )
    return fig


def main(argv=None) -> dict:
    return experiment_main(
        NAME, Config, run, plot, argv, summary=lambda r: str(r["summary"]), conclusions=CONCLUSIONS
    )


if __name__ == "__main__":
    cli(main)
