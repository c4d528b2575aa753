"""Tests of experiments/framework/ beyond the command line (test_experiments_cli.py): the path
rules and default rules of configs, the PNG + JSON pair written so that it always matches, and the
command-line context (one-line user errors, SIGTERM as an exception)."""

import dataclasses
import errno
import hashlib
import json
import os
import signal
import tempfile
import time

import matplotlib.pyplot as plt
import pytest

from experiments.framework import (
    USER_ERRORS,
    ConfigError,
    ExperimentConfig,
    error_line,
    existing_file,
    existing_path,
    save,
    user_errors_as_one_line,
)
from sims.errors import InputError


@dataclasses.dataclass(frozen=True)
class _Config(ExperimentConfig):
    gamma: float = 0.0  # a term that is off by default
    warmup: int = 0  # steps; 0 = none
    beta: float = 0.1
    pairs: str = ""  # a file, "" = none
    model: str = ""  # a file or folder, "" or "packaged"

    RULES = {"pairs": existing_file(), "model": existing_path(allow=("", "packaged"))}


def test_default_rule_of_a_zero_default_is_nonnegative():
    """The probe of issue 21: ``gamma: float = 0.0`` failed at ``Config()`` (every float > 0)."""
    assert _Config().gamma == 0.0 and _Config(gamma=2.0, warmup=3).warmup == 3
    with pytest.raises(ConfigError, match="--gamma must be a finite number >= 0, got -1.0"):
        _Config(gamma=-1.0)
    with pytest.raises(ConfigError, match="--warmup must be an integer >= 0, got -1"):
        _Config(warmup=-1)
    with pytest.raises(ConfigError, match="--beta must be a finite number > 0"):
        _Config(beta=0.0)  # a non-zero default keeps "> 0"


def test_existing_path_rules_name_the_problem(tmp_path):
    afile, folder = tmp_path / "p.jsonl", tmp_path / "ckpt"
    afile.write_text("{}\n")
    folder.mkdir()
    dangling = tmp_path / "link.jsonl"
    dangling.symlink_to(tmp_path / "gone.jsonl")
    linked = tmp_path / "good.jsonl"
    linked.symlink_to(afile)
    assert _Config(pairs=str(afile), model=str(folder)).pairs == str(afile)
    assert _Config(pairs=str(linked), model=str(afile)).model == str(afile)  # a .gguf file, say
    assert _Config(model="packaged").model == "packaged" and _Config().pairs == ""
    gone = tmp_path / "gone.jsonl"
    for kw, problem in [
        (dict(pairs=str(tmp_path / "missing.jsonl")), "does not exist"),
        (dict(pairs=str(dangling)), f"is a symlink to {str(gone)!r}, which does not exist"),
        (dict(pairs=str(folder)), "is a folder"),
        (dict(model=str(tmp_path / "nowhere")), "does not exist"),
        (dict(model="smollm2"), "does not exist"),  # not one of this config's words
    ]:
        name = next(iter(kw))
        with pytest.raises(ConfigError, match=f"--{name} must be an existing readable") as err:
            _Config(**kw)
        assert str(err.value).endswith(f"which {problem}"), str(err.value)
    assert issubclass(ConfigError, InputError)


def test_existing_path_rule_refuses_an_unreadable_file(tmp_path, monkeypatch):
    afile = tmp_path / "p.jsonl"
    afile.write_text("{}\n")
    # tests may run as root, for whom every file is readable: the permission bit is faked
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match="is not readable"):
        _Config(pairs=str(afile))


def _figure():
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    return fig


def test_save_records_the_png_hash_in_the_json(tmp_path):
    png, js = save("x", {"value": 1.5, "provenance": {"dtype": "float64"}}, _figure(), tmp_path)
    written = json.loads(js.read_text())
    assert written["provenance"]["png_sha256"] == hashlib.sha256(png.read_bytes()).hexdigest()
    assert written["value"] == 1.5 and written["provenance"]["dtype"] == "float64"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x.png"]


@pytest.mark.parametrize(
    "failure",
    [KeyboardInterrupt(), SystemExit(143), OSError(errno.ENOSPC, "No space left on device")],
    ids=["SIGINT", "SIGTERM", "full disk"],
)
@pytest.mark.parametrize("stage", ["png", "json"])
def test_save_interrupted_keeps_the_old_pair_and_no_temporary_file(
    tmp_path, monkeypatch, failure, stage
):
    """The probe of issue 21: the JSON was written (renamed into place) before the PNG, so an
    interrupt or a full disk during the PNG left the new JSON beside the old PNG (and a full
    disk during the JSON a ``.json.<pid>.tmp``). Now both go to temporary files first, removed
    on any failure."""
    save("x", {"value": 1.0, "provenance": {}}, _figure(), tmp_path)
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    fig = _figure()
    if stage == "png":  # the failure comes while the PNG is being written
        real = fig.savefig

        def savefig(path, **kw):
            real(path, **kw)
            raise failure

        monkeypatch.setattr(fig, "savefig", savefig)
    else:  # ... or while the JSON is being written

        def write_text(self, text, *args, **kw):
            if self.name.startswith(".x.json."):
                self.write_bytes(text[:10].encode())
                raise failure
            return type(self).write_bytes(self, text.encode())

        monkeypatch.setattr("pathlib.Path.write_text", write_text)
    with pytest.raises(type(failure)):
        save("x", {"value": 2.0, "provenance": {}}, fig, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old


def test_sigterm_in_a_command_raises_and_removes_temporary_folders(tmp_path):
    """SIGTERM killed the process outright, leaving the self-made checkpoint's temporary folder
    in --out; under the command-line context it raises SystemExit(143), so ``with`` blocks clean
    up."""
    before = signal.getsignal(signal.SIGTERM)
    context = user_errors_as_one_line(), tempfile.TemporaryDirectory(dir=tmp_path)
    with pytest.raises(SystemExit) as exit_info, context[0], context[1]:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # not reached: the handler raises as soon as the signal arrives
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is restored


def test_user_errors_are_one_line_and_debug_raises(capsys):
    with pytest.raises(SystemExit) as exit_info, user_errors_as_one_line():
        raise InputError("pairs.jsonl: no usable row;\n 3 row(s) skipped")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: pairs.jsonl: no usable row; 3 row(s) skipped\n"
    with pytest.raises(InputError), user_errors_as_one_line(debug=True):
        raise InputError("shown with its traceback")
    with pytest.raises(ValueError, match="a bug"), user_errors_as_one_line():
        raise ValueError("a bug keeps its traceback")  # not a user error
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", "pairs.jsonl")
    assert error_line(missing) == "pairs.jsonl: No such file or directory"
    bad_json = json.JSONDecodeError("Expecting value", "x", 0)
    assert error_line(bad_json) == "JSONDecodeError: Expecting value: line 1 column 1 (char 0)"
    assert all(issubclass(e, BaseException) for e in USER_ERRORS)
