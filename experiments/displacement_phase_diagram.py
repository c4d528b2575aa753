"""When does DPO displace? A phase diagram of single-token flows against Theorem 4's t = 0 sign.

Issue 14. A cell is one prompt and one single-token pair (:mod:`sims.protocols.phase_instances`: W+
= w e0, W- = w (rho e0 + omega e1), opposite-meaning tokens along -e1, h0 on y+'s max-margin
direction, kappa = |h0|^2 / w^2, solved to the target pi(y+) at t = 0, infeasible targets flagged,
not moved), ``beta``, a loss (DPO; IPO, tau = beta; SLiC, delta = 1/(2 beta), reference-free; DPO +
SFT term of weight sft_ratio beta / 2), an optimiser (Euler = gradient flow; torch RMSprop) and a
kernel gain lambda (K = I + lambda P_S; 0: unconstrained features). Reference: the t = 0 model.

Fixed before the first run. Prediction (``theorem4``): the sign of d/dt ln pi(y+) at t = 0 (Theorem
4; kernel form for lambda > 0; plus Proposition 1's term for the SFT loss; for RMSprop, the same
gradient-flow sign: does it carry over?); "flat", excluded from the rates, where |v| <=
``velocity_tol``. Observed: *displaced* if the largest drop of ln pi(y+) below its running maximum
at checkpoints exceeds ``displacement_tol``, *lasting* if it also ends below its start by more than
that, else *transient*. Agreement = (down and displaced + up and not displaced) / resolved runs
(also vs "below start", "lasting"). Controls: (1) the first checkpoint's sign vs the prediction
(exact at t = 0: a miss with SGD means the velocity turned within a checkpoint); ``control_runs``
random SGD cells rerun with (2) step / ``control_factor`` (Euler error), (3) horizon x
``control_factor``.

Changed after the first run (nothing else was tuned): control (1) showed whole rises and falls
within the first checkpoint (G_0 differs 100x between cells), so time is in units of 1 / (a^-(0)
G_0), was 1 / a^-(0); steps halved for the CPU budget (``rmsprop_lr`` doubled). The ``relative``
criterion (some token outpaces y+ at t = 0: Theorem 5), added after seeing opposite-set tokens
overtake y+ later, is exploratory, not pre-registered.

Pre-registered before their first run (no flow had run on the new cells): (a) agreement and
P(displaced | predicted down / up), "displaced" at each of ``report_tols`` (1e-3, 0.01, 0.05, 0.1
nats). (b) The paper's regime, pi(y+) >= 0.5 at t = 0, on its own: the main grid's cells there and a
fixed extra slice, ``paper_rhos`` x ``paper_omegas`` x ``paper_kappas`` x ``paper_probs`` = (1.2,
1.4, 1.6) x (0.75, 1, 1.5) x (0.25, 0.5, 1) x (0.65, 0.8), other axes as the main grid's (992
feasible runs, 346 predicted down; main grid: 20 of 948 at 0.8), chosen from t = 0 predictions
alone. (c) Round-off: each run is rerun once with every entry of W and h0 times 1 + eps u, u ~ U(-1,
1) seeded per run, eps = ``roundoff`` = 2^-23 (float32's epsilon); a run whose "displaced" differs
between the two at a threshold is round-off sensitive; agreement with and without them.
"""

from dataclasses import dataclass
from inspect import signature
from pathlib import Path

from experiments import framework as fw
from experiments.framework import plots
from sims.protocols import phase_diagram as sp  # with the names the run needs

NAME = "displacement_phase_diagram"
#: Agreement with the t = 0 criteria: all runs, the paper's regime, and at report_tols[0] with
#: and without the round-off-sensitive runs (and their number).
#: Agreement with and without the round-off-sensitive runs, each with its round-off bound
#: (sims.protocols.phase_sensitivity: sensitive runs / resolved runs).
CONCLUSIONS = {f"{k}/{c}": ("rate", ("thresholds", c, 0, "agreement_roundoff", w))
               for c in sp.PHASE_CRITERIA for k, w in (("with_roundoff_sensitive", "all"),
               ("without_roundoff_sensitive", "without_sensitive"))}  # fmt: skip


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
    synonym_scale: float = 0.5  # |W_syn| / |W+| (spread over 0.8 .. 1.2 times this: < 0.83)
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
    RULES |= {"losses": fw.each(fw.one_of(sp.PHASE_LOSSES)), "paper_probs": RULES["probs"]}
    RULES |= {"optimizers": fw.each(fw.one_of(sp.PHASE_OPTIMIZERS)), "roundoff": fw.nonnegative}
    RULES |= {"hidden_size": fw.number_in(4, 4096), "synonym_scale": fw.number_in(0, 0.83)}

    @classmethod
    def smoke(cls) -> "Config":  # one path (generic_sgd): one compile; tests cover the others
        s = dict(rhos=(0.5, 1.5), omegas=(0.0, 1.0), kappas=(0.25,), probs=(0.5,), betas=(0.1,))
        s |= dict(losses=("dpo", "dpo_sft"), optimizers=("sgd",), lambdas=(4.0,), num_steps=200)
        s |= dict(paper_rhos=(1.2,), paper_omegas=(1.0,), paper_kappas=(0.5,), paper_probs=(0.8,))
        return cls(**s, chunk_size=8, batch_size=0, control_runs=0, boundary_points=9)

    @classmethod
    def scaled(cls) -> "Config":  # --scale: over 10^6 flows, sharded over a GPU/TPU's devices
        s = dict(rhos=tuple(round(-0.5 + 0.15 * i, 3) for i in range(21)), batch_size=0)
        s |= dict(omegas=tuple(round(i / 6, 4) for i in range(16)), betas=(0.05, 0.1, 0.25, 0.5))
        s |= dict(kappas=(0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0), lambdas=(0.0, 1.0, 4.0, 9.0))
        s |= dict(probs=(0.1, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8), chunk_size=65536, control_runs=512)
        return cls(**s, boundary_points=81)

    def check(self) -> None:
        if (n := self.num_steps) % (k := self.record_every) or n // k < 2:
            raise fw.ConfigError(f"--record-every must divide --num-steps (>= 2 records): {k}, {n}")


def run(config: Config, *, sweep_dir: str | Path | None = None) -> dict:
    """Build the grid, sweep it (in ``sweep_dir`` if given: resumable), report. JSON-ready."""
    fw.enable_x64()
    c = vars(config)
    geo = sp.make_phase_geometry(**{k: c[k] for k in signature(sp.make_phase_geometry).parameters})
    settings = sp.PhaseSettings(**{k: c[k] for k in sp.PhaseSettings._fields})
    grid = {k: c[k] for k in signature(sp.phase_axes).parameters}
    paper = {k: c["paper_" + k] for k in ("rhos", "omegas", "kappas", "probs")}  # extra slice
    kw = dict(slice_axes=sp.phase_axes(**grid | paper), sweep_dir=sweep_dir, log=fw.progress)
    res = sp.run_phase_diagram(geo, sp.phase_axes(**grid), settings, name=NAME, **kw)
    provenance = fw.provenance(dtype_of=res.main.outputs["max_drop"])
    return {**res.report, "config": config, "provenance": provenance}


plot = plots.phase_diagram_figure  # draws the figure from the JSON alone


def main(argv=None) -> dict:  # resumable: the sweep is saved in --out, per config
    kw = dict(summary=plots.phase_summary, conclusions=CONCLUSIONS, resumable=True)
    return fw.experiment_main(NAME, Config, run, plot, argv, **kw)


if __name__ == "__main__":
    fw.cli(main)
