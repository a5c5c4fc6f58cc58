"""Input pipelines: tfds + tf.data for CIFAR and ImageNet, scikit-learn digits offline.

This is the only module of ``resnet_jax`` that uses TensorFlow. Importing it
imports neither TensorFlow nor tfds and configures nothing:
:func:`configure_tensorflow` (quiet C++ logs, every GPU hidden from TensorFlow
so that it never takes accelerator memory) runs before their first use here,
and a program calls it where it starts.

Every training stream is a pure function of ``(seed, step)``: the example order
of each epoch and every augmentation draw derive from the seed, the epoch and
the example's position, never from hidden iterator state. A run resumed at step
``s`` therefore sees exactly the batches an uninterrupted run sees from step
``s`` on, and a checkpoint needs to store only the step.

Batches are dicts of host-local numpy arrays: ``image`` (N, H, W, C) float32
(0..1 scale minus the mean; (N, 10, H, W, C) for ImageNet's 10-crop
evaluation), ``label`` (N,) int32 and, for evaluation, ``mask`` (N,) float32
that is 0 on padding examples. ImageNet can instead deliver ``image`` as uint8
pixels for normalisation on the device (``InputPipeline(image_dtype="uint8")``).

:class:`InputPipeline` does what every dataset shares (this process's share of
each batch, the checks, batching, padding the evaluation) and delegates the
rest to a source picked once by dataset name:

* :class:`InMemorySource` (``digits``, ``cifar10``, ``cifar100``): the split is
  held as one uint8 array; each epoch is a seeded global permutation; global
  batch ``k`` is ``perm[k*B:(k+1)*B]`` and process ``p`` takes its contiguous
  slice. The data order is the same for any number of processes. The
  per-pixel mean is that of the whole training split, before the digits'
  ``classes`` / ``train_examples_per_class`` selection (:func:`load_in_memory`).
* :class:`ImageNetSource` (``imagenet2012``): tfds shards split across
  processes with ``tfds.split_for_jax_process``, files and encoded examples
  shuffled with seeds derived from the epoch; a parallel ``map`` decodes only
  each example's crop window (``tf.image.decode_and_crop_jpeg``) and resizes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from resnet_jax.errors import DataNotFoundError, UserError

log = logging.getLogger(__name__)

# ImageNet RGB mean on the 0..1 scale (the per-pixel mean of the paper averages
# to this under random-size crops; computing it needs a pass over 1.28M images).
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)

IN_MEMORY = ("digits", "cifar10", "cifar100")
DATASETS = (*IN_MEMORY, "imagenet2012")
_NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenet2012": 1000}

# An in-memory source builds one tf.data pipeline per whole epochs covering
# about this many steps: one per epoch costs time and host memory.
_STEPS_PER_PIPELINE = 10_000
# ImageNet builds one pipeline per at most this many epochs (each epoch is a
# tfds.load of its own, with the epoch's file and example shuffle seeds).
_MAX_IMAGENET_EPOCHS_PER_PIPELINE = 4

# ImageNet training crops (config.train_crop): the paper's scale augmentation,
# or the Inception-style random-resized crop.
TRAIN_CROPS = ("scale", "random_resized")
IMAGE_DTYPES = ("float32", "uint8")


@dataclasses.dataclass
class Split:
    """A split held in memory: ``images`` (N, H, W, C) uint8, ``labels`` (N,) int32."""

    images: np.ndarray
    labels: np.ndarray


@dataclasses.dataclass
class DatasetInfo:
    """A dataset's classes, the model's input shape and the splits' sizes (examples)."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # the model's input (H, W, C)
    train_size: int
    eval_size: int


def check_dataset(name: str) -> None:
    """Raises a :class:`UserError` naming the valid datasets."""
    if name not in DATASETS:
        raise UserError(f"Unknown dataset {name!r}; valid: {', '.join(DATASETS)}.")


# --------------------------------------------------------------------------- #
# TensorFlow set-up
# --------------------------------------------------------------------------- #

_tf_configured = False


def configure_tensorflow() -> None:
    """Sets TensorFlow up to feed JAX: quiet C++ logs and no GPUs.

    Sets ``TF_CPP_MIN_LOG_LEVEL=2`` unless it is set (it acts only before
    TensorFlow's first import) and hides every GPU from TensorFlow so that it
    never takes accelerator memory. Idempotent. Call it where a program starts;
    :class:`InputPipeline` and the tfds helpers here call it before they import
    TensorFlow. If TensorFlow has already initialised its GPUs they can no
    longer be hidden, and this logs a warning.
    """
    global _tf_configured
    if _tf_configured:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # raised only when GPUs are visible and already initialised
        log.warning(
            "TensorFlow initialised its GPUs before configure_tensorflow(); "
            "it may hold accelerator memory that JAX needs."
        )
    _tf_configured = True


