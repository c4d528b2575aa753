r"""Single-token closed forms (Razin et al. 2024, Theorems 4-5) vs autodiff and the simulated flow.

:func:`single_token_instance` draws random instances (half of them displacement-prone);
:func:`single_token_velocity_check` computes every token's velocity by the closed form, by autodiff
of the actual loss and by a central difference of the simulated flow; :func:`velocity_errors`
summarises their agreement.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sims.analysis.summaries import relative_error, sign_agreement
from sims.flows.core import flow_fn
from sims.models.unconstrained import softmax_logprobs
from sims.protocols.theory_checks._validation import check_int_at_least
from theory import losses as _losses
from theory.checks import check_positive
from theory.single_token import logprob_velocity

#: Sign of a closed-form entry vs autodiff counts where |autodiff| > this x max_z |autodiff|
#: (above float64 round-off of the jvp).
AUTODIFF_SIGN_TOL = 1e-6
#: Sign vs the central difference counts where |autodiff| > this x max_z |autodiff|: above the
#: O(dt^2) truncation error of the difference (up to ~1e-4 relative at step 1e-5).
FD_SIGN_TOL = 1e-3


class SingleTokenInstance(NamedTuple):
    """One random single-token instance (float arrays in the default dtype).

    Attributes:
      W: ``[V, d]`` unembeddings.
      h: ``[d]`` hidden embedding of the prompt.
      y_pos: scalar int, the preferred token.
      y_neg: scalar int, the dispreferred token (``!= y_pos``).
      ref_logprobs: ``[2]`` reference log-probs of ``y_pos`` and ``y_neg``.
    """

    W: jax.Array
    h: jax.Array
    y_pos: jax.Array
    y_neg: jax.Array
    ref_logprobs: jax.Array


def single_token_instance(
    key: jax.Array, *, vocab_size: int, hidden_size: int, scales: Sequence[float]
) -> SingleTokenInstance:
    r"""Return a random single-token instance; half of them are displacement-prone.

    Rows of ``W`` are :math:`\mathcal N(0, s^2/d)` and ``h`` is :math:`\mathcal N(0, s^2)` with
    the scale ``s`` drawn from ``scales``; ``y_neg != y_pos`` uniformly. With probability 1/2
    the geometry is made displacement-prone (Theorem 4: large
    :math:`\langle W_{y^+}, W_{y^-}\rangle`, small :math:`\|h\|`): :math:`W_{y^-} \leftarrow
    1.2 W_{y^+} + 0.3 W_{y^-}` and :math:`h \leftarrow 0.1 h/\sqrt d`. Reference log-probs are
    :math:`\mathcal N(-2, 1)`. Jit- and vmap-safe (``vocab_size``, ``hidden_size`` and ``scales``
    static).

    Example:
      >>> inst = single_token_instance(jax.random.key(0), vocab_size=5, hidden_size=3,
      ...                              scales=(1.0,))
      >>> inst.W.shape, inst.h.shape, bool(inst.y_pos != inst.y_neg)
      ((5, 3), (3,), True)
    """
    V, d = vocab_size, hidden_size
    kW, kh, kp, kn, kr, ks, ka = jax.random.split(key, 7)
    scale = jax.random.choice(ks, jnp.asarray(scales))
    W = scale * jax.random.normal(kW, (V, d)) / jnp.sqrt(d)
    h = scale * jax.random.normal(kh, (d,))
    y_pos = jax.random.randint(kp, (), 0, V)
    y_neg = (y_pos + jax.random.randint(kn, (), 1, V)) % V
    aligned = jax.random.bernoulli(ka)  # displacement-prone geometry (Theorem 4)
    W = W.at[y_neg].set(jnp.where(aligned, 1.2 * W[y_pos] + 0.3 * W[y_neg], W[y_neg]))
    h = jnp.where(aligned, 0.1 * h / jnp.sqrt(d), h)
    return SingleTokenInstance(W, h, y_pos, y_neg, jax.random.normal(kr, (2,)) - 2.0)


class VelocityCheck(NamedTuple):
    """Velocities :math:`\\frac{d}{dt}\\ln\\pi(z|x)` of ``N`` instances by three methods.

    Attributes:
      closed_form: ``[N, V]`` the closed form (:func:`theory.single_token.logprob_velocity`).
      autodiff: ``[N, V]`` ``jvp`` of the log-probs along ``-grad L`` of the actual loss.
      finite_difference: ``[N, V]`` central difference over one Euler step of the simulated flow
        and one of the time-reversed flow.
      y_pos: ``[N]`` preferred tokens.
      y_neg: ``[N]`` dispreferred tokens.
    """

    closed_form: np.ndarray
    autodiff: np.ndarray
    finite_difference: np.ndarray
    y_pos: np.ndarray
    y_neg: np.ndarray


def single_token_velocity_check(
    keys: jax.Array,
    *,
    loss: _losses.PairLoss,
    vocab_size: int,
    hidden_size: int,
    scales: Sequence[float],
    fd_step: float,
) -> VelocityCheck:
    r"""Return closed-form, autodiff and finite-difference velocities on random instances.

    .. math:: \frac{d}{dt}\ln\pi(z|x) = \langle\nabla_\theta\ln\pi(z|x),
       -\nabla_\theta\ell\rangle \approx
       \frac{\ln\pi_{\theta_{+\delta}}(z|x) - \ln\pi_{\theta_{-\delta}}(z|x)}{2\delta}

    One instance per key (:func:`single_token_instance`), ``\theta = (W, h)``, loss ``loss`` at the
    instance's reference log-probs; :math:`\theta_{\pm\delta}` is one Euler step of flow time
    ``fd_step`` of the flow and of the time-reversed flow (:func:`sims.flows.core.flow_fn`).
    Compiled once per ``(loss, vocab_size, hidden_size, scales)`` and number of keys.

    Source: Razin et al. 2024, Theorems 4-5 (App. D.1), checked against autodiff of Eq. 2's loss.

    Args:
      keys: ``[N]`` typed keys, one per instance.
      loss: a pair loss of the margin class (:func:`theory.losses.make_loss`).
      vocab_size: ``V >= 2``.
      hidden_size: ``d >= 1``.
      scales: row-norm scales, one drawn per instance.
      fd_step: flow time ``> 0`` of the central difference's step.

    Returns:
      :class:`VelocityCheck` of NumPy arrays.

    Raises:
      ValueError: ``vocab_size < 2``, ``hidden_size < 1``, no or non-positive ``scales``,
        ``fd_step <= 0``.
    """
    check_int_at_least("vocab_size", vocab_size, 2)
    check_int_at_least("hidden_size", hidden_size)
    if len(scales) == 0:
        raise ValueError("scales must hold at least one scale, got none")
    check_positive("scales", scales)
    check_positive("fd_step", fd_step)
    out = _velocity_check(
        keys, fd_step, loss=loss, V=vocab_size, d=hidden_size, scales=tuple(scales)
    )
    return VelocityCheck(*(np.asarray(a) for a in out))


@partial(jax.jit, static_argnames=("loss", "V", "d", "scales"))
def _velocity_check(keys, fd_step, *, loss, V, d, scales):
    """Closed form, autodiff and central difference for the instances of ``keys``."""

    def pair_loss(params, data):
        lp = softmax_logprobs(*params)[0]
        y_pos, y_neg, ref = data
        return loss(lp[y_pos], lp[y_neg], ref[0], ref[1])

    def observe(params, _):
        return softmax_logprobs(*params)[0]

    forward = flow_fn(pair_loss, observe, optimizer="sgd", num_steps=1, record_every=1)
    backward = flow_fn(
        lambda p, x: -pair_loss(p, x), observe, optimizer="sgd", num_steps=1, record_every=1
    )

    def one(key):
        W, h, y_pos, y_neg, ref = single_token_instance(
            key, vocab_size=V, hidden_size=d, scales=scales
        )
        params, data = (W, h[None]), (y_pos, y_neg, ref)
        lp = observe(params, None)
        ell_prime = _losses.margin_derivative(loss, lp[y_pos], lp[y_neg], ref[0], ref[1])
        closed = logprob_velocity(W, h, y_pos, y_neg, ell_prime)
        grads = jax.grad(pair_loss)(params, data)
        auto = jax.jvp(
            lambda p: observe(p, None), (params,), (jax.tree_util.tree_map(jnp.negative, grads),)
        )[1]
        fd = (
            forward(params, data, fd_step).observables[1]
            - backward(params, data, fd_step).observables[1]
        ) / (2 * fd_step)
        return closed, auto, fd, y_pos, y_neg

    return jax.vmap(one)(keys)


class VelocityErrors(NamedTuple):
    """Agreement of a :class:`VelocityCheck`'s closed forms with its references.

    Attributes:
      instances: ``N``.
      max_rel_err_autodiff: max over instances of :math:`\\max_z|c_z - a_z| / \\max_z|a_z|`.
      max_rel_err_fd: the same for the finite difference, on the autodiff scale.
      sign_agreement_autodiff: sign agreement with autodiff where resolved (``None``: none).
      sign_agreement_fd: sign agreement with the finite difference where resolved.
      displacing_instances: instances whose autodiff velocity of ``y_pos`` is negative.
    """

    instances: int
    max_rel_err_autodiff: float
    max_rel_err_fd: float
    sign_agreement_autodiff: float | None
    sign_agreement_fd: float | None
    displacing_instances: int


def velocity_errors(check: VelocityCheck) -> VelocityErrors:
    r"""Return relative errors and sign agreement of a check's closed forms.

    Errors are normwise per instance, on the scale :math:`\max_z|a_z|` of the autodiff
    velocities. An entry's sign counts where :math:`|a_z|` exceeds :data:`AUTODIFF_SIGN_TOL`
    (vs autodiff) or :data:`FD_SIGN_TOL` (vs the finite difference) times that scale.

    Example:
      >>> c = np.array([[1.0, -2.0, 1e-9]])
      >>> chk = VelocityCheck(c, c * 1.001, c, np.array([1]), np.array([0]))
      >>> e = velocity_errors(chk)
      >>> round(e.max_rel_err_autodiff, 6), e.sign_agreement_fd, e.displacing_instances
      (0.000999, 1.0, 1)
    """
    closed, auto, fd, y_pos = (
        check.closed_form,
        check.autodiff,
        check.finite_difference,
        check.y_pos,
    )
    scale = np.max(np.abs(auto), axis=1)
    agree, _ = sign_agreement(closed, auto, threshold=AUTODIFF_SIGN_TOL * scale[:, None])
    agree_fd, _ = sign_agreement(closed, fd, threshold=FD_SIGN_TOL * scale[:, None], magnitude=auto)
    return VelocityErrors(
        instances=len(y_pos),
        max_rel_err_autodiff=float(relative_error(closed, auto, axis=1).max()),
        max_rel_err_fd=float(relative_error(closed, fd, axis=1, scale=scale).max()),
        sign_agreement_autodiff=agree,
        sign_agreement_fd=agree_fd,
        displacing_instances=int(np.sum(auto[np.arange(len(y_pos)), y_pos] < 0)),
    )
