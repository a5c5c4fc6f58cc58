"""The real ImageNet path, offline: a miniature ILSVRC2012 (resnet_jax.mini_imagenet)
prepared by tfds' own imagenet2012 builder from downloads/manual, then train.py.

The module fixture writes the archives and prepares them once (the preparation
test); train.py then finds the data prepared and must not prepare it again.
"""

import itertools
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from configs import imagenet
from resnet_jax import data as data_lib
from resnet_jax import mini_imagenet
from tests.helpers import ROOT, read_metrics, run_train, start_train, train_losses

NUM_CLASSES, TRAIN_PER_CLASS = 10, 8  # 80 training images: 10 steps of batch 8 per epoch
NUM_VAL = 10  # all the first validation images whose labels are among the 10 classes

# Small sizes for the recipes; the data, the preparation and the pipeline are the real ones.
# resnet8 (CIFAR stem) compiles in a fraction of resnet18's time: the model is not
# what these tests are about (tests/test_train.py runs resnet18 on ImageNet mock data).
SMALL = (
    "--config.model=resnet8",
    "--config.image_size=32",
    "--config.train_scale_range=(36,48)",
    "--config.eval_resize=36",
    "--config.batch_size=8",
    "--config.eval_batch_size=8",
    "--config.shuffle_buffer=64",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=2",
)


def _listing(directory):
    """{path: (size, mtime_ns)} of every file under ``directory``."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.join(root, f)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """(data_dir, MiniImageNet): the archives written and prepared by tfds' builder."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    written = mini_imagenet.write(data_dir, NUM_CLASSES, TRAIN_PER_CLASS, seed=0)
    data_lib.imagenet_preflight(data_dir)  # what train.py calls: tfds prepares the archives
    prepared = os.path.join(data_dir, "imagenet2012")
    before = _listing(prepared)
    assert any(".tfrecord" in p for p in before)
    yield data_dir, written
    assert _listing(prepared) == before, "a run prepared the data again"


def _train(workdir, mini, *args, config="configs/imagenet.py", devices=8):
    data_dir, _ = mini
    out = run_train(
        workdir, f"--config.data_dir={data_dir}", *SMALL, *args, config=config, devices=devices
    )
    assert "preparing" not in (out.stdout + out.stderr).lower()
    return out


def _evals(workdir):
    return [m for m in read_metrics(workdir) if "eval_count" in m]


# --------------------------------------------------------------------------- #
# The archives and tfds' preparation
# --------------------------------------------------------------------------- #


def _archive_jpegs(manual_dir):
    """{file name: (height, width, PIL mode)} of every JPEG in the two archives,
    and the names of the train archive's members."""
    from PIL import Image

    def read(tar, member):
        image = Image.open(tar.extractfile(member))
        assert image.format == "JPEG"
        return image.height, image.width, image.mode

    jpegs = {}
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar")) as outer:
        synset_tars = outer.getnames()
        for member in outer.getmembers():
            with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                jpegs.update({m.name: read(inner, m) for m in inner.getmembers()})
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar")) as val:
        jpegs.update({m.name: read(val, m) for m in val.getmembers()})
    return jpegs, synset_tars


def test_archives_have_the_ilsvrc2012_layout(mini):
    data_dir, written = mini
    manual = os.path.join(data_dir, "downloads", "manual")
    assert sorted(os.listdir(manual)) == ["ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"]
    jpegs, synset_tars = _archive_jpegs(manual)
    assert synset_tars == sorted(f"{s}.tar" for s in written.classes)
    assert set(written.classes) <= set(mini_imagenet.synsets())  # real synsets
    assert list(jpegs) == [name for name, _ in written.train + written.validation]
    for name, synset in written.train:
        assert re.fullmatch(rf"{synset}_\d+\.JPEG", name)
    val_names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, NUM_VAL + 1)]
    assert [name for name, _ in written.validation] == val_names
    # Every validation label is a class with training images.
    assert {s for _, s in written.validation} <= set(written.classes)
    # ImageNet-like sizes, RGB and some greyscale JPEGs.
    assert all(256 <= min(h, w) <= 400 for h, w, _ in jpegs.values())
    assert {mode for _, _, mode in jpegs.values()} == {"RGB", "L"}


def test_tfds_labels_round_trip(mini):
    """Every prepared example: its file name, its tfds label (the index of its
    synset in tfds' label list) and its image decoded at the JPEG's size, RGB."""
    import tensorflow_datasets as tfds

    data_dir, written = mini
    jpegs, _ = _archive_jpegs(os.path.join(data_dir, "downloads", "manual"))
    index = {s: i for i, s in enumerate(mini_imagenet.synsets())}
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    assert builder.info.splits["train"].num_examples == NUM_CLASSES * TRAIN_PER_CLASS
    assert builder.info.splits["validation"].num_examples == NUM_VAL
    for split, expected in [("train", written.train), ("validation", written.validation)]:
        got = {}
        for ex in tfds.as_numpy(builder.as_dataset(split=split)):
            name = ex["file_name"].decode()
            got[name] = int(ex["label"])
            assert ex["image"].shape == (*jpegs[name][:2], 3)  # greyscale decoded as RGB
        assert got == {name: index[s] for name, s in expected}
    # A known image: ILSVRC2012's first validation image shows n01751748 (sea snake).
    assert written.validation[0] == ("ILSVRC2012_val_00000001.JPEG", "n01751748")
    assert got["ILSVRC2012_val_00000001.JPEG"] == mini_imagenet.synsets().index("n01751748")


