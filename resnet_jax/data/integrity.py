"""Damaged data files, found and named: ImageNet's archives (every image is
checked while tfds prepares it: :func:`prepare_imagenet`; each archive's
own tar structure is scanned before, the class tars after a failure) and prepared tfds files (a TFRecord cut short, one
failing its checksum, a missing shard: :func:`damaged_data_error`), each as one
:class:`~resnet_jax.errors.DataCorruptError` line that names the file and how
to replace it or prepare again.
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
import tarfile
from typing import Any

from PIL import Image

from resnet_jax.data.tf_setup import tfds_module
from resnet_jax.errors import DataCorruptError

log = logging.getLogger(__name__)

# ILSVRC2012's archives, where tfds' imagenet2012 builder finds them
# (DATA_DIR/downloads/manual), and the sizes of image-net.org's (tfds' checksums.tsv).
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
TEST_TAR = "ILSVRC2012_img_test.tar"  # optional: tfds prepares a test split from it
_ARCHIVE_BYTES = {TRAIN_TAR: 147_897_477_120, VAL_TAR: 6_744_924_160}

# --------------------------------------------------------------------------- #
# Damaged files: ImageNet's archives, prepared tfds files
# --------------------------------------------------------------------------- #

_JPEG_END = b"\xff\xd9"  # the end-of-image marker, which a JPEG cut short lacks
_TAR_BLOCK = 512
# A TFRecord: its data's length (8 bytes) and the length's CRC (4), the data, its CRC (4).
_RECORD_HEADER, _RECORD_OVERHEAD = 12, 16


class _DamagedImage(Exception):
    """Raised inside tfds' preparation to stop it at a damaged image."""


def prepare_imagenet(builder: Any, manual_dir: str) -> None:
    """``builder.download_and_prepare()``, every image checked as tfds writes it.

    tfds' builder stores each image's bytes as the archive holds them, so an
    empty or cut-short JPEG would be prepared without a word and stop training
    (or evaluation) inside tf.data, hours later. :func:`_jpeg_problem` stops
    the preparation at the first damaged image; any other failure is looked
    for in the archives' tar structure (:func:`_archive_problem`, which reads
    their headers: minutes for the whole of ImageNet, only after a failure).
    tfds deletes its partial output when the preparation fails, so the next
    run prepares again.

    Raises:
      DataCorruptError: naming the archive and, inside it, the class tar and
        the image.
    """
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    features = builder.info.features
    encode = features.encode_example
    damaged: list[tuple[str, str]] = []  # (archive, what is damaged)

    def checked(example: dict[str, Any]) -> Any:
        image = example["image"]
        data = image if isinstance(image, bytes) else image.read()
        problem = _jpeg_problem(data)
        if problem is not None:
            damaged.append(_archive_member(example, problem))
            raise _DamagedImage(damaged[-1][1])
        return encode({**example, "image": data})

    # Each archive's own members first (a few thousand tar headers, seconds): a
    # tar cut at a member boundary reads as a shorter whole one, and tfds
    # would prepare fewer examples without a word.
    found = _archive_problem(manual_dir, class_tars=False)
    if found is not None:
        raise _damaged_error(*found, manual_dir) from None
    features.encode_example = checked  # this builder's only (tfds checks no image)
    try:
        builder.download_and_prepare()
    except Exception as e:  # noqa: BLE001 - which file is damaged, else raised as it is
        if not damaged:
            log.info(
                "Preparing imagenet2012 failed; looking for a damaged archive in %s.", manual_dir
            )
            found = _archive_problem(manual_dir, class_tars=True)
            if found is not None:
                damaged.append(found)
            elif isinstance(e, tf.errors.InvalidArgumentError):
                # tfds decodes an image itself only to convert its list of
                # CMYK and PNG files of the train archive.
                what = f"{TRAIN_TAR}: an image tfds converts (CMYK or PNG) does not decode"
                damaged.append((TRAIN_TAR, f"{what} (TensorFlow: {_tf_message(e)})"))
        if not damaged:
            raise
        raise _damaged_error(*damaged[0], manual_dir) from e
    finally:
        del features.encode_example


