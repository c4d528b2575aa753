r"""Kernel form of Theorems 4-5 and 8-9: single-token velocities when ``h`` is a network's output.

Setting (Razin et al. 2024, Eq. 1-2, but *not* unconstrained features): the hidden embedding is
the output of a network, :math:`h = f_\phi(x)` ``[d]``, and the logits are :math:`s = W h` with
unembeddings ``W`` ``[V, d]``; :math:`\pi = \mathrm{softmax}(W h)`. The loss is
:math:`L = \ell(\ln\pi(y^+|x) - \ln\pi(y^-|x))` and :math:`J = \partial h/\partial\phi`
``[d, #phi]``. Notation used below: :math:`u = W_{y^+} - W_{y^-}`,
:math:`a_z = W_z - W^\top\pi` (so :math:`\nabla_h\ln\pi(z|x) = a_z`) and
:math:`s_z = (e_z - \pi)^\top(e_{y^+} - e_{y^-}) = \delta_{z,y^+} - \delta_{z,y^-} - \pi_{y^+} +
\pi_{y^-}`.

**Proposition (kernel form, untied W).** Let the backbone follow :math:`\dot\phi =
-\nabla_\phi L` and the unembeddings :math:`\dot W = -\eta\nabla_W L` (:math:`\eta \ge 0`;
:math:`\eta = 0` freezes ``W``). Then for every token ``z``

.. math::
   \frac{d}{dt}\ln\pi(z|x) = -\ell'\Big[a_z^\top K\,u + \eta\,\|h\|^2 s_z\Big],
   \qquad K = J J^\top \in \mathbb R^{d\times d}.

*Proof.* :math:`\nabla_W\ln\pi(z) = (e_z - \pi)h^\top` and :math:`\nabla_\phi\ln\pi(z) =
J^\top a_z`, so (the :math:`\pi` parts cancel in the difference) :math:`\nabla_\phi L = \ell'
J^\top u` and :math:`\nabla_W L = \ell'(e_{y^+} - e_{y^-})h^\top`. By the chain rule
:math:`\frac{d}{dt}\ln\pi(z) = a_z^\top J\dot\phi + \langle(e_z-\pi)h^\top, \dot W\rangle_F
= -\ell' a_z^\top JJ^\top u - \eta\ell'\|h\|^2(e_z - \pi)^\top(e_{y^+} - e_{y^-})`. :math:`\square`

With :math:`h` itself the trainable parameter (:math:`J = I`, so :math:`K = I`) and
:math:`\eta = 1` this is Theorems 4 (entry :math:`y^+`) and 5 (other entries) of Razin et al.
2024, App. D.1: :math:`a_{y^+}^\top u + (1-\pi^++\pi^-)\|h\|^2 = m + S_{y^+,y^-}`.

**Corollary (t = 0 criterion).** :math:`s_z - s_{y^+} = \delta_{z,y^+} - \delta_{z,y^-} - 1`, so

.. math::
   \frac{d}{dt}\big(\ln\pi(z|x) - \ln\pi(y^+|x)\big)
   = -\ell'\Big[(W_z - W_{y^+})^\top K u + \eta\|h\|^2(\delta_{z,y^+} - \delta_{z,y^-} - 1)\Big];

for :math:`\ell' < 0` (DPO) a token :math:`z\notin\{y^\pm\}` gains on :math:`y^+` iff
:math:`(W_z - W_{y^+})^\top K (W_{y^+} - W_{y^-}) > \eta\|h\|^2`. Where ``K`` is anisotropic
this can hold for tokens whose unembedding is far from :math:`W_{y^+}` in the Euclidean sense.

**Diagonal preconditioner.** For :math:`\dot\theta = -P\nabla_\theta L` with ``P`` diagonal and
``>= 0`` (RMSprop's instantaneous form: :math:`P = \mathrm{diag}(1/(\sqrt{\nu}+\epsilon))`), the
backbone kernel becomes :math:`K_P = J P_\phi J^\top` and the ``W`` channel has per-entry gains
:math:`P_W` ``[V, d]``: with :math:`g_\pm = \sum_k P_W[y^\pm, k]\,h_k^2`,

.. math::
   \frac{d}{dt}\ln\pi(z|x) = -\ell'\Big[a_z^\top K_P u + (\delta_{z,y^+} - \pi_{y^+})\,g_+
   - (\delta_{z,y^-} - \pi_{y^-})\,g_-\Big],

since :math:`\langle(e_z - \pi)h^\top, P_W\odot(e_{y^+} - e_{y^-})h^\top\rangle_F` is the bracket's
last two terms. :math:`P_W = \eta` gives :math:`g_\pm = \eta\|h\|^2` and the proposition.

**Tied unembeddings.** If ``W`` is also the input embedding table ``E`` (``W = E`` feeds the
backbone), then :math:`h = f(\phi, E)`, :math:`\hat J = [\partial h/\partial\phi, \partial
h/\partial E]` and :math:`\nabla_E\ln\pi(z) = (e_z - \pi)h^\top + J_E^\top a_z`. Writing
:math:`D = (e_{y^+} - e_{y^-})h^\top` (the ``W``-channel gradient direction) and
:math:`\dot\theta = -P\nabla L`,

.. math::
   \frac{d}{dt}\ln\pi(z|x) = -\ell'\Big[a_z^\top(K u + b) + (e_z - \pi)^\top r
   + (\delta_{z,y^+} - \pi_{y^+})\,g_+ - (\delta_{z,y^-} - \pi_{y^-})\,g_-\Big],

with :math:`K = \hat J P \hat J^\top` over **all** parameters (``E`` included), the cross terms
:math:`b = J_E(P_E\odot D)` ``[d]`` (how the ``W``-channel step moves ``h`` through the input
embeddings) and :math:`r = (P_E\odot J_E^\top u)\,h` ``[V]`` (how the backbone-channel step of
``E`` moves the logits through ``W``), and :math:`g_\pm` from :math:`P_E`. *Proof:* expand
:math:`-\ell'(\hat J^\top a_z + D_z)^\top P(\hat J^\top u + D)` with :math:`D_z = (e_z-\pi)h^\top`:
the four products are the four terms. When ``E`` enters ``h`` only through the lookup of the
prompt's tokens, :math:`J_E` is supported on their rows: ``b = 0`` unless :math:`y^+` or
:math:`y^-` is a prompt token, while ``r`` is supported on the prompt's tokens (so the tied
correction is generally nonzero for a tied model). Untied (``h`` independent of ``W``) both
vanish: :func:`kernel_logprob_velocity` assumes ``b = 0`` and ``r = 0``,
:func:`tied_kernel_logprob_velocity` takes them; :mod:`sims.analysis.kernel` measures ``K``, ``b``
and
``r`` of an NNX model.

**Several prompts** (Theorems 8-9 analogue): ``N`` prompts with :math:`h_i = f_\phi(x_i)`, pairs
:math:`(y^+_i, y^-_i)`, :math:`L = \frac1N\sum_j\ell_j` and the kernel between prompts
:math:`K_{ij} = J_i J_j^\top` ``[d, d]``:

.. math::
   \frac{d}{dt}\ln\pi(z|x_i) = -\frac1N\sum_j \ell'_j\Big[a_{i,z}^\top K_{ij}u_j
   + \eta\langle h_i, h_j\rangle\big(\delta_{z,y^+_j} - \delta_{z,y^-_j} - \pi_i(y^+_j)
   + \pi_i(y^-_j)\big)\Big].

Every function is pure JAX, jit- and vmap-safe, float32 and float64. Public functions validate
shapes always and values when concrete (ids in ``[0, V)``, ``y_pos != y_neg``, ``K`` symmetric
and positive semi-definite, rates ``>= 0``, finiteness). Under ``jit`` values cannot be checked:
out-of-range or equal ids, a negative rate or gain, and an asymmetric ``K`` then give NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from theory._kernel_checks import (
    asymmetry,
    check_gain,
    check_hidden,
    check_kernel,
    check_pair,
    check_scalar,
    invalid_ids,
    poison,
    tolerance,
)
from theory.checks import (
    check_distinct,
    check_finite,
    check_ndim,
    check_nonnegative,
    check_token_ids,
    is_concrete,
)


def _gain_row(gain: jax.Array, y: jax.Array, d: int, dtype) -> jax.Array:
    """Row ``y`` of the ``W``-channel gains ``P_W`` as ``[d]`` (scalar / per-row / per-entry)."""
    gain = jnp.asarray(gain, dtype)
    if gain.ndim == 0:
        return jnp.broadcast_to(gain, (d,))
    if gain.ndim == 1:
        return jnp.broadcast_to(gain[y], (d,))
    return gain[y]


def _velocity(W, h, drive, logit_cross, g_pos, g_neg, y_pos, y_neg, ell_prime):
    """Bracket of the module docstring times ``-ell'``; ``drive = K u + b`` ``[d]``."""
    V = W.shape[0]
    probs = jax.nn.softmax(W @ h)  # [V]
    w_drive = W @ drive  # [V]: W_z^T (K u + b)
    hidden_term = w_drive - probs @ w_drive  # a_z^T (K u + b)
    logit_term = logit_cross - probs @ logit_cross  # (e_z - pi)^T r
    e_pos = jax.nn.one_hot(y_pos, V, dtype=W.dtype)
    e_neg = jax.nn.one_hot(y_neg, V, dtype=W.dtype)
    w_term = (e_pos - probs[y_pos]) * g_pos - (e_neg - probs[y_neg]) * g_neg
    return -ell_prime * (hidden_term + logit_term + w_term)


