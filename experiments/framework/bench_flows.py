r"""The benchmark's flows (``python -m experiments bench``): reduced, full-parameter JAX, PyTorch.

Every timed problem is the single-token DPO flow of
:class:`~sims.models.unconstrained.UnconstrainedFeatures`
with one prompt and one pair :math:`(y^+, y^-) = (3, 5)`, explicit Euler (SGD) with step ``dt``:

* **reduced**: :func:`sims.flows.reduced.reduced_preference_flow` end to end (validation, ``W(0) @
B``,
  all steps, full-vocabulary log-probs at every checkpoint);
* **full JAX**: the foundation's step (``jax.value_and_grad`` of the loss through
  ``log_softmax(W h)`` on all of ``W`` and ``h``, ``optax.sgd``) in a jitted ``lax.fori_loop``
  with a run-time step count and donated parameters (``W`` updated in place);
* **PyTorch**: the usual autograd loop on CPU -- ``torch.optim.SGD``, ``zero_grad()`` (grads set to
  ``None``, so each step allocates a fresh ``V x d`` gradient), ``loss.backward()``, ``step()``,
  float32, ``torch.get_num_threads()`` threads, default (glibc) allocator. Its DPO loss (plus the
  SFT term for the sweep) is written in torch (a baseline cannot call :mod:`theory.losses`); it is
  checked against the JAX loss in the tests.

The **sweep** (many trajectories from random initialisations) trains DPO plus an SFT term
(:func:`sweep_loss`), a loss outside the margin class that the reduced flow refuses: every row of
``W`` moves. It times the exact low-rank flow (:func:`sims.flows.lowrank.lowrank_flow_fn`), the
autodiff
full-parameter step (the generic path before it) and the PyTorch loop on that loss.
:func:`sweep_rates` times them (interleaved calls); :mod:`experiments.framework.roofline`
measures this machine's bandwidth and flop rate for the sweep's roofline.

Timings: one warm-up (compilation) call, then the minimum wall time of ``repeats`` calls, each
ending in ``block_until_ready``. Slow baselines are time-boxed: the step count is chosen from the
warm-up so that one timed call takes about ``budget_s``. torch is optional (the ``bench`` extra):
:func:`torch_available` says whether it is installed.
"""

from __future__ import annotations

import functools
import gc
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.framework.benchmarking import (
    best_time,
    best_wall_and_cpu,
    boxed_steps,
    torch_available,
)
from experiments.framework.output import progress
from sims.flows.lowrank import lowrank_flow_fn
from sims.flows.reduced import reduced_preference_flow
from sims.flows.sweep import sharded_runner
from sims.models.unconstrained import PreferencePairs, UnconstrainedFeatures
from theory.losses import BoundLoss, dpo_loss, make_loss, mean_pair_loss

CHOSEN, REJECTED = 3, 5  # the pair's token ids (any two distinct ids give the same cost)
BETA = 0.1  # DPO beta of every timed flow
DT = 1e-2  # Euler step of every timed flow
SFT_COEF = 1.0  # lambda of the sweep's SFT term


@functools.cache
def sweep_loss() -> BoundLoss:
    """The sweep's loss: DPO (``beta = BETA``) plus ``SFT_COEF`` times the NLL of ``y+``.

    Built on first use: :func:`theory.losses.make_loss` evaluates the loss once, which would
    start JAX's backend at import, before ``bench.main`` can choose the number of CPU devices.
    """
    return make_loss("sft_term", base_loss=make_loss("dpo", beta=BETA), sft_coef=SFT_COEF)


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


def full_jax_rate(W, H, *, budget_s: float, min_steps: int, max_steps: int, repeats: int) -> dict:
    """Time the full-parameter JAX flow: ``steps_per_s`` and the timed ``steps`` per call."""
    steps_fn = full_parameter_steps()
    state = {"params": (jnp.array(W), jnp.array(H))}  # own copies: they are donated

    def call(n):
        state["params"] = steps_fn(state["params"], n)
        jax.block_until_ready(state["params"])

    call(1)  # compile
    n = boxed_steps(best_time(lambda: call(1), repeats=1), budget_s, min_steps, max_steps)
    wall = best_time(lambda: call(n), repeats=repeats)
    return {"steps_per_s": n / wall, "steps": n}


