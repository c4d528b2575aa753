"""The paper's experimental protocols on real checkpoints, as library functions.

* :mod:`~sims.protocols.learned_features` -- no > never with an MLP backbone over MiniLM
  statement features and MiniLM ``W`` (issue 13): grid rate rules, SFT, t = 0 kernel
  measurements, the EFFECT rule and verdict.
* :mod:`~sims.protocols.minilm` -- the Table 1 protocol on the whole MiniLM-L6 encoder (issue 13):
  SFT, single-prompt DPO / IPO runs, Table 1 rows, t = 0 tied-kernel measurements, verdict.
* :mod:`~sims.protocols.persona` -- the single-token Persona protocol (Razin et al. 2024 §3,
  App. H.1: label-set SFT with a budget rule, single-prompt DPO/IPO runs, gainers, verdicts,
  Table 13, the kernel-form prediction of the first step).
"""

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
    "DPORun",
    "MIN_MEAN_DROP",
    "MIN_OPPOSITE_FRACTION",
    "MIN_STABLE_RUNS",
    "MIN_START_PROBABILITY",
    "SFTBudget",
    "GAINER_STEPS",
    "confusion",
    "dpo_run",
    "persona_row",
    "run_persona_protocol",
    "encode_prompts",
    "is_stable",
    "label_set_sft",
    "label_word_ids",
    "row_verdict",
    "table13",
    "with_answers",
    "word_probabilities",
]
