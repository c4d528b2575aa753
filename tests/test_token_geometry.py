"""sims.protocols.token_geometry: gainer kinds and Table 13 by hand, run and row records of
hand-built runs, the SFT's labels and classes, and the whole protocol on a small synthetic
vocabulary (Theorem 4's velocity against the first Euler step, prompts of y+'s class)."""

import jax.numpy as jnp
import numpy as np
import pytest

from sims.errors import InputError
from sims.protocols import token_geometry as tg

LABELS = tg.NEG_WORDS + tg.POS_WORDS
WORDS = [*LABELS, "cat", "dog", "tree"]  # a 12-token vocabulary: the label sets and 3 others


def test_gainer_kind_table():
    assert [tg.gainer_kind(w, "yes") for w in ("yes", "sure", "no", "tree")] == [
        "preferred",
        "benign",
        "catastrophic",
        "other",
    ]
    assert tg.gainer_kind("yes", "never") == "catastrophic"  # y+ from N: Y is the other set


def test_geometry_table13_by_hand():
    ids = {"yes": 0, "no": 1, "never": 2, "sure": 3}
    W0 = np.array([[2.0, 0.0], [1.0, 1.0], [1.0, -1.0], [0.0, 3.0]])
    W = 2 * W0  # every norm doubles, the inner products quadruple
    t = tg.geometry_table13(W0, W, ids)
    # yes>no: u = (1, -1), W+ = (2, 0): along W+ |u.W+| / |W+| = 1, orthogonal 1, <W+, W-> = 2
    assert t["yes>no"] == {
        "proj_norm": [1.0, 2.0],
        "orth_norm": [1.0, 2.0],
        "inner_pos_neg": [2.0, 8.0],
    }
    # no>never: u = (0, 2), W+ = (1, 1): along 2 / sqrt 2 = sqrt 2, orthogonal sqrt 2, inner 0
    np.testing.assert_allclose(t["no>never"]["proj_norm"], [np.sqrt(2), 2 * np.sqrt(2)], rtol=1e-15)
    np.testing.assert_allclose(t["no>never"]["orth_norm"], [np.sqrt(2), 2 * np.sqrt(2)], rtol=1e-15)
    assert t["no>never"]["inner_pos_neg"] == [0.0, 0.0]
    # sure>yes: u = (-2, 3), W+ = (0, 3): along 3, orthogonal 2, inner 0
    assert t["sure>yes"] == {
        "proj_norm": [3.0, 6.0],
        "orth_norm": [2.0, 4.0],
        "inner_pos_neg": [0.0, 0.0],
    }


def _probs(T, rows):
    """[T+1, 4] probabilities: ``rows`` {step: row} set, others the uniform 1/4."""
    p = np.full((T + 1, 4), 0.25)
    for t, row in rows.items():
        p[t:] = row  # held from step t on
    return p


def test_geometry_run_and_row_by_hand():
    words = ["yes", "sure", "no", "cat"]
    # pi(yes) 0.25 -> 0.7 at step 1 -> 0.1 at step 5 (largest decrease 0.6) -> "no" gains
    falls = _probs(100, {1: [0.7, 0.1, 0.1, 0.1], 5: [0.1, 0.1, 0.7, 0.1]})
    v = np.array([1.0, -1.0, -2.0, 0.5])  # predicted; gains pi_z(0) v_z: yes, cat, sure
    run_a = tg.geometry_run(3, falls, v, 2 * v, words, 0)
    assert run_a["decrease"] == pytest.approx(0.6) and run_a["prompt"] == 3
    assert run_a["gainers"][0][0] == "no"  # at step 5: no +0.45, the others -0.15
    assert run_a["predicted_gainers"] == ["yes", "cat", "sure"]
    assert run_a["velocity_rel_error"] == 1.0  # max |2v - v| = 2 over max |v| = 2
    rises = _probs(100, {1: [0.4, 0.3, 0.2, 0.1]})
    run_b = tg.geometry_run(4, rises, -v, v, words, 0)  # predicted sign wrong on yes
    row = tg.geometry_row([run_a, run_b], "yes")
    assert row["mean_decrease"] == pytest.approx(0.3)  # (0.6 + 0) / 2
    assert row["sign_agreement"] == 0.5
    # step 5: "no" is run a's top gainer and run b's third (yes +0.15, sure +0.05, no -0.05)
    assert row["gainers"]["5"]["no"] == [2, "catastrophic"]  # N is the other set of yes
    assert row["gainers"]["5"]["sure"][1] == "benign"
    assert row["predicted_gainers"]["yes"] == 1 and row["predicted_gainers"]["sure"] == 2


