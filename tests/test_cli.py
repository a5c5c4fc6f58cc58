"""train.py as a user meets it: one-line errors, the first screen, the workdir
lock, a torn metrics line, a full disk."""

import os
import re
import signal
import subprocess
import time

import pytest

from resnet_jax import errors
from resnet_jax.training import loop, recipe
from tests.helpers import (
    CLI_TINY,
    ROOT,
    read_metrics,
    run_train,
    start_train,
    tiny_config,
    train_command,
    train_losses,
)


def assert_one_line_error(out, *fragments):
    """Exit status 2, one ``train.py: error:`` line naming ``fragments``, no traceback."""
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("train.py: error:")]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(lines) == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


# Each bad setting and a fragment of its message. Validation runs before any
# work, so none of these creates the workdir.
BAD_SETTINGS = [
    ({"num_classes": 5}, "num_classes=5 but cifar10"),
    ({"learning_rate": -0.1}, "learning_rate=-0.1 must be positive"),
    ({"lr_boundaries": (48000, 32000)}, "must be strictly increasing"),
    ({"lr_boundaries": (0, 10)}, "must be positive steps"),
    ({"lr_boundaries": ("abc",)}, "must be a tuple of step numbers"),
    ({"weight_decay": -1e-4}, "weight_decay=-0.0001 must be >= 0"),
    ({"momentum": 1.0}, "momentum=1.0 must be in [0, 1)"),
    ({"batch_size": 12}, "batch_size=12 must be positive and divisible"),
    ({"eval_batch_size": 0}, "eval_batch_size=0"),
    ({"model": "resnet19"}, "Unknown model 'resnet19'"),
    ({"shortcut": "D"}, "Unknown shortcut 'D'"),
    ({"variant": "v2"}, "Unknown variant 'v2'"),
    ({"dtype": "float16"}, "float16 needs loss scaling"),
    ({"dataset": "mnist"}, "Unknown dataset 'mnist'"),
    ({"lr_schedule": "linear"}, "Unknown lr_schedule"),
    ({"label_smoothing": 1.0}, "label_smoothing=1.0"),
    ({"bn_momentum": 1.5}, "bn_momentum=1.5"),
    ({"keep_checkpoints": 0}, "keep_checkpoints=0"),
    ({"log_every_steps": 0}, "log_every_steps must be positive"),
    ({"steps_per_call": 2}, "steps_per_call > 1 needs"),
    ({"warmup_steps": -1}, "warmup_steps=-1"),
    ({"lr_decay_factor": 0.0}, "lr_decay_factor=0.0"),
    ({"crop_padding": -1}, "crop_padding=-1"),
    ({"bn_groups": 3}, "divisible by bn_groups=3"),
    ({"num_train_steps": 0, "num_epochs": float("inf")}, "num_epochs=inf must be a finite"),
    ({"num_train_steps": 10**12}, "beyond the step counter's range"),
    ({"checkpoint_every_steps": 2**40}, "checkpoint_every_steps=1,099,511,627,776 is beyond"),
    ({"seed": -1}, "seed=-1 must be an integer in [0, 2**32)"),
    ({"bn_epsilon": -1e-5}, "bn_epsilon=-1e-05 must be positive"),
    ({"dataset": "digits", "validation_split": 10}, "digits does not use it"),
    ({"train_crop": "center"}, "train_crop='center'; valid: scale, random_resized"),
    ({"dataset": "imagenet2012", "device_data": True}, "device_data=True holds the training"),
    ({"batch_size": 2**30, "eval_batch_size": 16}, "GiB, more than this host's"),
]


@pytest.mark.parametrize("overrides, fragment", BAD_SETTINGS, ids=[str(o) for o, _ in BAD_SETTINGS])
def test_every_bad_setting_is_refused_before_any_work(tmp_path, overrides, fragment):
    """In process; the command-line path is tested below on a sample."""
    with pytest.raises(errors.UserError, match=re.escape(fragment)):
        loop.train_and_evaluate(tiny_config(**overrides), str(tmp_path / "w"), progress=False)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--config.num_classes=5"], ["num_classes=5 but cifar10"]),
        (["--config.lr_boundaries=(48000,32000)"], ["strictly increasing"]),
        (["--config.modle=resnet8"], ["unknown config key 'modle'", "model"]),
        (["--config.batch_size=abc"], ["--config.batch_size=abc"]),
        (["--bogus_flag"], ["bogus_flag"]),
        (
            ["--config.lr_boundaries=(1,2)", "--config.lr_boundaries=(3,4)"],
            ["lr_boundaries is given twice"],
        ),
        (["--cpu_devices=-1"], ["--cpu_devices=-1"]),
    ],
)
def test_command_line_mistakes_are_one_line(tmp_path, args, fragments):
    out = run_train(tmp_path / "w", *CLI_TINY, *args, check=False, devices=1)
    assert_one_line_error(out, *fragments)
    assert not (tmp_path / "w").exists()


