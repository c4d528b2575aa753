r"""Instances of the displacement phase diagram: geometry, 1-D solves, the model at t = 0.

Used by :mod:`sims.protocols.phase_diagram` (flows over a grid of these instances).

**Instance** (one prompt, a single-token pair). In an orthonormal frame :math:`e_0, \dots,
e_{d-1}` (turned by a fixed random rotation ``Q`` when ``rotate``), with :math:`w = \|W_{y^+}\|`:

* ``y+`` (id 0): :math:`W_{y^+} = w\,e_0`;
* ``y-`` (id 1): :math:`W_{y^-} = w(\rho\,e_0 + \omega\,e_1)`, so :math:`\rho = \langle W_{y^+},
  W_{y^-}\rangle/\|W_{y^+}\|^2` and :math:`\omega = \|(W_{y^+} - W_{y^-})_{\perp W_{y^+}}\| /
  \|W_{y^+}\|` (the component of :math:`W_{y^+} - W_{y^-}` orthogonal to :math:`W_{y^+}`);
* the **opposite-meaning set** (ids ``2 .. 1 + n_o``): :math:`W_z = -a_i w\,e_1`, aligned with
  :math:`-e_1`, the direction Theorem 5 favours when :math:`\omega > 0`
  (:math:`\langle W_z, W_{y^+} - W_{y^-}\rangle = a_i w^2\omega`);
* **synonyms** of ``y+`` (next ``n_s`` ids): :math:`W_z = \sigma_i w\,e_0`, :math:`\sigma_i < 1`;
* **fillers** (the rest): seeded Gaussian directions in :math:`\mathrm{span}(e_3, \dots,
  e_{d-1})` of norm about ``filler_scale * w``;
* the prompt's hidden embedding :math:`h_0 = w\sqrt\kappa\,(c\,\hat d + \sqrt{1-c^2}\,e_2)` with
  :math:`\kappa = \|h_0\|^2/\|W_{y^+}\|^2`. Its direction in the plane, :math:`\hat d = \cos\phi\,
  e_0 + \sin\phi\,e_1`, is the **max-margin direction** of ``y+`` in :math:`\mathrm{span}(e_0,
  e_1)`, :math:`\phi = \arg\max_\phi\min_{z\ne y^+}\langle W_{y^+} - W_z, \hat d\rangle`
  (:func:`hidden_direction`): where gradient descent on an SFT loss of ``y+`` drives ``h``
  (Soudry et al. 2018), restricted to the plane of the pair. No token uses :math:`e_2`, so
  :math:`\|h_0\|^2` and :math:`\pi(y^+)` are set independently: the t = 0 logits are :math:`x\,
  g_z` with :math:`g_z = \langle W_z, \hat d\rangle/w` and :math:`x = w^2\sqrt\kappa\,c`, and
  ``c`` is the **smallest root** in :math:`[-1, 1]` of :math:`\pi(y^+) = p`
  (:func:`solve_hidden_cos`, a 1-D solve). A cell whose target ``p`` no ``c`` reaches is flagged
  infeasible, never moved (e.g. :math:`\rho > 1` with small :math:`\omega`: every direction that
  ranks ``y+`` above ``y-`` also ranks the opposite set above ``y+``).

**Kernel axis.** A feature network with a constant kernel: :math:`h(\theta) = h_0 + B\theta`,
:math:`\theta(0) = 0`, :math:`B = I + (\sqrt{1+\lambda} - 1)P_S`, so :math:`BB^\top = K = I +
\lambda P_S` with :math:`P_S` the projector onto :math:`S = \mathrm{span}(W_{y^+}, \bar W_{opp})`
(``W+`` and the opposite-set centroid): :math:`\lambda_{\mathrm{eff}} = 1 + \lambda` exactly
(:func:`theory.kernel.kernel_anisotropy`); :math:`\lambda = 0` is the unconstrained-features model.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

#: Token categories of the top gainers, by :func:`token_category` code.
TOKEN_CATEGORIES = ("y+", "y-", "opposite", "synonym", "filler")
SOLVE_GRID = 1025  # grid points of the first-crossing search in solve_hidden_cos
SOLVE_ITERS = 60  # bisection steps after it (bracket width 2 / 1024 / 2**60: below round-off)


class PhaseGeometry(NamedTuple):
    r"""The fixed parts of every instance (host constants; see the module docstring).

    Attributes:
      unembedding_norm: :math:`w = \|W_{y^+}\|`.
      opposite_scales: ``[n_o]`` :math:`a_i`.
      synonym_scales: ``[n_s]`` :math:`\sigma_i`.
      fillers: ``[n_f, d]`` filler rows in the unrotated frame.
      rotation: ``[d, d]`` orthogonal ``Q`` (rows of ``W`` and ``h`` are mapped to ``Q v``).
    """

    unembedding_norm: float
    opposite_scales: np.ndarray
    synonym_scales: np.ndarray
    fillers: np.ndarray
    rotation: np.ndarray

    @property
    def vocab_size(self) -> int:
        """``V = 2 + n_o + n_s + n_f``."""
        return 2 + len(self.opposite_scales) + len(self.synonym_scales) + len(self.fillers)

    @property
    def opposite_ids(self) -> np.ndarray:
        """``[n_o]`` token ids of the opposite-meaning set (``2 .. 1 + n_o``)."""
        return np.arange(2, 2 + len(self.opposite_scales))


def make_phase_geometry(
    *,
    seed: int,
    hidden_size: int,
    num_opposite: int,
    num_synonym: int,
    num_filler: int,
    unembedding_norm: float,
    opposite_scale: float,
    synonym_scale: float,
    filler_scale: float,
    rotate: bool,
) -> PhaseGeometry:
    r"""Return the :class:`PhaseGeometry` of the instances (see the module docstring).

    The opposite and synonym scales are spread evenly over ``[0.8, 1.2]`` times their base (one
    token: the base itself); the fillers and the rotation are drawn from ``seed`` (NumPy).

    Args:
      seed: seed of the fillers and of the Haar-random rotation.
      hidden_size: ``d >= 4``.
      num_opposite: ``n_o >= 1`` tokens along :math:`-e_1`.
      num_synonym: ``n_s`` synonyms of ``y+`` along :math:`e_0`.
      num_filler: ``n_f`` fillers in :math:`\mathrm{span}(e_3, \dots, e_{d-1})`.
      unembedding_norm: :math:`w = \|W_{y^+}\|`.
      opposite_scale: base of :math:`a_i = \|W_z\|/w` of the opposite set.
      synonym_scale: base of :math:`\sigma_i`, below ``1/1.2``.
      filler_scale: typical filler norm over ``w``.
      rotate: turn the frame by a random rotation (identity otherwise).

    Returns:
      The :class:`PhaseGeometry`.

    Raises:
      ValueError: ``hidden_size < 4`` (e_0, e_1, e_2 and a filler direction), ``synonym_scale *
        1.2 >= 1`` (a synonym would outscore ``y+`` along ``e_0``), an empty opposite set.

    Example:
      >>> g = make_phase_geometry(seed=0, hidden_size=6, num_opposite=2, num_synonym=1,
      ...     num_filler=3, unembedding_norm=2.0, opposite_scale=1.0, synonym_scale=0.5,
      ...     filler_scale=1.0, rotate=False)
      >>> g.vocab_size, g.opposite_ids.tolist(), g.opposite_scales.tolist()
      (8, [2, 3], [0.8, 1.2])
    """
    if hidden_size < 4:
        raise ValueError(f"hidden_size must be >= 4 (e_0, e_1, e_2, fillers), got {hidden_size}")
    if num_opposite < 1:
        raise ValueError(f"num_opposite must be >= 1, got {num_opposite}")
    if synonym_scale * 1.2 >= 1.0:
        raise ValueError(f"synonym_scale must be < 1/1.2 (synonyms below y+), got {synonym_scale}")

    def spread(n: int) -> np.ndarray:
        return np.linspace(0.8, 1.2, n) if n > 1 else np.ones(n)

    rng = np.random.default_rng(seed)
    fillers = np.zeros((num_filler, hidden_size))
    fillers[:, 3:] = rng.normal(size=(num_filler, hidden_size - 3)) / np.sqrt(hidden_size - 3)
    if rotate:
        q, r = np.linalg.qr(rng.normal(size=(hidden_size, hidden_size)))
        rotation = q * np.sign(np.diag(r))  # Haar-distributed orthogonal matrix
    else:
        rotation = np.eye(hidden_size)
    return PhaseGeometry(
        float(unembedding_norm),
        opposite_scale * spread(num_opposite),
        synonym_scale * spread(num_synonym),
        filler_scale * unembedding_norm * fillers,
        rotation,
    )


def logit_directions(
    rho: ArrayLike, omega: ArrayLike, phi: ArrayLike, *, geometry: PhaseGeometry
) -> np.ndarray:
    r"""Return ``[..., V]`` :math:`g_z = \langle W_z, \hat d(\phi)\rangle / w` (NumPy, broadcast).

    With :math:`\hat d = \cos\phi\,e_0 + \sin\phi\,e_1`, in the unrotated frame: the t = 0 logits
    of a cell are :math:`w^2\sqrt\kappa\,c\,g_z` (fillers lie off the plane: :math:`g_z = 0`).

    Args:
      rho: :math:`\rho`, any shape (broadcast with ``omega`` and ``phi``).
      omega: :math:`\omega \ge 0`.
      phi: the angle of :math:`\hat d` in the plane :math:`(e_0, e_1)`.
      geometry: the :class:`PhaseGeometry`.

    Returns:
      ``[..., V]`` float64, tokens in id order (``y+``, ``y-``, opposite, synonyms, fillers).

    Example:
      >>> g = make_phase_geometry(seed=0, hidden_size=4, num_opposite=1, num_synonym=0,
      ...     num_filler=1, unembedding_norm=2.0, opposite_scale=1.0, synonym_scale=0.5,
      ...     filler_scale=1.0, rotate=False)
      >>> logit_directions(0.5, 1.0, 0.0, geometry=g).tolist()  # y+, y-, opposite, filler
      [1.0, 0.5, 0.0, 0.0]
    """
    rho, omega, phi = np.broadcast_arrays(*(np.asarray(a, np.float64) for a in (rho, omega, phi)))
    cos, sin = np.cos(phi)[..., None], np.sin(phi)[..., None]
    return np.concatenate(
        [
            cos,
            rho[..., None] * cos + omega[..., None] * sin,
            -geometry.opposite_scales * sin,
            geometry.synonym_scales * cos,
            np.zeros(rho.shape + (len(geometry.fillers),)),
        ],
        axis=-1,
    )


def _plane_rows(rho: ArrayLike, omega: ArrayLike, geometry: PhaseGeometry) -> np.ndarray:
    """``[..., M, 2]``: :math:`(W_{y^+} - W_z)/w` in the plane :math:`(e_0, e_1)`, one row per
    distinct token direction (``y-``, opposite tokens, synonyms, fillers)."""
    rho, omega = np.broadcast_arrays(np.asarray(rho, np.float64), np.asarray(omega, np.float64))
    rows = [np.stack([1.0 - rho, -omega], axis=-1)]
    rows += [np.broadcast_to([1.0, a], rho.shape + (2,)) for a in geometry.opposite_scales]
    rows += [np.broadcast_to([1.0 - s, 0.0], rho.shape + (2,)) for s in geometry.synonym_scales]
    if len(geometry.fillers):
        rows.append(np.broadcast_to([1.0, 0.0], rho.shape + (2,)))  # fillers lie off the plane
    return np.stack(rows, axis=-2)


def hidden_direction(
    rho: ArrayLike, omega: ArrayLike, *, geometry: PhaseGeometry
) -> tuple[np.ndarray, np.ndarray]:
    r"""Return ``(phi, margin)``: the max-margin direction of ``y+`` in the plane and its margin.

    .. math:: \phi = \arg\max_{\phi}\ \min_{z\ne y^+}\langle W_{y^+} - W_z, \cos\phi\,e_0 +
              \sin\phi\,e_1\rangle / w

    Exact: the objective is a minimum of sinusoids :math:`\|r_z\|\cos(\phi - \phi_z)`, so its
    maximum lies at the peak :math:`\phi_z` of one of them or where two cross (:math:`\langle
    r_a - r_b, \hat d\rangle = 0`); every such candidate is evaluated (ties: the first
    candidate). ``margin <= 0``: no direction of the plane ranks ``y+`` first. Inputs broadcast.

    Source: the hidden embedding an SFT loss of ``y+`` drives to (the max-margin direction,
    Soudry et al. 2018), restricted to the plane of the pair (a construction of this module).

    Returns:
      ``(phi, margin)`` of the broadcast shape of ``rho`` and ``omega`` (float64).

    Example:
      >>> g = make_phase_geometry(seed=0, hidden_size=4, num_opposite=1, num_synonym=0,
      ...     num_filler=1, unembedding_norm=1.0, opposite_scale=1.0, synonym_scale=0.5,
      ...     filler_scale=1.0, rotate=False)
      >>> phi, margin = hidden_direction(2.0, 2.0, geometry=g)  # y- = (2, 2), opposite = (0, -1)
      >>> # balance y-: (-1, -2).d against the opposite token (1, 1).d: d = (3, -2) / sqrt(13)
      >>> bool(np.isclose(phi, np.arctan2(-2, 3))), round(float(margin), 6)
      (True, 0.27735)
    """
    r = _plane_rows(rho, omega, geometry)  # [..., M, 2]
    M = r.shape[-2]
    a, b = np.triu_indices(M, 1)
    diff = r[..., a, :] - r[..., b, :]  # [..., pairs, 2]
    cross = np.arctan2(diff[..., 1], diff[..., 0])
    candidates = np.concatenate(
        [np.arctan2(r[..., 1], r[..., 0]), cross + np.pi / 2, cross - np.pi / 2], axis=-1
    )  # [..., C]
    d = np.stack([np.cos(candidates), np.sin(candidates)], axis=-1)  # [..., C, 2]
    margins = np.min(np.einsum("...cx,...mx->...cm", d, r), axis=-1)  # [..., C]
    best = np.argmax(margins, axis=-1)[..., None]
    return (
        np.take_along_axis(candidates, best, axis=-1)[..., 0],
        np.take_along_axis(margins, best, axis=-1)[..., 0],
    )


def solve_hidden_cos(
    scores: ArrayLike, kappa: ArrayLike, prob_pos: ArrayLike, *, unembedding_norm: float
) -> tuple[np.ndarray, np.ndarray]:
    r"""Return ``(c, feasible)``: the smallest :math:`c \in [-1, 1]` with :math:`\pi(y^+) = p`.

    .. math:: \pi(y^+) = \mathrm{softmax}(x\,g)_0,\qquad x = w^2\sqrt\kappa\,c

    ``scores`` ``[..., V]`` are the :math:`g_z` of :func:`logit_directions`. The first of
    :data:`SOLVE_GRID` points where :math:`\pi(y^+) \ge p` brackets the root, bisection refines it.
    ``feasible`` is false (and ``c`` NaN) when no :math:`c \in [-1, 1]` reaches ``p`` (``p`` above
    the reachable maximum or below :math:`\pi(y^+)` at ``c = -1``). Inputs broadcast (NumPy).

    Args:
      scores: ``[..., V]`` :math:`g_z`, ``y+`` first.
      kappa: :math:`\kappa = \|h_0\|^2/w^2 > 0`, broadcast with ``scores[..., 0]``.
      prob_pos: the target :math:`p \in (0, 1)`, broadcast likewise.
      unembedding_norm: :math:`w`.

    Returns:
      ``(c, feasible)`` of the broadcast shape: ``c`` float64 (NaN where infeasible), ``feasible``
      bool.

    Example:
      >>> g = np.array([1.0, 0.0, 0.0, 0.0, 0.0])  # V = 5: pi(y+) = 1/4 at x = ln(4/3)
      >>> c, ok = solve_hidden_cos(g, 1.0, 0.25, unembedding_norm=1.0)
      >>> bool(ok), bool(abs(c - np.log(4 / 3)) < 1e-12)
      (True, True)
    """
    scores = np.asarray(scores, np.float64)
    kappa, p = np.broadcast_arrays(np.asarray(kappa, np.float64), np.asarray(prob_pos, np.float64))
    shape = np.broadcast_shapes(scores.shape[:-1], kappa.shape)
    scale = unembedding_norm**2 * np.sqrt(kappa)  # x = scale * c

    def excess(c):  # ln pi(y+) - ln p at c (broadcast over a leading grid axis)
        logits = (scale * c)[..., None] * scores
        return logits[..., 0] - np.logaddexp.reduce(logits, axis=-1) - np.log(p)

    grid = np.linspace(-1.0, 1.0, SOLVE_GRID)
    above = excess(np.broadcast_to(grid.reshape((-1,) + (1,) * len(shape)), (SOLVE_GRID, *shape)))
    above = above >= 0.0  # [G, ...]
    first = np.argmax(above, axis=0)  # first grid point at or above the target
    feasible = np.any(above, axis=0) & (first > 0)
    lo, hi = grid[np.maximum(first - 1, 0)], grid[first]  # the bracket
    for _ in range(SOLVE_ITERS):
        mid = 0.5 * (lo + hi)
        up = excess(mid) >= 0.0
        hi, lo = np.where(up, mid, hi), np.where(up, lo, mid)
    return np.where(feasible, hi, np.nan), feasible


def cell_inputs(
    rhos: ArrayLike,
    omegas: ArrayLike,
    kappas: ArrayLike,
    probs: ArrayLike,
    *,
    geometry: PhaseGeometry,
) -> dict[str, np.ndarray]:
    """Return ``{"phi", "cos", "feasible"}`` on the grid of 1-D axes, each ``[n_rho, n_omega,
    n_kappa, n_prob]``.

    ``phi`` from :func:`hidden_direction` (per ``rho, omega``), ``cos`` from
    :func:`solve_hidden_cos` (NaN where infeasible); solved one ``rho`` at a time (memory).

    Example:
      >>> g = make_phase_geometry(seed=0, hidden_size=4, num_opposite=1, num_synonym=0,
      ...     num_filler=1, unembedding_norm=1.0, opposite_scale=1.0, synonym_scale=0.5,
      ...     filler_scale=1.0, rotate=False)
      >>> # V = 4; the max-margin direction is e_0 (margin 1), x = w^2 sqrt(kappa) c <= 2, so
      >>> # pi(y+) <= e^2 / (e^2 + 3) = 0.71: 0.5 is reachable, 0.99 is not
      >>> cell_inputs([0.0], [1.0], [4.0], [0.5, 0.99], geometry=g)["feasible"].tolist()
      [[[[True, False]]]]
    """
    rhos, omegas, kappas, probs = (np.asarray(a, np.float64) for a in (rhos, omegas, kappas, probs))
    shape = (len(rhos), len(omegas), len(kappas), len(probs))
    phi, _ = hidden_direction(rhos[:, None], omegas[None, :], geometry=geometry)  # [n_r, n_o]
    cos, feasible = np.empty(shape), np.empty(shape, bool)
    for i, rho in enumerate(rhos):
        scores = logit_directions(rho, omegas, phi[i], geometry=geometry)  # [n_o, V]
        cos[i], feasible[i] = solve_hidden_cos(
            scores[:, None, None, :],
            kappas[:, None],
            probs[None, :],
            unembedding_norm=geometry.unembedding_norm,
        )
    return {"phi": np.broadcast_to(phi[:, :, None, None], shape), "cos": cos, "feasible": feasible}


class PhaseInstance(NamedTuple):
    """One cell's model at t = 0: unembeddings ``[V, d]``, hidden ``[d]``, ``B`` ``[d, d]``."""

    unembedding: jax.Array
    hidden: jax.Array
    basis: jax.Array


