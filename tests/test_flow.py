"""The integrator: exactness, Euler order, composition, reproducibility, failures, front ends,
compile-once caching."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sims.flows.core import (
    SFTData,
    flow_fn,
    integrate,
    make_optimizer,
    preference_flow,
    raise_on_nonfinite,
    sft_flow,
)
from sims.models.unconstrained import UnconstrainedFeatures, make_pairs
from theory import losses
from theory.single_token import logprob_velocity

# Euler's global error is O(dt): the fitted order over dt = 1e-2 .. 1e-4 must lie in this band.
EULER_ORDER_BAND = (0.9, 1.1)


def _quadratic(x, a):
    return 0.5 * a * x**2


def test_integrate_is_exact_euler_on_quadratic():
    """Euler on L = a x^2 / 2 gives x_n = (1 - a dt)^n x_0 exactly (hand-derived)."""
    a, dt, x0 = 2.0, 0.05, 1.5
    traj = integrate(
        _quadratic, lambda x, _: x, jnp.array(x0), a, dt=dt, num_steps=20, record_every=4
    ).run()
    expected = x0 * (1 - a * dt) ** (4 * np.arange(6))
    np.testing.assert_allclose(traj.observables, expected, rtol=1e-13)
    np.testing.assert_allclose(traj.t, dt * 4 * np.arange(6), rtol=1e-15)
    np.testing.assert_allclose(traj.loss, 0.5 * a * expected**2, rtol=1e-13)


def test_integrate_euler_error_order_is_one():
    """Against the exact flow x(t) = x0 e^{-a t} at T = 1."""
    a, x0, T = 1.3, 1.0, 1.0
    dts = np.array([1e-2, 1e-3, 1e-4])
    errors = []
    for dt in dts:
        n = round(T / dt)
        final = (
            integrate(
                _quadratic,
                lambda x, _: x,
                jnp.array(x0),
                a,
                dt=float(dt),
                num_steps=n,
                record_every=n,
            )
            .run()
            .final
        )
        errors.append(abs(float(final) - x0 * np.exp(-a * T)))
    order = np.polyfit(np.log(dts), np.log(errors), 1)[0]
    assert EULER_ORDER_BAND[0] <= order <= EULER_ORDER_BAND[1], f"order {order}, errors {errors}"


def test_integrate_records_initial_state_first():
    params = {"x": jnp.array([1.0, -2.0])}
    traj = integrate(
        lambda p, _: jnp.sum(p["x"] ** 2),
        lambda p, _: p["x"],
        params,
        dt=0.1,
        num_steps=3,
        record_every=3,
    ).run()
    np.testing.assert_array_equal(traj.observables[0], params["x"])


def test_integrate_two_half_runs_equal_one_full_run():
    model = UnconstrainedFeatures(12, 4, 3, rngs=nnx.Rngs(0), dtype=jnp.float64)
    pairs = make_pairs(model, [0, 1, 2], [1, 2, 3], [4, 5, 6])
    loss = losses.make_loss("dpo", beta=0.5)
    full = preference_flow(model, pairs, loss, dt=0.05, num_steps=40).run().final
    half = preference_flow(model, pairs, loss, dt=0.05, num_steps=20).run().final
    half2 = preference_flow(half, pairs, loss, dt=0.05, num_steps=20).run().final
    np.testing.assert_allclose(half2.unembedding[...], full.unembedding[...], rtol=1e-13)
    np.testing.assert_allclose(half2.hidden[...], full.hidden[...], rtol=1e-13)


def test_preference_flow_lowers_loss_and_is_reproducible():
    def run(seed):
        model = UnconstrainedFeatures(30, 8, 5, rngs=nnx.Rngs(seed), dtype=jnp.float64)
        pairs = make_pairs(model, jnp.arange(5), jnp.arange(5), jnp.arange(5) + 10)
        return preference_flow(
            model, pairs, losses.make_loss("dpo", beta=0.1), dt=0.1, num_steps=200, record_every=10
        ).run()

    traj = run(4)
    assert bool(jnp.all(jnp.diff(traj.loss) < 0)), traj.loss
    assert traj.observables.logprobs.dtype == jnp.float64
    again = run(4)
    np.testing.assert_array_equal(traj.observables.logprobs, again.observables.logprobs)
    assert not np.array_equal(traj.observables.logprobs, run(5).observables.logprobs)


def test_preference_flow_finite_difference_matches_theorems_4_5():
    """(ln pi(dt) - ln pi(0)) / dt -> logprob_velocity, error O(dt), along the simulated flow."""
    model = UnconstrainedFeatures(
        20, 6, 1, rngs=nnx.Rngs(8), dtype=jnp.float64, unembedding_scale=2.0
    )
    pairs = make_pairs(model, [0], [3], [7])
    loss = losses.make_loss("dpo", beta=0.5)
    lp0 = model(jnp.array([0]))[0]
    ell_prime = losses.margin_derivative(
        loss, lp0[3], lp0[7], pairs.ref_logprob_chosen[0], pairs.ref_logprob_rejected[0]
    )
    predicted = logprob_velocity(model.unembedding[...], model.hidden[...][0], 3, 7, ell_prime)
    errors = []
    for dt in (1e-3, 1e-4, 1e-5):
        traj = preference_flow(model, pairs, loss, dt=dt, num_steps=1).run()
        measured = (traj.observables.logprobs[1, 0] - traj.observables.logprobs[0, 0]) / dt
        errors.append(float(jnp.max(jnp.abs(measured - predicted))))
    order = np.polyfit(np.log([1e-3, 1e-4, 1e-5]), np.log(errors), 1)[0]
    assert EULER_ORDER_BAND[0] <= order <= EULER_ORDER_BAND[1], errors


def test_rmsprop_torch_matches_torch_recurrence():
    """torch.optim.RMSprop: v = a v + (1-a) g^2; x -= lr g / (sqrt(v) + eps); a=0.99, eps=1e-8."""
    lr, a, eps, x = 0.01, 0.99, 1e-8, 2.0
    v, xs = 0.0, [x]
    for _ in range(5):
        g = 3.0 * x  # gradient of 1.5 x^2
        v = a * v + (1 - a) * g * g
        x -= lr * g / (np.sqrt(v) + eps)
        xs.append(x)
    traj = integrate(
        lambda x, _: 1.5 * x**2,
        lambda x, _: x,
        jnp.array(2.0),
        dt=lr,
        num_steps=5,
        optimizer="rmsprop_torch",
    ).run()
    np.testing.assert_allclose(traj.observables, xs, rtol=1e-12)


def test_integrate_raises_naming_first_nonfinite_step():
    # Gradient ascent on x^2/2 with dt = 1e150: x = 1e150, 1e300, then inf at step 3 (float64).
    with pytest.raises(FloatingPointError, match=r"step 3 \(t = 3e\+150\)"):
        integrate(
            lambda x, _: -0.5 * x**2, lambda x, _: x, jnp.array(1.0), dt=1e150, num_steps=4
        ).run()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dt": 0.0}, "dt must be > 0"),
        ({"dt": -1.0}, "dt must be > 0"),
        ({"num_steps": 0}, "num_steps must be a positive integer"),
        ({"num_steps": 2.0}, "num_steps must be a positive integer"),
        ({"record_every": 3}, "record_every must divide num_steps"),
        ({"optimizer": "lbfgs"}, "optimizer must be one of"),
    ],
)
def test_integrate_rejects_bad_schedule(kwargs, match):
    args = {"dt": 0.1, "num_steps": 4, "record_every": 1} | kwargs
    with pytest.raises(ValueError, match=match):
        integrate(_quadratic, lambda x, _: x, jnp.array(1.0), 1.0, **args).run()


def test_integrate_rejects_nonfinite_initial_params():
    with pytest.raises(ValueError, match="must be finite"):
        integrate(_quadratic, lambda x, _: x, jnp.array(jnp.nan), 1.0, dt=0.1, num_steps=1).run()


def test_make_pairs_rejects_bad_pairs():
    model = UnconstrainedFeatures(5, 2, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="chosen and rejected must differ"):
        make_pairs(model, [0, 1], [2, 3], [2, 4])
    with pytest.raises(ValueError, match=r"rejected must be token ids in \[0, V\)"):
        make_pairs(model, [0], [1], [5])
    with pytest.raises(ValueError, match=r"prompt must be token ids in \[0, V\) with V=2"):
        make_pairs(model, [2], [1], [0])
    with pytest.raises(ValueError, match="must have one shape"):
        make_pairs(model, [0, 1], [1], [0])


def test_sft_flow_raises_label_logprob():
    model = UnconstrainedFeatures(10, 4, 3, rngs=nnx.Rngs(2), dtype=jnp.float64)
    traj = sft_flow(model, SFTData(jnp.arange(3), jnp.array([1, 2, 3])), dt=0.5, num_steps=50).run()
    assert bool(jnp.all(traj.observables[-1] > traj.observables[0]))
    assert traj.loss[-1] < traj.loss[0]


def test_make_optimizer_sgd_is_euler():
    tx = make_optimizer("sgd", dt=0.25)
    updates, _ = tx.update(jnp.array([4.0]), tx.init(jnp.array([0.0])))
    np.testing.assert_allclose(updates, [-1.0])


def test_flow_fn_vmaps_over_runs():
    """flow_fn is pure: vmapping over initial points equals separate runs."""
    run = flow_fn(_quadratic, lambda x, _: x, optimizer="sgd", num_steps=5, record_every=5)
    x0 = jnp.array([1.0, 2.0, -3.0])
    finals = jax.jit(jax.vmap(run, in_axes=(0, None, None)))(x0, 2.0, 0.1).final
    np.testing.assert_allclose(finals, x0 * 0.8**5, rtol=1e-13)


def _compiles_during(caplog, call) -> list[str]:
    """Names of the jitted functions XLA compiled while ``call()`` ran."""
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING, logger="jax"):
            caplog.clear()
            jax.block_until_ready(call())
    finally:
        jax.config.update("jax_log_compiles", False)
    return [r.getMessage().split()[1] for r in caplog.records if "Compiling" in r.getMessage()]


def test_new_beta_dt_and_length_do_not_recompile(caplog):
    """A second preference flow with a new beta, a new dt and a new num_steps and record_every
    reuses every compiled core (values are run-time arguments, only structure keys the cache)."""
    model = UnconstrainedFeatures(9, 4, 3, rngs=nnx.Rngs(0), dtype=jnp.float64)
    pairs = make_pairs(model, jnp.array([0, 1]), jnp.array([3, 4]), jnp.array([5, 6]))

    def run(beta, dt, steps, every):
        flow = preference_flow(
            model,
            pairs,
            losses.make_loss("dpo", beta=beta),
            dt=dt,
            num_steps=steps,
            record_every=every,
        )
        return flow.run().loss

    first = _compiles_during(caplog, lambda: run(0.1, 0.01, 6, 2))
    assert "jit(chunk)" in first and "jit(init)" in first  # the cores compiled on first use
    again = _compiles_during(caplog, lambda: run(2.5, 0.3, 40, 5))
    assert again == []  # no core, and no slice of a new length either (cut on the host)


def test_new_loss_family_compiles_a_new_core(caplog):
    """Control: the cache is keyed by the loss family (IPO is a new program)."""
    model = UnconstrainedFeatures(9, 4, 3, rngs=nnx.Rngs(0), dtype=jnp.float64)
    pairs = make_pairs(model, jnp.array([0]), jnp.array([3]), jnp.array([5]))
    preference_flow(model, pairs, losses.make_loss("dpo"), dt=0.1, num_steps=2).run()
    again = _compiles_during(
        caplog,
        lambda: (
            preference_flow(model, pairs, losses.make_loss("ipo", tau=0.5), dt=0.1, num_steps=2)
            .run()
            .loss
        ),
    )
    assert "jit(chunk)" in again


def test_flow_equals_one_fixed_schedule_scan():
    """The chunked run (chunks of CHUNK_RECORDS, a padded last chunk) equals flow_fn's single
    scan of the same schedule: same losses, observables and final parameters."""
    from sims.flows.core import CHUNK_RECORDS

    steps = 3 * (CHUNK_RECORDS + 3)  # two full chunks and a padded one at record_every=3
    x0 = jnp.array([1.0, -2.0, 0.5])
    chunked = integrate(
        _quadratic_sum, _identity, x0, 0.7, dt=0.05, num_steps=steps, record_every=3
    ).run()
    whole = flow_fn(_quadratic_sum, _identity, optimizer="sgd", num_steps=steps, record_every=3)(
        x0, 0.7, 0.05
    )
    np.testing.assert_array_equal(chunked.loss, np.asarray(whole.loss))
    np.testing.assert_array_equal(chunked.observables, np.asarray(whole.observables))
    np.testing.assert_array_equal(chunked.final, np.asarray(whole.final))
    np.testing.assert_allclose(chunked.t, np.asarray(whole.t), rtol=1e-15)


def _quadratic_sum(x, a):
    return 0.5 * a * jnp.sum(x**2)


def _identity(x, _):
    return x


def test_flow_lowers_on_abstract_inputs_and_run_reports_its_memory(capsys):
    """lower()/memory() work on jax.ShapeDtypeStruct parameters (nothing is computed), and under
    report_memory a run prints the memory of the very program it executes before stepping."""
    from sims.flows.core import Flow, report_memory

    abstract = jax.ShapeDtypeStruct((1000,), jnp.float32)
    flow = integrate(_quadratic_sum, _identity, abstract, 1.0, dt=0.1, num_steps=4)
    mem = flow.memory()
    assert mem.arguments >= 4000  # the carry: float32 parameters [1000]
    assert mem.outputs >= 16 * 4000  # a chunk of CHUNK_RECORDS observations of x [1000]
    concrete = integrate(
        _quadratic_sum, _identity, jnp.ones(1000, jnp.float32), 1.0, dt=0.1, num_steps=4
    )
    with report_memory(print):
        concrete.run()
    out = capsys.readouterr().out
    assert "device memory: peak" in out
    assert isinstance(flow, Flow) and concrete.memory() == mem


def test_raise_on_nonfinite_names_the_run_and_step():
    raise_on_nonfinite(np.array([-1, -1]), dt=0.1)  # all finite: no error
    with pytest.raises(FloatingPointError, match=r"in 2 of 3 runs; first: run \(0,\) at step 4"):
        raise_on_nonfinite(np.array([4, -1, 2]), dt=0.5)
    with pytest.raises(FloatingPointError, match=r"at step 3 \(t = 0.3\)"):
        raise_on_nonfinite(np.array(3), dt=0.1)


def test_stacked_flow_reports_the_diverging_run():
    """Two stacked runs of gradient ascent on x^2/2, from 0 (a fixed point) and from 1 (overflows at
    step 3 with dt = 1e150, as in the single-run test above): the error names run 1."""
    xs = jnp.array([0.0, 1.0])
    with pytest.raises(FloatingPointError, match=r"1 of 2 runs; first: run \(1,\)"):
        integrate(
            lambda x, _: -0.5 * x**2, lambda x, _: x, xs, dt=1e150, num_steps=3, in_axes=(0, None)
        ).run()


def test_sft_flow_rejects_record_every_zero():
    model = UnconstrainedFeatures(5, 2, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="record_every must be a positive integer"):
        sft_flow(
            model, SFTData(jnp.array([0]), jnp.array([1])), dt=0.1, num_steps=4, record_every=0
        ).run()


def test_preference_flow_rejects_out_of_range_ids_in_hand_built_pairs():
    """Pairs built by hand (not make_pairs) are validated by the flow itself: no clamping."""
    from sims.models.unconstrained import PreferencePairs

    model = UnconstrainedFeatures(5, 2, 2, rngs=nnx.Rngs(0))
    z = jnp.zeros(1)
    bad = PreferencePairs(jnp.array([0]), jnp.array([7]), jnp.array([1]), z, z)
    with pytest.raises(ValueError, match=r"chosen must be token ids in \[0, V\) with V=5"):
        preference_flow(model, bad, losses.make_loss("dpo"), dt=0.1, num_steps=1).run()


def test_stack_models_stacks_and_refuses_mismatch():
    from sims.flows.core import stack_models

    ms = [UnconstrainedFeatures(4, 2, 1, rngs=nnx.Rngs(i)) for i in range(3)]
    stacked = stack_models(ms)
    np.testing.assert_array_equal(stacked.unembedding[...][2], ms[2].unembedding[...])
    with pytest.raises(ValueError, match="share one structure"):
        stack_models([ms[0], UnconstrainedFeatures(5, 2, 1, rngs=nnx.Rngs(0))])
