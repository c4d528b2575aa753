"""Conclusions of an experiment's JSON (experiments/framework/conclusions.py): paths and
wildcards resolve or raise, seeds that disagree give "unstable", and each comparison rule passes
a case inside it and fails one outside it. Plus: every experiment declares its conclusions and
passes them to ``experiment_main``."""

import importlib

import pytest

from experiments import EXPERIMENTS, EXTENDED, framework
from experiments.framework import conclusions as cn

RESULTS = {
    "verdict": "reproduced",
    "summary": {"err": 3e-15, "rows": {"a": {"rate": 0.5}, "b": {"rate": 0.25}}},
    "seeds": [{"verdict": "yes", "rate": 0.5}, {"verdict": "yes", "rate": 1.0}],
    "mixed": [{"verdict": "yes"}, {"verdict": "no"}, {"verdict": "yes"}],
}


def test_resolve_reads_a_key_a_path_and_an_index():
    got = cn.resolve(
        "demo",
        {
            "v": ("verdict", "verdict"),
            "e": ("error", ("summary", "err")),
            "last": ("rate", ("seeds", -1, "rate")),
        },
        RESULTS,
    )
    assert got == {
        "v": {"kind": "verdict", "value": "reproduced"},
        "e": {"kind": "error", "value": 3e-15},
        "last": {"kind": "rate", "value": 1.0},
    }


@pytest.mark.parametrize(
    "path,match",
    [
        ("nope", r"no 'nope' at \(\)"),
        (("summary", "rows", "c"), r"no 'c' at \('summary', 'rows'\)"),
        (("seeds", 2, "rate"), r"no 2 at \('seeds',\)"),
        (("verdict", "*"), r"'\*' needs a dict at \('verdict',\), got str"),
        (("summary", "[]"), r"'\[\]' needs a list at \('summary',\), got dict"),
    ],
)
def test_resolve_rejects_a_missing_path(path, match):
    with pytest.raises(ValueError, match=r"demo: conclusion 'x' .*" + match):
        cn.resolve("demo", {"x": ("rate", path)}, RESULTS)


def test_resolve_rejects_an_unknown_kind_and_a_wrong_value():
    with pytest.raises(ValueError, match=r"kind must be one of \['error', 'rate', 'verdict'\]"):
        cn.resolve("demo", {"x": ("share", "verdict")}, RESULTS)
    with pytest.raises(ValueError, match="'x' cannot be a rate: a rate's runs must be numbers"):
        cn.resolve("demo", {"x": ("rate", "verdict")}, RESULTS)


def test_each_key_gives_one_conclusion_per_key():
    got = cn.resolve("demo", {"r": ("rate", ("summary", "rows", cn.EACH_KEY, "rate"))}, RESULTS)
    assert got == {"r/a": cn.rate(0.5), "r/b": cn.rate(0.25)}


def test_each_item_gathers_the_runs_into_one_conclusion():
    got = cn.resolve("demo", {"r": ("rate", ("seeds", cn.EACH_ITEM, "rate"))}, RESULTS)
    # mean of 0.5 and 1.0, with its spread
    assert got == {"r": {"kind": "rate", "value": 0.75, "runs": [0.5, 1.0], "min": 0.5, "max": 1.0}}


def test_each_key_after_each_item_is_refused():
    results = {"seeds": [{"a": 1.0}, {"a": 2.0}]}
    with pytest.raises(ValueError, match=r"'\*' cannot follow '\[\]'"):
        cn.resolve("demo", {"r": ("rate", ("seeds", cn.EACH_ITEM, cn.EACH_KEY))}, results)


def test_verdict_over_seeds_agreeing_and_disagreeing():
    same = cn.resolve("demo", {"v": ("verdict", ("seeds", "[]", "verdict"))}, RESULTS)["v"]
    assert same == {"kind": "verdict", "value": "yes", "runs": ["yes", "yes"]}
    mixed = cn.resolve("demo", {"v": ("verdict", ("mixed", "[]", "verdict"))}, RESULTS)["v"]
    assert mixed["value"] == cn.UNSTABLE and mixed["runs"] == ["yes", "no", "yes"]
    assert cn.verdict_over_seeds([True, True, False]) == cn.UNSTABLE
    with pytest.raises(ValueError, match="at least one per-seed verdict"):
        cn.verdict_over_seeds([])


def test_resolve_of_a_skipped_experiment_concludes_only_skipped():
    got = cn.resolve("demo", {"x": ("rate", "absent")}, {"skipped": True, "install": "pip"})
    assert got == {"skipped": cn.verdict(True)}


