"""``python -m experiments [NAMES... | all | extended | list] [--flag VALUE | --flag=VALUE ...]``.

Runs the named experiments (default or ``all``: every experiment of the main job,
:data:`EXPERIMENTS`; ``extended``: the slow group :data:`EXTENDED`), each
writing ``<out>/<name>.png`` and ``.json``. Flags go only to the experiments whose ``Config``
defines them (``--smoke``, ``--out`` go to all; ``--scale`` to those with a bigger version).
Everything is checked before the first experiment starts: unknown names, flags no selected
experiment defines, unreadable or invalid values, input paths that are missing or unreadable
(``--pairs``, ``--model``), an unusable output folder.

A user error (bad value, bad or missing file: :data:`experiments.framework.USER_ERRORS`) prints one
line ``error: ...`` and exits with status 2; ``--debug`` shows its traceback. Any other exception
is a bug and keeps its traceback. SIGTERM stops the run like SIGINT: temporary files and folders
in ``--out`` are removed."""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Sequence

from experiments import EXPERIMENTS, EXTENDED, EXTRA
from experiments.framework import (
    ConfigError,
    config_flags,
    parse_config,
    prepare_out_dir,
    progress,
    user_errors_as_one_line,
)

USAGE = (
    "usage: python -m experiments [NAMES... | all | extended | list] [--flag VALUE ...]\n"
    "       python -m experiments.NAME --help   (the flags of one experiment)"
)
_SWITCHES = ("--smoke", "--scale", "--full")  # flags without a value


def _summary_line(name: str) -> str:
    module = importlib.import_module(f"experiments.{name}")
    doc = (module.__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def list_experiments() -> str:
    """Return the listing printed by ``--help``, ``-h`` and ``list``."""
    lines = [USAGE, "", "experiments of the main job (run in this order by default):"]
    lines += [f"  {n:<30} {_summary_line(n)}" for n in EXPERIMENTS]
    lines += ["", "experiments of the extended job (python -m experiments extended):"]
    lines += [f"  {n:<30} {_summary_line(n)}" for n in EXTENDED]
    lines += ["", "separate commands:"]
    lines += [f"  {n:<30} {_summary_line(n)}" for n in EXTRA]
    lines += [
        "",
        "common flags: --smoke (tiny version), --scale (GPU/TPU version, where defined),",
        "              --out DIR (output folder, default figures/),",
        "              --debug (tracebacks; default: a user error is one line, exit status 2)",
    ]
    return "\n".join(lines)


def split_args(args: Sequence[str]) -> tuple[list[str], list[tuple[str, str | None]]]:
    """Split the command line into experiment names and ``(flag, value)`` pairs.

    ``--flag=value`` and ``--flag value`` both work; ``--smoke``/``--scale`` take no value; a
    last flag without its value gets ``None`` (:func:`plan` refuses it).
    """
    names, flags = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-") and arg != "-":
            if "=" in arg:
                key, value = arg.split("=", 1)
                flags.append((key, value))
            elif arg in _SWITCHES:
                flags.append((arg, None))
            else:
                flags.append((arg, args[i + 1] if i + 1 < len(args) else None))
                i += 1
        else:
            names.append(arg)
        i += 1
    return names, flags


def plan(argv: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Return ``[(name, its argv), ...]`` after checking names, flags, values and ``--out``.

    Raises:
      ConfigError: with a message naming the unknown experiment, flag, bad value or path.
    """
    names, flags = split_args(argv)
    if not names or names == ["all"]:
        names = list(EXPERIMENTS)
    elif names == ["extended"]:
        names = list(EXTENDED)
    known = EXPERIMENTS + EXTENDED + EXTRA
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(
            f"unknown experiment(s) {unknown}; choose from {list(known)} "
            "(python -m experiments list)"
        )
    modules = {n: importlib.import_module(f"experiments.{n}") for n in names}
    accepted = {
        n: set(config_flags(m.Config))
        | {"--smoke", "--out"}
        | ({"--scale"} if hasattr(m.Config, "scaled") else set())
        | ({"--full"} if hasattr(m.Config, "full") else set())
        for n, m in modules.items()
    }
    for key, _ in flags:
        if not any(key in a for a in accepted.values()):
            raise ConfigError(
                f"no selected experiment defines {key} (selected: {names}); see "
                f"python -m experiments.NAME --help"
            )
    for key, value in flags:
        if value is None and key not in _SWITCHES:
            raise ConfigError(f"{key} needs a value (python -m experiments --help)")
    out = [value for key, value in flags if key == "--out"]
    if out:
        prepare_out_dir(out[-1])
    runs = []
    for n in names:
        mine = []
        for key, value in flags:
            if key in accepted[n]:
                mine += [key] if value is None else [f"{key}={value}"]
        parse_config(modules[n].Config, mine, prog=f"python -m experiments.{n}")  # validates now
        runs.append((n, mine))
    return runs


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line ``argv``: a user error prints one line and exits with status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args) or args[:1] == ["list"]:
        print(list_experiments())
        return
    debug = "--debug" in args
    with user_errors_as_one_line(debug=debug):
        runs = plan([a for a in args if a != "--debug"])
        start = time.perf_counter()
        for i, (name, flags) in enumerate(runs, 1):
            progress(f"=== [{i}/{len(runs)}] {name} {' '.join(flags)}".rstrip())
            importlib.import_module(f"experiments.{name}").main(flags)
        progress(f"=== all {len(runs)} experiments done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
