"""``python -m experiments check_figures``: re-runs experiments under extra XLA flags into a
temporary folder, compares their conclusions with a reference folder, reports what moved and
fails when something did."""

import json
import shutil
import subprocess

import pytest

from experiments import check_figures, kl_optimum_mixture
from experiments.framework import conclusions as cn

NAME = "kl_optimum_mixture"  # one fast float64 experiment


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A smoke run of :data:`NAME` (PNG + JSON with its conclusions), made once."""
    out = tmp_path_factory.mktemp("reference")
    kl_optimum_mixture.main(["--smoke", "--out", str(out)])
    return out


def _fake_rerun(source, seen):
    """A stand-in for :func:`check_figures.rerun` that copies ``source``'s JSON (no child)."""

    def rerun(config, out):
        seen.append(config)
        shutil.copy(source / f"{NAME}.json", out / f"{NAME}.json")
        return 0

    return rerun


def _argv(reference, out, *extra):
    return ["--names", NAME, "--reference", str(reference), "--out", str(out), *extra]


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_check_figures_same_run_moves_nothing(reference, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(check_figures, "rerun", _fake_rerun(reference, seen))
    results = check_figures.main(_argv(reference, tmp_path))
    assert [c.names for c in seen] == [(NAME,)]
    assert results["changed"] == 0 and results["compared"] == len(
        json.loads((reference / f"{NAME}.json").read_text())["conclusions"]
    )


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_check_figures_reports_a_changed_conclusion(reference, tmp_path, monkeypatch, capsys):
    changed = tmp_path / "reference"
    changed.mkdir()
    data = json.loads((reference / f"{NAME}.json").read_text())
    data["conclusions"]["counterexample"] = cn.verdict(False)  # the run finds True
    (changed / f"{NAME}.json").write_text(json.dumps(data))
    monkeypatch.setattr(check_figures, "rerun", _fake_rerun(reference, []))
    with pytest.raises(SystemExit) as exit_info:
        check_figures.main(_argv(changed, tmp_path / "out"))
    assert exit_info.value.code == 1
    written = json.loads((tmp_path / "out" / "check_figures.json").read_text())
    moved = [r for r in written["rows"] if not r["ok"]]
    assert [(r["name"], r["old"], r["new"]) for r in moved] == [("counterexample", False, True)]
    line = next(x for x in capsys.readouterr().out.splitlines() if "counterexample" in x)
    assert "MOVED" in line and "False -> True" in line


def test_check_figures_reports_a_reference_without_conclusions(tmp_path, monkeypatch):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / f"{NAME}.json").write_text(json.dumps({"config": {}}))
    monkeypatch.setattr(check_figures, "rerun", _fake_rerun(bare, []))
    with pytest.raises(SystemExit):
        check_figures.main(_argv(bare, tmp_path / "out"))
    rows = json.loads((tmp_path / "out" / "check_figures.json").read_text())["rows"]
    assert [(r["name"], r["ok"], r["rule"]) for r in rows] == [
        ("(conclusions)", False, "both JSONs mark conclusions")
    ]


def test_rerun_appends_xla_flags_to_the_child_environment(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, env, check):
        seen.update(cmd=cmd, env=env)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(check_figures.subprocess, "run", fake_run)
    monkeypatch.setenv("XLA_FLAGS", "--xla_a=1")
    config = check_figures.Config(names=(NAME,), xla_flags="--xla_b=2", child_smoke=True)
    assert check_figures.rerun(config, tmp_path) == 0
    assert seen["env"]["XLA_FLAGS"] == "--xla_a=1 --xla_b=2"
    assert seen["cmd"][1:] == ["-m", "experiments", NAME, "--out", str(tmp_path), "--smoke"]


@pytest.mark.slow  # a real child run (> 20 s on the 2-core CPU); CI runs it
def test_check_figures_end_to_end_under_other_xla_flags(reference, tmp_path):
    """The child really runs, single-threaded (another reduction order): nothing moves."""
    flags = "--xla-flags=--xla_cpu_multi_thread_eigen=false"
    results = check_figures.main(_argv(reference, tmp_path, "--child-smoke", "true", flags))
    assert results["child_exit_status"] == 0 and results["changed"] == 0
    assert results["compared"] >= 4
