"""TRL-style preference data (JSONL rows ``prompt``/``chosen``/``rejected``) as token batches.

:func:`read_preference_jsonl` reads a file and :func:`encode_preferences` tokenizes the rows for a
checkpoint's tokenizer into right-padded :class:`~sims.models.transformer.TokenBatch` pairs, the
input of
:class:`~sims.models.transformer.TransformerPairs` and :func:`sims.analysis.audit.audit_pairs`.
Every row that
cannot be used (a line that is not UTF-8, invalid JSON, missing or non-string fields, empty or
identical responses, a text the tokenizer cannot encode, a sequence over ``max_len`` tokens) is
returned as a :class:`BadRow` with its 1-based line number and the reason: nothing is dropped
silently.

Sequence layout (the paper's "[PROMPT]x[ASSISTANT]y[EOS]", Razin et al. 2024 §5): the prompt text
(plain, or rendered by the checkpoint's chat template,
:func:`sims.checkpoints.tokenization.format_prompt`)
is tokenized with the tokenizer's special tokens (e.g. a BOS; none when a chat template already
wrote them), each response is tokenized separately without special tokens and followed by the EOS
id, as TRL's DPO trainer does; the EOS token counts as a response token.
"""

from __future__ import annotations

import codecs
import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from sims.checkpoints.tokenization import format_prompt
from sims.errors import InputError
from sims.models.transformer import TokenBatch

FIELDS = ("prompt", "chosen", "rejected")


class PreferenceRow(NamedTuple):
    """One usable JSONL row: its 1-based ``line`` and the three texts."""

    line: int
    prompt: str
    chosen: str
    rejected: str


class BadRow(NamedTuple):
    """A skipped row: its 1-based ``line`` and why it was skipped."""

    line: int
    reason: str


def _check_row(line: int, obj) -> PreferenceRow | BadRow:
    if not isinstance(obj, dict):
        return BadRow(line, f"row must be a JSON object, got {type(obj).__name__}")
    missing = [f for f in FIELDS if f not in obj]
    if missing:
        return BadRow(line, f"missing field(s) {missing}")
    for f in FIELDS:
        if not isinstance(obj[f], str):
            kind = type(obj[f]).__name__
            return BadRow(
                line,
                f"field {f!r} must be a string, got {kind} (the conversational "
                "message-list format is not read)",
            )
    for f in ("chosen", "rejected"):
        if not obj[f].strip():
            return BadRow(line, f"empty {f} response")
    if not obj["prompt"].strip():
        return BadRow(line, "empty prompt")
    if obj["chosen"] == obj["rejected"]:
        return BadRow(line, "chosen and rejected responses are identical")
    return PreferenceRow(line, obj["prompt"], obj["chosen"], obj["rejected"])


def _parse_line(line: int, text: str) -> PreferenceRow | BadRow:
    if not text.strip():
        return BadRow(line, "blank line")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return BadRow(line, f"not valid JSON ({e.msg} at column {e.colno})")
    return _check_row(line, obj)


def _split(rows: Iterable[PreferenceRow | BadRow]) -> tuple[list[PreferenceRow], list[BadRow]]:
    good: list[PreferenceRow] = []
    bad: list[BadRow] = []
    for row in rows:
        (bad if isinstance(row, BadRow) else good).append(row)
    return good, bad


def parse_preference_lines(lines: Iterable[str]) -> tuple[list[PreferenceRow], list[BadRow]]:
    """Return ``(rows, bad)`` of JSONL text lines (line numbers from 1; blank lines are bad too).

    Example:
      >>> rows, bad = parse_preference_lines(['{"prompt": "p", "chosen": "a", "rejected": "b"}',
      ...                                     '{"prompt": "p", "chosen": "a"}'])
      >>> rows[0].chosen, bad[0]
      ('a', BadRow(line=2, reason="missing field(s) ['rejected']"))
    """
    return _split(_parse_line(i, text) for i, text in enumerate(lines, 1))


