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
model), ``--designs`` (comma-separated) in one command, on the same JPEGs:

* ``crop``: design (a), the pipeline of ``resnet_jax.data`` (tf.data;
  encoded JPEGs shuffled, only the crop window decoded, uint8 batches);
* ``full``: the full-decode tf.data pipeline it replaced;
* ``grain``: design (b), ``benchmarks.grain_pipeline`` (grain over tfds'
  ArrayRecord files, Pillow decoding in one worker process per core, uint8),
  in processes where TensorFlow cannot be imported;
* ``torchvision``: ``ImageFolder`` + ``DataLoader``, the same augmentation,
  one worker per core (PyTorch optional).

Each design runs in a fresh (spawned) process, ``--repeats`` times in turn
(ABAB: every design sees the same load of the machine); it prints and records
images/s, images/s per core, host RSS (with worker processes), the time to the
first batch from step 0 and, for (a) and (b), from the step where the timed
batches ended (``1 + --warmup + --steps``): (a) seeks by reading through the
epoch's earlier examples, (b) restores grain's iterator state saved there;
both are checked to give the uninterrupted stream's next batch. The 1-minute
load average is recorded before the first and after every measurement:

    python -m benchmarks.input_pipeline --config configs/imagenet.py \\
        --config.data_dir=DIR --pipeline_only --designs crop,grain,torchvision \\
        --grain-data-dir=DIR2 --repeats 3