@jax.jit
def _single(W, h, K, logit_cross, hidden_cross, gain, y_pos, y_neg, ell_prime):
    """Compiled core shared by the single-prompt functions (inputs validated by the caller)."""
    W, h, K = jnp.asarray(W), jnp.asarray(h), jnp.asarray(K)
    dtype = jnp.result_type(W.dtype, h.dtype, K.dtype, jnp.asarray(ell_prime).dtype)
    W, h, K = W.astype(dtype), h.astype(dtype), K.astype(dtype)
    y_pos, y_neg = jnp.asarray(y_pos), jnp.asarray(y_neg)
    V, d = W.shape
    u = W[y_pos] - W[y_neg]  # [d]
    drive = K @ u
    if hidden_cross is not None:  # tied: b
        drive = drive + jnp.asarray(hidden_cross, dtype)
    if logit_cross is None:  # untied: r = 0
        logit_cross = jnp.zeros(V, dtype)
    h_sq = h * h
    g_pos = jnp.sum(_gain_row(gain, y_pos, d, dtype) * h_sq)
    g_neg = jnp.sum(_gain_row(gain, y_neg, d, dtype) * h_sq)
    v = _velocity(
        W, h, drive, jnp.asarray(logit_cross, dtype), g_pos, g_neg, y_pos, y_neg, ell_prime
    )
    invalid = invalid_ids(y_pos, y_neg, V) | jnp.any(jnp.asarray(gain) < 0)
    invalid = invalid | (asymmetry(K) > tolerance(dtype))
    return poison(v, invalid)


