"""One small instance of every flow front end, and a counter of XLA compilations.

:data:`FRONT_ENDS` maps a name to ``build(seed, *, beta, dt, num_steps) -> Flow``: a fresh model
and data set of fixed shapes drawn from ``seed`` (a fresh, equal loss object per call), prepared as
the front end prepares it. Only the values change from call to call, so the compile-once property
of :mod:`sims.flows.core` says that every call after the first compiles nothing, whatever its
``beta``, ``dt`` and ``num_steps``; :func:`compilations` counts what XLA compiles. The timing
script ``experiments/compile_once.py`` and ``tests/test_examples.py`` use both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sims.flows.core import Flow, SFTData, preference_flow, sft_flow
from sims.models.logit_model import PositionLogits, edit_pair_flow, edit_pair_prefixes
from sims.models.prefix_tree import index_prefixes, with_reference
from sims.models.tabular import TabularPolicy, kl_objective_flow
from sims.models.transformer import CausalTransformer, TokenBatch, make_transformer_pairs
from sims.models.unconstrained import UnconstrainedFeatures, make_pairs
from theory.losses import make_loss

#: JAX's monitoring event, one per XLA compilation (``jax._src.dispatch.BACKEND_COMPILE_EVENT``).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def compilations() -> Iterator[list[float]]:
    """Yield a list that receives the duration (seconds) of every XLA compilation in the block.

    Counts every program XLA compiles in this process meanwhile: jitted cores and the small
    programs of eager operations alike (a cached program is not compiled again).

    Example:
      >>> f, x, y = jax.jit(lambda x: x * 3.0), jnp.ones(7), jnp.zeros(7)
      >>> with compilations() as first:
      ...     _ = f(x)
      >>> with compilations() as again:
      ...     _ = f(y)  # the same shapes: the program is cached
      >>> len(first), len(again)
      (1, 0)
    """
    seen: list[float] = []

    def listen(event: str, duration: float, **_: object) -> None:
        if event == COMPILE_EVENT:
            seen.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def _features(seed: int, num_prefixes: int = 4, vocab: int = 50, hidden: int = 8):
    rngs = nnx.Rngs(seed)
    return UnconstrainedFeatures(vocab, hidden, num_prefixes, rngs=rngs, dtype=jnp.float64)


def single_token(seed: int, *, beta: float, dt: float, num_steps: int) -> Flow:
    """:func:`~sims.flows.core.preference_flow` of DPO on 4 single-token pairs (``V = 50``,
    ``d = 8``, unconstrained features, float64)."""
    m = _features(seed)
    pairs = make_pairs(m, jnp.arange(4), jnp.arange(4), jnp.arange(4) + 10)
    return preference_flow(m, pairs, make_loss("dpo", beta=beta), dt=dt, num_steps=num_steps)


def sft(seed: int, *, beta: float, dt: float, num_steps: int) -> Flow:
    """:func:`~sims.flows.core.sft_flow` on 4 labelled prompts (``beta`` is not used)."""
    data = SFTData(jnp.arange(4), jnp.arange(4) + 1)
    return sft_flow(_features(seed), data, dt=dt, num_steps=num_steps)


def prefix_tree(seed: int, *, beta: float, dt: float, num_steps: int) -> Flow:
    """:func:`~sims.flows.core.preference_flow` of DPO on two multi-token pairs sharing prefixes
    (:func:`~sims.models.prefix_tree.index_prefixes`, ``V = 10``, ``d = 4``)."""
    pairs, prefixes = index_prefixes([0, 1], [[1, 2], [3, 4]], [[1, 5], [6]])
    m = _features(seed, len(prefixes), vocab=10, hidden=4)
    loss = make_loss("dpo", beta=beta)
    return preference_flow(m, with_reference(m, pairs), loss, dt=dt, num_steps=num_steps)


def tabular(seed: int, *, beta: float, dt: float, num_steps: int) -> Flow:
    """:func:`~sims.models.tabular.kl_objective_flow` over 6 outcomes (uniform reference, normal
    rewards)."""
    r, p_ref = jax.random.normal(jax.random.key(seed), (6,)), jnp.full(6, 1 / 6)
    policy = TabularPolicy(logits=jnp.zeros(6))
    return kl_objective_flow(policy, p_ref, r, beta=beta, dt=dt, num_steps=num_steps)


def logit_model(seed: int, *, beta: float, dt: float, num_steps: int) -> Flow:
    """:func:`~sims.models.logit_model.edit_pair_flow` on one edit-distance-1 pair of 3 tokens,
    ``lam`` in ``(0, 1)`` (two vmapped runs), one checkpoint at the end."""
    c, r = np.array([1, 2, 3]), np.array([1, 0, 3])
    pre = edit_pair_prefixes(c, r)
    context = jax.random.normal(jax.random.key(seed), (len(pre.position), 5))
    model, lams = PositionLogits(context, pre.position, 3), jnp.array([0.0, 1.0])
    return edit_pair_flow(
        model, c, r, pre, lams, beta=beta, dt=dt, num_steps=num_steps, record_every=num_steps
    )


def transformer(seed: int, *, beta: float, dt: float, num_steps: int) -> Flow:
    """:func:`~sims.flows.core.preference_flow` of DPO on 3 random 8-token pairs of a one-layer
    :class:`~sims.models.transformer.CausalTransformer` (``V = 11``, ``d = 8``)."""
    rngs = nnx.Rngs(seed)
    m = CausalTransformer(11, d_model=8, num_layers=1, num_heads=2, max_len=8, rngs=rngs)
    tokens = jax.random.randint(jax.random.key(seed), (2, 3, 8), 0, 11)
    batches = [TokenBatch(t, jnp.array([2, 3, 2]), jnp.array([6, 8, 5])) for t in tokens]
    pairs = make_transformer_pairs(m, *batches)
    return preference_flow(m, pairs, make_loss("dpo", beta=beta), dt=dt, num_steps=num_steps)


#: Every flow front end, by name: ``build(seed, *, beta, dt, num_steps) -> Flow``.
FRONT_ENDS: dict[str, Callable[..., Flow]] = {
    "preference_flow (single token)": single_token,
    "sft_flow": sft,
    "preference_flow (prefix tree)": prefix_tree,
    "kl_objective_flow (tabular)": tabular,
    "edit_pair_flow (logit model)": logit_model,
    "preference_flow (transformer)": transformer,
}
