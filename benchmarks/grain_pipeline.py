"""The ImageNet training stream with grain over tfds' ArrayRecord files (issue 12, design b).

    from benchmarks import grain_pipeline as gp
    gp.prepare(DIR)                                   # tfds' own builder, ArrayRecord files
    ds = gp.train_dataset(DIR, batch_size=256, seed=0)
    batches = gp.train_iterator(ds, workers=8)        # grain DatasetIterator
    state = batches.get_state()                       # JSON-able; set_state(state) resumes

What it is: ``tfds.data_source("imagenet2012", decoders={"image": SkipDecoding()})``
gives random access to the encoded JPEG bytes and labels (no TensorFlow: tfds
parses the ``tf.train.Example`` records with protobuf); ``grain.MapDataset``
shuffles their indices globally, a new order each epoch (grain folds the epoch
into the seed), draws the paper's scale augmentation for each example from an
RNG seeded by (seed, the example's index in the endless stream), decodes it
with Pillow, and batches within each epoch (the rest of each epoch is
dropped, as in ``resnet_jax.data``). ``mp_prefetch`` runs the
decoding in ``workers`` spawned processes, each building whole batches, which
come back through shared memory. Batch ``k`` of the stream is global step
``k``, so the pipeline is a pure function of (data, seed, batch size, step):
grain's iterator state (a small dict of positions) restores it exactly, and so
does ``dataset[k:]``.

The crop window has the distribution of ``resnet_jax.data.transforms.imagenet_train_window``
(``train_crop="scale"``): shorter side ``s`` uniform in ``scale_range``, a
random ``image_size`` square of the image rescaled to ``s`` taken in source
pixels (side ``image_size * shorter / s``), a horizontal flip with
probability 1/2; the draws differ from the TensorFlow pipeline's (numpy's
Philox, not TensorFlow's stateless RNG).

Decoding: Pillow cannot decode a window of a JPEG (TensorFlow's
``decode_and_crop_jpeg`` skips the inverse DCT outside it); it decodes
the whole image, at 1/2, 1/4 or 1/8 scale (``Image.draft``, libjpeg's DCT
scaling) when the window is at least that many times the output, then resizes
the window (bilinear, antialiased, Pillow's ``resize(box=...)``).

Imports neither TensorFlow nor ``resnet_jax.data``; needs grain, tfds,
array_record and Pillow. One host: per-host sharding is not built.
"""

from __future__ import annotations

import io
import math
import sys
from typing import Any

import numpy as np

DATASET = "imagenet2012"


def prepare(data_dir: str) -> None:
    """Prepares imagenet2012 as ArrayRecord files in ``data_dir`` with tfds'
    own builder, from the archives in ``data_dir/downloads/manual`` (no-op
    when prepared). This step does use TensorFlow (tfds' builder writes
    ``tf.train.Example`` records); reading them does not."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(DATASET, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()


def source(data_dir: str, split: str = "train"):
    """tfds' random-access data source of ``split``: examples ``{"image": JPEG
    bytes, "label": int, "file_name": bytes}``, images not decoded."""
    import tensorflow_datasets as tfds

    return tfds.data_source(
        DATASET,
        split=split,
        data_dir=data_dir,
        download=False,
        decoders={"image": tfds.decode.SkipDecoding()},
    )


def train_window(
    height: int, width: int, rng: np.random.Generator, image_size: int, scale_range
) -> tuple[int, int, int, bool]:
    """``(top, left, side, flip)``: the source-pixel square of one training
    crop of an image of ``height`` x ``width`` pixels, and the flip draw."""
    lo, hi = scale_range
    s = int(rng.integers(lo, hi + 1))
    shorter = min(height, width)
    side = min(max(round(image_size * shorter / s), 1), shorter)
    u = rng.random(2)
    top = min(math.floor(u[0] * (height - side + 1)), height - side)
    left = min(math.floor(u[1] * (width - side + 1)), width - side)
    return top, left, side, bool(rng.random() < 0.5)


def decode_window(encoded: bytes, window, size: int) -> np.ndarray:
    """The ``(top, left, side, flip)`` window of JPEG ``encoded`` as (size,
    size, 3) uint8 RGB (greyscale expanded), resized bilinearly with antialiasing."""
    from PIL import Image

    top, left, side, flip = window
    image = Image.open(io.BytesIO(encoded))
    width, height = image.size
    # DCT scaling: decode at 1/k scale when the window stays >= size pixels.
    image.draft("RGB", (math.ceil(width * size / side), math.ceil(height * size / side)))
    sx, sy = image.size[0] / width, image.size[1] / height
    box = (left * sx, top * sy, (left + side) * sx, (top + side) * sy)
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image)


def _jpeg_size(encoded: bytes) -> tuple[int, int]:
    """(height, width) from the JPEG header (nothing decoded)."""
    from PIL import Image

    width, height = Image.open(io.BytesIO(encoded)).size
    return height, width


class ScaleAugment:
    """grain ``RandomMap``: one encoded example -> ``{"image": (S, S, 3)
    uint8, "label": int32}``, the paper's scale augmentation."""

    def __init__(self, image_size: int = 224, scale_range=(256, 480)):
        self.image_size = int(image_size)
        self.scale_range = tuple(int(x) for x in scale_range)

    def random_map(self, example: dict[str, Any], rng: np.random.Generator) -> dict:
        encoded = example["image"]
        h, w = _jpeg_size(encoded)
        window = train_window(h, w, rng, self.image_size, self.scale_range)
        image = decode_window(encoded, window, self.image_size)
        return {"image": image, "label": np.int32(example["label"])}


