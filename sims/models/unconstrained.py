r"""Flax NNX models for the gradient-flow simulations.

:class:`UnconstrainedFeatures` is Razin et al. 2024's theory model (§4.1): the token unembeddings
``W`` and a hidden embedding per prefix are all free parameters. Its hidden table is indexed by a
*prefix id*; with single-token responses a prefix is a prompt, and multi-token code maps each
distinct (prompt, response-prefix) to one row, so shared prefixes share one parameter.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from theory.checks import (
    check_distinct,
    check_finite,
    check_ndim,
    check_positive,
    check_positive_int,
    check_token_ids,
)


def softmax_logprobs(unembedding: jax.Array, hidden: jax.Array) -> jax.Array:
    r"""Return :math:`\ln\mathrm{softmax}(W h)` for each row of ``hidden``: ``[..., V]``.

    Source: Razin et al. 2024, Eq. 1 (one token). The maths of :class:`UnconstrainedFeatures`, as a
    pure function of its parameters for code that transforms them directly (``vmap`` over runs).

    Example:
      >>> float(jnp.exp(softmax_logprobs(jnp.ones((4, 2)), jnp.zeros(2)))[0])  # uniform: 1/V
      0.25
    """
    return jax.nn.log_softmax(_logits(unembedding, hidden), axis=-1)


def _logits(unembedding: jax.Array, hidden: jax.Array) -> jax.Array:
    # einsum rather than hidden @ unembedding.T: with the explicit transpose, XLA's CPU backend
    # fused the transpose of W into the backward vector-matrix product as a strided loop, 80% of
    # a flow step (420 vs 123 us per step at V = 1000, d = 256; docs/performance.md)
    return jnp.einsum("...d,vd->...v", hidden, unembedding)


class UnconstrainedFeatures(nnx.Module):
    r"""Softmax model :math:`\pi(\cdot|p) = \mathrm{softmax}(W h_p)`, ``W`` and ``h_p`` trainable.

    Source: Razin et al. 2024, Eq. 1 and §4.1 (unconstrained features, Mixon et al. 2022).

    Attributes:
      unembedding: ``nnx.Param`` ``[V, d]``, rows :math:`W_z`.
      hidden: ``nnx.Param`` ``[P, d]``, one hidden embedding per prefix (prompt).

    Args:
      vocab_size: ``V``.
      hidden_size: ``d``.
      num_prefixes: ``P``, rows of the hidden table.
      rngs: ``nnx.Rngs`` supplying ``params``.
      unembedding_scale: entries of ``W`` are :math:`\mathcal N(0, s^2/d)`, so rows have norm
        about ``s``.
      hidden_scale: likewise for the hidden embeddings.
      dtype: parameter dtype (float64 needs ``jax_enable_x64``).

    Example:
      >>> model = UnconstrainedFeatures(5, 3, 2, rngs=nnx.Rngs(0))
      >>> model(jnp.array([0, 1])).shape  # log-probs for each prefix
      (2, 5)
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_prefixes: int,
        *,
        rngs: nnx.Rngs,
        unembedding_scale: float = 1.0,
        hidden_scale: float = 1.0,
        dtype: jnp.dtype = jnp.float32,
    ):
        for name, value in (
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("num_prefixes", num_prefixes),
        ):
            check_positive_int(name, value)
        check_positive("unembedding_scale", unembedding_scale)
        check_positive("hidden_scale", hidden_scale)
        std = 1.0 / jnp.sqrt(hidden_size)
        self.unembedding = nnx.Param(
            unembedding_scale
            * std
            * jax.random.normal(rngs.params(), (vocab_size, hidden_size), dtype)
        )
        self.hidden = nnx.Param(
            hidden_scale
            * std
            * jax.random.normal(rngs.params(), (num_prefixes, hidden_size), dtype)
        )

    @classmethod
    def from_arrays(cls, unembedding: ArrayLike, hidden: ArrayLike) -> UnconstrainedFeatures:
        """Return a model with copies of ``unembedding`` ``[V, d]`` and ``hidden`` ``[P, d]``.

        Raises:
          ValueError: wrong ranks, mismatched ``d``, non-finite entries.
        """
        check_ndim("unembedding", unembedding, 2, "[V, d]")
        check_ndim("hidden", hidden, 2, "[P, d]")
        if jnp.shape(unembedding)[1] != jnp.shape(hidden)[1]:
            raise ValueError(
                f"hidden must have the hidden size d={jnp.shape(unembedding)[1]} of unembedding, "
                f"got shape {jnp.shape(hidden)}"
            )
        check_finite("unembedding", unembedding)
        check_finite("hidden", hidden)
        d = jnp.shape(unembedding)[1]
        model = cls(1, d, 1, rngs=nnx.Rngs(0))  # tiny placeholder init, replaced below
        model.unembedding = nnx.Param(jnp.array(unembedding))
        model.hidden = nnx.Param(jnp.array(hidden))
        return model

    @property
    def vocab_size(self) -> int:
        return self.unembedding.shape[-2]

    @property
    def num_prefixes(self) -> int:
        return self.hidden.shape[-2]

    def logits(self, prefix_ids: jax.Array) -> jax.Array:
        """Return logits :math:`W h_p`, shape ``prefix_ids.shape + (V,)``."""
        return _logits(self.unembedding[...], self.hidden[...][prefix_ids])

    def __call__(self, prefix_ids: jax.Array) -> jax.Array:
        """Return next-token log-probs, shape ``prefix_ids.shape + (V,)``."""
        return softmax_logprobs(self.unembedding[...], self.hidden[...][prefix_ids])


