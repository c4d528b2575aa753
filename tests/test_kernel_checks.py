"""sims.protocols.kernel_checks: the comparison table by hand, the truth of a check table against
central finite differences, the kernel form's exactness and the controls' failure, pooling and
the pre-registered verdict; the free-h velocity of transformer answers against autodiff on (W, h)
and its truth against finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sims.data import corpus
from sims.models.transformer import make_transformer_pairs
from sims.protocols import kernel_checks as kc
from sims.protocols.toy_transformer import PretrainSettings, pretrained_transformer, trait_prompts
from theory.losses import make_loss

#: autodiff vs central difference, step 1e-5 (style table).
RTOL_FD = 1e-7
#: Absolute part, relative to max_z |velocity| (the normalised truth has max 1): round-off of
#: the difference quotient, eps_mach * |ln pi| / 1e-5 ~ 1e-10, over velocities of order 1e-2.
ATOL_FD = 1e-8
#: autodiff vs autodiff of the same float64 quantities in another order (style table).
RTOL_AUTODIFF = 1e-9
BETA = 0.1


def test_compare_velocities_by_hand():
    pred = np.array([[2.0, -1.0, 0.001, 0.5], [1.0, 1.0, -1.0, 1.0]])
    truth = np.array([[1.0, -2.0, -0.001, -0.5], [1.0, -1.0, -1.0, 1.0]])
    t = kc.compare_velocities(pred, truth, [0, 3], sign_tol=0.01)
    assert t["rel_err"] == [0.5, 2.0]  # row 0: max |diff| 1 over max |truth| 2; row 1: 2 over 1
    # row 0: clear entries 0, 1, 3 (|-0.001| <= 0.01 * 2), signs right at 0, 1; row 1: all 4,
    # right at 0, 2, 3
    assert (t["sign_agree_clear"], t["sign_clear"]) == (2 + 3, 3 + 4)
    # gains over y+: row 0 pred [0, -3, -1.999, -1.5], truth [0, -3, -1.001, -1.5] (entry 0 is
    # not clear: 0); row 1 (y+ = 3) pred [0, 0, -2, 0], truth [0, -2, -2, 0]
    assert (t["gain_agree_clear"], t["gain_clear"]) == (3 + 1, 3 + 2)
    assert t["sign_agree_all_tokens"] == 5 / 8
    assert t["correlation"][0] == pytest.approx(np.corrcoef(pred[0], truth[0])[0, 1])


def test_compare_velocities_rejects_bad_input():
    with pytest.raises(ValueError, match="pred and truth must have one shape"):
        kc.compare_velocities(np.ones((2, 3)), np.ones((2, 4)), [0, 0], sign_tol=0.1)
    with pytest.raises(ValueError, match="sign_tol must be >= 0"):
        kc.compare_velocities(np.ones(3), np.ones(3), 0, sign_tol=-1.0)


def test_mlp_instance_pairs_always_differ():
    inst = kc.mlp_instance(
        np.random.default_rng(0), 0, vocab=3, features=2, hidden=3, width=4, prompts=1000
    )
    assert np.all(np.asarray(inst.y_pos) != np.asarray(inst.y_neg))
    assert set(np.asarray(inst.y_neg).tolist()) == {0, 1, 2}  # every token can be rejected
    with pytest.raises(ValueError, match="vocab must be >= 2"):
        kc.mlp_instance(
            np.random.default_rng(0), 0, vocab=1, features=2, hidden=3, width=4, prompts=1
        )


def _fd_velocity(model, hidden_fn, x, y_pos, y_neg):
    """Central difference of ln pi(.|x_i) along -grad L at t = 0 (reference = the model), for
    the mean DPO loss over the given pairs: ``[N, V]``."""
    loss = make_loss("dpo", beta=BETA)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def logprobs(p):
        m = nnx.merge(graphdef, p, rest)
        h = jax.vmap(lambda xi: hidden_fn(m, xi))(x)  # [N, d]
        return jax.nn.log_softmax(h @ m.unembedding_matrix().T, axis=-1)

    rows = jnp.arange(len(y_pos))
    ref = logprobs(params)

    def loss_fn(p):
        lp = logprobs(p)
        per_pair = loss(lp[rows, y_pos], lp[rows, y_neg], ref[rows, y_pos], ref[rows, y_neg])
        return jnp.mean(per_pair)

    g = jax.grad(loss_fn)(params)
    eps = 1e-5 / jnp.sqrt(sum(jnp.sum(v * v) for v in jax.tree.leaves(g)))  # step length 1e-5

    def at(s):
        return logprobs(jax.tree.map(lambda p, d: p - s * d, params, g))

    return np.asarray((at(eps) - at(-eps)) / (2 * eps))


def _normalised(v):
    return v / np.max(np.abs(v), axis=-1, keepdims=True)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_kernel_form_check_on_mlp_features_is_exact_and_its_truth_is_the_flow():
    inst = kc.mlp_instance(
        np.random.default_rng(1), 1, vocab=7, features=3, hidden=4, width=5, prompts=3
    )
    args = (inst.model, kc.mlp_hidden, inst.x, inst.y_pos, inst.y_neg)
    out = kc.kernel_form_check(*args, beta=BETA, sign_tol=1e-6)
    joint = kc.kernel_form_check(*args, beta=BETA, sign_tol=1e-6, joint=True)
    for r in range(3):  # per-prompt runs: the loss of pair r alone
        sl = slice(r, r + 1)
        fd = _fd_velocity(inst.model, kc.mlp_hidden, inst.x[sl], inst.y_pos[sl], inst.y_neg[sl])
        np.testing.assert_allclose(
            out["truth"][r], _normalised(fd)[0], rtol=RTOL_FD, atol=ATOL_FD, err_msg=f"prompt {r}"
        )
    fd = _fd_velocity(inst.model, kc.mlp_hidden, inst.x, inst.y_pos, inst.y_neg)
    np.testing.assert_allclose(joint["truth"], _normalised(fd), rtol=RTOL_FD, atol=ATOL_FD)
    for table in (out, joint):
        assert max(table["kernel"]["rel_err"]) <= kc.MAX_REL_ERR
        assert max(table["free_h"]["rel_err"]) > 1e-3  # the control: h is not free here
        np.testing.assert_allclose(table["points_kernel"], table["truth"], atol=kc.MAX_REL_ERR)
    assert out["lambda_eff_pair"].shape == (3,) and "lambda_eff_pair" not in joint


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_kernel_form_check_tied_transformer_needs_the_cross_terms():
    model = _tiny_transformer(True)
    prompt = corpus.encode(corpus.persona_prompt("lying", "fine"))
    tokens = jnp.asarray([prompt, corpus.encode(corpus.persona_prompt("bribery", "good"))])
    y_pos, y_neg = jnp.full(2, corpus.INDEX["no"]), jnp.full(2, corpus.INDEX["never"])
    sets = [[corpus.INDEX[w] for w in corpus.NEG_ANSWERS], [corpus.INDEX["yes"]]]
    out = kc.kernel_form_check(
        model,
        kc.answer_hidden,
        tokens,
        y_pos,
        y_neg,
        beta=BETA,
        sign_tol=1e-6,
        tied=True,
        sets=sets,
    )
    assert max(out["kernel"]["rel_err"]) <= kc.MAX_REL_ERR
    assert max(out["kernel_no_cross"]["rel_err"]) > 1e-4  # tying adds terms: the control fails
    assert out["lambda_eff_sets"].shape == (2,)
    summary = kc.check_summary({"transformer_tied": [out]})
    assert list(summary) == [f"transformer_tied/{f}" for f in kc.FORMS]
    assert kc.kernel_verdict(summary) == "reproduced"


def test_check_summary_pools_and_verdict_applies_the_criterion():
    def table(err, agree, clear, corr):
        return {
            "rel_err": err,
            "sign_agree_clear": agree,
            "sign_clear": clear,
            "gain_agree_clear": agree,
            "gain_clear": clear,
            "sign_agree_all_tokens": agree / clear,
            "correlation": corr,
        }

    families = {
        "a": [{"kernel": table([1e-16], 3, 4, [None])}, {"kernel": table([2e-9], 4, 4, [0.5])}]
    }
    s = kc.check_summary(families)["a/kernel"]
    assert (s["max_rel_err"], s["sign_agree_clear"], s["sign_clear"]) == (2e-9, 7, 8)
    assert s["sign_agree_all_tokens"] == pytest.approx((0.75 + 1.0) / 2)
    assert (s["min_correlation"], s["mean_correlation"]) == (0.5, 0.5)  # None left out
    assert kc.kernel_verdict({"a/kernel": s}) == "not reproduced"  # a clear sign is wrong
    ok = table([1e-9], 4, 4, [None])
    assert kc.kernel_verdict(kc.check_summary({"b": [{"kernel": ok}]})) == "reproduced"
    big = table([2e-8], 4, 4, [None])  # above MAX_REL_ERR = 1e-8
    assert kc.kernel_verdict(kc.check_summary({"b": [{"kernel": big}]})) == "not reproduced"
    none = kc.check_summary({"b": [{"kernel": ok}]})["b/kernel"]
    assert none["min_correlation"] is None and none["mean_correlation"] is None


def _tiny_transformer(tied):
    settings = PretrainSettings(d_model=8, num_layers=1, num_heads=2, pretrain_steps=0)
    return pretrained_transformer(0, settings, tied=tied, dtype=jnp.float64).model


def _answer_pairs(model, num=3, answers=("no", "never")):
    prompts = trait_prompts(np.random.default_rng(0), num)
    chosen = corpus.pack(prompts, [[answers[0]]] * num)
    rejected = corpus.pack(prompts, [[answers[1]]] * num)
    return make_transformer_pairs(model, chosen, rejected), len(prompts[0])


def _hidden_flow_velocity(W, h, y_pos, y_neg, loss, ref):
    """d/dt ln pi along -grad L when only W and h move (unconstrained features), by autodiff."""

    def logprobs(params):
        return jax.nn.log_softmax(params[0] @ params[1])

    def loss_fn(params):
        lp = logprobs(params)
        return loss(lp[y_pos], lp[y_neg], *ref)

    g = jax.grad(loss_fn)((W, h))
    return jax.jvp(logprobs, ((W, h),), (jax.tree.map(lambda x: -x, g),))[1]


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
@pytest.mark.parametrize("tied", [True, False])
def test_answer_velocities_match_autodiff_and_finite_differences(tied):
    model = _tiny_transformer(tied)
    pairs, P = _answer_pairs(model, num=2)
    loss = make_loss("dpo", beta=0.1)
    got = kc.answer_velocities(model, loss, pairs, prompt_len=P)
    pos, neg = corpus.INDEX["no"], corpus.INDEX["never"]
    W = model.unembedding_matrix()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def logprobs(p, tokens):  # [V] ln pi(.|x) at the answer position, all parameters free
        return jax.nn.log_softmax(nnx.merge(graphdef, p, rest)(tokens)[P - 1])

    @jax.jit
    def fd_velocity(tokens, ref):
        def loss_fn(p):
            lp = logprobs(p, tokens)
            return loss(lp[pos], lp[neg], *ref)

        g = jax.grad(loss_fn)(params)
        eps = 1e-5 / jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))  # step length 1e-5

        def at(s):
            return logprobs(jax.tree.map(lambda p, d: p - s * d, params, g), tokens)

        return (at(eps) - at(-eps)) / (2 * eps)  # central difference along -grad L

    for r in range(2):
        tokens = jnp.asarray(pairs.chosen.tokens)[r, :P]
        ref = (pairs.ref_logprob_chosen[r], pairs.ref_logprob_rejected[r])
        h = model.hidden_states(tokens)[P - 1]
        want = _hidden_flow_velocity(W, h, pos, neg, loss, ref)  # Theorems 4-5's setting
        np.testing.assert_allclose(
            got.predicted[r], want, rtol=RTOL_AUTODIFF, atol=1e-12, err_msg=f"run {r}"
        )
        fd = fd_velocity(tokens, ref)
        scale = float(jnp.max(jnp.abs(fd)))
        np.testing.assert_allclose(
            got.actual[r], fd, rtol=RTOL_FD, atol=ATOL_FD * scale, err_msg=f"run {r}"
        )
    assert not np.allclose(got.predicted, got.actual, rtol=1e-2)  # the backbone moves too


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_answer_velocities_needs_one_answer_pair():
    model = _tiny_transformer(True)
    pairs, P = _answer_pairs(model, num=2)
    other, _ = _answer_pairs(model, num=2, answers=("yes", "never"))
    mixed = jax.tree.map(
        lambda a, b: jnp.concatenate([jnp.asarray(a), jnp.asarray(b)]), pairs, other
    )
    with pytest.raises(ValueError, match="pairs must share one answer pair"):
        kc.answer_velocities(model, make_loss("dpo", beta=0.1), mixed, prompt_len=P)
