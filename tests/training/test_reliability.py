"""Faults the trainer survives and bad input it refuses (issue: reliability)."""

import itertools
import logging
import os
import shutil
import signal
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import imagenet
from resnet_jax import data as data_lib
from resnet_jax.training import experiment, loop
from tests.helpers import CLI_TINY, run_train, start_train, tiny_config, train_losses
from tests.helpers import read_metrics as metrics


def tiny(**overrides):
    return tiny_config(**overrides)


def restored_state(config, workdir):
    """The newest checkpoint of ``workdir``, read back as a run of ``config`` on
    this process's 8 devices would read it."""
    exp = experiment.build_experiment(config, str(workdir))
    ckpt = experiment.open_checkpointer(exp)
    try:
        state, meta = experiment.restore_or_init(exp, ckpt)
    finally:
        ckpt.close()
    assert meta is not None, f"no checkpoint in {workdir}"
    return jax.device_get(state)


# --------------------------------------------------------------------------- #
# Preemption
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """``losses(n)``: (step, train_loss) of steps 1..n of a train.py run of
    CLI_TINY never stopped. One run of at least 30 steps serves every caller
    that needs no more: with the step schedule, ``num_train_steps`` changes
    nothing before the last step."""
    runs = {}

    def losses(n):
        longest = max(runs, default=0)
        if longest < n:
            workdir = tmp_path_factory.mktemp("uninterrupted")
            longest = max(n, 30)
            run_train(workdir, *CLI_TINY, f"--config.num_train_steps={longest}")
            runs[longest] = train_losses(workdir)
        return runs[longest][:n]

    return losses


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_at_the_current_step_and_resumes_exactly(tmp_path, sig, uninterrupted):
    workdir = tmp_path / "run"
    proc = start_train(workdir, *CLI_TINY, "--config.num_train_steps=400")
    path = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until training is under way (step 5 logged)
        if path.exists() and len(path.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints"))
    assert len(saved) == 1 and 5 <= saved[0] < 400  # the step it was at, not a periodic one
    assert "stopped by signal" in out and "Run the same command to resume" in err
    logged = train_losses(workdir)
    assert logged[-1][0] == saved[0]  # metrics flushed up to the saved step
    # The same command (shortened to 5 steps past the saved one) resumes from
    # that step and logs what a run never stopped logs, bit for bit.
    end = saved[0] + 5
    resume = run_train(workdir, *CLI_TINY, f"--config.num_train_steps={end}")
    assert f"resuming from step {saved[0]}" in resume.stderr
    resumed = train_losses(workdir)
    assert [s for s, _ in resumed] == list(range(1, end + 1))
    assert resumed[: saved[0]] == logged  # the lines before the signal, kept
    assert resumed == uninterrupted(end)


# --------------------------------------------------------------------------- #
# Non-finite steps
# --------------------------------------------------------------------------- #


def test_nonfinite_step_stops_and_never_overwrites_a_good_checkpoint(tmp_path):
    loop.train_and_evaluate(tiny(num_train_steps=3), str(tmp_path), progress=False)
    good = sorted(os.listdir(tmp_path / "checkpoints"))
    assert good == ["3"]
    with pytest.raises(FloatingPointError, match=r"at step 4\. The last good checkpoint is step 3"):
        # 1e39 overflows float32: the first step's update is infinite.
        loop.train_and_evaluate(
            tiny(learning_rate=1e39, checkpoint_every_steps=1), str(tmp_path), progress=False
        )
    assert sorted(os.listdir(tmp_path / "checkpoints")) == good


def insert_nan_batch(monkeypatch, before):
    """Makes the input pipeline yield, just before its batch ``before``
    (0-based), an extra batch of NaN images: the batch of step ``before + 1``
    is poisoned and every later step gets the batch one step later than a
    clean run does."""
    clean = data_lib.InputPipeline.train_batches

    def train_batches(self, start_step=0):
        for step, batch in zip(itertools.count(start_step), clean(self, start_step)):
            if step == before:
                yield {**batch, "image": np.full_like(batch["image"], np.nan)}
            yield batch

    monkeypatch.setattr(data_lib.InputPipeline, "train_batches", train_batches)


def test_nonfinite_steps_can_be_skipped_and_are_counted(tmp_path, monkeypatch):
    config = tiny(skip_nonfinite_steps=True)
    loop.train_and_evaluate(config, str(tmp_path / "clean"), progress=False)
    insert_nan_batch(monkeypatch, before=3)
    summary = loop.train_and_evaluate(config, str(tmp_path / "nan"), progress=False)
    windows = [m for m in metrics(tmp_path / "nan") if "learning_rate" in m]  # every log line
    assert [(m["step"], m.get("skipped_steps", 0)) for m in windows] == [
        (1, 0),
        (2, 0),
        (3, 0),
        (4, 1),  # the NaN batch's step, counted in its window
        (5, 0),
        (6, 0),
    ]
    assert "train_loss" not in windows[3]  # that window had no step to average
    clean = [loss for _, loss in train_losses(tmp_path / "clean")]
    got = dict(train_losses(tmp_path / "nan"))
    # Steps 1-3 are the clean run's. Step 4 left the state as it was (parameters,
    # BatchNorm statistics, momentum), so steps 5 and 6, on the clean run's
    # batches of steps 4 and 5, give exactly its losses of steps 4 and 5.
    assert [got[s] for s in (1, 2, 3, 5, 6)] == clean[:5]
    state = restored_state(config, tmp_path / "nan")
    assert int(state.step) == 6
    # optax's own step counters advanced through the skipped step, so a
    # schedule keeps following the step.
    counts = [x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.integer)]
    assert counts and all(int(c) == 6 for c in counts)
    for leaf in jax.tree.leaves((state.params, state.batch_stats, state.opt_state)):
        assert np.all(np.isfinite(leaf))
    assert np.isfinite(summary["eval_loss"])


