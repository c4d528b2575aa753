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
  float32, ``torch.get_num_threads()`` threads, default (glibc) allocator. Its DPO loss (plus the
  SFT term for the sweep) is written in torch (a baseline cannot call :mod:`theory.losses`); it is
  checked against the JAX loss in the tests.

The **sweep** (many trajectories from random initialisations) trains DPO plus an SFT term
(:func:`sweep_loss`), a loss outside the margin class that the reduced flow refuses: every row of
``W`` moves. It times the exact low-rank flow (:func:`sims.lowrank.lowrank_flow_fn`), the autodiff
full-parameter step (the generic path before it) and the PyTorch loop on that loss.
:func:`machine_peaks` measures this machine's memory bandwidth and flop rate with small kernels
for the roofline (:func:`lowrank_step_cost`).

Timings: one warm-up (compilation) call, then the minimum wall time of ``repeats`` calls, each
ending in ``block_until_ready``. Slow baselines are time-boxed: the step count is chosen from the
warm-up so that one timed call takes about ``budget_s``. torch is optional (the ``bench`` extra):
:func:`torch_available` says whether it is installed.
"""

from __future__ import annotations

import functools
import importlib.util
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sims.lowrank import lowrank_flow_fn
from sims.models import PreferencePairs, UnconstrainedFeatures
from sims.reduced import reduced_preference_flow
from sims.sweep import RUN_AXIS, run_mesh, sharded_runner
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


def best_wall_and_cpu(fn: Callable[[], object], *, repeats: int) -> tuple[float, float]:
    """Return the minimum wall time and the minimum CPU time (s) of ``repeats`` calls of ``fn``.

    CPU time is this process's (all threads, ``time.process_time``): on a machine shared with
    other jobs it counts only the time the work held a core, so rates per CPU-second vary far
    less with the load than wall-clock rates.
    """
    walls, cpus = [], []
    for _ in range(repeats):
        cpu, start = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


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
    n = _boxed_steps(best_time(lambda: steps(1), repeats=1), budget_s, min_steps, max_steps)
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


def _sweep_steps(params, n):
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

    The generic path before :mod:`sims.lowrank`: ``jax.grad`` through ``log_softmax(W h)`` on all
    parameters, ``optax.sgd``; only the step loop, no per-step finiteness tracking (the torch loop
    has none).
    """

    def run(seed):
        W, H = _sweep_steps(random_geometry_traced(V, d, seed), num_steps)
        logprobs = jax.nn.log_softmax(W @ H[0])
        return logprobs[CHOSEN] - logprobs[REJECTED]

    return run


