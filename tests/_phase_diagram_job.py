"""Kill-and-resume job for tests/test_displacement_phase_diagram.py (runs in a subprocess).

``python tests/_phase_diagram_job.py OUT`` prints ``{"pid"}``, then runs the phase-diagram
experiment's sweeps into ``OUT`` (:data:`JOB_CONFIG`) and SIGKILLs itself as soon as the first
chunk has been computed and saved.
"""

import dataclasses
import json
import os
import signal
import sys

from experiments import _phase_diagram as ph
from experiments import displacement_phase_diagram as exp

#: Two paths (reduced: DPO at lambda = 0; generic_sgd: the rest), chunks of 2 runs.
JOB_CONFIG = dataclasses.replace(exp.Config.smoke(), lambdas=(0.0, 4.0), chunk_size=2)


def main(out: str) -> None:
    print(json.dumps({"pid": os.getpid()}), flush=True)
    original = ph.sweep

    def dying_sweep(*args, on_chunk, **kwargs):
        def hook(k, num_chunks, computed):
            on_chunk(k, num_chunks, computed)
            if computed:
                os.kill(os.getpid(), signal.SIGKILL)

        return original(*args, on_chunk=hook, **kwargs)

    ph.sweep = dying_sweep  # run_sweeps looks it up on the module
    exp.run(JOB_CONFIG, sweep_dir=out)


if __name__ == "__main__":
    main(sys.argv[1])
