r"""When does DPO displace? A phase diagram of single-token flows against Theorem 4's t = 0 sign.

Issue 14. Every cell is one prompt and one single-token pair, built explicitly
(:mod:`experiments._phase_diagram`): :math:`W_{y^+} = w e_0`, :math:`W_{y^-} = w(\rho e_0 + \omega
e_1)`, an opposite-meaning set along :math:`-e_1`, synonyms along :math:`e_0`, fillers elsewhere;
:math:`h_0` of norm :math:`\sqrt\kappa\,w` on the max-margin direction of ``y+`` (plus a direction
no token uses), solved to the target :math:`\pi(y^+)`; infeasible targets are flagged, not moved.
Axes: :math:`\rho`, :math:`\omega` (relative to :math:`\|W_{y^+}\|`), :math:`\kappa = \|h_0\|^2 /
\|W_{y^+}\|^2`, :math:`\pi(y^+)` at t = 0, ``beta``, the loss (DPO; IPO with ``tau = beta``; SLiC
with ``delta = 1/(2 beta)``, reference-free as in the paper; DPO + SFT term with weight
``sft_ratio * beta / 2``), the optimiser (Euler = gradient flow; torch-parity RMSprop) and the
kernel gain :math:`\lambda` of a constant-kernel feature network (:math:`\lambda_{\mathrm{eff}} =
1 + \lambda`; 0 = unconstrained features). The reference model is the model at t = 0. All flows
run through :func:`sims.flows.sweep.sweep` (sharded over every device, chunked, resumable; ``main``
keeps it in ``<out>/displacement_phase_diagram_sweep/<config hash>/<path>/``), one sweep per path:
the exact reduced flow (:mod:`sims.flows.reduced`) for DPO/IPO/SLiC with SGD and :math:`\lambda =
0`,
:func:`sims.flows.core.flow_fn` on ``(W, theta)`` otherwise (SFT term, RMSprop, kernel); the JSON's
``confusion.theorem4.by_group.*.path`` says which served each (loss, optimiser, lambda).

Definitions, fixed before the first run. Prediction (``theorem4``): the sign of
:math:`\frac{d}{dt}\ln\pi(y^+)` at t = 0 (Theorem 4; its kernel form for :math:`\lambda > 0`;
plus Proposition 1's term for the SFT loss), "flat" where :math:`|v| \le` ``velocity_tol`` (SLiC
whose margin already exceeds ``delta``: nothing moves; excluded from the rates). For RMSprop the
prediction is the same gradient-flow sign: the question is whether the paper's criterion carries
over to the paper's optimiser. Observed over the whole run: *displaced* if the largest drop of
:math:`\ln\pi(y^+)` below its running maximum (at checkpoints) exceeds ``displacement_tol``;
*lasting* if moreover :math:`\ln\pi(y^+)` ends below its start by more than ``displacement_tol``,
else *transient*. Agreement = (predicted down and displaced + predicted up and not displaced) /
resolved runs (also against "ever below start" and "lasting"). Per run the sweep records the
largest drop and its checkpoint, the change of :math:`\ln\pi(y^+)` at the end, its minimum and at
the first checkpoint, the opposite-set mass (start, end, peak), the top gainers (end, deepest
drop), the margin (start, end) and a status (ok / non-finite).

Controls: (1) the sign of the first checkpoint's change against the prediction (Theorem 4 is
exact at t = 0, so with SGD a disagreement means the velocity turned within one checkpoint);
(2) ``control_runs`` random SGD cells rerun with the step divided by ``control_factor`` (Euler
error) and (3) with the horizon multiplied by it (is "lasting" lasting?).

What changed after the first run, and why (nothing else was tuned). The first run measured time
in units of :math:`1/a^-(0)` alone; control (1) then showed cells where the whole rise and fall
of :math:`\ln\pi(y^+)` happened inside the first checkpoint (large :math:`\omega` or
:math:`\lambda`: the margin's rate :math:`G_0` differs by 100x between cells), so time is now in
units of the initial margin rate :math:`1/(a^-(0)G_0)`; the step count was halved for the CPU
budget (RMSprop's ``rmsprop_lr`` doubled to keep ``num_steps * rmsprop_lr``). The ``relative``
criterion (some token outpaces ``y+`` at t = 0: Theorem 5 / the kernel corollary) was added after
seeing that most failures were tokens of the opposite set overtaking ``y+`` later; it is reported
beside ``theorem4`` as an exploratory explanation, not as a pre-registered test.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from experiments import _phase_diagram as ph
from experiments._phase_diagram import OPTIMIZERS
from experiments._phase_plot import plot as plot_report
from experiments._phase_report import analyse
from experiments.framework import (
    ConfigError,
    ExperimentConfig,
    cli,
    dumps,
    each,
    enable_x64,
    experiment_main,
    finite,
    nonnegative,
    nonnegative_int,
    one_of,
    open_unit_interval,
    parse_config,
    progress,
    provenance,
)

NAME = "displacement_phase_diagram"
SWEEP_FOLDER = f"{NAME}_sweep"  # in the output folder; one subfolder per config: reruns resume


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """Displacement phase diagram: observed displacement vs Theorem 4's t = 0 sign (issue 14)."""

    seed: int = 0  # filler directions and the random rotation of the frame
    rhos: tuple = (0.0, 0.5, 0.8, 1.0, 1.2, 1.5, 2.0)  # rho = <W+, W-> / |W+|^2
    omegas: tuple = (0.0, 0.5, 1.0, 2.0)  # |(W+ - W-) orthogonal to W+| / |W+|
    kappas: tuple = (0.0625, 0.25, 1.0)  # kappa = |h0|^2 / |W+|^2
    probs: tuple = (0.2, 0.5, 0.8)  # target pi(y+) at t = 0
    betas: tuple = (0.1, 0.5)  # DPO beta = IPO tau; SLiC delta = 1 / (2 beta)
    losses: tuple = ph.LOSS_NAMES  # from dpo, ipo, slic, dpo_sft
    optimizers: tuple = OPTIMIZERS  # sgd (Euler = gradient flow), rmsprop_torch
    lambdas: tuple = (0.0, 4.0)  # kernel gain: K = I + lambda P_S (0: unconstrained features)
    hidden_size: int = 8  # d (e_0, e_1, e_2 and d - 3 filler directions)
    num_opposite: int = 3  # opposite-meaning tokens (along -e_1)
    num_synonym: int = 2  # synonyms of y+ (along e_0)
    num_filler: int = 7  # filler tokens (V = 2 + 3 + 2 + 7 = 14 by default)
    unembedding_norm: float = 4.0  # w = |W+|: sets how sharp pi can be for a given kappa
    opposite_scale: float = 1.0  # |W_opp| / |W+| (spread over 0.8 .. 1.2 times this)
    synonym_scale: float = 0.5  # |W_syn| / |W+| (spread over 0.8 .. 1.2 times this; < 1/1.2)
    filler_scale: float = 1.0  # typical |W_filler| / |W+|
    rotate: bool = True  # random rotation of the frame (RMSprop is not rotation invariant)
    sft_ratio: float = 1.0  # SFT weight lambda_SFT = sft_ratio * beta / 2 (DPO's -l'(u0))
    horizon: float = 100.0  # SGD flow time, units 1 / (a^-(0) G_0): margin gain at the t=0 rate
    num_steps: int = 2000  # steps of every run (SGD: dt = horizon / num_steps / (a^-(0) G_0))
    record_every: int = 10  # steps between checkpoints
    rmsprop_lr: float = 2e-3  # RMSprop learning rate (scale invariant: not normalised)
    displacement_tol: float = 1e-3  # drop of ln pi(y+) that counts as displacement (nats)
    velocity_tol: float = 1e-9  # |predicted d ln pi(y+)/dt| / (a^-(0) G_0) below which: flat
    chunk_size: int = 1024  # runs per saved sweep chunk
    batch_size: int = 32  # runs vmapped together on a device (0: all of a chunk's)
    control_runs: int = 48  # random SGD cells rerun for the step and horizon controls (0: none)
    control_factor: int = 4  # step / factor (Euler control) and horizon * factor (horizon control)
    boundary_points: int = 25  # fine-grid points per axis of the Theorem-4 boundary contours

    RULES = {
        "rhos": each(finite),
        "omegas": each(nonnegative),
        "probs": each(open_unit_interval),
        "losses": each(one_of(ph.LOSS_NAMES)),
        "optimizers": each(one_of(OPTIMIZERS)),
        "lambdas": each(nonnegative),
        "batch_size": nonnegative_int,
        "control_runs": nonnegative_int,
    }

    @classmethod
    def smoke(cls) -> Config:
        return cls(
            rhos=(0.5, 1.5),
            omegas=(0.0, 1.0),
            kappas=(0.25,),
            probs=(0.5,),
            betas=(0.1,),
            losses=("dpo", "dpo_sft"),
            optimizers=("sgd",),
            lambdas=(4.0,),  # one path (generic_sgd): one compile; tests cover the others
            num_steps=200,
            record_every=10,
            chunk_size=8,
            batch_size=0,
            control_runs=0,
            boundary_points=9,
        )

    @classmethod
    def scaled(cls) -> Config:
        """``--scale``: over 10^6 flows for a GPU/TPU (sharded over every device)."""
        return cls(
            rhos=tuple(np.round(np.linspace(-0.5, 2.5, 21), 3).tolist()),
            omegas=tuple(np.round(np.linspace(0.0, 2.5, 16), 4).tolist()),
            kappas=(0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0),
            probs=(0.1, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8),
            betas=(0.05, 0.1, 0.25, 0.5),
            lambdas=(0.0, 1.0, 4.0, 9.0),
            chunk_size=65536,
            batch_size=0,
            control_runs=512,
            boundary_points=81,
        )

    def check(self) -> None:
        if self.num_steps % self.record_every or self.num_steps // self.record_every < 2:
            raise ConfigError(
                f"--record-every must divide --num-steps into >= 2 checkpoints, got "
                f"{self.record_every} and {self.num_steps}"
            )
        if self.synonym_scale * 1.2 >= 1.0:
            raise ConfigError(f"--synonym-scale must be < 1/1.2, got {self.synonym_scale}")
        if self.hidden_size < 4:
            raise ConfigError(f"--hidden-size must be >= 4, got {self.hidden_size}")