def _tfds():
    """The ``tensorflow_datasets`` module, imported after :func:`configure_tensorflow`."""
    configure_tensorflow()
    import tensorflow_datasets as tfds

    return tfds


def _mock_data_scope(config: Any):
    """``tfds.testing.mock_data`` when ``config.mock_data``, else a scope that does nothing."""
    if config.mock_data:
        return _tfds().testing.mock_data(num_examples=int(config.mock_num_examples))
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #


def load_digits(
    test_fraction: float = 0.2,
    split_seed: int = 0,
    classes: tuple[int, ...] = (),
    train_examples_per_class: int = 0,
    subset_seed: int = 0,
) -> tuple[Split, Split]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 0..16 grey levels).

    A stratified, seeded train/test split; pixels rescaled to 0..255 uint8.
    ``classes``: keep only these labels, relabelled ``0..k-1`` in the order
    given, in both splits (empty: all ten, unchanged). ``train_examples_per_class``
    N > 0: keep the first N training examples of each class in an order
    shuffled by ``subset_seed`` (so the N-example set is part of every larger
    one), in the split's order; the test split is never cut.

    Raises:
      UserError: a class without N training examples.
    """
    train, test = _digits_splits(test_fraction, split_seed)
    return _select_digits(train, test, classes, train_examples_per_class, subset_seed)


def _digits_splits(test_fraction: float, split_seed: int) -> tuple[Split, Split]:
    """The whole stratified train/test split of the digits, all ten classes."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    d = sk_load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int32)
    xtr, xte, ytr, yte = train_test_split(
        images, labels, test_size=test_fraction, random_state=split_seed, stratify=labels
    )
    return Split(xtr, ytr), Split(xte, yte)


def _select_digits(
    train: Split, test: Split, classes: tuple[int, ...], n: int, seed: int
) -> tuple[Split, Split]:
    """:func:`load_digits`' ``classes`` and ``train_examples_per_class`` selection."""
    if classes:
        train, test = _keep_classes(train, classes), _keep_classes(test, classes)
    if n:
        train = _first_per_class(train, int(n), seed)
    return train, test


def _keep_classes(split: Split, classes: tuple[int, ...]) -> Split:
    """The examples of ``classes``, labelled by their position in it."""
    relabel = np.full(max(max(classes), int(split.labels.max())) + 1, -1, np.int32)
    relabel[list(classes)] = np.arange(len(classes), dtype=np.int32)
    new = relabel[split.labels]
    keep = new >= 0
    return Split(split.images[keep], new[keep])


def _first_per_class(split: Split, n: int, seed: int) -> Split:
    """The first ``n`` examples of each label in a ``seed``-shuffled order, kept in split order."""
    order = np.random.default_rng(seed).permutation(len(split.labels))
    chosen = []
    for label in np.unique(split.labels):
        of_label = order[split.labels[order] == label]
        if len(of_label) < n:
            raise UserError(
                f"train_examples_per_class={n} but class {label} has {len(of_label)} training "
                f"examples; use --config.train_examples_per_class={len(of_label)} or fewer."
            )
        chosen.append(of_label[:n])
    keep = np.sort(np.concatenate(chosen))
    return Split(split.images[keep], split.labels[keep])


def _tfds_in_memory(name: str, split: str, data_dir: str | None) -> Split:
    """One tfds split read whole into memory."""
    tfds = _tfds()
    # Batches of 10k rather than batch_size=-1, which aborts under tfds' mock_data.
    ds = tfds.load(name, split=split, data_dir=data_dir, as_supervised=True).batch(10_000)
    parts = list(tfds.as_numpy(ds))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return Split(images.astype(np.uint8), labels.astype(np.int32))


def pixel_mean(split: Split) -> np.ndarray:
    """The per-pixel mean of ``split``'s images (Sec. 4.2): (H, W, C) float32 on the 0..1 scale."""
    return (split.images.astype(np.float64).mean(axis=0) / 255.0).astype(np.float32)


def eval_split(config: Any) -> str:
    """The tfds split a run evaluates on: ``config.eval_split`` (e.g.
    ``"validation[:10000]"``, ``"train[:5000]"``), else the recipe's:
    ImageNet's ``validation``, CIFAR's ``test`` or, with ``validation_split``
    N, ``train[-N:]``; the digits' is their stratified 20% test split."""
    if config.eval_split:
        return str(config.eval_split)
    if config.dataset == "imagenet2012":
        return "validation"
    if config.dataset == "digits":
        return "test (stratified 20%)"
    if config.validation_split:
        return f"train[-{int(config.validation_split)}:]"
    return "test"


def _bad_eval_split(config: Any, error: BaseException) -> Exception:
    """A user's ``eval_split`` that tfds does not know: one line; else the error itself."""
    if not config.eval_split or isinstance(error, UserError):
        return error
    reason = " ".join(str(error).split())[:200]
    return UserError(
        f"eval_split={config.eval_split!r} is not a split of {config.dataset} ({reason}); "
        "use e.g. 'validation', 'validation[:10000]' or 'train[:5000]'."
    )


