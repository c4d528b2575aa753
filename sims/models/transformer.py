r"""A small causal transformer (Flax NNX) whose per-prefix hidden states feed the theory.

Architecture (GPT-2 style, pre-LayerNorm): token embedding + learned positions, ``num_layers``
blocks of causal multi-head self-attention and a GELU MLP (4x), a final LayerNorm. The output of
the final LayerNorm at position ``t`` is the hidden embedding :math:`h_{x, y_{<k}}` of the prefix
ending at ``t`` (Razin et al. 2024, Eq. 1; like HF's last ``hidden_states`` after the final norm)
and the logits are :math:`W h`.

Unembedding: ``tied=True`` uses the token-embedding matrix as ``W`` (one parameter, explicit: the
module holds no second reference); ``tied=False`` has a separate ``unembedding`` parameter
``[V, d]``. :meth:`CausalTransformer.unembedding_matrix` returns ``W`` in both cases.

Sequences are right-padded; causal attention means pads only influence later positions, which
every loss here masks.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from sims.flows.core import Flow
from theory.checks import check_positive, check_positive_int, check_token_ids


class _Block(nnx.Module):
    def __init__(self, d: int, num_heads: int, *, rngs: nnx.Rngs, dtype):
        self.num_heads = num_heads
        self.ln1 = nnx.LayerNorm(d, rngs=rngs, param_dtype=dtype)
        self.qkv = nnx.Linear(d, 3 * d, rngs=rngs, param_dtype=dtype)
        self.proj = nnx.Linear(d, d, rngs=rngs, param_dtype=dtype)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs, param_dtype=dtype)
        self.fc = nnx.Linear(d, 4 * d, rngs=rngs, param_dtype=dtype)
        self.out = nnx.Linear(4 * d, d, rngs=rngs, param_dtype=dtype)

    def __call__(self, x):  # x [..., T, d]
        T, d = x.shape[-2:]
        H = self.num_heads
        q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
        # [..., T, d] -> [..., H, T, d/H]
        q, k, v = (jnp.swapaxes(a.reshape(*a.shape[:-1], H, d // H), -2, -3) for a in (q, k, v))
        scores = q @ jnp.swapaxes(k, -1, -2) / np.sqrt(d // H)  # [..., H, T, T]
        causal = jnp.tril(jnp.ones((T, T), dtype=bool)).reshape((1,) * (scores.ndim - 2) + (T, T))
        scores = jnp.where(causal, scores, -jnp.inf)
        att = jax.nn.softmax(scores, axis=-1) @ v  # [..., H, T, d/H]
        x = x + self.proj(jnp.swapaxes(att, -2, -3).reshape(*x.shape))
        return x + self.out(jax.nn.gelu(self.fc(self.ln2(x))))


class CausalTransformer(nnx.Module):
    r"""Causal transformer LM :math:`\pi(\cdot|x, y_{<k}) = \mathrm{softmax}(W h_{x, y_{<k}})`.

    Args:
      vocab_size: ``V``.
      d_model: hidden size ``d`` (divisible by ``num_heads``).
      num_layers: transformer blocks.
      num_heads: attention heads.
      max_len: longest sequence (learned positions).
      tied: use the token embedding as unembedding ``W`` (else a separate ``[V, d]`` parameter).
      rngs: ``nnx.Rngs`` supplying ``params``.
      dtype: parameter dtype.

    Calling the model on int32 token ids ``[..., T]`` returns next-token **logits**
    ``[..., T, V]`` (as Hugging Face causal LMs and :func:`sims.checkpoints.hf.load_causal_lm` do);
    :func:`response_logprobs_from_tokens` turns them into response log-probs.

    Example:
      >>> m = CausalTransformer(11, d_model=8, num_layers=1, num_heads=2, max_len=6,
      ...                       rngs=nnx.Rngs(0))
      >>> m(jnp.zeros((3, 6), dtype=jnp.int32)).shape  # logits per position
      (3, 6, 11)
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        d_model: int,
        num_layers: int,
        num_heads: int,
        max_len: int,
        tied: bool = True,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        for name, value in (
            ("vocab_size", vocab_size),
            ("d_model", d_model),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("max_len", max_len),
        ):
            check_positive_int(name, value)
        if d_model % num_heads:
            raise ValueError(f"d_model must be divisible by num_heads, got {d_model}, {num_heads}")
        self.tied = tied
        self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs, param_dtype=dtype)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, d_model), dtype))
        self.blocks = nnx.List(
            [_Block(d_model, num_heads, rngs=rngs, dtype=dtype) for _ in range(num_layers)]
        )
        self.ln_f = nnx.LayerNorm(d_model, rngs=rngs, param_dtype=dtype)
        if not tied:
            self.unembedding = nnx.Param(
                jax.random.normal(rngs.params(), (vocab_size, d_model), dtype) / np.sqrt(d_model)
            )

    def unembedding_matrix(self) -> jax.Array:
        """Return ``W`` ``[V, d]`` (the embedding table when tied)."""
        return self.embed.embedding[...] if self.tied else self.unembedding[...]

    def hidden_states(self, tokens: jax.Array) -> jax.Array:
        """Return the final-norm hidden state at every position, ``tokens.shape + (d,)``."""
        T = tokens.shape[-1]
        pos = self.pos[...][:T].reshape((1,) * (tokens.ndim - 1) + (T, -1))  # [1.., T, d]
        # a plain gather, not nnx.Embed.__call__: Embed fixes its compute dtype when built, so a
        # float32-built model cast to float64 would still look up float32 embeddings
        x = jnp.take(self.embed.embedding[...], tokens, axis=0) + pos
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    @property
    def vocab_size(self) -> int:
        return self.embed.embedding.shape[-2]

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Return next-token logits at every position, ``tokens.shape + (V,)``."""
        return self.hidden_states(tokens) @ self.unembedding_matrix().T


def response_mask(prompt_len: ArrayLike, length: ArrayLike, T: int) -> jax.Array:
    """Return ``[N, T]`` booleans: position ``t`` holds a response token
    (``prompt_len <= t < length``)."""
    t = jnp.arange(T)[None, :]
    return (t >= jnp.asarray(prompt_len)[:, None]) & (t < jnp.asarray(length)[:, None])


def response_logprobs_from_tokens(model: nnx.Module, tokens, prompt_len, length) -> jax.Array:
    r"""Return :math:`\ln\pi(y|x) = \sum_k \ln\pi(y_k|x, y_{<k})` per sequence, ``[N]`` (Eq. 1).

    ``model`` is any causal LM mapping token ids ``[N, T]`` to next-token logits ``[N, T, V]``
    (:class:`CausalTransformer`, :func:`sims.checkpoints.hf.load_causal_lm`). ``tokens`` ``[N, T]``
    hold prompt then response (``<eos>`` counted as a response token), right-padded;
    ``prompt_len`` ``[N]`` and ``length`` ``[N]`` (prompt + response) delimit the response.
    """
    logprobs = jax.nn.log_softmax(model(tokens[:, :-1]), axis=-1)  # [N, T-1, V], t predicts t+1
    picked = jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]  # [N, T-1]
    mask = response_mask(prompt_len, length, tokens.shape[1])[:, 1:]
    return jnp.sum(jnp.where(mask, picked, 0.0), axis=-1)


def token_logprobs(model: nnx.Module, hidden: jax.Array, targets: jax.Array) -> jax.Array:
    r"""Return :math:`\ln\pi(y_k|\cdot) = (W h)_{y_k} - \operatorname{logsumexp}(W h)` ``[...]``
    of final-norm hidden states ``[..., d]`` and target ids ``[...]`` (no ``[..., V]``
    log-softmax is formed, only the logits; ``model`` has ``logits``, as
    :class:`sims.models.decoder.DecoderLM`)."""
    logits = model.logits(hidden)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


class PackedPairs(NamedTuple):
    """Each pair's chosen and rejected responses packed behind their one shared prompt.

    Row ``i`` is ``chosen.tokens[i]`` (prompt, chosen response, pads; ``T`` slots) followed by
    the rejected response (``S`` slots, ``S`` the longest rejected response). The rejected
    tokens keep their own positions ``prompt_len + k`` (rotary embeddings) and segment 2; the
    prompt has segment 0 and the chosen response segment 1; a query sees a key only in segment
    0 or its own (:func:`sims.models.decoder.causal_mask`). So every response position has
    exactly the hidden state of its unpacked sequence, while the prompt runs through the model
    once instead of twice, and the vocabulary head runs only at the ``Rc`` / ``S`` positions that
    predict response tokens instead of at all ``T - 1``. Same log-probs as the plain layout up
    to float round-off (``tests/test_packed_pairs.py``); fewer flops (the benchmark
    ``python -m experiments bench_real_model`` measures the step). Built by
    :func:`pack_pairs`.

    Attributes (all with the leading axis ``N``, so selecting or stacking rows acts on them as
    on the other pair fields):
      tokens, positions, segments, valid: ``[N, T + S]`` the packed row (ids, rotary positions,
        segment ids, real tokens).
      chosen_at, chosen_target, chosen_valid: ``[N, Rc]`` the row index of the hidden state
        predicting each chosen response token, that token, and whether it is real.
      rejected_at, rejected_target, rejected_valid: ``[N, S]`` the same for the rejected
        response.
    """

    tokens: np.ndarray
    positions: np.ndarray
    segments: np.ndarray
    valid: np.ndarray
    chosen_at: np.ndarray
    chosen_target: np.ndarray
    chosen_valid: np.ndarray
    rejected_at: np.ndarray
    rejected_target: np.ndarray
    rejected_valid: np.ndarray

    def logprobs(self, model: nnx.Module) -> tuple[jax.Array, jax.Array]:
        """Return ``(logprob_chosen, logprob_rejected)`` ``[N]`` (Razin et al. 2024, Eq. 1)."""
        h = model.hidden_states(
            self.tokens, positions=self.positions, valid=self.valid, segments=self.segments
        )

        def summed(at, target, real):
            picked = token_logprobs(model, jnp.take_along_axis(h, at[..., None], axis=-2), target)
            return jnp.sum(jnp.where(real, picked, 0.0), axis=-1)

        return (
            summed(self.chosen_at, self.chosen_target, self.chosen_valid),
            summed(self.rejected_at, self.rejected_target, self.rejected_valid),
        )


def supports_packing(model: nnx.Module) -> bool:
    """Whether ``model`` runs :class:`PackedPairs`: ``hidden_states(..., segments=)`` and
    ``logits`` (:class:`sims.models.decoder.DecoderLM` and the checkpoints it loads)."""
    method = getattr(model, "hidden_states", None)
    return (
        method is not None
        and hasattr(model, "logits")
        and "segments" in inspect.signature(method).parameters
    )


def pack_pairs(chosen: TokenBatch, rejected: TokenBatch) -> PackedPairs:
    """Return the :class:`PackedPairs` of right-padded ``chosen`` / ``rejected`` batches.

    Raises:
      ValueError: different shapes, a pair whose chosen and rejected rows do not share their
        prompt (same ``prompt_len``, same prompt tokens), an empty prompt, or a row without a
        response (``length <= prompt_len``).
    """
    tc, pc, lc = (np.asarray(a) for a in chosen)
    tr, pr, lr = (np.asarray(a) for a in rejected)
    if tc.shape != tr.shape or tc.ndim != 2:
        raise ValueError(f"chosen and rejected must be [N, T] alike, got {tc.shape}, {tr.shape}")
    N, T = tc.shape
    if np.any(pc < 1) or np.any(lc <= pc) or np.any(lr <= pr) or np.any(np.maximum(lc, lr) > T):
        raise ValueError("packing needs 1 <= prompt_len < length <= T in every row")
    t = np.arange(T)[None, :]
    in_prompt = t < pc[:, None]
    unshared = (pc != pr) | np.any(in_prompt & (tc != tr), axis=1)
    if np.any(unshared):
        raise ValueError(
            "packing needs each pair's chosen and rejected to share their prompt (same "
            f"prompt_len and tokens); rows {np.flatnonzero(unshared)[:5].tolist()} do not"
        )
    rows = np.arange(N)[:, None]
    k_c, k_r = np.arange(int(np.max(lc - pc)))[None, :], np.arange(int(np.max(lr - pr)))[None, :]
    at_c = pc[:, None] + k_c  # chosen token index in the row
    at_r = pr[:, None] + k_r  # rejected token index in its own sequence
    real_c, real_r = at_c < lc[:, None], at_r < lr[:, None]
    rej_tokens = np.where(real_r, tr[rows, np.minimum(at_r, T - 1)], 0)
    S = rej_tokens.shape[1]
    i32 = np.int32
    return PackedPairs(
        tokens=np.concatenate([tc, rej_tokens], 1).astype(i32),
        positions=np.concatenate([np.broadcast_to(t, tc.shape), at_r], 1).astype(i32),
        segments=np.concatenate([np.where(in_prompt, 0, 1), np.full((N, S), 2)], 1).astype(i32),
        valid=np.concatenate([t < lc[:, None], real_r], 1),
        chosen_at=np.minimum(at_c - 1, T - 1).astype(i32),
        chosen_target=np.where(real_c, tc[rows, np.minimum(at_c, T - 1)], 0).astype(i32),
        chosen_valid=real_c,
        # the first rejected token is predicted by the prompt's last position (in the chosen
        # part), the k-th (k >= 1) by the rejected slot k - 1
        rejected_at=np.where(k_r == 0, pr[:, None] - 1, T + k_r - 1).astype(i32),
        rejected_target=rej_tokens.astype(i32),
        rejected_valid=real_r,
    )


class TokenBatch(NamedTuple):
    """Right-padded token sequences: prompt then response.

    Attributes:
      tokens: ``[N, T]`` int32 ids.
      prompt_len: ``[N]`` prompt length (the response starts at this position).
      length: ``[N]`` prompt + response length (``<eos>`` included).
    """

    tokens: np.ndarray
    prompt_len: np.ndarray
    length: np.ndarray


class TransformerPairs(NamedTuple):
    """Multi-token preference pairs for causal LMs (fields have a leading axis ``N``).

    The pairs type of the transformer family -- the project's :class:`CausalTransformer` and the
    checkpoints of :mod:`sims.checkpoints.hf`; :func:`sims.flows.core.preference_flow` trains on it.

    Attributes:
      chosen, rejected: :class:`TokenBatch` of prompt + preferred / dispreferred response.
      ref_logprob_chosen, ref_logprob_rejected: ``[N]`` log-probs under the reference model.
      weight: ``[N]`` sample weights (0 drops a pair: data sets of different sizes stack).
      packed: ``None`` (plain layout: chosen and rejected run as two batches with logits at
        every position), or the same pairs as :class:`PackedPairs` (the shared prompt once,
        logits at response positions only), which :meth:`logprobs` then uses. Built from
        ``chosen`` / ``rejected`` by :func:`make_transformer_pairs` (``packed=True``): edit
        pairs by making them again, so the two layouts cannot disagree.
    """

    chosen: TokenBatch
    rejected: TokenBatch
    ref_logprob_chosen: jax.Array
    ref_logprob_rejected: jax.Array
    weight: jax.Array
    packed: PackedPairs | None = None

    def logprobs(self, model: nnx.Module) -> tuple[jax.Array, jax.Array]:
        """Return ``(logprob_chosen, logprob_rejected)``, each ``[N]``."""
        if self.packed is not None:
            return self.packed.logprobs(model)
        return (
            response_logprobs_from_tokens(model, *self.chosen),
            response_logprobs_from_tokens(model, *self.rejected),
        )

    def record(self, model: nnx.Module) -> jax.Array:
        """Return the default flow observable: ``logprob_chosen`` ``[N]``."""
        return response_logprobs_from_tokens(model, *self.chosen)

    def validate(self, model: nnx.Module) -> None:
        """Raise ``ValueError`` for token ids outside ``model``'s vocabulary, or packed pairs
        on a model that cannot run them (:func:`supports_packing`)."""
        for name in ("chosen", "rejected"):
            check_token_ids(f"{name}.tokens", getattr(self, name).tokens, model.vocab_size)
        if self.packed is not None and not supports_packing(model):
            raise ValueError(
                f"packed pairs need a model with hidden_states(..., segments=) and logits "
                f"(sims.models.decoder.DecoderLM); got {type(model).__name__}: make the pairs "
                "with packed=False"
            )


def make_transformer_pairs(
    model: nnx.Module,
    chosen: TokenBatch,
    rejected: TokenBatch,
    weight=None,
    *,
    chunk_size: int | None = None,
    packed: bool = False,
) -> TransformerPairs:
    """Return :class:`TransformerPairs`, reference log-probs from ``model`` now (default weights 1).

    ``chunk_size`` computes the reference log-probs that many pairs at a time (``lax.map``):
    the ``[N, T, V]`` logits of a large vocabulary need not fit at once. ``packed`` adds the
    :class:`PackedPairs` layout (each pair's shared prompt runs once; logits only where a
    response token is predicted), which the reference and every later log-prob then use.

    Raises:
      ValueError: ``chosen`` and ``rejected`` of different shapes, token ids out of range;
        with ``packed``, what :func:`pack_pairs` and :meth:`TransformerPairs.validate` reject.
    """
    chosen = TokenBatch(*(jnp.asarray(a) for a in chosen))
    rejected = TokenBatch(*(jnp.asarray(a) for a in rejected))
    if chosen.tokens.shape != rejected.tokens.shape:
        raise ValueError(
            f"chosen and rejected must have one shape, got {chosen.tokens.shape}, "
            f"{rejected.tokens.shape}"
        )
    weight = jnp.ones(chosen.tokens.shape[0]) if weight is None else jnp.asarray(weight, float)
    pairs = TransformerPairs(chosen, rejected, weight, weight, weight)
    if packed:
        layout = pack_pairs(chosen, rejected)
        pairs = pairs._replace(packed=PackedPairs(*(jnp.asarray(a) for a in layout)))
    pairs.validate(model)
    if chunk_size is None:
        lp_c, lp_r = _pair_logprobs(model, pairs)
    else:
        lp_c, lp_r = _chunked_pair_logprobs(model, pairs, chunk_size)
    return pairs._replace(ref_logprob_chosen=lp_c, ref_logprob_rejected=lp_r)


@functools.partial(jax.jit, static_argnums=2)
def _chunked_pair_logprobs(model, pairs: TransformerPairs, chunk_size: int):
    def one(row: TransformerPairs):
        lp_c, lp_r = jax.tree.map(lambda a: a[None], row).logprobs(model)
        return lp_c[0], lp_r[0]

    return jax.lax.map(one, pairs, batch_size=chunk_size)


def pair_logprobs_chunked(model: nnx.Module, pairs: TransformerPairs, *, chunk_size: int = 8):
    """Return ``(logprob_chosen, logprob_rejected)`` ``[N]`` of ``pairs`` on ``model``, computed
    ``chunk_size`` pairs at a time (large vocabularies: the ``[N, T, V]`` logits never coexist)."""
    return _chunked_pair_logprobs(model, pairs, chunk_size)


@jax.jit
def _pair_logprobs(model: nnx.Module, pairs: TransformerPairs) -> tuple[jax.Array, jax.Array]:
    # one compiled call instead of op-by-op dispatch (each eager op compiles once: seconds on CPU)
    return pairs.logprobs(model)


def prefix_hidden_states(
    model: CausalTransformer, tokens, prompt_len: int, length: int
) -> jax.Array:
    r"""Return :math:`[h_{x, y_{<k}}]_{k=1..L}` ``[L, d]`` (``L = length - prompt_len``).

    Row 0 is the prompt's last position; row ``k-1`` the position before response token ``k``
    (the inputs of Razin et al. 2024's CHES, Definition 2; the final ``<eos>`` position is not a
    prefix of any response token and is dropped, as in the official code).

    Raises:
      ValueError: ``tokens`` not 1-D, or not ``1 <= prompt_len < length <= T``.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must have shape [T], got shape {tokens.shape}")
    if not 1 <= int(prompt_len) < int(length) <= tokens.shape[0]:
        raise ValueError(
            f"need 1 <= prompt_len < length <= T={tokens.shape[0]}, got {prompt_len}, {length}"
        )
    return model.hidden_states(tokens)[int(prompt_len) - 1 : int(length) - 1]


