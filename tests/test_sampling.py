"""Tests of sims.models.sampling: the key/value-cache path against a full forward pass.

Independent reference: ``DecoderLM.__call__`` on the whole right-padded sequence (no cache).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sims.models.decoder import DecoderConfig, init_decoder
from sims.models.sampling import cached_logits, left_pack, sample
from sims.models.transformer import TokenBatch, response_logprobs_from_tokens

# float32 cache path vs float32 full forward: the same sums in another order (issue: <= 1e-5)
CACHE_RTOL = 1e-5
V, PAD, STOP = 23, 0, 1


def _model(**kw):
    config = DecoderConfig.llama(V, hidden_size=16, num_heads=4, num_kv_heads=2, num_layers=2, **kw)
    return init_decoder(config, seed=3, dtype=jnp.float32)


def _prompts():
    rng = np.random.default_rng(0)
    lens = np.array([5, 2, 7, 3])
    tokens = np.full((4, 7), PAD, np.int32)
    for r, n in enumerate(lens):
        tokens[r, :n] = rng.integers(2, V, n)
    return TokenBatch(tokens, lens, lens)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
@pytest.mark.parametrize("window", [None, 3])
def test_cached_logits_equal_full_forward(window):
    kw = {"sliding_windows": (None, window)} if window else {}
    model, p = _model(**kw), _prompts()
    M = 6
    cont = np.random.default_rng(1).integers(2, V, (4, M)).astype(np.int32)
    cached = np.asarray(cached_logits(model, p, cont, pad_id=PAD))
    for r in range(4):
        n = int(p.prompt_len[r])
        seq = np.concatenate([p.tokens[r, :n], cont[r]])
        full = np.asarray(model(jnp.asarray(seq[None])))[0]  # [n + M, V]
        ref = full[n - 1 : n - 1 + M]
        err = np.max(np.abs(cached[r] - ref)) / np.max(np.abs(ref))
        assert err <= CACHE_RTOL, (r, err)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_sample_is_seeded_stops_and_reports_its_logprob():
    model, p = _model(), _prompts()
    key = jax.random.key(7)
    a = sample(model, p, key, max_new_tokens=8, stop_ids=(STOP,), pad_id=PAD)
    b = sample(model, p, key, max_new_tokens=8, stop_ids=(STOP,), pad_id=PAD)
    np.testing.assert_array_equal(a.batch.tokens, b.batch.tokens)  # same key, same draws
    c = sample(model, p, jax.random.key(8), max_new_tokens=8, stop_ids=(STOP,), pad_id=PAD)
    assert not np.array_equal(a.batch.tokens, c.batch.tokens)
    for r in range(4):
        n, m = int(a.batch.prompt_len[r]), int(a.batch.length[r])
        np.testing.assert_array_equal(a.batch.tokens[r, :n], p.tokens[r, :n])
        response = a.batch.tokens[r, n:m]
        assert np.all(a.batch.tokens[r, m:] == PAD)
        if a.stopped[r]:
            assert response[-1] == STOP and STOP not in response[:-1]
        else:
            assert len(response) == 8 and STOP not in response
    full = np.asarray(response_logprobs_from_tokens(model, *(jnp.asarray(x) for x in a.batch)))
    np.testing.assert_allclose(a.logprob, full, rtol=1e-4, atol=1e-4)  # float32 sums of logs


def test_left_pack_and_limits():
    t, v, pos = left_pack(np.array([[4, 5, 0]]), np.array([2]), 0)
    assert t.tolist() == [[0, 4, 5]] and pos.tolist() == [[0, 0, 1]]
    model, p = _model(max_position_embeddings=10), _prompts()
    with pytest.raises(ValueError, match="must fit max_position_embeddings=10"):
        sample(model, p, jax.random.key(0), max_new_tokens=8)
    with pytest.raises(ValueError, match="temperature must be"):
        sample(model, p, jax.random.key(0), max_new_tokens=2, temperature=0.0)
