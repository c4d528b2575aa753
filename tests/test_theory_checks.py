"""sims.protocols.theory_checks against independent computations, in float64.

References: hand-derived values (errors, summaries, rankings), hand-written gradients and Euler
steps (NumPy, no autodiff) for the finite differences and the SFT step, separate unbatched runs
for the vmapped flows, brute-force enumeration for the edit distance, and the theorems' own
predictions (Theorem 8's sign) where the tool reports them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sims.analysis.scores import normalized_edit_distance
from sims.data.synthetic import synthetic_preferences
from sims.data.vocab import NO_SET, YES_SET
from sims.flows.core import preference_flow
from sims.models.prefix_tree import index_prefixes, restrict, with_reference
from sims.models.unconstrained import UnconstrainedFeatures
from sims.protocols.theory_checks import (
    SIMILARITY_SCORES,
    ExtraSampleInstance,
    SinglePairRun,
    VelocityCheck,
    error_summary,
    extra_sample_effect,
    extra_sample_instance,
    logprob_chosen_change,
    multi_token_instance,
    multi_token_velocity_check,
    no_over_never_model,
    no_over_never_record,
    no_over_never_summary,
    pair_similarity_scores,
    percentile_subset_changes,
    sft_on_label_sets,
    single_pair_run,
    single_token_instance,
    single_token_velocity_check,
    token_ranking,
    velocity_errors,
)
from theory import losses
from theory.single_token import displacement_terms

#: Closed form vs autodiff, both float64, same parameters: pure round-off.
RTOL_AUTODIFF = 1e-9
#: Central difference (flow time 1e-5) vs autodiff: truncation O(dt^2 |third derivative|).
RTOL_FINITE_DIFF = 1e-7
#: vmapped vs separately run float64 flows: same operations, summation order may differ by ulps.
RTOL_VMAP = 1e-12
#: One Euler step of 1e-7 vs the instantaneous rate: truncation (dt/2)|d2/dt2 ln pi| with O(1)
#: parameters, plus round-off eps/dt ~ 1e-9.
RTOL_PROBE = 1e-5
DPO = losses.make_loss("dpo", beta=0.5)


# --- single-token instances and the velocity check ----------------------------------------------


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_single_token_instance_pair_is_distinct_and_rows_have_the_drawn_scale():
    keys = jax.random.split(jax.random.key(0), 400)
    draw = jax.vmap(
        lambda k: single_token_instance(k, vocab_size=5, hidden_size=512, scales=(2.0,))
    )
    inst = draw(keys)
    y_pos, y_neg = np.asarray(inst.y_pos), np.asarray(inst.y_neg)
    assert np.all(y_pos != y_neg) and y_pos.min() >= 0 and y_pos.max() < 5
    # rows other than y- are N(0, s^2/d): E|W_z|^2 = s^2 = 4 (hand-derived); 6 standard errors
    W = np.asarray(inst.W)
    other = (y_pos + 1 + (y_pos + 1 == y_neg)) % 5  # a row that is neither y+ nor y-
    sq = np.sum(W[np.arange(400), other] ** 2, axis=1)
    np.testing.assert_allclose(sq.mean(), 4.0, atol=6 * sq.std() / np.sqrt(400))


def _dpo_logprobs_step(W, h, y_pos, y_neg, ref, loss_sign, dt):
    """One explicit Euler step of DPO (beta 0.5) on (W, h) by a hand-written gradient: the
    log-probs after the step."""
    beta = 0.5
    z = W @ h
    p = np.exp(z - z.max())
    p /= p.sum()
    margin = (np.log(p[y_pos]) - ref[0]) - (np.log(p[y_neg]) - ref[1])
    ell_prime = -beta / (1 + np.exp(beta * margin))  # d/du of -log sigmoid(beta u)
    e = np.zeros_like(p)
    e[y_pos], e[y_neg] = 1.0, -1.0
    g_logits = ell_prime * e  # dL/dz = l' (d lp+/dz - d lp-/dz); d lp_y/dz = e_y - p
    W1 = W - loss_sign * dt * np.outer(g_logits, h)
    h1 = h - loss_sign * dt * (W.T @ g_logits)
    z1 = W1 @ h1
    return z1 - z1.max() - np.log(np.sum(np.exp(z1 - z1.max())))


def test_single_token_velocity_check_agrees_with_hand_gradients():
    keys = jax.random.split(jax.random.key(1), 32)
    chk = single_token_velocity_check(
        keys, loss=DPO, vocab_size=7, hidden_size=3, scales=(0.5, 1.5), fd_step=1e-5
    )
    assert isinstance(chk, VelocityCheck) and chk.closed_form.shape == (32, 7)
    scale = np.max(np.abs(chk.autodiff), axis=1)
    np.testing.assert_allclose(
        chk.closed_form, chk.autodiff, rtol=RTOL_AUTODIFF, atol=1e-12 * scale.max()
    )
    np.testing.assert_allclose(
        chk.finite_difference, chk.autodiff, rtol=RTOL_FINITE_DIFF, atol=1e-9 * scale.max()
    )
    # the finite difference column, recomputed from a hand-written Euler step for one instance
    i = 5
    W, h, y_pos, y_neg, ref = (
        np.asarray(a)
        for a in single_token_instance(keys[i], vocab_size=7, hidden_size=3, scales=(0.5, 1.5))
    )
    fwd = _dpo_logprobs_step(W, h, int(y_pos), int(y_neg), ref, 1.0, 1e-5)
    bwd = _dpo_logprobs_step(W, h, int(y_pos), int(y_neg), ref, -1.0, 1e-5)
    np.testing.assert_allclose(
        chk.finite_difference[i], (fwd - bwd) / 2e-5, rtol=1e-6, atol=1e-9 * scale[i]
    )
    assert (chk.y_pos[i], chk.y_neg[i]) == (y_pos, y_neg)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocab_size": 1}, "vocab_size must be an integer >= 2"),
        ({"hidden_size": 0}, "hidden_size must be an integer >= 1"),
        ({"scales": ()}, "scales must hold at least one scale"),
        ({"scales": (1.0, -1.0)}, "scales must be > 0 and finite"),
        ({"fd_step": 0.0}, "fd_step must be > 0 and finite"),
    ],
)
def test_single_token_velocity_check_rejects_bad_input(kwargs, match):
    args = dict(loss=DPO, vocab_size=3, hidden_size=2, scales=(1.0,), fd_step=1e-5) | kwargs
    with pytest.raises(ValueError, match=match):
        single_token_velocity_check(jax.random.split(jax.random.key(0), 2), **args)


def test_velocity_errors_hand_values():
    closed = np.array([[1.0, -2.0, 0.5], [4.0, 1.0, -1.0]])
    auto = np.array([[1.0, -2.0, 0.4], [4.0, 1.0, -1.0]])
    fd = np.array([[1.1, -2.0, -0.5], [4.0, 1.0, -1.0]])
    e = velocity_errors(VelocityCheck(closed, auto, fd, np.array([1, 0]), np.array([0, 2])))
    assert e.instances == 2
    # instance 0: max|c - a| / max|a| = 0.1 / 2; instance 1 exact
    np.testing.assert_allclose(e.max_rel_err_autodiff, 0.05, rtol=1e-12)
    # instance 0 vs fd: max|c - fd| = 1.0 (last entry), on the autodiff scale 2
    np.testing.assert_allclose(e.max_rel_err_fd, 0.5, rtol=1e-12)
    assert e.sign_agreement_autodiff == 1.0
    assert e.sign_agreement_fd == pytest.approx(5 / 6)  # one of six resolved entries flips
    assert e.displacing_instances == 1  # auto[0, y_pos=1] = -2 < 0; auto[1, 0] = 4 > 0


def test_velocity_errors_leaves_unresolved_signs_out():
    closed = np.array([[1.0, -1e-12]])
    auto = np.array([[1.0, 1e-12]])  # below 1e-6 x max|a|: not resolved
    e = velocity_errors(VelocityCheck(closed, auto, auto, np.array([0]), np.array([1])))
    assert e.sign_agreement_autodiff == 1.0 and e.sign_agreement_fd == 1.0


# --- multi-token instances and the check --------------------------------------------------------


@pytest.mark.parametrize("shared", [0, 1, 2])
def test_multi_token_instance_shares_prefix_and_z_as_asked(shared):
    rng = np.random.default_rng(shared)
    for _ in range(20):
        z_fresh = shared == 0
        inst = multi_token_instance(
            rng,
            vocab_size=5,
            hidden_size=2,
            chosen_length=4,
            rejected_length=3,
            shared=shared,
            z_length=3,
            z_fresh=z_fresh,
        )
        c, r, z = (np.asarray(a)[0] for a in (inst.pairs.chosen, inst.pairs.rejected, inst.z))
        assert np.array_equal(c[:shared], r[:shared]) and c[shared] != r[shared]
        if z_fresh:
            assert z[0] not in (c[0], r[0])
        else:
            assert np.array_equal(z[:2], c[:2])  # min(L+, L_z - 1) = 2 tokens of y+
        # z's prefix rows: the prompt row, then the row of (prompt, z_1) ...
        assert int(inst.z_rows[0, 0]) == int(inst.pairs.chosen_prefix[0, 0])


def test_multi_token_instance_rejects_bad_lengths():
    rng = np.random.default_rng(0)
    kw = dict(vocab_size=5, hidden_size=2, chosen_length=2, rejected_length=3, z_length=2)
    with pytest.raises(ValueError, match="shared must be in"):
        multi_token_instance(rng, **kw, shared=2, z_fresh=False)
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 3"):
        multi_token_instance(rng, **(kw | {"vocab_size": 2}), shared=0, z_fresh=True)


def _sequence_logprob(W, H, tokens, rows):
    """Hand-written ln pi(y|x) = sum_k log softmax(W h_{row_k})[y_k] (NumPy)."""
    z = H[rows] @ W.T
    z = z - z.max(axis=1, keepdims=True)
    lsm = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(np.sum(lsm[np.arange(len(tokens)), tokens]))


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_multi_token_velocity_check_matches_a_hand_central_difference():
    rng = np.random.default_rng(7)
    insts = [
        multi_token_instance(
            rng,
            vocab_size=6,
            hidden_size=3,
            chosen_length=3,
            rejected_length=2,
            shared=0,
            z_length=2,
            z_fresh=True,
        )
        for _ in range(4)
    ]
    out = multi_token_velocity_check(insts, {"dpo": DPO}, z_fresh=True)
    assert set(out) == {("dpo", "y_pos"), ("dpo", "z_general"), ("dpo", "z_theorem7")}
    for got, want in out.values():
        np.testing.assert_allclose(got, want, rtol=RTOL_AUTODIFF, atol=1e-12 * np.abs(want).max())
    # d/dt ln pi(y+) of instance 0 by a central difference of theta -+ delta grad L, with grad L
    # by central differences of the loss itself (no autodiff, no library code)
    inst = insts[0]
    W, H = np.asarray(inst.model.unembedding[...]), np.asarray(inst.model.hidden[...])
    p = inst.pairs
    c, rc = np.asarray(p.chosen[0]), np.asarray(p.chosen_prefix[0])
    r, rr = np.asarray(p.rejected[0]), np.asarray(p.rejected_prefix[0])
    ref_c, ref_r = float(p.ref_logprob_chosen[0]), float(p.ref_logprob_rejected[0])

    def loss(theta):
        Wt, Ht = theta[: W.size].reshape(W.shape), theta[W.size :].reshape(H.shape)
        u = _sequence_logprob(Wt, Ht, c, rc) - ref_c - _sequence_logprob(Wt, Ht, r, rr) + ref_r
        return np.log1p(np.exp(-0.5 * u))  # DPO, beta 0.5

    theta = np.concatenate([W.ravel(), H.ravel()])
    eps = 1e-6
    grad = np.array(
        [(loss(theta + eps * e) - loss(theta - eps * e)) / (2 * eps) for e in np.eye(theta.size)]
    )

    def lp(theta):
        return _sequence_logprob(
            theta[: W.size].reshape(W.shape), theta[W.size :].reshape(H.shape), c, rc
        )

    step = 1e-5
    fd = (lp(theta - step * grad) - lp(theta + step * grad)) / (2 * step)
    np.testing.assert_allclose(out[("dpo", "y_pos")][1][0], fd, rtol=1e-6)


def test_multi_token_velocity_check_rejects_mixed_shapes():
    rng = np.random.default_rng(0)
    kw = dict(vocab_size=5, hidden_size=2, rejected_length=2, shared=0, z_length=2, z_fresh=True)
    a = multi_token_instance(rng, chosen_length=2, **kw)
    b = multi_token_instance(rng, chosen_length=3, **kw)
    with pytest.raises(ValueError, match="instances must share one shape"):
        multi_token_velocity_check([a, b], {"dpo": DPO}, z_fresh=True)
    with pytest.raises(ValueError, match="instances must hold at least one"):
        multi_token_velocity_check([], {"dpo": DPO}, z_fresh=True)


def test_error_summary_hand_values():
    s = error_summary([1.0, 2.2, 0.0, -3.0], [1.0, 2.0, 0.0, -2.0], ["a", "b", "c", "d"])
    # pointwise: 0, 0.2/2 = 0.1, 0 (floor keeps it finite), 1/2 = 0.5; median of {0, 0, .1, .5}
    assert s.count == 4 and s.worst_case == "d"
    np.testing.assert_allclose([s.max_rel_error, s.median_rel_error], [0.5, 0.05], rtol=1e-12)
    with pytest.raises(ValueError, match="must be non-empty and of one length"):
        error_summary([1.0], [1.0, 2.0], ["a"])


# --- flows of several runs ----------------------------------------------------------------------


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_logprob_chosen_change_equals_separate_runs():
    models = [UnconstrainedFeatures(5, 2, 3, rngs=nnx.Rngs(i), dtype=jnp.float64) for i in range(3)]
    pairs = index_prefixes([0, 1], [[1, 2], [3]], [[2], [4]])[0]
    data = [with_reference(m, pairs) for m in models]
    got = logprob_chosen_change(models, data, DPO, dt=0.3, num_steps=4)
    assert got.logprob_chosen.shape == (3, 2) and got.loss.shape == (3,)
    for r, (m, d) in enumerate(zip(models, data, strict=True)):
        res = preference_flow(m, d, DPO, dt=0.3, num_steps=4, record_every=4).run()
        lp = np.asarray(res.observables.logprob_chosen)
        np.testing.assert_allclose(got.logprob_chosen[r], lp[-1] - lp[0], rtol=RTOL_VMAP)
        np.testing.assert_allclose(got.loss[r], res.loss[-1] - res.loss[0], rtol=RTOL_VMAP)
    with pytest.raises(ValueError, match="non-empty and of one length"):
        logprob_chosen_change(models, data[:2], DPO, dt=0.3, num_steps=4)


def test_sft_on_label_sets_one_step_is_the_hand_gradient_step():
    model = UnconstrainedFeatures(4, 3, 2, rngs=nnx.Rngs(0), dtype=jnp.float64)
    W, H = np.asarray(model.unembedding[...]), np.asarray(model.hidden[...])
    sets = [[0, 1, 3], [2]]
    out = sft_on_label_sets(model, sets, dt=0.7, num_steps=1)
    # L = -(1/N) sum log softmax(W h_p)[y]; dL/dz_p = (p - e_y)/N per example
    examples = [(p, y) for p, s in enumerate(sets) for y in s]
    gW, gH = np.zeros_like(W), np.zeros_like(H)
    for p, y in examples:
        z = W @ H[p]
        q = np.exp(z - z.max())
        q /= q.sum()
        q[y] -= 1.0
        gW += np.outer(q, H[p]) / len(examples)
        gH[p] += W.T @ q / len(examples)
    np.testing.assert_allclose(out.unembedding[...], W - 0.7 * gW, rtol=1e-12)
    np.testing.assert_allclose(out.hidden[...], H - 0.7 * gH, rtol=1e-12)
    with pytest.raises(ValueError, match="label_sets must be non-empty"):
        sft_on_label_sets(model, [[0], []], dt=0.7, num_steps=1)


# --- one single-token pair: Theorems 4-5 ----------------------------------------------------------


def test_single_pair_run_probe_matches_the_closed_form_and_starts_at_the_model():
    model = UnconstrainedFeatures(6, 4, 2, rngs=nnx.Rngs(3), dtype=jnp.float64)
    run = single_pair_run(
        model, DPO, prompt=1, y_pos=2, y_neg=4, dt=0.1, num_steps=6, record_every=3, probe_dt=1e-7
    )
    assert run.logprobs.shape == (3, 6)
    np.testing.assert_allclose(run.t, [0.0, 0.3, 0.6], rtol=1e-12)
    z = np.asarray(model.unembedding[...]) @ np.asarray(model.hidden[...])[1]
    np.testing.assert_allclose(run.logprobs[0], z - np.log(np.sum(np.exp(z))), rtol=1e-12)
    scale = float(np.max(np.abs(run.predicted_velocity)))
    np.testing.assert_allclose(
        run.probed_velocity, run.predicted_velocity, rtol=RTOL_PROBE, atol=RTOL_PROBE * scale
    )
    # at t = 0 the margin equals the reference margin: l' = -beta sigma(0) = -0.25 (DPO, beta 0.5)
    terms = displacement_terms(model.unembedding[...], model.hidden[...][1], 2, 4)
    np.testing.assert_allclose(run.predicted_velocity[2], 0.25 * (terms.m + terms.S), rtol=1e-12)


def _hand_run(logprobs, alignment):
    V = logprobs.shape[1]
    terms = displacement_terms(jnp.eye(V, 2), jnp.ones(2), 0, 1)._replace(
        token_alignment=jnp.asarray(alignment)
    )
    return SinglePairRun(
        t=np.arange(len(logprobs)),
        loss=np.zeros(len(logprobs)),
        logprobs=np.asarray(logprobs),
        predicted_velocity=np.zeros(V),
        probed_velocity=np.arange(V, dtype=float),
        terms=terms,
    )


def test_token_ranking_hand_values():
    logprobs = np.log(
        np.array([[0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    )
    run = _hand_run(logprobs, [9.0, 8.0, 3.0, -1.0])
    rank = token_ranking(run, y_pos=1, y_neg=0, early=1)
    assert rank.others.tolist() == [2, 3]
    np.testing.assert_allclose(rank.alignment, [3.0, -1.0])
    np.testing.assert_allclose(rank.instant, [2.0, 3.0])
    np.testing.assert_allclose(rank.early, np.log([0.3 / 0.25, 0.4 / 0.25]), rtol=1e-12)
    np.testing.assert_allclose(rank.final, np.log([0.2 / 0.25, 0.1 / 0.25]), rtol=1e-12)
    with pytest.raises(ValueError, match="early must be a checkpoint index"):
        token_ranking(run, y_pos=1, y_neg=0, early=3)


# --- Table 1 in the theory model ----------------------------------------------------------------

SMALL_SFT = dict(hidden_size=16, concept_scale=3.0, num_filler=4, prompts=4, sft_dt=0.5)


def test_no_over_never_model_sft_moves_mass_onto_each_prompts_label_set():
    key = jax.random.key(0)
    before, tokens = no_over_never_model(key, geometry="catastrophic", **SMALL_SFT, sft_steps=1)
    after, _ = no_over_never_model(key, geometry="catastrophic", **SMALL_SFT, sft_steps=200)
    ids = {t: i for i, t in enumerate(tokens)}
    no, yes = [ids[t] for t in NO_SET], [ids[t] for t in YES_SET]
    p_before, p_after = (np.exp(np.asarray(m(jnp.arange(4)))) for m in (before, after))
    # trait prompts (first half) learn the No set, the others the Yes set
    assert np.all(p_after[:2, no].sum(1) > 0.9) and np.all(p_after[2:, yes].sum(1) > 0.9)
    assert np.all(p_after[:2, no].sum(1) > p_before[:2, no].sum(1))
    with pytest.raises(ValueError, match="prompts must be an integer >= 2"):
        no_over_never_model(key, geometry="none", **(SMALL_SFT | {"prompts": 1}), sft_steps=1)


def test_no_over_never_record_is_consistent_with_its_trajectory():
    model, tokens = no_over_never_model(
        jax.random.key(1), geometry="catastrophic", **SMALL_SFT, sft_steps=20
    )
    rec = no_over_never_record(
        model, tokens, DPO, dt=0.2, num_steps=40, record_every=10, probe_dt=1e-6, top_k=3
    )
    p_no = np.asarray(rec["p_no"])
    assert p_no.shape == (5,) and rec["no_change"] == pytest.approx(p_no[-1] - p_no[0])
    assert rec["no_decrease_max"] >= max(0.0, -rec["no_change"]) - 1e-15
    assert set(rec["theorem5_alignment"]) == set(tokens) - {"No", "Never"}
    # 4 checkpoints: 5% and 25% of the run both round to checkpoint 1 (t = 2), 100% is t = 8
    assert list(rec["top_gainers"]) == ["t=2", "t=8"]
    assert all(len(g) == 3 for g in rec["top_gainers"].values())
    assert np.sign(rec["theorem4_velocity_no"]) == np.sign(rec["observed_velocity_no"])
    with pytest.raises(ValueError, match="tokens must name 'No' and 'Never'"):
        no_over_never_record(
            model,
            ["a"] * len(tokens),
            DPO,
            dt=0.2,
            num_steps=4,
            record_every=2,
            probe_dt=1e-6,
            top_k=1,
        )


def test_no_over_never_summary_hand_values():
    def rec(change, t4, obs, rho):
        return {
            "no_change": change,
            "no_decrease_max": abs(change),
            "theorem4_velocity_no": t4,
            "observed_velocity_no": obs,
            "p_catastrophic": [0.1, 0.5, 0.3],
            "p_benign": [0.2, 0.2, 0.4],
            "spearman_alignment_vs_instant": rho,
            "spearman_alignment_vs_early": rho,
            "spearman_alignment_vs_final": None,
        }

    s = no_over_never_summary([rec(-0.2, -1.0, -2.0, 1.0), rec(0.1, 1.0, -1.0, 0.5)])
    assert s["runs"] == 2 and s["runs_with_no_falling"] == 1 and s["theorem4_sign_matches"] == 1
    assert s["mean_no_decrease_max"] == pytest.approx(0.15)
    assert s["mean_catastrophic_gain"] == pytest.approx(0.2)  # 0.3 - 0.1
    assert s["mean_catastrophic_peak_gain"] == pytest.approx(0.4)  # 0.5 - 0.1
    assert s["mean_benign_gain"] == pytest.approx(0.2)
    assert s["mean_spearman_alignment_vs_instant"] == pytest.approx(0.75)
    assert s["mean_spearman_alignment_vs_final"] is None
    with pytest.raises(ValueError, match="records must hold at least one"):
        no_over_never_summary([])


# --- one extra sample: Theorem 8 -----------------------------------------------------------------


def test_extra_sample_instance_kinds():
    rng = np.random.default_rng(0)
    for _ in range(50):
        c = extra_sample_instance(rng, vocab_size=6, hidden_size=3, contradicting=True)
        assert c.rejected[1] == c.chosen[0] and c.chosen[1] != c.chosen[0]
        n = extra_sample_instance(rng, vocab_size=6, hidden_size=3, contradicting=False)
        assert n.chosen[0] not in (n.chosen[1], n.rejected[1])
        z = n.W @ n.H[0]  # Theorem 8's non-contradicting case: pi(y~-|x) < pi(y~+|x)
        assert z[n.rejected[1]] < z[n.chosen[1]]
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 4"):
        extra_sample_instance(rng, vocab_size=3, hidden_size=2, contradicting=True)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_extra_sample_effect_predicted_term_matches_the_flow_and_theorem8_sign():
    rng = np.random.default_rng(1)
    insts = [
        extra_sample_instance(rng, vocab_size=5, hidden_size=4, contradicting=True)
        for _ in range(6)
    ]
    e = extra_sample_effect(insts, DPO, dt_rate=1e-7, steps_rate=1, dt=0.05, num_steps=1)
    scale = np.max(np.abs(e.predicted_velocity_with_extra))
    np.testing.assert_allclose(
        e.simulated_extra_term, e.predicted_extra_term, rtol=RTOL_PROBE, atol=RTOL_PROBE * scale
    )
    # Theorem 8, contradicting: the term is alpha <h_x, h_x~> (-l~')/N with alpha < 0
    inner = np.array([i.H[0] @ i.H[1] for i in insts])
    assert np.all(np.sign(e.predicted_extra_term[inner > 0]) == -1) and np.sum(inner > 0) >= 3
    with pytest.raises(ValueError, match="instances must hold at least one"):
        extra_sample_effect([], DPO, dt_rate=1e-7, steps_rate=1, dt=0.05, num_steps=4)
    assert isinstance(insts[0], ExtraSampleInstance)


# --- Figure 2 in the theory model -----------------------------------------------------------------


def test_pair_similarity_scores_against_hand_sums():
    data = synthetic_preferences(jax.random.key(0), num_pairs=6, vocab_size=8, max_len=3)
    pairs = with_reference(data.model, data.pairs)
    s = pair_similarity_scores(data, pairs)
    assert tuple(s) == SIMILARITY_SCORES
    hidden = np.asarray(data.model.hidden[...])
    for i, (c, r) in enumerate(zip(data.chosen_tokens, data.rejected_tokens, strict=True)):
        assert s["neg_edit_distance"][i] == -normalized_edit_distance(c, r)
        dot = float(np.dot(data.last_hidden_chosen[i], data.last_hidden_rejected[i]))
        assert s["last_hidden_inner_product"][i] == pytest.approx(dot, rel=1e-12)
        # Definition 2: <H+, H- - H+>, H the sum of the hidden rows of a response's prefixes
        rows = [
            np.asarray(p)[i][np.asarray(m)[i]]
            for p, m in (
                (pairs.chosen_prefix, pairs.chosen_mask),
                (pairs.rejected_prefix, pairs.rejected_mask),
            )
        ]
        h_pos, h_neg = (hidden[x].sum(0) for x in rows)
        assert s["ches"][i] == pytest.approx(h_pos @ (h_neg - h_pos), rel=1e-10)
        # Definition 3: the same with mean instead of summed rows
        m_pos, m_neg = h_pos / len(rows[0]), h_neg / len(rows[1])
        assert s["ches_length_normalized"][i] == pytest.approx(m_pos @ (m_neg - m_pos), rel=1e-10)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_percentile_subset_changes_equal_separate_subset_runs():
    data = synthetic_preferences(jax.random.key(1), num_pairs=20, vocab_size=8, max_len=3)
    pairs = with_reference(data.model, data.pairs)
    scores = {"a": np.arange(20.0), "b": -np.arange(20.0)}
    P = 2 * 4 * 4
    got = percentile_subset_changes(
        data.model,
        pairs,
        scores,
        DPO,
        percentiles=(0, 100),
        subset_size=4,
        num_prefixes=P,
        dt=0.5,
        num_steps=3,
    )
    assert got.logprob_chosen.shape == (2, 2)
    # score "a" at percentile 0 is the 4 lowest-scored pairs 0..3; "b" at 100 the same pairs
    np.testing.assert_allclose(got.mean_score[0, 0], 1.5)
    np.testing.assert_allclose(got.mean_score[1, 1], -1.5)
    model, sub = restrict(data.model, pairs, np.arange(4), num_prefixes=P)
    res = preference_flow(model, sub, DPO, dt=0.5, num_steps=3, record_every=3).run()
    lp = np.asarray(res.observables.logprob_chosen)
    np.testing.assert_allclose(got.logprob_chosen[0, 0], np.mean(lp[-1] - lp[0]), rtol=RTOL_VMAP)
    np.testing.assert_allclose(got.logprob_chosen[1, 1], got.logprob_chosen[0, 0], rtol=RTOL_VMAP)
    np.testing.assert_allclose(got.loss[0, 0], res.loss[-1] - res.loss[0], rtol=RTOL_VMAP)