def lm_loss(model: nnx.Module, tokens, length) -> jax.Array:
    """Return the mean next-token cross-entropy over non-pad targets of ``tokens`` ``[N, T]``."""
    logprobs = jax.nn.log_softmax(model(tokens[:, :-1]), axis=-1)
    picked = jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]  # [N, T-1]
    mask = jnp.arange(1, tokens.shape[1])[None, :] < jnp.asarray(length)[:, None]
    return -jnp.sum(jnp.where(mask, picked, 0.0)) / jnp.sum(mask)


@dataclasses.dataclass(frozen=True)
class MinibatchLMLoss:
    """The pre-training objective: LM loss on minibatch ``hyper["step"]`` (hashable).

    The minibatch of step ``s`` is drawn with replacement from ``jax.random.fold_in(key, s)``;
    ``data`` is ``(tokens [N, T], length [N], key)``.
    """

    graphdef: Any
    batch_size: int

    def __call__(self, state, data, hyper) -> jax.Array:
        tokens, length, key = data
        rows = jax.random.randint(
            jax.random.fold_in(key, hyper["step"]), (self.batch_size,), 0, tokens.shape[0]
        )
        return lm_loss(nnx.merge(self.graphdef, state), tokens[rows], length[rows])


def _no_observable(state, data, hyper) -> jax.Array:
    return jnp.zeros(())