def kernel_logprob_velocity(
    W: ArrayLike,
    h: ArrayLike,
    K: ArrayLike,
    y_pos: ArrayLike,
    y_neg: ArrayLike,
    ell_prime: ArrayLike,
    *,
    unembedding_rate: ArrayLike = 1.0,
) -> jax.Array:
    r"""Return :math:`\frac{d}{dt}\ln\pi(z|x)` for every token ``z`` when :math:`h = f_\phi(x)`.

    .. math::
       \frac{d}{dt}\ln\pi(z|x) = -\ell'\Big[(W_z - \pi^\top W)\,K\,(W_{y^+} - W_{y^-})
       + \eta\,(\delta_{z,y^+} - \delta_{z,y^-} - \pi_{y^+} + \pi_{y^-})\,\|h\|^2\Big]

    for the backbone on gradient flow :math:`\dot\phi = -\nabla_\phi L` (:math:`K = JJ^\top`,
    :math:`J = \partial h/\partial\phi`) and untied unembeddings :math:`\dot W = -\eta\nabla_W L`.

    Source: the proposition of this module's docstring (derived here); with :math:`K = I`,
    :math:`\eta = 1` it is Razin et al. 2024, Theorems 4 (``z = y_pos``) and 5 (other ``z``),
    App. D.1, :func:`theory.single_token.logprob_velocity`.
    Reading: ``W`` is untied (it is not the input embedding): the tied cross terms are zero here;
    use :func:`tied_kernel_logprob_velocity` otherwise.

    Args:
      W: ``[V, d]`` token unembeddings (float32 or float64).
      h: ``[d]`` hidden embedding of the prompt, :math:`f_\phi(x)`.
      K: ``[d, d]`` hidden-state kernel :math:`JJ^\top` (symmetric PSD), e.g. from
        :func:`sims.analysis.kernel.hidden_kernel`.
      y_pos: integer id of :math:`y^+`.
      y_neg: integer id of :math:`y^-`, ``!= y_pos``.
      ell_prime: scalar :math:`\ell'` at the current margin (negative for DPO).
      unembedding_rate: :math:`\eta \ge 0`, the rate of ``W`` relative to the backbone (``0``:
        frozen ``W``; ``1``: plain gradient flow on all parameters).

    Returns:
      ``[V]`` log-probability velocities.

    Raises:
      ValueError: bad shapes, ids out of ``[0, V)``, ``y_pos == y_neg``, ``K`` not symmetric or
        not PSD, ``unembedding_rate < 0``, non-finite inputs.

    Example:
      >>> W = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
      >>> K = jnp.array([[1.0, 0.0], [0.0, 0.0]])  # the backbone moves h along e_0 only
      >>> v = kernel_logprob_velocity(W, jnp.zeros(2), K, 0, 1, -1.0, unembedding_rate=0.0)
      >>> # h = 0: pi uniform, W^T pi = (2/3, 2/3); K u = (1, 0): a_z^T K u = W_z0 - 2/3
      >>> [round(float(x), 4) for x in v]
      [0.3333, -0.6667, 0.3333]
    """
    check_hidden(W, h)
    V, d = jnp.shape(W)
    check_kernel(K, (d, d), "[d, d]")
    check_pair(y_pos, y_neg, V)
    check_scalar("ell_prime", ell_prime)
    check_scalar("unembedding_rate", unembedding_rate)
    check_nonnegative("unembedding_rate", unembedding_rate)
    return _single(W, h, K, None, None, unembedding_rate, y_pos, y_neg, ell_prime)


