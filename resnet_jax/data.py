"""Input pipelines: tfds + tf.data for CIFAR and ImageNet, scikit-learn digits offline.

This is the only module of ``resnet_jax`` that imports TensorFlow, and it hides
every GPU from it so TensorFlow never takes accelerator memory.

Every training stream is a pure function of ``(seed, step)``: the example order
of each epoch and every augmentation draw derive from the seed, the epoch and
the example's position, never from hidden iterator state. A run resumed at step
``s`` therefore sees exactly the batches an uninterrupted run sees from step
``s`` on, and a checkpoint needs to store only the step.

Batches are dicts of host-local numpy arrays: ``image`` (N, H, W, C) float32,
``label`` (N,) int32 and, for evaluation, ``mask`` (N,) float32 that is 0 on
padding examples.

Two kinds of source:

* In memory (``digits``, ``cifar10``, ``cifar100``): the split is held as one
  uint8 array; each epoch is a seeded global permutation; global batch ``k`` is
  ``perm[k*B:(k+1)*B]`` and process ``p`` takes its contiguous slice. The data
  order is the same for any number of processes.
* Files (``imagenet2012``): tfds shards split across processes with
  ``tfds.split_for_jax_process``, files and examples shuffled with seeds derived
  from the epoch, decoded and augmented with a parallel ``map``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")

# ImageNet RGB mean on the 0..1 scale (the per-pixel mean of the paper averages
# to this under random-size crops; computing it needs a pass over 1.28M images).
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)

IN_MEMORY = ("digits", "cifar10", "cifar100")
DATASETS = (*IN_MEMORY, "imagenet2012")


@dataclasses.dataclass
class Split:
    """A split held in memory: ``images`` (N, H, W, C) uint8, ``labels`` (N,) int32."""

    images: np.ndarray
    labels: np.ndarray


@dataclasses.dataclass
class DatasetInfo:
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # the model's input (H, W, C)
    train_size: int
    eval_size: int


def check_dataset(name: str) -> None:
    """Raises a ValueError naming the valid datasets."""
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid: {', '.join(DATASETS)}.")


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> tuple[Split, Split]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 0..16 grey levels).

    A stratified, seeded train/test split; pixels rescaled to 0..255 uint8.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    d = sk_load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int32)
    xtr, xte, ytr, yte = train_test_split(
        images, labels, test_size=test_fraction, random_state=split_seed, stratify=labels
    )
    return Split(xtr, ytr), Split(xte, yte)


def _tfds_source(config: Any):
    """``tfds.testing.mock_data`` when ``config.mock_data``, else nothing to enter."""
    import contextlib

    import tensorflow_datasets as tfds

    if config.mock_data:
        return tfds.testing.mock_data(num_examples=int(config.get("mock_num_examples", 64)))
    return contextlib.nullcontext()


def _tfds_in_memory(name: str, split: str, data_dir: str | None) -> Split:
    import tensorflow_datasets as tfds

    # Batches of 10k rather than batch_size=-1, which aborts under tfds' mock_data.
    ds = tfds.load(name, split=split, data_dir=data_dir, as_supervised=True).batch(10_000)
    parts = list(tfds.as_numpy(ds))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return Split(images.astype(np.uint8), labels.astype(np.int32))


def load_in_memory(config: Any) -> tuple[Split, Split]:
    """The train and eval splits of an in-memory dataset (digits, CIFAR)."""
    if config.dataset == "digits":
        return load_digits()
    train_split, eval_split = "train", "test"
    if config.get("validation_split", 0):
        # The paper's CIFAR analysis split: 45k train / 5k validation.
        n_val = int(config.validation_split)
        train_split, eval_split = f"train[:-{n_val}]", f"train[-{n_val}:]"
    train = _tfds_in_memory(config.dataset, train_split, config.get("data_dir"))
    test = _tfds_in_memory(config.dataset, eval_split, config.get("data_dir"))
    return train, test


def imagenet_preflight(data_dir: str | None) -> None:
    """Checks that ImageNet is prepared for tfds, or says where the archives go.

    Raises:
      FileNotFoundError: naming the directory where ``ILSVRC2012_img_train.tar``
        and ``ILSVRC2012_img_val.tar`` must be placed.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    try:
        prepared = bool(builder.info.splits) and builder.info.splits["train"].num_examples > 0
    except Exception:  # noqa: BLE001 - any failure to read metadata means "not prepared"
        prepared = False
    if prepared:
        return
    manual_dir = os.path.join(builder.data_dir_root, "downloads", "manual")
    needed = ["ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"]
    missing = [f for f in needed if not os.path.exists(os.path.join(manual_dir, f))]
    if missing:
        raise FileNotFoundError(
            "ImageNet (imagenet2012) is not prepared for tfds and cannot be downloaded "
            f"automatically. Download {', '.join(missing)} from https://image-net.org/ "
            f"and place them in {manual_dir} (set --config.data_dir to use another tfds "
            "data directory), then run the same command again: the first run extracts "
            "them into TFRecords (hours, about 150 GB)."
        )
    builder.download_and_prepare()