def load_in_memory(config: Any) -> tuple[Split, Split, np.ndarray]:
    """The train and eval splits of an in-memory dataset (digits, CIFAR), and
    the :func:`pixel_mean` of its whole training split.

    The mean is taken before the digits' ``classes`` and
    ``train_examples_per_class`` selection, so every subset of a dataset
    subtracts the same mean: a network pretrained on some classes and
    fine-tuned on others sees inputs centred alike, and a run's mean does not
    depend on which few examples it drew. Without a subset it is the mean of
    the training split itself.
    """
    if config.dataset == "digits":
        train, test = load_digits()  # all ten classes, every training example
        mean = pixel_mean(train)
        train, test = _select_digits(
            train,
            test,
            tuple(config.classes),
            int(config.train_examples_per_class),
            int(config.train_subset_seed),
        )
        return train, test, mean
    train_split = "train"
    if config.validation_split:
        # The paper's CIFAR analysis split: 45k train / 5k validation.
        train_split = f"train[:-{int(config.validation_split)}]"
    train = _tfds_in_memory(config.dataset, train_split, config.data_dir)
    try:
        test = _tfds_in_memory(config.dataset, eval_split(config), config.data_dir)
    except (KeyError, ValueError) as e:
        raise _bad_eval_split(config, e) from e
    return train, test, pixel_mean(train)


def imagenet_preflight(data_dir: str | None, prepare: bool = True) -> bool:
    """Checks that ImageNet is prepared for tfds, or says where the archives go.

    With ``prepare``, prepares it when the archives are in place (hours,
    about 150 GB). Returns whether it is prepared now.

    Raises:
      DataNotFoundError: naming the directory where ``ILSVRC2012_img_train.tar``
        and ``ILSVRC2012_img_val.tar`` must be placed.
    """
    builder = _tfds().builder("imagenet2012", data_dir=data_dir)
    try:
        prepared = bool(builder.info.splits) and builder.info.splits["train"].num_examples > 0
    except Exception:  # noqa: BLE001 - any failure to read metadata means "not prepared"
        prepared = False
    if prepared:
        return True
    manual_dir = os.path.join(builder.data_dir_root, "downloads", "manual")
    needed = ["ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"]
    missing = [f for f in needed if not os.path.exists(os.path.join(manual_dir, f))]
    if missing:
        raise DataNotFoundError(
            "ImageNet (imagenet2012) is not prepared for tfds and cannot be downloaded "
            f"automatically. Download {', '.join(missing)} from https://image-net.org/ "
            f"and place them in {manual_dir} (set --config.data_dir to use another tfds "
            "data directory), then run the same command again: the first run extracts "
            "them into TFRecords (hours, about 150 GB)."
        )
    if not prepare:
        return False
    builder.download_and_prepare()
    return True


def prepare_for_processes(config: Any, process_index: int, process_count: int) -> None:
    """Prepares a tfds dataset once for all processes: process 0 prepares it
    (if needed) while the others wait at a barrier, then all read it.

    Every process first checks that the archives are in place, so a missing
    archive stops each one with the same message instead of a hang.
    """
    if config.dataset != "imagenet2012" or config.mock_data:
        return
    ready = imagenet_preflight(config.data_dir, prepare=process_index == 0)
    if process_count > 1:
        from jax.experimental import multihost_utils

        if not ready:
            log.info("Waiting for process 0 to prepare imagenet2012.")
        multihost_utils.sync_global_devices("resnet_jax_dataset_prepared")


def dataset_info(config: Any, train: Split | None = None, test: Split | None = None) -> DatasetInfo:
    """Sizes and shapes of the configured dataset: of ``train`` and ``test``
    for an in-memory dataset (both required), from tfds' metadata for ImageNet."""
    check_dataset(config.dataset)
    num_classes = _NUM_CLASSES[config.dataset]
    if config.dataset == "digits" and config.classes:  # a class subset, relabelled 0..k-1
        num_classes = len(config.classes)
    if config.dataset in IN_MEMORY:
        if train is None or test is None:
            raise TypeError(f"dataset_info of {config.dataset} needs its train and test splits.")
        shape = tuple(train.images.shape[1:])
        return DatasetInfo(config.dataset, num_classes, shape, len(train.labels), len(test.labels))
    if config.mock_data:
        n_train = n_eval = int(config.mock_num_examples)
    else:
        info = _tfds().builder("imagenet2012", data_dir=config.data_dir).info
        n_train = info.splits["train"].num_examples
        try:
            n_eval = info.splits[eval_split(config)].num_examples  # a sliced split too
        except (KeyError, ValueError) as e:
            raise _bad_eval_split(config, e) from e
    s = int(config.image_size)
    return DatasetInfo(config.dataset, num_classes, (s, s, 3), n_train, n_eval)


