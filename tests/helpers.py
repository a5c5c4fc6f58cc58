"""Shared test fixtures: a tiny CIFAR-10 mock-data config, metrics readers, and
the one helper that launches train.py in a subprocess."""

import json
import os
import shutil
import subprocess
import sys

from configs import cifar10

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One persistent compilation cache for every train.py subprocess of a test
# session (set by tests/conftest.py): the same tiny programs compile once.
COMPILE_CACHE_ENV = "RESNET_JAX_TEST_COMPILE_CACHE"

# The tiny run of tiny_config, as command-line overrides of configs/cifar10.py.
CLI_TINY = (
    "--config.model=resnet8",
    "--config.mock_data=True",
    "--config.mock_num_examples=64",
    "--config.batch_size=16",
    "--config.eval_batch_size=16",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=1000",
    "--config.checkpoint_every_steps=1000",
)


def tiny_config(**overrides):
    """resnet8 on 64 mock CIFAR-10 examples, batch 16, 6 steps, checkpoints at 3 and 6."""
    c = cifar10.get_config()
    c.update(
        model="resnet8",
        mock_data=True,
        mock_num_examples=64,
        batch_size=16,
        eval_batch_size=16,
        num_train_steps=6,
        log_every_steps=1,
        eval_every_steps=6,
        checkpoint_every_steps=3,
    )
    c.update(overrides)
    return c


def train_command(workdir, *args, config="configs/cifar10.py", devices=8, extra_env=None):
    """``(argv, env)`` of ``python train.py`` on ``devices`` simulated CPU devices."""
    cmd = [
        sys.executable,
        "train.py",
        f"--config={config}",
        f"--workdir={workdir}",
        "--noprogress",
        f"--compilation_cache_dir={os.environ.get(COMPILE_CACHE_ENV, '')}",
        *args,
    ]
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        **(extra_env or {}),
    )
    return cmd, env


def run_train(workdir, *args, check=True, timeout=600, **kw):
    """Runs train.py to its end; returns the CompletedProcess (text output)."""
    cmd, env = train_command(workdir, *args, **kw)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"train.py exited {out.returncode}:\n{out.stderr[-3000:]}")
    return out


def start_train(workdir, *args, **kw):
    """Starts train.py in the background; returns the Popen (text pipes)."""
    cmd, env = train_command(workdir, *args, **kw)
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def read_metrics(workdir):
    """Every line of WORKDIR/metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(workdir):
    """(step, train_loss) of every training line."""
    return [(m["step"], m["train_loss"]) for m in read_metrics(workdir) if "train_loss" in m]


def as_a_user(cmd: list[str]) -> list[str]:
    """``cmd`` without the capabilities that let root read and write any file."""
    if os.geteuid() != 0:
        return cmd
    capsh = shutil.which("capsh") or "/usr/sbin/capsh"
    line = " ".join(f"'{c}'" for c in cmd)
    return [capsh, "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", line]
