r"""Checks of the closed forms of Razin et al. 2024 (§4-§5) against autodiff and the simulated flow.

Reusable pieces of the theorem-check experiments, in the unconstrained-features model:

* :mod:`~sims.protocols.theory_checks.single_token_checks` -- random single-token instances,
  Theorems 4-5 vs autodiff and a central difference of the flow, their error summary;
* :mod:`~sims.protocols.theory_checks.multi_token_checks` -- random multi-token instances over the
  prefix tree, Theorems 6-7 and Propositions 1-2 vs autodiff, pointwise error summaries;
* :mod:`~sims.protocols.theory_checks.pair_runs` -- flows shared by several checks (vmapped runs,
  SFT on label sets) and Theorems 4-5 on one pair beside a one-step probe, Theorem 5's ranking;
* :mod:`~sims.protocols.theory_checks.extra_sample` -- Theorem 8 (one extra sample) vs the flow;
* :mod:`~sims.protocols.theory_checks.table1` -- Table 1 in the theory model (No over Never);
* :mod:`~sims.protocols.theory_checks.figure2` -- Figure 2 in the theory model (similarity
  scores, training on score-percentile subsets).

Each check computes in the dtype of its inputs; the theorem checks run in float64
(``jax_enable_x64``).
"""

from sims.protocols.theory_checks.extra_sample import (
    ExtraSampleEffect,
    ExtraSampleInstance,
    extra_sample_effect,
    extra_sample_instance,
)
from sims.protocols.theory_checks.figure2 import (
    SIMILARITY_SCORES,
    PercentileChanges,
    pair_similarity_scores,
    percentile_subset_changes,
)
from sims.protocols.theory_checks.multi_token_checks import (
    ERROR_FLOOR,
    ErrorSummary,
    MultiTokenInstance,
    error_summary,
    multi_token_instance,
    multi_token_velocity_check,
)
from sims.protocols.theory_checks.pair_runs import (
    RunChanges,
    SinglePairRun,
    TokenRanking,
    logprob_chosen_change,
    sft_on_label_sets,
    single_pair_run,
    token_ranking,
)
from sims.protocols.theory_checks.single_token_checks import (
    AUTODIFF_SIGN_TOL,
    FD_SIGN_TOL,
    SingleTokenInstance,
    VelocityCheck,
    VelocityErrors,
    single_token_instance,
    single_token_velocity_check,
    velocity_errors,
)
from sims.protocols.theory_checks.table1 import (
    GAINER_FRACTIONS,
    no_over_never_model,
    no_over_never_record,
    no_over_never_summary,
)

__all__ = [
    "AUTODIFF_SIGN_TOL",
    "ERROR_FLOOR",
    "error_summary",
    "ErrorSummary",
    "extra_sample_effect",
    "extra_sample_instance",
    "ExtraSampleEffect",
    "ExtraSampleInstance",
    "FD_SIGN_TOL",
    "GAINER_FRACTIONS",
    "logprob_chosen_change",
    "multi_token_instance",
    "multi_token_velocity_check",
    "MultiTokenInstance",
    "no_over_never_model",
    "no_over_never_record",
    "no_over_never_summary",
    "pair_similarity_scores",
    "PercentileChanges",
    "percentile_subset_changes",
    "RunChanges",
    "sft_on_label_sets",
    "SIMILARITY_SCORES",
    "single_pair_run",
    "single_token_instance",
    "single_token_velocity_check",
    "SinglePairRun",
    "SingleTokenInstance",
    "token_ranking",
    "TokenRanking",
    "velocity_errors",
    "VelocityCheck",
    "VelocityErrors",
]
