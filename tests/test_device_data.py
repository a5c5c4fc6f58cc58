"""The CIFAR fast path: data and augmentation on the devices, k steps per call."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import device_data, train_lib
from tests.helpers import ROOT, tiny_config, train_losses


def test_pad_crop_flip_keeps_pixels_and_shifts_within_the_padding():
    x = jnp.arange(2 * 6 * 6, dtype=jnp.uint8).reshape(2, 6, 6, 1) + 1
    seen_flip = seen_shift = False
    for s in range(20):
        y = device_data.pad_crop_flip(jax.random.key(s), x, pad=2, flip=True)
        assert y.shape == x.shape
        for i in range(2):
            img = np.asarray(x[i, ..., 0], np.int32)
            out = np.asarray(y[i, ..., 0], np.int32)
            # Every non-zero output pixel comes from the image (zeros are padding).
            nz = out[out > 0]
            assert set(nz.tolist()) <= set(img.reshape(-1).tolist())
            row = out[out.shape[0] // 2]
            row = row[row > 0]  # ignore padding
            seen_flip |= bool(np.all(np.diff(row) < 0))
            seen_shift |= bool((out == 0).any())
    assert seen_flip and seen_shift


def test_batches_are_a_function_of_the_step_and_epochs_are_permutations():
    n, b = 40, 8
    images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
    data = device_data.DeviceData(
        jnp.asarray(images), jnp.arange(n, dtype=jnp.int32), jnp.zeros((1, 1, 1))
    )
    fn = jax.jit(lambda s: device_data.batch_at(data, s, seed=3, batch_size=b, augment=False))
    epoch0 = np.concatenate([np.asarray(fn(s)["label"]) for s in range(5)])
    assert sorted(epoch0.tolist()) == list(range(n))
    np.testing.assert_array_equal(fn(7)["label"], fn(7)["label"])
    assert not np.array_equal(fn(0)["label"], fn(5)["label"])  # next epoch reshuffled
    np.testing.assert_allclose(
        np.asarray(fn(2)["image"]).reshape(-1) * 255, np.asarray(fn(2)["label"]), atol=1e-4
    )


def tiny(**overrides):
    return tiny_config(
        **({"log_every_steps": 3, "device_data": True, "steps_per_call": 3} | overrides)
    )


losses = train_losses


def test_fast_path_on_eight_devices_resumes_exactly(tmp_path):
    train_lib.train_and_evaluate(tiny(), str(tmp_path / "ref"), progress=False)
    train_lib.train_and_evaluate(tiny(num_train_steps=3), str(tmp_path / "cut"), progress=False)
    summary = train_lib.train_and_evaluate(tiny(), str(tmp_path / "cut"), progress=False)
    assert summary["step"] == 6 and summary["eval_count"] == 64
    assert losses(tmp_path / "cut") == losses(tmp_path / "ref")


def test_steps_per_call_must_divide_the_intervals(tmp_path):
    with pytest.raises(
        ValueError, match="log_every_steps=2 must be a multiple of steps_per_call=3"
    ):
        train_lib.train_and_evaluate(tiny(log_every_steps=2), str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="needs --config.device_data=True"):
        train_lib.train_and_evaluate(tiny(device_data=False), str(tmp_path), progress=False)


@pytest.mark.slow
def test_digits_on_the_fast_path_reaches_97_percent(tmp_path):
    cmd = [
        sys.executable,
        "train.py",
        "--config=configs/digits.py",
        f"--workdir={tmp_path}",
        "--noprogress",
        "--compilation_cache_dir=",
        "--config.device_data=True",
        "--config.steps_per_call=10",
    ]
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu"
    )
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=900)
    with open(tmp_path / "metrics.jsonl") as f:
        final = [m for m in map(json.loads, f) if "eval_accuracy" in m][-1]
    assert final["eval_count"] == 360 and final["eval_accuracy"] >= 0.97, final
