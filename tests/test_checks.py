"""theory.checks: the traced half of the validation rule (predicates, guard, poison, checked).

Independent references: NumPy evaluations of each rule on the same values, and the unguarded
expression computed without any check.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from theory import checks
from theory.checks import (
    all_valid,
    check_bool,
    checked,
    enforce,
    guard,
    poison,
    rules_valid,
    valid_distinct,
    valid_distribution,
    valid_finite,
    valid_nonnegative,
    valid_open_interval,
    valid_positive,
    valid_token_ids,
)

# A distribution must sum to 1 within this (the kl_optimum tolerance, restated for the tests).
PROB_ATOL = 1e-6
# Number of random vectors per predicate check.
NUM_CASES = 200

VALUES = np.array([-np.inf, -2.0, -0.0, 0.0, 1e-300, 0.5, 3.0, np.inf, np.nan])


def _traced(fn, *args):
    """``fn`` evaluated on traced arguments (inside ``jit``)."""
    return np.asarray(jax.jit(fn)(*args))


@pytest.mark.parametrize(
    "predicate,reference",
    [
        (valid_positive, lambda x: np.isfinite(x) & (x > 0)),
        (valid_nonnegative, lambda x: np.isfinite(x) & (x >= 0)),
        (valid_finite, np.isfinite),
        (lambda x: valid_open_interval(x, 0.0, 1.0), lambda x: (x > 0) & (x < 1)),
    ],
)
def test_value_predicates_match_numpy_traced_and_concrete(predicate, reference):
    want = reference(VALUES)
    np.testing.assert_array_equal(_traced(predicate, jnp.asarray(VALUES)), want)
    assert predicate(VALUES) is bool(np.all(want))  # concrete: one Python bool
    assert predicate(VALUES[VALUES == 0.5]) is True


def test_valid_token_ids_and_distinct_match_numpy():
    ids = np.array([-3, -1, 0, 4, 9, 10, 99])
    np.testing.assert_array_equal(
        _traced(lambda y: valid_token_ids(y, 10), jnp.asarray(ids)), (ids >= 0) & (ids < 10)
    )
    assert valid_token_ids(ids, 10) is False and valid_token_ids(ids[2:5], 10) is True
    a, b = np.array([1, 2, 3]), np.array([1, 5, 3])
    np.testing.assert_array_equal(_traced(valid_distinct, a, b), a != b)
    assert valid_distinct(a, b) is False and valid_distinct(a, b + 10) is True


@pytest.mark.parametrize("V", [1, 3, 12])
def test_valid_distribution_matches_numpy_rule(V):
    """Traced: finite, >= 0, |sum - 1| <= atol + V eps; concrete: the float64 rule with atol."""
    rng = np.random.default_rng(V)
    cases = []
    for i in range(NUM_CASES):
        p = rng.dirichlet(np.ones(V))
        kind = i % 5
        if kind == 1:
            p = p * (1 + rng.choice([-1, 1]) * 10 ** rng.uniform(-8, -2))  # mis-normalised
        elif kind == 2:
            p[rng.integers(V)] *= -1  # a negative entry
        elif kind == 3:
            p[rng.integers(V)] = rng.choice([np.nan, np.inf])
        cases.append(p)
    cases = np.stack(cases)  # [NUM_CASES, V]
    traced = np.asarray(
        jax.jit(jax.vmap(lambda q: valid_distribution(q, atol=PROB_ATOL)))(jnp.asarray(cases))
    )
    decided = 0
    for i, p in enumerate(cases):
        finite = bool(np.all(np.isfinite(p)))
        error = abs(np.sum(p) - 1.0) if finite else np.inf
        # |error| far from the tolerance: both forms must agree with the float64 rule
        if abs(error - PROB_ATOL) > 1e-9:
            decided += 1
            want = bool(finite and np.all(p >= 0) and error <= PROB_ATOL)
            assert valid_distribution(p, atol=PROB_ATOL) is want, (i, p)
            assert bool(traced[i]) == want, (i, p)
    assert decided > 0.9 * NUM_CASES


def test_valid_distribution_traced_accepts_float32_rounding():
    """A float32 vector normalised in float32 passes traced, with V up to 10^4 (tolerance V eps)."""
    rng = np.random.default_rng(1)
    for V in (10, 1000, 10_000):
        p = rng.dirichlet(np.ones(V)).astype(np.float32)
        p = p / np.sum(p, dtype=np.float32)
        assert bool(jax.jit(lambda q: valid_distribution(q, atol=PROB_ATOL))(p)), V


def test_all_valid_reduces_and_keeps_python_true():
    assert all_valid(True, True) is True
    assert all_valid(True, False) is False
    out = jax.jit(lambda x: all_valid(True, x > 0, jnp.array([True, True])))(jnp.array([1.0, -1.0]))
    assert out.shape == () and not bool(out)


def test_poison_is_identity_when_valid_and_nan_where_invalid():
    x = jnp.arange(1.0, 5.0)
    assert poison(x, True) is x  # concrete valid: untouched object
    assert np.all(np.isnan(np.asarray(poison(x, False))))
    mask = jnp.array([True, False, True, False])
    out = np.asarray(jax.jit(poison)(x, mask))
    np.testing.assert_array_equal(out[[0, 2]], np.asarray(x)[[0, 2]])
    assert np.all(np.isnan(out[[1, 3]]))


def test_poison_leaves_integer_and_boolean_leaves():
    tree = (jnp.array([1.0, 2.0]), jnp.array([3, 4]), jnp.array([True, False]))
    out = jax.jit(lambda t, v: poison(t, v))(tree, jnp.array(False))
    assert np.all(np.isnan(np.asarray(out[0])))
    np.testing.assert_array_equal(out[1], tree[1])
    np.testing.assert_array_equal(out[2], tree[2])


def test_poison_gradient_exact_when_valid_nan_when_invalid():
    def f(x, valid):
        return jnp.sum(poison(x**2, valid))

    x = jnp.array([0.5, -1.5, 2.0])
    g = jax.jit(jax.grad(f))(x, jnp.array(True))
    np.testing.assert_array_equal(g, 2 * x)  # exact: the factor is 1
    assert np.all(np.isnan(np.asarray(jax.jit(jax.grad(f))(x, jnp.array(False)))))
    # forward mode too
    tangent = jax.jvp(lambda y: f(y, jnp.array(False)), (x,), (jnp.ones(3),))[1]
    assert np.isnan(float(tangent))


def test_guard_replaces_floats_by_nan_and_integers_by_zero():
    args = (jnp.array([1.0, 2.0]), jnp.array([7, 8]))
    same = jax.jit(lambda a, v: guard(a, v))(args, jnp.array(True))
    bad = jax.jit(lambda a, v: guard(a, v))(args, jnp.array(False))
    np.testing.assert_array_equal(same[0], args[0])
    np.testing.assert_array_equal(same[1], args[1])
    assert np.all(np.isnan(np.asarray(bad[0])))
    np.testing.assert_array_equal(bad[1], [0, 0])
    assert guard(args, True) is args


def test_guard_keeps_compiled_arithmetic_of_valid_inputs():
    """x / beta jitted alone vs with the check: bit-identical through guard (XLA rewrites
    x / beta as x * (1 / beta) only while the divide is beta's sole user)."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=64))
    betas = jnp.asarray(rng.uniform(0.1, 3.0, size=50))

    def unchecked(x, beta):
        return jnp.exp(x / beta)

    def checked_fn(x, beta):
        rules = [(valid_positive(beta), "beta must be > 0")]
        return enforce(unchecked(x, guard(beta, rules_valid(rules))), rules)

    differ = 0
    for beta in betas:
        ref = np.asarray(jax.jit(unchecked)(x, beta))
        differ += int(np.asarray(jax.jit(checked_fn)(x, beta)).tobytes() != ref.tobytes())
    assert differ == 0


def test_checked_raises_value_error_naming_the_rule():
    def f(x, beta):
        return poison(x * beta, valid_positive(beta), "beta must be > 0 and finite")

    safe = checked(jax.jit(f))
    assert float(safe(2.0, 0.5)) == 1.0
    with pytest.raises(ValueError, match="beta must be > 0 and finite"):
        safe(2.0, -0.5)
    with pytest.raises(checkify.JaxRuntimeError):
        checked(jax.vmap(f))(jnp.ones(3), jnp.array([1.0, -1.0, 2.0]))


def test_check_bool_rejects_non_booleans():
    check_bool("flag", True)
    check_bool("flag", np.bool_(False))
    for bad in ("no", 0, 1, None, jnp.array(True)):
        with pytest.raises(TypeError, match="flag must be a bool"):
            check_bool("flag", bad)


def test_rule_is_documented_once_and_linked():
    import theory

    assert "Invalid values" in theory.__doc__
    assert ":mod:`theory`" in checks.__doc__
