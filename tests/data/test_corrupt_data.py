"""Damaged data files on real files: one line naming the file and what to do,
exit status 2, no traceback, nothing left that looks prepared.

* ImageNet's archives (a miniature ILSVRC2012 of real JPEGs, resnet_jax.mini_imagenet,
  with one member rewritten by tarfile): tfds' builder stores an image's bytes
  as they are, so an empty or cut-short JPEG would be prepared silently and
  stop training inside tf.data; the preparation now stops at it and names it.
  The odd files of the real archive that tfds converts (a PNG and CMYK JPEGs
  under their names) still prepare.
* Prepared tfds files cut short, damaged or missing: tf.data's DataLossError
  names no file; the pipeline's error names it, for train.py (training and its
  evaluation), ``python -m resnet_jax.evaluate`` and CIFAR-10 read whole.
"""

import io
import os
import shutil
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from configs import imagenet
from resnet_jax import data as data_lib
from resnet_jax import mini_imagenet
from resnet_jax.errors import DataCorruptError
from tests.data.test_imagenet import SMALL
from tests.helpers import COMPILE_CACHE_ENV, ROOT, run_train

pytestmark = pytest.mark.slow

NUM_CLASSES, TRAIN_PER_CLASS = 10, 8  # tests/data/test_imagenet.py's miniature, prepared once
TINY = (2, 2)  # classes, training images per class: the archives that must not prepare
VERSION = "imagenet2012/5.1.0"


def _small(**overrides):
    """test_imagenet's small sizes with ``overrides`` (train.py refuses a flag given twice)."""
    keep = [a for a in SMALL if a.split("=")[0].removeprefix("--config.") not in overrides]
    return (*keep, *(f"--config.{k}={v}" for k, v in overrides.items()))


def _one_line(out, prog, *fragments):
    """Exit status 2, one ``PROG: error:`` line holding ``fragments``, no traceback."""
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, out.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def _evaluate(*args, devices=1):
    """``python -m resnet_jax.evaluate`` on ImageNet's config, in a subprocess."""
    cmd = [
        sys.executable,
        "-m",
        "resnet_jax.evaluate",
        "--config=configs/imagenet.py",
        f"--compilation_cache_dir={os.environ.get(COMPILE_CACHE_ENV, '')}",
        *args,
    ]
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
    )
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


# --------------------------------------------------------------------------- #
# Archives rewritten with tarfile
# --------------------------------------------------------------------------- #


def _edited(tar_bytes, edit):
    """The tar ``tar_bytes`` with its ``[(TarInfo, data)]`` passed through ``edit``."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in edit(members):
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return buf.getvalue()


def _rewrite(path, edit):
    with open(path, "rb") as f:
        data = _edited(f.read(), edit)
    with open(path, "wb") as f:
        f.write(data)


def _change_image(manual_dir, name, change):
    """Replaces image ``name`` of the archives (a training image inside its
    class tar) by ``change(its bytes)``."""

    def edit(members):
        return [(m, change(d) if m.name == name else d) for m, d in members]

    if name.startswith("ILSVRC2012_val_"):
        _rewrite(os.path.join(manual_dir, mini_imagenet.VAL_TAR), edit)
        return
    class_tar = name.split("_")[0] + ".tar"
    _rewrite(
        os.path.join(manual_dir, mini_imagenet.TRAIN_TAR),
        lambda members: [(m, _edited(d, edit) if m.name == class_tar else d) for m, d in members],
    )


def _reencoded(jpeg, fmt, **kw):
    """A JPEG's picture saved again as ``fmt`` (``"PNG"``, ``"CMYK"``, ``"JPEG"``)."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    buf = io.BytesIO()
    if fmt == "CMYK":
        image.convert("CMYK").save(buf, format="JPEG", quality=90)
    else:
        image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _not_prepared(data_dir):
    """Nothing looks prepared: no version directory, and the next run would prepare."""
    assert not os.path.exists(os.path.join(data_dir, VERSION))
    assert data_lib.imagenet_preflight(data_dir, prepare=False) is False


# --------------------------------------------------------------------------- #
# A damaged image or tar in the archives
# --------------------------------------------------------------------------- #


