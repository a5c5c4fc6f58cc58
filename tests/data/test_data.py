"""The input pipelines: stream order and augmentation, evaluation, errors, TF set-up.

In-memory datasets run on scikit-learn's digits and on CIFAR under
``tfds.testing.mock_data`` (random images: no two examples alike, so a batch
row identifies its example); ImageNet on tfds' mock data.
"""

import itertools
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import digits, imagenet
from resnet_jax import data as data_lib
from resnet_jax.data import datasets, pipeline, transforms
from resnet_jax.errors import DataNotFoundError, UserError
from tests.helpers import ROOT, tiny_config


def take(stream, n):
    return list(itertools.islice(stream, n))


def pixels(pipe, image):
    """A normalised batch image back to uint8 pixels."""
    return np.rint((image + pipe.mean) * 255.0).astype(np.uint8)


def train_indices(pipe, batch):
    """The index into ``pipe.train`` of every row of an unaugmented batch."""
    rows = {img.tobytes(): i for i, img in enumerate(pipe.train.images)}
    assert len(rows) == len(pipe.train.images)  # every example distinct
    idx = np.array([rows[img.tobytes()] for img in pixels(pipe, batch["image"])])
    np.testing.assert_array_equal(pipe.train.labels[idx], batch["label"])
    return idx