# --------------------------------------------------------------------------- #
# Preprocessing (TensorFlow, stateless: seeds are tensors derived from the step)
# --------------------------------------------------------------------------- #


def _normalize(image, mean):
    """The one mean subtraction of every path.

    ``image``: (..., H, W, C) uint8 or float32 pixels on the 0..255 scale;
    ``mean``: (H, W, C) or (C,) on the 0..1 scale. Returns float32 on the 0..1
    scale minus ``mean``.
    """
    import tensorflow as tf

    return tf.cast(image, tf.float32) / 255.0 - mean


def _pad_crop_flip(image, seed, pad: int, flip: bool):
    """The paper's CIFAR augmentation: pad by ``pad`` pixels, random crop back
    to (H, W, C), random horizontal flip. ``seed``: (2,) int64; dtype kept."""
    import tensorflow as tf

    h, w, c = image.shape
    s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if pad:
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
        image = tf.image.stateless_random_crop(image, (h, w, c), seed=s1)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=s2)
    return image


def _resized_shape(shape, size: int):
    """(new_h, new_w) float64 of an image of ``shape`` (H, W, ...) resized to
    shorter side ``size``: torchvision's ``Resize(size)`` (the longer side
    truncated, ``int(size * long / short)``)."""
    import tensorflow as tf

    h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    size = tf.cast(size, tf.float64)  # an int or a (random) scalar tensor
    taller = w <= h
    new_h = tf.where(taller, tf.floor(size * h / w), size)
    new_w = tf.where(taller, size, tf.floor(size * w / h))
    return new_h, new_w


def _resize_shorter(image, size):
    """(H, W, C) float32 resized (bilinear, antialiased) to shorter side ``size``
    pixels, to torchvision's ``Resize(size)`` shape."""
    import tensorflow as tf

    new_h, new_w = _resized_shape(tf.shape(image), size)
    new = tf.cast(tf.stack([new_h, new_w]), tf.int32)
    return tf.image.resize(image, new, method="bilinear", antialias=True)


def _imagenet_train_window(shape, seed, config):
    """The source-pixel window ``(top, left, height, width)`` int32 of one
    training crop, and the flip draw (bool), for an image of ``shape`` (H, W, ...).

    ``config.train_crop``:

    * ``"scale"`` (the paper's): the random ``image_size`` square crop of the
      image rescaled to shorter side ``s`` uniform in ``train_scale_range``
      pixels is, in source pixels, a square of side
      ``image_size * shorter / s`` at a uniform offset: the same distribution
      as resize-then-crop, without resizing the whole image.
    * ``"random_resized"`` (Inception-style): area uniform in [0.08, 1] of the
      image, aspect ratio log-uniform in [3/4, 4/3]
      (``tf.image.stateless_sample_distorted_bounding_box``; the whole image
      when 10 draws do not fit).

    ``seed``: (2,) int64; the draws are a pure function of it.
    """
    import tensorflow as tf

    h, w = tf.cast(shape[0], tf.int32), tf.cast(shape[1], tf.int32)
    s1, s2, s3 = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    flip = tf.random.stateless_uniform([], s3) < 0.5
    crop_kind = _train_crop(config)
    if crop_kind == "random_resized":
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.stack([h, w, 3]),
            bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
            seed=s1,
            min_object_covered=0.0,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        return tf.stack([begin[0], begin[1], size[0], size[1]]), flip
    lo, hi = config.train_scale_range
    size = tf.random.stateless_uniform([], s1, minval=lo, maxval=hi + 1, dtype=tf.int32)
    shorter = tf.minimum(h, w)
    side = tf.cast(tf.math.round(int(config.image_size) * shorter / size), tf.int32)
    side = tf.clip_by_value(side, 1, shorter)
    u = tf.random.stateless_uniform([2], s2)
    top_left = tf.cast(
        tf.floor(u * tf.cast(tf.stack([h - side + 1, w - side + 1]), tf.float32)), tf.int32
    )
    top_left = tf.minimum(top_left, tf.stack([h - side, w - side]))
    return tf.stack([top_left[0], top_left[1], side, side]), flip


def _train_crop(config) -> str:
    kind = config.train_crop
    if kind not in TRAIN_CROPS:
        raise UserError(f"train_crop={kind!r}; valid: {', '.join(TRAIN_CROPS)}.")
    return kind


def _decode_window(encoded, window, size: int):
    """Decodes only ``window`` (top, left, height, width) of JPEG bytes
    ``encoded`` as RGB (greyscale expanded) and resizes it (bilinear,
    antialiased) to (size, size, 3) float32 on the 0..255 scale."""
    import tensorflow as tf

    image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
    image = tf.image.resize(tf.cast(image, tf.float32), (size, size), "bilinear", antialias=True)
    return tf.ensure_shape(image, (size, size, 3))


