r"""Exact reduced flow for single-token margin losses: integrate only what moves.

Setting: :class:`~sims.models.unconstrained.UnconstrainedFeatures` (``W`` ``[V, d]``, hidden table
``[P, d]``),
single-token pairs :math:`(x_i, y^+_i, y^-_i)`, a loss of the class (DPO, IPO, SLiC, REBEL, GPO),
:math:`L = \frac1N\sum_i \ell_i(u_i)` with :math:`u_i = \ln\pi(y^+_i|x_i) - \ln\pi(y^-_i|x_i)`.

Why it is exact. The log-sum-exp cancels in the margin, :math:`u_i = \langle W_{y^+_i} -
W_{y^-_i}, h_{x_i}\rangle`, so with :math:`g_i = \ell_i'(u_i)/N`

.. math:: \nabla_{W_z} L = \sum_i g_i(\mathbb 1[z=y^+_i] - \mathbb 1[z=y^-_i])\,h_{x_i},\qquad
          \nabla_{h_p} L = \sum_i g_i\,\mathbb 1[p=x_i]\,(W_{y^+_i} - W_{y^-_i}).

(1) Rows :math:`W_z` with :math:`z` in no pair and hidden rows of prompts in no pair get a zero
gradient: they never move. (2) The ``M = K + P_u`` moving vectors (``K`` used
tokens, ``P_u`` used prompts) change by linear combinations of each other, so they stay in
:math:`S = \mathrm{span}\{W_z(0), h_p(0)\}` (dimension :math:`r \le \min(d, M)`) -- for the
Euler/SGD step as well as for the flow. With an orthonormal basis ``B`` ``[d, r]`` of ``S`` each
moving vector is :math:`B c`, the step acts on the coefficients ``c`` ``[M, r]`` alone
(:math:`\langle Bc, Bc'\rangle = \langle c, c'\rangle`), and the full-vocabulary logits are

.. math:: W(t) h_p(t) = \underbrace{(W(0) B)}_{\text{precomputed } [V, r]}\,c_p(t)
          \quad\text{except the } K \text{ moving rows, where } \langle c_z(t), c_p(t)\rangle.

So a step costs :math:`O(N r)` (``r <= 3`` for one pair), a checkpoint :math:`O(N V r)`, and
``W(0) @ B`` is read once.

Optimisers: only ``"sgd"`` (explicit Euler, as :func:`sims.flows.core.preference_flow` with
``optimizer="sgd"``). Coordinate-wise optimisers (RMSprop, Adam) do not commute with the rotation
``B``; carrying the moving rows themselves is exact for them in exact arithmetic by (1), but they
divide the gradient by its running magnitude, so near a minimum (IPO, REBEL) they amplify the
round-off difference between ``lp+ - lp-`` and ``<W_{y+} - W_{y-}, h>`` to steps of size ``dt``:
measured relative disagreement with the full-parameter flow was up to 1e-1 (IPO, RMSprop, 1,000
steps), so they are refused.

Not exact -- refused, use :func:`sims.flows.core.preference_flow`: an SFT/NLL term, DPOP, weighted
margins and SimPO (a term depends on :math:`\ln\pi` itself, whose log-sum-exp moves every row of
``W``), multi-token responses (hidden states of response prefixes, Eq. 9).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sims.flows.core import FlowResult, all_finite, check_schedule, flow_fn, raise_on_nonfinite
from sims.models.unconstrained import PreferencePairs, PreferenceRecord, UnconstrainedFeatures
from theory.checks import check_finite, check_token_ids
from theory.losses import LOSSES, MARGIN_CLASS, BoundLoss, PairLoss

_GENERAL_PATH = "use the general full-parameter path sims.flows.core.preference_flow"


class PairIndex(NamedTuple):
    """Static structure of a pair set (NumPy, concrete): which rows move and where each pair points.

    Attributes:
      tokens: ``[K]`` sorted distinct ids in ``chosen``, ``rejected`` (moving rows of ``W``).
      prompts: ``[P_u]`` sorted distinct prompt ids (moving rows of the hidden table).
      chosen: ``[N]`` position of each pair's :math:`y^+` in ``tokens``.
      rejected: ``[N]`` position of :math:`y^-` in ``tokens``.
      prompt: ``[N]`` position of each pair's prompt in ``prompts``.
    """

    tokens: np.ndarray
    prompts: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    prompt: np.ndarray


class ReducedState(NamedTuple):
    """Parameters of the reduced flow: moving vectors ``coef @ basis.T`` (tokens, then prompts).

    Attributes:
      coef: ``[M, r]`` coefficients of the ``M`` moving vectors in the basis.
      basis: ``[d, r]`` orthonormal basis of their initial span.
    """

    coef: jax.Array
    basis: jax.Array


class MovingRows(NamedTuple):
    """The parameters that move, at the end of a reduced flow.

    Attributes:
      tokens: ``[K]`` token ids; ``token_rows`` ``[K, d]`` are their rows :math:`W_z`.
      prompts: ``[P_u]`` prompt ids; ``prompt_rows`` ``[P_u, d]`` their hidden embeddings.
    Every other parameter equals its initial value (see :func:`apply_moving_rows`).
    """

    tokens: np.ndarray
    token_rows: jax.Array
    prompts: np.ndarray
    prompt_rows: jax.Array


def pair_index(pairs: PreferencePairs) -> PairIndex:
    """Return the :class:`PairIndex` of concrete single-token ``pairs``.

    Raises:
      ValueError: responses are not single tokens (``chosen``/``rejected`` not ``[N]``).
    """
    for name in ("chosen", "rejected", "prompt"):
        shape = np.shape(getattr(pairs, name))
        if len(shape) != 1:
            raise ValueError(
                f"the reduced flow is exact only for single-token responses: pairs.{name} must "
                f"have shape [N], got shape {shape} (multi-token responses move the hidden "
                f"states of every response prefix); {_GENERAL_PATH}"
            )
    chosen, rejected, prompt = (np.asarray(a) for a in (pairs.chosen, pairs.rejected, pairs.prompt))
    tokens = np.unique(np.concatenate([chosen, rejected]))
    prompts = np.unique(prompt)
    return PairIndex(
        tokens,
        prompts,
        np.searchsorted(tokens, chosen),
        np.searchsorted(tokens, rejected),
        np.searchsorted(prompts, prompt),
    )


def check_margin_loss(loss: PairLoss) -> str:
    """Return the name of ``loss`` if the reduction is exact for it; raise ``ValueError`` if not.

    ``loss`` must be a margin-class loss of :mod:`theory.losses` (a function or a ``partial``
    from :func:`theory.losses.make_loss`), i.e. one of :data:`theory.losses.MARGIN_CLASS`.

    Raises:
      ValueError: SFT-term, weighted, SimPO, DPOP or any other callable.

    Example:
      >>> from theory.losses import make_loss
      >>> check_margin_loss(make_loss("ipo", tau=0.5))
      'ipo'
    """
    fn = (
        loss.fn
        if isinstance(loss, BoundLoss)
        else loss.func
        if isinstance(loss, functools.partial)
        else loss
    )
    for name, candidate in LOSSES.items():
        if fn is candidate:
            if name in MARGIN_CLASS:
                return name
            raise ValueError(
                f"the reduced flow is exact only for margin losses {MARGIN_CLASS}, got "
                f"loss_type={name!r}: its gradient involves ln pi itself, whose log-sum-exp "
                f"moves every row of W; {_GENERAL_PATH}"
            )
    raise ValueError(
        f"loss must be a margin-class loss from theory.losses {MARGIN_CLASS} (e.g. "
        f"make_loss('dpo', beta=0.1)), got {loss!r}; for other losses {_GENERAL_PATH}"
    )


def _margin_logits(coef, index: PairIndex):
    """Return the chosen and rejected logits ``[N]`` from the coefficients ``[M, r]``."""
    K = index.tokens.shape[0]
    h = coef[K + index.prompt]  # [N, r]
    return jnp.sum(coef[index.chosen] * h, axis=-1), jnp.sum(coef[index.rejected] * h, axis=-1)


def reduced_flow_fn(
    loss: PairLoss,
    index: PairIndex,
    *,
    num_steps: int,
    record_every: int,
):
    r"""Return the pure ``run(unembedding, hidden, ref_chosen, ref_rejected, dt) -> FlowResult``.

    As :func:`sims.flows.core.flow_fn` (``observables`` are
    :class:`~sims.models.unconstrained.PreferenceRecord`), with
    ``final`` a :class:`ReducedState`; the moving rows at the end are ``coef @ basis.T`` (tokens
    first, then prompts). It is jit- and vmap-safe (batch seeds or geometries by ``jax.vmap`` over
    its arrays); ``index`` and the schedule are static. Callers validate (see
    :func:`reduced_preference_flow`).

    Source: Razin et al. 2024, gradient identities of App. F (single token) and Eq. 2; the
    invariant subspace is derived in this module's docstring.
    """
    K = index.tokens.shape[0]
    rows = jnp.arange(index.prompt.shape[0])

    def loss_fn(coef, refs):
        # logits in place of log-probs: a margin loss sees only their difference, in which
        # the log-sum-exp cancels
        logit_c, logit_r = _margin_logits(coef, index)
        return jnp.mean(loss(logit_c, logit_r, refs[0], refs[1]))

    def run(unembedding, hidden, ref_chosen, ref_rejected, dt):
        moving = jnp.concatenate([unembedding[index.tokens], hidden[index.prompts]])  # [M, d]
        # Householder QR: basis [d, r] has orthonormal columns even when moving is rank deficient
        basis, upper = jnp.linalg.qr(moving.T)  # [d, r], [r, M]; moving = upper.T @ basis.T
        coef0, projection = upper.T, unembedding @ basis  # [M, r], [V, r]

        def observe_fn(coef, refs):
            h = coef[K + index.prompt]  # [N, r]
            logits = h @ projection.T  # [N, V], rows of W that never moved
            logits = logits.at[:, index.tokens].set(h @ coef[:K].T)  # the K moving rows
            logprobs = jax.nn.log_softmax(logits, axis=-1)
            margin = (
                logprobs[rows, index.tokens[index.chosen]]
                - logprobs[rows, index.tokens[index.rejected]]
            )
            return PreferenceRecord(margin, logprobs)

        flow = flow_fn(
            loss_fn, observe_fn, optimizer="sgd", num_steps=num_steps, record_every=record_every
        )
        result = flow(coef0, (ref_chosen, ref_rejected), dt)
        return result._replace(final=ReducedState(result.final, basis))

    return run


@functools.partial(jax.jit, static_argnames=("loss", "index_key", "num_steps", "record_every"))
def _run_jit(
    unembedding, hidden, ref_chosen, ref_rejected, dt, *, loss, index_key, num_steps, record_every
):
    index = PairIndex(*(np.asarray(a) for a in index_key))
    run = reduced_flow_fn(loss, index, num_steps=num_steps, record_every=record_every)
    return run(unembedding, hidden, ref_chosen, ref_rejected, dt)


def reduced_preference_flow(
    model: UnconstrainedFeatures,
    pairs: PreferencePairs,
    loss: PairLoss,
    *,
    dt: float,
    num_steps: int,
    record_every: int = 1,
    optimizer: str = "sgd",
) -> FlowResult:
    r"""Run :func:`sims.flows.core.preference_flow`'s flow exactly, moving only what moves.

    .. math:: \dot c = -\nabla_c \tfrac1N\textstyle\sum_i \ell_i(\langle c_{y^+_i} - c_{y^-_i},
              c_{x_i}\rangle),\qquad W(t)h_p(t) = (W(0)B)\,c_p(t) \text{ off the moving rows}

    Same arguments, steps and :class:`~sims.flows.core.PreferenceRecord` observables
    (full-vocabulary
    log-probs at every checkpoint) as :func:`~sims.flows.core.preference_flow`; the trained
    parameters
    come back as :class:`MovingRows` (materialise with :func:`apply_moving_rows`). Compiled once per
    (loss object, pair structure, schedule): reuse one ``loss`` object across calls.

    Source: Razin et al. 2024, Eq. 2 and the single-token gradient identities of App. F; the
    reduction is derived in this module's docstring.

    Args:
      model: the starting model (not modified).
      pairs: single-token :class:`~sims.flows.core.PreferencePairs`.
      loss: a margin-class loss (DPO, IPO, SLiC, REBEL, GPO) from :mod:`theory.losses`.
      dt, num_steps, record_every: as in :func:`sims.flows.core.integrate`.
      optimizer: must be ``"sgd"`` (explicit Euler with step ``dt``); see the module docstring.

    Returns:
      :class:`~sims.flows.core.FlowResult` whose ``final`` is the :class:`MovingRows`.

    Raises:
      ValueError: a loss outside the margin class, multi-token responses, ids out of range,
        bad schedule, an optimiser other than ``"sgd"``, non-finite parameters; the message
        names the general path.
      FloatingPointError: the flow produced NaN/inf (names the first step and its time).

    Example:
      >>> from flax import nnx
      >>> from sims.models.unconstrained import make_pairs
      >>> from theory.losses import make_loss
      >>> model = UnconstrainedFeatures(50, 8, 2, rngs=nnx.Rngs(0), dtype=jnp.float64)
      >>> pairs = make_pairs(model, jnp.array([0, 1]), jnp.array([3, 4]), jnp.array([5, 3]))
      >>> res = reduced_preference_flow(model, pairs, make_loss("dpo", beta=1.0),
      ...                               dt=0.1, num_steps=100, record_every=50)
      >>> res.observables.logprobs.shape, res.final.token_rows.shape  # 3 checkpoints, 2 pairs, V
      ((3, 2, 50), (3, 8))
    """
    check_margin_loss(loss)
    if optimizer != "sgd":
        raise ValueError(
            f"the reduced flow supports optimizer='sgd' only (exact Euler steps), got "
            f"optimizer={optimizer!r} (coordinate-wise optimisers amplify round-off near a "
            f"minimum); "
            f"{_GENERAL_PATH}"
        )
    check_schedule(dt, num_steps, record_every)
    index = pair_index(pairs)
    check_token_ids("pairs.chosen", pairs.chosen, model.vocab_size)
    check_token_ids("pairs.rejected", pairs.rejected, model.vocab_size)
    check_token_ids("pairs.prompt", pairs.prompt, model.num_prefixes)
    unembedding, hidden = model.unembedding[...], model.hidden[...]
    for name, arr in (("model.unembedding", unembedding), ("model.hidden", hidden)):
        if not bool(all_finite(arr)):  # on device: NumPy's check of a 2 GB W takes seconds
            check_finite(name, arr)
    index_key = tuple(tuple(int(i) for i in a) for a in index)
    result = _run_jit(
        unembedding,
        hidden,
        pairs.ref_logprob_chosen,
        pairs.ref_logprob_rejected,
        float(dt),
        loss=loss,
        index_key=index_key,
        num_steps=num_steps,
        record_every=record_every,
    )
    raise_on_nonfinite(result.first_nonfinite_step, dt=dt)
    moving = result.final.coef @ result.final.basis.T  # [M, d]
    K = index.tokens.shape[0]
    t = dt * record_every * jnp.arange(num_steps // record_every + 1)
    rows = MovingRows(index.tokens, moving[:K], index.prompts, moving[K:])
    return result._replace(final=rows, t=t)


def apply_moving_rows(model: UnconstrainedFeatures, rows: MovingRows) -> UnconstrainedFeatures:
    """Return a copy of ``model`` with the moving rows replaced (materialises a ``[V, d]`` copy).

    Example:
      >>> from flax import nnx
      >>> model = UnconstrainedFeatures(4, 2, 1, rngs=nnx.Rngs(0))
      >>> rows = MovingRows(np.array([1]), jnp.ones((1, 2)), np.array([0]), jnp.zeros((1, 2)))
      >>> apply_moving_rows(model, rows).unembedding[1].tolist()
      [1.0, 1.0]
    """
    W, H = model.unembedding[...], model.hidden[...]
    unembedding = W.at[rows.tokens].set(jnp.asarray(rows.token_rows, W.dtype))
    hidden = H.at[rows.prompts].set(jnp.asarray(rows.prompt_rows, H.dtype))
    return UnconstrainedFeatures.from_arrays(unembedding, hidden)