def preconditioned_logprob_velocity(
    W: ArrayLike,
    h: ArrayLike,
    K: ArrayLike,
    y_pos: ArrayLike,
    y_neg: ArrayLike,
    ell_prime: ArrayLike,
    *,
    unembedding_gain: ArrayLike,
) -> jax.Array:
    r"""Return :math:`\frac{d}{dt}\ln\pi(z|x)` for :math:`\dot\theta = -P\nabla L`, ``P`` diagonal.

    .. math::
       \frac{d}{dt}\ln\pi(z|x) = -\ell'\Big[(W_z - \pi^\top W) K_P (W_{y^+} - W_{y^-})
       + (\delta_{z,y^+} - \pi_{y^+})\,g_+ - (\delta_{z,y^-} - \pi_{y^-})\,g_-\Big],\quad
       g_\pm = \sum_k P_W[y^\pm, k]\,h_k^2

    with :math:`K_P = J P_\phi J^\top` and :math:`P_W` the diagonal of ``P`` on ``W``.

    Source: the diagonal-preconditioner paragraph of this module's docstring (derived here).
    RMSprop (Razin et al. 2024, App. H trains with it) is, at one instant, this flow with
    :math:`P = 1/(\sqrt{\nu} + \epsilon)` entrywise; at the first torch-RMSprop step
    :math:`\nu = (1 - \alpha) g^2` (zero initial scale), so :math:`P = 1/(\sqrt{1-\alpha}|g| +
    \epsilon)` with ``eps`` outside the square root (torch convention).
    Reading: ``W`` untied, as in :func:`kernel_logprob_velocity`; ``unembedding_gain = eta``
    (a scalar) reproduces that function with ``K_P = K``.

    Args:
      W: ``[V, d]`` token unembeddings.
      h: ``[d]`` hidden embedding of the prompt.
      K: ``[d, d]`` preconditioned kernel :math:`J P_\phi J^\top` (e.g.
        :func:`sims.analysis.kernel.hidden_kernel` with ``preconditioner``).
      y_pos: integer id of :math:`y^+`.
      y_neg: integer id of :math:`y^-`, ``!= y_pos``.
      ell_prime: scalar :math:`\ell'` at the current margin.
      unembedding_gain: :math:`P_W \ge 0`: a scalar, ``[V]`` per-row or ``[V, d]`` per-entry gains
        of the ``W`` channel.

    Returns:
      ``[V]`` log-probability velocities.

    Raises:
      ValueError: as :func:`kernel_logprob_velocity`; ``unembedding_gain`` of another shape or
        with a negative entry.

    Example:
      >>> W, h, K = jnp.eye(3)[:, :2], jnp.array([1.0, 2.0]), jnp.zeros((2, 2))
      >>> v = preconditioned_logprob_velocity(W, h, K, 0, 1, -1.0,
      ...                                     unembedding_gain=jnp.array([1.0, 0.0, 0.0]))
      >>> # only row y+ moves: g+ = |h|^2 = 5, g- = 0; v_z = (delta_{z,y+} - pi+) * 5
      >>> pi = jax.nn.softmax(W @ h)
      >>> bool(jnp.allclose(v, (jnp.eye(3)[0] - pi[0]) * 5.0))
      True
    """
    check_hidden(W, h)
    V, d = jnp.shape(W)
    check_kernel(K, (d, d), "[d, d]")
    check_pair(y_pos, y_neg, V)
    check_scalar("ell_prime", ell_prime)
    check_gain(unembedding_gain, V, d)
    return _single(W, h, K, None, None, unembedding_gain, y_pos, y_neg, ell_prime)


def tied_kernel_logprob_velocity(
    W: ArrayLike,
    h: ArrayLike,
    K: ArrayLike,
    hidden_cross: ArrayLike,
    logit_cross: ArrayLike,
    y_pos: ArrayLike,
    y_neg: ArrayLike,
    ell_prime: ArrayLike,
    *,
    unembedding_gain: ArrayLike = 1.0,
) -> jax.Array:
    r"""Return :math:`\frac{d}{dt}\ln\pi(z|x)` when ``W`` is also the input embedding (tied).

    .. math::
       \frac{d}{dt}\ln\pi(z|x) = -\ell'\Big[(W_z - \pi^\top W)(K u + b) + r_z - \pi^\top r
       + (\delta_{z,y^+} - \pi_{y^+})\,g_+ - (\delta_{z,y^-} - \pi_{y^-})\,g_-\Big]

    with :math:`u = W_{y^+} - W_{y^-}`, ``K`` over all parameters (the shared table included),
    :math:`b = J_E(P_E\odot(e_{y^+} - e_{y^-})h^\top)`, :math:`r = (P_E\odot J_E^\top u)\,h` and
    :math:`g_\pm = \sum_k P_E[y^\pm,k]h_k^2` (``P = I`` for plain gradient flow).

    Source: the tied paragraph of this module's docstring (derived here). ``b = 0``, ``r = 0``
    is :func:`preconditioned_logprob_velocity`.

    Args:
      W: ``[V, d]`` the shared embedding / unembedding table.
      h: ``[d]`` hidden embedding of the prompt.
      K: ``[d, d]`` kernel :math:`\hat J P \hat J^\top` over all parameters.
      hidden_cross: ``[d]`` the cross term ``b`` (e.g.
      :func:`sims.analysis.kernel.tied_cross_terms`).
      logit_cross: ``[V]`` the cross term ``r``.
      y_pos: integer id of :math:`y^+`.
      y_neg: integer id of :math:`y^-`, ``!= y_pos``.
      ell_prime: scalar :math:`\ell'` at the current margin.
      unembedding_gain: :math:`P_E \ge 0` on the table: scalar, ``[V]`` or ``[V, d]`` (default 1).

    Returns:
      ``[V]`` log-probability velocities.

    Raises:
      ValueError: as :func:`preconditioned_logprob_velocity`; cross terms of the wrong shape or
        non-finite.

    Example:
      >>> W, h, K = jnp.eye(2), jnp.zeros(2), jnp.zeros((2, 2))
      >>> r = jnp.array([1.0, 0.0])  # only the logit cross term: v_z = -l' (r_z - pi^T r)
      >>> v = tied_kernel_logprob_velocity(W, h, K, jnp.zeros(2), r, 0, 1, -1.0)
      >>> [float(x) for x in v]
      [0.5, -0.5]
    """
    check_hidden(W, h)
    V, d = jnp.shape(W)
    check_kernel(K, (d, d), "[d, d]")
    for name, arr, shape in (
        ("hidden_cross", hidden_cross, (d,)),
        ("logit_cross", logit_cross, (V,)),
    ):
        if tuple(jnp.shape(arr)) != shape:
            raise ValueError(f"{name} must have shape {shape}, got shape {jnp.shape(arr)}")
        check_finite(name, arr)
    check_pair(y_pos, y_neg, V)
    check_scalar("ell_prime", ell_prime)
    check_gain(unembedding_gain, V, d)
    return _single(W, h, K, logit_cross, hidden_cross, unembedding_gain, y_pos, y_neg, ell_prime)


