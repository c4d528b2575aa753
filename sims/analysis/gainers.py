r"""Which tokens gain probability: top gainers, label sets of first tokens, largest decreases.

The single-token protocol of Razin et al. 2024 (§3, Tables 1 and 4-12) reports, for each run,
the tokens among the top-3 probability *increases* since the start of DPO at steps 5, 25 and
100, and classifies them: *benign* if similar in meaning to :math:`y^+` (the same label set),
*catastrophic* if opposite (the other label set). Its tables group a word's case and
leading-space variants (``Yes``, ``_Yes``, ``yes``, ``YES``).

Label words may be several tokens long (``Absolutely`` is two in SmolLM2's vocabulary): a word
is recognised among the gainers by its **first token** -- the next-token distribution only ever
shows first tokens. :func:`label_token_groups` maps every first token of a word's variants
(``w``, ``w.lower()``, ``w.capitalize()``, ``w.upper()``, each with and without a leading space)
to the word's group and set; :func:`top_gainers` builds the Tables 4-12 lists;
:func:`largest_decrease` is Table 1's number.

Reading: a first token shared by two words of different sets (``Ne`` of ``Never`` and ``Nearly``
would be one) is claimed by the set listed first; :func:`label_token_groups` reports such
clashes so an experiment can state them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

#: Case variants of a label word that the paper's tables group together.
CASE_VARIANTS: tuple[Callable[[str], str], ...] = (
    lambda w: w,
    str.lower,
    str.capitalize,
    str.upper,
)


class TokenGroup(NamedTuple):
    """The label word a first token stands for.

    Attributes:
      word: the label word as given (``"Absolutely"``).
      label_set: the name of its set (``"yes"``).
    """

    word: str
    label_set: str


class LabelTokens(NamedTuple):
    """First tokens of label words.

    Attributes:
      groups: token id -> :class:`TokenGroup`.
      clashes: ``(token id, set kept, set dropped)`` for first tokens claimed by two sets.
    """

    groups: dict[int, TokenGroup]
    clashes: list[tuple[int, str, str]]


def label_token_groups(
    encode: Callable[[str], Sequence[int]], label_sets: Mapping[str, Sequence[str]]
) -> LabelTokens:
    """Return the first token of every case / leading-space variant of every label word.

    Args:
      encode: ``text -> token ids`` without special tokens (e.g.
        ``lambda s: tokenizer.encode(s, add_special_tokens=False).ids``).
      label_sets: set name -> words (``{"no": NO_SET, "yes": YES_SET}``); earlier sets win a
        shared first token.

    Returns:
      :class:`LabelTokens`.

    Raises:
      ValueError: a word that encodes to no token.

    Example:
      >>> vocab = {"No": 0, " No": 1, "no": 2, " no": 3, "NO": 4, " NO": 5, "Y": 6, "es": 7}
      >>> def encode(s):
      ...     return [vocab[s]] if s in vocab else [6, 7]
      >>> lt = label_token_groups(encode, {"no": ["No"], "yes": ["Yes"]})
      >>> sorted(lt.groups)[:6], lt.groups[6]
      ([0, 1, 2, 3, 4, 5], TokenGroup(word='Yes', label_set='yes'))
    """
    groups: dict[int, TokenGroup] = {}
    clashes: list[tuple[int, str, str]] = []
    for set_name, words in label_sets.items():
        for word in words:
            for variant in CASE_VARIANTS:
                for space in ("", " "):
                    ids = list(encode(space + variant(word)))
                    if not ids:
                        raise ValueError(f"label word {word!r} encodes to no token")
                    first = int(ids[0])
                    if first in groups and groups[first].label_set != set_name:
                        clashes.append((first, groups[first].label_set, set_name))
                        continue
                    groups.setdefault(first, TokenGroup(word, set_name))
    return LabelTokens(groups, clashes)


def largest_decrease(series: Any, axis: int = -1) -> np.ndarray:
    r"""Return the largest decrease of ``series`` between two steps along ``axis``.

    .. math:: \mathrm{drop} = \max_{t < t'} \big(x_t - x_{t'}\big)
              = \max_{t'} \big(\max_{t \le t'} x_t - x_{t'}\big)

    Source: Razin et al. 2024, Table 1 ("largest decrease between any two, not necessarily
    consecutive, steps"). ``0`` for a series that never falls.

    Example:
      >>> float(largest_decrease([0.2, 0.9, 0.5, 0.7, 0.1]))
      0.8
    """
    x = np.asarray(series, dtype=float)
    return np.max(np.maximum.accumulate(x, axis=axis) - x, axis=axis)


def decrease_bounds(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return per run ``(drop, p[t], p[t'])``: :func:`largest_decrease` of ``p`` ``[R, steps]``
    and the values it falls from and to.

    Example:
      >>> drop, peak, trough = decrease_bounds(np.array([[0.2, 0.9, 0.5, 0.7, 0.1]]))
      >>> float(drop[0]), float(peak[0]), float(trough[0])
      (0.8, 0.9, 0.1)
    """
    p = np.asarray(p, dtype=float)
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"p must have shape [R, steps] with steps >= 1, got {p.shape}")
    running = np.maximum.accumulate(p, axis=1)
    later = np.argmax(running - p, axis=1)  # t' of the largest decrease
    rows = np.arange(p.shape[0])
    return (running - p)[rows, later], running[rows, later], p[rows, later]


class Gainer(NamedTuple):
    """One row of a Tables 4-12 list.

    Attributes:
      token: the token's text.
      mean_increase: mean probability increase over the runs where it was a top gainer.
      count: number of (selected) runs in which it was among the top ``k``.
      group: the label word it stands for (``""`` if none).
      label_set: the word's set (``""`` if none).
    """

    token: str
    mean_increase: float
    count: int
    group: str
    label_set: str


def top_gainers(
    increase: np.ndarray,
    token_text: Callable[[int], str],
    groups: Mapping[int, TokenGroup],
    runs: np.ndarray | None = None,
    *,
    k: int = 3,
) -> tuple[list[Gainer], np.ndarray]:
    """Return the Tables 4-12 list of the top-``k`` probability gains, and each run's top ``k``.

    Args:
      increase: ``[R, V]`` probability increase of every token since the start.
      token_text: token id -> display text.
      groups: first-token groups (:func:`label_token_groups`).
      runs: ``[R]`` bools selecting the runs to list (the paper's stable runs); default all.
      k: how many top gainers per run.

    Returns:
      ``(rows, top)``: rows sorted by count then mean increase; ``top`` ``[R, k]`` token ids of
      every run (selected or not), largest gain first.

    Example:
      >>> inc = np.array([[0.5, 0.1, 0.3], [0.2, 0.4, 0.0]])
      >>> rows, top = top_gainers(inc, str, {0: TokenGroup("Yes", "yes")}, k=1)
      >>> [(r.token, r.count, r.label_set) for r in rows], top.tolist()
      ([('0', 1, 'yes'), ('1', 1, '')], [[0], [1]])
    """
    increase = np.asarray(increase, dtype=float)
    if increase.ndim != 2:
        raise ValueError(f"increase must have shape [R, V], got {increase.shape}")
    R = increase.shape[0]
    runs = np.ones(R, bool) if runs is None else np.asarray(runs, bool)
    top = np.argsort(-increase, axis=1, kind="stable")[:, :k]
    table: dict[int, list[float]] = {}
    for r in np.flatnonzero(runs):
        for z in top[r]:
            table.setdefault(int(z), []).append(float(increase[r, z]))
    rows = []
    for z, values in table.items():
        group = groups.get(z)
        rows.append(
            Gainer(
                token_text(z),
                float(np.mean(values)),
                len(values),
                group.word if group else "",
                group.label_set if group else "",
            )
        )
    rows.sort(key=lambda g: (-g.count, -g.mean_increase, g.token))
    return rows, top


def runs_with_set_gainer(top: np.ndarray, groups: Mapping[int, TokenGroup], label_set: str):
    """Return ``[R]`` bools: some token of ``label_set`` is among each run's top gainers.

    Example:
      >>> runs_with_set_gainer(np.array([[0, 1], [2, 3]]), {3: TokenGroup("Yes", "yes")}, "yes")
      array([False,  True])
    """
    top = np.asarray(top)
    return np.array(
        [
            any(groups.get(int(z), TokenGroup("", "")).label_set == label_set for z in row)
            for row in top
        ],
        dtype=bool,
    )


def gainers_at(
    probs: Any, names: Sequence[str], *, k: int, checkpoints: Sequence[int]
) -> list[list[tuple[str, float]]]:
    """Return, at each checkpoint index, the ``k`` tokens whose probability rose most since row 0
    (one run; :func:`top_gainers` tabulates many runs).

    ``probs`` is ``[C + 1, V]`` (row 0 the start). Entries are ``(name, gain)``.

    Example:
      >>> gainers_at([[0.5, 0.5], [0.2, 0.8]], ["a", "b"], k=1, checkpoints=[1])
      [[('b', 0.30000000000000004)]]
    """
    p = np.asarray(probs)
    out = []
    for c in checkpoints:
        gain = p[c] - p[0]
        out.append([(names[i], float(gain[i])) for i in np.argsort(-gain, kind="stable")[:k]])
    return out
