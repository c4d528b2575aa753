r"""The displacement phase diagram as a library protocol: a grid of cells, swept, then reported.

Does the t = 0 sign of :math:`\frac{d}{dt}\ln\pi(y^+)` (Razin et al. 2024, Theorem 4) say
whether ``y+`` is displaced during a whole run? Each cell is one prompt and one single-token
pair built explicitly (:mod:`sims.protocols.phase_instances`), with a loss, an optimiser and a
kernel gain; its prediction and its flow are :mod:`sims.protocols.phase_flows`. This module:

* :func:`phase_axes`, :func:`phase_cells` -- a grid's axes and its flat run inputs (feasibility,
  prediction, path and step per cell);
* :func:`run_phase_sweeps` -- every feasible cell through :func:`sims.flows.sweep.sweep`, one
  sweep per path (sharded over every device, chunked, resumable);
* :func:`sweep_phase_grids` -- cells, sweeps and round-off reruns of several grids at once;
* :func:`run_phase_diagram` -- all of it for one grid, with the report of
  :func:`sims.protocols.phase_report.phase_diagram_report`, the thresholds and round-off tables
  and, with an extra slice, the paper's regime (:mod:`sims.protocols.phase_sensitivity`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sims.flows.sweep import sweep
from sims.protocols.phase_flows import (
    PHASE_AXES,
    PHASE_LOSSES,
    PHASE_MARGIN_LOSSES,
    PHASE_OPTIMIZERS,
    PHASE_PATHS,
    RUN_INPUTS,
    PhaseSchedule,
    grid_cells,
    phase_predictor,
    phase_run_fn,
)
from sims.protocols.phase_instances import PhaseGeometry, make_phase_geometry
from sims.protocols.phase_report import PHASE_CRITERIA, phase_diagram_report, prediction_codes
from sims.protocols.phase_sensitivity import (
    phase_controls,
    regime_report,
    roundoff_summary,
    threshold_table,
)

__all__ = [  # this module's names and, for a caller's one import, the run's vocabulary
    "PHASE_CRITERIA",
    "PHASE_LOSSES",
    "PHASE_OPTIMIZERS",
    "PhaseDiagram",
    "PhaseGrid",
    "PhaseSettings",
    "make_phase_geometry",
    "phase_axes",
    "phase_cells",
    "run_phase_diagram",
    "run_phase_sweeps",
    "sweep_phase_grids",
]


class PhaseSettings(NamedTuple):
    r"""The knobs of a phase-diagram run besides geometry and axes (:func:`run_phase_diagram`).

    Attributes:
      seed: seed of the control runs' pick.
      sft_ratio: SFT weight :math:`\lambda_{\mathrm{SFT}} = ` ``sft_ratio * beta / 2``.
      horizon: SGD flow time in units of :math:`1/(a^-(0)G_0)`.
      num_steps: steps of every run.
      record_every: steps between checkpoints (divides ``num_steps``).
      rmsprop_lr: RMSprop's learning rate.
      displacement_tol: drop of :math:`\ln\pi(y^+)` (nats) that counts as displacement.
      velocity_tol: :math:`|v|` below which the prediction is flat.
      chunk_size: runs per saved sweep chunk.
      batch_size: runs vmapped together on a device (0: all of a chunk's).
      control_runs: random SGD cells of each control (0: none).
      control_factor: step divided / horizon multiplied by it in the controls.
      boundary_points: fine-grid points per axis of the heatmaps' boundary contours.
      report_tols: thresholds (nats) of the thresholds tables.
      roundoff: relative size of the perturbation of the round-off reruns (0: no reruns).
    """

    seed: int
    sft_ratio: float
    horizon: float
    num_steps: int
    record_every: int
    rmsprop_lr: float
    displacement_tol: float
    velocity_tol: float
    chunk_size: int
    batch_size: int
    control_runs: int
    control_factor: int
    boundary_points: int
    report_tols: tuple[float, ...]
    roundoff: float


def phase_axes(
    *,
    rhos: Sequence[float],
    omegas: Sequence[float],
    kappas: Sequence[float],
    probs: Sequence[float],
    betas: Sequence[float],
    losses: Sequence[str],
    optimizers: Sequence[str],
    lambdas: Sequence[float],
) -> dict[str, np.ndarray]:
    """Return a grid's axes in :data:`~sims.protocols.phase_flows.PHASE_AXES` order.

    Returns:
      One 1-D array per axis: float64 values, ``loss`` and ``optimizer`` as int32 indices into
      :data:`~sims.protocols.phase_flows.PHASE_LOSSES` and ``PHASE_OPTIMIZERS``.

    Raises:
      ValueError: an unknown loss or optimiser name.

    Example:
      >>> a = phase_axes(rhos=[0.5], omegas=[1.0], kappas=[0.25], probs=[0.5], betas=[0.1],
      ...     losses=["ipo"], optimizers=["sgd"], lambdas=[0.0])
      >>> a["loss"].tolist(), a["optimizer"].tolist(), list(a) == list(PHASE_AXES)
      ([1], [0], True)
    """
    for name, given, known in (
        ("losses", losses, PHASE_LOSSES),
        ("optimizers", optimizers, PHASE_OPTIMIZERS),
    ):
        if unknown := [n for n in given if n not in known]:
            raise ValueError(f"{name} must be among {known}, got {unknown}")
    values = (rhos, omegas, kappas, probs, betas)
    out = {a: np.asarray(v, np.float64) for a, v in zip(PHASE_AXES[:5], values, strict=True)}
    out["loss"] = np.array([PHASE_LOSSES.index(n) for n in losses], np.int32)
    out["optimizer"] = np.array([PHASE_OPTIMIZERS.index(n) for n in optimizers], np.int32)
    out["lam"] = np.asarray(lambdas, np.float64)
    return out


def phase_cells(
    geometry: PhaseGeometry,
    predict: Callable[[dict], dict[str, np.ndarray]],
    axes: dict[str, np.ndarray],
    *,
    horizon: float,
    num_steps: int,
    rmsprop_lr: float,
) -> dict[str, np.ndarray]:
    """Return every cell of the grid ``axes`` as flat ``[R]`` run inputs (row-major over the axes).

    Args:
      geometry: the :class:`~sims.protocols.phase_instances.PhaseGeometry`.
      predict: :func:`~sims.protocols.phase_flows.phase_predictor`'s function.
      axes: :func:`phase_axes`.
      horizon: SGD flow time in units of :math:`1/(a^-(0)G_0)`.
      num_steps: steps of every run.
      rmsprop_lr: RMSprop's learning rate (its ``dt``).

    Returns:
      ``feasible``, ``optimizer``, ``prob_pos`` on every cell; the
      :data:`~sims.protocols.phase_flows.RUN_INPUTS`, the prediction (``pred_velocity``,
      ``pred_relative``, ``pred_top_gainer``) and the ``path`` (index into ``PHASE_PATHS``) on
      feasible cells, NaN / -1 elsewhere. SGD's ``dt = horizon / num_steps / unit``. ``roundoff``
      0 and ``run_index`` the flat cell index everywhere.
    """
    x, feasible, _ = grid_cells(geometry, axes)
    inputs = {k: x[k][feasible] for k in ("rho", "omega", "kappa", "phi", "cos", "lam", "beta")}
    inputs["loss_id"] = x["loss_id"][feasible]
    pred = predict(inputs)
    sgd = x["optimizer"][feasible] == PHASE_OPTIMIZERS.index("sgd")
    margin = np.isin(inputs["loss_id"], [PHASE_LOSSES.index(n) for n in PHASE_MARGIN_LOSSES])
    path = np.where(sgd, np.where(margin & (inputs["lam"] == 0.0), 0, 1), 2)
    dt = np.where(sgd, horizon / num_steps / pred["unit"], rmsprop_lr)
    full = {"feasible": feasible, "optimizer": x["optimizer"], "prob_pos": x["prob_pos"]}
    for key, value, fill in (
        *((k, v, np.nan) for k, v in inputs.items() if k != "loss_id"),
        ("loss_id", inputs["loss_id"], -1),
        ("pred_velocity", pred["velocity"], np.nan),
        ("pred_relative", pred["relative"], np.nan),
        ("pred_top_gainer", pred["top_gainer"], -1),
        ("path", path, -1),
        ("dt", dt, np.nan),
    ):
        full[key] = np.full(feasible.shape, fill, np.asarray(value).dtype)
        full[key][feasible] = value
    full["roundoff"] = np.zeros(feasible.shape)  # unperturbed starts
    full["run_index"] = np.arange(feasible.size, dtype=np.int32)
    return full


def run_phase_sweeps(
    geometry: PhaseGeometry,
    grid: dict[str, np.ndarray],
    *,
    schedule: PhaseSchedule,
    chunk_size: int,
    batch_size: int | None = None,
    sweep_dir: str | Path | None = None,
    name: str = "phase_diagram",
    log: Callable[[str], None] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Run every feasible cell of ``grid`` (:func:`phase_cells`) through
    :func:`sims.flows.sweep.sweep`, one sweep per path.

    Args:
      geometry: the :class:`~sims.protocols.phase_instances.PhaseGeometry`.
      grid: :func:`phase_cells`.
      schedule: steps, checkpoints and SFT ratio of every run.
      chunk_size: runs per chunk.
      batch_size: runs vmapped together on a device (``None``: all of a chunk's).
      sweep_dir: folder of the sweeps (one subfolder per path; resumable), or ``None``: memory.
      name: names the sweeps (``<name>/<path>``; part of each folder's fingerprint).
      log: called with a progress line after each chunk.
      seed: seed of the perturbations of runs with ``roundoff > 0``
        (:func:`~sims.protocols.phase_flows.phase_run_fn`).

    Returns:
      The per-run outputs of :func:`~sims.protocols.phase_flows.phase_run_fn` scattered back onto
      the grid (NaN / -1 elsewhere), and ``status`` per cell (``ok``, ``nonfinite``,
      ``infeasible``).
    """
    status = np.where(grid["feasible"], "", "infeasible").astype(object)
    outputs: dict[str, np.ndarray] = {}
    for p, path in enumerate(PHASE_PATHS):
        runs = np.flatnonzero(grid["path"] == p)
        if runs.size == 0:
            continue
        start = time.perf_counter()

        def report(k, n, computed, path=path, runs=runs, start=start):
            if log is not None:
                log(
                    f"  [{path}] chunk {k + 1}/{n} {'computed' if computed else 'loaded'}: "
                    f"{min((k + 1) * chunk_size, runs.size)}/{runs.size} runs, "
                    f"{time.perf_counter() - start:.1f} s"
                )

        res = sweep(
            phase_run_fn(geometry, path, schedule, seed=seed),
            {k: grid[k][runs] for k in RUN_INPUTS},
            name=f"{name}/{path}",
            out_dir=None if sweep_dir is None else Path(sweep_dir) / path,
            chunk_size=chunk_size,
            batch_size=batch_size,
            on_chunk=report,
        )
        for key, value in res.outputs.items():
            if key not in outputs:
                fill = np.nan if np.issubdtype(value.dtype, np.floating) else -1
                outputs[key] = np.full(status.shape, fill, value.dtype)
            outputs[key][runs] = value
        status[runs] = res.status
    outputs["status"] = status.astype(str)
    return outputs


class PhaseGrid(NamedTuple):
    """A swept grid: its ``axes``, flat ``grid`` inputs, per-run ``outputs`` and the round-off
    reruns' ``perturbed`` outputs (``None`` without reruns)."""

    axes: dict[str, np.ndarray]
    grid: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    perturbed: dict[str, np.ndarray] | None


def sweep_phase_grids(
    geometry: PhaseGeometry,
    axes: Mapping[str, dict[str, np.ndarray]],
    settings: PhaseSettings,
    predict: Callable[[dict], dict[str, np.ndarray]],
    *,
    sweep_dir: str | Path | None = None,
    name: str = "phase_diagram",
    log: Callable[[str], None] | None = None,
) -> dict[str, PhaseGrid]:
    """Build the cells of each grid of ``axes`` and sweep them all together, with round-off reruns.

    The grids' cells are stacked (in ``axes`` order) and, when ``settings.roundoff > 0``, stacked
    again with ``roundoff = settings.roundoff`` (``run_index``: the run's index in the first
    stack, so every rerun has its own perturbation); :func:`run_phase_sweeps` then runs one
    sweep per path over all of them, one compiled program per path.

    Args:
      geometry: the :class:`~sims.protocols.phase_instances.PhaseGeometry`.
      axes: source name -> :func:`phase_axes`.
      settings: :class:`PhaseSettings`.
      predict: :func:`~sims.protocols.phase_flows.phase_predictor`'s function.
      sweep_dir, name, log: as :func:`run_phase_sweeps`.

    Returns:
      Source name -> :class:`PhaseGrid`.
    """
    s = settings
    grids = {}
    for source, ax in axes.items():
        grids[source] = phase_cells(
            geometry, predict, ax, horizon=s.horizon, num_steps=s.num_steps, rmsprop_lr=s.rmsprop_lr
        )
        if log is not None:
            g = grids[source]
            log(
                f"  {source}: {g['feasible'].size} cells, {int(g['feasible'].sum())} feasible; "
                + ", ".join(
                    f"{p}: {int(np.sum(g['path'] == i))}" for i, p in enumerate(PHASE_PATHS)
                )
            )
    keys = ("feasible", "path", *RUN_INPUTS)
    stack = {k: np.concatenate([g[k] for g in grids.values()]) for k in keys}
    n = stack["path"].size
    stack["run_index"] = np.arange(n, dtype=np.int32)
    if s.roundoff:
        stack = {k: np.concatenate([v, v]) for k, v in stack.items()}
        stack["roundoff"][n:] = s.roundoff
        if log is not None:
            log(f"  every run again from a start perturbed by {s.roundoff:.3g} (relative)")
    outputs = run_phase_sweeps(
        geometry,
        stack,
        schedule=PhaseSchedule(s.num_steps, s.record_every, s.sft_ratio),
        chunk_size=s.chunk_size,
        batch_size=s.batch_size or None,
        sweep_dir=sweep_dir,
        name=name,
        log=log,
        seed=s.seed,
    )
    out, at = {}, 0
    for source, g in grids.items():
        size = g["path"].size

        def part(lo, size=size):
            return {k: v[lo : lo + size] for k, v in outputs.items()}

        perturbed = part(n + at) if s.roundoff else None
        out[source] = PhaseGrid(axes[source], g, part(at), perturbed)
        at += size
    return out


class PhaseDiagram(NamedTuple):
    """A reported phase diagram: its JSON-ready ``report`` and the swept ``main`` grid and extra
    ``slice`` (``None`` without one)."""

    report: dict
    main: PhaseGrid
    slice: PhaseGrid | None


def run_phase_diagram(
    geometry: PhaseGeometry,
    axes: dict[str, np.ndarray],
    settings: PhaseSettings,
    *,
    slice_axes: dict[str, np.ndarray] | None = None,
    sweep_dir: str | Path | None = None,
    name: str = "phase_diagram",
    log: Callable[[str], None] | None = None,
) -> PhaseDiagram:
    """Sweep the grid ``axes`` (and an extra ``slice_axes``), report it and run the controls.

    Args:
      geometry: the :class:`~sims.protocols.phase_instances.PhaseGeometry`.
      axes: :func:`phase_axes` of the main grid.
      settings: :class:`PhaseSettings`.
      slice_axes: :func:`phase_axes` of an extra slice, pooled with the main grid in the paper's
        regime only (swept with it, :func:`sweep_phase_grids`), or ``None``.
      sweep_dir: folder of the sweeps (resumable), or ``None``: in memory.
      name: names the sweeps (:func:`run_phase_sweeps`).
      log: progress lines.

    Returns:
      :class:`PhaseDiagram`; its ``report`` is
      :func:`~sims.protocols.phase_report.phase_diagram_report` of the main grid with, from
      :mod:`sims.protocols.phase_sensitivity`: ``controls`` (:func:`phase_controls`),
      ``thresholds`` (per criterion, :func:`threshold_table` at ``settings.report_tols``),
      ``roundoff`` (:func:`roundoff_summary`, with reruns) and ``paper_regime``
      (:func:`regime_report` of the main grid and the slice).
    """
    s = settings
    predict = phase_predictor(geometry, sft_ratio=s.sft_ratio)
    sources = {"grid": axes, **({"slice": slice_axes} if slice_axes is not None else {})}
    swept = sweep_phase_grids(
        geometry, sources, s, predict, sweep_dir=sweep_dir, name=name, log=log
    )
    main = swept["grid"]
    report = phase_diagram_report(
        geometry,
        predict,
        axes,
        main.grid,
        main.outputs,
        displacement_tol=s.displacement_tol,
        velocity_tol=s.velocity_tol,
        num_checkpoints=s.num_steps // s.record_every,
        boundary_points=s.boundary_points,
    )
    schedule = PhaseSchedule(s.num_steps, s.record_every, s.sft_ratio)
    report["controls"] = phase_controls(
        geometry,
        main.grid,
        main.outputs,
        schedule=schedule,
        runs=s.control_runs,
        factor=s.control_factor,
        seed=s.seed,
        displacement_tol=s.displacement_tol,
    )
    g, report["thresholds"] = main.grid, {}
    for c in PHASE_CRITERIA:
        pred = prediction_codes(g["pred_velocity"], g["pred_relative"], s.velocity_tol, c)
        pred = np.where(main.outputs["status"] == "ok", pred, -1)
        report["thresholds"][c] = threshold_table(pred, main.outputs, main.perturbed, s.report_tols)
    if main.perturbed is not None:
        report["roundoff"] = roundoff_summary(main.outputs, main.perturbed, roundoff=s.roundoff)
    parts = {source: grid._asdict() for source, grid in swept.items()}
    report["paper_regime"] = regime_report(
        parts, displacement_tol=s.displacement_tol, velocity_tol=s.velocity_tol, tols=s.report_tols
    )
    return PhaseDiagram(report, main, swept.get("slice"))
