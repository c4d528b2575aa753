"""Prompts for the refusal experiment and their seeded, stratified train/test split.

The prompt texts live in two modules and are re-exported here:

* :data:`GENERAL_INSTRUCTIONS` (:mod:`sims.data.general_instructions`): benign instructions,
  written for this project in the style of AlpacaFarm / UltraFeedback instructions; no text is
  copied from those datasets.
* :data:`UNSAFE_REQUESTS`, :data:`SORRY_BENCH_CATEGORIES`, :data:`SORRY_BENCH_DOMAINS`
  (:mod:`sims.data.unsafe_requests`): ``(category, request)`` pairs over SORRY-Bench's 44
  fine-grained categories (Xie et al. 2024). The category names are paraphrased from the paper's
  taxonomy; the requests are newly written, not SORRY-Bench's own prompts.

:func:`split_train_test` makes the 85% / 15% train/test split of Razin et al. 2024, §6.1.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from sims.data.general_instructions import GENERAL_INSTRUCTIONS
from sims.data.unsafe_requests import SORRY_BENCH_CATEGORIES, SORRY_BENCH_DOMAINS, UNSAFE_REQUESTS

__all__ = [
    "GENERAL_INSTRUCTIONS",
    "SORRY_BENCH_CATEGORIES",
    "SORRY_BENCH_DOMAINS",
    "UNSAFE_REQUESTS",
    "split_train_test",
]

Item = TypeVar("Item", str, tuple[str, str])


def _check_items(items: Sequence[Item]) -> bool:
    """Validate ``items``; return whether they are ``(category, text)`` pairs."""
    if isinstance(items, str) or not isinstance(items, Sequence):
        raise ValueError(
            f"items must be a sequence of strings or of (category, text) pairs, "
            f"got {type(items).__name__}"
        )
    if len(items) < 2:
        raise ValueError(f"items must hold at least 2 items to split, got {len(items)}")
    pairs = not isinstance(items[0], str)
    for i, item in enumerate(items):
        if pairs:
            ok = (
                isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item)
            )
        else:
            ok = isinstance(item, str)
        if not ok:
            kind = "(category, text) pairs of strings" if pairs else "strings"
            raise ValueError(
                f"items must be all strings or all (category, text) pairs of strings; items[0] "
                f"makes them {kind}, but items[{i}] is {item!r}"
            )
    if len(set(items)) != len(items):
        dup = next(x for i, x in enumerate(items) if x in items[:i])
        raise ValueError(f"items must not contain duplicates (they would leak), got {dup!r} twice")
    return pairs


def _test_counts(sizes: np.ndarray, n_test: int, rng: np.random.Generator) -> np.ndarray:
    """Return how many items of each category go to test (largest remainder, capped)."""
    # A category with k >= 2 items keeps at least one in train; a singleton may go to test.
    cap = np.where(sizes >= 2, sizes - 1, 1)
    quota = n_test * sizes / sizes.sum()
    counts = np.minimum(np.floor(quota).astype(int), cap)
    # Hand the remaining test slots to the largest remainders; ties broken by a seeded shuffle.
    tiebreak = rng.permutation(len(sizes))
    order = sorted(range(len(sizes)), key=lambda c: (-(quota[c] - counts[c]), tiebreak[c]))
    while counts.sum() < n_test:
        open_ = [c for c in order if counts[c] < cap[c]]
        for c in open_[: n_test - counts.sum()]:
            counts[c] += 1
    return counts


def split_train_test(
    items: Sequence[Item], *, test_fraction: float = 0.15, seed: int = 0
) -> tuple[tuple[Item, ...], tuple[Item, ...]]:
    r"""Return a seeded ``(train, test)`` split of ``items``, stratified by category for pairs.

    The test part holds :math:`n_{\text{test}} = \lfloor f\,n + 1/2 \rfloor` of the :math:`n`
    items (:math:`f` = ``test_fraction``, rounded half up). For ``(category, text)`` pairs each
    category :math:`c` with :math:`n_c` items sends about :math:`f\,n_c` to test: floors of
    :math:`n_{\text{test}}\,n_c/n` first, the remaining slots to the largest remainders (ties in a
    seeded random order), and a category with :math:`n_c \ge 2` keeps at least one item in train.
    Which items of a category go to test is a seeded permutation. Both parts keep the input order.

    Source: Razin et al. 2024, §6.1 / App. H.3 ("85%/15% train/test split" of the SORRY-Bench
    prompts). Reading: the paper does not say the split is stratified; stratifying by category
    keeps every category of :data:`SORRY_BENCH_CATEGORIES` in the training set.

    Args:
      items: ``Sequence`` of ``str`` (split unstratified) or of ``(category, text)`` pairs of
        ``str`` (stratified by ``category``); at least 2 items, no duplicates.
      test_fraction: fraction of items in the test part, in ``(0, 1)``; it must put at least one
        item in each part.
      seed: non-negative ``int`` seed of the ``numpy`` generator; same seed, same split.

    Returns:
      ``(train, test)``, two disjoint tuples whose union is ``items``.

    Raises:
      ValueError: ``items`` is not a sequence of strings or of string pairs, mixes the two, has
        fewer than 2 items or a duplicate; ``test_fraction`` is not a number in ``(0, 1)`` or
        leaves a part empty; ``seed`` is not a non-negative ``int``; or the categories' caps
        leave fewer than :math:`n_{\text{test}}` items available for test.

    Example:
      >>> train, test = split_train_test(UNSAFE_REQUESTS, test_fraction=0.15, seed=0)
      >>> len(train), len(test)
      (127, 23)
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real):
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    if not (math.isfinite(test_fraction) and 0 < test_fraction < 1):
        raise ValueError(f"test_fraction must be in (0, 1), got test_fraction={test_fraction}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got seed={seed!r}")
    pairs = _check_items(items)
    n = len(items)
    n_test = math.floor(test_fraction * n + 0.5)
    if not 1 <= n_test <= n - 1:
        raise ValueError(
            f"test_fraction must put at least one of the {n} items in each part, got "
            f"test_fraction={test_fraction} (round(test_fraction * n) = {n_test}); use a value "
            f"in [{0.5 / n:.3g}, {1 - 0.5 / n:.3g})"
        )
    rng = np.random.default_rng(int(seed))
    labels = [item[0] for item in items] if pairs else ["" for _ in items]
    categories = list(dict.fromkeys(labels))  # order of first appearance
    members = {c: [i for i, lab in enumerate(labels) if lab == c] for c in categories}
    sizes = np.array([len(members[c]) for c in categories])
    available = int(np.where(sizes >= 2, sizes - 1, 1).sum())
    if n_test > available:
        raise ValueError(
            f"test_fraction={test_fraction} asks for {n_test} test items, but keeping one item "
            f"of every category with >= 2 items in train leaves only {available}; use a smaller "
            f"test_fraction"
        )
    counts = _test_counts(sizes, n_test, rng)
    test_idx: set[int] = set()
    for c, k in zip(categories, counts, strict=True):
        chosen = rng.permutation(len(members[c]))[:k]
        test_idx.update(members[c][j] for j in chosen)
    train = tuple(x for i, x in enumerate(items) if i not in test_idx)
    test = tuple(x for i, x in enumerate(items) if i in test_idx)
    return train, test
