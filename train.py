"""Trains a ResNet with a recipe from configs/.

    python train.py --config configs/cifar10.py --workdir runs/cifar10 \
        [--config.model=resnet56 --config.batch_size=256 ...]

Running the same command again in the same --workdir resumes from its newest
checkpoint. Multi-host: launch one process per host with
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (GPU), or
``--distributed`` where JAX detects the cluster itself (Cloud TPU, SLURM).

A mistake in the command (config, options, data, workdir) is reported as one
line on stderr with exit status 2; anything else is a bug and keeps its
traceback.
"""

import logging
import os
import sys
import threading

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.", required=True)
config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (auto-detected cluster)."
)
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.DEFINE_string(
    "compilation_cache_dir",
    os.path.expanduser("~/.cache/resnet_jax/jax_compilation_cache"),
    "Persistent XLA compilation cache ('' disables it).",
)
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_bool("verbose", False, "Show the libraries' own log messages (JAX, TF, orbax).")
flags.DEFINE_integer(
    "cpu_devices",
    0,
    "On a CPU-only host, split the CPU into this many XLA devices (e.g. one per core): "
    "XLA:CPU runs convolution gradients on about one core, so this trains faster.",
)
flags.DEFINE_bool(
    "gpu_xla_defaults",
    True,
    "On NVIDIA GPUs, add the XLA flags NVIDIA's JAX containers set for data-parallel "
    "training (the latency-hiding scheduler); flags already in XLA_FLAGS win.",
)
flags.DEFINE_bool(
    "deterministic",
    False,
    "On NVIDIA GPUs, run XLA's deterministic ops (needed for bit-exact resume on a GPU; "
    "slower). CPU runs are deterministic already.",
)
flags.DEFINE_enum(
    "cpu_conv",
    "eigen",
    ["eigen", "ynn"],
    "Convolution kernels of XLA:CPU: 'eigen' (measured faster for ResNet training) or "
    "'ynn' (YNNPACK, XLA's default). Set only when the CPU is the platform.",
)

log = logging.getLogger("resnet_jax")


class _Format(logging.Formatter):
    def format(self, record):
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def _quiet_start(verbose: bool) -> None:
    """Before TensorFlow or JAX start: keep their start-up notices off the screen."""
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # TF prints its oneDNN notice whatever the log level; TF only runs the
        # input pipeline's image operations here.
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def _drop_closed_loop_noise() -> None:
    """After a checkpoint write fails (a full disk), tensorstore's threads still
    call back into orbax's closed event loop, and Python prints each of those
    errors (``sys.unraisablehook``, ``sys.excepthook``). They say nothing the one-line error does
    not; keep them for --verbose. Any other error prints as before."""

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


def _setup_logging(verbose: bool) -> None:
    """Our messages plain on stderr; other libraries' only with --verbose."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    # orbax logs every save through absl, and its errors again when they are raised.
    quiet = logging.DEBUG if verbose else logging.CRITICAL
    logging.getLogger("absl").setLevel(logging.INFO if verbose else quiet)
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("tensorflow").setLevel(logging.INFO if verbose else logging.ERROR)


def _start_jax():
    """XLA flags for the platform, then JAX (and the cluster, if any)."""
    from resnet_jax import xla_cpu, xla_gpu

    if xla_cpu.cpu_is_the_platform():
        xla_cpu.configure(FLAGS.cpu_devices, FLAGS.cpu_conv)
    elif xla_gpu.gpu_is_the_platform():
        xla_gpu.configure(FLAGS.gpu_xla_defaults, FLAGS.deterministic)
    import jax

    if FLAGS.coordinator_address:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()
    if FLAGS.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return jax


def _describe_devices(jax) -> None:
    """The first line of the screen: the devices JAX found (and a warning when
    a GPU machine runs JAX on the CPU)."""
    from resnet_jax import xla_gpu

    devices, kind = jax.devices(), jax.devices()[0].device_kind
    fallback = xla_gpu.cpu_fallback_warning(devices[0].platform)
    if fallback and "cpu" not in os.environ.get("JAX_PLATFORMS", ""):
        log.warning(fallback)
    log.info(
        "JAX %s: %d %s device%s%s, %d process%s.",
        jax.__version__,
        len(devices),
        devices[0].platform.upper(),
        "s" if len(devices) > 1 else "",
        f" ({kind})" if kind.lower() != devices[0].platform else "",
        jax.process_count(),
        "es" if jax.process_count() > 1 else "",
    )


def main(argv):
    del argv
    _quiet_start(FLAGS.verbose)
    _setup_logging(FLAGS.verbose)
    if not FLAGS.verbose:
        _drop_closed_loop_noise()
    jax = _start_jax()
    if jax.process_index() != 0 and not FLAGS.verbose:
        log.setLevel(logging.WARNING)  # one plan on the screen, not one per process
    from resnet_jax.errors import CheckpointSaveError, UserError, one_line
    from resnet_jax.training import loop

    _describe_devices(jax)
    try:
        summary = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
    except UserError as e:
        print(f"train.py: error: {one_line(e)}", file=sys.stderr, flush=True)
        if isinstance(e, CheckpointSaveError):
            # orbax's writer threads are failing too, and print as they die:
            # leave at once, with nothing more on the screen.
            sys.stdout.flush()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os._exit(2)
        sys.exit(2)
    if jax.process_index() == 0:
        print(loop.summary_line(summary), flush=True)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing and the config file's loading, with a mistake in
    either reported as one line (exit status 2)."""
    try:
        rest = FLAGS(argv)
        FLAGS.config.to_dict()  # ml_collections loads the file lazily: load it now
        return rest
    except (
        flags.Error,
        LookupError,
        AttributeError,
        TypeError,
        ValueError,
        OSError,
        SyntaxError,
    ) as e:
        # Imported here: resnet_jax imports jax, which must wait for --cpu_devices.
        from resnet_jax.errors import flag_error_message

        print(f"train.py: error: {flag_error_message(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