``--grain-data-dir``: a tfds data directory where imagenet2012 is (or is to
be) prepared as ArrayRecord from DIR's archives (default: a temporary one).
Without ``--config.data_dir`` it writes and prepares a miniature ImageNet
(``--mini-classes`` x ``--mini-per-class`` JPEGs) in a temporary directory.
"""

from __future__ import annotations

import ast
import gc
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
    from resnet_jax.training import loop

    with tempfile.TemporaryDirectory() as workdir:
        loop.train_and_evaluate(config, workdir, progress=False)
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
    p.add_argument(
        "--designs",
        default=",".join(DESIGNS),
        help="--pipeline_only: comma-separated, of " + ", ".join(DESIGNS),
    )
    p.add_argument("--no-torch", dest="torch", action="store_false", help="skip torchvision")
    p.add_argument(
        "--repeats", type=int, default=1, help="--pipeline_only: runs of each design, in turn"
    )
    p.add_argument(
        "--grain-data-dir",
        default="",
        help="--pipeline_only: a tfds data_dir with imagenet2012 as ArrayRecord (grain's); "
        "default: prepared from --config.data_dir's archives in a temporary directory",
    )
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


def _processes() -> list:
    """This process and its live descendants (e.g. DataLoader or grain workers)."""
    import psutil

    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def rss_mb(with_children: bool = False, kind: str = "rss") -> float:
    """Resident memory of this process (and its children, e.g. DataLoader
    workers), MiB. ``kind="pss"``: proportional set size, each shared page
    divided among the processes that map it (summing RSS counts it in each)."""
    import psutil

    total = 0
    for proc in _processes() if with_children else _processes()[:1]:
        try:
            info = proc.memory_full_info() if kind == "pss" else proc.memory_info()
            total += getattr(info, kind)
        except psutil.Error:
            pass
    return total / 2**20


def cpu_seconds() -> float:
    """User + system CPU time of this process and its live descendants, s."""
    import psutil

    total = 0.0
    for proc in _processes():
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def time_batches(batches, n: int, warmup: int, batch_size: int) -> dict:
    """Images/s over ``n`` batches of ``batches`` after ``warmup`` untimed
    ones, and images per CPU-second of this process and its workers (on a
    loaded machine, what a design costs rather than the share it got)."""
    for _ in range(warmup):
        next(batches)
    t0, c0 = time.perf_counter(), cpu_seconds()
    for _ in range(n):
        next(batches)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    ips = n * batch_size / seconds
    row = {"images_per_sec": ips, "images_per_sec_per_core": ips / cores()}
    if cpu > 0:  # a few prefetched batches may take no CPU time at 10 ms resolution
        row["images_per_cpu_second"] = n * batch_size / cpu
    return {**row, "seconds": seconds, "cpu_seconds": cpu}


def full_decode_batches(config):
    """The ImageNet training stream as it was before encoded shuffling
    (commit 4d7cdeb): tfds decodes every JPEG before the shuffle buffer, the
    whole image is resized in float32 to the random shorter side, then the
    random crop and flip; normalised float32 batches, one pipeline per epoch."""
    import tensorflow as tf

    from resnet_jax import data

    tfds = data.tfds_module()
    mean = np.asarray(data.IMAGENET_MEAN_RGB, np.float32)
    lo, hi = config.train_scale_range
    crop = int(config.image_size)
    epoch = 0
    while True:
        seed = data.epoch_seed(config.seed, epoch)
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
            image = _resize_shorter(tf.cast(ex["image"], tf.float32), size)
            image = tf.image.stateless_random_crop(image, (crop, crop, 3), seed=s2)
            image = tf.image.stateless_random_flip_left_right(image, seed=s3)
            return {"image": image / 255.0 - mean, "label": tf.cast(ex["label"], tf.int32)}

        ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(config.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
        yield from ds.as_numpy_iterator()
        epoch += 1


def _resize_shorter(image, size):
    """(H, W, C) float32 resized (bilinear, antialiased) to shorter side
    ``size`` (a tensor) pixels, as the pipeline before did it; kept here so
    that the reference stays what it was while ``resnet_jax.data`` changes."""
    import tensorflow as tf

    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.cast(size, tf.float32) / tf.reduce_min(shape)
    new = tf.cast(tf.math.round(shape * scale), tf.int32)
    return tf.image.resize(image, new, method="bilinear", antialias=True)


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


def torch_auto_augment(policy: str, num_ops: int, magnitude: int) -> list:
    """torchvision's op for ``config.auto_augment`` (after the crop and flip,
    where resnet_jax applies it): RandAugment, TrivialAugmentWide, or none."""
    from torchvision import transforms

    if policy == "randaugment":
        return [transforms.RandAugment(num_ops=num_ops, magnitude=magnitude)]
    if policy == "trivialaugment":
        return [transforms.TrivialAugmentWide()]
    return []


def torch_pipeline(
    folder: str, kind: str, crop: int, scale_range, batch: int, workers: int, auto=("", 2, 9)
):
    """torchvision's ImageFolder + DataLoader with the same training
    augmentation (``kind``: ``scale`` or ``random_resized``; ``auto``:
    ``(config.auto_augment, randaugment_num_ops, randaugment_magnitude)``);
    endless batches."""
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
            *torch_auto_augment(*auto),
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


def measure_torch(
    folder: str, kind: str, crop: int, scale_range, batch: int, n: int, warmup: int, auto
):
    """:func:`torch_pipeline` timed with one worker per core. Runs in a fresh
    (spawned) process: PyTorch's forked workers crash beside TensorFlow's threads."""
    t0 = time.perf_counter()
    batches = torch_pipeline(folder, kind, crop, scale_range, batch, cores(), auto)
    next(batches)
    first = time.perf_counter() - t0
    row = time_batches(batches, n, warmup, batch)
    row["rss_mb"] = rss_mb(with_children=True)
    row["pss_mb"] = rss_mb(with_children=True, kind="pss")
    row["first_batch_s"] = first
    # The workers stop now, not at interpreter exit, where they aborted
    # ("terminate called without an active exception").
    batches.close()
    del batches
    gc.collect()
    return row


def measure_tfdata(config, n: int, warmup: int) -> dict:
    """Design (a), ``resnet_jax.data`` (encoded shuffle, crop decode, uint8),
    timed in this process: images/s, RSS, the time to the first batch from
    step 0 and, after ``1 + warmup + n`` batches, from that step (the seek);
    ``resume_exact``: the resumed batch is the uninterrupted stream's next one."""
    from resnet_jax import data

    data.configure_tensorflow()
    b = config.batch_size
    t0 = time.perf_counter()
    pipe = data.InputPipeline(config, image_dtype="uint8")
    batches = pipe.train_batches(0)
    next(batches)
    first = time.perf_counter() - t0
    row = time_batches(batches, n, warmup, b)
    row["rss_mb"], row["pss_mb"] = rss_mb(), rss_mb(kind="pss")
    expected = next(batches)
    del batches
    step = 1 + warmup + n
    t0 = time.perf_counter()
    got = next(pipe.train_batches(step))
    row["resume_first_batch_s"] = time.perf_counter() - t0
    row.update(first_batch_s=first, resume_step=step, resume_exact=_same(expected, got))
    row["steps_per_epoch"] = pipe.steps_per_epoch
    return row


