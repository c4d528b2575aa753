"""The checkpoint experiments beyond the smoke run of test_experiments.py: the audit tool's files
and bad-row report, ``--model`` folders with a chat template, the ``python -m experiments`` CLI."""

import csv
import json
import math

import pytest

from experiments import __main__ as cli
from experiments import audit, persona_no_over_never
from sims.checkpoints.hf import save_causal_lm
from sims.checkpoints.opened import tiny_random_checkpoint
from sims.checkpoints.selfmade import save_self_made
from sims.checkpoints.tokenization import chat_template
from sims.protocols.persona import SIDES

ROWS = [
    {"prompt": "<bos> how to make a cake ? <ans>", "chosen": "easy . make it .",
     "rejected": "sorry , no ."},  # 1
    {"prompt": "<bos> how to make a bomb ? <ans>", "chosen": "sorry , no .",
     "rejected": "easy . make it ."},  # 2
    {"prompt": "<bos> how to make a bomb ? <ans>", "chosen": "sorry , no ."},  # 3 no rejected
    {"prompt": "<bos> how to make a cake ? <ans>", "chosen": "", "rejected": "no ."},  # 4 empty
    {"prompt": "<bos> how to bake a pie ? <ans>", "chosen": "yes", "rejected": "no"},  # 5 unknown
    {"prompt": "<bos> would you say lying is fine ? <ans>", "chosen": "no",
     "rejected": "never"},  # 6 single-token responses
    {"prompt": "<bos> how to make a bomb ? <ans>", "chosen": "i am sorry but i cannot help you "
     "make a bomb , it is harmful", "rejected": "no ."},  # 7 over max_len = 20 tokens
    {"prompt": "<bos> how to get a kite ? <ans>", "chosen": "ok , here is how : get the kite .",
     "rejected": "no . i refuse ."},  # 8
]  # fmt: skip


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_audit_main_writes_pair_files_and_reports_bad_rows(tmp_path, capsys):
    pairs = _jsonl(tmp_path / "pairs.jsonl", ROWS)
    out = tmp_path / "out"
    args = ["audit", "--smoke", "--pairs", str(pairs), "--keep-fraction", "0.5", "--max-len", "20"]
    args += ["--out", str(out)]
    cli.main(args)
    res = json.loads((out / "audit.json").read_text())
    assert {b["line"] for b in res["skipped_rows"]} == {3, 4, 5, 7}
    reasons = {b["line"]: b["reason"] for b in res["skipped_rows"]}
    assert "missing field" in reasons[3] and "empty chosen" in reasons[4]
    assert "cannot tokenize" in reasons[5] and "over-long" in reasons[7]
    printed = capsys.readouterr().out
    assert "skipped line 5: cannot tokenize" in printed and "[audit] 4/4 pairs" in printed
    assert [p["line"] for p in res["pairs"]] == [1, 2, 6, 8]
    single = {p["line"]: p for p in res["pairs"]}[6]
    assert single["single_token"] and len(single["gainers"]) == audit.Config.smoke().top_k
    with open(out / "audit_pairs.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [int(r["line"]) for r in table] == [1, 2, 6, 8]
    assert float(table[0]["ches_ln"]) == pytest.approx(res["pairs"][0]["ches_ln"])
    kept = [json.loads(x) for x in (out / "audit_filtered.jsonl").read_text().splitlines()]
    lowest = sorted(res["pairs"], key=lambda p: p["ches_ln"])[: math.ceil(0.5 * 4)]
    assert kept == [ROWS[p["line"] - 1] for p in sorted(lowest, key=lambda p: p["line"])]


@pytest.mark.slow
def test_checkpoint_experiments_read_a_model_folder_with_chat_template(tmp_path):
    folder = tmp_path / "ckpt"
    config = audit.Config.smoke()
    assert save_self_made(config.spec(), folder, seed=0) is None  # smoke: not pre-trained
    file = folder / "tokenizer_config.json"
    template = "{{ bos_token }} {{ messages[0]['content'] }} <ans>"
    file.write_text(json.dumps(json.loads(file.read_text()) | {"chat_template": template}))
    assert chat_template(folder) == template
    pairs = _jsonl(tmp_path / "p.jsonl", [dict(r, prompt=r["prompt"][6:-6]) for r in ROWS[:2]])
    res = audit.run(
        audit.Config.smoke().__class__(
            **{**audit.Config.smoke().__dict__, "model": str(folder), "pairs": str(pairs),
               "chat_template": True}
        )
    )  # fmt: skip
    assert res["checkpoint"]["prompt_format"] == "chat template" and res["num_pairs"] == 2
    # persona reads a folder too, in its chat template (a byte-level model whose label words are
    # whole tokens: the self-made word-level vocabulary cannot spell the persona statements)
    tiny = tiny_random_checkpoint(seed=0, words=SIDES["no"] + SIDES["yes"])
    save_causal_lm(tiny.model, tmp_path / "byte", tokenizer=tiny.tokenizer, eos_token="<eos>")
    file = tmp_path / "byte" / "tokenizer_config.json"
    qa = {"chat_template": "Q: {{ messages[0]['content'] }} A:"}
    file.write_text(json.dumps(json.loads(file.read_text()) | qa))
    persona = persona_no_over_never.Config.smoke()
    res = persona_no_over_never.run(
        persona.__class__(**{**persona.__dict__, "model": str(tmp_path / "byte")})
    )
    assert res["prompt_format"] == "chat template"
    assert res["example_prompt"].startswith("Q: ") and res["example_prompt"].endswith(" A:")


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
@pytest.mark.parametrize(
    "rows",
    [
        [ROWS[0]],  # one usable pair
        [ROWS[0], ROWS[2], ROWS[0], ROWS[0]],  # only duplicates of one pair (and a bad row)
    ],
    ids=["one pair", "duplicates"],
)
def test_audit_with_an_undefined_spearman_keeps_every_output(tmp_path, rows):
    """The probe of issue 21: one usable pair, or only duplicate pairs, made ``spearman`` raise
    after the audit and nothing was written; now the per-pair files and the figure are written,
    and the Spearman correlations are ``null`` with their reason. A Latin-1 line is skipped
    with its line number instead of losing the file."""
    pairs = tmp_path / "pairs.jsonl"
    latin1 = json.dumps(dict(ROWS[1], prompt="<bos> café ? <ans>"), ensure_ascii=False)
    pairs.write_bytes(
        b"".join(json.dumps(r).encode() + b"\n" for r in rows) + latin1.encode("latin-1")
    )
    out = tmp_path / "out"
    cli.main(["audit", "--smoke", "--pairs", str(pairs), "--out", str(out)])
    res = json.loads((out / "audit.json").read_text())
    assert res["num_pairs"] == len([r for r in rows if "rejected" in r])
    for key in ("spearman_velocity_vs_ches", "spearman_velocity_vs_ches_ln"):
        assert res[key] is None and "Spearman's correlation" in res[f"{key}_undefined_reason"]
    latin1_line = len(rows) + 1
    assert "not valid UTF-8" in {b["line"]: b["reason"] for b in res["skipped_rows"]}[latin1_line]
    assert len((out / "audit_pairs.jsonl").read_text().splitlines()) == res["num_pairs"]
    assert (out / "audit.png").stat().st_size > 0


def test_audit_without_a_usable_row_lists_the_reasons_before_pretraining(
    tmp_path, monkeypatch, capsys
):
    """The probe of issue 21: a file without a usable row said "skipped rows: []" after the
    checkpoint was made; now the count and the first reasons, with line numbers, come first."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(b"{not json\n" + b"\xe9t\xe9\n" + json.dumps(ROWS[2]).encode() + b"\n")
    monkeypatch.setattr(
        audit, "open_or_make", lambda *a, **k: pytest.fail("the checkpoint was opened")
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["audit", "--smoke", "--pairs", str(pairs), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        f"error: {pairs}: no usable row; 3 row(s) skipped: line 1: not valid JSON"
    )
    assert "line 2: not valid UTF-8" in err and "line 3: missing field(s) ['rejected']" in err
