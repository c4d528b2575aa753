"""An opened checkpoint: model, tokenizer, special tokens, chat template, and what it is.

:func:`open_checkpoint` opens a Hugging Face folder, a GGUF file or a packaged model
(``"smollm2"``) in one call and records a description of the weights for every output (a
quantised GGUF says it is not the original floating-point model). :func:`tiny_random_checkpoint`
makes an untrained byte-level model for smoke tests of real-model protocols: every string
encodes, label words are several tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp

from sims.checkpoints.hf import check_dtype, load_causal_lm
from sims.checkpoints.packaged import resolve_model
from sims.checkpoints.tokenization import chat_template, load_tokenizer, special_tokens
from sims.errors import InputError
from sims.models.decoder import DecoderConfig, init_decoder

#: Tokens that end an assistant turn in common chat templates (sampling stops at them too).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


class OpenedCheckpoint(NamedTuple):
    """A checkpoint ready for the protocols.

    Attributes:
      model: the :class:`~sims.models.decoder.DecoderLM`.
      tokenizer: a ``tokenizers.Tokenizer``.
      special: special tokens by role (``bos_token``, ``eos_token``, ``pad_token``).
      template: the chat template in use, or ``None`` (plain concatenation).
      source: the path or name given.
      weights: a one-line description of the weights (format, quantisation).
    """

    model: Any
    tokenizer: Any
    special: dict[str, str]
    template: str | None
    source: str
    weights: str

    @property
    def prompt_format(self) -> str:
        """``"chat template"`` or ``"plain concatenation"``."""
        return "chat template" if self.template is not None else "plain concatenation"

    def token_id(self, text: str) -> int:
        """The id of ``text`` if it is exactly one token (no special tokens added).

        Raises:
          ValueError: ``text`` is several tokens or none (names them).
        """
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) != 1:
            raise ValueError(f"{text!r} must be a single token for this tokenizer, got ids {ids}")
        return ids[0]

    def special_id(self, key: str, default: int | None = None) -> int | None:
        """The id of the special token ``key`` (``"pad_token"``...), or ``default``."""
        tok = self.special.get(key)
        idx = self.tokenizer.token_to_id(tok) if tok else None
        return default if idx is None else idx

    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a sampled answer: the EOS token and end-of-turn tokens in the vocabulary."""
        ids = {self.special_id("eos_token")} | {self.tokenizer.token_to_id(t) for t in END_OF_TURN}
        return tuple(sorted(i for i in ids if i is not None))


def open_checkpoint(
    path: str | Path, *, dtype: Any = "float32", use_chat_template: bool = True
) -> OpenedCheckpoint:
    """Return the :class:`OpenedCheckpoint` of a folder, a GGUF file or a packaged name.

    Raises:
      InputError: a bad ``dtype`` (first), a missing path, an unreadable checkpoint or
        tokenizer (see :func:`sims.checkpoints.hf.load_causal_lm`), or ``use_chat_template``
        for a checkpoint that has none.
    """
    from sims.checkpoints.gguf import gguf_description

    dtype = check_dtype(dtype)
    resolved = resolve_model(path)
    tokenizer = load_tokenizer(resolved)  # tokenizer first: cheap, and checked before weights
    template = chat_template(resolved) if use_chat_template else None
    if use_chat_template and template is None:
        raise InputError(f"{path}: has no chat template (use plain concatenation)")
    model = load_causal_lm(resolved, dtype=dtype)
    is_gguf = resolved.suffix == ".gguf" or resolved.is_file()
    weights = gguf_description(resolved) if is_gguf else f"Hugging Face folder {resolved}"
    return OpenedCheckpoint(
        model, tokenizer, special_tokens(resolved), template, str(path), weights
    )


def byte_level_tokenizer(words: tuple[str, ...] = ()):
    """Return a byte-level BPE ``tokenizers.Tokenizer`` of the 256 bytes and no merges (ids
    0..255) with ``<pad>`` (256), ``<eos>`` (257) and ``words`` as whole tokens after them:
    every string encodes, one token per byte outside ``words``.

    Example:
      >>> byte_level_tokenizer().encode("No").ids
      [78, 111]
      >>> byte_level_tokenizer(("No",)).encode("No").ids
      [258]
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from sims.checkpoints.tokenization import _byte_alphabet

    alphabet = _byte_alphabet()
    vocab = {alphabet[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab, [], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<eos>"])
    tok.add_tokens(list(words))
    return tok


def tiny_random_checkpoint(
    *, seed: int, words: tuple[str, ...] = (), hidden_size: int = 16
) -> OpenedCheckpoint:
    """Return an untrained tiny byte-level :class:`OpenedCheckpoint` (smoke tests only).

    A 1-layer Llama over :func:`byte_level_tokenizer`'s tokens (``words`` whole), tied, float32,
    no chat template: it runs every real-model protocol end to end and says nothing about any
    model.
    """
    tok = byte_level_tokenizer(words)
    config = DecoderConfig.llama(
        tok.get_vocab_size(), hidden_size=hidden_size, num_heads=2, num_layers=1, tied=True
    )
    model = init_decoder(config, seed=seed, dtype=jnp.float32)
    special = {"pad_token": "<pad>", "eos_token": "<eos>"}
    return OpenedCheckpoint(
        model, tok, special, None, "tiny random byte-level model", "untrained, random (smoke test)"
    )
