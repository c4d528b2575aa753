r"""Theorem 2 of sources 000/001 (the KL optimum of a mixture keeps its aligned mass): the checks.

The KL-regularised optimum of :math:`p_{ref} = \alpha p_A + (1-\alpha) p_U` is the tilt
:math:`p^* \propto p_{ref}\,e^{r/\beta}` (:mod:`theory.kl_optimum`). Pieces of the experiment that
checks Theorem 2 and its corrections:

* :func:`stated_theorem_check`: a float32 random search for counterexamples to Theorem 2 as
  stated, confirmed in float64, one made exact in rationals (:mod:`theory.kl_exact`);
  :func:`exact_record` writes that instance as JSON-ready strings;
* :func:`corrected_theorem_check`: the census of the corrected theorem and the residual-mass
  bound on random float64 instances (:func:`theorem2_checks` runs both);
* :func:`beta_sweep` (aligned mass over :math:`\beta`), :func:`amplification` (unaligned mass under
  temperature and logit extrapolation, :mod:`theory.logit_arithmetic`), :func:`tilt_flow`
  (gradient flow of the KL objective reaching the tilt).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from sims.models.tabular import TabularPolicy, kl_objective_flow
from theory.kl_counterexample import (
    SearchResult,
    Theorem2Census,
    random_instances,
    search_counterexamples,
    theorem2_census,
)
from theory.kl_exact import RationalInstance, rational_counterexample
from theory.kl_optimum import residual_mass_bound, total_probability_mass
from theory.logit_arithmetic import arithmetic_mass

#: TPM(U) computed via logsumexp vs the bound via one exp: rounding of a few ulps (equality cases).
BOUND_RTOL = 1e-12
#: |TPM(A) - alpha| above this is a decided sign for the criterion check (float64 rounding ~1e-16).
CRITERION_ATOL = 1e-9
#: Float64-confirmed hits tried, best margin first, when rounding a counterexample to rationals.
MAX_CANDIDATES = 50


class StatedTheoremCheck(NamedTuple):
    """Counterexamples to Theorem 2 as stated.

    Attributes:
      search: the float32 search, confirmed in float64
        (:class:`theory.kl_counterexample.SearchResult`).
      counterexample: one confirmed hit rounded to rationals that still violates the theorem
        exactly (:class:`theory.kl_exact.RationalInstance`).
    """

    search: SearchResult
    counterexample: RationalInstance


def stated_theorem_check(
    key: jax.Array,
    *,
    num_instances: int,
    num_outcomes: int,
    zero_fraction: float,
    denominator: int,
    reward_grid: int,
) -> StatedTheoremCheck:
    r"""Return a search for counterexamples to Theorem 2 as stated and one exact counterexample.

    .. math:: \mathrm{Cov}(r, p_A) > 0 > \mathrm{Cov}(r, p_U) \ \not\Rightarrow\
       \mathrm{TPM}(A) \ge \alpha

    :func:`theory.kl_counterexample.search_counterexamples` (float32, confirmed in float64), then
    :func:`theory.kl_exact.rational_counterexample` on the best :data:`MAX_CANDIDATES` hits:
    ``alpha``, ``p_A``, ``p_U`` in multiples of ``1/denominator``, :math:`r/\beta` in multiples of
    ``1/reward_grid``, :math:`\beta = 1`.

    Source: sources 000/001, Theorem 2 (refuted as stated).

    Raises:
      ValueError: no hit confirmed in float64, or none survives rounding; as the functions named.
    """
    search = search_counterexamples(
        key, num_instances=num_instances, num_outcomes=num_outcomes, zero_fraction=zero_fraction
    )
    if len(search.confirmed) == 0:
        raise ValueError(
            f"no float64-confirmed counterexample in num_instances={num_instances}: search more"
        )
    ce = rational_counterexample(
        search.instances,
        search.confirmed[:MAX_CANDIDATES],
        denominator=denominator,
        reward_grid=reward_grid,
    )
    return StatedTheoremCheck(search, ce)


def float_instance(instance: RationalInstance) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(alpha, p_A, p_U, r)`` of a rational instance as floats (its ``beta`` is 1).

    Example:
      >>> from fractions import Fraction as F
      >>> inst = RationalInstance(0, F(1, 2), [F(1, 4), F(3, 4)], [F(1), F(0)], [F(-1, 2), F(1)],
      ...                         F(1), None)
      >>> float_instance(inst)[3].tolist()
      [-0.5, 1.0]
    """
    arrays = (np.array([float(v) for v in x]) for x in (instance.p_A, instance.p_U, instance.r))
    return (float(instance.alpha), *arrays)


