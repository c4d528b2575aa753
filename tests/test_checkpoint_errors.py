"""Loader errors name the file and the field (issue 21, probes of bad checkpoint folders).

Each case breaks one thing in a tiny checkpoint folder written by
:func:`sims.checkpoints.hf.save_causal_lm` and checks that
:func:`sims.checkpoints.hf.load_causal_lm`
(or the tokenizer loader) refuses it with :class:`sims.errors.InputError` naming the file and
the field -- before the fix these were raw ``JSONDecodeError``, ``AttributeError``, ``TypeError``,
``KeyError`` or ``SafetensorError`` messages without a path, or a silent load.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sims.checkpoints.hf import load_causal_lm, save_causal_lm
from sims.checkpoints.tokenization import load_tokenizer, special_tokens, word_level_tokenizer
from sims.errors import InputError
from sims.models.decoder import DecoderConfig, init_decoder

VOCAB = ("<pad>", "<bos>", "<eos>", "no", "never", "yes")


def _folder(tmp_path, *, tied: bool = False):
    config = DecoderConfig.llama(len(VOCAB), hidden_size=8, num_heads=2, num_layers=2, tied=tied)
    tok = word_level_tokenizer(VOCAB, special_tokens=VOCAB[:3])
    folder = tmp_path / "ckpt"
    save_causal_lm(init_decoder(config, seed=0), folder, tokenizer=tok, bos_token="<bos>")
    return folder


def _edit_config(folder, edit):
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_good_folder_loads(tmp_path):
    assert load_causal_lm(_folder(tmp_path)).config.num_layers == 2


def test_truncated_config_json_names_the_file(tmp_path):
    folder = _folder(tmp_path)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(InputError, match=r"ckpt/config\.json: not valid JSON .* line"):
        load_causal_lm(folder)


def test_config_json_that_is_not_an_object(tmp_path):
    folder = _folder(tmp_path)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(InputError, match=r"config\.json: must hold a JSON object, got list"):
        load_causal_lm(folder)


def test_config_json_with_a_bom_is_read(tmp_path):
    folder = _folder(tmp_path)
    (folder / "config.json").write_bytes(b"\xef\xbb\xbf" + (folder / "config.json").read_bytes())
    assert load_causal_lm(folder).config.vocab_size == len(VOCAB)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("hidden_size", None, r"hidden_size \(required for a llama\) is null"),
        ("hidden_size", "8", r"hidden_size must be an integer >= 1, got '8'"),
        ("num_hidden_layers", 0, r"num_hidden_layers must be an integer >= 1, got 0"),
        ("rms_norm_eps", -1, r"norm_eps must be a finite number > 0"),
        ("rms_norm_eps", 0, r"norm_eps must be a finite number > 0"),
        ("rope_parameters", {"rope_type": "default", "rope_theta": 0}, r"rope_theta must be"),
        ("rope_parameters", {"rope_type": "default", "rope_theta": -5.0}, r"rope_theta must be"),
        ("model_type", "gpt2", r"model_type must be one of"),
    ],
)
def test_bad_config_values_name_the_file_and_the_key(tmp_path, key, value, message):
    folder = _folder(tmp_path)
    _edit_config(folder, lambda c: c.update({key: value}))
    with pytest.raises(InputError, match=r"ckpt/config\.json: .*" + message):
        load_causal_lm(folder)


def test_missing_required_key(tmp_path):
    folder = _folder(tmp_path)
    _edit_config(folder, lambda c: c.pop("intermediate_size"))
    with pytest.raises(InputError, match=r"config\.json: intermediate_size .* is missing"):
        load_causal_lm(folder)


def test_truncated_safetensors_names_the_file(tmp_path):
    folder = _folder(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(InputError, match=r"model\.safetensors: not a readable safetensors file"):
        load_causal_lm(folder)


def _shard(folder):
    """Split model.safetensors into two shards with an index."""
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), 1):
        file = f"model-0000{i}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, folder / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_one_truncated_shard_of_two_is_named(tmp_path):
    folder = _folder(tmp_path)
    _shard(folder)
    assert load_causal_lm(folder).config.num_layers == 2  # the sharded folder itself is good
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:64])
    with pytest.raises(InputError, match=r"model-00002-of-00002\.safetensors: not a readable"):
        load_causal_lm(folder)


def test_index_without_weight_map(tmp_path):
    folder = _folder(tmp_path)
    _shard(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(InputError, match=r"index\.json: must hold a non-empty weight_map"):
        load_causal_lm(folder)


def test_dangling_symlink_says_the_target_is_missing(tmp_path):
    folder = _folder(tmp_path)
    blob = tmp_path / "blobs" / "abc123"
    blob.parent.mkdir()
    (folder / "model.safetensors").rename(blob)
    (folder / "model.safetensors").symlink_to(blob)
    assert load_causal_lm(folder).config.num_layers == 2  # a live symlink is followed
    blob.unlink()
    with pytest.raises(InputError, match=r"model\.safetensors: is a symlink to .*abc123, which"):
        load_causal_lm(folder)


def test_bad_dtype_is_refused_before_any_work(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("sims.checkpoints.hf.read_json", lambda *a: calls.append(a))
    with pytest.raises(InputError, match=r"dtype must be one of \['bfloat16', 'float32', "):
        load_causal_lm(_folder(tmp_path), dtype="bogus")
    assert not calls


def test_tied_config_with_a_distinct_lm_head_is_refused(tmp_path):
    folder = _folder(tmp_path)  # untied: lm_head.weight differs from the embedding
    _edit_config(folder, lambda c: c.update(tie_word_embeddings=True))
    with pytest.raises(InputError, match="tie_word_embeddings is true but lm_head.weight differs"):
        load_causal_lm(folder)
    # an lm_head.weight equal to the embedding (as some exporters write) is accepted
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert load_causal_lm(folder).lm_head is None


def test_nan_weights_are_refused_and_named(tmp_path):
    folder = _folder(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = np.nan
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has 1 NaN/inf"):
        load_causal_lm(folder)


def test_invalid_tokenizer_files_name_the_file(tmp_path):
    folder = _folder(tmp_path)
    (folder / "tokenizer.json").write_text('{"model": {"type": 3}}')
    with pytest.raises(InputError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text('{"bos_token": ')
    with pytest.raises(InputError, match=r"tokenizer_config\.json: not valid JSON"):
        special_tokens(folder)
    with pytest.raises(InputError, match="not found"):
        load_tokenizer(tmp_path / "nowhere")


def test_bfloat16_and_float64_loads(tmp_path):
    folder = _folder(tmp_path)
    assert load_causal_lm(folder, dtype=jnp.bfloat16).embed_tokens.weight.dtype == jnp.bfloat16
    assert load_causal_lm(folder, dtype="float64").embed_tokens.weight.dtype == jnp.float64