def _damaged_error(archive: str, what: str, manual_dir: str) -> DataCorruptError:
    size = _ARCHIVE_BYTES.get(archive)
    real = f" (image-net.org's is {size:,} bytes)" if size else ""
    return DataCorruptError(
        f"{what}: {archive} in {manual_dir} is damaged, so imagenet2012 was not "
        f"prepared. Download {archive} again from https://image-net.org/{real}, "
        "replace it and run the same command again."
    )


def _archive_member(example: dict[str, Any], problem: str) -> tuple[str, str]:
    """(archive, ``ARCHIVE: [CLASS.tar: ]IMAGE problem``) of an example tfds generated."""
    name, label = str(example["file_name"]), str(example["label"])
    if name.startswith("ILSVRC2012_val_"):
        return VAL_TAR, f"{VAL_TAR}: {name} {problem}"
    if name.startswith("ILSVRC2012_test_"):
        return TEST_TAR, f"{TEST_TAR}: {name} {problem}"
    # The train archive's class tars are named after their synset, the label.
    return TRAIN_TAR, f"{TRAIN_TAR}: {label}.tar: {name} {problem}"


def _jpeg_problem(data: bytes) -> str | None:
    """Why the input pipeline could not decode ``data`` as a JPEG; None if it can.

    Every image's header is parsed (tens of microseconds); an image that does
    not end with the end-of-image marker (zero padding aside), as one cut
    short does not, is decoded (at 1/8 scale, which still reads every byte).
    TensorFlow's decoders need a JPEG: a PNG or GIF is refused too (tfds
    converts ImageNet's one PNG and its CMYK JPEGs itself, before this check).
    """
    if not data:
        return "is empty (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG":
                return f"is a {image.format} file, not a JPEG"
            if data.rstrip(b"\0").endswith(_JPEG_END):
                return None
            image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Image.UnidentifiedImageError:
        return f"is not an image ({len(data):,} bytes starting {data[:4].hex(' ')})"
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ... for a damaged file
        return f"is not a whole JPEG ({len(data):,} bytes: {e})"
    return None


def _archive_problem(manual_dir: str, class_tars: bool) -> tuple[str, str] | None:
    """(archive, what) of the first damaged tar among ImageNet's archives, or None.

    Each archive's own members first (a few thousand headers), then with
    ``class_tars`` the class tars inside the train archive (a header per image);
    only headers are read.
    """
    archives = [
        a for a in (TRAIN_TAR, VAL_TAR, TEST_TAR) if os.path.exists(os.path.join(manual_dir, a))
    ]
    for nested in (False, True) if class_tars else (False,):
        for archive in archives:
            if nested and archive != TRAIN_TAR:
                continue
            path = os.path.join(manual_dir, archive)
            with open(path, "rb") as f:
                problem = _tar_problem(f, os.path.getsize(path), nested)
            if problem is not None:
                where, what = problem
                return archive, f"{': '.join([archive, *where])} {what}"
    return None


def _tar_problem(f: Any, size: int, nested: bool) -> tuple[list[str], str] | None:
    """(the members down to the damaged one, what is wrong) of the uncompressed
    tar in ``f`` (``size`` bytes), or None; ``nested``: its members are tars too."""
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                missing = member.offset_data + member.size - size
                if missing > 0:
                    return [member.name], f"is cut short (its last {missing:,} bytes are missing)"
                if nested and member.isfile():
                    inner = _tar_problem(tar.extractfile(member), member.size, False)
                    if inner is not None:
                        return [member.name, *inner[0]], inner[1]
            # A whole tar ends with zero blocks; tarfile also stops, without
            # a word, at a header that is cut short or not a header.
            f.seek(tar.offset)
            if f.read(_TAR_BLOCK) != bytes(_TAR_BLOCK):
                return [], (
                    f"ends at byte {tar.offset:,} without the end-of-archive marker (it is "
                    "cut short or damaged there)"
                )
    except (tarfile.TarError, OSError, EOFError) as e:
        return [], f"is not a readable tar ({e})"
    return None


