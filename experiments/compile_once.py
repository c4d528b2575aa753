"""Compile once: the first call of each flow front end against a repeat call with the same shapes.

Every flow of :mod:`sims` runs a jitted core cached per (loss, observable, optimiser, schedule,
shapes) (:func:`sims.flows.core.compiled_flow`), so a repeat call with new values but the same
shapes
should skip tracing and compilation. For each front end this times the first call (trace + compile +
run) and the best of ``repeats`` repeat calls (new data values, equal but distinct loss objects),
and reports the ratio. A timing script, not a test (the test suite checks the caches instead).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from experiments.framework import (
    ExperimentConfig,
    cli,
    enable_x64,
    experiment_main,
    progress,
    provenance,
)
from sims.flows.core import SFTData, preference_flow, sft_flow
from sims.models.logit_model import PositionLogits, edit_pair_flow, edit_pair_prefixes
from sims.models.prefix_tree import index_prefixes, with_reference
from sims.models.tabular import TabularPolicy, kl_objective_flow
from sims.models.transformer import CausalTransformer, TokenBatch, make_transformer_pairs
from sims.models.unconstrained import UnconstrainedFeatures, make_pairs
from theory.losses import make_loss

NAME = "compile_once"


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """First call vs repeat call of every flow front end (same shapes, new values)."""

    num_steps: int = 100  # steps per flow
    repeats: int = 3  # repeat calls timed (best kept)
    seed: int = 0

    @classmethod
    def smoke(cls) -> Config:
        return cls(num_steps=4, repeats=1)


def _flows(steps: int):
    """Return ``{name: call(seed)}``: fresh data of fixed shapes, then one flow."""
    dpo = lambda: make_loss("dpo", beta=0.1)  # noqa: E731  a fresh, equal loss object per call

    def single(seed):
        m = UnconstrainedFeatures(50, 8, 4, rngs=nnx.Rngs(seed), dtype=jnp.float64)
        pairs = make_pairs(m, jnp.arange(4), jnp.arange(4), jnp.arange(4) + 10)
        return preference_flow(m, pairs, dpo(), dt=0.1, num_steps=steps).run().loss

    def sft(seed):
        m = UnconstrainedFeatures(50, 8, 4, rngs=nnx.Rngs(seed), dtype=jnp.float64)
        return (
            sft_flow(m, SFTData(jnp.arange(4), jnp.arange(4) + 1), dt=0.1, num_steps=steps)
            .run()
            .loss
        )

    def prefix_tree(seed):
        pairs, prefixes = index_prefixes([0, 1], [[1, 2], [3, 4]], [[1, 5], [6]])
        m = UnconstrainedFeatures(10, 4, len(prefixes), rngs=nnx.Rngs(seed), dtype=jnp.float64)
        return (
            preference_flow(m, with_reference(m, pairs), dpo(), dt=0.1, num_steps=steps).run().loss
        )

    def tabular(seed):
        r = jax.random.normal(jax.random.key(seed), (6,))
        policy = TabularPolicy(logits=jnp.zeros(6))
        return kl_objective_flow(
            policy, jnp.full(6, 1 / 6), r, beta=1.0, dt=0.1, num_steps=steps
        ).run()

    def logit_model(seed):
        c, r = np.array([1, 2, 3]), np.array([1, 0, 3])
        pre = edit_pair_prefixes(c, r)
        ctx = jax.random.normal(jax.random.key(seed), (len(pre.position), 5))
        model = PositionLogits(ctx, pre.position, 3)
        return edit_pair_flow(
            model, c, r, pre, jnp.array([0.0, 1.0]), beta=0.5, dt=0.1, num_steps=steps,
            record_every=steps,
        ).run().loss  # fmt: skip

    def transformer(seed):
        m = CausalTransformer(
            11, d_model=8, num_layers=1, num_heads=2, max_len=8, rngs=nnx.Rngs(seed)
        )
        tokens = jax.random.randint(jax.random.key(seed), (2, 3, 8), 0, 11)
        lens = (jnp.array([2, 3, 2]), jnp.array([6, 8, 5]))
        pairs = make_transformer_pairs(
            m, TokenBatch(tokens[0], *lens), TokenBatch(tokens[1], *lens)
        )
        return preference_flow(m, pairs, dpo(), dt=0.1, num_steps=steps).run().loss

    return {
        "preference_flow (single token)": single,
        "sft_flow": sft,
        "preference_flow (prefix tree)": prefix_tree,
        "kl_objective_flow (tabular)": tabular,
        "edit_pair_flow (logit model)": logit_model,
        "preference_flow (transformer)": transformer,
    }


def _time(call, seed: int) -> float:
    start = time.perf_counter()
    jax.block_until_ready(call(seed))
    return time.perf_counter() - start


def run(config: Config) -> dict:
    enable_x64()
    rows = []
    for name, call in _flows(config.num_steps).items():
        first = _time(call, config.seed)
        repeat = min(_time(call, config.seed + 1 + i) for i in range(config.repeats))
        rows.append({"flow": name, "first_s": first, "repeat_s": repeat, "ratio": first / repeat})
        progress(f"  {name}: first {first:.3f} s, repeat {repeat:.4f} s, x{first / repeat:.1f}")
    return {
        "config": config,
        "rows": rows,
        "min_ratio": min(r["ratio"] for r in rows),
        "provenance": provenance(dtype_of=np.array([r["ratio"] for r in rows])),
    }


def plot(results: dict) -> plt.Figure:
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r["first_s"] for r in rows], 0.4, label="first call (compile)")
    ax.barh(y + 0.2, [r["repeat_s"] for r in rows], 0.4, label="repeat call, same shapes")
    ax.set(yticks=y, yticklabels=[r["flow"] for r in rows], xscale="log", xlabel="seconds")
    ax.set_title(f"min first/repeat ratio: {results['min_ratio']:.1f}x")
    ax.legend(fontsize=8)
    return fig


def main(argv=None) -> dict:
    return experiment_main(
        NAME, Config, run, plot, argv, summary=lambda r: f"min ratio {r['min_ratio']:.1f}x"
    )


if __name__ == "__main__":
    cli(main)
