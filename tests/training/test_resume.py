"""train.py as a user runs it: kill -9 and resume exactly; the digits default."""

import os
import signal
import time

import pytest

from tests.helpers import read_metrics, run_train, start_train


def losses(workdir):
    lines = read_metrics(workdir)
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
    run_train(ref_dir, *TINY)
    # Same command, killed with SIGKILL as soon as the first checkpoint is complete.
    proc = start_train(dir_, *TINY)
    deadline = time.time() + 300
    while not os.path.isdir(dir_ / "checkpoints" / "10") and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = losses(dir_)[0]
    assert killed_at and killed_at[-1][0] < 40
    run_train(dir_, *TINY)
    ref_train, ref_eval = losses(ref_dir)
    got_train, got_eval = losses(dir_)
    assert [s for s, _ in ref_train] == list(range(3, 40, 3)) + [40]
    assert got_train == ref_train  # bit-identical losses, including the window across step 10
    assert got_eval == ref_eval


@pytest.mark.slow
def test_digits_default_reaches_97_percent(tmp_path):
    out = run_train(tmp_path, config="configs/digits.py", devices=1, timeout=900)
    final = [m for m in read_metrics(tmp_path) if "eval_accuracy" in m][-1]
    assert final["eval_count"] == 360
    assert final["eval_accuracy"] >= 0.97, final
    assert "eval accuracy" in out.stdout  # the one-line summary
