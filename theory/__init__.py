"""Pure-JAX closed forms of the gradient-flow theory of likelihood displacement.

Modules: ``losses`` (the one loss module), ``single_token`` (Razin et al. 2024, Thms 4, 5, 8, 9).
"""

from theory.losses import (
    LOSSES,
    MARGIN_CLASS,
    LossCoefficients,
    dpo_loss,
    dpop_loss,
    gpo_loss,
    ipo_loss,
    loss_coefficients,
    make_loss,
    margin_derivative,
    nll_loss,
    rebel_loss,
    sft_term_loss,
    simpo_loss,
    slic_loss,
    weighted_loss,
)
from theory.single_token import (
    DisplacementTerms,
    displacement_terms,
    logprob_velocity,
    multi_sample_logprob_velocity,
)

__all__ = [
    "LOSSES",
    "MARGIN_CLASS",
    "DisplacementTerms",
    "LossCoefficients",
    "displacement_terms",
    "dpo_loss",
    "dpop_loss",
    "gpo_loss",
    "ipo_loss",
    "logprob_velocity",
    "loss_coefficients",
    "make_loss",
    "margin_derivative",
    "multi_sample_logprob_velocity",
    "nll_loss",
    "rebel_loss",
    "sft_term_loss",
    "simpo_loss",
    "slic_loss",
    "weighted_loss",
]