def phase_instance(
    geometry: PhaseGeometry,
    rho: ArrayLike,
    omega: ArrayLike,
    kappa: ArrayLike,
    phi: ArrayLike,
    cos: ArrayLike,
    lam: ArrayLike,
) -> PhaseInstance:
    r"""Return the :class:`PhaseInstance` of a cell (JAX; jit- and vmap-safe in its scalar inputs).

    See the module docstring: rows ``W`` ``[V, d]`` and :math:`h_0` are rotated by ``Q``;
    :math:`B = I + (\sqrt{1+\lambda} - 1)P_S`. ``phi`` and ``cos`` come from
    :func:`hidden_direction` and :func:`solve_hidden_cos`.

    Args:
      geometry: the :class:`PhaseGeometry` (host constants, closed over).
      rho, omega, kappa: the cell's :math:`\rho`, :math:`\omega`, :math:`\kappa` (scalars).
      phi: angle of :math:`\hat d` in the plane (:func:`hidden_direction`).
      cos: :math:`c \in [-1, 1]` (:func:`solve_hidden_cos`).
      lam: kernel gain :math:`\lambda \ge 0` (0: unconstrained features).

    Returns:
      The :class:`PhaseInstance` (``W`` ``[V, d]``, :math:`h_0` ``[d]``, ``B`` ``[d, d]``).

    Example:
      >>> g = make_phase_geometry(seed=0, hidden_size=4, num_opposite=1, num_synonym=0,
      ...     num_filler=1, unembedding_norm=2.0, opposite_scale=1.0, synonym_scale=0.5,
      ...     filler_scale=1.0, rotate=False)
      >>> inst = phase_instance(g, 0.5, 1.0, 1.0, 0.0, 0.0, 3.0)
      >>> inst.unembedding[:3].tolist(), inst.hidden.tolist()  # y+, y-, opposite; h0 along e_2
      ([[2.0, 0.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0], [0.0, -2.0, 0.0, 0.0]], [0.0, 0.0, 2.0, 0.0])
      >>> jnp.diag(inst.basis @ inst.basis.T).tolist()  # K = I + 3 P_S, S = span(e_0, e_1)
      [4.0, 4.0, 1.0, 1.0]
    """
    w = geometry.unembedding_norm
    d = geometry.rotation.shape[0]
    e = jnp.eye(d)
    rows = [
        w * e[0],
        w * (rho * e[0] + omega * e[1]),
        *(-a * w * e[1] for a in geometry.opposite_scales),
        *(s * w * e[0] for s in geometry.synonym_scales),
    ]
    W = jnp.concatenate([jnp.stack(rows), jnp.asarray(geometry.fillers)])  # [V, d]
    direction = jnp.cos(phi) * e[0] + jnp.sin(phi) * e[1]
    h0 = w * jnp.sqrt(kappa) * (cos * direction + jnp.sqrt(1.0 - cos**2) * e[2])  # [d]
    Q = jnp.asarray(geometry.rotation)
    W, h0 = W @ Q.T, Q @ h0
    span = jnp.stack([W[0], jnp.mean(W[geometry.opposite_ids], axis=0)])  # [2, d]: W+, centroid
    q, _ = jnp.linalg.qr(span.T)  # [d, 2] orthonormal basis of S
    B = jnp.eye(d) + (jnp.sqrt(1.0 + lam) - 1.0) * (q @ q.T)
    return PhaseInstance(W, h0, B)


