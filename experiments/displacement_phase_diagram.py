r"""When does DPO displace? A phase diagram of single-token flows against Theorem 4's t = 0 sign.

Issue 14. A cell is one prompt and one single-token pair built explicitly
(:mod:`sims.protocols.phase_instances`: :math:`W_{y^+} = w e_0`, :math:`W_{y^-} = w(\rho e_0 +
\omega e_1)`, opposite-meaning tokens along :math:`-e_1`, synonyms, fillers; :math:`h_0` on the
max-margin direction of ``y+``, :math:`\kappa = \|h_0\|^2/w^2`, solved to the target
:math:`\pi(y^+)`; infeasible targets are flagged, not moved). Axes: :math:`\rho, \omega, \kappa,
\pi(y^+)` at t = 0, ``beta``, the loss (DPO; IPO, ``tau = beta``; SLiC, ``delta = 1/(2 beta)``,
reference-free; DPO + SFT term of weight ``sft_ratio * beta / 2``), the optimiser (Euler = gradient
flow; torch RMSprop), the kernel gain :math:`\lambda` (:math:`K = I + \lambda P_S`; 0: unconstrained
features). Reference: the model at t = 0. Paths: exact reduced flow (DPO/IPO/SLiC, SGD,
:math:`\lambda = 0`), else full.

Definitions, fixed before the first run. Prediction (``theorem4``): the sign of
:math:`\frac{d}{dt}\ln\pi(y^+)` at t = 0 (Theorem 4; kernel form for :math:`\lambda > 0`; plus
Proposition 1's term for the SFT loss); "flat" (excluded from the rates) where :math:`|v| \le`
``velocity_tol`` (SLiC past its margin). RMSprop gets the same gradient-flow sign: does the
criterion carry over to the paper's optimiser? Observed: *displaced* if the largest drop of
:math:`\ln\pi(y^+)` below its running maximum (at checkpoints) exceeds ``displacement_tol``;
*lasting* if it also ends below its start by more than that, else *transient*. Agreement = (down and
displaced + up and not displaced) / resolved runs (also vs "ever below start", "lasting"). Controls:
(1) the first checkpoint's sign vs the prediction (exact at t = 0: with SGD a miss means the
velocity turned within one checkpoint); ``control_runs`` random SGD cells rerun (2) with the step /
``control_factor`` (Euler error), (3) with the horizon x ``control_factor``.

Changed after the first run (nothing else was tuned): control (1) showed whole rises and falls
inside the first checkpoint (:math:`G_0` differs 100x between cells), so time is in units of
:math:`1/(a^-(0)G_0)`, not :math:`1/a^-(0)`; steps halved for the CPU budget (``rmsprop_lr``
doubled). The ``relative`` criterion (some token outpaces ``y+`` at t = 0: Theorem 5), added after
seeing opposite-set tokens overtake ``y+`` later, is exploratory, not a pre-registered test.

Added before their first run (pre-registered; no flow had run on the new cells): (a) *thresholds*:
agreement and P(displaced | predicted down) (and | up) with "displaced" at each of ``report_tols``
(1e-3, 0.01, 0.05, 0.1 nats) in place of ``displacement_tol``. (b) *The paper's regime*,
:math:`\pi(y^+) \ge 0.5` at t = 0, reported on its own (counts at ``displacement_tol``, the
thresholds table; all runs, by optimiser, loss, kernel and source): the main grid's cells there plus
a fixed extra slice ``paper_rhos`` (1.2, 1.4, 1.6) x ``paper_omegas`` (0.75, 1, 1.5) x
``paper_kappas`` (0.25, 0.5, 1) x ``paper_probs`` (0.65, 0.8), with the main grid's other axes: 992
feasible runs, 346 predicted down (the main grid: 20 of 948 at 0.8), chosen from t = 0 predictions
alone. (c) *Round-off*: every run (grid and slice) is rerun once with each entry of :math:`W` and
:math:`h_0` multiplied by :math:`1 + \epsilon u`, :math:`u \sim U(-1, 1)` seeded per run,
:math:`\epsilon` = ``roundoff`` = :math:`2^{-23}` (float32's epsilon); a run is round-off sensitive
at a threshold when "displaced" differs between the two; agreement is reported with and without the
sensitive runs.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from inspect import signature
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from experiments import framework as fw
from experiments.framework import plots
from sims import protocols as sp

NAME = "displacement_phase_diagram"


@dataclass(frozen=True)
class Config(fw.ExperimentConfig):
    """Displacement phase diagram: observed displacement vs Theorem 4's t = 0 sign (issue 14)."""

    seed: int = 0  # filler directions and the random rotation of the frame
    rhos: tuple = (0.0, 0.5, 0.8, 1.0, 1.2, 1.5, 2.0)  # rho = <W+, W-> / |W+|^2
    omegas: tuple = (0.0, 0.5, 1.0, 2.0)  # |(W+ - W-) orthogonal to W+| / |W+|
    kappas: tuple = (0.0625, 0.25, 1.0)  # kappa = |h0|^2 / |W+|^2
    probs: tuple = (0.2, 0.5, 0.8)  # target pi(y+) at t = 0
    betas: tuple = (0.1, 0.5)  # DPO beta = IPO tau; SLiC delta = 1 / (2 beta)
    losses: tuple = sp.PHASE_LOSSES  # from dpo, ipo, slic, dpo_sft
    optimizers: tuple = sp.PHASE_OPTIMIZERS  # sgd (Euler = gradient flow), rmsprop_torch
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
    report_tols: tuple = (1e-3, 0.01, 0.05, 0.1)  # thresholds of "displaced" reported (nats)
    paper_rhos: tuple = (1.2, 1.4, 1.6)  # extra slice of the paper's regime: rho
    paper_omegas: tuple = (0.75, 1.0, 1.5)  # ... omega
    paper_kappas: tuple = (0.25, 0.5, 1.0)  # ... kappa
    paper_probs: tuple = (0.65, 0.8)  # ... pi(y+) at t = 0 (the regime: pi(y+) >= 0.5)
    roundoff: float = 2.0**-23  # relative perturbation of W and h0 in the reruns (0: none)

    RULES = {"rhos": fw.each(fw.finite), "omegas": fw.each(fw.nonnegative)}
    RULES |= {"probs": fw.each(fw.open_unit_interval), "lambdas": fw.each(fw.nonnegative)}
    RULES |= {"batch_size": fw.nonnegative_int, "control_runs": fw.nonnegative_int}
    RULES |= {"losses": fw.each(fw.one_of(sp.PHASE_LOSSES))}
    RULES |= {"optimizers": fw.each(fw.one_of(sp.PHASE_OPTIMIZERS)), "roundoff": fw.nonnegative}
    RULES |= {"paper_omegas": fw.each(fw.nonnegative), "paper_probs": RULES["probs"]}

    @classmethod
    def smoke(cls) -> Config:  # one path (generic_sgd): one compile; tests cover the others
        s = dict(rhos=(0.5, 1.5), omegas=(0.0, 1.0), kappas=(0.25,), probs=(0.5,), betas=(0.1,))
        s |= dict(losses=("dpo", "dpo_sft"), optimizers=("sgd",), lambdas=(4.0,), num_steps=200)
        s |= dict(paper_rhos=(1.2,), paper_omegas=(1.0,), paper_kappas=(0.5,), paper_probs=(0.8,))
        return cls(**s, chunk_size=8, batch_size=0, control_runs=0, boundary_points=9)

    @classmethod
    def scaled(cls) -> Config:
        """``--scale``: over 10^6 flows for a GPU/TPU (sharded over every device)."""
        s = dict(rhos=tuple(np.round(np.linspace(-0.5, 2.5, 21), 3).tolist()))
        s |= dict(omegas=tuple(np.round(np.linspace(0.0, 2.5, 16), 4).tolist()))
        s |= dict(kappas=(0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0), betas=(0.05, 0.1, 0.25, 0.5))
        s |= dict(probs=(0.1, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8), lambdas=(0.0, 1.0, 4.0, 9.0))
        return cls(**s, chunk_size=65536, batch_size=0, control_runs=512, boundary_points=81)

    def check(self) -> None:
        n, k = self.num_steps, self.record_every
        if n % k or n // k < 2:
            raise fw.ConfigError(f"--record-every must divide --num-steps (>= 2 records): {k}, {n}")
        if self.synonym_scale * 1.2 >= 1.0 or self.hidden_size < 4:
            d, s = self.hidden_size, self.synonym_scale
            raise fw.ConfigError(f"need --hidden-size >= 4, --synonym-scale < 1/1.2, got {d}, {s}")


