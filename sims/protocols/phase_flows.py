r"""The t = 0 prediction and the per-run flow of one cell of the displacement phase diagram.

A cell is one prompt and one single-token pair (:mod:`sims.protocols.phase_instances`), a loss
(:data:`PHASE_LOSSES`), an optimiser (:data:`PHASE_OPTIMIZERS`) and a kernel gain :math:`\lambda`.
The grid of cells and its sweeps are :mod:`sims.protocols.phase_diagram`.

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
learning rate. Paths (:data:`PHASE_PATHS`): the exact reduced flow
(:func:`sims.flows.reduced.reduced_flow_fn`) for margin losses with SGD and :math:`\lambda = 0`;
:func:`sims.flows.core.flow_fn` on ``(W, theta)`` otherwise, with :math:`h(\theta) = h_0 +
B\theta`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from sims.flows.core import flow_fn
from sims.flows.reduced import pair_index, reduced_flow_fn
from sims.models.unconstrained import PreferencePairs
from sims.protocols.phase_instances import PhaseGeometry, cell_inputs, phase_instance
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
PHASE_LOSSES = ("dpo", "ipo", "slic", "dpo_sft")
PHASE_MARGIN_LOSSES = PHASE_LOSSES[:3]
PHASE_OPTIMIZERS = ("sgd", "rmsprop_torch")  # Euler (gradient flow); torch-parity RMSprop
PHASE_PATHS = ("reduced", "generic_sgd", "generic_rmsprop")
#: Axes of a grid, in the (row-major) order of its flat run index.
PHASE_AXES = ("rho", "omega", "kappa", "prob_pos", "beta", "loss", "optimizer", "lam")
#: Outcome codes of :func:`displacement_outcomes`.
PHASE_OUTCOMES = ("none", "transient", "lasting")
#: Inputs of :func:`phase_prediction` (one scalar each per cell).
PREDICTION_INPUTS = ("rho", "omega", "kappa", "phi", "cos", "lam", "beta", "loss_id")
#: Inputs of :func:`phase_run_fn`: the cell, its step ``dt`` (Euler step or learning rate), the
#: relative size ``roundoff`` of a perturbation of the start (0: none) and its key's ``run_index``.
RUN_INPUTS = (*PREDICTION_INPUTS, "dt", "roundoff", "run_index")


def phase_pair_loss(
    loss_id: ArrayLike,
    lp_c: ArrayLike,
    lp_r: ArrayLike,
    ref_c: ArrayLike,
    ref_r: ArrayLike,
    *,
    beta: ArrayLike,
    sft_coef: ArrayLike,
) -> jax.Array:
    """Return the per-pair loss :data:`PHASE_LOSSES` ``[loss_id]`` (a traced ``loss_id`` is ok).

    ``beta`` is DPO's ``beta``, IPO's ``tau`` and sets SLiC's ``delta = 1 / (2 beta)`` (the target
    margin of IPO); ``dpo_sft`` adds ``-sft_coef * lp_c`` to DPO (Eq. 4). All maths is
    :mod:`theory.losses`; this only dispatches (``jax.lax.switch``, so one compile serves every
    loss).

    Returns:
      The loss, shaped as the broadcast log-probs.

    Example:
      >>> round(float(phase_pair_loss(0, 0.0, 0.0, 0.0, 0.0, beta=0.1, sft_coef=0.0)), 6)  # ln 2
      0.693147
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
    W: jax.Array, h: jax.Array, K: jax.Array, coef_chosen: ArrayLike, coef_rejected: ArrayLike
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

    Args:
      W: ``[V, d]`` unembeddings.
      h: ``[d]`` hidden embedding of the prompt.
      K: ``[d, d]`` kernel of the hidden embedding's parametrisation (``I``: free features).
      coef_chosen, coef_rejected: :math:`a^+, a^-` (:func:`theory.losses.loss_coefficients`).

    Returns:
      ``[V]`` log-probability velocities.
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
    loss = partial(phase_pair_loss, data.loss_id, beta=data.beta, sft_coef=data.sft_coef)
    return mean_pair_loss(loss, lp[:1], lp[1:2], data.ref[:1], data.ref[1:])


