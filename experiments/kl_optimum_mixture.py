"""KL-optimum mixture shift: Theorem 2 (sources 000/001) refuted as stated, corrected, probed."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from functools import cache, partial

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from experiments.framework import (
    ConfigError,
    ExperimentConfig,
    cli,
    each,
    enable_x64,
    experiment_main,
    finite,
    grid,
    open_unit_interval,
    positive,
    probability,
    progress,
    provenance,
)
from experiments.framework.plots import identity_line
from sims.models.tabular import TabularPolicy, kl_objective_flow
from theory.kl_counterexample import (
    random_instances,
    search_counterexamples,
    theorem2_census,
)
from theory.kl_exact import rational_counterexample
from theory.kl_optimum import residual_mass_bound, total_probability_mass
from theory.logit_arithmetic import arithmetic_mass

NAME = "kl_optimum_mixture"
#: TPM(U) computed via logsumexp vs the bound via one exp: rounding of a few ulps (equality cases).
BOUND_RTOL = 1e-12
#: |TPM(A) - alpha| above this is a decided sign for the criterion check (float64 rounding ~1e-16).
CRITERION_ATOL = 1e-9


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

    RULES = {
        "zero_fraction": probability,
        "demo_alpha": open_unit_interval,
        "demo_p_A": each(probability),
        "demo_p_U": each(probability),
        "demo_r": each(finite),
        "betas": grid(positive),
        "temperatures": grid(positive),
        "gammas": grid(finite),
    }

    def check(self) -> None:
        if not len(self.demo_p_A) == len(self.demo_p_U) == len(self.demo_r):
            raise ConfigError("--demo-p-a, --demo-p-u and --demo-r must have one length")
        if self.flow_steps % self.flow_record_every:
            raise ConfigError("--flow-record-every must divide --flow-steps")
        if self.scatter_points > self.corrected_instances:
            raise ConfigError("--scatter-points must be <= --corrected-instances")

    @classmethod
    def smoke(cls) -> Config:
        return cls(
            search_instances=20_000,
            corrected_instances=2_000,
            scatter_points=200,
            betas=(0.1, 10.0, 3),
            temperatures=(0.5, 4.0, 3),
            gammas=(-2.0, 1.0, 4),
            flow_steps=200,
            flow_record_every=20,
        )


@cache
def _batched(fn):
    """jit(vmap(fn)), one compiled function per library function across runs."""
    return jax.jit(jax.vmap(fn))


@jax.jit
@partial(jax.vmap, in_axes=(None, None, None, None, 0))
def _beta_sweep(alpha, p_A, p_U, r, beta):
    args = (alpha, p_A, p_U, r, beta)
    return total_probability_mass(*args).tpm_A, 1 - residual_mass_bound(*args)


@jax.jit
@partial(jax.vmap, in_axes=(None, None, None, None, None, 0, 0))
def _amplification(alpha, p_A, p_U, r, beta, a, b):
    return arithmetic_mass(alpha, p_A, p_U, r, beta, a=a, b=b).tpm_U


def _strs(x):
    return [str(v) for v in x] if isinstance(x, list) else str(x)


def _stated_theorem(config: Config, key) -> tuple:
    """Return ``(search, exact counterexample, JSON part)``: float32 search for counterexamples to
    Theorem 2 as stated, confirmed in float64, one made exact in rationals."""
    common = dict(num_outcomes=config.num_outcomes, zero_fraction=config.zero_fraction)
    search = search_counterexamples(key, num_instances=config.search_instances, **common)
    progress(f"search: {search.float32_hits} float32 hits, {len(search.confirmed)} in float64")
    ce = rational_counterexample(
        search.instances,
        search.confirmed[:50],
        denominator=config.rational_denominator,
        reward_grid=config.reward_grid,
    )
    summary = {
        "search": {
            "instances": config.search_instances,
            "float32_hits": search.float32_hits,
            "float64_confirmed": len(search.confirmed),
            "best_float64_margin": float(search.margin[search.confirmed[0]]),
        },
        "counterexample": {
            **{k: _strs(getattr(ce, k)) for k in ("alpha", "p_A", "p_U", "r", "beta")},
            **{k: _strs(getattr(ce.check, k)) for k in ("cov_r_A", "cov_r_U")},
            **{k: [float(v) for v in getattr(ce.check, k)] for k in ("m_A", "m_U", "tpm_A")},
            "search_index": ce.index,
            "tpm_A_upper_minus_alpha": float(ce.check.tpm_A[1] - ce.alpha),
            "violates_stated_theorem": ce.check.violates_stated_theorem,
        },
    }
    return search, ce, summary


def _corrected_theorem(config: Config, key) -> tuple:
    """Return ``(TPM(U) per instance, JSON part)``: census of the corrected theorem and the
    residual-mass bound on random float64 instances."""
    common = dict(num_outcomes=config.num_outcomes, zero_fraction=config.zero_fraction)
    checks = random_instances(key, num_instances=config.corrected_instances, **common)
    census = theorem2_census(checks, criterion_atol=CRITERION_ATOL)
    progress(f"corrected: {census.tilt_conditions} meet it, {census.tilt_failures} fail")
    tpm_U = np.asarray(_batched(total_probability_mass)(*checks).tpm_U)
    bound = np.asarray(_batched(residual_mass_bound)(*checks))
    n = config.scatter_points
    return tpm_U, {
        "corrected": census._asdict(),
        "residual": {
            "tpm_U": tpm_U[:n],
            "bound": bound[:n],
            "violations": int(np.sum(tpm_U < bound * (1 - BOUND_RTOL))),
            "min_ratio": float(np.min(tpm_U / bound)),
        },
    }


def _sweeps(config: Config, ce) -> dict:
    """Aligned mass over beta (demo and exact counterexample); unaligned mass over T and gamma."""
    demo = [jnp.asarray(x) for x in (config.demo_p_A, config.demo_p_U, config.demo_r)]
    betas = jnp.geomspace(*config.betas[:2], int(config.betas[2]))
    total_probability_mass(config.demo_alpha, *demo, config.demo_beta)  # validates the demo

    def beta_sweep(alpha, p_A, p_U, r):
        tpm, upper = _beta_sweep(alpha, p_A, p_U, r, betas)
        return {"alpha": alpha, "tpm_A": tpm, "upper_bound": upper}

    temps = jnp.geomspace(*config.temperatures[:2], int(config.temperatures[2]))
    gammas = jnp.linspace(*config.gammas[:2], int(config.gammas[2]))
    # temperature T is (a, b) = (1/T, 0); extrapolation gamma is (1 + gamma, gamma): one batch
    a_all = jnp.concatenate([1 / temps, 1 + gammas])
    b_all = jnp.concatenate([jnp.zeros_like(temps), gammas])
    amp = _amplification(config.demo_alpha, *demo, config.demo_beta, a_all, b_all)
    ce_floats = [np.array([float(v) for v in x]) for x in (ce.p_A, ce.p_U, ce.r)]
    return {
        "beta_sweep": {
            "betas": betas,
            "counterexample": beta_sweep(float(ce.alpha), *ce_floats),
            "demo": beta_sweep(config.demo_alpha, *demo),
        },
        "amplification": {
            "temperatures": temps,
            "tpm_U_temperature": amp[: temps.shape[0]],
            "gammas": gammas,
            "tpm_U_gamma": amp[temps.shape[0] :],
            "tpm_U_reference": 1 - config.demo_alpha,
        },
    }


def _flow(config: Config) -> dict:
    """Distances to the tilt along the gradient flow of the KL objective (demo instance)."""
    p_A, p_U, r = (jnp.asarray(x) for x in (config.demo_p_A, config.demo_p_U, config.demo_r))
    p_ref = config.demo_alpha * p_A + (1 - config.demo_alpha) * p_U
    traj = kl_objective_flow(
        TabularPolicy(logits=jnp.zeros_like(p_ref)),
        p_ref,
        r,
        beta=config.flow_beta,
        dt=config.flow_dt,
        num_steps=config.flow_steps,
        record_every=config.flow_record_every,
    ).run()
    obs = traj.observables
    return {"t": traj.t, "total_variation": obs.total_variation, "kl": obs.kl}


def run(config: Config) -> dict:
    enable_x64()  # float64 checks (the counterexample search itself runs in float32)
    key_search, key_check = jax.random.split(jax.random.key(config.seed))
    search, ce, stated = _stated_theorem(config, key_search)
    tpm_U, corrected = _corrected_theorem(config, key_check)
    return {
        "config": config,
        **stated,
        **corrected,
        **_sweeps(config, ce),
        "flow": _flow(config),
        "provenance": provenance(dtype_of=(search.margin, tpm_U)),
    }


def plot(results: dict) -> plt.Figure:
    fig, ax = plt.subplots(2, 3, figsize=(16, 9))
    sweep = results["beta_sweep"]
    for name, style in (("demo", "-"), ("counterexample", "--")):
        s = sweep[name]
        (line,) = ax[0, 0].semilogx(sweep["betas"], s["tpm_A"], style, label=f"TPM(A), {name}")
        c = line.get_color()
        ax[0, 0].semilogx(
            sweep["betas"], s["upper_bound"], ":", color=c, label="1 - residual bound"
        )
        ax[0, 0].axhline(s["alpha"], color=c, lw=0.8, alpha=0.6, label="alpha")
    ax[0, 0].set(xlabel="beta", ylabel="TPM(A)", title="Aligned mass of the KL optimum")
    res = results["residual"]
    ax[0, 1].loglog(res["bound"], res["tpm_U"], ".", ms=2)
    identity_line(ax[0, 1], min(res["bound"]), 1.0, "k-", label="TPM(U) = bound")
    ax[0, 1].set(
        xlabel="(1-alpha) exp((r_min^U - r_max)/beta)",
        ylabel="true TPM(U)",
        title=f"Residual bound: {res['violations']} violations",
    )
    ce = results["counterexample"]
    x = np.arange(len(ce["r"]))
    frac = [[float(Fraction(v)) for v in ce[k]] for k in ("p_A", "p_U", "r")]
    ax[0, 2].bar(x - 0.2, frac[0], 0.4, label="p_A")
    ax[0, 2].bar(x + 0.2, frac[1], 0.4, label="p_U")
    twin = ax[0, 2].twinx()
    twin.plot(x, frac[2], "ko-", label="r (beta = 1)")
    twin.set_ylabel("r")
    ax[0, 2].set(
        xlabel="output y",
        ylabel="probability",
        xticks=x,
        title=f"Cov(r,p_A)={ce['cov_r_A']}, Cov(r,p_U)={ce['cov_r_U']}\n"
        f"TPM(A) <= {ce['tpm_A'][1]:.6f} < alpha = {ce['alpha']} (exact bounds)",
    )
    ax[0, 2].legend(loc="upper left", fontsize=7)
    amp = results["amplification"]
    ax[1, 0].semilogx(amp["temperatures"], amp["tpm_U_temperature"])
    ax[1, 0].set(xlabel="sampling temperature T", ylabel="TPM(U)", title="Temperature (a=1/T, b=0)")
    ax[1, 1].plot(amp["gammas"], amp["tpm_U_gamma"])
    ax[1, 1].set(
        xlabel="gamma in softmax((1+gamma) l_theta - gamma l_ref)",
        ylabel="TPM(U)",
        title="Extrapolation (gamma = -1 is p_ref)",
    )
    for a in ax[1, :2]:
        a.axhline(amp["tpm_U_reference"], color="k", lw=0.8, label="reference 1 - alpha")
    flow = results["flow"]
    ax[1, 2].semilogy(flow["t"], np.maximum(flow["total_variation"], 1e-17), label="TV(p_t, tilt)")
    ax[1, 2].semilogy(flow["t"], np.maximum(flow["kl"], 1e-17), label="KL(p_t || tilt)")
    ax[1, 2].set(xlabel="flow time t", ylabel="distance", title="Gradient flow reaches the tilt")
    for a in (ax[0, 0], ax[0, 1], ax[1, 0], ax[1, 1], ax[1, 2]):
        a.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _summary(results: dict) -> str:
    ce, cor = results["counterexample"], results["corrected"]
    return (
        f"Theorem 2 as stated: {results['search']['float64_confirmed']} float64-confirmed "
        f"counterexamples in {results['search']['instances']}; exact instance violates it: "
        f"{ce['violates_stated_theorem']} (TPM(A) <= {ce['tpm_A'][1]:.6f} < alpha = "
        f"{ce['alpha']}); corrected: {cor['tilt_failures']} failures in {cor['tilt_conditions']} "
        f"instances meeting the tilt conditions (of {cor['instances']})"
    )


def main(argv=None) -> dict:
    return experiment_main(NAME, Config, run, plot, argv, summary=_summary)


if __name__ == "__main__":
    cli(main)
