"""Conclusion fields of an experiment's JSON, and their comparison across runs and machines.

An experiment marks what it concludes under the results key ``"conclusions"``: each entry is a
small dict made by :func:`verdict`, :func:`rate` or :func:`error`, so a comparison never needs a
hand-written list of keys. :func:`compare` checks two JSONs' conclusions under stated rules:

* a **verdict** (a string such as ``"reproduced"``) must be equal;
* a **rate** (a number measured over runs or seeds, with its per-run values) may move within the
  spread of its runs: the new mean must lie in ``[min, max]`` of the committed runs widened by
  ``RATE_SLACK`` of their range (a rate without spread must agree to ``RATE_RTOL``);
* an **error** (a float64 theorem-check error, round-off sized) must stay within an order of
  magnitude (``ERROR_FACTOR``), or both below ``ERROR_FLOOR``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

RATE_SLACK = 0.25  # of the committed runs' range: seeds of one machine bound another's
RATE_RTOL = 1e-6  # a rate without per-run values (deterministic) must agree to this
ERROR_FACTOR = 10.0  # "within an order of magnitude"
ERROR_FLOOR = 1e-12  # below this, float64 round-off errors are all equivalent


def verdict(value: str | None) -> dict[str, Any]:
    """A verdict conclusion (``None`` means undefined)."""
    return {"kind": "verdict", "value": value}


def rate(runs: Sequence[float] | float) -> dict[str, Any]:
    """A rate conclusion: the mean of per-run values, with the runs (a scalar: one value).

    Example:
      >>> rate([0.5, 0.7])["value"]
      0.6
    """
    values = np.atleast_1d(np.asarray(runs, dtype=float))
    out = {"kind": "rate", "value": float(values.mean())}
    if values.size > 1:
        out |= {"runs": values.tolist(), "min": float(values.min()), "max": float(values.max())}
    return out


def error(value: float) -> dict[str, Any]:
    """A round-off-sized error conclusion (a theorem check)."""
    return {"kind": "error", "value": float(value)}


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """Return one row per conclusion: ``name, kind, old, new, ok, rule``.

    Conclusions present on one side only are reported with ``ok = False``.

    Example:
      >>> rows = compare({"v": verdict("reproduced"), "r": rate([0.4, 0.6])},
      ...                {"v": verdict("reproduced"), "r": rate([0.55, 0.65])})
      >>> [(r["name"], r["ok"]) for r in rows]
      [('r', True), ('v', True)]
    """
    rows = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a is None or b is None:
            rows.append(
                {
                    "name": name,
                    "kind": (a or b)["kind"],
                    "old": a and a["value"],
                    "new": b and b["value"],
                    "ok": False,
                    "rule": "missing on one side",
                }
            )
            continue
        kind, ok, rule = a["kind"], False, ""
        if kind == "verdict":
            ok, rule = a["value"] == b["value"], "equal"
        elif kind == "rate":
            if "runs" in a:
                slack = RATE_SLACK * (a["max"] - a["min"])
                lo, hi = a["min"] - slack, a["max"] + slack
                ok, rule = lo <= b["value"] <= hi, f"within the runs' spread [{lo:.4g}, {hi:.4g}]"
            else:
                ok = bool(np.isclose(a["value"], b["value"], rtol=RATE_RTOL, atol=0.0))
                rule = f"equal to rtol {RATE_RTOL:g}"
        else:
            x, y = abs(a["value"]), abs(b["value"])
            ok = (x < ERROR_FLOOR and y < ERROR_FLOOR) or (
                max(x, y) <= ERROR_FACTOR * max(min(x, y), ERROR_FLOOR)
            )
            rule = f"within {ERROR_FACTOR:g}x (or both < {ERROR_FLOOR:g})"
        rows.append(
            {
                "name": name,
                "kind": kind,
                "old": a["value"],
                "new": b["value"],
                "ok": ok,
                "rule": rule,
            }
        )
    return rows
