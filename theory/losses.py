r"""Preference losses of the class :math:`\ell(\ln\pi(y^+|x) - \ln\pi(y^-|x))` and their variants.

One module serves theory, sims and experiments: loss maths appears nowhere else.

Conventions (all losses):

* ``logprob_chosen`` / ``logprob_rejected`` are **summed** response log-probs
  :math:`\ln\pi_\theta(y^\pm|x)` (TRL's ``lp±``); ``ref_logprob_*`` the same under
  :math:`\pi_{\mathrm{ref}}`. Every loss has the uniform signature
  ``loss(logprob_chosen, logprob_rejected, ref_logprob_chosen=0, ref_logprob_rejected=0, *, hyper)``
  and returns the per-pair loss; arguments broadcast, so a batch is an array of pairs (take the
  mean yourself, as Eq. 2's expectation does).
* The **margin** is :math:`u = \ln\pi(y^+|x) - \ln\pi(y^-|x)`; the reference margin
  :math:`u_{\mathrm{ref}}` is absorbed into :math:`\ell` (Razin et al. 2024, Eq. 2).
* For losses of the class (DPO, IPO, SLiC, REBEL, GPO), :math:`\partial L/\partial lp^+ =
  -\partial L/\partial lp^- = \ell'(u)`; :func:`margin_derivative` returns it by autodiff.
  For the SFT-term, weighted, SimPO and DPOP losses use :func:`loss_coefficients`.

Hyperparameters are keyword-only and validated when concrete (``beta must be > 0 ...``); traced
invalid hyperparameters make the affected entries of the loss NaN (the rule of :mod:`theory`), and
so its derivatives (:func:`loss_coefficients`, :func:`margin_derivative`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from theory.checks import (
    all_valid,
    check_bool,
    check_nonnegative,
    check_positive,
    enforce,
    guard,
    is_concrete,
    poison,
    valid_nonnegative,
    valid_positive,
)

PairLoss = Callable[..., jax.Array]


def _hyper(rules: list, name: str, value: Any, *, strict: bool) -> Any:
    """Record the traced rule for ``value`` (``> 0`` if ``strict`` else ``>= 0``) and return the
    guarded value the loss must compute with (:func:`theory.checks.guard`)."""
    if strict:
        valid, rule = valid_positive(value), f"{name} must be > 0 and finite"
    else:
        valid, rule = valid_nonnegative(value), f"{name} must be >= 0 and finite"
    rules.append((valid, rule))
    return guard(value, valid)


def _margins(logprob_chosen, logprob_rejected, ref_logprob_chosen, ref_logprob_rejected):
    """Return (u, u_ref), the policy and reference margins."""
    policy = jnp.asarray(logprob_chosen) - jnp.asarray(logprob_rejected)
    ref = jnp.asarray(ref_logprob_chosen) - jnp.asarray(ref_logprob_rejected)
    return policy, ref


def dpo_loss(
    logprob_chosen: ArrayLike,
    logprob_rejected: ArrayLike,
    ref_logprob_chosen: ArrayLike = 0.0,
    ref_logprob_rejected: ArrayLike = 0.0,
    *,
    beta: float = 0.1,
) -> jax.Array:
    r"""Return the DPO loss of each pair.

    .. math:: \ell(u) = -\ln\sigma\big(\beta\,(u - u_{\mathrm{ref}})\big)

    Source: Rafailov et al. 2023; Razin et al. 2024, App. B (DPO). Its derivative
    :math:`\ell'(u) = -\beta\,\sigma(\beta(u_{\mathrm{ref}} - u)) < 0` everywhere (Razin Lemma 1).

    Args:
      logprob_chosen: summed :math:`\ln\pi_\theta(y^+|x)`, any shape.
      logprob_rejected: summed :math:`\ln\pi_\theta(y^-|x)`, broadcastable.
      ref_logprob_chosen: :math:`\ln\pi_{\mathrm{ref}}(y^+|x)`; default 0 (no reference).
      ref_logprob_rejected: :math:`\ln\pi_{\mathrm{ref}}(y^-|x)`; default 0.
      beta: KL coefficient :math:`\beta > 0` (multiplies the log-ratio margin).

    Returns:
      The per-pair loss, broadcast shape of the inputs.

    Raises:
      ValueError: if ``beta <= 0`` (concrete; a traced ``beta <= 0`` gives NaN where it applies).

    Example:
      >>> float(dpo_loss(0.0, 0.0, beta=0.1))  # sigma(0) = 1/2, so ln 2
      0.6931471...
    """
    check_positive("beta", beta)
    rules: list = []
    beta = _hyper(rules, "beta", beta, strict=True)
    u, u_ref = _margins(logprob_chosen, logprob_rejected, ref_logprob_chosen, ref_logprob_rejected)
    return enforce(-jax.nn.log_sigmoid(beta * (u - u_ref)), rules)


def ipo_loss(
    logprob_chosen: ArrayLike,
    logprob_rejected: ArrayLike,
    ref_logprob_chosen: ArrayLike = 0.0,
    ref_logprob_rejected: ArrayLike = 0.0,
    *,
    tau: float = 0.1,
) -> jax.Array:
    r"""Return the IPO loss of each pair.

    .. math:: \ell(u) = \Big(u - u_{\mathrm{ref}} - \frac{1}{2\tau}\Big)^2

    Source: Azar et al. 2023; Razin et al. 2024, App. B (IPO), summed log-probs.
    Note: TRL's ``ipo`` divides each log-ratio by the response length and names ``tau`` ``beta``;
    with single-token responses the two agree.

    Args:
      logprob_chosen, logprob_rejected, ref_logprob_chosen, ref_logprob_rejected: as in
        :func:`dpo_loss`.
      tau: :math:`\tau > 0`; the target margin is :math:`1/(2\tau)`.

    Returns:
      The per-pair loss.

    Raises:
      ValueError: if ``tau <= 0`` (traced: NaN where it applies).

    Example:
      >>> float(ipo_loss(0.0, 0.0, tau=0.5))  # (0 - 1)^2
      1.0
    """
    check_positive("tau", tau)
    rules: list = []
    tau = _hyper(rules, "tau", tau, strict=True)
    u, u_ref = _margins(logprob_chosen, logprob_rejected, ref_logprob_chosen, ref_logprob_rejected)
    return enforce((u - u_ref - 1.0 / (2.0 * tau)) ** 2, rules)


def slic_loss(
    logprob_chosen: ArrayLike,
    logprob_rejected: ArrayLike,
    ref_logprob_chosen: ArrayLike = 0.0,
    ref_logprob_rejected: ArrayLike = 0.0,
    *,
    delta: float = 1.0,
) -> jax.Array:
    r"""Return the SLiC (hinge) loss of each pair.

    .. math:: \ell(u) = \max\{0,\ \delta - u\}

    Source: Zhao et al. 2023; Razin et al. 2024, App. B (SLiC). Reference-free, as in the paper:
    ``ref_logprob_*`` are accepted for the uniform signature and do not enter the loss.
    :math:`\ell` is differentiable except at :math:`u = \delta` (Razin footnote 2); JAX's
    derivative there is that of ``max`` (0 or -1 by its tie rule).

    Args:
      logprob_chosen, logprob_rejected: as in :func:`dpo_loss`.
      ref_logprob_chosen, ref_logprob_rejected: ignored (reference-free loss).
      delta: margin :math:`\delta > 0`.

    Returns:
      The per-pair loss.

    Raises:
      ValueError: if ``delta <= 0`` (traced: NaN where it applies).

    Example:
      >>> float(slic_loss(-1.0, 0.0, delta=1.0))  # max(0, 1 - (-1))
      2.0
    """
    check_positive("delta", delta)
    rules: list = []
    delta = _hyper(rules, "delta", delta, strict=True)
    del ref_logprob_chosen, ref_logprob_rejected  # reference-free (paper's SLiC)
    u = jnp.asarray(logprob_chosen) - jnp.asarray(logprob_rejected)
    return enforce(jnp.maximum(0.0, delta - u), rules)


def rebel_loss(
    logprob_chosen: ArrayLike,
    logprob_rejected: ArrayLike,
    ref_logprob_chosen: ArrayLike = 0.0,
    ref_logprob_rejected: ArrayLike = 0.0,
    *,
    eta: float = 1.0,
    reward_margin: ArrayLike = 0.0,
) -> jax.Array:
    r"""Return the REBEL loss of each pair.

    .. math::
       \ell(u) = \Big(\frac{1}{\eta}(u - u_{\mathrm{ref}}) - \big(r(x,y^+) - r(x,y^-)\big)\Big)^2

    Source: Gao et al. 2024; Razin et al. 2024, App. B (REBEL).

    Args:
      logprob_chosen, logprob_rejected, ref_logprob_chosen, ref_logprob_rejected: as in
        :func:`dpo_loss`.
      eta: :math:`\eta > 0`.
      reward_margin: :math:`r(x,y^+) - r(x,y^-)` from a reward model, broadcastable.

    Returns:
      The per-pair loss.

    Raises:
      ValueError: if ``eta <= 0`` (traced: NaN where it applies).

    Example:
      >>> float(rebel_loss(1.0, 0.0, eta=2.0, reward_margin=1.0))  # (1/2 - 1)^2
      0.25
    """
    check_positive("eta", eta)
    rules: list = []
    eta = _hyper(rules, "eta", eta, strict=True)
    u, u_ref = _margins(logprob_chosen, logprob_rejected, ref_logprob_chosen, ref_logprob_rejected)
    return enforce(((u - u_ref) / eta - jnp.asarray(reward_margin)) ** 2, rules)


#: GPO's convex, decreasing f (Tang et al. 2024, Table 1). "logistic"/"hinge"/"squared" are DPO,
#: SLiC and IPO, which have their own functions here, so GPO offers the two that are new.
GPO_FUNCTIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "exponential": lambda x: jnp.exp(-x),
    "truncated_quadratic": lambda x: jnp.maximum(0.0, 1.0 - x) ** 2,
}


def gpo_loss(
    logprob_chosen: ArrayLike,
    logprob_rejected: ArrayLike,
    ref_logprob_chosen: ArrayLike = 0.0,
    ref_logprob_rejected: ArrayLike = 0.0,
    *,
    beta: float = 0.1,
    f: str = "exponential",
) -> jax.Array:
    r"""Return the GPO loss of each pair.

    .. math:: \ell(u) = f\big(\beta\,(u - u_{\mathrm{ref}})\big)

    Source: Tang et al. 2024 (GPO); Razin et al. 2024, App. B (GPO).
    Reading: the paper leaves ``f`` open (convex, decreasing near the initial margin); the
    default here is the exponential :math:`f(x) = e^{-x}`; ``"truncated_quadratic"`` gives
    :math:`\max(0, 1-x)^2`. Both are convex and strictly decreasing where the margin starts.

    Args:
      logprob_chosen, logprob_rejected, ref_logprob_chosen, ref_logprob_rejected: as in
        :func:`dpo_loss`.
      beta: :math:`\beta > 0`.
      f: a key of :data:`GPO_FUNCTIONS`.

    Returns:
      The per-pair loss.

    Raises:
      ValueError: if ``beta <= 0`` (traced: NaN where it applies) or ``f`` is unknown.

    Example:
      >>> float(gpo_loss(0.0, 0.0, beta=1.0))  # e^0
      1.0
    """
    check_positive("beta", beta)
    if f not in GPO_FUNCTIONS:
        raise ValueError(f"f must be one of {sorted(GPO_FUNCTIONS)}, got f={f!r}")
    rules: list = []
    beta = _hyper(rules, "beta", beta, strict=True)
    u, u_ref = _margins(logprob_chosen, logprob_rejected, ref_logprob_chosen, ref_logprob_rejected)
    return enforce(GPO_FUNCTIONS[f](beta * (u - u_ref)), rules)


def sft_term_loss(
    logprob_chosen: ArrayLike,
    logprob_rejected: ArrayLike,
    ref_logprob_chosen: ArrayLike = 0.0,
    ref_logprob_rejected: ArrayLike = 0.0,
    *,
    base_loss: PairLoss = dpo_loss,
    sft_coef: float = 1.0,
) -> jax.Array:
    r"""Return a margin loss plus an SFT (negative log-likelihood) term on the chosen response.

    .. math:: \ell(\ln\pi(y^+|x) - \ln\pi(y^-|x)) - \lambda\,\ln\pi(y^+|x)

    Source: Razin et al. 2024, Eq. 4 (App. E; CPO, RPO, BoNBoN). The SFT term is per sequence
    (summed log-prob), as in Eq. 4; TRL's ``sft`` loss is a token mean instead.

    Args:
      logprob_chosen, logprob_rejected, ref_logprob_chosen, ref_logprob_rejected: as in
        :func:`dpo_loss`.
      base_loss: a loss of the class, e.g. ``partial(dpo_loss, beta=0.1)``.
      sft_coef: :math:`\lambda \ge 0`.

    Returns:
      The per-pair loss.

    Raises:
      ValueError: if ``sft_coef < 0`` (traced: NaN where it applies).

    Example:
      >>> float(sft_term_loss(-1.0, -1.0, sft_coef=2.0))  # ln 2 + 2
      2.6931471...
    """
    check_nonnegative("sft_coef", sft_coef)
    rules: list = []
    sft_coef = _hyper(rules, "sft_coef", sft_coef, strict=False)
    margin_part = base_loss(
        logprob_chosen, logprob_rejected, ref_logprob_chosen, ref_logprob_rejected
    )
    return enforce(margin_part - sft_coef * jnp.asarray(logprob_chosen), rules)


def weighted_loss(
    logprob_chosen: ArrayLike,
    logprob_rejected: ArrayLike,
    ref_logprob_chosen: ArrayLike = 0.0,
    ref_logprob_rejected: ArrayLike = 0.0,
    *,
    base_loss: PairLoss = dpo_loss,
    weight_chosen: ArrayLike = 1.0,
    weight_rejected: ArrayLike = 1.0,
) -> jax.Array:
    r"""Return a margin loss of the weighted margin :math:`\lambda^+ lp^+ - \lambda^- lp^-`.

    .. math:: \ell\big(\lambda^+\ln\pi(y^+|x) - \lambda^-\ln\pi(y^-|x)\big)

    Source: Razin et al. 2024, Eq. 5 (App. E; SimPO uses 1/length weights, DPOP
    :math:`\lambda^+ = 1+\lambda` while its penalty is active).
    Reading: Eq. 5 absorbs the reference into :math:`\ell`; here the same weights multiply the
    reference log-probs, so the weighted margin is zero at :math:`\pi_\theta = \pi_{\mathrm{ref}}`
    (this is what DPOP's active hinge gives).

    Args:
      logprob_chosen, logprob_rejected, ref_logprob_chosen, ref_logprob_rejected: as in
        :func:`dpo_loss`.
      base_loss: a loss of the class.
      weight_chosen: :math:`\lambda^+ > 0`, broadcastable (per pair allowed).
      weight_rejected: :math:`\lambda^- > 0`, broadcastable.

    Returns:
      The per-pair loss.

    Raises:
      ValueError: if a weight is not positive (traced: NaN in the pairs it applies to).

    Example:
      >>> float(weighted_loss(0.0, 0.0, weight_chosen=2.0, weight_rejected=1.0))
      0.6931471...
    """
    check_positive("weight_chosen", weight_chosen)
    check_positive("weight_rejected", weight_rejected)
    rules: list = []
    weight_chosen = _hyper(rules, "weight_chosen", weight_chosen, strict=True)
    weight_rejected = _hyper(rules, "weight_rejected", weight_rejected, strict=True)
    w_pos, w_neg = jnp.asarray(weight_chosen), jnp.asarray(weight_rejected)
    loss = base_loss(
        w_pos * jnp.asarray(logprob_chosen),
        w_neg * jnp.asarray(logprob_rejected),
        w_pos * jnp.asarray(ref_logprob_chosen),
        w_neg * jnp.asarray(ref_logprob_rejected),
    )
    return enforce(loss, rules)


def simpo_loss(
    logprob_chosen: ArrayLike,
    logprob_rejected: ArrayLike,
    ref_logprob_chosen: ArrayLike = 0.0,
    ref_logprob_rejected: ArrayLike = 0.0,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    length_chosen: ArrayLike = 1.0,
    length_rejected: ArrayLike = 1.0,
) -> jax.Array:
    r"""Return the SimPO loss of each pair (length-normalised, reference-free, margin ``gamma``).

    .. math:: -\ln\sigma\Big(\frac{\beta}{|y^+|}\ln\pi(y^+|x) - \frac{\beta}{|y^-|}\ln\pi(y^-|x)
              - \gamma\Big)

    Source: Meng et al. 2024 (SimPO, Eq. 6); an instance of Razin et al. 2024 Eq. 5 with
    :math:`\lambda^\pm = \beta/|y^\pm|` and :math:`\ell(u) = -\ln\sigma(u - \gamma)`. ``gamma``
    sits outside ``beta``, as in TRL's CPO trainer. ``ref_logprob_*`` are ignored (reference-free).

    Args:
      logprob_chosen, logprob_rejected: as in :func:`dpo_loss`.
      ref_logprob_chosen, ref_logprob_rejected: ignored.
      beta: :math:`\beta > 0`.
      gamma: target reward margin :math:`\gamma \ge 0`.
      length_chosen: :math:`|y^+| > 0` (tokens), broadcastable.
      length_rejected: :math:`|y^-| > 0`, broadcastable.

    Returns:
      The per-pair loss.

    Raises:
      ValueError: if ``beta <= 0``, ``gamma < 0`` or a length is not positive (traced: NaN in
        the pairs it applies to).

    Example:
      >>> float(simpo_loss(-2.0, -2.0, beta=1.0, gamma=0.0, length_chosen=2.0, length_rejected=2.0))
      0.6931471...
    """
    check_positive("beta", beta)
    check_nonnegative("gamma", gamma)
    check_positive("length_chosen", length_chosen)
    check_positive("length_rejected", length_rejected)
    rules: list = []
    beta = _hyper(rules, "beta", beta, strict=True)
    gamma = _hyper(rules, "gamma", gamma, strict=False)
    length_chosen = _hyper(rules, "length_chosen", length_chosen, strict=True)
    length_rejected = _hyper(rules, "length_rejected", length_rejected, strict=True)
    del ref_logprob_chosen, ref_logprob_rejected  # reference-free
    u = beta * (
        jnp.asarray(logprob_chosen) / jnp.asarray(length_chosen)
        - jnp.asarray(logprob_rejected) / jnp.asarray(length_rejected)
    )
    return enforce(-jax.nn.log_sigmoid(u - gamma), rules)


def dpop_loss(
    logprob_chosen: ArrayLike,
    logprob_rejected: ArrayLike,
    ref_logprob_chosen: ArrayLike = 0.0,
    ref_logprob_rejected: ArrayLike = 0.0,
    *,
    beta: float = 0.1,
    lam: float,
    penalty_inside_beta: bool = True,
) -> jax.Array:
    r"""Return the DPO-Positive (DPOP) loss of each pair.

    .. math:: -\ln\sigma\Big(\beta\big[(lp^+ - lp^+_{\mathrm{ref}}) - (lp^- - lp^-_{\mathrm{ref}})
              - \lambda\max(0,\ lp^+_{\mathrm{ref}} - lp^+)\big]\Big)

    Source: Pal et al. 2024 (Smaug), Eq. 3, with :math:`\lambda \in \{5, 50, 500\}` in the paper.
    Reading: the default puts the penalty inside :math:`\beta[\cdot]` (the paper's Eq. 3);
    ``penalty_inside_beta=False`` gives the source note's form
    :math:`-\ln\sigma(\beta[\Delta] - \lambda\max(0,\cdot))`. While the hinge is active, the default
    is :func:`weighted_loss` with :math:`\lambda^+ = 1+\lambda`, :math:`\lambda^- = 1`.

    Args:
      logprob_chosen, logprob_rejected, ref_logprob_chosen, ref_logprob_rejected: as in
        :func:`dpo_loss`.
      beta: :math:`\beta > 0`.
      lam: penalty coefficient :math:`\lambda \ge 0`, required (the paper tries 5, 50 and 500;
        ``lam=0`` is DPO), as in :func:`theory.dpop.dpop_coefficients` and
        :func:`theory.dpop.position_logit_gradients`.
      penalty_inside_beta: where the penalty sits (see Reading); a real ``bool``.

    Returns:
      The per-pair loss.

    Raises:
      ValueError: if ``beta <= 0`` or ``lam < 0`` (traced: NaN where it applies).
      TypeError: if ``penalty_inside_beta`` is not a bool.

    Example:
      >>> float(dpop_loss(-1.0, -3.0, 0.0, 0.0, beta=1.0, lam=1.0))  # -ln sigma(2 - 1)
      0.3132616...
    """
    check_positive("beta", beta)
    check_nonnegative("lam", lam)
    check_bool("penalty_inside_beta", penalty_inside_beta)
    rules: list = []
    beta = _hyper(rules, "beta", beta, strict=True)
    lam = _hyper(rules, "lam", lam, strict=False)
    u, u_ref = _margins(logprob_chosen, logprob_rejected, ref_logprob_chosen, ref_logprob_rejected)
    penalty = jnp.maximum(0.0, jnp.asarray(ref_logprob_chosen) - jnp.asarray(logprob_chosen))
    if penalty_inside_beta:
        loss = -jax.nn.log_sigmoid(beta * (u - u_ref - lam * penalty))
    else:
        loss = -jax.nn.log_sigmoid(beta * (u - u_ref) - lam * penalty)
    return enforce(loss, rules)


def nll_loss(logprob: ArrayLike) -> jax.Array:
    r"""Return the supervised (cross-entropy) loss :math:`-\ln\pi(y|x)` of each example.

    Source: the SFT phase that precedes preference learning (Razin et al. 2024, §2.1).

    Example:
      >>> float(nll_loss(-0.5))
      0.5
    """
    return -jnp.asarray(logprob)


#: Losses by name. The first five are Razin et al.'s class ``ell(margin)``.
LOSSES: dict[str, PairLoss] = {
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "slic": slic_loss,
    "rebel": rebel_loss,
    "gpo": gpo_loss,
    "sft_term": sft_term_loss,
    "weighted": weighted_loss,
    "simpo": simpo_loss,
    "dpop": dpop_loss,
}
MARGIN_CLASS = ("dpo", "ipo", "slic", "rebel", "gpo")


class _Open:
    """Marker of a numeric hyperparameter left open (bound at run time)."""

    def __repr__(self) -> str:
        return "<run-time value>"


_OPEN = _Open()


def _is_number(value: Any) -> bool:
    """A numeric hyperparameter (float, int, NumPy/JAX scalar or array), not a bool or a loss."""
    if isinstance(value, bool | np.bool_) or callable(value) or value is _OPEN:
        return False
    return isinstance(value, int | float | np.generic | np.ndarray | jax.Array)


def _hash_key(value: Any) -> Any:
    """A hashable stand-in for a hyperparameter value (arrays by content; tracers by identity)."""
    if isinstance(value, BoundLoss) or callable(value):
        return value
    if isinstance(value, jax.core.Tracer):
        return ("tracer", id(value))
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        arr = np.asarray(value)
        return (arr.shape, str(arr.dtype), arr.tobytes())
    return value


@dataclasses.dataclass(frozen=True, eq=False)
class BoundLoss:
    """A pair loss of :data:`LOSSES` with its hyperparameters bound (from :func:`make_loss`).

    Callable as the loss itself, ``loss(logprob_chosen, logprob_rejected, ref_logprob_chosen,
    ref_logprob_rejected)``. Two ``BoundLoss`` objects with the same ``loss_type`` and equal
    hyperparameters are equal and hash alike, so the compiled flows of :mod:`sims.flows.core`,
    which take
    the loss as a static argument, compile once per distinct loss rather than once per object.

    Attributes:
      loss_type: a key of :data:`LOSSES`.
      hyper: ``(name, value)`` pairs, sorted by name.
    """

    loss_type: str
    hyper: tuple[tuple[str, Any], ...]

    @property
    def fn(self) -> PairLoss:
        """The unbound loss function ``LOSSES[loss_type]``."""
        return LOSSES[self.loss_type]

    @property
    def keywords(self) -> dict[str, Any]:
        """The bound hyperparameters as a dict."""
        return dict(self.hyper)

    def __call__(
        self,
        logprob_chosen: ArrayLike,
        logprob_rejected: ArrayLike,
        ref_logprob_chosen: ArrayLike = 0.0,
        ref_logprob_rejected: ArrayLike = 0.0,
    ) -> jax.Array:
        return self.fn(
            logprob_chosen,
            logprob_rejected,
            ref_logprob_chosen,
            ref_logprob_rejected,
            **self.keywords,
        )

    def numbers(self) -> dict[str, Any]:
        """The numeric hyperparameters (``beta``, ``tau``, ``lam``, ...), by name.

        These are run-time values of a compiled flow (:class:`sims.flows.core.Flow`): a sweep over
        ``beta`` compiles once. Booleans and functions (``base_loss``) are structure.

        Example:
          >>> make_loss("dpop", beta=0.5, lam=2.0).numbers()
          {'beta': 0.5, 'lam': 2.0}
        """
        return {k: v for k, v in self.hyper if _is_number(v)}

    def structure(self) -> BoundLoss:
        """This loss with its numeric hyperparameters left open: equal for every ``beta``.

        Bind values with :meth:`with_numbers`.

        Example:
          >>> make_loss("dpo", beta=0.1).structure() == make_loss("dpo", beta=9.0).structure()
          True
        """
        return BoundLoss(
            self.loss_type,
            tuple((k, _OPEN if _is_number(v) else v) for k, v in self.hyper),
        )

    def with_numbers(self, numbers: dict[str, Any]) -> BoundLoss:
        """This loss with the numeric hyperparameters ``numbers`` (traced values allowed).

        Raises:
          ValueError: ``numbers`` names a hyperparameter the loss has no numeric slot for, or
            leaves one open.
        """
        slots = {k for k, v in self.hyper if v is _OPEN or _is_number(v)}
        if set(numbers) != slots:
            raise ValueError(
                f"numbers must give exactly the numeric hyperparameters {sorted(slots)} of "
                f"{self.loss_type}, got {sorted(numbers)}"
            )
        return BoundLoss(self.loss_type, tuple((k, numbers.get(k, v)) for k, v in self.hyper))

    def _key(self) -> tuple:
        return (self.loss_type, tuple((k, _hash_key(v)) for k, v in self.hyper))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BoundLoss) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyper)
        return f"make_loss({self.loss_type!r}{', ' if args else ''}{args})"


def make_loss(loss_type: str, **hyper) -> BoundLoss:
    """Return ``LOSSES[loss_type]`` with its hyperparameters bound and validated now.

    ``sft_term`` and ``weighted`` take ``base_loss`` as a name or a callable. Hyperparameters
    without a default (``dpop``'s ``lam``) must be given.

    Raises:
      ValueError: unknown ``loss_type``; unknown, missing or invalid hyperparameter, including a
        flag that is not a real ``bool`` (``penalty_inside_beta="no"``), named in the message.

    Example:
      >>> loss = make_loss("dpo", beta=0.5)
      >>> float(loss(0.0, 0.0))
      0.6931471...
      >>> loss == make_loss("dpo", beta=0.5)  # equal by value: compiled flows are reused
      True
    """
    if loss_type not in LOSSES:
        raise ValueError(f"loss_type must be one of {sorted(LOSSES)}, got loss_type={loss_type!r}")
    if isinstance(hyper.get("base_loss"), str):
        base = hyper["base_loss"]
        if base not in MARGIN_CLASS:
            raise ValueError(f"base_loss must be one of {MARGIN_CLASS}, got base_loss={base!r}")
        hyper["base_loss"] = LOSSES[base]
    fn = LOSSES[loss_type]
    try:
        fn(0.0, 0.0, 0.0, 0.0, **hyper)  # validates the hyperparameters eagerly
    except TypeError as err:
        raise ValueError(f"bad hyperparameters for loss_type={loss_type!r}: {err}") from None
    return BoundLoss(loss_type, tuple(sorted(hyper.items())))


def mean_pair_loss(
    loss: PairLoss,
    logprob_chosen: ArrayLike,
    logprob_rejected: ArrayLike,
    ref_logprob_chosen: ArrayLike = 0.0,
    ref_logprob_rejected: ArrayLike = 0.0,
    *,
    weight: ArrayLike | None = None,
) -> jax.Array:
    r"""Return the (weighted) mean pair loss :math:`L = \sum_i w_i\,\ell_i / \sum_i w_i`.

    .. math:: \mathcal L(\theta) = \mathbb E_{(x, y^+, y^-)\sim\mathcal D}
              \big[\ell_{x,y^+,y^-}(\ln\pi_\theta(y^+|x) - \ln\pi_\theta(y^-|x))\big]

    Source: Razin et al. 2024, Eq. 2 (the expectation over the data set is the mean over its
    pairs). ``weight`` (default: all 1) lets padded pairs of weight 0 drop out, so data sets of
    different sizes stack on one ``vmap`` axis. The one place the package averages pair losses.

    Args:
      loss: a per-pair loss (e.g. ``make_loss("dpo", beta=0.1)``).
      logprob_chosen, logprob_rejected: ``[N]`` summed response log-probs.
      ref_logprob_chosen, ref_logprob_rejected: ``[N]`` reference log-probs.
      weight: ``[N]`` non-negative sample weights with a positive sum, or ``None``.

    Returns:
      Scalar loss (NaN if a traced ``weight`` breaks the rule).

    Raises:
      ValueError: a concrete ``weight`` with a negative or non-finite entry, or summing to 0.

    Example:
      >>> loss = make_loss("dpo", beta=1.0)
      >>> float(mean_pair_loss(loss, jnp.zeros(2), jnp.zeros(2), weight=jnp.array([1.0, 0.0])))
      0.6931471...
    """
    if weight is not None:
        check_nonnegative("weight", weight)
        if is_concrete(weight) and not np.sum(np.asarray(weight)) > 0:
            raise ValueError("weight must have a positive sum (some pair of weight > 0), got 0")
    per_pair = loss(logprob_chosen, logprob_rejected, ref_logprob_chosen, ref_logprob_rejected)
    if weight is None:
        return jnp.mean(per_pair)
    valid = all_valid(valid_nonnegative(weight))
    weight = jnp.asarray(guard(weight, valid), per_pair.dtype)
    mean = jnp.sum(weight * per_pair) / jnp.sum(weight)
    return poison(mean, valid, "weight must be >= 0 and finite")


class LossCoefficients(NamedTuple):
    r"""Signed weights of :math:`\nabla lp^\pm` in :math:`-\nabla L`.

    ``coef_chosen`` :math:`= -\partial L/\partial lp^+`;
    ``coef_rejected`` :math:`= \partial L/\partial lp^-`.
    """

    coef_chosen: jax.Array
    coef_rejected: jax.Array


def loss_coefficients(
    loss: PairLoss,
    logprob_chosen: ArrayLike,
    logprob_rejected: ArrayLike,
    ref_logprob_chosen: ArrayLike = 0.0,
    ref_logprob_rejected: ArrayLike = 0.0,
) -> LossCoefficients:
    r"""Return :math:`(a^+, a^-)` with :math:`-\nabla_\theta L = a^+\nabla lp^+ - a^-\nabla lp^-`.

    .. math:: a^+ = -\frac{\partial L}{\partial lp^+},\qquad a^- = \frac{\partial L}{\partial lp^-}

    Source: chain rule; for the class, :math:`a^+ = a^- = -\ell'(u)` (Razin et al. 2024, Eq. 7).
    Elementwise over a batch of pairs.

    Example:
      >>> a = loss_coefficients(make_loss("dpo", beta=1.0), 0.0, 0.0)
      >>> float(a.coef_chosen), float(a.coef_rejected)  # sigma(0) = 1/2
      (0.5, 0.5)
    """
    grad_c, grad_r = jax.grad(
        lambda c, r: jnp.sum(loss(c, r, ref_logprob_chosen, ref_logprob_rejected)), (0, 1)
    )(
        jnp.asarray(logprob_chosen, dtype=jnp.result_type(float)),
        jnp.asarray(logprob_rejected, dtype=jnp.result_type(float)),
    )
    return LossCoefficients(-grad_c, grad_r)


def margin_derivative(
    loss: PairLoss,
    logprob_chosen: ArrayLike,
    logprob_rejected: ArrayLike,
    ref_logprob_chosen: ArrayLike = 0.0,
    ref_logprob_rejected: ArrayLike = 0.0,
) -> jax.Array:
    r"""Return :math:`\ell'(u)` at the current margin, for a loss of the class.

    .. math:: \ell'(u) = \frac{\partial L}{\partial lp^+} = -\frac{\partial L}{\partial lp^-}

    Source: Razin et al. 2024, Eq. 2 and the definition of :math:`\ell'(t)` in App. D.
    Only meaningful for :data:`MARGIN_CLASS` losses (for the others the two partials differ; use
    :func:`loss_coefficients`). Negative for DPO (Lemma 1).

    Example:
      >>> float(margin_derivative(make_loss("dpo", beta=2.0), 0.0, 0.0))  # -beta * sigma(0)
      -1.0
    """
    return -loss_coefficients(
        loss, logprob_chosen, logprob_rejected, ref_logprob_chosen, ref_logprob_rejected
    ).coef_chosen
