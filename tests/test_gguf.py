"""Tests of sims.checkpoints.gguf and the GGUF tokenizer: parity with transformers' own GGUF
loading.

Tiny checkpoints are made here: a randomised ``transformers`` model is saved in Hugging Face
format, loaded with :func:`sims.checkpoints.hf.load_causal_lm` (parity-tested in
tests/test_checkpoints.py), written as GGUF by :func:`sims.checkpoints.gguf.save_gguf` (llama.cpp's
converter
conventions) in F32, Q8_0 and Q4_1, and read back by both :func:`sims.checkpoints.gguf.load_gguf`
and
``transformers`` (``from_pretrained(folder, gguf_file=...)``, which undoes the converter's
transforms with its own code). Independent references: transformers' Q/K un-permutation, its
dequantisation kernels (``integrations/gguf/dequant.py``) and its GGUF tokenizer.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="GGUF parity tests need the [parity] extra (torch)")
transformers = pytest.importorskip(
    "transformers", reason="GGUF parity tests need the [parity] extra (transformers)"
)
gguf = pytest.importorskip("gguf", reason="GGUF tests need the gguf package")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sims.checkpoints.families import permute_rope_rows, unpermute_rope_rows  # noqa: E402
from sims.checkpoints.gguf import gguf_config, load_gguf, open_gguf, save_gguf  # noqa: E402
from sims.checkpoints.hf import load_causal_lm  # noqa: E402
from sims.checkpoints.tokenization import chat_template, load_tokenizer, special_tokens  # noqa: E402
from sims.errors import InputError  # noqa: E402

RTOL = 1e-4  # float32 JAX vs float32 PyTorch on the same dequantised weights (issue bound)
ROUNDTRIP_RTOL = 1e-5  # our F32 GGUF written and read back vs the HF folder: float32 reorderings
B, T = 2, 12
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: Strings with digits, leading spaces, unicode, emoji and newlines (the issue's parity set).
TEXTS = (
    "Hello 123 world",
    "2024 was 12345 and 3.14159",
    "  two leading spaces",
    " one leading space",
    "naïve café — “quotes” über",
    "emoji 😀🎉 and 👍🏽",
    "tab\there\n\nnewlines\r\nand more\n",
    "<|im_start|>user\nIs it fine?<|im_end|>\n<|im_start|>assistant\n",
    "日本語のテキスト와 한국어",
    "It's don't I'll we've",
    "   ",
    "x = [1,2,3]; print(x)  # code",
)
CORPUS = [t * 3 for t in TEXTS] + [
    "the quick brown fox jumps over the lazy dog " * 5,
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 2048 4096",
    "Is the following statement something you would say? No. Never. Yes. Sure.",
]


def _bpe_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained here (deterministic), with chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _randomise(model, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if ("norm" in name or "bias" in name) else 0.5
            base = 1.0 if ("norm" in name and "gemma" not in type(model).__name__.lower()) else 0
            p.copy_(base + scale * torch.randn(p.shape, generator=gen))
    return model.eval()


def _hf_folder(tmp_path, config):
    model = _randomise(transformers.AutoModelForCausalLM.from_config(config))
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    return folder


def _tokens(vocab: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (B, T)).astype(np.int32)


@jax.jit
def _forward(model, tokens):
    return model(tokens)


def _hf_gguf_logits(folder, name, tokens) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _same_config(a, b) -> bool:
    """Configs equal up to the float32 rounding of ``norm_eps`` (GGUF stores it as float32)."""
    import dataclasses

    eps = float(np.float32(b.norm_eps))
    return a == dataclasses.replace(b, norm_eps=eps) or a == b


def _rel_err(out, ref) -> float:
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


def _config(family: str, vocab: int, **kw):
    sizes = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    sizes["num_attention_heads"], sizes["num_key_value_heads"] = 4, 2
    if family == "llama":
        return transformers.LlamaConfig(**sizes, tie_word_embeddings=False, **kw)
    if family == "qwen2":
        return transformers.Qwen2Config(**sizes, tie_word_embeddings=True, **kw)
    if family == "gemma":
        return transformers.GemmaConfig(**sizes, head_dim=16, **kw)
    return transformers.OlmoConfig(**sizes, clip_qkv=2.0, **kw)


@pytest.mark.parametrize("num_heads", [1, 3, 8])
def test_unpermute_rope_rows_matches_transformers(num_heads):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.default_rng(num_heads).normal(size=(num_heads * 8, 5)).astype(np.float32)
    theirs = LlamaTensorProcessor()._reverse_permute_weights(w, num_heads, num_heads)
    np.testing.assert_array_equal(unpermute_rope_rows(w, num_heads), theirs)
    np.testing.assert_array_equal(
        permute_rope_rows(unpermute_rope_rows(w, num_heads), num_heads), w
    )
    assert not np.array_equal(unpermute_rope_rows(w, num_heads), w)  # it does permute


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_1"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_load_gguf_matches_transformers(tmp_path, family, qtype):
    tok = _bpe_tokenizer()
    V = tok.get_vocab_size()
    folder = _hf_folder(tmp_path, _config(family, V))
    ours_hf = load_causal_lm(folder)
    name = f"tiny-{family}-{qtype}.gguf"
    pre = "llama-bpe" if family == "llama" else "qwen2"
    save_gguf(
        ours_hf,
        folder / name,
        qtype=qtype,
        tokenizer=tok,
        pre_tokenizer=pre,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    model = load_gguf(folder / name)
    assert _same_config(model.config, ours_hf.config)
    tokens = _tokens(V)
    out = np.asarray(_forward(model, jnp.asarray(tokens)))
    ref = _hf_gguf_logits(folder, name, tokens)
    err = _rel_err(out, ref)
    assert err <= RTOL, f"{family} {qtype}: max error / max |logit| = {err:.2e}"
    if qtype == "F32":  # lossless: the GGUF round trip gives the Hugging Face folder's model
        hf = np.asarray(_forward(ours_hf, jnp.asarray(tokens)))
        assert _rel_err(out, hf) <= ROUNDTRIP_RTOL
    else:  # control: quantisation moved the weights, so the check above had something to find
        hf = np.asarray(_forward(ours_hf, jnp.asarray(tokens)))
        assert _rel_err(out, hf) > 10 * RTOL


def test_load_gguf_fails_parity_without_unpermuting(tmp_path, monkeypatch):
    """Control: a reader that forgets the Q/K un-permutation disagrees with transformers."""
    tok = _bpe_tokenizer()
    V = tok.get_vocab_size()
    folder = _hf_folder(tmp_path, _config("llama", V))
    save_gguf(load_causal_lm(folder), folder / "m.gguf", tokenizer=tok)
    monkeypatch.setattr("sims.checkpoints.gguf.unpermute_rope_rows", lambda w, n: w)
    out = np.asarray(_forward(load_gguf(folder / "m.gguf"), jnp.asarray(_tokens(V))))
    assert _rel_err(out, _hf_gguf_logits(folder, "m.gguf", _tokens(V))) > 100 * RTOL


@pytest.mark.parametrize("family", ["gemma", "olmo"])
def test_save_gguf_round_trips_gemma_and_olmo_with_llama_cpp_transforms(tmp_path, family):
    """transformers cannot read these GGUFs; check the stored tensors follow llama.cpp's
    converter (Gemma: norms + 1, unpermuted Q/K; OLMo: permuted Q/K, layer-norm eps key) and that
    the file reads back to the same model."""
    V = 96
    folder = _hf_folder(tmp_path, _config(family, V))
    ours = load_causal_lm(folder)
    save_gguf(ours, tmp_path / "m.gguf")
    reader = open_gguf(tmp_path / "m.gguf")
    raw = {t.name: np.asarray(t.data) for t in reader.tensors}
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()
    q = hf["model.layers.1.self_attn.q_proj.weight"].numpy()
    if family == "gemma":
        norm = hf["model.layers.0.input_layernorm.weight"].numpy()
        np.testing.assert_allclose(raw["blk.0.attn_norm.weight"], norm + 1, rtol=1e-6)
        np.testing.assert_array_equal(raw["blk.1.attn_q.weight"], q)
    else:
        from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

        undo = LlamaTensorProcessor()._reverse_permute_weights(raw["blk.1.attn_q.weight"], 4, 4)
        np.testing.assert_array_equal(undo, q)
        assert "olmo.attention.layer_norm_epsilon" in reader.fields
        assert gguf_config(reader).clip_qkv == 2.0
    back = load_gguf(tmp_path / "m.gguf")
    assert _same_config(back.config, ours.config)
    tokens = jnp.asarray(_tokens(V))
    assert _rel_err(np.asarray(_forward(back, tokens)), np.asarray(_forward(ours, tokens))) <= (
        ROUNDTRIP_RTOL
    )


#: Byte sizes and float16 scale offsets of one block of each type (ggml-common.h layouts);
#: the types transformers' own kernels dequantise (our independent reference).
BLOCKS = {
    "Q4_0": (18, (0,)),
    "Q4_1": (20, (0, 2)),
    "Q8_0": (34, (0,)),
    "Q2_K": (84, (80, 82)),
    "Q3_K": (110, (108,)),
    "Q4_K": (144, (0, 2)),
    "Q5_K": (176, (0, 2)),
    "Q6_K": (210, (208,)),
}


@pytest.mark.parametrize("kind", ["F16", "BF16", *BLOCKS])
def test_gguf_dequantisation_matches_transformers_kernels(tmp_path, kind):
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    from sims.checkpoints.gguf import _dequantize

    qt = gguf.GGMLQuantizationType[kind]
    rng = np.random.default_rng(7)
    rows, cols = 4, 512
    if kind in ("F16", "BF16"):
        values = rng.normal(size=(rows, cols)).astype(np.float32)
        data = gguf.quants.quantize(values, qt)
        bits = values.view(np.uint32)  # reference: round to nearest even in NumPy
        expected = (
            values.astype(np.float16).astype(np.float32)
            if kind == "F16"
            else ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).view(np.float32)
        )
    else:
        size, scales = BLOCKS[kind]
        block_elems = 256 if kind.endswith("_K") else 32
        nblocks = rows * cols // block_elems
        data = rng.integers(0, 256, (nblocks, size), dtype=np.uint8)
        for off in scales:  # finite float16 scales (random bytes could be NaN)
            data[:, off : off + 2] = (
                rng.uniform(0.01, 0.1, nblocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
            )
        data = data.reshape(rows, -1)
    writer = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    writer.add_tensor("w", data, raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = open_gguf(tmp_path / "q.gguf").tensors[0]
    ours = _dequantize(tensor, "q.gguf")
    assert ours.shape == (rows, cols)
    if kind in ("F16", "BF16"):
        np.testing.assert_array_equal(ours, expected)
        return
    raw = np.ascontiguousarray(np.asarray(tensor.data)).view(np.uint8).reshape(-1)
    theirs = hf_dequantize(torch.from_numpy(raw.copy()), int(qt)).float().numpy()
    np.testing.assert_allclose(ours.reshape(-1), theirs.reshape(-1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "default"])
def test_gguf_tokenizer_matches_transformers(tmp_path, pre):
    tok = _bpe_tokenizer()
    V = tok.get_vocab_size()
    folder = _hf_folder(tmp_path, _config("qwen2", V))
    save_gguf(
        load_causal_lm(folder),
        folder / "t.gguf",
        tokenizer=tok,
        pre_tokenizer=pre,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template="{{ messages[0]['content'] }}",
    )
    ours = load_tokenizer(folder / "t.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(folder, gguf_file="t.gguf")
    for text in TEXTS:
        assert ours.encode(text).ids == theirs(text).input_ids, f"{pre}: {text!r}"
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    assert special_tokens(folder / "t.gguf") == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
    }
    assert chat_template(folder / "t.gguf") == "{{ messages[0]['content'] }}"


def test_gguf_tokenizer_smollm_splits_digits_and_honours_add_bos(tmp_path):
    tok = _bpe_tokenizer()
    assert any(t.isdigit() and len(t) > 1 for t in tok.get_vocab())  # digit merges exist
    folder = _hf_folder(tmp_path, _config("qwen2", tok.get_vocab_size()))
    save_gguf(
        load_causal_lm(folder),
        tmp_path / "s.gguf",
        tokenizer=tok,
        pre_tokenizer="smollm",
        bos_token="<|im_start|>",
    )
    ids = load_tokenizer(tmp_path / "s.gguf").encode("2048 and 100").ids
    pieces = [load_tokenizer(tmp_path / "s.gguf").id_to_token(i) for i in ids]
    assert pieces[:4] == ["2", "0", "4", "8"]  # llama.cpp's smollm split: one digit per piece
    writer_path = tmp_path / "s.gguf"
    reader = open_gguf(writer_path)
    assert reader.fields.get("tokenizer.ggml.add_bos_token") is None
    # a file that asks for BOS gets it prepended (llama.cpp's behaviour)
    w = gguf.GGUFWriter(str(tmp_path / "b.gguf"), "qwen2")
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            value = field.contents()
            if isinstance(value, list):
                w.add_array(key, value) if key != "tokenizer.ggml.token_type" else (
                    w.add_token_types(value)
                )
            elif key.endswith("_id"):
                w.add_uint32(key, value)
            else:
                w.add_string(key, value)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    bos = tok.token_to_id("<|im_start|>")
    assert load_tokenizer(tmp_path / "b.gguf").encode("hi").ids[0] == bos


def test_load_gguf_errors_name_the_file_and_the_field(tmp_path):
    V = 96
    folder = _hf_folder(tmp_path, _config("llama", V))
    save_gguf(load_causal_lm(folder), tmp_path / "m.gguf", qtype="Q8_0")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.gguf: not a readable GGUF file"):
        load_gguf(tmp_path / "cut.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(InputError, match=r"junk\.gguf: not a readable GGUF file"):
        load_gguf(tmp_path / "junk.gguf")
    with pytest.raises(InputError, match="GGUF file not found"):
        load_gguf(tmp_path / "missing.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "arch.gguf"), "falcon")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InputError, match=r"arch\.gguf: general\.architecture must be one of"):
        load_gguf(tmp_path / "arch.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "nokey.gguf"), "llama")
    w.add_block_count(1)
    w.add_vocab_size(10)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        InputError, match=r"nokey\.gguf: GGUF metadata key 'llama\.embedding_length"
    ):
        load_gguf(tmp_path / "nokey.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "q81.gguf"), "llama")  # a type gguf.quants cannot read
    w.add_tensor("w", np.zeros((2, 40), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from sims.checkpoints.gguf import _dequantize

    with pytest.raises(InputError, match="has type Q8_1, which gguf.quants cannot dequantise"):
        _dequantize(open_gguf(tmp_path / "q81.gguf").tensors[0], "q81.gguf")


@pytest.mark.slow
def test_packaged_smollm2_matches_transformers():
    """The packaged SmolLM2-135M-Instruct (Q4_1) against transformers' GGUF loading."""
    from sims.checkpoints.packaged import PACKAGED_MODELS, packaged_path

    try:
        path = packaged_path("smollm2")
    except InputError as err:
        pytest.skip(str(err))
    tok = load_tokenizer("smollm2")
    theirs_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert tok.encode(text).ids == theirs_tok(text).input_ids, repr(text)
    model = load_causal_lm("smollm2")
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size, c.tied) == (
        30,
        576,
        9,
        3,
        49152,
        True,
    )
    assert c.num_parameters == 134_515_008  # the file's tensor sizes add up to the model card's
    prompt = TEXTS[7] + "No"
    ids = np.asarray([tok.encode(prompt).ids], np.int32)
    out = np.asarray(_forward(model, jnp.asarray(ids)))
    ref = _hf_gguf_logits(path.parent, path.name, ids)
    assert _rel_err(out, ref) <= RTOL
    assert PACKAGED_MODELS["smollm2"].description.endswith("not the original bf16 weights")