def pretrain(
    model: nnx.Module,
    key: jax.Array,
    tokens,
    length,
    *,
    lr: float,
    num_steps: int,
    batch_size: int,
) -> Flow:
    """Return the :class:`~sims.flows.core.Flow` of pre-training: Adam on the minibatch LM loss.

    ``flow.run()`` returns a :class:`~sims.flows.core.FlowResult` whose ``final`` is the trained
    model
    and ``loss`` ``[num_steps + 1]`` the minibatch loss before each step (and one after the
    last). Minibatch ``s`` is drawn (with replacement) from ``jax.random.fold_in(key, s)``. The
    input model is not modified.

    Raises:
      ValueError: ``lr <= 0``, ``num_steps`` or ``batch_size`` not a positive integer.
    """
    check_positive("lr", lr)
    check_positive_int("num_steps", num_steps)
    check_positive_int("batch_size", batch_size)
    graphdef, state = nnx.split(model)
    return Flow(
        MinibatchLMLoss(graphdef, batch_size),
        _no_observable,
        state,
        (jnp.asarray(tokens), jnp.asarray(length), key),
        dt=lr,
        num_steps=num_steps,
        optimizer="adam",
        finalize=lambda st: nnx.merge(graphdef, st),
        what="pre-training",
    )


class PromptAnswerPairs(NamedTuple):
    r"""Single-token preference pairs after a prompt, for causal LMs (one forward per pair).

    The answers :math:`y^\pm` are one token each after the same prompt, so both log-probs come
    from the next-token distribution at the prompt's last position: one forward pass of the
    prompt (right-padded to ``T``) instead of two of prompt + answer, and logits at one
    position instead of ``T`` (Razin et al. 2024 §3's protocol: one prompt, single-token
    answers).

    Attributes:
      prompt: :class:`TokenBatch` of the prompts (``length == prompt_len``).
      chosen, rejected: ``[N]`` token ids.
      ref_logprob_chosen, ref_logprob_rejected: ``[N]`` reference log-probs.
      weight: ``[N]`` sample weights or ``None``.
    """

    prompt: TokenBatch
    chosen: jax.Array
    rejected: jax.Array
    ref_logprob_chosen: jax.Array
    ref_logprob_rejected: jax.Array
    weight: jax.Array | None = None

    def next_token_logprobs(self, model: nnx.Module) -> jax.Array:
        r"""``[N, V]`` :math:`\ln\pi(\cdot|x)` at each prompt's last position."""
        return next_token_logprobs(model, self.prompt.tokens, self.prompt.prompt_len)

    def logprobs(self, model: nnx.Module) -> tuple[jax.Array, jax.Array]:
        """Return ``(logprob_chosen, logprob_rejected)``, each ``[N]``."""
        lp = self.next_token_logprobs(model)
        rows = jnp.arange(lp.shape[0])
        return lp[rows, self.chosen], lp[rows, self.rejected]

    def record(self, model: nnx.Module) -> jax.Array:
        """The default observable: ``[N, V]`` next-token probabilities at the answer position."""
        return jnp.exp(self.next_token_logprobs(model))

    def validate(self, model: nnx.Module) -> None:
        """Raise ``ValueError`` for ids outside the vocabulary or ``chosen == rejected``."""
        check_token_ids("prompt.tokens", self.prompt.tokens, model.vocab_size)
        check_token_ids("chosen", self.chosen, model.vocab_size)
        check_token_ids("rejected", self.rejected, model.vocab_size)
        if np.any(np.asarray(self.chosen) == np.asarray(self.rejected)):
            raise ValueError("chosen and rejected must differ in every pair")


