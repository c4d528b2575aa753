r"""Tokenizers of checkpoints and prompt formatting (no ``transformers``).

:func:`load_tokenizer` reads a Hugging Face folder's ``tokenizer.json`` with the ``tokenizers``
library, or builds a ``tokenizers.Tokenizer`` from a llama.cpp GGUF file's ``tokenizer.ggml.*``
metadata (:func:`gguf_tokenizer`); :func:`special_tokens` and :func:`chat_template` read
``tokenizer_config.json`` (and ``chat_template.jinja``) or the GGUF metadata;
:func:`format_prompt` applies a chat template (needs ``jinja2``; without a template the prompt is
used as it is: plain concatenation); :func:`word_level_tokenizer` builds the tokenizer of a word
vocabulary such as :data:`sims.data.corpus.VOCAB`, which :func:`sims.checkpoints.hf.save_causal_lm`
writes beside a model.

GGUF tokenizers (``tokenizer.ggml.model == "gpt2"``: byte-level BPE, as SmolLM2, Llama 3 and
Qwen2 use) are rebuilt from the file's tokens, merges and token types, with the pre-tokenizer
llama.cpp runs for its ``tokenizer.ggml.pre`` name (:data:`GGUF_PRE_TOKENIZERS`). Tokens marked
CONTROL become special tokens, USER_DEFINED ones added tokens.

Reading (BOS): ``encode`` prepends the BOS token when the file says
``tokenizer.ggml.add_bos_token = true``, as llama.cpp does (and as Llama 3's own
``tokenizer.json`` does); ``transformers``' GGUF tokenizer ignores that flag for byte-level
vocabularies. SmolLM2's file says ``false``. Token ids equal ``transformers``' on digits, leading
spaces, unicode, emoji and newlines for files without the flag (tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sims.errors import InputError

#: llama.cpp pre-tokenizer names (``tokenizer.ggml.pre``) -> the split regexes it runs, in
#: order, before byte-level BPE (Source: llama.cpp ``llama-vocab.cpp``, ``llm_tokenizer_bpe``).
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,),
    "gpt2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT),  # each digit alone, then GPT-2's split
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
    "smaug-bpe": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
}


def word_level_tokenizer(vocab: Sequence[str], *, special_tokens: Sequence[str] = ()):
    """Return a ``tokenizers.Tokenizer`` mapping whitespace-separated words to ``vocab`` ids.

    Word ``vocab[i]`` gets id ``i``; ``special_tokens`` (members of ``vocab``) are registered as
    special. No unknown token: encoding a word outside ``vocab`` raises an ``Exception`` from
    ``tokenizers`` (callers report the row; nothing is mapped silently).

    Example:
      >>> tok = word_level_tokenizer(["<pad>", "no", "never"], special_tokens=["<pad>"])
      >>> tok.encode("never no").ids
      [2, 1]
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    if len(set(vocab)) != len(vocab):
        raise ValueError("vocab must not repeat a word")
    missing = [t for t in special_tokens if t not in vocab]
    if missing:
        raise ValueError(f"special_tokens must be in vocab, got unknown {missing}")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(special_tokens))
    return tok


def _is_gguf(path: Path) -> bool:
    return path.suffix == ".gguf" or (path.is_file() and path.read_bytes()[:4] == b"GGUF")


def _resolve(path: str | Path) -> Path:
    from sims.checkpoints.packaged import resolve_model

    return resolve_model(path)


