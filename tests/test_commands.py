"""Every command a user types, beyond train.py and evaluate (tests/test_cli.py,
tests/test_evaluate.py), meets a mistake as train.py does: one line on stderr
naming the problem, exit status 2, no traceback, nothing created."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, as_a_user

pytestmark = pytest.mark.slow


def run_command(*args, timeout=300, user=False):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", *args]
    return subprocess.run(
        as_a_user(cmd) if user else cmd,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(out) -> str:
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and ": error: " in lines[0], out.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    "args, says",
    [
        (["experiments.sweep", "--dataset", "digits", "--root", "{file}"], "is not a directory"),
        (["experiments.sweep", "--dataset", "digits", "--depths", "8,x"], "'8,x' is not a"),
        (["experiments.sweep", "--dataset", "mnist"], "argument --dataset: invalid choice"),
        (["resnet_jax.mini_imagenet", "{file}"], "cannot write the miniature ImageNet under"),
        (["resnet_jax.mini_imagenet", "{dir}", "--classes=abc"], "invalid int value: 'abc'"),
    ],
)
def test_mistakes_are_one_line(tmp_path, args, says):
    file = tmp_path / "a_file"
    file.write_text("mine")
    new_dir = tmp_path / "new"
    args = [a.format(file=file, dir=new_dir) for a in args]
    assert says in one_line_error(run_command(*args))
    assert file.read_text() == "mine" and not new_dir.exists()


def test_a_read_only_sweep_root_is_one_line(tmp_path):
    """As a user without root's capabilities: the root and a folder to make in it."""
    root = tmp_path / "read_only"
    root.mkdir()
    root.chmod(0o555)
    for target in (root, root / "sub"):
        out = run_command(
            "experiments.sweep", "--dataset", "digits", "--root", str(target), user=True
        )
        assert f"--root {target} is not writable (Permission denied)" in one_line_error(out)
    assert os.listdir(root) == []
