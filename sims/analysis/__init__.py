"""Measurements on models and data: CHES and baselines, the displacement audit, the kernel
form's channels, and the refusal judge.

* :mod:`~sims.analysis.scores` -- CHES (Definitions 2-3) and its baselines per pair, Spearman.
* :mod:`~sims.analysis.audit` -- the per-pair displacement audit of a preference file.
* :mod:`~sims.analysis.kernel` -- the hidden-state kernel ``K = J P J^T`` and velocity channels.
* :mod:`~sims.analysis.refusal` -- a rule-based refusal judge (weaker than SORRY-Bench's).
"""

from sims.analysis.audit import (
    PairAudit,
    audit_pairs,
)
from sims.analysis.kernel import (
    TiedCrossTerms,
    VelocityChannels,
    hidden_kernel,
    param_paths,
    rmsprop_preconditioner,
    tied_cross_terms,
    velocity_channels,
)
from sims.analysis.refusal import (
    is_refusal,
    judge_agreement,
    refusal_evidence,
)
from sims.analysis.scores import (
    UndefinedStatistic,
    dataset_ches,
    normalized_edit_distance,
    pearson,
    percentile_subsets,
    spearman,
    transformer_pair_scores,
)

__all__ = [
    "audit_pairs",
    "dataset_ches",
    "hidden_kernel",
    "is_refusal",
    "judge_agreement",
    "normalized_edit_distance",
    "PairAudit",
    "param_paths",
    "pearson",
    "percentile_subsets",
    "refusal_evidence",
    "rmsprop_preconditioner",
    "spearman",
    "tied_cross_terms",
    "TiedCrossTerms",
    "transformer_pair_scores",
    "UndefinedStatistic",
    "velocity_channels",
    "VelocityChannels",
]
