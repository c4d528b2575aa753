"""The full-parameter reference flow that the exact fast paths (sims/flows/reduced.py,
sims/flows/lowrank.py)
are tested against: random single-token instances, autodiff of the whole model, a normwise error."""

import jax
import jax.numpy as jnp
import numpy as np

from sims.flows.core import flow_fn
from theory.losses import mean_pair_loss


def random_instances(seed: int, V: int, d: int, P: int, N: int, *, num: int):
    """``num`` random ``W [num, V, d]``, hidden tables ``[num, P, d]``, reference log-probs
    ``[num, 2, N]`` (negative, as log-probs are)."""
    keys = jax.random.split(jax.random.key(seed), 3)
    W = jax.random.normal(keys[0], (num, V, d)) / np.sqrt(d)
    H = jax.random.normal(keys[1], (num, P, d)) / np.sqrt(d)
    refs = -jnp.abs(jax.random.normal(keys[2], (num, 2, N))) - 1.0
    return W, H, refs


def full_parameter_flow(loss, prompt, chosen, rejected, *, dt, num_steps, record_every):
    """Jitted, vmapped ``(W, H, refs) -> FlowResult``: autodiff through ``log_softmax(W h)``, all of
    ``W`` and the hidden table train (Euler); observables: every token's log-prob per pair."""
    rows = jnp.arange(len(prompt))

    def loss_fn(params, refs):
        logprobs = jax.nn.log_softmax(params[1][prompt] @ params[0].T, axis=-1)
        return mean_pair_loss(loss, logprobs[rows, chosen], logprobs[rows, rejected], *refs)

    def observe_fn(params, _):
        return jax.nn.log_softmax(params[1][prompt] @ params[0].T, axis=-1)

    run = flow_fn(
        loss_fn, observe_fn, optimizer="sgd", num_steps=num_steps, record_every=record_every
    )
    return jax.jit(jax.vmap(lambda W, H, refs: run((W, H), refs, dt)))


def normwise_error(a, b) -> np.ndarray:
    """Per instance ``max|a - b| / max|b|`` over all but the leading axis."""
    a, b = np.asarray(a).reshape(a.shape[0], -1), np.asarray(b).reshape(b.shape[0], -1)
    return np.max(np.abs(a - b), axis=1) / np.max(np.abs(b), axis=1)
