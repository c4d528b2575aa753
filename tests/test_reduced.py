"""Reduced flow (sims/flows/reduced.py) vs the full-parameter flow (sims/flows/core.py);
its refusals."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sims.flows.core import preference_flow
from sims.flows.reduced import (
    apply_moving_rows,
    check_margin_loss,
    pair_index,
    reduced_flow_fn,
    reduced_preference_flow,
)
from sims.models.unconstrained import PreferencePairs, UnconstrainedFeatures, make_pairs
from tests._full_flow import full_parameter_flow, normwise_error, random_instances
from theory.losses import make_loss

# reduced vs full flow after >= 1000 Euler steps, float64: the bound; both runs do the same
# arithmetic up to round-off in the margin (lse cancelled vs not) and the rotation by the basis
FLOW_RTOL = 1e-9
NUM_STEPS = 1000  # the issue asks for >= 1000 steps
RECORD_EVERY = 100
DT = 0.05
NUM_INSTANCES = 16  # random (W, h, ref) per structure and loss, vmapped

LOSS_CASES = {
    "dpo": dict(beta=1.0),
    "ipo": dict(tau=0.5),
    "slic": dict(delta=2.0),
    "rebel": dict(eta=1.0, reward_margin=jnp.array([1.0, -0.5, 2.0, 0.3])),
    "gpo": dict(beta=1.0, f="truncated_quadratic"),
}
# (V, d, P, prompt, chosen, rejected): shared prompt, a contradicting pair (3 vs 4 and 4 vs 3),
# shared tokens; and a rank-deficient one (d = 3 < M = 6 moving vectors)
STRUCTURES = {
    "mixed": (30, 6, 4, [0, 1, 1, 3], [3, 4, 7, 9], [5, 3, 4, 3]),
    "rank_deficient": (12, 3, 2, [0, 1, 1, 0], [2, 5, 7, 7], [5, 2, 2, 9]),
}


def _instances(seed, V, d, P, N):
    return random_instances(seed, V, d, P, N, num=NUM_INSTANCES)


def _full_flow(loss, prompt, chosen, rejected):
    return full_parameter_flow(
        loss, prompt, chosen, rejected, dt=DT, num_steps=NUM_STEPS, record_every=RECORD_EVERY
    )


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
@pytest.mark.parametrize(
    "loss_type,structure",
    [("dpo", "mixed")]
    + [pytest.param(name, "mixed", marks=pytest.mark.slow) for name in LOSS_CASES if name != "dpo"]
    + [pytest.param("ipo", "rank_deficient", marks=pytest.mark.slow)],
)
def test_reduced_flow_matches_full_parameter_flow(loss_type, structure):
    V, d, P, prompt, chosen, rejected = STRUCTURES[structure]
    prompt, chosen, rejected = (np.array(a) for a in (prompt, chosen, rejected))
    loss = make_loss(loss_type, **LOSS_CASES[loss_type])
    W, H, refs = _instances(zlib.crc32(f"{loss_type}/{structure}".encode()), V, d, P, len(prompt))

    full = _full_flow(loss, prompt, chosen, rejected)(W, H, refs)
    full_final, full_losses, full_logprobs = full.final, full.loss, full.observables
    pairs = PreferencePairs(prompt, chosen, rejected, refs[0, 0], refs[0, 1])
    index = pair_index(pairs)
    run = reduced_flow_fn(loss, index, num_steps=NUM_STEPS, record_every=RECORD_EVERY)
    reduced = jax.jit(jax.vmap(lambda W, H, r: run(W, H, r[0], r[1], DT)))(W, H, refs)
    losses, records = reduced.loss, reduced.observables
    moving = jnp.einsum("imr,idr->imd", reduced.final.coef, reduced.final.basis)  # [inst., M, d]
    K = index.tokens.shape[0]

    assert np.all(np.asarray(full.first_nonfinite_step) < 0)
    assert np.all(np.asarray(reduced.first_nonfinite_step) < 0)
    for what, got, want in (
        ("logprobs", records.logprobs, full_logprobs),
        ("loss", losses, full_losses),
        ("token rows", moving[:, :K], full_final[0][:, index.tokens]),
        ("prompt rows", moving[:, K:], full_final[1][:, index.prompts]),
    ):
        err = normwise_error(got, want)
        worst = int(np.argmax(err))
        np.testing.assert_array_less(
            err,
            FLOW_RTOL,
            err_msg=f"{what}: {loss_type}/{structure}, worst instance {worst}: {err[worst]:.3g}",
        )
    # the flow really moved: margins grew by more than round-off on most instances
    assert np.mean(np.asarray(records.margin[:, -1] - records.margin[:, 0]) > 1e-3) > 0.5


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_reduced_preference_flow_matches_preference_flow_api():
    model = UnconstrainedFeatures(40, 6, 3, rngs=nnx.Rngs(3), dtype=jnp.float64)
    pairs = make_pairs(
        model, jnp.array([0, 1, 1, 2]), jnp.array([3, 4, 7, 9]), jnp.array([5, 3, 4, 3])
    )
    loss = make_loss("dpo", beta=1.0)
    full = preference_flow(model, pairs, loss, dt=DT, num_steps=NUM_STEPS, record_every=250).run()
    reduced = reduced_preference_flow(
        model, pairs, loss, dt=DT, num_steps=NUM_STEPS, record_every=250
    )
    full_model, trained = full.final, apply_moving_rows(model, reduced.final)
    for what, got, want in (
        ("t", reduced.t, full.t),
        ("loss", reduced.loss, full.loss),
        ("margin", reduced.observables.margin, full.observables.margin),
        ("logprobs", reduced.observables.logprobs, full.observables.logprobs),
        ("W", trained.unembedding[...], full_model.unembedding[...]),
        ("hidden", trained.hidden[...], full_model.hidden[...]),
    ):
        err = float(
            np.max(np.abs(np.asarray(got) - np.asarray(want))) / np.max(np.abs(np.asarray(want)))
        )
        assert err <= FLOW_RTOL, f"{what}: normwise relative error {err:.3g}"


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_reduced_flow_float32_close_to_float64():
    # float32 path vs float64 reference: the style guide's rtol for float32 results
    model = UnconstrainedFeatures(50, 8, 2, rngs=nnx.Rngs(5), dtype=jnp.float64)
    pairs = make_pairs(model, jnp.array([0, 1]), jnp.array([3, 4]), jnp.array([5, 3]))
    loss = make_loss("dpo", beta=1.0)
    ref = reduced_preference_flow(model, pairs, loss, dt=0.1, num_steps=200, record_every=100)
    model32 = UnconstrainedFeatures.from_arrays(
        model.unembedding[...].astype(jnp.float32), model.hidden[...].astype(jnp.float32)
    )
    pairs32 = pairs._replace(
        ref_logprob_chosen=pairs.ref_logprob_chosen.astype(jnp.float32),
        ref_logprob_rejected=pairs.ref_logprob_rejected.astype(jnp.float32),
    )
    got = reduced_preference_flow(model32, pairs32, loss, dt=0.1, num_steps=200, record_every=100)
    assert got.observables.logprobs.dtype == jnp.float32
    np.testing.assert_allclose(
        got.observables.logprobs, ref.observables.logprobs, rtol=1e-4, atol=1e-5
    )


@pytest.fixture(scope="module")
def setup():
    model = UnconstrainedFeatures(20, 4, 2, rngs=nnx.Rngs(0), dtype=jnp.float64)
    pairs = make_pairs(model, jnp.array([0, 1]), jnp.array([3, 4]), jnp.array([5, 3]))
    return model, pairs


@pytest.mark.parametrize(
    "loss_type,hyper",
    [
        ("sft_term", dict(base_loss="dpo", sft_coef=1.0)),
        ("weighted", dict(base_loss="dpo", weight_chosen=2.0)),
        ("simpo", dict(beta=2.0)),
        ("dpop", dict(beta=0.1, lam=5.0)),
    ],
)
def test_reduced_preference_flow_rejects_non_margin_losses(setup, loss_type, hyper):
    model, pairs = setup
    with pytest.raises(
        ValueError, match=f"loss_type='{loss_type}'.*sims.flows.core.preference_flow"
    ):
        reduced_preference_flow(model, pairs, make_loss(loss_type, **hyper), dt=0.1, num_steps=2)


def test_check_margin_loss_rejects_unknown_callable():
    with pytest.raises(ValueError, match="loss must be a margin-class loss"):
        check_margin_loss(lambda c, r, rc=0.0, rr=0.0: (c - r) ** 2)


@pytest.mark.parametrize("optimizer", ["rmsprop_torch", "adam", "momentum"])
def test_reduced_preference_flow_rejects_non_sgd_optimizer(setup, optimizer):
    model, pairs = setup
    with pytest.raises(ValueError, match="optimizer='sgd' only.*sims.flows.core.preference_flow"):
        reduced_preference_flow(
            model, pairs, make_loss("dpo"), dt=0.1, num_steps=2, optimizer=optimizer
        )


def test_reduced_preference_flow_rejects_multi_token(setup):
    model, pairs = setup
    multi = pairs._replace(chosen=jnp.array([[3, 4], [4, 6]]), rejected=jnp.array([[5, 6], [3, 7]]))
    with pytest.raises(ValueError, match="single-token responses.*sims.flows.core.preference_flow"):
        reduced_preference_flow(model, multi, make_loss("dpo"), dt=0.1, num_steps=2)


def test_reduced_preference_flow_rejects_bad_input(setup):
    model, pairs = setup
    loss = make_loss("dpo")
    with pytest.raises(ValueError, match="pairs.chosen must be token ids in"):
        reduced_preference_flow(
            model, pairs._replace(chosen=jnp.array([3, 20])), loss, dt=0.1, num_steps=2
        )
    with pytest.raises(ValueError, match="record_every must divide num_steps"):
        reduced_preference_flow(model, pairs, loss, dt=0.1, num_steps=5, record_every=2)
    with pytest.raises(ValueError, match="dt must be > 0"):
        reduced_preference_flow(model, pairs, loss, dt=0.0, num_steps=2)
    bad = UnconstrainedFeatures.from_arrays(model.unembedding[...], model.hidden[...])
    bad.unembedding = nnx.Param(bad.unembedding[...].at[7, 1].set(jnp.nan))
    with pytest.raises(ValueError, match="model.unembedding must be finite"):
        reduced_preference_flow(bad, pairs, loss, dt=0.1, num_steps=2)


def test_reduced_preference_flow_raises_on_divergence(setup):
    model, pairs = setup
    # exponential GPO with a huge step overflows within a few steps
    with pytest.raises(FloatingPointError, match="non-finite value at step"):
        reduced_preference_flow(model, pairs, make_loss("gpo", beta=50.0), dt=1e6, num_steps=50)
