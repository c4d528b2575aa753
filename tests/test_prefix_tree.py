"""The prefix-tree unconstrained-features model: indexing, log-probs, flow velocity, subsets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sims.data.synthetic import synthetic_preferences
from sims.flows.core import pair_logprobs as sims_pair_logprobs
from sims.flows.core import preference_flow
from sims.models.prefix_tree import (
    extend_prefixes,
    flow_velocity,
    index_prefixes,
    restrict,
    with_reference,
)
from sims.models.unconstrained import UnconstrainedFeatures
from theory.losses import make_loss
from theory.regularized import loss_logprob_velocity

# Same float64 arithmetic in a different order (masked sums vs Python loops).
RTOL_SAME_MATH = 1e-12


def test_index_prefixes_shares_exactly_the_common_prefixes():
    prompts = [0, 0, 1]
    chosen = [[1, 2, 3], [1, 2], [1]]
    rejected = [[1, 4], [5], [1, 2]]
    pairs, prefixes = index_prefixes(prompts, chosen, rejected)
    # distinct prefixes by hand: prompt 0: (), (1,), (1,2); prompt 1: (), (1,)
    assert sorted(prefixes) == sorted([(0, ()), (0, (1,)), (0, (1, 2)), (1, ()), (1, (1,))])
    for resp, prefix, mask in (
        (chosen, pairs.chosen_prefix, pairs.chosen_mask),
        (rejected, pairs.rejected_prefix, pairs.rejected_mask),
    ):
        for i, y in enumerate(resp):
            assert int(mask[i].sum()) == len(y)
            for k in range(len(y)):
                assert prefixes[int(prefix[i, k])] == (prompts[i], tuple(y[:k]))


def test_pair_logprobs_match_brute_force():
    rng = np.random.default_rng(0)
    chosen = [list(rng.integers(0, 5, rng.integers(1, 4))) for _ in range(6)]
    rejected = [list(rng.integers(0, 5, rng.integers(1, 4))) for _ in range(6)]
    pairs, prefixes = index_prefixes(list(range(6)), chosen, rejected)
    model = UnconstrainedFeatures.from_arrays(
        rng.normal(size=(5, 3)), rng.normal(size=(len(prefixes), 3))
    )
    lp_c, _ = sims_pair_logprobs(model, pairs)
    W, H = np.asarray(model.unembedding[...]), np.asarray(model.hidden[...])
    for i, y in enumerate(chosen):
        total = 0.0
        for k, tok in enumerate(y):
            logits = W @ H[prefixes.index((i, tuple(y[:k])))]
            total += logits[tok] - np.log(np.sum(np.exp(logits)))
        np.testing.assert_allclose(float(lp_c[i]), total, rtol=RTOL_SAME_MATH, err_msg=f"pair {i}")


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_flow_velocity_matches_theorem_6_closed_form():
    # autodiff of the simulated model's flow vs the closed form (shared prefix of one token)
    pairs, prefixes = index_prefixes([0], [[1, 2, 3]], [[1, 4]])
    rng = np.random.default_rng(1)
    model = UnconstrainedFeatures.from_arrays(
        rng.normal(size=(6, 4)), rng.normal(size=(len(prefixes), 4))
    )
    pairs = with_reference(model, pairs)._replace(ref_logprob_chosen=jnp.array([-1.0]))
    loss = make_loss("dpo", beta=0.5)
    got = flow_velocity(model, pairs, loss, pairs.chosen, pairs.chosen_prefix, pairs.chosen_mask)
    H = model.hidden[...]
    want = loss_logprob_velocity(
        loss,
        model.unembedding[...],
        H[pairs.chosen_prefix[0]],
        H[pairs.rejected_prefix[0, :2]],
        pairs.chosen[0],
        pairs.rejected[0, :2],
        -1.0,
        pairs.ref_logprob_rejected[0],
    ).velocity
    np.testing.assert_allclose(float(got[0]), float(want), rtol=1e-9)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_restrict_keeps_logprobs_and_flow():
    data = synthetic_preferences(
        jax.random.key(0), num_pairs=30, vocab_size=10, hidden_size=4, max_len=4
    )
    pairs = with_reference(data.model, data.pairs)
    rows = np.array([3, 7, 11, 20])
    sub_model, sub_pairs = restrict(data.model, pairs, rows, num_prefixes=60)
    full = sims_pair_logprobs(data.model, pairs)
    sub = sims_pair_logprobs(sub_model, sub_pairs)
    for a, b in zip(full, sub, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a)[rows], rtol=RTOL_SAME_MATH)
    with pytest.raises(ValueError, match=r"num_prefixes must be >="):
        restrict(data.model, pairs, rows, num_prefixes=2)


def test_preference_flow_on_prefix_tree_pairs_lowers_the_loss():
    data = synthetic_preferences(
        jax.random.key(1), num_pairs=8, vocab_size=10, hidden_size=4, max_len=3
    )
    pairs = with_reference(data.model, data.pairs)
    traj = preference_flow(
        data.model, pairs, make_loss("dpo", beta=0.1), dt=0.5, num_steps=20, record_every=10
    ).run()
    assert float(traj.loss[-1]) < float(traj.loss[0])
    np.testing.assert_allclose(
        np.asarray(traj.observables.logprob_chosen[0]),
        np.asarray(pairs.ref_logprob_chosen),
        rtol=RTOL_SAME_MATH,
    )


def test_index_prefixes_rejects_bad_input():
    with pytest.raises(ValueError, match=r"rejected\[0\] must be a non-empty response"):
        index_prefixes([0], [[1]], [[]])
    with pytest.raises(ValueError, match=r"must have one length N"):
        index_prefixes([0, 1], [[1]], [[2]])
    with pytest.raises(ValueError, match=r"chosen\[0\] must hold token ids >= 0"):
        index_prefixes([0], [[-1]], [[2]])


def test_extend_prefixes_reuses_rows():
    _, prefixes = index_prefixes([0], [[1, 2]], [[3]])
    ids, grown = extend_prefixes(prefixes, 0, [1, 7, 8])
    assert ids[:2] == [0, 1] and ids[2] == len(prefixes) and len(grown) == len(prefixes) + 1
