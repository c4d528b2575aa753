"""One process of a multi-process CPU JAX job, for tests/test_multiprocess.py.

``python tests/_multiprocess_job.py PROCESS_ID NUM_PROCESSES PORT MODE ARGS...`` calls
``jax.distributed.initialize`` with the coordinator on ``127.0.0.1:PORT`` (gloo CPU collectives),
then runs ``MODE``; the caller sets ``XLA_FLAGS`` (fake CPU devices per process). Every process
prints JSON lines on stdout, flushed at once (a killed process leaves what it printed):

* ``{"file_op": [event, path]}`` (``[event, source, destination]`` for a rename) for every file
  operation in ``OUT`` (an audit hook: opens for reading or writing, ``mkdir``, ``replace``,
  ``remove``...), so the test sees which process touched the sweep folder;
* ``{"chunk": [k, computed]}`` after each chunk, and a final ``{"result": ...}`` line.

Modes:

* ``sweep OUT RESULTS [VICTIM KILL_CHUNK]``: the DPO sweep of ``_sweep_job`` into ``OUT``; each
  process saves its :class:`~sims.flows.sweep.SweepResult` to ``RESULTS/process_<i>.npz``. With
  ``VICTIM``, process ``VICTIM`` SIGKILLs itself once process 0 has saved chunk ``KILL_CHUNK``
  (process 0 marks it with ``RESULTS/saved_<k>``).
* ``refused OUT``: the tiny sweep ``a`` into ``OUT`` (whose lock the test holds, or which holds
  another sweep); prints the error each process got.
* ``mismatch``: the tiny sweep, process 1 given other inputs than process 0; prints the error.
* ``dpo RESULTS``: one SGD step of DPO on a small :class:`~sims.models.decoder.DecoderLM`,
parameters
  FSDP-sharded and the pairs data-sharded over one mesh of all processes' devices; saves the loss
  and updated parameters to ``RESULTS/process_<i>.npz`` and prints how they were sharded.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import _sweep_job as job
import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from sims.checkpoints.hf import shard_model
from sims.flows.core import PairObjective, make_optimizer
from sims.flows.sweep import sweep
from sims.models.decoder import DecoderConfig, init_decoder
from sims.models.transformer import TokenBatch, TransformerPairs, make_transformer_pairs
from theory.losses import make_loss

INIT_TIMEOUT_S = 120  # longest wait for every process to reach the coordinator (loaded CPU)
SYNC_TIMEOUT_S = 120.0  # longest wait of the victim for process 0's saved chunk
# the DPO step: vocabulary, pairs (one per device of 2 processes x 4), tokens per sequence, beta,
# Euler step size (large enough that every parameter moves by far more than float32 round-off)
V, NUM_PAIRS, T, BETA, DT = 32, 8, 6, 0.5, 1.0
DPO_CONFIG = DecoderConfig.llama(V, hidden_size=16, num_heads=2, num_layers=1)  # seed 0: policy
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# audit events that change a folder (besides opens); their first argument is the path
CHANGE_EVENTS = ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.truncate")
RENAMES = ("os.rename", "os.replace")  # two paths: source, destination


def _emit(**record) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def watch_folder(folder: Path) -> None:
    """Print ``{"file_op": [event, path]}`` for every file operation under ``folder``."""
    root = os.path.realpath(folder)

    def inside(path) -> bool:
        if isinstance(path, int) or path is None:  # an fd: its open was already seen
            return False
        path = os.path.realpath(os.fsdecode(path))
        return path == root or path.startswith(root + os.sep)

    def hook(event, args):
        if event == "open" and inside(args[0]):
            kind = "open_write" if args[2] & WRITE_FLAGS else "open_read"
            _emit(file_op=[kind, os.fsdecode(args[0])])
        elif event in CHANGE_EVENTS and (inside(args[0]) or event in RENAMES and inside(args[1])):
            paths = args[:2] if event in RENAMES else args[:1]
            _emit(file_op=[event, *(os.fsdecode(a) for a in paths)])

    sys.addaudithook(hook)


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + SYNC_TIMEOUT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {SYNC_TIMEOUT_S} s")
        time.sleep(0.01)


def _sweep(out: Path, results: Path, victim: int | None, kill_chunk: int | None) -> None:
    me = jax.process_index()

    def on_chunk(k, num_chunks, computed):
        _emit(chunk=[k, computed])
        if me == 0 and computed:
            (results / f"saved_{k}").touch()  # after save_chunk and the index: chunk k is safe
        if me == victim and k == kill_chunk:
            _wait_for(results / f"saved_{k}")
            os.kill(os.getpid(), signal.SIGKILL)

    res = sweep(
        job.run_fn,
        job.inputs(),
        name=job.NAME,
        out_dir=out,
        chunk_size=job.CHUNK_SIZE,
        on_chunk=on_chunk,
    )
    leaves = jax.tree_util.tree_leaves_with_path(res.outputs)
    np.savez(
        results / f"process_{me}.npz",
        status=res.status,
        **{jax.tree_util.keystr(path): leaf for path, leaf in leaves},
    )
    _emit(result={"computed_chunks": list(res.computed_chunks)})


def _tiny_sweep_error(out, offset: float = 0.0) -> None:
    config = job.tiny_config("a")
    inputs = {k: v + offset for k, v in config["inputs"].items()}
    try:
        sweep(
            job.tiny_run_fn,
            inputs,
            name=config["name"],
            out_dir=out,
            chunk_size=job.TINY_CHUNK_SIZE,
        )
        report = {"error_type": None, "error": None}
    except (RuntimeError, ValueError, OSError) as e:
        report = {"error_type": type(e).__name__, "error": str(e)}
    _emit(result=report)


def dpo_pairs() -> tuple:
    """Return ``(chosen, rejected)`` :class:`TokenBatch` of :data:`NUM_PAIRS` random pairs."""
    rng = np.random.default_rng(7)
    prompt_len = np.full(NUM_PAIRS, 2, np.int32)
    batches = []
    for _ in range(2):
        tokens = rng.integers(0, V, size=(NUM_PAIRS, T), dtype=np.int32)
        batches.append(TokenBatch(tokens, prompt_len, rng.integers(4, T + 1, NUM_PAIRS, np.int32)))
    return tuple(batches)


def dpo_step(mesh: jax.sharding.Mesh | None) -> tuple[dict[str, np.ndarray], dict]:
    """One SGD (Euler) step of DPO: ``({"loss", parameter names...}, how things were sharded)``.

    ``mesh`` ``None``: unsharded, on the default device. Otherwise the policy's parameters are
    placed by :func:`sims.checkpoints.hf.shard_model` (FSDP) and each pair field is split over the
    mesh's one axis along the pairs, each process supplying only its own rows
    (``jax.make_array_from_process_local_data``). Returns host arrays on every process.
    """
    policy, reference = init_decoder(DPO_CONFIG, seed=0), init_decoder(DPO_CONFIG, seed=1)
    # reference log-probs from another model: the loss and its gradient are not those at t = 0
    pairs = make_transformer_pairs(reference, *dpo_pairs())
    pairs = jax.tree_util.tree_map(np.asarray, pairs)
    if mesh is not None:
        policy = shard_model(policy, mesh)
        pairs = jax.tree_util.tree_map(lambda a: _process_rows(a, mesh), pairs)
    else:
        pairs = jax.device_put(pairs)
    graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
    tx = make_optimizer("sgd", dt=DT)
    objective = PairObjective(make_loss("dpo", beta=BETA))

    @jax.jit
    def step(params, opt_state, pairs: TransformerPairs):
        def loss_fn(p):
            return objective(nnx.merge(graphdef, p, rest), pairs)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, _ = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), loss

    new_params, loss = step(params, tx.init(params), pairs)
    leaves = jax.tree_util.tree_leaves_with_path(new_params)
    largest = max(range(len(leaves)), key=lambda i: leaves[i][1].size)  # the largest matrix
    layout = {
        "weight": _layout(jax.tree_util.tree_leaves(params)[largest]),
        "updated_weight": _layout(leaves[largest][1]),
        "tokens": _layout(pairs.chosen.tokens),
    }
    host = _to_host({"loss": loss, **{jax.tree_util.keystr(p): leaf for p, leaf in leaves}})
    return host, layout


def _layout(a) -> dict:
    return {
        "spec": str(getattr(a.sharding, "spec", None)),
        "fully_addressable": a.is_fully_addressable,
        "local_shards": [list(shard.data.shape) for shard in a.addressable_shards],
    }


def dpo_initial_parameters() -> dict[str, np.ndarray]:
    """The policy's parameters before :func:`dpo_step`, named as in its result."""
    params = nnx.state(init_decoder(DPO_CONFIG, seed=0), nnx.Param)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {jax.tree_util.keystr(p): np.asarray(leaf) for p, leaf in leaves}


