r"""The empirical hidden-state kernel of an NNX model, and the true velocity split by channel.

:mod:`theory.kernel` gives :math:`\frac{d}{dt}\ln\pi(z|x)` when :math:`h = f_\phi(x)` in terms of
the kernel :math:`K = J P J^\top` (:math:`J = \partial h/\partial\theta`, ``P`` the diagonal
preconditioner, ``I`` for gradient flow). This module measures, for any NNX model and any function
``hidden_fn(model) -> h``:

* :func:`hidden_kernel` -- ``K`` ``[d, d]`` for one prompt, or the kernel between prompts
  ``K[i, j] = J_i P J_j^T`` ``[N, N, d, d]``, from products :math:`Kv = J(P(J^\top v))` (one
  transposed ``jvp`` then one ``jvp`` per basis vector, vmapped in chunks): ``J`` is never
  materialised;
* :func:`tied_cross_terms` -- the extra terms ``b`` ``[d]`` and ``r`` ``[V]`` of a model whose
  unembedding is also its input embedding (:func:`theory.kernel.tied_kernel_logprob_velocity`);
* :func:`velocity_channels` -- the true velocity (``jax.jvp`` of the log-probs along
  :math:`-P\nabla L` of the actual loss) and its split into the unembedding channel (the tangent
  restricted to ``W``) and the backbone channel (every other parameter);
* :func:`rmsprop_preconditioner` -- the ``P`` of the first torch-RMSprop step;
* :func:`theory.kernel.kernel_anisotropy` (re-exported) -- :math:`\lambda_{\mathrm{eff}}`.

Parameters are the model's ``nnx.Param`` variables, named by dotted paths as
:func:`param_paths` lists them (``"unembedding"``, ``"embed.embedding"``, ``"blocks.0.fc.kernel"``).
A preconditioner is a pytree of the same structure as ``nnx.split(model, nnx.Param, ...)[1]``
holding the diagonal of ``P`` (entries ``>= 0``). Every function here is a pure function of the
model's state, traceable: wrap a call in ``jax.jit`` / ``jax.vmap`` (with ``nnx.merge`` of a split
state inside) to compile once for many prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from theory.checks import check_nonnegative, check_positive_int
from theory.kernel import kernel_anisotropy

__all__ = [
    "TiedCrossTerms",
    "VelocityChannels",
    "KernelFormVelocity",
    "first_step_velocity",
    "hidden_kernel",
    "kernel_anisotropy",
    "param_paths",
    "rmsprop_preconditioner",
    "tied_cross_terms",
    "velocity_channels",
]


def _path_name(path) -> str:
    """Dotted name of a state leaf's key path (the trailing Variable ``value`` key dropped)."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        else:
            parts.append(str(key))
    if parts and parts[-1] == "value":
        parts.pop()
    return ".".join(parts)


