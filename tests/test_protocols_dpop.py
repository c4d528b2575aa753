"""sims.protocols.dpop against independent computations, in float64.

References: hand-derived values (token ids, flow summaries), the well-optimised assumption and the
lambda thresholds of :mod:`theory.dpop_signs` (tested against autodiff in tests/test_dpop.py), the
reference logits themselves (models at t = 0), and Pal et al.'s prediction where the assumption
holds.
"""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sims.flows.core import FlowResult
from sims.models.logit_model import edit_pair_prefixes
from sims.protocols.dpop import (
    ARITHMETIC_TOKENS,
    arithmetic_ids,
    edit_distance_protocol,
    edit_flow_summary,
    edit_pair_models,
    reference_context_logits,
    sign_checks,
)
from theory.dpop_signs import lambda_thresholds, well_optimised

#: Least-squares fit of d >= V hidden rows reproduces the logits up to float64 round-off.
ATOL_LSTSQ = 1e-10
PAIR = ("2+2=4;4", "2+2=5;4")
REFERENCE = dict(confidence_chosen=3.0, confidence_rejected=1.0, edit_logits=(2.0, 1.0), noise=0.5)


def _pair():
    chosen, rejected = (arithmetic_ids(t) for t in PAIR)
    return chosen, rejected, edit_pair_prefixes(chosen, rejected)


def test_arithmetic_ids_hand_values_and_bad_characters():
    assert arithmetic_ids("9=;").tolist() == [9, 11, 12, 13]  # <eos> = 13 appended
    assert ARITHMETIC_TOKENS[arithmetic_ids("+")[0]] == "+"
    with pytest.raises(ValueError, match="text must use only"):
        arithmetic_ids("2*2")


@pytest.mark.parametrize("seed", range(5))
def test_reference_context_logits_meet_the_well_optimised_assumption_after_the_edit(seed):
    chosen, rejected, pre = _pair()
    ctx = reference_context_logits(
        jax.random.key(seed), chosen, rejected, pre, vocab_size=14, **REFERENCE
    )
    assert ctx.shape == (len(pre.position), 14)
    held = well_optimised(ctx[pre.chosen], ctx[pre.rejected], chosen, rejected)
    assert bool(jnp.all(held))
    # the reverse confidences (less sure after the correct token) break it after the edit
    swapped = REFERENCE | dict(confidence_chosen=1.0, confidence_rejected=3.0)
    bad = reference_context_logits(
        jax.random.key(seed), chosen, rejected, pre, vocab_size=14, **swapped
    )
    held = np.asarray(well_optimised(bad[pre.chosen], bad[pre.rejected], chosen, rejected))
    assert not held[pre.edit + 1 :].any() and held[: pre.edit + 1].all()


def test_reference_context_logits_rejects_bad_input():
    chosen, rejected, pre = _pair()
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="noise must be >= 0"):
        reference_context_logits(
            key, chosen, rejected, pre, vocab_size=14, **(REFERENCE | {"noise": -1.0})
        )
    with pytest.raises(ValueError, match="edit_logits must be"):
        reference_context_logits(
            key, chosen, rejected, pre, vocab_size=14, **(REFERENCE | {"edit_logits": (1.0,)})
        )


def test_edit_pair_models_start_at_the_reference_logits():
    chosen, rejected, pre = _pair()
    ctx = reference_context_logits(
        jax.random.key(0), chosen, rejected, pre, vocab_size=14, **REFERENCE
    )
    models = edit_pair_models(jax.random.key(1), ctx, pre, length=len(chosen), hidden_size=16)
    rows = jnp.arange(len(pre.position))
    for name in ("logit", "free_logit"):
        np.testing.assert_allclose(models[name].logits(rows), ctx, rtol=1e-12, err_msg=name)
    np.testing.assert_allclose(models["features"].logits(rows), ctx, atol=ATOL_LSTSQ)


