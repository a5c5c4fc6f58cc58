"""Process start-up shared by every command: ``train.py``,
``python -m resnet_jax.evaluate``, ``experiments/`` and ``benchmarks/``.

One :class:`Options` record holds what a command line may set about the
process (not the experiment): the cluster (``jax.distributed``), the XLA
settings of the platform (:mod:`resnet_jax.xla_cpu`, :mod:`resnet_jax.xla_gpu`),
the compilation cache and how much the libraries may print. absl commands
define its flags with :func:`define_absl_flags` (``--cpu_devices``), argparse
commands with :func:`add_argparse_flags` (``--cpu-devices``); both then call
:func:`start`, which sets up the screen and starts JAX in the right order:

1. before TensorFlow or JAX start: their start-up notices off the screen;
2. logging: resnet_jax's messages plain on stderr, the libraries' only with
   ``verbose``; orbax's background-thread noise after a failed save, and
   asyncio's reports of its unretrieved failed reads, dropped;
3. the platform's XLA flags (only while JAX has not started its backends: a
   process that already runs JAX, such as a test session, keeps its own);
4. ``jax.distributed.initialize`` for a multi-process run;
5. the persistent compilation cache.

Importing this module imports JAX but starts none of its backends: XLA reads
``XLA_FLAGS`` when the first one starts.

A user's mistake is one line on stderr through :func:`fail` (``PROG: error:
...``, exit status 2), whichever command made it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

import jax
from jax._src import xla_bridge  # no public way to ask whether backends started (jax 0.10)

from resnet_jax import xla_cpu, xla_gpu
from resnet_jax.errors import FLAG_PARSE_ERRORS, UserError, flag_error_message, one_line

log = logging.getLogger("resnet_jax")

DEFAULT_CACHE = os.path.expanduser("~/.cache/resnet_jax/jax_compilation_cache")
# JAX's variable for the shortest compile time whose program the cache keeps.
MIN_COMPILE_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


@dataclasses.dataclass
class Options:
    """What a command line sets about the process (not the experiment)."""

    verbose: bool = False
    cpu_devices: int = 0
    cpu_conv: str = "eigen"
    gpu_xla_defaults: bool = True
    deterministic: bool = False
    distributed: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    compilation_cache_dir: str = DEFAULT_CACHE


# --------------------------------------------------------------------------- #
# Flags: absl (train.py, evaluate) and argparse (experiments, benchmarks)
# --------------------------------------------------------------------------- #

_HELP = {
    "verbose": "Show the libraries' own log messages (JAX, TF, orbax).",
    "cpu_devices": (
        "On a CPU-only host, split the CPU into this many XLA devices (e.g. one per core): "
        "XLA:CPU runs convolution gradients on about one core, so this trains faster."
    ),
    "cpu_conv": (
        "Convolution kernels of XLA:CPU: 'eigen' (measured faster for ResNet training) or "
        "'ynn' (YNNPACK, XLA's default). Set only when the CPU is the platform."
    ),
    "gpu_xla_defaults": (
        "On NVIDIA GPUs, add the XLA flags NVIDIA's JAX containers set for data-parallel "
        "training (the latency-hiding scheduler); flags already in XLA_FLAGS win."
    ),
    "deterministic": (
        "On NVIDIA GPUs, run XLA's deterministic ops (needed for bit-exact resume on a GPU; "
        "slower). CPU runs are deterministic already."
    ),
    "distributed": "Call jax.distributed.initialize() (auto-detected cluster: Cloud TPU, SLURM).",
    "coordinator_address": "HOST:PORT of process 0 (multi-process runs).",
    "num_processes": "Number of processes (multi-process runs).",
    "process_id": "This process's index (multi-process runs).",
    "compilation_cache_dir": "Persistent XLA compilation cache ('' disables it).",
}


def define_absl_flags(flags: Any) -> None:
    """Defines every :class:`Options` field as an absl flag (``--cpu_devices``, ...).

    ``flags`` is ``absl.flags`` (passed in: this module does not import absl).
    """
    flags.DEFINE_bool("verbose", False, _HELP["verbose"])
    flags.DEFINE_integer("cpu_devices", 0, _HELP["cpu_devices"])
    flags.DEFINE_enum("cpu_conv", "eigen", list(xla_cpu.CONV_BACKENDS), _HELP["cpu_conv"])
    flags.DEFINE_bool("gpu_xla_defaults", True, _HELP["gpu_xla_defaults"])
    flags.DEFINE_bool("deterministic", False, _HELP["deterministic"])
    flags.DEFINE_bool("distributed", False, _HELP["distributed"])
    flags.DEFINE_string("coordinator_address", None, _HELP["coordinator_address"])
    flags.DEFINE_integer("num_processes", None, _HELP["num_processes"])
    flags.DEFINE_integer("process_id", None, _HELP["process_id"])
    flags.DEFINE_string("compilation_cache_dir", DEFAULT_CACHE, _HELP["compilation_cache_dir"])


def add_argparse_flags(parser: argparse.ArgumentParser) -> None:
    """Adds every :class:`Options` field to ``parser`` (``--cpu-devices``, ...)."""
    parser.add_argument("--verbose", action="store_true", help=_HELP["verbose"])
    parser.add_argument("--cpu-devices", type=int, default=0, help=_HELP["cpu_devices"])
    parser.add_argument(
        "--cpu-conv", choices=xla_cpu.CONV_BACKENDS, default="eigen", help=_HELP["cpu_conv"]
    )
    parser.add_argument(
        "--no-gpu-xla-defaults",
        dest="gpu_xla_defaults",
        action="store_false",
        help="Leave out " + _HELP["gpu_xla_defaults"][0].lower() + _HELP["gpu_xla_defaults"][1:],
    )
    parser.add_argument("--deterministic", action="store_true", help=_HELP["deterministic"])
    parser.add_argument("--distributed", action="store_true", help=_HELP["distributed"])
    parser.add_argument("--coordinator-address", default=None, help=_HELP["coordinator_address"])
    parser.add_argument("--num-processes", type=int, default=None, help=_HELP["num_processes"])
    parser.add_argument("--process-id", type=int, default=None, help=_HELP["process_id"])
    parser.add_argument(
        "--compilation-cache-dir", default=DEFAULT_CACHE, help=_HELP["compilation_cache_dir"]
    )


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose mistakes are one line (``PROG: error:
    ...``, exit status 2) instead of the usage text and the error; ``--help``
    still prints the usage."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (--help lists the options)")


def options_from(values: Any) -> Options:
    """The :class:`Options` of parsed flags: absl's ``FLAGS`` or an argparse namespace."""
    return Options(**{f.name: getattr(values, f.name) for f in dataclasses.fields(Options)})