def test_archives_are_deterministic_and_the_cli_explains_its_limits(tmp_path):
    a = mini_imagenet.write(str(tmp_path / "a"), 2, 1, seed=3)
    b = mini_imagenet.write(str(tmp_path / "b"), 2, 1, seed=3)
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
        with open(os.path.join(a.manual_dir, name), "rb") as fa:
            with open(os.path.join(b.manual_dir, name), "rb") as fb:
                assert fa.read() == fb.read()
    assert len(a.validation) == mini_imagenet.max_validation_images(2) == 2
    with pytest.raises(ValueError, match="num_val=50 needs num_classes >= 46"):
        mini_imagenet.write(str(tmp_path / "c"), 10, 1, num_val=50)


_CLI_WITHOUT_TF = """
import sys
from resnet_jax import mini_imagenet
mini_imagenet.main([sys.argv[1], "--classes", "2", "--train-per-class", "1"])
assert "tensorflow" not in sys.modules, "writing the archives imported TensorFlow"
"""


def test_cli_writes_without_tensorflow(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", _CLI_WITHOUT_TF, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Wrote 2 training images of 2 synsets and 2 validation images" in out.stdout
    assert os.path.exists(tmp_path / "downloads" / "manual" / "ILSVRC2012_img_val.tar")


# --------------------------------------------------------------------------- #
# The input pipeline on the prepared files
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("processes", [1, 3])
def test_eval_pipeline_sees_every_validation_image_once(mini, processes):
    data_dir, written = mini
    c = imagenet.get_config()
    c.update(data_dir=data_dir, image_size=32, eval_resize=36, ten_crop=True)
    c.update(batch_size=6, eval_batch_size=3 * processes)
    pipes = [data_lib.InputPipeline(c, p, processes) for p in range(processes)]
    assert pipes[0].info.eval_size == NUM_VAL and pipes[0].info.train_size == 80
    batches = [list(p.eval_batches()) for p in pipes]
    assert len({len(b) for b in batches}) == 1  # the same number of batches on every host
    assert batches[0][0]["image"].shape == (3, 10, 32, 32, 3)
    labels = np.concatenate([b["label"][b["mask"] > 0] for bs in batches for b in bs])
    index = {s: i for i, s in enumerate(mini_imagenet.synsets())}
    assert sorted(labels) == sorted(index[s] for _, s in written.validation)


@pytest.mark.parametrize("train_crop", ["scale", "random_resized"])
def test_train_pipeline_on_jpegs_resumes_exactly(mini, train_crop):
    """Encoded examples shuffled, only each crop window decoded: a pipeline
    started at step s gives the uninterrupted stream's batches from s on."""
    data_dir, _ = mini
    c = imagenet.get_config()
    c.update(data_dir=data_dir, image_size=32, train_scale_range=(36, 48), batch_size=8)
    c.update(shuffle_buffer=64, train_crop=train_crop)
    pipe = data_lib.InputPipeline(c, image_dtype="uint8")
    assert pipe.steps_per_epoch == 10 and pipe.source.epochs_per_pipeline == 4
    whole = list(itertools.islice(pipe.train_batches(0), 13))
    assert whole[0]["image"].shape == (8, 32, 32, 3) and whole[0]["image"].dtype == np.uint8
    assert len({b["image"].tobytes() for b in whole}) == 13
    # An epoch is every training image once.
    assert sorted(np.concatenate([b["label"] for b in whole[:10]])) == sorted(
        np.repeat(np.unique(np.concatenate([b["label"] for b in whole[:10]])), TRAIN_PER_CLASS)
    )
    for start in (3, 11):
        resumed = itertools.islice(
            data_lib.InputPipeline(c, image_dtype="uint8").train_batches(start), 13 - start
        )
        for a, b in zip(resumed, whole[start:], strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])


# --------------------------------------------------------------------------- #
# train.py on the prepared miniature
# --------------------------------------------------------------------------- #


@pytest.mark.slow
def test_paper_recipe_ten_crop_on_one_device(mini, tmp_path):
    _train(
        tmp_path,
        mini,
        "--config.num_train_steps=2",
        "--config.ten_crop=True",
        devices=1,
    )
    (ev,) = _evals(tmp_path)
    assert ev["step"] == 2 and ev["eval_count"] == NUM_VAL  # every image once, padding masked
    assert 0.0 <= ev["eval_accuracy"] <= ev["eval_top5_accuracy"] <= 1.0
    assert all(math.isfinite(loss) for _, loss in train_losses(tmp_path))


