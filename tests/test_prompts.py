"""Tests of sims.data.prompts: the prompt sets and the seeded, stratified train/test split."""

from collections import Counter

import pytest

from sims.data import prompts
from sims.data.prompts import (
    GENERAL_INSTRUCTIONS,
    SORRY_BENCH_CATEGORIES,
    SORRY_BENCH_DOMAINS,
    UNSAFE_REQUESTS,
    split_train_test,
)

MIN_INSTRUCTIONS = 190  # the brief asks for about 200 benign instructions
MIN_UNSAFE = 140  # the brief asks for about 150 unsafe requests
N_CATEGORIES = 44  # SORRY-Bench (Xie et al. 2024, v2) has 44 fine-grained categories
MAX_REQUEST_CHARS = 100  # a one-sentence request; the longest written is under this
PAPER_TEST_FRACTION = 0.15  # Razin et al. 2024 §6.1: 85% / 15% train/test split
SEEDS = (0, 1, 2, 7, 123)


def test_prompt_counts():
    assert len(GENERAL_INSTRUCTIONS) >= MIN_INSTRUCTIONS
    assert len(UNSAFE_REQUESTS) >= MIN_UNSAFE


def test_prompts_have_no_duplicates():
    assert len(set(GENERAL_INSTRUCTIONS)) == len(GENERAL_INSTRUCTIONS)
    texts = [r for _, r in UNSAFE_REQUESTS]
    assert len(set(texts)) == len(texts)
    normalised = {" ".join(t.lower().split()) for t in (*GENERAL_INSTRUCTIONS, *texts)}
    assert len(normalised) == len(GENERAL_INSTRUCTIONS) + len(texts), "near-duplicate (case)"


def test_prompts_are_clean_strings():
    texts = [*GENERAL_INSTRUCTIONS, *(r for _, r in UNSAFE_REQUESTS)]
    for t in texts:
        assert isinstance(t, str) and t == t.strip() and t, repr(t)
        assert "  " not in t and "\n" not in t, repr(t)


def test_unsafe_requests_are_short_single_requests():
    for category, request in UNSAFE_REQUESTS:
        assert len(request) <= MAX_REQUEST_CHARS, (category, request)
        assert request[-1] in ".?", (category, request)


def test_sorry_bench_categories_are_the_domains_flattened():
    assert len(SORRY_BENCH_DOMAINS) == 4
    flat = [c for _, cats in SORRY_BENCH_DOMAINS for c in cats]
    assert tuple(flat) == SORRY_BENCH_CATEGORIES
    assert len(set(SORRY_BENCH_CATEGORIES)) == N_CATEGORIES


def test_unsafe_requests_cover_every_category_three_or_four_times():
    counts = Counter(c for c, _ in UNSAFE_REQUESTS)
    assert set(counts) <= set(SORRY_BENCH_CATEGORIES), set(counts) - set(SORRY_BENCH_CATEGORIES)
    assert set(counts) == set(SORRY_BENCH_CATEGORIES), set(SORRY_BENCH_CATEGORIES) - set(counts)
    assert all(3 <= k <= 4 for k in counts.values()), counts


def test_prompts_module_reexports_the_same_objects():
    from sims.data import general_instructions, unsafe_requests

    assert prompts.GENERAL_INSTRUCTIONS is general_instructions.GENERAL_INSTRUCTIONS
    assert prompts.UNSAFE_REQUESTS is unsafe_requests.UNSAFE_REQUESTS


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "items", [GENERAL_INSTRUCTIONS, UNSAFE_REQUESTS], ids=["general", "unsafe"]
)
def test_split_train_test_sizes_disjoint_and_complete(items, seed):
    train, test = split_train_test(items, test_fraction=PAPER_TEST_FRACTION, seed=seed)
    n = len(items)
    assert abs(len(test) - PAPER_TEST_FRACTION * n) <= 0.5, (len(test), n)
    assert len(train) + len(test) == n
    assert not set(train) & set(test)
    assert set(train) | set(test) == set(items)


@pytest.mark.parametrize(
    "items", [GENERAL_INSTRUCTIONS, UNSAFE_REQUESTS], ids=["general", "unsafe"]
)
def test_split_train_test_keeps_input_order(items):
    train, test = split_train_test(items, seed=3)
    position = {x: i for i, x in enumerate(items)}
    for part in (train, test):
        idx = [position[x] for x in part]
        assert idx == sorted(idx)


