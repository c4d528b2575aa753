"""The experiments' command line (experiments/__main__.py, experiments/framework/): both flag forms,
help and listing, flags routed to the experiments that define them, everything refused before the
first experiment runs, configs that validate themselves, honest dtype labels."""

import dataclasses
import importlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import EXPERIMENTS, EXTENDED, EXTRA
from experiments import __main__ as runner
from experiments.framework import (
    ConfigError,
    ExperimentConfig,
    build_parser,
    cli,
    field_comments,
    parse_config,
    prepare_out_dir,
    provenance,
    sigterm_raises,
)

ROOT = Path(__file__).resolve().parent.parent


def _modules():
    return {n: importlib.import_module(f"experiments.{n}") for n in EXPERIMENTS + EXTENDED + EXTRA}


def test_split_args_reads_both_flag_forms():
    names, flags = runner.split_args(["bench", "--out", "/tmp/x", "--steps=8", "--smoke"])
    assert names == ["bench"]
    assert flags == [("--out", "/tmp/x"), ("--steps", "8"), ("--smoke", None)]


def test_plan_routes_flags_only_to_experiments_that_define_them(tmp_path):
    runs = dict(
        runner.plan(
            ["no_over_never", "multi_sample_effects", "--beta", "0.5", "--out", str(tmp_path)]
        )
    )
    assert "--beta=0.5" in runs["no_over_never"] and "--beta=0.5" in runs["multi_sample_effects"]
    runs = dict(runner.plan(["no_over_never", "kl_optimum_mixture", "--top-k", "2"]))
    assert "--top-k=2" in runs["no_over_never"]
    assert not any(f.startswith("--top-k") for f in runs["kl_optimum_mixture"])


@pytest.mark.parametrize(
    "argv,match",
    [
        (["bogus"], r"unknown experiment\(s\) \['bogus'\]"),
        (["no_over_never", "--bogus", "3"], "no selected experiment defines --bogus"),
        (["no_over_never", "--seeds"], "--seeds needs a value"),
        (["single_token_theorem_check", "--loss-types=dpo,bogus"], "--loss-types must be one of"),
        (["single_token_theorem_check", "--init-scales=0.0"], "--init-scales must be a finite"),
        (["single_token_theorem_check", "--instances=0"], "--instances must be an integer >= 1"),
        (["no_over_never", "--seeds=0"], "--seeds must be an integer >= 1"),
        (["no_over_never", "--top-k=-3"], "--top-k must be an integer >= 1"),
        (["no_over_never", "--beta", "nan"], "--beta must be finite"),
        (["no_over_never", "--steps", "two"], "--steps: cannot read 'two' as int"),
        (["no_over_never", "--steps", "7"], "--record-every must divide --steps"),
        (["kl_optimum_mixture", "--no-such"], "no selected experiment defines --no-such"),
    ],
)
def test_plan_refuses_bad_input_before_running(argv, match, monkeypatch, capsys):
    called = []
    for module in _modules().values():
        monkeypatch.setattr(module, "main", lambda flags, m=module: called.append(m))
    _assert_one_line_error(lambda: runner.main(argv), match, capsys)
    assert called == []  # refused before any experiment started