# tpu: no TPU (nor libtpu) here, JAX raises; cuda: no NVIDIA GPU, JAX skips
# the platform and then fails an assertion.
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_a_backend_the_machine_lacks_is_one_line(tmp_path, platform):
    cmd, env = train_command(tmp_path / "w", *CLI_TINY, devices=1)
    env["JAX_PLATFORMS"] = platform
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert_one_line_error(out, f"JAX_PLATFORMS={platform} names a backend", "unset it")
    assert not (tmp_path / "w").exists()


def test_config_file_that_is_missing_or_broken(tmp_path):
    out = run_train(tmp_path / "w", config=str(tmp_path / "nope.py"), check=False)
    assert_one_line_error(out, "cannot load the config file", "nope.py")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n    pass\n")
    out = run_train(tmp_path / "w", config=str(broken), check=False)
    assert_one_line_error(out, "does not parse", "broken.py")


def test_workdir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("mine")
    out = run_train(f, *CLI_TINY, check=False, devices=1)
    assert_one_line_error(out, "exists and is not a directory")
    assert f.read_text() == "mine"


def test_first_screen_then_resume_and_a_foreign_checkpoint(tmp_path):
    """A run shows its devices and plan and no backend noise; the same command
    resumes; another model in the same workdir is refused, nothing touched."""
    args = (*CLI_TINY, "--config.num_train_steps=2")
    out = run_train(tmp_path, *args, devices=2)
    lines = out.stderr.splitlines()
    assert lines[0].startswith("JAX ") and "2 CPU devices" in lines[0], out.stderr
    plan = [ln for ln in lines if ln.startswith("Plan: ")]
    assert len(plan) == 1 and "resnet8" in plan[0] and "fresh start" in plan[0]
    for noise in ("oneDNN", "libtpu", "absl::InitializeLog", "xla_bridge", "Traceback"):
        assert noise not in out.stderr, out.stderr
    assert len(lines) <= 4, out.stderr  # devices, plan, maybe a warning
    assert out.stdout.startswith("step 2, eval accuracy")
    out = run_train(tmp_path, *CLI_TINY, "--config.num_train_steps=3", devices=2)
    assert "resuming from step 2" in out.stderr
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    out = run_train(tmp_path, *args, "--config.model=resnet14", check=False, devices=2)
    assert_one_line_error(out, "different experiment", "resnet14")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_a_second_run_on_the_same_workdir_is_refused_and_kill_9_leaves_no_lock(tmp_path):
    first = start_train(tmp_path, *CLI_TINY, "--config.num_train_steps=100000", devices=1)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None
        out = run_train(tmp_path, *CLI_TINY, "--config.num_train_steps=100000", check=False)
        line = assert_one_line_error(out, "in use by a running training", f"pid {first.pid}")
        assert "another --workdir" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    # The operating system released the dead process's lock: the same command resumes.
    saved = train_losses(tmp_path)
    out = run_train(tmp_path, *CLI_TINY, "--config.num_train_steps=2", devices=1)
    assert out.returncode == 0 and saved  # it had trained; now it runs again


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    loop.train_and_evaluate(tiny_config(), str(tmp_path / "ref"), progress=False)
    cut = tmp_path / "cut"
    loop.train_and_evaluate(tiny_config(num_train_steps=3), str(cut), progress=False)
    with open(cut / "metrics.jsonl", "a") as f:  # a kill in the middle of a write
        f.write('{"step": 4, "train_loss": 2.3')
    loop.train_and_evaluate(tiny_config(), str(cut), progress=False)
    timing = {"images_per_sec", "data_wait_fraction", "host_rss_mb"}

    def kept(workdir):  # training lines (the cut run also evaluated at its end, step 3)
        lines = [m for m in read_metrics(workdir) if "train_loss" in m]
        return [{k: v for k, v in m.items() if k not in timing} for m in lines]

    assert kept(cut) == kept(tmp_path / "ref")  # every whole line, once, in order
    assert read_metrics(cut)[-1] == read_metrics(tmp_path / "ref")[-1]  # the final eval
    assert train_losses(cut) == train_losses(tmp_path / "ref")
    assert [m["step"] for m in read_metrics(cut) if "train_loss" in m] == [1, 2, 3, 4, 5, 6]