# --------------------------------------------------------------------------- #
# Start-up
# --------------------------------------------------------------------------- #


def quiet_environment(verbose: bool) -> None:
    """Before TensorFlow or JAX start: keep their start-up notices off the screen."""
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # TF prints its oneDNN notice whatever the log level; TF only runs the
        # input pipeline's image operations here.
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


class _Format(logging.Formatter):
    def format(self, record):
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def setup_logging(verbose: bool, level: int = logging.INFO) -> None:
    """resnet_jax's messages (``level`` and above) plain on stderr; the other
    libraries' only with ``verbose`` (orbax logs every save through absl)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO if verbose else level)
    logging.getLogger("absl").setLevel(logging.INFO if verbose else logging.CRITICAL)
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("tensorflow").setLevel(logging.INFO if verbose else logging.ERROR)


def drop_closed_loop_noise() -> None:
    """After a checkpoint write fails (a full disk), tensorstore's threads still
    call back into orbax's closed event loop, and Python prints each of those
    errors (``sys.unraisablehook``, ``sys.excepthook``). They say nothing the
    one-line error does not; kept with ``verbose``. Any other error prints as before."""

    def noise(kind, value) -> bool:
        return (
            kind is RuntimeError
            and str(value) == "Event loop is closed"
            and threading.current_thread() is not threading.main_thread()
        )

    previous_hook, previous_unraisable = sys.excepthook, sys.unraisablehook

    def hook(kind, value, tb):
        if not noise(kind, value):
            previous_hook(kind, value, tb)

    def unraisable(args):
        if not noise(args.exc_type, args.exc_value):
            previous_unraisable(args)

    sys.excepthook, sys.unraisablehook = hook, unraisable


class _UnretrievedTaskFilter(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" reports."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Task exception was never retrieved")


def drop_unretrieved_task_noise() -> None:
    """When orbax reads a damaged checkpoint, each array read fails in its own
    asyncio task; orbax raises the first error (which the one-line error
    names) and leaves the others unretrieved, and asyncio logs each of those
    with a traceback when it is collected, at a moment that varies from run to
    run. Those reports are dropped (kept with ``verbose``); asyncio's other
    messages pass."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _UnretrievedTaskFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(_UnretrievedTaskFilter())


def configure_xla(options: Options) -> None:
    """The platform's XLA flags, while JAX has not started its backends."""
    if xla_bridge.backends_are_initialized():
        return
    if xla_cpu.cpu_is_the_platform():
        xla_cpu.configure(options.cpu_devices, options.cpu_conv)
    elif xla_gpu.gpu_is_the_platform():
        xla_gpu.configure(options.gpu_xla_defaults, options.deterministic)