def _imagenet_train(encoded, seed, config):
    """One training crop of JPEG bytes ``encoded``: the window of
    :func:`_imagenet_train_window` decoded, resized to ``image_size`` and
    flipped: (S, S, 3) float32 on the 0..255 scale. ``seed``: (2,) int64."""
    import tensorflow as tf

    window, flip = _imagenet_train_window(tf.image.extract_jpeg_shape(encoded), seed, config)
    image = _decode_window(encoded, window, int(config.image_size))
    return tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)


def _center_offsets(new_h, new_w, crop: int):
    """torchvision's ``CenterCrop``: top and left ``round((size - crop) / 2)``
    (half to even, as Python's ``round``), float64."""
    import tensorflow as tf

    return tf.math.round((new_h - crop) / 2.0), tf.math.round((new_w - crop) / 2.0)


def _center_crop(encoded, resize: int, crop: int):
    """The ``crop`` centre square of JPEG bytes ``encoded`` resized to shorter
    side ``resize`` (torchvision's ``Resize`` + ``CenterCrop`` geometry),
    decoding only the window the crop's resampling reads.

    The window is resampled with the scale and offset of the whole-image
    resize (``ScaleAndTranslate``, the antialiased triangle kernel of
    ``tf.image.resize``), so the crop equals resize-then-crop to float
    rounding, not just to the nearest source pixel. (crop, crop, 3) float32
    on the 0..255 scale.
    """
    import tensorflow as tf

    shape = tf.image.extract_jpeg_shape(encoded)
    h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    new_h, new_w = _resized_shape(shape, resize)
    top, left = _center_offsets(new_h, new_w, crop)
    scale = tf.stack([new_h / h, new_w / w])
    # The kernel reaches max(1, 1/scale) source pixels beyond the crop's edge.
    one, zero = tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64)
    margin = tf.math.ceil(tf.maximum(one, one / scale)) + one
    start = tf.maximum(zero, tf.floor(tf.stack([top, left]) / scale) - margin)
    stop = tf.minimum(
        tf.stack([h, w]), tf.math.ceil((tf.stack([top, left]) + crop) / scale) + margin
    )
    window = tf.cast(tf.concat([start, stop - start], 0), tf.int32)
    image = tf.cast(tf.image.decode_and_crop_jpeg(encoded, window, channels=3), tf.float32)
    out = tf.raw_ops.ScaleAndTranslate(
        images=image[None],
        size=tf.constant([crop, crop], tf.int32),
        scale=tf.cast(scale, tf.float32),
        translation=tf.cast(start * scale - tf.stack([top, left]), tf.float32),
        kernel_type="triangle",
        antialias=True,
    )
    return tf.ensure_shape(out[0], (crop, crop, 3))


def _imagenet_eval(encoded, config):
    """The center crop of JPEG bytes ``encoded`` as (S, S, 3), the crop of the
    image resized to shorter side ``eval_resize`` (only the window it reads is
    decoded); or the paper's 10 crops (4 corners + center, and their flips) as
    (10, S, S, 3), decoded once; float32 on the 0..255 scale, S = ``image_size``.
    Sizes and offsets follow torchvision's ``Resize``, ``CenterCrop`` and
    ``TenCrop``."""
    import tensorflow as tf

    crop, resize = int(config.image_size), int(config.eval_resize)
    if not config.ten_crop:
        return _center_crop(encoded, resize, crop)
    image = tf.cast(tf.io.decode_jpeg(encoded, channels=3), tf.float32)
    image = _resize_shorter(image, resize)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    top, left = _center_offsets(tf.cast(h, tf.float64), tf.cast(w, tf.float64), crop)
    top, left = tf.cast(top, tf.int32), tf.cast(left, tf.int32)
    center = image[top : top + crop, left : left + crop]
    crops = [
        image[:crop, :crop],
        image[:crop, w - crop :],
        image[h - crop :, :crop],
        image[h - crop :, w - crop :],
        center,
    ]
    crops = crops + [tf.image.flip_left_right(c) for c in crops]
    return tf.ensure_shape(tf.stack(crops), (10, crop, crop, 3))


