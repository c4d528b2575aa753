"""Experiment scripts; each writes figures/<name>.png and figures/<name>.json.

``python -m experiments`` runs every name in :data:`EXPERIMENTS` (the README's main job, <= 10
minutes on a 2-core CPU); ``python -m experiments extended`` runs :data:`EXTENDED` (the real-model
and learned-feature experiments, about an hour on that CPU); :data:`EXTRA` are
separate commands (``python -m experiments bench``).
"""

#: Experiments of the main job, in run order.
EXPERIMENTS: tuple[str, ...] = (
    "single_token_theorem_check",
    "no_over_never",
    "kl_optimum_mixture",
    "dpop_edit_distance",
    "multi_token_theorem_check",
    "ches_vs_displacement",
    "multi_sample_effects",
    "real_token_geometry",
    "transformer_no_over_never",
    "transformer_ches",
    "transformer_unalignment",
    "kernel_theorem_check",
    "displacement_phase_diagram",
)

#: The second named command (``python -m experiments extended``): the slow ones, split off the
#: main job to keep it within 10 minutes on a 2-core CPU (issue 23): the paper's protocols on
#: SmolLM2-135M-Instruct and the learned / sentence-encoder feature runs.
EXTENDED: tuple[str, ...] = (
    "persona_no_over_never",
    "ches_real",
    "refusal_unalignment",
    "learned_features_no_over_never",
    "minilm_encoder_no_over_never",
)

#: Separate commands, not part of the main job (``python -m experiments NAME``).
EXTRA: tuple[str, ...] = (
    "bench",
    "bench_real_model",
    "compile_once",
    "audit",
    "accelerator_check",
    "check_figures",
)
