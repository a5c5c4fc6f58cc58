"""The datasets: what each is, where it comes from, how it is read whole.

scikit-learn's digits (offline), CIFAR-10/100 read whole from tfds, and
ImageNet's preparation (:func:`imagenet_preflight`, once for all processes
with :func:`prepare_for_processes`); :class:`DatasetInfo` of each; the
TensorFlow set-up (:func:`configure_tensorflow`) that runs before TensorFlow's
first use. Importing this module imports neither TensorFlow nor tfds.

Damaged files are one line (:class:`DataCorruptError`) naming the file and
what to do: a damaged image or tar inside ImageNet's archives stops the
preparation (:func:`imagenet_preflight` checks every image as tfds writes it:
tfds itself stores whatever bytes the archive holds), and a prepared tfds file
that TensorFlow cannot read (cut short, damaged, missing) is named by
:func:`damaged_data_error`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np
from jax.experimental import multihost_utils

from resnet_jax.data.integrity import (
    TRAIN_TAR,
    VAL_TAR,
    damaged_data_error,
    prepare_imagenet,
)
from resnet_jax.data.tf_setup import tfds_module
from resnet_jax.errors import DataNotFoundError, UserError

log = logging.getLogger(__name__)

# ImageNet RGB mean on the 0..1 scale (the per-pixel mean of the paper averages
# to this under random-size crops; computing it needs a pass over 1.28M images).
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)

IN_MEMORY = ("digits", "cifar10", "cifar100")
DATASETS = (*IN_MEMORY, "imagenet2012")
_NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenet2012": 1000}


# An in-memory source builds one tf.data pipeline per whole epochs covering


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
    # scikit-learn only here: its import costs every other run 1.4 s of start-up.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
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


def read_tfds_split(name: str, split: str, data_dir: str | None) -> Split:
    """One tfds split read whole into memory.

    Raises:
      DataCorruptError: a prepared file is cut short, damaged or missing.
      DataNotFoundError: tfds could not download or write the dataset (no
        network, an unwritable ``data_dir``).
    """
    tfds = tfds_module()
    # Batches of 10k rather than batch_size=-1, which aborts under tfds' mock_data.
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    try:
        ds = tfds.load(name, split=split, data_dir=data_dir, as_supervised=True)
    except OSError as e:  # requests' ConnectionError is one: a download that failed
        where = data_dir or os.path.expanduser("~/tensorflow_datasets")
        raise DataNotFoundError(
            f"tfds could not prepare {name} in {where} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else 'no message'}); on a machine "
            "without internet, prepare it on one that has it and copy the directory here "
            "(--config.data_dir=DIR), or run offline with --config.mock_data=True."
        ) from e
    ds = ds.batch(10_000)
    try:
        parts = list(tfds.as_numpy(ds))
    except tf.errors.OpError as e:
        damaged = damaged_data_error(name, data_dir, e)
        if damaged is None:
            raise
        raise damaged from e
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
    train = read_tfds_split(config.dataset, train_split, config.data_dir)
    try:
        test = read_tfds_split(config.dataset, eval_split(config), config.data_dir)
    except (KeyError, ValueError) as e:
        raise _bad_eval_split(config, e) from e
    return train, test, pixel_mean(train)


def imagenet_preflight(data_dir: str | None, prepare: bool = True) -> bool:
    """Checks that ImageNet is prepared for tfds, or says where the archives go.

    With ``prepare``, prepares it when the archives are in place (hours,
    about 150 GB), checking every image (:func:`prepare_imagenet`). Returns
    whether it is prepared now.

    Raises:
      DataNotFoundError: naming the directory where ``ILSVRC2012_img_train.tar``
        and ``ILSVRC2012_img_val.tar`` must be placed.
      DataCorruptError: an archive is damaged (named, with the image or the
        class tar inside it); nothing is left that looks prepared.
    """
    builder = tfds_module().builder("imagenet2012", data_dir=data_dir)
    try:
        prepared = bool(builder.info.splits) and builder.info.splits["train"].num_examples > 0
    except Exception:  # noqa: BLE001 - any failure to read metadata means "not prepared"
        prepared = False
    if prepared:
        return True
    manual_dir = os.path.join(builder.data_dir_root, "downloads", "manual")
    needed = [TRAIN_TAR, VAL_TAR]
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
    prepare_imagenet(builder, manual_dir)
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
        info = tfds_module().builder("imagenet2012", data_dir=config.data_dir).info
        n_train = info.splits["train"].num_examples
        try:
            n_eval = info.splits[eval_split(config)].num_examples  # a sliced split too
        except (KeyError, ValueError) as e:
            raise _bad_eval_split(config, e) from e
    s = int(config.image_size)
    return DatasetInfo(config.dataset, num_classes, (s, s, 3), n_train, n_eval)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's order and augmentation, a uint32 derived from the run's seed."""
    return int(np.random.SeedSequence([int(seed), 7, epoch]).generate_state(1)[0])