_PAIR = pair_index(PreferencePairs(np.array([0]), np.array([0]), np.array([1]), None, None))


def phase_run_summary(logprobs: jax.Array, geometry: PhaseGeometry) -> dict[str, jax.Array]:
    r"""Return the per-run numbers of a recorded flow ``logprobs`` ``[C + 1, V]`` (checkpoints).

    Returns:
      Scalars: ``max_drop``, the largest fall of :math:`\ln\pi(y^+)` below its running maximum,
      at checkpoint ``drop_checkpoint``; ``final_change`` / ``min_change`` / ``early_change``:
      :math:`\ln\pi(y^+)` at the end / its minimum / at the first checkpoint, minus its start;
      the opposite-set mass at the start, the end and its peak; the top gainers of probability
      (``top_gainer_end``: end vs start; ``top_gainer_drop``: at the deepest drop vs start); the
      margin :math:`\ln\pi(y^+) - \ln\pi(y^-)` at the start and the end.

    Example:
      >>> from sims.protocols.phase_instances import make_phase_geometry
      >>> g = make_phase_geometry(seed=0, hidden_size=4, num_opposite=1, num_synonym=0,
      ...     num_filler=1, unembedding_norm=1.0, opposite_scale=1.0, synonym_scale=0.5,
      ...     filler_scale=1.0, rotate=False)
      >>> lp = jnp.log(jnp.array([[0.4, 0.2, 0.2, 0.2], [0.5, 0.1, 0.2, 0.2], [0.25, 0.1, 0.45,
      ...     0.2]]))  # y+ rises, then falls below its start: the opposite token gains
      >>> s = phase_run_summary(lp, g)
      >>> round(float(s["max_drop"]), 6), int(s["drop_checkpoint"]), int(s["top_gainer_end"])
      (0.693147, 2, 2)
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


def phase_prediction(
    geometry: PhaseGeometry, x: dict[str, ArrayLike], *, sft_ratio: float
) -> dict[str, jax.Array]:
    r"""Return a cell's t = 0 numbers (jit- and vmap-safe in ``x``).

    Args:
      geometry: the :class:`~sims.protocols.phase_instances.PhaseGeometry`.
      x: the scalars :data:`PREDICTION_INPUTS` of one cell.
      sft_ratio: SFT weight :math:`\lambda_{\mathrm{SFT}} = ` ``sft_ratio * beta / 2``.

    Returns:
      ``unit``: :math:`a^-(0)\,G_0`, the initial rate of the margin for a margin loss, with
      :math:`G_0 = \|\nabla\ln\pi^+ - \nabla\ln\pi^-\|_K^2` (the kernel form's entries ``y+``
      minus ``y-`` at :math:`\ell' = -1`); :math:`G_0` alone where :math:`a^-(0) = 0` (SLiC with
      its margin already past ``delta``: nothing moves). ``velocity``:
      :math:`\frac{d}{dt}\ln\pi(y^+)` of :func:`predicted_velocities` divided by ``unit`` (for a
      margin loss, the ratio :math:`d\ln\pi(y^+)/du` at t = 0). ``top_gainer``: the token with
      the largest :math:`\pi_z\frac{d}{dt}\ln\pi_z` (Theorem 5's ranking weighted by
      probability). ``relative``: :math:`\max_{z\ne y^+}\frac{d}{dt}(\ln\pi_z - \ln\pi(y^+))` /
      ``unit``: some token outpaces ``y+`` at t = 0 when it is > 0 (for a margin loss and
      :math:`z \notin \{y^\pm\}`: :math:`(W_z - W_{y^+})^\top K(W_{y^+} - W_{y^-}) > \|h\|^2`,
      the corollary of :mod:`theory.kernel`).

    Source: Razin et al. 2024, Theorem 4 (the sign of ``velocity``), Theorem 5 (``relative``,
    ``top_gainer``), Proposition 1 (the SFT term); kernel forms from :mod:`theory.kernel`.
    """
    inst = phase_instance(geometry, x["rho"], x["omega"], x["kappa"], x["phi"], x["cos"], x["lam"])
    W, h = inst.unembedding, inst.hidden
    lp0 = jax.nn.log_softmax(W @ h)
    loss = partial(
        phase_pair_loss, x["loss_id"], beta=x["beta"], sft_coef=sft_ratio * x["beta"] / 2.0
    )
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


def phase_predictor(
    geometry: PhaseGeometry, *, sft_ratio: float, block: int = 1024
) -> Callable[[dict], dict[str, np.ndarray]]:
    """Return ``x -> prediction`` for ``[R]`` run arrays ``x`` (:data:`PREDICTION_INPUTS`).

    Runs :func:`phase_prediction` ``block`` cells at a time, padding the last block, so one compile
    serves every call of the returned function. The returned function gives ``[R]`` NumPy arrays
    ``velocity``, ``relative``, ``top_gainer`` and ``unit`` (empty for ``R = 0``).
    """
    fn = jax.jit(jax.vmap(partial(phase_prediction, geometry, sft_ratio=sft_ratio)))

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


class PhaseSchedule(NamedTuple):
    """Steps of every run; the step size is each run's input ``dt`` (see the module docstring)."""

    num_steps: int
    record_every: int
    sft_ratio: float  # lambda_SFT = sft_ratio * beta / 2 (DPO's -l'(u_0))


