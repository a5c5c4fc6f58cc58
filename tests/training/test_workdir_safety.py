"""Nothing a user wrote is lost (issue 20): a checkpoint that cannot be read is
not a damaged one, a read-only workdir is one line, a quarantine never replaces
an earlier one, and a foreign line of metrics.jsonl is kept aside.

Tests run as root, who reads every file whatever its mode: the permission cases
run train.py under ``capsh --drop=cap_dac_override,cap_dac_read_search``, as an
ordinary user would be refused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.training import checkpoints, loop, runtime
from tests.helpers import CLI_TINY, as_a_user, read_metrics, tiny_config, train_command

pytestmark = pytest.mark.slow

RUN = (*CLI_TINY, "--config.checkpoint_every_steps=3", "--config.log_every_steps=3")


def _train(workdir, *args, user=False):
    from tests.helpers import ROOT

    cmd, env = train_command(workdir, *RUN, *args, devices=1)
    cmd = as_a_user(cmd) if user else cmd
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _one_line(out) -> str:
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [
        line
        for line in out.stderr.splitlines()
        if line.strip() and not line.startswith(("JAX ", "warning: lr_boundaries"))
    ]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), out.stderr[-3000:]
    return lines[0]


def _tree(path) -> dict[str, str]:
    """Every file under ``path`` with the sha256 of its bytes (read as root), but
    the lock file, which a run that starts creates."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            if name == ".lock":
                continue
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 6-step run with checkpoints at steps 3 and 6."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    out = _train(workdir, "--config.num_train_steps=6")
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    return workdir


def _copy(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    os.remove(run / ".lock")
    return run


def test_an_unreadable_checkpoint_is_not_moved_and_nothing_is_lost(trained, tmp_path):
    run = _copy(trained, tmp_path)
    before = _tree(run)
    for root, _, files in os.walk(run / "checkpoints" / "6"):
        for name in files:
            os.chmod(os.path.join(root, name), 0)
    # Twice: the second run must not replace anything the first one kept.
    for _ in range(2):
        line = _one_line(_train(run, "--config.num_train_steps=9", user=True))
        assert "Cannot read the checkpoint of step 6" in line and "nothing was moved" in line
        assert "Permission denied" in line
    assert not (run / "checkpoints_corrupt").exists()
    assert sorted(os.listdir(run / "checkpoints")) == ["3", "6"]
    assert _tree(run) == before  # every byte as it was (root reads the files)


def test_an_unreadable_checkpoints_folder_is_one_line(trained, tmp_path):
    run = _copy(trained, tmp_path)
    before = _tree(run)
    os.chmod(run / "checkpoints", 0)
    try:
        line = _one_line(_train(run, "--config.num_train_steps=9", user=True))
    finally:
        os.chmod(run / "checkpoints", 0o755)
    assert "Cannot open the checkpoints in" in line and "Permission denied" in line
    assert _tree(run) == before


def test_a_read_only_workdir_is_one_line_fresh_or_resumed(trained, tmp_path):
    run = _copy(trained, tmp_path)
    before = _tree(run)
    os.chmod(run, 0o555)
    try:
        resumed = _one_line(_train(run, "--config.num_train_steps=9", user=True))
        fresh = _one_line(_train(run / "new", "--config.num_train_steps=9", user=True))
    finally:
        os.chmod(run, 0o755)
    assert "is not writable" in resumed and "Nothing was changed" in resumed
    assert "Cannot create the workdir" in fresh
    assert _tree(run) == before and not (run / "new").exists()


def _state(value: float) -> dict:
    return {"w": jnp.full((4,), value, jnp.float32)}


def test_a_quarantine_never_replaces_an_earlier_one(tmp_path):
    """A damaged step 2 is moved aside twice: both copies are kept."""
    directory = tmp_path / "checkpoints"
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0.0))
    for value in (1.0, 2.0):
        ckpt = checkpoints.Checkpointer(directory, async_save=False)
        ckpt.save(1, _state(0.5), {"fingerprint": {}})
        ckpt.save(2, _state(value), {"fingerprint": {}})
        ckpt.close()
        for root, _, files in os.walk(directory / "2" / "state"):
            for name in files:
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"")  # truncated: damaged, not unreadable
        ckpt = checkpoints.Checkpointer(directory, async_save=False)
        state, _ = ckpt.restore_latest(abstract, {})
        ckpt.close()
        np.testing.assert_array_equal(state["w"], np.full((4,), 0.5))  # step 1, the older one
        shutil.rmtree(directory / "1")
    kept = sorted(os.listdir(tmp_path / "checkpoints_corrupt"))
    assert kept == ["2", "2.1"]


def test_a_foreign_metrics_line_is_skipped_and_kept_aside(tmp_path):
    run = tmp_path / "run"
    loop.train_and_evaluate(tiny_config(num_train_steps=3), str(run), progress=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"note": "written by my own script"}\n[1, 2]\n')
    text = (run / "metrics.jsonl").read_text()
    summary = loop.train_and_evaluate(tiny_config(), str(run), progress=False)
    assert summary["step"] == 6
    assert all("step" in m for m in read_metrics(run))
    backups = sorted(run.glob("metrics.jsonl.*.bak"))
    assert [b.read_text() for b in backups] == [text]  # the lines as the user left them
    assert '"note": "written by my own script"' in backups[0].read_text()
    json.loads(backups[0].read_text().splitlines()[-2])


def test_a_second_ctrl_c_stops_at_once_with_one_line(tmp_path):
    from tests.helpers import ROOT

    cmd, env = train_command(tmp_path / "run", *RUN, "--config.num_train_steps=100000", devices=1)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 300
        metrics = tmp_path / "run" / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        # The second as soon as the first is acknowledged: a tiny run saves and
        # exits within a fraction of a second, and a Ctrl-C after its exit is none.
        seen, watchdog = [], threading.Timer(60, proc.kill)  # no hang if it never answers
        watchdog.start()
        try:
            for line in proc.stderr:
                seen.append(line)
                if "Received signal" in line:
                    break
        finally:
            watchdog.cancel()
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
        err = "".join(seen) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
    # 130, or killed by the SIGINT itself (-2, which a shell reports as 130
    # too) when it lands after the save, while the interpreter finalises and
    # has put back the default handlers: then the last line says it was saved.
    saved = "checkpoint saved. Run the same command to resume." in err.strip().splitlines()[-1]
    assert proc.returncode == 130 or (proc.returncode == -signal.SIGINT and saved), err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    if proc.returncode != 130:
        return
    # During a step: the trainer's handler; after the first Ctrl-C's save has
    # ended the loop: the command's own line.
    assert err.strip().splitlines()[-1] in (
        runtime.SECOND_INTERRUPT.strip(),
        "train.py: interrupted; run the same command to go on.",
    ), err[-3000:]


def test_the_second_ctrl_c_is_never_swallowed():
    """The handler leaves at once: no KeyboardInterrupt that a finalizer or a
    callback could swallow while the program goes on."""
    code = (
        "import os, signal, time\n"
        "from resnet_jax.training import runtime\n"
        "flag = runtime.PreemptionFlag()\n"
        "flag.install()\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(0.5)\n"
        "assert flag.reached(1)\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "except BaseException:\n"
        "    pass  # a swallowed interrupt\n"
        "print('went on')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert out.returncode == 130 and "went on" not in out.stdout, out.stdout + out.stderr
    assert out.stderr.strip().splitlines()[-1] == runtime.SECOND_INTERRUPT.strip()