# --------------------------------------------------------------------------- #
# Damaged checkpoints
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("damage", ["truncate", "remove_dir"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, caplog):
    loop.train_and_evaluate(tiny(), str(tmp_path), progress=False)
    undamaged = metrics(tmp_path)
    newest = tmp_path / "checkpoints" / "6"
    if damage == "truncate":
        for root, _, files in os.walk(newest / "state"):
            for f in files:
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.truncate(3)
    else:
        shutil.rmtree(newest / "state")
    with caplog.at_level(logging.INFO):
        summary = loop.train_and_evaluate(tiny(), str(tmp_path), progress=False)
    assert "Checkpoint at step 6 cannot be read" in caplog.text
    assert "resuming from step 3" in caplog.text
    assert (tmp_path / "checkpoints_corrupt" / "6").is_dir()  # kept for inspection
    assert summary["step"] == 6
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    # Resumed at step 3, not restarted: the undamaged run's lines of steps 1-3
    # are kept as they were (timings included, which no second run reproduces)
    # and no earlier metrics file was set aside.
    lines = metrics(tmp_path)
    assert lines[:3] == undamaged[:3] and [m["step"] for m in lines[:3]] == [1, 2, 3]
    assert [f for f in os.listdir(tmp_path) if f.startswith("metrics.jsonl.")] == []
    # Steps 4..6 were trained again from step 3, with the undamaged run's losses.
    assert train_losses(tmp_path) == [
        (m["step"], m["train_loss"]) for m in undamaged if "train_loss" in m
    ]
    assert [s for s, _ in train_losses(tmp_path)] == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------- #
# Different device counts, several processes
# --------------------------------------------------------------------------- #


def test_restore_on_fewer_devices_gives_the_same_state_and_continues(tmp_path):
    loop.train_and_evaluate(tiny(num_train_steps=3), str(tmp_path / "w8"), progress=False)
    for devices in (1, 4):
        shutil.copytree(tmp_path / "w8", tmp_path / f"w{devices}")
    loop.train_and_evaluate(tiny(), str(tmp_path / "w8"), progress=False)
    ref = dict(train_losses(tmp_path / "w8"))
    ref_eval = {m["step"]: m["eval_loss"] for m in metrics(tmp_path / "w8") if "eval_loss" in m}
    ref_state = restored_state(tiny(), tmp_path / "w8")
    for devices in (1, 4):
        workdir = tmp_path / f"w{devices}"
        run_train(
            workdir,
            *CLI_TINY,
            "--config.num_train_steps=6",
            "--config.checkpoint_every_steps=3",
            devices=devices,
        )
        got = dict(train_losses(workdir))
        assert sorted(got) == [1, 2, 3, 4, 5, 6]
        for s in (4, 5, 6):  # same state restored: same losses up to reduction order
            assert got[s] == pytest.approx(ref[s], rel=1e-4)
        # Train-mode losses never read the BatchNorm running statistics; the
        # evaluation at step 6 and the saved state do.
        got_eval = {m["step"]: m["eval_loss"] for m in metrics(workdir) if "eval_loss" in m}
        assert sorted(got_eval) == [3, 6]  # 3: the run of the copied workdir
        assert got_eval[6] == pytest.approx(ref_eval[6], rel=1e-4)
        state = restored_state(tiny(), workdir)
        assert int(state.step) == 6
        for want, have in zip(
            jax.tree.leaves((ref_state.params, ref_state.batch_stats, ref_state.opt_state)),
            jax.tree.leaves((state.params, state.batch_stats, state.opt_state)),
        ):
            np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    overrides = [*CLI_TINY, "--config.num_train_steps=6", "--config.eval_every_steps=6"]
    run_train(tmp_path / "one", *overrides, devices=4)
    port = _free_port()
    procs = [
        start_train(
            tmp_path / "two",
            *overrides,
            f"--coordinator_address=localhost:{port}",
            "--num_processes=2",
            f"--process_id={pid}",
            devices=2,
        )
        for pid in range(2)
    ]
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
        ({"eval_batch_size": 0}, "eval_batch_size=0 must be positive"),
    ],
)
def test_bad_config_is_refused_before_any_work(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        loop.train_and_evaluate(tiny(**overrides), str(tmp_path / "w"), progress=False)
    assert not (tmp_path / "w").exists()


def test_unknown_config_key_on_the_command_line(tmp_path):
    out = run_train(tmp_path, "--config.modle=resnet8", check=False, timeout=300)
    assert out.returncode == 2 and "modle" in out.stderr
    assert not any(tmp_path.iterdir())


def test_imagenet_not_prepared_names_the_directory(tmp_path):
    c = imagenet.get_config()
    c.data_dir = str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError) as e:
        data_lib.InputPipeline(c)
    msg = str(e.value)
    assert "ILSVRC2012_img_train.tar" in msg and "ILSVRC2012_img_val.tar" in msg
    assert str(tmp_path / "tfds" / "downloads" / "manual") in msg