def _strs(x: Any) -> Any:
    return [str(v) for v in x] if isinstance(x, list) else str(x)


def exact_record(check: StatedTheoremCheck) -> dict[str, dict[str, Any]]:
    """Return ``{"search": ..., "counterexample": ...}``, JSON-ready (exact values as strings).

    ``search``: ``instances``, ``float32_hits``, ``float64_confirmed``, ``best_float64_margin``.
    ``counterexample``: ``alpha``, ``p_A``, ``p_U``, ``r``, ``beta``, ``cov_r_A``, ``cov_r_U`` as
    fraction strings (``"3/20"``); the rigorous bounds ``m_A``, ``m_U``, ``tpm_A`` as float pairs
    ``[lo, hi]``; ``search_index``; ``tpm_A_upper_minus_alpha``; ``violates_stated_theorem``.

    Example:
      >>> from theory.kl_counterexample import MixtureInstances
      >>> inst = MixtureInstances(jnp.array([0.85]), jnp.array([[0.0, 0.1, 0.9]]),
      ...     jnp.array([[0.55, 0.3, 0.15]]), jnp.array([[-4.0, 4.5, 2.5]]), jnp.array([1.0]))
      >>> ce = rational_counterexample(inst, [0], denominator=20, reward_grid=2)
      >>> search = SearchResult(inst, 1, np.array([0]), np.array([0.01]))
      >>> rec = exact_record(StatedTheoremCheck(search, ce))
      >>> rec["counterexample"]["p_A"], rec["counterexample"]["cov_r_A"]
      (['0', '1/10', '9/10'], '17/30')
    """
    search, ce = check
    return {
        "search": {
            "instances": int(search.margin.shape[0]),
            "float32_hits": search.float32_hits,
            "float64_confirmed": len(search.confirmed),
            "best_float64_margin": float(search.margin[search.confirmed[0]]),
        },
        "counterexample": {
            **{k: _strs(getattr(ce, k)) for k in ("alpha", "p_A", "p_U", "r", "beta")},
            **{k: _strs(getattr(ce.check, k)) for k in ("cov_r_A", "cov_r_U")},
            **{k: [float(v) for v in getattr(ce.check, k)] for k in ("m_A", "m_U", "tpm_A")},
            "search_index": ce.index,
            "tpm_A_upper_minus_alpha": float(ce.check.tpm_A[1] - ce.alpha),
            "violates_stated_theorem": ce.check.violates_stated_theorem,
        },
    }


class ResidualCheck(NamedTuple):
    """The residual-mass bound against the true unaligned mass of the optimum.

    Attributes:
      tpm_U: ``[R]`` unaligned mass of the optimum, :math:`\\mathrm{TPM}(U)`.
      bound: ``[R]`` the residual-mass lower bound on it.
      violations: instances with ``tpm_U < bound * (1 - BOUND_RTOL)``.
      min_ratio: smallest ``tpm_U / bound``.
    """

    tpm_U: np.ndarray
    bound: np.ndarray
    violations: int
    min_ratio: float

    def head(self, n: int) -> ResidualCheck:
        """Return the check with the first ``n`` instances' ``tpm_U`` and ``bound`` (a figure's
        points); ``violations`` and ``min_ratio`` stay over every instance."""
        return self._replace(tpm_U=self.tpm_U[:n], bound=self.bound[:n])


class CorrectedTheoremCheck(NamedTuple):
    """The corrected Theorem 2 and the residual-mass bound on random instances.

    Attributes:
      census: :class:`theory.kl_counterexample.Theorem2Census` of Python numbers
        (``criterion_atol`` = :data:`CRITERION_ATOL`).
      residual: :class:`ResidualCheck`.
    """

    census: Theorem2Census
    residual: ResidualCheck