def _epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's order and augmentation, a uint32 derived from the run's seed."""
    return int(np.random.SeedSequence([int(seed), 7, epoch]).generate_state(1)[0])


# --------------------------------------------------------------------------- #
# Sources: what differs between datasets
# --------------------------------------------------------------------------- #


class _Source:
    """The config and this process's share of every batch.

    A source also provides ``info`` (:class:`DatasetInfo`), ``mean`` (float32
    on the 0..1 scale, (H, W, C) or (C,)), ``max_label``,
    ``epochs_per_pipeline``, ``train_epochs(epoch, count, offset)`` and
    ``eval_examples()``, the last two as ``tf.data`` datasets of this host's
    examples (``image`` normalised float32, ``label`` int32), unbatched.
    """

    info: DatasetInfo
    mean: np.ndarray
    max_label: int
    epochs_per_pipeline = 1

    def __init__(self, config: Any, process_index: int, process_count: int):
        self.config = config
        self.process_index = process_index
        self.process_count = process_count
        self.host_batch = config.batch_size // process_count

    @property
    def steps_per_epoch(self) -> int:
        return self.info.train_size // self.config.batch_size


class InMemorySource(_Source):
    """digits, CIFAR-10, CIFAR-100: both splits held in memory as uint8 arrays.

    Each epoch is a seeded permutation of the whole training split, cut into
    global batches of which this process takes its contiguous slice; an
    example's augmentation seed is (epoch seed, its position in the epoch).
    """

    def __init__(self, config: Any, process_index: int = 0, process_count: int = 1):
        super().__init__(config, process_index, process_count)
        with _mock_data_scope(config):
            # Per-pixel mean over the whole training split (Sec. 4.2), on the 0..1
            # scale, taken before any class or label subset: subsets share it.
            self.train, self.test, self.mean = load_in_memory(config)
        self.info = dataset_info(config, self.train, self.test)
        self.max_label = int(max(self.train.labels.max(initial=0), self.test.labels.max(initial=0)))
        self._tf_train = None

    @property
    def epochs_per_pipeline(self) -> int:
        return max(1, math.ceil(_STEPS_PER_PIPELINE / self.steps_per_epoch))

    def _order(self, epoch: int, count: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
        """This host's examples of epochs ``epoch .. epoch + count - 1`` from
        ``offset`` steps into the first: indices into the training split,
        (T,) int, and their augmentation seeds, (T, 2) int64."""
        B, b, p = self.config.batch_size, self.host_batch, self.process_index
        spe, n = self.steps_per_epoch, self.info.train_size
        epoch_seeds = [_epoch_seed(self.config.seed, e) for e in range(epoch, epoch + count)]
        idx = []
        for seed in epoch_seeds:
            perm = np.random.default_rng(seed).permutation(n)[: spe * B]
            # Global batch k is perm[k*B:(k+1)*B]; this host takes slice p of it.
            idx.append(perm.reshape(spe, B)[:, p * b : (p + 1) * b])
        idx = np.concatenate(idx)[offset:].reshape(-1)
        steps = np.arange(epoch * spe + offset, (epoch + count) * spe)
        epoch_seeds = np.array(epoch_seeds, np.int64) % (2**31)
        pos = (steps % spe)[:, None] * B + p * b + np.arange(b)[None, :]
        seeds = np.stack([np.repeat(epoch_seeds[steps // spe - epoch], b), pos.reshape(-1)], axis=1)
        return idx, seeds

    def train_epochs(self, epoch: int, count: int, offset: int):
        """This host's training examples of epochs ``epoch .. epoch + count - 1``,
        from ``offset`` steps into the first, augmented and normalised."""
        import tensorflow as tf

        cfg = self.config
        pad, flip = int(cfg.crop_padding), bool(cfg.random_flip)
        augment, mean = bool(cfg.augment), self.mean
        if self._tf_train is None:  # made once, not per pipeline
            self._tf_train = (tf.constant(self.train.images), tf.constant(self.train.labels))
        images, labels = self._tf_train

        def example(i, seed):
            image = tf.gather(images, i)
            if augment:
                image = _pad_crop_flip(image, seed, pad, flip)
            return {"image": _normalize(image, mean), "label": tf.gather(labels, i)}

        ds = tf.data.Dataset.from_tensor_slices(self._order(epoch, count, offset))
        return ds.map(
            example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=cfg.deterministic_input
        )

    def eval_examples(self):
        """This host's contiguous share of the eval split, normalised."""
        import tensorflow as tf

        n, P, p = self.info.eval_size, self.process_count, self.process_index
        lo, hi = (n * p) // P, (n * (p + 1)) // P
        mean = self.mean

        def example(image, label):
            return {"image": _normalize(image, mean), "label": label}

        ds = tf.data.Dataset.from_tensor_slices((self.test.images[lo:hi], self.test.labels[lo:hi]))
        return ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