@pytest.mark.parametrize(
    "items", [GENERAL_INSTRUCTIONS, UNSAFE_REQUESTS], ids=["general", "unsafe"]
)
def test_split_train_test_is_deterministic_and_seeded(items):
    assert split_train_test(items, seed=5) == split_train_test(items, seed=5)
    tests = {split_train_test(items, seed=s)[1] for s in SEEDS}
    assert len(tests) == len(SEEDS), "different seeds should give different test sets"


@pytest.mark.parametrize("seed", SEEDS)
def test_split_train_test_stratifies_unsafe_requests(seed):
    train, test = split_train_test(UNSAFE_REQUESTS, test_fraction=PAPER_TEST_FRACTION, seed=seed)
    n_c = Counter(c for c, _ in UNSAFE_REQUESTS)
    train_c = Counter(c for c, _ in train)
    test_c = Counter(c for c, _ in test)
    assert set(train_c) == set(SORRY_BENCH_CATEGORIES), "every category must be in train"
    n_test = len(test)
    for c, k in n_c.items():
        # Largest-remainder allocation: each category gets the floor or the ceiling of its quota.
        assert abs(test_c[c] - n_test * k / len(UNSAFE_REQUESTS)) < 1, (c, test_c[c], k)


def test_split_train_test_hand_counted_strata():
    # Two categories of 10 and 5 items at f = 0.2: n_test = 3, quotas 2 and 1, no remainders.
    items = [("a", f"a{i}") for i in range(10)] + [("b", f"b{i}") for i in range(5)]
    _, test = split_train_test(items, test_fraction=0.2, seed=0)
    assert Counter(c for c, _ in test) == {"a": 2, "b": 1}


def test_split_train_test_keeps_one_of_each_small_category_in_train():
    # Four categories of 2 items at f = 0.5: n_test = 4 = the total of the caps (one per category).
    items = [(c, f"{c}{i}") for c in "wxyz" for i in range(2)]
    for seed in SEEDS:
        train, test = split_train_test(items, test_fraction=0.5, seed=seed)
        assert Counter(c for c, _ in train) == dict.fromkeys("wxyz", 1)
        assert Counter(c for c, _ in test) == dict.fromkeys("wxyz", 1)


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, float("nan"), float("inf"), True, "0.1", None])
def test_split_train_test_rejects_bad_test_fraction(bad):
    with pytest.raises(ValueError, match="test_fraction must be"):
        split_train_test(GENERAL_INSTRUCTIONS, test_fraction=bad)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "0", None])
def test_split_train_test_rejects_bad_seed(bad):
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        split_train_test(GENERAL_INSTRUCTIONS, seed=bad)


@pytest.mark.parametrize(
    "items, match",
    [
        ("just a string", "items must be a sequence"),
        (42, "items must be a sequence"),
        (["only one"], "at least 2 items"),
        (["a", ("c", "b")], "all strings or all"),
        ([("c", "a"), "b"], "all strings or all"),
        ([("c", "a", "x"), ("c", "b", "y")], "all strings or all"),
        ([("c", 1), ("c", 2)], "all strings or all"),
        (["a", "b", "a"], "must not contain duplicates"),
    ],
)
def test_split_train_test_rejects_bad_items(items, match):
    with pytest.raises(ValueError, match=match):
        split_train_test(items)


def test_split_train_test_rejects_a_fraction_that_empties_a_part():
    with pytest.raises(ValueError, match="at least one of the 4 items in each part"):
        split_train_test(["a", "b", "c", "d"], test_fraction=0.1)
    with pytest.raises(ValueError, match="at least one of the 4 items in each part"):
        split_train_test(["a", "b", "c", "d"], test_fraction=0.9)


def test_split_train_test_rejects_a_fraction_the_strata_cannot_meet():
    items = [("a", "a1"), ("a", "a2"), ("b", "b1"), ("b", "b2")]  # caps: one test item each
    with pytest.raises(ValueError, match="leaves only 2"):
        split_train_test(items, test_fraction=0.7)
