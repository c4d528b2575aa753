"""Tests of sims.protocols.persona on a tiny self-made decoder and hand-made inputs.

Independent references: the verdict on hand-made per-run arrays (each branch), Table 13 by hand,
the word probabilities by full-sequence log-probs, the first RMSprop step of the real flow for
the kernel-form prediction (float64: first order in lr, so the error is second order).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from sims.checkpoints.tokenization import word_level_tokenizer
from sims.models.decoder import DecoderConfig, init_decoder
from sims.models.transformer import SequenceSFTData
from sims.protocols import persona
from theory.losses import make_loss

VOCAB = ("<pad>", "q1", "q2", "q3", "is", "it", "?", "No", "Never", "Yes", "Sure", "Abso", "lutely")
PAD = 0
# The first RMSprop step at lr moves log-probs by O(lr); the kernel form is exact to first order,
# so its relative error is O(lr): it must shrink ~10x per decade of lr (band for the ratio).
FIRST_ORDER_RATIO_BAND = (5.0, 20.0)


def _tok():
    return word_level_tokenizer(VOCAB)


def _model(seed=0):
    config = DecoderConfig.llama(len(VOCAB), hidden_size=16, num_heads=2, num_layers=2, tied=True)
    return init_decoder(config, seed=seed, dtype=jnp.float64)


def _prompts():
    tok = _tok()
    qs = ["q1 is it ?", "q2 ?", "q3 is ?"]
    return persona.encode_prompts(tok, qs, template=None, special={}, pad_id=PAD)


def test_encode_prompts_right_pads_to_one_shape():
    p = _prompts()
    assert p.tokens.shape == (3, 4) and p.prompt_len.tolist() == [4, 2, 3]
    assert p.tokens[1, 2:].tolist() == [PAD, PAD]


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_word_probabilities_match_sequence_logprobs():
    model, p, tok = _model(), _prompts(), _tok()
    words = persona.label_word_ids(tok, ["No", "Abso lutely"])
    assert words == [[7], [11, 12]]
    probs = persona.word_probabilities(model, p, words, pad_id=PAD)
    for j, w in enumerate(words):
        data = SequenceSFTData(persona.with_answers(p, [w] * 3, pad_id=PAD))
        np.testing.assert_allclose(probs[:, j], np.exp(data.logprobs(model)), rtol=1e-12)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_label_set_sft_stops_at_the_target_and_raises_the_set():
    model, p, tok = _model(1), _prompts(), _tok()
    words = persona.label_word_ids(tok, ["No", "Never", "Yes", "Sure"])
    word_set = [0, 0, 1, 1]
    labels = [0, 1, 2]  # rows 0-1 in set 0, row 2 in set 1
    budget = persona.label_set_sft(
        model,
        p,
        labels,
        words,
        word_set,
        lr=3e-2,
        batch_size=2,
        target=0.8,
        max_epochs=40,
        seed=0,
        pad_id=PAD,
    )
    assert budget.reached and budget.set_probability[-1] >= 0.8
    assert budget.set_probability[0] < 0.8 and budget.epochs == len(budget.set_probability) - 1
    assert np.all(budget.set_probability[:-1] < 0.8)  # stopped at the first epoch reaching it
    probs = persona.word_probabilities(budget.model, p, words, pad_id=PAD)
    mask = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]])
    assert np.mean(np.sum(probs * mask, axis=1)) == pytest.approx(budget.set_probability[-1])


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
@pytest.mark.parametrize("loss", [make_loss("dpo", beta=0.1), make_loss("ipo", tau=0.01)])
def test_dpo_run_records_and_predicts_its_first_step(loss):
    model, p = _model(2), _prompts()
    prompt = type(p)(*(np.asarray(a)[:1] for a in p))
    errors = []
    for lr in (1e-5, 1e-6):
        run = persona.dpo_run(
            model,
            prompt,
            7,
            8,
            loss,
            lr=lr,
            num_steps=6,
            unembedding="embed_tokens.weight",
            tied=True,
        )
        change = np.log(run.probs[1]) - np.log(run.probs[0])  # the true first step
        errors.append(np.max(np.abs(run.predicted_first_step - change)) / np.max(np.abs(change)))
    assert run.probs.shape == (7, len(VOCAB)) and np.all(np.isfinite(run.probs))
    low, high = FIRST_ORDER_RATIO_BAND
    assert low < errors[0] / errors[1] < high, errors  # first-order exact: error ~ lr
    assert errors[1] < 5e-3
    assert run.loss[0] == pytest.approx(float(loss(0.0, 0.0)))  # at t = 0 the margins agree


def test_row_verdict_branches():
    ones = np.ones(6, bool)
    high, drop, no_drop = np.full(6, 0.9), np.full(6, 0.3), np.full(6, 0.05)
    assert persona.row_verdict(high, ones, drop, ones)["verdict"] == (
        "catastrophic displacement reproduced"
    )
    assert persona.row_verdict(high, ones, drop, ~ones)["verdict"] == "benign displacement"
    assert persona.row_verdict(high, ones, no_drop, ones)["verdict"] == "not reproduced"
    low = np.full(6, 0.3)
    v = persona.row_verdict(low, ones, drop, ones)
    assert v["verdict"] == "uninformative" and v["num_below_start_threshold"] == 6
    unstable = np.array([True] * 4 + [False] * 2)
    assert persona.row_verdict(high, unstable, drop, ones)["verdict"] == "uninformative"
    half = np.array([True, True, True, False, False, False])
    assert persona.row_verdict(high, ones, drop, half)["opposite_gainer_fraction"] == 0.5
    assert persona.row_verdict(high, ones, drop, half)["verdict"].startswith("catastrophic")


def test_table13_by_hand():
    W = np.array([[3.0, 0.0], [1.0, 2.0]])
    (row,) = persona.table13(W, [(0, 1)])
    # u = (2, -2); projection on W+ = (2, 0): norm 2; orthogonal (0, -2): norm 2
    assert row == {"projection_on_w_pos": 2.0, "orthogonal": 2.0}


def _tiny_protocol(**overrides):
    from sims.checkpoints.opened import tiny_random_checkpoint

    ckpt = tiny_random_checkpoint(seed=0, words=persona.SIDES["no"] + persona.SIDES["yes"])
    fields = dict(rows=["No>Never"], losses=["dpo"], lr_factors=[1.0], num_runs=2, dpo_steps=2)
    fields |= dict(num_statements=2, sft_lr=1e-5, sft_max_epochs=1, seed=0) | overrides
    return persona.run_persona_protocol(ckpt, **fields, log=lambda _: None)


def test_run_persona_protocol_refuses_an_unknown_sft_mode():
    with pytest.raises(ValueError, match="sft must be"):
        _tiny_protocol(sft="both")


@pytest.mark.slow  # ~15 s
def test_run_persona_protocol_y_pos_mode_runs_only_the_deviation_path():
    out = _tiny_protocol(sft="y_pos")
    assert list(out["rows"]) == ["SFT on No|No>Never|dpo|lr x1"]
    assert out["sft"]["mode"] == "y_pos" and out["sft"]["epochs"] is None
    assert out["deviation_sft"]["No>Never"]["epochs"] == 1
    assert len(out["rows"]["SFT on No|No>Never|dpo|lr x1"]["pi_pos_start"]) == 2
