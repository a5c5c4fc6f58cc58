"""XLA settings chosen by platform: GPU flags only for GPUs, CPU flags only for CPUs."""

import os
import subprocess
import sys

import pytest

from resnet_jax import xla_cpu, xla_gpu


def test_gpu_flags_are_added_once_and_the_users_setting_wins(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=false")
    flags = xla_gpu.configure(defaults=True, deterministic=True)
    assert "--xla_gpu_enable_latency_hiding_scheduler=false" in flags
    assert "scheduler=true" not in flags
    assert flags.count("--xla_gpu_deterministic_ops=true") == 1
    assert xla_gpu.configure(defaults=True, deterministic=True) == flags  # idempotent
    monkeypatch.setenv("XLA_FLAGS", "")
    assert xla_gpu.configure(defaults=False, deterministic=False) == ""


@pytest.mark.parametrize(
    "platforms, cpu, gpu",
    [("cpu", True, False), ("cuda", False, True), ("gpu,cpu", False, True), ("tpu", False, False)],
)
def test_the_platform_is_judged_before_jax_starts(monkeypatch, platforms, cpu, gpu):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert xla_cpu.cpu_is_the_platform() is cpu
    assert xla_gpu.gpu_is_the_platform() is gpu


def test_without_jax_platforms_the_installed_plugins_decide(monkeypatch):
    import importlib.util

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "jax_cuda13_plugin" else real(name, *a),
    )
    assert xla_gpu.gpu_is_the_platform() and not xla_cpu.cpu_is_the_platform()


def test_the_flags_exist_in_the_installed_xla():
    """XLA aborts on an unknown flag name at start-up, whatever the backend."""
    flags = " ".join(xla_gpu.DEFAULT_FLAGS + xla_gpu.DETERMINISTIC_FLAGS)
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    code = "import jax; print(float(jax.numpy.ones(3).sum()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "3.0", out.stderr[-2000:]
    env["XLA_FLAGS"] = "--xla_gpu_no_such_flag=true"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0  # so the check above could fail


def test_a_gpu_machine_running_jax_on_the_cpu_is_told_how_to_fix_it(tmp_path):
    gpus = tmp_path / "proc" / "driver" / "nvidia" / "gpus"
    assert xla_gpu.cpu_fallback_warning("cpu", root=str(tmp_path)) is None
    gpus.mkdir(parents=True)
    (gpus / "0000:00:1e.0").mkdir()
    (gpus / "0000:00:1f.0").mkdir()
    assert xla_gpu.nvidia_gpus_on_this_machine(str(tmp_path)) == 2
    message = xla_gpu.cpu_fallback_warning("cpu", root=str(tmp_path))
    assert "2 NVIDIA GPU(s)" in message and "jax[cuda13]" in message
    assert xla_gpu.cpu_fallback_warning("gpu", root=str(tmp_path)) is None
