"""Every main-job experiment: smoke config runs, numbers finite, JSON round trip, determinism."""

import importlib
import json
import math

import numpy as np
import pytest

from experiments import EXPERIMENTS
from experiments._common import dumps, parse_config
from sims.scores import spearman


def _finite(obj) -> bool:
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return all(_finite(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_smoke_writes_png_json_and_is_deterministic(name, tmp_path):
    """``main --smoke`` writes PNG + JSON; numbers finite; JSON round trip; same seed, same JSON;
    the figure redraws from the JSON alone."""
    module = importlib.import_module(f"experiments.{name}")
    module.main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    written = json.loads((tmp_path / f"{name}.json").read_text())
    assert {"config", "provenance"} <= set(written)
    assert _finite(written)
    assert json.loads(dumps(module.run(module.Config.smoke()))) == written
    module.plot(written)


def test_parse_config_overrides_and_rejects_bad_values():
    from experiments.no_over_never import Config

    config, _ = parse_config(Config, ["--smoke", "--beta", "0.5", "--seeds", "2"])
    assert config.beta == 0.5 and config.seeds == 2 and config.steps == Config.smoke().steps
    with pytest.raises(SystemExit, match="cannot read"):
        parse_config(Config, ["--seeds", "two"])


def test_spearman_hand_values():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ranks (0, 1, 2) vs (0.5, 0.5, 2) (a tie): covariance 1.5 / sqrt(2 * 1.5)
    assert spearman([1, 2, 3], [5, 5, 9]) == pytest.approx(1.5 / math.sqrt(2 * 1.5))
    with pytest.raises(ValueError, match="must be 1-D of one length"):
        spearman([1], [2])


def test_response_batch_finds_eos():
    from experiments._transformer import response_batch
    from sims.data import corpus

    tokens = np.array([[1, 5, corpus.EOS, 0, 0], [1, 5, 6, 7, 8]])
    b = response_batch(tokens, 1)
    assert b.length.tolist() == [3, 5]  # <eos> counted; no <eos> -> T
