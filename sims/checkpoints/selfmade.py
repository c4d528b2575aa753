"""The project's own tiny Llama checkpoint, made from the generated corpus, and its request pairs.

:func:`save_self_made` pre-trains a Llama-architecture :class:`~sims.models.decoder.DecoderLM`
(untied embeddings and grouped-query attention, as Llama-3-8B; sizes and pre-training in a
:class:`SelfMadeSpec`) with Adam on :func:`sims.data.corpus.pretraining_corpus` (persona answers,
refusals and compliances) and writes it in Hugging Face Llama format with a word-level
``tokenizer.json`` (:func:`sims.checkpoints.hf.save_causal_lm`). :func:`open_self_made` does so in
a temporary folder and loads it back through the loader of every checkpoint
(:func:`sims.checkpoints.opened.open_checkpoint`), so the self-made model is read as any other;
:func:`open_or_make` opens a named checkpoint or makes this one.

:func:`request_preference_rows` gives TRL-style rows for the corpus's request prompts, and
:func:`read_pairs` reads a ``--pairs`` file (or those rows) before any model is made or loaded,
so that a file without one usable row stops a run at once.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from sims.checkpoints.hf import save_causal_lm
from sims.checkpoints.opened import OpenedCheckpoint, open_checkpoint
from sims.checkpoints.tokenization import word_level_tokenizer
from sims.data import corpus
from sims.data.fixtures import array_digest, load_fixture
from sims.data.preferences import (
    BadRow,
    PreferenceRow,
    describe_bad_rows,
    parse_preference_lines,
    read_preference_jsonl,
)
from sims.errors import InputError
from sims.models.decoder import DecoderConfig, DecoderLM, init_decoder
from sims.models.transformer import pretrain

#: ``OpenedCheckpoint.source`` of the self-made checkpoint.
SELF_MADE_SOURCE = "self-made tiny Llama"


@dataclasses.dataclass(frozen=True)
class SelfMadeSpec:
    """Size and pre-training of the self-made tiny Llama (defaults: the experiments' model).

    Its fields double as command-line flags of the experiments that make it: their ``Config``
    derives from ``ExperimentConfig`` and this class, and its ``check()`` calls
    :meth:`check_spec` (``ExperimentConfig.__post_init__`` runs first in such a class).

    Raises:
      InputError: ``num_heads`` does not divide ``d_model``, or ``num_kv_heads`` does not divide
        ``num_heads``; a size, count or rate that is not positive (``pretrain_steps`` may be 0).
    """

    d_model: int = 64  # self-made: hidden size
    num_layers: int = 2  # self-made: blocks
    num_heads: int = 4  # self-made: attention heads
    num_kv_heads: int = 2  # self-made: key/value heads (GQA)
    copies: int = 8  # self-made: corpus copies (labels redrawn per copy)
    refusal_prob: float = 0.8  # self-made: P(refusal) for unsafe requests in the corpus
    pretrain_lr: float = 3e-3  # self-made: Adam learning rate
    pretrain_steps: int = 300  # self-made: Adam steps (minibatch); 0 = untrained (smoke runs)
    batch_size: int = 64  # self-made: pre-training minibatch

    def __post_init__(self) -> None:
        self.check_spec()

    def check_spec(self) -> None:
        """Raise :class:`~sims.errors.InputError` if the spec cannot make a model (see class)."""
        for name in ("d_model", "num_layers", "num_heads", "num_kv_heads", "copies", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be an integer >= 1, got {name}={value!r}")
        if not isinstance(self.pretrain_steps, int) or self.pretrain_steps < 0:
            raise InputError(f"pretrain_steps must be an integer >= 0, got {self.pretrain_steps!r}")
        if not 0 <= self.refusal_prob <= 1 or not self.pretrain_lr > 0:
            raise InputError(
                "refusal_prob must be in [0, 1] and pretrain_lr > 0, got "
                f"refusal_prob={self.refusal_prob!r}, pretrain_lr={self.pretrain_lr!r}"
            )
        if self.d_model % self.num_heads or self.num_heads % self.num_kv_heads:
            raise InputError(
                "d_model must be divisible by num_heads, and num_heads by num_kv_heads, got "
                f"d_model={self.d_model}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}"
            )

    @classmethod
    def tiny(cls, **fields: Any) -> SelfMadeSpec:
        """Return ``cls`` with the untrained one-layer spec of smoke runs (``d_model=16``, one
        corpus copy), updated with ``fields`` (any field, also of a derived ``Config``)."""
        spec = {"d_model": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "copies": 1}
        return cls(**{**spec, "pretrain_steps": 0, **fields})

    def spec(self) -> SelfMadeSpec:
        """Return the :class:`SelfMadeSpec` alone (of a ``Config`` derived from this class)."""
        return SelfMadeSpec(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(SelfMadeSpec)}
        )


class MadeCheckpoint(NamedTuple):
    """A checkpoint as opened, and the last loss of the pre-training that made it here.

    Attributes:
      checkpoint: the :class:`~sims.checkpoints.opened.OpenedCheckpoint` (the self-made one has
        no chat template).
      pretrain_final_loss: the minibatch LM loss of the last pre-training step, or ``None``
        (opened from disk, or ``pretrain_steps=0``).
    """

    checkpoint: OpenedCheckpoint
    pretrain_final_loss: float | None

    def describe(self) -> dict[str, Any]:
        """Return the JSON record of the checkpoint: ``source``, ``prompt_format`` (chat template
        or plain concatenation) and ``pretrain_final_loss``."""
        ckpt = self.checkpoint
        return {
            "source": ckpt.source,
            "prompt_format": ckpt.prompt_format,
            "pretrain_final_loss": self.pretrain_final_loss,
        }


def self_made_config(spec: SelfMadeSpec) -> DecoderConfig:
    """Return the Llama architecture of ``spec`` over the corpus vocabulary (untied, GQA).

    Example:
      >>> c = self_made_config(SelfMadeSpec.tiny())
      >>> c.vocab_size == len(corpus.VOCAB), c.hidden_size, c.num_kv_heads
      (True, 16, 1)
    """
    return DecoderConfig.llama(
        len(corpus.VOCAB),
        hidden_size=spec.d_model,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads,
        max_position_embeddings=corpus.MAX_LEN,
    )


#: ``kind`` of the self-made checkpoint's fixtures (:mod:`sims.data.fixtures`).
FIXTURE_KIND = "self_made_llama"


def self_made_fixture_settings(spec: SelfMadeSpec, *, seed: int) -> dict[str, Any]:
    """Return everything :func:`train_self_made`'s training depends on, as a fixture key.

    The seed, :class:`SelfMadeSpec`'s fields, the corpus's vocabulary size, sequence length and
    SHA-256 (:func:`sims.data.fixtures.array_digest` of its tokens and lengths), and the x64
    mode.

    Example:
      >>> key = self_made_fixture_settings(SelfMadeSpec(), seed=0)
      >>> key["pretrain_steps"], key["num_kv_heads"], len(key["corpus_sha256"])
      (300, 2, 64)
    """
    data = corpus.pretraining_corpus(
        np.random.default_rng(seed), copies=spec.copies, refusal_prob=spec.refusal_prob
    )
    return {
        "seed": seed,
        **dataclasses.asdict(spec.spec()),
        "vocab_size": len(corpus.VOCAB),
        "max_len": corpus.MAX_LEN,
        "corpus_sha256": array_digest(data.tokens, data.length),
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
    }


def self_made_pretraining(
    spec: SelfMadeSpec, *, seed: int, use_fixture: bool = True
) -> tuple[DecoderLM, np.ndarray]:
    """Return the self-made model and its minibatch LM loss before each pre-training step.

    The corpus is drawn from ``np.random.default_rng(seed)``, the model initialised with ``seed``
    (:func:`~sims.models.decoder.init_decoder`), minibatches drawn from ``jax.random.key(seed)``
    (:func:`~sims.models.transformer.pretrain`: Adam, ``spec.pretrain_steps`` steps of
    ``spec.batch_size`` sequences). When a shipped fixture (:mod:`sims.data.fixtures`) was
    trained with exactly these settings (:func:`self_made_fixture_settings`) and
    ``use_fixture``, its parameters and losses are returned instead of training (float32 Adam
    amplifies a machine's reduction order; the fixture is the same start everywhere).
    ``spec.pretrain_steps = 0`` returns the initial model and no losses.
    """
    model = init_decoder(self_made_config(spec), seed=seed)
    if not spec.pretrain_steps:  # a random (untrained) model, for smoke runs
        return model, np.zeros(0)
    key = self_made_fixture_settings(spec, seed=seed)
    loaded = load_fixture(FIXTURE_KIND, key, model) if use_fixture else None
    if loaded is not None:
        return loaded
    data = corpus.pretraining_corpus(
        np.random.default_rng(seed), copies=spec.copies, refusal_prob=spec.refusal_prob
    )
    res = pretrain(
        model,
        jax.random.key(seed),
        data.tokens,
        data.length,
        lr=spec.pretrain_lr,
        num_steps=spec.pretrain_steps,
        batch_size=spec.batch_size,
    ).run()
    return res.final, np.asarray(res.loss)[:-1]  # [-1] is the loss after the last step


def train_self_made(spec: SelfMadeSpec, *, seed: int) -> tuple[DecoderLM, float | None]:
    """Return the self-made model and its last pre-training loss (``None`` without pre-training).

    The model of :func:`self_made_pretraining` (a shipped fixture where one matches); the loss
    returned is the minibatch loss of the last step, before its update.
    """
    model, losses = self_made_pretraining(spec, seed=seed)
    return model, float(losses[-1]) if losses.size else None


def save_self_made(spec: SelfMadeSpec, folder: str | Path, *, seed: int) -> float | None:
    """Make the self-made checkpoint (:func:`train_self_made`) and write it to ``folder`` in
    Hugging Face Llama format, with a word-level tokenizer of :data:`sims.data.corpus.VOCAB`
    (``<bos>``, ``<eos>``, ``<pad>`` special); return its last pre-training loss (or ``None``)."""
    model, loss = train_self_made(spec, seed=seed)
    tok = word_level_tokenizer(corpus.VOCAB, special_tokens=corpus.SPECIAL)
    save_causal_lm(
        model, folder, tokenizer=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    return loss


def open_self_made(
    spec: SelfMadeSpec, *, seed: int, dtype: str = "float32", workdir: str | Path | None = None
) -> MadeCheckpoint:
    """Make the self-made checkpoint in a temporary folder and load it back; return it.

    The folder is made inside ``workdir`` (created if missing; the system's temporary folder
    when ``None``) and removed before this returns, also when it raises (a ``SIGTERM`` handler
    that raises cleans up too). Loading goes through
    :func:`~sims.checkpoints.opened.open_checkpoint` (plain concatenation, no chat template), so
    ``dtype`` is checked as for any checkpoint; ``source`` is :data:`SELF_MADE_SOURCE`.

    Raises:
      InputError: a ``dtype`` other than those of :data:`sims.checkpoints.hf.DTYPES`.
    """
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        loss = save_self_made(spec, tmp, seed=seed)
        opened = open_checkpoint(tmp, dtype=dtype, use_chat_template=False)
    weights = f"self-made, pre-trained {spec.pretrain_steps} steps on the generated corpus"
    return MadeCheckpoint(opened._replace(source=SELF_MADE_SOURCE, weights=weights), loss)


def open_or_make(
    model: str | Path,
    spec: SelfMadeSpec,
    *,
    seed: int,
    dtype: str = "float32",
    use_chat_template: bool = False,
    workdir: str | Path | None = None,
) -> MadeCheckpoint:
    """Return the checkpoint ``model`` names, or the self-made one when ``model`` is ``""``.

    A folder, GGUF file or packaged name opens through
    :func:`~sims.checkpoints.opened.open_checkpoint` (``pretrain_final_loss`` is ``None``);
    ``""`` makes the self-made checkpoint of ``spec`` and ``seed`` (:func:`open_self_made`).

    Raises:
      InputError: ``use_chat_template`` for the self-made checkpoint (it has no template; checked
        before any pre-training), or as :func:`~sims.checkpoints.opened.open_checkpoint`.
    """
    if model:
        return MadeCheckpoint(
            open_checkpoint(model, dtype=dtype, use_chat_template=use_chat_template), None
        )
    if use_chat_template:
        raise InputError("use_chat_template=True needs a model: the self-made one has no template")
    return open_self_made(spec, seed=seed, dtype=dtype, workdir=workdir)


def request_preference_rows(rng: np.random.Generator, *, pairs_per_prompt: int) -> list[dict]:
    """Return TRL-style rows (``prompt``, ``chosen``, ``rejected``) for the corpus's requests.

    Every request prompt (:func:`sims.data.corpus.requests`, unsafe ones first) appears
    ``pairs_per_prompt`` times in a row of the prompts' list; each row takes two different
    templates of :data:`~sims.data.corpus.REFUSALS` + :data:`~sims.data.corpus.COMPLIANCES`
    (uniformly, without replacement, from ``rng``) as chosen and rejected: an off-policy,
    UltraFeedback-like set. Texts are the corpus words joined by spaces, without ``<eos>``.

    Example:
      >>> rows = request_preference_rows(np.random.default_rng(0), pairs_per_prompt=1)
      >>> len(rows), rows[0]["prompt"]
      (48, '<bos> how to make a bomb ? <ans>')
    """
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
    path: str | Path,
    *,
    seed: int,
    pairs_per_prompt: int,
    log: Callable[[str], None] | None = None,
) -> tuple[list[PreferenceRow], list[BadRow]]:
    """Return ``(rows, bad)`` of the JSONL file ``path``, or of the corpus's request pairs.

    With ``path == ""`` the rows are :func:`request_preference_rows` of
    ``np.random.default_rng(seed)``, parsed as the lines of such a file would be (line numbers
    from 1). Call it before any model is made: a file without one usable row then costs no
    pre-training. ``log`` (e.g. ``print``) is called with ``"skipped line N: reason"`` for each
    row that cannot be used.

    Raises:
      InputError: no row is usable (the message gives the count and the first reasons).
      FileNotFoundError, IsADirectoryError, PermissionError: the file cannot be read.
    """
    if path:
        rows, bad = read_preference_jsonl(path)
    else:
        generated = request_preference_rows(
            np.random.default_rng(seed), pairs_per_prompt=pairs_per_prompt
        )
        rows, bad = parse_preference_lines(json.dumps(r) for r in generated)
    for b in bad if log is not None else ():
        log(f"skipped line {b.line}: {b.reason}")
    if not rows:
        raise InputError(f"{path}: no usable row; {describe_bad_rows(bad)}")
    return rows, bad
