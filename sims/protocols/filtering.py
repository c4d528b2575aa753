r"""The §6 data filter of Razin et al. 2024: audit every row of a preference file, keep the least
similar ones.

:func:`audit_rows` encodes TRL-style rows for a checkpoint
(:func:`sims.data.preferences.encode_preferences`) and audits every pair
(:func:`sims.analysis.audit.audit_pairs`: CHES, length-normalised CHES, the exact
:math:`\frac{d}{dt}\ln\pi(y^+|x)` at ``t = 0`` of DPO on the pair alone, the predicted gainers of
single-token pairs); it returns one JSON-ready record per usable row. :func:`lowest_ches_lines`
is the filter (the paper kept the 5% of pairs with the lowest length-normalised CHES), and
:func:`write_audit_files` writes the records as CSV and JSONL, and the filtered rows.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from sims.analysis.audit import PairAudit, audit_pairs
from sims.data.preferences import (
    BadRow,
    PreferenceRow,
    encode_for_checkpoint,
    warn_over_context,
    write_preference_jsonl,
)
from theory.losses import make_loss

#: The numbers of a record, in the order of the CSV columns (fields of :class:`PairAudit`).
RECORD_NUMBERS = (
    "ches",
    "ches_ln",
    "edit_distance",
    "last_inner",
    "logprob_chosen",
    "logprob_rejected",
    "velocity_chosen",
    "velocity_rejected",
)


class AuditedRows(NamedTuple):
    """The audit of the usable rows of a preference file.

    Attributes:
      records: one dict per audited row, in input order: ``line``, the numbers of
        :data:`RECORD_NUMBERS`, ``single_token`` (both responses one token) and ``gainers``
        (``[{"token", "rate"}]`` of the top-``k`` predicted gainers for single-token pairs, else
        ``None``).
      audit: the :class:`~sims.analysis.audit.PairAudit` (arrays ``[N]``).
      lines: ``[N]`` the audited rows' 1-based line numbers.
      bad: rows skipped while encoding (tokenizer failures, over-long, empty after tokenizing).
    """

    records: list[dict[str, Any]]
    audit: PairAudit
    lines: np.ndarray
    bad: list[BadRow]


def audit_rows(
    checkpoint: Any,
    rows: Sequence[PreferenceRow],
    *,
    beta: float,
    max_len: int,
    batch_size: int = 8,
    top_k: int = 5,
    progress: Callable[[str], None] | None = None,
) -> AuditedRows:
    r"""Return the :class:`AuditedRows` of ``rows`` on ``checkpoint``, for DPO with ``beta``.

    Each row is tokenized as the checkpoint's template says (plain concatenation without one),
    its responses end with the EOS token, padding uses the pad token (id 0 without one); then
    :func:`~sims.analysis.audit.audit_pairs` gives, per pair,
    :math:`\frac{d}{dt}\ln\pi(y^+|x)\big|_{t=0} = \langle\nabla_\theta\ln\pi(y^+|x),
    -\nabla_\theta\ell_{\mathrm{DPO}}\rangle` and the CHES scores.

    Source: Razin et al. 2024, Definitions 2-3 (CHES) and Eq. 7 (the velocity), §6 (the audit
    of a data set before training).

    Args:
      checkpoint: an :class:`~sims.checkpoints.opened.OpenedCheckpoint` (model, tokenizer,
        special tokens, chat template).
      rows: usable rows (:func:`sims.checkpoints.selfmade.read_pairs`).
      beta: DPO KL coefficient, ``> 0``.
      max_len: longest sequence (prompt + response + EOS), tokens; longer rows go to ``bad``.
      batch_size, top_k: as :func:`~sims.analysis.audit.audit_pairs`.
      progress: called with a progress line after every chunk and with
        ``"[audit] skipped line N: reason"`` for each row that cannot be encoded (e.g. ``print``).

    Raises:
      InputError: no row could be encoded.
      ValueError: as :func:`~sims.analysis.audit.audit_pairs` (``beta <= 0``, bad ``top_k``).
    """
    enc = encode_for_checkpoint(checkpoint, rows, max_len=max_len)
    for b in enc.bad if progress is not None else ():
        progress(f"[audit] skipped line {b.line}: {b.reason}")
    warn_over_context(enc.chosen, enc.rejected, enc.lines, checkpoint.model)
    loss = make_loss("dpo", beta=beta)
    audit = audit_pairs(
        checkpoint.model,
        enc.chosen,
        enc.rejected,
        loss,
        batch_size=batch_size,
        top_k=top_k,
        progress=progress,
    )
    single = np.all(enc.response_tokens == 1, axis=1)
    records = []
    for i, line in enumerate(enc.lines.tolist()):
        gainers = None
        if single[i]:
            top = zip(audit.gainers[i], audit.gainer_rates[i], strict=True)
            name = checkpoint.tokenizer.id_to_token
            gainers = [{"token": name(int(z)), "rate": float(v)} for z, v in top]
        numbers = {k: float(getattr(audit, k)[i]) for k in RECORD_NUMBERS}
        records.append(
            {"line": line, **numbers, "single_token": bool(single[i]), "gainers": gainers}
        )
    return AuditedRows(records, audit, enc.lines, enc.bad)


def lowest_ches_lines(audited: AuditedRows, fraction: float) -> list[int]:
    r"""Return the sorted line numbers of the ``ceil(fraction * N)`` pairs of lowest ln-CHES.

    The §6 filter: the pairs least likely to displace their preferred response are those whose
    preferred and dispreferred responses are least similar (lowest length-normalised CHES). Ties
    go to the earlier row; ``fraction = 0`` keeps none.

    Source: Razin et al. 2024, §6 (the filtered data set kept 5% of the pairs).

    Raises:
      ValueError: ``fraction`` outside ``[0, 1]``.

    Example:
      >>> audit = PairAudit(*([np.array([0.3, -1.0, 0.2])] * 10))
      >>> lowest_ches_lines(AuditedRows([], audit, np.array([4, 7, 9]), []), 0.5)
      [7, 9]
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got fraction={fraction!r}")
    keep = math.ceil(fraction * len(audited.lines))
    order = np.argsort(audited.audit.ches_ln, kind="stable")[:keep]
    return sorted(np.asarray(audited.lines)[order].tolist())


def write_audit_files(
    folder: str | Path,
    name: str,
    audited: AuditedRows,
    rows: Sequence[PreferenceRow] = (),
    kept: Sequence[int] = (),
) -> list[Path]:
    """Write the audit's files into ``folder`` (made if missing); return their paths.

    ``<name>_pairs.csv`` (one row per record, gainer tokens joined by spaces),
    ``<name>_pairs.jsonl`` (one record a line) and, when ``kept`` names lines, the filtered data
    set ``<name>_filtered.jsonl``: the ``rows`` of those lines (:func:`lowest_ches_lines`), as
    TRL-style JSONL.

    Raises:
      KeyError: a line of ``kept`` that no row of ``rows`` has.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / f"{name}_pairs.csv"
    with open(table, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["line", *RECORD_NUMBERS, "single_token", "gainers"])
        writer.writeheader()
        for r in audited.records:
            gainers = " ".join(g["token"] for g in r["gainers"]) if r["gainers"] else ""
            writer.writerow({**r, "gainers": gainers})
    jsonl = folder / f"{name}_pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in audited.records))
    written = [table, jsonl]
    if kept:
        by_line = {r.line: r for r in rows}
        filtered = [by_line[line] for line in kept]
        written.append(write_preference_jsonl(folder / f"{name}_filtered.jsonl", filtered))
    return written