def _mount_tmpfs(path, megabytes):
    path.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={int(megabytes * 1024)}k", "tmpfs", str(path)],
        capture_output=True,
    )
    return res.returncode == 0


def test_a_full_disk_while_saving_is_one_message_and_resumes(tmp_path, monkeypatch):
    """On a real 1.5 MB tmpfs where this machine allows mounting (root); else
    by making orbax's save fail the way tensorstore reports a full disk."""
    disk = tmp_path / "disk"
    real = _mount_tmpfs(disk, 1.5)
    args = (*CLI_TINY, "--config.num_train_steps=12", "--config.checkpoint_every_steps=1")
    args += ("--config.keep_checkpoints=20",)
    try:
        if real:
            out = run_train(disk / "run", *args, check=False, devices=1)
            line = assert_one_line_error(out, "Could not save the checkpoint of step")
        else:
            line = _simulated_full_disk(disk / "run", monkeypatch)
        failed = int(line.split("checkpoint of step ")[1].split(":")[0])
        assert f"The last good checkpoint is step {failed - 1} " in line, line
        assert "free space" in line and "run the same command" in line
        if real:  # free space, resume: the same losses as an uninterrupted run
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
            run_train(disk / "run", *args, devices=1)
            run_train(tmp_path / "ref", *args, devices=1)
            assert train_losses(disk / "run") == train_losses(tmp_path / "ref")
    finally:
        if real:
            subprocess.run(["umount", str(disk)], check=False)


def _simulated_full_disk(workdir, monkeypatch):
    import orbax.checkpoint as ocp

    original = ocp.CheckpointManager.save

    def save(self, step, *a, **kw):
        if step == 5:
            raise ValueError('RESOURCE_EXHAUSTED: Error writing "x": Failed writing: No space')
        return original(self, step, *a, **kw)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    c = tiny_config(num_train_steps=12, checkpoint_every_steps=1, keep_checkpoints=20)
    with pytest.raises(errors.CheckpointSaveError) as e:
        loop.train_and_evaluate(c, str(workdir), progress=False)
    return f"train.py: error: {errors.one_line(e.value)}"


@pytest.mark.parametrize(
    "key, value", [("dataset", "cifar100"), ("shortcut", "B"), ("variant", "v1.5")]
)
def test_a_checkpoint_of_another_experiment_is_refused(tmp_path, key, value):
    loop.train_and_evaluate(tiny_config(num_train_steps=1), str(tmp_path), progress=False)
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    with pytest.raises(errors.UserError, match=f"{key}: checkpoint .* vs config '{value}'"):
        loop.train_and_evaluate(
            tiny_config(num_train_steps=2, **{key: value}), str(tmp_path), progress=False
        )
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_progress_bar_and_the_default_compilation_cache(tmp_path):
    """The bar is on by default (stderr); the compilation cache is on by default
    and a run fills the directory it is given."""
    import train

    default = train.FLAGS["compilation_cache_dir"].default
    assert default.endswith(os.path.join(".cache", "resnet_jax", "jax_compilation_cache"))
    cache = tmp_path / "cache"
    cmd, env = train_command(tmp_path / "w", *CLI_TINY, "--config.num_train_steps=3")
    cmd = [a for a in cmd if a != "--noprogress" and not a.startswith("--compilation_cache_dir")]
    cmd.append(f"--compilation_cache_dir={cache}")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    bar = out.stderr.replace("\r", "\n")
    assert "3/3" in bar and "step/s" in bar and "loss=" in bar, out.stderr[-2000:]
    assert any(cache.iterdir())  # compiled programs were stored


def test_bn_groups_reach_the_model_from_the_config():
    model = recipe.model_from_config(tiny_config(bn_groups=8), 10)
    assert model.bn_groups == 8


def test_every_config_key_is_documented_in_the_readme():
    """configs/common.py is the one source of defaults; the reference the README
    links, docs/training.md, lists every key."""
    import pathlib

    from configs import common

    page = (pathlib.Path(__file__).parent.parent / "docs" / "training.md").read_text()
    missing = [k for k in common.base_config() if f"`{k}`" not in page]
    assert not missing, f"config keys not in docs/training.md: {missing}"
