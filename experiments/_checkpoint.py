"""Checkpoint plumbing of the real-model experiments (``persona_no_over_never``, ``ches_real``,
``audit``): open a Hugging Face folder (``--model``) or make the project's own one.

The self-made checkpoint: a tiny Llama-architecture :class:`~sims.models.decoder.DecoderLM` (untied
embeddings and GQA, as Llama-3-8B) pre-trained with Adam on the generated corpus of
:mod:`sims.data.corpus` (persona answers, refusals and compliances), written in Hugging Face Llama
format with a word-level ``tokenizer.json`` (:func:`sims.checkpoints.hf.save_causal_lm`) into a
temporary folder inside the output folder, loaded back through the same loader as any checkpoint
(:func:`sims.checkpoints.hf.load_causal_lm`), and deleted.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments.framework import (
    ConfigError,
    ExperimentConfig,
    existing_path,
    nonnegative_int,
    one_of,
    progress,
)
from sims.checkpoints.hf import load_causal_lm, save_causal_lm
from sims.checkpoints.tokenization import (
    chat_template,
    load_tokenizer,
    special_tokens,
    word_level_tokenizer,
)
from sims.data import corpus
from sims.data.preferences import (
    BadRow,
    PreferenceRow,
    describe_bad_rows,
    read_preference_jsonl,
    write_preference_jsonl,
)
from sims.errors import InputError
from sims.models.decoder import DecoderConfig, init_decoder
from sims.models.transformer import pretrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
#: Values of ``--model`` that name no path: "" (the self-made checkpoint), "smollm2" (packaged).
MODEL_WORDS = ("", "smollm2")


@dataclass(frozen=True)
class CheckpointConfig(ExperimentConfig):
    """Which checkpoint to use, and the self-made one's size and pre-training."""

    model: str = ""  # Hugging Face checkpoint folder; "" = the self-made tiny Llama (made here)
    dtype: str = "float32"  # parameter dtype: float32 or bfloat16
    chat_template: bool = False  # render prompts with the checkpoint's chat template (else plain)
    d_model: int = 64  # self-made: hidden size
    num_layers: int = 2  # self-made: blocks
    num_heads: int = 4  # self-made: attention heads
    num_kv_heads: int = 2  # self-made: key/value heads (GQA)
    copies: int = 8  # self-made: corpus copies (labels redrawn per copy)
    refusal_prob: float = 0.8  # self-made: P(refusal) for unsafe requests in the corpus
    pretrain_lr: float = 3e-3  # self-made: Adam learning rate
    pretrain_steps: int = 300  # self-made: Adam steps (minibatch); 0 = untrained (smoke runs)
    batch_size: int = 64  # self-made: pre-training minibatch

    RULES = {
        "pretrain_steps": nonnegative_int,
        "dtype": one_of(sorted(DTYPES)),
        "model": existing_path(allow=MODEL_WORDS),
    }
    #: The self-made checkpoint of every checkpoint experiment's ``--smoke`` version (untrained).
    SMOKE: ClassVar[dict] = {
        "d_model": 16,
        "num_layers": 1,
        "num_heads": 2,
        "num_kv_heads": 1,
        "copies": 1,
        "pretrain_steps": 0,
    }

    def check(self) -> None:
        if self.d_model % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError(
                "--d-model must be divisible by --num-heads, and --num-heads by --num-kv-heads, "
                f"got {self.d_model}, {self.num_heads}, {self.num_kv_heads}"
            )


