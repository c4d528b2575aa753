"""Shipped pre-trained fixtures (sims/data/fixtures): every file matches its manifest, the
experiments' default configurations load them instead of training, a loaded fixture equals the
training it replaces, a damaged file is refused, and other settings train."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import (
    audit,
    kernel_theorem_check,
    transformer_ches,
    transformer_no_over_never,
    transformer_unalignment,
)
from sims.checkpoints import selfmade
from sims.data import fixtures as fx
from sims.protocols import toy_transformer as toy

#: Experiments whose default Config pre-trains the toy transformer, and the ``tied`` they use.
TOY_DEFAULTS = {
    "transformer_no_over_never": (transformer_no_over_never.Config(), (True,)),
    "transformer_ches": (transformer_ches.Config(), (True,)),
    "transformer_unalignment": (transformer_unalignment.Config(), (True,)),
    "kernel_theorem_check": (kernel_theorem_check.Config(), (True, False)),
}


def _no_training(*args, **kwargs):
    raise AssertionError("trained although a fixture matches")


def test_manifest_sha256_matches_every_shipped_file():
    manifest = fx.read_manifest()
    shipped = {p.stem for p in fx.FIXTURES_DIR.glob("*.safetensors")}
    assert shipped == set(manifest), (shipped, sorted(manifest))
    for name, record in manifest.items():
        path = fx.FIXTURES_DIR / f"{name}.safetensors"
        assert fx.file_sha256(path) == record["sha256"], name
        assert path.stat().st_size == record["bytes"], name


def test_fixture_files_are_package_data():
    text = (fx.FIXTURES_DIR.parents[2] / "pyproject.toml").read_text()
    assert '"sims.data.fixtures" = ["*.safetensors", "manifest.json"]' in text


@pytest.mark.parametrize("name", sorted(TOY_DEFAULTS))
def test_toy_transformer_defaults_load_a_fixture(name, monkeypatch):
    config, tieds = TOY_DEFAULTS[name]
    monkeypatch.setattr(toy, "pretrain_flow", _no_training)
    for tied in tieds:
        refusal_prob = getattr(config, "refusal_prob", 0.8)
        model, losses = toy.pretrained_transformer(
            config.seed, config, tied=tied, refusal_prob=refusal_prob
        )
        assert losses.shape == (config.pretrain_steps,), (name, tied)
        assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], (name, tied)


def test_audit_default_self_made_checkpoint_loads_a_fixture(monkeypatch):
    monkeypatch.setattr(selfmade, "pretrain", _no_training)
    config = audit.Config()
    assert config.model == ""  # the self-made checkpoint
    model, losses = selfmade.self_made_pretraining(config.spec(), seed=config.seed)
    assert losses.shape == (config.pretrain_steps,) and losses[-1] < losses[0]


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"pretrain_steps": 149},
        {"tied": False, "d_model": 32},
        {"refusal_prob": 0.7},
        {"jax_enable_x64": False},
        {"corpus_sha256": "0" * 64},
    ],
)
def test_find_fixture_misses_settings_that_differ(change):
    key = toy.transformer_fixture_settings(0, toy.PretrainSettings(), tied=True)
    assert fx.find_fixture(toy.FIXTURE_KIND, key) is not None  # the unchanged key matches
    assert fx.find_fixture(toy.FIXTURE_KIND, key | change) is None, change
    assert fx.find_fixture(selfmade.FIXTURE_KIND, key) is None  # another kind


def test_pretrained_transformer_trains_when_no_fixture_matches(monkeypatch):
    calls = []
    real = toy.pretrain_flow
    monkeypatch.setattr(toy, "pretrain_flow", lambda *a, **k: calls.append(1) or real(*a, **k))
    small = toy.PretrainSettings(**toy.PretrainSettings.SMOKE)  # 5 steps, no fixture
    _, losses = toy.pretrained_transformer(0, small)
    assert calls == [1] and losses.shape == (5,)
    key = toy.transformer_fixture_settings(0, toy.PretrainSettings(), tied=True)
    assert fx.find_fixture(toy.FIXTURE_KIND, key) is not None
    monkeypatch.setattr(toy, "pretrain_flow", _no_training)
    with pytest.raises(AssertionError, match="trained although"):  # use_fixture=False trains
        toy.pretrained_transformer(0, toy.PretrainSettings(), use_fixture=False)


def _copy(tmp_path, name="toy_transformer_tied"):
    """Copy one fixture and its manifest entry into ``tmp_path``; return its settings."""
    record = fx.read_manifest()[name]
    shutil.copy(fx.FIXTURES_DIR / f"{name}.safetensors", tmp_path)
    (tmp_path / fx.MANIFEST).write_text(json.dumps({name: record}))
    return record["settings"]


def test_find_fixture_refuses_a_corrupted_file(tmp_path):
    settings = _copy(tmp_path)
    assert fx.find_fixture(toy.FIXTURE_KIND, settings, folder=tmp_path) is not None
    path = tmp_path / "toy_transformer_tied.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"has SHA-256 [0-9a-f]{64}, its manifest records .*"):
        fx.find_fixture(toy.FIXTURE_KIND, settings, folder=tmp_path)


def test_find_fixture_refuses_a_manifest_with_another_sha(tmp_path):
    settings = _copy(tmp_path)
    manifest = json.loads((tmp_path / fx.MANIFEST).read_text())
    manifest["toy_transformer_tied"]["sha256"] = "0" * 64
    (tmp_path / fx.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="regenerate the fixtures with `python -m sims.data"):
        fx.find_fixture(toy.FIXTURE_KIND, settings, folder=tmp_path)


def test_load_fixture_of_another_structure_warns_and_trains(tmp_path):
    settings = _copy(tmp_path)
    other = toy.initial_transformer(0, toy.PretrainSettings(d_model=32), tied=True)
    with pytest.warns(UserWarning, match="does not match the model's state"):
        assert fx.load_fixture(toy.FIXTURE_KIND, settings, other, folder=tmp_path) is None


def test_save_fixture_round_trip(tmp_path):
    small = toy.PretrainSettings(**toy.PretrainSettings.SMOKE)
    model = toy.initial_transformer(3, small, tied=True)
    loss = np.array([2.0, 1.5], np.float32)
    record = fx.save_fixture("tiny", "test_kind", {"seed": 3}, model, loss, folder=tmp_path)
    assert record["sha256"] == fx.file_sha256(tmp_path / "tiny.safetensors")
    fresh = toy.initial_transformer(4, small, tied=True)  # another draw: the fixture overwrites
    loaded, got_loss = fx.load_fixture("test_kind", {"seed": 3}, fresh, folder=tmp_path)
    np.testing.assert_array_equal(got_loss, loss)
    for name, value in fx.state_arrays(model).items():
        np.testing.assert_array_equal(fx.state_arrays(loaded)[name], value, err_msg=name)
    assert fx.load_fixture("test_kind", {"seed": 4}, fresh, folder=tmp_path) is None


#: Child process: load fixture NAME and train with its settings; print the largest differences.
_CHILD = """
import json, sys, jax, numpy as np
jax.config.update("jax_enable_x64", True)
from sims.checkpoints import selfmade
from sims.data import fixtures as fx
from sims.protocols import toy_transformer as toy
name = sys.argv[1]
if name == "self_made_llama":
    make = lambda use: selfmade.self_made_pretraining(selfmade.SelfMadeSpec(), seed=0,
                                                      use_fixture=use)
