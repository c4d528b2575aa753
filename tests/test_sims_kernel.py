"""sims.analysis.kernel on NNX models (MLP features, unconstrained features, tied / untied
transformers).

Independent references: ``jax.jacrev``'s explicit Jacobian for ``K = J P J^T``; a ``jax.jvp`` of
the log-probs along ``-P grad L`` written out here for the true velocity; the first step of the
project's flow (``sims.flows.core.integrate_model``, optax ``"rmsprop_torch"``) for the RMSprop
form.
"""

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sims.analysis.kernel import (
    hidden_kernel,
    param_paths,
    rmsprop_preconditioner,
    tied_cross_terms,
    velocity_channels,
)
from sims.flows.core import integrate_model
from sims.models.transformer import CausalTransformer
from sims.models.unconstrained import MLPFeatures, UnconstrainedFeatures
from theory import losses
from theory.kernel import (
    kernel_logprob_velocity,
    multi_sample_kernel_logprob_velocity,
    preconditioned_logprob_velocity,
    tied_kernel_logprob_velocity,
)

# K from vjp/jvp products vs K from the explicit jacrev Jacobian: float64 round-off only.
RTOL_KERNEL = 1e-10
# Closed form (theory.kernel with the measured K) vs autodiff of the loss: round-off only.
RTOL_AUTODIFF = 1e-9
# Absolute floor relative to the size of the autodiff channels being summed.
ATOL_PER_SCALE = 1e-12
# Fitted order of the forward difference's error over dt = 1e-3 ... 1e-5 (first order: 1).
ORDER_RANGE = (0.9, 1.1)
DPO = losses.make_loss("dpo", beta=0.5)