def run(config: Config, *, sweep_dir: str | Path | None = None) -> dict:
    """Build the grid, sweep it (in ``sweep_dir`` if given: resumable), analyse. JSON-ready."""
    enable_x64()
    geometry = ph.geometry_of(config)
    axes = ph.axes_of(config)
    predict = ph.make_predictor(geometry, sft_ratio=config.sft_ratio)
    grid = ph.cells(config, geometry, predict, axes)
    progress(
        f"  {grid['feasible'].size} cells, {int(grid['feasible'].sum())} feasible; paths "
        + ", ".join(f"{p}: {int(np.sum(grid['path'] == i))}" for i, p in enumerate(ph.PATHS))
    )
    outputs = ph.run_sweeps(config, geometry, grid, sweep_dir)
    results = analyse(config, geometry, predict, axes, grid, outputs)
    results["controls"] = ph.controls(config, geometry, grid, outputs)
    results["config"] = config
    results["provenance"] = provenance(dtype_of=outputs["max_drop"])
    return results


def plot(results: dict) -> plt.Figure:
    return plot_report(results)


def _summary(r: dict) -> str:
    s = r["summary"]
    parts = [
        f"{s['runs_ok']} runs ok of {s['cells']} cells ({s['infeasible']} infeasible, "
        f"{s['nonfinite']} non-finite)"
    ]
    for c in ("theorem4", "relative"):
        t = s[c]
        by = {**t["agreement_by_optimizer"], **t["agreement_by_loss"]}
        parts.append(
            f"{c}: agreement {t['agreement_displaced']:.3f} over {t['resolved']} resolved runs ("
            + ", ".join(f"{k} {v:.3f}" for k, v in by.items() if v is not None)
            + ")"
        )
    return "; ".join(parts)


def sweep_folder(out_dir: str | Path, config: Config) -> Path:
    """``<out_dir>/displacement_phase_diagram_sweep/<sha256 of the config, 12 hex>``."""
    digest = hashlib.sha256(dumps({"config": config}).encode()).hexdigest()[:12]
    return Path(out_dir) / SWEEP_FOLDER / digest


def main(argv=None) -> dict:
    config, out_dir = parse_config(Config, argv, prog=f"python -m experiments.{NAME}")
    run_fn = functools.partial(run, sweep_dir=sweep_folder(out_dir, config))
    return experiment_main(NAME, Config, run_fn, plot, argv, summary=_summary)


if __name__ == "__main__":
    cli(main)
