"""Re-run experiments into a temporary folder and compare their conclusions with the committed ones.

Each experiment's JSON marks its conclusions (experiments.framework.conclusions: verdicts, rates
with their per-seed spread, round-off errors). This command runs the named experiments (default:
the main job) in a child process -- optionally under other XLA flags, which change the CPU's
reduction order like another machine would -- and compares every conclusion with the JSON of the
reference folder (default: figures/): verdicts equal, rates within their runs' spread, float64
errors within an order of magnitude. It prints a table of what moved; the exit status is 1 if a
conclusion changed. ``--reference ""`` makes the reference now, by a first run without the extra
flags: two fresh runs on one machine under two XLA flag sets (the smoke test's mode).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt

from experiments import EXPERIMENTS, EXTENDED
from experiments.framework import (
    FIGURES_DIR,
    ExperimentConfig,
    cli,
    each,
    experiment_main,
    one_of,
    progress,
)
from experiments.framework.conclusions import compare

NAME = "check_figures"


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """Re-run experiments and compare their conclusions with a reference folder."""

    names: tuple[str, ...] = EXPERIMENTS  # experiments to re-run (default: the main job)
    reference: str = str(FIGURES_DIR)  # folder of the reference JSONs ("" = a first run, now)
    xla_flags: str = ""  # extra XLA_FLAGS for the re-run ("" = as this process)
    child_smoke: bool = False  # re-run the --smoke versions (for tests: reference from --smoke)

    RULES = {"names": each(one_of(EXPERIMENTS + EXTENDED))}

    @classmethod
    def smoke(cls) -> Config:
        flags = "--xla_cpu_multi_thread_eigen=false"
        return cls(("single_token_theorem_check",), "", flags, child_smoke=True)


def rerun(config: Config, out: Path, *, extra_flags: bool = True) -> int:
    """Run ``python -m experiments NAMES --out OUT`` in a child process; return its status."""
    env = dict(os.environ)
    if config.xla_flags and extra_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + config.xla_flags).strip()
    cmd = [sys.executable, "-m", "experiments", *config.names, "--out", str(out)]
    cmd += ["--smoke"] if config.child_smoke else []
    progress(f"[{NAME}] {' '.join(cmd[1:])} (XLA_FLAGS={env.get('XLA_FLAGS', '')!r})")
    return subprocess.run(cmd, env=env, check=False).returncode


def _file_row(experiment: str, what: str, old, new, rule: str) -> dict:
    """A failed row about a JSON file rather than one conclusion."""
    row = {"experiment": experiment, "name": what, "kind": "file", "ok": False}
    return row | {"old": old, "new": new, "rule": rule}


def run(config: Config) -> dict:
    rows, status = [], {}
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as first:
        reference = Path(config.reference or first)
        if not config.reference:
            status["reference_exit_status"] = rerun(config, reference, extra_flags=False)
        status["child_exit_status"] = rerun(config, Path(tmp))
        for name in config.names:
            ref, new = reference / f"{name}.json", Path(tmp) / f"{name}.json"
            if not ref.exists() or not new.exists():
                rows.append(_file_row(name, "(file)", ref.exists(), new.exists(), "both JSONs"))
                continue
            old_c = json.loads(ref.read_text()).get("conclusions", {})
            new_c = json.loads(new.read_text()).get("conclusions", {})
            if not old_c or not new_c:  # nothing to compare is no agreement
                rule = "both JSONs mark conclusions"
                rows.append(_file_row(name, "(conclusions)", len(old_c), len(new_c), rule))
            rows += [{"experiment": name, **r} for r in compare(old_c, new_c)]
    for r in rows:
        mark = "same" if r["ok"] else "MOVED"
        progress(
            f"  {r['experiment']:<34} {r['name']:<40} {mark:<5} {r['old']!s:>14} -> "
            f"{r['new']!s:<14} ({r['rule']})"
        )
    return {
        "config": config,
        "rows": rows,
        **status,
        "changed": sum(not r["ok"] for r in rows),
        "compared": len(rows),
    }


def plot(results: dict) -> plt.Figure:
    names = sorted({r["experiment"] for r in results["rows"]})
    moved = [sum(not r["ok"] for r in results["rows"] if r["experiment"] == n) for n in names]
    same = [sum(r["ok"] for r in results["rows"] if r["experiment"] == n) for n in names]
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(names) + 1.5))
    ax.barh(names, same, color="C2", label="same")
    ax.barh(names, moved, left=same, color="C3", label="moved")
    ax.set(xlabel="conclusions", title=f"{results['changed']} of {results['compared']} moved")
    ax.legend()
    return fig


def main(argv=None) -> dict:
    results = experiment_main(
        NAME, Config, run, plot, argv, summary=lambda r: f"{r['changed']} of {r['compared']} moved"
    )
    if results["changed"]:
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    cli(main)