class ImageNetSource(_Source):
    """ImageNet (imagenet2012) read from tfds' TFRecords.

    tfds' image decoding is skipped: the shuffle buffer holds encoded JPEG
    bytes (about 110 kB an image, not a decoded photograph), a resume skips
    examples without decoding them, and each example's map decodes only the
    window it keeps (``tf.image.decode_and_crop_jpeg``). One pipeline covers
    up to ``_MAX_IMAGENET_EPOCHS_PER_PIPELINE`` epochs (about
    ``_STEPS_PER_PIPELINE`` steps), each epoch shuffled by its own seed.

    Raises :class:`DataNotFoundError` when it is not prepared (see
    :func:`imagenet_preflight`). Augmentation seeds are (epoch seed, the
    example's position in this host's epoch).

    ``image_dtype`` ``"uint8"``: images leave as rounded uint8 pixels (0..255),
    not normalised; the consumer subtracts ``mean`` (4x fewer bytes).
    """

    def __init__(
        self,
        config: Any,
        process_index: int = 0,
        process_count: int = 1,
        image_dtype: str = "float32",
    ):
        super().__init__(config, process_index, process_count)
        if not config.mock_data:
            imagenet_preflight(config.data_dir)
        _train_crop(config)  # a bad value fails here, not inside tf.data
        self.info = dataset_info(config)
        self.mean = np.asarray(IMAGENET_MEAN_RGB, np.float32)
        self.max_label = self.info.num_classes - 1
        self.image_dtype = image_dtype

    @property
    def epochs_per_pipeline(self) -> int:
        chunk = math.ceil(_STEPS_PER_PIPELINE / self.steps_per_epoch)
        return max(1, min(_MAX_IMAGENET_EPOCHS_PER_PIPELINE, chunk))

    def train_epochs(self, epoch: int, count: int, offset: int):
        """This host's training examples of epochs ``epoch .. epoch + count - 1``,
        from ``offset`` steps into the first, augmented."""
        ds = self._train_epoch(epoch, offset)
        for e in range(epoch + 1, epoch + count):
            ds = ds.concatenate(self._train_epoch(e, 0))
        return ds

    def _train_epoch(self, epoch: int, offset: int):
        import tensorflow as tf

        cfg, b = self.config, self.host_batch
        seed = _epoch_seed(cfg.seed, epoch)
        # Skipping before the map: a resume decodes none of the skipped examples.
        ds = self._load("train", seed).enumerate().skip(offset * b)

        def example(pos, ex):
            image = _imagenet_train(ex["image"], tf.stack([seed % (2**31), pos]), cfg)
            return {"image": self._output(image), "label": tf.cast(ex["label"], tf.int32)}

        ds = ds.take((self.steps_per_epoch - offset) * b)
        return ds.map(
            example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=cfg.deterministic_input
        )

    def eval_examples(self):
        """This host's share of the validation split (center or 10 crops)."""
        import tensorflow as tf

        cfg = self.config

        def example(ex):
            image = self._output(_imagenet_eval(ex["image"], cfg))
            return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

        ds = self._load("eval", None)
        return ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def _output(self, image):
        """float32 0..255 pixels -> normalised float32, or rounded uint8."""
        import tensorflow as tf

        if self.image_dtype == "uint8":
            return tf.cast(tf.clip_by_value(tf.math.round(image), 0.0, 255.0), tf.uint8)
        return _normalize(image, self.mean)

    def _load(self, split: str, seed: int | None):
        """This host's shards of ``split`` ('train' or 'eval') as encoded JPEG
        bytes, shuffled when ``seed`` is set."""
        import tensorflow as tf

        tfds, cfg = _tfds(), self.config
        name = "train" if split == "train" else eval_split(cfg)
        read_config = tfds.ReadConfig(
            shuffle_seed=seed, interleave_cycle_length=16, interleave_block_length=1
        )
        host_split = tfds.split_for_jax_process(
            name,
            process_index=self.process_index,
            process_count=self.process_count,
            drop_remainder=split == "train",
        )
        with _mock_data_scope(cfg):
            ds = tfds.load(
                "imagenet2012",
                split=host_split,
                data_dir=cfg.data_dir,
                shuffle_files=seed is not None,
                read_config=read_config,
                decoders={"image": tfds.decode.SkipDecoding()},
            )
        if seed is not None:
            opts = tf.data.Options()
            # False: files and the parallel map yield in completion order
            # (faster when some JPEGs are slow; a resume is no longer exact).
            opts.deterministic = bool(cfg.deterministic_input)
            ds = ds.with_options(opts).shuffle(int(cfg.shuffle_buffer), seed=seed)
        return ds


# --------------------------------------------------------------------------- #
# The pipeline: what every dataset shares
# --------------------------------------------------------------------------- #