def dataset_info(config: Any, train: Split | None = None, test: Split | None = None) -> DatasetInfo:
    """Sizes and shapes of the configured dataset."""
    check_dataset(config.dataset)
    if config.dataset in IN_MEMORY:
        assert train is not None and test is not None
        return DatasetInfo(
            config.dataset,
            {"digits": 10, "cifar10": 10, "cifar100": 100}[config.dataset],
            tuple(train.images.shape[1:]),
            len(train.labels),
            len(test.labels),
        )
    import tensorflow_datasets as tfds

    if config.mock_data:
        n_train = n_eval = int(config.get("mock_num_examples", 64))
    else:
        info = tfds.builder("imagenet2012", data_dir=config.get("data_dir")).info
        n_train = info.splits["train"].num_examples
        n_eval = info.splits["validation"].num_examples
    s = int(config.image_size)
    return DatasetInfo("imagenet2012", 1000, (s, s, 3), n_train, n_eval)


# --------------------------------------------------------------------------- #
# Augmentation (TensorFlow, stateless: seeds are tensors derived from the step)
# --------------------------------------------------------------------------- #


def _pad_crop_flip(image, seed, pad: int, flip: bool):
    """The paper's CIFAR augmentation: pad by ``pad``, random crop back, random flip."""
    h, w, c = image.shape
    s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if pad:
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
        image = tf.image.stateless_random_crop(image, (h, w, c), seed=s1)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=s2)
    return image


def _resize_shorter(image, size):
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.cast(size, tf.float32) / tf.reduce_min(shape)
    new = tf.cast(tf.math.round(shape * scale), tf.int32)
    return tf.image.resize(image, new, method="bilinear", antialias=True)


def _imagenet_train(image, seed, config):
    """Scale augmentation (shorter side uniform in [lo, hi]), random crop, flip."""
    lo, hi = config.train_scale_range
    s1, s2, s3 = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    size = tf.random.stateless_uniform([], s1, minval=lo, maxval=hi + 1, dtype=tf.int32)
    image = _resize_shorter(tf.cast(image, tf.float32), size)
    crop = int(config.image_size)
    image = tf.image.stateless_random_crop(image, (crop, crop, 3), seed=s2)
    image = tf.image.stateless_random_flip_left_right(image, seed=s3)
    return image


def _imagenet_eval(image, config):
    """Resize the shorter side to ``eval_resize``; the center crop, or the
    paper's 10 crops (4 corners + center, and their flips) as (10, H, W, 3)."""
    image = _resize_shorter(tf.cast(image, tf.float32), int(config.eval_resize))
    crop = int(config.image_size)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    top, left = (h - crop) // 2, (w - crop) // 2
    center = image[top : top + crop, left : left + crop]
    if not config.get("ten_crop", False):
        return tf.ensure_shape(center, (crop, crop, 3))
    crops = [
        image[:crop, :crop],
        image[:crop, w - crop :],
        image[h - crop :, :crop],
        image[h - crop :, w - crop :],
        center,
    ]
    crops = crops + [tf.image.flip_left_right(c) for c in crops]
    return tf.ensure_shape(tf.stack(crops), (10, crop, crop, 3))


# --------------------------------------------------------------------------- #
# Pipelines
# --------------------------------------------------------------------------- #


