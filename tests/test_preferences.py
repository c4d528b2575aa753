"""Tests of sims.data.preferences: bad rows reported by line number, the token layout."""

import json

import numpy as np
import pytest

from sims.checkpoints.tokenization import word_level_tokenizer
from sims.data.preferences import (
    BadRow,
    describe_bad_rows,
    encode_preferences,
    parse_preference_lines,
    read_preference_jsonl,
    write_preference_jsonl,
)
from sims.errors import InputError

VOCAB = ("<pad>", "<bos>", "<eos>", "is", "it", "fine", "?", "no", "never", "yes", "sure", ".")
TOK = word_level_tokenizer(VOCAB, special_tokens=VOCAB[:3])


def _line(**kw) -> str:
    return json.dumps(kw)


def test_parse_preference_lines_reports_every_bad_row_by_line():
    lines = [
        _line(prompt="<bos> is it fine ?", chosen="no", rejected="never"),  # 1 good
        "{not json",  # 2
        _line(prompt="p", chosen="a"),  # 3 missing rejected
        _line(prompt="p", chosen=[{"role": "assistant", "content": "a"}], rejected="b"),  # 4
        _line(prompt="p", chosen="  ", rejected="b"),  # 5 empty chosen
        _line(prompt="p", chosen="a", rejected="a"),  # 6 identical
        "",  # 7 blank
        "[1, 2]",  # 8 not an object
        _line(prompt=" ", chosen="a", rejected="b"),  # 9 empty prompt
        _line(prompt="<bos> is it fine ?", chosen="yes", rejected="no", extra=1),  # 10 good
    ]
    rows, bad = parse_preference_lines(lines)
    assert [r.line for r in rows] == [1, 10]
    assert [b.line for b in bad] == [2, 3, 4, 5, 6, 7, 8, 9]
    reasons = dict(bad)
    assert "not valid JSON" in reasons[2]
    assert reasons[3] == "missing field(s) ['rejected']"
    assert "must be a string, got list" in reasons[4]
    assert reasons[5] == "empty chosen response"
    assert reasons[6] == "chosen and rejected responses are identical"
    assert reasons[7] == "blank line"
    assert "JSON object, got list" in reasons[8]
    assert reasons[9] == "empty prompt"


def test_write_and_read_preference_jsonl_round_trip(tmp_path):
    rows = [{"prompt": "<bos> is it fine ?", "chosen": "no", "rejected": "never ."}] * 2
    path = write_preference_jsonl(tmp_path / "d.jsonl", rows)
    back, bad = read_preference_jsonl(path)
    assert not bad and [r._asdict() for r in back] == [dict(line=i, **rows[0]) for i in (1, 2)]


def test_encode_preferences_layout_and_bad_rows():
    rows, _ = parse_preference_lines(
        [
            _line(prompt="<bos> is it fine ?", chosen="no", rejected="never ."),
            _line(prompt="<bos> is it fine ?", chosen="maybe", rejected="no"),  # unknown word
            _line(prompt="<bos> is it fine ? is it fine ?", chosen="no", rejected="yes"),  # long
            _line(prompt="<bos> is it", chosen="sure .", rejected="no"),
        ]
    )
    enc = encode_preferences(TOK, rows, max_len=8, eos_id=2, pad_id=0)
    assert enc.lines.tolist() == [1, 4]
    assert [b.line for b in enc.bad] == [2, 3]
    assert "cannot tokenize" in enc.bad[0].reason
    assert enc.bad[1] == BadRow(3, "over-long: 11 tokens > max_len=8")
    ids = {w: i for i, w in enumerate(VOCAB)}
    first = [ids[w] for w in ["<bos>", "is", "it", "fine", "?", "no", "<eos>"]]
    np.testing.assert_array_equal(enc.chosen.tokens[0], first + [0])  # padded to T = 8
    np.testing.assert_array_equal(
        enc.rejected.tokens[0],
        [ids[w] for w in ["<bos>", "is", "it", "fine", "?", "never", ".", "<eos>"]],
    )
    assert enc.chosen.prompt_len.tolist() == [5, 3] and enc.chosen.length.tolist() == [7, 6]
    assert enc.response_tokens.tolist() == [[1, 2], [2, 1]]  # without <eos>
    with pytest.raises(ValueError, match="no row could be encoded"):
        encode_preferences(TOK, rows[1:2], max_len=8, eos_id=2)


