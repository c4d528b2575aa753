r"""An MLP backbone over fixed prompt features, in a lazy or a mean-field parametrisation.

:class:`ScaledMLPFeatures` is the softmax model of Razin et al. 2024, Eq. 1 with the hidden
embedding computed by a one-hidden-layer network of fixed prompt features ``x`` ``[f]`` (the setting
their unconstrained-features analysis abstracts away, §4.1 and §8.1):

.. math::
   h(x) = c\,\big[A_2\tanh(A_1 x/\sqrt f + b_1)
   - A_2^{(0)}\tanh(A_1^{(0)} x/\sqrt f + b_1^{(0)})\big],\qquad
   \pi(\cdot|x) = \mathrm{softmax}\big((W_0 + \eta\,\Delta)\,h(x)\big),

with :math:`A_1` ``[m, f]``, :math:`b_1` ``[m]``, :math:`A_2` ``[d, m]`` trainable, entries
:math:`\mathcal N(0, 1)` at initialisation, and :math:`(\cdot)^{(0)}` their initial values kept as
constants, so :math:`h \equiv 0` at initialisation whatever the parametrisation (the *centred*
model of lazy training). The output multiplier ``c`` sets the regime:

* ``"mean_field"``: :math:`c = 1/m` (mean-field / muP scaling of the readout): fitting data moves
  the weights by O(1) relative to their initial size, so features and the hidden-state kernel
  :math:`K = JJ^\top` change during training (feature learning);
* ``"lazy"``: :math:`c = \alpha/\sqrt m` (NTK scaling times a large output scale
  :math:`\alpha`, Chizat, Oyallon & Bach 2019): the same fit needs weight changes
  :math:`O(1/(\alpha\sqrt m))` relative to their size, so ``K`` stays near its initial value.

The unembeddings are a fixed base ``W_0`` (e.g. MiniLM word embeddings) plus :math:`\eta\,\Delta`
with :math:`\Delta` trainable and zero at initialisation. Under a scale-invariant optimiser
(RMSprop, Adam) each entry of ``W`` then steps :math:`\eta` times as far as a backbone weight;
under gradient flow :math:`\dot W = -\eta^2\nabla_W L` (:mod:`theory.kernel`'s unembedding rate is
:math:`\eta^2`). :math:`\eta = 0` freezes ``W`` (zero gradient, zero RMSprop step).

:class:`FeaturePairs` is the pairs type of this family for :func:`sims.flows.core.preference_flow`,
and
:func:`feature_sft_flow` its SFT front end.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from sims.flows.core import Flow, sft_flow
from sims.models.unconstrained import PreferenceRecord, softmax_logprobs
from theory.checks import (
    check_distinct,
    check_finite,
    check_ndim,
    check_nonnegative,
    check_positive,
    check_positive_int,
    check_token_ids,
)

#: Parametrisations of :class:`ScaledMLPFeatures` (see :func:`output_multiplier`).
PARAMETRISATIONS = ("mean_field", "lazy")


class FixedArray(nnx.Variable):
    """A constant of a model that the flows do not move (not an ``nnx.Param``)."""


def output_multiplier(parametrisation: str, width: int, *, lazy_scale: float) -> float:
    r"""Return the readout multiplier ``c``: :math:`1/m` (mean field) or :math:`\alpha/\sqrt m`.

    Source: mean-field / muP readout scaling (Mei, Montanari & Nguyen 2018; Yang & Hu 2021) and the
    lazy-training output scale of Chizat, Oyallon & Bach 2019 applied to NTK scaling.

    Raises:
      ValueError: unknown ``parametrisation``, ``width < 1`` or ``lazy_scale <= 0``.

    Example:
      >>> output_multiplier("mean_field", 4, lazy_scale=10.0), output_multiplier("lazy", 4,
      ...                                                                        lazy_scale=10.0)
      (0.25, 5.0)
    """
    if parametrisation not in PARAMETRISATIONS:
        raise ValueError(
            f"parametrisation must be one of {PARAMETRISATIONS}, got {parametrisation!r}"
        )
    check_positive_int("width", width)
    check_positive("lazy_scale", lazy_scale)
    if parametrisation == "mean_field":
        return 1.0 / width
    return lazy_scale / float(np.sqrt(width))


class ScaledMLPFeatures(nnx.Module):
    r"""Softmax model over an MLP of prompt features, centred, mean-field or lazy (module doc).

    .. math::
       \pi(\cdot|x) = \mathrm{softmax}\big((W_0 + \eta\Delta)\,c\,[A_2\tanh(A_1x/\sqrt f + b_1)
       - A_2^{(0)}\tanh(A_1^{(0)}x/\sqrt f + b_1^{(0)})]\big)

    Source: Razin et al. 2024, Eq. 1 with a network computing :math:`h_x`; parametrisations as
    :func:`output_multiplier`.

    Attributes:
      fc_in, fc_in_bias, fc_out: ``nnx.Param`` :math:`A_1` ``[m, f]``, :math:`b_1` ``[m]``,
        :math:`A_2` ``[d, m]``.
      unembedding_delta: ``nnx.Param`` :math:`\Delta` ``[V, d]``, zero at initialisation.
      fc_in_init, fc_in_bias_init, fc_out_init, unembedding_base, output_scale,
      unembedding_rate: :class:`FixedArray` constants (initial weights, ``W_0``, ``c``, ``eta``).

    Args:
      unembedding: ``[V, d]`` the base unembeddings ``W_0`` (finite).
      feature_size: ``f``.
      width: ``m``.
      parametrisation: one of :data:`PARAMETRISATIONS`.
      rngs: ``nnx.Rngs`` supplying ``params``.
      lazy_scale: :math:`\alpha > 0` of the lazy parametrisation (unused by mean field).
      unembedding_rate: :math:`\eta \ge 0` (0: ``W`` frozen).
      dtype: parameter dtype.

    Raises:
      ValueError: bad shapes or values (named).

    Example:
      >>> m = ScaledMLPFeatures(jnp.eye(3), 2, width=4, parametrisation="lazy", rngs=nnx.Rngs(0))
      >>> [round(float(p), 4) for p in jnp.exp(m(jnp.ones((1, 2))))[0]]  # h = 0: uniform
      [0.3333, 0.3333, 0.3333]
    """

    def __init__(
        self,
        unembedding: ArrayLike,
        feature_size: int,
        *,
        width: int,
        parametrisation: str,
        rngs: nnx.Rngs,
        lazy_scale: float = 10.0,
        unembedding_rate: float = 0.0,
        dtype: jnp.dtype = jnp.float32,
    ):
        check_ndim("unembedding", unembedding, 2, "[V, d]")
        check_finite("unembedding", unembedding)
        check_positive_int("feature_size", feature_size)
        check_nonnegative("unembedding_rate", unembedding_rate)
        scale = output_multiplier(parametrisation, width, lazy_scale=lazy_scale)
        V, d = np.shape(unembedding)
        A1 = jax.random.normal(rngs.params(), (width, feature_size), dtype)
        b1 = jax.random.normal(rngs.params(), (width,), dtype)
        A2 = jax.random.normal(rngs.params(), (d, width), dtype)
        self.fc_in, self.fc_in_bias, self.fc_out = nnx.Param(A1), nnx.Param(b1), nnx.Param(A2)
        self.fc_in_init, self.fc_in_bias_init = FixedArray(A1), FixedArray(b1)
        self.fc_out_init = FixedArray(A2)
        self.unembedding_base = FixedArray(jnp.asarray(unembedding, dtype))
        # eta = 0: Delta is a constant, so flows carry no [V, d] gradient or optimiser state
        kind = nnx.Param if unembedding_rate > 0 else FixedArray
        self.unembedding_delta = kind(jnp.zeros((V, d), dtype))
        self.output_scale = FixedArray(jnp.asarray(scale, dtype))
        self.unembedding_rate = FixedArray(jnp.asarray(unembedding_rate, dtype))

    @property
    def vocab_size(self) -> int:
        return self.unembedding_base.shape[-2]

    def with_unembedding_rate(self, unembedding_rate: float) -> ScaledMLPFeatures:
        r"""Return a copy whose base is the current ``W``, :math:`\Delta = 0` and rate ``eta``.

        The backbone (current and initial weights, ``c``) is copied unchanged, so the copy computes
        the same log-probs; only how ``W`` trains from now on differs (``0``: frozen).

        Raises:
          ValueError: ``unembedding_rate < 0``.

        Example:
          >>> m = ScaledMLPFeatures(jnp.eye(2), 1, width=3, parametrisation="lazy",
          ...                       rngs=nnx.Rngs(0))
          >>> type(m.with_unembedding_rate(0.5).unembedding_delta).__name__
          'Param'
        """
        check_nonnegative("unembedding_rate", unembedding_rate)
        W = self.unembedding_matrix()
        copy = nnx.clone(self)
        copy.unembedding_base = FixedArray(W)
        kind = nnx.Param if unembedding_rate > 0 else FixedArray
        copy.unembedding_delta = kind(jnp.zeros_like(W))
        copy.unembedding_rate = FixedArray(jnp.asarray(unembedding_rate, W.dtype))
        return copy

    @property
    def feature_size(self) -> int:
        return self.fc_in.shape[-1]

    def unembedding_matrix(self) -> jax.Array:
        r"""Return ``W`` ``[V, d]`` :math:`= W_0 + \eta\Delta`."""
        return self.unembedding_base[...] + self.unembedding_rate[...] * self.unembedding_delta[...]

    def _branch(self, A1, b1, A2, features):
        pre = features @ A1.T / np.sqrt(self.feature_size)  # [..., m]
        pre = pre + b1.reshape((1,) * (pre.ndim - 1) + b1.shape)  # explicit broadcast of [m]
        return jnp.tanh(pre) @ A2.T  # [..., d]

    def hidden(self, features: jax.Array) -> jax.Array:
        """Return :math:`h(x)`, shape ``features.shape[:-1] + (d,)``."""
        now = self._branch(self.fc_in[...], self.fc_in_bias[...], self.fc_out[...], features)
        init = self._branch(
            self.fc_in_init[...], self.fc_in_bias_init[...], self.fc_out_init[...], features
        )
        return self.output_scale[...] * (now - init)

    def __call__(self, features: jax.Array) -> jax.Array:
        """Return next-token log-probs, shape ``features.shape[:-1] + (V,)``."""
        return softmax_logprobs(self.unembedding_matrix(), self.hidden(features))

    def closed_form_kernel(self, features: jax.Array, *, preconditioner: Any = None) -> jax.Array:
        r"""Return the backbone kernel :math:`K = JPJ^\top` ``[d, d]`` at one prompt (closed form).

        .. math::
           K = \mathrm{diag}_k\Big(c^2\sum_j P_{A_2}[k, j]\,\sigma_j^2\Big)
           + A_2\,\mathrm{diag}_j\Big(c^2\sigma_j'^2\big(\textstyle\sum_i P_{A_1}[j, i]\,x_i^2/f
           + P_{b_1}[j]\big)\Big)A_2^\top,

        :math:`\sigma = \tanh(A_1x/\sqrt f + b_1)`, :math:`\sigma' = 1 - \sigma^2`: the sum over
        parameters of :math:`P_p\,\partial h/\partial p\,(\partial h/\partial p)^\top` (``h_k``
        depends on :math:`A_2[k, j]` through :math:`c\sigma_j`, and on :math:`A_1[j, i]`,
        :math:`b_1[j]` through :math:`cA_2[:, j]\sigma'_j x_i/\sqrt f` and
        :math:`cA_2[:, j]\sigma'_j`; the centring term is constant). ``W`` does not enter ``h``.

        Source: the kernel of :mod:`theory.kernel` for this model (derived here); equal to
        :func:`sims.analysis.kernel.hidden_kernel` of :meth:`hidden` (tested), at O(d m (d + f))
        cost.

        Args:
          features: ``[f]`` one prompt's features.
          preconditioner: ``None`` (gradient flow, ``P = I``) or a pytree like
            ``nnx.split(model, nnx.Param, ...)[1]`` holding the diagonal of ``P`` (e.g.
            :func:`sims.analysis.kernel.rmsprop_preconditioner`); only its backbone entries are
            read.

        Returns:
          ``[d, d]`` symmetric PSD kernel.
        """
        x = jnp.asarray(features)
        f = self.feature_size
        A2 = self.fc_out[...]
        sigma = jnp.tanh(self.fc_in[...] @ x / np.sqrt(f) + self.fc_in_bias[...])  # [m]
        if preconditioner is None:
            p1, pb, p2 = jnp.ones_like(self.fc_in[...]), jnp.ones_like(sigma), jnp.ones_like(A2)
        else:
            p1, pb, p2 = (preconditioner[n][...] for n in ("fc_in", "fc_in_bias", "fc_out"))
        c2 = self.output_scale[...] ** 2
        diag = c2 * (p2 @ sigma**2)  # [d]
        weight = c2 * (1.0 - sigma**2) ** 2 * (p1 @ (x**2) / f + pb)  # [m]
        return jnp.diag(diag) + (A2 * weight[None, :]) @ A2.T


def _check_features(model: ScaledMLPFeatures, features, *others) -> None:
    """``features`` ``[N, f]`` (or ``[R, N, f]``) and each id array ``[N]`` (``[R, N]``)."""
    shape = np.shape(features)
    if len(shape) not in (2, 3) or shape[-1] != model.feature_size:
        raise ValueError(
            f"features must have shape [N, f] or [R, N, f] with f={model.feature_size}, got {shape}"
        )
    check_finite("features", features)
    for name, ids in others:
        if np.shape(ids) != shape[:-1]:
            raise ValueError(f"{name} must have shape {shape[:-1]}, got {np.shape(ids)}")
        check_token_ids(name, ids, model.vocab_size)


class FeaturePairs(NamedTuple):
    r"""Single-token preference pairs for :class:`ScaledMLPFeatures` (TRL names).

    Attributes:
      features: ``[N, f]`` prompt features of each pair.
      chosen: ``[N]`` preferred token ids :math:`y^+`.
      rejected: ``[N]`` dispreferred token ids :math:`y^-`.
      ref_logprob_chosen: ``[N]`` :math:`\ln\pi_{ref}(y^+|x)`.
      ref_logprob_rejected: ``[N]`` :math:`\ln\pi_{ref}(y^-|x)`.
      weight: ``[N]`` sample weights, or ``None`` (all 1).
    """

    features: jax.Array
    chosen: jax.Array
    rejected: jax.Array
    ref_logprob_chosen: jax.Array
    ref_logprob_rejected: jax.Array
    weight: jax.Array | None = None

    def logprobs(self, model: ScaledMLPFeatures) -> tuple[jax.Array, jax.Array]:
        """Return ``(logprob_chosen, logprob_rejected)``, each ``[N]``."""
        logprobs = model(self.features)  # [N, V]
        rows = jnp.arange(self.chosen.shape[-1])
        return logprobs[rows, self.chosen], logprobs[rows, self.rejected]

    def record(self, model: ScaledMLPFeatures) -> PreferenceRecord:
        """Return the default flow observables: margins and every token's log-prob."""
        logprobs = model(self.features)  # [N, V]
        rows = jnp.arange(self.chosen.shape[-1])
        return PreferenceRecord(
            logprobs[rows, self.chosen] - logprobs[rows, self.rejected], logprobs
        )

    def validate(self, model: ScaledMLPFeatures) -> None:
        """Raise ``ValueError`` unless shapes and ids fit ``model`` and ``chosen != rejected``."""
        _check_features(model, self.features, ("chosen", self.chosen), ("rejected", self.rejected))
        check_distinct("chosen", self.chosen, "rejected", self.rejected)