def augmentation_of(augmented, image, pad):
    """(dy, dx, flipped) such that ``augmented`` is that crop of ``image``
    zero-padded by ``pad`` pixels, flipped or not; None if there is none."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    for dy, dx, flip in itertools.product(range(2 * pad + 1), range(2 * pad + 1), (False, True)):
        crop = padded[dy : dy + h, dx : dx + w]
        if np.array_equal(augmented, crop[:, ::-1] if flip else crop):
            return dy, dx, flip
    return None


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def tiny_imagenet(**overrides):
    c = imagenet.get_config()
    c.update(
        mock_data=True,
        mock_num_examples=12,
        image_size=24,
        train_scale_range=(28, 40),
        eval_resize=28,
        batch_size=4,
        eval_batch_size=4,
        shuffle_buffer=8,
    )
    c.update(overrides)
    return c


# --------------------------------------------------------------------------- #
# In-memory training stream
# --------------------------------------------------------------------------- #


def test_an_epoch_visits_every_training_example_exactly_once():
    pipe = data_lib.InputPipeline(tiny_config(augment=False))  # 64 examples, batch 16
    assert pipe.steps_per_epoch == 4
    batches = take(pipe.train_batches(0), 8)
    epochs = [
        np.concatenate([train_indices(pipe, b) for b in batches[e * 4 : e * 4 + 4]]) for e in (0, 1)
    ]
    for idx in epochs:
        np.testing.assert_array_equal(np.sort(idx), np.arange(64))
    assert not np.array_equal(epochs[0], epochs[1])  # each epoch its own order
    # Without augmentation an image is exactly its example, normalised.
    expected = pipe.train.images[epochs[0][:16]].astype(np.float32) / 255.0 - pipe.mean
    np.testing.assert_allclose(batches[0]["image"], expected, atol=1e-6)


def test_an_epoch_drops_a_different_remainder_each_time():
    pipe = data_lib.InputPipeline(tiny_config(augment=False, mock_num_examples=37))
    assert pipe.steps_per_epoch == 2  # 32 of 37 examples per epoch
    batches = take(pipe.train_batches(0), 4)
    seen = [
        np.concatenate([train_indices(pipe, b) for b in batches[e * 2 : e * 2 + 2]]) for e in (0, 1)
    ]
    for idx in seen:
        assert len(set(idx.tolist())) == 32
    assert set(seen[0].tolist()) != set(seen[1].tolist())


def test_augmentation_differs_between_epochs_and_is_reproduced_on_resume():
    plain = data_lib.InputPipeline(tiny_config(augment=False))
    pipe = data_lib.InputPipeline(tiny_config())  # pad 4, random flip
    stream = take(pipe.train_batches(0), 8)  # two epochs
    forms = {}
    for step, (p, b) in enumerate(zip(take(plain.train_batches(0), 8), stream)):
        idx = train_indices(plain, p)  # augmentation does not change the order
        np.testing.assert_array_equal(b["label"], p["label"])
        for i, image in zip(idx, pixels(pipe, b["image"])):
            forms[step // 4, i] = augmentation_of(image, pipe.train.images[i], pad=4)
    assert None not in forms.values()  # every image is a pad-crop-flip of its example
    changed = sum(forms[0, i] != forms[1, i] for i in range(64))
    assert changed >= 58  # 162 forms: the same one twice is rare
    assert {f[2] for f in forms.values()} == {False, True}
    # The same (epoch, position) gets the same form after a resume, in a fresh pipeline too.
    assert_same_batches(take(pipe.train_batches(5), 3), stream[5:8])
    fresh = data_lib.InputPipeline(tiny_config())
    assert_same_batches(take(fresh.train_batches(3), 5), stream[3:8])


def test_repeated_augmentation_repeats_each_example_in_a_row_augmented_apart():
    # 64 examples, batch 16, 4 steps an epoch; r = 4: 16 examples, 4 times each.
    once = data_lib.InputPipeline(tiny_config(augment=False))
    plain = data_lib.InputPipeline(tiny_config(augment=False, repeated_augmentation=4))
    order = [
        np.concatenate([train_indices(p, b) for b in take(p.train_batches(0), 8)])
        for p in (once, plain)
    ]
    for e in (0, 1):
        epoch, first = order[1][e * 64 : (e + 1) * 64], order[0][e * 64 : (e + 1) * 64]
        # The shuffled epoch's first quarter, each example four times in a row.
        np.testing.assert_array_equal(epoch, np.repeat(first[:16], 4))
    assert set(order[1][:64].tolist()) != set(order[1][64:].tolist())
    # Augmented, the copies differ from one another and the stream resumes exactly.
    pipe = data_lib.InputPipeline(tiny_config(repeated_augmentation=4))
    stream = take(pipe.train_batches(0), 6)
    for p, b in zip(take(plain.train_batches(0), 6), stream):
        np.testing.assert_array_equal(b["label"], p["label"])
    copies = np.concatenate([b["image"] for b in stream]).reshape(-1, 4, 32 * 32 * 3)
    distinct = [len({c.tobytes() for c in group}) for group in copies]
    assert np.mean(distinct) > 3, distinct  # 162 pad-crop-flips: a repeat is rare
    assert_same_batches(
        take(data_lib.InputPipeline(tiny_config(repeated_augmentation=4)).train_batches(3), 3),
        stream[3:6],
    )


def test_imagenet_repeated_augmentation_repeats_in_a_row_and_resumes_exactly():
    c = tiny_imagenet(repeated_augmentation=3)  # 12 examples: 3 steps of 4 an epoch
    a = take(data_lib.InputPipeline(c).train_batches(0), 6)
    labels = np.concatenate([b["label"] for b in a]).reshape(-1, 3)
    assert (labels == labels[:, :1]).all()  # every example three times in a row
    images = np.concatenate([b["image"] for b in a]).reshape(len(labels), 3, -1)
    assert all(len({x.tobytes() for x in group}) == 3 for group in images)  # cropped apart
    assert_same_batches(take(data_lib.InputPipeline(c).train_batches(4), 2), a[4:])


def test_stream_does_not_depend_on_how_epochs_are_grouped_into_pipelines(monkeypatch):
    c = tiny_config(mock_num_examples=37)  # 2 steps per epoch
    stream = take(data_lib.InputPipeline(c).train_batches(1), 7)
    monkeypatch.setattr(pipeline, "STEPS_PER_PIPELINE", 1)  # one pipeline per epoch
    pipe = data_lib.InputPipeline(c)
    assert pipe.source.epochs_per_pipeline == 1
    assert_same_batches(take(pipe.train_batches(1), 7), stream)


def test_in_memory_stream_is_a_function_of_the_step_and_independent_of_processes():
    c = digits.get_config()
    c.batch_size = 64
    one = data_lib.InputPipeline(c)
    stream = take(one.train_batches(0), 30)  # crosses an epoch (22 steps)
    assert_same_batches(take(one.train_batches(20), 10), stream[20:])
    # Two processes each get half of the same global batch.
    halves = [data_lib.InputPipeline(c, p, 2) for p in (0, 1)]
    parts = [next(h.train_batches(5)) for h in halves]
    for k in ("image", "label"):
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), stream[5][k])


def test_digits_config_is_the_offline_default():
    pipe = data_lib.InputPipeline(digits.get_config())
    assert pipe.info.train_size == 1437 and pipe.info.eval_size == 360
    assert pipe.info.image_shape == (8, 8, 1) and pipe.info.num_classes == 10
    assert pipe.mean.shape == (8, 8, 1) and pipe.mean.dtype == np.float32


def test_cifar100_by_config():
    pipe = data_lib.InputPipeline(tiny_config(dataset="cifar100"))
    assert pipe.info.num_classes == 100 and pipe.info.image_shape == (32, 32, 3)
    batch = next(pipe.train_batches(0))
    assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["label"].max() < 100


def test_paper_validation_split_holds_out_the_end_of_train(monkeypatch):
    calls = []

    def fake(name, split, data_dir):
        calls.append((name, split))
        return data_lib.Split(np.zeros((4, 32, 32, 3), np.uint8), np.zeros((4,), np.int32))

    monkeypatch.setattr(datasets, "read_tfds_split", fake)
    data_lib.load_in_memory(tiny_config(validation_split=5000))
    assert calls == [("cifar10", "train[:-5000]"), ("cifar10", "train[-5000:]")]
    calls.clear()
    data_lib.load_in_memory(tiny_config())
    assert calls == [("cifar10", "train"), ("cifar10", "test")]


def test_a_download_that_fails_offline_is_one_line_naming_the_fixes(monkeypatch, tmp_path):
    import requests

    tfds = data_lib.tfds_module()

    def offline(*args, **kwargs):
        raise requests.exceptions.ConnectionError(
            "HTTPSConnectionPool(host='www.cs.toronto.edu', port=443): Max retries exceeded\nmore"
        )

    monkeypatch.setattr(tfds, "load", offline)
    with pytest.raises(DataNotFoundError) as e:
        datasets.read_tfds_split("cifar10", "train", str(tmp_path))
    message = str(e.value)
    assert "\n" not in message and f"cifar10 in {tmp_path}" in message
    assert "ConnectionError" in message and "--config.mock_data=True" in message


# --------------------------------------------------------------------------- #
# Evaluation
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_eval_sees_every_example_exactly_once(processes):
    c = digits.get_config()
    c.eval_batch_size = 48 * processes  # 360 test examples: not divisible
    c.batch_size = 48 * processes
    pipes = [data_lib.InputPipeline(c, p, processes) for p in range(processes)]
    batches = [list(p.eval_batches()) for p in pipes]
    assert len({len(b) for b in batches}) == 1  # same number of batches on every host
    for b in batches[0]:
        assert b["image"].shape == (48, 8, 8, 1) and b["mask"].dtype == np.float32
        assert not b["image"][b["mask"] == 0].any() and not b["label"][b["mask"] == 0].any()
    seen = np.concatenate([b["image"][b["mask"] > 0] for bs in batches for b in bs])
    expected = pipes[0].test.images.astype(np.float32) / 255.0 - pipes[0].mean
    np.testing.assert_allclose(seen, expected, atol=1e-6)  # in order, contiguous shares
    assert_same_batches(list(pipes[0].eval_batches()), batches[0])  # a second pass


def test_imagenet_ten_crop_eval_pipeline():
    pipe = data_lib.InputPipeline(tiny_imagenet(mock_num_examples=5, image_size=16, ten_crop=True))
    batches = list(pipe.eval_batches())
    assert batches[0]["image"].shape == (4, 10, 16, 16, 3)
    assert sum(b["mask"].sum() for b in batches) == 5
    # Crop 5 and crop 10 are mirror images of each other (center crop and its flip).
    img = batches[0]["image"][0]
    np.testing.assert_allclose(img[9], img[4][:, ::-1], atol=1e-6)


def test_imagenet_train_augmentation_shapes_and_determinism():
    pipe = data_lib.InputPipeline(tiny_imagenet())
    assert not hasattr(pipe, "train")  # streamed from files, nothing in memory
    np.testing.assert_allclose(pipe.mean, data_lib.IMAGENET_MEAN_RGB, rtol=1e-7)
    a = take(pipe.train_batches(0), 4)
    assert a[0]["image"].shape == (4, 24, 24, 3) and a[0]["label"].dtype == np.int32
    assert_same_batches(take(pipe.train_batches(2), 2), a[2:])


def test_imagenet_stream_resumes_exactly_across_pipelines_and_as_uint8():
    # 3 steps per epoch, 4 epochs per pipeline: 14 steps cross a rebuild.
    c = tiny_imagenet()
    pipe = data_lib.InputPipeline(c)
    assert pipe.source.epochs_per_pipeline == 4
    a = take(pipe.train_batches(0), 14)
    for start in (5, 12):  # mid-epoch in the first pipeline; in the second
        fresh = data_lib.InputPipeline(c)
        assert_same_batches(take(fresh.train_batches(start), 14 - start), a[start:])
    u = take(data_lib.InputPipeline(c, image_dtype="uint8").train_batches(0), 14)
    for x, y in zip(a, u):
        assert y["image"].dtype == np.uint8 and y["image"].shape == x["image"].shape
        np.testing.assert_array_equal(x["label"], y["label"])
        # uint8 is the rounded float pixels: the same crops, half a grey level apart.
        back = (x["image"] + pipe.mean) * 255.0
        assert np.abs(back - y["image"]).max() <= 0.5 + 1e-3
    ev = list(data_lib.InputPipeline(c, image_dtype="uint8").eval_batches())
    assert ev[-1]["image"].dtype == np.uint8 and ev[-1]["image"].shape == (4, 24, 24, 3)
    with pytest.raises(ValueError, match="image_dtype"):
        data_lib.InputPipeline(tiny_config(), image_dtype="uint8")


@pytest.mark.parametrize(
    "config",
    [
        tiny_config(auto_augment="randaugment"),
        tiny_imagenet(repeated_augmentation=2, auto_augment="trivialaugment"),
    ],
    ids=["cifar-randaugment", "imagenet-repeated-trivialaugment"],
)
def test_pipelines_are_traced_without_autograph_and_equal_autograph_s(config, monkeypatch):
    """AutoGraph's source rewrite never runs (tf_setup.without_autograph), and
    the batches are those of the same functions converted by AutoGraph."""
    from tensorflow.python.autograph.impl import api

    calls = []
    original = api._TRANSPILER.transform

    def counting(fn, *args, **kwargs):
        if getattr(fn, "__module__", "").startswith("resnet_jax"):  # tfds converts its own
            calls.append(fn)
        return original(fn, *args, **kwargs)

    monkeypatch.setattr(api._TRANSPILER, "transform", counting)
    plain = take(data_lib.InputPipeline(config).train_batches(0), 2)
    plain += take(data_lib.InputPipeline(config).eval_batches(), 1)
    assert calls == []  # no function of this package went through AutoGraph
    # The same pipelines with AutoGraph on: identical batches. (The augmentation
    # ops, compiled once per process, equal eager TensorFlow: test_autoaugment.)
    monkeypatch.setattr(pipeline, "without_autograph", lambda fn: fn)
    converted = take(data_lib.InputPipeline(config).train_batches(0), 2)
    converted += take(data_lib.InputPipeline(config).eval_batches(), 1)
    assert calls  # AutoGraph did run this time
    assert_same_batches(converted, plain)


@pytest.mark.parametrize("dataset", ["imagenet", "cifar"])
def test_nondeterministic_input_still_sees_every_example_once_per_epoch(dataset):
    """deterministic_input=False (speed over reproducibility): each epoch is
    still every example once, each with its own augmentation."""
    if dataset == "imagenet":
        c, steps = tiny_imagenet(deterministic_input=False), 3
    else:
        c, steps = tiny_config(deterministic_input=False, mock_num_examples=48), 3
    ref = take(data_lib.InputPipeline(c.copy_and_resolve_references()).train_batches(0), steps)
    c_det = c.copy_and_resolve_references()
    c_det.deterministic_input = True
    det = take(data_lib.InputPipeline(c_det).train_batches(0), steps)
    labels = sorted(np.concatenate([b["label"] for b in ref]).tolist())
    assert labels == sorted(np.concatenate([b["label"] for b in det]).tolist())
    assert all(b["image"].shape == d["image"].shape for b, d in zip(ref, det))


def _photo_jpeg(grey=False, size=None):
    """A real photograph (scikit-learn's china.jpg, 427x640, or resized to
    ``size`` (H, W)) as JPEG bytes."""
    import tensorflow as tf
    from sklearn.datasets import load_sample_image

    image = load_sample_image("china.jpg")
    if size is not None:
        image = tf.cast(tf.image.resize(image, size, antialias=True), tf.uint8).numpy()
    if grey:
        image = np.round(image.mean(axis=-1, keepdims=True)).astype(np.uint8)
    return tf.io.encode_jpeg(image, quality=90).numpy()


def _windows(config, shape, n):
    import tensorflow as tf

    out = []
    for i in range(n):
        w, flip = transforms.imagenet_train_window(
            tf.constant(shape), tf.constant([3, i], tf.int64), config
        )
        out.append((w.numpy(), bool(flip)))
    return out


def test_imagenet_train_crop_is_the_decoded_window_resized_and_flipped():
    import tensorflow as tf

    c = imagenet.get_config()
    encoded = _photo_jpeg()
    full = tf.io.decode_jpeg(encoded, channels=3).numpy()
    for seed in range(4):
        s = tf.constant([11, seed], tf.int64)
        crop = transforms.imagenet_train(tf.constant(encoded), s, c).numpy()
        assert crop.shape == (224, 224, 3) and crop.dtype == np.float32
        window, flip = transforms.imagenet_train_window(tf.constant([427, 640, 3]), s, c)
        top, left, h, w = window.numpy()
        part = tf.image.decode_and_crop_jpeg(encoded, window, channels=3).numpy()
        # The window's pixels; chroma upsampling differs by a few levels on its edge only.
        sliced = full[top : top + h, left : left + w].astype(int)
        np.testing.assert_array_equal(part[1:-1, 1:-1], sliced[1:-1, 1:-1])
        assert np.abs(part - sliced).max() <= 16
        expected = tf.image.resize(part.astype(np.float32), (224, 224), antialias=True).numpy()
        np.testing.assert_array_equal(crop, expected[:, ::-1] if bool(flip) else expected)


def test_imagenet_scale_windows_are_the_crop_of_the_rescaled_image():
    c = imagenet.get_config()  # shorter side s in [256, 480], 224 crop
    flips = []
    for (top, left, h, w), flip in _windows(c, (427, 640, 3), 200):
        assert h == w and round(224 * 427 / 480) <= h <= round(224 * 427 / 256)
        assert 0 <= top <= 427 - h and 0 <= left <= 640 - w
        flips.append(flip)
    assert 0.3 < np.mean(flips) < 0.7


def test_imagenet_random_resized_windows_respect_area_and_aspect():
    c = imagenet.get_config()
    c.train_crop = "random_resized"
    areas = []
    for (top, left, h, w), _ in _windows(c, (427, 640, 3), 200):
        assert 0 <= top and top + h <= 427 and 0 <= left and left + w <= 640
        area = h * w / (427 * 640)
        if area < 1.0:  # the whole image is the fallback when no draw fits
            assert 0.08 - 0.01 <= area and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
        areas.append(area)
    assert min(areas) < 0.3 and max(areas) > 0.7  # the range is used
    with pytest.raises(UserError, match="train_crop='inception'; valid: scale, random_resized"):
        data_lib.InputPipeline(tiny_imagenet(train_crop="inception"))


@pytest.mark.parametrize("size", [(427, 640), (500, 375), (256, 256), (300, 701)])
def test_imagenet_eval_center_crop_equals_resize_then_center_crop(size):
    """Only the window is decoded, yet the crop is torchvision's Resize(256) +
    CenterCrop(224) geometry resampled as the whole image would be."""
    import tensorflow as tf

    c = imagenet.get_config()
    encoded = _photo_jpeg(size=size)
    got = transforms.imagenet_eval(tf.constant(encoded), c).numpy()
    assert got.shape == (224, 224, 3)
    full = transforms.resize_shorter(tf.cast(tf.io.decode_jpeg(encoded), tf.float32), 256).numpy()
    h, w = full.shape[:2]
    assert min(h, w) == 256 and max(h, w) == int(256 * max(size) / min(size))
    top, left = round((h - 224) / 2), round((w - 224) / 2)
    want = full[top : top + 224, left : left + 224]
    assert np.abs(got - want).max() < 0.05  # float rounding, not resampling
    assert np.abs(got - full[top + 1 : top + 225, left : left + 224]).mean() > 1.0


def test_imagenet_greyscale_jpegs_decode_as_rgb():
    import tensorflow as tf

    encoded = tf.constant(_photo_jpeg(grey=True))
    c = imagenet.get_config()
    crops = [
        transforms.imagenet_train(encoded, tf.constant([0, 1], tf.int64), c),
        transforms.imagenet_eval(encoded, c),
    ]
    c.ten_crop = True
    crops.append(transforms.imagenet_eval(encoded, c)[3])
    for crop in crops:
        assert crop.shape == (224, 224, 3)
        np.testing.assert_array_equal(crop[..., 0], crop[..., 2])


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


def test_unknown_dataset_is_a_user_error():
    with pytest.raises(UserError, match="Unknown dataset 'mnist'; valid: digits, cifar10"):
        data_lib.InputPipeline(tiny_config(dataset="mnist"))


def test_batch_not_dividing_by_processes_is_a_user_error():
    with pytest.raises(UserError, match=r"batch_size=16 .* number of processes \(3\)"):
        data_lib.InputPipeline(tiny_config(), 0, 3)


def test_training_split_smaller_than_a_batch_is_a_user_error():
    with pytest.raises(UserError, match="has 64 examples, fewer than one global batch"):
        data_lib.InputPipeline(tiny_config(batch_size=128))


def test_labels_must_fit_num_classes():
    c = digits.get_config()
    c.num_classes = 5
    msg = (
        "num_classes=5 but digits has labels 0..9; "
        "set --config.num_classes=0 (the dataset's 10) or >= 10"
    )
    with pytest.raises(UserError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        data_lib.InputPipeline(c)
    c.num_classes = 12  # more logits than classes is allowed
    assert data_lib.InputPipeline(c).info.num_classes == 10


def test_imagenet_not_prepared_is_data_not_found(tmp_path):
    c = imagenet.get_config()
    c.data_dir = str(tmp_path / "tfds")
    with pytest.raises(DataNotFoundError, match="ILSVRC2012_img_train.tar") as e:
        data_lib.InputPipeline(c)
    assert isinstance(e.value, UserError) and isinstance(e.value, FileNotFoundError)


# --------------------------------------------------------------------------- #
# TensorFlow set-up
# --------------------------------------------------------------------------- #

_IMPORT_THEN_CONFIGURE = """
import os, sys
import resnet_jax  # jax: it sets TF_CPP_MIN_LOG_LEVEL itself
env = dict(os.environ)
import resnet_jax.data as data_lib
assert dict(os.environ) == env, "importing resnet_jax.data changed the environment"
assert "tensorflow" not in sys.modules, "importing resnet_jax.data imported TensorFlow"
os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
data_lib.configure_tensorflow()
data_lib.configure_tensorflow()
import tensorflow as tf
assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2"
assert tf.config.get_visible_devices("GPU") == []
print("ok")
"""


def test_importing_data_configures_nothing_and_configure_tensorflow_does():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_THEN_CONFIGURE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_configure_tensorflow_hides_gpus_once_and_warns_when_too_late(monkeypatch, caplog):
    import tensorflow as tf

    calls = []
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda *a: calls.append(a))
    data_lib.configure_tensorflow.cache_clear()
    data_lib.configure_tensorflow()
    data_lib.configure_tensorflow()
    assert calls == [([], "GPU")]

    def too_late(*args):
        raise RuntimeError("Visible devices cannot be modified after being initialized")

    monkeypatch.setattr(tf.config, "set_visible_devices", too_late)
    data_lib.configure_tensorflow.cache_clear()
    with caplog.at_level(logging.WARNING, logger="resnet_jax.data"):
        data_lib.configure_tensorflow()
    assert "initialised its GPUs before configure_tensorflow" in caplog.text


def test_the_example_order_is_built_a_bounded_number_of_epochs_at_a_time(monkeypatch):
    """At a large batch, 10,000 steps are hundreds of epochs: the order arrays
    (24 bytes an example an epoch) stay under ORDER_BYTES, one epoch at least."""
    source = data_lib.InputPipeline(tiny_config()).source  # 64 examples, batch 16: 4 steps
    assert source.epochs_per_pipeline == 2500  # 10,000 steps of 4
    monkeypatch.setattr(pipeline, "ORDER_BYTES", 24 * 64 * 3)
    assert source.epochs_per_pipeline == 3
    monkeypatch.setattr(pipeline, "ORDER_BYTES", 1)
    assert source.epochs_per_pipeline == 1
