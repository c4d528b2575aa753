"""``python -m experiments [all | NAME ...] [--smoke] [--FIELD VALUE ...]``: regenerate figures/.

Names come first; everything from the first ``--flag`` on is passed to each named script, e.g.
``python -m experiments audit --model DIR --pairs FILE.jsonl --out DIR``.
"""

from __future__ import annotations

import sys

from experiments import EXPERIMENTS, TOOLS
from experiments._common import enable_x64, run_all


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    first_flag = next((i for i, a in enumerate(args) if a.startswith("--")), len(args))
    names, flags = args[:first_flag], args[first_flag:]  # flags and their values: to each script
    if not names or names == ["all"]:
        names = list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS + TOOLS]
    if unknown:
        raise SystemExit(
            f"unknown experiment(s) {unknown}; choose from {list(EXPERIMENTS + TOOLS)}"
        )
    enable_x64()
    run_all(names, flags)


if __name__ == "__main__":
    main()