def test_label_set_features_sft_labels_by_class():
    rng = np.random.default_rng(0)
    W0 = jnp.asarray(rng.normal(size=(len(WORDS), 4)) / 2)
    ids = {w: i for i, w in enumerate(WORDS)}
    res = tg.label_set_features_sft(
        W0, ids, seed=0, num_prompts=6, hidden_scale=0.3, prompt_spread=0.3, dt=0.5, num_steps=40
    )
    probs = np.exp(np.asarray(res.final(jnp.arange(6))))  # [6, V] after SFT
    neg, pos = [ids[w] for w in tg.NEG_WORDS], [ids[w] for w in tg.POS_WORDS]
    # SFT moved each prompt's mass onto its class's label set: N for prompts 0-2, Y for 3-5
    assert np.all(probs[:3, neg].sum(1) > 0.5) and np.all(probs[3:, pos].sum(1) > 0.5)
    lp = np.asarray(res.observables)  # the trained labels' log-probs rise
    assert lp[-1].mean() > lp[0].mean()
    with pytest.raises(ValueError, match="num_prompts must be >= 2"):
        tg.label_set_features_sft(
            W0, ids, seed=0, num_prompts=1, hidden_scale=0.3, prompt_spread=0.3, dt=0.5, num_steps=1
        )
    with pytest.raises(ValueError, match="ids must hold every label word"):
        tg.label_set_features_sft(
            W0,
            {"no": 0},
            seed=0,
            num_prompts=2,
            hidden_scale=0.3,
            prompt_spread=0.3,
            dt=0.5,
            num_steps=1,
        )


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_geometry_protocol_first_step_follows_theorem_4():
    W0 = jnp.asarray(np.random.default_rng(1).normal(size=(len(WORDS), 4)) / 2)
    settings = tg.GeometrySettings(
        num_prompts=8, sft_steps=5, dpo_dt=1e-3, ipo_dt=1e-5, num_steps=100, num_runs=2
    )
    lines = []
    out = tg.geometry_protocol(W0, WORDS, settings, seed=0, log=lines.append)
    assert list(out["rows"]) == [
        f"{loss}:{p}>{n}" for loss in ("dpo", "ipo") for p, n in tg.TABLE1_PAIRS
    ]
    assert len(lines) == 6 and set(out["table13"]) == {"yes>no", "no>never", "sure>yes"}
    for key, row in out["rows"].items():
        y_pos = key.split(":")[1].split(">")[0]
        for r in row["runs"]:
            # prompts 0-3 accord with the trait (labels from N): a y+ from N runs on them
            assert (r["prompt"] < 4) == (y_pos in tg.NEG_WORDS), (key, r["prompt"])
            # the first Euler step is Theorems 4-5's velocity up to O(dt)
            assert r["velocity_rel_error"] < 1e-2, (key, r["velocity_rel_error"])
        assert row["sign_agreement"] == 1.0
    with pytest.raises(InputError, match="words must hold every label word"):
        tg.geometry_protocol(W0, ["cat"] * len(WORDS), settings, seed=0)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"num_prompts": 1}, "num_prompts must be an integer >= 2"),
        ({"num_runs": 0}, "num_runs must be an integer >= 1"),
        ({"tau": 0.0}, "tau must be > 0"),
        ({"prompt_spread": -0.1}, "prompt_spread must be >= 0"),
    ],
)
def test_geometry_settings_check(changes, match):
    with pytest.raises(InputError, match=match):
        tg.GeometrySettings(**changes).check()