class PreferenceRecord(NamedTuple):
    """Observables of a single-token preference flow at one checkpoint.

    Attributes:
      margin: ``[N]`` :math:`\\ln\\pi(y^+|x) - \\ln\\pi(y^-|x)`.
      logprobs: ``[N, V]`` :math:`\\ln\\pi(z|x)` of every token for every pair's prompt.
    """

    margin: jax.Array
    logprobs: jax.Array


class PreferencePairs(NamedTuple):
    r"""Single-token preference pairs for :class:`UnconstrainedFeatures` (TRL names).

    The pairs type of the single-token family; :func:`sims.flows.core.preference_flow` trains on it.

    Attributes:
      prompt: ``[N]`` row of the hidden table (prefix id) of each pair.
      chosen: ``[N]`` preferred token ids :math:`y^+`.
      rejected: ``[N]`` dispreferred token ids :math:`y^-`.
      ref_logprob_chosen: ``[N]`` :math:`\ln\pi_{ref}(y^+|x)`.
      ref_logprob_rejected: ``[N]`` :math:`\ln\pi_{ref}(y^-|x)`.
      weight: ``[N]`` sample weights, or ``None`` (all 1).
    """

    prompt: jax.Array
    chosen: jax.Array
    rejected: jax.Array
    ref_logprob_chosen: jax.Array
    ref_logprob_rejected: jax.Array
    weight: jax.Array | None = None

    def logprobs(self, model: UnconstrainedFeatures) -> tuple[jax.Array, jax.Array]:
        """Return ``(logprob_chosen, logprob_rejected)``, each ``[N]``."""
        logprobs = model(self.prompt)  # [N, V]
        rows = jnp.arange(self.prompt.shape[-1])
        return logprobs[rows, self.chosen], logprobs[rows, self.rejected]

    def record(self, model: UnconstrainedFeatures) -> PreferenceRecord:
        """Return the default flow observables: margins and every token's log-prob."""
        logprobs = model(self.prompt)  # [N, V]
        rows = jnp.arange(self.prompt.shape[-1])
        margin = logprobs[rows, self.chosen] - logprobs[rows, self.rejected]
        return PreferenceRecord(margin, logprobs)

    def validate(self, model: UnconstrainedFeatures) -> None:
        """Raise ``ValueError`` unless the ids fit ``model`` and ``chosen != rejected`` per pair."""
        _check_pair_ids(model, self.prompt, self.chosen, self.rejected)


def _check_pair_ids(model, prompt, chosen, rejected) -> None:
    shapes = {np.shape(a) for a in (prompt, chosen, rejected)}
    if len(shapes) != 1 or len(shapes.pop()) not in (1, 2):
        raise ValueError(
            "prompt, chosen and rejected must have one shape [N] (or [R, N] stacked), got "
            f"{np.shape(prompt)}, {np.shape(chosen)}, {np.shape(rejected)}"
        )
    check_token_ids("prompt", prompt, model.num_prefixes)
    check_token_ids("chosen", chosen, model.vocab_size)
    check_token_ids("rejected", rejected, model.vocab_size)
    check_distinct("chosen", chosen, "rejected", rejected)


