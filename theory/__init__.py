"""Pure-JAX closed forms of the gradient-flow theory of likelihood displacement.

Modules: ``losses`` (the one loss module), ``single_token`` (Razin et al. 2024, Thms 4, 5, 8, 9),
``kl_optimum`` / ``kl_counterexample`` / ``kl_exact`` / ``logit_arithmetic`` (KL-optimum mixture),
``dpop`` / ``dpop_signs`` (DPOP on edit-distance-1 pairs), ``multi_token`` (CHES, Theorems 6-7),
``regularized`` (Propositions 1-2), ``kernel`` (Theorems 4-5 / 8-9 when ``h`` is a network's
output).

Invalid values (the one rule, for every public function of ``theory``):

1. **Concrete inputs are validated in Python before tracing.** Shapes, dtypes and values (token
   ids in ``[0, V)``, ``y_pos != y_neg`` where a theorem needs it, ``beta > 0`` and every other
   positive hyperparameter, ``lam >= 0``, probabilities that are finite, non-negative and sum to
   1, edit distance 1, shared prefix rows that agree, ...) raise ``ValueError`` naming the
   argument, the rule and what was received (``TypeError`` for a wrong dtype kind or a flag that
   is not a real ``bool``).
2. **Traced inputs give NaN, never a plausible number.** Inside ``jax.jit`` / ``vmap`` / ``grad``
   a value has no value yet, so it cannot raise; an invalid traced value makes the result NaN
   (the whole result, or the entries it affects, as each docstring says) and makes its
   derivatives NaN too. Integer and boolean results cannot hold NaN; where a result has such
   fields, the floating fields carry the NaN. The categories are those of rule 1 that concern
   values: token ids, distinct ids, hyperparameters, probabilities, edit-distance pairs, masks.
   Two rules stay concrete-only: rows that must be equal (shared prefixes, shared contexts),
   because exact float equality of values computed inside one compiled program is not reliable
   (XLA may round one expression differently in two fusions: false NaN for valid input), and
   computed quantities rather than data or hyperparameters (:func:`theory.dpop.weighted_split`'s
   Gram entries).
3. **Valid inputs are untouched.** Concrete inputs give exactly the values they gave before the
   checks existed: every predicate is a Python ``True`` and no operation is added. Valid traced
   inputs give the same values in exact arithmetic, and measured bit for bit (every experiment's
   JSON, and jit/vmap/grad of each function on seeded inputs, before vs after); but the compiled
   program gains the predicate and a select, and XLA may fuse (and round) neighbouring
   operations differently, so last-bit changes are possible in other programs. Scalar arguments
   that a rule reads (hyperparameters, a single token id; the losses' per-pair hyperparameters
   and sample weights) are read through :func:`~theory.checks.guard`, which keeps e.g.
   ``x / beta`` compiled as before. Derivatives of valid inputs stay finite.
4. **Opt-in raising under jit.** :func:`theory.checks.checked` runs a function under
   ``jax.experimental.checkify``: ``checked(jax.jit(f))(...)`` raises ``ValueError``
   (``checkify.JaxRuntimeError``) naming the argument and rule instead of returning NaN.

The helpers are in :mod:`theory.checks`: ``check_*`` (rule 1), ``valid_*`` predicates,
:func:`~theory.checks.poison` (rule 2) and :func:`~theory.checks.checked` (rule 4). Search
kernels documented as unvalidated (:func:`theory.kl_counterexample.theorem2_status`) and the
exact-arithmetic checks of :mod:`theory.kl_exact` are outside the rule.
"""

