"""Multi-process JAX on one machine: 2 local processes (``jax.distributed``, gloo CPU collectives).

Each test starts :data:`NUM_PROCESSES` workers (``tests/_multiprocess_job.py``) with
:data:`DEVICES_PER_PROCESS` fake CPU devices each: 8 devices in all, as many as the root conftest
gives this process, so the one-process references run here on the same device count.
"""

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import _multiprocess_job as mp_job
import _sweep_job as job
import jax
import numpy as np
import pytest

from sims.flows.sweep import sweep

ROOT = Path(__file__).resolve().parent.parent
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4  # x 2 processes = the root conftest's 8 devices of this process
JOB_TIMEOUT_S = 300  # one multi-process job: 2 fresh JAX processes compiling on a shared 2-core CPU
START_ATTEMPTS = 3  # fresh ports tried when the coordinator's port was taken before it bound it
# float32 round-off of the sharded DPO step, which sums the same terms (over pairs, and over the
# hidden, MLP and vocabulary axes of each matrix product, <= 64 terms) in another order: a few ulps
# (2^-23 ~ 1.2e-7 each) per sum; measured <= 2 ulps of each leaf's largest value
DPO_F32_RTOL = 1e-5

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        "jax_cpu_collectives_implementation" not in jax.config.values,
        reason="this JAX has no CPU collectives across processes "
        "(no jax_cpu_collectives_implementation option)",
    ),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # this process's XLA flags (optimisation level), with DEVICES_PER_PROCESS fake devices: chunks
    # computed by the workers are compared bit for bit with chunks computed here
    flags = [f for f in os.environ["XLA_FLAGS"].split() if "device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    env["PYTHONFAULTHANDLER"] = "1"  # a worker that times out prints where it hung
    return env


class Worker:
    """One started worker process: its ``Popen`` and, once finished, its output."""

    def __init__(self, process_id: int, port: int, mode: str, args, log_dir: Path):
        self.process_id = process_id
        # output to files, not pipes: a killed or hung worker cannot block on a full pipe
        self.stdout_path = log_dir / f"worker{process_id}.out"
        self.stderr_path = log_dir / f"worker{process_id}.err"
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "tests" / "_multiprocess_job.py"),
                    str(process_id),
                    str(NUM_PROCESSES),
                    str(port),
                    mode,
                    *map(str, args),
                ],
                env=_env(),
                stdout=out,
                stderr=err,
            )

    def records(self) -> list[dict]:
        """The JSON lines it printed (gloo's own log lines skipped)."""
        lines = [line for line in self.stdout_path.read_text().splitlines() if line[:1] == "{"]
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:  # only the last line can be cut short (a killed worker)
                    raise
        return records

    def result(self) -> dict:
        return next(r["result"] for r in self.records() if "result" in r)

    def joined(self) -> bool:
        """Whether it has printed its process record (``jax.distributed.initialize`` returned)."""
        return any("process" in r for r in self.records())

    def file_ops(self) -> list[list[str]]:
        return [r["file_op"] for r in self.records() if "file_op" in r]

    def chunks(self) -> list[list]:
        return [r["chunk"] for r in self.records() if "chunk" in r]

    def stderr(self) -> str:
        return self.stderr_path.read_text()[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=JOB_TIMEOUT_S)


def _connected(workers: list[Worker]) -> bool:
    """Wait until every worker has joined the job; ``False`` if the coordinator's port was taken."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        if all(w.joined() for w in workers):
            return True
        for w in workers:
            if w.proc.poll() is not None and not w.joined():
                if w.process_id == 0 and "Failed to add port" in w.stderr():
                    return False  # another program bound the port after _free_port released it
                pytest.fail(f"worker {w.process_id} exited before joining the job:\n{w.stderr()}")
        time.sleep(0.1)
    pytest.fail(f"the workers did not join within {JOB_TIMEOUT_S} s:\n{workers[0].stderr()}")


def _start(mode: str, *args, log_dir: Path) -> list[Worker]:
    """Start every worker of a job and wait until they have joined it (retrying on a taken port)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(START_ATTEMPTS):
        port = _free_port()
        workers = [Worker(i, port, mode, args, log_dir) for i in range(NUM_PROCESSES)]
        try:
            if _connected(workers):
                return workers
        except BaseException:
            _kill(workers)
            raise
        _kill(workers)
    pytest.fail(f"no free coordinator port in {START_ATTEMPTS} attempts")


