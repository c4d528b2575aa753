r"""Hugging Face checkpoints as Flax NNX models: load, shard, save; memory of a training step.

:func:`load_causal_lm` reads a Hugging Face folder (``config.json`` and ``model.safetensors``, or
shards ``model-0000k-of-0000n.safetensors`` listed in ``model.safetensors.index.json``), a
llama.cpp ``.gguf`` file (:mod:`sims.checkpoints.gguf`), or a packaged model by name (``"smollm2"``,
:mod:`sims.checkpoints.packaged`) into a :class:`sims.models.decoder.DecoderLM`: Llama (GQA, tied
or untied
embeddings, Llama-3.1 ``llama3`` and ``linear`` rope scaling, rope settings under the older
top-level ``rope_theta``/``rope_scaling`` keys or the newer ``rope_parameters``), Qwen2 (q/k/v
bias, optional sliding window), Gemma (v1) and OLMo (v1, ``-hf`` format). What differs between
the families lives in one record each (:data:`sims.checkpoints.families.FAMILIES`); any other
``model_type``
is refused by name. Weights are read with ``safetensors`` (NumPy backend; bfloat16 tensors, which
NumPy cannot name, are read from the file's byte offsets) one tensor at a time, checked finite,
stacked over layers, cast to ``dtype`` and, with ``mesh=``, placed on their shards directly, so
the full model never has to sit unsharded on one device or in host memory.

Bad files are refused before any weight is used, with errors (:class:`sims.errors.InputError`)
that name the file and the field: unreadable or truncated JSON, a config that is not an object or
has a missing, null or invalid size, ``rms_norm_eps <= 0`` or ``rope_theta <= 0``, an index
without ``weight_map``, a dangling symlink, a truncated safetensors file, a missing or misshapen
tensor, a non-finite weight, and ``tie_word_embeddings: true`` beside an ``lm_head.weight`` that
differs from the embedding.

The model is the transformer family's model: ``model(tokens [B, T])`` returns logits
``[B, T, V]``, ``model.hidden_states(tokens)`` the final-norm hidden states,
``model.unembedding_matrix()`` ``W`` and ``model.vocab_size`` ``V``; so
:class:`sims.models.transformer.TransformerPairs`,
:func:`sims.models.transformer.response_logprobs_from_tokens`,
:func:`sims.analysis.scores.transformer_pair_scores` and :func:`sims.flows.core.preference_flow`
work on it.

Memory of a training step is the step's own compiled program: build the flow on an abstract
model (``nnx.eval_shape``) and read ``flow.memory()`` (:class:`sims.flows.core.Flow`); the
numbers for Llama-3-8B are in docs/performance.md.

:func:`save_causal_lm` writes a :class:`~sims.models.decoder.DecoderLM` in Hugging Face format
(``config.json`` + ``model.safetensors``; with a tokenizer, ``tokenizer.json`` and
``tokenizer_config.json``). Tokenizers and chat templates: :mod:`sims.checkpoints.tokenization`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from sims.checkpoints.families import (
    FAMILIES,
    HF_ACTIVATIONS,
    HF_SIZE_KEYS,
    HF_TENSOR_NAMES,
    family_of,
    layer_names,
    read_keys,
)
from sims.errors import InputError
from sims.models.decoder import ROPE_TYPES, DecoderConfig, DecoderLM

#: Parameter dtypes a checkpoint can be loaded in, by name.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
#: Checkpoint tensors that carry no parameter (old checkpoints saved rotary buffers).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def check_dtype(dtype: Any) -> jnp.dtype:
    """Return ``dtype`` as a NumPy dtype if it is one of :data:`DTYPES` (by name or object).

    Raises:
      InputError: any other dtype (checked before any file is read).

    Example:
      >>> check_dtype("bfloat16")
      dtype(bfloat16)
    """
    try:
        dt = jnp.dtype(DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype)
    except TypeError:
        dt = None
    if dt not in {jnp.dtype(d) for d in DTYPES.values()}:
        raise InputError(f"dtype must be one of {sorted(DTYPES)}, got dtype={dtype!r}")
    return dt


def read_json(file: Path) -> Any:
    """Return the JSON value in ``file``; errors name the file (and the line of a syntax error).

    A UTF-8 byte-order mark is accepted.

    Raises:
      InputError: missing (or a dangling symlink), unreadable, not UTF-8, or not valid JSON.
    """
    file = Path(file)
    check_exists(file)
    try:
        text = file.read_bytes().decode("utf-8-sig")
        return json.loads(text)
    except UnicodeDecodeError as err:
        raise InputError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise InputError(
            f"{file}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}; "
            "truncated?)"
        ) from None
    except OSError as err:
        raise InputError(f"{file}: cannot be read ({err.strerror})") from None


def check_exists(path: Path, *, what: str = "") -> Path:
    """Return ``path`` if it exists (after following symlinks).

    Raises:
      InputError: it does not exist; for a symlink whose target is missing, says so (as in a
        Hugging Face cache whose blob was deleted).
    """
    path = Path(path)
    if path.exists():
        return path
    label = f"{what} " if what else ""
    if path.is_symlink():
        raise InputError(
            f"{path}: {label}is a symlink to {path.readlink()}, which does not exist "
            "(a partly deleted download cache?)"
        )
    raise InputError(f"{path}: {label}not found")


def _int_field(cfg: dict, key: str, where: str) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise InputError(f"{where}: {key} must be an integer >= 1, got {value!r}")
    if int(value) < 1:
        raise InputError(f"{where}: {key} must be an integer >= 1, got {value!r}")
    return int(value)


def _float_field(cfg: dict, key: str, where: str) -> float:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{where}: {key} must be a number, got {value!r}")
    return float(value)


def decoder_config_from_hf(cfg: Any, *, where: str = "config.json") -> DecoderConfig:
    """Return the :class:`~sims.models.decoder.DecoderConfig` of a Hugging Face ``config.json``
    dict.

    The family record (:data:`sims.checkpoints.families.FAMILIES`) says which keys to read. Rope
    settings are
    read from ``rope_parameters`` (transformers >= 5) or from the older top-level ``rope_theta``
    and ``rope_scaling`` (its ``rope_type`` or legacy ``type`` key).

    Raises:
      InputError: (names ``where`` and the key) not a JSON object, a ``model_type`` other than
        :data:`sims.checkpoints.families.FAMILIES`, a rope type other than
        :data:`sims.models.decoder.ROPE_TYPES`,
        partial rotary embeddings, per-layer rope settings, an unknown activation, a missing or
        invalid required key, or values :class:`~sims.models.decoder.DecoderConfig` refuses
        (``rms_norm_eps <= 0``, ``rope_theta <= 0``, ...).

    Example:
      >>> c = decoder_config_from_hf({"model_type": "llama", "vocab_size": 11, "hidden_size": 8,
      ...     "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
      ...     "rope_scaling": {"type": "linear", "factor": 2.0}})
      >>> c.num_kv_heads, c.head_dim, c.rope_type, c.rope_factor, c.tied
      (2, 4, 'linear', 2.0, False)
    """
    if not isinstance(cfg, dict):
        raise InputError(f"{where}: must hold a JSON object, got {type(cfg).__name__}")
    try:
        family = family_of(cfg.get("model_type"), where=where)
    except ValueError as err:
        raise InputError(str(err)) from None
    sizes: dict[str, int] = {}
    for field, (key, default) in HF_SIZE_KEYS.items():
        if cfg.get(key) is not None:
            sizes[field] = _int_field(cfg, key, where)
        elif default is None:
            have = "is null" if key in cfg else "is missing"
            raise InputError(f"{where}: {key} (required for a {family.model_type}) {have}")
        elif default == "num_heads":
            sizes[field] = sizes["num_heads"]
        elif default == "hidden_size // num_heads":
            sizes[field] = sizes["hidden_size"] // sizes["num_heads"]
        else:
            sizes[field] = default
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or None
    act = family.activation if act is None else family.activation_aliases.get(act, act)
    act = HF_ACTIVATIONS.get(act, act)
    if act not in set(HF_ACTIVATIONS.values()):
        raise InputError(
            f"{where}: hidden_act must be one of {sorted(HF_ACTIVATIONS)}, got {act!r}"
        )
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in rope.values()):
        raise InputError(
            f"{where}: per-layer rope parameters are not supported, got {sorted(rope)}"
        )
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise InputError(
            f"{where}: rope_type must be one of {ROPE_TYPES}, got rope_type={rope_type!r}"
        )
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise InputError(f"{where}: partial_rotary_factor must be 1.0, got {partial}")
    keyed = read_keys(family.hf_keys, cfg.get, lambda k: cfg.get(k) is not None)
    for field in ("norm_eps",):
        if keyed[field] is not None and not isinstance(keyed[field], int | float):
            raise InputError(f"{where}: {family.hf_keys[field][0]} must be a number")
    windows: tuple[int | None, ...] = ()
    if family.sliding_window and cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        kinds = cfg.get("layer_types") or [
            "sliding_attention" if i >= cfg.get("max_window_layers", 0) else "full_attention"
            for i in range(sizes["num_layers"])
        ]
        windows = tuple(
            int(cfg["sliding_window"]) if k == "sliding_attention" else None for k in kinds
        )
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    try:
        return DecoderConfig(
            model_type=family.model_type,
            **sizes,
            norm=family.norm,
            norm_eps=float(keyed["norm_eps"]),
            activation=act,
            qkv_bias=bool(keyed["qkv_bias"]),
            o_bias=bool(keyed["o_bias"]),
            mlp_bias=bool(keyed["mlp_bias"]),
            tied=bool(cfg.get("tie_word_embeddings", family.tied_default)),
            embed_scale=family.embed_scale(sizes["hidden_size"]),
            clip_qkv=keyed["clip_qkv"],
            rope_theta=float(rope_theta) if rope_theta is not None else float("nan"),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_len=int(
                rope.get("original_max_position_embeddings", sizes["max_position_embeddings"])
            ),
            sliding_windows=windows,
            initializer_range=float(cfg.get("initializer_range", 0.02)),
        )
    except (ValueError, TypeError) as err:
        raise InputError(f"{where}: {err}") from None


def hf_config(config: DecoderConfig, *, dtype: str = "float32", **token_ids: int) -> dict:
    """Return the Hugging Face ``config.json`` dict of ``config`` (inverse of
    :func:`decoder_config_from_hf`; rope settings under ``rope_parameters``).

    ``token_ids`` (``bos_token_id``, ``eos_token_id``, ``pad_token_id``) are written as given.

    Raises:
      ValueError: settings Hugging Face configs cannot express (Qwen2 sliding windows, explicit
        rope frequency factors).

    Example:
      >>> c = hf_config(DecoderConfig.llama(11, hidden_size=8, num_heads=2))
      >>> c["architectures"], c["num_key_value_heads"], c["rope_parameters"]["rope_type"]
      (['LlamaForCausalLM'], 1, 'default')
    """
    c = config
    family = FAMILIES[c.model_type]
    if c.sliding_windows:
        raise ValueError("writing sliding-window configs is not supported")
    if c.rope_freq_factors:
        raise ValueError(
            "rope_freq_factors (llama.cpp's rope_freqs.weight) have no config.json form"
        )
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
        "architectures": [family.hf_architecture],
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
        "rope_parameters": rope,
        "dtype": dtype,
        **token_ids,
    }
    values = {
        "norm_eps": c.norm_eps,
        "qkv_bias": c.qkv_bias,
        "o_bias": c.o_bias,
        "mlp_bias": c.mlp_bias,
        "clip_qkv": c.clip_qkv,
    }
    for field, (key, _) in family.hf_keys.items():
        if key is not None:
            out[key] = values[field]
    return out


class _Tensors:
    """The tensors of a Hugging Face checkpoint folder, by name, read one at a time (NumPy).

    Raises:
      InputError: no weights, an index without ``weight_map``, a missing shard or a dangling
        symlink, a file that is not a readable safetensors file (names the file).
    """

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.exists() or index.is_symlink():
            weight_map = read_json(index)
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise InputError(
                    f"{index}: must hold a non-empty weight_map object (tensor name -> shard)"
                )
            self.files = {name: folder / f for name, f in weight_map.items()}
            for file in sorted(set(self.files.values())):
                check_exists(file, what="(a shard listed in model.safetensors.index.json)")
            for file in sorted(set(self.files.values())):
                self._keys(file)  # opens each shard: a truncated one fails here, named
        elif single.exists() or single.is_symlink():
            check_exists(single)
            self.files = dict.fromkeys(self._keys(single), single)
        else:
            raise InputError(
                f"{folder}: must hold model.safetensors or model.safetensors.index.json "
                "(PyTorch .bin checkpoints are not read: re-save with save_pretrained)"
            )
        self._headers: dict[Path, tuple[int, dict]] = {}

    @staticmethod
    def _keys(file: Path) -> list[str]:
        try:
            with safe_open(file, framework="numpy") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as err:
            raise InputError(
                f"{file}: not a readable safetensors file (truncated or corrupt?): {err}"
            ) from None

    def _header(self, file: Path) -> tuple[int, dict]:
        if file not in self._headers:
            with open(file, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                self._headers[file] = (8 + n, json.loads(fh.read(n)))
        return self._headers[file]

    def get(self, name: str) -> np.ndarray:
        file = self.files[name]
        try:
            with safe_open(file, framework="numpy") as f:
                kind = f.get_slice(name).get_dtype()
                if kind != "BF16":
                    return f.get_tensor(name)
            # NumPy has no bfloat16: read the raw 16-bit words from the header's byte offsets
            start, header = self._header(file)
            entry = header[name]
            lo, hi = entry["data_offsets"]
            words = np.fromfile(file, dtype="<u2", count=(hi - lo) // 2, offset=start + lo)
            if words.size != (hi - lo) // 2:
                raise InputError(f"{file}: tensor {name!r} is truncated")
            return words.view(jnp.bfloat16).reshape(entry["shape"])
        except (SafetensorError, OSError, ValueError) as err:
            if isinstance(err, InputError):
                raise
            raise InputError(f"{file}: tensor {name!r} cannot be read: {err}") from None


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
    gather). Stacked layer parameters (leading layer axis) are split on their largest other axis
    when it divides, so each device holds a slice of every layer.

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


def param_path(path: tuple) -> str:
    """Return the dotted name of an ``nnx.State`` path (``layers.mlp.up_proj.weight``)."""
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return ".".join(k for k in keys if k != "value")


def assemble_model(
    config: DecoderConfig,
    read: Callable[[str, str], np.ndarray],
    names: dict[str, str],
    *,
    source: str,
    dtype=jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    remat: bool = False,
) -> DecoderLM:
    """Return a :class:`~sims.models.decoder.DecoderLM` whose parameters are read tensor by tensor.

    For every parameter path of the model, ``names[path]`` is its tensor-name template
    (``{i}``: layer index, from :data:`sims.checkpoints.families.HF_TENSOR_NAMES` or
    :data:`~sims.checkpoints.families.GGUF_TENSOR_NAMES`) and ``read(path, name)`` returns that
    tensor as a
    NumPy array (after any format transform). Per-layer tensors are stacked on the leading layer
    axis; every tensor is checked for shape and finiteness, cast to ``dtype`` and placed on its
    shards when ``mesh`` is given. Shared by the Hugging Face and GGUF loaders.

    Raises:
      InputError: a tensor of the wrong shape, or with a NaN/inf entry (names ``source`` and the
        tensor); errors ``read`` raises (a missing tensor).
    """
    dtype = check_dtype(dtype)
    abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0), dtype=dtype, remat=remat))
    graphdef, shapes = nnx.split(abstract)

    def load(path, leaf):
        name_path = param_path(path)
        template = names[name_path]
        per_layer = layer_names(template, config.num_layers)
        want = tuple(leaf.shape[1:]) if len(per_layer) > 1 or "{i}" in template else leaf.shape
        arrays = []
        for name in per_layer:
            arr = read(name_path, name)
            if tuple(arr.shape) != tuple(want):
                raise InputError(f"{source}: tensor {name} must have shape {want}, got {arr.shape}")
            finite = np.isfinite(arr.astype(np.float32) if arr.dtype == jnp.bfloat16 else arr)
            if not finite.all():
                raise InputError(
                    f"{source}: tensor {name} has {int(finite.size - finite.sum())} NaN/inf entries"
                )
            arrays.append(np.asarray(arr).astype(leaf.dtype))
        arr = np.stack(arrays) if "{i}" in template else arrays[0]
        return jax.device_put(arr, param_sharding(arr.shape, mesh)) if mesh else jnp.asarray(arr)

    state = jax.tree_util.tree_map_with_path(load, shapes)
    return nnx.merge(graphdef, state)


def load_causal_lm(
    path: str | Path,
    *,
    dtype=jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    remat: bool = False,
) -> DecoderLM:
    """Return the Flax NNX causal LM stored in a Hugging Face folder, a GGUF file or a package.

    Args:
      path: a folder with ``config.json`` and ``model.safetensors`` (or sharded files with
        ``model.safetensors.index.json``); a llama.cpp ``.gguf`` file
        (:func:`sims.checkpoints.gguf.load_gguf`,
        dequantised to ``dtype``); or the name of a packaged model (``"smollm2"``, see
        :func:`sims.checkpoints.packaged.resolve_model`).
      dtype: parameter dtype, one of :data:`DTYPES` (``jnp.float32``, ``jnp.bfloat16``,
        ``jnp.float64``); tensors are cast on load.
      mesh: place each parameter on its shards (:func:`param_sharding`) as it is read.
      remat: recompute blocks in the backward pass (see :class:`~sims.models.decoder.DecoderLM`).

    Returns:
      :class:`~sims.models.decoder.DecoderLM`: ``model(tokens [B, T])`` gives logits ``[B, T, V]``.

    Raises:
      InputError: a bad ``dtype`` (checked first), a missing path or packaged model, and every
        bad-file case listed in the module docstring (each names the file and the field).
    """
    from sims.checkpoints import gguf
    from sims.checkpoints.packaged import resolve_model

    check_dtype(dtype)
    path = resolve_model(path)
    if path.suffix == ".gguf" or path.is_file():
        return gguf.load_gguf(path, dtype=dtype, mesh=mesh, remat=remat)
    folder = path
    config = decoder_config_from_hf(
        read_json(folder / "config.json"), where=str(folder / "config.json")
    )
    tensors = _Tensors(folder)
    # checkpoints saved from the bare base model have no "model." prefix
    bare = (
        "model.embed_tokens.weight" not in tensors.files and "embed_tokens.weight" in tensors.files
    )
    used = set()

    def read(path: str, name: str) -> np.ndarray:
        key = name.removeprefix("model.") if bare else name
        if key not in tensors.files:
            raise InputError(f"{folder}: checkpoint lacks tensor {key!r} of a {config.model_type}")
        used.add(key)
        return tensors.get(key)

    model = assemble_model(
        config, read, HF_TENSOR_NAMES, source=str(folder), dtype=dtype, mesh=mesh, remat=remat
    )
    head = "lm_head.weight"
    if config.tied and head in tensors.files:
        embed = tensors.get("embed_tokens.weight" if bare else "model.embed_tokens.weight")
        if not np.array_equal(np.asarray(tensors.get(head)), np.asarray(embed)):
            raise InputError(
                f"{folder / 'config.json'}: tie_word_embeddings is true but {head} differs from "
                "the token embedding: set tie_word_embeddings to false to use both"
            )
        used.add(head)
    extra = [k for k in tensors.files if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    if extra:
        raise InputError(
            f"{folder}: unexpected tensors for a {config.model_type} config: {sorted(extra)[:5]}"
        )
    return model


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
    ``model.safetensors`` (HF names, one tensor per layer; ``lm_head.weight`` only when untied).
    With ``tokenizer`` (a ``tokenizers.Tokenizer``) also ``tokenizer.json`` and
    ``tokenizer_config.json`` naming the special tokens; their ids go into ``config.json``.
    ``transformers`` loads the folder with ``AutoModelForCausalLM`` / ``AutoTokenizer`` (tested).

    Raises:
      TypeError: ``model`` is not a :class:`~sims.models.decoder.DecoderLM` (the GPT-2-style
        :class:`sims.models.transformer.CausalTransformer` has no Llama-format equivalent).
      ValueError: a special token missing from ``tokenizer``'s vocabulary.
    """
    if not isinstance(model, DecoderLM):
        raise TypeError(
            f"model must be a sims.models.decoder.DecoderLM to be saved in Hugging Face format, "
            f"got "
            f"{type(model).__name__}"
        )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = named_tensors(model, HF_TENSOR_NAMES)
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


def named_tensors(model: DecoderLM, names: dict[str, str]) -> dict[str, np.ndarray]:
    """Return ``{tensor name: array}`` of ``model``'s parameters under a name table, one tensor
    per layer (the inverse of :func:`assemble_model`'s stacking)."""
    _, state = nnx.split(model)
    out = {}
    for p, leaf in jax.tree_util.tree_leaves_with_path(state):
        template = names[param_path(p)]
        arr = np.asarray(leaf)
        if "{i}" in template:
            for i, name in enumerate(layer_names(template, arr.shape[0])):
                out[name] = np.ascontiguousarray(arr[i])
        else:
            out[template] = arr
    return out
