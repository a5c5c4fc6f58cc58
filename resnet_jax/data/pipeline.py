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

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from resnet_jax.data import autoaugment, transforms
from resnet_jax.data.datasets import (
    IMAGENET_MEAN_RGB,
    IN_MEMORY,
    DatasetInfo,
    Split,
    check_dataset,
    damaged_data_error,
    dataset_info,
    epoch_seed,
    eval_split,
    imagenet_preflight,
    load_in_memory,
)
from resnet_jax.data.tf_setup import (
    configure_tensorflow,
    mock_data_scope,
    tfds_module,
    without_autograph,
)
from resnet_jax.errors import UserError

# about this many steps: one per epoch costs time and host memory.
STEPS_PER_PIPELINE = 10_000
# ... and at most this many bytes of example order (indices and seeds) at once.
ORDER_BYTES = 64 * 2**20
# ImageNet builds one pipeline per at most this many epochs (each epoch is a
# tfds.load of its own, with the epoch's file and example shuffle seeds).
MAX_IMAGENET_EPOCHS_PER_PIPELINE = 4


IMAGE_DTYPES = ("float32", "uint8")
# fold_in(example seed, AUTO_AUGMENT_STREAM) drives RandAugment / TrivialAugment.
AUTO_AUGMENT_STREAM = 0x6161


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
        with mock_data_scope(config):
            # Per-pixel mean over the whole training split (Sec. 4.2), on the 0..1
            # scale, taken before any class or label subset: subsets share it.
            self.train, self.test, self.mean = load_in_memory(config)
        self.info = dataset_info(config, self.train, self.test)
        self.max_label = int(max(self.train.labels.max(initial=0), self.test.labels.max(initial=0)))
        self._tf_train = None

    @property
    def epochs_per_pipeline(self) -> int:
        # A pipeline's order is built up front: this host's example indices and
        # their seeds, 24 bytes an example an epoch. At a large batch (few steps
        # an epoch) 10,000 steps are hundreds of epochs: keep it under ORDER_BYTES.
        per_epoch = 24 * self.steps_per_epoch * self.host_batch
        by_memory = max(1, ORDER_BYTES // max(per_epoch, 1))
        return max(1, min(math.ceil(STEPS_PER_PIPELINE / self.steps_per_epoch), by_memory))

    def _order(self, epoch: int, count: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
        """This host's examples of epochs ``epoch .. epoch + count - 1`` from
        ``offset`` steps into the first: indices into the training split,
        (T,) int, and their augmentation seeds, (T, 2) int64."""
        B, b, p = self.config.batch_size, self.host_batch, self.process_index
        spe, n = self.steps_per_epoch, self.info.train_size
        epoch_seeds = [epoch_seed(self.config.seed, e) for e in range(epoch, epoch + count)]
        idx = []
        for seed in epoch_seeds:
            perm = repeat_examples(np.random.default_rng(seed).permutation(n), self.config)
            perm = perm[: spe * B]
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
        import tensorflow as tf  # lazy: only after configure_tensorflow()

        cfg = self.config
        pad, flip = int(cfg.crop_padding), bool(cfg.random_flip)
        augment, mean = bool(cfg.augment), self.mean
        if self._tf_train is None:  # made once, not per pipeline
            self._tf_train = (tf.constant(self.train.images), tf.constant(self.train.labels))
        images, labels = self._tf_train

        def example(i, seed):
            image = tf.gather(images, i)
            if augment:
                image = transforms.pad_crop_flip(image, seed, pad, flip)
                image = auto_augment(image, seed, cfg)
            return {"image": transforms.normalize(image, mean), "label": tf.gather(labels, i)}

        ds = tf.data.Dataset.from_tensor_slices(self._order(epoch, count, offset))
        return ds.map(
            without_autograph(example),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=cfg.deterministic_input,
        )

    def eval_examples(self):
        """This host's contiguous share of the eval split, normalised."""
        import tensorflow as tf  # lazy: only after configure_tensorflow()

        n, P, p = self.info.eval_size, self.process_count, self.process_index
        lo, hi = (n * p) // P, (n * (p + 1)) // P
        mean = self.mean

        def example(image, label):
            return {"image": transforms.normalize(image, mean), "label": label}

        ds = tf.data.Dataset.from_tensor_slices((self.test.images[lo:hi], self.test.labels[lo:hi]))
        return ds.map(
            without_autograph(example), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )


def repeated_augmentation(config) -> int:
    """``config.repeated_augmentation``: how many times in a row each training
    example is drawn (1: once an epoch)."""
    return int(config.get("repeated_augmentation", 1))


def repeat_examples(order: np.ndarray, config) -> np.ndarray:
    """An epoch's example order with each example ``repeated_augmentation``
    times in a row, as torchvision's ``RASampler`` (from DeiT) orders its
    indices: ``[a, a, a, b, b, b, ...]``. The epoch keeps its length, so it
    sees the first 1/r of the shuffled examples, each r times, augmented
    apart (each copy has its own position, so its own seed). torchvision then
    deals the copies to r different GPUs of the same step; here they are
    consecutive examples of the same global batch."""
    r = repeated_augmentation(config)
    return order if r == 1 else np.repeat(order, r)[: len(order)]


def auto_augment(image, seed, config):
    """``config.auto_augment`` (RandAugment or TrivialAugment-wide,
    :mod:`resnet_jax.data.autoaugment`) after the crop and flip, from its own
    stream of the example's seed (the crop's draws stay those of a run
    without it); the image unchanged when it is ``''``."""
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    if not config.get("auto_augment"):
        return image
    return autoaugment.augment(
        image,
        tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), AUTO_AUGMENT_STREAM),
        config.auto_augment,
        num_ops=int(config.randaugment_num_ops),
        magnitude=int(config.randaugment_magnitude),
    )


