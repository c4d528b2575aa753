"""Tokenizers of Hugging Face checkpoint folders and prompt formatting (no ``transformers``).

:func:`load_tokenizer` reads ``tokenizer.json`` with the ``tokenizers`` library;
:func:`special_tokens` and :func:`chat_template` read ``tokenizer_config.json`` (and
``chat_template.jinja``); :func:`format_prompt` applies a chat template (needs ``jinja2``, which is
only a test extra; without a template the prompt is used as it is: plain concatenation);
:func:`word_level_tokenizer` builds the tokenizer of a word vocabulary such as
:data:`sims.data.corpus.VOCAB`, which :func:`sims.checkpoints.save_causal_lm` writes beside a model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


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


def load_tokenizer(path: str | Path):
    """Return the ``tokenizers.Tokenizer`` of a checkpoint folder (its ``tokenizer.json``).

    Raises:
      FileNotFoundError: no ``tokenizer.json`` (SentencePiece-only folders: convert with
        ``transformers`` once, ``AutoTokenizer.from_pretrained(p).save_pretrained(p)``).
    """
    from tokenizers import Tokenizer

    file = Path(path)
    file = file / "tokenizer.json" if file.is_dir() else file
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: the tokenizers library reads tokenizer.json")
    return Tokenizer.from_file(str(file))


def special_tokens(path: str | Path) -> dict[str, str]:
    """Return the special tokens (``bos_token``, ``eos_token``, ``pad_token``) a folder names.

    Read from ``tokenizer_config.json`` (strings or ``{"content": ...}`` entries); absent ones
    are left out.
    """
    file = Path(path) / "tokenizer_config.json"
    cfg = json.loads(file.read_text()) if file.exists() else {}
    out = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        tok = cfg.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok:
            out[key] = tok
    return out


def chat_template(path: str | Path) -> str | None:
    """Return the folder's chat template (Jinja source), or ``None`` when it has none.

    Looked up in ``chat_template.jinja`` (transformers >= 4.50 saves it there), then
    ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates of
    which ``"default"`` is taken).
    """
    folder = Path(path)
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    file = folder / "tokenizer_config.json"
    template = json.loads(file.read_text()).get("chat_template") if file.exists() else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template or None


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