def next_token_logprobs(model: nnx.Module, tokens, prompt_len) -> jax.Array:
    r"""Return ``[N, V]`` :math:`\ln\pi(\cdot|x)` after each right-padded prompt of ``tokens``.

    Logits are computed at the one position ``prompt_len - 1`` of each row when the model has
    ``hidden_states`` and ``logits`` (:class:`sims.models.decoder.DecoderLM`), else from the full
    ``[N, T, V]`` logits.
    """
    rows = jnp.arange(tokens.shape[0])
    last = jnp.asarray(prompt_len) - 1
    if hasattr(model, "logits") and hasattr(model, "hidden_states"):
        h = model.hidden_states(tokens)[rows, last]  # [N, d]
        return jax.nn.log_softmax(model.logits(h), axis=-1)
    return jax.nn.log_softmax(model(tokens)[rows, last], axis=-1)


def make_prompt_answer_pairs(
    model: nnx.Module, prompt: TokenBatch, chosen, rejected, weight=None
) -> PromptAnswerPairs:
    """Return :class:`PromptAnswerPairs` with reference log-probs from ``model`` now.

    Raises:
      ValueError: ids out of range, ``chosen == rejected`` in some pair.
    """
    prompt = TokenBatch(*(jnp.asarray(a) for a in prompt))
    chosen, rejected = jnp.asarray(chosen), jnp.asarray(rejected)
    pairs = PromptAnswerPairs(prompt, chosen, rejected, chosen, rejected, weight)
    pairs.validate(model)
    lp_c, lp_r = _pair_logprobs(model, pairs)
    return pairs._replace(ref_logprob_chosen=lp_c, ref_logprob_rejected=lp_r)