class ImageNetSource(_Source):
    """ImageNet (imagenet2012) read from tfds' TFRecords.

    tfds' image decoding is skipped: the shuffle buffer holds encoded JPEG
    bytes (about 110 kB an image, not a decoded photograph), a resume skips
    examples without decoding them, and each example's map decodes only the
    window it keeps (``tf.image.decode_and_crop_jpeg``). One pipeline covers
    up to ``MAX_IMAGENET_EPOCHS_PER_PIPELINE`` epochs (about
    ``STEPS_PER_PIPELINE`` steps), each epoch shuffled by its own seed.

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
        transforms.train_crop(config)  # a bad value fails here, not inside tf.data
        self.info = dataset_info(config)
        self.mean = np.asarray(IMAGENET_MEAN_RGB, np.float32)
        self.max_label = self.info.num_classes - 1
        self.image_dtype = image_dtype

    @property
    def epochs_per_pipeline(self) -> int:
        chunk = math.ceil(STEPS_PER_PIPELINE / self.steps_per_epoch)
        return max(1, min(MAX_IMAGENET_EPOCHS_PER_PIPELINE, chunk))

    def train_epochs(self, epoch: int, count: int, offset: int):
        """This host's training examples of epochs ``epoch .. epoch + count - 1``,
        from ``offset`` steps into the first, augmented."""
        ds = self._train_epoch(epoch, offset)
        for e in range(epoch + 1, epoch + count):
            ds = ds.concatenate(self._train_epoch(e, 0))
        return ds

    def _train_epoch(self, epoch: int, offset: int):
        import tensorflow as tf  # lazy: only after configure_tensorflow()

        cfg, b = self.config, self.host_batch
        seed = epoch_seed(cfg.seed, epoch)
        ds = self._load("train", seed)
        repeats = repeated_augmentation(cfg)
        if repeats > 1:  # each example `repeats` times in a row, augmented apart
            ds = ds.flat_map(
                without_autograph(lambda ex: tf.data.Dataset.from_tensors(ex).repeat(repeats))
            )
        # Skipping before the map: a resume decodes none of the skipped examples.
        ds = ds.enumerate().skip(offset * b)

        def example(pos, ex):
            example_seed = tf.stack([seed % (2**31), pos])
            image = transforms.imagenet_train(ex["image"], example_seed, cfg)
            image = auto_augment(image, example_seed, cfg)
            return {"image": self._output(image), "label": tf.cast(ex["label"], tf.int32)}

        ds = ds.take((self.steps_per_epoch - offset) * b)
        return ds.map(
            without_autograph(example),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=cfg.deterministic_input,
        )

    def eval_examples(self):
        """This host's share of the validation split (center or 10 crops)."""
        import tensorflow as tf  # lazy: only after configure_tensorflow()

        cfg = self.config

        def example(ex):
            image = self._output(transforms.imagenet_eval(ex["image"], cfg))
            return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

        ds = self._load("eval", None)
        return ds.map(
            without_autograph(example), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )

    def _output(self, image):
        """float32 0..255 pixels -> normalised float32, or rounded uint8."""
        import tensorflow as tf  # lazy: only after configure_tensorflow()

        if self.image_dtype == "uint8":
            return tf.cast(tf.clip_by_value(tf.math.round(image), 0.0, 255.0), tf.uint8)
        return transforms.normalize(image, self.mean)

    def _load(self, split: str, seed: int | None):
        """This host's shards of ``split`` ('train' or 'eval') as encoded JPEG
        bytes, shuffled when ``seed`` is set."""
        import tensorflow as tf  # lazy: only after configure_tensorflow()

        tfds, cfg = tfds_module(), self.config
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
        with mock_data_scope(cfg):
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
      DataCorruptError: a prepared file is cut short, damaged or missing (also
        raised by the batch iterators, by the batch that reads it).
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
        import tensorflow as tf  # lazy: only after configure_tensorflow()

        epoch, offset = divmod(start_step, self.steps_per_epoch)
        count = self.source.epochs_per_pipeline
        while True:
            ds = self.source.train_epochs(epoch, count, offset)
            ds = ds.batch(self.host_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
            yield from self._read(ds)
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
        yield from self._read(self._eval_dataset)

    def _read(self, ds) -> Iterator[dict[str, np.ndarray]]:
        """``ds``'s batches as numpy; TensorFlow's error for a damaged prepared
        file (tf.data names none) is a :class:`DataCorruptError` naming it."""
        import tensorflow as tf  # lazy: only after configure_tensorflow()

        try:
            yield from ds.as_numpy_iterator()
        except (
            tf.errors.DataLossError,
            tf.errors.NotFoundError,
            tf.errors.InvalidArgumentError,
        ) as e:
            damaged = damaged_data_error(self.config.dataset, self.config.data_dir, e)
            if damaged is None:
                raise
            raise damaged from e


def _padded_batches(examples, num_batches: int, batch: int):
    """``examples`` with ``mask`` 1, then mask-0 zero examples, as exactly
    ``num_batches`` batches of ``batch``."""
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    ds = examples.map(without_autograph(lambda ex: {**ex, "mask": tf.constant(1.0)}))
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
    """The model's ``config.num_classes`` logits (0: the dataset's) must cover the
    dataset's classes and index every label 0..max_label: a narrower classifier
    would train on labels it cannot represent (silently all-zero targets)."""
    k = int(config.num_classes)
    if 0 < k <= max_label:
        raise UserError(
            f"num_classes={k} but {info.name} has labels 0..{max_label}; set "
            f"--config.num_classes=0 (the dataset's {info.num_classes}) or >= {max_label + 1}."
        )
    if 0 < k < info.num_classes:
        n = info.num_classes
        raise UserError(
            f"num_classes={k} but {info.name} has {n} classes (labels 0..{n - 1}); set "
            f"--config.num_classes=0 (the dataset's) or >= {n}."
        )
