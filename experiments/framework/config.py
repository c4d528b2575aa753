"""Experiment configs that validate themselves: rules per field, errors that name the flag.

Validation happens when a config is built (:meth:`ExperimentConfig.__post_init__`): each field's
type, then its rule -- the one in the class's ``RULES`` (``{"loss_types": each(one_of(...))}``,
``{"pairs": existing_file()}``), else the default (counts >= 1, numbers > 0, a number whose default
is 0 >= 0, ``seed`` >= 0); errors name the flag. Input paths are thus checked before any experiment
starts.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import math
import os
import tokenize
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import matplotlib

matplotlib.use("Agg")

from sims.errors import InputError  # noqa: E402


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