def load_tokenizer(path: str | Path):
    """Return the ``tokenizers.Tokenizer`` of a checkpoint: a folder's ``tokenizer.json``, a
    ``tokenizer.json`` file, a GGUF file (:func:`gguf_tokenizer`) or a packaged model's name.

    Raises:
      InputError: no ``tokenizer.json`` (SentencePiece-only folders: convert with
        ``transformers`` once, ``AutoTokenizer.from_pretrained(p).save_pretrained(p)``), or a
        file the ``tokenizers`` library cannot read (names the file).
    """
    from tokenizers import Tokenizer

    file = _resolve(path)
    if _is_gguf(file):
        return gguf_tokenizer(file)
    file = file / "tokenizer.json" if file.is_dir() else file
    if not file.exists():
        raise InputError(f"{file}: not found (the tokenizers library reads tokenizer.json)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # noqa: BLE001 -- tokenizers raises a bare Exception
        raise InputError(f"{file}: not a valid tokenizer.json ({err})") from None


def _gguf_special_ids(reader, path) -> dict[str, int]:
    from sims.checkpoints.gguf import metadata

    keys = {
        "bos_token": "tokenizer.ggml.bos_token_id",
        "eos_token": "tokenizer.ggml.eos_token_id",
        "unk_token": "tokenizer.ggml.unknown_token_id",
        "pad_token": "tokenizer.ggml.padding_token_id",
    }
    out = {}
    for name, key in keys.items():
        value = metadata(reader, key, None, path=path)
        if value is not None:
            out[name] = int(value)
    return out


def special_tokens(path: str | Path) -> dict[str, str]:
    """Return the special tokens (``bos_token``, ``eos_token``, ``pad_token``) a checkpoint
    names.

    Read from a folder's ``tokenizer_config.json`` (strings or ``{"content": ...}`` entries) or
    a GGUF file's ``tokenizer.ggml.*_token_id``; absent ones are left out.

    Raises:
      InputError: an unreadable ``tokenizer_config.json`` (names the file).
    """
    from sims.checkpoints.hf import read_json

    p = _resolve(path)
    if _is_gguf(p):
        from sims.checkpoints.gguf import metadata, open_gguf

        reader = open_gguf(p)
        tokens = metadata(reader, "tokenizer.ggml.tokens", [], path=p)
        ids = _gguf_special_ids(reader, p)
        return {k: tokens[i] for k, i in ids.items() if k != "unk_token" and 0 <= i < len(tokens)}
    file = p / "tokenizer_config.json"
    cfg = read_json(file) if file.exists() else {}
    if not isinstance(cfg, dict):
        raise InputError(f"{file}: must hold a JSON object, got {type(cfg).__name__}")
    out = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        tok = cfg.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok:
            out[key] = tok
    return out


def chat_template(path: str | Path) -> str | None:
    """Return the checkpoint's chat template (Jinja source), or ``None`` when it has none.

    Looked up in a GGUF file's ``tokenizer.chat_template``; in a folder, in
    ``chat_template.jinja`` (transformers >= 4.50 saves it there), then
    ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates of
    which ``"default"`` is taken).
    """
    from sims.checkpoints.hf import read_json

    folder = _resolve(path)
    if _is_gguf(folder):
        from sims.checkpoints.gguf import metadata, open_gguf

        return metadata(open_gguf(folder), "tokenizer.chat_template", None, path=folder) or None
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    file = folder / "tokenizer_config.json"
    template = read_json(file) if file.exists() else {}
    template = template.get("chat_template") if isinstance(template, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template or None


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (``bytes_to_unicode``)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def gguf_tokenizer(path: str | Path):
    """Return the ``tokenizers.Tokenizer`` a GGUF file's ``tokenizer.ggml.*`` metadata describes.

    Byte-level BPE (``tokenizer.ggml.model == "gpt2"``): vocabulary from ``tokens`` (a token
    outside GPT-2's byte alphabet is respelled byte by byte, as ``transformers`` does), merges
    from ``merges``, the pre-tokenizer of ``tokenizer.ggml.pre`` (:data:`GGUF_PRE_TOKENIZERS`:
    each split regex isolated, then byte-level mapping), a byte-level decoder, CONTROL tokens
    (type 3) as special tokens and USER_DEFINED ones (type 4) as added tokens. BOS is prepended
    when ``tokenizer.ggml.add_bos_token`` is true (see the module's Reading).

    Source: llama.cpp ``llama-vocab.cpp``; ``transformers`` ``integrations/gguf`` for parity.

    Raises:
      InputError: a missing key, a tokenizer model other than ``gpt2`` (SentencePiece GGUFs:
        convert the original ``tokenizer.json``), or an unknown pre-tokenizer name (names the
        file and the value).
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    from sims.checkpoints.gguf import metadata, open_gguf

    p = Path(path)
    reader = open_gguf(p)
    kind = metadata(reader, "tokenizer.ggml.model", path=p)
    if kind != "gpt2":
        raise InputError(
            f"{p}: tokenizer.ggml.model must be gpt2 (byte-level BPE) to be rebuilt here, got "
            f"{kind!r}; use the model's original tokenizer.json instead"
        )
    pre = metadata(reader, "tokenizer.ggml.pre", "default", path=p)
    if pre not in GGUF_PRE_TOKENIZERS:
        raise InputError(
            f"{p}: tokenizer.ggml.pre must be one of {sorted(GGUF_PRE_TOKENIZERS)}, got {pre!r}"
        )
    tokens = metadata(reader, "tokenizer.ggml.tokens", path=p)
    types = metadata(reader, "tokenizer.ggml.token_type", [1] * len(tokens), path=p)
    merges = metadata(reader, "tokenizer.ggml.merges", path=p)
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {}
    for i, tok in enumerate(tokens):
        if not set(tok) <= alphabet:
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False)
    tokenizer = Tokenizer(bpe)
    splits = [
        pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in GGUF_PRE_TOKENIZERS[pre]
    ]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    control = [t for t, k in zip(tokens, types, strict=True) if k == 3 and set(t) <= alphabet]
    user = [t for t, k in zip(tokens, types, strict=True) if k == 4 and t in vocab]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    bos = _gguf_special_ids(reader, p).get("bos_token")
    if metadata(reader, "tokenizer.ggml.add_bos_token", False, path=p) and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A",
            pair=f"{tokens[bos]} $A $B",
            special_tokens=[(tokens[bos], bos)],
        )
    return tokenizer


def _raise_template_error(message: str):
    raise RuntimeError(f"the checkpoint's chat template raised: {message}")


def format_prompt(prompt: str, *, template: str | None, tokens: dict[str, str]) -> str:
    """Return the text that precedes a response: ``prompt`` itself, or the chat template applied.

    With ``template`` (from :func:`chat_template`) the prompt becomes one user message rendered
    with ``add_generation_prompt=True`` (the assistant header follows it), as TRL does;
    ``tokens`` supplies ``bos_token``/``eos_token`` to the template. ``template=None`` is plain
    concatenation: the response text follows ``prompt`` directly.

    Raises:
      RuntimeError: a template is given but ``jinja2`` is not installed, or it fails to render
        (the message says so; pass ``template=None`` for plain concatenation).

    Example:
      >>> format_prompt("Is it fine?", template=None, tokens={})
      'Is it fine?'
    """
    if template is None:
        return prompt
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise RuntimeError(
            "the checkpoint has a chat template but jinja2 is not installed, so it cannot be "
            "rendered; install jinja2 or use plain concatenation (chat template off)"
        ) from None
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise_template_error
    try:
        return env.from_string(template).render(
            messages=[{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            **{k: v for k, v in tokens.items() if k in ("bos_token", "eos_token")},
        )
    except jinja2.TemplateError as e:
        raise RuntimeError(f"the checkpoint's chat template cannot be rendered: {e}") from e


def encode_prompts(
    tokenizer: Any,
    questions: Sequence[str],
    *,
    template: str | None,
    special: dict[str, str],
    pad_id: int,
) -> Any:
    """Return the questions as right-padded prompts (``length == prompt_len``), one shape.

    With ``template`` each question is one user message followed by the assistant header
    (:func:`format_prompt`), encoded without added special tokens
    (the template writes them); plain prompts get the tokenizer's own.
    """
    ids = []
    for q in questions:
        text = format_prompt(q, template=template, tokens=special)
        ids.append(tokenizer.encode(text, add_special_tokens=template is None).ids)
    T = max(len(i) for i in ids)
    tokens = np.full((len(ids), T), pad_id, np.int32)
    for r, row in enumerate(ids):
        tokens[r, : len(row)] = row
    lengths = np.array([len(i) for i in ids], np.int32)
    from sims.models.transformer import TokenBatch

    return TokenBatch(tokens, lengths, lengths)
