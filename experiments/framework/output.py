"""Provenance, deterministic JSON, and saving a figure with the numbers behind it.

:func:`save` writes the PNG and the JSON to temporary names, then renames both, the JSON last, so a
reader who finds a JSON can trust the PNG beside it (``provenance.png_sha256``); an interrupt or a
full disk removes the temporary files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.framework.config import ConfigError  # noqa: E402

#: Default output folder: the repository's figures/.
FIGURES_DIR = Path(__file__).resolve().parent.parent.parent / "figures"


def enable_x64() -> None:
    """Turn on float64 (``run`` functions that check theory in float64 call this first)."""
    jax.config.update("jax_enable_x64", True)


def progress(message: str) -> None:
    """Print a progress line at once (long runs report step, t and a key observable)."""
    print(message, flush=True)


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance(*, dtype_of: Any) -> dict[str, Any]:
    """Return package versions, the dtype actually computed, device kind and git state.

    ``dtype_of`` is a result array (or a pytree of them) of the computation being reported: the
    ``dtype`` label is read from it, so it cannot disagree with the computation. No timestamps.
    ``git_dirty`` is true when the working tree had uncommitted changes (the commit alone does not
    then identify the code).
    """
    import flax
    import optax

    dtypes = sorted({str(np.asarray(x).dtype) for x in jax.tree_util.tree_leaves(dtype_of)})
    if not dtypes:
        raise ValueError("dtype_of must hold at least one array of the reported computation")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "dtype": "+".join(dtypes),
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
        "device_kind": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": None if status is None else bool(status),
    }


def to_jsonable(obj: Any) -> Any:
    """Convert arrays, NumPy scalars, tuples and dataclasses to plain JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, jax.Array | np.ndarray):
        return to_jsonable(np.asarray(obj).tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def dumps(results: dict) -> str:
    """Serialise deterministically: sorted keys, indent 2, NaN/inf refused."""
    return json.dumps(to_jsonable(results), sort_keys=True, indent=2, allow_nan=False) + "\n"


def prepare_out_dir(out_dir: Path | str) -> Path:
    """Create ``out_dir`` and check that it is a writable folder; return it.

    Raises:
      ConfigError: ``out_dir`` is a file, cannot be created, or is not writable (names ``--out``).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out must be a folder, got the file {str(out)!r}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--out must be a writable folder, got {str(out)!r}: {err}") from None
    return out


def save(
    name: str, results: dict, fig: plt.Figure, out_dir: Path | str = FIGURES_DIR
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.png`` and ``<out_dir>/<name>.json``; return both paths.

    A figure and its numbers always match: both are written to temporary files in ``out_dir``,
    then renamed, the PNG first and the JSON last. The JSON's ``provenance.png_sha256`` is the
    PNG's SHA-256, so a reader can check the pair (a run stopped between the two renames leaves
    the new PNG beside the old JSON, which the hash exposes). An interrupt (SIGINT; SIGTERM under
    :func:`cli`) or a failed write (``OSError``, e.g. a full disk) removes the temporary files and
    is re-raised; the previous pair is then left as it was.
    """
    out = prepare_out_dir(out_dir)
    png, js = out / f"{name}.png", out / f"{name}.json"
    temps: list[Path] = []
    try:
        tmp_png = _temp_file(out, png, temps)
        fig.savefig(
            tmp_png, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None}
        )
        digest = hashlib.sha256(tmp_png.read_bytes()).hexdigest()
        record = {**results, "provenance": {**results.get("provenance", {}), "png_sha256": digest}}
        tmp_js = _temp_file(out, js, temps)
        tmp_js.write_text(dumps(record))
        os.replace(tmp_png, png)
        os.replace(tmp_js, js)  # last: a JSON never names a PNG that is not there
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return png, js


def _temp_file(out: Path, target: Path, temps: list[Path]) -> Path:
    """Create an empty ``.<target name>.<random>.tmp`` in ``out``; append it to ``temps``."""
    fd, name = tempfile.mkstemp(dir=out, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    temps.append(Path(name))
    return temps[-1]
