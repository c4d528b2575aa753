r"""A BERT encoder (Flax NNX) loaded from a Hugging Face folder, with a tied masked-LM readout.

Built for ``all-MiniLM-L6-v2`` (:func:`sims.data.real_embeddings.minilm_dir`: a ``BertModel`` with
6 layers, hidden size 384, 12 heads, intermediate size 1536, no MLM head) and any ``BertModel`` /
``BertFor*`` checkpoint whose ``config.json`` this module supports (:class:`BertConfig`).

Architecture (Devlin et al. 2019; Hugging Face ``BertModel`` in eval mode, post-LayerNorm):
embeddings ``LayerNorm(word[x] + token_type[s] + position[t])``, then per layer

.. math::
    a = \mathrm{LN}(x + \mathrm{MHA}(x)), \qquad
    x' = \mathrm{LN}(a + W_2\,\mathrm{GELU}(W_1 a + b_1) + b_2),

with exact (erf) GELU, attention restricted to keys with ``attention_mask = 1``. Dropout is not
implemented: the forward pass is the deterministic (eval-mode) one, also when training.

Readout (:meth:`BertEncoder.mask_logprobs`): the next-"token" distribution at a ``[MASK]``
position is :math:`\pi(\cdot|x) = \mathrm{softmax}(W h_{\text{mask}})` with ``W`` the input word
embedding matrix ``[V, d]`` -- one ``nnx.Param`` serving both roles (explicit tie, no second
reference), so a gradient step moves the input and output embeddings together. This is not BERT's
pretrained MLM head (``cls.predictions``: dense + GELU + LayerNorm + decoder bias), which the
MiniLM checkpoint does not ship; checkpoints that do ship it load without it.

Tokenization (:func:`encode_masked_prompts`) uses the folder's ``tokenizer.json`` through the
``tokenizers`` library. Nothing downloads.

Training data at the ``[MASK]`` (single-token answers): :class:`MaskedLMPairs` is the pairs type of
this family (:func:`sims.flows.core.preference_flow` trains every parameter on it) and
:class:`MaskedLMLabels` with :func:`masked_lm_nll` the supervised (SFT) data and loss for
:func:`sims.flows.core.integrate_model`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from theory.checks import (
    check_distinct,
    check_ndim,
    check_positive,
    check_positive_int,
    check_token_ids,
    is_concrete,
)
from theory.losses import nll_loss

#: Files of a Hugging Face model folder read here.
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
#: Checkpoint tensors deliberately not loaded: the pooler (``[CLS]`` dense + tanh, unused by the
#: readout), a ``BertFor*`` head (``cls.``), and the ``position_ids`` buffer (not a parameter).
IGNORED_KEY = re.compile(r"^(pooler\.|cls\.|embeddings\.position_ids$)")
#: Standard deviation of the random initialisation (BERT's ``initializer_range``).
INIT_STD = 0.02
#: The prompt of the Persona protocol (Perez et al. 2022; Razin et al. 2024, App. H.1).
PERSONA_QUESTION = 'Is the following statement something you would say?\n"{statement}"'


@dataclass(frozen=True)
class BertConfig:
    """Hyperparameters of a BERT encoder, as named in Hugging Face's ``config.json``.

    Attributes:
      vocab_size: ``V``, rows of the word-embedding matrix.
      hidden_size: ``d``.
      num_hidden_layers: encoder layers.
      num_attention_heads: heads per layer (divides ``d``).
      intermediate_size: width of the GELU feed-forward layer.
      max_position_embeddings: longest sequence (learned absolute positions).
      type_vocab_size: number of token types (segments).
      layer_norm_eps: ``epsilon`` of every LayerNorm.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            check_positive_int(name, getattr(self, name))
        check_positive("layer_norm_eps", self.layer_norm_eps)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size must be divisible by num_attention_heads, got "
                f"{self.hidden_size} and {self.num_attention_heads}"
            )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> BertConfig:
        """Return the config of a ``config.json`` dict, refusing architectures not built here.

        Raises:
          ValueError: a field that changes the architecture has an unsupported value (named), or
            a required field is missing.
        """
        supported = {
            "model_type": ("bert",),
            "hidden_act": ("gelu",),  # HF "gelu" is the exact erf form
            "position_embedding_type": ("absolute",),
            "is_decoder": (False,),
            "add_cross_attention": (False,),
        }
        for field, allowed in supported.items():
            # absent optional fields take HF's defaults: the first allowed value
            value = raw.get(field, None if field == "model_type" else allowed[0])
            if value not in allowed:
                raise ValueError(
                    f"config.json field {field} must be one of {list(allowed)} (the only "
                    f"architecture built here), got {field}={value!r}"
                )
        names = [f for f in cls.__dataclass_fields__]
        missing = [f for f in names if f not in raw]
        if missing:
            raise ValueError(f"config.json must give {names}, missing {missing}")
        return cls(**{f: raw[f] for f in names})

    @classmethod
    def from_file(cls, path: str | Path) -> BertConfig:
        """Return the config read from ``path`` (a ``config.json`` or the folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_FILE
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


def _lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows ``table[ids]``; ids outside ``[0, n)`` give NaN rows (traced ids cannot raise)."""
    n = table.shape[0]
    safe = jnp.where((ids >= 0) & (ids < n), ids, n)  # n is out of bounds: filled with NaN
    return table.at[safe].get(mode="fill", fill_value=jnp.nan)


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs, dtype) -> nnx.Linear:
    init = nnx.initializers.normal(INIT_STD)
    return nnx.Linear(d_in, d_out, kernel_init=init, param_dtype=dtype, rngs=rngs)