def _kill(workers: list[Worker]) -> None:
    for w in workers:
        w.kill()


def _run(mode: str, *args, log_dir: Path) -> list[Worker]:
    """Run a job to its end on every worker; return them, each checked to have exited with 0."""
    workers = _start(mode, *args, log_dir=log_dir)
    try:
        for w in workers:
            try:
                w.proc.wait(timeout=JOB_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"worker {w.process_id} ran over {JOB_TIMEOUT_S} s:\n{w.stderr()}")
    finally:
        _kill(workers)
    for w in workers:
        assert w.proc.returncode == 0, f"worker {w.process_id}:\n{w.stderr()}"
    return workers


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def _assert_outputs_equal(results: Path, want, what: str) -> None:
    """Each worker's saved sweep outputs equal ``want`` (a SweepResult) bit for bit."""
    leaves = dict(
        (jax.tree_util.keystr(path), leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(want.outputs)
    )
    for i in range(NUM_PROCESSES):
        got = _load(results / f"process_{i}.npz")
        assert got["status"].tolist() == want.status.tolist(), f"{what}, process {i}"
        assert sorted(got) == sorted([*leaves, "status"]), f"{what}, process {i}"
        for name, leaf in leaves.items():
            np.testing.assert_array_equal(got[name], leaf, err_msg=f"{what}, process {i}: {name}")


def _assert_only_process_0_wrote(workers: list[Worker], out: Path) -> None:
    assert workers[1].file_ops() == [], "process 1 touched the sweep folder"
    written = {Path(op[-1]).name for op in workers[0].file_ops() if op[0] == "os.rename"}
    assert written >= {"index.json"}, workers[0].file_ops()  # the audit does see process 0


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The DPO sweep run here, in one process on 8 devices, with the workers' chunking."""
    out = tmp_path_factory.mktemp("one_process")
    return out, sweep(
        job.run_fn, job.inputs(), name=job.NAME, out_dir=out, chunk_size=job.CHUNK_SIZE
    )


def test_sweep_on_two_processes_equals_one_process_run(tmp_path, one_process):
    one_dir, want = one_process
    out, results = tmp_path / "sweep", tmp_path / "results"
    results.mkdir()
    workers = _run("sweep", out, results, log_dir=tmp_path / "logs")
    for w in workers:
        assert w.records()[0]["process"] == {"index": w.process_id, "devices": 8}
        assert w.result() == {"computed_chunks": [0, 1, 2]}
    _assert_outputs_equal(results, want, "two processes vs one")

    # the chunk files: process 0's equal the one-process run's, array for array
    index, one_index = (json.loads((d / "index.json").read_text()) for d in (out, one_dir))
    assert index["fingerprint"] == one_index["fingerprint"]
    assert sorted(index["chunks"]) == ["0", "1", "2"]
    for k, entry in index["chunks"].items():
        assert entry["status"] == one_index["chunks"][k]["status"]
        got, ref = _load(out / entry["file"]), _load(one_dir / entry["file"])
        assert sorted(got) == sorted(ref)
        for name in ref:
            np.testing.assert_array_equal(got[name], ref[name], err_msg=f"chunk {k}, {name}")
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock",
        "chunk_00000.npz",
        "chunk_00001.npz",
        "chunk_00002.npz",
        "index.json",
    ]
    _assert_only_process_0_wrote(workers, out)
    written = {Path(op[2]).name for op in workers[0].file_ops() if op[0] == "os.rename"}
    assert written == {"index.json", "chunk_00000.npz", "chunk_00001.npz", "chunk_00002.npz"}


