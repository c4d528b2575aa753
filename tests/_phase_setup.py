"""Shared setup of the phase-diagram tests: the experiment's default geometry."""

#: ``make_phase_geometry`` keywords of ``displacement_phase_diagram``'s default geometry
#: (V = 14, d = 8, rotated frame).
DEFAULT_GEOMETRY = dict(
    seed=0,
    hidden_size=8,
    num_opposite=3,
    num_synonym=2,
    num_filler=7,
    unembedding_norm=4.0,
    opposite_scale=1.0,
    synonym_scale=0.5,
    filler_scale=1.0,
    rotate=True,
)

#: A smaller geometry (V = 8, d = 6) for the report and sensitivity tests.
SMALL_GEOMETRY = DEFAULT_GEOMETRY | dict(hidden_size=6, num_opposite=2, num_synonym=1, num_filler=3)
