"""Root pytest configuration: applies to tests/ and to the library doctests.

Sets, before JAX initialises: 8 fake CPU devices for sharding tests, float64, and
``jax_numpy_rank_promotion="raise"`` so that implicit rank broadcasting is an error.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
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