def test_empty_jpeg_in_a_class_tar_is_one_line_from_train_py_and_the_next_run_prepares(
    tmp_path,
):
    data_dir, workdir = str(tmp_path / "tfds"), tmp_path / "run"
    written = mini_imagenet.write(data_dir, *TINY, seed=0)
    name, synset = written.train[0]
    _change_image(written.manual_dir, name, lambda _: b"")
    out = run_train(
        workdir,
        f"--config.data_dir={data_dir}",
        *_small(batch_size=4, eval_batch_size=2, num_train_steps=2),
        config="configs/imagenet.py",
        devices=1,
        check=False,
    )
    _one_line(
        out,
        "train.py",
        f"ILSVRC2012_img_train.tar: {synset}.tar: {name} is empty (0 bytes)",
        "Download ILSVRC2012_img_train.tar again from https://image-net.org/",
        written.manual_dir,
    )
    assert not workdir.exists()
    _not_prepared(data_dir)
    # The archive replaced (written again whole), the same command prepares.
    mini_imagenet.write(data_dir, *TINY, seed=0)
    assert data_lib.imagenet_preflight(data_dir) is True
    assert any(".tfrecord" in f for f in os.listdir(os.path.join(data_dir, VERSION)))


def _garbage(manual_dir, written):
    _change_image(manual_dir, written.train[1][0], lambda _: b"not a JPEG " * 10)
    return rf"ILSVRC2012_img_train.tar: {written.train[1][1]}.tar: {written.train[1][0]} is not an image"


def _png(manual_dir, written):
    _change_image(manual_dir, written.train[2][0], lambda d: _reencoded(d, "PNG"))
    return rf"{written.train[2][0]} is a PNG file, not a JPEG"


