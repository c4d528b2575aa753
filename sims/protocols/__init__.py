"""The paper's experimental protocols on real checkpoints, as library functions.

* :mod:`~sims.protocols.filtering` -- the §6 data filter: the per-row displacement audit of a
  preference file on a checkpoint, the lowest-ln-CHES fraction, the audit's files.
* :mod:`~sims.protocols.persona` -- the single-token Persona protocol (Razin et al. 2024 §3,
  App. H.1: label-set SFT with a budget rule, single-prompt DPO/IPO runs, gainers, verdicts,
  Table 13, the kernel-form prediction of the first step).
* :mod:`~sims.protocols.kernel_checks` -- check tables of the kernel form of Theorems 4-5 against
  the true velocity at t = 0 (MLP features, the toy transformer), the pre-registered verdict.
* :mod:`~sims.protocols.token_geometry` -- the Table 1 / Table 13 protocol on real word
  embeddings as W(0) (unconstrained features: label-set SFT, DPO/IPO runs, gainers).
* :mod:`~sims.protocols.toy_transformer` -- the corpus-pretrained toy transformer of the
  small-transformer figures: pre-training settings, persona prompts, velocities at t = 0,
  on-policy refusal pairs, sampled refusal rates.
"""

from sims.protocols import kernel_checks, token_geometry, toy_transformer
from sims.protocols.filtering import (
    RECORD_NUMBERS,
    AuditedRows,
    audit_rows,
    lowest_ches_lines,
    write_audit_files,
)
from sims.protocols.persona import (
    GAINER_STEPS,
    MIN_MEAN_DROP,
    MIN_OPPOSITE_FRACTION,
    MIN_STABLE_RUNS,
    MIN_START_PROBABILITY,
    DPORun,
    SFTBudget,
    confusion,
    dpo_run,
    encode_prompts,
    is_stable,
    label_set_sft,
    label_word_ids,
    persona_row,
    row_verdict,
    run_persona_protocol,
    table13,
    with_answers,
    word_probabilities,
)

__all__ = [
    "AuditedRows",
    "audit_rows",
    "DPORun",
    "MIN_MEAN_DROP",
    "MIN_OPPOSITE_FRACTION",
    "MIN_STABLE_RUNS",
    "MIN_START_PROBABILITY",
    "RECORD_NUMBERS",
    "SFTBudget",
    "GAINER_STEPS",
    "confusion",
    "dpo_run",
    "persona_row",
    "run_persona_protocol",
    "encode_prompts",
    "is_stable",
    "kernel_checks",
    "label_set_sft",
    "label_word_ids",
    "lowest_ches_lines",
    "row_verdict",
    "table13",
    "token_geometry",
    "toy_transformer",
    "with_answers",
    "word_probabilities",
    "write_audit_files",
]