class SequenceSFTData(NamedTuple):
    """Supervised sequences for :func:`sims.flows.core.sft_flow` on causal LMs.

    The loss of a row is the summed cross-entropy of its response tokens (positions
    ``prompt_len .. length - 1``), e.g. a multi-token label word after a persona prompt.

    Attributes:
      batch: :class:`TokenBatch` of prompt + response.
    """

    batch: TokenBatch

    def logprobs(self, model: nnx.Module) -> jax.Array:
        """``[N]`` summed response log-probs."""
        return response_logprobs_from_tokens(model, *self.batch)

    def validate(self, model: nnx.Module) -> None:
        """Raise ``ValueError`` for ids outside the vocabulary or empty responses."""
        check_token_ids("batch.tokens", self.batch.tokens, model.vocab_size)
        if np.any(np.asarray(self.batch.length) <= np.asarray(self.batch.prompt_len)):
            raise ValueError("every SFT row needs a response: length > prompt_len")


def sample_tokens(
    graphdef, state, key: jax.Array, prompts, prompt_len: int, temperature: float, eos_id, pad_id
):
    """Pure, jit/vmap-able core of :func:`sample` on a split model ``(graphdef, state)``."""
    m = nnx.merge(graphdef, state)
    N, T = prompts.shape

    def step(carry, t):
        tokens, done = carry
        logprobs = jax.nn.log_softmax(m(tokens)[:, t - 1], axis=-1)  # [N, V] at position t
        nxt = jax.random.categorical(jax.random.fold_in(key, t), logprobs / temperature)
        nxt = jnp.where(done, pad_id, nxt).astype(tokens.dtype)
        return (tokens.at[:, t].set(nxt), done | (nxt == eos_id)), None

    init = (prompts.at[:, prompt_len:].set(pad_id), jnp.zeros(N, dtype=bool))
    (tokens, _), _ = jax.lax.scan(step, init, jnp.arange(prompt_len, T))
    return tokens


def sample(
    model: nnx.Module,
    key: jax.Array,
    prompts,
    prompt_len: int,
    *,
    temperature: float,
    eos_id: int,
    pad_id: int,
) -> jax.Array:
    """Return ``[N, T]`` tokens: ``prompts`` (all of length ``prompt_len``) then sampled tokens.

    Ancestral sampling at ``temperature`` up to position ``T - 1``; everything after a sampled
    ``eos_id`` becomes ``pad_id`` (the vocabulary's special ids, e.g. :data:`sims.data.corpus.EOS`).
    One jitted scan over positions (no KV cache: the sequences are short).

    Raises:
      ValueError: ``temperature <= 0``.
    """
    check_positive("temperature", temperature)
    graphdef, state = nnx.split(model)
    run = jax.jit(sample_tokens, static_argnums=(0, 4))
    return run(graphdef, state, key, jnp.asarray(prompts), prompt_len, temperature, eos_id, pad_id)


_sample_jit = jax.jit(sample_tokens, static_argnums=(0, 4))  # compiled once per graph and length
