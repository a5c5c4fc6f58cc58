"""python -m resnet_jax.evaluate: a training run's checkpoint and converted
torchvision weights, on mock CIFAR-10 and on a miniature ImageNet of real JPEGs.

The references are independent of the command: the trainer's own evaluation
lines in metrics.jsonl, and the torch model itself on the pipeline's crops.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

# torch before TensorFlow: torchvision's extensions crash when TF loaded first.
torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from configs import imagenet  # noqa: E402
from resnet_jax import data as data_lib  # noqa: E402
from resnet_jax import evaluate, mini_imagenet  # noqa: E402
from resnet_jax.errors import UserError  # noqa: E402
from tests.helpers import COMPILE_CACHE_ENV, ROOT, read_metrics, run_train, tiny_config  # noqa: E402
from tests.weights.test_converters import CifarResNet, randomise  # noqa: E402

NUM_CLASSES, TRAIN_PER_CLASS = 10, 1  # 10 training and 10 validation JPEGs

# The tiny run: resnet8, 64 mock CIFAR-10 examples, 2 steps, an evaluation and
# a checkpoint after each.
TINY = (
    "--config.model=resnet8",
    "--config.mock_data=True",
    "--config.mock_num_examples=64",
    "--config.batch_size=16",
    "--config.eval_batch_size=24",  # 64 = 2 batches of 24 + 16, the rest masked
)
TRAIN = ("--config.num_train_steps=2", "--config.eval_every_steps=1")
TRAIN += ("--config.checkpoint_every_steps=1", "--config.log_every_steps=1")


def run_evaluate(*args, config="configs/cifar10.py", devices=8, timeout=600):
    """``python -m resnet_jax.evaluate`` on ``devices`` simulated CPU devices."""
    cmd = [
        sys.executable,
        "-m",
        "resnet_jax.evaluate",
        f"--config={config}",
        f"--compilation_cache_dir={os.environ.get(COMPILE_CACHE_ENV, '')}",
        *args,
    ]
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
    )
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _one_line_error(out):
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("evaluate: error: "), out.stderr
    return lines[0]


# --------------------------------------------------------------------------- #
# A training run's workdir
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny train.py run: its workdir, with checkpoints at steps 1 and 2."""
    workdir = tmp_path_factory.mktemp("run")
    run_train(workdir, *TINY, *TRAIN)
    return workdir


def _run_evals(workdir):
    return {m["step"]: m for m in read_metrics(workdir) if "eval_count" in m}