# (the process that SIGKILLs itself once process 0 has saved chunk 1); the other is killed after
@pytest.mark.parametrize("victim", [0, 1])
def test_sweep_on_two_processes_resumes_after_sigkill(tmp_path, one_process, victim):
    _, want = one_process
    out, results = tmp_path / "sweep", tmp_path / "results"
    results.mkdir()
    workers = _start("sweep", out, results, victim, 1, log_dir=tmp_path / "logs_killed")
    try:
        workers[victim].proc.wait(timeout=JOB_TIMEOUT_S)
    finally:
        _kill(workers)  # the survivor waits on the dead one in a collective: SIGKILL it too
    assert workers[victim].proc.returncode == -signal.SIGKILL, workers[victim].stderr()
    assert workers[victim].chunks() == [[0, True], [1, True]]
    assert workers[1].file_ops() == []
    index = json.loads((out / "index.json").read_text())
    assert sorted(index["chunks"]) == ["0", "1"]  # chunk 2 needs both processes: never saved
    assert not (out / "chunk_00002.npz").exists()

    workers = _run("sweep", out, results, log_dir=tmp_path / "logs_resumed")
    for w in workers:
        assert w.result() == {"computed_chunks": [2]}
        assert w.chunks() == [[0, False], [1, False], [2, True]]
    _assert_outputs_equal(results, want, f"resumed after killing process {victim}")
    _assert_only_process_0_wrote(workers, out)
    index = json.loads((out / "index.json").read_text())
    assert sorted(index["chunks"]) == ["0", "1", "2"]
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("holder", ["lock", "other_sweep"])
def test_sweep_on_two_processes_raises_process_0_folder_error_everywhere(tmp_path, holder):
    # without the shared error, process 1 would go on alone into the first chunk's collectives
    out = tmp_path / "sweep"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        if holder == "lock":
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, b"4242\n")
            error_type, message = "RuntimeError", "(pid 4242 holds the lock"
        else:
            job.tiny_sweep("b", out)
            error_type, message = "ValueError", "holds a different sweep"
        workers = _run("refused", out, log_dir=tmp_path / "logs")
    finally:
        os.close(fd)
    for w in workers:
        report = w.result()
        assert report["error_type"] == error_type and message in report["error"], report
    assert workers[1].result()["error"].startswith("process 0 could not open the sweep folder: ")
    assert workers[1].file_ops() == []


def test_sweep_on_two_processes_refuses_different_inputs_on_each(tmp_path):
    workers = _run("mismatch", log_dir=tmp_path / "logs")
    for w in workers:
        report = w.result()
        assert report["error_type"] == "ValueError", report
        assert "process(es) [1] were given a different sweep from process 0" in report["error"]


def test_dpo_step_on_two_processes_matches_one_process(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    workers = _run("dpo", results, log_dir=tmp_path / "logs")
    # the largest matrix, before and after the step, is split over all 8 devices (4 shards in
    # each process); so are the pairs, one per device
    for w in workers:
        layout = w.result()
        for name in ("weight", "updated_weight", "tokens"):
            assert "'fsdp'" in layout[name]["spec"], (name, layout)
            assert not layout[name]["fully_addressable"], (name, layout)
            assert len(layout[name]["local_shards"]) == DEVICES_PER_PROCESS, (name, layout)
        assert layout["tokens"]["local_shards"] == [[1, mp_job.T]] * DEVICES_PER_PROCESS

    unsharded, _ = mp_job.dpo_step(None)
    one_process_sharded, _ = mp_job.dpo_step(mp_job.dpo_mesh())
    start = mp_job.dpo_initial_parameters()
    for i in range(NUM_PROCESSES):
        got = _load(results / f"process_{i}.npz")
        assert sorted(got) == sorted(unsharded)
        for ref_name, ref in (("unsharded", unsharded), ("one process", one_process_sharded)):
            for name, want in ref.items():
                # scale: the leaf's largest value, and for parameters its largest update
                scale = (
                    np.max(np.abs(want)) if name == "loss" else np.max(np.abs(want - start[name]))
                )
                np.testing.assert_allclose(
                    got[name],
                    want,
                    rtol=DPO_F32_RTOL,
                    atol=DPO_F32_RTOL * scale,
                    err_msg=f"process {i} vs {ref_name}: {name}",
                )
