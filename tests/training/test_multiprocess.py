"""Two jax.distributed processes on localhost: a signal to one of them makes
both save the same step; the cluster auto-detection path (--distributed)."""

import os
import signal
import socket
import time

import pytest

from tests.helpers import CLI_TINY, start_train, train_losses


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_pair(workdir, *args):
    port = _free_port()
    return [
        start_train(
            workdir,
            *CLI_TINY,
            *args,
            f"--coordinator_address=localhost:{port}",
            "--num_processes=2",
            f"--process_id={pid}",
            devices=2,
        )
        for pid in range(2)
    ]


def _wait_for_steps(workdir, n, procs, timeout=300):
    path = workdir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    raise AssertionError("training did not start")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_one_process_saves_the_same_step_on_both(tmp_path, sig):
    """Ctrl-C reaches the processes of one terminal only; SIGTERM is the
    preemption notice of one host. Either way both processes save one step."""
    run = tmp_path / "run"
    procs = _start_pair(run, "--config.num_train_steps=100000")
    try:
        _wait_for_steps(run, 3, procs)
        procs[0].send_signal(sig)
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "stopped by signal (resumable)" in outs[0][0]
    saved = sorted(int(s) for s in os.listdir(run / "checkpoints"))
    assert len(saved) == 1 and 3 <= saved[0] < 100000, saved
    assert train_losses(run)[-1][0] == saved[0]  # metrics flushed to the saved step
    # Resuming after such a stop is the two-process run of tests/test_reliability.py
    # plus the single-process signal tests: not repeated here (suite time).


def _free_slurm_port():
    """A free port in JAX's SLURM range, [61440, 65535]: the job id picks it."""
    for port in range(61440 + os.getpid() % 2000, 65536):
        with socket.socket() as s:
            try:
                s.bind(("localhost", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def test_distributed_detects_a_slurm_cluster(tmp_path):
    """``--distributed`` under the variables SLURM's srun sets for 2 tasks on one node."""
    job_id = _free_slurm_port() - 61440
    procs = []
    for pid in range(2):
        slurm = {
            "SLURM_JOB_ID": str(job_id),
            "SLURM_STEP_NODELIST": "localhost",
            "SLURM_NTASKS": "2",
            "SLURM_PROCID": str(pid),
            "SLURM_LOCALID": str(pid),
            "SLURM_STEP_NUM_NODES": "1",
        }
        procs.append(
            start_train(
                tmp_path,
                *CLI_TINY,
                "--config.num_train_steps=2",
                "--distributed",
                devices=2,
                extra_env=slurm,
            )
        )
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    first = outs[0][1].splitlines()[0]
    assert "4 CPU devices, 2 processes" in first, first
    # (XLA:CPU's Gloo collectives print their connections on stdout first.)
    summary = outs[0][0].splitlines()[-1]
    assert summary.startswith("step 2, eval accuracy") and "on 64 examples" in summary
    assert "eval accuracy" not in outs[1][0]  # only process 0 prints the summary
