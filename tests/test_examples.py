"""Tests of sims.flows.examples: the compilation counter, and the compile-once property of every
flow front end (a new beta, dt and num_steps compile nothing and take effect)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sims.flows.examples import FRONT_ENDS, compilations

#: Front ends whose first compilation takes over 20 s on the 2-core CPU machine.
SLOW = {"preference_flow (transformer)"}


def test_compilations_counts_each_new_program_once():
    f = jax.jit(lambda x: jnp.sin(x) + 1.0)
    a, b, c = jnp.ones(5), jnp.zeros(5), jnp.ones(6)
    with compilations() as seen:
        f(a)
        f(b)  # same shape: cached
        f(c)  # new shape: a new program
    assert len(seen) == 2 and all(d > 0 for d in seen)
    with compilations() as seen:
        f(c)
    assert seen == []


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in FRONT_ENDS],
)
def test_front_end_compiles_nothing_for_new_beta_dt_and_num_steps(name):
    build = FRONT_ENDS[name]
    first = build(0, beta=0.1, dt=0.1, num_steps=4).run()
    with compilations() as seen:
        again = build(1, beta=0.35, dt=0.04, num_steps=12).run()
    assert seen == [], f"{name}: {len(seen)} compilation(s) for new values"
    # the new values took effect: t = n * dt on the new grid, and another trajectory
    assert again.t[-1] == pytest.approx(0.04 * 12, rel=1e-12) and first.t[-1] == pytest.approx(0.4)
    assert not np.allclose(np.asarray(first.loss)[..., -1], np.asarray(again.loss)[..., -1])
