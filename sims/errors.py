"""The one exception type for bad user input: files, folders and values a user supplies.

:class:`InputError` is raised by loaders (checkpoints, GGUF files, tokenizers, pair files) and by
config validation when what the *user* gave is wrong: a missing or truncated file, a field that
breaks its rule, a contradictory config. Its message names the file and the field. The command
line (``python -m experiments``) prints such an error as one ``error: ...`` line and exits with
status 2; any other exception is a bug and keeps its traceback.

It derives from ``ValueError``, so code that catches ``ValueError`` keeps working.
"""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """A user-supplied file, folder or value is invalid; the message says which and why.

    Example:
      >>> err = InputError.at("cfg/config.json", "hidden_size", "must be an integer >= 1, got None")
      >>> str(err)
      'cfg/config.json: hidden_size must be an integer >= 1, got None'
    """

    @classmethod
    def at(cls, path: str | Path, field: str | None, problem: str) -> InputError:
        """Return an error whose message is ``"<path>: <field> <problem>"`` (field optional)."""
        where = f"{path}: " if path is not None else ""
        return cls(f"{where}{field + ' ' if field else ''}{problem}")
