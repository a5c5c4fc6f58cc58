"""The benchmark scripts run and report what they promise (tiny sizes; no timing asserted)."""

import gzip
import importlib.util
import json
import os

import numpy as np
import pytest

from benchmarks import cifar_fast, compare_torch, profile_step, throughput


@pytest.fixture(autouse=True)
def _keep_xla_flags(monkeypatch):
    # The scripts append XLA:CPU flags to XLA_FLAGS (no effect once JAX has
    # started); keep them from reaching other tests' subprocesses.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))


KEYS = {"model", "batch_size", "dtype", "devices", "images_per_sec", "compile_seconds"}


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_throughput_reports_the_required_fields(mode, capsys):
    r = throughput.main(
        [
            "--model=resnet8",
            "--batch-size=8",
            "--steps=2",
            "--warmup=1",
            f"--mode={mode}",
            "--compilation-cache-dir=",
        ]
    )
    assert KEYS <= set(r) and r["images_per_sec"] > 0 and r["devices"] == 8
    assert r["materialize"] == "auto" and r["mode"] == mode
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('{"model": "resnet8"')


def test_profile_step_sums_the_operations_of_the_trace(tmp_path):
    r = profile_step.main(
        [
            "--model=resnet8",
            "--batch-size=8",
            "--steps=2",
            "--warmup=1",
            f"--trace-dir={tmp_path}",
            "--compilation-cache-dir=",
        ]
    )
    assert r["source"] == "host" and r["op_ms_per_step"] > 0
    assert np.isclose(sum(k["share"] for k in r["kinds"]), 1.0)
    kinds = {k["kind"] for k in r["kinds"]}
    assert any("fusion" in k for k in kinds), kinds
    assert not any(k.startswith(("$", "ThunkExecutor")) for k in kinds), kinds
    assert r["trace"].startswith(str(tmp_path))


def test_cifar_fast_path_benchmark_runs():
    r = cifar_fast.main(
        [
            "--model=resnet8",
            "--batch-size=8",
            "--steps-per-call=2",
            "--calls=1",
            "--train-size=64",
            "--compilation-cache-dir=",
        ]
    )
    assert r["final_loss_finite"] and r["steps_per_sec"] > 0 and r["steps_per_call"] == 2


def test_compare_torch_says_how_to_install_pytorch(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    with pytest.raises(SystemExit, match="pip install torch torchvision"):
        compare_torch.main(["--model=resnet8"])


def test_profile_summary_counts_each_device_operation_once(tmp_path):
    # A device process shows the step on a module line, an op line and a kernel line.
    def meta(kind, pid, tid, name):
        return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}

    def ev(pid, tid, name, dur):
        return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": 0, "dur": dur}

    events = [
        meta("process_name", 1, 0, "/device:GPU:0"),
        meta("process_name", 2, 0, "/host:CPU"),
        meta("thread_name", 1, 10, "XLA Modules"),
        meta("thread_name", 1, 11, "XLA Ops"),
        meta("thread_name", 1, 12, "Stream #7(Compute)"),
        ev(1, 10, "jit_train_step", 9000),
        ev(1, 11, "convolution.3", 6000),
        ev(1, 11, "fusion.12", 2000),
        ev(1, 12, "sm90_xmma_fprop_kernel", 5800),
        ev(2, 20, "convolution.3", 100),  # host-side launch, not device time
    ]
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    r = profile_step.summarize(str(path), steps=2)
    assert r["source"] == "device"
    assert r["op_ms_per_step"] == pytest.approx(4.0)  # (6 + 2) ms over 2 steps
    assert [k["kind"] for k in r["kinds"]] == ["convolution", "fusion"]
    # Without an "XLA Ops" line, the kernels count and the module line does not.
    events = [e for e in events if e.get("tid") != 11]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    r = profile_step.summarize(str(path), steps=2)
    assert r["op_ms_per_step"] == pytest.approx(2.9)
