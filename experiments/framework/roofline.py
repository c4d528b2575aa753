"""Roofline of the bench's sweep: this machine's measured peaks and the sweep's bytes and flops.

:func:`machine_peaks` times small JAX kernels (matrix-vector products with a cache-sized and a
memory-sized matrix, matrix products) on one device, on every device at once, and per second of
CPU time; :func:`lowrank_step_cost` counts one low-rank trajectory-step and
:func:`autodiff_step_cost` takes XLA's count of one autodiff step; :func:`roofline` places the
sweeps of :func:`experiments.bench_flows.sweep_rates` against the peaks (per core, per CPU-second).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from experiments.framework import bench_flows as bm
from experiments.framework.benchmarking import best_time, best_wall_and_cpu
from experiments.framework.output import progress
from sims.flows.sweep import RUN_AXIS, run_mesh


def lowrank_step_cost(V: int, d: int, fold_every: int) -> dict:
    """Return ``flops`` and ``bytes`` (float32) of one step of ``bench_flows.lowrank_run_fn``.

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
    """Return XLA's own count (``cost_analysis``) of one step of ``bench_flows.autodiff_run_fn``."""
    params = bm.random_geometry(V, d, 0)
    cost = jax.jit(lambda p: bm.sweep_steps(p, 1)).lower(params).compile().cost_analysis()
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


def best_peaks(*measurements: dict) -> dict:
    """The larger of each measured rate: the machine's peak shows in its least disturbed run."""
    first = measurements[0]
    return {k: {f: max(m[k][f] for m in measurements) for f in first[k]} for k in first}


def roofline(config, sweep: dict, peaks_before: dict) -> dict:
    """Bytes and flops per trajectory-step, the machine's measured peaks, where the sweeps sit.

    Per core and per second of CPU time (sweep and peak kernels alike), which a shared machine's
    load disturbs far less than wall-clock rates; the peaks are measured before and after the
    sweep and the larger of the two counts (other jobs can still slow a core: the host's other
    tenants share its caches and memory).
    """
    peaks_after = machine_peaks(repeats=config.peaks_repeats, scale=config.peaks_scale)
    peaks = best_peaks(peaks_before, peaks_after)
    V, d = config.sweep_vocab, config.sweep_hidden
    roof = {"peaks": peaks, "peaks_before_sweep": peaks_before, "peaks_after_sweep": peaks_after}
    for key, cost in (
        ("lowrank", lowrank_step_cost(V, d, config.sweep_fold_every)),
        ("autodiff", autodiff_step_cost(V, d)),
    ):
        rate = sweep[key]["trajectory_steps_per_cpu_s"]  # per core while it computes
        roof[key] = {
            "flops_per_step": cost["flops"],
            "bytes_per_step": cost["bytes"],
            "intensity": cost["flops"] / cost["bytes"],
            "flop_rate_per_core": rate * cost["flops"],
            "bandwidth_per_core": rate * cost["bytes"],
            "fraction_of_flop_rate": rate * cost["flops"] / peaks["flop_rate"]["per_cpu_s"],
            "fraction_of_cache_bandwidth": rate
            * cost["bytes"]
            / peaks["cache_bandwidth"]["per_cpu_s"],
            "fraction_of_dram_bandwidth": rate
            * cost["bytes"]
            / peaks["dram_bandwidth"]["per_cpu_s"],
        }
    roof["lowrank"]["cost_source"] = "counted from the algorithm (lowrank_step_cost)"
    roof["autodiff"]["cost_source"] = "XLA cost_analysis of one compiled step"
    progress(
        f"[bench] roofline per core: cache {peaks['cache_bandwidth']['per_cpu_s'] / 1e9:.3g} GB/s, "
        f"DRAM {peaks['dram_bandwidth']['per_cpu_s'] / 1e9:.3g} GB/s, "
        f"{peaks['flop_rate']['per_cpu_s'] / 1e9:.3g} GFLOP/s; low-rank sweep at "
        f"{roof['lowrank']['fraction_of_cache_bandwidth']:.2f} of the cache bandwidth, "
        f"{roof['lowrank']['fraction_of_flop_rate']:.2f} of the flop rate"
    )
    return roof


def roofline_panel(ax, roof: dict) -> None:
    """The sweep's roofline: this machine's measured roofs and the two sweeps' positions."""
    import numpy as np

    peaks = roof["peaks"]
    intensity = np.logspace(-2, 2, 50)
    flops = peaks["flop_rate"]["per_cpu_s"]
    for key, style in (("cache_bandwidth", "-"), ("dram_bandwidth", "--")):
        bw = peaks[key]["per_cpu_s"]
        label = f"{key.split('_')[0]} {bw / 1e9:.3g} GB/s"
        ax.plot(intensity, np.minimum(flops, bw * intensity), "k" + style, lw=1, label=label)
    for key, color in (("lowrank", "C0"), ("autodiff", "C1")):
        ax.plot(
            roof[key]["intensity"], roof[key]["flop_rate_per_core"], "o", color=color, label=key
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="flop / byte",
        ylabel="flop / s per core (CPU time)",
        title="sweep roofline (one core)",
    )
    ax.legend(fontsize=7)