def test_cli_equals_the_runs_own_evaluation(run, tmp_path):
    output = tmp_path / "result.json"
    out = run_evaluate(f"--workdir={run}", *TINY, f"--output={output}")
    assert out.returncode == 0, out.stderr[-3000:]
    # stderr holds the one progress line and nothing of TensorFlow's, XLA's or absl's.
    assert out.stderr.strip().splitlines() == [
        "Evaluating resnet8 at step 2 of " + str(run) + " on cifar10 test (64 examples)."
    ], out.stderr[-3000:]
    human, last = out.stdout.strip().splitlines()[-2:]
    result = json.loads(last)
    ran = _run_evals(run)[2]  # the run's final evaluation, of the same state
    assert result["step"] == 2 and result["crops"] == 1
    assert result["count"] == ran["eval_count"] == 64  # the whole split, once
    assert result["top1"] == ran["eval_accuracy"]
    assert result["loss"] == pytest.approx(ran["eval_loss"], rel=1e-6)
    assert result["top1"] <= result["top5"] <= 1.0
    assert (result["dataset"], result["split"], result["model"]) == ("cifar10", "test", "resnet8")
    assert f"top-1 {100 * result['top1']:.2f}%" in human and "64 examples" in human
    assert json.loads(output.read_text()) == result
    # The file is never overwritten: the same command again stops before evaluating.
    again = run_evaluate(f"--workdir={run}", *TINY, f"--output={output}")
    assert "exists" in _one_line_error(again)
    assert json.loads(output.read_text()) == result


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_the_runs_own_evaluation(run, tmp_path):
    """evaluate starts as train.py does (resnet_jax.launch): two jax.distributed
    processes of 2 devices each split the eval set and agree with the run."""
    port, output = _free_port(), tmp_path / "two.json"
    cmd = [sys.executable, "-m", "resnet_jax.evaluate", "--config=configs/cifar10.py"]
    cmd += [f"--workdir={run}", *TINY, f"--output={output}", "--compilation_cache_dir="]
    cmd += [f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env["JAX_PLATFORMS"] = "cpu"
    procs = [
        subprocess.Popen(
            [*cmd, f"--process_id={pid}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in range(2)
    ]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    result = json.loads(output.read_text())
    assert json.loads(outs[0][0].strip().splitlines()[-1]) == result
    assert '"top1"' not in outs[1][0]  # only process 0 reports
    ran = _run_evals(run)[2]
    assert result["step"] == 2 and result["count"] == ran["eval_count"] == 64
    assert result["top1"] == ran["eval_accuracy"]
    assert result["loss"] == pytest.approx(ran["eval_loss"], rel=1e-6)


def test_an_earlier_step_equals_the_runs_evaluation_of_it(run):
    # In-process, with fewer devices than the run (the sums are exact either way).
    c = tiny_config(eval_batch_size=24)
    result = evaluate.evaluate_workdir(c, str(run), step=1)
    ran = _run_evals(run)[1]
    assert result["step"] == 1 and result["count"] == 64
    assert result["top1"] == ran["eval_accuracy"]
    assert result["loss"] == pytest.approx(ran["eval_loss"], rel=1e-5)
    newest = evaluate.evaluate_workdir(c, str(run))
    assert newest["step"] == 2 and newest["loss"] != result["loss"]


# --------------------------------------------------------------------------- #
# User mistakes: one line, exit status 2
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def bad_weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    torch.save({"encoder.weight": torch.zeros(4, 3)}, d / "not_a_resnet.pth")
    (d / "text.pth").write_text("not a pickle\n")
    (d / "empty").mkdir()
    return d


@pytest.mark.parametrize(
    "args, says",
    [
        ((), "exactly one of --workdir"),
        (("--workdir={run}", "--weights={bad}/text.pth"), "exactly one of --workdir"),
        (("--workdir={bad}/missing",), "holds no checkpoints"),
        (("--workdir={run}", "--step=7"), "holds steps 1, 2"),
        (("--weights={bad}/not_a_resnet.pth",), "cannot be read"),
    ],
)
def test_user_mistakes_are_one_line(run, bad_weights, args, says):
    """Flag mistakes and UserErrors raised by the evaluation, through the CLI."""
    args = [a.format(run=run, bad=bad_weights) for a in args]
    line = _one_line_error(run_evaluate(*TINY, *args))
    assert says in line
    assert not os.path.exists(bad_weights / "missing")  # nothing created


@pytest.mark.parametrize(
    "kind, target, overrides, ten_crop, says",
    [
        ("workdir", "{bad}/empty", {}, None, "holds no checkpoints"),
        ("workdir", "{run}", {"model": "resnet20"}, None, "different experiment"),
        ("workdir", "{run}", {}, True, "10-crop"),
        ("weights", "{bad}/text.pth", {}, None, "cannot be read"),
        ("weights", "{bad}/missing.pth", {}, None, "does not exist"),
        ("weights", "{bad}/empty", {}, None, "cannot be read"),
    ],
)
def test_more_mistakes_are_user_errors(run, bad_weights, kind, target, overrides, ten_crop, says):
    """The other mistakes raise UserError, which the CLI prints as one line
    (the test above); in this process, to save a Python start each."""
    c = tiny_config(eval_batch_size=24, **overrides)
    target = target.format(run=run, bad=bad_weights)
    with pytest.raises(UserError, match=says):
        if kind == "workdir":
            evaluate.evaluate_workdir(c, target, None, ten_crop)
        else:
            evaluate.evaluate_weights(c, target, "auto", ten_crop)
    assert not os.path.exists(bad_weights / "missing")


# --------------------------------------------------------------------------- #
# Converted weights
# --------------------------------------------------------------------------- #


def test_converted_cifar_weights_equal_torch_on_the_images(tmp_path):
    """A PyTorch CIFAR ResNet (akamaster's layout, ImageNet mean/std on 32x32
    images, no resize): the pipeline's mean-subtracted images are turned into
    the weights' input on the device."""
    torch.manual_seed(1)
    ref = randomise(CifarResNet(1), seed=1)  # resnet8, option A
    path = tmp_path / "resnet8.th"
    torch.save({"state_dict": ref.state_dict()}, path)
    c = tiny_config(eval_batch_size=24)
    result = evaluate.evaluate_weights(c, str(path))

    test = data_lib.InputPipeline(c).test  # the same (mock) split, as uint8
    x = torch.from_numpy(test.images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    labels = torch.from_numpy(test.labels).long()
    with torch.no_grad():
        logits = ref((x - mean) / std).double()
    assert result["count"] == len(labels) == 64 and result["crops"] == 1
    assert result["top1"] == (logits.argmax(-1) == labels).double().mean().item()
    top5 = (logits.topk(5, -1).indices == labels[:, None]).any(-1).double().mean().item()
    assert result["top5"] == top5
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert result["loss"] == pytest.approx(loss, rel=1e-5)


# --------------------------------------------------------------------------- #
# A miniature ImageNet of real JPEGs
# --------------------------------------------------------------------------- #
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """(data_dir, MiniImageNet): archives written and prepared by tfds' builder."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    written = mini_imagenet.write(data_dir, NUM_CLASSES, TRAIN_PER_CLASS, seed=0)
    data_lib.imagenet_preflight(data_dir)
    return data_dir, written


@pytest.fixture(scope="module")
def resnet18(mini, tmp_path_factory):
    """(torch model, .pth path): torchvision's resnet18, random weights and
    BatchNorm statistics; the classifier favours the miniature's 10 classes,
    so that top-1 and top-5 are not trivially 0."""
    _, written = mini
    torch.manual_seed(0)
    model = randomise(torchvision.models.resnet18(weights=None))
    with torch.no_grad():
        index = [mini_imagenet.synsets().index(s) for s in written.classes]
        model.fc.bias[index] += 6.0
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return model, str(path)


# The recipe at small sizes (as tests/test_imagenet.py runs it).
SMALL = dict(model="resnet8", image_size=32, train_scale_range=(36, 48), eval_resize=36)
SMALL |= dict(batch_size=8, eval_batch_size=8, shuffle_buffer=64, num_train_steps=2)


def test_ten_crop_workdir_equals_the_runs_own_evaluation(mini, tmp_path):
    data_dir, written = mini
    args = [f"--config.{k}={v}".replace(" ", "") for k, v in SMALL.items()]
    run_train(
        tmp_path,
        f"--config.data_dir={data_dir}",
        "--config.ten_crop=True",
        *args,
        config="configs/imagenet.py",
    )
    (ran,) = [m for m in read_metrics(tmp_path) if "eval_count" in m]
    c = imagenet.get_config()
    c.update(data_dir=data_dir, **SMALL)
    result = evaluate.evaluate_workdir(c, str(tmp_path), ten_crop=True)
    assert result["crops"] == 10 and result["step"] == 2
    assert result["count"] == ran["eval_count"] == len(written.validation)
    assert result["top1"] == ran["eval_accuracy"]
    assert result["top5"] == ran["eval_top5_accuracy"]
    assert result["loss"] == pytest.approx(ran["eval_loss"], rel=1e-5)
    one = evaluate.evaluate_workdir(c, str(tmp_path))  # the config's: 1 crop
    assert one["crops"] == 1 and one["count"] == result["count"]
    assert one["loss"] != result["loss"]


def _config(data_dir, **kw):
    c = imagenet.get_config()
    c.update(data_dir=data_dir, batch_size=8, eval_batch_size=8, **kw)
    return c


def _torch_reference(model, data_dir, ten_crop, **kw):
    """Mean loss, top-1, top-5 and count of the torch model on the crops the
    pipeline makes with torchvision's recipe (resize 256, crop 224)."""
    c = _config(data_dir, image_size=224, eval_resize=256, ten_crop=ten_crop, **kw)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    losses, top1, top5 = [], [], []
    for batch in data_lib.InputPipeline(c, image_dtype="uint8").eval_batches():
        keep = batch["mask"] > 0
        images = torch.from_numpy(batch["image"][keep].astype(np.float32) / 255.0)
        labels = torch.from_numpy(batch["label"][keep]).long()
        crops = images.shape[1] if images.ndim == 5 else 1
        x = images.reshape(-1, *images.shape[-3:]).permute(0, 3, 1, 2)
        with torch.no_grad():
            logits = model((x - mean) / std)
        probs = torch.softmax(logits.double(), -1).reshape(len(labels), crops, -1).mean(1)
        losses += (-torch.log(probs[torch.arange(len(labels)), labels])).tolist()
        top1 += (probs.argmax(-1) == labels).tolist()
        top5 += (probs.topk(5, -1).indices == labels[:, None]).any(-1).tolist()
    return np.mean(losses), np.mean(top1), np.mean(top5), len(losses)


@pytest.mark.parametrize("ten_crop", [False, True])
def test_converted_torchvision_weights_equal_torch(mini, resnet18, ten_crop):
    data_dir, written = mini
    model, path = resnet18
    result = evaluate.evaluate_weights(_config(data_dir), path, ten_crop=ten_crop)
    loss, top1, top5, count = _torch_reference(model, data_dir, ten_crop)
    assert result["count"] == count == len(written.validation)
    assert result["crops"] == (10 if ten_crop else 1) and result["source"] == "torchvision"
    assert result["top1"] == top1 and result["top5"] == top5
    assert 0.0 < result["top5"]  # the classifier's bias makes top-5 non-trivial
    assert result["loss"] == pytest.approx(loss, rel=1e-4)


def test_a_sliced_eval_split_is_evaluated_exactly(mini, resnet18):
    data_dir, _ = mini
    model, path = resnet18
    result = evaluate.evaluate_weights(_config(data_dir, eval_split="validation[:7]"), path)
    loss, top1, top5, count = _torch_reference(model, data_dir, False, eval_split="validation[:7]")
    assert result["count"] == count == 7 and result["split"] == "validation[:7]"
    assert result["top1"] == top1 and result["top5"] == top5
    assert result["loss"] == pytest.approx(loss, rel=1e-4)
    with pytest.raises(UserError, match="eval_split='valid' is not a split of imagenet2012"):
        evaluate.evaluate_weights(_config(data_dir, eval_split="valid"), path)


@pytest.mark.parametrize(
    "overrides",
    [
        {"dataset": "digits", "eval_split": "test"},
        {"eval_split": "test[:5]"},  # mock data ignores slices
        {"validation_split": 16, "eval_split": "test"},
    ],
)
def test_eval_split_mistakes_are_refused(overrides):
    from resnet_jax.training import checks as config_checks

    with pytest.raises(UserError, match="eval_split="):
        config_checks.validate_config(tiny_config(**overrides), 8)


def test_center_crop_is_torchvisions_to_a_grey_level(mini):
    """The pipeline's centre crop (only the window decoded, then resized)
    against torchvision's transform of the whole image (resize, then crop)."""
    import tensorflow_datasets as tfds
    from PIL import Image

    transforms = torchvision.transforms

    data_dir, _ = mini
    c = _config(data_dir, image_size=224, eval_resize=256)
    batches = data_lib.InputPipeline(c, image_dtype="uint8").eval_batches()
    ours = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
    ds = tfds.load("imagenet2012", split="validation", data_dir=data_dir, shuffle_files=False)
    recipe = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    theirs = np.stack(
        [np.asarray(recipe(Image.fromarray(ex["image"]))) for ex in tfds.as_numpy(ds)]
    )
    assert ours.shape == theirs.shape == (len(theirs), 224, 224, 3)
    # Same geometry (sizes, offsets, resampling scale); what is left is TF's
    # antialiased bilinear kernel against PIL's and the rounding to uint8:
    # 0.12-0.18 grey levels a pixel here. A crop one pixel off is several levels off.
    per_image = np.abs(ours.astype(np.float32) - theirs.astype(np.float32)).mean(axis=(1, 2, 3))
    assert per_image.mean() < 0.5 and per_image.max() < 1.0, per_image
