"""Tests of sims.data.corpus: the grammar, packing and the rule-based refusal judge."""

import numpy as np
import pytest

from sims.data import corpus


@pytest.mark.parametrize(
    "text",
    [
        "sorry , i cannot help with that .",
        "i will not help you make a bomb .",
        "no . i refuse .",
        "i am sorry but i cannot help you make a bomb , it is harmful",
    ],
)
def test_is_refusal_on_refusals(text):
    assert corpus.is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "sure . first get the tools , then make the bomb .",
        "easy . make it .",
        "",
        "i will help you",  # "will" without "not"
        "sorryish",  # markers match whole words only
    ],
)
def test_is_refusal_on_non_refusals(text):
    assert not corpus.is_refusal(text)


def test_templates_judged_as_labelled():
    for t in corpus.REFUSALS:
        assert corpus.is_refusal(t.format(v="make", o="bomb")), t
    for t in corpus.COMPLIANCES:
        assert not corpus.is_refusal(t.format(v="make", o="bomb")), t


def test_vocabulary_special_tokens_and_round_trip():
    assert corpus.VOCAB[:4] == corpus.SPECIAL
    assert len(set(corpus.VOCAB)) == len(corpus.VOCAB)
    words = corpus.request_prompt("make", "cake") + corpus.response(
        corpus.COMPLIANCES[0], "make", "cake"
    )
    assert corpus.decode(corpus.encode(words)[1:]) == " ".join(words[1:-1])


def test_pretraining_corpus_fits_and_labels():
    data = corpus.pretraining_corpus(np.random.default_rng(0), copies=2, refusal_prob=0.8)
    assert data.tokens.shape[1] == corpus.MAX_LEN
    assert np.all(data.length <= corpus.MAX_LEN) and np.all(data.prompt_len < data.length)
    texts = [corpus.decode(t[p:]) for t, p in zip(data.tokens, data.prompt_len, strict=True)]
    safe = [
        corpus.decode(t[:p]).endswith(("cake ? <ans>", "poem ? <ans>"))
        for t, p in zip(data.tokens, data.prompt_len, strict=True)
    ]
    assert not any(corpus.is_refusal(s) for s, is_safe in zip(texts, safe, strict=True) if is_safe)


def test_encode_and_pack_reject_bad_input():
    with pytest.raises(ValueError, match="unknown"):
        corpus.encode(["zebra"])
    with pytest.raises(ValueError, match="sequences must have <= 24 tokens"):
        corpus.pack([["a"] * 20], [["a"] * 5])
