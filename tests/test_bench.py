"""The benchmark harness (experiments/_bench.py): its PyTorch baseline computes the same flow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import _bench as bm

# float32 torch loop vs float32 JAX flow, 20 steps: the style guide's float32 rtol
FLOAT32_RTOL = 1e-4


def test_torch_baseline_matches_jax_full_parameter_flow():
    pytest.importorskip("torch", reason="the PyTorch baseline needs the bench/parity extra")
    W, H = bm.random_geometry(50, 8, seed=1)
    num_steps = 20
    torch_margin = bm.torch_dpo_margin_after(np.asarray(W), np.asarray(H[0]), num_steps)
    params = bm.full_parameter_steps()((jnp.array(W), jnp.array(H)), num_steps)
    logprobs = jax.nn.log_softmax(params[0] @ params[1][0])
    jax_margin = float(logprobs[bm.CHOSEN] - logprobs[bm.REJECTED])
    start = jax.nn.log_softmax(W @ H[0])
    assert abs(jax_margin - float(start[bm.CHOSEN] - start[bm.REJECTED])) > 1e-3  # it moved
    np.testing.assert_allclose(torch_margin, jax_margin, rtol=FLOAT32_RTOL)


def test_bench_runs_without_torch(monkeypatch):
    from experiments import bench

    monkeypatch.setattr(bm, "torch_available", lambda: False)
    no_torch = bench.run(bench.Config.smoke())
    assert "torch" not in no_torch["cells"][0] and "torch" not in no_torch["sweep"]
    assert no_torch["provenance"]["torch"] == "not installed"
    assert not no_torch["targets"]["reduced_over_torch_ge_1e4"]
