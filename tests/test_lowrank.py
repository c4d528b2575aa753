"""Low-rank flow (sims/flows/lowrank.py) vs the full-parameter flow (sims/flows/core.py);
its refusals."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sims.flows.core import flow_fn, preference_flow
from sims.flows.lowrank import lowrank_flow_fn, lowrank_preference_flow, preference_record
from sims.models.prefix_tree import PrefixTreePairs
from sims.models.unconstrained import PreferencePairs, UnconstrainedFeatures, make_pairs
from tests._full_flow import full_parameter_flow, normwise_error, random_instances
from theory.losses import make_loss, mean_pair_loss

# low-rank vs full flow after 1000 Euler steps, float64: both do the same arithmetic up to the
# order of sums (autodiff through log_softmax vs the closed-form logit gradient, W folded from
# factors vs updated every step); the bound for an exact path
FLOW_RTOL = 1e-9
NUM_STEPS = 1000
RECORD_EVERY = 100
DT = 0.05
NUM_INSTANCES = 16  # random (W, hidden, ref) per structure and loss, vmapped

LOSS_CASES = {
    "sft_term": dict(base_loss="dpo", sft_coef=1.0),
    "dpop": dict(beta=0.5, lam=5.0),
    "simpo": dict(beta=2.0, gamma=0.5),
    "weighted": dict(base_loss="dpo", weight_chosen=2.0, weight_rejected=0.5),
    "dpo": dict(beta=1.0),
    "ipo": dict(tau=0.5),
}
# (V, d, P, prompt, chosen, rejected): shared prompts, a contradicting pair (3 vs 4 and 4 vs 3),
# shared tokens and an unused prompt row (P = 5, rows 2 and 4 in no pair); and d = 3 < P_u * steps
STRUCTURES = {
    "mixed": (30, 6, 5, [0, 1, 1, 3], [3, 4, 7, 9], [5, 3, 4, 3]),
    "narrow": (12, 3, 2, [0, 1, 1, 0], [2, 5, 7, 7], [5, 2, 2, 9]),
}


def _instances(seed, V, d, P, N):
    return random_instances(seed, V, d, P, N, num=NUM_INSTANCES)


def _full_flow(loss, prompt, chosen, rejected):
    return full_parameter_flow(
        loss, prompt, chosen, rejected, dt=DT, num_steps=NUM_STEPS, record_every=RECORD_EVERY
    )


def _lowrank_flow(loss, prompt, chosen, rejected, fold_every):
    run = lowrank_flow_fn(
        loss,
        tuple(int(p) for p in np.unique(prompt)),
        num_steps=NUM_STEPS,
        record_every=RECORD_EVERY,
        fold_every=fold_every,
    )

    def one(W, H, refs):
        return run(W, H, PreferencePairs(prompt, chosen, rejected, refs[0], refs[1]), DT)

    return jax.jit(jax.vmap(one))


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
@pytest.mark.parametrize(
    "loss_type,structure,fold_every",
    [("sft_term", "mixed", 16)]
    + [
        pytest.param(name, "mixed", 7, marks=pytest.mark.slow)
        for name in LOSS_CASES
        if name != "sft_term"
    ]
    + [
        pytest.param("sft_term", "narrow", 1, marks=pytest.mark.slow),
        pytest.param("dpop", "narrow", NUM_STEPS, marks=pytest.mark.slow),
    ],
)
def test_lowrank_flow_matches_full_parameter_flow(loss_type, structure, fold_every):
    V, d, P, prompt, chosen, rejected = STRUCTURES[structure]
    prompt, chosen, rejected = (np.array(a) for a in (prompt, chosen, rejected))
    loss = make_loss(loss_type, **LOSS_CASES[loss_type])
    W, H, refs = _instances(zlib.crc32(f"{loss_type}/{structure}".encode()), V, d, P, len(prompt))

    full = _full_flow(loss, prompt, chosen, rejected)(W, H, refs)
    low = _lowrank_flow(loss, prompt, chosen, rejected, fold_every)(W, H, refs)

    assert np.all(np.asarray(full.first_nonfinite_step) < 0)
    assert np.all(np.asarray(low.first_nonfinite_step) < 0)
    for what, got, want in (
        ("logprobs", low.observables.logprobs, full.observables),
        ("loss", low.loss, full.loss),
        ("W", low.final[0], full.final[0]),
        ("hidden", low.final[1], full.final[1]),
    ):
        err = normwise_error(got, want)
        worst = int(np.argmax(err))
        np.testing.assert_array_less(
            err,
            FLOW_RTOL,
            err_msg=f"{what}: {loss_type}/{structure}, worst instance {worst}: {err[worst]:.3g}",
        )
    # the pair rows moved; every row moved where a term of the loss touches all logits (SimPO
    # with one-token responses is a margin loss: the log-sum-exp cancels as for DPO/IPO); and
    # the margins grew by more than round-off on most instances
    moved = np.max(np.abs(np.asarray(low.final[0] - W)), axis=-1)  # [inst., V]
    pair_rows = np.unique(np.concatenate([chosen, rejected]))
    assert np.all(moved[:, pair_rows] > 1e-3)
    if loss_type in ("sft_term", "dpop", "weighted"):
        assert np.all(moved > 1e-6), "a non-margin loss moves every row of W"
    margin = np.asarray(low.observables.margin)
    assert np.mean(margin[:, -1] - margin[:, 0] > 1e-3) > 0.5
    # prompt rows in no pair never move (bit for bit)
    unused = np.setdiff1d(np.arange(P), prompt)
    np.testing.assert_array_equal(np.asarray(low.final[1])[:, unused], np.asarray(H)[:, unused])


def _observe_with_norms(model, pairs):
    """A custom observable: the default record, the norm of W and of every hidden row."""
    norms = jnp.linalg.norm(model.unembedding[...]), jnp.linalg.norm(model.hidden[...], axis=-1)
    return pairs.record(model), norms


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_lowrank_preference_flow_matches_preference_flow_api():
    model = UnconstrainedFeatures(40, 6, 4, rngs=nnx.Rngs(3), dtype=jnp.float64)
    pairs = make_pairs(
        model, jnp.array([0, 1, 1, 2]), jnp.array([3, 4, 7, 9]), jnp.array([5, 3, 4, 3])
    )
    loss = make_loss("sft_term", base_loss="dpo", sft_coef=0.5)
    W0 = np.array(model.unembedding[...])
    kw = dict(dt=DT, num_steps=300, record_every=100, observe=_observe_with_norms)
    full = preference_flow(model, pairs, loss, **kw).run()
    low = lowrank_preference_flow(model, pairs, loss, fold_every=37, **kw)
    (low_record, low_norms), (full_record, full_norms) = low.observables, full.observables
    for what, got, want in (
        ("t", low.t, full.t),
        ("loss", low.loss, full.loss),
        ("margin", low_record.margin, full_record.margin),
        ("logprobs", low_record.logprobs, full_record.logprobs),
        ("W", low.final.unembedding[...], full.final.unembedding[...]),
        ("hidden", low.final.hidden[...], full.final.hidden[...]),
        ("|W|", low_norms[0], full_norms[0]),
        ("|h|", low_norms[1], full_norms[1]),
    ):
        err = float(
            np.max(np.abs(np.asarray(got) - np.asarray(want))) / np.max(np.abs(np.asarray(want)))
        )
        assert err <= FLOW_RTOL, f"{what}: normwise relative error {err:.3g}"
    assert isinstance(low.final, UnconstrainedFeatures)
    np.testing.assert_array_equal(low.final.hidden[3], model.hidden[3])  # prompt 3 in no pair
    np.testing.assert_array_equal(model.unembedding[...], W0)  # the input model is not modified


def test_preference_record_matches_pairs_record():
    model = UnconstrainedFeatures(20, 4, 3, rngs=nnx.Rngs(1), dtype=jnp.float64)
    pairs = make_pairs(model, jnp.array([2, 0]), jnp.array([3, 4]), jnp.array([5, 3]))
    got = preference_record(model.unembedding[...], model.hidden[...], pairs)
    want = pairs.record(model)
    np.testing.assert_array_equal(got.logprobs, want.logprobs)
    np.testing.assert_array_equal(got.margin, want.margin)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_lowrank_flow_float32_close_to_float64():
    # float32 path vs float64 reference: the style guide's rtol for float32 results
    model = UnconstrainedFeatures(50, 8, 2, rngs=nnx.Rngs(5), dtype=jnp.float64)
    pairs = make_pairs(model, jnp.array([0, 1]), jnp.array([3, 4]), jnp.array([5, 3]))
    loss = make_loss("sft_term", base_loss="dpo", sft_coef=1.0)
    kw = dict(dt=0.1, num_steps=200, record_every=100)
    ref = lowrank_preference_flow(model, pairs, loss, **kw)
    model32 = UnconstrainedFeatures.from_arrays(
        model.unembedding[...].astype(jnp.float32), model.hidden[...].astype(jnp.float32)
    )
    pairs32 = pairs._replace(
        ref_logprob_chosen=pairs.ref_logprob_chosen.astype(jnp.float32),
        ref_logprob_rejected=pairs.ref_logprob_rejected.astype(jnp.float32),
    )
    got = lowrank_preference_flow(model32, pairs32, loss, **kw)
    assert got.observables.logprobs.dtype == jnp.float32
    np.testing.assert_allclose(
        got.observables.logprobs, ref.observables.logprobs, rtol=1e-4, atol=1e-5
    )


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_lowrank_flow_reports_the_same_first_nonfinite_step():
    # exponential GPO with a huge step overflows within a few steps; both paths name one step
    prompt, chosen, rejected = np.array([0, 1]), np.array([3, 4]), np.array([5, 3])
    W, H, refs = _instances(11, 20, 4, 2, 2)
    loss = make_loss("gpo", beta=50.0)
    rows = jnp.arange(2)

    def loss_fn(params, refs):
        logprobs = jax.nn.log_softmax(params[1][prompt] @ params[0].T, axis=-1)
        return mean_pair_loss(loss, logprobs[rows, chosen], logprobs[rows, rejected], *refs)

    full = flow_fn(loss_fn, lambda p, _: p[1], optimizer="sgd", num_steps=50, record_every=50)
    low = lowrank_flow_fn(loss, (0, 1), num_steps=50, record_every=50, fold_every=8)
    full_steps = jax.vmap(lambda W, H, r: full((W, H), r, 1e6).first_nonfinite_step)(W, H, refs)
    low_steps = jax.vmap(
        lambda W, H, r: low(W, H, PreferencePairs(prompt, chosen, rejected, r[0], r[1]), 1e6)
    )(W, H, refs).first_nonfinite_step
    assert np.sum(np.asarray(full_steps) > 0) >= NUM_INSTANCES // 4  # enough runs diverged
    np.testing.assert_array_equal(low_steps, full_steps)


@pytest.fixture(scope="module")
def setup():
    model = UnconstrainedFeatures(20, 4, 2, rngs=nnx.Rngs(0), dtype=jnp.float64)
    pairs = make_pairs(model, jnp.array([0, 1]), jnp.array([3, 4]), jnp.array([5, 3]))
    return model, pairs


@pytest.mark.parametrize("optimizer", ["rmsprop_torch", "adam", "momentum"])
def test_lowrank_preference_flow_rejects_non_sgd_optimizer(setup, optimizer):
    model, pairs = setup
    with pytest.raises(ValueError, match="optimizer='sgd' only.*sims.flows.core.preference_flow"):
        lowrank_preference_flow(
            model, pairs, make_loss("dpo"), dt=0.1, num_steps=2, optimizer=optimizer
        )


def test_lowrank_preference_flow_rejects_other_families_and_shapes(setup):
    model, pairs = setup
    loss = make_loss("dpo")
    multi = pairs._replace(chosen=jnp.array([[3, 4], [4, 6]]), rejected=jnp.array([[5, 6], [3, 7]]))
    with pytest.raises(ValueError, match="single-token pairs.*sims.flows.core.preference_flow"):
        lowrank_preference_flow(model, multi, loss, dt=0.1, num_steps=2)
    tree = PrefixTreePairs(*(jnp.zeros((1, 1), jnp.int32) for _ in PrefixTreePairs._fields))
    with pytest.raises(ValueError, match="UnconstrainedFeatures.*sims.flows.core.preference_flow"):
        lowrank_preference_flow(model, tree, loss, dt=0.1, num_steps=2)


def test_lowrank_preference_flow_rejects_bad_input(setup):
    model, pairs = setup
    loss = make_loss("sft_term", base_loss="dpo")
    with pytest.raises(ValueError, match="chosen must be token ids in"):
        lowrank_preference_flow(
            model, pairs._replace(chosen=jnp.array([3, 20])), loss, dt=0.1, num_steps=2
        )
    with pytest.raises(ValueError, match="record_every must divide num_steps"):
        lowrank_preference_flow(model, pairs, loss, dt=0.1, num_steps=5, record_every=2)
    with pytest.raises(ValueError, match="dt must be > 0"):
        lowrank_preference_flow(model, pairs, loss, dt=0.0, num_steps=2)
    with pytest.raises(ValueError, match="fold_every must be a positive integer"):
        lowrank_preference_flow(model, pairs, loss, dt=0.1, num_steps=2, fold_every=0)
    bad = UnconstrainedFeatures.from_arrays(model.unembedding[...], model.hidden[...])
    bad.unembedding = nnx.Param(bad.unembedding[...].at[7, 1].set(jnp.nan))
    with pytest.raises(ValueError, match="model.unembedding must be finite"):
        lowrank_preference_flow(bad, pairs, loss, dt=0.1, num_steps=2)


def test_lowrank_preference_flow_raises_on_divergence(setup):
    model, pairs = setup
    with pytest.raises(FloatingPointError, match="non-finite value at step"):
        lowrank_preference_flow(model, pairs, make_loss("gpo", beta=50.0), dt=1e6, num_steps=50)