class Checkpoint(NamedTuple):
    """An opened checkpoint and what the experiments need to tokenize for it."""

    model: Any  # sims.models.decoder.DecoderLM
    tokenizer: Any  # tokenizers.Tokenizer
    tokens: dict[str, str]  # special tokens named by the folder (bos/eos/pad)
    template: str | None  # chat template in use, or None (plain concatenation)
    source: str  # "self-made tiny Llama" or the folder path
    pretrain_final_loss: float | None  # self-made only

    def token_id(self, text: str) -> int:
        """The id of ``text`` if it is exactly one token (no special tokens added)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) != 1:
            raise ValueError(f"{text!r} must be a single token for this tokenizer, got ids {ids}")
        return ids[0]

    def special_id(self, key: str, default: int | None = None) -> int | None:
        tok = self.tokens.get(key)
        idx = self.tokenizer.token_to_id(tok) if tok else None
        return default if idx is None else idx

    @property
    def prompt_format(self) -> str:
        return "chat template" if self.template is not None else "plain concatenation"

    def describe(self, config: CheckpointConfig) -> dict[str, Any]:
        """The JSON record of the checkpoint: source, prompt format, the checkpoint fields."""
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(CheckpointConfig)}
        return {
            "source": self.source,
            "prompt_format": self.prompt_format,
            "pretrain_final_loss": self.pretrain_final_loss,
            **fields,
        }


def self_made_checkpoint(config: CheckpointConfig, folder: Path, *, seed: int) -> float | None:
    """Pre-train the tiny Llama on the corpus, save it in HF format to ``folder``; return the
    final minibatch LM loss (``None`` without pre-training)."""
    data = corpus.pretraining_corpus(
        np.random.default_rng(seed), copies=config.copies, refusal_prob=config.refusal_prob
    )
    arch = DecoderConfig.llama(
        len(corpus.VOCAB),
        hidden_size=config.d_model,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        max_position_embeddings=corpus.MAX_LEN,
    )
    model, loss = init_decoder(arch, seed=seed), None
    if config.pretrain_steps:  # 0: a random (untrained) checkpoint, for smoke runs
        res = pretrain(
            model,
            jax.random.key(seed),
            data.tokens,
            data.length,
            lr=config.pretrain_lr,
            num_steps=config.pretrain_steps,
            batch_size=config.batch_size,
        ).run()
        model, loss = res.final, float(np.asarray(res.loss)[-2])
    tok = word_level_tokenizer(corpus.VOCAB, special_tokens=corpus.SPECIAL)
    save_causal_lm(
        model, folder, tokenizer=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    return loss


def open_checkpoint(config: CheckpointConfig, *, seed: int, workdir: Path | None) -> Checkpoint:
    """Return the :class:`Checkpoint` of ``config.model``, or make and reload the self-made one
    (in a temporary folder inside ``workdir``, or the system's when ``workdir`` is None).

    Raises:
      ValueError: ``chat_template`` requested but the folder has none.
    """
    dtype = DTYPES[config.dtype]
    if config.model:
        folder, loss, source = Path(config.model), None, config.model
        model = load_causal_lm(folder, dtype=dtype)
        tokenizer, tokens = load_tokenizer(folder), special_tokens(folder)
        template = chat_template(folder)
    else:
        source = "self-made tiny Llama"
        if workdir is not None:
            Path(workdir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            loss = self_made_checkpoint(config, Path(tmp), seed=seed)
            progress(f"[checkpoint] self-made tiny Llama made (final LM loss {loss})")
            model = load_causal_lm(tmp, dtype=dtype)
            tokenizer, tokens, template = load_tokenizer(tmp), special_tokens(tmp), None
    if config.chat_template and template is None:
        raise ValueError(f"chat_template=True but {source} has no chat template")
    return Checkpoint(
        model, tokenizer, tokens, template if config.chat_template else None, source, loss
    )


def request_preference_rows(rng: np.random.Generator, *, pairs_per_prompt: int) -> list[dict]:
    """Return TRL-style rows for every request prompt of the corpus: two different responses
    from the refusal and compliance templates, the preferred one chosen by a coin (an off-policy,
    UltraFeedback-like set; the texts are the corpus's words joined by spaces, no ``<eos>``)."""
    templates = corpus.REFUSALS + corpus.COMPLIANCES
    rows = []
    for unsafe in (True, False):
        for verb, obj in corpus.requests(unsafe) * pairs_per_prompt:
            a, b = rng.choice(len(templates), 2, replace=False)
            rows.append(
                {
                    "prompt": " ".join(corpus.request_prompt(verb, obj)),
                    "chosen": " ".join(corpus.response(templates[a], verb, obj)[:-1]),
                    "rejected": " ".join(corpus.response(templates[b], verb, obj)[:-1]),
                }
            )
    return rows


def read_pairs(
    config: Any, *, name: str, workdir: Path | None
) -> tuple[list[PreferenceRow], list[BadRow]]:
    """Return ``(rows, bad)`` of ``config.pairs``, or of pairs generated from the corpus
    (:func:`request_preference_rows`, ``config.pairs_per_prompt`` per prompt, written to JSONL in
    a temporary folder inside ``workdir`` and read back) when it is ``""``; print each skipped line.

    Called before the checkpoint is opened, so a file without one usable row stops the run before
    any pre-training.

    Raises:
      InputError: no row is usable (the message gives the count and the first reasons).
    """
    if config.pairs:
        rows, bad = read_preference_jsonl(config.pairs)
    else:
        generated = request_preference_rows(
            np.random.default_rng(config.seed), pairs_per_prompt=config.pairs_per_prompt
        )
        if workdir is not None:
            Path(workdir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            rows, bad = read_preference_jsonl(
                write_preference_jsonl(Path(tmp) / "generated.jsonl", generated)
            )
    for b in bad:
        progress(f"[{name}] skipped line {b.line}: {b.reason}")
    if not rows:
        raise InputError(f"{config.pairs}: no usable row; {describe_bad_rows(bad)}")
    return rows, bad


def largest_decrease(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return per run ``(drop, p[t], p[t'])`` of the largest decrease ``max_{t<t'} p[t] - p[t']``
    of ``p`` ``[R, steps]`` (Razin et al. 2024, Table 1: "largest decrease between any two
    steps")."""
    running = np.maximum.accumulate(p, axis=1)
    later = np.argmax(running - p, axis=1)  # t' of the largest decrease
    rows = np.arange(p.shape[0])
    return (running - p)[rows, later], running[rows, later], p[rows, later]


def top_gainers(increase, vocab, classes, runs, *, k: int = 3) -> tuple[list[dict], np.ndarray]:
    """Return the Tables 4-12 list of tokens among the top-``k`` probability gains of the
    selected ``runs`` (``increase`` ``[R, V]`` from the start; mean increase and run count per
    token, by count), and per run whether a ``"catastrophic"`` token was among its top ``k``."""
    table: dict[str, list[float]] = {}
    hit = np.zeros(increase.shape[0], bool)
    for r in np.flatnonzero(runs):
        for z in np.argsort(-increase[r])[:k]:
            table.setdefault(vocab[z], []).append(float(increase[r, z]))
            hit[r] |= classes[z] == "catastrophic"
    rows = [
        {
            "token": t,
            "mean_increase": float(np.mean(v)),
            "count": len(v),
            "class": classes[vocab.index(t)],
        }
        for t, v in table.items()
    ]
    return sorted(rows, key=lambda e: (-e["count"], -e["mean_increase"])), hit
