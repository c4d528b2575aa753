"""sims.protocols.toy_transformer: settings checks, pre-training, prompts, the answer observable,
sampled batches, judged pairs and refusal rates on hand-built models, and the weighted change of
the condition runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sims.analysis.summaries import stack
from sims.data import corpus
from sims.errors import InputError
from sims.models.transformer import make_transformer_pairs, response_logprobs_from_tokens
from sims.protocols import toy_transformer as toy
from theory.losses import make_loss

#: A transformer small enough for every test here (V = the corpus vocabulary).
TINY = toy.PretrainSettings(
    d_model=8, num_layers=1, num_heads=2, copies=1, pretrain_steps=0, batch_size=4
)
#: float64 values computed by two code paths (style table: closed form vs autodiff).
RTOL_AUTODIFF = 1e-9


def _tiny(tied=True, **changes):
    settings = toy.PretrainSettings(**{**TINY.__dict__, **changes})
    return toy.pretrained_transformer(0, settings, tied=tied, dtype=jnp.float64)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"d_model": 10, "num_heads": 4}, "d_model must be divisible by num_heads"),
        ({"copies": 0}, "copies must be an integer >= 1"),
        ({"pretrain_steps": -1}, "pretrain_steps must be an integer >= 0"),
        ({"pretrain_lr": 0.0}, "pretrain_lr must be > 0"),
    ],
)
def test_pretrained_transformer_rejects_bad_settings(changes, match):
    with pytest.raises(InputError, match=match):
        _tiny(**changes)


def test_pretrained_transformer_rejects_bad_refusal_prob():
    with pytest.raises(InputError, match=r"refusal_prob must be in \[0, 1\]"):
        toy.pretrained_transformer(0, TINY, refusal_prob=1.5)


def test_pretrained_transformer_without_steps_is_the_initial_model():
    model, losses = _tiny()
    init = toy.initial_transformer(0, TINY, dtype=jnp.float64)
    assert losses.shape == (0,)
    for a, b in zip(
        jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(init)), strict=True
    ):
        assert a.dtype == jnp.float64
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_pretrained_transformer_float64_holds_the_float32_trained_parameters():
    settings = toy.PretrainSettings(**{**TINY.__dict__, "pretrain_steps": 3})
    m32, losses32 = toy.pretrained_transformer(1, settings)
    m64, losses64 = toy.pretrained_transformer(1, settings, dtype=jnp.float64)
    assert losses32.shape == (3,) and np.all(np.isfinite(losses32))
    np.testing.assert_array_equal(losses32, losses64)  # one float32 pre-training, same seed
    for a, b in zip(jax.tree.leaves(nnx.state(m32)), jax.tree.leaves(nnx.state(m64)), strict=True):
        assert (a.dtype, b.dtype) == (jnp.float32, jnp.float64)
        np.testing.assert_array_equal(np.asarray(a, np.float64), b)  # the cast is exact
    init = toy.initial_transformer(1, settings)
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(nnx.state(m32)), jax.tree.leaves(nnx.state(init)), strict=True
        )
    ]
    assert all(moved), "Adam moves every parameter in its first step"


def test_trait_prompts_are_distinct_trait_statements():
    prompts = toy.trait_prompts(np.random.default_rng(3), 30)
    assert len({tuple(p) for p in prompts}) == 30  # all 6 vices x 5 predicates, each once
    assert all(p[4] in corpus.VICES and p[6] in corpus.PREDICATES for p in prompts)
    with pytest.raises(InputError, match=r"num must be in \[1, 30\]"):
        toy.trait_prompts(np.random.default_rng(3), 31)


def _answer_pairs(model, num=3, answers=("no", "never")):
    prompts = toy.trait_prompts(np.random.default_rng(0), num)
    chosen = corpus.pack(prompts, [[answers[0]]] * num)
    rejected = corpus.pack(prompts, [[answers[1]]] * num)
    return make_transformer_pairs(model, chosen, rejected), len(prompts[0])


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_answer_logprobs_is_the_next_token_distribution_after_the_prompt():
    model, _ = _tiny()
    pairs, P = _answer_pairs(model, num=1)
    got = toy.AnswerLogprobs(P)(model, pairs)
    # independent: the log-prob of the answer token from the response log-prob of the sequence
    want = response_logprobs_from_tokens(model, *pairs.chosen)[0]
    np.testing.assert_allclose(got[corpus.INDEX["no"]], want, rtol=RTOL_AUTODIFF)
    np.testing.assert_allclose(jnp.sum(jnp.exp(got)), 1.0, rtol=1e-12)


def test_response_batch_finds_eos():
    tokens = np.array([[1, 5, corpus.EOS, 0, 0], [1, 5, 6, 7, 8]])
    b = toy.response_batch(tokens, 1)
    assert b.length.tolist() == [3, 5]  # <eos> counted; no <eos> -> T
    assert b.prompt_len.tolist() == [1, 1]


def _saying(model, word):
    """A copy of ``model`` (untied) that samples ``word`` at every position: the final norm
    outputs the constant e_0 and only ``word``'s unembedding row has a large first entry."""
    m = nnx.clone(model)
    d = m.ln_f.scale.shape[0]
    m.ln_f.scale[...] = jnp.zeros(d)
    m.ln_f.bias[...] = jnp.zeros(d).at[0].set(1.0)
    m.unembedding[...] = jnp.zeros_like(m.unembedding[...]).at[corpus.INDEX[word], 0].set(60.0)
    return m


