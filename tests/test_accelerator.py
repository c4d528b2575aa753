"""Tests of experiments.framework.accelerator: child processes with time limits (result, raised
error, dead process, time-out), the budget of a run of stages, the wiring of accelerator_check's
fields into the stages, the DPO flow's memory and run on a tiny architecture, the sweep and the
experiment stages."""

import functools
import inspect
import math
import os
import sys
import time
import types

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pytest

from experiments import accelerator_check
from experiments.framework import accelerator as acc
from sims.flows.core import integrate
from sims.models.decoder import DecoderConfig

F32_RTOL = 1e-6  # a float32 loss against its exact value (a few ulps)
#: float32 final margins of order 1: sharded and vmapped batches may sum in another order
SHARDED_ATOL = 1e-5


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_in_child_returns_the_stage_result():
    out = acc.in_child(dict, 120.0, a=1, b="x")
    assert out["status"] == "ok" and out["result"] == {"a": 1, "b": "x"} and out["wall_s"] > 0


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_in_child_reports_a_raised_error_with_its_traceback():
    out = acc.in_child(functools.partial(int, "not a number"), 120.0)
    assert out["status"] == "failed" and out["error"].startswith("ValueError: invalid literal")
    assert "Traceback" in out["error"] and "result" not in out


def test_in_child_reports_a_process_that_died():
    out = acc.in_child(functools.partial(os._exit, 3), 120.0)
    assert out == {"status": "failed", "wall_s": out["wall_s"], "error": out["error"]}
    assert out["error"] == "child process exited with code 3"


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_in_child_stops_a_stage_at_its_time_limit():
    start = time.perf_counter()
    out = acc.in_child(functools.partial(time.sleep, 600), 3.0)
    assert out["status"] == "timed out" and 3.0 <= out["wall_s"] < 3.0 + acc.TERMINATE_GRACE_S
    assert time.perf_counter() - start < 3.0 + 2 * acc.TERMINATE_GRACE_S  # stopped, not awaited


def test_stages_give_each_stage_what_is_left_and_skip_when_short():
    lines = []
    stages = acc.Stages(2.0, log=lines.append)
    out = stages.run("sleep", functools.partial(time.sleep, 600))  # limited by the budget
    assert out["status"] == "timed out" and stages.left() < 0
    skipped = stages.run("late", dict, min_s=1.0, a=1)
    assert skipped["status"] == "skipped" and skipped["reason"].startswith("budget: ")
    assert [line.split(":")[0] for line in lines] == ["sleep", "late"]
    assert lines[1] == "late: skipped in 0.0 s" and stages.elapsed() >= 2.0


@pytest.mark.parametrize(
    ("prefix", "stage"), [("sweep_", acc.sweep_stage), ("dpo_", acc.dpo_step_stage)]
)
def test_accelerator_check_fields_name_the_stage_arguments(prefix, stage):
    """Every field of a group is an argument of its stage, and every required argument a field."""
    fields = acc.prefixed(accelerator_check.Config(), prefix)
    params = inspect.signature(stage).parameters
    assert set(fields) <= set(params), set(fields) - set(params)
    required = {n for n, p in params.items() if p.default is inspect.Parameter.empty}
    assert required <= set(fields)


def _tiny():
    return DecoderConfig.llama(11, hidden_size=8, num_heads=2, num_kv_heads=1, num_layers=2)


@pytest.mark.slow  # 55 s on the 2-core machine (three compilations of the flow)
def test_dpo_step_stage_plans_runs_and_reports_the_same_program():
    c = _tiny()
    out = acc.dpo_step_stage(pairs=2, seq_len=6, steps=2, on_cpu=True, config=c)
    d, hd, f = c.hidden_size, c.head_dim, c.intermediate_size
    attention = d * c.num_heads * hd * 2 + d * c.num_kv_heads * hd * 2  # q, o; k, v
    per_layer = attention + 3 * d * f + 2 * d  # gated MLP, two norms
    want = 2 * c.vocab_size * d + c.num_layers * per_layer + d  # untied embeddings, final norm
    assert out["parameters"] == want
    mem = out["memory"]
    assert mem["peak"] == mem["arguments"] + mem["outputs"] + mem["temporaries"]
    assert mem["arguments"] >= 2 * 2 * want  # bfloat16 weights and RMSprop's square average
    assert out["executed"] and out["same_program"]
    # DPO at t = 0 (reference = model): -ln sigmoid(0) = ln 2 for every pair
    np.testing.assert_allclose(out["loss"][0], math.log(2), rtol=F32_RTOL)
    assert len(out["loss"]) == 3 and out["steps_per_s"] > 0
    assert out["architecture"]["num_layers"] == 2 and out["shapes"]["pairs"] == 2


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_dpo_step_stage_keeps_fewer_layers_and_runs_only_when_asked():
    out = acc.dpo_step_stage(pairs=1, seq_len=4, steps=1, num_layers=1, config=_tiny())
    assert out["architecture"]["num_layers"] == 1
    assert out["executed"] is False and "loss" not in out  # a CPU, on_cpu not set
    assert out["memory"]["arguments"] > 0


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_smollm2_config_is_the_135m_architecture():
    c = acc.smollm2_config()  # SmolLM2-135M-Instruct's model card: 30 layers, d = 576, tied
    sizes = (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.tied)
    assert sizes == (49152, 576, 30, 9, 3, True)
    # 49152 * 576 embedding + 30 * 3,540,096 per block (q, o 576^2; k, v 576 * 192; MLP
    # 3 * 576 * 1536; two norms) + 576 final norm: the "135M"
    assert c.num_parameters == 134_515_008


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_sweep_stage_shards_runs_like_a_plain_vmap():
    out = acc.sweep_stage(runs_per_device=1, vocab=16, hidden=4, steps=3, repeats=1)
    assert out["runs"] == out["devices"] and out["sweep_status"]["ok"] == out["runs"]
    assert out["sharded_vs_vmap_max_abs_diff"] < SHARDED_ATOL  # independent runs: no cross-talk
    assert out["dtype"] == "float32"
    assert out["all_devices"]["trajectory_steps_per_s"] > 0


def test_experiment_stage_records_the_memory_of_every_flow_it_runs(tmp_path, monkeypatch):
    fake = types.ModuleType("experiments.fake_scaled")

    class Config:
        @classmethod
        def smoke(cls):
            return cls()

    def run(config):
        flow = integrate(
            lambda x, _: jnp.sum(x**2), lambda x, _: x, jnp.ones(3), dt=0.1, num_steps=2
        )
        return {"final": np.asarray(flow.run().final).tolist()}

    def plot(results):
        return plt.figure()

    fake.Config, fake.run, fake.plot = Config, run, plot
    monkeypatch.setitem(sys.modules, "experiments.fake_scaled", fake)
    out = acc.experiment_stage("fake_scaled", smoke=True, out_dir=str(tmp_path))
    assert len(out["memory"]) == 1 and "device memory: peak" in out["memory"][0]
    assert os.path.exists(out["json"]) and os.path.exists(out["png"])


def test_plot_stages_draws_one_bar_per_stage_coloured_by_status():
    fig, ax = plt.subplots()
    stages = {"a": {"status": "ok", "wall_s": 2.0}, "b": {"status": "failed", "wall_s": 1.0}}
    acc.plot_stages(ax, stages, "t")
    heights = [p.get_height() for p in ax.patches]
    assert heights == [2.0, 1.0] and [t.get_text() for t in ax.texts] == ["ok", "failed"]
    plt.close(fig)