def _assert_one_line_error(call, match, capsys):
    """``call()`` exits with status 2 after printing one line ``error: ...`` matching ``match``."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(match, err), err


def test_a_late_bad_flag_stops_before_the_first_experiment(monkeypatch, capsys):
    """A flag only the second experiment rejects must stop the run before the first starts."""
    called = []
    from experiments import no_over_never

    monkeypatch.setattr(no_over_never, "main", lambda argv: called.append(argv))
    argv = ["no_over_never", "multi_sample_effects", "--beta", "-1"]
    _assert_one_line_error(lambda: runner.main(argv), "--beta must be a finite number > 0", capsys)
    assert called == []


def test_out_into_a_file_is_refused_first(tmp_path, capsys):
    afile = tmp_path / "f"
    afile.write_text("")
    argv = ["no_over_never", "--out", str(afile)]
    _assert_one_line_error(lambda: runner.main(argv), "--out must be a folder", capsys)
    with pytest.raises(ConfigError, match="--out must be a folder"):
        prepare_out_dir(afile)


@pytest.mark.parametrize("arg", ["--help", "-h", "list"])
def test_help_lists_every_experiment(arg, capsys):
    runner.main([arg])
    out = capsys.readouterr().out
    for name in EXPERIMENTS + EXTENDED + EXTRA:
        assert name in out


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_help_runs_as_a_module():
    out = subprocess.run(
        [sys.executable, "-m", "experiments", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "experiments of the main job" in out and EXPERIMENTS[0] in out


@pytest.mark.parametrize("name", EXPERIMENTS + EXTENDED + EXTRA)
def test_each_experiment_help_lists_its_flags_with_defaults_and_meaning(name):
    config_cls = _modules()[name].Config
    text = build_parser(config_cls).format_help()
    comments = field_comments(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        if f.name in comments:
            assert comments[f.name][:20] in " ".join(text.split()), (flag, comments[f.name])
    assert "default" in text


@pytest.mark.parametrize("name", EXPERIMENTS + EXTENDED + EXTRA)
def test_default_smoke_and_scaled_configs_validate(name):
    config_cls = _modules()[name].Config
    config_cls()
    config_cls.smoke()
    if hasattr(config_cls, "scaled"):
        config_cls.scaled()


def test_parse_config_overrides_and_rejects_bad_values():
    from experiments.no_over_never import Config

    config, _ = parse_config(Config, ["--smoke", "--beta", "0.5", "--seeds=2"])
    assert config.beta == 0.5 and config.seeds == 2 and config.steps == Config.smoke().steps
    with pytest.raises(ConfigError, match="cannot read"):
        parse_config(Config, ["--seeds", "two"])
    with pytest.raises(ConfigError, match="--beta must be a finite number > 0"):
        Config(beta=-1.0)  # direct construction validates too
    with pytest.raises(ConfigError, match="--seeds must be of type int"):
        Config(seeds=1.5)


def test_resumable_experiment_main_runs_in_one_sweep_folder_per_config(tmp_path):
    """``resumable=True``: ``run`` gets ``sweep_dir = <out>/<name>_sweep/<12 hex digits>``, the
    same folder for the same config and another for another config."""
    import matplotlib.pyplot as plt

    from experiments.framework import experiment_main

    @dataclasses.dataclass(frozen=True)
    class Config(ExperimentConfig):
        """A config of one field."""

        beta: float = 0.1  # a coefficient

        @classmethod
        def smoke(cls):
            return cls()

    seen = []

    def run(config, *, sweep_dir):
        seen.append(sweep_dir)
        return {"config": config, "provenance": provenance(dtype_of=np.zeros(1))}

    for beta in ("0.1", "0.1", "0.2"):
        out = ["--out", str(tmp_path), "--beta", beta]
        experiment_main("tiny", Config, run, lambda r: plt.figure(), out, resumable=True)
    assert seen[0] == seen[1] != seen[2]
    assert {d.parent for d in seen} == {tmp_path / "tiny_sweep"}
    assert all(re.fullmatch("[0-9a-f]{12}", d.name) for d in seen)


def test_provenance_reads_the_dtype_from_the_result():
    assert provenance(dtype_of=np.zeros(2, np.float32))["dtype"] == "float32"
    both = provenance(dtype_of=(np.zeros(1, np.float32), np.zeros(1, np.float64)))
    assert both["dtype"] == "float32+float64"
    assert isinstance(provenance(dtype_of=np.zeros(1))["git_dirty"], bool | None)
    with pytest.raises(ValueError, match="at least one array"):
        provenance(dtype_of=())


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_run_called_directly_computes_in_the_dtype_it_reports():
    """The probe of the issue: run(Config.smoke()) outside main() used to run in float32 while
    labelled float64; run() now enables float64 itself and the label is read from its arrays."""
    code = (
        "import json, jax\n"
        "from experiments.single_token_theorem_check import Config, run\n"
        "assert not jax.config.jax_enable_x64\n"
        "r = run(Config.smoke())\n"
        "print(json.dumps([r['provenance']['dtype'], r['summary']['max_rel_err_autodiff']]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    dtype, err = __import__("json").loads(out.strip().splitlines()[-1])
    assert dtype == "float64"
    assert err < 1e-9  # float64 accuracy of the closed form vs autodiff
    assert jax.config.jax_enable_x64  # this process (the test suite) runs in float64 anyway


def test_plan_checks_input_paths_before_running(tmp_path, monkeypatch, capsys):
    """The probe of issue 21: ``audit --pairs missing.jsonl`` failed only after the self-made
    checkpoint's pre-training (67 s); every input path is now checked by the plan."""
    called = []
    for module in _modules().values():
        monkeypatch.setattr(module, "main", lambda flags, m=module: called.append(m))
    dangling = tmp_path / "pairs.jsonl"
    dangling.symlink_to(tmp_path / "moved.jsonl")
    for argv, match in [
        (["audit", "--pairs", str(tmp_path / "missing.jsonl")], "--pairs must be an existing"),
        (["audit", "--pairs", str(dangling)], "is a symlink to .*moved.jsonl', which does not"),
        (["ches_real", "--pairs", str(tmp_path)], "--pairs must be .* which is a folder"),
        (["persona_no_over_never", "--model", str(tmp_path / "ckpt")], "--model must be an"),
    ]:
        _assert_one_line_error(lambda argv=argv: runner.main(argv), match, capsys)
    assert called == []
    runner.plan(["audit", "--model", "smollm2", "--model", str(tmp_path)])  # both accepted