def test_edit_flow_summary_hand_values():
    # two runs (lambda 0 and 1), three checkpoints, two positions
    lp = np.array(
        [[[-1.0, -2.0], [-1.5, -2.0], [-2.0, -1.0]], [[-1.0, -2.0], [-0.5, -2.5], [0.0, -3.0]]]
    )
    velocity = np.array([[0.0, 1.0, 2.0], [0.0, -1.0, 4.0]])
    split = SimpleNamespace(
        velocity=np.array([[9.0, 1.5, 2.0], [9.0, -1.0, 3.0]]),  # t = 0 (kink) is excluded
        dpo_part=np.array([[0.0, 1.0, 1.0], [0.0, 2.0, 1.0]]),
    )
    obs = SimpleNamespace(
        logprob_chosen=lp,
        velocity=velocity,
        split=split,
        hinge_active=np.array([[True, False, False], [False, True, True]]),
    )
    result = FlowResult(None, np.array([0.0, 1.0, 2.0]), None, obs, None)
    s = edit_flow_summary(result, np.array([0.0, 1.0]))
    np.testing.assert_allclose(s.delta_final, [[-1.0, 1.0], [1.0, -1.0]])
    np.testing.assert_allclose(s.delta_sequence, [[0.0, -0.5, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(s.hinge_active_fraction, [0.0, 1.0])  # checkpoints t > 0 only
    assert s.prop2_max_abs_error == pytest.approx(1.0)  # |4 - 3|; the t = 0 entries excluded
    assert s.prop2_scale == pytest.approx(5.0)  # |2| + |-1 - 2| vs |1| + |3 - 1|: max 5


def test_sign_checks_without_noise_follow_the_thresholds():
    chosen, rejected, pre = _pair()
    ctx = reference_context_logits(
        jax.random.key(2), chosen, rejected, pre, vocab_size=14, **REFERENCE
    )
    lw, lr = ctx[pre.chosen], ctx[pre.rejected]
    th = np.asarray(lambda_thresholds(lw, lr, chosen, rejected, beta=0.1).threshold)
    post = th[pre.edit + 1 :]
    grid = np.concatenate([post * 1.01 + 1e-9, post[post > 0] * 0.99])
    s = sign_checks(
        jax.random.key(0),
        lw,
        lr,
        chosen,
        rejected,
        beta=0.1,
        penalty_inside_beta=True,
        lam_grid=grid,
        num_states=3,
        state_noise=0.0,
    )
    K = len(post)
    assert s.grid_signs_right.shape == (len(grid), K) and s.num_position_checks == 3 * K
    # above lambda*_k every sign at k is right; just below a positive lambda*_k one is wrong
    above = s.grid_signs_right[:K]
    assert np.all(above[np.arange(K), np.arange(K)])
    below = s.grid_signs_right[K:]
    assert not np.any(below[np.arange(below.shape[0]), np.flatnonzero(post > 0)])
    # the unperturbed reference meets the assumption, where DPO's predicted signs are all right
    assert s.assumption_rate == 1.0 and s.dpo_all_signs_assumption_holds == 1.0
    assert s.dpo_all_signs_assumption_fails is None and s.dpop_right_above_threshold == 1.0


@pytest.mark.slow  # three flows and the sign checks compile (~40 s on the 2-core machine)
def test_edit_distance_protocol_small_run():
    chosen, rejected = (arithmetic_ids(t) for t in PAIR)
    r = edit_distance_protocol(
        jax.random.key(0),
        chosen,
        rejected,
        vocab_size=14,
        beta=0.1,
        penalty_inside_beta=True,
        lam_factors=(0.0, 2.0),
        dt=0.5,
        num_steps=4,
        record_every=2,
        hidden_size=4,
        num_lam_grid=4,
        num_random_states=4,
        state_noise=0.3,
        **REFERENCE,
    )
    assert r.edit == 4 and bool(jnp.all(r.well_optimised))
    assert r.lambda_star == pytest.approx(float(np.max(r.thresholds.threshold)))
    assert set(r.flows) == {"logit", "free_logit", "features"}
    for flow in r.flows.values():
        np.testing.assert_allclose(flow.lams, [0.0, 2.0 * r.lambda_star])
        assert flow.delta_sequence.shape == (2, 3) and np.all(flow.delta_sequence[:, 0] == 0)