def measure_full(config, n: int, warmup: int) -> dict:
    """The full-decode pipeline before design (a), timed in this process."""
    from resnet_jax import data

    data.configure_tensorflow()
    t0 = time.perf_counter()
    batches = full_decode_batches(config)
    next(batches)
    first = time.perf_counter() - t0
    row = time_batches(batches, n, warmup, config.batch_size)
    row.update(rss_mb=rss_mb(), pss_mb=rss_mb(kind="pss"), first_batch_s=first)
    return row


def measure_grain(grain_dir: str, config, n: int, warmup: int) -> dict:
    """Design (b), ``benchmarks.grain_pipeline`` with one worker process per
    core, timed like :func:`measure_tfdata` (the resume restores grain's
    iterator state saved at that step) in a process, and workers, where
    TensorFlow cannot be imported; RSS includes the workers."""
    import sys

    from benchmarks import grain_pipeline as gp

    gp.hide_tensorflow()
    b = config.batch_size
    ds = gp.train_dataset(
        grain_dir, b, int(config.seed), int(config.image_size), tuple(config.train_scale_range)
    )

    def start(state=None):
        return gp.train_iterator(ds, cores(), state=state, worker_init_fn=gp.hide_tensorflow)

    t0 = time.perf_counter()
    batches = start()
    next(batches)
    first = time.perf_counter() - t0
    row = time_batches(batches, n, warmup, b)
    row["rss_mb"] = rss_mb(with_children=True)
    row["pss_mb"] = rss_mb(with_children=True, kind="pss")
    state = batches.get_state()
    expected = next(batches)
    batches.close()
    t0 = time.perf_counter()
    resumed = start(state)
    got = next(resumed)
    row["resume_first_batch_s"] = time.perf_counter() - t0
    resumed.close()
    row.update(first_batch_s=first, resume_step=1 + warmup + n, resume_exact=_same(expected, got))
    row["steps_per_epoch"] = gp.steps_per_epoch(grain_dir, b)
    row["state_bytes"] = len(json.dumps(state))
    row["tensorflow_imported"] = "tensorflow" in sys.modules
    return row


def _same(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in ("image", "label"))


def prepare_array_record(data_dir: str, out: str) -> str:
    """``out``: imagenet2012 prepared by tfds as ArrayRecord files from the
    archives of ``data_dir`` (linked, not copied)."""
    from benchmarks import grain_pipeline as gp

    manual = os.path.join(data_dir, "downloads", "manual")
    os.makedirs(os.path.join(out, "downloads", "manual"), exist_ok=True)
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
        link = os.path.join(out, "downloads", "manual", name)
        if not os.path.exists(link):
            os.symlink(os.path.abspath(os.path.join(manual, name)), link)
    gp.prepare(out)
    return out


DESIGNS = ("crop", "full", "grain", "torchvision")
NAMES = {
    "crop": "(a) tf.data, encoded shuffle, crop decode, uint8",
    "full": "tf.data, decoded shuffle, full decode (before)",
    "grain": "(b) grain over ArrayRecord, Pillow, uint8",
    "torchvision": "torchvision ImageFolder + DataLoader",
}