def drive_logprob_velocity(
    W: ArrayLike,
    h: ArrayLike,
    drive: ArrayLike,
    logit_cross: ArrayLike,
    gain_pos: ArrayLike,
    gain_neg: ArrayLike,
    y_pos: ArrayLike,
    y_neg: ArrayLike,
    ell_prime: ArrayLike,
) -> jax.Array:
    r"""Return :math:`\frac{d}{dt}\ln\pi(z|x)` from the hidden state's drive (matrix-free form).

    .. math::
       \frac{d}{dt}\ln\pi(z|x) = -\ell'\Big[a_z^\top c + r_z - \pi^\top r
       + (\delta_{z,y^+} - \pi_{y^+})\,g_+ - (\delta_{z,y^-} - \pi_{y^-})\,g_-\Big],
       \qquad c = K u + b

    The tied kernel form (this module's docstring) needs ``K`` only through :math:`K u`
    (:math:`u = W_{y^+} - W_{y^-}`), which one ``vjp`` and one ``jvp`` of the network give without
    forming ``K`` (:func:`sims.analysis.kernel.first_step_velocity`): for a 135 M-parameter
    model, ``d = 576`` basis columns of ``K`` would cost 576 such pairs.

    Source: the tied paragraph of this module's docstring; ``drive = K u``, ``r = 0`` and
    ``g_\pm = \eta\|h\|^2`` is :func:`kernel_logprob_velocity`.

    Args:
      W: ``[V, d]`` unembeddings; h: ``[d]`` hidden embedding of the prompt.
      drive: ``[d]`` :math:`K u + b`; logit_cross: ``[V]`` :math:`r` (zeros when untied).
      gain_pos, gain_neg: scalars :math:`g_\pm = \sum_k P_W[y^\pm, k] h_k^2`.
      y_pos, y_neg: token ids; ell_prime: scalar :math:`\ell'`.

    Returns:
      ``[V]`` log-probability velocities.

    Raises:
      ValueError: shapes that do not match ``W``, ids out of range or equal, non-finite inputs.

    Example:
      >>> W, h = jnp.eye(2), jnp.zeros(2)
      >>> v = drive_logprob_velocity(W, h, jnp.zeros(2), jnp.array([1.0, 0.0]), 0.0, 0.0, 0, 1,
      ...                            -1.0)
      >>> [float(x) for x in v]  # only r: v_z = -l' (r_z - pi^T r), pi uniform
      [0.5, -0.5]
    """
    check_hidden(W, h)
    V, d = jnp.shape(W)
    for name, arr, shape in (("drive", drive, (d,)), ("logit_cross", logit_cross, (V,))):
        if tuple(jnp.shape(arr)) != shape:
            raise ValueError(f"{name} must have shape {shape}, got shape {jnp.shape(arr)}")
        check_finite(name, arr)
    check_pair(y_pos, y_neg, V)
    for name, value in (("gain_pos", gain_pos), ("gain_neg", gain_neg), ("ell_prime", ell_prime)):
        check_scalar(name, value)
    return _drive_velocity(W, h, drive, logit_cross, gain_pos, gain_neg, y_pos, y_neg, ell_prime)


@jax.jit
def _drive_velocity(W, h, drive, logit_cross, gain_pos, gain_neg, y_pos, y_neg, ell_prime):
    W, h = jnp.asarray(W), jnp.asarray(h)
    dtype = jnp.result_type(W.dtype, h.dtype, jnp.asarray(drive).dtype)
    v = _velocity(
        W.astype(dtype),
        h.astype(dtype),
        jnp.asarray(drive, dtype),
        jnp.asarray(logit_cross, dtype),
        jnp.asarray(gain_pos, dtype),
        jnp.asarray(gain_neg, dtype),
        jnp.asarray(y_pos),
        jnp.asarray(y_neg),
        jnp.asarray(ell_prime, dtype),
    )
    return poison(v, invalid_ids(jnp.asarray(y_pos), jnp.asarray(y_neg), W.shape[0]))


