"""A miniature ImageNet in the real ILSVRC2012 archive layout, for offline tests and trials.

    python -m resnet_jax.mini_imagenet DIR [--classes 10] [--train-per-class 12]
        [--val N] [--seed 0] [--prepare]

writes, into ``DIR/downloads/manual/`` (where tfds' ``imagenet2012`` builder
looks for the archives one downloads from image-net.org):

* ``ILSVRC2012_img_train.tar``: one tar per synset (``n01440764.tar``, ...) of
  JPEGs named like ``n01440764_10026.JPEG``;
* ``ILSVRC2012_img_val.tar``: JPEGs ``ILSVRC2012_val_00000001.JPEG`` ...

``python train.py --config configs/imagenet.py --config.data_dir=DIR`` then
prepares it with tfds' own builder (``--prepare`` does that here) and trains on
it, exactly as on the real archives.

The images are real photographs: the two that scikit-learn ships
(``china.jpg``, ``flower.jpg``, 427x640), cropped, scaled to ImageNet-like
sizes (shorter side 256..400 pixels, longer side up to 16:9 of it, three in
four landscape) and recoloured, with JPEG qualities 70..95; about one in 16
is a single-channel (greyscale) JPEG, as some of ImageNet's are. A class fixes
the photograph, the region around which its crops are centred and a colour
transform, so classes are distinguishable; everything derives from ``seed``,
and the archives are byte-identical for the same arguments (and Pillow).

Classes and validation labels. tfds assigns the validation labels by position:
it zips the sorted file names of the validation tar with its shipped list of
the 50,000 labels (``validation_labels.txt``). The validation images of a
miniature must therefore be the first N, ``ILSVRC2012_val_00000001`` ..., and
their labels are the first N of that list. The classes are the first
``num_classes`` distinct synsets of that list, so that every validation label
is a class with training images: ``num_classes`` classes admit at most
:func:`max_validation_images` validation images (10 for 10 classes, 46 classes
for 50 images). Labels (0..999) are indices in tfds' ``labels.txt``, the
sorted synsets: :func:`synsets`.

Needs numpy, scikit-learn and Pillow (which scikit-learn needs to read its
sample images); imports neither TensorFlow nor tfds unless asked to prepare.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import io
import os
import tarfile

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

from resnet_jax import data, launch

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
SHORTER_SIDE = (256, 400)  # pixels, like most ImageNet photographs
MAX_ASPECT = 16 / 9
JPEG_QUALITY = (70, 95)
GRAYSCALE_FRACTION = 1 / 16
_MTIME = 1_330_000_000  # a fixed time in 2012: archives are byte-identical run to run


@dataclasses.dataclass(frozen=True)
class MiniImageNet:
    """What :func:`write` wrote.

    ``manual_dir``: the directory holding the two archives; ``classes``: the
    synsets, in the order chosen; ``train``: ``(file name, synset)`` of every
    training JPEG; ``validation``: the same for every validation JPEG, the
    synset being the one tfds assigns.
    """

    manual_dir: str
    classes: tuple[str, ...]
    train: tuple[tuple[str, str], ...]
    validation: tuple[tuple[str, str], ...]


# --------------------------------------------------------------------------- #
# tfds' label lists, read from the installed package without importing it
# --------------------------------------------------------------------------- #


def _tfds_imagenet_file(name: str) -> str:
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "tensorflow_datasets is not installed: pip install -r requirements.txt"
        )
    root = list(spec.submodule_search_locations)[0]
    return os.path.join(root, "datasets", "imagenet2012", name)


@functools.cache
def synsets() -> tuple[str, ...]:
    """The 1,000 ILSVRC2012 synsets in tfds' label order: label ``i`` is ``synsets()[i]``."""
    with open(_tfds_imagenet_file("labels.txt")) as f:
        return tuple(f.read().split())


@functools.cache
def validation_synsets() -> tuple[str, ...]:
    """The synsets of the 50,000 validation images in file-name order (tfds' shipped list):
    ``ILSVRC2012_val_%08d.JPEG % (i + 1)`` shows ``validation_synsets()[i]``."""
    with open(_tfds_imagenet_file("validation_labels.txt")) as f:
        return tuple(f.read().split())