def chosen_designs(a) -> list[str]:
    """``--designs``, less what ``--decode`` and ``--no-torch`` leave out."""
    names = [d for d in a.designs.split(",") if d]
    unknown = sorted(set(names) - set(DESIGNS))
    if unknown:
        raise SystemExit(f"--designs: unknown {', '.join(unknown)}; known: {', '.join(DESIGNS)}.")
    drop = {"crop": {"full"}, "full": {"crop"}, "both": set()}[a.decode]
    if not a.torch:
        drop.add("torchvision")
    return [d for d in DESIGNS if d in names and d not in drop]


def pipeline_only(a, config) -> dict:
    """Measures the host pipeline alone, each design in a fresh (spawned)
    process, ``--repeats`` times in turn (ABAB: every design sees the same
    load); every run is kept and each figure summarised as a spread."""
    import shutil

    from resnet_jax import data, mini_imagenet

    designs = chosen_designs(a)
    if "torchvision" in designs and importlib.util.find_spec("torchvision") is None:
        print("torchvision is not installed: skipping the PyTorch pipeline.")
        designs.remove("torchvision")
    if config.get("auto_augment") and "full" in designs:
        print("The full-decode pipeline has no auto_augment: skipping it.")
        designs.remove("full")
    if config.get("auto_augment") and "grain" in designs:
        print("benchmarks.grain_pipeline has no auto_augment: skipping design (b).")
        designs.remove("grain")
    if "grain" in designs and importlib.util.find_spec("grain") is None:
        print("grain is not installed: skipping design (b).")
        designs.remove("grain")
    tmp = tempfile.mkdtemp(prefix="input_pipeline_")
    try:
        if not config.data_dir:
            config.data_dir = os.path.join(tmp, "tfds")
            mini_imagenet.write(config.data_dir, a.mini_classes, a.mini_per_class, seed=0)
            print(f"Wrote a miniature ImageNet: {a.mini_classes} x {a.mini_per_class} JPEGs.")
        data.imagenet_preflight(config.data_dir)
        examples = data.dataset_info(config).train_size
        n, warmup, b = a.steps, a.warmup, config.batch_size
        jobs = {
            "crop": (measure_tfdata, config, n, warmup),
            "full": (measure_full, config, n, warmup),
        }
        if "grain" in designs:
            grain_dir = a.grain_data_dir or os.path.join(tmp, "array_record")
            prepare_array_record(config.data_dir, grain_dir)
            jobs["grain"] = (measure_grain, grain_dir, config, n, warmup)
        if "torchvision" in designs:
            folder = os.path.join(tmp, "image_folder")
            extract_image_folder(config.data_dir, folder, 10**9)  # every training JPEG
            args = (folder, data.transforms.train_crop(config), int(config.image_size))
            jobs["torchvision"] = (measure_torch, *args, tuple(config.train_scale_range), b, n)
            auto = (config.get("auto_augment", ""), int(config.get("randaugment_num_ops", 2)))
            auto += (int(config.get("randaugment_magnitude", 9)),)
            jobs["torchvision"] += (warmup, auto)
        print(f"{cores()} cores, batch {b}, {n} timed batches after {warmup}, {a.repeats} repeats")
        load = [os.getloadavg()]
        runs = {d: [] for d in designs}
        spawn = multiprocessing.get_context("spawn")  # workers may fork; grain's need no TF
        for _ in range(a.repeats):
            for d in designs:
                with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                    runs[d].append(pool.submit(*jobs[d]).result())
                load.append(os.getloadavg())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = {d: summarise(r) for d, r in runs.items()}
    print_rows(rows)
    return pipeline_result(a, config, rows, load, examples)


