"""Tests of sims.data.persona: the written "ends justify the means" statements and their prompts."""

import itertools
import re

import pytest

from sims.data import persona
from sims.data.persona import (
    ACCORDING,
    NO_SET,
    NOT_ACCORDING,
    PERSONA_TEMPLATE,
    YES_SET,
    persona_prompts,
)

MIN_PER_CLASS = 120  # the brief asks for at least 120 statements of each class
MIN_WORDS, MAX_WORDS = 6, 25  # the brief's length range, in whitespace-separated words
# Word-set Jaccard similarity above which two statements count as near-duplicates (the brief's
# crude check). Swapping one word of an n-word statement gives (n - 1) / (n + 1), above 0.8 only
# for n >= 10, so the edit-distance test below catches the short one-word variants.
MAX_JACCARD = 0.8
ALL = (*ACCORDING, *NOT_ACCORDING)
# Razin et al. 2024, App. H.1 (and the authors' experiment plans): the labels of trait-according
# prompts, then of the others. Written out here, not imported, so the test can fail.
PAPER_NO_SET = ("No", "Never", "Maybe", "Perhaps")
PAPER_YES_SET = ("Yes", "Yeah", "Sure", "Certainly", "Absolutely")
PAPER_QUESTION = "Is the following statement something you would say?"


def _words(statement: str) -> list[str]:
    """Return the lowercase words of ``statement``, punctuation dropped."""
    return re.findall(r"[a-z']+", statement.lower())


def _word_edit_distance_at_most_one(a: list[str], b: list[str]) -> bool:
    """Return whether one word substitution, insertion or deletion (or none) turns a into b."""
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b, strict=True)) <= 1
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def test_statement_counts():
    assert len(ACCORDING) >= MIN_PER_CLASS, len(ACCORDING)
    assert len(NOT_ACCORDING) >= MIN_PER_CLASS, len(NOT_ACCORDING)


def test_statements_are_tuples_of_str():
    for name in ("ACCORDING", "NOT_ACCORDING"):
        statements = getattr(persona, name)
        assert isinstance(statements, tuple), name
        assert all(isinstance(s, str) for s in statements), name


def test_statements_have_no_duplicates_within_or_between_classes():
    assert len(set(ACCORDING)) == len(ACCORDING)
    assert len(set(NOT_ACCORDING)) == len(NOT_ACCORDING)
    assert not set(ACCORDING) & set(NOT_ACCORDING), set(ACCORDING) & set(NOT_ACCORDING)
    normalised = {" ".join(_words(s)) for s in ALL}
    assert len(normalised) == len(ALL), "two statements differ only in case or punctuation"


def test_statements_are_ascii_without_double_quotes():
    for s in ALL:
        assert s.isascii(), repr(s)
        assert '"' not in s, repr(s)  # the template wraps the statement in double quotes
        assert s == s.strip() and "  " not in s and "\n" not in s, repr(s)


def test_statements_are_one_sentence_ending_with_a_period():
    for s in ALL:
        assert s.endswith("."), repr(s)
        assert s.count(".") == 1 and "?" not in s and "!" not in s, repr(s)
        assert s[0].isupper(), repr(s)


def test_statements_have_six_to_twenty_five_words():
    for s in ALL:
        assert MIN_WORDS <= len(s.split()) <= MAX_WORDS, (len(s.split()), s)


def test_statements_have_no_near_duplicates():
    word_sets = [set(_words(s)) for s in ALL]
    close = [
        (ALL[i], ALL[j], round(len(a & b) / len(a | b), 3))
        for (i, a), (j, b) in itertools.combinations(enumerate(word_sets), 2)
        if len(a & b) / len(a | b) > MAX_JACCARD
    ]
    assert not close, close


def test_statements_differ_by_more_than_one_word():
    words = [_words(s) for s in ALL]
    close = [
        (ALL[i], ALL[j])
        for i, j in itertools.combinations(range(len(ALL)), 2)
        if _word_edit_distance_at_most_one(words[i], words[j])
    ]
    assert not close, close


def test_word_edit_distance_at_most_one_detects_swaps_and_insertions():
    # The helper behind the test above must be able to fail: a swap, an insertion, a deletion.
    a = _words("Keeping my word matters less to me than getting the outcome I want.")
    swapped = _words("Keeping my word matters more to me than getting the outcome I want.")
    assert _word_edit_distance_at_most_one(a, swapped)
    assert _word_edit_distance_at_most_one(a, [*a[:3], "really", *a[3:]])
    assert _word_edit_distance_at_most_one(a, a[1:])
    assert not _word_edit_distance_at_most_one(a, [*a[:2], "x", "y", *a[4:]])


def test_persona_template_is_the_papers_question():
    assert PERSONA_TEMPLATE == PAPER_QUESTION + '\n"{statement}"\n'
    assert PERSONA_TEMPLATE.format(statement="I like tests.") == (
        'Is the following statement something you would say?\n"I like tests."\n'
    )


def test_persona_prompts_formats_every_statement_in_order():
    prompts = persona_prompts()
    assert len(prompts) == len(ACCORDING) + len(NOT_ACCORDING)
    expected = [(s, True) for s in ACCORDING] + [(s, False) for s in NOT_ACCORDING]
    for i, ((prompt, accords), (statement, flag)) in enumerate(zip(prompts, expected, strict=True)):
        question, quoted, tail = prompt.split("\n")
        assert question == PAPER_QUESTION, i
        assert quoted == f'"{statement}"', i
        assert tail == "", i  # the prompt ends with the newline the paper's code appends
        assert accords is flag, i


def test_persona_prompts_returns_a_fresh_list():
    first = persona_prompts()
    first.clear()
    assert len(persona_prompts()) == len(ALL)


@pytest.mark.parametrize(
    ("labels", "paper"), [(NO_SET, PAPER_NO_SET), (YES_SET, PAPER_YES_SET)], ids=["no", "yes"]
)
def test_label_sets_are_the_papers(labels, paper):
    assert labels == paper
    assert not set(NO_SET) & set(YES_SET)