def shuffled_examples(data_dir: str, seed: int):
    """The encoded training examples as an endless ``grain.MapDataset``:
    element ``e * n + i`` is the ``i``-th example of epoch ``e`` (``n``
    examples), each epoch a permutation of all of them (grain folds the epoch
    into the seed)."""
    import grain

    return grain.MapDataset.source(source(data_dir, "train")).seed(seed).shuffle()


def train_dataset(
    data_dir: str,
    batch_size: int,
    seed: int,
    image_size: int = 224,
    scale_range=(256, 480),
):
    """The endless training stream as a ``grain.MapDataset`` of batches:
    element ``k = e * steps_per_epoch + i`` is global step ``k``'s
    ``{"image": (b, S, S, 3) uint8, "label": (b,) int32}``, made of examples
    ``i * b .. i * b + b - 1`` of epoch ``e`` of :func:`shuffled_examples`;
    the last ``n % b`` examples of each epoch are dropped."""
    augment = ScaleAugment(image_size, scale_range)
    return (
        shuffled_examples(data_dir, seed)
        .random_map(augment.random_map)  # RNG of (seed, the element's index)
        .batch(batch_size, drop_remainder=True)  # within each epoch
        .repeat()
    )


def steps_per_epoch(data_dir: str, batch_size: int) -> int:
    """Whole batches per epoch."""
    return len(source(data_dir, "train")) // batch_size


def train_iterator(dataset, workers: int, state: dict | None = None, worker_init_fn=None):
    """A checkpointable iterator over ``dataset`` decoding in ``workers``
    processes (0: in this one); restored to ``state`` (from ``get_state()``)
    when given."""
    import grain
    from absl import flags

    # grain reads its absl flags when it starts workers (with JAX installed);
    # a program that does not run absl.app has not parsed them: use the defaults.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    ds = dataset.to_iter_dataset()
    if workers:
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=worker_init_fn
        )
    it = iter(ds)
    if state is not None:
        it.set_state(state)
    return it


# --------------------------------------------------------------------------- #
# Running without TensorFlow
# --------------------------------------------------------------------------- #


class _HideTensorFlow:
    """Wraps a ``sys.meta_path`` finder so that ``tensorflow`` is not found."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, name):
        return getattr(self.finder, name)


def hide_tensorflow(*_: Any) -> None:
    """From now on this process imports as if TensorFlow were not installed
    (``import tensorflow`` raises ModuleNotFoundError, ``find_spec`` gives
    None). Raises RuntimeError when it is already imported. Usable as a
    grain ``worker_init_fn``."""
    if "tensorflow" in sys.modules:
        raise RuntimeError("TensorFlow is already imported in this process.")
    if not any(isinstance(f, _HideTensorFlow) for f in sys.meta_path):
        sys.meta_path[:] = [_HideTensorFlow(f) for f in sys.meta_path]
