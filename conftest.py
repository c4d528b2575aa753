"""Root pytest configuration: applies to tests/ and to the library doctests.

Sets, before JAX initialises: 8 fake CPU devices for sharding tests, float64, and
``jax_numpy_rank_promotion="raise"`` so that implicit rank broadcasting is an error.

XLA's CPU backend compiles the tests at LLVM optimisation level 0: test problems are tiny, so
compilation dominates their cost, and level 0 halves the suite's CPU time (measured: 175 s -> 87 s
of CPU for tests/test_single_token.py + tests/test_multi_token.py). It changes code generation, not
the maths; every numerical check has a stated tolerance. The main job and benchmarks compile at the
default level.
"""

import os

_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0")
_present = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_present] + [f for f in _FLAGS if f.split("=")[0] not in _present]
).strip()
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace["jnp"] = jnp
    doctest_namespace["jax"] = jax
