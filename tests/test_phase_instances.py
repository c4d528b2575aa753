"""Instances of the displacement phase diagram (sims.protocols.phase_instances), float64.

Each construction is checked against what it promises, measured independently on the built
arrays: rho, omega, kappa and pi(y+) from W and h; the smallest root against a dense scan of the
instance's own pi(y+); the max-margin direction against a brute-force angle grid; the kernel's
anisotropy against theory.kernel.kernel_anisotropy and an explicit projector.
"""

from functools import partial

import jax
import numpy as np
import pytest
from _phase_setup import DEFAULT_GEOMETRY

from sims.protocols.phase_instances import (
    TOKEN_CATEGORIES,
    cell_inputs,
    hidden_direction,
    kernel_subspace,
    logit_directions,
    make_phase_geometry,
    phase_instance,
    token_category,
)
from theory.kernel import kernel_anisotropy

# construction vs its targets: the bisection brackets c to 2^-70, so what is left is float64
# round-off in the rotation, the norms and the softmax
CONSTRUCTION_RTOL = 1e-12
GEOMETRY = DEFAULT_GEOMETRY


@pytest.fixture(scope="module")
def geometry():
    return make_phase_geometry(**GEOMETRY)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_phase_instance_realises_rho_omega_kappa_and_prob_pos(geometry):
    rng = np.random.default_rng(1)
    axes = (
        np.sort(rng.uniform(-0.5, 2.5, 5)),
        np.sort(rng.uniform(0.0, 2.5, 4)),
        np.sort(rng.uniform(0.03, 1.5, 3)),
        np.sort(rng.uniform(0.05, 0.95, 3)),
    )
    solved = cell_inputs(*axes, geometry=geometry)
    grids = np.meshgrid(*axes, indexing="ij")
    ok = solved["feasible"]
    assert 20 <= ok.sum() < ok.size  # both feasible and infeasible cells are exercised
    rho, omega, kappa, prob = (g[ok] for g in grids)
    inst = jax.vmap(partial(phase_instance, geometry))(
        rho, omega, kappa, solved["phi"][ok], solved["cos"][ok], np.zeros(ok.sum())
    )
    W, h = np.asarray(inst.unembedding), np.asarray(inst.hidden)
    w_pos, w_neg = W[:, 0], W[:, 1]
    norm_sq = np.sum(w_pos**2, -1)
    diff = w_pos - w_neg
    orth = diff - (np.sum(diff * w_pos, -1) / norm_sq)[:, None] * w_pos
    logits = np.einsum("rvd,rd->rv", W, h)
    got = {
        "rho": np.sum(w_pos * w_neg, -1) / norm_sq,
        "omega": np.linalg.norm(orth, axis=-1) / np.sqrt(norm_sq),
        "kappa": np.sum(h**2, -1) / norm_sq,
        "prob_pos": np.exp(logits[:, 0] - np.logaddexp.reduce(logits, axis=-1)),
    }
    for name, want in (("rho", rho), ("omega", omega), ("kappa", kappa), ("prob_pos", prob)):
        err = np.abs(got[name] - want) / np.maximum(np.abs(want), 1.0)
        assert np.max(err) <= CONSTRUCTION_RTOL, f"{name}: worst cell {np.argmax(err)}"
    np.testing.assert_allclose(norm_sq, geometry.unembedding_norm**2, rtol=CONSTRUCTION_RTOL)


def test_logit_directions_are_the_unrotated_logits_per_unit(geometry):
    """g_z * w^2 sqrt(kappa) c are the logits of the instance (rotation leaves W h unchanged)."""
    rng = np.random.default_rng(5)
    for _ in range(20):
        rho, omega, phi = rng.uniform(-0.5, 2.5), rng.uniform(0, 2.5), rng.uniform(-np.pi, np.pi)
        kappa, c = rng.uniform(0.05, 1.5), rng.uniform(-0.95, 0.95)
        inst = phase_instance(geometry, rho, omega, kappa, phi, c, 0.0)
        W, h = np.asarray(inst.unembedding), np.asarray(inst.hidden)
        want = logit_directions(rho, omega, phi, geometry=geometry)
        want = want * geometry.unembedding_norm**2 * np.sqrt(kappa) * c
        size = np.abs(W) @ np.abs(h)  # S: the sum of the terms' absolute values, per logit
        np.testing.assert_allclose(W @ h, want, rtol=0, atol=CONSTRUCTION_RTOL * np.max(size))


