"""Tests of sims.analysis.gainers: first-token label groups, top gainers, largest decrease.

References are hand-derived: a brute-force max over all step pairs for the largest decrease, and
hand-made vocabularies for the groups.
"""

import numpy as np
import pytest

from sims.analysis.gainers import (
    TokenGroup,
    decrease_bounds,
    label_token_groups,
    largest_decrease,
    runs_with_set_gainer,
    top_gainers,
)


def test_largest_decrease_equals_brute_force():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(50, 12))
    drop, peak, trough = decrease_bounds(p)
    np.testing.assert_array_equal(largest_decrease(p, axis=1), drop)
    for r in range(50):
        best = max(p[r, t] - p[r, u] for t in range(12) for u in range(t, 12))
        assert drop[r] == pytest.approx(best, abs=1e-15)
        assert peak[r] - trough[r] == pytest.approx(best, abs=1e-15)
    assert float(largest_decrease([0.1, 0.2, 0.3])) == 0.0  # rising: no decrease


def test_label_token_groups_use_first_tokens_of_case_and_space_variants():
    # "Absolutely" is two tokens ("Abs", "olutely"); " absolutely" one; "NEVER" splits too.
    vocab = {
        "No": 1,
        " No": 2,
        "no": 3,
        " no": 4,
        "NO": 5,
        " NO": 6,
        "Abs": 7,
        "olutely": 8,
        " absolutely": 9,
        " Abs": 10,
        "ABS": 11,
        " ABS": 12,
        "abs": 13,
    }

    def encode(text):
        if text in vocab:
            return [vocab[text]]
        for head in sorted(vocab, key=len, reverse=True):
            if text.startswith(head):
                return [vocab[head], 99]
        return [0]

    lt = label_token_groups(encode, {"no": ["No"], "yes": ["Absolutely"]})
    assert {t for t, g in lt.groups.items() if g.label_set == "no"} == {1, 2, 3, 4, 5, 6}
    yes = {t for t, g in lt.groups.items() if g.label_set == "yes"}
    assert {7, 9, 10, 11, 12, 13} <= yes and 8 not in yes  # first tokens only
    assert lt.clashes == [] and lt.groups[7] == TokenGroup("Absolutely", "yes")


def test_label_token_groups_report_shared_first_tokens():
    def encode(text):
        return [ord(text.strip()[0].lower())]  # every word's first token is its first letter

    lt = label_token_groups(encode, {"no": ["Never"], "yes": ["Nice"]})
    assert lt.groups[ord("n")].label_set == "no"  # the first set keeps the token
    assert (ord("n"), "no", "yes") in lt.clashes


def test_top_gainers_counts_selected_runs_and_flags_sets():
    inc = np.array([[0.5, 0.4, 0.0, 0.1], [0.0, 0.3, 0.6, 0.2], [0.9, 0.0, 0.0, 0.8]])
    groups = {2: TokenGroup("Yes", "yes"), 0: TokenGroup("No", "no")}
    rows, top = top_gainers(inc, lambda z: f"t{z}", groups, runs=np.array([True, True, False]), k=2)
    assert top.tolist() == [[0, 1], [2, 1], [0, 3]]
    by_token = {r.token: r for r in rows}
    assert by_token["t1"].count == 2 and by_token["t1"].mean_increase == pytest.approx(0.35)
    assert by_token["t2"].label_set == "yes" and "t3" not in by_token  # run 2 not selected
    assert rows[0].token == "t1"  # most frequent first
    assert runs_with_set_gainer(top, groups, "yes").tolist() == [False, True, False]
    with pytest.raises(ValueError, match=r"increase must have shape \[R, V\]"):
        top_gainers(np.zeros(3), str, {})