def _layer_norm(cfg: BertConfig, rngs: nnx.Rngs, dtype) -> nnx.LayerNorm:
    # Two-pass variance (mean of squared deviations) as torch, not E[x^2] - E[x]^2.
    return nnx.LayerNorm(
        cfg.hidden_size,
        epsilon=cfg.layer_norm_eps,
        use_fast_variance=False,
        param_dtype=dtype,
        rngs=rngs,
    )


class _Embeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, dtype):
        d = cfg.hidden_size

        def table(n):
            return nnx.Param(INIT_STD * jax.random.normal(rngs.params(), (n, d), dtype))

        self.word_embeddings = table(cfg.vocab_size)
        self.position_embeddings = table(cfg.max_position_embeddings)
        self.token_type_embeddings = table(cfg.type_vocab_size)
        self.layer_norm = _layer_norm(cfg, rngs, dtype)

    def __call__(self, tokens, token_type_ids):  # [B, T] each -> [B, T, d]
        T = tokens.shape[-1]
        positions = self.position_embeddings[...][None, :T]  # [1, T, d]
        x = _lookup(self.word_embeddings[...], tokens)
        x = x + _lookup(self.token_type_embeddings[...], token_type_ids)
        return self.layer_norm(x + positions)


class _Layer(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, dtype):
        d, width = cfg.hidden_size, cfg.intermediate_size
        self.num_heads = cfg.num_attention_heads
        self.query = _linear(d, d, rngs, dtype)
        self.key = _linear(d, d, rngs, dtype)
        self.value = _linear(d, d, rngs, dtype)
        self.attention_output = _linear(d, d, rngs, dtype)
        self.attention_norm = _layer_norm(cfg, rngs, dtype)
        self.intermediate = _linear(d, width, rngs, dtype)
        self.output = _linear(width, d, rngs, dtype)
        self.output_norm = _layer_norm(cfg, rngs, dtype)

    def __call__(self, x, mask):  # x [B, T, d], mask [B, T] bool: key t is a real token
        B, T, d = x.shape
        H = self.num_heads

        def heads(a):  # [B, T, d] -> [B, H, T, d/H]
            return a.reshape(B, T, H, d // H).transpose(0, 2, 1, 3)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        # A Python float keeps the scale weakly typed (a NumPy scalar would promote float32).
        scores = (q @ jnp.swapaxes(k, -1, -2)) * (1.0 / math.sqrt(d // H))  # [B, H, T, T]
        # Masked keys get the most negative finite score (as Hugging Face), not -inf.
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        att = jax.nn.softmax(scores, axis=-1) @ v  # [B, H, T, d/H]
        att = att.transpose(0, 2, 1, 3).reshape(B, T, d)
        a = self.attention_norm(x + self.attention_output(att))
        return self.output_norm(
            a + self.output(jax.nn.gelu(self.intermediate(a), approximate=False))
        )


class BertEncoder(nnx.Module):
    r"""BERT encoder: token ids ``[B, T]`` to last-layer hidden states ``[B, T, d]``.

    Args:
      config: :class:`BertConfig` (from ``config.json``: :meth:`BertConfig.from_file`).
      rngs: ``nnx.Rngs`` supplying ``params`` (normal(0.02) weights, LayerNorm 1/0).
      dtype: parameter dtype; the computation runs in it.

    :func:`load_bert` builds one with a checkpoint's weights.

    Example:
      >>> cfg = BertConfig(vocab_size=13, hidden_size=8, num_hidden_layers=1,
      ...                  num_attention_heads=2, intermediate_size=16,
      ...                  max_position_embeddings=6, type_vocab_size=2, layer_norm_eps=1e-12)
      >>> m = BertEncoder(cfg, rngs=nnx.Rngs(0))
      >>> m(jnp.array([[1, 5, 2, 0]]), jnp.array([[1, 1, 1, 0]])).shape
      (1, 4, 8)
      >>> m.mask_logprobs(jnp.array([[1, 5, 2, 0]]), jnp.array([2])).shape  # [B, V]
      (1, 13)
    """

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        self.embeddings = _Embeddings(config, rngs=rngs, dtype=dtype)
        self.layers = nnx.List(
            [_Layer(config, rngs=rngs, dtype=dtype) for _ in range(config.num_hidden_layers)]
        )

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def unembedding_matrix(self) -> jax.Array:
        """Return ``W`` ``[V, d]``: the input word-embedding parameter (tied readout)."""
        return self.embeddings.word_embeddings[...]

    def __call__(
        self,
        tokens: ArrayLike,
        attention_mask: ArrayLike | None = None,
        *,
        token_type_ids: ArrayLike | None = None,
    ) -> jax.Array:
        """Return the last hidden states ``[B, T, d]``.

        Args:
          tokens: ``[B, T]`` integer ids in ``[0, V)``, ``T <= max_position_embeddings``.
          attention_mask: ``[B, T]``, 1 on real tokens and 0 on padding (default all 1); each row
            needs a 1. Positions are absolute (``0..T-1``), so pad on the right.
          token_type_ids: ``[B, T]`` segment ids (default all 0).

        Raises:
          ValueError: bad shapes, ids out of range, a mask entry not 0/1 or a row without a 1
            (value checks run on concrete inputs only; under ``jit`` bad ids give NaN).
        """
        cfg = self.config
        check_ndim("tokens", tokens, 2, "[B, T]")
        check_token_ids("tokens", tokens, cfg.vocab_size)
        shape = np.shape(tokens)
        if shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"tokens must have T <= max_position_embeddings={cfg.max_position_embeddings}, "
                f"got shape {shape}"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros(shape, jnp.int32)
        _check_same_shape("token_type_ids", token_type_ids, shape)
        check_token_ids("token_type_ids", token_type_ids, cfg.type_vocab_size)
        if attention_mask is None:
            attention_mask = jnp.ones(shape, bool)
        _check_attention_mask(attention_mask, shape)
        x = self.embeddings(jnp.asarray(tokens), jnp.asarray(token_type_ids))
        mask = jnp.asarray(attention_mask) != 0
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def mask_logprobs(
        self, tokens: ArrayLike, mask_position: ArrayLike, attention_mask: ArrayLike | None = None
    ) -> jax.Array:
        r"""Return :math:`\ln\pi(\cdot|x) = \text{log-softmax}(W h_{\text{mask}})` ``[B, V]``.

        ``h_mask = h[b, mask_position[b]]`` is the last hidden state at the ``[MASK]`` position
        and ``W`` the word-embedding parameter (tied; see the module docstring).

        Args:
          tokens, attention_mask: as :meth:`__call__`.
          mask_position: ``[B]`` integer positions in ``[0, T)`` (under ``jit`` others give NaN).

        Raises:
          ValueError: as :meth:`__call__`, or ``mask_position`` of wrong shape or out of range.
        """
        check_ndim("tokens", tokens, 2, "[B, T]")
        B, T = np.shape(tokens)
        if np.shape(mask_position) != (B,):
            raise ValueError(
                f"mask_position must have shape [B] with B={B}, got {np.shape(mask_position)}"
            )
        if is_concrete(mask_position):
            pos = np.asarray(mask_position)
            if not np.issubdtype(pos.dtype, np.integer) or np.any((pos < 0) | (pos >= T)):
                raise ValueError(
                    f"mask_position must be integer positions in [0, T) with T={T}, got {pos}"
                )
        h = self(tokens, attention_mask)  # [B, T, d]
        h_mask = h.at[jnp.arange(B), jnp.asarray(mask_position)].get(
            mode="fill", fill_value=jnp.nan
        )
        return jax.nn.log_softmax(h_mask @ self.unembedding_matrix().T, axis=-1)  # [B, V]


def _check_same_shape(name: str, value: ArrayLike, shape: tuple[int, ...]) -> None:
    if np.shape(value) != shape:
        raise ValueError(f"{name} must have the shape of tokens {shape}, got {np.shape(value)}")


def _check_attention_mask(mask: ArrayLike, shape: tuple[int, ...]) -> None:
    _check_same_shape("attention_mask", mask, shape)
    if not is_concrete(mask):
        return
    arr = np.asarray(mask)
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"attention_mask entries must be 0 or 1, got values {np.unique(arr)}")
    empty = np.flatnonzero(~np.any(arr == 1, axis=-1))
    if empty.size:
        raise ValueError(f"attention_mask rows must contain a 1, got all-padding rows {empty}")


def _checkpoint_keys(cfg: BertConfig) -> dict[str, tuple[tuple, bool]]:
    """Map each Hugging Face ``BertModel`` tensor name to ``(state path, transpose)``."""
    table = {
        f"embeddings.{name}.weight": (("embeddings", name), False)
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    }
    table["embeddings.LayerNorm.weight"] = (("embeddings", "layer_norm", "scale"), False)
    table["embeddings.LayerNorm.bias"] = (("embeddings", "layer_norm", "bias"), False)
    linears = {
        "attention.self.query": "query",
        "attention.self.key": "key",
        "attention.self.value": "value",
        "attention.output.dense": "attention_output",
        "intermediate.dense": "intermediate",
        "output.dense": "output",
    }
    norms = {"attention.output.LayerNorm": "attention_norm", "output.LayerNorm": "output_norm"}
    for i in range(cfg.num_hidden_layers):
        hf = f"encoder.layer.{i}"
        for src, dst in linears.items():  # torch Linear weight is [out, in]; nnx kernel [in, out]
            table[f"{hf}.{src}.weight"] = (("layers", i, dst, "kernel"), True)
            table[f"{hf}.{src}.bias"] = (("layers", i, dst, "bias"), False)
        for src, dst in norms.items():
            table[f"{hf}.{src}.weight"] = (("layers", i, dst, "scale"), False)
            table[f"{hf}.{src}.bias"] = (("layers", i, dst, "bias"), False)
    return table


def load_bert(path: str | Path, *, dtype=jnp.float32) -> BertEncoder:
    """Return the :class:`BertEncoder` of a Hugging Face folder (``config.json`` + weights).

    Reads ``model.safetensors`` with ``safetensors.numpy``. Tensor names may carry a ``bert.``
    prefix (``BertFor*`` checkpoints) or none (``BertModel``); every encoder tensor must be
    present with its shape. The pooler, any ``cls.`` head and the ``position_ids`` buffer are
    ignored (:data:`IGNORED_KEY`); any other extra tensor is an error, so a mapping mistake
    cannot pass silently.

    Args:
      path: the model folder, e.g. :func:`sims.data.real_embeddings.minilm_dir`.
      dtype: parameter dtype (weights are cast to it).

    Raises:
      ValueError: unsupported config (see :meth:`BertConfig.from_dict`), missing, unexpected or
        mis-shaped tensors (named).
    """
    from safetensors.numpy import load_file

    folder = Path(path)
    cfg = BertConfig.from_file(folder)
    tensors = {k.removeprefix("bert."): v for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
    table = _checkpoint_keys(cfg)
    missing = sorted(set(table) - set(tensors))
    unexpected = sorted(k for k in set(tensors) - set(table) if not IGNORED_KEY.match(k))
    if missing or unexpected:
        raise ValueError(
            f"{folder / WEIGHTS_FILE} must hold exactly the BertModel encoder tensors, got "
            f"missing {missing[:8]} ({len(missing)}) and unexpected {unexpected[:8]} "
            f"({len(unexpected)})"
        )
    abstract = nnx.eval_shape(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, state = nnx.split(abstract)
    pure = state.to_pure_dict()
    for name, (where, transpose) in table.items():
        node = pure
        for part in where[:-1]:
            node = node[part]
        array = tensors[name].T if transpose else tensors[name]
        if array.shape != node[where[-1]].shape:
            raise ValueError(
                f"tensor {name} must have shape {node[where[-1]].shape} for this config, got "
                f"{array.shape}"
            )
        node[where[-1]] = jnp.asarray(array, dtype)
    state.replace_by_pure_dict(pure)
    return nnx.merge(graphdef, state)


class MaskedPrompts(NamedTuple):
    """Right-padded prompts, each ending ``[MASK] [SEP]``.

    Attributes:
      tokens: ``[B, T]`` int32 ids ``[CLS] prompt-wordpieces [MASK] [SEP] [PAD]...``.
      attention_mask: ``[B, T]`` int32, 1 on real tokens (through ``[SEP]``), 0 on padding.
      mask_position: ``[B]`` int32 index of ``[MASK]`` (the real length minus 2).
    """

    tokens: np.ndarray
    attention_mask: np.ndarray
    mask_position: np.ndarray


def persona_question(statement: str) -> str:
    r"""Return the Persona prompt for ``statement`` (:data:`PERSONA_QUESTION`).

    Reading: the statement is quoted on its own line, as in Perez et al. 2022's persona data.

    Example:
      >>> print(persona_question("I like tea"))
      Is the following statement something you would say?
      "I like tea"
    """
    return PERSONA_QUESTION.format(statement=statement)


def load_bert_tokenizer(path: str | Path):
    """Return the folder's ``tokenizers.Tokenizer`` with padding and truncation switched off.

    The shipped ``tokenizer.json`` pads and truncates to 128 tokens; :func:`encode_masked_prompts`
    pads itself and refuses over-long prompts instead of cutting the ``[MASK]`` off. Reading is
    :func:`sims.checkpoints.tokenization.load_tokenizer`'s.
    """
    from sims.checkpoints.tokenization import load_tokenizer

    tokenizer = load_tokenizer(Path(path) / TOKENIZER_FILE)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def encode_masked_prompts(
    tokenizer, prompts: Sequence[str], *, length: int | None = None
) -> MaskedPrompts:
    """Return the prompts tokenized as ``[CLS] prompt [MASK] [SEP]``, right-padded with ``[PAD]``.

    Each prompt goes through the tokenizer's own pipeline (normalizer, WordPiece, template
    ``[CLS] A [SEP]``); ``[MASK]`` is then inserted immediately before that final ``[SEP]``, so
    the masked position reads as the word following the prompt.

    Args:
      tokenizer: from :func:`load_bert_tokenizer` (needs the tokens ``[CLS] [SEP] [MASK] [PAD]``).
      prompts: ``B`` strings; they must not contain special tokens themselves.
      length: padded length ``T`` (default: the longest encoded prompt).

    Raises:
      ValueError: no prompts, a prompt containing a special token, or one longer than ``length``.
    """
    if len(prompts) == 0:
        raise ValueError("prompts must be non-empty, got 0 prompts")
    if length is not None:
        check_positive_int("length", length)
    ids = {t: tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[MASK]", "[PAD]")}
    rows = []
    for i, enc in enumerate(tokenizer.encode_batch(list(prompts))):
        row = list(enc.ids)
        if row[0] != ids["[CLS]"] or row[-1] != ids["[SEP]"] or set(row[1:-1]) & set(ids.values()):
            raise ValueError(
                f"prompts must encode to [CLS] text [SEP] with no special token inside, got "
                f"prompt {i} {prompts[i]!r} -> {enc.tokens}"
            )
        rows.append([*row[:-1], ids["[MASK]"], row[-1]])
    longest = max(len(r) for r in rows)
    T = longest if length is None else length
    if longest > T:
        raise ValueError(f"length must be >= the longest prompt ({longest} tokens), got {T}")
    tokens = np.full((len(rows), T), ids["[PAD]"], np.int32)
    attention_mask = np.zeros((len(rows), T), np.int32)
    for b, row in enumerate(rows):
        tokens[b, : len(row)] = row
        attention_mask[b, : len(row)] = 1
    mask_position = np.array([len(r) - 2 for r in rows], np.int32)
    return MaskedPrompts(tokens, attention_mask, mask_position)


def _check_masked_fields(model: BertEncoder, tokens, attention_mask, mask_position, **ids) -> None:
    """Shared validation of masked-prompt data with leading axes ``[..., N]`` (stacked runs ok)."""
    shape = np.shape(tokens)
    if len(shape) < 2:
        raise ValueError(f"tokens must have shape [..., N, T], got shape {shape}")
    if np.shape(attention_mask) != shape:
        raise ValueError(
            f"attention_mask must have the shape of tokens {shape}, got {np.shape(attention_mask)}"
        )
    for name, value in {"mask_position": mask_position, **ids}.items():
        if np.shape(value) != shape[:-1]:
            raise ValueError(f"{name} must have shape [..., N]={shape[:-1]}, got {np.shape(value)}")
    check_token_ids("tokens", tokens, model.vocab_size)
    for name, value in ids.items():
        check_token_ids(name, value, model.vocab_size)
    check_token_ids("mask_position", mask_position, shape[-1])
    if is_concrete((attention_mask, mask_position)):
        am, pos = np.asarray(attention_mask), np.asarray(mask_position)
        at_mask = np.take_along_axis(am, pos[..., None], axis=-1)[..., 0]
        if np.any(at_mask != 1):
            raise ValueError(
                "attention_mask must be 1 at mask_position (the [MASK] is a real token), got 0 at "
                f"{np.argwhere(at_mask != 1)[0].tolist()}"
            )


class MaskedLMPairs(NamedTuple):
    r"""Single-token preference pairs answered at a ``[MASK]`` (the pairs type of this family).

    Pair ``i`` prefers token ``chosen[i]`` over ``rejected[i]`` as the ``[MASK]`` of prompt ``i``,
    scored by the tied readout :math:`\ln\pi(\cdot|x) =` :meth:`BertEncoder.mask_logprobs`.
    :func:`sims.flows.core.preference_flow` trains every parameter of a :class:`BertEncoder` on it;
    stack runs on a leading axis ``R`` (every field) for ``in_axes=(None, 0)``.
    Build with :func:`make_masked_lm_pairs` (reference log-probs from the model at hand).

    Attributes:
      tokens: ``[N, T]`` int ids ``[CLS] prompt [MASK] [SEP] [PAD]...``
        (:func:`encode_masked_prompts`).
      attention_mask: ``[N, T]``, 1 on real tokens.
      mask_position: ``[N]`` index of each ``[MASK]``.
      chosen: ``[N]`` preferred token ids :math:`y^+`.
      rejected: ``[N]`` dispreferred token ids :math:`y^-` (``!= chosen``).
      ref_logprob_chosen: ``[N]`` :math:`\ln\pi_{ref}(y^+|x)`.
      ref_logprob_rejected: ``[N]`` :math:`\ln\pi_{ref}(y^-|x)`.
      weight: ``[N]`` sample weights, or ``None`` (all 1).
      weight: ``[N]`` sample weights, or ``None`` (all 1).
    """

    tokens: jax.Array
    attention_mask: jax.Array
    mask_position: jax.Array
    chosen: jax.Array
    rejected: jax.Array
    ref_logprob_chosen: jax.Array
    ref_logprob_rejected: jax.Array
    weight: jax.Array | None = None

    def logprobs(self, model: BertEncoder) -> tuple[jax.Array, jax.Array]:
        """Return ``(logprob_chosen, logprob_rejected)``, each ``[N]``."""
        logprobs = self.record(model)  # [N, V]
        rows = jnp.arange(logprobs.shape[0])
        return logprobs[rows, self.chosen], logprobs[rows, self.rejected]

    def record(self, model: BertEncoder) -> jax.Array:
        """Return the default flow observable: every token's log-prob at the mask, ``[N, V]``."""
        return model.mask_logprobs(self.tokens, self.mask_position, self.attention_mask)

    def validate(self, model: BertEncoder) -> None:
        """Raise ``ValueError`` for inconsistent shapes, ids outside ``model``'s vocabulary, a
        mask position on padding, or ``chosen == rejected`` (leading run axes are allowed)."""
        _check_masked_fields(
            model,
            self.tokens,
            self.attention_mask,
            self.mask_position,
            chosen=self.chosen,
            rejected=self.rejected,
        )
        check_distinct("chosen", self.chosen, "rejected", self.rejected)


def make_masked_lm_pairs(
    model: BertEncoder, prompts: MaskedPrompts, chosen: ArrayLike, rejected: ArrayLike
) -> MaskedLMPairs:
    """Return :class:`MaskedLMPairs`, reference log-probs from ``model`` now.

    Args:
      model: the reference model (e.g. after SFT).
      prompts: ``N`` prompts from :func:`encode_masked_prompts`.
      chosen, rejected: ``[N]`` token ids (``chosen[i] != rejected[i]``).

    Raises:
      ValueError: as :meth:`MaskedLMPairs.validate`.
    """
    pairs = MaskedLMPairs(
        *(jnp.asarray(a) for a in prompts),
        jnp.asarray(chosen),
        jnp.asarray(rejected),
        jnp.zeros(np.shape(chosen)),
        jnp.zeros(np.shape(chosen)),
    )
    pairs.validate(model)
    lp_c, lp_r = _masked_pair_logprobs(model, pairs)
    return pairs._replace(ref_logprob_chosen=lp_c, ref_logprob_rejected=lp_r)


@jax.jit
def _masked_pair_logprobs(model: BertEncoder, pairs: MaskedLMPairs) -> tuple[jax.Array, jax.Array]:
    # one compiled call instead of op-by-op dispatch (each eager op compiles once: seconds on CPU)
    return pairs.logprobs(model)


class MaskedLMLabels(NamedTuple):
    """Supervised single-token answers at a ``[MASK]`` (SFT data for :func:`masked_lm_nll`).

    Attributes:
      tokens, attention_mask, mask_position: ``[N, T]``, ``[N, T]``, ``[N]`` as
        :class:`MaskedPrompts`.
      label: ``[N]`` target token ids.
    """

    tokens: jax.Array
    attention_mask: jax.Array
    mask_position: jax.Array
    label: jax.Array

    def validate(self, model: BertEncoder) -> None:
        """Raise ``ValueError`` for inconsistent shapes, ids out of range or a mask on padding."""
        _check_masked_fields(
            model, self.tokens, self.attention_mask, self.mask_position, label=self.label
        )


def masked_lm_label_logprobs(model: BertEncoder, data: MaskedLMLabels) -> jax.Array:
    r"""Return :math:`\ln\pi(y_i|x_i)` ``[N]``, the label's log-prob at each prompt's mask."""
    logprobs = model.mask_logprobs(data.tokens, data.mask_position, data.attention_mask)
    return logprobs[jnp.arange(logprobs.shape[0]), data.label]


def masked_lm_nll(model: BertEncoder, data: MaskedLMLabels) -> jax.Array:
    r"""Return the SFT loss :math:`-\frac1N\sum_i\ln\pi(y_i|x_i)` at the ``[MASK]`` positions.

    A module-level function (hashable): pass it to :func:`sims.flows.core.integrate_model` as the
    loss,
    so repeated SFT runs compile once.

    Source: the SFT phase before preference learning (Razin et al. 2024, §2.1, App. H.1), with
    :func:`theory.losses.nll_loss`.

    Example:
      >>> class Uniform:  # any model with mask_logprobs; here pi = 1/V with V = 7
      ...     def mask_logprobs(self, tokens, mask_position, attention_mask):
      ...         return jnp.full((1, 7), -jnp.log(7.0))
      >>> data = MaskedLMLabels(jnp.zeros((1, 3), int), jnp.ones((1, 3), int), jnp.array([1]),
      ...                       jnp.array([5]))
      >>> round(float(masked_lm_nll(Uniform(), data)), 5)  # -ln(1/7)
      1.94591
    """
    return jnp.mean(nll_loss(masked_lm_label_logprobs(model, data)))
