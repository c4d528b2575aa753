"""Smoke test of experiments.kl_optimum_mixture: keys, finiteness, JSON round trip, determinism."""

import json

import numpy as np

from experiments._common import dumps
from experiments.kl_optimum_mixture import Config, run

KEYS = {
    "config",
    "search",
    "counterexample",
    "corrected",
    "residual",
    "beta_sweep",
    "amplification",
    "flow",
    "provenance",
}


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        yield obj


def test_kl_optimum_mixture_smoke():
    first = json.loads(dumps(run(Config.smoke())))
    assert set(first) == KEYS
    assert all(np.isfinite(x) for x in _numbers(first))
    assert first["counterexample"]["violates_stated_theorem"] is True
    assert first["corrected"]["tilt_failures"] == 0
    assert first["residual"]["violations"] == 0
    second = json.loads(dumps(run(Config.smoke())))
    assert first == second