def _split(model: nnx.Module):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def _names(params) -> list[str]:
    return [_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def param_paths(model: nnx.Module) -> tuple[str, ...]:
    """Return the dotted names of ``model``'s ``nnx.Param`` leaves, in state order.

    Example:
      >>> from sims.models.unconstrained import UnconstrainedFeatures
      >>> param_paths(UnconstrainedFeatures(3, 2, 1, rngs=nnx.Rngs(0)))
      ('hidden', 'unembedding')
    """
    return tuple(_names(_split(model)[1]))


def _check_names(what: str, names: Sequence[str], known: list[str]) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{what} must name parameters of the model {known}, got unknown {unknown}")


def _gains(params, preconditioner, exclude: Sequence[str] = ()):
    """Per-leaf diagonal of ``P`` (ones without a preconditioner), zero on ``exclude``d leaves."""
    if preconditioner is None:
        gains = jax.tree_util.tree_map(jnp.ones_like, params)
    else:
        if jax.tree_util.tree_structure(preconditioner) != jax.tree_util.tree_structure(params):
            raise ValueError(
                "preconditioner must have the structure of nnx.split(model, nnx.Param, ...)[1], "
                f"got leaves {len(jax.tree_util.tree_leaves(preconditioner))} for "
                f"{len(jax.tree_util.tree_leaves(params))} parameters"
            )
        for (path, p), x in zip(
            jax.tree_util.tree_flatten_with_path(preconditioner)[0],
            jax.tree_util.tree_leaves(params),
            strict=True,
        ):
            if jnp.shape(p) != jnp.shape(x):
                raise ValueError(
                    f"preconditioner[{_path_name(path)!r}] must have the parameter's shape "
                    f"{jnp.shape(x)}, got {jnp.shape(p)}"
                )
            check_nonnegative(f"preconditioner[{_path_name(path)!r}]", p)
        gains = jax.tree_util.tree_map(lambda p, x: jnp.asarray(p, x.dtype), preconditioner, params)
    excluded = set(exclude)
    return jax.tree_util.tree_map_with_path(
        lambda path, g: jnp.zeros_like(g) if _path_name(path) in excluded else g, gains
    )


def _only(tree, name: str, keep: bool):
    """``tree`` with every leaf but ``name`` zeroed (``keep=True``), or only ``name`` zeroed."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if (_path_name(path) == name) == keep else jnp.zeros_like(x), tree
    )


def _leaf(tree, name: str):
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if _path_name(path) == name:
            return x
    raise KeyError(name)


def hidden_kernel(
    hidden_fn: Callable[[nnx.Module], jax.Array],
    model: nnx.Module,
    *,
    exclude: Sequence[str] = (),
    preconditioner: Any = None,
    chunk_size: int = 64,
) -> jax.Array:
    r"""Return the hidden-state kernel :math:`K = J P J^\top` of ``model`` at its current state.

    .. math::
       K_{ij} = J_i\,P\,J_j^\top,\qquad J_i = \frac{\partial h_i}{\partial\theta}
       \ (\theta: \text{the backbone parameters})

    built column by column as :math:`K e_b = J(P(J^\top e_b))` (one ``vjp`` -- the transpose of
    the linearised ``hidden_fn`` -- and one ``jvp``;
    ``lax.map`` over the ``n = h.size`` basis vectors in vmapped chunks of ``chunk_size``), then
    symmetrised, :math:`(K + K^\top)/2` (the two halves differ by round-off only).

    Source: the kernel of :mod:`theory.kernel` (the backbone's effect on ``h`` under
    :math:`\dot\theta = -P\nabla L`).

    Args:
      hidden_fn: ``model -> h``, ``[d]`` (one prompt) or ``[N, d]`` (``N`` prompts).
      model: any NNX module; its ``nnx.Param`` leaves are the parameters.
      exclude: dotted parameter names (:func:`param_paths`) held fixed, i.e. not in the backbone
        (e.g. ``("unembedding",)``; for an untied ``W`` this changes nothing, as ``h`` does not
        depend on it). Default: every parameter.
      preconditioner: the diagonal of ``P`` as a pytree like the ``nnx.Param`` state (entries
        ``>= 0``), or ``None`` for gradient flow (``P = I``).
      chunk_size: basis vectors per vmapped chunk (memory ~ ``chunk_size`` gradients).

    Returns:
      ``[d, d]`` for ``h`` ``[d]``; ``[N, N, d, d]`` with ``K[i, j] = J_i P J_j^T`` for
      ``h`` ``[N, d]``.

    Raises:
      ValueError: ``hidden_fn`` output not 1-D or 2-D, unknown names in ``exclude``, a
        preconditioner of another structure / shape or with a negative entry, bad ``chunk_size``.

    Example:
      >>> from sims.models.unconstrained import UnconstrainedFeatures
      >>> m = UnconstrainedFeatures(4, 3, 2, rngs=nnx.Rngs(0))  # free h: J = I on its own row
      >>> K = hidden_kernel(lambda m: m.hidden[...][1], m)
      >>> bool(jnp.allclose(K, jnp.eye(3)))
      True
    """
    check_positive_int("chunk_size", chunk_size)
    graphdef, params, rest = _split(model)
    _check_names("exclude", exclude, _names(params))
    gains = _gains(params, preconditioner, exclude)

    def f(p):
        return hidden_fn(nnx.merge(graphdef, p, rest))

    h, jvp_fn = jax.linearize(f, params)  # one forward pass serves J v and (transposed) J^T v
    if h.ndim not in (1, 2):
        raise ValueError(f"hidden_fn must return h of shape [d] or [N, d], got shape {h.shape}")
    vjp_fn = jax.linear_transpose(jvp_fn, params)
    n = h.size

    def column(e):  # e [n]: one basis vector -> K e [n]
        (g,) = vjp_fn(e.reshape(h.shape))
        return jvp_fn(jax.tree_util.tree_map(jnp.multiply, g, gains)).reshape(n)

    cols = jax.lax.map(column, jnp.eye(n, dtype=h.dtype), batch_size=min(chunk_size, n))  # [n, n]
    K = 0.5 * (cols + cols.T)  # row b of cols is K e_b; K is symmetric up to round-off
    if h.ndim == 1:
        return K
    N, d = h.shape
    return jnp.transpose(K.reshape(N, d, N, d), (0, 2, 1, 3))  # [N, N, d, d]


class TiedCrossTerms(NamedTuple):
    r"""Cross terms of a tied model (``W`` is also the input embedding ``E``).

    Attributes:
      hidden_cross: ``[d]`` :math:`b = J_E(P_E\odot(e_{y^+} - e_{y^-})h^\top)`, the move of ``h``
        caused by the ``W``-channel step through the input embeddings.
      logit_cross: ``[V]`` :math:`r = (P_E\odot J_E^\top u)\,h`, :math:`u = W_{y^+} - W_{y^-}`,
        the move of the logits caused by the backbone-channel step of ``E``.
    """

    hidden_cross: jax.Array
    logit_cross: jax.Array


def tied_cross_terms(
    hidden_fn: Callable[[nnx.Module], jax.Array],
    model: nnx.Module,
    y_pos: int,
    y_neg: int,
    *,
    unembedding: str,
    preconditioner: Any = None,
) -> TiedCrossTerms:
    r"""Return the cross terms ``b``, ``r`` of :func:`theory.kernel.tied_kernel_logprob_velocity`.

    .. math::
       b = J_E\big(P_E\odot(e_{y^+} - e_{y^-})h^\top\big),\qquad
       r = \big(P_E\odot J_E^\top(W_{y^+} - W_{y^-})\big)\,h,\qquad J_E = \partial h/\partial E

    (one ``jvp`` and one ``vjp`` of ``hidden_fn``).

    Source: the tied paragraph of :mod:`theory.kernel`.

    Args:
      hidden_fn: ``model -> h`` ``[d]`` (one prompt).
      model: an NNX module whose parameter ``unembedding`` is both ``W`` ``[V, d]`` and an input.
      y_pos, y_neg: the pair's token ids.
      unembedding: dotted name of the shared table (``"embed.embedding"`` for a tied
        :class:`sims.models.transformer.CausalTransformer`).
      preconditioner: as :func:`hidden_kernel` (``None``: ``P = I``).

    Returns:
      :class:`TiedCrossTerms`.

    Raises:
      ValueError: unknown ``unembedding``, a table that is not ``[V, d]`` matching ``h``, bad
        preconditioner.
    """
    graphdef, params, rest = _split(model)
    _check_names("unembedding", [unembedding], _names(params))
    gains = _gains(params, preconditioner)
    W, gain_W = _leaf(params, unembedding), _leaf(gains, unembedding)

    def f(p):
        return hidden_fn(nnx.merge(graphdef, p, rest))

    h, jvp_fn = jax.linearize(f, params)
    vjp_fn = jax.linear_transpose(jvp_fn, params)
    if h.ndim != 1 or W.ndim != 2 or W.shape[1] != h.shape[0]:
        raise ValueError(
            f"need h [d] and the table {unembedding!r} [V, d], got {h.shape} and {W.shape}"
        )
    V = W.shape[0]
    (g,) = vjp_fn(W[y_pos] - W[y_neg])
    logit_cross = (gain_W * _leaf(g, unembedding)) @ h  # [V]
    signs = jax.nn.one_hot(y_pos, V, dtype=W.dtype) - jax.nn.one_hot(y_neg, V, dtype=W.dtype)
    direction = jax.tree_util.tree_map_with_path(  # the W-channel step, P_E (e+ - e-) h^T
        lambda path, x: (
            gain_W * jnp.outer(signs, h) if _path_name(path) == unembedding else jnp.zeros_like(x)
        ),
        params,
    )
    hidden_cross = jvp_fn(direction)
    return TiedCrossTerms(hidden_cross, logit_cross)


class VelocityChannels(NamedTuple):
    r"""The true :math:`\frac{d}{dt}\ln\pi` and its split by parameter group (sums to ``total``).

    Attributes:
      total: velocity along :math:`-P\nabla L` over all parameters.
      unembedding: the part from the unembedding parameter's motion alone.
      backbone: the part from every other parameter's motion.
    """

    total: jax.Array
    unembedding: jax.Array
    backbone: jax.Array


def velocity_channels(
    logprob_fn: Callable[[nnx.Module], jax.Array],
    loss_fn: Callable[[nnx.Module], jax.Array],
    model: nnx.Module,
    *,
    unembedding: str,
    preconditioner: Any = None,
) -> VelocityChannels:
    r"""Return the true velocity of ``logprob_fn`` along :math:`-P\nabla L`, split by channel.

    .. math::
       \frac{d}{dt}\ln\pi = \underbrace{\partial_W\ln\pi\,\dot W}_{\text{unembedding}}
       + \underbrace{\partial_\phi\ln\pi\,\dot\phi}_{\text{backbone}},\qquad
       (\dot\phi, \dot W) = -P\,\nabla L

    by one ``jax.linearize`` of ``logprob_fn`` applied to the full tangent and to its two parts.
    This is the autodiff truth that :mod:`theory.kernel` predicts; for an untied ``W`` the
    unembedding channel is the :math:`\eta\|h\|^2` term and the backbone channel the ``K`` term.

    Source: chain rule along gradient flow (Razin et al. 2024, Eq. 7 without the
    unconstrained-features assumption).

    Args:
      logprob_fn: ``model -> ln pi`` (e.g. ``[V]`` next-token log-probs at the prompt).
      loss_fn: ``model -> L`` scalar, the actual training loss (e.g. DPO on the pair).
      model: an NNX module.
      unembedding: dotted name of the unembedding parameter (``"unembedding"``, or
        ``"embed.embedding"`` when tied: the channel then includes its input-embedding role).
      preconditioner: as :func:`hidden_kernel` (``None``: gradient flow).

    Returns:
      :class:`VelocityChannels`, each shaped like ``logprob_fn``'s output.

    Raises:
      ValueError: unknown ``unembedding``; bad preconditioner.
    """
    graphdef, params, rest = _split(model)
    _check_names("unembedding", [unembedding], _names(params))
    gains = _gains(params, preconditioner)

    def merged(fn):
        return lambda p: fn(nnx.merge(graphdef, p, rest))

    grads = jax.grad(merged(loss_fn))(params)
    tangent = jax.tree_util.tree_map(lambda g, p: -p * g, grads, gains)
    _, lin = jax.linearize(merged(logprob_fn), params)
    return VelocityChannels(
        lin(tangent),
        lin(_only(tangent, unembedding, keep=True)),
        lin(_only(tangent, unembedding, keep=False)),
    )


def rmsprop_preconditioner(
    loss_fn: Callable[[nnx.Module], jax.Array],
    model: nnx.Module,
    *,
    decay: float = 0.99,
    eps: float = 1e-8,
) -> Any:
    r"""Return the diagonal ``P`` of the first torch-RMSprop step, as a pytree like the params.

    .. math:: P = \frac{1}{\sqrt{(1-\alpha)\,g^2} + \epsilon} = \frac{1}{\sqrt{1-\alpha}\,|g| +
       \epsilon},\qquad g = \nabla_\theta L

    Torch RMSprop starts from a zero square average, so its first step is exactly
    :math:`\theta_1 = \theta_0 - \mathrm{lr}\,P\,g` (``eps`` outside the square root, torch
    convention; :func:`sims.flows.core.make_optimizer` ``"rmsprop_torch"``).

    Source: Razin et al. 2024, App. H (RMSprop); torch.optim.RMSprop defaults ``alpha = 0.99``,
    ``eps = 1e-8``.

    Args:
      loss_fn: ``model -> L`` scalar.
      model: an NNX module.
      decay: :math:`\alpha` in ``[0, 1)``.
      eps: :math:`\epsilon > 0`.

    Returns:
      pytree of ``P`` entries, the structure of ``nnx.split(model, nnx.Param, ...)[1]``.

    Raises:
      ValueError: ``decay`` outside ``[0, 1)`` or ``eps <= 0``.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got decay={decay}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got eps={eps}")
    graphdef, params, rest = _split(model)
    grads = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest)))(params)
    root = float(np.sqrt(1.0 - decay))
    return jax.tree_util.tree_map(lambda g: 1.0 / (root * jnp.abs(g) + eps), grads)


