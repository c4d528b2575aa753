"""Theorems 4-5 (Razin et al. 2024) vs autodiff and vs a finite difference along the simulated flow.

For each random instance (unembeddings ``W``, hidden embedding ``h``, a pair ``y+ != y-`` and a
reference margin) the closed form :func:`theory.single_token.logprob_velocity` is compared, for
every token, with (i) autodiff: ``jvp`` of the model's log-probs along ``-grad L`` of the actual
loss, and (ii) a central difference of the log-probs over one simulated Euler step of the flow and
one of the time-reversed flow (``sims.flows.core.flow_fn``, step ``fd_step``). Half of the
instances have
``W- = 1.2 W+ + noise`` and a small ``h``, so that displacement cases are well represented.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from itertools import product

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
    one_of,
    progress,
    provenance,
)
from experiments.framework.plots import symlog_identity
from sims.analysis.summaries import relative_error, sign_agreement
from sims.flows.core import flow_fn
from sims.models.unconstrained import softmax_logprobs
from theory import losses
from theory.single_token import logprob_velocity

NAME = "single_token_theorem_check"
LOSSES = {"dpo": {"beta": 0.1}, "ipo": {"tau": 0.05}, "slic": {"delta": 50.0}}


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
            if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[0]) < 2:
                raise ConfigError(f"--shapes must be VxD with V >= 2, D >= 1, got {shape!r}")
            if int(parts[1]) < 1:
                raise ConfigError(f"--shapes must be VxD with V >= 2, D >= 1, got {shape!r}")


def _instance(key, V, d, scales):
    kW, kh, kp, kn, kr, ks, ka = jax.random.split(key, 7)
    scale = jax.random.choice(ks, jnp.asarray(scales))
    W = scale * jax.random.normal(kW, (V, d)) / jnp.sqrt(d)
    h = scale * jax.random.normal(kh, (d,))
    y_pos = jax.random.randint(kp, (), 0, V)
    y_neg = (y_pos + jax.random.randint(kn, (), 1, V)) % V
    aligned = jax.random.bernoulli(ka)  # displacement-prone geometry (Theorem 4)
    W = W.at[y_neg].set(jnp.where(aligned, 1.2 * W[y_pos] + 0.3 * W[y_neg], W[y_neg]))
    h = jnp.where(aligned, 0.1 * h / jnp.sqrt(d), h)
    return W, h, y_pos, y_neg, jax.random.normal(kr, (2,)) - 2.0


@partial(jax.jit, static_argnames=("loss", "V", "d", "scales"))
def _check_cell(keys, fd_step, *, loss, V, d, scales):
    """Closed form, autodiff and central difference for a cell's instances (compiled once)."""

    def pair_loss(params, data):
        lp = softmax_logprobs(*params)[0]
        y_pos, y_neg, ref = data
        return loss(lp[y_pos], lp[y_neg], ref[0], ref[1])

    def observe(params, _):
        return softmax_logprobs(*params)[0]

    forward = flow_fn(pair_loss, observe, optimizer="sgd", num_steps=1, record_every=1)
    backward = flow_fn(
        lambda p, x: -pair_loss(p, x), observe, optimizer="sgd", num_steps=1, record_every=1
    )

    def one(key):
        W, h, y_pos, y_neg, ref = _instance(key, V, d, scales)
        params, data = (W, h[None]), (y_pos, y_neg, ref)
        lp = observe(params, None)
        ell_prime = losses.margin_derivative(loss, lp[y_pos], lp[y_neg], ref[0], ref[1])
        closed = logprob_velocity(W, h, y_pos, y_neg, ell_prime)
        grads = jax.grad(pair_loss)(params, data)
        auto = jax.jvp(
            lambda p: observe(p, None), (params,), (jax.tree_util.tree_map(jnp.negative, grads),)
        )[1]
        fd = (
            forward(params, data, fd_step).observables[1]
            - backward(params, data, fd_step).observables[1]
        ) / (2 * fd_step)
        return closed, auto, fd, y_pos, y_neg

    return jax.vmap(one)(keys)


def _cell(shape: str, closed, auto, fd, y_pos) -> dict:
    """Errors and sign agreement of one cell's closed forms against autodiff and the flow."""
    scale = np.max(np.abs(auto), axis=1)
    # entries whose sign is meaningful: above round-off (autodiff) or above the O(dt^2)
    # truncation error of the central difference (up to ~1e-4 relative here)
    agree, _ = sign_agreement(closed, auto, threshold=1e-6 * scale[:, None])
    agree_fd, _ = sign_agreement(closed, fd, threshold=1e-3 * scale[:, None], magnitude=auto)
    return {
        "shape": shape,
        "instances": len(y_pos),
        "max_rel_err_autodiff": float(relative_error(closed, auto, axis=1).max()),
        "max_rel_err_fd": float(relative_error(closed, fd, axis=1, scale=scale).max()),
        "sign_agreement_autodiff": agree,
        "sign_agreement_fd": agree_fd,
        "displacing_instances": int(np.sum(auto[np.arange(len(y_pos)), y_pos] < 0)),
    }


def _add_points(points: dict, closed, auto, fd, y_pos, y_neg, V: int) -> None:
    """Append a cell's velocities of y+, y- and one other token per instance to ``points``."""
    rows, scale = np.arange(len(y_pos)), np.max(np.abs(auto), axis=1)
    for kind, cols in (("y_pos", y_pos), ("y_neg", y_neg), ("other", (y_pos + y_neg) % V)):
        keep = (cols != y_neg) & (cols != y_pos) if kind == "other" else np.ones_like(cols, bool)
        for key, arr in (("closed", closed), ("autodiff", auto), ("finite_difference", fd)):
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
        out = _check_cell(
            jax.random.split(key, config.instances),
            config.fd_step,
            loss=losses.make_loss(loss_type, **LOSSES[loss_type]),
            V=V,
            d=d,
            scales=tuple(config.init_scales),
        )
        closed, auto, fd, y_pos, y_neg = (np.asarray(a) for a in out)
        cells.append({**_cell(shape, closed, auto, fd, y_pos), "loss_type": loss_type})
        _add_points(points, closed, auto, fd, y_pos, y_neg, V)
        c = cells[-1]
        progress(
            f"  {shape} {loss_type}: max rel err autodiff {c['max_rel_err_autodiff']:.2e}, "
            f"fd {c['max_rel_err_fd']:.2e}, displacing {c['displacing_instances']}"
        )
    return {
        "config": config,
        "cells": cells,
        "points": points,
        "summary": {
            "instances": sum(c["instances"] for c in cells),
            "max_rel_err_autodiff": max(c["max_rel_err_autodiff"] for c in cells),
            "max_rel_err_fd": max(c["max_rel_err_fd"] for c in cells),
            "min_sign_agreement_autodiff": min(c["sign_agreement_autodiff"] for c in cells),
            "min_sign_agreement_fd": min(c["sign_agreement_fd"] for c in cells),
            "displacing_instances": sum(c["displacing_instances"] for c in cells),
        },
        "provenance": provenance(dtype_of=closed),
    }


def plot(results: dict) -> plt.Figure:
    p = {k: np.asarray(v) for k, v in results["points"].items()}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, ref in zip(axes[:2], ("autodiff", "finite_difference"), strict=True):
        for kind, color in (("other", "0.6"), ("y_neg", "tab:red"), ("y_pos", "tab:blue")):
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
    return experiment_main(NAME, Config, run, plot, argv, summary=lambda r: str(r["summary"]))


if __name__ == "__main__":
    cli(main)