def _torch_loop(W_np: np.ndarray, h_np: np.ndarray, sft_coef: float = 0.0):
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
            if sft_coef:
                loss = loss - sft_coef * logprobs[CHOSEN]  # SFT term (Razin et al. Eq. 4)
            loss.backward()
            opt.step()

    return steps, (W, h)


def torch_rate(W, H, *, budget_s: float, min_steps: int, max_steps: int, repeats: int) -> dict:
    """Time the PyTorch autograd loop: ``steps_per_s``, timed ``steps`` per call, ``threads``."""
    import torch

    steps, _ = _torch_loop(np.array(W), np.array(H[0]))
    steps(1)  # warm-up
    n = boxed_steps(best_time(lambda: steps(1), repeats=1), budget_s, min_steps, max_steps)
    wall = best_time(lambda: steps(n), repeats=repeats)
    return {"steps_per_s": n / wall, "steps": n, "threads": torch.get_num_threads()}


def torch_dpo_margin_after(
    W: np.ndarray, h: np.ndarray, num_steps: int, *, sft_coef: float = 0.0
) -> float:
    """Return the margin :math:`lp^+ - lp^-` after ``num_steps`` torch steps (a parity check).

    ``sft_coef > 0`` adds the SFT term of :func:`sweep_loss`.
    """
    import torch

    steps, (Wt, ht) = _torch_loop(np.array(W), np.array(h), sft_coef)
    steps(num_steps)
    with torch.no_grad():
        logprobs = torch.log_softmax(Wt @ ht, dim=-1)
        return float(logprobs[CHOSEN] - logprobs[REJECTED])


def _sweep_loss(params):
    W, H = params
    logprobs = jax.nn.log_softmax(W @ H[0])  # [V]
    return mean_pair_loss(sweep_loss(), logprobs[CHOSEN][None], logprobs[REJECTED][None])