class InputPipeline:
    """Training and evaluation batches for one process.

    Args:
      config: the run's ``ml_collections.ConfigDict`` (``dataset``,
        ``batch_size`` (global), ``eval_batch_size`` (global), ``seed``,
        ``mock_data``, ``num_classes``, augmentation keys).
      process_index, process_count: this host's place among all hosts.
      image_dtype: ``"float32"`` (default): images normalised on the host
        (0..1 scale minus ``mean``); ``"uint8"`` (ImageNet only): rounded
        0..255 pixels, 4x fewer bytes, for a consumer that normalises on the
        device (``image / 255 - mean``).

    Raises:
      ValueError: ``image_dtype`` unknown, or ``"uint8"`` for an in-memory dataset.
      UserError: an unknown dataset, a batch size that does not divide by the
        number of processes, a training split smaller than one batch, or
        labels that do not fit ``config.num_classes``.
      DataNotFoundError: ImageNet is not prepared.
    """

    def __init__(
        self,
        config: Any,
        process_index: int = 0,
        process_count: int = 1,
        image_dtype: str = "float32",
    ):
        configure_tensorflow()
        check_dataset(config.dataset)
        if image_dtype not in IMAGE_DTYPES or (
            image_dtype != "float32" and config.dataset in IN_MEMORY
        ):
            raise ValueError(
                f"image_dtype={image_dtype!r}: {IMAGE_DTYPES} for imagenet2012, float32 otherwise."
            )
        _check_batch_sizes(config, process_count)
        self.config = config
        self.process_index = process_index
        self.process_count = process_count
        self.host_batch = config.batch_size // process_count
        self.host_eval_batch = config.eval_batch_size // process_count
        if config.dataset in IN_MEMORY:
            self.source = InMemorySource(config, process_index, process_count)
        else:
            self.source = ImageNetSource(config, process_index, process_count, image_dtype)
        self.info: DatasetInfo = self.source.info
        self.mean: np.ndarray = self.source.mean
        _check_train_size(self.info, config.batch_size)
        _check_labels(config, self.info, self.source.max_label)
        self._eval_dataset = None

    @property
    def train(self) -> Split:
        """The in-memory training split (digits, CIFAR); ImageNet has none."""
        return self.source.train

    @property
    def test(self) -> Split:
        """The in-memory eval split (digits, CIFAR); ImageNet has none."""
        return self.source.test

    @property
    def steps_per_epoch(self) -> int:
        """Whole global batches per epoch; the rest of each epoch's order is dropped."""
        return self.source.steps_per_epoch

    def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """An endless stream of this host's training batches from ``start_step`` on:
        ``image`` (b, H, W, C) float32 (uint8 with ``image_dtype="uint8"``),
        ``label`` (b,) int32, b = batch_size / processes."""
        import tensorflow as tf

        epoch, offset = divmod(start_step, self.steps_per_epoch)
        count = self.source.epochs_per_pipeline
        while True:
            ds = self.source.train_epochs(epoch, count, offset)
            ds = ds.batch(self.host_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
            yield from ds.as_numpy_iterator()
            epoch, offset = epoch + count, 0

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """One pass over the eval split: every example exactly once, padded to
        whole batches of ``eval_batch_size / processes`` with ``mask == 0``
        examples (zero images, label 0), the same number of batches on every host."""
        if self._eval_dataset is None:  # built once; each pass re-reads it from the start
            per_host_max = math.ceil(self.info.eval_size / self.process_count)
            num_batches = math.ceil(per_host_max / self.host_eval_batch)
            self._eval_dataset = _padded_batches(
                self.source.eval_examples(), num_batches, self.host_eval_batch
            )
        yield from self._eval_dataset.as_numpy_iterator()


def _padded_batches(examples, num_batches: int, batch: int):
    """``examples`` with ``mask`` 1, then mask-0 zero examples, as exactly
    ``num_batches`` batches of ``batch``."""
    import tensorflow as tf

    ds = examples.map(lambda ex: {**ex, "mask": tf.constant(1.0)})
    spec = ds.element_spec
    pad = tf.data.Dataset.from_tensors(
        {
            "image": tf.zeros(spec["image"].shape, spec["image"].dtype),
            "label": tf.constant(0, tf.int32),
            "mask": tf.constant(0.0),
        }
    ).repeat()
    ds = ds.concatenate(pad).take(num_batches * batch)
    return ds.batch(batch).prefetch(tf.data.AUTOTUNE)


def _check_batch_sizes(config: Any, process_count: int) -> None:
    for key in ("batch_size", "eval_batch_size"):
        if config[key] <= 0 or config[key] % process_count:
            raise UserError(
                f"{key}={config[key]} must be positive and divide by the number of "
                f"processes ({process_count})."
            )


def _check_train_size(info: DatasetInfo, batch_size: int) -> None:
    if info.train_size < batch_size:
        raise UserError(
            f"The training split has {info.train_size} examples, fewer than one "
            f"global batch ({batch_size}); lower --config.batch_size."
        )


def _check_labels(config: Any, info: DatasetInfo, max_label: int) -> None:
    """Labels 0..max_label must index the model's ``config.num_classes`` logits (0: the dataset's)."""
    k = int(config.num_classes)
    if 0 < k <= max_label:
        raise UserError(
            f"num_classes={k} but {info.name} has labels 0..{max_label}; set "
            f"--config.num_classes=0 (the dataset's {info.num_classes}) or >= {max_label + 1}."
        )
