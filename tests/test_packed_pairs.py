"""The packed pair layout (sims.models.transformer.PackedPairs) against the plain one.

Packing runs each pair's shared prompt once and the vocabulary head only where a response token
is predicted; the attention mask must make every response position see exactly what it sees in
its own sequence. Checked in float64 on random decoders (Llama-style and with a sliding window)
and random pairs of ragged prompt / response lengths: log-probs and the DPO gradient of the two
layouts agree to RTOL (the same arithmetic on other shapes and orders), and a wrong mask fails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sims.models.decoder import DecoderConfig, init_decoder
from sims.models.transformer import (
    CausalTransformer,
    TokenBatch,
    make_transformer_pairs,
    pack_pairs,
    pair_logprobs_chunked,
)

jax.config.update("jax_enable_x64", True)

RTOL = 1e-10  # float64; the layouts sum the same terms in other orders and shapes
V, T = 23, 12


def _decoder(seed: int, **kw):
    config = DecoderConfig.llama(V, hidden_size=16, num_heads=4, num_kv_heads=2, **kw)
    return init_decoder(config, seed=seed, dtype=jnp.float64)


def _ragged_pairs(seed: int, N: int = 5) -> tuple[TokenBatch, TokenBatch]:
    """Pairs with a shared prompt of 1..5 tokens and responses of 1..T - prompt tokens."""
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(1, 6, N)
    prompt_len[0] = 1  # row 0 has the longest responses: the packed shapes are the same
    batches = []  # for every seed (one compilation)
    prompts = rng.integers(0, V, (N, T))
    for _ in range(2):
        length = prompt_len + rng.integers(1, T - prompt_len + 1)
        length[0] = T
        tokens = rng.integers(0, V, (N, T))
        tokens = np.where(np.arange(T) < prompt_len[:, None], prompts, tokens)
        tokens = np.where(np.arange(T) < length[:, None], tokens, 0)  # right pads
        batches.append(TokenBatch(tokens.astype(np.int32), prompt_len.astype(np.int32), length))
    return batches[0], batches[1]


@jax.jit
def _dpo_gradient(model, pairs, ref_c, ref_r):
    """The DPO gradient (beta 0.1) written out here, not through theory.losses."""
    graphdef, params = nnx.split(model)

    def objective(params):
        lp_c, lp_r = pairs.logprobs(nnx.merge(graphdef, params))
        return -jnp.mean(jax.nn.log_sigmoid(0.1 * ((lp_c - ref_c) - (lp_r - ref_r))))

    return jax.grad(objective)(params)


@pytest.mark.parametrize(
    "windows",
    [pytest.param((None, None), marks=pytest.mark.slow), (3, None)],  # > 3 s each; CI runs both
)
def test_packed_logprobs_and_dpo_gradient_equal_the_plain_layout(windows):
    """4 random decoders x 5 ragged pairs each (the second case: a sliding window of 3)."""
    for seed in range(4):
        model = _decoder(seed, sliding_windows=windows)
        chosen, rejected = _ragged_pairs(seed)
        plain = make_transformer_pairs(model, chosen, rejected)
        packed = make_transformer_pairs(model, chosen, rejected, packed=True)
        for field in ("ref_logprob_chosen", "ref_logprob_rejected"):
            np.testing.assert_allclose(getattr(packed, field), getattr(plain, field), rtol=RTOL)
        # gradients away from the reference model (a nonzero margin): plain references on both
        params = nnx.state(model)
        shift = jax.tree.map(lambda p: 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
        nnx.update(model, jax.tree.map(jnp.add, params, shift))
        refs = plain.ref_logprob_chosen, plain.ref_logprob_rejected
        got, want = _dpo_gradient(model, packed, *refs), _dpo_gradient(model, plain, *refs)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * np.max(np.abs(b)))


def test_packed_rejected_response_does_not_see_the_chosen_one():
    """Changing a chosen response token moves no rejected log-prob (and does move chosen ones):
    the segment mask is what keeps the two responses apart in one row."""
    model = _decoder(0)
    chosen, rejected = _ragged_pairs(1)
    base = make_transformer_pairs(model, chosen, rejected, packed=True)
    tokens = np.array(chosen.tokens)
    rows = np.arange(len(tokens))
    last = np.asarray(chosen.length) - 1
    tokens[rows, last] = (tokens[rows, last] + 1) % V
    moved = make_transformer_pairs(model, chosen._replace(tokens=tokens), rejected, packed=True)
    np.testing.assert_array_equal(moved.ref_logprob_rejected, base.ref_logprob_rejected)
    assert np.all(moved.ref_logprob_chosen != base.ref_logprob_chosen)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_packed_reference_in_chunks_equals_at_once():
    model = _decoder(2)
    chosen, rejected = _ragged_pairs(2, N=6)
    pairs = make_transformer_pairs(model, chosen, rejected, packed=True)
    lp_c, lp_r = pair_logprobs_chunked(model, pairs, chunk_size=4)
    np.testing.assert_allclose(lp_c, pairs.ref_logprob_chosen, rtol=RTOL)
    np.testing.assert_allclose(lp_r, pairs.ref_logprob_rejected, rtol=RTOL)


def test_pack_pairs_rejects_unshared_prompts_and_empty_responses():
    chosen, rejected = _ragged_pairs(3)
    tokens = np.array(rejected.tokens)
    tokens[2, 0] = (tokens[2, 0] + 1) % V
    with pytest.raises(ValueError, match=r"share their prompt.*\[2\]"):
        pack_pairs(chosen, rejected._replace(tokens=tokens))
    with pytest.raises(ValueError, match="share their prompt"):
        pack_pairs(chosen, rejected._replace(prompt_len=np.asarray(rejected.prompt_len) + 1))
    with pytest.raises(ValueError, match="prompt_len < length"):
        pack_pairs(chosen._replace(length=chosen.prompt_len), rejected)


def test_packed_pairs_on_a_model_without_segments_is_an_error():
    model = CausalTransformer(V, d_model=8, num_heads=2, num_layers=1, max_len=T, rngs=nnx.Rngs(0))
    chosen, rejected = _ragged_pairs(4)
    with pytest.raises(ValueError, match="packed pairs need a model"):
        make_transformer_pairs(model, chosen, rejected, packed=True)
