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


def kill_after_checkpoint(workdir, args, step):
    """Starts train.py on ``workdir`` and kills it with SIGKILL as soon as the
    checkpoint of ``step`` is complete (orbax renames it into place whole)."""
    proc = start_train(workdir, *args)
    deadline = time.time() + 300
    while not os.path.isdir(workdir / "checkpoints" / str(step)) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


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
    kill_after_checkpoint(dir_, TINY, 10)
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


def test_stochastic_depth_resumes_exactly_and_differs_from_no_drop_path(tmp_path):
    """Drop path's randomness is fold_in(key(seed), step): a run killed after
    its step-10 checkpoint and resumed draws what the uninterrupted one drew."""
    args = [a if "num_train_steps" not in a else "--config.num_train_steps=20" for a in TINY]
    args.append("--config.drop_path_rate=0.3")
    run_train(tmp_path / "ref", *args)
    dir_ = tmp_path / "killed"
    kill_after_checkpoint(dir_, args, 10)
    run_train(dir_, *args)
    run_train(tmp_path / "off", *args[:-1])
    ref, resumed, off = (losses(tmp_path / d)[0] for d in ("ref", "killed", "off"))
    assert [s for s, _ in ref][-1] == 20
    assert resumed == ref
    assert off[0] != ref[0]  # the drop path changed the very first steps