def sweep_steps(params, n):
    """``n`` autodiff full-parameter Euler steps of :func:`sweep_loss` (``optax.sgd``)."""
    tx = optax.sgd(DT)

    def body(_, carry):
        params, opt_state = carry
        grads = jax.grad(_sweep_loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.lax.fori_loop(0, n, body, (params, tx.init(params)))[0]


@functools.cache
def autodiff_run_fn(V: int, d: int, num_steps: int) -> Callable:
    """Return ``seed -> final margin``: the autodiff full-parameter flow of :func:`sweep_loss`.

    The generic path before :mod:`sims.flows.lowrank`: ``jax.grad`` through ``log_softmax(W h)`` on
    all
    parameters, ``optax.sgd``; only the step loop, no per-step finiteness tracking (the torch loop
    has none).
    """

    def run(seed):
        W, H = sweep_steps(random_geometry_traced(V, d, seed), num_steps)
        logprobs = jax.nn.log_softmax(W @ H[0])
        return logprobs[CHOSEN] - logprobs[REJECTED]

    return run


@functools.cache
def lowrank_run_fn(V: int, d: int, num_steps: int, fold_every: int) -> Callable:
    """Return ``seed -> final margin``: :func:`sims.flows.lowrank.lowrank_flow_fn` on
    :func:`sweep_loss`.

    The same trajectory as :func:`autodiff_run_fn`, exactly (it also tracks non-finite steps).
    """
    flow = lowrank_flow_fn(
        sweep_loss(), (0,), num_steps=num_steps, record_every=num_steps, fold_every=fold_every
    )

    def run(seed):
        W, H = random_geometry_traced(V, d, seed)
        zero = jnp.zeros(1, W.dtype)
        pairs = PreferencePairs(
            jnp.array([0]), jnp.array([CHOSEN]), jnp.array([REJECTED]), zero, zero
        )
        return flow(W, H, pairs, DT).observables.margin[-1, 0]

    return run


def torch_sweep_rate(
    V: int, d: int, *, num_runs: int, num_steps: int, repeats: int, threads: int, budget_s: float
) -> dict:
    """Time PyTorch trajectories of :func:`sweep_loss` one after another.

    Time-boxed: after a one-trajectory warm-up, at most ``num_runs`` (at least 1) trajectories,
    about ``budget_s`` seconds per timed call. Returns ``trajectory_steps_per_s`` (wall clock),
    ``trajectory_steps_per_cpu_s`` (per second of this process's CPU time), ``runs`` and
    ``threads`` (intra-op threads used).
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)

    def call(runs):
        for _ in range(runs):
            W = torch.randn(V, d, generator=gen) / np.sqrt(d)
            h = torch.randn(d, generator=gen) / np.sqrt(d)
            steps, _ = _torch_loop(W.numpy(), h.numpy(), SFT_COEF)
            steps(num_steps)

    try:
        runs = boxed_steps(best_time(lambda: call(1), repeats=1), budget_s, 1, num_runs)
        wall, cpu = best_wall_and_cpu(lambda: call(runs), repeats=repeats)
    finally:
        torch.set_num_threads(previous)
    return {
        "trajectory_steps_per_s": runs * num_steps / wall,
        "trajectory_steps_per_cpu_s": runs * num_steps / cpu,
        "runs": runs,
        "threads": threads,
    }


@functools.cache
def sweep_runner(run_fn: Callable, batch_size: int) -> Callable:
    """:func:`sims.flows.sweep.sharded_runner` of ``run_fn`` over every device (cached per
    arguments).

    ``batch_size`` runs are vmapped together per device; 1 runs them one after another.
    """
    return sharded_runner(run_fn, batch_size=None if batch_size == 1 else batch_size)


def sweep_rates(config) -> dict:
    """Time the low-rank and autodiff sweeps and the PyTorch loop on :func:`sweep_loss`.

    ``config`` is ``experiments.bench.Config`` (its ``sweep_*``, ``autodiff_batch_size``,
    ``torch_sweep_*`` and ``budget_s`` fields).

    The timed calls are interleaved (low-rank, autodiff, torch per thread count; repeated
    ``sweep_repeats`` times) and each side's fastest call counts, so that JAX and torch sample
    the same stretches of the shared machine's load.
    """
    V, d, n, R = config.sweep_vocab, config.sweep_hidden, config.sweep_steps, config.sweep_runs
    seeds = np.arange(R, dtype=np.uint32)
    sweep = {"runs": R, "steps": n, "devices": jax.device_count(), "loss": repr(sweep_loss())}
    jax_paths = {
        "lowrank": (lowrank_run_fn(V, d, n, config.sweep_fold_every), config.sweep_batch_size),
        "autodiff": (autodiff_run_fn(V, d, n), config.autodiff_batch_size),
    }
    runners = {key: sweep_runner(fn, b) for key, (fn, b) in jax_paths.items()}
    margins = {key: f(seeds) for key, f in runners.items()}  # compiles; host arrays: blocks
    times = {key: [] for key in runners}
    threads = [t or os.cpu_count() for t in config.torch_sweep_threads]
    torch_runs = {t: [] for t in threads} if torch_available() else {}
    for _ in range(config.sweep_repeats):
        for key, f in runners.items():
            times[key].append(best_wall_and_cpu(lambda f=f: f(seeds), repeats=1))
        for t in torch_runs:
            torch_runs[t].append(
                torch_sweep_rate(
                    V,
                    d,
                    num_runs=config.torch_sweep_runs,
                    num_steps=n,
                    repeats=1,
                    threads=t,
                    budget_s=config.budget_s,
                )
            )
    for key, (_, b) in jax_paths.items():
        wall, cpu = min(w for w, _ in times[key]), min(c for _, c in times[key])
        sweep[key] = {
            "trajectory_steps_per_s": R * n / wall,
            "trajectory_steps_per_cpu_s": R * n / cpu,
            "wall_s": wall,
            "batch_size": b,
        }
    sweep["lowrank"]["fold_every"] = config.sweep_fold_every
    sweep["dtype"] = str(margins["lowrank"].dtype)
    # float32 agreement of the two exact paths on every run (sums in different orders)
    sweep["lowrank_vs_autodiff_max_rel_diff"] = float(
        np.max(np.abs(margins["lowrank"] - margins["autodiff"]))
        / np.max(np.abs(margins["autodiff"]))
    )
    if torch_runs:
        runs = [
            {
                "threads": t,
                "runs": calls[0]["runs"],
                "trajectory_steps_per_s": max(c["trajectory_steps_per_s"] for c in calls),
                "trajectory_steps_per_cpu_s": max(c["trajectory_steps_per_cpu_s"] for c in calls),
            }
            for t, calls in torch_runs.items()
        ]
        sweep["torch_variants"] = runs
        sweep["torch"] = max(runs, key=lambda r: r["trajectory_steps_per_s"])
        torch_rate = sweep["torch"]["trajectory_steps_per_s"]
        sweep["over_torch"] = sweep["lowrank"]["trajectory_steps_per_s"] / torch_rate
        sweep["autodiff_over_torch"] = sweep["autodiff"]["trajectory_steps_per_s"] / torch_rate
        one_thread = [r for r in runs if r["threads"] == 1]
        if one_thread:  # one JAX device (core) against one torch thread
            sweep["over_torch_per_core"] = (
                sweep["lowrank"]["trajectory_steps_per_s"]
                / sweep["devices"]
                / one_thread[0]["trajectory_steps_per_s"]
            )
            # the same per second of CPU time: less sensitive to other jobs on the machine
            sweep["over_torch_per_cpu_s"] = (
                sweep["lowrank"]["trajectory_steps_per_cpu_s"]
                / one_thread[0]["trajectory_steps_per_cpu_s"]
            )
    progress(
        f"[bench] sweep: low-rank {sweep['lowrank']['trajectory_steps_per_s']:.3g} "
        f"trajectory-steps/s, autodiff {sweep['autodiff']['trajectory_steps_per_s']:.3g}, "
        f"x{sweep.get('over_torch', float('nan')):.3g} over torch"
    )
    return sweep


def bench_cell(config, V: int, d: int) -> dict:
    """Time the three single-trajectory paths at ``V x d`` (``config``: ``bench.Config``)."""
    W, H = random_geometry(V, d, config.seed)
    box = dict(
        budget_s=config.budget_s,
        min_steps=config.min_steps,
        max_steps=config.max_steps,
        repeats=config.repeats,
    )
    cell = {"V": V, "d": d}
    cell["reduced"] = reduced_rate(
        W,
        H,
        num_steps=config.reduced_steps,
        num_checkpoints=config.reduced_checkpoints,
        repeats=config.repeats,
    )
    cell["jax_full"] = full_jax_rate(W, H, **box)
    if torch_available():
        W_np, H_np = np.array(W), np.array(H)
        del W, H  # one copy of a 2 GB W at a time
        gc.collect()
        cell["torch"] = torch_rate(W_np, H_np, **box)
        torch_speed = cell["torch"]["steps_per_s"]
        cell["reduced_over_torch"] = cell["reduced"]["steps_per_s"] / torch_speed
        cell["jax_full_over_torch"] = cell["jax_full"]["steps_per_s"] / torch_speed
    cell["reduced_over_jax_full"] = cell["reduced"]["steps_per_s"] / cell["jax_full"]["steps_per_s"]
    progress(
        f"[bench] V={V} d={d}: reduced {cell['reduced']['steps_per_s']:.3g} steps/s "
        f"({cell['reduced']['wall_s']:.3f} s), jax full {cell['jax_full']['steps_per_s']:.3g}, "
        f"torch {cell.get('torch', {}).get('steps_per_s', float('nan')):.3g}"
    )
    return cell


def bench_targets(cells: list[dict], sweep: dict) -> dict:
    """The issue's targets, read at the largest cell and on the sweep."""
    big = max(cells, key=lambda c: (c["V"] * c["d"], c["V"]))
    return {
        "largest_cell": [big["V"], big["d"]],
        "reduced_wall_s": big["reduced"]["wall_s"],
        "reduced_wall_le_1s": big["reduced"]["wall_s"] <= 1.0,
        "reduced_over_torch_ge_1e4": big.get("reduced_over_torch", 0.0) >= 1e4,
        "sweep_over_torch_ge_10": sweep.get("over_torch", 0.0) >= 10.0,
    }


def sweep_panel(ax, sweep: dict) -> None:
    """Bar panel of the sweep's trajectory-steps per second (low-rank, autodiff, torch)."""
    bars = [("low-rank", sweep["lowrank"]["trajectory_steps_per_s"])]
    bars.append(("autodiff", sweep["autodiff"]["trajectory_steps_per_s"]))
    for r in sweep.get("torch_variants", []):
        bars.append((f"torch {r['threads']}t", r["trajectory_steps_per_s"]))
    ax.bar(
        [b[0] for b in bars], [b[1] for b in bars], color=["C0", "C1"] + ["C2"] * (len(bars) - 2)
    )
    ax.set(
        yscale="log",
        ylabel="trajectory-steps / s",
        title=f"DPO + SFT sweep, {sweep['runs']} runs, {sweep['devices']} device(s)",
    )
    ax.tick_params(axis="x", rotation=45)
