r"""Counterexamples to Theorem 2 of sources 000/001 as stated: a vmapped random search.

Theorem 2 assumes :math:`r` positively correlated with :math:`p_A` and negatively with :math:`p_U`
(Pearson covariance under the uniform distribution on :math:`\mathrm{supp}\,p_{ref}`) and
concludes :math:`\mathrm{TPM}(A)\ge\alpha`. Its proof needs the same signs for the tilt weights
:math:`e^{r/\beta}`, which a non-linear monotone map does not preserve. :func:`random_instances`
and :func:`theorem2_status` (pure JAX, vmapped, jit-safe) search for instances that meet the stated
hypotheses and miss the conclusion; :mod:`theory.kl_exact` re-checks one in rational arithmetic.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri
from jax.typing import ArrayLike

from theory.checks import check_positive, check_positive_int
from theory.kl_optimum import _log_moment, _support_covariances, _tpm_from_log_moments


class MixtureInstances(NamedTuple):
    """A batch of ``R`` random instances ``(alpha, p_A, p_U, r, beta)``.

    Attributes:
      alpha: ``[R]`` in (0, 1).
      p_A, p_U: ``[R, V]`` distributions (zeros allowed; each row sums to 1).
      r: ``[R, V]`` finite rewards.
      beta: ``[R]`` positive.
    """

    alpha: jax.Array
    p_A: jax.Array
    p_U: jax.Array
    r: jax.Array
    beta: jax.Array


def _distributions(u, key, concentration, zero_fraction):
    """``[R, V]`` Dirichlet rows, entries zeroed with probability ``zero_fraction`` (one kept).

    ``u`` is ``[R, 2V + 1]`` uniforms in (0, 1): draws, zero mask, index of the entry kept.
    """
    R, V = u.shape[0], (u.shape[1] - 1) // 2
    if concentration == 1.0:  # Dirichlet(1): normalised Exp(1) draws (much cheaper than gamma)
        p = -jnp.log(u[:, :V])
    else:
        p = jax.random.dirichlet(key, jnp.full((V,), concentration, u.dtype), (R,))
    keep = u[:, V : 2 * V] >= zero_fraction
    kept = jnp.minimum(jnp.floor(u[:, 2 * V] * V), V - 1).astype(jnp.int32)
    keep = keep | jax.nn.one_hot(kept, V, dtype=bool)
    p = jnp.where(keep, jnp.maximum(p, jnp.finfo(u.dtype).tiny), 0.0)
    return p / jnp.sum(p, axis=1, keepdims=True)


def random_instances(
    key: jax.Array,
    *,
    num_instances: int,
    num_outcomes: int,
    reward_scale: float = 3.0,
    concentration: float = 1.0,
    zero_fraction: float = 0.0,
    dtype=jnp.float64,
) -> MixtureInstances:
    r"""Return ``num_instances`` seeded random mixture instances.

    :math:`p_A, p_U \sim \mathrm{Dirichlet}(c)` with each entry zeroed with probability
    ``zero_fraction`` (at least one kept, then renormalised), :math:`r/\beta \sim
    \mathcal N(0, s^2)` with :math:`s` log-uniform in ``[reward_scale / 10, reward_scale]``,
    :math:`\beta` log-uniform in ``[0.1, 10]``, :math:`\alpha \sim U(0.05, 0.95)`.

    Source: the search of the issue "KL-optimum mixture shift" (Theorem 2 of sources 000/001).

    Args:
      key: typed PRNG key.
      num_instances: ``R >= 1`` (static).
      num_outcomes: ``V >= 2`` (static).
      reward_scale: largest standard deviation of ``r / beta``, ``> 0``.
      concentration: Dirichlet concentration, ``> 0``.
      zero_fraction: probability in ``[0, 1)`` of zeroing an entry (exercises supports).
      dtype: float dtype of the instances.

    Returns:
      :class:`MixtureInstances`.

    Raises:
      ValueError: non-positive sizes or scales, ``zero_fraction`` outside ``[0, 1)``.

    Example:
      >>> inst = random_instances(jax.random.key(0), num_instances=4, num_outcomes=3)
      >>> inst.p_A.shape, bool(jnp.allclose(inst.p_U.sum(-1), 1.0))
      ((4, 3), True)
    """
    check_positive_int("num_instances", num_instances)
    check_positive_int("num_outcomes", num_outcomes)
    if num_outcomes < 2:
        raise ValueError(f"num_outcomes must be >= 2, got num_outcomes={num_outcomes}")
    check_positive("reward_scale", reward_scale)
    check_positive("concentration", concentration)
    if not 0.0 <= zero_fraction < 1.0:
        raise ValueError(f"zero_fraction must be in [0, 1), got zero_fraction={zero_fraction!r}")

    return _sample(
        key,
        num_instances,
        num_outcomes,
        reward_scale,
        concentration,
        zero_fraction,
        jnp.dtype(dtype),
    )


@partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _sample(key, num_instances, num_outcomes, reward_scale, concentration, zero_fraction, dtype):
    R, V = num_instances, num_outcomes
    k_u, k_A, k_U = jax.random.split(key, 3)
    # one uniform draw for everything: each threefry call costs a compile on small machines
    tiny = jnp.finfo(dtype).tiny
    u = jax.random.uniform(k_u, (R, 5 * V + 5), dtype, minval=tiny, maxval=1.0)  # in (0, 1)
    p_A = _distributions(u[:, : 2 * V + 1], k_A, concentration, zero_fraction)
    p_U = _distributions(u[:, 2 * V + 1 : 4 * V + 2], k_U, concentration, zero_fraction)
    rest = u[:, 4 * V + 2 :]  # [R, V + 3]
    beta = jnp.exp(jnp.log(0.1) + rest[:, 0] * (jnp.log(10.0) - jnp.log(0.1)))
    log_s = jnp.log(reward_scale / 10) + rest[:, 1] * jnp.log(10.0)
    normal = ndtri(jnp.clip(rest[:, 3:], tiny, 1 - jnp.finfo(dtype).eps))  # [R, V]
    r = (beta * jnp.exp(log_s))[:, None] * normal
    alpha = 0.05 + 0.9 * rest[:, 2]
    return MixtureInstances(alpha.astype(dtype), p_A, p_U, r.astype(dtype), beta.astype(dtype))


class Theorem2Status(NamedTuple):
    r"""Theorem 2's hypotheses and conclusion for one instance.

    Attributes:
      cov_r_A, cov_r_U, cov_w_A, cov_w_U: as in :class:`theory.kl_optimum.SupportCovariances`.
      log_moment_gap: :math:`\ln M_A - \ln M_U` (``>= 0`` iff ``TPM(A) >= alpha``).
      tpm_A: :math:`\mathrm{TPM}(A)`.
      margin: :math:`\min(\bar c_{rA}, -\bar c_{rU}, -\mathrm{gap})`, covariances scaled by
        :math:`N^2/(r_{\max}-r_{\min})`; ``> 0`` exactly for a counterexample to the stated theorem,
        and its size says how far from rounding error the instance is.
    """

    cov_r_A: jax.Array
    cov_r_U: jax.Array
    cov_w_A: jax.Array
    cov_w_U: jax.Array
    log_moment_gap: jax.Array
    tpm_A: jax.Array
    margin: jax.Array


def theorem2_status(
    alpha: ArrayLike, p_A: ArrayLike, p_U: ArrayLike, r: ArrayLike, beta: ArrayLike
) -> Theorem2Status:
    r"""Return Theorem 2's hypotheses (for ``r`` and for :math:`e^{r/\beta}`) and its conclusion.

    .. math:: \text{stated: } \mathrm{Cov}(r,p_A)>0,\ \mathrm{Cov}(r,p_U)<0
       \ \overset{?}{\Longrightarrow}\ \mathrm{TPM}(A)\ge\alpha

    Unvalidated and jit/vmap-safe (a search kernel): pass valid instances, e.g. from
    :func:`random_instances`; the validated pieces are in :mod:`theory.kl_optimum`.

    Source: sources 000/001, Theorem 2 and its proof (uniform measure on the support).

    Args:
      alpha: scalar in (0, 1); p_A, p_U: ``[V]`` distributions; r: ``[V]``; beta: ``> 0``.

    Returns:
      :class:`Theorem2Status`.

    Example:
      >>> s = theorem2_status(0.5, jnp.array([0.2, 0.8]), jnp.array([0.8, 0.2]),
      ...                     jnp.array([0.0, 1.0]), 1.0)
      >>> bool(s.cov_r_A > 0), bool(s.log_moment_gap > 0), bool(s.margin < 0)  # theorem holds
      (True, True, True)
    """
    alpha, p_A, p_U, r, beta = (jnp.asarray(x) for x in (alpha, p_A, p_U, r, beta))
    c = _support_covariances(p_A, p_U, r, beta)
    log_m_A, log_m_U = _log_moment(p_A, r, beta), _log_moment(p_U, r, beta)
    gap = log_m_A - log_m_U
    on = (p_A > 0) | (p_U > 0)
    spread = jnp.max(jnp.where(on, r, -jnp.inf)) - jnp.min(jnp.where(on, r, jnp.inf))
    scale = c.num_support**2 / jnp.maximum(spread, jnp.finfo(r.dtype).tiny)
    margin = jnp.minimum(jnp.minimum(c.cov_r_A * scale, -c.cov_r_U * scale), -gap)
    tpm_A = _tpm_from_log_moments(alpha, log_m_A, log_m_U).tpm_A
    return Theorem2Status(c.cov_r_A, c.cov_r_U, c.cov_w_A, c.cov_w_U, gap, tpm_A, margin)


class Theorem2Census(NamedTuple):
    """Counts of Theorem 2's hypotheses and conclusion over a batch of instances.

    Attributes:
      instances: batch size ``R``.
      stated_conditions, stated_failures: instances meeting the stated hypotheses (``r``), and
        those of them with ``TPM(A) < alpha``.
      tilt_conditions, tilt_failures: the same for the corrected hypotheses (``e^{r/beta}``).
      min_tilt_gap: smallest ``TPM(A) - alpha`` among instances meeting the corrected hypotheses.
      criterion_decided: instances with ``|TPM(A) - alpha| > criterion_atol``.
      criterion_disagreements: decided instances where ``sign(TPM(A) - alpha)`` differs from
        ``sign Cov_unif(p_A - p_U, e^{r/beta})`` (the exact criterion, computed independently).
    """

    instances: jax.Array
    stated_conditions: jax.Array
    stated_failures: jax.Array
    tilt_conditions: jax.Array
    tilt_failures: jax.Array
    min_tilt_gap: jax.Array
    criterion_decided: jax.Array
    criterion_disagreements: jax.Array


@partial(jax.jit, static_argnames="criterion_atol")
def theorem2_census(instances: MixtureInstances, *, criterion_atol: float) -> Theorem2Census:
    r"""Return how often Theorem 2's hypotheses hold and its conclusion fails, stated vs corrected.

    .. math:: \text{stated: } \mathrm{Cov}(r, p_A) > 0 > \mathrm{Cov}(r, p_U),\qquad
       \text{corrected: } \mathrm{Cov}(e^{r/\beta}, p_A) > 0 > \mathrm{Cov}(e^{r/\beta}, p_U)

    (uniform measure on the support); conclusion :math:`\mathrm{TPM}(A) \ge \alpha`.

    Source: sources 000/001, Theorem 2; the corrected hypotheses are those its proof uses.

    Args:
      instances: a batch from :func:`random_instances`.
      criterion_atol: ``|TPM(A) - alpha|`` above which the sign counts as decided.

    Returns:
      :class:`Theorem2Census` of scalar counts.

    Example:
      >>> inst = random_instances(jax.random.key(1), num_instances=1000, num_outcomes=4)
      >>> int(theorem2_census(inst, criterion_atol=1e-9).tilt_failures)
      0
    """
    st = jax.vmap(theorem2_status)(*instances)
    stated = (st.cov_r_A > 0) & (st.cov_r_U < 0)
    tilted = (st.cov_w_A > 0) & (st.cov_w_U < 0)
    gap = st.tpm_A - instances.alpha
    below = gap < 0
    decided = jnp.abs(gap) > criterion_atol
    disagree = decided & ((gap > 0) != (st.cov_w_A - st.cov_w_U > 0))
    return Theorem2Census(
        jnp.asarray(gap.shape[0]),
        jnp.sum(stated),
        jnp.sum(stated & below),
        jnp.sum(tilted),
        jnp.sum(tilted & below),
        jnp.min(jnp.where(tilted, gap, jnp.inf)),
        jnp.sum(decided),
        jnp.sum(disagree),
    )


_status_batch = jax.jit(jax.vmap(theorem2_status))


class SearchResult(NamedTuple):
    """Counterexamples to Theorem 2 as stated, found in float32 and re-verified in float64.

    Attributes:
      instances: the searched batch, cast to float64.
      float32_hits: instances with ``margin > 0`` in float32.
      confirmed: ``[K]`` indices whose float64 ``margin`` is also ``> 0``, largest margin first.
      margin: ``[R]`` float64 :attr:`Theorem2Status.margin`.
    """

    instances: MixtureInstances
    float32_hits: int
    confirmed: np.ndarray
    margin: np.ndarray


def search_counterexamples(
    key: jax.Array, *, num_instances: int, num_outcomes: int, zero_fraction: float = 0.0
) -> SearchResult:
    """Return a vmapped random search for counterexamples to Theorem 2 as stated.

    Draws :func:`random_instances` in float32, evaluates :func:`theorem2_status` under ``jit`` +
    ``vmap``, and keeps the hits whose float64 re-evaluation (same instances, cast) also has
    ``margin > 0``: the stated hypotheses hold and ``TPM(A) < alpha``.

    Source: the issue's counterexample search for Theorem 2 (sources 000/001).

    Args:
      key: typed PRNG key; num_instances, num_outcomes, zero_fraction: as in
        :func:`random_instances`.

    Returns:
      :class:`SearchResult`.

    Example:
      >>> res = search_counterexamples(jax.random.key(0), num_instances=20000, num_outcomes=4)
      >>> len(res.confirmed) > 0, bool(np.all(res.margin[res.confirmed] > 0))
      (True, True)
    """
    inst32 = random_instances(
        key,
        num_instances=num_instances,
        num_outcomes=num_outcomes,
        zero_fraction=zero_fraction,
        dtype=jnp.float32,
    )
    status = _status_batch
    hits = np.asarray(status(*inst32).margin > 0)
    inst = jax.tree.map(lambda x: x.astype(jnp.float64), inst32)
    margin = np.asarray(status(*inst).margin)
    ok = np.flatnonzero(hits & (margin > 0))
    return SearchResult(inst, int(hits.sum()), ok[np.argsort(-margin[ok], kind="stable")], margin)
