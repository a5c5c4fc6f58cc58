"""What every benchmark script shares: its command line, the XLA set-up, the
benchmarked train step, and the results file it appends its line to.

A script's life:

    p = common.parser(__doc__, model="resnet20", batch_size=128, steps=20, repeats=3)
    a = p.parse_args(argv)
    common.configure(a)                 # XLA:CPU flags before JAX starts; compile cache
    materialize = common.resolve_materialize(a.materialize)
    ...                                 # measure
    common.record(result, a.results, benchmark="throughput", argv=argv)

``record`` appends ONE JSON line, ``{"benchmark", "provenance", "result"}``, to
``--results`` (default ``benchmarks/results/results.jsonl``; append-only, never
edited by hand) and prints it as the script's last line of output. The
provenance (commit, dirty tree, UTC time, host, CPU, GPU, package versions, the
command, XLA_FLAGS) is written by the script itself; ``benchmarks.report``
builds BENCHMARKS.md's tables from these lines only.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from configs.common import base_config
from resnet_jax import launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "results.jsonl")
CACHE = launch.DEFAULT_CACHE
DTYPES = ("float32", "bfloat16")
MATERIALIZE = ("auto", "on", "off")
PROVENANCE_KEYS = (
    "commit",
    "dirty",
    "time_utc",
    "hostname",
    "cpu_model",
    "cpu_count",
    "gpu",
    "versions",
    "command",
    "xla_flags",
)
# The results files themselves change with every run: they do not make the tree dirty.
_NOT_DIRTY = ":(exclude)benchmarks/results"


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def parser(doc: str, **defaults: Any) -> argparse.ArgumentParser:
    """An ``argparse`` parser with the flags every script shares.

    Always: ``--cpu-devices``, ``--cpu-conv``, ``--materialize``,
    ``--compilation-cache-dir``, ``--results``. Each of ``model``,
    ``batch_size``, ``dtype``, ``steps``, ``warmup``, ``repeats`` given in
    ``defaults`` adds ``--model``, ``--batch-size``, ... with that default.
    """
    p = launch.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = {
        "model": (str, "network name (rj.list_models())"),
        "batch_size": (int, "global batch, over all devices"),
        "steps": (int, "measured steps (per repeat)"),
        "warmup": (int, "steps run after compiling, before measuring"),
        "repeats": (int, "measurements of --steps steps each; every one is recorded"),
    }
    for key, (type_, help_) in helps.items():
        if key in defaults:
            flag = "--" + key.replace("_", "-")
            p.add_argument(flag, type=type_, default=defaults[key], help=help_)
    if "dtype" in defaults:
        p.add_argument("--dtype", default=defaults["dtype"], choices=DTYPES, help="compute dtype")
    _add_device_flags(p)
    p.add_argument(
        "--results",
        default=RESULTS,
        help="JSON-lines file the result is appended to ('' prints it only)",
    )
    return p


def _add_device_flags(p: argparse.ArgumentParser) -> None:
    launch.add_argparse_flags(p)  # --cpu-devices, --cpu-conv, --compilation-cache-dir, ...
    p.add_argument(
        "--materialize",
        default="auto",
        choices=MATERIALIZE,
        help="ResNet(materialize=...); auto: on when JAX's default backend is the CPU",
    )


def configure(a: argparse.Namespace) -> None:
    """Starts JAX as train.py does (resnet_jax.launch: the platform's XLA flags
    before its backends start, the cluster, the compile cache) and prints the
    XLA flags it runs with."""
    _check_args(a)
    launch.start(launch.options_from(a), log_level=None)
    if os.environ.get("XLA_FLAGS"):
        print(f"XLA_FLAGS={os.environ['XLA_FLAGS']}")


def _check_args(a: argparse.Namespace) -> None:
    """A bad model name or count is one line (exit status 2), before JAX starts."""
    import resnet_jax as rj

    prog = "python -m benchmarks." + os.path.splitext(os.path.basename(sys.argv[0]))[0]
    for key in ("batch_size", "steps", "repeats"):
        value = getattr(a, key, None)
        if value is not None and value < 1:
            launch.fail(prog, f"--{key.replace('_', '-')}={value} must be a positive integer.")
    if getattr(a, "warmup", None) is not None and a.warmup < 0:
        launch.fail(prog, f"--warmup={a.warmup} must be >= 0.")
    for name in [m for m in str(getattr(a, "model", None) or "").split(",") if m]:
        try:
            rj.model_spec(name)
        except ValueError as e:
            launch.fail(prog, str(e))


def resolve_materialize(choice: str) -> bool:
    """``--materialize``: ``auto`` is on for JAX's CPU backend, off elsewhere."""
    import jax

    if choice == "auto":
        return jax.default_backend() == "cpu"
    return choice == "on"


# --------------------------------------------------------------------------- #
# The benchmarked network and step
# --------------------------------------------------------------------------- #


def device_info() -> dict[str, Any]:
    """``platform``, ``devices`` (count) and ``device_kind`` of JAX's devices."""
    import jax

    dev = jax.devices()[0]
    return {"platform": dev.platform, "devices": jax.device_count(), "device_kind": dev.device_kind}


def input_size(net, image_size: int | None) -> int:
    """``image_size``, else the family's: 224 for ImageNet nets, 32 for CIFAR nets."""
    return image_size or (224 if net.stem == "imagenet" else 32)


