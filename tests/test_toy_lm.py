"""Tests of sims.toy_lm: CHES from the transformer vs the formula on extracted states, baselines."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sims import corpus
from sims.toy_lm import (
    make_sequence_pairs,
    normalized_edit_distance,
    pair_similarities,
    preference_runs,
    response_batch,
)
from sims.transformer import CausalTransformer, prefix_hidden_states, sequence_logprob
from theory.losses import make_loss

RTOL = 1e-10  # float64: the same hidden states summed in a different order


@functools.cache
def _model():
    return CausalTransformer(
        len(corpus.VOCAB),
        d_model=8,
        num_layers=1,
        num_heads=2,
        max_len=corpus.MAX_LEN,
        rngs=nnx.Rngs(0),
        dtype=jnp.float64,
    )


def _pairs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    templates = corpus.REFUSALS + corpus.COMPLIANCES
    prompts, pos, neg = [], [], []
    for _ in range(n):
        v, o = corpus.VERBS[rng.integers(4)], corpus.UNSAFE[rng.integers(6)]
        a, b = rng.choice(len(templates), 2, replace=False)
        prompts.append(corpus.request_prompt(v, o))
        pos.append(corpus.response(templates[a], v, o))
        neg.append(corpus.response(templates[b], v, o))
    return corpus.pack(prompts, pos), corpus.pack(prompts, neg)


def test_pair_similarities_equal_formula_on_extracted_states():
    m = _model()
    chosen, rejected = _pairs(12, 0)
    got = pair_similarities(m, chosen, rejected)
    for i in range(12):
        hp = np.asarray(
            prefix_hidden_states(m, chosen.tokens[i], chosen.prompt_len[i], chosen.length[i])
        )  # [L+, d]
        hn = np.asarray(
            prefix_hidden_states(m, rejected.tokens[i], rejected.prompt_len[i], rejected.length[i])
        )  # [L-, d]
        # Definition 2 written as a double sum over prefix pairs (independent of the sum form)
        cross = sum(hp[k] @ hn[j] for k in range(len(hp)) for j in range(len(hn)))
        own = sum(hp[k] @ hp[j] for k in range(len(hp)) for j in range(len(hp)))
        np.testing.assert_allclose(got["ches"][i], cross - own, rtol=RTOL, err_msg=f"pair {i}")
        ln = cross / (len(hp) * len(hn)) - own / len(hp) ** 2  # Definition 3
        np.testing.assert_allclose(got["ches_ln"][i], ln, rtol=RTOL, err_msg=f"pair {i}")
        full_p = np.asarray(m.hidden_states(jnp.asarray(chosen.tokens[i])))
        full_n = np.asarray(m.hidden_states(jnp.asarray(rejected.tokens[i])))
        last = full_p[chosen.length[i] - 1] @ full_n[rejected.length[i] - 1]
        np.testing.assert_allclose(got["last_inner"][i], last, rtol=RTOL, err_msg=f"pair {i}")


def test_normalized_edit_distance_hand_values():
    # kitten -> sitting: 3 edits (Levenshtein's classic), max length 7
    assert normalized_edit_distance("kitten", "sitting") == 3 / 7
    assert normalized_edit_distance([1, 2], [1, 2]) == 0.0
    assert normalized_edit_distance([], [5, 6]) == 1.0


def test_response_batch_finds_eos():
    tokens = np.array([[1, 5, corpus.EOS, 0, 0], [1, 5, 6, 7, 8]])
    b = response_batch(tokens, 1)
    assert b.length.tolist() == [3, 5]  # <eos> counted; no <eos> -> T


def test_preference_runs_zero_weight_pairs_do_not_matter():
    # a pair with weight 0 must not change the flow: compare with the data set without it
    m = _model()
    chosen, rejected = _pairs(3, 1)
    full = make_sequence_pairs(m, chosen, rejected, weight=[1.0, 1.0, 0.0])
    part = make_sequence_pairs(m, *(corpus.Batch(*(x[:2] for x in b)) for b in (chosen, rejected)))
    part = part._replace(
        chosen=corpus.Batch(*(jnp.concatenate([x, x[:1]]) for x in part.chosen)),
        rejected=corpus.Batch(*(jnp.concatenate([x, x[:1]]) for x in part.rejected)),
        ref_logprob_chosen=jnp.concatenate([part.ref_logprob_chosen, part.ref_logprob_chosen[:1]]),
        ref_logprob_rejected=jnp.concatenate(
            [part.ref_logprob_rejected, part.ref_logprob_rejected[:1]]
        ),
        weight=jnp.array([1.0, 1.0, 0.0]),
    )
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), full, part)
    _, losses, lp = preference_runs(
        m, stacked, make_loss("dpo", beta=0.1), dt=0.1, num_steps=3, record_every=3
    )
    np.testing.assert_allclose(losses[0], losses[1], rtol=RTOL)
    np.testing.assert_allclose(lp[0][:, :2], lp[1][:, :2], rtol=RTOL)
    np.testing.assert_allclose(lp[0][0], sequence_logprob(m, *full.chosen), rtol=RTOL)
