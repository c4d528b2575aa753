"""Pre-training settings shared by the transformer experiments (Razin et al. 2024 §§3, 5, 6).

Each ``experiments/transformer_*.py`` ``Config`` extends :class:`PretrainConfig` with its own knobs
(and its ``seed``) and builds its model with :func:`pretrain`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.framework import ConfigError, ExperimentConfig
from sims.data import corpus
from sims.models.transformer import CausalTransformer, TokenBatch, sample_tokens
from sims.models.transformer import pretrain as pretrain_lm


@dataclass(frozen=True)
class PretrainConfig(ExperimentConfig):
    """Transformer size and pre-training schedule (corpus: :mod:`sims.data.corpus`)."""

    d_model: int = 64  # transformer hidden size
    num_layers: int = 2  # transformer blocks
    num_heads: int = 4  # attention heads
    tied: bool = True  # unembedding tied to the token embedding
    copies: int = 8  # pre-training corpus copies (labels redrawn per copy)
    pretrain_lr: float = 3e-3  # Adam learning rate
    pretrain_steps: int = 150  # Adam steps (minibatch; the LM loss plateaus by ~100)
    batch_size: int = 64  # pre-training minibatch

    #: Pre-training knobs of every transformer experiment's ``--scale`` version (GPU/TPU sizes).
    SCALED: ClassVar[dict] = {
        "d_model": 256,
        "num_layers": 4,
        "num_heads": 8,
        "copies": 32,
        "pretrain_steps": 2000,
    }
    #: Pre-training knobs of every transformer experiment's ``--smoke`` version (tests).
    SMOKE: ClassVar[dict] = {
        "d_model": 16,
        "num_layers": 1,
        "num_heads": 2,
        "copies": 1,
        "pretrain_steps": 5,
    }

    def check(self) -> None:
        if self.d_model % self.num_heads:
            raise ConfigError(
                f"--d-model must be divisible by --num-heads, got {self.d_model}, {self.num_heads}"
            )


def _pretrain_settings(config, refusal_prob: float) -> dict:
    """The keyword arguments of :func:`pretrained_model` (and its program) for ``config``."""
    return dict(
        d_model=config.d_model,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        tied=config.tied,
        copies=config.copies,
        refusal_prob=refusal_prob,
        lr=config.pretrain_lr,
        num_steps=config.pretrain_steps,
        batch_size=config.batch_size,
    )


def pretrain(config, *, refusal_prob: float = 0.8) -> tuple[CausalTransformer, np.ndarray]:
    """Return ``(model, losses)`` of :func:`pretrained_model` for ``config``.

    ``config`` is a :class:`PretrainConfig` subclass with a ``seed`` field.
    """
    return pretrained_model(config.seed, **_pretrain_settings(config, refusal_prob))


def pretrained_model(
    seed: int,
    *,
    d_model: int,
    num_layers: int,
    num_heads: int,
    tied: bool,
    copies: int,
    refusal_prob: float,
    lr: float,
    num_steps: int,
    batch_size: int,
) -> tuple[CausalTransformer, np.ndarray]:
    """Return a :class:`CausalTransformer` pre-trained on the corpus of :mod:`sims.data.corpus`.

    Returns:
      ``(model, losses)``; ``losses`` ``[num_steps]`` minibatch LM losses.
    """
    data = corpus.pretraining_corpus(
        np.random.default_rng(seed), copies=copies, refusal_prob=refusal_prob
    )
    model = _model(seed, d_model=d_model, num_layers=num_layers, num_heads=num_heads, tied=tied)
    res = pretrain_lm(
        model,
        jax.random.key(seed),
        data.tokens,
        data.length,
        lr=lr,
        num_steps=num_steps,
        batch_size=batch_size,
    ).run()
    return res.final, np.asarray(res.loss)[:-1]  # the loss before each step, as before


def _model(seed: int, *, d_model: int, num_layers: int, num_heads: int, tied: bool):
    return CausalTransformer(
        len(corpus.VOCAB),
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        max_len=corpus.MAX_LEN,
        tied=tied,
        rngs=nnx.Rngs(seed),
    )


def initial_model(config) -> CausalTransformer:
    """The model :func:`pretrain` starts from (random, float32), of the trained one's structure."""
    return _model(
        config.seed,
        d_model=config.d_model,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        tied=config.tied,
    )


def response_batch(tokens, prompt_len: int) -> TokenBatch:
    """Return the :class:`~sims.models.transformer.TokenBatch` of sampled ``tokens`` ``[N, T]``.

    A response ends at its first ``<eos>``, or at ``T`` when none was sampled.
    """
    tokens = np.asarray(tokens)
    N, T = tokens.shape
    is_eos = tokens[:, prompt_len:] == corpus.EOS
    length = np.where(is_eos.any(1), prompt_len + np.argmax(is_eos, 1) + 1, T)
    return TokenBatch(tokens, np.full(N, prompt_len, np.int32), length.astype(np.int32))


def refusal_rates(
    graphdef, states, key, prompts, prompt_len: int, *, samples: int, temperature: float
) -> np.ndarray:
    """Return the judged refusal rate of each stacked model state (leading axis ``R``).

    Each state samples ``samples`` responses to every prompt; :func:`sims.data.corpus.is_refusal`
    judges them.
    """
    rep = jnp.repeat(jnp.asarray(prompts), samples, axis=0)  # [P * samples, T]
    toks = np.asarray(
        _sample_runs(graphdef, states, key, rep, prompt_len, temperature, corpus.EOS, corpus.PAD)
    )  # [R, P * samples, T]
    return np.array(
        [np.mean([corpus.is_refusal(corpus.decode(t[prompt_len:])) for t in run]) for run in toks]
    )


@functools.partial(jax.jit, static_argnums=(0, 4))
def _sample_runs(graphdef, states, key, prompts, prompt_len, temperature, eos, pad):
    """:func:`sims.models.transformer.sample_tokens` for each stacked state, one state after another
    (``lax.map``, not ``vmap``: the device holds one model's sampling at a time; vmapped, the
    ``--scale`` sampling of ``transformer_unalignment`` needed 268 GiB by its ahead-of-time
    estimate on CPU), compiled once per shapes."""

    def one(state):
        return sample_tokens(graphdef, state, key, prompts, prompt_len, temperature, eos, pad)

    return jax.lax.map(one, states)
