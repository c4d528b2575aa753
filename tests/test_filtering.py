"""Tests of sims.protocols.filtering: the §6 filter against a brute-force sort, the per-row audit
records against an encoding built here by hand, and the files written from them."""

import csv
import functools
import json
import math

import numpy as np
import pytest

from sims.analysis.audit import PairAudit, audit_pairs
from sims.checkpoints.opened import tiny_random_checkpoint
from sims.data.preferences import PreferenceRow, read_preference_jsonl
from sims.models.transformer import TokenBatch
from sims.protocols.filtering import (
    RECORD_NUMBERS,
    AuditedRows,
    audit_rows,
    lowest_ches_lines,
    write_audit_files,
)
from theory.losses import make_loss

WORDS = ("Yes", "No", "Never")  # whole tokens of the byte-level test tokenizer
ROWS = [
    PreferenceRow(2, "Is it fine? ", "No", "Never"),  # single-token responses
    PreferenceRow(3, "Q: ", "a longer answer", "short"),
    PreferenceRow(5, "Is it fine? ", "x" * 40, "Yes"),  # over-long for MAX_LEN
    PreferenceRow(7, "Hi ", "Yes", "No"),  # single-token responses
]
MAX_LEN = 30  # tokens: row 5 (12 + 40 + 1) is over it, the others are not


def _audit_of(ches_ln, lines) -> AuditedRows:
    arrays = {f: np.asarray(ches_ln, float) for f in PairAudit._fields}
    return AuditedRows([], PairAudit(**arrays), np.asarray(lines), [])


def test_lowest_ches_lines_matches_a_brute_force_sort():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 30))
        ches_ln = rng.integers(-3, 4, n).astype(float)  # small integers: many ties
        lines = np.sort(rng.choice(1000, n, replace=False)) + 1
        fraction = float(rng.choice([0.0, 0.05, 0.3, 0.5, 1.0, rng.random()]))
        keep = math.ceil(fraction * n)
        ranked = sorted(range(n), key=lambda i: (ches_ln[i], i))  # ties: the earlier row
        want = sorted(int(lines[i]) for i in ranked[:keep])
        got = lowest_ches_lines(_audit_of(ches_ln, lines), fraction)
        assert got == want, (trial, fraction, ches_ln, lines)


def test_lowest_ches_lines_rounds_up_and_keeps_none_at_zero():
    audited = _audit_of([0.4, 0.1, 0.3, 0.2], [10, 20, 30, 40])
    assert lowest_ches_lines(audited, 0.3) == [20, 40]  # ceil(0.3 * 4) = 2 pairs
    assert lowest_ches_lines(audited, 0.0) == []
    assert lowest_ches_lines(audited, 1.0) == [10, 20, 30, 40]
    with pytest.raises(ValueError, match="fraction must be in \\[0, 1\\], got fraction=1.5"):
        lowest_ches_lines(audited, 1.5)


@functools.cache
def _audited():
    ckpt = tiny_random_checkpoint(seed=0, words=WORDS)
    progress = []
    audited = audit_rows(
        ckpt, ROWS, beta=0.2, max_len=MAX_LEN, batch_size=2, top_k=3, progress=progress.append
    )
    return ckpt, audited, progress


def _by_hand(ckpt, rows):
    """Token batches built here: prompt bytes, response bytes (or a whole word), then <eos>,
    right-padded with id 0 (a byte; the checkpoint pads with <pad>, id 256)."""
    eos = ckpt.tokenizer.token_to_id("<eos>")
    enc = [ckpt.tokenizer.encode(r.prompt).ids for r in rows]
    by_field = {
        field: [
            p + ckpt.tokenizer.encode(getattr(r, field)).ids + [eos]
            for p, r in zip(enc, rows, strict=True)
        ]
        for field in ("chosen", "rejected")
    }
    T = max(len(s) for v in by_field.values() for s in v)
    batches = []
    for seqs in by_field.values():
        tokens = np.zeros((len(rows), T), np.int32)  # padding is never attended to
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = s
        batches.append(
            TokenBatch(
                tokens,
                np.array([len(p) for p in enc], np.int32),
                np.array([len(s) for s in seqs], np.int32),
            )
        )
    return batches


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_audit_rows_skips_over_long_rows_and_keeps_line_numbers():
    _, audited, progress = _audited()
    assert [r["line"] for r in audited.records] == [2, 3, 7] == audited.lines.tolist()
    assert [b.line for b in audited.bad] == [5] and "over-long" in audited.bad[0].reason
    assert any(p.startswith("[audit] skipped line 5: over-long") for p in progress)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_audit_rows_records_equal_the_audit_of_a_hand_encoding():
    """The records are the audit of the encoding the rows ask for: a batch encoded here (padded
    with another id) gives the same numbers, line by line."""
    ckpt, audited, _ = _audited()
    chosen, rejected = _by_hand(ckpt, [ROWS[0], ROWS[1], ROWS[3]])
    loss = make_loss("dpo", beta=0.2)
    want = audit_pairs(ckpt.model, chosen, rejected, loss, batch_size=2, top_k=3)
    for k in RECORD_NUMBERS:
        np.testing.assert_allclose(
            [r[k] for r in audited.records], getattr(want, k), rtol=1e-5, atol=1e-6, err_msg=k
        )  # float32 model: equal up to the order of sums


def test_audit_rows_names_gainers_of_single_token_pairs_only():
    ckpt, audited, _ = _audited()
    single = {r["line"]: r for r in audited.records}
    assert single[2]["single_token"] and single[7]["single_token"]
    assert not single[3]["single_token"] and single[3]["gainers"] is None
    for line in (2, 7):
        i = audited.lines.tolist().index(line)
        names = [g["token"] for g in single[line]["gainers"]]
        assert names == [ckpt.tokenizer.id_to_token(int(z)) for z in audited.audit.gainers[i]]
        rates = [g["rate"] for g in single[line]["gainers"]]
        assert rates == sorted(rates, reverse=True)  # fastest first


def test_write_audit_files_round_trip(tmp_path):
    _, audited, _ = _audited()
    paths = write_audit_files(tmp_path, "x", audited, ROWS, kept=[3, 7])
    assert [p.name for p in paths] == ["x_pairs.csv", "x_pairs.jsonl", "x_filtered.jsonl"]
    with open(paths[0]) as fh:
        table = list(csv.DictReader(fh))
    for row, rec in zip(table, audited.records, strict=True):
        assert int(row["line"]) == rec["line"]
        assert all(float(row[k]) == rec[k] for k in RECORD_NUMBERS)  # repr round-trips floats
        want = " ".join(g["token"] for g in rec["gainers"]) if rec["gainers"] else ""
        assert row["gainers"] == want
    assert [json.loads(x) for x in paths[1].read_text().splitlines()] == audited.records
    kept, bad = read_preference_jsonl(paths[2])
    assert bad == [] and [r[1:] for r in kept] == [ROWS[1][1:], ROWS[3][1:]]  # lines 3 and 7
    other = write_audit_files(tmp_path / "new", "y", audited)  # the folder is made
    assert [p.name for p in other] == ["y_pairs.csv", "y_pairs.jsonl"]  # nothing kept: no filter
