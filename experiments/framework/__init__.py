"""The experiments' framework: self-validating configs, the command line, provenance and saving.

* :mod:`~experiments.framework.config` -- :class:`ExperimentConfig`, the field rules;
* :mod:`~experiments.framework.output` -- provenance, JSON, :func:`save` (PNG and JSON together);
* :mod:`~experiments.framework.cli` -- flags from ``Config`` fields, :func:`experiment_main`,
  one-line user errors (:func:`cli`);
* :mod:`~experiments.framework.accelerator` -- stages of a check on a lent accelerator, each in
  a child process with a time limit (imported as a module: it is not re-exported here).
"""

from experiments.framework.cli import (
    COMMON_SWITCHES,
    USER_ERRORS,
    build_parser,
    cli,
    config_flags,
    error_line,
    experiment_main,
    parse_config,
    sigterm_raises,
    user_errors_as_one_line,
)
from experiments.framework.config import (
    ConfigError,
    ExperimentConfig,
    default_rule,
    each,
    existing_file,
    existing_path,
    field_comments,
    finite,
    flag,
    grid,
    nonnegative,
    nonnegative_int,
    number_in,
    one_of,
    open_unit_interval,
    positive,
    positive_int,
    probability,
    unit_interval,
)
from experiments.framework.output import (
    FIGURES_DIR,
    dumps,
    enable_x64,
    prepare_out_dir,
    progress,
    provenance,
    save,
    to_jsonable,
)

__all__ = [
    "build_parser",
    "cli",
    "COMMON_SWITCHES",
    "config_flags",
    "ConfigError",
    "default_rule",
    "dumps",
    "each",
    "enable_x64",
    "error_line",
    "existing_file",
    "existing_path",
    "experiment_main",
    "ExperimentConfig",
    "field_comments",
    "FIGURES_DIR",
    "finite",
    "flag",
    "grid",
    "nonnegative",
    "nonnegative_int",
    "number_in",
    "one_of",
    "open_unit_interval",
    "parse_config",
    "positive",
    "positive_int",
    "prepare_out_dir",
    "probability",
    "progress",
    "provenance",
    "save",
    "sigterm_raises",
    "to_jsonable",
    "unit_interval",
    "USER_ERRORS",
    "user_errors_as_one_line",
]
