"""Tests of the Figure 2 and Section 6 protocols: verdicts on hand-made inputs, pair labelling,
and the on-policy helpers on a tiny model."""

import jax
import numpy as np
import pytest

from sims.analysis.summaries import lowest_fraction
from sims.checkpoints.opened import tiny_random_checkpoint
from sims.checkpoints.tokenization import encode_prompts
from sims.protocols import ches, unalignment
from sims.protocols.onpolicy import distinct_responses, pick_pairs, response_texts, sample_two


def _sub(change, growth=1.0):
    return {"change": [change], "margin_growth": [growth]}


@pytest.mark.parametrize(
    ("changes", "rho", "verdict"),
    [
        ([2.0, 1.0, 0.0, -1.0, -2.0], -1.0, "reproduced"),
        ([2.0, 1.0, 0.0, -1.0, -2.0], -0.7, "not reproduced"),  # ranking not strong enough
        ([3.0, 2.0, 1.0, 0.5, 0.1], -1.0, "not reproduced"),  # the top subset gains
        ([-0.1, -0.2, -0.3, -1.0, -2.0], -1.0, "not reproduced"),  # the bottom subset loses
        ([2.0, 1.0, 0.0, -1.0, -2.0], None, "not reproduced"),  # undefined Spearman
    ],
)
def test_figure2_verdict_branches(changes, rho, verdict):
    r = {"spearman": {"ches": rho}, "subsets": {"ches": [_sub(c) for c in changes]}}
    assert ches.figure2_verdict(r)["ches"]["verdict"] == verdict


def test_figure2_verdict_uninformative_without_margin_growth():
    r = {
        "spearman": {"ches": -1.0},
        "subsets": {"ches": [_sub(c, growth=0.1) for c in (2.0, 1.0, 0.0, -1.0, -2.0)]},
    }
    assert ches.figure2_verdict(r)["ches"]["verdict"] == "uninformative"


def test_judge_pairs_prefers_refusal_and_breaks_ties_by_the_first_draw():
    refuse, comply = "I'm sorry, but I can't help with that.", "Sure. " + "word " * 30
    out = unalignment.judge_pairs(
        [refuse, comply, refuse, comply], [comply, refuse, refuse, comply]
    )
    assert out["chosen_is_a"].tolist() == [True, False, True, True]
    assert out["kind"].tolist() == ["mixed", "mixed", "two_refusals", "two_non_refusals"]


def test_unalignment_verdict_branches():
    v = unalignment.unalignment_verdict(
        80.0, {"dpo": 65.0, "filtered_5%": 76.0, "filtered_15%": 50.0}, True
    )
    assert v["drop"] == "reproduced" and v["mitigation"] == "reproduced"
    assert v["mitigation_filtered_15%"] == "not reproduced"
    v = unalignment.unalignment_verdict(
        80.0, {"dpo": 65.0, "filtered_5%": 70.0, "filtered_15%": 90.0}, False
    )
    assert v["drop"] == "not reproduced"  # the loss did not fall
    assert v["mitigation"] == "uninformative"  # no drop to prevent
    v = unalignment.unalignment_verdict(
        80.0, {"dpo": 65.0, "filtered_5%": 70.0, "filtered_15%": 90.0}, True
    )
    assert v["mitigation"] == "not reproduced" and v["mitigation_filtered_15%"] == "reproduced"
    assert unalignment.unalignment_verdict(
        80.0, {"dpo": 71.0, "filtered_5%": 80.0, "filtered_15%": 80.0}, True
    )["drop"] == ("not reproduced")  # 9 points < 10
    v = unalignment.unalignment_verdict(
        5.0, {"dpo": 0.0, "filtered_5%": 5.0, "filtered_15%": 5.0}, True
    )
    assert v["drop"] == "uninformative" and v["mitigation"] == "uninformative"  # 5% < 10


def test_lowest_fraction_keeps_at_least_one():
    assert lowest_fraction(np.array([3.0, 1.0, 2.0]), 0.05).tolist() == [1]
    assert lowest_fraction(np.arange(40.0)[::-1], 0.15).tolist() == [
        39,
        38,
        37,
        36,
        35,
        34,
    ]


def test_on_policy_pairs_on_a_tiny_model():
    ckpt = tiny_random_checkpoint(seed=0)
    prompts = encode_prompts(
        ckpt.tokenizer, ["abc", "de", "f"], template=None, special=ckpt.special, pad_id=256
    )
    two = sample_two(
        ckpt,
        prompts,
        jax.random.key(0),
        max_new_tokens=5,
        temperature=1.0,
        batch_size=2,
        log=lambda _: None,
    )
    assert two.a.batch.tokens.shape == two.b.batch.tokens.shape == (3, 3 + 5)  # prompt + new
    chosen, rejected = pick_pairs(two, np.array([True, False, True]))
    np.testing.assert_array_equal(chosen.tokens[0], two.a.batch.tokens[0])
    np.testing.assert_array_equal(rejected.tokens[1], two.a.batch.tokens[1])
    assert distinct_responses(two).dtype == bool
    texts = response_texts(ckpt.tokenizer, two.a)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