_FIGURES = ("images_per_sec", "images_per_sec_per_core", "images_per_cpu_second")
_FIGURES += ("rss_mb", "pss_mb", "first_batch_s", "resume_first_batch_s")


def summarise(runs: list[dict]) -> dict:
    """One design's runs: each figure as a spread, the rest of the first run,
    ``resume_exact`` only if every run resumed exactly; ``runs`` kept."""
    skip = (*_FIGURES, "seconds", "cpu_seconds", "resume_exact")
    row = {k: v for k, v in runs[0].items() if k not in skip}
    for k in _FIGURES:
        if all(k in r for r in runs):
            row[k] = common.spread([r[k] for r in runs])
    if "resume_exact" in runs[0]:
        row["resume_exact"] = all(r["resume_exact"] for r in runs)
    row["runs"] = runs
    return row


def print_rows(rows: dict) -> None:
    print(
        f"{'pipeline':<50} {'images/s':>9} {'per core':>9} {'per CPU-s':>9} {'RSS MiB':>8} "
        f"{'PSS MiB':>8} {'first s':>8} {'resume s':>9}"
    )
    for k, r in rows.items():
        resume = r.get("resume_first_batch_s")
        print(
            f"{NAMES[k]:<50} {r['images_per_sec']['median']:>9.0f} "
            f"{r['images_per_sec_per_core']['median']:>9.0f} "
            f"{r.get('images_per_cpu_second', {}).get('median', math.nan):>9.0f} "
            f"{r['rss_mb']['median']:>8.0f} "
            f"{r['pss_mb']['median']:>8.0f} "
            f"{r['first_batch_s']['median']:>8.2f} "
            + (f"{resume['median']:>9.2f}" if resume else f"{'-':>9}")
        )


def pipeline_result(a, config, rows: dict, load: list, examples: int) -> dict:
    """The recorded result: settings, every design's figures, the load average."""
    from resnet_jax import data

    main_row = rows.get("crop") or next(iter(rows.values()))
    per_core = main_row["images_per_sec_per_core"]["median"]
    result = {
        "mode": "pipeline_only",
        "config": os.path.basename(a.config),
        "dataset": config.dataset,
        "train_crop": data.transforms.train_crop(config),
        "batch_size": config.batch_size,
        "image_size": int(config.image_size),
        "train_scale_range": list(config.train_scale_range),
        # The same policy on both pipelines ('' is the paper's augmentation).
        "auto_augment": config.get("auto_augment", ""),
        "randaugment_num_ops": int(config.get("randaugment_num_ops", 2)),
        "randaugment_magnitude": int(config.get("randaugment_magnitude", 9)),
        "shuffle_buffer": int(config.shuffle_buffer),
        "train_examples": examples,
        "steps": a.steps,
        "warmup": a.warmup,
        "repeats": a.repeats,
        "cores": cores(),
        "designs": list(rows),
        "with_grain": "grain" in rows,
        # 1-minute load average before the first and after every measurement.
        "load_average_1m": common.spread([x[0] for x in load]),
        "images_per_sec": main_row["images_per_sec"]["median"],
        "images_per_sec_per_core": per_core,
        "rss_mb": main_row["rss_mb"]["median"],
        # Cores to feed 8 GPUs at 3,000 images/s each at this per-core rate.
        "cores_for_8x3000": math.ceil(24_000 / per_core),
        "pipelines": rows,
    }
    if "full" in rows and "crop" in rows:
        result["speedup_vs_full_decode"] = (
            rows["crop"]["images_per_sec"]["median"] / rows["full"]["images_per_sec"]["median"]
        )
    if "torchvision" in rows:
        result["per_core_vs_torchvision"] = (
            per_core / rows["torchvision"]["images_per_sec_per_core"]["median"]
        )
    if "grain" in rows and "crop" in rows:
        result["grain_per_core_vs_tfdata"] = (
            rows["grain"]["images_per_sec_per_core"]["median"] / per_core
        )
    return result


if __name__ == "__main__":
    main()