@jax.jit
def _criterion(velocity, W, h, K, y_pos, y_neg, ell_prime, unembedding_rate):
    W, h, K = jnp.asarray(W), jnp.asarray(h), jnp.asarray(K)
    dtype = velocity.dtype
    W, h, K = W.astype(dtype), h.astype(dtype), K.astype(dtype)
    V = W.shape[0]
    y_pos, y_neg = jnp.asarray(y_pos), jnp.asarray(y_neg)
    drive = K @ (W[y_pos] - W[y_neg])  # [d]
    e_pos = jax.nn.one_hot(y_pos, V, dtype=dtype)
    e_neg = jax.nn.one_hot(y_neg, V, dtype=dtype)
    w_term = jnp.asarray(unembedding_rate, dtype) * (h @ h) * (e_pos - e_neg - 1.0)
    gap = -ell_prime * (W @ drive - W[y_pos] @ drive + w_term)  # (W_z - W_{y+})^T K u
    gap = jnp.where(jnp.arange(V) == y_pos, 0.0, gap)  # exactly 0, not a round-off residue
    gap = jnp.where(jnp.isnan(velocity), jnp.nan, gap)  # the same poisoning as velocity
    return DisplacementCriterion(velocity, gap, gap > 0, velocity[y_pos] < 0)


class DisplacementCriterion(NamedTuple):
    r"""Which tokens gain on :math:`y^+` at one instant, by the kernel form.

    Attributes:
      velocity: ``[V]`` :math:`\frac{d}{dt}\ln\pi(z|x)` (:func:`kernel_logprob_velocity`).
      gain_over_pos: ``[V]`` :math:`\frac{d}{dt}(\ln\pi(z|x) - \ln\pi(y^+|x))`; 0 at ``y_pos``.
      gains_on_pos: ``[V]`` bool, ``gain_over_pos > 0`` (token ``z`` gains on :math:`y^+`).
      pos_falls: scalar bool, :math:`\frac{d}{dt}\ln\pi(y^+|x) < 0` (likelihood displacement).
    """

    velocity: jax.Array
    gain_over_pos: jax.Array
    gains_on_pos: jax.Array
    pos_falls: jax.Array


def kernel_displacement_criterion(
    W: ArrayLike,
    h: ArrayLike,
    K: ArrayLike,
    y_pos: ArrayLike,
    y_neg: ArrayLike,
    ell_prime: ArrayLike,
    *,
    unembedding_rate: ArrayLike = 1.0,
) -> DisplacementCriterion:
    r"""Return the t = 0 displacement criterion over the whole vocabulary (kernel form).

    .. math::
       \frac{d}{dt}\big(\ln\pi(z|x) - \ln\pi(y^+|x)\big)
       = -\ell'\Big[(W_z - W_{y^+})^\top K (W_{y^+} - W_{y^-})
       + \eta\|h\|^2(\delta_{z,y^+} - \delta_{z,y^-} - 1)\Big]

    so for :math:`\ell' < 0` a token :math:`z\notin\{y^\pm\}` gains on :math:`y^+` iff
    :math:`(W_z - W_{y^+})^\top K (W_{y^+} - W_{y^-}) > \eta\|h\|^2`.

    Source: the corollary of this module's docstring (derived here); :math:`K = I`,
    :math:`\eta = 1` is the difference of Razin et al. 2024, Theorems 5 and 4.
    Reading: untied ``W``, as :func:`kernel_logprob_velocity`.

    Args:
      W, h, K, y_pos, y_neg, ell_prime, unembedding_rate: as :func:`kernel_logprob_velocity`.

    Returns:
      :class:`DisplacementCriterion`. Under ``jit`` with invalid values the float fields are
      NaN and the boolean fields (computed from them) read ``False``.

    Raises:
      ValueError: as :func:`kernel_logprob_velocity`.

    Example:
      >>> W = jnp.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
      >>> c = kernel_displacement_criterion(W, jnp.zeros(2), jnp.eye(2), 0, 1, -1.0)
      >>> # (W_2 - W_0)^T (W_0 - W_1) = (-1, 1).(0.1, -0.1) = -0.2 < 0 = |h|^2: token 2 loses
      >>> c.gains_on_pos.tolist(), bool(c.pos_falls)
      ([False, False, False], False)
    """
    velocity = kernel_logprob_velocity(
        W, h, K, y_pos, y_neg, ell_prime, unembedding_rate=unembedding_rate
    )
    return _criterion(velocity, W, h, K, y_pos, y_neg, ell_prime, unembedding_rate)


