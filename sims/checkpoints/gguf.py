r"""llama.cpp GGUF files: read one into a :class:`~sims.models.decoder.DecoderLM`, write one.

GGUF is llama.cpp's single-file format: metadata key/values (architecture sizes under
``{arch}.*``, the tokenizer under ``tokenizer.ggml.*``, the chat template) and tensors, often
quantised in blocks. Reading goes through ggml's own Python package ``gguf``: ``GGUFReader`` for
the file and ``gguf.quants.dequantize`` for every tensor type it implements (F32, F16, BF16, Q8_0,
Q4_0, Q4_1, Q5_0, Q5_1, the K-quants Q2_K..Q6_K, the IQ types, ...). What each architecture needs
(metadata keys, tensor names, the converter's transforms: the Q/K row permutation of Llama and
OLMo, Gemma's norm offset) is read from its :class:`sims.checkpoints.families.Family` record.

Dequantised 4-bit weights are a real pretrained model, but not the original bf16 weights: every
experiment output on a quantised file says so (:func:`gguf_description`).

:func:`save_gguf` writes a :class:`~sims.models.decoder.DecoderLM` (and a byte-level BPE tokenizer)
as
llama.cpp's converter would, quantising with ``gguf.quants.quantize`` (F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1): the tests use it to make tiny GGUFs that ``transformers`` also reads
(``from_pretrained(folder, gguf_file=...)``), for parity checks.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sims.checkpoints.families import (
    GGUF_FAMILIES,
    GGUF_SIZE_KEYS,
    GGUF_TENSOR_NAMES,
    Family,
    permute_rope_rows,
    read_keys,
    unpermute_rope_rows,
)
from sims.errors import InputError
from sims.models.decoder import DecoderConfig, DecoderLM

_MISSING = object()
#: Tensor types :func:`save_gguf` can write (``gguf.quants.quantize`` implements them).
WRITABLE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


@functools.lru_cache(maxsize=2)
def _open(path: str, mtime_ns: int, size: int):
    import gguf

    return gguf.GGUFReader(path)


def open_gguf(path: str | Path):
    """Return a ``gguf.GGUFReader`` of ``path`` (cached per file version: the model and its
    tokenizer share one parse, which takes seconds for a 49k-token vocabulary).

    Raises:
      InputError: missing file, or not a readable GGUF file (bad magic, truncated, an unknown
        tensor type); the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: GGUF file not found")
    stat = path.stat()
    try:
        return _open(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    except Exception as err:  # noqa: BLE001 -- GGUFReader raises many kinds on a bad file
        raise InputError(
            f"{path}: not a readable GGUF file ({type(err).__name__}: {err}; truncated?)"
        ) from None


def metadata(reader, key: str, default: Any = _MISSING, *, path: str | Path = "") -> Any:
    """Return the value of metadata ``key`` (Python scalars, strings, or lists).

    Raises:
      InputError: ``key`` is absent and no ``default`` is given (names the file and the key).
    """
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise InputError(f"{path}: GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def gguf_family(reader, *, path: str | Path = "") -> Family:
    """Return the :class:`~sims.checkpoints.families.Family` of the file's ``general.architecture``.

    Raises:
      InputError: an architecture the loaders do not implement (names it and the choices).
    """
    arch = metadata(reader, "general.architecture", path=path)
    if arch not in GGUF_FAMILIES:
        raise InputError(
            f"{path}: general.architecture must be one of {sorted(GGUF_FAMILIES)}, got {arch!r}"
        )
    return GGUF_FAMILIES[arch]


def _tensor_names(reader) -> dict[str, Any]:
    return {t.name: t for t in reader.tensors}


def gguf_config(reader, *, path: str | Path = "") -> DecoderConfig:
    """Return the :class:`~sims.models.decoder.DecoderConfig` a GGUF file describes.

    Sizes come from ``{arch}.*`` metadata (:data:`sims.checkpoints.families.GGUF_SIZE_KEYS`); which
    biases
    exist and whether the unembedding is tied come from the tensors present (``output.weight``
    absent: tied), as in llama.cpp; rope scaling from ``{arch}.rope.scaling.*`` (``none`` or
    ``linear``) or the ``rope_freqs.weight`` tensor (Llama-3.1 per-frequency factors).

    Raises:
      InputError: a missing required key, an unsupported architecture, rope type or partial
        rotary dimension, or values :class:`~sims.models.decoder.DecoderConfig` refuses; each names
        the
        file and the key.
    """
    family = gguf_family(reader, path=path)
    arch = family.gguf_architecture
    tensors = _tensor_names(reader)
    sizes: dict[str, int] = {}
    for field, (key, default) in GGUF_SIZE_KEYS.items():
        value = metadata(reader, f"{arch}.{key}", None, path=path)
        if value is not None:
            sizes[field] = int(value)
        elif default == "tokens":
            tokens = metadata(reader, "tokenizer.ggml.tokens", None, path=path)
            embed = tensors.get("token_embd.weight")
            if tokens is None and embed is None:
                raise InputError(f"{path}: cannot tell the vocabulary size (no {arch}.vocab_size)")
            sizes[field] = len(tokens) if tokens is not None else int(embed.shape[-1])
        elif default is None:
            raise InputError(f"{path}: GGUF metadata key {arch + '.' + key!r} is missing")
        elif default == "num_heads":
            sizes[field] = sizes["num_heads"]
        elif default == "hidden_size // num_heads":
            sizes[field] = sizes["hidden_size"] // sizes["num_heads"]
        else:
            sizes[field] = default
    rot = metadata(reader, f"{arch}.rope.dimension_count", sizes["head_dim"], path=path)
    if int(rot) != sizes["head_dim"]:
        raise InputError(
            f"{path}: {arch}.rope.dimension_count must equal the head size {sizes['head_dim']} "
            f"(partial rotary embeddings are not supported), got {rot}"
        )
    scaling = metadata(reader, f"{arch}.rope.scaling.type", "none", path=path)
    if scaling not in ("none", "linear"):
        raise InputError(
            f"{path}: {arch}.rope.scaling.type must be none or linear, got {scaling!r}"
        )
    factors: tuple[float, ...] = ()
    if "rope_freqs.weight" in tensors:
        factors = tuple(float(f) for f in _dequantize(tensors["rope_freqs.weight"], path))
    keyed = read_keys(
        family.gguf_keys,
        lambda k: metadata(reader, f"{arch}.{k}", path=path),
        lambda k: f"{arch}.{k}" in reader.fields,
    )
    keyed.setdefault("clip_qkv", None)
    try:
        return DecoderConfig(
            model_type=family.model_type,
            **sizes,
            norm=family.norm,
            norm_eps=float(keyed["norm_eps"]),
            activation=family.activation,
            qkv_bias="blk.0.attn_q.bias" in tensors,
            o_bias="blk.0.attn_output.bias" in tensors,
            mlp_bias="blk.0.ffn_up.bias" in tensors,
            tied="output.weight" not in tensors,
            embed_scale=family.embed_scale(sizes["hidden_size"]),
            clip_qkv=None if keyed["clip_qkv"] is None else float(keyed["clip_qkv"]),
            rope_theta=float(metadata(reader, f"{arch}.rope.freq_base", 10000.0, path=path)),
            rope_type="linear" if scaling == "linear" else "default",
            rope_factor=float(metadata(reader, f"{arch}.rope.scaling.factor", 1.0, path=path)),
            rope_original_max_len=sizes["max_position_embeddings"],
            rope_freq_factors=factors,
        )
    except (ValueError, TypeError) as err:
        raise InputError(f"{path}: {err}") from None


def _dequantize(tensor, path) -> np.ndarray:
    """The float32 array of a GGUF tensor, in NumPy (row-major, Hugging Face) axis order."""
    from gguf import quants

    try:
        arr = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as err:
        raise InputError(
            f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which "
            f"gguf.quants cannot dequantise ({err})"
        ) from None
    shape = tuple(int(n) for n in reversed(list(tensor.shape)))  # GGUF lists ne0 (innermost) first
    return np.asarray(arr, dtype=np.float32).reshape(shape)


def gguf_description(path: str | Path) -> str:
    """Return a one-line description of a GGUF file's weights: name, architecture, tensor types.

    Says plainly when weights are quantised: dequantised weights are a real pretrained model but
    not the original floating-point weights.
    """
    from sims.checkpoints.packaged import describe_packaged

    packaged = describe_packaged(path)
    if packaged:
        return packaged
    reader = open_gguf(path)
    name = metadata(reader, "general.name", Path(path).name)
    kinds = sorted({t.tensor_type.name for t in reader.tensors})
    quantised = [k for k in kinds if k not in ("F32", "F16", "BF16", "F64")]
    note = (
        f"; quantised ({', '.join(quantised)}) weights dequantised on load: a real model but not "
        "the original floating-point weights"
        if quantised
        else ""
    )
    return (
        f"{name} (GGUF, {metadata(reader, 'general.architecture', '?')}, {'/'.join(kinds)}{note})"
    )


def load_gguf(
    path: str | Path,
    *,
    dtype=jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    remat: bool = False,
) -> DecoderLM:
    """Return the :class:`~sims.models.decoder.DecoderLM` stored in a llama.cpp GGUF file.

    Every tensor is dequantised to float32 (``gguf.quants.dequantize``), the converter's
    transforms are undone (Llama/OLMo Q/K row permutation, Gemma's norm offset; see
    :mod:`sims.checkpoints.families`), then cast to ``dtype``. Logits match ``transformers``' own
    GGUF
    loading to ~1e-6 of the largest logit (tests, F32/Q8_0/Q4_1 files of Llama and Qwen2).

    Raises:
      InputError: a bad file (names it and the key or tensor): see :func:`open_gguf`,
        :func:`gguf_config`; a missing or misshapen tensor; a non-finite weight; an unexpected
        tensor.
    """
    from sims.checkpoints.hf import assemble_model

    path = Path(path)
    reader = open_gguf(path)
    family = gguf_family(reader, path=path)
    config = gguf_config(reader, path=path)
    tensors = _tensor_names(reader)
    heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}
    used = {"rope_freqs.weight"}

    def read(param: str, name: str) -> np.ndarray:
        if name not in tensors:
            raise InputError(f"{path}: GGUF file lacks tensor {name!r} of a {family.model_type}")
        used.add(name)
        arr = _dequantize(tensors[name], path)
        proj = param.split(".")[-2]
        if family.gguf_permuted_qk and proj in heads:
            arr = unpermute_rope_rows(arr, heads[proj])
        if family.gguf_norm_offset and param.endswith("norm.weight"):
            arr = arr - np.float32(family.gguf_norm_offset)
        return arr

    model = assemble_model(
        config, read, GGUF_TENSOR_NAMES, source=str(path), dtype=dtype, mesh=mesh, remat=remat
    )
    extra = sorted(set(tensors) - used)
    if extra:
        raise InputError(f"{path}: unexpected tensors for a {family.model_type} model: {extra[:5]}")
    return model


def save_gguf(
    model: DecoderLM,
    path: str | Path,
    *,
    qtype: str = "F32",
    embed_qtype: str | None = None,
    tokenizer=None,
    pre_tokenizer: str = "default",
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    chat_template: str | None = None,
    name: str = "sims model",
) -> Path:
    """Write ``model`` as a llama.cpp GGUF file, as ``convert_hf_to_gguf.py`` would; return it.

    Two-dimensional weights are stored as ``qtype`` (the embedding/unembedding as
    ``embed_qtype``, default ``qtype``), norms and biases as F32, as llama.cpp does. The
    family's transforms are applied (Q/K row permutation, Gemma's norm offset). With
    ``tokenizer`` (a byte-level BPE ``tokenizers.Tokenizer``) the ``tokenizer.ggml.*`` metadata
    is written too: tokens, token types (added special tokens are CONTROL), merges,
    ``pre_tokenizer`` (llama.cpp's ``tokenizer.ggml.pre`` name) and special token ids.

    Raises:
      ValueError: ``qtype`` not in :data:`WRITABLE_TYPES`, a config GGUF cannot express
        (sliding windows), a tokenizer that is not byte-level BPE, an unknown special token.
    """
    import gguf

    from sims.checkpoints.families import FAMILIES
    from sims.checkpoints.hf import named_tensors

    for label, kind in (("qtype", qtype), ("embed_qtype", embed_qtype or qtype)):
        if kind not in WRITABLE_TYPES:
            raise ValueError(f"{label} must be one of {WRITABLE_TYPES}, got {kind!r}")
    c = model.config
    if c.sliding_windows:
        raise ValueError("sliding-window configs have no GGUF form here")
    family = FAMILIES[c.model_type]
    arch = family.gguf_architecture
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_block_count(c.num_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_vocab_size(c.vocab_size)
    if c.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(c.rope_factor)
    elif c.rope_type != "default":
        raise ValueError(
            f"rope_type {c.rope_type!r} is written by llama.cpp as rope_freqs; use "
            "rope_freq_factors"
        )
    eps_key = family.gguf_keys["norm_eps"][0]
    writer.add_float32(f"{arch}.{eps_key}", c.norm_eps)
    if c.clip_qkv is not None:
        writer.add_clamp_kqv(c.clip_qkv)
    if c.rope_freq_factors:
        writer.add_tensor("rope_freqs.weight", np.asarray(c.rope_freq_factors, np.float32))
    heads = {"q_proj": c.num_heads, "k_proj": c.num_kv_heads}
    param_of = {
        template.format(i=i): param
        for param, template in GGUF_TENSOR_NAMES.items()
        for i in range(c.num_layers)
    }
    for tname, arr in named_tensors(model, GGUF_TENSOR_NAMES).items():
        param = param_of[tname]
        arr = np.asarray(arr, dtype=np.float32)
        proj = param.split(".")[-2]
        if family.gguf_permuted_qk and proj in heads:
            arr = permute_rope_rows(arr, heads[proj])
        if family.gguf_norm_offset and param.endswith("norm.weight"):
            arr = arr + np.float32(family.gguf_norm_offset)
        kind = "F32"
        if arr.ndim == 2:
            embed = tname in ("token_embd.weight", "output.weight")
            kind = (embed_qtype or qtype) if embed else qtype
        qt = gguf.GGMLQuantizationType[kind]
        data = gguf.quants.quantize(arr, qt)
        writer.add_tensor(tname, data, raw_dtype=qt)
    if tokenizer is not None:
        _write_tokenizer(writer, tokenizer, pre_tokenizer, bos_token, eos_token, pad_token)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _write_tokenizer(writer, tokenizer, pre, bos, eos, pad) -> None:
    import json

    spec = json.loads(tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"tokenizer must be a byte-level BPE, got {spec['model']['type']}")
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for tok, idx in vocab.items():
        tokens[idx] = tok
    if any(t is None for t in tokens):
        raise ValueError("tokenizer ids must be contiguous from 0")
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    for tok, add in (
        (bos, writer.add_bos_token_id),
        (eos, writer.add_eos_token_id),
        (pad, writer.add_pad_token_id),
    ):
        if tok is not None:
            if tok not in vocab:
                raise ValueError(f"special token {tok!r} is not in the tokenizer's vocabulary")
            add(vocab[tok])


def tensor_types(path: str | Path) -> dict[str, int]:
    """Return ``{tensor type name: count}`` of a GGUF file (e.g. ``{"Q4_1": 210, ...}``)."""
    counts: dict[str, int] = {}
    for t in open_gguf(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))
