"""Smoke tests of the multi-token experiments: keys, finiteness, JSON round trip, determinism."""

import json

import numpy as np
import pytest

from experiments import ches_vs_displacement, multi_sample_effects, multi_token_theorem_check
from experiments._common import dumps

MODULES = {
    "multi_token_theorem_check": (multi_token_theorem_check, ("checks", "summary")),
    "ches_vs_displacement": (
        ches_vs_displacement,
        ("change_mean", "change_min", "change_max", "spearman_percentile_vs_change"),
    ),
    "multi_sample_effects": (multi_sample_effects, ("results",)),
}


def _finite_numbers(obj):
    if isinstance(obj, dict):
        return all(_finite_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite_numbers(v) for v in obj)
    if isinstance(obj, float):
        return bool(np.isfinite(obj))
    return True


@pytest.mark.parametrize("name", sorted(MODULES))
def test_experiment_smoke_run(name):
    module, keys = MODULES[name]
    config = module.Config.smoke()
    first = module.run(config)
    for key in (*keys, "config", "provenance"):
        assert key in first, key
    text = dumps(first)
    loaded = json.loads(text)
    assert _finite_numbers(loaded)
    assert dumps(module.run(config)) == text  # same seed -> same JSON
    module.plot(loaded)  # the figure is drawn from the JSON alone
