"""Runs the input pipeline and the train step together; reports time waiting for data.

    python -m benchmarks.input_pipeline --config configs/cifar10.py --model resnet20 \\
        --steps 150 --log-every 25 --config.mock_data=True --config.mock_num_examples=2048

The trainer measures, for every logging window, the wall time spent in
``next(batches)`` (the host waiting for the input pipeline) and logs it as
``data_wait_fraction``; this script runs train.py's loop (``train_lib.
train_and_evaluate``) for ``--steps`` steps in a temporary workdir and records
every window after the first (which includes compilation): images/s and the
waiting fraction, with their medians and spreads. A fraction near 0 means the
devices are the bottleneck; near 1, the input pipeline is. Any config key can
be set as in train.py, ``--config.KEY=VALUE``.

With ``--pipeline_only`` it measures the ImageNet host pipeline alone (no
model) for ``--steps`` batches, in one command: the pipeline of
``resnet_jax.data`` (encoded JPEGs shuffled, only the crop window decoded,
uint8 batches), the full-decode pipeline it replaced (``--decode full``; both
by default) and torchvision's ``ImageFolder`` + ``DataLoader`` with the same
augmentation and one worker per core, on the same JPEGs (PyTorch optional;
``--no-torch`` skips it). It prints images/s, images/s per core and host RSS
of each, and records images/s, cores and RSS of the first:

    python -m benchmarks.input_pipeline --config configs/imagenet.py \
        --config.data_dir=DIR --pipeline_only

Without ``--config.data_dir`` it writes and prepares a miniature ImageNet
(``--mini-classes`` x ``--mini-per-class`` JPEGs) in a temporary directory.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import math
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from benchmarks import common


def load_config(path: str, overrides: list[str]) -> Any:
    """``get_config()`` of a configs/*.py file, with ``--config.KEY=VALUE`` overrides."""
    spec = importlib.util.spec_from_file_location("benchmark_config", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--config {path}: not a Python file.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in overrides:
        key, sep, text = item.removeprefix("--config.").partition("=")
        if not item.startswith("--config.") or not sep:
            raise SystemExit(f"Unknown argument {item!r}; config keys: --config.KEY=VALUE.")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        config.update_from_flattened_dict({key: value})
    return config


def run_windows(config: Any) -> list[dict]:
    """Runs train.py's loop on ``config``; the metric lines that carry ``data_wait_fraction``."""
    from resnet_jax import train_lib

    with tempfile.TemporaryDirectory() as workdir:
        train_lib.train_and_evaluate(config, workdir, progress=False)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return [m for m in map(json.loads, f) if "data_wait_fraction" in m]


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__, model=None, batch_size=None, steps=150)
    p.add_argument("--config", default="configs/cifar10.py", help="a configs/*.py file")
    p.add_argument("--log-every", type=int, default=25, help="steps per measurement window")
    p.add_argument("--pipeline_only", action="store_true", help="the host pipeline alone")
    p.add_argument(
        "--decode",
        default="both",
        choices=["crop", "full", "both"],
        help="--pipeline_only: the crop-decode pipeline, the full-decode one before it, or both",
    )
    p.add_argument("--no-torch", dest="torch", action="store_false", help="skip torchvision")
    p.add_argument("--warmup", type=int, default=5, help="--pipeline_only: untimed batches")
    p.add_argument("--mini-classes", type=int, default=20, help="miniature ImageNet classes")
    p.add_argument("--mini-per-class", type=int, default=50, help="its JPEGs per class")
    a, overrides = p.parse_known_args(argv)
    common.configure(a)
    from resnet_jax import data

    data.configure_tensorflow()
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines
    config = load_config(a.config, overrides)
    if a.pipeline_only:
        config.batch_size = a.batch_size or config.batch_size
        result = pipeline_only(a, config)
        return common.record(result, a.results, benchmark="input_pipeline", argv=argv)
    config.model = a.model or config.model
    config.batch_size = a.batch_size or config.batch_size
    config.materialize = common.resolve_materialize(a.materialize)
    config.num_train_steps = a.steps
    config.log_every_steps = a.log_every
    config.eval_every_steps = 10**9  # only the final evaluation
    config.checkpoint_every_steps = 10**9
    lines = run_windows(config)
    if len(lines) < 2:
        raise SystemExit("Too few windows: --steps must be at least twice --log-every.")
    windows = [
        {k: m[k] for k in ("step", "images_per_sec", "data_wait_fraction")} for m in lines[1:]
    ]
    print(f"{'window end':>10} {'images/s':>10} {'waiting for data':>17}")
    for m in lines:
        print(f"{m['step']:>10} {m['images_per_sec']:>10.0f} {m['data_wait_fraction']:>16.1%}")
    result = {
        "config": os.path.basename(a.config),
        "dataset": config.dataset,
        "mock_data": bool(config.mock_data),
        "model": config.model,
        "batch_size": config.batch_size,
        "dtype": config.dtype,
        "materialize": config.materialize,
        "cpu_conv": a.cpu_conv,
        **common.device_info(),
        "steps": a.steps,
        "log_every": a.log_every,
        "windows": windows,
        "images_per_sec": common.spread([w["images_per_sec"] for w in windows]),
        "data_wait_fraction": common.spread([w["data_wait_fraction"] for w in windows]),
    }
    return common.record(result, a.results, benchmark="input_pipeline", argv=argv)


# --------------------------------------------------------------------------- #
# --pipeline_only: the host pipeline alone, before/after, and torchvision
# --------------------------------------------------------------------------- #


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def rss_mb(with_children: bool = False) -> float:
    """Resident memory of this process (and its children, e.g. DataLoader workers), MiB."""
    import psutil

    procs = [psutil.Process()]
    if with_children:
        procs += procs[0].children(recursive=True)
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def time_batches(batches, n: int, warmup: int, batch_size: int) -> dict:
    """Images/s over ``n`` batches of ``batches`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        next(batches)
    t0 = time.perf_counter()
    for _ in range(n):
        next(batches)
    seconds = time.perf_counter() - t0
    ips = n * batch_size / seconds
    return {"images_per_sec": ips, "images_per_sec_per_core": ips / cores(), "seconds": seconds}


def full_decode_batches(config):
    """The ImageNet training stream as it was before encoded shuffling
    (commit 4d7cdeb): tfds decodes every JPEG before the shuffle buffer, the
    whole image is resized in float32 to the random shorter side, then the
    random crop and flip; normalised float32 batches, one pipeline per epoch."""
    import tensorflow as tf

    from resnet_jax import data

    tfds = data._tfds()
    mean = np.asarray(data.IMAGENET_MEAN_RGB, np.float32)
    lo, hi = config.train_scale_range
    crop = int(config.image_size)
    epoch = 0
    while True:
        seed = data._epoch_seed(config.seed, epoch)
        ds = tfds.load(
            "imagenet2012",
            split="train",
            data_dir=config.data_dir,
            shuffle_files=True,
            read_config=tfds.ReadConfig(
                shuffle_seed=seed, interleave_cycle_length=16, interleave_block_length=1
            ),
        )
        opts = tf.data.Options()
        opts.deterministic = True
        ds = ds.with_options(opts).shuffle(int(config.shuffle_buffer), seed=seed).enumerate()

        def example(pos, ex, seed=seed):
            s1, s2, s3 = tf.unstack(
                tf.random.experimental.stateless_split(tf.stack([seed % (2**31), pos]), 3)
            )
            size = tf.random.stateless_uniform([], s1, minval=lo, maxval=hi + 1, dtype=tf.int32)
            image = data._resize_shorter(tf.cast(ex["image"], tf.float32), size)
            image = tf.image.stateless_random_crop(image, (crop, crop, 3), seed=s2)
            image = tf.image.stateless_random_flip_left_right(image, seed=s3)
            return {"image": image / 255.0 - mean, "label": tf.cast(ex["label"], tf.int32)}

        ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(config.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
        yield from ds.as_numpy_iterator()
        epoch += 1


def extract_image_folder(data_dir: str, out: str, limit: int) -> int:
    """The first ``limit`` JPEGs of ``data_dir/downloads/manual/ILSVRC2012_img_train.tar``
    extracted as ``out/<synset>/<name>.JPEG`` (torchvision's ImageFolder layout)."""
    import tarfile

    path = os.path.join(data_dir, "downloads", "manual", "ILSVRC2012_img_train.tar")
    count = 0
    with tarfile.open(path) as outer:
        for member in outer:
            synset = os.path.splitext(os.path.basename(member.name))[0]
            os.makedirs(os.path.join(out, synset), exist_ok=True)
            with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                for m in inner:
                    with open(os.path.join(out, synset, os.path.basename(m.name)), "wb") as f:
                        f.write(inner.extractfile(m).read())
                    count += 1
                    if count >= limit:
                        return count
    return count


class RandomShorterSide:
    """Resizes a PIL image so that its shorter side is uniform in [lo, hi] pixels."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def __call__(self, image):
        import random

        from torchvision.transforms import functional as F

        return F.resize(image, random.randint(self.lo, self.hi))


def torch_pipeline(folder: str, kind: str, crop: int, scale_range, batch: int, workers: int):
    """torchvision's ImageFolder + DataLoader with the same training
    augmentation (``kind``: ``scale`` or ``random_resized``); endless batches."""
    import torch
    from torchvision import datasets, transforms

    if kind == "random_resized":
        geometry = [transforms.RandomResizedCrop(crop)]
    else:
        geometry = [RandomShorterSide(*scale_range), transforms.RandomCrop(crop)]
    augment = transforms.Compose(
        [
            *geometry,
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[1.0, 1.0, 1.0]),
        ]
    )
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(folder, augment),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )
    torch.set_num_threads(1)
    while True:
        yield from loader


def measure_torch(folder: str, kind: str, crop: int, scale_range, batch: int, n: int, warmup: int):
    """:func:`torch_pipeline` timed with one worker per core. Runs in a fresh
    (spawned) process: PyTorch's forked workers crash beside TensorFlow's threads."""
    batches = torch_pipeline(folder, kind, crop, scale_range, batch, cores())
    row = time_batches(batches, n, warmup, batch)
    row["rss_mb"] = rss_mb(with_children=True)
    return row


def pipeline_only(a, config) -> dict:
    """Measures the host pipeline alone: the encoded-shuffle, crop-decode
    pipeline (uint8 out), the full-decode pipeline it replaced, torchvision."""
    import gc
    import shutil

    from resnet_jax import data, mini_imagenet

    tmp = tempfile.mkdtemp(prefix="input_pipeline_")
    try:
        if not config.data_dir:
            config.data_dir = os.path.join(tmp, "tfds")
            mini_imagenet.write(config.data_dir, a.mini_classes, a.mini_per_class, seed=0)
            print(f"Wrote a miniature ImageNet: {a.mini_classes} x {a.mini_per_class} JPEGs.")
        data.imagenet_preflight(config.data_dir)
        n, warmup, b = a.steps, a.warmup, config.batch_size
        print(f"{cores()} cores, batch {b}, {n} timed batches after {warmup}")
        rows = {}
        if a.decode in ("crop", "both"):
            pipe = data.InputPipeline(config, image_dtype="uint8")
            rows["crop"] = time_batches(pipe.train_batches(0), n, warmup, b)
            rows["crop"]["rss_mb"] = rss_mb()
            del pipe
            gc.collect()
        if a.decode in ("full", "both"):
            rows["full"] = time_batches(full_decode_batches(config), n, warmup, b)
            rows["full"]["rss_mb"] = rss_mb()
        if a.torch:
            if importlib.util.find_spec("torchvision") is None:
                print("torchvision is not installed: skipping the PyTorch pipeline.")
            else:
                folder = os.path.join(tmp, "image_folder")
                extract_image_folder(config.data_dir, folder, (n + warmup + 1) * b)
                args = (folder, data._train_crop(config), int(config.image_size))
                args += (tuple(config.train_scale_range), b, n, warmup)
                spawn = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(1, mp_context=spawn) as pool:  # workers may fork
                    rows["torchvision"] = pool.submit(measure_torch, *args).result()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    names = {
        "crop": "tf.data, encoded shuffle, crop decode, uint8",
        "full": "tf.data, decoded shuffle, full decode (before)",
        "torchvision": f"torchvision ImageFolder + DataLoader ({cores()} workers)",
    }
    print(f"{'pipeline':<52} {'images/s':>9} {'per core':>9} {'RSS MiB':>8}")
    for k, r in rows.items():
        print(
            f"{names[k]:<52} {r['images_per_sec']:>9.0f} "
            f"{r['images_per_sec_per_core']:>9.0f} {r['rss_mb']:>8.0f}"
        )
    main_row = rows.get("crop") or rows["full"]
    per_core = main_row["images_per_sec_per_core"]
    result = {
        "mode": "pipeline_only",
        "config": os.path.basename(a.config),
        "dataset": config.dataset,
        "train_crop": data._train_crop(config),
        "batch_size": b,
        "image_size": int(config.image_size),
        "train_scale_range": list(config.train_scale_range),
        "shuffle_buffer": int(config.shuffle_buffer),
        "steps": n,
        "warmup": warmup,
        "cores": cores(),
        "images_per_sec": main_row["images_per_sec"],
        "images_per_sec_per_core": per_core,
        "rss_mb": main_row["rss_mb"],
        # Cores to feed 8 GPUs at 3,000 images/s each at this per-core rate.
        "cores_for_8x3000": math.ceil(24_000 / per_core),
        "pipelines": rows,
    }
    if "full" in rows and "crop" in rows:
        result["speedup_vs_full_decode"] = (
            rows["crop"]["images_per_sec"] / rows["full"]["images_per_sec"]
        )
    if "torchvision" in rows:
        result["per_core_vs_torchvision"] = (
            per_core / rows["torchvision"]["images_per_sec_per_core"]
        )
    return result


if __name__ == "__main__":
    main()
