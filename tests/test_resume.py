"""train.py as a user runs it: kill -9 and resume exactly; the digits default."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_cmd(workdir, *overrides, config="configs/cifar10.py"):
    return [
        sys.executable,
        "train.py",
        f"--config={config}",
        f"--workdir={workdir}",
        "--noprogress",
        "--compilation_cache_dir=",
        *overrides,
    ]


def env(devices=8):
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e["JAX_PLATFORMS"] = "cpu"
    return e


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(x) for x in f]
    return [(m["step"], m["train_loss"]) for m in lines if "train_loss" in m], [
        (m["step"], m["eval_loss"]) for m in lines if "eval_loss" in m
    ]


TINY = [
    "--config.model=resnet8",
    "--config.mock_data=True",
    "--config.mock_num_examples=64",
    "--config.batch_size=16",
    "--config.eval_batch_size=16",
    "--config.num_train_steps=40",
    "--config.log_every_steps=3",
    "--config.eval_every_steps=20",
    "--config.checkpoint_every_steps=10",
]


def test_kill_9_and_resume_reproduces_the_uninterrupted_losses(tmp_path):
    ref_dir, dir_ = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(
        train_cmd(ref_dir, *TINY), cwd=ROOT, env=env(), check=True, capture_output=True, timeout=600
    )
    # Same command, killed with SIGKILL as soon as the first checkpoint is complete.
    proc = subprocess.Popen(
        train_cmd(dir_, *TINY),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not os.path.isdir(dir_ / "checkpoints" / "10") and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = losses(dir_)[0]
    assert killed_at and killed_at[-1][0] < 40
    subprocess.run(
        train_cmd(dir_, *TINY), cwd=ROOT, env=env(), check=True, capture_output=True, timeout=600
    )
    ref_train, ref_eval = losses(ref_dir)
    got_train, got_eval = losses(dir_)
    assert [s for s, _ in ref_train] == list(range(3, 40, 3)) + [40]
    assert got_train == ref_train  # bit-identical losses, including the window across step 10
    assert got_eval == ref_eval


@pytest.mark.slow
def test_digits_default_reaches_97_percent(tmp_path):
    out = subprocess.run(
        train_cmd(tmp_path, config="configs/digits.py"),
        cwd=ROOT,
        env=env(devices=1),
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    _, evals = losses(tmp_path)
    with open(tmp_path / "metrics.jsonl") as f:
        final = [json.loads(x) for x in f if "eval_accuracy" in x][-1]
    assert final["eval_count"] == 360
    assert final["eval_accuracy"] >= 0.97, final
    assert "eval accuracy" in out.stdout  # the one-line summary
