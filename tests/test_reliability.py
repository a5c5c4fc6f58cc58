"""Faults the trainer survives and bad input it refuses (issue: reliability)."""

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import imagenet
from resnet_jax import data as data_lib
from resnet_jax import train_lib
from tests.helpers import ROOT, tiny_config, train_losses
from tests.helpers import read_metrics as metrics


def tiny(**overrides):
    return tiny_config(**overrides)


def cli(workdir, *overrides, devices=8, extra_env=None):
    cmd = [
        sys.executable,
        "train.py",
        "--config=configs/cifar10.py",
        f"--workdir={workdir}",
        "--noprogress",
        "--compilation_cache_dir=",
        *overrides,
    ]
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        **(extra_env or {}),
    )
    return cmd, env


CLI_TINY = [
    "--config.model=resnet8",
    "--config.mock_data=True",
    "--config.mock_num_examples=64",
    "--config.batch_size=16",
    "--config.eval_batch_size=16",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=1000",
    "--config.checkpoint_every_steps=1000",
]


# --------------------------------------------------------------------------- #
# Preemption
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_at_the_current_step_and_resumes_exactly(tmp_path, sig):
    steps = ["--config.num_train_steps=400"]
    cmd, env = cli(tmp_path / "run", *CLI_TINY, *steps)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    path = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until training is under way (step 5 logged)
        if path.exists() and len(path.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    saved = sorted(int(s) for s in os.listdir(tmp_path / "run" / "checkpoints"))
    assert len(saved) == 1 and 5 <= saved[0] < 400  # the step it was at, not a periodic one
    assert "stopped by signal" in out and "Run the same command to resume" in err
    logged = train_losses(tmp_path / "run")
    assert logged[-1][0] == saved[0]  # metrics flushed up to the saved step
    # The same command resumes from that step; compare with a run never stopped,
    # stopping both at 40 steps to keep the test short.
    short = ["--config.num_train_steps=40"]
    if sig == signal.SIGTERM and saved[0] < 40:
        subprocess.run(
            cli(tmp_path / "run", *CLI_TINY, *short)[0],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            timeout=600,
        )
        subprocess.run(
            cli(tmp_path / "ref", *CLI_TINY, *short)[0],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            timeout=600,
        )
        assert train_losses(tmp_path / "run")[:40] == train_losses(tmp_path / "ref")


# --------------------------------------------------------------------------- #
# Non-finite steps
# --------------------------------------------------------------------------- #


def test_nonfinite_step_stops_and_never_overwrites_a_good_checkpoint(tmp_path):
    train_lib.train_and_evaluate(tiny(num_train_steps=3), str(tmp_path), progress=False)
    good = sorted(os.listdir(tmp_path / "checkpoints"))
    assert good == ["3"]
    with pytest.raises(FloatingPointError, match=r"at step 4\. The last good checkpoint is step 3"):
        # 1e39 overflows float32: the first step's update is infinite.
        train_lib.train_and_evaluate(
            tiny(learning_rate=1e39, checkpoint_every_steps=1), str(tmp_path), progress=False
        )
    assert sorted(os.listdir(tmp_path / "checkpoints")) == good


def test_nonfinite_steps_can_be_skipped_and_are_counted(tmp_path):
    summary = train_lib.train_and_evaluate(
        tiny(learning_rate=1e39, skip_nonfinite_steps=True, log_every_steps=3),
        str(tmp_path),
        progress=False,
    )
    lines = [m for m in metrics(tmp_path) if "skipped_steps" in m]
    assert [m["skipped_steps"] for m in lines] == [3, 3]
    assert np.isfinite(summary["eval_loss"])  # the state was never updated with inf


# --------------------------------------------------------------------------- #
# Damaged checkpoints
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("damage", ["truncate", "remove_dir"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, caplog):
    train_lib.train_and_evaluate(tiny(), str(tmp_path), progress=False)
    newest = tmp_path / "checkpoints" / "6"
    if damage == "truncate":
        for root, _, files in os.walk(newest / "state"):
            for f in files:
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.truncate(3)
    else:
        shutil.rmtree(newest / "state")
    with caplog.at_level(logging.WARNING):
        summary = train_lib.train_and_evaluate(tiny(), str(tmp_path), progress=False)
    assert "Checkpoint at step 6 cannot be read" in caplog.text
    assert (tmp_path / "checkpoints_corrupt" / "6").is_dir()  # kept for inspection
    assert summary["step"] == 6
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    # Steps 4..6 were trained again from step 3, identically.
    steps = [s for s, _ in train_losses(tmp_path)]
    assert steps == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------- #
# Different device counts, several processes
# --------------------------------------------------------------------------- #


def test_restore_on_fewer_devices_gives_the_same_state_and_continues(tmp_path):
    train_lib.train_and_evaluate(tiny(num_train_steps=3), str(tmp_path / "w8"), progress=False)
    for devices in (1, 4):
        shutil.copytree(tmp_path / "w8", tmp_path / f"w{devices}")
    train_lib.train_and_evaluate(tiny(), str(tmp_path / "w8"), progress=False)
    ref = dict(train_losses(tmp_path / "w8"))
    for devices in (1, 4):
        cmd, env = cli(
            tmp_path / f"w{devices}",
            *CLI_TINY,
            "--config.num_train_steps=6",
            "--config.checkpoint_every_steps=3",
            devices=devices,
        )
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
        got = dict(train_losses(tmp_path / f"w{devices}"))
        assert sorted(got) == [1, 2, 3, 4, 5, 6]
        for s in (4, 5, 6):  # same state restored: same losses up to reduction order
            assert got[s] == pytest.approx(ref[s], rel=1e-4)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    overrides = [*CLI_TINY, "--config.num_train_steps=6", "--config.eval_every_steps=6"]
    cmd, env = cli(tmp_path / "one", *overrides, devices=4)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    port = _free_port()
    procs = []
    for pid in range(2):
        cmd, env = cli(
            tmp_path / "two",
            *overrides,
            f"--coordinator_address=localhost:{port}",
            "--num_processes=2",
            f"--process_id={pid}",
            devices=2,
        )
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in one] == [m["step"] for m in two]
    for a, b in zip(one, two):
        for k in ("train_loss", "eval_loss", "eval_count"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4), (a, b)
    assert one[-1]["eval_count"] == 64


# --------------------------------------------------------------------------- #
# Bad input, refused before any work
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"model": "resnet19"}, "Unknown model 'resnet19'"),
        ({"shortcut": "D"}, "Unknown shortcut 'D'"),
        ({"dtype": "float8"}, "Unknown dtype 'float8'"),
        ({"dataset": "mnist"}, "Unknown dataset 'mnist'"),
        ({"lr_schedule": "linear"}, "Unknown lr_schedule"),
        (
            {"batch_size": 20},
            r"batch_size=20 must be positive and divisible by the number of devices \(8\)",
        ),
        ({"eval_batch_size": 4}, "eval_batch_size=4"),
    ],
)
def test_bad_config_is_refused_before_any_work(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        train_lib.train_and_evaluate(tiny(**overrides), str(tmp_path / "w"), progress=False)
    assert not (tmp_path / "w").exists()


def test_unknown_config_key_on_the_command_line(tmp_path):
    cmd, env = cli(tmp_path, "--config.modle=resnet8")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "modle" in out.stderr
    assert not any(tmp_path.iterdir())


def test_imagenet_not_prepared_names_the_directory(tmp_path):
    c = imagenet.get_config()
    c.data_dir = str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError) as e:
        data_lib.InputPipeline(c)
    msg = str(e.value)
    assert "ILSVRC2012_img_train.tar" in msg and "ILSVRC2012_img_val.tar" in msg
    assert str(tmp_path / "tfds" / "downloads" / "manual") in msg