class KernelFormVelocity(NamedTuple):
    r"""The kernel-form velocity of every token and its channels (each ``[V]``; they sum to
    ``total``), at one prompt under :math:`\dot\theta = -P\nabla L`.

    Attributes:
      total: :math:`\frac{d}{dt}\ln\pi(z|x)`.
      hidden: :math:`-\ell' a_z^\top K_P u`, the backbone moving ``h`` (input-embedding rows
        included when tied).
      tied: :math:`-\ell'(a_z^\top b + r_z - \pi^\top r)`, the tied cross terms (0 when untied).
      unembedding: :math:`-\ell'[(\delta_{z,y^+} - \pi_+) g_+ - (\delta_{z,y^-} - \pi_-) g_-]`,
        the ``W`` rows of :math:`y^\pm` moving.
      ell_prime: :math:`\ell'` at the current margin.
    """

    total: jax.Array
    hidden: jax.Array
    tied: jax.Array
    unembedding: jax.Array
    ell_prime: jax.Array


def first_step_velocity(
    hidden_fn: Callable[[nnx.Module], jax.Array],
    margin_loss: Callable[[jax.Array], jax.Array],
    model: nnx.Module,
    y_pos: int,
    y_neg: int,
    *,
    unembedding: str,
    tied: bool,
    preconditioner: Any = None,
) -> KernelFormVelocity:
    r"""Return the kernel-form :math:`\frac{d}{dt}\ln\pi(\cdot|x)` of a real network, matrix-free.

    .. math::
       \frac{d}{dt}\ln\pi(z|x) = -\ell'\Big[a_z^\top(K_P u + b) + r_z - \pi^\top r
       + (\delta_{z,y^+} - \pi_{y^+})g_+ - (\delta_{z,y^-} - \pi_{y^-})g_-\Big]

    with :math:`K_P u = J P J^\top u` by one ``vjp`` and one ``jvp`` of ``hidden_fn`` (``K`` is
    never formed), the tied cross terms ``b``, ``r`` (:func:`tied_cross_terms`) and
    :math:`g_\pm` from ``P`` on the unembedding. With ``preconditioner`` the diagonal of the
    first torch-RMSprop step (:func:`rmsprop_preconditioner`), ``lr * total`` predicts the change
    of every log-prob in that step to first order.

    Source: :mod:`theory.kernel` (tied paragraph; :func:`theory.kernel.drive_logprob_velocity`).

    Args:
      hidden_fn: ``model -> h`` ``[d]`` (the final hidden state at the prompt's last position);
        the model's logits there must be ``W h``.
      margin_loss: ``u -> loss`` of the margin :math:`\ln\pi(y^+) - \ln\pi(y^-)` (its derivative
        is :math:`\ell'`; e.g. ``lambda u: dpo_loss(u, 0.0, ref_c, ref_r, beta=0.1)``).
      model: the network; unembedding: the dotted name of ``W`` among its parameters
        (:func:`param_paths`); tied: ``W`` is also the input embedding.
      y_pos, y_neg: the pair's token ids.
      preconditioner: as :func:`hidden_kernel` (``None``: gradient flow).

    Returns:
      :class:`KernelFormVelocity`.
    """
    from theory.kernel import drive_logprob_velocity

    graphdef, params, rest = _split(model)
    _check_names("unembedding", [unembedding], _names(params))
    gains = _gains(params, preconditioner)
    W, gain_W = _leaf(params, unembedding), _leaf(gains, unembedding)

    def f(p):
        return hidden_fn(nnx.merge(graphdef, p, rest))

    h, jvp_fn = jax.linearize(f, params)
    vjp_fn = jax.linear_transpose(jvp_fn, params)
    logprobs = jax.nn.log_softmax(W @ h)
    ell_prime = jax.grad(margin_loss)(logprobs[y_pos] - logprobs[y_neg])
    u = W[y_pos] - W[y_neg]
    (g_u,) = vjp_fn(u)  # J^T u over every parameter
    if not tied:  # h does not depend on W: its J^T u entry is zero and there is no cross term
        g_u = _only(g_u, unembedding, keep=False)
    drive_K = jvp_fn(jax.tree_util.tree_map(jnp.multiply, g_u, gains))
    V = W.shape[0]
    zero_d, zero_V = jnp.zeros_like(h), jnp.zeros((V,), h.dtype)
    b, r = zero_d, zero_V
    if tied:
        b, r = tied_cross_terms(
            hidden_fn, model, y_pos, y_neg, unembedding=unembedding, preconditioner=preconditioner
        )
    h_sq = h * h
    g_pos = jnp.sum(jnp.broadcast_to(gain_W, W.shape)[y_pos] * h_sq)
    g_neg = jnp.sum(jnp.broadcast_to(gain_W, W.shape)[y_neg] * h_sq)
    hidden = drive_logprob_velocity(W, h, drive_K, zero_V, 0.0, 0.0, y_pos, y_neg, ell_prime)
    cross = drive_logprob_velocity(W, h, b, r, 0.0, 0.0, y_pos, y_neg, ell_prime)
    w_channel = drive_logprob_velocity(W, h, zero_d, zero_V, g_pos, g_neg, y_pos, y_neg, ell_prime)
    return KernelFormVelocity(hidden + cross + w_channel, hidden, cross, w_channel, ell_prime)
