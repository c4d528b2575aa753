r"""t = 0 predictions, per-run flows and the swept grid of the displacement phase diagram.

Instances: :mod:`experiments._phase_instances`.

**t = 0 prediction.** With the loss's coefficients :math:`a^\pm`
(:func:`theory.losses.loss_coefficients`; :math:`a^+ = a^- = -\ell'` for DPO, IPO, SLiC,
:math:`a^+ - a^- = \lambda_{\mathrm{SFT}}` for the SFT term, Prop. 1),
:math:`-\nabla L = a^-(\nabla\ln\pi^+ - \nabla\ln\pi^-) + (a^+ - a^-)\nabla\ln\pi^+`. The first
part is the kernel form of Theorems 4-5 (:func:`theory.kernel.kernel_logprob_velocity`, which is
:func:`theory.single_token.logprob_velocity` at :math:`K = I`); the second uses that the score has
zero mean, :math:`\nabla\ln\pi(y^+) = \sum_{j\ne y^+}\pi_j(\nabla\ln\pi(y^+) - \nabla\ln\pi(j))`,
so it is a :math:`\pi`-weighted sum of the same kernel form over the pairs :math:`(y^+, j)`
(:func:`predicted_velocities`; tested against autodiff and, at :math:`K = I`, against
:func:`theory.regularized.preferred_logprob_velocity`).

**Flows.** Time is measured in units of the initial margin rate :math:`1/(a^-(0)\,G_0)`,
:math:`G_0 = \|\nabla\ln\pi^+ - \nabla\ln\pi^-\|_K^2` (for a margin loss :math:`\dot u(0) =
a^-(0)G_0`, so a horizon ``H`` is the margin gain the initial rate would give, whatever the loss,
``beta`` or geometry, and one Euler step is equally accurate at t = 0 in every cell): SGD runs
take ``num_steps`` Euler steps of :math:`dt = H/(\mathrm{num\_steps}\,a^-(0)G_0)`. RMSprop
(torch parity) is invariant to the gradient's scale, so it takes ``num_steps`` steps of a fixed
``rmsprop_lr``. Paths: the exact reduced flow (:func:`sims.flows.reduced.reduced_flow_fn`) for
margin losses with SGD and :math:`\lambda = 0`; :func:`sims.flows.core.flow_fn` on
``(W, theta)`` otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments._phase_instances import Geometry, cell_inputs, instance, make_geometry
from experiments.framework import progress
from sims.flows.core import flow_fn
from sims.flows.reduced import pair_index, reduced_flow_fn
from sims.flows.sweep import run_mesh, sharded_runner, sweep
from sims.models.unconstrained import PreferencePairs
from theory.kernel import kernel_logprob_velocity
from theory.losses import (
    dpo_loss,
    ipo_loss,
    loss_coefficients,
    mean_pair_loss,
    sft_term_loss,
    slic_loss,
)

#: Losses of the diagram, by ``loss_id``; the first three are margin losses (reduced path).
LOSS_NAMES = ("dpo", "ipo", "slic", "dpo_sft")
MARGIN_LOSSES = LOSS_NAMES[:3]
PATHS = ("reduced", "generic_sgd", "generic_rmsprop")
#: Axes of the grid, in the (row-major) order of its flat run index.
AXES = ("rho", "omega", "kappa", "prob_pos", "beta", "loss", "optimizer", "lam")
OPTIMIZERS = ("sgd", "rmsprop_torch")
OUTCOMES = ("none", "transient", "lasting")  # see outcome_codes
#: Inputs of :func:`prediction` (one scalar each per cell).
PREDICTION_INPUTS = ("rho", "omega", "kappa", "phi", "cos", "lam", "beta", "loss_id")


def pair_loss(loss_id, lp_c, lp_r, ref_c, ref_r, *, beta, sft_coef):
    """Per-pair loss ``LOSS_NAMES[loss_id]`` from :mod:`theory.losses` (traced ``loss_id`` ok).

    ``beta`` is DPO's ``beta``, IPO's ``tau`` and sets SLiC's ``delta = 1 / (2 beta)`` (the target
    margin of IPO); ``dpo_sft`` adds ``-sft_coef * lp_c`` to DPO (Eq. 4).
    """
    dpo = partial(dpo_loss, beta=beta)
    branches = (
        lambda: dpo(lp_c, lp_r, ref_c, ref_r),
        lambda: ipo_loss(lp_c, lp_r, ref_c, ref_r, tau=beta),
        lambda: slic_loss(lp_c, lp_r, ref_c, ref_r, delta=0.5 / beta),
        lambda: sft_term_loss(lp_c, lp_r, ref_c, ref_r, base_loss=dpo, sft_coef=sft_coef),
    )
    return jax.lax.switch(loss_id, branches)


def predicted_velocities(
    W: jax.Array, h: jax.Array, K: jax.Array, coef_chosen, coef_rejected
) -> jax.Array:
    r"""Return ``[V]`` :math:`\frac{d}{dt}\ln\pi(z|x)` at the current state (the t = 0 prediction).

    .. math:: \frac{d}{dt}\ln\pi(z) = a^-\,v_z(y^+, y^-) + (a^+ - a^-)\sum_{j\ne y^+}\pi_j\,
              v_z(y^+, j)

    with :math:`v_z(y^+, j)` :func:`theory.kernel.kernel_logprob_velocity` at :math:`\ell' = -1`
    (:math:`\langle\nabla\ln\pi(z), \nabla\ln\pi(y^+) - \nabla\ln\pi(j)\rangle_K`). ``y+`` is id
    0 and ``y-`` id 1; ``W`` trains at rate 1.

    Source: kernel form of Razin et al. 2024, Theorems 4-5 (:mod:`theory.kernel`); the second term
    is Proposition 1's :math:`\lambda\|\nabla\ln\pi(y^+)\|^2` generalised to every ``z`` through
    :math:`\mathbb E_\pi[\nabla\ln\pi] = 0` (module docstring).
    """
    V = W.shape[0]
    pi = jax.nn.softmax(W @ h)
    margin = kernel_logprob_velocity(W, h, K, 0, 1, -1.0)
    pairs = jax.vmap(lambda j: kernel_logprob_velocity(W, h, K, 0, j, -1.0))(jnp.arange(1, V))
    return coef_rejected * margin + (coef_chosen - coef_rejected) * (pi[1:] @ pairs)


class _FlowData(NamedTuple):
    hidden0: jax.Array  # [d]
    basis: jax.Array  # [d, d]
    ref: jax.Array  # [2] ln pi(y+), ln pi(y-) at t = 0
    loss_id: jax.Array
    beta: jax.Array
    sft_coef: jax.Array


def _generic_logprobs(params, data: _FlowData) -> jax.Array:
    return jax.nn.log_softmax(params["unembedding"] @ (data.hidden0 + data.basis @ params["theta"]))


def _generic_loss(params, data: _FlowData) -> jax.Array:
    lp = _generic_logprobs(params, data)
    loss = partial(pair_loss, data.loss_id, beta=data.beta, sft_coef=data.sft_coef)
    return mean_pair_loss(loss, lp[:1], lp[1:2], data.ref[:1], data.ref[1:])


_PAIR = pair_index(PreferencePairs(np.array([0]), np.array([0]), np.array([1]), None, None))


def summarise(logprobs: jax.Array, geometry: Geometry) -> dict[str, jax.Array]:
    r"""Return the per-run numbers of a recorded flow ``logprobs`` ``[C + 1, V]`` (checkpoints).

    ``max_drop``: largest fall of :math:`\ln\pi(y^+)` below its running maximum, at checkpoint
    ``drop_checkpoint``; ``final_change`` / ``min_change`` / ``early_change``: :math:`\ln\pi(y^+)`
    at the end / its minimum / at the first checkpoint, minus its start; opposite-set mass at the
    start, end and its peak; the top gainers of probability (end vs start, and at the deepest
    drop vs start); the margin :math:`\ln\pi(y^+) - \ln\pi(y^-)` at the start and end.
    """
    lp = logprobs[:, 0]
    gap = jax.lax.cummax(lp) - lp
    drop = jnp.argmax(gap)
    probs = jnp.exp(logprobs)
    opposite = jnp.sum(probs[:, geometry.opposite_ids], axis=-1)
    return {
        "max_drop": gap[drop],
        "drop_checkpoint": drop.astype(jnp.int32),
        "final_change": lp[-1] - lp[0],
        "min_change": jnp.min(lp) - lp[0],
        "early_change": lp[1] - lp[0],
        "opposite_mass_start": opposite[0],
        "opposite_mass_end": opposite[-1],
        "opposite_mass_peak": jnp.max(opposite),
        "top_gainer_end": jnp.argmax(probs[-1] - probs[0]).astype(jnp.int32),
        "top_gainer_drop": jnp.argmax(probs[drop] - probs[0]).astype(jnp.int32),
        "margin_start": logprobs[0, 0] - logprobs[0, 1],
        "margin_end": logprobs[-1, 0] - logprobs[-1, 1],
    }


def prediction(geometry: Geometry, x: dict, *, sft_ratio: float) -> dict[str, jax.Array]:
    r"""Return a cell's t = 0 numbers (jit- and vmap-safe in ``x``).

    ``unit``: :math:`a^-(0)\,G_0`, the initial rate of the margin for a margin loss, with
    :math:`G_0 = \|\nabla\ln\pi^+ - \nabla\ln\pi^-\|_K^2` (the kernel form's entries ``y+`` minus
    ``y-`` at :math:`\ell' = -1`); :math:`G_0` alone where :math:`a^-(0) = 0` (SLiC with its margin
    already past ``delta``: nothing moves). ``velocity``: :math:`\frac{d}{dt}\ln\pi(y^+)` of
    :func:`predicted_velocities` divided by ``unit`` (for a margin loss, the ratio
    :math:`d\ln\pi(y^+)/du` at t = 0). ``top_gainer``: the token with the largest
    :math:`\pi_z\frac{d}{dt}\ln\pi_z` (Theorem 5's ranking weighted by probability).
    ``relative``: :math:`\max_{z\ne y^+}\frac{d}{dt}(\ln\pi_z - \ln\pi(y^+))` / ``unit``: some
    token outpaces ``y+`` at t = 0 when it is > 0 (for a margin loss and :math:`z \notin
    \{y^\pm\}`: :math:`(W_z - W_{y^+})^\top K(W_{y^+} - W_{y^-}) > \|h\|^2`, the corollary of
    :mod:`theory.kernel`). ``x`` as in :func:`make_run_fn`.
    """
    inst = instance(geometry, x["rho"], x["omega"], x["kappa"], x["phi"], x["cos"], x["lam"])
    W, h = inst.unembedding, inst.hidden
    lp0 = jax.nn.log_softmax(W @ h)
    loss = partial(pair_loss, x["loss_id"], beta=x["beta"], sft_coef=sft_ratio * x["beta"] / 2.0)
    coef = loss_coefficients(loss, lp0[0], lp0[1], lp0[0], lp0[1])
    K = inst.basis @ inst.basis.T
    pair = kernel_logprob_velocity(W, h, K, 0, 1, -1.0)
    rate = pair[0] - pair[1]  # G_0
    unit = jnp.where(coef.coef_rejected > 0, coef.coef_rejected, 1.0) * rate
    v = predicted_velocities(W, h, K, *coef) / unit
    return {
        "velocity": v[0],
        "relative": jnp.max(v[1:] - v[0]),
        "top_gainer": jnp.argmax(jnp.exp(lp0) * v).astype(jnp.int32),
        "unit": unit,
    }


def make_predictor(
    geometry: Geometry, *, sft_ratio: float, block: int = 1024
) -> Callable[[dict], dict[str, np.ndarray]]:
    """Return ``x -> prediction`` for ``[R]`` run arrays ``x`` (:data:`PREDICTION_INPUTS`).

    Runs :func:`prediction` ``block`` cells at a time, padding the last block, so one compile
    serves every call of the returned function.
    """
    fn = jax.jit(jax.vmap(partial(prediction, geometry, sft_ratio=sft_ratio)))

    def predict(x: dict) -> dict[str, np.ndarray]:
        R = len(x["rho"])
        out = []
        for lo in range(0, R, block):
            part = {k: np.asarray(x[k])[lo : lo + block] for k in PREDICTION_INPUTS}
            n = len(part["rho"])
            part = {
                k: np.concatenate([v, np.repeat(v[-1:], block - n, 0)]) for k, v in part.items()
            }
            out.append({k: np.asarray(v)[:n] for k, v in fn(part).items()})
        if not out:
            return {
                "velocity": np.zeros(0),
                "relative": np.zeros(0),
                "top_gainer": np.zeros(0, np.int32),
                "unit": np.zeros(0),
            }
        return {k: np.concatenate([o[k] for o in out]) for k in out[0]}

    return predict


class Schedule(NamedTuple):
    """Steps of every run; the step size is each run's input ``dt`` (see the module docstring)."""

    num_steps: int
    record_every: int
    sft_ratio: float  # lambda_SFT = sft_ratio * beta / 2 (DPO's -l'(u_0))


def make_run_fn(geometry: Geometry, path: str, schedule: Schedule) -> Callable[[dict], dict]:
    """Return the pure per-run function ``x -> dict of scalars`` of one path (:data:`PATHS`).

    ``x`` holds the scalars ``rho, omega, kappa, phi, cos, lam, beta, dt`` (float) and
    ``loss_id`` (int): the cell, and the step (Euler ``dt`` or RMSprop's learning rate). The
    outputs are :func:`summarise`'s plus ``first_nonfinite_step``.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    steps, every = schedule.num_steps, schedule.record_every

    def run_fn(x):
        inst = instance(geometry, x["rho"], x["omega"], x["kappa"], x["phi"], x["cos"], x["lam"])
        lp0 = jax.nn.log_softmax(inst.unembedding @ inst.hidden)
        if path == "reduced":
            loss = partial(pair_loss, x["loss_id"], beta=x["beta"], sft_coef=0.0)
            run = reduced_flow_fn(loss, _PAIR, num_steps=steps, record_every=every)
            res = run(inst.unembedding, inst.hidden[None], lp0[:1], lp0[1:2], x["dt"])
            logprobs = res.observables.logprobs[:, 0]  # [C + 1, V]
        else:
            sft_coef = schedule.sft_ratio * x["beta"] / 2.0
            data = _FlowData(inst.hidden, inst.basis, lp0[:2], x["loss_id"], x["beta"], sft_coef)
            params = {"unembedding": inst.unembedding, "theta": jnp.zeros_like(inst.hidden)}
            run = flow_fn(
                _generic_loss,
                _generic_logprobs,
                optimizer="sgd" if path == "generic_sgd" else "rmsprop_torch",
                num_steps=steps,
                record_every=every,
            )
            res = run(params, data, x["dt"])
            logprobs = res.observables
        return {**summarise(logprobs, geometry), "first_nonfinite_step": res.first_nonfinite_step}

    return run_fn


def outcome_codes(outputs: dict, tol: float) -> np.ndarray:
    """0 none, 1 transient, 2 lasting (max drop and final change vs ``tol``); -1 where NaN."""
    drop, final = outputs["max_drop"], outputs["final_change"]
    codes = np.where(drop > tol, np.where(final < -tol, 2, 1), 0)
    return np.where(np.isfinite(drop) & np.isfinite(final), codes, -1)


def geometry_of(config) -> Geometry:
    """The :class:`~experiments._phase_instances.Geometry` of an experiment config."""
    return make_geometry(
        seed=config.seed,
        hidden_size=config.hidden_size,
        num_opposite=config.num_opposite,
        num_synonym=config.num_synonym,
        num_filler=config.num_filler,
        unembedding_norm=config.unembedding_norm,
        opposite_scale=config.opposite_scale,
        synonym_scale=config.synonym_scale,
        filler_scale=config.filler_scale,
        rotate=config.rotate,
    )


def axes_of(config) -> dict[str, np.ndarray]:
    """The grid axes in :data:`AXES` order (``loss`` and ``optimizer`` as indices)."""
    values = (config.rhos, config.omegas, config.kappas, config.probs, config.betas)
    out = {a: np.asarray(v, np.float64) for a, v in zip(AXES[:5], values, strict=True)}
    out["loss"] = np.array([LOSS_NAMES.index(n) for n in config.losses], np.int32)
    out["optimizer"] = np.array([OPTIMIZERS.index(n) for n in config.optimizers], np.int32)
    out["lam"] = np.asarray(config.lambdas, np.float64)
    return out


def cells(config, geometry: Geometry, predict, axes: dict) -> dict[str, np.ndarray]:
    """Every grid cell as flat ``[R]`` run inputs (row-major over :data:`AXES`), with ``feasible``,
    the t = 0 prediction, the ``path`` (index into :data:`PATHS`) and the step ``dt``."""
    solved = cell_inputs(
        axes["rho"], axes["omega"], axes["kappa"], axes["prob_pos"], geometry=geometry
    )
    shape = tuple(len(axes[a]) for a in AXES)
    index = np.indices(shape).reshape(len(AXES), -1)
    x = {a: axes[a][i] for a, i in zip(AXES, index, strict=True)}
    geo = tuple(index[:4])
    x["phi"], x["cos"] = solved["phi"][geo], solved["cos"][geo]
    feasible = solved["feasible"][geo]
    x["loss_id"] = x.pop("loss")
    inputs = {k: x[k][feasible] for k in ("rho", "omega", "kappa", "phi", "cos", "lam", "beta")}
    inputs["loss_id"] = x["loss_id"][feasible]
    pred = predict(inputs)
    sgd = x["optimizer"][feasible] == OPTIMIZERS.index("sgd")
    margin = np.isin(inputs["loss_id"], [LOSS_NAMES.index(n) for n in MARGIN_LOSSES])
    path = np.where(sgd, np.where(margin & (inputs["lam"] == 0.0), 0, 1), 2)
    dt = np.where(sgd, config.horizon / config.num_steps / pred["unit"], config.rmsprop_lr)
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
    return full


RUN_INPUTS = ("rho", "omega", "kappa", "phi", "cos", "lam", "beta", "loss_id", "dt")


def run_sweeps(config, geometry, grid: dict, sweep_dir=None) -> dict[str, np.ndarray]:
    """Run every feasible cell through :func:`sims.flows.sweep.sweep`, one sweep per path; return
    the
    outputs scattered back onto the grid (NaN / -1 elsewhere) and ``status`` per cell."""
    schedule = Schedule(config.num_steps, config.record_every, config.sft_ratio)
    status = np.where(grid["feasible"], "", "infeasible").astype(object)
    outputs: dict[str, np.ndarray] = {}
    for p, path in enumerate(PATHS):
        runs = np.flatnonzero(grid["path"] == p)
        if runs.size == 0:
            continue
        start, done = time.perf_counter(), [0]

        def report(k, n, computed, path=path, runs=runs, start=start, done=done):
            done[0] = min((k + 1) * config.chunk_size, runs.size)
            progress(
                f"  [{path}] chunk {k + 1}/{n} {'computed' if computed else 'loaded'}: "
                f"{done[0]}/{runs.size} runs, {time.perf_counter() - start:.1f} s"
            )

        res = sweep(
            make_run_fn(geometry, path, schedule),
            {k: grid[k][runs] for k in RUN_INPUTS},
            name=f"displacement_phase_diagram/{path}",
            out_dir=None if sweep_dir is None else Path(sweep_dir) / path,
            chunk_size=config.chunk_size,
            batch_size=config.batch_size or None,
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


def controls(config, geometry, grid: dict, outputs: dict) -> dict:
    """Rerun ``control_runs`` random SGD cells (through the generic path) with the step divided by
    ``control_factor`` (same checkpoint times) and with the horizon multiplied by it."""
    ok = np.flatnonzero((outputs["status"] == "ok") & (grid["path"] < 2))
    if config.control_runs == 0 or ok.size == 0:
        return {}
    rng = np.random.default_rng(config.seed)
    pick = np.sort(rng.choice(ok, min(config.control_runs, ok.size), replace=False))
    f = config.control_factor
    schedule = Schedule(config.num_steps * f, config.record_every * f, config.sft_ratio)
    x = {k: grid[k][pick] for k in RUN_INPUTS}
    both = {k: np.concatenate([v, v]) for k, v in x.items()}
    both["dt"] = np.concatenate([x["dt"] / f, x["dt"]])  # finer steps; longer horizon
    runner = sharded_runner(
        make_run_fn(geometry, "generic_sgd", schedule), mesh=run_mesh(), batch_size=None
    )
    out = runner(both)
    n = pick.size
    main_outcome = outcome_codes(outputs, config.displacement_tol)[pick]
    result = {"runs": pick}
    for label, sl in (("finer_step", slice(0, n)), ("longer_horizon", slice(n, 2 * n))):
        part = {k: v[sl] for k, v in out.items()}
        codes = outcome_codes(part, config.displacement_tol)
        result[label] = {
            "max_abs_diff_max_drop": float(
                np.max(np.abs(part["max_drop"] - outputs["max_drop"][pick]))
            ),
            "outcome_changed": int(np.sum(codes != main_outcome)),
            "transitions": {
                f"{OUTCOMES[a]}->{OUTCOMES[b]}": int(np.sum((main_outcome == a) & (codes == b)))
                for a in range(3)
                for b in range(3)
                if a != b
            },
            "nonfinite": int(np.sum(~np.isfinite(part["max_drop"]))),
        }
    return result