def test_kinds_reduce_lists_and_refuse_bad_values():
    assert cn.error([1e-15, -3e-14])["value"] == 3e-14  # the largest |e|
    assert cn.rate([None, None]) == {"kind": "rate", "value": None, "undefined_runs": 2}
    with pytest.raises(TypeError, match="a verdict must be a string, bool or None, got 0.5"):
        cn.verdict(0.5)
    with pytest.raises(TypeError, match="an error must be a number, got True"):
        cn.error(True)
    with pytest.raises(ValueError, match="needs at least one value"):
        cn.error([])


def _ok(old, new):
    (row,) = cn.compare({"c": old}, {"c": new})
    return row["ok"]


def test_compare_verdicts_must_be_equal():
    assert _ok(cn.verdict("reproduced"), cn.verdict("reproduced"))
    assert not _ok(cn.verdict("reproduced"), cn.verdict("not reproduced"))
    assert not _ok(cn.verdict(["yes", "yes"]), cn.verdict(["yes", "no"]))  # became unstable
    assert _ok(cn.verdict(["yes", "no"]), cn.verdict(["no", "yes"]))  # unstable on both


def test_compare_rates_within_the_widened_seed_range():
    old = cn.rate([0.4, 0.6])  # range 0.2, widened by RATE_SLACK = 0.25 of it: [0.35, 0.65]
    assert _ok(old, cn.rate([0.62, 0.66]))  # mean 0.64
    assert not _ok(old, cn.rate([0.64, 0.68]))  # mean 0.66
    assert not _ok(old, cn.rate([0.3, 0.38]))  # mean 0.34


def test_compare_rates_without_spread_must_agree_to_rtol():
    assert _ok(cn.rate(0.5), cn.rate(0.5 * (1 + 0.5 * cn.RATE_RTOL)))
    assert not _ok(cn.rate(0.5), cn.rate(0.5 * (1 + 2 * cn.RATE_RTOL)))
    assert _ok(cn.rate([None]), cn.rate([None, None]))  # undefined on both sides
    assert not _ok(cn.rate([None]), cn.rate(0.5))


def test_compare_errors_within_a_factor_ten_or_both_below_the_floor():
    assert _ok(cn.error(1e-10), cn.error(9e-10))
    assert not _ok(cn.error(1e-10), cn.error(1.1e-9))
    assert not _ok(cn.error(1e-9), cn.error(0.9e-10))  # either direction
    assert _ok(cn.error(0.0), cn.error(9e-13))  # both below ERROR_FLOOR = 1e-12
    assert not _ok(cn.error(0.0), cn.error(1.1e-11))  # 11x the floor


def test_compare_reports_missing_and_changed_kinds():
    rows = cn.compare({"a": cn.rate(1.0), "b": cn.error(0.0)}, {"a": cn.verdict("x")})
    assert [(r["name"], r["ok"], r["rule"]) for r in rows] == [
        ("a", False, "kind changed"),
        ("b", False, "missing on one side"),
    ]


@pytest.mark.parametrize("name", EXPERIMENTS + EXTENDED)
def test_every_experiment_passes_its_conclusions(name, monkeypatch):
    """``main`` hands the module's non-empty ``CONCLUSIONS`` to ``experiment_main``."""
    module = importlib.import_module(f"experiments.{name}")
    assert isinstance(module.CONCLUSIONS, dict) and module.CONCLUSIONS, name
    seen = {}

    class Stop(Exception):
        pass

    def fake_main(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(framework, "experiment_main", fake_main)  # called as fw.experiment_main
    if hasattr(module, "experiment_main"):
        monkeypatch.setattr(module, "experiment_main", fake_main)
    with pytest.raises(Stop):
        module.main(["--smoke"])
    assert seen.get("conclusions") is module.CONCLUSIONS


def test_bounded_rate_must_stay_within_the_experiments_own_bound():
    """A rate with a bound the experiment computed (phase diagram: round-off-sensitive runs /
    resolved runs) passes inside ``value -+ bound`` and fails outside; bad bounds are refused."""
    committed = cn.rate({"value": 0.70, "bound": 0.05})
    assert (committed["min"], committed["max"]) == pytest.approx((0.65, 0.75))
    assert _ok(committed, cn.rate({"value": 0.74, "bound": 0.05}))
    assert not _ok(committed, cn.rate({"value": 0.76, "bound": 0.05}))
    with pytest.raises(ValueError, match="bound must be >= 0"):
        cn.rate({"value": 0.7, "bound": -0.1})
    with pytest.raises(TypeError, match="needs numbers"):
        cn.rate({"value": "0.7", "bound": 0.1})
