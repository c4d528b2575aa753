"""Conclusion fields of an experiment's JSON, and their comparison across runs and machines.

An experiment marks what it concludes under the results key ``"conclusions"``: each entry is a
small dict made by :func:`verdict`, :func:`rate` or :func:`error`, so a comparison never needs a
hand-written list of keys. It declares them as data beside its ``Config``::

    CONCLUSIONS = {
        "max_rel_err": ("error", ("summary", "max_rel_err_autodiff")),
        "verdict": ("verdict", "verdict"),
        "refusal": ("rate", ("conditions", EACH_KEY, "refusal")),  # one rate per condition
    }

and passes them to ``experiment_main(..., conclusions=CONCLUSIONS)``, which resolves them
(:func:`resolve`) in the results and writes ``results["conclusions"]`` before saving. A path is a
key (one step) or a tuple of steps into the results:

* a dict key (``str``) or a list index (``int``, negative from the end);
* :data:`EACH_KEY` (``"*"``): one conclusion per key of the dict there, named ``name/key``;
* :data:`EACH_ITEM` (``"[]"``): the rest of the path is read in every item of the list there and
  the values are gathered into one list (per-run or per-seed values).

A list at the end of a path is reduced by the kind: a **verdict** over seeds is their common
verdict or :data:`UNSTABLE` (:func:`verdict_over_seeds`), a **rate** is the mean of its runs and
keeps them (its spread), an **error** is the largest. Results of a skipped experiment
(``"skipped": true``, e.g. a weights package absent) conclude only ``skipped``.

:func:`compare` checks two JSONs' conclusions under stated rules:

* a **verdict** (a string such as ``"reproduced"``, or a bool) must be equal; ``"unstable"`` (the
  seeds disagreed) equals only ``"unstable"``;
* a **rate** (a number measured over runs or seeds, with its per-run values) may move within the
  spread of its runs: the new mean must lie in ``[min, max]`` of the committed runs widened by
  ``RATE_SLACK`` of their range (a rate with a bound the experiment computed, e.g. from its
  round-off-sensitive runs, must lie within it; a rate without spread must agree to
  ``RATE_RTOL``); an undefined
  rate (``None``: every run undefined) equals only an undefined one;
* an **error** (a float64 theorem-check error, round-off sized) must stay within an order of
  magnitude (``ERROR_FACTOR``), or both below ``ERROR_FLOOR``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

RATE_SLACK = 0.25  # of the committed runs' range: seeds of one machine bound another's
RATE_RTOL = 1e-4  # a single-run rate (no seeds, no bound): round-off amplified by a statistic
ERROR_FACTOR = 10.0  # "within an order of magnitude"
ERROR_FLOOR = 1e-12  # below this, float64 round-off errors are all equivalent
UNSTABLE = "unstable"  # the verdict of seeds that disagree
EACH_KEY = "*"  # path step: one conclusion per key of a dict
EACH_ITEM = "[]"  # path step: the values of every item of a list, gathered into one list

#: A path into the results: one step, or a tuple of steps (keys, indices, wildcards).
Path = str | int | tuple[str | int, ...]
Verdict = str | bool | None


def verdict_over_seeds(verdicts: Sequence[Verdict]) -> Verdict:
    """Return the verdict every seed gave, or :data:`UNSTABLE` if the seeds disagree.

    Raises:
      ValueError: no verdicts.

    Example:
      >>> verdict_over_seeds(["reproduced", "reproduced"])
      'reproduced'
      >>> verdict_over_seeds(["reproduced", "not reproduced"])
      'unstable'
    """
    if len(verdicts) == 0:
        raise ValueError("verdicts must hold at least one per-seed verdict, got none")
    first = verdicts[0]
    return first if all(v == first for v in verdicts) else UNSTABLE


def verdict(value: Verdict | Sequence[Verdict]) -> dict[str, Any]:
    """A verdict conclusion (``None`` means undefined); a list is one verdict per seed.

    Raises:
      TypeError: a value (or a seed's) that is not a string, bool or ``None``.

    Example:
      >>> verdict(["yes", "no"])
      {'kind': 'verdict', 'value': 'unstable', 'runs': ['yes', 'no']}
    """
    if isinstance(value, list | tuple):
        runs = [_verdict_value(v) for v in value]
        return {"kind": "verdict", "value": verdict_over_seeds(runs), "runs": runs}
    return {"kind": "verdict", "value": _verdict_value(value)}


def _verdict_value(value: Any) -> Verdict:
    if value is not None and not isinstance(value, str | bool):
        raise TypeError(f"a verdict must be a string, bool or None, got {value!r}")
    return value


def rate(runs: Sequence[float | None] | float | None) -> dict[str, Any]:
    """A rate conclusion: the mean of per-run values, with the runs (a scalar: one value).

    Runs that are ``None`` (a statistic undefined in that run) are left out and counted as
    ``undefined_runs``; if every run is undefined the value is ``None``.

    Raises:
      TypeError: a run that is not a number (a bool counts as 0 or 1), or a nested list.

    A mapping ``{"value": v, "bound": b}`` is one value with a spread the experiment computed
    itself (e.g. the largest change float32 round-off can make): ``min``/``max`` are ``v -+ b``.

    Example:
      >>> rate([0.5, 0.7])["value"]
      0.6
      >>> rate([1.0, None])
      {'kind': 'rate', 'value': 1.0, 'undefined_runs': 1}
      >>> rate({"value": 0.7, "bound": 0.05})["max"]
      0.75
    """
    if isinstance(runs, Mapping):
        value, bound = runs.get("value"), runs.get("bound")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (value, bound)):
            raise TypeError(f"a bounded rate needs numbers 'value' and 'bound', got {runs!r}")
        if bound < 0:
            raise ValueError(f"a rate's bound must be >= 0, got {bound}")
        v, b = float(value), float(bound)
        return {"kind": "rate", "value": v, "bound": b, "min": v - b, "max": v + b}
    listed = list(runs) if isinstance(runs, list | tuple | np.ndarray) else [runs]
    for v in listed:
        if v is not None and not isinstance(v, int | float | np.number | np.bool_):
            raise TypeError(f"a rate's runs must be numbers or None, got {v!r}")
    values = np.asarray([float(v) for v in listed if v is not None], dtype=float)
    out: dict[str, Any] = {"kind": "rate", "value": float(values.mean()) if values.size else None}
    if values.size > 1:
        out |= {"runs": values.tolist(), "min": float(values.min()), "max": float(values.max())}
    if values.size < len(listed):
        out["undefined_runs"] = len(listed) - values.size
    return out


def error(value: float | Sequence[float]) -> dict[str, Any]:
    """A round-off-sized error conclusion (a theorem check); a list gives its largest ``|e|``.

    Raises:
      TypeError: a value that is not a number.
      ValueError: an empty list.

    Example:
      >>> error([1e-15, -3e-14])
      {'kind': 'error', 'value': 3e-14}
    """
    listed = list(value) if isinstance(value, list | tuple) else [value]
    if not listed:
        raise ValueError("an error conclusion needs at least one value, got an empty list")
    for v in listed:
        if isinstance(v, bool) or not isinstance(v, int | float | np.number):
            raise TypeError(f"an error must be a number, got {v!r}")
    return {"kind": "error", "value": float(max(abs(float(v)) for v in listed))}


#: Conclusion kinds and the function that makes each from a resolved value.
KINDS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "verdict": verdict,
    "rate": rate,
    "error": error,
}


def resolve(
    experiment: str, declared: Mapping[str, tuple[str, Path]], results: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Return the conclusions ``declared`` (name -> (kind, path)) read in ``results``.

    ``results`` holds plain JSON types (:func:`experiments.framework.output.to_jsonable`). See
    the module docstring for paths, wildcards and how a list is reduced by each kind.

    Raises:
      ValueError: an unknown kind, a path that is not in ``results`` or a value its kind cannot
        take (the message names the experiment, the conclusion and the path).

    Example:
      >>> results = {"rows": {"a": {"v": "yes"}, "b": {"v": "no"}}, "runs": [{"x": 1}, {"x": 3}]}
      >>> got = resolve("demo", {"v": ("verdict", ("rows", "*", "v")),
      ...                        "x": ("rate", ("runs", "[]", "x"))}, results)
      >>> sorted(got), got["v/a"]["value"], got["x"]["value"]
      (['v/a', 'v/b', 'x'], 'yes', 2.0)
    """
    if results.get("skipped") is True:
        return {"skipped": verdict(True)}
    out: dict[str, dict[str, Any]] = {}
    for name, (kind, path) in declared.items():
        steps = tuple(path) if isinstance(path, tuple | list) else (path,)
        where = f"{experiment}: conclusion {name!r} (path {steps!r})"
        if kind not in KINDS:
            raise ValueError(f"{where}: kind must be one of {sorted(KINDS)}, got {kind!r}")
        for label, value in _walk(results, steps, (), name, where):
            try:
                out[label] = KINDS[kind](value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{where}: {label!r} cannot be a {kind}: {err}") from None
    return out


def _walk(
    node: Any, steps: tuple, done: tuple, label: str, where: str
) -> Iterator[tuple[str, Any]]:
    """Yield ``(label, value)`` for the path ``steps`` from ``node`` (``done``: steps taken)."""
    if not steps:
        yield label, node
        return
    step, rest = steps[0], steps[1:]
    if step == EACH_KEY:
        if not isinstance(node, dict):
            raise ValueError(f"{where}: {EACH_KEY!r} needs a dict at {done!r}, got {_kind(node)}")
        for key, sub in node.items():
            yield from _walk(sub, rest, (*done, key), f"{label}/{key}", where)
    elif step == EACH_ITEM:
        if not isinstance(node, list):
            raise ValueError(f"{where}: {EACH_ITEM!r} needs a list at {done!r}, got {_kind(node)}")
        values = []
        for i, item in enumerate(node):
            found = list(_walk(item, rest, (*done, i), label, where))
            if len(found) != 1 or found[0][0] != label:
                raise ValueError(f"{where}: {EACH_KEY!r} cannot follow {EACH_ITEM!r}")
            values.append(found[0][1])
        yield label, values
    elif _has(node, step):
        yield from _walk(node[step], rest, (*done, step), label, where)
    else:
        there = f"keys {sorted(node)}" if isinstance(node, dict) else _kind(node)
        raise ValueError(f"{where}: no {step!r} at {done!r} ({there})")


def _has(node: Any, step: Any) -> bool:
    """Whether ``node[step]`` is a dict's key or a list's index (a bool is neither)."""
    if isinstance(node, dict):
        return isinstance(step, str) and step in node
    index = isinstance(step, int) and not isinstance(step, bool)
    return isinstance(node, list) and index and -len(node) <= step < len(node)


def _kind(node: Any) -> str:
    return f"a list of {len(node)}" if isinstance(node, list) else type(node).__name__


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """Return one row per conclusion: ``name, kind, old, new, ok, rule``.

    Conclusions present on one side only, or of another kind on each side, are reported with
    ``ok = False``.

    Example:
      >>> rows = compare({"v": verdict("reproduced"), "r": rate([0.4, 0.6])},
      ...                {"v": verdict("reproduced"), "r": rate([0.55, 0.65])})
      >>> [(r["name"], r["ok"]) for r in rows]
      [('r', True), ('v', True)]
    """
    rows = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a is None or b is None or a["kind"] != b["kind"]:
            rows.append(
                {
                    "name": name,
                    "kind": (a or b)["kind"],
                    "old": a and a["value"],
                    "new": b and b["value"],
                    "ok": False,
                    "rule": "kind changed" if a and b else "missing on one side",
                }
            )
            continue
        kind, x, y = a["kind"], a["value"], b["value"]
        ok, rule = _same(kind, a, x, y)
        rows.append({"name": name, "kind": kind, "old": x, "new": y, "ok": ok, "rule": rule})
    return rows


def _same(kind: str, a: dict[str, Any], x: Any, y: Any) -> tuple[bool, str]:
    """``(ok, rule)`` of one conclusion of ``kind``: committed ``a`` (value ``x``), new ``y``."""
    if kind == "verdict":
        return x == y, f"equal ({UNSTABLE!r}: seeds disagree)" if UNSTABLE in (x, y) else "equal"
    if x is None or y is None:
        return x is None and y is None, "undefined on both sides"
    if kind == "rate":
        if "bound" in a:  # the experiment's own spread bound: within it
            return bool(
                a["min"] <= y <= a["max"]
            ), f"within its bound [{a['min']:.4g}, {a['max']:.4g}]"
        if "runs" in a:
            slack = RATE_SLACK * (a["max"] - a["min"])
            lo, hi = a["min"] - slack, a["max"] + slack
            return bool(lo <= y <= hi), f"within the runs' spread [{lo:.4g}, {hi:.4g}]"
        ok = bool(np.isclose(x, y, rtol=RATE_RTOL, atol=0.0))
        return ok, f"equal to rtol {RATE_RTOL:g}"
    x, y = abs(x), abs(y)
    ok = (x < ERROR_FLOOR and y < ERROR_FLOOR) or (
        max(x, y) <= ERROR_FACTOR * max(min(x, y), ERROR_FLOOR)
    )
    return ok, f"within {ERROR_FACTOR:g}x (or both < {ERROR_FLOOR:g})"