def choose_classes(num_classes: int) -> tuple[str, ...]:
    """The first ``num_classes`` distinct synsets of the validation labels, in that order."""
    if not 1 <= num_classes <= 1000:
        raise ValueError(f"num_classes={num_classes} must be in 1..1000.")
    chosen: dict[str, None] = {}
    for s in validation_synsets():
        chosen.setdefault(s)
        if len(chosen) == num_classes:
            break
    return tuple(chosen)


def max_validation_images(num_classes: int) -> int:
    """The most validation images (the first N) whose labels are all among
    :func:`choose_classes` ``(num_classes)``."""
    classes = set(choose_classes(num_classes))
    labels = validation_synsets()
    for n, s in enumerate(labels):
        if s not in classes:
            return n
    return len(labels)


# --------------------------------------------------------------------------- #
# Images
# --------------------------------------------------------------------------- #


@functools.cache
def _photographs() -> tuple[np.ndarray, ...]:
    """scikit-learn's sample photographs, (427, 640, 3) uint8 each (china, flower)."""

    return tuple(load_sample_images().images)


@dataclasses.dataclass(frozen=True)
class _ClassLook:
    photo: int  # which photograph
    center: tuple[float, float]  # (y, x) of its crops, as fractions of the photograph
    colour: np.ndarray  # (3, 3) matrix applied to RGB


def _class_look(index: int, seed: int) -> _ClassLook:
    """The look of the ``index``-th class: photograph, region and colour transform."""
    rng = np.random.default_rng([seed, 1, index])
    perm = [(0, 1, 2), (1, 2, 0), (2, 0, 1), (0, 2, 1), (2, 1, 0), (1, 0, 2)][(index // 2) % 6]
    colour = np.eye(3)[list(perm)] * rng.uniform(0.75, 1.25, size=(3, 1))
    center = (float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7)))
    return _ClassLook(photo=index % 2, center=center, colour=colour)


def _jpeg(look: _ClassLook, rng: np.random.Generator) -> bytes:
    """One JPEG of a class: a crop around its region, scaled to an ImageNet-like
    size, recoloured."""

    photo = _photographs()[look.photo]
    ph, pw = photo.shape[:2]
    # Output size: shorter side and aspect ratio (either orientation).
    short = int(rng.integers(SHORTER_SIDE[0], SHORTER_SIDE[1] + 1))
    aspect = float(np.exp(rng.uniform(0.0, np.log(MAX_ASPECT))))
    long = int(round(short * aspect))
    h, w = (short, long) if rng.random() < 0.75 else (long, short)
    # Source window of the same aspect, 35%..90% of the largest that fits.
    fit = min(ph / h, pw / w)
    scale = fit * rng.uniform(0.35, 0.9)
    ch, cw = h * scale, w * scale
    cy = np.clip(look.center[0] * ph + rng.normal(0, 0.05 * ph), ch / 2, ph - ch / 2)
    cx = np.clip(look.center[1] * pw + rng.normal(0, 0.05 * pw), cw / 2, pw - cw / 2)
    box = (cx - cw / 2, cy - ch / 2, cx + cw / 2, cy + ch / 2)
    pixels = Image.fromarray(photo).resize((w, h), Image.Resampling.BILINEAR, box=box)
    # Colour: the class's transform, then this image's brightness.
    x = np.asarray(pixels, np.float32) @ look.colour.T.astype(np.float32)
    x = x * rng.uniform(0.8, 1.2)
    if rng.random() < 0.5:
        x = x[:, ::-1]
    out = Image.fromarray(np.clip(np.round(x), 0, 255).astype(np.uint8))
    if rng.random() < GRAYSCALE_FRACTION:  # ImageNet has single-channel JPEGs too
        out = out.convert("L")
    buf = io.BytesIO()
    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    out.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Adds a member with fixed metadata (the archives are reproducible)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
    tar.addfile(info, io.BytesIO(data))


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar of ``(name, data)`` members, in memory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            _add(tar, name, data)
    return buf.getvalue()


class _AtomicTar:
    """A tar written to ``path`` + a temporary suffix, renamed into place when complete."""

    def __init__(self, path: str):
        self.path, self.tmp = path, f"{path}.tmp{os.getpid()}"

    def __enter__(self) -> tarfile.TarFile:
        self.tar = tarfile.open(self.tmp, mode="w", format=tarfile.USTAR_FORMAT)
        return self.tar

    def __exit__(self, kind, value, tb) -> None:
        self.tar.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            os.remove(self.tmp)


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #


def write(
    data_dir: str,
    num_classes: int = 10,
    train_per_class: int = 12,
    num_val: int | None = None,
    seed: int = 0,
) -> MiniImageNet:
    """Writes the two ILSVRC2012 archives into ``data_dir/downloads/manual``.

    Args:
      data_dir: a tfds data directory (``--config.data_dir``).
      num_classes: how many synsets (:func:`choose_classes`).
      train_per_class: training JPEGs per synset.
      num_val: validation JPEGs, the first ``num_val`` of ILSVRC2012; at most
        (and by default) :func:`max_validation_images` ``(num_classes)``.
      seed: everything derives from it.

    Raises:
      ValueError: ``num_val`` above what ``num_classes`` admits (the message
        says how many classes it needs), or sizes below 1.
    """
    classes = choose_classes(num_classes)
    limit = max_validation_images(num_classes)
    num_val = limit if num_val is None else num_val
    if train_per_class < 1 or num_val < 1:
        raise ValueError(f"train_per_class={train_per_class} and num_val={num_val} must be >= 1.")
    if num_val > limit:
        needed = len(set(validation_synsets()[:num_val]))
        raise ValueError(
            f"num_val={num_val} needs num_classes >= {needed}: tfds labels the validation "
            f"images by position, so they are the first N of ILSVRC2012, and only the first "
            f"{limit} have labels among the first {num_classes} classes."
        )
    looks = {s: _class_look(i, seed) for i, s in enumerate(classes)}
    manual_dir = os.path.join(data_dir, "downloads", "manual")
    os.makedirs(manual_dir, exist_ok=True)

    train = []
    with _AtomicTar(os.path.join(manual_dir, TRAIN_TAR)) as tar:
        for s in sorted(classes):  # the real archive lists the synsets in order
            rng = np.random.default_rng([seed, 2, synsets().index(s)])
            ids = np.sort(rng.choice(60_000, size=train_per_class, replace=False)) + 1
            members = [(f"{s}_{i}.JPEG", _jpeg(looks[s], rng)) for i in ids]
            _add(tar, f"{s}.tar", _tar_bytes(members))
            train += [(name, s) for name, _ in members]

    validation = []
    with _AtomicTar(os.path.join(manual_dir, VAL_TAR)) as tar:
        for i in range(num_val):
            s = validation_synsets()[i]
            name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
            _add(tar, name, _jpeg(looks[s], np.random.default_rng([seed, 3, i])))
            validation.append((name, s))
    return MiniImageNet(manual_dir, classes, tuple(train), tuple(validation))


def prepare(data_dir: str) -> None:
    """Prepares the archives in ``data_dir/downloads/manual`` with tfds' own
    ``imagenet2012`` builder (what ``train.py`` does on its first run)."""

    data.imagenet_preflight(data_dir)


def main(argv: list[str] | None = None) -> None:
    p = launch.ArgumentParser(
        prog="python -m resnet_jax.mini_imagenet",
        description="Write a miniature ImageNet (ILSVRC2012 archive layout) into "
        "DIR/downloads/manual for tfds' imagenet2012 builder.",
    )
    p.add_argument("data_dir", metavar="DIR", help="tfds data directory (--config.data_dir)")
    p.add_argument("--classes", type=int, default=10, help="number of synsets (default 10)")
    p.add_argument("--train-per-class", type=int, default=12, help="training JPEGs per synset")
    p.add_argument(
        "--val",
        type=int,
        default=None,
        help="validation JPEGs (default: as many as the classes admit, 10 for 10 classes)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prepare", action="store_true", help="then prepare it with tfds")
    args = p.parse_args(argv)
    try:
        mini = write(args.data_dir, args.classes, args.train_per_class, args.val, args.seed)
    except OSError as e:  # a DIR that is a file, or not writable
        where = e.filename or args.data_dir
        launch.fail(p.prog, f"cannot write the miniature ImageNet under {where} ({e.strerror}).")
    except ValueError as e:
        p.error(str(e))
    print(
        f"Wrote {len(mini.train)} training images of {len(mini.classes)} synsets and "
        f"{len(mini.validation)} validation images to {mini.manual_dir}."
    )
    if args.prepare:
        prepare(args.data_dir)
        print(f"Prepared for tfds in {args.data_dir}.")
    else:
        print(
            "Train on it with: python train.py --config configs/imagenet.py "
            f"--config.data_dir={args.data_dir} --workdir=WORKDIR (the first run prepares it)."
        )


if __name__ == "__main__":
    main()