def test_encode_preferences_with_chat_template_renders_prompt():
    rows, _ = parse_preference_lines([_line(prompt="is it fine", chosen="no", rejected="yes")])
    template = "{{ bos_token }} {{ messages[0]['content'] }} ?"
    enc = encode_preferences(
        TOK, rows, max_len=9, eos_id=None, template=template, tokens={"bos_token": "<bos>"}
    )
    assert enc.chosen.tokens[0].tolist() == [1, 3, 4, 5, 6, 7]  # no <eos>: eos_id=None


GOOD = _line(prompt="<bos> is it fine ?", chosen="no", rejected="never")


def test_read_preference_jsonl_skips_a_line_that_is_not_utf8(tmp_path):
    """The probe of issue 21: one Latin-1 line lost the whole file (UnicodeDecodeError)."""
    path = tmp_path / "p.jsonl"
    row = {"prompt": "café ?", "chosen": "no", "rejected": "never"}
    latin1 = json.dumps(row, ensure_ascii=False).encode("latin-1")
    path.write_bytes(b"\n".join([GOOD.encode(), latin1, GOOD.encode()]) + b"\n")
    rows, bad = read_preference_jsonl(path)
    assert [r.line for r in rows] == [1, 3]
    assert [b.line for b in bad] == [2] and "not valid UTF-8" in bad[0].reason
    # '{"prompt": "caf' is 15 bytes, so the Latin-1 byte of é is byte 16 of the line
    assert bad[0].reason.endswith("at byte 16 of the line)")


def test_read_preference_jsonl_accepts_a_bom_and_crlf(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n" + GOOD.encode() + b"\r\n")
    rows, bad = read_preference_jsonl(path)
    assert not bad and [r.line for r in rows] == [1, 2] and rows[0].prompt == "<bos> is it fine ?"


@pytest.mark.parametrize("separator", ["\u2028", "\u0085", "\u2029"])
def test_read_preference_jsonl_splits_lines_at_newline_only(tmp_path, separator):
    """The probe of issue 21: a raw U+2028 (or U+0085) inside a JSON string is valid JSONL; split
    with ``splitlines`` it made three bad rows and shifted every later line number."""
    path = tmp_path / "p.jsonl"
    odd = json.dumps(
        {"prompt": f"a{separator}b", "chosen": "x", "rejected": "y"}, ensure_ascii=False
    )
    path.write_text("\n".join([odd, "{broken", GOOD]) + "\n", encoding="utf-8")
    rows, bad = read_preference_jsonl(path)
    assert [r.line for r in rows] == [1, 3] and rows[0].prompt == f"a{separator}b"
    assert [b.line for b in bad] == [2]


def test_describe_bad_rows_gives_the_count_and_first_reasons():
    bad = [BadRow(i, f"reason {i}") for i in range(1, 8)]
    text = describe_bad_rows(bad, limit=2)
    assert text == "7 row(s) skipped: line 1: reason 1; line 2: reason 2; ... (5 more)"
    assert describe_bad_rows([]) == "0 row(s) skipped"


def test_encode_preferences_without_a_usable_row_names_the_reasons():
    rows, _ = parse_preference_lines([_line(prompt="<bos> is it", chosen="maybe", rejected="no")])
    with pytest.raises(InputError, match=r"no row could be encoded: 1 row\(s\) skipped: line 1: "):
        encode_preferences(TOK, rows, max_len=8, eos_id=2)
