r"""Hugging Face checkpoints as Flax NNX models: load, shard, save; memory of a training step.

:func:`load_causal_lm` reads a Hugging Face folder (``config.json`` and ``model.safetensors``, or
shards ``model-0000k-of-0000n.safetensors`` listed in ``model.safetensors.index.json``) into a
:class:`sims.decoder.DecoderLM`: Llama (GQA, tied or untied embeddings, Llama-3.1 ``llama3`` and
``linear`` rope scaling, rope settings under the older top-level ``rope_theta``/``rope_scaling``
keys or the newer ``rope_parameters``), Qwen2 (q/k/v bias, optional sliding window), Gemma (v1)
and OLMo (v1, ``-hf`` format). Any other ``model_type`` is refused by name. Weights are read with
``safetensors`` (NumPy backend; bfloat16 tensors, which NumPy cannot name, are read from the file's
byte offsets) one tensor at a time, cast to ``dtype`` and, with ``mesh=``, placed on their shards
directly, so the full model never has to sit unsharded on one device or in host memory.

The model is the transformer family's model: ``model(tokens [B, T])`` returns logits
``[B, T, V]``, ``model.hidden_states(tokens)`` the final-norm hidden states,
``model.unembedding_matrix()`` ``W`` and ``model.vocab_size`` ``V``; so
:class:`sims.transformer.TransformerPairs`, :func:`sims.transformer.response_logprobs_from_tokens`,
:func:`sims.scores.transformer_pair_scores` and :func:`sims.flow.preference_flow` work on it.

Memory for full fine-tuning of Llama-3-8B (:math:`P = 8.03\times10^9` parameters; ``d = 4096``,
32 layers, MLP 14336, 8 KV heads, ``V = 128256``, untied) with RMSprop on one 141 GB H200
(GB = 1e9 bytes). Parameters, gradients and RMSprop's square average each take ``P x b`` bytes
(16.1 GB in bfloat16, 32.1 GB in float32); DPO needs no reference model in memory (reference
log-probs are computed once and stored in the pairs). Activations for one pair of two ``T``-token
sequences: per token and layer about ``(6 d + 2 d_kv + 4 d_mlp) x b`` bytes of saved tensors
(~0.17 MB in bfloat16) plus attention probabilities ``H x T`` per token (quadratic in ``T``); the
float32 logits and their log-softmax add ``2 T x V x 4`` bytes per copy.

:func:`step_memory` compiles one DPO step (parameters and optimiser state donated) on abstract
shapes and reads XLA's memory analysis; measured on the CPU backend for the full 8B
configuration (the compiled step applies each gradient as it is produced, so the 32 GB of float32
gradients never coexist):

=================================  ===========================  =============  ===========
dtype, pair of two ``T`` tokens    parameters + square average  temporaries    peak
=================================  ===========================  =============  ===========
float32, ``T = 512``               64.2 GB                      27.5 GB        **91.8 GB**
float32, ``T = 1024``              64.2 GB                      61.5 GB        **125.7 GB**
float32, ``T = 2048``              64.2 GB                      168.9 GB       233 GB
bfloat16, ``T = 512``              32.1 GB                      ~14 GB (est.)  **~46 GB**
=================================  ===========================  =============  ===========

So **full float32 fine-tuning of an 8B model fits on one 141 GB H200 for the paper's pairs of up
to 512 (and 1024) tokens**, and bfloat16 leaves ~90 GB for longer sequences or micro-batches (the
paper's batch of 32 pairs is gradient accumulation, App. H). The bfloat16 temporaries are an
estimate (half of float32): the CPU backend computes bfloat16 products in float32 and reported
54 GB. ``remat=True`` (recompute each block in the backward pass) should cut activations to one
block's input per layer on an accelerator; the CPU buffer assignment showed no saving, so it is
not measured here. Pure bfloat16 RMSprop keeps the square average in bfloat16 (8-bit mantissa),
a difference from PyTorch mixed precision. On several devices, :func:`shard_model` (or
``mesh=``) divides parameters, gradients and optimiser state by the device count.

:func:`save_causal_lm` writes a :class:`~sims.decoder.DecoderLM` in Hugging Face format
(``config.json`` + ``model.safetensors``; with a tokenizer, ``tokenizer.json`` and
``tokenizer_config.json``). Tokenizers and chat templates: :mod:`sims.tokenization`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from sims.decoder import ACTIVATIONS, MODEL_TYPES, ROPE_TYPES, DecoderConfig, DecoderLM

#: ``architectures`` entry written for each ``model_type``.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "olmo": "OlmoForCausalLM",
}
#: ``tie_word_embeddings`` default of each family's HF config class (used when the key is absent).
_TIED_DEFAULT = {"llama": False, "qwen2": False, "gemma": True, "olmo": False}
#: Checkpoint tensors that carry no parameter (old checkpoints saved rotary buffers).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def decoder_config_from_hf(cfg: dict[str, Any]) -> DecoderConfig:
    """Return the :class:`~sims.decoder.DecoderConfig` of a Hugging Face ``config.json`` dict.

    Rope settings are read from ``rope_parameters`` (transformers >= 5) or from the older
    top-level ``rope_theta`` and ``rope_scaling`` (its ``rope_type`` or legacy ``type`` key).

    Raises:
      ValueError: a ``model_type`` other than :data:`sims.decoder.MODEL_TYPES`, a rope type other
        than :data:`sims.decoder.ROPE_TYPES`, partial rotary embeddings, per-layer rope settings,
        an unknown activation, or a missing required key.

    Example:
      >>> c = decoder_config_from_hf({"model_type": "llama", "vocab_size": 11, "hidden_size": 8,
      ...     "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
      ...     "rope_scaling": {"type": "linear", "factor": 2.0}})
      >>> c.num_kv_heads, c.head_dim, c.rope_type, c.rope_factor, c.tied
      (2, 4, 'linear', 2.0, False)
    """
    mt = cfg.get("model_type")
    if mt not in MODEL_TYPES:
        raise ValueError(
            f"model_type must be one of {MODEL_TYPES} (the architectures sims.checkpoints "
            f"implements), got model_type={mt!r}"
        )
    try:
        d, H = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        sizes = dict(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=d,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=H,
            num_kv_heads=int(cfg.get("num_key_value_heads") or H),
            head_dim=int(cfg.get("head_dim") or d // H),
        )
    except KeyError as e:
        raise ValueError(f"config.json of a {mt} model must have key {e.args[0]!r}") from None
    act = cfg.get("hidden_activation") or cfg.get("hidden_act", "silu")
    if mt == "gemma" and act == "gelu":  # HF GemmaConfig: legacy "gelu" means the tanh form
        act = "gelu_pytorch_tanh"
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in rope.values()):
        raise ValueError(f"per-layer rope parameters are not supported, got {sorted(rope)}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got rope_type={rope_type!r}")
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor must be 1.0, got {partial}")
    max_len = int(cfg.get("max_position_embeddings", 2048))
    bias = bool(cfg.get("attention_bias", False))
    windows: tuple[int | None, ...] = ()
    if mt == "qwen2" and cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        kinds = cfg.get("layer_types") or [
            "sliding_attention" if i >= cfg.get("max_window_layers", 0) else "full_attention"
            for i in range(sizes["num_layers"])
        ]
        windows = tuple(
            int(cfg["sliding_window"]) if k == "sliding_attention" else None for k in kinds
        )
    return DecoderConfig(
        model_type=mt,
        **sizes,
        norm={"gemma": "rms_plus_one", "olmo": "layernorm"}.get(mt, "rms"),
        norm_eps=1e-5 if mt == "olmo" else float(cfg.get("rms_norm_eps", 1e-6)),
        activation=ACTIVATIONS[act],
        qkv_bias=True if mt == "qwen2" else bias,
        o_bias=False if mt == "qwen2" else bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)) if mt == "llama" else False,
        tied=bool(cfg.get("tie_word_embeddings", _TIED_DEFAULT[mt])),
        embed_scale=math.sqrt(d) if mt == "gemma" else 1.0,
        clip_qkv=cfg.get("clip_qkv") if mt == "olmo" else None,
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rope_type=rope_type,
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_len=int(rope.get("original_max_position_embeddings", max_len)),
        sliding_windows=windows,
        max_position_embeddings=max_len,
        initializer_range=float(cfg.get("initializer_range", 0.02)),
    )


def hf_config(config: DecoderConfig, *, dtype: str = "float32", **token_ids: int) -> dict:
    """Return the Hugging Face ``config.json`` dict of ``config`` (inverse of
    :func:`decoder_config_from_hf`; rope settings under ``rope_parameters``).

    ``token_ids`` (``bos_token_id``, ``eos_token_id``, ``pad_token_id``) are written as given.

    Example:
      >>> c = hf_config(DecoderConfig.llama(11, hidden_size=8, num_heads=2))
      >>> c["architectures"], c["num_key_value_heads"], c["rope_parameters"]["rope_type"]
      (['LlamaForCausalLM'], 1, 'default')
    """
    c = config
    rope: dict[str, Any] = {"rope_type": c.rope_type, "rope_theta": c.rope_theta}
    if c.rope_type != "default":
        rope["factor"] = c.rope_factor
    if c.rope_type == "llama3":
        rope |= {
            "low_freq_factor": c.rope_low_freq_factor,
            "high_freq_factor": c.rope_high_freq_factor,
            "original_max_position_embeddings": c.rope_original_max_len,
        }
    act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[c.activation]
    out = {
        "architectures": [ARCHITECTURES[c.model_type]],
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": act,
        "max_position_embeddings": c.max_position_embeddings,
        "initializer_range": c.initializer_range,
        "tie_word_embeddings": c.tied,
        "attention_bias": c.qkv_bias if c.model_type != "qwen2" else False,
        "rope_parameters": rope,
        "dtype": dtype,
        **token_ids,
    }
    if c.model_type == "olmo":
        out["clip_qkv"] = c.clip_qkv
    else:
        out["rms_norm_eps"] = c.norm_eps
    if c.model_type == "llama":
        out["mlp_bias"] = c.mlp_bias
    if c.model_type == "qwen2" and c.sliding_windows:
        raise ValueError("writing Qwen2 sliding-window configs is not supported")
    return out


class _Tensors:
    """The tensors of a checkpoint folder, by name, read one at a time (NumPy)."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / f for name, f in weight_map.items()}
        elif single.exists():
            with safe_open(single, framework="numpy") as f:
                self.files = dict.fromkeys(f.keys(), single)
        else:
            raise FileNotFoundError(
                f"{folder} must hold model.safetensors or model.safetensors.index.json "
                "(PyTorch .bin checkpoints are not read: re-save with save_pretrained)"
            )
        self._headers: dict[Path, tuple[int, dict]] = {}

    def _header(self, file: Path) -> tuple[int, dict]:
        if file not in self._headers:
            with open(file, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                self._headers[file] = (8 + n, json.loads(fh.read(n)))
        return self._headers[file]

    def get(self, name: str) -> np.ndarray:
        file = self.files[name]
        with safe_open(file, framework="numpy") as f:
            kind = f.get_slice(name).get_dtype()
            if kind != "BF16":
                return f.get_tensor(name)
        # NumPy has no bfloat16: read the raw 16-bit words from the header's byte offsets
        start, header = self._header(file)
        entry = header[name]
        lo, hi = entry["data_offsets"]
        words = np.fromfile(file, dtype="<u2", count=(hi - lo) // 2, offset=start + lo)
        return words.view(jnp.bfloat16).reshape(entry["shape"])


def _hf_name(path: tuple) -> str:
    """Return the HF name of a state path (``layers.0.mlp.up_proj.weight``)."""
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return ".".join(k for k in keys if k != "value")


def _auto_axes(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """``mesh`` with Auto axis types: the compiler (GSPMD) propagates the parameters' layout
    through the model's gathers and einsums, which carry no explicit output shardings."""
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def param_sharding(shape: Sequence[int], mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """Return the sharding :func:`shard_model` gives a parameter of ``shape`` on ``mesh``.

    The largest axis divisible by the number of devices is split over all mesh axes
    (ZeRO-3/FSDP-style parameter sharding); other parameters are replicated. ``jax.jit``
    propagates the layout to gradients and optimiser state. The mesh's axes are used as Auto
    axes (a ``jax.make_mesh`` default of Explicit axes would need sharding annotations on every
    gather).

    Example:
      >>> mesh = jax.make_mesh((1,), ("fsdp",))
      >>> param_sharding((6, 4), mesh).spec
      P('fsdp', None)
    """
    mesh = _auto_axes(mesh)
    n = mesh.devices.size
    spec: list[Any] = [None] * len(shape)
    candidates = [i for i in range(len(shape)) if shape[i] % n == 0 and shape[i] >= n]
    if len(shape) >= 2 and candidates:
        names = tuple(mesh.axis_names)
        spec[max(candidates, key=lambda i: shape[i])] = names[0] if len(names) == 1 else names
    return jax.sharding.NamedSharding(mesh, jax.P(*spec))


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
    """Return ``model`` with every array placed by :func:`param_sharding` on ``mesh``.

    The input module is not modified; results of jitted functions of the returned model equal
    the unsharded ones up to float reduction order.

    Example:
      >>> m = DecoderLM(DecoderConfig.llama(8, hidden_size=8, num_heads=2), rngs=nnx.Rngs(0))
      >>> m = shard_model(m, jax.make_mesh((1,), ("fsdp",)))
      >>> m.embed_tokens.weight[...].sharding.spec
      P('fsdp', None)
    """
    graphdef, state = nnx.split(model)
    state = jax.tree_util.tree_map(
        lambda a: jax.device_put(a, param_sharding(a.shape, mesh)), state
    )
    return nnx.merge(graphdef, state)


def load_causal_lm(
    path: str | Path,
    *,
    dtype=jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    remat: bool = False,
) -> DecoderLM:
    """Return the Flax NNX causal LM stored in a Hugging Face folder.

    Args:
      path: folder with ``config.json`` and ``model.safetensors`` (or sharded files with
        ``model.safetensors.index.json``).
      dtype: parameter dtype (``jnp.float32`` or ``jnp.bfloat16``); tensors are cast on load.
      mesh: place each parameter on its shards (:func:`param_sharding`) as it is read.
      remat: recompute blocks in the backward pass (see :class:`~sims.decoder.DecoderLM`).

    Returns:
      :class:`~sims.decoder.DecoderLM`: ``model(tokens [B, T])`` gives logits ``[B, T, V]``.

    Raises:
      FileNotFoundError: no ``config.json`` or no safetensors weights.
      ValueError: unsupported architecture (names the ``model_type``), a missing or unexpected
        tensor, or a tensor of the wrong shape.
    """
    folder = Path(path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} must hold a Hugging Face config.json")
    config = decoder_config_from_hf(json.loads((folder / "config.json").read_text()))
    abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0), dtype=dtype, remat=remat))
    graphdef, shapes = nnx.split(abstract)
    tensors = _Tensors(folder)
    prefix = "model." if "model.embed_tokens.weight" in tensors.files else ""
    used = set()

    def read(path, leaf):
        name = _hf_name(path)
        key = name if name.startswith("lm_head.") else prefix + name
        if key not in tensors.files:
            raise ValueError(f"{folder}: checkpoint lacks tensor {key!r} of a {config.model_type}")
        arr = tensors.get(key)
        if tuple(arr.shape) != tuple(leaf.shape):
            raise ValueError(f"{key} must have shape {tuple(leaf.shape)}, got {arr.shape}")
        used.add(key)
        arr = np.asarray(arr).astype(leaf.dtype)
        return jax.device_put(arr, param_sharding(arr.shape, mesh)) if mesh else jnp.asarray(arr)

    state = jax.tree_util.tree_map_with_path(read, shapes)
    extra = [
        k
        for k in tensors.files
        if k not in used
        and not k.endswith(_IGNORED_SUFFIXES)
        and not (config.tied and k == "lm_head.weight")
    ]
    if extra:
        raise ValueError(
            f"{folder}: unexpected tensors for a {config.model_type} config: {sorted(extra)[:5]}"
        )
    return nnx.merge(graphdef, state)


def save_causal_lm(
    model: DecoderLM,
    path: str | Path,
    *,
    tokenizer=None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face checkpoint folder; return the folder.

    Writes ``config.json`` (the model's architecture, e.g. ``LlamaForCausalLM``) and
    ``model.safetensors`` (HF names; ``lm_head.weight`` only when untied). With ``tokenizer`` (a
    ``tokenizers.Tokenizer``) also ``tokenizer.json`` and ``tokenizer_config.json`` naming the
    special tokens; their ids go into ``config.json``. ``transformers`` loads the folder with
    ``AutoModelForCausalLM`` / ``AutoTokenizer`` (tested).

    Raises:
      TypeError: ``model`` is not a :class:`~sims.decoder.DecoderLM` (the GPT-2-style
        :class:`sims.transformer.CausalTransformer` has no Llama-format equivalent).
      ValueError: a special token missing from ``tokenizer``'s vocabulary.
    """
    if not isinstance(model, DecoderLM):
        raise TypeError(
            f"model must be a sims.decoder.DecoderLM to be saved in Hugging Face format, got "
            f"{type(model).__name__}"
        )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _, state = nnx.split(model)
    tensors = {}
    for p, leaf in jax.tree_util.tree_leaves_with_path(state):
        name = _hf_name(p)
        tensors[name if name.startswith("lm_head.") else "model." + name] = np.asarray(leaf)
    dtype = str(next(iter(tensors.values())).dtype)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    ids = {}
    if tokenizer is not None:
        tokens = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        for key, tok in tokens.items():
            if tok is None:
                continue
            idx = tokenizer.token_to_id(tok)
            if idx is None:
                raise ValueError(f"{key} must be in the tokenizer's vocabulary, got {tok!r}")
            ids[key + "_id"] = idx
        tokenizer.save(str(folder / "tokenizer.json"))
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        tok_config |= {k: v for k, v in tokens.items() if v is not None}
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    config = hf_config(model.config, dtype=dtype, **ids)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def step_memory(
    config: DecoderConfig,
    *,
    seq_len: int,
    dtype=jnp.float32,
    remat: bool = False,
    optimizer: str = "rmsprop_torch",
    beta: float = 0.1,
) -> dict[str, float]:
    """Return the compiled memory (bytes) of one full fine-tuning DPO step, allocating nothing.

    Compiles ``step(params, opt_state, pair) -> (params, opt_state, loss)`` for one preference
    pair of two ``seq_len``-token sequences on abstract shapes (``jax.eval_shape``; parameters and
    optimiser state donated, as a training loop does) and reads XLA's memory analysis of the
    default backend.

    Returns:
      ``{"parameters", "arguments", "temporaries", "peak"}``: parameter bytes, argument bytes
      (parameters + optimiser state + the pair's token arrays), temporaries (gradients as they
      are produced, activations, logits) and their sum. On a CPU backend the buffer assignment
      showed no saving from ``remat`` (nor from ``jax.checkpoint`` in a plain-JAX check), so
      remat numbers need the accelerator itself.

    Example:
      >>> mem = step_memory(DecoderConfig.llama(11, hidden_size=8, num_heads=2), seq_len=4)
      >>> # RMSprop: one square average per weight; the pair: 2 x (4 + 1 + 1) int32 + 3 float32
      >>> mem["arguments"] - 2 * mem["parameters"]
      60.0
    """
    from sims.flow import PairObjective, make_optimizer
    from sims.transformer import TokenBatch, TransformerPairs
    from theory.losses import make_loss

    abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0), dtype=dtype, remat=remat))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    ids = jax.ShapeDtypeStruct((1,), jnp.int32)
    batch = TokenBatch(jax.ShapeDtypeStruct((1, seq_len), jnp.int32), ids, ids)
    ref = jax.ShapeDtypeStruct((1,), jnp.float32)
    pair = TransformerPairs(batch, batch, ref, ref, ref)
    tx = make_optimizer(optimizer, dt=1e-7)
    objective = PairObjective(make_loss("dpo", beta=beta))

    def step(params, opt_state, pair):
        loss, grads = jax.value_and_grad(lambda p: objective(nnx.merge(graphdef, p, rest), pair))(
            params
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = jax.eval_shape(tx.init, params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, pair).compile()
    mem = compiled.memory_analysis()
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    return {
        "parameters": float(nbytes),
        "arguments": float(mem.argument_size_in_bytes),
        "temporaries": float(mem.temp_size_in_bytes),
        "peak": float(mem.argument_size_in_bytes + mem.temp_size_in_bytes),
    }