def start(options: Options, *, log_level: int | None = logging.INFO) -> Any:
    """Sets up the screen and starts JAX (and the cluster, if any); returns ``jax``.

    ``log_level``: of resnet_jax's messages on the screen; None leaves logging
    as the caller set it (a script run inside another program, or a test).

    Raises:
      UserError: multi-process flags given in part.
    """
    if options.cpu_devices < 0:
        raise UserError(
            f"--cpu_devices={options.cpu_devices}: give the number of XLA devices to split a "
            "CPU host into (e.g. one per core), or 0 for one device."
        )
    quiet_environment(options.verbose)
    if log_level is not None:
        setup_logging(options.verbose, log_level)
        if not options.verbose:
            drop_closed_loop_noise()
            drop_unretrieved_task_noise()
    configure_xla(options)
    cluster = (options.coordinator_address, options.num_processes, options.process_id)
    if any(v is not None for v in cluster):
        if any(v is None for v in cluster):
            raise UserError(
                "--coordinator_address, --num_processes and --process_id go together; give "
                "all three (or --distributed where JAX detects the cluster itself)."
            )
        jax.distributed.initialize(*cluster)
    elif options.distributed:
        jax.distributed.initialize()
    _check_platforms(jax)
    if options.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", options.compilation_cache_dir)
        # Programs that took 0.5 s or more to compile (JAX's default: 1 s);
        # JAX's own variable, where it is set, decides instead.
        if MIN_COMPILE_TIME_ENV not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if jax.process_index() != 0 and not options.verbose and log_level is not None:
        log.setLevel(logging.WARNING)  # one plan on the screen, not one per process
    return jax


def _check_platforms(jax: Any) -> None:
    """Starts JAX's backends; a ``JAX_PLATFORMS`` this machine cannot run is one line."""
    try:
        jax.devices()
    # AssertionError: JAX skips a platform whose hardware it cannot see (cuda
    # without an NVIDIA GPU) and then asserts that it has a default backend.
    except (RuntimeError, AssertionError) as e:
        asked = os.environ.get("JAX_PLATFORMS")
        if not asked:
            raise  # JAX found no backend of its own accord: not a user's setting
        reason = one_line(str(e).splitlines()[0])[:200] if str(e) else "no such device here"
        raise UserError(
            f"JAX_PLATFORMS={asked} names a backend JAX cannot start on this machine "
            f"({reason}); unset it, or install JAX's plugin "
            "for it (docs/accelerators.md#installing-for-gpus-and-tpus)."
        ) from e


def describe_devices() -> str:
    """Logs and returns the first line of the screen: the devices JAX found
    (and warns when a GPU machine runs JAX on the CPU)."""
    devices, kind = jax.devices(), jax.devices()[0].device_kind
    fallback = xla_gpu.cpu_fallback_warning(devices[0].platform)
    if fallback and "cpu" not in os.environ.get("JAX_PLATFORMS", ""):
        log.warning(fallback)
    line = "JAX {}: {} {} device{}{}, {} process{}.".format(
        jax.__version__,
        len(devices),
        devices[0].platform.upper(),
        "s" if len(devices) > 1 else "",
        f" ({kind})" if kind.lower() != devices[0].platform else "",
        jax.process_count(),
        "es" if jax.process_count() > 1 else "",
    )
    log.info(line)
    return line


# --------------------------------------------------------------------------- #
# One error printer
# --------------------------------------------------------------------------- #


def fail(prog: str, message: Any) -> NoReturn:
    """Prints ``PROG: error: MESSAGE`` as one line on stderr and exits with status 2."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse_absl_flags(prog: str, flags: Any, argv: list[str]) -> list[str]:
    """absl's parsing and the ``--config`` file's loading (ml_collections loads
    it lazily: loaded here), with a mistake in either reported by :func:`fail`."""
    values = flags.FLAGS
    try:
        rest = values(argv)
        if "config" in values and values.config is not None:
            values.config.to_dict()
    except (flags.Error, *FLAG_PARSE_ERRORS) as e:
        fail(prog, flag_error_message(e))
    joined = _tuples_given_twice(argv[1:], values)
    if joined:
        fail(
            prog,
            f"{joined} is given twice: ml_collections would join the two tuples into one "
            "(a scalar key keeps the last value); give it once.",
        )
    return rest


def _tuples_given_twice(args: list[str], values: Any) -> str | None:
    """The first ``--config.KEY`` of ``args`` given twice whose value is a tuple."""
    seen = set()
    for arg in args:
        if arg == "--":
            break
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config.") :].split("=", 1)[0]
        if key in seen and isinstance(_config_value(values.config, key), tuple | list):
            return f"--config.{key}"
        seen.add(key)
    return None


def _config_value(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


def run(
    prog: str, main: Callable[[], Any], *, on_error: Callable[[UserError], None] | None = None
) -> Any:
    """Runs ``main()``; a :class:`UserError` is one line (status 2) and a second
    Ctrl-C, which stops a run where it is, one line (status 130).

    ``on_error`` runs after the line is printed (e.g. to leave at once when
    background threads are failing too).

    When ``main`` ends, however it ends, every object moves to the garbage
    collector's permanent generation (``gc.freeze``): the process is about to
    exit and the operating system frees its memory, while Python's collection
    at exit would walk every object of TensorFlow and JAX first (a tenth of a
    tiny training run's time). ``atexit`` handlers still run and open files
    are still flushed and closed.
    """
    try:
        return main()
    except UserError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        if on_error is not None:
            on_error(e)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command to go on.", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        gc.freeze()
