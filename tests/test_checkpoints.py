"""Parity of sims.checkpoints.hf with Hugging Face transformers on tiny random checkpoints.

Each test builds a tiny model with ``transformers`` (PyTorch CPU), randomises every parameter
(weights std 0.5 so attention is peaked and rotary phases matter; norms and biases too),
``save_pretrained``s it into ``tmp_path``, loads it with :func:`sims.checkpoints.hf.load_causal_lm`
and compares logits with transformers' own forward pass.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="parity tests need the [parity] extra (torch)")
transformers = pytest.importorskip(
    "transformers", reason="parity tests need the [parity] extra (transformers)"
)

from sims.checkpoints.hf import (  # noqa: E402
    hf_config,
    load_causal_lm,
    save_causal_lm,
    shard_model,
)
from sims.checkpoints.tokenization import (  # noqa: E402
    chat_template,
    format_prompt,
    load_tokenizer,
    special_tokens,
    word_level_tokenizer,
)
from sims.errors import InputError  # noqa: E402
from sims.models.decoder import DecoderConfig, DecoderLM  # noqa: E402
from sims.models.transformer import response_logprobs_from_tokens  # noqa: E402

RTOL = 1e-4  # float32 JAX vs float32 PyTorch: different kernels and reduction orders
BF16_ERROR_RATIO = 2.0  # our bfloat16 forward vs transformers' bfloat16, errors vs float32
V, T, B = 61, 14, 3  # vocabulary, sequence length, batch of the parity checks
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2)


def _randomise(model, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if ("norm" in name or "bias" in name) else 0.5
            base = 1.0 if ("norm" in name and "gemma" not in type(model).__name__.lower()) else 0
            p.copy_(base + scale * torch.randn(p.shape, generator=gen))
    return model.eval()


def _hf_model(config, seed: int = 0):
    """Return a randomised transformers causal LM for ``config``."""
    model = transformers.AutoModelForCausalLM.from_config(config)
    return _randomise(model, seed)


def _tokens(seed: int = 1, vocab: int = V) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (B, T)).astype(np.int32)


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.array(tokens), dtype=torch.long)).logits.float().numpy()


def _assert_parity(folder, hf_model, *, tokens=None, rtol=RTOL, dtype=jnp.float32, **load_kw):
    tokens = _tokens() if tokens is None else tokens
    ref = _hf_logits(hf_model, tokens)
    out = np.asarray(_forward(load_causal_lm(folder, dtype=dtype, **load_kw), jnp.asarray(tokens)))
    assert out.shape == ref.shape == (B, T, hf_model.config.vocab_size)
    err = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
    np.testing.assert_allclose(
        out, ref, rtol=rtol, atol=rtol * np.max(np.abs(ref)), err_msg=f"max rel. error {err:.2e}"
    )
    return err


@jax.jit
def _forward(model, tokens):
    return model(tokens)  # one compile (eager op-by-op dispatch compiles every op)


def _rewrite_config(folder, edit):
    file = folder / "config.json"
    cfg = json.loads(file.read_text())
    edit(cfg)
    file.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("kv_heads", "tied", "bias"),
    [(2, False, False), (4, True, True), (1, False, True)],
    ids=["gqa-untied", "mha-tied-bias", "mqa-untied-bias"],
)
def test_load_causal_lm_matches_transformers_llama(tmp_path, kv_heads, tied, bias):
    config = transformers.LlamaConfig(
        **SMALL,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
        attention_bias=bias,
        mlp_bias=bias,
    )
    model = _hf_model(config)
    model.save_pretrained(tmp_path)
    assert ("lm_head.weight" in model.state_dict()) and tied == (
        model.lm_head.weight is model.model.embed_tokens.weight
    )
    _assert_parity(tmp_path, model)


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # wavelengths 2pi/omega span 6 .. 1e5 at head_dim 8: low, medium and high bands all occur
    "original_max_position_embeddings": 16,
}


def test_load_causal_lm_matches_transformers_llama3_rope_and_rope_matters(tmp_path):
    config = transformers.LlamaConfig(
        **SMALL,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_parameters=dict(LLAMA3_ROPE),
    )
    model = _hf_model(config)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["rope_parameters"]["factor"] == 8.0
    _assert_parity(tmp_path, model)
    # control: the same weights with unscaled rope must NOT match (the check can fail)
    _rewrite_config(tmp_path, lambda c: c.update(rope_parameters={"rope_theta": 500000.0}))
    with pytest.raises(AssertionError):
        _assert_parity(tmp_path, model)


@pytest.mark.parametrize("scaling", ["llama3", "linear-legacy-type-key"])
def test_load_causal_lm_reads_old_top_level_rope_keys(tmp_path, scaling):
    rope = dict(LLAMA3_ROPE) if scaling == "llama3" else {"rope_type": "linear", "factor": 3.0}
    rope.setdefault("rope_theta", 10000.0)
    config = transformers.LlamaConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, rope_parameters=dict(rope)
    )
    model = _hf_model(config)
    model.save_pretrained(tmp_path)

    def to_old_keys(cfg):  # the transformers 4.x layout: rope_theta + rope_scaling
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        if scaling != "llama3":
            params["type"] = params.pop("rope_type")  # the oldest spelling
        cfg["rope_scaling"] = params

    _rewrite_config(tmp_path, to_old_keys)
    # transformers reads the old layout to the same model (the rewritten file means the same)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(_hf_logits(reloaded, _tokens()), _hf_logits(model, _tokens()))
    _assert_parity(tmp_path, model)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_load_causal_lm_matches_transformers_qwen2(tmp_path, tied):
    config = transformers.Qwen2Config(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied
    )
    model = _hf_model(config)
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # the qkv bias is loaded
    model.save_pretrained(tmp_path)
    _assert_parity(tmp_path, model)


def test_load_causal_lm_matches_transformers_qwen2_sliding_window(tmp_path):
    config = transformers.Qwen2Config(
        **SMALL,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,  # < T: the window cuts attention
        max_window_layers=1,  # layer 1 slides, layer 0 is full
        attn_implementation="eager",
    )
    model = _hf_model(config)
    model.save_pretrained(tmp_path)
    assert load_causal_lm(tmp_path).config.sliding_windows == (None, 4)
    _assert_parity(tmp_path, model)


def test_load_causal_lm_matches_transformers_gemma(tmp_path):
    config = transformers.GemmaConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=1, head_dim=16
    )  # head_dim * heads != hidden_size, MQA, tied, embeddings x sqrt(d), (1 + w) norms
    model = _hf_model(config)
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in transformers.modeling_utils.load_state_dict(
        str(tmp_path / "model.safetensors")
    )
    _assert_parity(tmp_path, model)


@pytest.mark.parametrize("clip_qkv", [None, 0.8], ids=["no-clip", "clip"])
def test_load_causal_lm_matches_transformers_olmo(tmp_path, clip_qkv):
    config = transformers.OlmoConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=4, clip_qkv=clip_qkv
    )
    model = _hf_model(config)
    model.save_pretrained(tmp_path)
    _assert_parity(tmp_path, model)


def test_load_causal_lm_reads_sharded_checkpoint_with_index(tmp_path):
    config = transformers.LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2)
    model = _hf_model(config)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 3 and not (tmp_path / "model.safetensors").exists()
    _assert_parity(tmp_path, model)


def test_load_causal_lm_reads_bfloat16_checkpoint(tmp_path):
    config = transformers.LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2)
    _hf_model(config).to(torch.bfloat16).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    # references read back by transformers (``.to(dtype)`` would also round its rotary buffer)
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    _assert_parity(tmp_path, hf32.eval())  # float32 load of bfloat16 weights: exact weights
    loaded = load_causal_lm(tmp_path, dtype=jnp.bfloat16)
    assert loaded.embed_tokens.weight.dtype == jnp.bfloat16
    # bfloat16 computation: both implementations round differently (~1% rms of the logit scale
    # at this weight scale), so compare each with the float32 result: ours may not be less
    # accurate than transformers' own bfloat16 forward by more than BF16_ERROR_RATIO
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    tokens = _tokens()
    truth = _hf_logits(hf32, tokens)

    def rms_error(x):
        return np.sqrt(np.mean((x - truth) ** 2)) / np.max(np.abs(truth))

    ours, theirs = (
        rms_error(np.asarray(loaded(jnp.asarray(tokens)))),
        rms_error(_hf_logits(hf16.eval(), tokens)),
    )
    assert 0 < ours <= BF16_ERROR_RATIO * theirs, (ours, theirs)


def test_load_causal_lm_refuses_unknown_architecture_by_name(tmp_path):
    config = transformers.LlamaConfig(**SMALL, num_attention_heads=4)
    _hf_model(config).save_pretrained(tmp_path)
    _rewrite_config(tmp_path, lambda c: c.update(model_type="gemma2"))
    with pytest.raises(ValueError, match="got model_type='gemma2'"):
        load_causal_lm(tmp_path)
    _rewrite_config(
        tmp_path,
        lambda c: c.update(
            model_type="llama",
            rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
        ),
    )
    with pytest.raises(ValueError, match="got rope_type='yarn'"):
        load_causal_lm(tmp_path)


def test_load_causal_lm_rejects_missing_and_unexpected_tensors(tmp_path):
    config = transformers.LlamaConfig(**SMALL, num_attention_heads=4, tie_word_embeddings=True)
    _hf_model(config).save_pretrained(tmp_path)
    _rewrite_config(tmp_path, lambda c: c.update(tie_word_embeddings=False))
    with pytest.raises(ValueError, match="lacks tensor 'lm_head.weight'"):
        load_causal_lm(tmp_path)
    _rewrite_config(tmp_path, lambda c: c.update(tie_word_embeddings=True, attention_bias=True))
    with pytest.raises(
        ValueError, match=r"lacks tensor 'model\.layers\.0\.self_attn\.[a-z]_proj\.bias'"
    ):
        load_causal_lm(tmp_path)
    _rewrite_config(tmp_path, lambda c: c.update(attention_bias=False, num_hidden_layers=1))
    with pytest.raises(ValueError, match="unexpected tensors"):
        load_causal_lm(tmp_path)
    with pytest.raises(InputError, match="nowhere: not found"):
        load_causal_lm(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty/config\.json: not found"):
        load_causal_lm(tmp_path / "empty")


def test_response_logprobs_on_loaded_model_match_transformers(tmp_path):
    config = transformers.Qwen2Config(**SMALL, num_attention_heads=4, num_key_value_heads=2)
    model = _hf_model(config)
    model.save_pretrained(tmp_path)
    tokens = _tokens()
    prompt_len, length = np.array([3, 5, 1]), np.array([9, T, 2])
    logp = torch.log_softmax(torch.as_tensor(_hf_logits(model, tokens)), -1).numpy()
    ref = [
        sum(logp[i, t - 1, tokens[i, t]] for t in range(prompt_len[i], length[i])) for i in range(B)
    ]
    out = jax.jit(response_logprobs_from_tokens)(
        load_causal_lm(tmp_path), tokens, prompt_len, length
    )
    np.testing.assert_allclose(np.asarray(out), ref, rtol=RTOL)


def test_shard_model_keeps_logits_on_8_devices(tmp_path):
    assert jax.device_count() == 8
    config = transformers.LlamaConfig(
        **{**SMALL, "vocab_size": 64}, num_attention_heads=4, num_key_value_heads=2
    )
    model = _hf_model(config)
    model.save_pretrained(tmp_path)
    mesh = jax.make_mesh((8,), ("fsdp",))
    plain = load_causal_lm(tmp_path)
    tokens = jnp.asarray(_tokens(vocab=64))
    ref = np.asarray(_forward(plain, tokens))
    for sharded in (shard_model(plain, mesh), load_causal_lm(tmp_path, mesh=mesh)):
        w = sharded.layers.mlp.up_proj.weight[...]  # [2 layers, 48, 32]: rows split 8 ways
        assert w.sharding.spec == jax.P(None, ("fsdp",), None)
        assert len(w.addressable_shards) == 8 and w.addressable_shards[0].data.shape == (2, 6, 32)
        out = np.asarray(_forward(sharded, tokens))
        np.testing.assert_allclose(out, ref, rtol=RTOL, atol=RTOL * np.max(np.abs(ref)))
    _assert_parity(tmp_path, model, tokens=np.asarray(tokens), mesh=mesh)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_save_causal_lm_round_trips_through_transformers(tmp_path):
    vocab = ("<pad>", "<bos>", "<eos>", "no", "never", "yes", "is", "it", "?")
    tok = word_level_tokenizer(vocab, special_tokens=("<pad>", "<bos>", "<eos>"))
    config = DecoderConfig.llama(
        len(vocab), hidden_size=16, num_heads=4, num_kv_heads=2, tied=False, rope_theta=1000.0
    )
    model = DecoderLM(config, rngs=nnx.Rngs(3))
    save_causal_lm(
        model, tmp_path, tokenizer=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tokens = np.random.default_rng(0).integers(0, len(vocab), (B, T)).astype(np.int32)
    ref = _hf_logits(hf, tokens)
    out = np.asarray(_forward(model, jnp.asarray(tokens)))
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=RTOL * np.max(np.abs(ref)))
    np.testing.assert_array_equal(
        np.asarray(_forward(load_causal_lm(tmp_path), jnp.asarray(tokens))), out
    )
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "<bos> is it no ? <eos>"
    assert (
        hf_tok(text, add_special_tokens=False)["input_ids"]
        == load_tokenizer(tmp_path).encode(text).ids
        == [1, 6, 7, 3, 8, 2]
    )
    assert special_tokens(tmp_path) == {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
    }
    assert hf_config(config)["num_key_value_heads"] == 2


def test_save_causal_lm_refuses_gpt2_style_model(tmp_path):
    from sims.models.transformer import CausalTransformer

    m = nnx.eval_shape(
        lambda: CausalTransformer(
            5, d_model=4, num_layers=1, num_heads=1, max_len=3, rngs=nnx.Rngs(0)
        )
    )
    with pytest.raises(TypeError, match="must be a sims.models.decoder.DecoderLM"):
        save_causal_lm(m, tmp_path)


def test_chat_template_renders_like_transformers(tmp_path):
    template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    vocab = ("<pad>", "<s>", "</s>", "hi")
    tok = word_level_tokenizer(vocab, special_tokens=vocab[:3])
    save_causal_lm(
        DecoderLM(DecoderConfig.llama(4, hidden_size=8, num_heads=2), rngs=nnx.Rngs(0)),
        tmp_path,
        tokenizer=tok,
        bos_token="<s>",
        eos_token="</s>",
    )
    assert chat_template(tmp_path) is None
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": template}))
    assert chat_template(tmp_path) == template
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ref = hf_tok.apply_chat_template(
        [{"role": "user", "content": "Is it fine?"}], tokenize=False, add_generation_prompt=True
    )
    got = format_prompt("Is it fine?", template=template, tokens=special_tokens(tmp_path))
    assert got == ref == "<s><|user|>Is it fine?<|end|><|assistant|>"
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no system role') }}")
    with pytest.raises(RuntimeError, match="no system role"):
        format_prompt("x", template=chat_template(tmp_path), tokens={})
