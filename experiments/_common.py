"""Shared plumbing for experiment scripts: CLI from a dataclass, provenance, saving PNG + JSON.

Every experiment module defines ``Config`` (frozen dataclass with ``smoke()``), ``run(config) ->
dict``, ``plot(results) -> Figure`` and ``main(argv=None)``; ``main`` calls :func:`experiment_main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

#: Default output folder: the repository's figures/.
FIGURES_DIR = Path(__file__).resolve().parent.parent / "figures"


def enable_x64() -> None:
    """Turn on float64 (experiments check theory in float64; call before creating arrays)."""
    jax.config.update("jax_enable_x64", True)


def progress(message: str) -> None:
    """Print a progress line at once (long runs report step, t and a key observable)."""
    print(message, flush=True)


def provenance(dtype: str) -> dict[str, str]:
    """Return package versions, dtype, device kind and git commit (no timestamps)."""
    import flax
    import optax

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "dtype": dtype,
        "device_kind": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "git_commit": commit,
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


def save(
    name: str, results: dict, fig: plt.Figure, out_dir: Path | str = FIGURES_DIR
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.png`` and ``<out_dir>/<name>.json``; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, js = out / f"{name}.png", out / f"{name}.json"
    text = dumps(results)
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(text)
    os.replace(tmp, js)
    fig.savefig(png, dpi=120, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return png, js


def parse_config(config_cls: type, argv: Sequence[str] | None) -> tuple[Any, Path]:
    """Build an argparse CLI from ``config_cls``'s fields; return ``(config, out_dir)``.

    ``--smoke`` starts from ``config_cls.smoke()``, ``--scale`` from ``config_cls.scaled()`` (the
    bigger accelerator version, where defined); explicit flags override either default.
    Tuple fields take a comma-separated list.
    """
    parser = argparse.ArgumentParser(description=(config_cls.__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny version (tests)")
    parser.add_argument(
        "--scale", action="store_true", help="bigger GPU/TPU version (Config.scaled(), if defined)"
    )
    parser.add_argument("--out", default=str(FIGURES_DIR), help="output folder (default figures/)")
    for field in dataclasses.fields(config_cls):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            dest=field.name,
            default=None,
            help=f"default {field.default!r}",
        )
    args = parser.parse_args(argv)
    if args.smoke and args.scale:
        raise SystemExit("--smoke and --scale exclude each other")
    if args.scale and not hasattr(config_cls, "scaled"):
        raise SystemExit(f"{config_cls.__module__} has no --scale version")
    config = (
        config_cls.smoke() if args.smoke else config_cls.scaled() if args.scale else config_cls()
    )
    overrides = {}
    for field in dataclasses.fields(config_cls):
        raw = getattr(args, field.name)
        if raw is None:
            continue
        default = getattr(config, field.name)
        overrides[field.name] = _convert(raw, default, field.name)
    return dataclasses.replace(config, **overrides), Path(args.out)


def _convert(raw: str, default: Any, name: str) -> Any:
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        if isinstance(default, tuple):
            kind = type(default[0]) if default else str
            return tuple(kind(x) for x in raw.split(",") if x)
        return type(default)(raw)
    except ValueError:
        raise SystemExit(
            f"--{name.replace('_', '-')}: cannot read {raw!r} as {type(default).__name__}"
        ) from None


def experiment_main(
    name: str,
    config_cls: type,
    run: Callable[[Any], dict],
    plot: Callable[[dict], plt.Figure],
    argv: Sequence[str] | None = None,
    summary: Callable[[dict], str] | None = None,
) -> dict:
    """Parse flags, run, plot, save PNG + JSON, print paths and key numbers; return the results."""
    config, out_dir = parse_config(config_cls, argv)
    start = time.perf_counter()
    progress(f"[{name}] running with {config}")
    results = run(config)
    png, js = save(name, results, plot(results), out_dir)
    progress(f"[{name}] wrote {png} and {js} in {time.perf_counter() - start:.1f} s")
    if summary is not None:
        progress(f"[{name}] {summary(results)}")
    return results


def run_all(names: Sequence[str], argv_extra: Sequence[str] = ()) -> None:
    """Run the named experiments' ``main`` one after another (``python -m experiments``)."""
    import importlib

    start = time.perf_counter()
    for i, name in enumerate(names, 1):
        progress(f"=== [{i}/{len(names)}] {name}")
        importlib.import_module(f"experiments.{name}").main(list(argv_extra))
    progress(f"=== all {len(names)} experiments done in {time.perf_counter() - start:.1f} s")
    sys.stdout.flush()
