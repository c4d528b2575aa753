"""``python -m experiments [all | NAME ...] [--smoke]``: regenerate figures/ (PNG + JSON each)."""

from __future__ import annotations

import sys

from experiments import EXPERIMENTS
from experiments._common import enable_x64, run_all


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    flags = [a for a in args if a.startswith("--")]
    names = [a for a in args if not a.startswith("--")]
    if not names or names == ["all"]:
        names = list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS and n != "bench"]
    if unknown:
        raise SystemExit(f"unknown experiment(s) {unknown}; choose from {list(EXPERIMENTS)}")
    enable_x64()
    run_all(names, flags)


if __name__ == "__main__":
    main()
