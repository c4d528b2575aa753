r"""Timing helpers for ``experiments/bench.py``: reduced flow, full-parameter JAX, PyTorch loop.

Every timed problem is the single-token DPO flow of :class:`~sims.models.UnconstrainedFeatures`
with one prompt and one pair :math:`(y^+, y^-) = (3, 5)`, explicit Euler (SGD) with step ``dt``:

* **reduced**: :func:`sims.reduced.reduced_preference_flow` end to end (validation, ``W(0) @ B``,
  all steps, full-vocabulary log-probs at every checkpoint);
* **full JAX**: the foundation's step (``jax.value_and_grad`` of the loss through
  ``log_softmax(W h)`` on all of ``W`` and ``h``, ``optax.sgd``) in a jitted ``lax.fori_loop``
  with a run-time step count and donated parameters (``W`` updated in place);
* **PyTorch**: the usual autograd loop on CPU -- ``torch.optim.SGD``, ``zero_grad()`` (grads set to
  ``None``, so each step allocates a fresh ``V x d`` gradient), ``loss.backward()``, ``step()``,
  float32, ``torch.get_num_threads()`` threads, default allocator. Its DPO loss is written in torch
  (a baseline cannot call :mod:`theory.losses`); it is checked against the JAX loss in the tests.

Timings: one warm-up (compilation) call, then the minimum wall time of ``repeats`` calls, each
ending in ``block_until_ready``. Slow baselines are time-boxed: the step count is chosen from the
warm-up so that one timed call takes about ``budget_s``. torch is optional (the ``bench`` extra):
:func:`torch_available` says whether it is installed.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sims.models import PreferencePairs, UnconstrainedFeatures
from sims.reduced import reduced_preference_flow
from theory.losses import dpo_loss, make_loss

CHOSEN, REJECTED = 3, 5  # the pair's token ids (any two distinct ids give the same cost)
BETA = 0.1  # DPO beta of every timed flow
DT = 1e-2  # Euler step of every timed flow


def torch_available() -> bool:
    """Whether PyTorch is installed (the optional ``bench`` extra)."""
    return importlib.util.find_spec("torch") is not None


def best_time(fn: Callable[[], object], *, repeats: int) -> float:
    """Return the minimum wall time (s) of ``repeats`` calls of ``fn`` (which must block)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def random_geometry(V: int, d: int, seed: int) -> tuple[jax.Array, jax.Array]:
    """Return float32 ``W`` ``[V, d]`` and ``h`` ``[1, d]`` with entries :math:`N(0, 1/d)`."""
    return random_geometry_traced(V, d, seed)


def random_geometry_traced(V: int, d: int, seed) -> tuple[jax.Array, jax.Array]:
    """As :func:`random_geometry`, for a traced ``seed`` (inside ``vmap``/``jit``)."""
    k_w, k_h = jax.random.split(jax.random.key(seed))
    scale = jnp.float32(1.0 / np.sqrt(d))
    W = scale * jax.random.normal(k_w, (V, d), jnp.float32)
    return W, scale * jax.random.normal(k_h, (1, d), jnp.float32)


def reduced_rate(W, H, *, num_steps: int, num_checkpoints: int, repeats: int) -> dict:
    """Time the reduced flow: ``wall_s`` (best), ``steps_per_s``, ``first_call_s`` (compiles)."""
    # not from_arrays: it first draws (asynchronously) a discarded random V x d matrix, which at
    # V = 128,256, d = 4,096 kept the CPU busy for ~30 s into the first timed call
    model = UnconstrainedFeatures(1, W.shape[1], 1, rngs=nnx.Rngs(0), dtype=W.dtype)
    model.unembedding, model.hidden = nnx.Param(W), nnx.Param(H)
    zero = jnp.zeros(1, jnp.float32)
    pairs = PreferencePairs(jnp.array([0]), jnp.array([CHOSEN]), jnp.array([REJECTED]), zero, zero)
    loss = make_loss("dpo", beta=BETA)

    def call():
        result = reduced_preference_flow(
            model,
            pairs,
            loss,
            dt=DT,
            num_steps=num_steps,
            record_every=num_steps // num_checkpoints,
        )
        jax.block_until_ready(result)

    first = best_time(call, repeats=1)
    wall = best_time(call, repeats=repeats)
    return {"wall_s": wall, "steps_per_s": num_steps / wall, "first_call_s": first}


def _full_loss(params):
    W, H = params
    logprobs = jax.nn.log_softmax(W @ H[0])  # [V]
    return jnp.sum(dpo_loss(logprobs[CHOSEN], logprobs[REJECTED], beta=BETA))