@pytest.mark.slow
def test_paper_recipe_resumes_exactly_on_eight_devices(mini, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    _train(whole, mini, "--config.num_train_steps=4")
    _train(split, mini, "--config.num_train_steps=2")
    _train(split, mini, "--config.num_train_steps=4")  # resumes from the step-2 checkpoint
    expected = train_losses(whole)
    assert [s for s, _ in expected] == [1, 2, 3, 4]
    assert all(math.isfinite(loss) for _, loss in expected)
    assert train_losses(split) == expected  # bit for bit
    assert [(m["step"], m["eval_count"]) for m in _evals(split)] == [(2, NUM_VAL), (4, NUM_VAL)]
    assert [m["eval_count"] for m in _evals(whole)] == [NUM_VAL]


@pytest.mark.slow
def test_modern_recipe_with_small_sizes(mini, tmp_path):
    # A small model for speed: the recipe's bfloat16, zero-initialised residuals,
    # Nesterov, label smoothing, cosine schedule and its warm-up (longer than
    # the run, shortened with a warning) are what is tested.
    _train(
        tmp_path,
        mini,
        "--config.num_train_steps=2",
        "--config.ten_crop=True",
        config="configs/imagenet_modern.py",
    )
    (ev,) = _evals(tmp_path)
    assert ev["eval_count"] == NUM_VAL
    assert all(math.isfinite(loss) for _, loss in train_losses(tmp_path))


# Every option of the modern recipe at once (issue 22); a step schedule so that
# the shortened resume below keeps the learning rate of every step.
EVERY_OPTION = (
    "--config.optimizer=lars",
    "--config.learning_rate=1.0",
    "--config.ema_decay=0.9",
    "--config.ema_every_steps=2",
    "--config.mixup_alpha=0.2",
    "--config.cutmix_alpha=1.0",
    "--config.auto_augment=trivialaugment",
    "--config.random_erasing=0.5",
    "--config.grad_accum_steps=2",
    "--config.label_smoothing=0.1",
    "--config.drop_path_rate=0.1",
    "--config.train_crop=random_resized",
)


@pytest.mark.slow
def test_every_modern_option_trains_evaluates_and_resumes_exactly_after_sigterm(mini, tmp_path):
    data_dir, _ = mini
    args = (f"--config.data_dir={data_dir}", *SMALL, *EVERY_OPTION)
    workdir = tmp_path / "stopped"
    proc = start_train(
        workdir, *args, "--config.num_train_steps=400", devices=4, config="configs/imagenet.py"
    )
    path = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # under way: 3 steps logged
        if path.exists() and len(path.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    saved = max(int(s) for s in os.listdir(workdir / "checkpoints"))
    assert 3 <= saved < 400  # the step the signal stopped it at
    end = saved + 3
    run_train(
        workdir, *args, f"--config.num_train_steps={end}", devices=4, config="configs/imagenet.py"
    )
    ref = tmp_path / "uninterrupted"
    run_train(
        ref, *args, f"--config.num_train_steps={end}", devices=4, config="configs/imagenet.py"
    )
    got, want = train_losses(workdir), train_losses(ref)
    assert [s for s, _ in want] == list(range(1, end + 1))
    assert all(math.isfinite(loss) for _, loss in want)
    assert got == want  # bit for bit across the SIGTERM, with every option on
    (ev,) = [m for m in _evals(workdir) if m["step"] == end]
    (ref_ev,) = _evals(ref)
    assert ev == ref_ev and ev["eval_count"] == NUM_VAL
    assert {"eval_ema_accuracy", "eval_ema_loss", "eval_ema_top5_accuracy"} <= set(ev)
    assert ev["eval_ema_loss"] != ev["eval_loss"]  # the average is another model


# --------------------------------------------------------------------------- #
# Several processes: one prepares, the others wait
# --------------------------------------------------------------------------- #


@pytest.mark.slow
def test_two_processes_prepare_the_archives_once(tmp_path):
    """Unprepared archives, two jax.distributed processes: process 0 prepares
    (tfds says so on its output), process 1 waits at the barrier, both train."""
    import socket

    from tests.helpers import start_train

    data_dir = str(tmp_path / "tfds")
    mini_imagenet.write(data_dir, NUM_CLASSES, TRAIN_PER_CLASS, seed=1)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [
        start_train(
            tmp_path / "run",
            f"--config.data_dir={data_dir}",
            *SMALL,
            "--config.num_train_steps=2",
            f"--coordinator_address=localhost:{port}",
            "--num_processes=2",
            f"--process_id={pid}",
            "--verbose",
            config="configs/imagenet.py",
            devices=2,
        )
        for pid in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    said = [(out + err).lower() for out, err in outs]
    assert "preparing" in said[0] and "preparing" not in said[1]
    # (Process 1 says it waits only when it checks before process 0 is done.)
    assert _evals(tmp_path / "run")[-1]["eval_count"] == NUM_VAL