@jax.jit
def _multi(W, H, K, y_pos, y_neg, ell_prime, unembedding_rate):
    """Compiled core of :func:`multi_sample_kernel_logprob_velocity`."""
    W, H, K, ell_prime = (jnp.asarray(a) for a in (W, H, K, ell_prime))
    dtype = jnp.result_type(W.dtype, H.dtype, K.dtype, ell_prime.dtype)
    W, H, K, ell_prime = (a.astype(dtype) for a in (W, H, K, ell_prime))
    y_pos, y_neg = jnp.asarray(y_pos), jnp.asarray(y_neg)
    rate = jnp.asarray(unembedding_rate, dtype)
    N = H.shape[0]
    V = W.shape[0]
    weight = -ell_prime / N  # [N]: -l'_j / N
    U = W[y_pos] - W[y_neg]  # [N, d]: u_j
    drive = jnp.einsum("ijab,jb,j->ia", K, U, weight)  # [N, d]: sum_j (-l'_j/N) K_ij u_j
    probs = jax.nn.softmax(H @ W.T, axis=-1)  # [N, V]
    w_drive = drive @ W.T  # [N, V]
    hidden_term = w_drive - jnp.sum(probs * w_drive, axis=1, keepdims=True)
    coupling = rate * (H @ H.T) * weight[None, :]  # [N, N]: eta <h_i, h_j> (-l'_j / N)
    signs = jax.nn.one_hot(y_pos, V, dtype=dtype) - jax.nn.one_hot(y_neg, V, dtype=dtype)  # [N, V]
    shift = jnp.sum(coupling * (probs[:, y_pos] - probs[:, y_neg]), axis=1)  # [N]
    v = hidden_term + coupling @ signs - shift[:, None]
    invalid = jnp.any(invalid_ids(y_pos, y_neg, V)) | (rate < 0)
    invalid = invalid | (asymmetry(K) > tolerance(dtype))
    return poison(v, invalid)


def multi_sample_kernel_logprob_velocity(
    W: ArrayLike,
    H: ArrayLike,
    K: ArrayLike,
    y_pos: ArrayLike,
    y_neg: ArrayLike,
    ell_prime: ArrayLike,
    *,
    unembedding_rate: ArrayLike = 1.0,
) -> jax.Array:
    r"""Return :math:`\frac{d}{dt}\ln\pi(z|x_i)` ``[N, V]`` for ``N`` prompts sharing a backbone.

    .. math::
       \frac{d}{dt}\ln\pi(z|x_i) = -\frac1N\sum_{j=1}^N \ell'_j\Big[(W_z - \pi_i^\top W)
       K_{ij}(W_{y^+_j} - W_{y^-_j}) + \eta\langle h_i, h_j\rangle\big(\delta_{z,y^+_j}
       - \delta_{z,y^-_j} - \pi_i(y^+_j) + \pi_i(y^-_j)\big)\Big]

    with :math:`K_{ij} = J_i J_j^\top`, :math:`J_i = \partial h_i/\partial\phi`, the loss the mean
    :math:`L = \frac1N\sum_j\ell_j` (Eq. 2) and :math:`\dot W = -\eta\nabla_W L` (untied).

    Source: the several-prompts paragraph of this module's docstring (derived here: the sum over
    pairs of the proposition, each weighted :math:`1/N`). With :math:`K_{ij} = \delta_{ij}I`
    (one free hidden embedding per distinct prompt) and :math:`\eta = 1` it is Razin et al. 2024,
    Theorems 8-9, :func:`theory.single_token.multi_sample_logprob_velocity`.

    Args:
      W: ``[V, d]`` token unembeddings.
      H: ``[N, d]`` hidden embeddings :math:`h_i = f_\phi(x_i)`.
      K: ``[N, N, d, d]`` kernel between prompts, ``K[i, j] = J_i J_j^T`` (so ``K[j, i] =
        K[i, j]^T`` and the ``[N d, N d]`` matrix is PSD), e.g.
        :func:`sims.analysis.kernel.hidden_kernel`.
      y_pos: ``[N]`` preferred token ids.
      y_neg: ``[N]`` dispreferred token ids, ``y_neg[i] != y_pos[i]``.
      ell_prime: ``[N]`` per-pair :math:`\ell'`.
      unembedding_rate: :math:`\eta \ge 0`.

    Returns:
      ``[N, V]`` log-probability velocities.

    Raises:
      ValueError: bad shapes, ids out of range or equal, ``K`` not symmetric / PSD,
        ``unembedding_rate < 0``, non-finite inputs.

    Example:
      >>> W, H = jnp.eye(3), jnp.ones((2, 3))
      >>> K = jnp.zeros((2, 2, 3, 3))  # frozen backbone: only the W channel
      >>> v = multi_sample_kernel_logprob_velocity(W, H, K, jnp.array([0, 0]), jnp.array([1, 1]),
      ...                                          jnp.array([-1.0, -1.0]))
      >>> # <h_i, h_j> = 3, pi uniform: v_z = (2 / 2) * 3 * (delta_{z0} - delta_{z1})
      >>> [float(x) for x in v[0]]
      [3.0, -3.0, 0.0]
    """
    check_ndim("W", W, 2, "[V, d]")
    check_ndim("H", H, 2, "[N, d]")
    N, d = jnp.shape(H)
    V = jnp.shape(W)[0]
    if d != jnp.shape(W)[1]:
        raise ValueError(f"H must have the hidden size d={jnp.shape(W)[1]} of W, got {(N, d)}")
    check_kernel(K, (N, N, d, d), "[N, N, d, d]")
    for name, arr in (("y_pos", y_pos), ("y_neg", y_neg), ("ell_prime", ell_prime)):
        if tuple(jnp.shape(arr)) != (N,):
            raise ValueError(f"{name} must have shape [N]=({N},), got shape {jnp.shape(arr)}")
    check_token_ids("y_pos", y_pos, V)
    check_token_ids("y_neg", y_neg, V)
    check_distinct("y_pos", y_pos, "y_neg", y_neg)
    for name, arr in (("W", W), ("H", H), ("ell_prime", ell_prime)):
        check_finite(name, arr)
    check_scalar("unembedding_rate", unembedding_rate)
    check_nonnegative("unembedding_rate", unembedding_rate)
    return _multi(W, H, K, y_pos, y_neg, ell_prime, unembedding_rate)


