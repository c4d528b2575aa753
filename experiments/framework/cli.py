"""The experiments' command line: flags generated from ``Config`` fields, one-line user errors.

Every experiment module defines ``Config`` (a frozen dataclass deriving from
:class:`~experiments.framework.config.ExperimentConfig`, with ``smoke()`` and optionally
``full()`` and ``scaled()``), ``run(config) -> dict``, ``plot(results) -> Figure`` and
``main(argv=None)``; ``main`` calls :func:`experiment_main`.

The CLI is argparse, generated from the ``Config`` fields (``--beta 0.1`` or ``--beta=0.1``; tuple
fields take a comma-separated list ``--loss-types dpo,ipo``). Each field's help is the comment
written beside it in the class body. We chose argparse over ``tyro``: the runner (``python -m
experiments``) must route each flag to the experiments that define it and refuse unknown flags
before any experiment starts, which needs our own pre-parse either way, and tyro's space-separated
tuple syntax would change every documented command.

On the command line (:func:`cli`, ``python -m experiments``) a user error (:data:`USER_ERRORS`)
prints one line ``error: ...`` and exits with status 2 (``--debug``: the traceback), and SIGTERM
raises, so temporary files and folders in the output folder are removed as on SIGINT. With
``--scale`` every flow prints the device memory of the program it is about to run
(:func:`sims.flows.core.report_memory`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.framework.conclusions import resolve
from experiments.framework.config import ConfigError, default_rule, field_comments, flag
from experiments.framework.output import (
    FIGURES_DIR,
    dumps,
    prepare_out_dir,
    progress,
    save,
    to_jsonable,
)
from sims.errors import InputError  # noqa: E402

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
    conclusions: Mapping[str, tuple[str, Any]] | None = None,
    resumable: bool = False,
) -> dict:
    """Parse flags, check the output folder, run, plot, save PNG + JSON, print paths and numbers.

    ``conclusions`` (the experiment's ``CONCLUSIONS``: name -> (kind, path), see
    :mod:`experiments.framework.conclusions`) are read in the results and written as
    ``results["conclusions"]`` before saving.

    ``resumable``: ``run`` is called as ``run(config, sweep_dir=<out>/<name>_sweep/<digest>)``,
    the digest the first 12 hex digits of the SHA-256 of ``{"config": config}``'s JSON, so a
    rerun of the same config resumes its saved sweep chunks and another config starts afresh.

    Errors are raised (:func:`cli` turns a user error into one line); a declared conclusion
    missing from the results raises ``ValueError`` before anything is written.
    """
    config, out_dir, scale = _parse(config_cls, argv, f"python -m experiments.{name}")
    out_dir = prepare_out_dir(out_dir)
    if resumable:
        digest = hashlib.sha256(dumps({"config": config}).encode()).hexdigest()[:12]
        run = functools.partial(run, sweep_dir=out_dir / f"{name}_sweep" / digest)
    start = time.perf_counter()
    progress(f"[{name}] running with {config}")
    if scale:  # every flow prints the memory of the very program it runs, before running it
        from sims.flows.core import report_memory

        with report_memory(lambda line: progress(f"[{name}] {line}")):
            results = run(config)
    else:
        results = run(config)
    if isinstance(results.get("provenance"), dict):  # the run's own wall time, plot excluded
        results["provenance"]["run_s"] = round(time.perf_counter() - start, 1)
    if conclusions is not None:
        results["conclusions"] = resolve(name, conclusions, to_jsonable(results))
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
    first. Where the handler ran inside code whose exceptions Python drops -- a garbage
    collector callback such as JAX's, or a ``__del__`` -- Python reports the ``SystemExit`` to
    ``sys.unraisablehook`` and goes on; this context's hook then delivers the signal again from
    a helper thread, so it is handled at the next bytecode outside that code. The previous
    handler and hook are restored on exit; outside the main thread (where no handler can be
    set) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous_handler = signal.signal(signal.SIGTERM, _raise_on_signal)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = functools.partial(_redeliver_dropped_exit, previous_hook)
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGTERM, previous_handler)


class _SignalExit(SystemExit):
    """The ``SystemExit`` raised by :func:`sigterm_raises`' handler (told apart from others)."""


def _raise_on_signal(signum: int, frame: Any) -> None:
    raise _SignalExit(128 + signum)


def _redeliver_dropped_exit(previous_hook: Callable[[Any], None], unraisable: Any) -> None:
    """``sys.unraisablehook`` inside :func:`sigterm_raises`: a dropped signal exit is sent again.

    The new signal comes from a timer thread 10 ms later, so the handler runs after this hook
    and (as a rule) the dropping code have returned; if it lands in such code again, this
    repeats. (A signal sent at once could be handled inside this very hook, where an exception
    is dropped for good.)
    """
    if isinstance(unraisable.exc_value, _SignalExit):
        signum = unraisable.exc_value.code - 128
        timer = threading.Timer(0.01, signal.raise_signal, (signum,))
        timer.daemon = True
        timer.start()
        return
    previous_hook(unraisable)


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