def damaged_data_error(
    name: str, data_dir: str | None, error: BaseException
) -> DataCorruptError | None:
    """A :class:`DataCorruptError` for TensorFlow's ``error`` reading the prepared
    tfds dataset ``name``, naming the file and how to prepare it again; None
    when ``error`` is not about its files.

    tf.data's ``DataLossError`` says only ``truncated record at N`` or
    ``corrupted record at N``: the dataset's files are walked record by record
    (their length fields only: one small read per record, seconds to minutes
    for ImageNet's 1.3 million, after a failure only) and the one cut short is
    named; a damaged record at N is looked for in the files with a record at N.
    """
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    text = _tf_message(error)
    builder = tfds_module().builder(name, data_dir=data_dir)
    version_dir = os.fspath(builder.data_dir)
    if name == "imagenet2012":
        manual_dir = os.path.join(builder.data_dir_root, "downloads", "manual")
        again = (
            f"it prepares {name} again from the archives in {manual_dir} (hours for the "
            "whole of ImageNet)"
        )
    else:
        again = f"it downloads and prepares {name} again"
    fix = f"Delete it (rm -r {version_dir}) and run the same command again: {again}."
    if isinstance(error, tf.errors.DataLossError):
        offset = re.search(r"record at (\d+)", text)
        found = _damaged_record_file(version_dir, int(offset.group(1)) if offset else None)
        what = (
            f"{found[0]} {found[1]}"
            if found
            else f"a file of {version_dir} is damaged (TensorFlow: {text})"
        )
        return DataCorruptError(f"{what}: the prepared {name} cannot be read. {fix}")
    if isinstance(error, tf.errors.NotFoundError):
        missing = re.search(r"(\S+); No such file", text)
        if missing is None or not missing.group(1).startswith(version_dir):
            return None
        return DataCorruptError(
            f"{missing.group(1)} is missing: the prepared {name} is incomplete. {fix}"
        )
    if isinstance(error, tf.errors.InvalidArgumentError) and "JPEG" in text:
        # Prepared before imagenet_preflight checked every image.
        return DataCorruptError(
            f"an image of the prepared {name} in {version_dir} is not a whole JPEG "
            f"(TensorFlow: {text}): it was prepared from a damaged archive. {fix} The "
            "preparation names the damaged image."
        )
    return None


def _damaged_record_file(version_dir: str, offset: int | None) -> tuple[str, str] | None:
    """(path, what) of the TFRecord file of ``version_dir`` that TensorFlow
    failed to read at byte ``offset`` (the start of a record, or of its data):
    one cut short there, else any cut short, else one whose record there does
    not pass its checksum."""
    import tensorflow as tf  # lazy: only after configure_tensorflow()

    names = os.listdir(version_dir) if os.path.isdir(version_dir) else []
    near = set() if offset is None else {offset, offset - _RECORD_HEADER}
    cut, at_offset = [], []
    for path in sorted(os.path.join(version_dir, f) for f in names if ".tfrecord" in f):
        problem, last, starts = _record_walk(path)
        if problem is not None:
            cut.append((last not in near, path, problem))
        elif near & starts:
            at_offset.append(path)
    if cut:
        _, path, problem = min(cut)
        return path, problem
    for path in at_offset:  # its checksums, checked by reading the file
        try:
            for _ in tf.data.TFRecordDataset(path).batch(256):
                pass
        except tf.errors.DataLossError:
            return path, f"has a damaged record at byte {offset:,} (it fails its checksum)"
    return None


def _record_walk(path: str) -> tuple[str | None, int, set[int]]:
    """What is wrong with a TFRecord file (or None), the offset of the record
    where it is, and the offsets of its records, from their length fields."""
    size, pos, starts = os.path.getsize(path), 0, set()
    with open(path, "rb") as f:
        while pos < size:
            f.seek(pos)
            header = f.read(8)
            if len(header) < 8:
                return f"is cut short: it ends inside the record at byte {pos:,}", pos, starts
            starts.add(pos)
            end = pos + _RECORD_OVERHEAD + struct.unpack("<Q", header)[0]
            if end > size:
                what = (
                    f"is cut short: it ends {end - size:,} bytes before the end of its "
                    f"record at byte {pos:,}"
                )
                return what, pos, starts
            pos = end
    return None, pos, starts


def _tf_message(error: BaseException) -> str:
    """The first line of a TensorFlow error, without its op and function names."""
    text = str(getattr(error, "message", error)).strip().split("\n")[0]
    text = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", text)
    text = re.sub(r"^Error in user-defined function passed to .*? with iterator: \S+: ", "", text)
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", text).strip()
