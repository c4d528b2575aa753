"""Tests of sims.checkpoints.selfmade: the spec's checks, the corpus request pairs (grammar counts,
uniform template draw), reading pairs before any work, and the save / load round trip of the
self-made checkpoint (weights, tokenizer ids from the corpus, no folder left behind)."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from sims.checkpoints.opened import open_checkpoint
from sims.checkpoints.selfmade import (
    SELF_MADE_SOURCE,
    SelfMadeSpec,
    open_or_make,
    open_self_made,
    read_pairs,
    request_preference_rows,
    save_self_made,
    self_made_config,
    train_self_made,
)
from sims.data import corpus
from sims.errors import InputError
from sims.models.decoder import init_decoder

#: Request prompts of the grammar: 4 verbs x (6 unsafe + 6 safe objects).
NUM_REQUESTS = 4 * (6 + 6)
MC_SIGMAS = 6  # Monte-Carlo estimate vs exact value: 6 standard errors (style table)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"d_model": 10, "num_heads": 4}, "d_model must be divisible by num_heads"),
        ({"num_heads": 4, "num_kv_heads": 3}, "num_heads by num_kv_heads"),
        ({"num_layers": 0}, "num_layers must be an integer >= 1, got num_layers=0"),
        ({"copies": 1.5}, "copies must be an integer >= 1"),
        ({"pretrain_steps": -1}, "pretrain_steps must be an integer >= 0, got -1"),
        ({"refusal_prob": 1.5}, "refusal_prob must be in \\[0, 1\\]"),
        ({"pretrain_lr": 0.0}, "pretrain_lr > 0"),
    ],
)
def test_self_made_spec_rejects_bad_fields(fields, match):
    with pytest.raises(InputError, match=match):
        SelfMadeSpec(**fields)


def test_self_made_spec_tiny_is_untrained_and_keeps_other_fields():
    tiny = SelfMadeSpec.tiny()
    assert (tiny.d_model, tiny.num_layers, tiny.pretrain_steps) == (16, 1, 0)
    assert tiny.spec() == tiny and SelfMadeSpec().pretrain_steps == 300


def _filled_responses(verb: str, obj: str) -> dict[str, bool]:
    """Every response text of the grammar for one request, mapped to "is a refusal template"."""
    out = {}
    for templates, refusal in ((corpus.REFUSALS, True), (corpus.COMPLIANCES, False)):
        for t in templates:
            text = " ".join(t.format(v=verb, o=obj).split())
            assert text not in out, f"two templates fill to {text!r}"  # the map below is exact
            out[text] = refusal
    return out


def test_request_preference_rows_cover_every_request_with_two_different_templates():
    k = 3
    rows = request_preference_rows(np.random.default_rng(0), pairs_per_prompt=k)
    assert len(rows) == NUM_REQUESTS * k
    prompts = [r["prompt"] for r in rows]
    for verb in corpus.VERBS:
        for obj in corpus.UNSAFE + corpus.SAFE:
            assert prompts.count(f"<bos> how to {verb} a {obj} ? <ans>") == k
    assert all(p.split()[5] in corpus.UNSAFE for p in prompts[: len(rows) // 2])  # unsafe first
    for r in rows:
        verb, obj = r["prompt"].split()[3], r["prompt"].split()[5]
        allowed = _filled_responses(verb, obj)
        assert r["chosen"] in allowed and r["rejected"] in allowed and r["chosen"] != r["rejected"]
        assert "<eos>" not in r["chosen"] + r["rejected"]


def test_request_preference_rows_draw_the_chosen_template_uniformly():
    """P(chosen is a refusal template) = |REFUSALS| / (|REFUSALS| + |COMPLIANCES|) exactly (a
    uniform draw of two different templates); checked within 6 standard errors."""
    rows = request_preference_rows(np.random.default_rng(1), pairs_per_prompt=40)
    hits = np.array(
        [
            _filled_responses(r["prompt"].split()[3], r["prompt"].split()[5])[r["chosen"]]
            for r in rows
        ]
    )
    p = len(corpus.REFUSALS) / (len(corpus.REFUSALS) + len(corpus.COMPLIANCES))
    se = math.sqrt(p * (1 - p) / len(hits))
    assert abs(hits.mean() - p) < MC_SIGMAS * se, (hits.mean(), p, se)


def test_request_preference_rows_are_seeded():
    def draw(seed):
        return request_preference_rows(np.random.default_rng(seed), pairs_per_prompt=2)

    assert draw(5) == draw(5) and draw(5) != draw(6)


def test_read_pairs_generates_numbered_rows_without_a_file():
    rows, bad = read_pairs("", seed=0, pairs_per_prompt=1)
    generated = request_preference_rows(np.random.default_rng(0), pairs_per_prompt=1)
    assert bad == [] and [r.line for r in rows] == list(range(1, NUM_REQUESTS + 1))
    assert [r._asdict() for r in rows] == [{"line": i + 1, **g} for i, g in enumerate(generated)]


def test_read_pairs_logs_each_skipped_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({"prompt": "p"}) + "\n")
    logged = []
    rows, bad = read_pairs(path, seed=0, pairs_per_prompt=1, log=logged.append)
    assert [r.line for r in rows] == [1] and [b.line for b in bad] == [2, 3]
    assert logged[0].startswith("skipped line 2: not valid JSON") and len(logged) == 2


def test_read_pairs_without_a_usable_row_raises_with_the_reasons(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("{not json\n\n")
    with pytest.raises(InputError, match="no usable row; 2 row\\(s\\) skipped: line 1: not valid"):
        read_pairs(path, seed=0, pairs_per_prompt=1)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_open_self_made_reloads_the_initial_model_and_removes_its_folder(tmp_path):
    spec = SelfMadeSpec.tiny()
    made = open_self_made(spec, seed=3, workdir=tmp_path / "work")
    assert list((tmp_path / "work").iterdir()) == []  # the temporary folder is gone
    ckpt = made.checkpoint
    assert made.pretrain_final_loss is None and ckpt.source == SELF_MADE_SOURCE
    assert ckpt.template is None and made.describe()["prompt_format"] == "plain concatenation"
    words = corpus.request_prompt("make", "kite")
    ids = ckpt.tokenizer.encode(" ".join(words), add_special_tokens=False).ids
    assert ids == [corpus.VOCAB.index(w) for w in words]  # word-level: the corpus's own ids
    assert ckpt.special_id("eos_token") == corpus.VOCAB.index("<eos>")
    assert ckpt.special_id("pad_token") == corpus.VOCAB.index("<pad>") == 0
    reference = init_decoder(self_made_config(spec), seed=3)  # seed 3, no pre-training
    tokens = jnp.asarray([ids])
    np.testing.assert_array_equal(  # float32 written and read back: bit for bit
        np.asarray(ckpt.model(tokens)), np.asarray(reference(tokens))
    )


def test_open_self_made_casts_to_the_requested_dtype(tmp_path):
    made = open_self_made(SelfMadeSpec.tiny(), seed=0, dtype="bfloat16", workdir=tmp_path)
    assert made.checkpoint.model.unembedding_matrix().dtype == jnp.bfloat16
    with pytest.raises(InputError, match="dtype must be one of"):
        open_self_made(SelfMadeSpec.tiny(), seed=0, dtype="int8", workdir=tmp_path)


@pytest.mark.slow  # > 3 s on the 2-core CPU; CI runs it
def test_train_self_made_lowers_the_lm_loss_below_uniform():
    """An untrained model's next-token loss is about ln V (near-uniform logits); 40 Adam steps
    on the corpus bring the minibatch loss well below it (the corpus is mostly predictable)."""
    spec = SelfMadeSpec.tiny(pretrain_steps=40)
    _, loss = train_self_made(spec, seed=0)
    assert loss < 0.75 * math.log(len(corpus.VOCAB)), loss


def test_open_or_make_opens_a_named_folder_or_refuses_a_template_for_the_self_made(tmp_path):
    folder = tmp_path / "ckpt"
    assert save_self_made(SelfMadeSpec.tiny(), folder, seed=0) is None
    made = open_or_make(str(folder), SelfMadeSpec(), seed=9)  # the spec is not used
    direct = open_checkpoint(folder, use_chat_template=False)
    assert made.pretrain_final_loss is None and made.checkpoint.source == str(folder)
    tokens = jnp.asarray([[1, 2, 3]])
    np.testing.assert_array_equal(
        np.asarray(made.checkpoint.model(tokens)), np.asarray(direct.model(tokens))
    )
    with pytest.raises(InputError, match="needs a model: the self-made one has no template"):
        open_or_make("", SelfMadeSpec.tiny(), seed=0, use_chat_template=True, workdir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing was made