def read_preference_jsonl(path: str | Path) -> tuple[list[PreferenceRow], list[BadRow]]:
    """Return ``(rows, bad)`` of a TRL-style JSONL file (see :func:`parse_preference_lines`).

    Lines end at ``\n`` only (a trailing ``\r`` is dropped): a raw U+2028 or U+0085 inside a JSON
    string is text, not a line break, so line numbers are those of ``wc -l`` and editors. Each
    line is decoded as UTF-8 on its own: a line that is not (e.g. Latin-1) is a bad row with its
    reason, the other lines are kept. A UTF-8 byte-order mark at the start is skipped.

    Raises:
      FileNotFoundError, IsADirectoryError, PermissionError: the file cannot be read.
    """
    data = Path(path).read_bytes()
    data = data.removeprefix(codecs.BOM_UTF8)
    chunks = data.split(b"\n")
    if chunks[-1] == b"":  # the newline ending the last line opens no new line
        chunks.pop()
    out: list[PreferenceRow | BadRow] = []
    for i, chunk in enumerate(chunks, 1):
        try:
            text = chunk.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError as e:
            out.append(BadRow(i, f"not valid UTF-8 ({e.reason} at byte {e.start + 1} of the line)"))
            continue
        out.append(_parse_line(i, text))
    return _split(out)


def describe_bad_rows(bad: Sequence[BadRow], *, limit: int = 5) -> str:
    """Return a one-line account of skipped rows: their count and the first ``limit`` reasons.

    Example:
      >>> describe_bad_rows([BadRow(1, "blank line"), BadRow(4, "empty prompt")], limit=1)
      '2 row(s) skipped: line 1: blank line; ... (1 more)'
    """
    shown = "; ".join(f"line {b.line}: {b.reason}" for b in bad[:limit])
    more = f"; ... ({len(bad) - limit} more)" if len(bad) > limit else ""
    return f"{len(bad)} row(s) skipped" + (f": {shown}{more}" if bad else "")