def make_pairs(
    model: UnconstrainedFeatures, prompt: ArrayLike, chosen: ArrayLike, rejected: ArrayLike
) -> PreferencePairs:
    """Return :class:`PreferencePairs` with the reference log-probs taken from ``model`` now.

    Raises:
      ValueError: shapes differ, ids out of range, ``chosen == rejected`` for some pair.

    Example:
      >>> model = UnconstrainedFeatures(4, 2, 1, rngs=nnx.Rngs(0))
      >>> make_pairs(model, [0], [1], [2]).ref_logprob_chosen.shape
      (1,)
    """
    prompt, chosen, rejected = (jnp.atleast_1d(jnp.asarray(a)) for a in (prompt, chosen, rejected))
    for name, arr in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        check_ndim(name, arr, 1, "[N]")
    _check_pair_ids(model, prompt, chosen, rejected)
    pairs = PreferencePairs(prompt, chosen, rejected, jnp.zeros(0), jnp.zeros(0))
    lp_c, lp_r = pairs.logprobs(model)
    return pairs._replace(ref_logprob_chosen=lp_c, ref_logprob_rejected=lp_r)


class MLPFeatures(nnx.Module):
    r"""Softmax model with a network backbone: :math:`\pi(\cdot|x) = \mathrm{softmax}(W h(x))`.

    .. math:: h(x) = A_2\tanh(A_1 x + b_1) + b_2

    Unlike :class:`UnconstrainedFeatures`, the hidden embedding is the output of a trainable
    one-hidden-layer MLP of fixed prompt features ``x`` ``[f]``, so prompts share parameters and the
    hidden-state kernel :math:`K = JJ^\top` is not the identity (:mod:`theory.kernel`). ``W`` is a
    separate (untied) trainable parameter.

    Source: Razin et al. 2024, Eq. 1 with a network computing :math:`h_x` (the setting their
    unconstrained-features analysis abstracts away, §4.1 and §8.1).

    Attributes:
      fc1, fc2: the MLP's ``nnx.Linear`` layers (``f -> width -> d``).
      unembedding: ``nnx.Param`` ``[V, d]``.

    Args:
      vocab_size: ``V``.
      feature_size: ``f``, prompt-feature dimension.
      hidden_size: ``d``.
      width: MLP width.
      rngs: ``nnx.Rngs`` supplying ``params``.
      unembedding_scale: rows of ``W`` have norm about this (entries :math:`\mathcal N(0, s^2/d)`).
      dtype: parameter dtype.

    Example:
      >>> m = MLPFeatures(5, 3, 2, width=4, rngs=nnx.Rngs(0))
      >>> m(jnp.ones((6, 3))).shape  # log-probs for each prompt's features
      (6, 5)
    """

    def __init__(
        self,
        vocab_size: int,
        feature_size: int,
        hidden_size: int,
        *,
        width: int,
        rngs: nnx.Rngs,
        unembedding_scale: float = 1.0,
        dtype: jnp.dtype = jnp.float32,
    ):
        for name, value in (
            ("vocab_size", vocab_size),
            ("feature_size", feature_size),
            ("hidden_size", hidden_size),
            ("width", width),
        ):
            check_positive_int(name, value)
        check_positive("unembedding_scale", unembedding_scale)
        self.fc1 = nnx.Linear(feature_size, width, rngs=rngs, param_dtype=dtype)
        self.fc2 = nnx.Linear(width, hidden_size, rngs=rngs, param_dtype=dtype)
        self.unembedding = nnx.Param(
            unembedding_scale
            / np.sqrt(hidden_size)
            * jax.random.normal(rngs.params(), (vocab_size, hidden_size), dtype)
        )

    @property
    def vocab_size(self) -> int:
        return self.unembedding.shape[-2]

    def unembedding_matrix(self) -> jax.Array:
        """Return ``W`` ``[V, d]`` (the name the transformer family uses)."""
        return self.unembedding[...]

    def hidden(self, features: jax.Array) -> jax.Array:
        """Return :math:`h(x)`, shape ``features.shape[:-1] + (d,)``."""
        return self.fc2(jnp.tanh(self.fc1(features)))

    def __call__(self, features: jax.Array) -> jax.Array:
        """Return next-token log-probs, shape ``features.shape[:-1] + (V,)``."""
        return softmax_logprobs(self.unembedding[...], self.hidden(features))