else:
    make = lambda use: toy.pretrained_transformer(0, toy.PretrainSettings(),
                                                  tied=name.endswith("_tied"), use_fixture=use)
(a, loss_a), (b, loss_b) = make(True), make(False)
A, B = fx.state_arrays(a), fx.state_arrays(b)
print(json.dumps({"names": sorted(A) == sorted(B),
                  "loss": float(np.abs(loss_a - loss_b).max()),
                  "state": max(float(np.abs(A[k] - B[k]).max()) for k in A)}))
"""


def _made_here(name: str) -> bool:
    made = fx.read_manifest()[name]["made_with"]
    return made["jax"] == jax.__version__ and made["device_kind"] == jax.devices()[0].device_kind


@pytest.mark.slow  # > 3 s on the 2-core CPU (a child trains for 15-30 s); CI runs it
@pytest.mark.parametrize(
    "name", ["toy_transformer_tied", "toy_transformer_untied", "self_made_llama"]
)
def test_fixture_equals_training_with_its_settings(name):
    """Bitwise, in a child process with default XLA flags, as ``python -m sims.data.fixtures``
    ran: this test process's flags (tests/conftest.py: 8 fake devices, optimisation level 0)
    already change the float32 pre-training by round-off from the first step."""
    if not _made_here(name):
        pytest.skip(f"{name} was made with another JAX or device: training may differ there")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, name], env=env, capture_output=True, text=True, check=False
    )
    assert child.returncode == 0, child.stderr[-2000:]
    diff = json.loads(child.stdout.strip().splitlines()[-1])
    assert diff == {"names": True, "loss": 0.0, "state": 0.0}, (name, diff)