def _prob_pos_fn(geometry):
    """Jitted ``(rho, omega, kappa, phi, cos [n]) -> pi(y+) [n]`` of the built instance
    (independent of the solver's own formula)."""

    def prob_pos(rho, omega, kappa, phi, cos):
        def one(c):
            inst = phase_instance(geometry, rho, omega, kappa, phi, c, 0.0)
            return jax.nn.softmax(inst.unembedding @ inst.hidden)[0]

        return jax.vmap(one)(cos)

    return jax.jit(prob_pos)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_solve_hidden_cos_gives_smallest_root_and_flags_infeasible(geometry):
    axes = (np.array([0.0, 1.0, 1.5, 2.0]), np.array([0.0, 0.7, 2.0]), np.array([0.05, 1.0]))
    probs = np.array([0.2, 0.6, 0.95])
    solved = cell_inputs(*axes, probs, geometry=geometry)
    dense = np.linspace(-1.0, 1.0, 20001)  # 20x finer than the solver's first-crossing grid
    prob_pos = _prob_pos_fn(geometry)
    seen = {True: 0, False: 0}
    for idx in np.ndindex(solved["feasible"].shape):
        rho, omega, kappa, p = (a[i] for a, i in zip((*axes, probs), idx, strict=True))
        phi, c, ok = solved["phi"][idx], solved["cos"][idx], bool(solved["feasible"][idx])
        seen[ok] += 1
        curve = np.asarray(prob_pos(rho, omega, kappa, phi, dense))
        if not ok:
            assert np.max(curve) < p, f"cell {idx} flagged infeasible but reaches p={p}"
            assert np.isnan(c)
            continue
        at = float(prob_pos(rho, omega, kappa, phi, np.full(dense.shape, c))[0])
        assert abs(at - p) <= CONSTRUCTION_RTOL * p, f"cell {idx}: pi(y+) = {at}, target {p}"
        below = dense < c - 1e-9
        assert not np.any(curve[below] >= p), f"cell {idx}: a smaller root exists"
    assert seen[True] >= 5 and seen[False] >= 5, seen


def test_hidden_direction_is_the_max_margin_direction(geometry):
    rng = np.random.default_rng(2)
    rho, omega = rng.uniform(-0.5, 2.5, 12), rng.uniform(0.0, 2.5, 12)
    phi, margin = hidden_direction(rho, omega, geometry=geometry)
    angles = np.linspace(-np.pi, np.pi, 200001)
    for i in range(rho.size):
        inst = phase_instance(geometry, rho[i], omega[i], 1.0, 0.0, 1.0, 0.0)  # W only
        W, Q = np.asarray(inst.unembedding), geometry.rotation
        d = np.stack([np.cos(angles), np.sin(angles)], -1) @ Q[:, :2].T  # [A, d] rotated plane
        brute = np.min((W[0] - W[1:]) @ d.T, axis=0) / geometry.unembedding_norm  # [A]
        at = Q[:, :2] @ np.array([np.cos(phi[i]), np.sin(phi[i])])
        at = np.min((W[0] - W[1:]) @ at) / geometry.unembedding_norm
        assert margin[i] >= np.max(brute) - 1e-9, f"instance {i}: the grid beats the solution"
        assert abs(at - margin[i]) <= CONSTRUCTION_RTOL, f"instance {i}: margin not at phi"


def test_phase_instance_kernel_anisotropy_is_one_plus_lambda(geometry):
    for lam in (0.0, 0.5, 4.0, 9.0):
        inst = phase_instance(geometry, 0.8, 1.0, 0.25, -0.3, 0.4, lam)
        K = inst.basis @ inst.basis.T
        S = kernel_subspace(inst, geometry)
        got = float(kernel_anisotropy(K, S).ratio)
        assert abs(got - (1.0 + lam)) <= CONSTRUCTION_RTOL * (1.0 + lam), (lam, got)
        q, _ = np.linalg.qr(np.asarray(S).T)
        want = np.eye(K.shape[0]) + lam * q @ q.T  # K = I + lambda P_S
        np.testing.assert_allclose(K, want, rtol=0, atol=CONSTRUCTION_RTOL * (1 + lam))


def test_make_phase_geometry_rejects_bad_sizes():
    with pytest.raises(ValueError, match="hidden_size must be >= 4"):
        make_phase_geometry(**{**GEOMETRY, "hidden_size": 3})
    with pytest.raises(ValueError, match="synonym_scale must be < 1/1.2"):
        make_phase_geometry(**{**GEOMETRY, "synonym_scale": 0.9})
    with pytest.raises(ValueError, match="num_opposite must be >= 1"):
        make_phase_geometry(**{**GEOMETRY, "num_opposite": 0})


def test_make_phase_geometry_is_seeded_and_rotation_orthogonal():
    a, b = make_phase_geometry(**GEOMETRY), make_phase_geometry(**GEOMETRY)
    np.testing.assert_array_equal(a.rotation, b.rotation)
    np.testing.assert_array_equal(a.fillers, b.fillers)
    other = make_phase_geometry(**{**GEOMETRY, "seed": 1})
    assert not np.allclose(a.rotation, other.rotation)
    np.testing.assert_allclose(a.rotation @ a.rotation.T, np.eye(8), atol=1e-14)
    assert np.all(a.fillers[:, :3] == 0.0)  # fillers lie off span(e_0, e_1, e_2)


def test_token_category_by_hand(geometry):
    # V = 14: y+ (0), y- (1), opposite 2..4, synonyms 5..6, fillers 7..13
    want = ["y+", "y-"] + ["opposite"] * 3 + ["synonym"] * 2 + ["filler"] * 7
    got = [TOKEN_CATEGORIES[c] for c in token_category(np.arange(14), geometry)]
    assert got == want
