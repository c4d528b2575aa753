"""Smoke test of experiments.dpop_edit_distance."""

import json

import numpy as np
import pytest

from experiments import dpop_edit_distance as exp
from experiments._common import dumps

KEYS = {
    "config",
    "tokens",
    "edit",
    "thresholds",
    "lambda_star",
    "well_optimised",
    "signs",
    "logit",
    "free_logit",
    "features",
    "provenance",
}


def _finite(obj):
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite(v) for v in obj)
    return not isinstance(obj, float) or np.isfinite(obj)


@pytest.mark.slow  # two runs, each compiling three vmapped flows: ~25-50 s under load here
def test_dpop_edit_distance_smoke():
    config = exp.Config.smoke()
    first, second = exp.run(config), exp.run(config)
    assert set(first) == KEYS
    text = dumps(first)
    loaded = json.loads(text)
    assert _finite(loaded)
    assert text == dumps(second)  # same seed, same JSON
    assert loaded["edit"] == 4 and loaded["lambda_star"] > 0
    for name in ("logit", "free_logit", "features"):
        lp = np.asarray(loaded[name]["logprob_chosen"])
        assert lp.shape == (2, 3, 8)  # lams, checkpoints, positions ("2+2=4;4" + <eos>)
    exp.plot(loaded)
