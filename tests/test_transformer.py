"""Tests of sims.models.transformer: hidden states vs a manual forward pass, causality, sampling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sims.flows.core import preference_flow
from sims.models.transformer import (
    CausalTransformer,
    TokenBatch,
    lm_loss,
    make_transformer_pairs,
    prefix_hidden_states,
    response_logprobs_from_tokens,
    sample,
)
from theory.losses import make_loss

RTOL = 1e-10  # float64 vectorised model vs an explicit per-position/per-head loop
LN_EPS = 1e-6  # nnx.LayerNorm default epsilon
V, D, HEADS, T = 13, 8, 2, 9  # small model for the checks


@functools.cache
def _model(tied: bool, seed: int = 0, layers: int = 2) -> CausalTransformer:
    """A float64 model with every parameter randomised (biases and norms too)."""
    m = CausalTransformer(
        V,
        d_model=D,
        num_layers=layers,
        num_heads=HEADS,
        max_len=T,
        tied=tied,
        rngs=nnx.Rngs(seed),
        dtype=jnp.float64,
    )
    graphdef, state = nnx.split(m)
    leaves, tree = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [
        x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(tree, leaves))


def _manual_hidden(m: CausalTransformer, tokens: np.ndarray) -> np.ndarray:
    """Forward pass written out position by position and head by head in NumPy."""
    P = lambda x: np.asarray(x[...])  # noqa: E731

    def ln(x, mod):
        mu, var = x.mean(), x.var()
        return (x - mu) / np.sqrt(var + LN_EPS) * P(mod.scale) + P(mod.bias)

    def lin(x, mod):
        return x @ P(mod.kernel) + P(mod.bias)

    def gelu(x):  # tanh approximation (jax.nn.gelu default)
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    xs = [P(m.embed.embedding)[tok] + P(m.pos)[t] for t, tok in enumerate(tokens)]
    dh = D // HEADS
    for blk in m.blocks:
        qkv = [lin(ln(x, blk.ln1), blk.qkv) for x in xs]
        new = []
        for t in range(len(xs)):
            heads = []
            for h in range(HEADS):
                q = qkv[t][h * dh : (h + 1) * dh]
                ks = [qkv[s][D + h * dh : D + (h + 1) * dh] for s in range(t + 1)]
                vs = [qkv[s][2 * D + h * dh : 2 * D + (h + 1) * dh] for s in range(t + 1)]
                scores = np.array([q @ k for k in ks]) / np.sqrt(dh)
                w = np.exp(scores - scores.max())
                w /= w.sum()
                heads.append(sum(wi * vi for wi, vi in zip(w, vs, strict=True)))
            x = xs[t] + lin(np.concatenate(heads), blk.proj)
            new.append(x + lin(gelu(lin(ln(x, blk.ln2), blk.fc)), blk.out))
        xs = new
    return np.stack([ln(x, m.ln_f) for x in xs])


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
@pytest.mark.parametrize("tied", [True, False])
def test_hidden_states_match_manual_forward(tied):
    m = _model(tied)
    rng = np.random.default_rng(3)
    hidden = _hidden_fn(m)
    for trial in range(4):
        tokens = rng.integers(0, V, T)
        got = np.asarray(hidden(jnp.asarray(tokens)))
        want = _manual_hidden(m, tokens)
        np.testing.assert_allclose(
            got, want, rtol=RTOL, atol=RTOL, err_msg=f"trial {trial}, tied={tied}"
        )


def test_unembedding_tied_is_the_embedding():
    tied, untied = _model(True), _model(False)
    np.testing.assert_array_equal(tied.unembedding_matrix(), tied.embed.embedding[...])
    assert not hasattr(tied, "unembedding")
    assert untied.unembedding_matrix().shape == (V, D)
    assert not np.allclose(untied.unembedding_matrix(), untied.embed.embedding[...])


def _hidden_fn(m):
    graphdef, state = nnx.split(m)
    return jax.jit(lambda tokens: nnx.merge(graphdef, state).hidden_states(tokens))


def test_prefix_hidden_states_ignore_later_tokens():
    # h_{x, y_<k} depends only on the prefix: changing every later token leaves it unchanged
    m = _model(True)
    hidden = _hidden_fn(m)
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, V, T)
    prompt_len, length = 3, 8
    h = np.asarray(prefix_hidden_states(m, jnp.asarray(tokens), prompt_len, length))
    assert h.shape == (length - prompt_len, D)
    for k in range(length - prompt_len):
        changed = tokens.copy()
        changed[prompt_len + k :] = rng.integers(0, V, T - prompt_len - k)
        alone = np.asarray(hidden(jnp.asarray(changed)))[prompt_len - 1 + k]
        np.testing.assert_allclose(h[k], alone, rtol=RTOL, atol=RTOL, err_msg=f"prefix k={k + 1}")


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_response_logprobs_from_tokens_is_sum_of_prefix_logprobs():
    m = _model(False)
    tokens = np.random.default_rng(7).integers(0, V, (3, T))
    prompt_len, length = np.array([2, 3, 4]), np.array([5, 9, 6])
    got = np.asarray(response_logprobs_from_tokens(m, jnp.asarray(tokens), prompt_len, length))
    H = np.asarray(_hidden_fn(m)(jnp.asarray(tokens)))  # [3, T, d]
    W = np.asarray(m.unembedding_matrix())
    for i in range(3):
        want = 0.0
        for t in range(prompt_len[i], length[i]):  # token t is predicted from position t - 1
            logits = W @ H[i, t - 1]
            want += logits[tokens[i, t]] - np.log(np.sum(np.exp(logits)))
        np.testing.assert_allclose(got[i], want, rtol=RTOL, err_msg=f"sequence {i}")


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_lm_loss_uniform_model_is_log_v():
    m = _model(True)
    graphdef, state = nnx.split(m)
    state = jax.tree_util.tree_map(jnp.zeros_like, state)  # W = 0 gives uniform pi = 1/V
    zero = nnx.merge(graphdef, state)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, V, (2, T)))
    np.testing.assert_allclose(lm_loss(zero, tokens, jnp.array([T, 4])), np.log(V), rtol=1e-12)


def test_sample_keeps_prompt_and_pads_after_eos():
    m = _model(True)
    prompts = jnp.asarray(np.random.default_rng(2).integers(3, V, (16, T)))
    eos, pad = 2, 0
    out = np.asarray(
        sample(m, jax.random.key(0), prompts, 4, temperature=1.0, eos_id=eos, pad_id=pad)
    )
    np.testing.assert_array_equal(out[:, :4], np.asarray(prompts)[:, :4])
    ended = 0
    for row in out:
        first = np.flatnonzero(row[4:] == eos)
        if first.size:
            ended += 1
            assert np.all(row[4 + first[0] + 1 :] == pad)
    assert ended > 0  # the check above ran on some rows


def test_transformer_rejects_bad_config():
    with pytest.raises(ValueError, match="d_model must be divisible by num_heads"):
        CausalTransformer(5, d_model=6, num_layers=1, num_heads=4, max_len=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_layers must be a positive integer"):
        CausalTransformer(5, d_model=4, num_layers=0, num_heads=2, max_len=4, rngs=nnx.Rngs(0))


def test_prefix_hidden_states_rejects_bad_lengths():
    m = _model(True)
    with pytest.raises(ValueError, match="need 1 <= prompt_len < length"):
        prefix_hidden_states(m, jnp.zeros(T, dtype=jnp.int32), 4, 4)
    with pytest.raises(ValueError, match=r"tokens must have shape \[T\]"):
        prefix_hidden_states(m, jnp.zeros((1, T), dtype=jnp.int32), 1, 3)


def test_sample_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample(
            _model(True),
            jax.random.key(0),
            jnp.zeros((1, T), dtype=jnp.int32),
            2,
            temperature=0.0,
            eos_id=2,
            pad_id=0,
        )


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_preference_flow_zero_weight_pairs_do_not_matter():
    # a pair with weight 0 must not change the flow: compare with the data set without it
    m = _model(False)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, V, (2, 3, T))  # chosen, rejected; 3 pairs
    prompt_len, length = np.array([2, 3, 2]), np.array([6, 9, 5])
    chosen, rejected = (TokenBatch(t, prompt_len, length) for t in tokens)
    full = make_transformer_pairs(m, chosen, rejected, weight=[1.0, 1.0, 0.0])
    # the third pair replaced by a copy of the first, still of weight 0
    swap = lambda b: TokenBatch(*(np.concatenate([x[:2], x[:1]]) for x in b))  # noqa: E731
    part = make_transformer_pairs(m, swap(chosen), swap(rejected), weight=[1.0, 1.0, 0.0])
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), full, part)
    res = preference_flow(
        m, stacked, make_loss("dpo", beta=0.1), dt=0.1, num_steps=3, record_every=3,
        in_axes=(None, 0),
    ).run()  # fmt: skip
    lp = np.asarray(res.observables)  # [2 runs, 2 checkpoints, 3 pairs]
    np.testing.assert_allclose(res.loss[0], res.loss[1], rtol=RTOL)
    np.testing.assert_allclose(lp[0][:, :2], lp[1][:, :2], rtol=RTOL)
    np.testing.assert_allclose(lp[0][0], full.ref_logprob_chosen, rtol=RTOL)
    assert np.all(lp[0][1, :2] > lp[0][0, :2]) or np.any(lp[0][1] != lp[0][0])  # it moved


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_model_cast_to_float64_computes_in_float64():
    """A float32-built model whose state is cast to float64 computes every hidden state in float64
    (nnx.Embed would keep the float32 compute dtype it was built with)."""
    m32 = CausalTransformer(
        V, d_model=D, num_layers=1, num_heads=HEADS, max_len=T, rngs=nnx.Rngs(0)
    )
    graphdef, state = nnx.split(m32)
    m64 = nnx.merge(graphdef, jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), state))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, T)))
    assert m64.hidden_states(tokens).dtype == jnp.float64
    direct = _model_from_state(m64)
    np.testing.assert_allclose(m64.hidden_states(tokens), direct.hidden_states(tokens), rtol=1e-13)


def _model_from_state(model):
    """The same parameters in a model built in float64 from the start."""
    fresh = CausalTransformer(
        V, d_model=D, num_layers=1, num_heads=HEADS, max_len=T, rngs=nnx.Rngs(0), dtype=jnp.float64
    )
    graphdef, _ = nnx.split(fresh)
    return nnx.merge(graphdef, nnx.split(model)[1])
