"""Pre-training settings shared by the transformer experiments (Razin et al. 2024 §§3, 5, 6).

Each ``experiments/transformer_*.py`` ``Config`` extends :class:`PretrainConfig` with its own knobs
(and its ``seed``) and builds its model with :func:`pretrain`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sims.toy_lm import pretrained_model
from sims.transformer import CausalTransformer


@dataclass(frozen=True)
class PretrainConfig:
    """Transformer size and pre-training schedule (corpus: :mod:`sims.corpus`)."""

    d_model: int = 64  # transformer hidden size
    num_layers: int = 2  # transformer blocks
    num_heads: int = 4  # attention heads
    tied: bool = True  # unembedding tied to the token embedding
    copies: int = 8  # pre-training corpus copies (labels redrawn per copy)
    pretrain_lr: float = 3e-3  # Adam learning rate
    pretrain_steps: int = 150  # Adam steps (minibatch; the LM loss plateaus by ~100)
    batch_size: int = 64  # pre-training minibatch


def pretrain(config, *, refusal_prob: float = 0.8) -> tuple[CausalTransformer, np.ndarray]:
    """Return ``(model, losses)`` of :func:`sims.toy_lm.pretrained_model` for ``config``.

    ``config`` is a :class:`PretrainConfig` subclass with a ``seed`` field.
    """
    return pretrained_model(
        config.seed,
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