def make_feature_pairs(
    model: ScaledMLPFeatures, features: ArrayLike, chosen: ArrayLike, rejected: ArrayLike
) -> FeaturePairs:
    """Return :class:`FeaturePairs` with the reference log-probs taken from ``model`` now.

    Raises:
      ValueError: ``features`` not ``[N, f]``, ids not ``[N]`` or out of range, ``chosen ==
        rejected`` for some pair.

    Example:
      >>> m = ScaledMLPFeatures(jnp.eye(3), 2, width=4, parametrisation="lazy", rngs=nnx.Rngs(0))
      >>> make_feature_pairs(m, jnp.ones((1, 2)), [0], [1]).ref_logprob_chosen.shape
      (1,)
    """
    features = jnp.asarray(features)
    chosen, rejected = (jnp.atleast_1d(jnp.asarray(a)) for a in (chosen, rejected))
    check_ndim("features", features, 2, "[N, f]")
    pairs = FeaturePairs(features, chosen, rejected, jnp.zeros(0), jnp.zeros(0))
    pairs.validate(model)
    lp_c, lp_r = pairs.logprobs(model)
    return pairs._replace(ref_logprob_chosen=lp_c, ref_logprob_rejected=lp_r)


class FeatureSFTData(NamedTuple):
    """Supervised examples for :func:`sims.flows.core.sft_flow` on :class:`ScaledMLPFeatures`.

    Attributes:
      features: ``[N, f]`` prompt features.
      label: ``[N]`` token ids.
    """

    features: jax.Array
    label: jax.Array

    def logprobs(self, model: ScaledMLPFeatures) -> jax.Array:
        r"""Return :math:`\ln\pi(y_i|x_i)` ``[N]``."""
        return model(self.features)[jnp.arange(self.label.shape[-1]), self.label]

    def validate(self, model: ScaledMLPFeatures) -> None:
        """Raise ``ValueError`` unless ``features`` is ``[N, f]`` and ``label`` ``[N]`` ids fit."""
        check_ndim("features", self.features, 2, "[N, f]")
        _check_features(model, jnp.asarray(self.features), ("label", jnp.asarray(self.label)))


def feature_sft_flow(
    model: ScaledMLPFeatures,
    features: ArrayLike,
    label: ArrayLike,
    *,
    dt: float,
    num_steps: int,
    record_every: int = 1,
    optimizer: str = "sgd",
) -> Flow:
    r"""Return the SFT :class:`~sims.flows.core.Flow` of :class:`ScaledMLPFeatures`:
    :func:`sims.flows.core.sft_flow` on :class:`FeatureSFTData` (mean cross-entropy
    :math:`-\frac1N\sum_i\ln\pi(y_i|x_i)`; observables ``[N]`` label log-probs).

    Source: the SFT phase before preference learning (Razin et al. 2024, §2.1, App. H.1).

    Raises:
      ValueError: at ``run()``, ``features`` not ``[N, f]``, ``label`` not ``[N]`` ids in range;
        as :func:`sims.flows.core.integrate`.
    """
    data = FeatureSFTData(jnp.asarray(features), jnp.asarray(label))
    return sft_flow(
        model, data, dt=dt, num_steps=num_steps, record_every=record_every, optimizer=optimizer
    )