def _explicit_kernel(hidden_fn, model, gains=None):
    """``J P J^T`` from ``jax.jacrev``: ``[n, n]`` over the flattened ``h``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    f = lambda p: hidden_fn(nnx.merge(graphdef, p, rest)).reshape(-1)  # noqa: E731
    jac = jax.jacrev(f)(params)
    n = f(params).shape[0]
    J = jnp.concatenate([j.reshape(n, -1) for j in jax.tree_util.tree_leaves(jac)], axis=1)
    if gains is None:
        return J @ J.T
    g = jnp.concatenate([a.reshape(-1) for a in jax.tree_util.tree_leaves(gains)])
    return (J * g[None, :]) @ J.T


def _mlp(seed, V=12, f=4, d=5, width=7):
    return MLPFeatures(V, f, d, width=width, rngs=nnx.Rngs(seed), dtype=jnp.float64)


def _transformer(seed, tied, V=13, d=8):
    return CausalTransformer(
        V, d_model=d, num_layers=1, num_heads=2, max_len=6, tied=tied, rngs=nnx.Rngs(seed),
        dtype=jnp.float64,
    )  # fmt: skip


def _random_gains(model, seed):
    params = nnx.split(model, nnx.Param, ...)[1]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [jnp.exp(jax.random.normal(k, x.shape)) for k, x in zip(keys, leaves, strict=True)]
    )


# --- hidden_kernel vs jacrev ----------------------------------------------------------------------


@partial(jax.jit, static_argnums=0)
def _mlp_kernels(graphdef, state, X, gains):
    """hidden_kernel and the explicit jacrev kernel of an MLP: one prompt, N prompts, with P."""
    model = nnx.merge(graphdef, state)
    one = lambda m: m.hidden(X[0])  # noqa: E731
    many = lambda m: m.hidden(X)  # noqa: E731
    return (
        (hidden_kernel(one, model), _explicit_kernel(one, model)),
        (hidden_kernel(many, model, chunk_size=4), _explicit_kernel(many, model)),  # 4 !| n
        (hidden_kernel(one, model, preconditioner=gains), _explicit_kernel(one, model, gains)),
    )


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
@pytest.mark.parametrize("seed", range(3))
def test_hidden_kernel_matches_jacrev_mlp(seed):
    model = _mlp(seed)
    X = jax.random.normal(jax.random.key(seed), (3, 4))
    (one, one_ref), (many, many_ref), (pre, pre_ref) = _mlp_kernels(
        *nnx.split(model), X, _random_gains(model, seed)
    )
    np.testing.assert_allclose(one, one_ref, rtol=RTOL_KERNEL, atol=1e-14)
    flat = jnp.transpose(many, (0, 2, 1, 3)).reshape(15, 15)  # [N, N, d, d] -> [N d, N d]
    np.testing.assert_allclose(flat, many_ref, rtol=RTOL_KERNEL, atol=1e-14)
    np.testing.assert_allclose(pre, pre_ref, rtol=RTOL_KERNEL, atol=1e-14)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_hidden_kernel_exclude_drops_those_parameters():
    model = _mlp(4)
    x = jnp.linspace(-1.0, 1.0, 4)
    one = lambda m: m.hidden(x)  # noqa: E731
    # W does not feed h: excluding it changes nothing
    np.testing.assert_array_equal(
        hidden_kernel(one, model, exclude=("unembedding",)), hidden_kernel(one, model)
    )
    # freezing fc1.kernel: the explicit kernel with a zero gain there
    gains = nnx.split(model, nnx.Param, ...)[1]
    gains = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.zeros_like(a) if "fc1" in jax.tree_util.keystr(p) and "kernel"
        in jax.tree_util.keystr(p) else jnp.ones_like(a),
        gains,
    )  # fmt: skip
    frozen = hidden_kernel(one, model, exclude=("fc1.kernel",))
    np.testing.assert_allclose(frozen, _explicit_kernel(one, model, gains), rtol=RTOL_KERNEL)
    assert not np.allclose(frozen, hidden_kernel(one, model), rtol=1e-3)


def test_hidden_kernel_of_unconstrained_features_is_block_identity():
    """Free hidden rows: K_ij = I when prompts i and j share a row, 0 otherwise (Thms 8-9)."""
    model = UnconstrainedFeatures(5, 3, 4, rngs=nnx.Rngs(0), dtype=jnp.float64)
    rows = jnp.array([0, 2, 2, 3])
    K = hidden_kernel(lambda m: m.hidden[...][rows], model)
    same = (rows[:, None] == rows[None, :]).astype(jnp.float64)
    np.testing.assert_array_equal(K, jnp.einsum("ij,ab->ijab", same, jnp.eye(3)))


@pytest.mark.slow  # default: the MLP jacrev check and the transformer's exact kernel form below
@pytest.mark.parametrize("tied", [True, False])
def test_hidden_kernel_matches_jacrev_transformer(tied):
    model = _transformer(1, tied)
    tokens = jnp.array([[1, 4, 2, 7, 3], [5, 5, 0, 12, 9]])
    fn = lambda m: m.hidden_states(tokens)[:, -1]  # noqa: E731  [2, d]
    graphdef, state = nnx.split(model)
    K, ref = jax.jit(
        lambda s: (
            hidden_kernel(fn, nnx.merge(graphdef, s)),
            _explicit_kernel(fn, nnx.merge(graphdef, s)),
        )
    )(state)
    flat = jnp.transpose(K, (0, 2, 1, 3)).reshape(16, 16)
    np.testing.assert_allclose(flat, ref, rtol=RTOL_KERNEL, atol=1e-13)
    names = param_paths(model)
    assert "embed.embedding" in names and ("unembedding" in names) != tied


# --- velocities on NNX models ---------------------------------------------------------------------


class _Prompt(NamedTuple):
    """One prompt's data: features (MLP) or tokens (transformer), the pair and the reference."""

    x: jax.Array
    y_pos: jax.Array
    y_neg: jax.Array
    ref: jax.Array


def _answer_logprobs(model, prompt: _Prompt):
    if isinstance(model, MLPFeatures):
        return model(prompt.x)
    return jax.nn.log_softmax(model(prompt.x)[-1])


def _answer_hidden(model, prompt: _Prompt):
    if isinstance(model, MLPFeatures):
        return model.hidden(prompt.x)
    return model.hidden_states(prompt.x)[-1]


def _pair_loss(model, prompt: _Prompt):
    lp = _answer_logprobs(model, prompt)
    return losses.mean_pair_loss(
        DPO, lp[prompt.y_pos][None], lp[prompt.y_neg][None], prompt.ref[:1], prompt.ref[1:]
    )


