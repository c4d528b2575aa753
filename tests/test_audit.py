"""Tests of sims.analysis.audit: CHES vs theory.multi_token on the model's hidden states, the exact
t = 0
velocity vs a central difference around one SGD step of the project's flow, input checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sims.analysis.audit import audit_pairs
from sims.analysis.scores import transformer_pair_scores
from sims.flows.core import PairObjective, preference_flow
from sims.models.decoder import DecoderConfig, DecoderLM, init_decoder
from sims.models.transformer import TokenBatch, make_transformer_pairs, prefix_hidden_states
from theory.losses import make_loss
from theory.multi_token import ches, ches_length_normalized

RTOL = 1e-10  # float64: the same sums in another order (masked batch vs per-pair slices)
FD_RTOL = 1e-7  # autodiff vs central difference, step 1e-5 in parameter space (style table)
FD_STEP = 1e-5  # length of the parameter step of the central difference
V, T, N = 17, 12, 5
LOSS = make_loss("dpo", beta=0.1)


@functools.cache
def _model() -> DecoderLM:
    """A float64 Llama-family model with every parameter randomised (weights std ~0.3)."""
    config = DecoderConfig.llama(V, hidden_size=16, num_heads=4, num_kv_heads=2, num_layers=1)
    graphdef, state = nnx.split(init_decoder(config, seed=0, dtype=jnp.float64))

    @jax.jit
    def perturb(state):
        leaves, tree = jax.tree_util.tree_flatten(state)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        noisy = [
            x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys, strict=True)
        ]
        return jax.tree_util.tree_unflatten(tree, noisy)

    return nnx.merge(graphdef, perturb(state))


def _pairs(seed: int = 0) -> tuple[TokenBatch, TokenBatch]:
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(1, 5, N).astype(np.int32)
    batches = []
    for _ in range(2):
        length = (prompt_len + rng.integers(1, T - 5, N)).astype(np.int32)
        tokens = rng.integers(0, V, (N, T)).astype(np.int32)
        batches.append(TokenBatch(tokens, prompt_len, length))
    batches[1].tokens[:, :5] = batches[0].tokens[:, :5]  # one prompt per pair
    return batches[0], batches[1]


@functools.cache
def _audit(seed: int):
    """The audit of ``_pairs(seed)``: chunks of 2 (3 chunks, the last padded), top 3 gainers."""
    return audit_pairs(_model(), *_pairs(seed), LOSS, batch_size=2, top_k=3)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_audit_ches_matches_theory_on_model_hidden_states():
    model = _model()
    chosen, rejected = _pairs()
    audit = _audit(0)
    for i in range(N):
        h_pos = prefix_hidden_states(
            model, chosen.tokens[i], chosen.prompt_len[i], chosen.length[i]
        )
        h_neg = prefix_hidden_states(
            model, rejected.tokens[i], rejected.prompt_len[i], rejected.length[i]
        )
        np.testing.assert_allclose(audit.ches[i], ches(h_pos, h_neg), rtol=RTOL, err_msg=f"{i}")
        np.testing.assert_allclose(
            audit.ches_ln[i], ches_length_normalized(h_pos, h_neg), rtol=RTOL, err_msg=f"{i}"
        )
    scores = transformer_pair_scores(model, chosen, rejected)  # the per-row reference path
    for key in ("ches", "ches_ln", "last_inner", "edit_distance"):
        np.testing.assert_allclose(getattr(audit, key), scores[key], rtol=RTOL, err_msg=key)
    assert np.ptp(audit.ches) > 1e-3  # the pairs differ: the comparison is not trivial


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_audit_velocity_matches_central_difference_of_an_sgd_step():
    model = _model()
    chosen, rejected = _pairs(1)
    audit = _audit(1)
    graphdef, theta = nnx.split(model)
    checked = 0
    for i in range(N):
        rows = slice(i, i + 1)
        pairs = make_transformer_pairs(
            model, TokenBatch(*(a[rows] for a in chosen)), TokenBatch(*(a[rows] for a in rejected))
        )
        dt = FD_STEP / float(_grad_norm(model, pairs))
        # theta - dt grad L: one SGD step of the project's flow; theta + dt grad L mirrored
        minus = nnx.split(preference_flow(model, pairs, LOSS, dt=dt, num_steps=1).run().final)[1]
        plus = jax.tree_util.tree_map(lambda a, b: 2 * a - b, theta, minus)
        lp = [_logprobs(nnx.merge(graphdef, s), pairs) for s in (minus, plus)]
        fd_chosen = float(lp[0][0][0] - lp[1][0][0]) / (2 * dt)
        fd_rejected = float(lp[0][1][0] - lp[1][1][0]) / (2 * dt)
        np.testing.assert_allclose(
            audit.velocity_chosen[i], fd_chosen, rtol=FD_RTOL, err_msg=f"{i}"
        )
        np.testing.assert_allclose(
            audit.velocity_rejected[i], fd_rejected, rtol=FD_RTOL, err_msg=f"{i}"
        )
        # the top gainer's d/dt pi(z|x) at the first response position
        z, P = audit.gainers[i, 0], chosen.prompt_len[i]
        probs = [
            jax.nn.softmax(nnx.merge(graphdef, s)(chosen.tokens[i])[P - 1])[z]
            for s in (minus, plus)
        ]
        np.testing.assert_allclose(
            audit.gainer_rates[i, 0], float(probs[0] - probs[1]) / (2 * dt), rtol=FD_RTOL
        )
        checked += 1
    assert checked == N
    assert np.all(np.diff(audit.gainer_rates, axis=1) <= 0)  # ranked
    # d/dt L = -|grad L|^2 < 0 and l' < 0 (DPO, Lemma 1): the margin always grows
    assert np.all(audit.velocity_chosen - audit.velocity_rejected > 0)


@jax.jit
def _grad_norm(model, pairs):
    graphdef, state = nnx.split(model)
    grad = jax.grad(lambda s: PairObjective(LOSS)(nnx.merge(graphdef, s), pairs))(state)
    return jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(grad)))


@jax.jit
def _logprobs(model, pairs):
    return pairs.logprobs(model)


@jax.jit
def _probs(model, tokens):
    return jax.nn.softmax(model(tokens), axis=-1)


def test_audit_rejects_bad_input():
    model = _model()
    chosen, rejected = _pairs()
    short = TokenBatch(rejected.tokens[:, :-1], rejected.prompt_len, rejected.length - 1)
    with pytest.raises(ValueError, match="must have one shape"):
        audit_pairs(model, chosen, short, LOSS)
    with pytest.raises(ValueError, match="top_k must be <= V=17"):
        audit_pairs(model, chosen, rejected, LOSS, top_k=18)
    empty = TokenBatch(rejected.tokens, rejected.prompt_len, rejected.prompt_len)
    with pytest.raises(ValueError, match="non-empty responses"):
        audit_pairs(model, chosen, empty, LOSS)
