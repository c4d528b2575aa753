"""Input checks shared by the theory-check modules (``ValueError`` naming the argument)."""

from __future__ import annotations

from typing import Any

import numpy as np


def check_int_at_least(name: str, value: Any, minimum: int = 1) -> None:
    """Raise ``ValueError`` unless ``value`` is a Python/NumPy integer ``>= minimum``."""
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")
