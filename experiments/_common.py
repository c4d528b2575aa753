"""Shared plumbing for experiment scripts: configs that validate themselves, the CLI, provenance,
saving PNG + JSON.

Every experiment module defines ``Config`` (a frozen dataclass deriving from
:class:`ExperimentConfig`, with ``smoke()`` and optionally ``scaled()``), ``run(config) -> dict``,
``plot(results) -> Figure`` and ``main(argv=None)``; ``main`` calls :func:`experiment_main`.

The CLI is argparse, generated from the ``Config`` fields (``--beta 0.1`` or ``--beta=0.1``; tuple
fields take a comma-separated list ``--loss-types dpo,ipo``). Each field's help is the comment
written beside it in the class body. We chose argparse over ``tyro``: the runner (``python -m
experiments``) must route each flag to the experiments that define it and refuse unknown flags
before any experiment starts, which needs our own pre-parse either way, and tyro's space-separated
tuple syntax would change every documented command.

Validation happens when a config is built (:meth:`ExperimentConfig.__post_init__`): each field's
type, then its rule -- the one in the class's ``RULES`` (``{"loss_types": each(one_of(...))}``,
``{"pairs": existing_file()}``), else the default (counts >= 1, numbers > 0, a number whose default
is 0 >= 0, ``seed`` >= 0); errors name the flag. Input paths are thus checked before any experiment
starts. The output folder is created and checked writable before a run starts
(:func:`prepare_out_dir`); :func:`save` writes the PNG + JSON pair so that it always matches.

On the command line (:func:`cli`, ``python -m experiments``) a user error (:data:`USER_ERRORS`)
prints one line ``error: ...`` and exits with status 2 (``--debug``: the traceback), and SIGTERM
raises, so temporary files and folders in the output folder are removed as on SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tokenize
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sims.errors import InputError  # noqa: E402

#: Default output folder: the repository's figures/.
FIGURES_DIR = Path(__file__).resolve().parent.parent / "figures"

#: Switches every experiment takes (besides its Config fields).
COMMON_SWITCHES = ("--smoke", "--scale", "--full", "--debug")

#: Exceptions that are the user's fault, not the code's: the command line (:func:`cli`, ``python
#: -m experiments``) prints them as one line ``error: ...`` and exits with status 2 (``--debug``
#: shows the traceback). The rule: a bad value or file content is an :class:`InputError`
#: (:class:`ConfigError` included); a named path that cannot be opened is one of the OS errors
#: here; an input that cannot be decoded is a decode error. The experiments read no files but
#: those the user names (``--pairs``, ``--model``, ``--out``), so these never come from the
#: code. Any other exception (a plain ``ValueError``, ``FloatingPointError``, an ``OSError`` such
#: as a full disk) is a bug or an environment failure and keeps its traceback.
USER_ERRORS = (
    InputError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    UnicodeDecodeError,
    json.JSONDecodeError,
)


class ConfigError(InputError):
    """A config value breaks its rule; the message names the flag (``--beta``)."""


def flag(name: str) -> str:
    """Return the command-line flag of a Config field: ``loss_types`` -> ``--loss-types``."""
    return "--" + name.replace("_", "-")


# --- validation rules: each is ``rule(name, value)`` raising ConfigError, with a ``text`` for help


def _rule(text: str, ok: Callable[[Any], bool]) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if not ok(value):
            raise ConfigError(f"{flag(name)} must be {text}, got {value!r}")

    check.text = text
    return check


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


positive = _rule("a finite number > 0", lambda x: _is_number(x) and x > 0)
nonnegative = _rule("a finite number >= 0", lambda x: _is_number(x) and x >= 0)
positive_int = _rule(
    "an integer >= 1", lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 1
)
nonnegative_int = _rule(
    "an integer >= 0", lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0
)
unit_interval = _rule("a number in (0, 1]", lambda x: _is_number(x) and 0 < x <= 1)
open_unit_interval = _rule("a number in (0, 1)", lambda x: _is_number(x) and 0 < x < 1)
probability = _rule("a number in [0, 1]", lambda x: _is_number(x) and 0 <= x <= 1)
finite = _rule("a finite number", _is_number)


def existing_path(
    kind: str = "file or folder", *, allow: Iterable[str] = ("",)
) -> Callable[[str, Any], None]:
    """Rule: a path to an existing, readable ``kind`` (``"file"``, ``"folder"`` or ``"file or
    folder"``; symlinks followed), or one of the words in ``allow`` (default ``""``: none given).

    Checked when the config is built, so a missing input stops ``python -m experiments`` before
    the first experiment starts, not after its pre-training.
    """
    if kind not in ("file", "folder", "file or folder"):
        raise ValueError(f"kind must be 'file', 'folder' or 'file or folder', got {kind!r}")
    allowed = tuple(allow)
    words = " or ".join(repr(w) if w else '""' for w in allowed)
    text = f"an existing readable {kind}" + (f" or {words}" if allowed else "")

    def check(name: str, value: Any) -> None:
        if value in allowed:
            return
        problem = _path_problem(Path(value), kind) if isinstance(value, str) else "is not a path"
        if problem:
            raise ConfigError(f"{flag(name)} must be {text}, got {value!r}, which {problem}")

    check.text = text
    return check


def existing_file(*, allow: Iterable[str] = ("",)) -> Callable[[str, Any], None]:
    """Rule: a path to an existing, readable file, or one of ``allow`` (:func:`existing_path`)."""
    return existing_path("file", allow=allow)


def _path_problem(path: Path, kind: str) -> str | None:
    """Why ``path`` is not a readable ``kind`` (as the end of a sentence), or None if it is."""
    if not path.exists():  # follows symlinks
        if path.is_symlink():
            return f"is a symlink to {os.readlink(path)!r}, which does not exist"
        return "does not exist"
    if kind == "file" and not path.is_file():
        return "is a folder" if path.is_dir() else "is not a regular file"
    if kind == "folder" and not path.is_dir():
        return "is not a folder"
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        return "is not readable (permission denied)"
    return None


def number_in(low: float, high: float) -> Callable[[str, Any], None]:
    """Rule: a finite number in ``[low, high]``."""
    return _rule(f"a number in [{low}, {high}]", lambda x: _is_number(x) and low <= x <= high)


def grid(ends: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
    """Rule for a grid ``(start, stop, num)``: ends obey ``ends``, start < stop, int num >= 2."""

    def check(name: str, value: Any) -> None:
        ok = (
            isinstance(value, tuple)
            and len(value) == 3
            and all(_is_number(v) for v in value)
            and float(value[2]).is_integer()
            and value[2] >= 2
            and value[0] < value[1]
        )
        if not ok:
            raise ConfigError(
                f"{flag(name)} must be start,stop,num with start < stop and an integer num >= 2, "
                f"got {value!r}"
            )
        ends(name, value[0])
        ends(name, value[1])

    check.text = f"start,stop,num (start < stop, each {getattr(ends, 'text', '')}; num >= 2)"
    return check


def one_of(choices: Iterable[Any]) -> Callable[[str, Any], None]:
    """Rule: the value is one of ``choices``."""
    allowed = tuple(choices)
    return _rule(f"one of {list(allowed)}", lambda x: x in allowed)


def each(rule: Callable[[str, Any], None], *, min_len: int = 1) -> Callable[[str, Any], None]:
    """Rule for a tuple field: at least ``min_len`` entries, each obeying ``rule``."""

    def check(name: str, value: Any) -> None:
        if not isinstance(value, tuple) or len(value) < min_len:
            raise ConfigError(
                f"{flag(name)} must be a comma-separated list of at least {min_len} value(s), "
                f"got {value!r}"
            )
        for v in value:
            try:
                rule(name, v)
            except ConfigError as err:
                raise ConfigError(f"{err} (in {flag(name)}={value!r})") from None

    check.text = f"a list of values each {getattr(rule, 'text', '')}".strip()
    return check


def _field_type_ok(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, tuple):
        return isinstance(value, tuple)
    return True


def default_rule(name: str, default: Any) -> Callable[[str, Any], None] | None:
    """The rule a field gets unless ``RULES`` names it: counts ``>= 1``, numbers ``> 0``.

    ``seed`` is ``>= 0``; other ints are counts (``>= 1``); floats are scales, steps or
    coefficients (finite, ``> 0``); a number whose default is 0 (``gamma: float = 0.0``, a term
    off by default) is ``>= 0``; tuples are non-empty with entries following the same rules;
    strings and booleans are free (their own rules go in ``RULES``).
    """
    if isinstance(default, bool | str):
        return None
    if name == "seed":
        return nonnegative_int
    if isinstance(default, int):
        return nonnegative_int if default == 0 else positive_int
    if isinstance(default, float):
        return nonnegative if default == 0 else positive
    if isinstance(default, tuple):
        inner = [default_rule(name, v) for v in default[:1]]
        return each(inner[0]) if inner and inner[0] is not None else each(lambda n, v: None)
    return None


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Base of every experiment ``Config``: validates itself when built.

    Every field is type-checked against its default's type, then checked by its rule: the one
    named in the subclass's ``RULES`` (field name -> rule such as :data:`nonnegative`,
    :func:`one_of`, :func:`each`), else :func:`default_rule` (counts ``>= 1``, numbers ``> 0``,
    ``seed >= 0``). ``check(self)`` adds cross-field checks (raise :class:`ConfigError`).
    """

    RULES: ClassVar[dict[str, Callable[[str, Any], None]]] = {}

    def __post_init__(self) -> None:
        for name in self.RULES:
            if name not in {f.name for f in dataclasses.fields(self)}:
                raise TypeError(f"{type(self).__qualname__}.RULES names no field {name!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default
            if default is not dataclasses.MISSING and not _field_type_ok(default, value):
                raise ConfigError(
                    f"{flag(f.name)} must be of type {type(default).__name__}, got {value!r}"
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{flag(f.name)} must be finite, got {value!r}")
            rule = self.RULES.get(f.name, default_rule(f.name, default))
            if rule is not None:
                rule(f.name, value)
        self.check()

    def check(self) -> None:
        """Cross-field checks of a subclass (default: none)."""


def field_comments(config_cls: type) -> dict[str, str]:
    """Return each field's comment in the class bodies of ``config_cls`` and its bases.

    The comment on the field's line, else the block of comment lines right above it.
    """
    comments: dict[str, str] = {}
    for cls in reversed(config_cls.__mro__):
        if not dataclasses.is_dataclass(cls) or cls is ExperimentConfig:
            continue
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        above: list[str] = []  # comment lines since the last code line
        for line in source.splitlines()[1:]:
            text = line.strip()
            if text.startswith("#"):
                above.append(text.lstrip("# ").strip())
                continue
            name = text.split(":", 1)[0].strip()
            if line.startswith("    ") and not line.startswith("     ") and name.isidentifier():
                inline = _inline_comment(text)
                if inline or above:
                    comments[name] = inline or " ".join(above)
            above = []
    return comments


def _inline_comment(line: str) -> str:
    """The ``# ...`` comment of one source line ('' if none; a ``#`` inside a string is not one)."""
    try:
        for tok in tokenize.generate_tokens(io.StringIO(line + "\n").readline):
            if tok.type == tokenize.COMMENT:
                return tok.string.lstrip("# ").strip()
    except tokenize.TokenError:  # the line opens a bracket closed on a later line
        pass
    return ""


# --- provenance, JSON, saving


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


# --- the CLI


def config_flags(config_cls: type) -> dict[str, dataclasses.Field]:
    """Return ``{"--flag": field}`` for every field of ``config_cls``."""
    return {flag(f.name): f for f in dataclasses.fields(config_cls)}


def build_parser(config_cls: type, prog: str | None = None) -> argparse.ArgumentParser:
    """Return an experiment's argparse parser: its fields, ``--smoke``, ``--scale``, ``--out``,
    ``--debug``."""
    doc = (config_cls.__doc__ or "").strip().splitlines()
    parser = argparse.ArgumentParser(
        prog=prog,
        description=doc[0] if doc else None,
        epilog="Tuple flags take a comma-separated list (e.g. --seeds 0,1,2).",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny version (tests)")
    if hasattr(config_cls, "scaled"):
        parser.add_argument(
            "--scale", action="store_true", help="bigger GPU/TPU version (Config.scaled())"
        )
    if hasattr(config_cls, "full"):
        parser.add_argument(
            "--full", action="store_true", help="the full protocol on this machine (Config.full())"
        )
    parser.add_argument("--out", default=str(FIGURES_DIR), help="output folder (default figures/)")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks (default: a user error is one line)"
    )
    comments = field_comments(config_cls)
    rules = getattr(config_cls, "RULES", {})
    for f in dataclasses.fields(config_cls):
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else repr(default)
        rule = rules.get(f.name, default_rule(f.name, default))
        extra = f"; {rule.text}" if rule is not None and getattr(rule, "text", "") else ""
        parser.add_argument(
            flag(f.name),
            dest=f.name,
            default=None,
            metavar=type(default).__name__.upper() if default is not None else "VALUE",
            # argparse formats help with %: a literal percent sign must be doubled
            help=f"{comments.get(f.name, '')} (default {shown}{extra})".strip().replace("%", "%%"),
        )
    return parser


def parse_config(
    config_cls: type, argv: Sequence[str] | None, *, prog: str | None = None
) -> tuple[Any, Path]:
    """Parse ``argv`` into ``(config, out_dir)``; the config is validated, ``out_dir`` not yet.

    ``--smoke`` starts from ``config_cls.smoke()``, ``--scale`` from ``config_cls.scaled()``,
    ``--full`` from ``config_cls.full()``; explicit flags override any of them.

    Raises:
      ConfigError: unreadable or invalid values (the message names the flag).
      SystemExit: unknown flags (argparse's message and status 2).
    """
    config, out_dir, _ = _parse(config_cls, argv, prog)
    return config, out_dir


def _parse(
    config_cls: type, argv: Sequence[str] | None, prog: str | None
) -> tuple[Any, Path, bool]:
    """:func:`parse_config`, and whether ``--scale`` was given."""
    args = build_parser(config_cls, prog).parse_args(argv)
    scale, full = getattr(args, "scale", False), getattr(args, "full", False)
    if args.smoke + scale + full > 1:
        raise ConfigError("--smoke, --scale and --full exclude each other")
    config = (
        config_cls.smoke()
        if args.smoke
        else config_cls.scaled()
        if scale
        else config_cls.full()
        if full
        else config_cls()
    )
    overrides = {}
    for f in dataclasses.fields(config_cls):
        raw = getattr(args, f.name)
        if raw is not None:
            overrides[f.name] = _convert(raw, getattr(config, f.name), f.name)
    return dataclasses.replace(config, **overrides), Path(args.out), scale


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
        raise ConfigError(
            f"{flag(name)}: cannot read {raw!r} as {type(default).__name__}"
        ) from None


def experiment_main(
    name: str,
    config_cls: type,
    run: Callable[[Any], dict],
    plot: Callable[[dict], plt.Figure],
    argv: Sequence[str] | None = None,
    summary: Callable[[dict], str] | None = None,
) -> dict:
    """Parse flags, check the output folder, run, plot, save PNG + JSON, print paths and numbers.

    Errors are raised (:func:`cli` turns a user error into one line).
    """
    config, out_dir, scale = _parse(config_cls, argv, f"python -m experiments.{name}")
    out_dir = prepare_out_dir(out_dir)
    if scale:
        print_memory_estimate(name, config)
    start = time.perf_counter()
    progress(f"[{name}] running with {config}")
    results = run(config)
    png, js = save(name, results, plot(results), out_dir)
    progress(f"[{name}] wrote {png} and {js} in {time.perf_counter() - start:.1f} s")
    if summary is not None:
        progress(f"[{name}] {summary(results)}")
    sys.stdout.flush()
    return results


def error_line(err: BaseException) -> str:
    """Return the one-line message :func:`cli` prints for a user error (without ``error: ``).

    Example:
      >>> error_line(FileNotFoundError(2, "No such file or directory", "pairs.jsonl"))
      'pairs.jsonl: No such file or directory'
    """
    if isinstance(err, OSError) and err.filename is not None:
        text = f"{err.filename}: {err.strerror}"
    elif isinstance(err, InputError):
        text = str(err)
    else:
        text = f"{type(err).__name__}: {err}"
    return " ".join(text.split())


@contextlib.contextmanager
def sigterm_raises():
    """Context in which SIGTERM raises ``SystemExit(143)`` instead of killing the process.

    So ``with TemporaryDirectory()`` blocks (the self-made checkpoint inside ``--out``) and
    :func:`save` remove their temporary files, as on SIGINT. Python runs the handler between
    bytecodes: a compiled call in progress (a jitted scan such as the pre-training) finishes
    first. The previous handler is restored on exit; outside the main thread (where no handler
    can be set) nothing changes.
    """
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_on_signal)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def user_errors_as_one_line(*, debug: bool = False):
    """Context of a command-line entry: a user error (:data:`USER_ERRORS`) prints ``error: ...``
    on one line and exits with status 2, unless ``debug``; SIGTERM raises (:func:`sigterm_raises`).

    Raises:
      SystemExit: status 2 after a user error; 128 + 15 on SIGTERM.
    """
    try:
        with sigterm_raises():
            yield
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"error: {error_line(err)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def cli(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
    """Run an experiment's ``main`` as ``python -m experiments.<name>``: one line for a user
    error (status 2), a traceback with ``--debug`` or for any other error
    (:func:`user_errors_as_one_line`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    with user_errors_as_one_line(debug="--debug" in args):
        main(args)


def print_memory_estimate(name: str, config: Any) -> dict | None:
    """Print the device-memory estimate of experiment ``name``'s run of ``config`` (its
    ``aot_programs`` hook, compiled ahead of time by :mod:`experiments._aot`); return it.

    ``experiment_main`` calls this before a ``--scale`` run. An experiment without the hook, or a
    hook that fails, is reported and does not stop the run.
    """
    from experiments import _aot

    module = sys.modules.get(type(config).__module__)
    if module is None or not hasattr(module, "aot_programs"):
        progress(f"[{name}] no memory estimate: the experiment defines no aot_programs hook")
        return None
    progress(f"[{name}] estimating device memory (compiling ahead of time)...")
    try:
        estimate = _aot.estimate_memory(module, config)
    except Exception as err:  # noqa: BLE001 -- an estimate must never stop the run
        progress(f"[{name}] no memory estimate: {type(err).__name__}: {err}")
        return None
    progress(_aot.describe(name, estimate))
    return estimate
