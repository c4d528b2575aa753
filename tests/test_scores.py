"""Tests of sims.scores: per-pair CHES and baselines vs independent computations."""

import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sims.data import corpus
from sims.scores import normalized_edit_distance, transformer_pair_scores
from sims.transformer import CausalTransformer, prefix_hidden_states

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


def test_transformer_pair_scores_equal_formula_on_extracted_states():
    m = _model()
    chosen, rejected = _pairs(12, 0)
    got = transformer_pair_scores(m, chosen, rejected)
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
