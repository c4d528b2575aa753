"""KL-optimum mixture shift: Theorem 2 (sources 000/001) refuted as stated, corrected, probed."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from experiments.framework import ConfigError, ExperimentConfig, cli, experiment_main, probability
from experiments.framework.config import each, finite, grid, open_unit_interval, positive
from experiments.framework.output import enable_x64, progress, provenance
from experiments.framework.plots import identity_line
from sims.protocols import kl_mixture as km

NAME = "kl_optimum_mixture"
#: The counterexample found; failures of the stated and corrected theorem (float64 census).
CONCLUSIONS = {
    "counterexample": ("verdict", ("counterexample", "violates_stated_theorem")),
    "stated_failures": ("rate", ("corrected", "stated_failures")),
    "corrected_failures": ("rate", ("corrected", "tilt_failures")),
    "residual_violations": ("rate", ("residual", "violations")),
}
#: Config fields passed to :func:`sims.protocols.kl_mixture.theorem2_checks` as they are.
CHECKS = ("search_instances", "corrected_instances", "num_outcomes", "zero_fraction", "reward_grid")
RESIDUAL = "(1-alpha) exp((r_min^U - r_max)/beta)"  # the residual-mass bound (axis label)
EXTRAPOLATION = "gamma in softmax((1+gamma) l_theta - gamma l_ref)"  # (axis label)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """KL-optimum mixture shift: counterexample search, corrected theorem, bounds, amplification."""

    seed: int = 0  # PRNG seed of every random draw
    num_outcomes: int = 5  # V of the random instances (zeros make supports of 1..V outputs)
    zero_fraction: float = 0.2  # probability of zeroing an entry of p_A / p_U
    search_instances: int = 200_000  # float32 search for counterexamples to Theorem 2 as stated
    corrected_instances: int = 450_000  # float64 instances checking the corrected theorem
    rational_denominator: int = 20  # printed instance: p_A, p_U, alpha in multiples of 1/this
    reward_grid: int = 2  # printed instance: r / beta in multiples of 1/this, beta = 1
    scatter_points: int = 2000  # instances shown in the residual-bound panel
    demo_alpha: float = 0.5  # mixture weight of the demo instance
    demo_p_A: tuple = (0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0)  # aligned part (last output off-support)
    demo_p_U: tuple = (0.0, 0.1, 0.15, 0.25, 0.3, 0.2, 0.0)  # unaligned part
    demo_r: tuple = (2.0, 1.5, 1.0, 0.0, -1.0, -2.0, 9.0)  # rewards (the 9 is off-support, ignored)
    demo_beta: float = 0.5  # KL coefficient of the tuned demo model
    betas: tuple = (0.05, 50.0, 61)  # beta sweep: geomspace(start, stop, num)
    temperatures: tuple = (0.25, 16.0, 49)  # sampling temperature T: geomspace(start, stop, num)
    gammas: tuple = (-3.0, 2.0, 51)  # extrapolation coefficient: linspace(start, stop, num)
    flow_beta: float = 1.0  # beta of the gradient flow to the optimum
    flow_dt: float = 1.0  # Euler step (flow time per step)
    flow_steps: int = 6000  # steps of the flow
    flow_record_every: int = 60  # steps between recorded distances

    RULES = {"zero_fraction": probability, "demo_alpha": open_unit_interval}
    RULES |= {"demo_p_A": each(probability), "demo_p_U": each(probability), "demo_r": each(finite)}
    RULES |= {"betas": grid(positive), "temperatures": grid(positive), "gammas": grid(finite)}

    def check(self) -> None:
        if not len(self.demo_p_A) == len(self.demo_p_U) == len(self.demo_r):
            raise ConfigError("--demo-p-a, --demo-p-u and --demo-r must have one length")
        if self.flow_steps % self.flow_record_every:
            raise ConfigError("--flow-record-every must divide --flow-steps")
        if self.scatter_points > self.corrected_instances:
            raise ConfigError("--scatter-points must be <= --corrected-instances")

    @classmethod
    def smoke(cls) -> Config:
        small = dict(search_instances=20_000, corrected_instances=2_000, scatter_points=200)
        grids = dict(betas=(0.1, 10.0, 3), temperatures=(0.5, 4.0, 3), gammas=(-2.0, 1.0, 4))
        return cls(**small, **grids, flow_steps=200, flow_record_every=20)


def run(config: Config) -> dict:
    enable_x64()  # float64 checks (the counterexample search itself runs in float32)
    sizes = {k: getattr(config, k) for k in CHECKS} | {"denominator": config.rational_denominator}
    stated, cor = km.theorem2_checks(jax.random.key(config.seed), log=progress, **sizes)
    ce = km.float_instance(stated.counterexample)  # (alpha, p_A, p_U, r), beta = 1
    demo = [config.demo_alpha, *map(jnp.asarray, (config.demo_p_A, config.demo_p_U, config.demo_r))]
    betas, temps = (jnp.geomspace(*g[:2], int(g[2])) for g in (config.betas, config.temperatures))
    grids = dict(temperatures=temps, gammas=jnp.linspace(*config.gammas[:2], int(config.gammas[2])))
    steps = dict(num_steps=config.flow_steps, record_every=config.flow_record_every)
    swept = {"counterexample": ce, "demo": demo}  # the instances swept over beta
    sweeps = {k: km.beta_sweep(*v, betas)._asdict() for k, v in swept.items()}
    return {
        "config": config,
        **km.exact_record(stated),
        "corrected": cor.census._asdict(),
        "residual": cor.residual.head(config.scatter_points)._asdict(),
        "beta_sweep": {"betas": betas, **sweeps},
        "amplification": km.amplification(*demo, config.demo_beta, **grids)._asdict(),
        "flow": km.tilt_flow(*demo, beta=config.flow_beta, dt=config.flow_dt, **steps)._asdict(),
        "provenance": provenance(dtype_of=(stated.search.margin, cor.residual.tpm_U)),
    }


def plot(results: dict) -> plt.Figure:
    fig, ax = plt.subplots(2, 3, figsize=(16, 9))
    sweep, res, ce = results["beta_sweep"], results["residual"], results["counterexample"]
    amp, flow = results["amplification"], results["flow"]
    for name, style in (("demo", "-"), ("counterexample", "--")):
        s, a = sweep[name], ax[0, 0]
        c = a.semilogx(sweep["betas"], s["tpm_A"], style, label=f"TPM(A), {name}")[0].get_color()
        a.semilogx(sweep["betas"], s["upper_bound"], ":", color=c, label="1 - residual bound")
        a.axhline(s["alpha"], color=c, lw=0.8, alpha=0.6, label="alpha")
    ax[0, 1].loglog(res["bound"], res["tpm_U"], ".", ms=2)
    identity_line(ax[0, 1], min(res["bound"]), 1.0, "k-", label="TPM(U) = bound")
    x = np.arange(len(ce["r"]))
    p_A, p_U, r = ([float(Fraction(v)) for v in ce[k]] for k in ("p_A", "p_U", "r"))
    ax[0, 2].bar(x - 0.2, p_A, 0.4, label="p_A")
    ax[0, 2].bar(x + 0.2, p_U, 0.4, label="p_U")
    twin = ax[0, 2].twinx()
    twin.plot(x, r, "ko-", label="r (beta = 1)")
    twin.set_ylabel("r")
    ax[1, 0].semilogx(amp["temperatures"], amp["tpm_U_temperature"])
    ax[1, 1].plot(amp["gammas"], amp["tpm_U_gamma"])
    for a in ax[1, :2]:
        a.axhline(amp["tpm_U_reference"], color="k", lw=0.8, label="reference 1 - alpha")
    for key, label in (("total_variation", "TV(p_t, tilt)"), ("kl", "KL(p_t || tilt)")):
        ax[1, 2].semilogy(flow["t"], np.maximum(flow[key], 1e-17), label=label)
    exact = f"Cov(r,p_A)={ce['cov_r_A']}, Cov(r,p_U)={ce['cov_r_U']}\n"
    exact += f"TPM(A) <= {ce['tpm_A'][1]:.6f} < alpha = {ce['alpha']} (exact bounds)"
    labels = {  # panel: x label, y label, title
        (0, 0): ("beta", "TPM(A)", "Aligned mass of the KL optimum"),
        (0, 1): (RESIDUAL, "true TPM(U)", f"Residual bound: {res['violations']} violations"),
        (0, 2): ("output y", "probability", exact),
        (1, 0): ("sampling temperature T", "TPM(U)", "Temperature (a=1/T, b=0)"),
        (1, 1): (EXTRAPOLATION, "TPM(U)", "Extrapolation (gamma = -1 is p_ref)"),
        (1, 2): ("flow time t", "distance", "Gradient flow reaches the tilt"),
    }
    for (i, j), (xlabel, ylabel, title) in labels.items():
        ax[i, j].set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax[i, j].legend(fontsize=7, loc="upper left" if (i, j) == (0, 2) else "best")
    ax[0, 2].set_xticks(x)
    fig.tight_layout()
    return fig


def main(argv=None) -> dict:
    kw = dict(summary=lambda r: str(r["corrected"]), conclusions=CONCLUSIONS)
    return experiment_main(NAME, Config, run, plot, argv, **kw)


if __name__ == "__main__":
    cli(main)