def write_preference_jsonl(path: str | Path, rows: Iterable[PreferenceRow | dict]) -> Path:
    """Write ``rows`` as JSONL with the fields ``prompt``, ``chosen``, ``rejected``; return path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in rows:
        d = r if isinstance(r, dict) else r._asdict()
        lines.append(json.dumps({f: d[f] for f in FIELDS}))
    out.write_text("".join(line + "\n" for line in lines))
    return out


class EncodedPreferences(NamedTuple):
    """Token batches of the usable rows (leading axis ``N``), right-padded to one length ``T``.

    Attributes:
      chosen, rejected: :class:`~sims.models.transformer.TokenBatch` of prompt + response (+ EOS).
      lines: ``[N]`` the rows' 1-based line numbers.
      response_tokens: ``[N, 2]`` response lengths of chosen / rejected without the EOS.
      bad: rows skipped while encoding (tokenizer failures, over-long, empty after tokenizing).
    """

    chosen: TokenBatch
    rejected: TokenBatch
    lines: np.ndarray
    response_tokens: np.ndarray
    bad: list[BadRow]


def encode_preferences(
    tokenizer,
    rows: Sequence[PreferenceRow],
    *,
    max_len: int,
    eos_id: int | None,
    pad_id: int = 0,
    template: str | None = None,
    tokens: dict[str, str] | None = None,
) -> EncodedPreferences:
    """Return the :class:`EncodedPreferences` of ``rows`` for a ``tokenizers.Tokenizer``.

    Args:
      tokenizer: a ``tokenizers.Tokenizer`` (:func:`sims.checkpoints.tokenization.load_tokenizer`).
      rows: usable rows (:func:`read_preference_jsonl`).
      max_len: longest allowed sequence (prompt + response + EOS), tokens; longer rows are bad.
      eos_id: id appended to every response; ``None`` appends nothing.
      pad_id: id of right padding (never attended to by an earlier position).
      template: a chat template (:func:`sims.checkpoints.tokenization.chat_template`) or ``None``
      for plain
        concatenation.
      tokens: special tokens for the template
      (:func:`sims.checkpoints.tokenization.special_tokens`).

    Raises:
      InputError: no row could be encoded (the message gives the count and the first reasons).
    """
    encoded, bad, lines, resp = [], [], [], []
    for row in rows:
        try:
            prompt = format_prompt(row.prompt, template=template, tokens=tokens or {})
            p = tokenizer.encode(prompt, add_special_tokens=template is None).ids
            pair = [tokenizer.encode(r, add_special_tokens=False).ids for r in row[2:]]
        except Exception as e:  # tokenizers raises plain Exceptions (e.g. an unknown word)
            bad.append(BadRow(row.line, f"cannot tokenize: {e}"))
            continue
        if not p or not all(pair):
            bad.append(BadRow(row.line, "prompt or a response is empty after tokenizing"))
            continue
        tail = [] if eos_id is None else [eos_id]
        seqs = [p + r + tail for r in pair]
        longest = max(len(s) for s in seqs)
        if longest > max_len:
            bad.append(BadRow(row.line, f"over-long: {longest} tokens > max_len={max_len}"))
            continue
        encoded.append((len(p), seqs))
        lines.append(row.line)
        resp.append([len(r) for r in pair])
    if not encoded:
        raise InputError(f"no row could be encoded: {describe_bad_rows(bad)}")
    T = max(len(s) for _, seqs in encoded for s in seqs)
    batches = []
    for k in range(2):
        tok = np.full((len(encoded), T), pad_id, dtype=np.int32)
        for i, (_, seqs) in enumerate(encoded):
            tok[i, : len(seqs[k])] = seqs[k]
        prompt_len = np.array([p for p, _ in encoded], dtype=np.int32)
        length = np.array([len(seqs[k]) for _, seqs in encoded], dtype=np.int32)
        batches.append(TokenBatch(tok, prompt_len, length))
    return EncodedPreferences(
        batches[0], batches[1], np.array(lines), np.array(resp, dtype=np.int32), bad
    )


def encode_for_checkpoint(
    ckpt: Any, rows: Sequence[PreferenceRow], *, max_len: int
) -> EncodedPreferences:
    """:func:`encode_preferences` with an opened checkpoint's tokenizer, EOS and pad tokens (pad
    id 0 without one), chat template and special tokens.

    Raises:
      InputError: no row could be encoded.
    """
    return encode_preferences(
        ckpt.tokenizer,
        rows,
        max_len=max_len,
        eos_id=ckpt.special_id("eos_token"),
        pad_id=ckpt.special_id("pad_token", 0),
        template=ckpt.template,
        tokens=ckpt.special,
    )


def encode_preference_file(
    path: str | Path, ckpt: Any, *, max_len: int
) -> tuple[Any, Any, list[dict[str, str]]]:
    """Read a TRL preference JSONL and encode it for an opened checkpoint.

    Returns ``(chosen, rejected, rows)``: the token batches of the usable rows
    (:func:`encode_preferences` in the checkpoint's chat template, at most ``max_len`` tokens) and
    those rows as dicts. Bad rows are skipped as :func:`read_preference_jsonl` says.
    """
    rows, _ = read_preference_jsonl(path)
    enc = encode_for_checkpoint(ckpt, rows, max_len=max_len)
    warn_over_context(enc.chosen, enc.rejected, enc.lines, ckpt.model)
    by_line = {r.line: r for r in rows}  # rows the encoding skipped are not in enc.lines
    kept = [by_line[int(n)]._asdict() for n in enc.lines]
    return enc.chosen, enc.rejected, kept


def warn_over_context(chosen: Any, rejected: Any, lines: Sequence[int], model: Any) -> int:
    """Warn when encoded pairs are longer than the model's context; return how many are.

    A sequence past ``model.config.max_position_embeddings`` is still computed (rope
    extrapolates), but its log-probabilities and velocities are out of the model's range, so
    the rows are named in a ``UserWarning`` rather than scored silently. A model without that
    limit (no ``config.max_position_embeddings``) is never warned about.

    Example:
      >>> from types import SimpleNamespace as NS
      >>> m = NS(config=NS(max_position_embeddings=4))
      >>> b = NS(length=np.array([3, 6]))
      >>> import warnings
      >>> with warnings.catch_warnings(record=True):
      ...     warn_over_context(b, b, [1, 2], m)
      1
    """
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is None:
        return 0
    longest = np.maximum(np.asarray(chosen.length), np.asarray(rejected.length))
    over = np.flatnonzero(longest > limit)
    if over.size:
        named = ", ".join(str(int(lines[i])) for i in over[:10])
        more = "" if over.size <= 10 else f" and {over.size - 10} more"
        warnings.warn(
            f"{over.size} of {longest.size} pair(s) are longer than the model's context "
            f"(max_position_embeddings={limit}; longest {int(longest.max())} tokens): lines "
            f"{named}{more}; their numbers are extrapolated past the trained positions",
            UserWarning,
            stacklevel=2,
        )
    return int(over.size)