class KernelAnisotropy(NamedTuple):
    r"""Gain of a kernel on a subspace vs its orthogonal complement.

    Attributes:
      gain_subspace: :math:`\mathrm{tr}(Q_S^\top K Q_S)/k`, mean Rayleigh quotient on ``S``.
      gain_complement: :math:`\mathrm{tr}(Q_\perp^\top K Q_\perp)/(d-k)`, on :math:`S^\perp`.
      ratio: :math:`\lambda_{\mathrm{eff}}` = ``gain_subspace / gain_complement``.
    """

    gain_subspace: jax.Array
    gain_complement: jax.Array
    ratio: jax.Array


@jax.jit
def _anisotropy(K, S):
    """Compiled core of :func:`kernel_anisotropy`."""
    d, k = K.shape[0], S.shape[0]
    tol = tolerance(K.dtype)
    Q, R = jnp.linalg.qr(S.T)  # Q [d, k] orthonormal basis of span(S)
    diag = jnp.abs(jnp.diagonal(R))
    dependent = jnp.min(diag) <= tol * jnp.max(diag)
    on_s = jnp.trace(Q.T @ K @ Q)
    gain_s = on_s / k
    gain_c = (jnp.trace(K) - on_s) / (d - k)
    gain_s, gain_c = poison(gain_s, dependent), poison(gain_c, dependent)
    return KernelAnisotropy(gain_s, gain_c, gain_s / gain_c)


def kernel_anisotropy(K: ArrayLike, S: ArrayLike) -> KernelAnisotropy:
    r"""Return :math:`\lambda_{\mathrm{eff}}`, the gain of ``K`` on ``span(S)`` over its complement.

    .. math::
       \lambda_{\mathrm{eff}} = \frac{\mathrm{tr}(Q_S^\top K Q_S)/k}
       {\mathrm{tr}(Q_\perp^\top K Q_\perp)/(d-k)}
       = \frac{\mathrm{tr}(Q_S^\top K Q_S)/k}{(\mathrm{tr}K - \mathrm{tr}(Q_S^\top K Q_S))/(d-k)}

    where :math:`Q_S` ``[d, k]`` is an orthonormal basis of the span of the ``k`` rows of ``S``
    and :math:`Q_\perp` one of its orthogonal complement: the mean Rayleigh quotient
    :math:`q^\top K q` over an orthonormal basis of ``S`` divided by the mean over one of
    :math:`S^\perp`. Both traces are basis independent. ``K = c I`` gives 1;
    ``K = I + \lambda P_S`` (``P_S`` the orthogonal projector onto ``S``) gives :math:`1 + \lambda`.
    Under the kernel form (:func:`kernel_logprob_velocity`) the backbone moves ``h`` by
    :math:`K(W_{y^+} - W_{y^-})`, so :math:`\lambda_{\mathrm{eff}} > 1` on the span of, e.g., the
    centroids of two answer sets means the backbone channel amplifies motion between them.

    Source: defined here (issue 13); a summary, not a result of Razin et al. 2024.

    Args:
      K: ``[d, d]`` symmetric PSD kernel.
      S: ``[k, d]`` spanning vectors, ``1 <= k < d``, linearly independent.

    Returns:
      :class:`KernelAnisotropy` (scalars). Under ``jit``, linearly dependent ``S`` gives NaN.

    Raises:
      ValueError: bad shapes, ``k`` not in ``[1, d)``, dependent rows of ``S`` (smallest singular
        value ``<= sqrt(eps)`` times the largest), ``K`` not symmetric / PSD, non-finite input.

    Example:
      >>> S = jnp.array([[1.0, 1.0, 0.0]])
      >>> P = jnp.outer(S[0], S[0]) / 2.0  # projector onto span(S)
      >>> round(float(kernel_anisotropy(jnp.eye(3) + 4.0 * P, S).ratio), 10)  # 1 + lambda
      5.0
    """
    check_ndim("K", K, 2, "[d, d]")
    d = jnp.shape(K)[0]
    check_kernel(K, (d, d), "[d, d]")
    check_ndim("S", S, 2, "[k, d]")
    k = jnp.shape(S)[0]
    if jnp.shape(S)[1] != d or not 1 <= k < d:
        raise ValueError(
            f"S must have shape [k, d] with 1 <= k < d={d} (a proper subspace), got {jnp.shape(S)}"
        )
    check_finite("S", S)
    K, S = jnp.asarray(K), jnp.asarray(S)
    dtype = jnp.result_type(K.dtype, S.dtype, jnp.float32)
    K, S = K.astype(dtype), S.astype(dtype)
    tol = tolerance(dtype)
    if is_concrete(S):
        sv = np.linalg.svd(np.asarray(S, np.float64), compute_uv=False)
        if sv[-1] <= tol * sv[0]:
            raise ValueError(
                "S must have linearly independent rows, got singular values "
                f"{sv[0]:.3g} ... {sv[-1]:.3g} (ratio <= {tol:.3g})"
            )
    return _anisotropy(K, S)