from theory.dpop import (
    DPOPCoefficients,
    PositionGradients,
    WeightedSplit,
    dpop_coefficients,
    edit_position,
    pair_logprobs_from_logits,
    position_logit_gradients,
    weighted_split,
)
from theory.dpop_signs import LambdaThresholds, lambda_thresholds, predicted_signs, well_optimised
from theory.kernel import (
    DisplacementCriterion,
    KernelAnisotropy,
    drive_logprob_velocity,
    kernel_anisotropy,
    kernel_displacement_criterion,
    kernel_logprob_velocity,
    multi_sample_kernel_logprob_velocity,
    preconditioned_logprob_velocity,
    tied_kernel_logprob_velocity,
)
from theory.kl_counterexample import (
    MixtureInstances,
    SearchResult,
    Theorem2Census,
    Theorem2Status,
    random_instances,
    search_counterexamples,
    theorem2_census,
    theorem2_status,
)
from theory.kl_exact import (
    ExactCheck,
    RationalInstance,
    exact_check,
    exp_bounds,
    rational_counterexample,
    rationalize,
)
from theory.kl_optimum import (
    MixtureWeights,
    SupportCovariances,
    TiltMoments,
    TotalProbabilityMass,
    log_residual_mass_bound,
    mixture_weights,
    objective,
    residual_mass_bound,
    support_covariances,
    tilt,
    tilt_moments,
    total_probability_mass,
)
from theory.logit_arithmetic import arithmetic_mass, arithmetic_tilt, logit_arithmetic
from theory.losses import (
    LOSSES,
    MARGIN_CLASS,
    BoundLoss,
    LossCoefficients,
    dpo_loss,
    dpop_loss,
    gpo_loss,
    ipo_loss,
    loss_coefficients,
    make_loss,
    margin_derivative,
    mean_pair_loss,
    nll_loss,
    rebel_loss,
    sft_term_loss,
    simpo_loss,
    slic_loss,
    weighted_loss,
)
from theory.multi_token import (
    GradientInnerProduct,
    MultiTokenTerms,
    OtherResponseTerms,
    ches,
    ches_length_normalized,
    gradient_inner_product,
    masked_ches,
    multi_token_terms,
    other_response_terms,
    positive_alpha_fraction,
    response_logprob_velocity,
)
from theory.regularized import PreferredVelocity, loss_logprob_velocity, preferred_logprob_velocity
from theory.single_token import (
    DisplacementTerms,
    displacement_terms,
    logprob_velocity,
    multi_sample_logprob_velocity,
)

__all__ = [
    "BoundLoss",
    "DPOPCoefficients",
    "DisplacementCriterion",
    "DisplacementTerms",
    "ExactCheck",
    "GradientInnerProduct",
    "KernelAnisotropy",
    "LOSSES",
    "LambdaThresholds",
    "LossCoefficients",
    "MARGIN_CLASS",
    "MixtureInstances",
    "MixtureWeights",
    "MultiTokenTerms",
    "OtherResponseTerms",
    "PositionGradients",
    "PreferredVelocity",
    "RationalInstance",
    "SearchResult",
    "SupportCovariances",
    "Theorem2Census",
    "Theorem2Status",
    "TiltMoments",
    "TotalProbabilityMass",
    "WeightedSplit",
    "arithmetic_mass",
    "arithmetic_tilt",
    "ches",
    "ches_length_normalized",
    "displacement_terms",
    "dpo_loss",
    "dpop_coefficients",
    "dpop_loss",
    "edit_position",
    "exact_check",
    "exp_bounds",
    "gpo_loss",
    "gradient_inner_product",
    "ipo_loss",
    "kernel_anisotropy",
    "kernel_displacement_criterion",
    "drive_logprob_velocity",
    "kernel_logprob_velocity",
    "lambda_thresholds",
    "log_residual_mass_bound",
    "logit_arithmetic",
    "logprob_velocity",
    "loss_coefficients",
    "loss_logprob_velocity",
    "make_loss",
    "margin_derivative",
    "mean_pair_loss",
    "masked_ches",
    "mixture_weights",
    "multi_sample_kernel_logprob_velocity",
    "multi_sample_logprob_velocity",
    "multi_token_terms",
    "nll_loss",
    "objective",
    "other_response_terms",
    "position_logit_gradients",
    "positive_alpha_fraction",
    "preconditioned_logprob_velocity",
    "predicted_signs",
    "preferred_logprob_velocity",
    "random_instances",
    "rational_counterexample",
    "rationalize",
    "rebel_loss",
    "residual_mass_bound",
    "response_logprob_velocity",
    "search_counterexamples",
    "pair_logprobs_from_logits",
    "sft_term_loss",
    "simpo_loss",
    "slic_loss",
    "support_covariances",
    "theorem2_census",
    "theorem2_status",
    "tied_kernel_logprob_velocity",
    "tilt",
    "tilt_moments",
    "total_probability_mass",
    "weighted_loss",
    "weighted_split",
    "well_optimised",
]