def _cut_short_validation_image(manual_dir, written):
    name = written.validation[1][0]
    _change_image(manual_dir, name, lambda d: d[: len(d) // 2])
    return rf"ILSVRC2012_img_val.tar: {name} is not a whole JPEG \([\d,]+ bytes: image file is truncated"


def _cut_short_train_archive(manual_dir, written):
    path = os.path.join(manual_dir, mini_imagenet.TRAIN_TAR)
    os.truncate(path, int(os.path.getsize(path) * 0.6))
    return r"ILSVRC2012_img_train.tar: n\d+\.tar is cut short \(its last [\d,]+ bytes are missing\)"


def _train_archive_cut_at_a_member_boundary(manual_dir, written):
    """The outer tar cut after its first class tar: a shorter tar that reads
    whole, without the end-of-archive marker, which would prepare fewer classes."""
    path = os.path.join(manual_dir, mini_imagenet.TRAIN_TAR)
    with tarfile.open(path) as tar:
        first = tar.next()
        end = first.offset_data + -(-first.size // 512) * 512
    os.truncate(path, end)
    return rf"ILSVRC2012_img_train.tar ends at byte {end:,} without the end-of-archive marker"


def _class_tar_not_a_tar(manual_dir, written):
    class_tar = written.train[0][1] + ".tar"
    _rewrite(
        os.path.join(manual_dir, mini_imagenet.TRAIN_TAR),
        lambda ms: [(m, b"\x01" * len(d) if m.name == class_tar else d) for m, d in ms],
    )
    return rf"ILSVRC2012_img_train.tar: {class_tar} is not a readable tar"


def _empty_validation_archive(manual_dir, written):
    os.truncate(os.path.join(manual_dir, mini_imagenet.VAL_TAR), 0)
    return r"ILSVRC2012_img_val.tar is not a readable tar \(empty file\)"


@pytest.mark.parametrize(
    "damage",
    [
        _garbage,
        _png,
        _cut_short_validation_image,
        _cut_short_train_archive,
        _train_archive_cut_at_a_member_boundary,
        _class_tar_not_a_tar,
        _empty_validation_archive,
    ],
)
def test_a_damaged_archive_is_named_down_to_the_image(tmp_path, damage):
    data_dir = str(tmp_path)
    written = mini_imagenet.write(data_dir, *TINY, seed=0)
    says = damage(written.manual_dir, written)
    archive = "ILSVRC2012_img_val.tar" if "img_val" in says else "ILSVRC2012_img_train.tar"
    with pytest.raises(DataCorruptError, match=says) as e:
        data_lib.imagenet_preflight(data_dir)
    assert f"Download {archive} again" in str(e.value) and "\n" not in str(e.value)
    _not_prepared(data_dir)


def test_the_odd_files_of_the_real_archive_still_prepare(tmp_path):
    """ILSVRC2012's PNG and CMYK JPEGs under their names (tfds converts them),
    a CMYK JPEG it does not know, a progressive JPEG and JPEGs with bytes after
    their end marker: all prepared, each stored as a JPEG the pipeline decodes."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    data_dir = str(tmp_path)
    written = mini_imagenet.write(data_dir, *TINY, seed=0)
    synset = sorted(written.classes)[0]
    with tarfile.open(os.path.join(written.manual_dir, mini_imagenet.TRAIN_TAR)) as tar:
        with tarfile.open(fileobj=tar.extractfile(f"{synset}.tar")) as inner:
            photo = inner.extractfile(inner.getmembers()[0]).read()
    added = {
        "n02105855_2933.JPEG": _reencoded(photo, "PNG"),  # tfds' PNG_IMAGES
        "n01739381_1309.JPEG": _reencoded(photo, "CMYK"),  # one of tfds' CMYK_IMAGES
        f"{synset}_1.JPEG": _reencoded(photo, "CMYK"),  # a CMYK JPEG tfds does not list
        f"{synset}_2.JPEG": _reencoded(photo, "JPEG", progressive=True),
        f"{synset}_3.JPEG": photo + bytes(100),  # zero padding after the end marker
        f"{synset}_4.JPEG": photo + b"trailing bytes",
    }

    def add(members):
        new = []
        for name, data in added.items():
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = members[0][0].mtime, 0o644
            new.append((info, data))
        return members + new

    _rewrite(
        os.path.join(written.manual_dir, mini_imagenet.TRAIN_TAR),
        lambda ms: [(m, _edited(d, add) if m.name == f"{synset}.tar" else d) for m, d in ms],
    )
    assert data_lib.imagenet_preflight(data_dir) is True
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    ds = builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})
    stored = {ex["file_name"].decode(): ex for ex in tfds.as_numpy(ds)}
    assert set(stored) == {n for n, _ in written.train} | set(added)
    label = mini_imagenet.synsets().index(synset)
    for name in added:
        encoded = stored[name]["image"]
        assert encoded[:2] == b"\xff\xd8" and stored[name]["label"] == label, name
        assert tf.io.decode_jpeg(encoded, channels=3).shape[-1] == 3
        tf.io.extract_jpeg_shape(encoded)
    assert np.asarray(Image.open(io.BytesIO(stored["n02105855_2933.JPEG"]["image"]))).ndim == 3


# --------------------------------------------------------------------------- #
# A prepared tfrecord cut short, damaged or missing
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tfds data directory with the miniature prepared."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    mini_imagenet.write(data_dir, NUM_CLASSES, TRAIN_PER_CLASS, seed=0)
    data_lib.imagenet_preflight(data_dir)
    return data_dir


def _damaged_copy(prepared, tmp_path, split, damage):
    """A copy of the prepared data directory whose ``split`` shard is damaged:
    ``"cut"`` (the second half gone), ``"checksum"`` (bytes overwritten) or
    ``"missing"``; returns (data_dir, the shard's path)."""
    data_dir = str(tmp_path / "tfds")
    shutil.copytree(prepared, data_dir)
    version = os.path.join(data_dir, VERSION)
    (shard,) = [os.path.join(version, f) for f in os.listdir(version) if f"-{split}.tfrecord" in f]
    if damage == "cut":
        os.truncate(shard, os.path.getsize(shard) // 2)
    elif damage == "checksum":  # inside the first record's data: its CRC fails
        with open(shard, "r+b") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            f.seek(12 + length // 2)
            f.write(b"\xff" * 16)
    else:
        os.remove(shard)
    return data_dir, shard


@pytest.mark.parametrize(
    "split, damage, says",
    [
        ("train", "cut", "is cut short: it ends"),
        ("train", "checksum", "has a damaged record at byte"),
        ("validation", "cut", "is cut short: it ends"),
        ("validation", "checksum", "has a damaged record at byte"),
        ("validation", "missing", "is missing: the prepared imagenet2012 is incomplete"),
    ],
)
def test_the_pipeline_names_the_damaged_tfrecord(prepared, tmp_path, split, damage, says):
    data_dir, shard = _damaged_copy(prepared, tmp_path, split, damage)
    c = imagenet.get_config()
    c.update(data_dir=data_dir, image_size=32, train_scale_range=(36, 48), eval_resize=36)
    c.update(batch_size=8, eval_batch_size=8, shuffle_buffer=64)
    pipe = data_lib.InputPipeline(c, image_dtype="uint8")
    batches = pipe.train_batches(0) if split == "train" else pipe.eval_batches()
    with pytest.raises(DataCorruptError) as e:
        for _ in range(2 * pipe.steps_per_epoch):  # a whole epoch reads every record
            next(batches)
    message = str(e.value)
    assert message.startswith(f"{shard} {says}"), message
    assert f"rm -r {os.path.join(data_dir, VERSION)}" in message
    assert os.path.join(data_dir, "downloads", "manual") in message


def test_a_damaged_jpeg_prepared_before_the_check_is_named_by_the_pipeline(tmp_path):
    """Data prepared by tfds alone (as before every image was checked): the
    JPEG TensorFlow cannot decode stops the evaluation with what to do."""
    data_dir = str(tmp_path)
    written = mini_imagenet.write(data_dir, *TINY, seed=0)
    _change_image(written.manual_dir, written.validation[1][0], lambda d: d[: len(d) // 2])
    data_lib.tfds_module().builder("imagenet2012", data_dir=data_dir).download_and_prepare()
    c = imagenet.get_config()
    c.update(data_dir=data_dir, image_size=32, eval_resize=36, batch_size=4, eval_batch_size=2)
    with pytest.raises(DataCorruptError) as e:
        list(data_lib.InputPipeline(c, image_dtype="uint8").eval_batches())
    version = os.path.join(data_dir, VERSION)
    assert str(e.value).startswith(f"an image of the prepared imagenet2012 in {version} is not")
    assert f"rm -r {version}" in str(e.value) and "names the damaged image" in str(e.value)


def test_cut_short_train_tfrecord_is_one_line_from_train_py(prepared, tmp_path):
    data_dir, shard = _damaged_copy(prepared, tmp_path, "train", "cut")
    out = run_train(
        tmp_path / "run",
        f"--config.data_dir={data_dir}",
        *_small(num_train_steps=2),  # the program of the next test: compiled once
        config="configs/imagenet.py",
        devices=1,
        check=False,
    )
    version = os.path.dirname(shard)
    _one_line(
        out, "train.py", f"{shard} is cut short", f"rm -r {version}", "the same command again"
    )


def test_cut_short_validation_tfrecord_is_one_line_from_train_py_and_evaluate(prepared, tmp_path):
    """The run trains, saves step 1, and stops at its evaluation of step 2;
    evaluate stops at the same file."""
    data_dir, shard = _damaged_copy(prepared, tmp_path, "validation", "cut")
    run = tmp_path / "run"
    args = (f"--config.data_dir={data_dir}", *_small(checkpoint_every_steps=1))
    out = run_train(
        run,
        *args,
        "--config.num_train_steps=2",
        config="configs/imagenet.py",
        devices=1,
        check=False,
    )
    _one_line(out, "train.py", f"{shard} is cut short", f"rm -r {os.path.dirname(shard)}")
    assert "1" in os.listdir(run / "checkpoints")
    out = _evaluate(f"--workdir={run}", *args)
    _one_line(out, "evaluate", f"{shard} is cut short", f"rm -r {os.path.dirname(shard)}")


def test_cut_short_cifar10_tfrecord_is_one_line_from_train_py(tmp_path):
    """CIFAR-10 written in tfds' format (64 training and 16 test images), read
    whole into memory: its file cut short stops train.py before training."""
    import tensorflow_datasets as tfds

    data_dir = str(tmp_path / "tfds")
    builder = tfds.builder("cifar10", data_dir=data_dir)
    os.makedirs(builder.data_dir)
    writer = tfds.core.SequentialWriter(ds_info=builder.info, max_examples_per_shard=1000)
    writer.initialize_splits(["train", "test"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (80, 32, 32, 3), dtype=np.uint8)
    examples = [{"id": f"x_{i}", "image": images[i], "label": i % 10} for i in range(80)]
    writer.add_examples({"train": examples[:64], "test": examples[64:]})
    writer.close_all()
    version = os.fspath(builder.data_dir)
    (shard,) = [os.path.join(version, f) for f in os.listdir(version) if "-train.tfrecord" in f]
    os.truncate(shard, os.path.getsize(shard) - 100)
    out = run_train(
        tmp_path / "run",
        f"--config.data_dir={data_dir}",
        "--config.model=resnet8",
        "--config.batch_size=16",
        "--config.eval_batch_size=16",
        "--config.num_train_steps=2",
        devices=1,
        check=False,
    )
    _one_line(
        out,
        "train.py",
        f"{shard} is cut short",
        f"rm -r {version}",
        "downloads and prepares cifar10",
    )
    assert not (tmp_path / "run").exists()
