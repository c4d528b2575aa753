"""sims.models.mlp_features: the centred lazy / mean-field MLP model, its pairs type and SFT front
end.

Independent references: a NumPy forward pass written out here; hand-derived values (uniform softmax
gives 1/V; the readout multipliers 1/m and alpha/sqrt(m)); one explicit SGD / torch-RMSprop step
computed from ``jax.grad`` of a plain function of arrays; the true velocity of
``sims.analysis.kernel``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sims.analysis.kernel import hidden_kernel, rmsprop_preconditioner, velocity_channels
from sims.flows.core import integrate_model, preference_flow
from sims.models.mlp_features import (
    ScaledMLPFeatures,
    feature_sft_flow,
    make_feature_pairs,
    output_multiplier,
)
from theory.kernel import preconditioned_logprob_velocity
from theory.losses import make_loss, mean_pair_loss

# Same arithmetic in NumPy and XLA, float64: round-off only.
RTOL_FORWARD = 1e-12
# Closed form vs autodiff / one explicit optimiser step, float64: round-off only.
RTOL_AUTODIFF = 1e-9
# Log-softmax subtracts numbers of the logits' size: absolute floor relative to max |logit|.
ATOL_PER_LOGIT = 1e-14
V, F, D, M = 7, 3, 4, 5  # vocabulary, features, hidden size, width of the test models
SEEDS = range(6)


def _model(seed, parametrisation="mean_field", rate=0.0, alpha=3.0):
    W0 = np.random.default_rng(100 + seed).normal(size=(V, D))
    return ScaledMLPFeatures(
        W0, F, width=M, parametrisation=parametrisation, rngs=nnx.Rngs(seed), lazy_scale=alpha,
        unembedding_rate=rate, dtype=jnp.float64,
    )  # fmt: skip


def _perturb(model, seed):
    """Move every parameter off its initial value (so the centring term matters)."""
    rng = np.random.default_rng(200 + seed)
    for name in ("fc_in", "fc_in_bias", "fc_out"):
        p = getattr(model, name)
        p[...] = p[...] + jnp.asarray(rng.normal(size=p.shape))
    return model


def _numpy_hidden(model, X):
    A1, b1, A2 = (np.asarray(getattr(model, n)[...]) for n in ("fc_in", "fc_in_bias", "fc_out"))
    A10, b10, A20 = (
        np.asarray(getattr(model, n)[...]) for n in ("fc_in_init", "fc_in_bias_init", "fc_out_init")
    )
    c = float(model.output_scale[...])
    f = X.shape[-1]
    now = np.tanh(X @ A1.T / np.sqrt(f) + b1) @ A2.T
    init = np.tanh(X @ A10.T / np.sqrt(f) + b10) @ A20.T
    return c * (now - init)


@pytest.mark.parametrize("parametrisation", ["mean_field", "lazy"])
def test_scaled_mlp_features_hidden_matches_numpy(parametrisation):
    for seed in SEEDS:
        model = _perturb(_model(seed, parametrisation), seed)
        X = np.random.default_rng(seed).normal(size=(9, F))
        np.testing.assert_allclose(
            model.hidden(jnp.asarray(X)), _numpy_hidden(model, X), rtol=RTOL_FORWARD,
            atol=1e-14, err_msg=f"seed {seed}",
        )  # fmt: skip
        W = np.asarray(model.unembedding_matrix())
        logits = _numpy_hidden(model, X) @ W.T
        expected = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
        np.testing.assert_allclose(
            model(jnp.asarray(X)), expected, rtol=RTOL_FORWARD,
            atol=ATOL_PER_LOGIT * np.max(np.abs(logits)), err_msg=f"seed {seed}",
        )  # fmt: skip


def test_scaled_mlp_features_uniform_at_initialisation():
    for parametrisation in ("mean_field", "lazy"):
        model = _model(0, parametrisation)
        X = jnp.asarray(np.random.default_rng(1).normal(size=(4, F)))
        np.testing.assert_allclose(jnp.exp(model(X)), 1.0 / V, rtol=1e-14)  # h = 0: softmax 1/V


def test_output_multiplier_hand_values():
    assert output_multiplier("mean_field", 16, lazy_scale=5.0) == 1.0 / 16
    assert output_multiplier("lazy", 16, lazy_scale=5.0) == 5.0 / 4.0  # alpha / sqrt(16)
    with pytest.raises(ValueError, match="parametrisation must be one of"):
        output_multiplier("ntk", 16, lazy_scale=5.0)
    with pytest.raises(ValueError, match="lazy_scale must be > 0"):
        output_multiplier("lazy", 16, lazy_scale=0.0)
    with pytest.raises(ValueError, match="width must be"):
        output_multiplier("lazy", 0, lazy_scale=1.0)


def test_lazy_and_mean_field_kernels_differ_by_c_squared_at_init():
    """Same seed: same weights, so K_lazy = (alpha sqrt(m))^2 K_mean_field exactly."""
    x = jnp.asarray(np.random.default_rng(3).normal(size=F))
    alpha = 3.0
    K = {
        p: hidden_kernel(lambda m: m.hidden(x), _model(0, p, alpha=alpha))
        for p in ("mean_field", "lazy")
    }
    ratio = (alpha * np.sqrt(M)) ** 2  # (alpha / sqrt(m)) / (1 / m) = alpha sqrt(m)
    np.testing.assert_allclose(K["lazy"], ratio * K["mean_field"], rtol=RTOL_AUTODIFF)


def test_frozen_unembedding_has_no_parameter_and_does_not_move():
    model = _model(0, rate=0.0)
    assert "unembedding_delta" not in nnx.split(model, nnx.Param, ...)[1]
    X = jnp.asarray(np.random.default_rng(0).normal(size=(5, F)))
    res = feature_sft_flow(
        model, X, jnp.arange(5), dt=1e-2, num_steps=3, optimizer="rmsprop_torch"
    ).run()
    np.testing.assert_array_equal(res.final.unembedding_matrix(), model.unembedding_matrix())
    assert not np.allclose(res.final.fc_out[...], model.fc_out[...])  # the backbone trained


def _plain_sft_loss(params, W0, consts, X, labels, rate):
    """Mean cross-entropy of the model written as a plain function of arrays."""
    A1, b1, A2, delta = params
    A10, b10, A20, c = consts
    f = X.shape[-1]
    h = c * (
        jnp.tanh(X @ A1.T / jnp.sqrt(f) + b1[None]) @ A2.T
        - jnp.tanh(X @ A10.T / jnp.sqrt(f) + b10[None]) @ A20.T
    )
    logp = jax.nn.log_softmax(h @ (W0 + rate * delta).T, axis=-1)
    return -jnp.mean(logp[jnp.arange(X.shape[0]), labels])


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop_torch"])
def test_feature_sft_flow_first_step_matches_explicit_step(optimizer):
    """One step of the flow = theta - dt * g (SGD) or theta - dt * g / (sqrt(0.01 g^2) + 1e-8)
    (torch RMSprop's first step), with g from jax.grad of the plain loss; W moves by rate * step."""
    rate, dt = 0.3, 1e-2
    for seed in SEEDS:
        model = _perturb(_model(seed, "lazy", rate=rate), seed)
        rng = np.random.default_rng(seed)
        X, labels = jnp.asarray(rng.normal(size=(6, F))), jnp.asarray(rng.integers(0, V, 6))
        params = [getattr(model, n)[...] for n in ("fc_in", "fc_in_bias", "fc_out")]
        params.append(model.unembedding_delta[...])
        consts = [getattr(model, n)[...] for n in ("fc_in_init", "fc_in_bias_init", "fc_out_init")]
        consts.append(model.output_scale[...])
        W0 = model.unembedding_base[...]
        grads = jax.grad(_plain_sft_loss)(params, W0, consts, X, labels, rate)
        if optimizer == "sgd":
            steps = [-dt * g for g in grads]
        else:
            steps = [-dt * g / (np.sqrt(0.01) * jnp.abs(g) + 1e-8) for g in grads]
        res = feature_sft_flow(model, X, labels, dt=dt, num_steps=1, optimizer=optimizer).run()
        for name, p, s in zip(("fc_in", "fc_in_bias", "fc_out"), params, steps, strict=False):
            np.testing.assert_allclose(
                getattr(res.final, name)[...], p + s, rtol=RTOL_AUTODIFF, atol=1e-14,
                err_msg=f"{name}, seed {seed}",
            )  # fmt: skip
        np.testing.assert_allclose(
            res.final.unembedding_matrix(), W0 + rate * steps[3], rtol=RTOL_AUTODIFF, atol=1e-14
        )


def test_with_unembedding_rate_keeps_logprobs_and_resets_delta():
    model = _perturb(_model(1, "mean_field", rate=0.5), 1)
    model.unembedding_delta[...] = jnp.asarray(np.random.default_rng(2).normal(size=(V, D)))
    X = jnp.asarray(np.random.default_rng(3).normal(size=(4, F)))
    for rate in (0.0, 0.2):
        copy = model.with_unembedding_rate(rate)
        np.testing.assert_allclose(copy(X), model(X), rtol=RTOL_FORWARD)
        np.testing.assert_array_equal(copy.unembedding_delta[...], 0.0)
        assert float(copy.unembedding_rate[...]) == rate
        assert ("unembedding_delta" in nnx.split(copy, nnx.Param, ...)[1]) == (rate > 0)
    with pytest.raises(ValueError, match="unembedding_rate must be >= 0"):
        model.with_unembedding_rate(-1.0)


def _kernel_form_vs_truth(graphdef, state, x, y_pos, y_neg, trained):
    """One instance: (kernel-form prediction, true velocity) along torch RMSprop's first step."""
    model = nnx.merge(graphdef, state)
    loss = make_loss("dpo", beta=0.5)

    def logprobs(m):
        return m(x[None])[0]

    ref = jax.lax.stop_gradient(logprobs(model))

    def loss_fn(m):
        lp = logprobs(m)
        return mean_pair_loss(loss, lp[y_pos], lp[y_neg], ref[y_pos], ref[y_neg])

    P = rmsprop_preconditioner(loss_fn, model)
    name = "unembedding_delta" if trained else "fc_out"  # frozen W: only .total is used
    truth = velocity_channels(logprobs, loss_fn, model, unembedding=name, preconditioner=P).total
    K_P = hidden_kernel(lambda m: m.hidden(x), model, preconditioner=P)
    rate = model.unembedding_rate[...]
    gain = rate**2 * P["unembedding_delta"][...] if trained else 0.0
    pred = preconditioned_logprob_velocity(
        model.unembedding_matrix(),
        model.hidden(x),
        K_P,
        y_pos,
        y_neg,
        -0.25,
        unembedding_gain=gain,
    )  # fmt: skip  (l' = -beta sigma(0) = -0.25 at the reference)
    return pred, truth


@pytest.mark.parametrize("rate", [0.0, 0.4])
def test_kernel_form_matches_true_rmsprop_velocity(rate):
    """theory.kernel with the measured K_P and W gains rate^2 * P_Delta (the module's reading of
    the rate) = jvp of ln pi along -P grad L of the actual DPO loss (sims.analysis.kernel), on N
    prompts and pairs per model (vmapped)."""
    N = 200
    for seed in range(2):
        model = _perturb(_model(seed, "mean_field", rate=rate), seed)
        graphdef, state = nnx.split(model)
        rng = np.random.default_rng(seed)
        x = jnp.asarray(rng.normal(size=(N, F)))
        y_pos = jnp.asarray(rng.integers(0, V, N))
        y_neg = (y_pos + jnp.asarray(rng.integers(1, V, N))) % V
        run = jax.jit(
            jax.vmap(_kernel_form_vs_truth, in_axes=(None, None, 0, 0, 0, None)),
            static_argnums=(0, 5),
        )
        pred, truth = run(graphdef, state, x, y_pos, y_neg, rate > 0)
        scale = np.max(np.abs(truth), axis=1, keepdims=True)
        err = np.max(np.abs(pred - truth) / scale, axis=1)
        worst = int(np.argmax(err))
        assert err[worst] <= RTOL_AUTODIFF, f"seed {seed}, instance {worst}: rel err {err[worst]}"


def test_feature_pairs_reference_and_validation():
    model = _perturb(_model(0), 0)
    X = jnp.asarray(np.random.default_rng(0).normal(size=(3, F)))
    pairs = make_feature_pairs(model, X, [0, 1, 2], [3, 4, 5])
    lp = np.asarray(model(X))
    np.testing.assert_array_equal(pairs.ref_logprob_chosen, lp[[0, 1, 2], [0, 1, 2]])
    np.testing.assert_array_equal(pairs.ref_logprob_rejected, lp[[0, 1, 2], [3, 4, 5]])
    margin = pairs.record(model).margin
    np.testing.assert_allclose(margin, lp[[0, 1, 2], [0, 1, 2]] - lp[[0, 1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match="chosen and rejected must differ"):
        make_feature_pairs(model, X, [0, 1, 2], [0, 4, 5])
    with pytest.raises(ValueError, match="features must have shape"):
        make_feature_pairs(model, X[:, :2], [0, 1, 2], [3, 4, 5])
    with pytest.raises(ValueError, match="chosen must"):
        make_feature_pairs(model, X, [0, 1, V], [3, 4, 5])
    with pytest.raises(ValueError, match="chosen must have shape"):
        make_feature_pairs(model, X, [0, 1], [3, 4])


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_stacked_feature_pairs_flow_equals_separate_flows():
    """preference_flow over R stacked single-pair runs = R separate flows (vmap changes nothing)."""
    model = _perturb(_model(2, "lazy", rate=0.1), 2)
    X = jnp.asarray(np.random.default_rng(5).normal(size=(3, F)))
    pairs = make_feature_pairs(model, X, [0, 1, 2], [3, 4, 5])
    loss = make_loss("ipo", tau=0.5)
    stacked = jax.tree_util.tree_map(lambda a: a[:, None], pairs)
    kwargs = dict(dt=1e-2, num_steps=4, optimizer="rmsprop_torch")
    together = preference_flow(model, stacked, loss, in_axes=(None, 0), **kwargs).run()
    for r in range(3):
        one = jax.tree_util.tree_map(lambda a, r=r: a[r], stacked)
        alone = preference_flow(model, one, loss, **kwargs).run()
        np.testing.assert_allclose(together.loss[r], alone.loss, rtol=RTOL_AUTODIFF)


def test_scaled_mlp_features_rejects_bad_arguments():
    W = np.zeros((3, 2))
    kw = dict(width=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="parametrisation must be one of"):
        ScaledMLPFeatures(W, 2, parametrisation="ntk", **kw)
    with pytest.raises(ValueError, match="unembedding_rate must be >= 0"):
        ScaledMLPFeatures(W, 2, parametrisation="lazy", unembedding_rate=-0.1, **kw)
    with pytest.raises(ValueError, match="unembedding must"):
        ScaledMLPFeatures(np.zeros(3), 2, parametrisation="lazy", **kw)
    with pytest.raises(ValueError, match="unembedding must be finite"):
        ScaledMLPFeatures(np.full((3, 2), np.nan), 2, parametrisation="lazy", **kw)
    model = ScaledMLPFeatures(W, 2, parametrisation="lazy", **kw)
    with pytest.raises(ValueError, match="label must have shape"):
        feature_sft_flow(model, np.zeros((4, 2)), np.zeros(3, int), dt=0.1, num_steps=1).run()


def test_integrate_model_trains_only_params():
    """Constants (initial weights, W0, c, eta) ride along unchanged under integrate_model."""
    model = _model(4, "lazy", rate=0.2)
    X = jnp.asarray(np.random.default_rng(4).normal(size=(2, F)))

    def loss(m, x):
        return jnp.sum(m.hidden(x) ** 2) + jnp.sum(m.unembedding_matrix() ** 2)

    res = integrate_model(model, loss, loss, X, dt=0.1, num_steps=2).run()
    for name in ("fc_in_init", "fc_in_bias_init", "fc_out_init", "unembedding_base"):
        np.testing.assert_array_equal(getattr(res.final, name)[...], getattr(model, name)[...])
    assert float(res.final.output_scale[...]) == float(model.output_scale[...])


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_closed_form_kernel_matches_hidden_kernel(rate):
    """The closed form vs sims.analysis.kernel.hidden_kernel (vjp / jvp products), P = I and a
    random
    positive P, on N prompts per model (vmapped)."""
    N = 200
    for seed in range(4):
        model = _perturb(_model(seed, "lazy" if seed % 2 else "mean_field", rate=rate), seed)
        graphdef, state = nnx.split(model)
        x = jnp.asarray(np.random.default_rng(seed).normal(size=(N, F)))
        params = nnx.split(model, nnx.Param, ...)[1]
        leaves, tree = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        gains = jax.tree_util.tree_unflatten(
            tree,
            [jnp.exp(jax.random.normal(k, a.shape)) for k, a in zip(keys, leaves, strict=True)],
        )
        for P in (None, gains):

            def both(x, P=P, graphdef=graphdef, state=state):
                m = nnx.merge(graphdef, state)
                measured = hidden_kernel(lambda m: m.hidden(x), m, preconditioner=P)
                return m.closed_form_kernel(x, preconditioner=P), measured

            closed, measured = jax.jit(jax.vmap(both))(x)
            scale = np.max(np.abs(measured), axis=(1, 2))
            err = np.max(np.abs(closed - measured), axis=(1, 2)) / scale
            worst = int(np.argmax(err))
            assert err[worst] <= RTOL_AUTODIFF, (
                f"seed {seed}, P {P is not None}, prompt {worst}: rel err {err[worst]}"
            )