def _process_rows(a: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
    """``a`` split along its first axis over ``mesh``, from this process's rows of it only."""
    sharding = jax.NamedSharding(mesh, jax.P(mesh.axis_names[0]))
    rows = [idx[0] for idx in sharding.addressable_devices_indices_map(a.shape).values()]
    lo, hi = min(r.start for r in rows), max(r.stop for r in rows)  # contiguous: a 1-D mesh
    return jax.make_array_from_process_local_data(sharding, a[lo:hi], a.shape)


def _to_host(tree):
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree_util.tree_map(np.asarray, tree)


def dpo_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh ``"fsdp"`` over every device of every process."""
    auto = (jax.sharding.AxisType.Auto,)
    return jax.make_mesh((jax.device_count(),), ("fsdp",), axis_types=auto)


def main(argv):
    process_id, num_processes, port, mode, *args = argv
    jax.config.update("jax_enable_x64", True)  # as the tests' root conftest
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if mode in ("sweep", "refused"):
        watch_folder(Path(args[0]))
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=int(num_processes),
        process_id=int(process_id),
        coordinator_bind_address=f"127.0.0.1:{port}",  # not every interface of the test machine
        initialization_timeout=INIT_TIMEOUT_S,
    )
    _emit(process={"index": jax.process_index(), "devices": jax.device_count()})
    if mode == "sweep":
        victim, kill_chunk = (int(args[2]), int(args[3])) if len(args) > 2 else (None, None)
        _sweep(Path(args[0]), Path(args[1]), victim, kill_chunk)
    elif mode == "refused":
        _tiny_sweep_error(Path(args[0]))
    elif mode == "mismatch":
        _tiny_sweep_error(None, offset=float(jax.process_index()))
    elif mode == "dpo":
        host, layout = dpo_step(dpo_mesh())
        np.savez(Path(args[0]) / f"process_{jax.process_index()}.npz", **host)
        _emit(result=layout)
    else:
        raise ValueError(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