def _fields(config: Config, fn) -> dict:
    return {k: getattr(config, k) for k in signature(fn).parameters}


def run(config: Config, *, sweep_dir: str | Path | None = None) -> dict:
    """Build the grid, sweep it (in ``sweep_dir`` if given: resumable), report. JSON-ready."""
    fw.enable_x64()
    geo = sp.make_phase_geometry(**_fields(config, sp.make_phase_geometry))
    settings = sp.PhaseSettings(**_fields(config, sp.PhaseSettings))
    axes = sp.phase_axes(**_fields(config, sp.phase_axes))
    res = sp.run_phase_diagram(geo, axes, settings, sweep_dir=sweep_dir, name=NAME, log=fw.progress)
    provenance = fw.provenance(dtype_of=res.main.outputs["max_drop"])
    return {**res.report, "config": config, "provenance": provenance}


def plot(results: dict) -> plt.Figure:
    """Draw the phase diagram from the JSON alone (:func:`plots.phase_diagram_figure`)."""
    return plots.phase_diagram_figure(results)


def _summary(r: dict) -> str:
    s, t = r["summary"], r["summary"]["theorem4"]
    by = ", ".join(f"{k} {v:.3f}" for k, v in t["agreement_by_optimizer"].items() if v is not None)
    agree = ", ".join(f"{c} {s[c]['agreement_displaced']:.3f}" for c in sp.PHASE_CRITERIA)
    return f"{s['runs_ok']} runs ok of {s['cells']} cells; agreement: {agree} (theorem4: {by})"


def main(argv=None) -> dict:
    config, out = fw.parse_config(Config, argv, prog=f"python -m experiments.{NAME}")
    digest = hashlib.sha256(fw.dumps({"config": config}).encode()).hexdigest()[:12]
    run_in = functools.partial(run, sweep_dir=Path(out) / f"{NAME}_sweep" / digest)  # resumable
    return fw.experiment_main(NAME, Config, run_in, plot, argv, summary=_summary)


if __name__ == "__main__":
    fw.cli(main)