def setup(
    model: str,
    batch_size: int,
    dtype: str,
    *,
    materialize: bool,
    image_size: int | None = None,
    variant: str = "v1",
    num_classes: int | None = None,
):
    """The network and its replicated train state (the trainer's optimizer:
    SGD momentum 0.9, weight decay 1e-4, learning rate 0.1) over every device.

    Returns ``(module, state, replicated_sharding, batch_sharding)``.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import resnet_jax as rj
    from resnet_jax.training import recipe

    options: dict[str, Any] = {"materialize": materialize}
    if num_classes is not None:
        options["num_classes"] = num_classes
    net = rj.create_model(model, variant=variant, dtype=getattr(jnp, dtype), **options)
    size = input_size(net, image_size)
    mesh = recipe.create_mesh()
    if batch_size % mesh.devices.size:
        raise SystemExit(
            f"--batch-size {batch_size} must divide by the {mesh.devices.size} devices."
        )
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    tx = recipe.create_optimizer(base_config(), lambda step: 0.1)
    state = recipe.create_train_state(net, tx, (size, size, 3), jax.random.key(0), repl)
    return net, state, repl, data


def synthetic_batch(net, batch_size: int, image_size: int | None, sharding) -> dict:
    """A fixed random batch (images, labels, mask) for ``net``, sharded over the devices."""
    import jax

    size, num_classes = input_size(net, image_size), net.num_classes
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
        "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
        "mask": np.ones((batch_size,), np.float32),
    }
    return jax.device_put(batch, sharding)


def jit_train_step(num_classes: int, repl, data):
    """train.py's train step, jitted as the trainer does (state donated)."""
    import jax

    from resnet_jax.training import steps as train_steps

    return jax.jit(
        functools.partial(
            train_steps.train_step, learning_rate_fn=lambda s: 0.1, num_classes=num_classes
        ),
        in_shardings=(repl, data),
        out_shardings=(repl, repl),
        donate_argnums=0,
    )


def compile_timed(jitted, *args) -> tuple[Any, float, str]:
    """Compiles ``jitted`` for ``args``: ``(executable, seconds, cache)``, where
    ``cache`` is ``'off'`` (the persistent compilation cache was not asked),
    ``'hit'`` (the executable was read from it) or ``'miss'``."""
    import jax

    events: list[str] = []

    def listen(event: str, **kwargs: Any) -> None:
        events.append(event)

    jax.monitoring.register_event_listener(listen)
    try:
        t0 = time.perf_counter()
        compiled = jitted.lower(*args).compile()
        seconds = time.perf_counter() - t0
    finally:
        jax.monitoring.unregister_event_listener(listen)
    if "/jax/compilation_cache/cache_hits" in events:
        return compiled, seconds, "hit"
    if "/jax/compilation_cache/compile_requests_use_cache" in events:
        return compiled, seconds, "miss"
    return compiled, seconds, "off"


def repeat_figures(batch_size: int, steps: int, seconds: list[float]) -> dict:
    """Per-repeat and summarised step time (ms) and images/s of timed runs."""
    runs = [
        {"seconds": s, "step_ms": 1000 * s / steps, "images_per_sec": batch_size * steps / s}
        for s in seconds
    ]
    return {
        "repeats": runs,
        "step_ms": spread([r["step_ms"] for r in runs]),
        "images_per_sec": spread([r["images_per_sec"] for r in runs]),
    }


def spread(values: Sequence[float]) -> dict[str, float]:
    """``{"median", "min", "max", "n"}`` of repeated measurements."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


# --------------------------------------------------------------------------- #
# Provenance and the results file
# --------------------------------------------------------------------------- #


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str | None]:
    """Installed versions of the packages a figure depends on (torch and
    tensorflow only where this process imported them)."""
    names = ["jax", "jaxlib", "flax", "optax", "numpy"]
    names += [m for m in ("torch", "torchvision", "tensorflow") if m in sys.modules]
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = getattr(sys.modules.get(name), "__version__", None)
    return versions


def provenance(
    benchmark: str, argv: Sequence[str] | None = None, gpu: str | None = None
) -> dict[str, Any]:
    """Where and how a figure was made: every key of ``PROVENANCE_KEYS``.

    ``dirty`` is true when ``git status`` lists a change outside
    ``benchmarks/results/``; ``command`` is the script's command line, as
    ``python -m benchmarks.NAME ARGS`` (``argv``: the arguments its ``main``
    parsed, default ``sys.argv[1:]``); ``gpu`` is the accelerator's device
    kind, None on a CPU-only run.
    """
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--", ".", _NOT_DIRTY)
    args = list(sys.argv[1:] if argv is None else argv)
    return {
        "commit": commit.strip() if commit else None,
        "dirty": None if status is None else bool(status.strip()),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "versions": _versions(),
        "command": shlex.join(["python", "-m", f"benchmarks.{benchmark}", *args]),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def record(
    result: dict[str, Any],
    results_path: str | None,
    *,
    benchmark: str,
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Appends ``{"benchmark", "provenance", "result"}`` as one JSON line to
    ``results_path`` ('' or None: write nothing) and prints it; returns it.

    ``result`` holds the settings and the figures; its ``platform`` and
    ``device_kind`` (see :func:`device_info`) name the GPU in the provenance.
    """
    gpu = result.get("device_kind") if result.get("platform") not in (None, "cpu") else None
    line = {
        "benchmark": benchmark,
        "provenance": provenance(benchmark, argv, gpu),
        "result": result,
    }
    text = json.dumps(line, sort_keys=False, default=_jsonable)
    if results_path:
        folder = os.path.dirname(results_path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        with open(results_path, "a") as f:
            f.write(text + "\n")
    print(text, flush=True)
    return json.loads(text)


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable: {x!r}")