class InputPipeline:
    """Training and evaluation batches for one process.

    Args:
      config: the run's ``ml_collections.ConfigDict`` (``dataset``,
        ``batch_size`` (global), ``eval_batch_size``, ``seed``, ``mock_data``,
        augmentation keys).
      process_index, process_count: this host's place among all hosts.
    """

    def __init__(self, config: Any, process_index: int = 0, process_count: int = 1):
        check_dataset(config.dataset)
        self.config = config
        self.process_index = process_index
        self.process_count = process_count
        for key in ("batch_size", "eval_batch_size"):
            if config[key] % process_count:
                raise ValueError(
                    f"{key}={config[key]} must divide by the number of processes ({process_count})."
                )
        self.host_batch = config.batch_size // process_count
        self.host_eval_batch = config.eval_batch_size // process_count
        if config.dataset in IN_MEMORY:
            with _tfds_source(config):
                self.train, self.test = load_in_memory(config)
            self.info = dataset_info(config, self.train, self.test)
            # Per-pixel mean over the training set (Sec. 4.2), on the 0..1 scale.
            self.mean = (self.train.images.astype(np.float64).mean(axis=0) / 255.0).astype(
                np.float32
            )
        else:
            if not config.mock_data:
                imagenet_preflight(config.get("data_dir"))
            self.info = dataset_info(config)
            self.mean = np.asarray(IMAGENET_MEAN_RGB, np.float32)
        if self.info.train_size < config.batch_size:
            raise ValueError(
                f"The training split has {self.info.train_size} examples, fewer than one "
                f"global batch ({config.batch_size}); lower --config.batch_size."
            )

    # ---- training ---------------------------------------------------------- #

    @property
    def steps_per_epoch(self) -> int:
        return self.info.train_size // self.config.batch_size

    def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """An endless stream of this host's training batches from ``start_step`` on."""
        epoch = start_step // self.steps_per_epoch
        offset = start_step % self.steps_per_epoch
        # In-memory datasets build one tf.data pipeline per chunk of epochs
        # (about 10k steps): building one per epoch costs time and host memory.
        chunk = 1
        if self.config.dataset in IN_MEMORY:
            chunk = max(1, math.ceil(10_000 / self.steps_per_epoch))
        while True:
            ds = self._train_epochs(epoch, chunk, offset)
            yield from ds.as_numpy_iterator()
            epoch, offset = epoch + chunk, 0

    def _epoch_seed(self, epoch: int) -> int:
        return int(np.random.SeedSequence([int(self.config.seed), 7, epoch]).generate_state(1)[0])

    def _train_epochs(self, epoch: int, count: int, offset: int) -> tf.data.Dataset:
        """Epochs ``epoch .. epoch + count - 1``, starting ``offset`` steps into the first."""
        cfg = self.config
        B, b, p = cfg.batch_size, self.host_batch, self.process_index
        spe = self.steps_per_epoch
        if cfg.dataset in IN_MEMORY:
            n = self.info.train_size
            epoch_seeds = [self._epoch_seed(e) for e in range(epoch, epoch + count)]
            idx = []
            for seed in epoch_seeds:
                perm = np.random.default_rng(seed).permutation(n)[: spe * B]
                # Global batch k is perm[k*B:(k+1)*B]; this host takes slice p of it.
                idx.append(perm.reshape(spe, B)[:, p * b : (p + 1) * b])
            idx = np.concatenate(idx)[offset:].reshape(-1)
            # Augmentation seed of an example: (epoch seed, position in the epoch).
            steps = np.arange(epoch * spe + offset, (epoch + count) * spe)
            epoch_seeds = np.array(epoch_seeds, np.int64) % (2**31)
            pos = (steps % spe)[:, None] * B + p * b + np.arange(b)[None, :]
            seeds = np.stack(
                [np.repeat(epoch_seeds[steps // spe - epoch], b), pos.reshape(-1)], axis=1
            )
            images, labels, mean = self._tf_arrays()
            pad = int(cfg.get("crop_padding", 4))
            flip = bool(cfg.get("random_flip", True))
            augment = bool(cfg.get("augment", True))

            def fn(i, seed):
                image = tf.gather(images, i)
                if augment:
                    image = _pad_crop_flip(image, seed, pad, flip)
                image = tf.cast(image, tf.float32) / 255.0 - mean
                return {"image": image, "label": tf.gather(labels, i)}

            ds = tf.data.Dataset.from_tensor_slices((idx, seeds))
            ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        else:
            seed = self._epoch_seed(epoch)
            ds = self._imagenet_source("train", seed)
            ds = ds.enumerate().skip(offset * b)
            mean = tf.constant(self.mean)

            def fn(pos, ex):
                image = _imagenet_train(ex["image"], tf.stack([seed % (2**31), pos]), cfg)
                return {"image": image / 255.0 - mean, "label": tf.cast(ex["label"], tf.int32)}

            ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            ds = ds.take((self.steps_per_epoch - offset) * b)
        return ds.batch(b, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def _tf_arrays(self):
        """The training split as TensorFlow tensors, made once (not per pipeline)."""
        if not hasattr(self, "_tf_cache"):
            self._tf_cache = (
                tf.constant(self.train.images),
                tf.constant(self.train.labels),
                tf.constant(self.mean),
            )
        return self._tf_cache

    def _imagenet_source(self, split: str, seed: int | None):
        import tensorflow_datasets as tfds

        cfg = self.config
        name = "train" if split == "train" else "validation"
        read_config = tfds.ReadConfig(
            shuffle_seed=seed, interleave_cycle_length=16, interleave_block_length=1
        )
        kw = dict(
            split=tfds.split_for_jax_process(
                name,
                process_index=self.process_index,
                process_count=self.process_count,
                drop_remainder=split == "train",
            ),
            data_dir=cfg.get("data_dir"),
            shuffle_files=seed is not None,
            read_config=read_config,
        )
        with _tfds_source(cfg):
            ds = tfds.load("imagenet2012", **kw)
        if seed is not None:
            opts = tf.data.Options()
            opts.deterministic = True
            ds = ds.with_options(opts).shuffle(int(cfg.get("shuffle_buffer", 16_384)), seed=seed)
        return ds

    # ---- evaluation -------------------------------------------------------- #

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """One pass over the eval split: every example exactly once, padded to
        whole batches with ``mask == 0`` examples, the same number of batches on
        every host."""
        cfg = self.config
        n, P, b = self.info.eval_size, self.process_count, self.host_eval_batch
        per_host_max = math.ceil(n / P)
        num_batches = math.ceil(per_host_max / b)
        total = num_batches * b
        if cfg.dataset in IN_MEMORY:
            lo = (n * self.process_index) // P
            hi = (n * (self.process_index + 1)) // P
            images = self.test.images[lo:hi]
            labels = self.test.labels[lo:hi]
            count = hi - lo
            for k in range(num_batches):
                sl = slice(k * b, min((k + 1) * b, count))
                img = images[sl].astype(np.float32) / 255.0 - self.mean
                lab = labels[sl]
                m = len(lab)
                yield _pad_batch(img, lab, m, b)
            return
        mean = tf.constant(self.mean)
        ds = self._imagenet_source("eval", None)

        def fn(ex):
            image = _imagenet_eval(ex["image"], cfg) / 255.0 - mean
            return {"image": image, "label": tf.cast(ex["label"], tf.int32), "mask": 1.0}

        ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        spec = ds.element_spec
        pad = tf.data.Dataset.from_tensors(
            {
                "image": tf.zeros(spec["image"].shape, tf.float32),
                "label": tf.constant(0, tf.int32),
                "mask": tf.constant(0.0),
            }
        ).repeat()
        ds = ds.concatenate(pad).take(total).batch(b).prefetch(tf.data.AUTOTUNE)
        yield from ds.as_numpy_iterator()


def _pad_batch(img: np.ndarray, lab: np.ndarray, m: int, b: int) -> dict[str, np.ndarray]:
    mask = np.zeros((b,), np.float32)
    mask[:m] = 1.0
    if m < b:
        img = np.concatenate([img, np.zeros((b - m, *img.shape[1:]), img.dtype)])
        lab = np.concatenate([lab, np.zeros((b - m,), lab.dtype)])
    return {"image": img, "label": lab.astype(np.int32), "mask": mask}