def test_debug_shows_the_traceback_and_a_bug_keeps_it(tmp_path, monkeypatch):
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="--pairs must be an existing"):
        runner.main(["audit", "--pairs", missing, "--debug"])
    from experiments import audit, no_over_never

    with pytest.raises(ConfigError, match="--pairs must be an existing"):
        cli(audit.main, ["--pairs", missing, "--debug"])  # each experiment's own command line

    def bug(argv):
        raise ValueError("a bug in the code")

    monkeypatch.setattr(no_over_never, "main", bug)
    with pytest.raises(ValueError, match="a bug in the code"):  # not a user error: traceback
        runner.main(["no_over_never"])


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_user_errors_print_one_line_from_both_command_lines(tmp_path):
    """The probe of issue 21: a user error printed a 9-12 frame traceback (exit status 1)."""
    missing = str(tmp_path / "missing.jsonl")
    for command in (["experiments", "audit"], ["experiments.audit"]):
        done = subprocess.run(
            [sys.executable, "-m", *command, "--pairs", missing, "--out", str(tmp_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("error: --pairs must be an existing readable file")
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_sigterm_dropped_inside_a_del_or_gc_callback_is_delivered_again():
    """CI saw SIGTERM land inside JAX's garbage-collector callback: Python dropped the handler's
    ``SystemExit`` ("Exception ignored") and the run went on. Here the handler runs inside a
    ``__del__`` (where Python drops exceptions the same way); the exit must still come, soon."""

    class SignalsOnDelete:
        def __del__(self):
            signal.raise_signal(signal.SIGTERM)  # the handler runs here; its exit is dropped

    handler, hook = signal.getsignal(signal.SIGTERM), sys.unraisablehook
    start = time.monotonic()
    with pytest.raises(SystemExit) as info, sigterm_raises():
        SignalsOnDelete()  # deleted at once
        while time.monotonic() - start < 10:
            time.sleep(0.01)
    assert info.value.code == 128 + signal.SIGTERM
    assert time.monotonic() - start < 5
    assert signal.getsignal(signal.SIGTERM) is handler and sys.unraisablehook is hook


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_sigterm_during_pretraining_leaves_no_temporary_folder(tmp_path):
    """The probe of issue 21: SIGTERM while the self-made checkpoint pre-trains left its empty
    temporary folder in --out; SIGTERM now raises, and ``with TemporaryDirectory()`` cleans up."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    out = tmp_path / "out"
    # a small model: SIGTERM is handled when the running compiled call (the pre-training scan,
    # or its compilation) returns to Python, so that call must be short
    small = "--d-model 16 --num-layers 1 --num-heads 2 --num-kv-heads 1 --copies 1 --batch-size 8"
    argv = ["audit", "--pairs", str(pairs), "--pretrain-steps", "20", *small.split()]
    argv += ["--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments", *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out.is_dir() and any(p.is_dir() for p in out.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output
    left = [p.name for p in out.iterdir() if p.is_dir() or p.name.endswith(".tmp")]
    assert left == [], output