def corrected_theorem_check(
    key: jax.Array, *, num_instances: int, num_outcomes: int, zero_fraction: float
) -> CorrectedTheoremCheck:
    r"""Return the census of the corrected Theorem 2 and the residual-mass bound, float64.

    .. math:: \mathrm{Cov}(e^{r/\beta}, p_A) > 0 > \mathrm{Cov}(e^{r/\beta}, p_U) \Rightarrow
       \mathrm{TPM}(A) \ge \alpha, \qquad \mathrm{TPM}(U) \ge (1-\alpha)\,
       e^{(r^U_{\min} - r_{\max})/\beta}

    on :func:`theory.kl_counterexample.random_instances` (float64: needs ``jax_enable_x64``).

    Source: sources 000/001, Theorem 2 with the hypotheses its proof uses; the residual bound
    :func:`theory.kl_optimum.residual_mass_bound`.

    Raises:
      ValueError: as :func:`theory.kl_counterexample.random_instances`.
    """
    checks = random_instances(
        key, num_instances=num_instances, num_outcomes=num_outcomes, zero_fraction=zero_fraction
    )
    census = theorem2_census(checks, criterion_atol=CRITERION_ATOL)
    census = Theorem2Census(*(np.asarray(v).item() for v in census))  # Python numbers
    tpm_U = np.asarray(_batched(total_probability_mass)(*checks).tpm_U)
    bound = np.asarray(_batched(residual_mass_bound)(*checks))
    violations = int(np.sum(tpm_U < bound * (1 - BOUND_RTOL)))
    residual = ResidualCheck(tpm_U, bound, violations, float(np.min(tpm_U / bound)))
    return CorrectedTheoremCheck(census, residual)


class Theorem2Checks(NamedTuple):
    """Theorem 2 as stated (refuted) and corrected (:func:`theorem2_checks`)."""

    stated: StatedTheoremCheck
    corrected: CorrectedTheoremCheck


def theorem2_checks(
    key: jax.Array,
    *,
    search_instances: int,
    corrected_instances: int,
    num_outcomes: int,
    zero_fraction: float,
    denominator: int,
    reward_grid: int,
    log: Callable[[str], None] = print,
) -> Theorem2Checks:
    """Return :func:`stated_theorem_check` and :func:`corrected_theorem_check` on split keys.

    ``key`` is split in two (search, census); ``log`` receives one progress line after each.

    Raises:
      ValueError: as the two checks.
    """
    key_search, key_check = jax.random.split(key)
    common = dict(num_outcomes=num_outcomes, zero_fraction=zero_fraction)
    stated = stated_theorem_check(
        key_search,
        num_instances=search_instances,
        denominator=denominator,
        reward_grid=reward_grid,
        **common,
    )
    search = stated.search
    log(f"search: {search.float32_hits} float32 hits, {len(search.confirmed)} in float64")
    corrected = corrected_theorem_check(key_check, num_instances=corrected_instances, **common)
    census = corrected.census
    log(f"corrected: {census.tilt_conditions} meet it, {census.tilt_failures} fail")
    return Theorem2Checks(stated, corrected)


@cache
def _batched(fn):
    """jit(vmap(fn)), one compiled function per library function across calls."""
    return jax.jit(jax.vmap(fn))


class BetaSweep(NamedTuple):
    """Aligned mass of the optimum over a grid of :math:`\\beta`.

    Attributes:
      alpha: the mixture weight (the level Theorem 2 claims).
      tpm_A: ``[B]`` :math:`\\mathrm{TPM}(A)` per :math:`\\beta`.
      upper_bound: ``[B]`` one minus the residual-mass bound (an upper bound on it).
    """

    alpha: float
    tpm_A: jax.Array
    upper_bound: jax.Array


def beta_sweep(
    alpha: float, p_A: ArrayLike, p_U: ArrayLike, r: ArrayLike, betas: ArrayLike
) -> BetaSweep:
    r"""Return :math:`\mathrm{TPM}(A)` and its upper bound :math:`1 - \text{residual bound}` per
    :math:`\beta` of ``betas`` ``[B]`` (one compiled, vmapped pass).

    Source: sources 000/001, Theorem 2's quantity; :func:`theory.kl_optimum.total_probability_mass`
    and :func:`~theory.kl_optimum.residual_mass_bound`.

    Example:
      >>> s = beta_sweep(0.5, jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]), jnp.array([1.0, 0.0]),
      ...                jnp.array([1e3]))
      >>> round(float(s.tpm_A[0]), 3)  # beta -> infinity: the reference, TPM(A) = alpha
      0.5
    """
    tpm, upper = _beta_sweep(alpha, p_A, p_U, r, jnp.asarray(betas))
    return BetaSweep(alpha, tpm, upper)


@jax.jit
@partial(jax.vmap, in_axes=(None, None, None, None, 0))
def _beta_sweep(alpha, p_A, p_U, r, beta):
    args = (alpha, p_A, p_U, r, beta)
    return total_probability_mass(*args).tpm_A, 1 - residual_mass_bound(*args)


