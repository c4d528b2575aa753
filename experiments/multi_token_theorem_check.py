"""Theorems 6-7, Propositions 1-2 (Razin et al. 2024) vs autodiff of the flow, multi-token.

Random single-pair instances of the unconstrained-features model over the prefix tree, several
lengths, with and without shared prefixes; the closed forms of ``theory.multi_token`` /
``theory.regularized`` against ``sims.models.prefix_tree.flow_velocity`` (jax.grad + jax.jvp),
float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

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
from sims.analysis.summaries import pointwise_relative_error, stack
from sims.models.prefix_tree import extend_prefixes, flow_velocity, index_prefixes, with_reference
from sims.models.unconstrained import UnconstrainedFeatures
from theory.losses import loss_coefficients, make_loss
from theory.multi_token import other_response_terms, response_logprob_velocity
from theory.regularized import preferred_logprob_velocity

NAME = "multi_token_theorem_check"
# (loss name, result checked for y+): a loss of the class gives Theorem 6, the others Props 1-2
LOSSES = {
    "dpo": "Theorem 6",
    "sft_term": "Proposition 1",
    "dpop": "Proposition 2",
    "simpo": "Proposition 2",
}


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


def _instance(rng, V, d, Lp, Ln, common, Lz, *, z_fresh):
    y_pos = rng.integers(0, V, Lp)
    y_neg = rng.integers(0, V, Ln)
    y_neg[:common] = y_pos[:common]
    y_neg[common] = (y_pos[common] + rng.integers(1, V)) % V
    if z_fresh:  # Theorem 7: z_1 not in {y+_1, y-_1}
        z = rng.integers(0, V, Lz)
        z[0] = rng.choice(np.setdiff1d(np.arange(V), [y_pos[0], y_neg[0]]))
    else:  # z shares a prefix with y+ (general form)
        z = np.concatenate([y_pos[: min(Lp, Lz - 1)], rng.integers(0, V, Lz)])[:Lz]
    pairs, prefixes = index_prefixes([0], [y_pos], [y_neg])
    z_rows, prefixes = extend_prefixes(prefixes, 0, z)
    P = Lp + Ln + Lz  # table size bound; spare rows are unused
    scale = np.exp(rng.uniform(np.log(0.3), np.log(3.0)))
    hidden = rng.normal(size=d) + scale * rng.normal(size=(P, d))  # positive inner products
    W = scale * rng.normal(size=(V, d)) / np.sqrt(d)
    model = UnconstrainedFeatures.from_arrays(W, hidden)
    pairs = with_reference(model, pairs)
    pairs = pairs._replace(ref_logprob_chosen=pairs.ref_logprob_chosen + rng.normal(size=1))
    return model, pairs, jnp.asarray(z)[None, :], jnp.asarray(z_rows)[None, :]


def _hyper(loss_name, Lp, Ln):
    return {
        "dpo": {"beta": 0.5},
        "sft_term": {"base_loss": "dpo", "sft_coef": 0.5},
        "dpop": {"beta": 0.5, "lam": 5.0},
        "simpo": {
            "beta": 2.0,
            "gamma": 0.5,
            "length_chosen": float(Lp),
            "length_rejected": float(Ln),
        },
    }[loss_name]


def _check_case(models, pairs, z, z_rows, losses, *, z_fresh):
    """One jitted, vmapped pass over a case's instances for every loss (one compilation)."""
    graphdef = nnx.split(models[0])[0]

    @jax.jit
    @jax.vmap
    def one(state, pairs, z, z_rows):
        model = nnx.merge(graphdef, state)
        W, H = model.unembedding[...], model.hidden[...]
        hp, hn, hz = H[pairs.chosen_prefix[0]], H[pairs.rejected_prefix[0]], H[z_rows[0]]
        yp, yn = pairs.chosen[0], pairs.rejected[0]
        lp = [
            jnp.sum(jax.nn.log_softmax(h @ W.T)[jnp.arange(y.shape[0]), y])
            for h, y in ((hp, yp), (hn, yn))
        ]
        out = {}
        for name, loss in losses.items():
            want_pos = flow_velocity(
                model, pairs, loss, pairs.chosen, pairs.chosen_prefix, pairs.chosen_mask
            )[0]
            want_z = flow_velocity(model, pairs, loss, z, z_rows, jnp.ones(z.shape, bool))[0]
            a = loss_coefficients(
                loss, *lp, pairs.ref_logprob_chosen[0], pairs.ref_logprob_rejected[0]
            )
            out[(name, "y_pos")] = (
                preferred_logprob_velocity(W, hp, hn, yp, yn, *a).velocity,
                want_pos,
            )
            out[(name, "z_general")] = (
                response_logprob_velocity(W, hp, hn, yp, yn, hz, z[0], *a),
                want_z,
            )
            if z_fresh and name == "dpo":  # Theorem 7 is stated for losses of the class
                bracket = other_response_terms(W, hp, hn, yp, yn, hz, z[0]).bracket
                out[(name, "z_theorem7")] = (a[0] * bracket, want_z)
        return out

    return one(stack([nnx.split(m)[1] for m in models]), stack(pairs), stack(z), stack(z_rows))


def _label(what: str, loss_name: str, z_fresh: bool) -> str:
    """The result a check verifies: y+ by the loss's result, z by Theorem 7 or the general form."""
    if what == "y_pos":
        return LOSSES[loss_name]
    if what == "z_theorem7":
        return "Theorem 7"
    return "general form, z fresh" if z_fresh else "general form, z shares y+ prefix"


def _summarise(checks: dict) -> dict:
    """Per result: count, max and median pointwise relative error, the case of the worst."""
    summary = {}
    for label, e in checks.items():
        got, want = np.array(e["closed_form"]), np.array(e["autodiff"])
        rel = pointwise_relative_error(got, want, floor=1e-12 * np.mean(np.abs(want)))
        summary[label] = {
            "count": int(got.size),
            "max_rel_error": float(rel.max()),
            "median_rel_error": float(np.median(rel)),
            "worst_case": e["case"][int(np.argmax(rel))],
        }
    return summary


def run(config: Config) -> dict:
    enable_x64()  # a theorem check in float64, however run() is called
    rng = np.random.default_rng(config.seed)
    checks: dict[str, dict[str, list]] = {}
    for case in config.cases:
        Lp, Ln, common = (int(v) for v in case.split(","))
        z_fresh = common == 0
        dims = (config.vocab_size, config.hidden_size, Lp, Ln, common, config.z_length)
        insts = [_instance(rng, *dims, z_fresh=z_fresh) for _ in range(config.instances_per_case)]
        losses = {name: make_loss(name, **_hyper(name, Lp, Ln)) for name in LOSSES}
        out = _check_case(*zip(*insts, strict=True), losses, z_fresh=z_fresh)
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
        "summary": _summarise(checks),
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
    return experiment_main(NAME, Config, run, plot, argv, summary=_summary)


if __name__ == "__main__":
    cli(main)