def _full_steps(params, n):
    """``n`` full-parameter Euler steps: the foundation's step (autodiff, ``optax.sgd``)."""
    tx = optax.sgd(DT)

    def body(_, carry):
        params, opt_state = carry
        grads = jax.grad(_full_loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.lax.fori_loop(0, n, body, (params, tx.init(params)))[0]


def full_parameter_steps() -> Callable:
    """Return jitted ``(params, n) -> params``: ``n`` full-parameter Euler steps (donated)."""
    return jax.jit(_full_steps, donate_argnums=0)


def _boxed_steps(seconds_per_step: float, budget_s: float, min_steps: int, max_steps: int) -> int:
    return int(np.clip(budget_s / max(seconds_per_step, 1e-9), min_steps, max_steps))


def full_jax_rate(W, H, *, budget_s: float, min_steps: int, max_steps: int, repeats: int) -> dict:
    """Time the full-parameter JAX flow: ``steps_per_s`` and the timed ``steps`` per call."""
    steps_fn = full_parameter_steps()
    state = {"params": (jnp.array(W), jnp.array(H))}  # own copies: they are donated

    def call(n):
        state["params"] = steps_fn(state["params"], n)
        jax.block_until_ready(state["params"])

    call(1)  # compile
    n = _boxed_steps(best_time(lambda: call(1), repeats=1), budget_s, min_steps, max_steps)
    wall = best_time(lambda: call(n), repeats=repeats)
    return {"steps_per_s": n / wall, "steps": n}


def _torch_loop(W_np: np.ndarray, h_np: np.ndarray):
    import torch

    W = torch.nn.Parameter(torch.from_numpy(W_np))
    h = torch.nn.Parameter(torch.from_numpy(h_np))
    opt = torch.optim.SGD([W, h], lr=DT)

    def steps(n):
        for _ in range(n):
            opt.zero_grad()
            logprobs = torch.log_softmax(W @ h, dim=-1)
            margin = logprobs[CHOSEN] - logprobs[REJECTED]
            loss = -torch.nn.functional.logsigmoid(BETA * margin)  # DPO, zero reference margin
            loss.backward()
            opt.step()

    return steps, (W, h)


def torch_rate(W, H, *, budget_s: float, min_steps: int, max_steps: int, repeats: int) -> dict:
    """Time the PyTorch autograd loop: ``steps_per_s``, timed ``steps`` per call, ``threads``."""
    import torch

    steps, _ = _torch_loop(np.array(W), np.array(H[0]))
    steps(1)  # warm-up
    n = _boxed_steps(best_time(lambda: steps(1), repeats=1), budget_s, min_steps, max_steps)
    wall = best_time(lambda: steps(n), repeats=repeats)
    return {"steps_per_s": n / wall, "steps": n, "threads": torch.get_num_threads()}


def torch_dpo_margin_after(W: np.ndarray, h: np.ndarray, num_steps: int) -> float:
    """Return the margin :math:`lp^+ - lp^-` after ``num_steps`` torch steps (a parity check)."""
    import torch

    steps, (Wt, ht) = _torch_loop(np.array(W), np.array(h))
    steps(num_steps)
    with torch.no_grad():
        logprobs = torch.log_softmax(Wt @ ht, dim=-1)
        return float(logprobs[CHOSEN] - logprobs[REJECTED])


def generic_run_fn(V: int, d: int, num_steps: int) -> Callable:
    """Return ``seed -> final margin``: one full-parameter DPO flow from a random init.

    The generic path: autodiff through ``log_softmax(W h)`` on all parameters, as any loss needs
    (SFT term, DPOP); only the step loop, no per-step finiteness tracking (the torch loop has none).
    """

    def run(seed):
        W, H = random_geometry_traced(V, d, seed)
        W, H = _full_steps((W, H), num_steps)
        logprobs = jax.nn.log_softmax(W @ H[0])
        return logprobs[CHOSEN] - logprobs[REJECTED]

    return run


def torch_sweep_rate(V: int, d: int, *, num_runs: int, num_steps: int, repeats: int) -> dict:
    """Time ``num_runs`` PyTorch trajectories one after another: ``trajectory_steps_per_s``."""
    import torch

    gen = torch.Generator().manual_seed(0)

    def call():
        for _ in range(num_runs):
            W = torch.randn(V, d, generator=gen) / np.sqrt(d)
            h = torch.randn(d, generator=gen) / np.sqrt(d)
            steps, _ = _torch_loop(W.numpy(), h.numpy())
            steps(num_steps)

    call()  # warm-up
    wall = best_time(call, repeats=repeats)
    return {"trajectory_steps_per_s": num_runs * num_steps / wall, "runs": num_runs}
