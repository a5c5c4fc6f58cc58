"""``python -m resnet_jax.export``: a run's checkpoint and converted weights to files; mistakes are one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch  # noqa: F401  (before TensorFlow, see tests/conftest.py)
import torchvision

import resnet_jax as rj
from tests.export.test_export import run_file
from tests.helpers import COMPILE_CACHE_ENV, ROOT, run_train

TINY = (
    "--config.model=resnet8",
    "--config.mock_data=True",
    "--config.mock_num_examples=64",
    "--config.batch_size=16",
    "--config.eval_batch_size=16",
)
TRAIN = (
    "--config.num_train_steps=2",
    "--config.eval_every_steps=2",
    "--config.checkpoint_every_steps=1",
)


def run_export(*args, config=None):
    cmd = [sys.executable, "-m", "resnet_jax.export"]
    if config:  # before the --config.KEY overrides among args
        cmd += [
            f"--config={config}",
            f"--compilation_cache_dir={os.environ.get(COMPILE_CACHE_ENV, '')}",
        ]
    cmd += list(args)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _one_line(out, says):
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("export: error: "), out.stderr
    assert says in lines[0], lines[0]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path_factory.mktemp("w") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return model, str(path)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "savedmodel", "tflite"])
def test_weights_to_a_uint8_file_equals_torch(fmt, weights, tmp_path):
    model, path = weights
    out = tmp_path / ("r18" + rj.export.SUFFIXES[fmt])
    done = run_export(
        f"--format={fmt}", f"--output={out}", f"--weights={path}", "--uint8", "--image_size=64"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["input_dtype"] == "uint8" and result["input_shape"] == [None, 64, 64, 3]
    x = np.random.RandomState(0).randint(0, 256, (2, 64, 64, 3)).astype(np.uint8)
    mean, std = np.asarray(rj.weights.IMAGENET_MEAN), np.asarray(rj.weights.IMAGENET_STD)
    normalised = ((x / 255.0 - mean) / std).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(normalised.transpose(0, 3, 1, 2))).numpy()
    got = run_file(str(out), fmt, x)
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 1e-4


@pytest.mark.slow
def test_a_runs_checkpoint_to_stablehlo_equals_the_restored_model(tmp_path):
    workdir = tmp_path / "run"
    run_train(workdir, *TINY, *TRAIN, devices=1)
    out = tmp_path / "run.stablehlo"
    done = run_export(
        "--format=stablehlo", f"--output={out}", f"--workdir={workdir}", "--step=1", *TINY,
        config="configs/cifar10.py",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["step"] == 1
    # The same checkpoint restored in this process, through the trainer's parts.
    import importlib.util

    from ml_collections import config_flags  # noqa: F401

    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs/cifar10.py"))
    cfg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg)
    config = cfg.get_config()
    config.model, config.mock_data, config.mock_num_examples = "resnet8", True, 64
    config.batch_size = config.eval_batch_size = 16
    config.num_train_steps, config.eval_every_steps, config.checkpoint_every_steps = 2, 2, 1
    from resnet_jax.export.cli import from_workdir

    module, variables, shape, _, step = from_workdir(config, str(workdir), 1, False)
    assert step == 1 and shape == (32, 32, 3)
    x = np.random.RandomState(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    ref = np.asarray(module.apply(variables, x, train=False))
    got = run_file(str(out), "stablehlo", x)
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, says",
    [
        (["--format=onnx"], "--format and --output are required"),
        (["--format=onnx", "--output=x.onnx"], "exactly one of --workdir"),
        (
            ["--format=onnx", "--output=x.onnx", "--weights=w", "--step=3"],
            "--step and --ema select",
        ),
        (
            ["--format=onnx", "--output=/nonexistent/x.onnx", "--weights=w"],
            "does not exist; create it",
        ),
        (
            ["--format=onnx", "--output=x.onnx", "--weights=/nonexistent.pth"],
            "/nonexistent.pth does not exist",
        ),
        (["--format=onnx", "--output=x.onnx", "--workdir=w"], "needs the run's --config"),
        (["--format=onnx", "--output=gs://b/x.onnx", "--weights=w"], "export writes local files"),
    ],
)
def test_mistakes_are_one_line(args, says, tmp_path):
    _one_line(run_export(*[a.replace("x.onnx", str(tmp_path / "x.onnx")) for a in args]), says)


@pytest.mark.slow
def test_a_bfloat16_onnx_is_refused_and_nothing_written(weights, tmp_path):
    _, path = weights
    out = tmp_path / "x.onnx"
    done = run_export("--format=onnx", f"--output={out}", f"--weights={path}", "--dtype=bfloat16")
    _one_line(done, "written in float32")
    assert os.listdir(tmp_path) == []
