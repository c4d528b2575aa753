"""A small sweep for tests/test_sweep.py, importable and runnable in a subprocess.

``python tests/_sweep_job.py compare`` prints the device count and the largest difference between
the 8-device sharded run and a plain unsharded ``jax.vmap``;
``python tests/_sweep_job.py kill OUT K``
runs the chunked sweep into ``OUT`` and SIGKILLs itself right after chunk ``K`` is saved.
"""

import functools
import json
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np

from sims.models import PreferencePairs
from sims.reduced import pair_index, reduced_flow_fn
from sims.sweep import run_mesh, sharded_map, stack_runs, sweep
from theory.losses import dpo_loss

V, D = 64, 8  # vocabulary and hidden size of each run
NAME = "test-sweep-dpo-seeds-betas"
CHUNK_SIZE = 8
INDEX = pair_index(
    PreferencePairs(np.array([0, 1]), np.array([3, 4]), np.array([5, 3]), None, None)
)


def run_fn(x):
    """One run: random geometry from ``x["seed"]``, DPO with ``x["beta"]``, 200 Euler steps."""
    k_w, k_h = jax.random.split(jax.random.key(x["seed"]))
    W = jax.random.normal(k_w, (V, D)) / np.sqrt(D)
    H = jax.random.normal(k_h, (2, D)) / np.sqrt(D)
    loss = functools.partial(dpo_loss, beta=x["beta"])
    run = reduced_flow_fn(loss, INDEX, num_steps=200, record_every=50)
    res = run(W, H, jnp.zeros(2), jnp.zeros(2), 0.1)
    records = res.observables
    return {"loss": res.loss, "margin": records.margin, "final_logprobs": records.logprobs[-1]}


def inputs():
    """20 runs (5 seeds x 4 betas): 3 chunks of 8, the last one partial."""
    return stack_runs(seed=np.arange(5, dtype=np.uint32), beta=np.array([0.1, 0.5, 1.0, 2.0]))


def main(argv):
    jax.config.update("jax_enable_x64", True)
    if argv[0] == "compare":
        sharded = sharded_map(run_fn, inputs(), mesh=run_mesh(), batch_size=2)
        plain = jax.tree_util.tree_map(np.asarray, jax.jit(jax.vmap(run_fn))(inputs()))
        diff = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(
                jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(plain), strict=True
            )
        )
        print(json.dumps({"devices": jax.device_count(), "max_abs_diff": diff}))
    elif argv[0] == "kill":
        kill_after = int(argv[2])

        def on_chunk(k, num_chunks, computed):
            if computed and k == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

        sweep(
            run_fn, inputs(), name=NAME, out_dir=argv[1], chunk_size=CHUNK_SIZE, on_chunk=on_chunk
        )


if __name__ == "__main__":
    main(sys.argv[1:])
