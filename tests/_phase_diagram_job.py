"""Kill-and-resume job for tests/test_phase_diagram.py (runs in a subprocess).

``python tests/_phase_diagram_job.py OUT`` prints ``{"pid"}``, then runs the phase-diagram sweeps
of :data:`SETTINGS` on the small grid of the test into ``OUT`` and SIGKILLs itself as soon as the
first chunk has been computed and saved.
"""

import json
import os
import signal
import sys

import jax
from test_phase_diagram import GEOMETRY, SMALL_AXES
from test_phase_diagram import SETTINGS as TEST_SETTINGS

from sims.protocols import phase_diagram as pd
from sims.protocols.phase_instances import make_phase_geometry

#: The small grid's settings with 200 steps and chunks of 2 runs (two paths: reduced and
#: generic_sgd), no round-off reruns.
SETTINGS = pd.PhaseSettings(**{**TEST_SETTINGS, "num_steps": 200, "chunk_size": 2})


def run(out) -> dict:
    """The report of the swept small grid (``out``: sweep folder or ``None``), JSON-ready."""
    jax.config.update("jax_enable_x64", True)
    geometry = make_phase_geometry(**GEOMETRY)
    axes = pd.phase_axes(**SMALL_AXES)
    return pd.run_phase_diagram(geometry, axes, SETTINGS, sweep_dir=out).report


def main(out: str) -> None:
    print(json.dumps({"pid": os.getpid()}), flush=True)
    original = pd.sweep

    def dying_sweep(*args, on_chunk, **kwargs):
        def hook(k, num_chunks, computed):
            on_chunk(k, num_chunks, computed)
            if computed:
                os.kill(os.getpid(), signal.SIGKILL)

        return original(*args, on_chunk=hook, **kwargs)

    pd.sweep = dying_sweep  # run_phase_sweeps looks it up on the module
    run(out)


if __name__ == "__main__":
    main(sys.argv[1])
