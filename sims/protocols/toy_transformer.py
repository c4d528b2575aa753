r"""The pre-trained toy transformer of the small-transformer figures (Razin et al. 2024 §§3, 5, 6).

A :class:`~sims.models.transformer.CausalTransformer` is pre-trained with Adam on the minibatch
LM loss of the generated corpus (:mod:`sims.data.corpus`: persona answers, refusals and
compliances), then used as the starting point of the §3 (single-token persona answers), §5
(CHES) and §6 (unintentional unalignment) analogues:

* :class:`PretrainSettings` -- size and schedule (a frozen dataclass; an experiment ``Config``
  derives from it) with :data:`PretrainSettings.SMOKE` / :data:`PretrainSettings.SCALED` sizes;
  :func:`pretrained_transformer` -- the trained model and its LM losses;
* :func:`trait_prompts` -- distinct trait-according persona prompts; :class:`AnswerLogprobs` --
  the flow observable :math:`\ln\pi(\cdot|x)` at the answer position (its velocity at ``t = 0``:
  :func:`sims.protocols.kernel_checks.answer_velocities`);
* :func:`refusal_pairs` -- on-policy, judge-labelled pairs and gold template pairs for the
  unsafe requests; :func:`response_batch` -- sampled tokens as a
  :class:`~sims.models.transformer.TokenBatch`; :func:`refusal_rates` -- judged refusal rates
  of stacked model states by sampling.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sims.analysis.scores import transformer_pair_scores
from sims.analysis.summaries import lowest_fraction, stack
from sims.data import corpus
from sims.data.fixtures import array_digest, load_fixture
from sims.errors import InputError
from sims.flows.core import preference_flow
from sims.models.transformer import (
    CausalTransformer,
    TokenBatch,
    TransformerPairs,
    make_transformer_pairs,
    sample,
    sample_tokens,
)
from sims.models.transformer import pretrain as pretrain_flow

__all__ = [
    "AnswerLogprobs",
    "ConditionRuns",
    "FIXTURE_KIND",
    "PretrainedTransformer",
    "PretrainSettings",
    "RefusalPairs",
    "UnalignmentConditions",
    "initial_transformer",
    "pretrained_transformer",
    "refusal_pairs",
    "refusal_rates",
    "response_batch",
    "train_conditions",
    "trait_prompts",
    "transformer_fixture_settings",
    "unalignment_conditions",
]


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    """Transformer size and pre-training schedule (corpus: :mod:`sims.data.corpus`).

    An experiment ``Config`` derives from this class (its fields become flags); the defaults fit
    this project's 2-core CPU. :meth:`check` is called by :func:`pretrained_transformer` (and by
    an experiment config when it is built).
    """

    d_model: int = 64  # transformer hidden size
    num_layers: int = 2  # transformer blocks
    num_heads: int = 4  # attention heads
    copies: int = 8  # pre-training corpus copies (labels redrawn per copy)
    pretrain_lr: float = 3e-3  # Adam learning rate
    pretrain_steps: int = 150  # Adam steps (minibatch; the LM loss plateaus by ~100; 0: none)
    batch_size: int = 64  # pre-training minibatch

    #: Settings of every transformer experiment's ``--scale`` version (GPU/TPU sizes).
    SCALED: ClassVar[dict[str, int]] = {
        "d_model": 256,
        "num_layers": 4,
        "num_heads": 8,
        "copies": 32,
        "pretrain_steps": 2000,
    }
    #: Settings of every transformer experiment's ``--smoke`` version (tests).
    SMOKE: ClassVar[dict[str, int]] = {
        "d_model": 16,
        "num_layers": 1,
        "num_heads": 2,
        "copies": 1,
        "pretrain_steps": 5,
    }

    def check(self) -> None:
        """Raise :class:`~sims.errors.InputError` for settings no model or schedule can have.

        Raises:
          InputError: a size or count below 1 (``pretrain_steps`` below 0), ``pretrain_lr <= 0``,
            or ``d_model`` not divisible by ``num_heads``.
        """
        for name in ("d_model", "num_layers", "num_heads", "copies", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be an integer >= 1, got {name}={value!r}")
        steps = self.pretrain_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise InputError(f"pretrain_steps must be an integer >= 0, got {steps!r}")
        if not (isinstance(self.pretrain_lr, int | float) and self.pretrain_lr > 0):
            raise InputError(f"pretrain_lr must be > 0, got pretrain_lr={self.pretrain_lr!r}")
        if self.d_model % self.num_heads:
            raise InputError(
                "d_model must be divisible by num_heads, got "
                f"d_model={self.d_model}, num_heads={self.num_heads}"
            )


class PretrainedTransformer(NamedTuple):
    """A pre-trained toy transformer.

    Attributes:
      model: the trained :class:`~sims.models.transformer.CausalTransformer`.
      losses: ``[pretrain_steps]`` minibatch LM loss before each Adam step (empty without
        pre-training).
    """

    model: CausalTransformer
    losses: np.ndarray


def initial_transformer(
    seed: int, settings: PretrainSettings, *, tied: bool = True, dtype: Any = jnp.float32
) -> CausalTransformer:
    """Return the random model pre-training starts from (``nnx.Rngs(seed)``, corpus vocabulary).

    Example:
      >>> m = initial_transformer(0, PretrainSettings(d_model=8, num_layers=1, num_heads=2))
      >>> m.vocab_size == len(corpus.VOCAB), m.unembedding_matrix().shape[1]
      (True, 8)
    """
    settings.check()
    return CausalTransformer(
        len(corpus.VOCAB),
        d_model=settings.d_model,
        num_layers=settings.num_layers,
        num_heads=settings.num_heads,
        max_len=corpus.MAX_LEN,
        tied=tied,
        rngs=nnx.Rngs(seed),
        dtype=dtype,
    )


#: ``kind`` of the toy transformer's fixtures (:mod:`sims.data.fixtures`).
FIXTURE_KIND = "toy_transformer"


def transformer_fixture_settings(
    seed: int, settings: PretrainSettings, *, tied: bool = True, refusal_prob: float = 0.8
) -> dict[str, Any]:
    """Return everything :func:`pretrained_transformer`'s training depends on, as a fixture key.

    The seed, :class:`PretrainSettings`' fields (not those of a ``Config`` deriving from it),
    ``tied``, ``refusal_prob``, the corpus's vocabulary size, sequence length and SHA-256
    (:func:`sims.data.fixtures.array_digest` of its tokens and lengths), and the x64 mode.

    Example:
      >>> key = transformer_fixture_settings(0, PretrainSettings())
      >>> key["pretrain_steps"], key["tied"], len(key["corpus_sha256"])
      (150, True, 64)
    """
    data = corpus.pretraining_corpus(
        np.random.default_rng(seed), copies=settings.copies, refusal_prob=refusal_prob
    )
    fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(PretrainSettings)}
    return {
        "seed": seed,
        **fields,
        "tied": tied,
        "refusal_prob": refusal_prob,
        "vocab_size": len(corpus.VOCAB),
        "max_len": corpus.MAX_LEN,
        "corpus_sha256": array_digest(data.tokens, data.length),
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
    }


def pretrained_transformer(
    seed: int,
    settings: PretrainSettings,
    *,
    tied: bool = True,
    refusal_prob: float = 0.8,
    dtype: Any = jnp.float32,
    use_fixture: bool = True,
) -> PretrainedTransformer:
    """Return the toy transformer pre-trained on the corpus, and its LM losses.

    The corpus is :func:`sims.data.corpus.pretraining_corpus` drawn with
    ``np.random.default_rng(seed)`` (``settings.copies`` copies); the model starts from
    :func:`initial_transformer` and is trained by :func:`sims.models.transformer.pretrain`
    (Adam, minibatches from ``jax.random.key(seed)``). When a shipped fixture
    (:mod:`sims.data.fixtures`) was trained with exactly these settings
    (:func:`transformer_fixture_settings`), its parameters and losses are returned instead of
    training: float32 Adam amplifies a machine's reduction order, the fixture is the same
    start everywhere (on the machine that made it, loading and training agree bitwise).

    Args:
      seed: corpus, initialisation and minibatch seed.
      settings: size and schedule; ``pretrain_steps = 0`` returns the initial model.
      tied: unembedding tied to the token embedding.
      refusal_prob: P(refusal) for an unsafe request in the corpus, in ``[0, 1]``.
      dtype: dtype of the returned model. Pre-training runs in float32; for another dtype the
        trained parameters are cast into a model built in ``dtype`` (so no module keeps a
        float32 compute dtype). Without pre-training the initial model is drawn in ``dtype``.
      use_fixture: load a matching fixture instead of training (``False``: always train).

    Returns:
      :class:`PretrainedTransformer`.

    Raises:
      InputError: bad ``settings`` (:meth:`PretrainSettings.check`), ``refusal_prob`` outside
        ``[0, 1]``.
    """
    settings.check()
    if not 0.0 <= refusal_prob <= 1.0:
        raise InputError(f"refusal_prob must be in [0, 1], got refusal_prob={refusal_prob!r}")
    if settings.pretrain_steps == 0:
        return PretrainedTransformer(
            initial_transformer(seed, settings, tied=tied, dtype=dtype), np.zeros(0)
        )
    start = initial_transformer(seed, settings, tied=tied)
    key = transformer_fixture_settings(seed, settings, tied=tied, refusal_prob=refusal_prob)
    loaded = load_fixture(FIXTURE_KIND, key, start) if use_fixture else None
    if loaded is None:
        data = corpus.pretraining_corpus(
            np.random.default_rng(seed), copies=settings.copies, refusal_prob=refusal_prob
        )
        result = pretrain_flow(
            start,
            jax.random.key(seed),
            data.tokens,
            data.length,
            lr=settings.pretrain_lr,
            num_steps=settings.pretrain_steps,
            batch_size=settings.batch_size,
        ).run()
        loaded = result.final, np.asarray(result.loss)[:-1]  # the loss before each step
    model, losses = loaded
    if jnp.dtype(dtype) != jnp.float32:
        graphdef = nnx.split(initial_transformer(seed, settings, tied=tied, dtype=dtype))[0]
        state = jax.tree_util.tree_map(lambda a: a.astype(dtype), nnx.split(model)[1])
        model = nnx.merge(graphdef, state)
    return PretrainedTransformer(model, losses)


#: Persona statements that accord with the trait (a vice as subject): (subject, predicate).
_TRAIT_STATEMENTS = tuple((s, p) for s in corpus.VICES for p in corpus.PREDICATES)


def trait_prompts(rng: np.random.Generator, num: int) -> list[list[str]]:
    """Return ``num`` distinct trait-according persona prompts (word lists), drawn by ``rng``.

    A statement accords with the trait when its subject is a vice (its corpus answers come from
    ``corpus.NEG_ANSWERS``); ``rng.choice`` picks ``num`` of the 30 without replacement.

    Raises:
      InputError: ``num`` outside ``[1, 30]``.

    Example:
      >>> p = trait_prompts(np.random.default_rng(0), 2)
      >>> len(p), p[0][4] in corpus.VICES, p[0] != p[1]
      (2, True, True)
    """
    if not 1 <= num <= len(_TRAIT_STATEMENTS):
        raise InputError(
            f"num must be in [1, {len(_TRAIT_STATEMENTS)}] (distinct trait statements), got {num}"
        )
    picks = rng.choice(len(_TRAIT_STATEMENTS), num, False)
    return [corpus.persona_prompt(*_TRAIT_STATEMENTS[i]) for i in picks]


@dataclasses.dataclass(frozen=True)
class AnswerLogprobs:
    r"""``[V]`` :math:`\ln\pi(\cdot|x)` at the answer position of a one-pair run (hashable).

    ``observe(model, pairs)`` for :class:`~sims.models.transformer.TransformerPairs` whose
    fields hold one pair (``[1, ...]``) with the prompt in its first ``prompt_len`` tokens: an
    observable of :func:`sims.flows.core.preference_flow` and a query of
    :func:`sims.flows.core.velocity_along_flow`.

    Attributes:
      prompt_len: ``P``; the answer is predicted at position ``P - 1``.
    """

    prompt_len: int

    def __call__(self, model: nnx.Module, pairs: TransformerPairs) -> jax.Array:
        P = self.prompt_len
        return jax.nn.log_softmax(model(pairs.chosen.tokens[0, :P])[P - 1], axis=-1)


def response_batch(tokens: Any, prompt_len: int) -> TokenBatch:
    """Return the :class:`~sims.models.transformer.TokenBatch` of sampled ``tokens`` ``[N, T]``.

    A response ends at its first ``<eos>`` (included), or at ``T`` when none was sampled.

    Example:
      >>> b = response_batch(np.array([[1, 5, corpus.EOS, 0], [1, 5, 6, 7]]), 1)
      >>> b.length.tolist()
      [3, 4]
    """
    tokens = np.asarray(tokens)
    N, T = tokens.shape
    is_eos = tokens[:, prompt_len:] == corpus.EOS
    length = np.where(is_eos.any(1), prompt_len + np.argmax(is_eos, 1) + 1, T)
    return TokenBatch(tokens, np.full(N, prompt_len, np.int32), length.astype(np.int32))


class RefusalPairs(NamedTuple):
    """The §6 pairs of one seed: ``R`` = every unsafe request times ``pairs_per_prompt``.

    Attributes:
      chosen, rejected: on-policy pairs (two samples at temperature 1, refusal preferred, ties
        by a coin).
      gold_chosen, gold_rejected: a refusal template > a compliance template, per request.
      kind: ``[R]`` ``"two_refusals"``, ``"mixed"`` or ``"two_compliances"``.
      prompts: the requests with empty responses (``length == prompt_len``).
    """

    chosen: TokenBatch
    rejected: TokenBatch
    gold_chosen: TokenBatch
    gold_rejected: TokenBatch
    kind: np.ndarray
    prompts: TokenBatch


def refusal_pairs(model: CausalTransformer, seed: int, *, pairs_per_prompt: int) -> RefusalPairs:
    """Return on-policy refusal pairs judged by :func:`sims.data.corpus.is_refusal`, and gold ones.

    Each unsafe request (``pairs_per_prompt`` times) gets two samples of ``model`` at
    temperature 1 (keys ``jax.random.key(2 * seed)`` and ``2 * seed + 1``); a refusal is
    preferred over a compliance, a tie by a coin of ``np.random.default_rng(seed)`` (the paper
    breaks ties with PairRM and reports random ties give similar results). Gold pairs fill one
    refusal and one compliance template drawn by ``np.random.default_rng([seed, 1])``.

    Source: Razin et al. 2024, §6.3 and App. H.3 (on-policy pairs, gold data).

    Raises:
      InputError: ``pairs_per_prompt < 1``.
    """
    if isinstance(pairs_per_prompt, bool) or not isinstance(pairs_per_prompt, int):
        raise InputError(f"pairs_per_prompt must be an integer >= 1, got {pairs_per_prompt!r}")
    if pairs_per_prompt < 1:
        raise InputError(f"pairs_per_prompt must be an integer >= 1, got {pairs_per_prompt}")
    reqs = corpus.requests(True) * pairs_per_prompt
    words = [corpus.request_prompt(v, o) for v, o in reqs]
    prompts = corpus.pack(words, [[]] * len(reqs))
    P = int(prompts.prompt_len[0])
    a, b = (
        response_batch(
            sample(
                model,
                jax.random.key(seed * 2 + i),
                prompts.tokens,
                P,
                temperature=1.0,
                eos_id=corpus.EOS,
                pad_id=corpus.PAD,
            ),
            P,
        )
        for i in range(2)
    )
    ref = [np.array([corpus.is_refusal(corpus.decode(t[P:])) for t in x.tokens]) for x in (a, b)]
    coin = np.random.default_rng(seed).random(len(reqs)) < 0.5
    first = np.where(ref[0] != ref[1], ref[0], coin)  # refusal preferred, ties by coin

    def pick(m):  # row i from a where m[i], else from b
        return TokenBatch(
            *(np.where(m.reshape(-1, *[1] * (x.ndim - 1)), x, y) for x, y in zip(a, b, strict=True))
        )

    kind = np.where(
        ref[0] & ref[1], "two_refusals", np.where(ref[0] | ref[1], "mixed", "two_compliances")
    )
    rng = np.random.default_rng([seed, 1])
    gold = [
        corpus.pack(words, [corpus.response(str(rng.choice(t)), v, o) for v, o in reqs])
        for t in (corpus.REFUSALS, corpus.COMPLIANCES)
    ]
    return RefusalPairs(pick(first), pick(~first), *gold, kind, prompts)


class UnalignmentConditions(NamedTuple):
    """The §6 training sets of several seeds, one run per (seed, condition).

    Attributes:
      names: the ``C`` conditions trained with the plain loss: ``"dpo"`` (every on-policy
        pair), ``"gold"`` (every gold pair), ``"filtered_<f>"`` (the lowest fraction ``f`` of
        on-policy pairs by length-normalised CHES, at least one).
      pairs: ``[S * C]`` stacked :class:`~sims.models.transformer.TransformerPairs` (seed-major),
        the condition's pairs with its 0/1 ``weight`` ``[S * C, N]``.
      on_policy: ``[S]`` stacked on-policy pairs (unweighted), e.g. for DPO + SFT.
      kind: ``S * N`` strings, each on-policy pair's kind (:class:`RefusalPairs`).
      ches_ln: ``[S * N]`` each on-policy pair's length-normalised CHES.
      prompts: the unsafe requests (:class:`RefusalPairs` ``prompts``; the same for every seed).
    """

    names: tuple[str, ...]
    pairs: TransformerPairs
    on_policy: TransformerPairs
    kind: tuple[str, ...]
    ches_ln: np.ndarray
    prompts: TokenBatch


def unalignment_conditions(
    model: CausalTransformer,
    seeds: Sequence[int],
    *,
    pairs_per_prompt: int,
    keep_fractions: Sequence[float],
) -> UnalignmentConditions:
    """Return the pairs of every seed and condition of the §6 analogue, stacked on a run axis.

    Per seed: :func:`refusal_pairs`, scored by :func:`sims.analysis.scores.transformer_pair_scores`
    (reference log-probs and scores from ``model``); conditions as
    :class:`UnalignmentConditions` describes. All runs share one shape, so one compiled flow
    trains every seed and condition.

    Source: Razin et al. 2024, §6.3 (Table 16: DPO, gold pairs, CHES filtering).

    Raises:
      InputError: no seeds, or a keep fraction outside ``(0, 1]``.
    """
    if not len(seeds):
        raise InputError("seeds must hold at least one seed, got none")
    bad = [f for f in keep_fractions if not 0 < f <= 1]
    if bad:
        raise InputError(f"keep_fractions must be in (0, 1], got {list(keep_fractions)}")
    names = ("dpo", "gold", *(f"filtered_{f:g}" for f in keep_fractions))
    family, on_policy, kinds, ches_ln = [], [], [], []
    for seed in seeds:
        data = refusal_pairs(model, seed, pairs_per_prompt=pairs_per_prompt)
        scores = transformer_pair_scores(model, data.chosen, data.rejected)
        kinds.append(data.kind)
        ches_ln.append(scores["ches_ln"])
        on = make_transformer_pairs(model, data.chosen, data.rejected)
        gold = make_transformer_pairs(model, data.gold_chosen, data.gold_rejected)
        weights = [np.ones(len(data.kind))] * 2
        for f in keep_fractions:
            w = np.zeros(len(data.kind))
            w[lowest_fraction(scores["ches_ln"], f)] = 1.0
            weights.append(w)
        family += [
            (gold if n == "gold" else on)._replace(weight=jnp.asarray(w))
            for n, w in zip(names, weights, strict=True)
        ]
        on_policy.append(on)
    return UnalignmentConditions(
        names,
        stack(family),
        stack(on_policy),
        tuple(np.concatenate(kinds).tolist()),
        np.concatenate(ches_ln),
        data.prompts,
    )


class ConditionRuns(NamedTuple):
    r"""Gradient-flow runs of stacked pair sets (:func:`train_conditions`).

    Attributes:
      states: the final model states, stacked ``[R]`` (``nnx.split(model)[1]`` structure).
      logprob_change: ``[R]`` weighted mean change of :math:`\ln\pi(y^+|x)` over each run's
        pairs (weights ``pairs.weight``).
      logprobs: ``[R, 2, N]`` preferred log-probs at ``t = 0`` and at the end.
    """

    states: Any
    logprob_change: np.ndarray
    logprobs: np.ndarray


def train_conditions(
    model: CausalTransformer, pairs: TransformerPairs, loss: Any, *, dt: float, num_steps: int
) -> ConditionRuns:
    r"""Return the end states and preferred log-prob changes of gradient flow on stacked pairs.

    .. math:: \Delta = \frac{\sum_i w_i\,[\ln\pi_T(y^+_i|x_i) - \ln\pi_0(y^+_i|x_i)]}
       {\sum_i w_i}

    Every run (leading axis of ``pairs``; ``pairs.weight`` ``[R, N]`` set) starts from ``model``
    and takes ``num_steps`` Euler steps of size ``dt`` on ``loss`` (all parameters,
    :func:`sims.flows.core.preference_flow`), compiled once for all runs.

    Raises:
      ValueError: ``pairs.weight`` is ``None``; bad ``dt`` or ``num_steps`` (the flow's checks).
    """
    if pairs.weight is None:
        raise ValueError("pairs.weight must be set ([R, N]), got None")
    result = preference_flow(
        model,
        pairs,
        loss,
        dt=dt,
        num_steps=num_steps,
        record_every=num_steps,
        in_axes=(None, 0),
    ).run()
    lp = np.asarray(result.observables)  # [R, 2, N]
    w = np.asarray(pairs.weight)
    change = np.sum(w * (lp[:, -1] - lp[:, 0]), -1) / np.sum(w, -1)
    return ConditionRuns(nnx.split(result.final)[1], change, lp)


def refusal_rates(
    graphdef: Any,
    states: Any,
    key: jax.Array,
    prompts: TokenBatch,
    *,
    samples: int,
    temperature: float,
) -> np.ndarray:
    """Return ``[R]`` judged refusal rates of stacked model states (leading axis ``R``).

    Each state samples ``samples`` responses (at ``temperature``, key ``key`` for every state)
    to every prompt of ``prompts`` (tokens ``[P, T]``, one common ``prompt_len``);
    :func:`sims.data.corpus.is_refusal` judges them, and a rate is the judged fraction.

    Raises:
      InputError: ``samples < 1``, ``temperature <= 0``, or prompts of different lengths.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InputError(f"samples must be an integer >= 1, got samples={samples!r}")
    if not temperature > 0:
        raise InputError(f"temperature must be > 0, got temperature={temperature!r}")
    lengths = np.unique(np.asarray(prompts.prompt_len))
    if len(lengths) != 1:
        raise InputError(f"prompts must share one prompt_len, got {lengths.tolist()}")
    P = int(lengths[0])
    rep = jnp.repeat(jnp.asarray(prompts.tokens), samples, axis=0)  # [P * samples, T]
    toks = np.asarray(
        _sample_runs(graphdef, states, key, rep, P, temperature, corpus.EOS, corpus.PAD)
    )  # [R, P * samples, T]
    return np.array([np.mean([_judged(t[P:]) for t in run]) for run in toks])


def _judged(ids: Sequence[int]) -> bool:
    return corpus.is_refusal(corpus.decode(ids))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _sample_runs(graphdef, states, key, prompts, prompt_len, temperature, eos, pad):
    """:func:`sims.models.transformer.sample_tokens` for each stacked state, one after another
    (``lax.map``, not ``vmap``: the device holds one model's sampling at a time; vmapped, the
    ``--scale`` sampling of ``transformer_unalignment`` needed 268 GiB by its ahead-of-time
    estimate on CPU), compiled once per shapes."""

    def one(state):
        return sample_tokens(graphdef, state, key, prompts, prompt_len, temperature, eos, pad)

    return jax.lax.map(one, states)