class Amplification(NamedTuple):
    """Unaligned mass of the tuned model under temperature and logit extrapolation.

    Attributes:
      temperatures: ``[T]`` sampling temperatures.
      tpm_U_temperature: ``[T]`` :math:`\\mathrm{TPM}(U)` of :math:`\\mathrm{softmax}(l_\\theta/T)`.
      gammas: ``[G]`` extrapolation coefficients.
      tpm_U_gamma: ``[G]`` :math:`\\mathrm{TPM}(U)` of
        :math:`\\mathrm{softmax}((1+\\gamma) l_\\theta - \\gamma l_{ref})`.
      tpm_U_reference: :math:`1 - \\alpha`, the reference's unaligned mass.
    """

    temperatures: jax.Array
    tpm_U_temperature: jax.Array
    gammas: jax.Array
    tpm_U_gamma: jax.Array
    tpm_U_reference: float


def amplification(
    alpha: float,
    p_A: ArrayLike,
    p_U: ArrayLike,
    r: ArrayLike,
    beta: float,
    *,
    temperatures: ArrayLike,
    gammas: ArrayLike,
) -> Amplification:
    r"""Return the unaligned mass of the tuned model (the tilt) under logit arithmetic.

    .. math:: p_{a,b} = \mathrm{softmax}(a\,l_\theta - b\,l_{ref}): \quad
       \text{temperature } T: (a, b) = (1/T, 0), \qquad \text{extrapolation } \gamma:
       (a, b) = (1+\gamma, \gamma)

    (:func:`theory.logit_arithmetic.arithmetic_mass`; one compiled, vmapped pass for both).

    Source: sources 000/001, the amplification of the residual unaligned mass by decoding.

    Raises:
      ValueError: as :func:`theory.kl_optimum.total_probability_mass` (checked on the instance).

    Example:
      >>> a = amplification(0.5, jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]),
      ...                   jnp.array([1.0, 0.0]), 1.0, temperatures=jnp.array([1.0]),
      ...                   gammas=jnp.array([-1.0]))
      >>> round(float(a.tpm_U_gamma[0]), 6)  # gamma = -1 samples the reference: 1 - alpha
      0.5
    """
    total_probability_mass(alpha, p_A, p_U, r, beta)  # validates the instance
    temps, gammas = jnp.asarray(temperatures), jnp.asarray(gammas)
    # temperature T is (a, b) = (1/T, 0); extrapolation gamma is (1 + gamma, gamma): one batch
    a_all = jnp.concatenate([1 / temps, 1 + gammas])
    b_all = jnp.concatenate([jnp.zeros_like(temps), gammas])
    amp = _amplification(alpha, p_A, p_U, r, beta, a_all, b_all)
    n = temps.shape[0]
    return Amplification(temps, amp[:n], gammas, amp[n:], 1 - alpha)


@jax.jit
@partial(jax.vmap, in_axes=(None, None, None, None, None, 0, 0))
def _amplification(alpha, p_A, p_U, r, beta, a, b):
    return arithmetic_mass(alpha, p_A, p_U, r, beta, a=a, b=b).tpm_U


class TiltFlow(NamedTuple):
    """Distances to the tilt along the gradient flow of the KL objective.

    Attributes:
      t: ``[C + 1]`` flow times of the checkpoints.
      total_variation: ``[C + 1]`` total variation from the policy to the tilt.
      kl: ``[C + 1]`` :math:`KL(p_t\\|p^*)`.
    """

    t: jax.Array
    total_variation: jax.Array
    kl: jax.Array


def tilt_flow(
    alpha: float,
    p_A: ArrayLike,
    p_U: ArrayLike,
    r: ArrayLike,
    *,
    beta: float,
    dt: float,
    num_steps: int,
    record_every: int,
) -> TiltFlow:
    r"""Return the distances to the tilt along the gradient flow of the KL objective.

    :func:`sims.models.tabular.kl_objective_flow` from uniform logits on
    :math:`p_{ref} = \alpha p_A + (1-\alpha)p_U` (observables
    :class:`sims.models.tabular.TiltDistance`).

    Source: sources 000/001, Eq. 1 and Lemma 1.

    Raises:
      ValueError: as :func:`sims.models.tabular.kl_objective_flow`.
    """
    p_A, p_U, r = (jnp.asarray(x) for x in (p_A, p_U, r))
    p_ref = alpha * p_A + (1 - alpha) * p_U
    res = kl_objective_flow(
        TabularPolicy(logits=jnp.zeros_like(p_ref)),
        p_ref,
        r,
        beta=beta,
        dt=dt,
        num_steps=num_steps,
        record_every=record_every,
    ).run()
    return TiltFlow(res.t, res.observables.total_variation, res.observables.kl)