def _direct_truth(model, prompt: _Prompt, gains=None):
    """jvp of the log-probs along -P grad L, written out without sims.analysis.kernel."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.grad(lambda p: _pair_loss(nnx.merge(graphdef, p, rest), prompt))(params)
    if gains is not None:
        grads = jax.tree_util.tree_map(jnp.multiply, grads, gains)
    tangent = jax.tree_util.tree_map(jnp.negative, grads)
    return jax.jvp(
        lambda p: _answer_logprobs(nnx.merge(graphdef, p, rest), prompt), (params,), (tangent,)
    )[1]


def _measure(model, prompt: _Prompt, unembedding: str, tied: bool, gains=None, direct=True):
    """Everything the closed forms need, the autodiff channels and (``direct``) the truth written
    out without sims.analysis.kernel."""
    channels = velocity_channels(
        lambda m: _answer_logprobs(m, prompt),
        lambda m: _pair_loss(m, prompt),
        model,
        unembedding=unembedding,
        preconditioner=gains,
    )
    hidden_fn = lambda m: _answer_hidden(m, prompt)  # noqa: E731
    K = hidden_kernel(hidden_fn, model, preconditioner=gains)
    cross = (
        tied_cross_terms(
            hidden_fn, model, prompt.y_pos, prompt.y_neg, unembedding=unembedding,
            preconditioner=gains,
        )
        if tied
        else None
    )  # fmt: skip
    lp = _answer_logprobs(model, prompt)
    ell_prime = losses.margin_derivative(
        DPO, lp[prompt.y_pos], lp[prompt.y_neg], prompt.ref[0], prompt.ref[1]
    )
    truth = _direct_truth(model, prompt, gains) if direct else channels.total
    return channels, K, cross, hidden_fn(model), ell_prime, truth


def _scale(channels):
    return sum(float(jnp.max(jnp.abs(c))) for c in channels)


def _assert_close(closed, auto, scale, label):
    np.testing.assert_allclose(
        closed, auto, rtol=RTOL_AUTODIFF, atol=ATOL_PER_SCALE * scale, err_msg=label
    )


@partial(jax.jit, static_argnums=0)
def _measure_mlp(graphdef, state, prompt):
    return _measure(nnx.merge(graphdef, state), prompt, "unembedding", False)


@pytest.mark.parametrize("seed", range(3))
def test_velocity_channels_and_kernel_form_on_mlp(seed):
    model = _mlp(seed)
    k = jax.random.split(jax.random.key(seed), 3)
    prompt = _Prompt(
        jax.random.normal(k[0], (4,)), jnp.array(seed), jnp.array(seed + 3), jnp.zeros(2)
    )
    lp = _answer_logprobs(model, prompt)
    prompt = prompt._replace(
        ref=jnp.stack([lp[seed], lp[seed + 3]]) + jax.random.normal(k[1], (2,))
    )
    channels, K, _, h, ell, truth = _measure_mlp(*nnx.split(model), prompt)
    scale = _scale(channels)
    W = model.unembedding[...]
    _assert_close(channels.total, truth, scale, "velocity_channels.total vs direct jvp")
    _assert_close(channels.unembedding + channels.backbone, channels.total, scale, "split")
    backbone = kernel_logprob_velocity(
        W, h, K, prompt.y_pos, prompt.y_neg, ell, unembedding_rate=0.0
    )
    full = kernel_logprob_velocity(W, h, K, prompt.y_pos, prompt.y_neg, ell)
    _assert_close(backbone, channels.backbone, scale, "backbone channel = K term")
    _assert_close(full - backbone, channels.unembedding, scale, "W channel = |h|^2 term")
    _assert_close(full, truth, scale, "kernel form")


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
@pytest.mark.parametrize("tied", [pytest.param(False, marks=pytest.mark.slow), True])
def test_kernel_form_is_exact_on_causal_transformer(tied):
    """4 prompts (random tokens; in two of them y+ is a prompt token, which is where the tied
    cross terms matter) x {gradient flow (P = 1), a random diagonal P}: one vmapped compile."""
    model = _transformer(2, tied)
    unembedding = "embed.embedding" if tied else "unembedding"
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, 13, size=(4, 5)))
    y_pos = jnp.concatenate([tokens[:2, 1], jnp.array([0, 0])])
    y_neg = (y_pos + jnp.array([1, 5, 1, 7])) % 13
    prompts = _Prompt(tokens, y_pos, y_neg, jnp.tile(jnp.array([-1.0, -1.5]), (4, 1)))
    prompts = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, a]), prompts)  # [8, ...]
    ones = jax.tree_util.tree_map(jnp.ones_like, _random_gains(model, 5))
    gains = jax.tree_util.tree_map(
        lambda o, g: jnp.concatenate([jnp.repeat(o[None], 4, 0), jnp.repeat(g[None], 4, 0)]),
        ones,
        _random_gains(model, 5),
    )  # [8, ...]: P = 1 for the first four, random for the last four
    channels, K, cross, h, ell, truth = jax.jit(  # velocity_channels vs a direct jvp: MLP tests
        jax.vmap(lambda p, g: _measure(nnx.merge(graphdef, state), p, unembedding, tied, g, False))
    )(prompts, gains)
    W = model.unembedding_matrix()
    for i in range(8):
        scale = _scale([c[i] for c in channels])
        gain_W = _table(jax.tree_util.tree_map(lambda a, i=i: a[i], gains), tied)
        if tied:
            closed = tied_kernel_logprob_velocity(
                W, h[i], K[i], cross.hidden_cross[i], cross.logit_cross[i], y_pos[i % 4],
                y_neg[i % 4], ell[i], unembedding_gain=gain_W,
            )  # fmt: skip
        else:
            closed = preconditioned_logprob_velocity(
                W, h[i], K[i], y_pos[i % 4], y_neg[i % 4], ell[i], unembedding_gain=gain_W
            )
        _assert_close(closed, truth[i], scale, f"tied={tied} case {i}")


def _table(gains, tied):
    """The preconditioner's entries on W (the shared table when tied)."""
    return gains["embed"]["embedding"][...] if tied else gains["unembedding"][...]


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_multi_prompt_kernel_form_on_mlp():
    """N prompts share the MLP: K_ij from hidden_kernel on h [N, d] gives Thms 8-9's analogue."""
    model = _mlp(7)
    N = 4
    X = jax.random.normal(jax.random.key(7), (N, 4))
    y_pos, y_neg = jnp.array([0, 1, 2, 0]), jnp.array([3, 4, 5, 6])
    ref = jnp.full((N,), -2.0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rows = jnp.arange(N)

    def loss_fn(m):
        lp = m(X)
        return losses.mean_pair_loss(DPO, lp[rows, y_pos], lp[rows, y_neg], ref, ref)

    truth = velocity_channels(lambda m: m(X), loss_fn, model, unembedding="unembedding").total
    K = hidden_kernel(lambda m: m.hidden(X), model)
    lp = model(X)
    ell = losses.margin_derivative(DPO, lp[rows, y_pos], lp[rows, y_neg], ref, ref)
    closed = multi_sample_kernel_logprob_velocity(
        model.unembedding[...], model.hidden(X), K, y_pos, y_neg, ell
    )
    np.testing.assert_allclose(
        closed, truth, rtol=RTOL_AUTODIFF, atol=1e-12 * float(jnp.max(jnp.abs(truth)))
    )


# --- RMSprop: the first step of the project's flow ------------------------------------------------


def _flow_loss(model, prompt):
    return _pair_loss(model, prompt)


def _flow_observe(model, prompt):
    return _answer_logprobs(model, prompt)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_rmsprop_first_step_matches_preconditioned_form():
    """P of the first torch-RMSprop step, the preconditioned kernel form, and a forward difference
    of one actual ``rmsprop_torch`` step of sims.flows.core: the parameter step is exactly -dt P g,
    and
    the log-prob change over dt converges to the form at first order in dt."""
    model = _mlp(11)
    prompt = _Prompt(
        jnp.array([0.3, -1.2, 0.8, 0.1]), jnp.array(2), jnp.array(5), jnp.array([-2.0, -2.5])
    )
    P = rmsprop_preconditioner(lambda m: _pair_loss(m, prompt), model)
    channels, K, _, h, ell, truth = _measure(model, prompt, "unembedding", False, P)
    predicted = preconditioned_logprob_velocity(
        model.unembedding[...], h, K, prompt.y_pos, prompt.y_neg, ell,
        unembedding_gain=P["unembedding"][...],
    )  # fmt: skip
    _assert_close(predicted, truth, _scale(channels), "preconditioned form vs autodiff")

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.grad(lambda p: _pair_loss(nnx.merge(graphdef, p, rest), prompt))(params)
    errors = []
    dts = (1e-3, 1e-4, 1e-5)
    for dt in dts:
        res = integrate_model(
            model, _flow_loss, _flow_observe, prompt, dt=dt, num_steps=1, optimizer="rmsprop_torch"
        ).run()
        stepped = nnx.split(res.final, nnx.Param, ...)[1]
        expected = jax.tree_util.tree_map(lambda x, g, p, dt=dt: x - dt * p * g, params, grads, P)
        for a, b in zip(
            jax.tree_util.tree_leaves(stepped), jax.tree_util.tree_leaves(expected), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
        fd = (res.observables[1] - res.observables[0]) / dt
        errors.append(float(jnp.max(jnp.abs(fd - predicted)) / jnp.max(jnp.abs(predicted))))
    order = np.polyfit(np.log10(dts), np.log10(errors), 1)[0]
    assert ORDER_RANGE[0] <= order <= ORDER_RANGE[1], f"errors {errors}, order {order:.3f}"


# --- validation -----------------------------------------------------------------------------------


def test_sims_kernel_rejects_bad_input():
    model = _mlp(0)
    fn = lambda m: m.hidden(jnp.ones(4))  # noqa: E731
    with pytest.raises(ValueError, match=r"exclude must name parameters of the model"):
        hidden_kernel(fn, model, exclude=("W",))
    with pytest.raises(ValueError, match="hidden_fn must return h of shape"):
        hidden_kernel(lambda m: m.hidden(jnp.ones((2, 3, 4))), model)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        hidden_kernel(fn, model, chunk_size=0)
    gains = _random_gains(model, 0)
    with pytest.raises(ValueError, match="preconditioner must have the structure"):
        hidden_kernel(fn, model, preconditioner={"unembedding": 1.0})
    bad = jax.tree_util.tree_map(lambda a: -a, gains)
    with pytest.raises(ValueError, match=r"preconditioner\['fc1.bias'\] must be >= 0"):
        hidden_kernel(fn, model, preconditioner=bad)
    with pytest.raises(ValueError, match=r"unembedding must name parameters"):
        velocity_channels(fn, lambda m: jnp.sum(fn(m)), model, unembedding="W")
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        rmsprop_preconditioner(lambda m: jnp.sum(fn(m)), model, decay=1.0)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_first_step_velocity_matches_autodiff_on_decoder_lm(tied, seed):
    """The matrix-free kernel form (K_P u by one vjp and one jvp, the tied cross terms and the W
    channel) equals the jvp of every token's log-prob along -P grad L of the actual DPO loss, on a
    tied and an untied DecoderLM (stacked scanned layers), with RMSprop's first-step P; channels
    sum to the total."""
    from sims.analysis.kernel import first_step_velocity
    from sims.models.decoder import DecoderConfig, init_decoder

    V = 17
    config = DecoderConfig.llama(V, hidden_size=8, num_heads=2, num_layers=2, tied=tied)
    model = init_decoder(config, seed=seed, dtype=jnp.float64)
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, V, 6))
    y_pos, y_neg = (int(v) for v in rng.choice(V, 2, replace=False))
    ref_c, ref_r = -1.3, -2.1  # a reference margin away from the model's

    def hidden(m):
        return m.hidden_states(tokens)[-1]

    def logprobs(m):
        return jax.nn.log_softmax(m.logits(hidden(m)))

    def margin_loss(u):
        return losses.dpo_loss(u, 0.0, ref_c, ref_r, beta=0.7)

    def loss(m):
        lp = logprobs(m)
        return margin_loss(lp[y_pos] - lp[y_neg])

    P = rmsprop_preconditioner(loss, model)
    name = "embed_tokens.weight" if tied else "lm_head.weight"
    form = first_step_velocity(
        hidden, margin_loss, model, y_pos, y_neg, unembedding=name, tied=tied, preconditioner=P
    )
    truth = velocity_channels(logprobs, loss, model, unembedding=name, preconditioner=P).total
    scale = float(jnp.max(jnp.abs(truth)))
    np.testing.assert_allclose(form.total, truth, rtol=RTOL_AUTODIFF, atol=1e-12 * scale)
    np.testing.assert_allclose(
        form.hidden + form.tied + form.unembedding, form.total, rtol=1e-12, atol=1e-14 * scale
    )
    if not tied:
        assert float(jnp.max(jnp.abs(form.tied))) == 0.0
    assert float(jnp.max(jnp.abs(form.unembedding))) > 1e-6 * scale  # every channel is there