def roundoff_perturbation(key: jax.Array, x: jax.Array, *, scale: ArrayLike) -> jax.Array:
    r"""Return ``x`` with each entry multiplied by :math:`1 + \epsilon u`, :math:`u \sim U(-1, 1)`.

    A perturbation of the size of round-off: with ``scale`` :math:`\epsilon = 2^{-23}` (float32's
    machine epsilon) each entry moves by at most one float32 spacing, the error of storing ``x``
    in float32 (at most :math:`2^{-24}` relative) being of the same size. Zeros stay zero.

    Args:
      key: typed PRNG key (independent draws per entry).
      x: array to perturb (float).
      scale: :math:`\epsilon \ge 0` (a traced value is fine; 0 returns ``x`` exactly).

    Returns:
      The perturbed array, ``x``'s shape and dtype.

    Example:
      >>> x = jnp.arange(1.0, 4.0)
      >>> y = roundoff_perturbation(jax.random.key(0), x, scale=2.0**-23)
      >>> bool(jnp.all(jnp.abs(y / x - 1) <= 2.0**-23)), bool(jnp.any(y != x))
      (True, True)
    """
    u = jax.random.uniform(key, jnp.shape(x), dtype=jnp.result_type(x), minval=-1.0, maxval=1.0)
    return x * (1.0 + scale * u)


