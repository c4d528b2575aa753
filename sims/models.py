r"""Flax NNX models for the gradient-flow simulations.

:class:`UnconstrainedFeatures` is Razin et al. 2024's theory model (§4.1): the token unembeddings
``W`` and a hidden embedding per prefix are all free parameters. Its hidden table is indexed by a
*prefix id*; with single-token responses a prefix is a prompt, and multi-token code maps each
distinct (prompt, response-prefix) to one row, so shared prefixes share one parameter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from theory._checks import check_finite, check_ndim, check_positive, check_positive_int


def softmax_logprobs(unembedding: jax.Array, hidden: jax.Array) -> jax.Array:
    r"""Return :math:`\ln\mathrm{softmax}(W h)` for each row of ``hidden``: ``[..., V]``.

    Source: Razin et al. 2024, Eq. 1 (one token). The maths of :class:`UnconstrainedFeatures`, as a
    pure function of its parameters for code that transforms them directly (``vmap`` over runs).

    Example:
      >>> float(jnp.exp(softmax_logprobs(jnp.ones((4, 2)), jnp.zeros(2)))[0])  # uniform: 1/V
      0.25
    """
    return jax.nn.log_softmax(hidden @ unembedding.T, axis=-1)


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
        V, d = jnp.shape(unembedding)
        model = cls(V, d, jnp.shape(hidden)[0], rngs=nnx.Rngs(0))
        model.unembedding = nnx.Param(jnp.array(unembedding))
        model.hidden = nnx.Param(jnp.array(hidden))
        return model

    @property
    def vocab_size(self) -> int:
        return self.unembedding.shape[0]

    @property
    def num_prefixes(self) -> int:
        return self.hidden.shape[0]

    def logits(self, prefix_ids: jax.Array) -> jax.Array:
        """Return logits :math:`W h_p`, shape ``prefix_ids.shape + (V,)``."""
        return self.hidden[...][prefix_ids] @ self.unembedding[...].T

    def __call__(self, prefix_ids: jax.Array) -> jax.Array:
        """Return next-token log-probs, shape ``prefix_ids.shape + (V,)``."""
        return softmax_logprobs(self.unembedding[...], self.hidden[...][prefix_ids])
