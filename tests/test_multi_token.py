"""Theorems 6-7 and Propositions 1-2 (Razin et al. 2024) against autodiff, in float64.

The independent computation builds the unconstrained-features model over the prefix tree of
(y+, y-, z) as a function of its parameters (W, the hidden embeddings of y+'s prefixes, and the
own hidden embeddings of y-'s and z's other prefixes: a shared prefix is one parameter), takes
``-grad L`` of the actual loss with ``jax.grad`` and pushes it through ``ln pi(z|x)`` with
``jax.jvp``. Shared prefixes are found here with a triangular comparison, not the library's code.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from theory import losses
from theory.multi_token import (
    gradient_inner_product,
    multi_token_terms,
    other_response_terms,
    positive_alpha_fraction,
    response_logprob_velocity,
)
from theory.regularized import loss_logprob_velocity, preferred_logprob_velocity

# Closed form vs autodiff, both float64, same parameters: differences are pure round-off.
RTOL_AUTODIFF = 1e-9
# Absolute floor relative to S, a bound on the terms' sizes: (|a+| + |a-|) |grad lp(z)| *
# (|grad lp(y+)| + |grad lp(y-)|) (Cauchy-Schwarz bounds every inner product summed).
ATOL_PER_SCALE = 1e-12
# float32 closed form vs float64 closed form, relative to S.
RTOL_FLOAT32 = 1e-4
N_INSTANCES = 200  # per case / loss: 6 cases + 9 losses, 3 responses each, > 1000 per theorem

# (V, d, L+, L-, Lz, common y+/y- tokens, z parent, common z/parent tokens)
CASES = [
    (3, 2, 1, 1, 1, 0, "pos", 0),  # single tokens: Theorems 4-5
    (8, 4, 3, 2, 2, 0, "pos", 0),
    (8, 4, 4, 5, 3, 2, "pos", 1),  # y+ and y- share 2 tokens, z shares 1 with y+
    (16, 8, 5, 5, 4, 1, "neg", 2),  # z shares 2 tokens with y-
    (6, 3, 3, 6, 4, 3, "pos", 3),  # y+ is a prefix of y- (named Theorem 6 does not apply)
    (32, 6, 6, 3, 5, 0, "neg", 0),
]
# Each case compiles one vmapped check (~10 s on the shared 2-core machine): the default run
# keeps the shared-prefix and prefix-of cases; the rest run with -m slow.
FAST_CASES = (2, 4)
FAST_LOSSES = ("dpop", "sft_term")  # Propositions 2 and 1 (their base is DPO, a class loss)


def _mark(values, fast):
    return [
        v if f else pytest.param(v, marks=pytest.mark.slow)
        for v, f in zip(values, fast, strict=True)
    ]


def _loss_cases(L_pos, L_neg):
    return {
        "dpo": losses.make_loss("dpo", beta=0.7),
        "ipo": losses.make_loss("ipo", tau=0.3),
        "slic": losses.make_loss("slic", delta=500.0),  # margin < delta: hinge active
        "rebel": losses.make_loss("rebel", eta=2.0, reward_margin=1.5),
        "gpo": losses.make_loss("gpo", beta=0.5),
        "sft_term": losses.make_loss("sft_term", base_loss="dpo", sft_coef=0.8),
        "weighted": losses.make_loss("weighted", weight_chosen=1.7, weight_rejected=0.6),
        "simpo": losses.make_loss(
            "simpo", beta=2.0, gamma=0.5, length_chosen=float(L_pos), length_rejected=float(L_neg)
        ),
        "dpop": losses.make_loss("dpop", beta=0.3, lam=5.0),
    }


def _shared(u, v):
    """[min] bool: row k shared iff u[:k] == v[:k] (triangular all-compare)."""
    m = min(u.shape[0], v.shape[0])
    earlier = jnp.arange(m)[None, :] < jnp.arange(m)[:, None]  # [k, i]: i < k
    return jnp.all(jnp.where(earlier, (u[:m] == v[:m])[None, :], True), axis=1)


def _tied(h_src, src, own, dst):
    m = min(src.shape[0], dst.shape[0])
    return own.at[:m].set(jnp.where(_shared(src, dst)[:, None], h_src[:m], own[:m]))


def _instance(key, case, *, exclude_z_first=False):
    V, d, Lp, Ln, Lz, common, parent, zc = case
    ks = jax.random.split(key, 9)
    scale = jnp.exp(jax.random.uniform(ks[0], (), minval=jnp.log(0.3), maxval=jnp.log(3.0)))
    W = scale * jax.random.normal(ks[1], (V, d)) / jnp.sqrt(d)
    mean = jax.random.normal(ks[2], (d,))  # a shared direction: positive inner products
    h_pos, h_neg, h_z = (
        mean[None, :] + scale * jax.random.normal(k, (L, d))
        for k, L in zip(ks[3:6], (Lp, Ln, Lz), strict=True)
    )
    y_pos = jax.random.randint(ks[6], (Lp,), 0, V)
    y_neg = jax.random.randint(ks[7], (Ln,), 0, V)
    y_neg = jnp.where(jnp.arange(Ln) < common, jnp.resize(y_pos, (Ln,)), y_neg)
    if common < min(Lp, Ln):  # the first differing token really differs
        y_neg = y_neg.at[common].set((y_pos[common] + 1 + y_neg[common] % (V - 1)) % V)
    z = jax.random.randint(ks[8], (Lz,), 0, V)
    par = y_pos if parent == "pos" else y_neg
    z = jnp.where(jnp.arange(Lz) < zc, jnp.resize(par, (Lz,)), z)
    if zc < min(Lz, par.shape[0]):
        z = z.at[zc].set((par[zc] + 1 + z[zc] % (V - 1)) % V)
    if exclude_z_first:  # z_1 not in {y+_1, y-_1} (Theorem 7); y+_1 != y-_1 here
        lo, hi = jnp.minimum(y_pos[0], y_neg[0]), jnp.maximum(y_pos[0], y_neg[0])
        r = z[0] % (V - 2)
        r = r + (r >= lo)
        z = z.at[0].set(r + (r >= hi))
    ref = jax.random.normal(ks[0], (2,)) - 2.0 * jnp.array([Lp, Ln])
    return W, h_pos, h_neg, h_z, y_pos, y_neg, z, ref


def _effective(params, y_pos, y_neg, z):
    W, h_pos, own_neg, own_z = params
    h_neg = _tied(h_pos, y_pos, own_neg, y_neg)
    h_z = _tied(h_pos, y_pos, _tied(h_neg, y_neg, own_z, z), z)
    return W, h_pos, h_neg, h_z


def _lp(W, h, y):
    return jnp.sum(jax.nn.log_softmax(h @ W.T, axis=-1)[jnp.arange(y.shape[0]), y])


def _autodiff(loss, inst):
    """d/dt ln pi(r|x) = <grad ln pi(r), -grad L> for r = y+, y-, z; a+-; the scale S."""
    W, h_pos, h_neg, h_z, y_pos, y_neg, z, ref = inst
    params = (W, h_pos, h_neg, h_z)

    def lps(p):
        W, hp, hn, hz = _effective(p, y_pos, y_neg, z)
        return _lp(W, hp, y_pos), _lp(W, hn, y_neg), _lp(W, hz, z)

    grad = jax.grad(lambda p: loss(*lps(p)[:2], ref[0], ref[1]))(params)
    jac = jax.jacrev(lambda p: jnp.stack(lps(p)))(params)  # leaves [3, ...]: grad ln pi(r)

    def dot(u, v):
        return sum(jnp.sum(x * y) for x, y in zip(u, v, strict=True))

    rows = [[g[i] for g in jac] for i in range(3)]
    velocities = [-dot(r, grad) for r in rows]
    lp_pos, lp_neg, _ = lps(params)
    a = losses.loss_coefficients(loss, lp_pos, lp_neg, ref[0], ref[1])
    norms = [jnp.sqrt(dot(r, r)) for r in rows]
    scale = (
        (jnp.abs(a[0]) + jnp.abs(a[1])) * jnp.maximum(norms[2], norms[0]) * (norms[0] + norms[1])
    )
    return velocities, a, scale, _effective(params, y_pos, y_neg, z)


def _assert_close(got, want, scale, what):
    got, want, scale = (np.asarray(x) for x in (got, want, scale))
    err = np.abs(got - want) - RTOL_AUTODIFF * np.abs(want) - ATOL_PER_SCALE * scale
    i = int(np.argmax(err))
    np.testing.assert_allclose(
        got,
        want,
        rtol=RTOL_AUTODIFF,
        atol=ATOL_PER_SCALE * float(np.max(scale)),
        err_msg=f"{what}: worst instance {i}: closed form {got[i]}, autodiff {want[i]}",
    )


def _linear_loss(a_pos, a_neg):
    """L = -a+ lp+ + a- lp-: its flow has exactly the coefficients (a+, a-) of any loss."""
    return lambda lp_c, lp_r, ref_c=0.0, ref_r=0.0: -a_pos * lp_c + a_neg * lp_r


def _velocity_checks(inst, loss, *, named_applies, via_loss):
    (v_pos, v_neg, v_z), a, scale, (W, h_pos, h_neg, h_z) = _autodiff(loss, inst)
    y_pos, y_neg, z, ref = inst[4], inst[5], inst[6], inst[7]
    general = partial(response_logprob_velocity, W, h_pos, h_neg, y_pos, y_neg)
    out = {
        "want": jnp.stack([v_pos, v_neg, v_z]),
        "general": jnp.stack(
            [general(h_pos, y_pos, *a), general(h_neg, y_neg, *a), general(h_z, z, *a)]
        ),
        "scale": scale,
    }
    if named_applies:
        out["named"] = preferred_logprob_velocity(W, h_pos, h_neg, y_pos, y_neg, *a).velocity
    if via_loss:
        out["via_loss"] = loss_logprob_velocity(
            loss, W, h_pos, h_neg, y_pos, y_neg, ref[0], ref[1]
        ).velocity
    return out


def _assert_velocity_checks(r, what):
    for i, resp in enumerate(("y+", "y-", "z")):
        _assert_close(
            r["general"][:, i],
            r["want"][:, i],
            r["scale"],
            f"{what}, general form, d/dt ln pi({resp})",
        )
    if "named" in r:
        _assert_close(r["named"], r["want"][:, 0], r["scale"], f"{what}, Thm 6 / Props 1-2")
    if "via_loss" in r:
        _assert_close(r["via_loss"], r["want"][:, 0], r["scale"], f"{what}, loss_logprob_velocity")


@pytest.mark.parametrize(
    "case",
    _mark(CASES, [i in FAST_CASES for i in range(len(CASES))]),
    ids=[f"V{c[0]}-L{c[2]}{c[3]}{c[4]}-c{c[5]}" for c in CASES],
)
def test_logprob_velocities_match_autodiff(case):
    # Random coefficients of both signs, a+ != a- in general (Propositions 1-2's setting).
    named_applies = case[5] < min(case[2], case[3])

    @jax.jit
    @jax.vmap
    def check(key):
        k_inst, k_coef = jax.random.split(key)
        a_pos, a_neg = jax.random.normal(k_coef, (2,))
        return _velocity_checks(
            _instance(k_inst, case),
            _linear_loss(a_pos, a_neg),
            named_applies=named_applies,
            via_loss=False,
        )

    results = check(jax.random.split(jax.random.key(sum(case[:6])), N_INSTANCES))
    _assert_velocity_checks(results, f"case {case}")


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
@pytest.mark.parametrize(
    "loss_name", _mark(sorted(losses.LOSSES), [n in FAST_LOSSES for n in sorted(losses.LOSSES)])
)
def test_logprob_velocities_match_autodiff_for_every_loss(loss_name):
    case = CASES[2]  # shared prefix of two tokens
    loss = _loss_cases(case[2], case[3])[loss_name]

    @jax.jit
    @jax.vmap
    def check(key):
        return _velocity_checks(_instance(key, case), loss, named_applies=True, via_loss=True)

    results = check(jax.random.split(jax.random.key(99), N_INSTANCES))
    _assert_velocity_checks(results, loss_name)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
@pytest.mark.parametrize("case", _mark([c for c in CASES if c[5] == 0], [False, True, False]))
def test_other_response_terms_match_autodiff(case):
    loss_cases = {
        k: v for k, v in _loss_cases(case[2], case[3]).items() if k in losses.MARGIN_CLASS
    }

    @jax.jit
    @jax.vmap
    def check(key):
        inst = _instance(key, case, exclude_z_first=True)
        out = {}
        for name, loss in loss_cases.items():
            (_, _, v_z), a, scale, (W, h_pos, h_neg, h_z) = _autodiff(loss, inst)
            t = other_response_terms(W, h_pos, h_neg, inst[4], inst[5], h_z, inst[6])
            out[name] = (a[0] * t.bracket, v_z, scale)  # a+ = a- = -l' for the class
        return out

    results = check(jax.random.split(jax.random.key(7 + case[0]), N_INSTANCES))
    for name, (got, want, scale) in results.items():
        _assert_close(got, want, scale, f"{name}, Theorem 7")


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_gradient_inner_product_matches_autodiff():
    case = CASES[3]

    @jax.jit
    @jax.vmap
    def check(key):
        inst = _instance(key, case)
        params = inst[:4]
        y_pos, y_neg, z = inst[4], inst[5], inst[6]

        def grad_of(i):
            def lp(p):
                W, hp, hn, hz = _effective(p, y_pos, y_neg, z)
                return (_lp(W, hp, y_pos), _lp(W, hn, y_neg), _lp(W, hz, z))[i]

            return jax.grad(lp)(params)

        gz, gn = grad_of(2), grad_of(1)
        want = sum(jnp.sum(a * b) for a, b in zip(gz, gn, strict=True))
        W, _, h_neg, h_z = _effective(params, y_pos, y_neg, z)
        got = gradient_inner_product(W, h_z, z, h_neg, y_neg).total
        scale = jnp.sqrt(sum(jnp.sum(a**2) for a in gz) * sum(jnp.sum(b**2) for b in gn))
        return got, want, scale

    got, want, scale = check(jax.random.split(jax.random.key(11), 512))
    _assert_close(got, want, scale, "<grad lp(z), grad lp(y-)>")


def test_positive_alpha_fraction_matches_brute_force():
    rng = np.random.default_rng(5)
    V, d, Lp, Ln, trials = 6, 3, 3, 4, 64
    W = rng.normal(size=(trials, V, d))
    h_pos, h_neg = rng.normal(size=(trials, Lp, d)), rng.normal(size=(trials, Ln, d))
    y_pos, y_neg = rng.integers(0, V, (trials, Lp)), rng.integers(0, V, (trials, Ln))
    y_neg[:, 0] = (y_pos[:, 0] + 1) % V  # no shared prefix beyond the prompt
    h_neg[:, 0] = h_pos[:, 0]
    mask_neg = np.arange(Ln)[None, :] < rng.integers(1, Ln + 1, (trials, 1))
    got = jax.jit(jax.vmap(positive_alpha_fraction))(
        W, h_pos, h_neg, y_pos, y_neg, np.ones((trials, Lp), bool), mask_neg
    )
    for t in range(trials):

        def resid(h, y, t=t):
            logits = h @ W[t].T
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            return np.eye(V)[y] - p / p.sum(axis=1, keepdims=True)

        rp, rn = resid(h_pos[t], y_pos[t]), resid(h_neg[t], y_neg[t])
        alphas = [rp[k] @ rp[j] for k in range(Lp) for j in range(Lp)]
        alphas += [rp[k] @ rn[j] for k in range(Lp) for j in range(Ln) if mask_neg[t, j]]
        want = np.mean(np.array(alphas) > 0)
        assert float(got[t]) == pytest.approx(want, abs=1e-15), f"trial {t}"


def test_multi_token_terms_float32_matches_float64():
    rng = np.random.default_rng(3)
    W, h_pos, h_neg = rng.normal(size=(8, 4)), rng.normal(size=(4, 4)), rng.normal(size=(5, 4))
    y_pos, y_neg = np.array([1, 2, 3, 4]), np.array([1, 2, 5, 6, 7])  # two shared tokens
    h_neg[:3] = h_pos[:3]
    terms = jax.jit(multi_token_terms)  # one compilation instead of eager per-op dispatch
    t64 = terms(W, h_pos, h_neg, y_pos, y_neg)
    t32 = terms(*(x.astype(np.float32) for x in (W, h_pos, h_neg)), y_pos, y_neg)
    size = float(
        jnp.abs(t64.m) + jnp.abs(t64.S) + jnp.abs(t64.self_alignment) + jnp.abs(t64.cross_alignment)
    )
    assert t32.bracket.dtype == jnp.float32
    np.testing.assert_allclose(float(t32.bracket), float(t64.bracket), atol=RTOL_FLOAT32 * size)


def _simple():
    W = jnp.eye(3)
    h = jnp.zeros((2, 3))
    return W, h, jnp.array([0, 1]), jnp.array([1, 2])


def test_multi_token_functions_reject_bad_input():
    W, h, y_pos, y_neg = _simple()
    with pytest.raises(ValueError, match=r"h_pos must hold at least one prefix"):
        multi_token_terms(W, jnp.zeros((0, 3)), h, jnp.zeros(0, int), y_neg)
    with pytest.raises(ValueError, match=r"h_neg must have the hidden size d=3 of W"):
        multi_token_terms(W, h, jnp.zeros((2, 4)), y_pos, y_neg)
    with pytest.raises(ValueError, match=r"y_neg must have one token per row of h_neg"):
        multi_token_terms(W, h, h, y_pos, jnp.array([1]))
    with pytest.raises(ValueError, match=r"y_pos must be token ids in \[0, V\)"):
        multi_token_terms(W, h, h, jnp.array([0, 3]), y_neg)
    with pytest.raises(ValueError, match=r"must differ at some position k <= min\(L\+, L-\)"):
        multi_token_terms(W, h, h, y_pos, y_pos)  # identical responses
    with pytest.raises(ValueError, match=r"neither a prefix of the other"):
        preferred_logprob_velocity(W, h[:1], h, y_pos[:1], y_pos, 1.0, 1.0)  # y+ prefix of y-
    with pytest.raises(ValueError, match=r"must agree on the rows of shared prefixes"):
        multi_token_terms(W, h, jnp.ones((2, 3)), y_pos, y_neg)  # prompt rows differ
    with pytest.raises(ValueError, match=r"coef_chosen must have shape \[\]"):
        preferred_logprob_velocity(W, h, h, y_pos, y_neg, jnp.ones(2), 1.0)
    with pytest.raises(ValueError, match=r"h_z must hold at least one prefix"):
        response_logprob_velocity(
            W, h, h, y_pos, y_neg, jnp.zeros((0, 3)), jnp.zeros(0, int), 1.0, 1.0
        )
    with pytest.raises(ValueError, match=r"must differ in their first token"):
        other_response_terms(W, h, h, y_pos, jnp.array([0, 2]), h[:1], jnp.array([2]))
    with pytest.raises(ValueError, match=r"z\[0\] must differ from y_pos\[0\] and y_neg\[0\]"):
        other_response_terms(W, h, h, y_pos, y_neg, h[:1], jnp.array([1]))
    with pytest.raises(ValueError, match=r"mask_neg must select at least one position"):
        positive_alpha_fraction(W, h, h, y_pos, y_neg, mask_neg=jnp.zeros(2, bool))
    with pytest.raises(ValueError, match=r"W must be finite"):
        multi_token_terms(W.at[0, 0].set(jnp.nan), h, h, y_pos, y_neg)


def test_multi_token_terms_single_token_matches_theorem_4():
    # With L+ = L- = 1 Theorem 6 is Theorem 4 (App. D.1): compare with single_token's terms.
    from theory.single_token import displacement_terms

    @jax.jit
    @jax.vmap
    def both(key):
        W, h_pos, _, _, y_pos, y_neg, _, _ = _instance(key, CASES[0])
        ref = displacement_terms(W, h_pos[0], y_pos[0], y_neg[0])
        return multi_token_terms(W, h_pos, h_pos, y_pos, y_neg).bracket, ref.m + ref.S

    got, want = both(jax.random.split(jax.random.key(4), 200))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-12)


# Traced invalid values (the rule of theory): every floating field NaN; valid traced = eager.
RTOL_JIT_VS_EAGER = 1e-12  # float64 eager vs jit of the same closed form: rounding only


def _traced_case():
    W = jax.random.normal(jax.random.key(40), (5, 3))
    h_pos = jax.random.normal(jax.random.key(41), (2, 3))
    h_neg = jax.random.normal(jax.random.key(42), (2, 3)).at[0].set(h_pos[0])
    h_z = jax.random.normal(jax.random.key(43), (2, 3)).at[0].set(h_pos[0])
    return W, h_pos, h_neg, jnp.array([0, 1]), jnp.array([1, 2]), h_z, jnp.array([3, 4])


def _all_float_nan(tree):
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return all(np.all(np.isnan(np.asarray(x))) for x in leaves)


@pytest.mark.parametrize(
    "override",
    [
        dict(y_pos=jnp.array([0, 7])),  # id out of range
        dict(y_neg=jnp.array([-1, 2])),  # negative id
        dict(y_neg=jnp.array([0, 1]), h_neg="h_pos"),  # identical responses
    ],
    ids=["range", "negative", "identical"],
)
def test_multi_token_functions_traced_invalid_give_nan(override):
    W, h_pos, h_neg, y_pos, y_neg, h_z, z = _traced_case()
    args = dict(W=W, h_pos=h_pos, h_neg=h_neg, y_pos=y_pos, y_neg=y_neg)
    args |= {k: v for k, v in override.items() if not isinstance(v, str)}
    if override.get("h_neg") == "h_pos":
        args["h_neg"] = h_pos
    p = (args["W"], args["h_pos"], args["h_neg"], args["y_pos"], args["y_neg"])
    assert _all_float_nan(jax.jit(multi_token_terms)(*p))
    assert _all_float_nan(jax.jit(preferred_logprob_velocity)(*p, 0.7, 0.4))
    if override.get("h_neg") != "h_pos":  # these need no distinct responses
        assert _all_float_nan(jax.jit(positive_alpha_fraction)(*p))
        h_z_tied = h_z.at[0].set(args["h_pos"][0])
        assert _all_float_nan(jax.jit(response_logprob_velocity)(*p, h_z_tied, z, 0.7, 0.4))
        assert _all_float_nan(jax.jit(gradient_inner_product)(W, p[1], p[3], p[2], p[4]))
    dpop = losses.make_loss("dpop", beta=0.3, lam=5.0)
    assert _all_float_nan(jax.jit(partial(loss_logprob_velocity, dpop))(*p))


def test_other_response_terms_traced_invalid_first_tokens_give_nan():
    W, h_pos, h_neg, y_pos, y_neg, h_z, z = _traced_case()
    run = jax.jit(other_response_terms)
    assert not _all_float_nan(run(W, h_pos, h_neg, y_pos, y_neg, h_z, z))
    assert _all_float_nan(run(W, h_pos, h_neg, y_pos, y_neg, h_z, jnp.array([1, 4])))  # z1 = y-1
    assert _all_float_nan(run(W, h_pos, h_neg, y_pos, jnp.array([0, 2]), h_z, z))  # y+1 = y-1


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_multi_token_functions_valid_traced_equal_eager_with_finite_gradients():
    W, h_pos, h_neg, y_pos, y_neg, h_z, z = _traced_case()
    p = (W, h_pos, h_neg, y_pos, y_neg)
    for fn, extra in (
        (multi_token_terms, ()),
        (preferred_logprob_velocity, (0.7, 0.4)),
        (response_logprob_velocity, (h_z, z, 0.7, 0.4)),
        (other_response_terms, (h_z, z)),
    ):
        for a, b in zip(
            jax.tree.leaves(jax.jit(fn)(*p, *extra)), jax.tree.leaves(fn(*p, *extra)), strict=True
        ):
            np.testing.assert_allclose(
                a, b, rtol=RTOL_JIT_VS_EAGER, atol=1e-14, err_msg=fn.__name__
            )
    grad = jax.jit(
        jax.grad(
            lambda W, h: preferred_logprob_velocity(W, h, h_neg, y_pos, y_neg, 0.7, 0.4).velocity,
            (0, 1),
        )
    )(W, h_pos)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grad)