@functools.cache
def lowrank_run_fn(V: int, d: int, num_steps: int, fold_every: int) -> Callable:
    """Return ``seed -> final margin``: :func:`sims.lowrank.lowrank_flow_fn` on :func:`sweep_loss`.

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


def lowrank_step_cost(V: int, d: int, fold_every: int) -> dict:
    """Return ``flops`` and ``bytes`` (float32) of one trajectory-step of :func:`lowrank_run_fn`.

    Counted from the algorithm (one pair, ``K = fold_every``): two passes over ``W_b``
    (``W_b h`` and ``G W_b``: ``2 V d`` flops and ``4 V d`` bytes each); the fold
    ``W_b + A^T B`` amortised (``2 V d K`` flops per ``K`` steps; it reads and writes ``W_b`` and
    the product: about ``4 x 4 V d`` bytes per ``K`` steps); the products with the factors, all
    ``K`` slots (``A`` ``[K, V]`` and ``B`` ``[K, d]`` each read twice: ``4 K (V + d)`` flops and
    ``8 K (V + d)`` bytes); the softmax and its gradient (about ``10 V`` flops; vectors in cache).
    """
    K = fold_every
    flops = 4 * V * d + 2 * V * d + 4 * K * (V + d) + 10 * V
    bytes_ = 8 * V * d + 16 * V * d / K + 8 * K * (V + d)
    return {"flops": float(flops), "bytes": float(bytes_)}


def autodiff_step_cost(V: int, d: int) -> dict:
    """Return XLA's own count (``cost_analysis``) of one step of :func:`autodiff_run_fn`."""
    params = random_geometry(V, d, 0)
    cost = jax.jit(lambda p: _sweep_steps(p, 1)).lower(params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {"flops": float(cost["flops"]), "bytes": float(cost["bytes accessed"])}


@functools.cache
def _one_and_every(kernel: Callable) -> tuple[Callable, Callable, jax.sharding.Mesh]:
    """Jitted ``kernel`` on one device, and on every device at once (one input each); cached."""
    mesh = run_mesh()
    spec = jax.P(RUN_AXIS)
    every = jax.shard_map(
        lambda b: jax.lax.map(kernel, b), mesh=mesh, in_specs=spec, out_specs=spec
    )
    return jax.jit(kernel), jax.jit(every), mesh


def _rates(kernel: Callable, make_input: Callable, work: float, repeats: int) -> dict:
    """Return ``work`` per second of ``kernel(x)``: one device, every device, per CPU-second."""
    one, every, mesh = _one_and_every(kernel)
    x = make_input(jax.random.key(0))
    jax.block_until_ready(one(x))
    single, cpu = best_wall_and_cpu(lambda: jax.block_until_ready(one(x)), repeats=repeats)
    n = mesh.devices.size
    xs = jax.device_put(
        jax.vmap(make_input)(jax.random.split(jax.random.key(1), n)),
        jax.NamedSharding(mesh, jax.P(RUN_AXIS)),
    )
    jax.block_until_ready(every(xs))
    wall = best_time(lambda: jax.block_until_ready(every(xs)), repeats=repeats)
    return {
        "one_device": work / single,
        "all_devices": n * work / wall,
        "per_cpu_s": work / cpu,
        "devices": n,
    }


@functools.cache
def _matvec_passes(times: int) -> Callable:
    """Return ``W -> scalar``: ``times`` dependent products ``W h`` (each one pass over ``W``)."""

    def kernel(W):
        def body(_, h):
            return 0.5 * h + jnp.resize(W @ h, h.shape)  # [d]; each pass needs the last one

        return jnp.sum(jax.lax.fori_loop(0, times, body, W[0]))

    return kernel


def _gemm(A):
    return jnp.sum((A @ A) @ A)  # two dependent n x n x n products


def machine_peaks(*, repeats: int, scale: float = 1.0) -> dict:
    """Measure this machine's float32 rates with small JAX kernels (one device, every device).

    * ``cache_bandwidth``: bytes/s of matrix-vector products with a ``W``-sized (``1000 x 256``,
      1 MB) random matrix, 2,000 dependent products: the sweep's own pass over ``W_b``;
    * ``dram_bandwidth``: the same with a ``16384 x 4096`` (256 MB) matrix, 4 products (streams
      from memory);
    * ``flop_rate``: flop/s of ``1024 x 1024`` matrix products (XLA's matmul).

    Each holds ``one_device`` and ``all_devices`` (wall-clock rates of the kernel on one device
    and on every device at once: with one CPU device per core, the whole machine) and
    ``per_cpu_s`` (the one-device rate per second of CPU time: what a core achieves while it
    runs the kernel, the stable number on a shared machine). ``scale`` shrinks every size.
    """
    out = {}
    for key, rows, cols, times in (
        ("cache_bandwidth", 1000, 256, 2000),
        ("dram_bandwidth", 16384, 4096, 4),
    ):
        rows, cols = max(8, int(rows * scale)), max(8, int(cols * scale))

        def make(k, rows=rows, cols=cols):
            # float32 scale: a NumPy float64 scalar would promote W to float64 under x64
            return jax.random.normal(k, (rows, cols), jnp.float32) * jnp.float32(cols**-0.5)

        out[key] = _rates(_matvec_passes(times), make, 4.0 * rows * cols * times, repeats)
        out[key]["matrix_bytes"] = 4 * rows * cols
    n = max(8, int(1024 * scale))
    out["flop_rate"] = _rates(
        _gemm,
        lambda k: jax.random.normal(k, (n, n), jnp.float32) * jnp.float32(n**-0.5),
        4.0 * n**3,
        repeats,
    )
    return out


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
        runs = _boxed_steps(best_time(lambda: call(1), repeats=1), budget_s, 1, num_runs)
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
    """:func:`sims.sweep.sharded_runner` of ``run_fn`` over every device (cached per arguments).

    ``batch_size`` runs are vmapped together per device; 1 runs them one after another.
    """
    return sharded_runner(run_fn, batch_size=None if batch_size == 1 else batch_size)