def kernel_subspace(inst: PhaseInstance, geometry: PhaseGeometry) -> jax.Array:
    """Return ``[2, d]``: the vectors spanning ``S`` (``W+`` and the opposite-set centroid)."""
    W = inst.unembedding
    return jnp.stack([W[0], jnp.mean(W[geometry.opposite_ids], axis=0)])


def token_category(ids: ArrayLike, geometry: PhaseGeometry) -> np.ndarray:
    """Return the :data:`TOKEN_CATEGORIES` code of each token id (NumPy ints, ``ids``' shape).

    Example:
      >>> g = make_phase_geometry(seed=0, hidden_size=4, num_opposite=2, num_synonym=1,
      ...     num_filler=1, unembedding_norm=1.0, opposite_scale=1.0, synonym_scale=0.5,
      ...     filler_scale=1.0, rotate=False)
      >>> [TOKEN_CATEGORIES[c] for c in token_category([0, 1, 2, 3, 4, 5], g)]
      ['y+', 'y-', 'opposite', 'opposite', 'synonym', 'filler']
    """
    ids = np.asarray(ids)
    n_o, n_s = len(geometry.opposite_scales), len(geometry.synonym_scales)
    edges = np.array([1, 2, 2 + n_o, 2 + n_o + n_s])
    return np.searchsorted(edges, ids, side="right")