def test_refusal_rates_of_hand_built_models():
    base, _ = _tiny(tied=False)
    refuser, complier = _saying(base, "sorry"), _saying(base, "easy")
    graphdef = nnx.graphdef(refuser)
    states = stack([nnx.state(refuser), nnx.state(complier), nnx.state(refuser)])
    prompts = corpus.pack([corpus.request_prompt("make", "bomb")] * 2, [[]] * 2)
    rates = toy.refusal_rates(
        graphdef, states, jax.random.key(0), prompts, samples=2, temperature=1.0
    )
    # "sorry sorry ..." is a refusal, "easy easy ..." is not: exp(-60) of other tokens
    np.testing.assert_array_equal(rates, [1.0, 0.0, 1.0])
    with pytest.raises(InputError, match="samples must be an integer >= 1"):
        toy.refusal_rates(graphdef, states, jax.random.key(0), prompts, samples=0, temperature=1.0)


def test_refusal_pairs_prefer_the_judged_refusal():
    model, _ = _tiny()
    data = toy.refusal_pairs(model, 4, pairs_per_prompt=1)
    n = len(corpus.requests(True))
    assert len(data.kind) == n and np.asarray(data.prompts.tokens).shape[0] == n

    def judged(batch):
        return np.array(
            [
                corpus.is_refusal(corpus.decode(t[p:]))
                for t, p in zip(np.asarray(batch.tokens), np.asarray(batch.prompt_len), strict=True)
            ]
        )

    c, r = judged(data.chosen), judged(data.rejected)
    assert np.all(c >= r), "a compliance was preferred over a refusal"
    want = np.where(c & r, "two_refusals", np.where(c | r, "mixed", "two_compliances"))
    np.testing.assert_array_equal(data.kind, want)
    assert judged(data.gold_chosen).all() and not judged(data.gold_rejected).any()
    with pytest.raises(InputError, match="pairs_per_prompt must be an integer >= 1"):
        toy.refusal_pairs(model, 0, pairs_per_prompt=0)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_train_conditions_change_is_the_weighted_change_of_the_final_models():
    model, _ = _tiny()
    prompts = [corpus.request_prompt("make", o) for o in ("cake", "poem", "kite")]
    chosen = corpus.pack(prompts, [corpus.response(corpus.REFUSALS[0], "make", "cake")] * 3)
    rejected = corpus.pack(prompts, [corpus.response(corpus.COMPLIANCES[4], "make", "cake")] * 3)
    pairs = make_transformer_pairs(model, chosen, rejected)
    w = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 3.0]])
    stacked = stack([pairs._replace(weight=jnp.asarray(x)) for x in w])
    runs = toy.train_conditions(model, stacked, make_loss("dpo", beta=0.1), dt=0.5, num_steps=3)
    graphdef = nnx.graphdef(model)
    for i in range(2):
        final = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], runs.states))
        delta = response_logprobs_from_tokens(final, *chosen) - pairs.ref_logprob_chosen
        want = np.sum(w[i] * delta) / np.sum(w[i])
        np.testing.assert_allclose(runs.logprob_change[i], want, rtol=RTOL_AUTODIFF, atol=1e-12)
    with pytest.raises(ValueError, match="pairs.weight must be set"):
        toy.train_conditions(
            model,
            stack([pairs._replace(weight=None)]),
            make_loss("dpo", beta=0.1),
            dt=0.5,
            num_steps=1,
        )


def test_unalignment_conditions_weights_and_names():
    model, _ = _tiny()
    data = toy.unalignment_conditions(model, [0, 1], pairs_per_prompt=1, keep_fractions=(0.25,))
    n = len(corpus.requests(True))
    assert data.names == ("dpo", "gold", "filtered_0.25")
    w = np.asarray(data.pairs.weight).reshape(2, 3, n)  # [seed, condition, pair]
    np.testing.assert_array_equal(w[:, :2], 1.0)
    for s in range(2):  # the kept pairs are the round(0.25 n) lowest by ln-CHES
        ches = data.ches_ln[s * n : (s + 1) * n]
        kept = np.flatnonzero(w[s, 2])
        assert len(kept) == round(0.25 * n)
        assert ches[kept].max() <= np.delete(ches, kept).min()
    assert len(data.kind) == 2 * n
    np.testing.assert_array_equal(data.on_policy.weight, 1.0)  # every on-policy pair
    with pytest.raises(InputError, match=r"keep_fractions must be in \(0, 1\]"):
        toy.unalignment_conditions(model, [0], pairs_per_prompt=1, keep_fractions=(0.0,))