def phase_run_fn(
    geometry: PhaseGeometry, path: str, schedule: PhaseSchedule, *, seed: int = 0
) -> Callable[[dict], dict]:
    r"""Return the pure per-run function ``x -> dict of scalars`` of one path (:data:`PHASE_PATHS`).

    ``x`` holds :data:`RUN_INPUTS`: the scalars ``rho, omega, kappa, phi, cos, lam, beta, dt``
    (float) and ``loss_id`` (int): the cell, and the step (Euler ``dt`` or RMSprop's learning
    rate); ``roundoff`` (float) and ``run_index`` (int): the run starts from :math:`W` and
    :math:`h_0` perturbed by :func:`roundoff_perturbation` with ``scale=roundoff``, keyed by
    ``fold_in(key(seed), run_index)`` (``roundoff = 0``: exactly the unperturbed start, since
    :math:`x(1 + 0 \cdot u) = x`; a value, so reruns share the compiled program). The reference
    model is the model at t = 0 (perturbed with it); ``dt`` is not changed. jit-, vmap- and
    sweep-safe.

    Returns:
      ``run_fn``; its outputs are :func:`phase_run_summary`'s plus ``first_nonfinite_step``.

    Raises:
      ValueError: an unknown ``path``.
    """
    if path not in PHASE_PATHS:
        raise ValueError(f"path must be one of {PHASE_PATHS}, got {path!r}")
    steps, every = schedule.num_steps, schedule.record_every

    def run_fn(x):
        inst = phase_instance(
            geometry, x["rho"], x["omega"], x["kappa"], x["phi"], x["cos"], x["lam"]
        )
        key_w, key_h = jax.random.split(jax.random.fold_in(jax.random.key(seed), x["run_index"]))
        inst = inst._replace(
            unembedding=roundoff_perturbation(key_w, inst.unembedding, scale=x["roundoff"]),
            hidden=roundoff_perturbation(key_h, inst.hidden, scale=x["roundoff"]),
        )
        lp0 = jax.nn.log_softmax(inst.unembedding @ inst.hidden)
        if path == "reduced":
            loss = partial(phase_pair_loss, x["loss_id"], beta=x["beta"], sft_coef=0.0)
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
        summary = phase_run_summary(logprobs, geometry)
        return {**summary, "first_nonfinite_step": res.first_nonfinite_step}

    return run_fn


def displacement_outcomes(outputs: dict[str, np.ndarray], tol: float) -> np.ndarray:
    """Return the :data:`PHASE_OUTCOMES` code of each run: 0 none, 1 transient, 2 lasting, -1 NaN.

    Displaced: ``max_drop > tol``; lasting: displaced and ``final_change < -tol``.

    Example:
      >>> displacement_outcomes({"max_drop": np.array([0.5, 0.0, 0.5, np.nan]),
      ...     "final_change": np.array([-0.4, 0.2, 0.1, 0.0])}, 1e-3).tolist()
      [2, 0, 1, -1]
    """
    drop, final = outputs["max_drop"], outputs["final_change"]
    codes = np.where(drop > tol, np.where(final < -tol, 2, 1), 0)
    return np.where(np.isfinite(drop) & np.isfinite(final), codes, -1)


def grid_cells(
    geometry: PhaseGeometry, values: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], np.ndarray, tuple[int, ...]]:
    """Return ``(cells, feasible, shape)``: every cell of the grid of 1-D ``values`` per axis.

    Args:
      geometry: the :class:`~sims.protocols.phase_instances.PhaseGeometry`.
      values: one 1-D array per name of :data:`PHASE_AXES` (``loss`` and ``optimizer`` as
        indices into :data:`PHASE_LOSSES` and :data:`PHASE_OPTIMIZERS`).

    Returns:
      ``cells``: flat ``[R]`` arrays (row-major over :data:`PHASE_AXES`) of every axis, ``loss``
      renamed ``loss_id``, plus ``phi`` and ``cos`` (:func:`~sims.protocols.phase_instances.
      cell_inputs`; NaN where infeasible); ``feasible`` ``[R]``; ``shape``, the grid's shape.
    """
    solved = cell_inputs(*(values[a] for a in PHASE_AXES[:4]), geometry=geometry)
    shape = tuple(len(values[a]) for a in PHASE_AXES)
    index = np.indices(shape).reshape(len(PHASE_AXES), -1)
    cells = {a: values[a][i] for a, i in zip(PHASE_AXES, index, strict=True)}
    geo = tuple(index[:4])
    cells["phi"], cells["cos"] = solved["phi"][geo], solved["cos"][geo]
    cells["loss_id"] = cells.pop("loss")
    return cells, solved["feasible"][geo], shape
