"""Tests of sims.protocols.minilm: the pre-registered 'catastrophic' rule and the verdict on
hand-built runs, the entropy and set masses of a run record, and the t = 0 kernel measurements
(tied kernel form vs autodiff) on a tiny float64 BERT."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sims.models.bert import BertConfig, BertEncoder, MaskedPrompts, make_masked_lm_pairs
from sims.protocols import minilm

#: closed form vs autodiff, same float64 parameters (house table).
RTOL_AUTODIFF = 1e-9

NAMES = [*minilm.NEG, *minilm.POS, "cat"]  # ids 0-3 N, 4-8 Y, 9 other
IDS = {"N": [0, 1, 2, 3], "Y": [4, 5, 6, 7, 8]}
FALLS, RISES = np.array([0.7, 0.6, 0.5]), np.array([0.7, 0.6, 0.65])


def _record(rows, pos, neg, loss=FALLS, min_start=0.0):
    """A run record from per-step {token id: probability} rows on the 10-token vocabulary."""
    probs = np.zeros((len(rows), 10))
    for t, row in enumerate(rows):
        for i, p in row.items():
            probs[t, i] = p
    return minilm.run_record(
        probs, loss, pos, neg, NAMES, IDS, "s", top_k=2, gain_steps=(1, 2), min_start=min_start
    )


def _row(records, pos, neg):
    return minilm.pair_row(records, pos, neg, drop_threshold=minilm.DROP)  # DROP = 0.2


def test_pair_row_needs_drop_and_opposite_gainers_in_stable_runs():
    """Hand-built runs: the pre-registered 'catastrophic' rule."""
    yes_gains = _record(
        [{0: 0.8, 1: 0.1, 9: 0.1}, {0: 0.5, 4: 0.3, 9: 0.2}, {0: 0.4, 4: 0.4, 9: 0.2}], 0, 1
    )
    assert yes_gains["drop"] == pytest.approx(0.4) and yes_gains["opposite_gainer"]
    mild = _record([{0: 0.8, 9: 0.2}, {0: 0.7, 9: 0.3}, {0: 0.75, 9: 0.25}], 0, 1)
    assert mild["drop"] == pytest.approx(0.1) and not mild["opposite_gainer"]
    row = _row([yes_gains, mild], "no", "never")  # mean drop 0.25, 1 of 2 runs
    assert row["catastrophic"] and row["drop"] == pytest.approx(0.25)
    assert row["runs_drop_and_opposite"] == 1  # yes_gains: drop 0.4 and a Y gainer
    assert row["mass_end"]["Y"] == pytest.approx(0.2)  # (0.4 + 0) / 2
    assert not _row([mild, mild], "no", "never")["catastrophic"]  # no Y gainer
    unstable = _record([{0: 0.9, 9: 0.1}, {0: 0.1, 4: 0.9}, {0: 0.1, 4: 0.9}], 0, 1, loss=RISES)
    row = _row([unstable, mild], "no", "never")  # the unstable run is left out
    assert (row["stable_runs"], row["catastrophic"]) == (1, False)
    assert _row([unstable], "no", "never")["catastrophic"] is None
    # y+ = yes: the opposite set is N without y- = no; 'yeah' (same set) and 'no' do not count
    same = _record([{4: 0.8, 0: 0.1, 9: 0.1}, {4: 0.5, 5: 0.4, 0: 0.1}, {4: 0.5, 5: 0.5}], 4, 0)
    other = _record([{4: 0.8, 0: 0.1, 9: 0.1}, {4: 0.5, 1: 0.4, 9: 0.1}, {4: 0.5, 1: 0.5}], 4, 0)
    assert not same["opposite_gainer"] and other["opposite_gainer"]  # 'never' is opposite
    assert _row([same, other], "yes", "no")["catastrophic"]  # drop 0.3, 1 of 2


def test_run_record_entropy_and_masses_hand_values():
    """Uniform over 4 tokens: entropy ln 4; one token: 0; N and Y masses summed by hand."""
    rec = _record([{0: 0.25, 1: 0.25, 4: 0.25, 9: 0.25}, {0: 1.0}, {0: 0.5, 5: 0.5}], 0, 1)
    np.testing.assert_allclose(rec["entropy"], [np.log(4), 0.0, np.log(2)], rtol=1e-12)
    np.testing.assert_allclose(rec["n_mass"], [0.5, 1.0, 0.5], rtol=1e-12)
    np.testing.assert_allclose(rec["y_mass"], [0.25, 0.0, 0.5], rtol=1e-12)


def test_pair_row_counts_only_informative_stable_runs():
    """A run starting below the start threshold is left out; entropy and margin growth are the
    means over the counted runs (hand values)."""
    start_low = [{0: 0.3, 1: 0.3, 4: 0.4}, {0: 0.1, 4: 0.9}, {0: 0.1, 4: 0.9}]  # catastrophic-like
    low = _record(start_low, 0, 1, min_start=0.5)
    high = _record([{0: 0.5, 1: 0.5}, {0: 0.8, 1: 0.2}, {0: 0.9, 1: 0.1}], 0, 1, min_start=0.5)
    assert not low["informative"] and high["informative"]
    # margin ln(0.9 / 0.1) - ln(0.5 / 0.5) = ln 9
    np.testing.assert_allclose(high["margin_growth"], np.log(9.0), rtol=1e-12)
    assert low["margin_growth"] is None  # pi(never) = 0 at the end: undefined, not inf
    row = _row([low, high], "no", "never")
    assert (row["runs"], row["informative_runs"], row["stable_runs"]) == (2, 1, 1)
    assert not row["catastrophic"] and row["drop"] == 0.0
    np.testing.assert_allclose(row["entropy_start"], np.log(2.0), rtol=1e-12)  # {0.5, 0.5}
    expected_end = -(0.9 * np.log(0.9) + 0.1 * np.log(0.1))
    np.testing.assert_allclose(row["entropy_end"], expected_end, rtol=1e-12)
    row = _row([low], "no", "never")
    assert (row["informative_runs"], row["catastrophic"]) == (0, None)
    rows = {
        k: {"stable_runs": 1, "catastrophic": False} for k in ("never>no", "yes>no", "sure>yes")
    }
    assert minilm.minilm_verdict({"no>never": row, **rows})[0] == "uninformative"


def test_runs_and_labels_distinct_prompts_labelled_y_pos():
    ids = {w: 100 + i for i, w in enumerate(minilm.NEG + minilm.POS)}
    for seed in range(20):
        for n, R in ((8, 3), (8, 4), (6, 1), (16, 8)):
            runs, labels = minilm.runs_and_labels(n, R, ids, seed=seed)
            prompts = [i for _, i in runs]
            assert len(runs) == 4 * R and len(set(prompts)) == 4 * R  # distinct across pairs
            for k, i in runs:
                pos = minilm.PAIRS[k][0]
                assert (i < n) == (pos in minilm.NEG)  # a prompt of y+'s class
                assert labels[i] == ids[pos]
            rest = set(range(2 * n)) - set(prompts)
            assert all(labels[i] in [ids[w] for w in minilm.NEG] for i in rest if i < n)
            assert all(labels[i] in [ids[w] for w in minilm.POS] for i in rest if i >= n)
    with pytest.raises(ValueError, match="2 \\* runs_per_pair must be <= n"):
        minilm.runs_and_labels(4, 3, ids, seed=0)


def _rows(catastrophic, stable=(1, 1, 1, 1)):
    keys = ("no>never", "never>no", "yes>no", "sure>yes")
    return {
        k: {"stable_runs": s, "catastrophic": c}
        for k, c, s in zip(keys, catastrophic, stable, strict=True)
    }


@pytest.mark.parametrize(
    ("rows", "verdict", "reasons"),
    [
        (_rows((True, False, False, False)), "reproduced", []),
        (_rows((False, False, False, False)), "not reproduced", ["no>never not catastrophic"]),
        (_rows((True, False, True, False)), "not reproduced", ["yes>no catastrophic"]),
        (
            _rows((True, None, False, False), stable=(1, 0, 1, 1)),
            "not reproduced",
            ["never>no: no stable run"],
        ),
        ({}, "not reproduced", ["no DPO runs"]),
    ],
)
def test_minilm_verdict_branches(rows, verdict, reasons):
    assert minilm.minilm_verdict(rows) == (verdict, reasons)


TINY = BertConfig(  # vocabulary: the 9 label words first, then fillers
    vocab_size=16,
    hidden_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=16,
    max_position_embeddings=10,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
)


@pytest.mark.slow  # ~35 s on the 2-core machine (compiles the jvp, kernel and cross terms)
def test_kernel_summary_tied_kernel_form_matches_autodiff_on_tiny_bert():
    """On a random float64 BERT the tied kernel form (theory.kernel) equals the jvp truth."""
    model = BertEncoder(TINY, rngs=nnx.Rngs(0), dtype=jnp.float64)
    rng = np.random.default_rng(0)
    tokens = rng.integers(9, 16, (2, 6)).astype(np.int32)
    prompts = MaskedPrompts(tokens, np.ones((2, 6), np.int32), np.array([5, 5], np.int32))
    pairs = make_masked_lm_pairs(model, prompts, [0, 4], [1, 0])
    names = [*NAMES[:9], *(f"w{i}" for i in range(7))]
    ids = {"N": [0, 1, 2, 3], "Y": [4, 5, 6, 7, 8]}
    out = minilm.kernel_summary(model, pairs, 0, 0, 1, ids, names, beta=0.1, sign_tol=1e-6)
    assert out["kernel"]["rel_err"] < RTOL_AUTODIFF, out["kernel"]
    assert out["kernel"]["sign_agree"] == 1.0
    terms = out["yes_gain_terms"]
    assert set(terms) == set(minilm.POS)
    for z, t in terms.items():  # the kernel form's parts add up to it (hidden + cross + W)
        parts = t["hidden"] + t["logit_cross"] + t["w_channel"]
        np.testing.assert_allclose(parts, t["kernel_form"], rtol=1e-9, err_msg=z)
        np.testing.assert_allclose(t["kernel_form"], t["truth"], rtol=1e-7, atol=1e-12, err_msg=z)
    assert 0.0 <= out["channels_gf"]["unembedding_share"] <= 1.0
