"""Trains a ResNet with a recipe from configs/.

    python train.py --config configs/cifar10.py --workdir runs/cifar10 \
        [--config.model=resnet56 --config.batch_size=256 ...]

Running the same command again in the same --workdir resumes from its newest
checkpoint. Multi-host: launch one process per host with
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (GPU), or
``--distributed`` where JAX detects the cluster itself (Cloud TPU, SLURM).
"""

import logging
import os
import sys

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
flags.DEFINE_integer(
    "cpu_devices",
    0,
    "On a CPU-only host, split the CPU into this many XLA devices (e.g. one per core): "
    "XLA:CPU runs convolution gradients on about one core, so this trains faster.",
)
flags.DEFINE_enum(
    "cpu_conv",
    "eigen",
    ["eigen", "ynn"],
    "Convolution kernels of XLA:CPU: 'eigen' (measured faster for ResNet training) or "
    "'ynn' (YNNPACK, XLA's default). No effect on GPU/TPU.",
)


def main(argv):
    del argv
    from resnet_jax import xla_cpu

    xla_cpu.configure(FLAGS.cpu_devices, FLAGS.cpu_conv)
    import jax

    if FLAGS.coordinator_address:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()
    if FLAGS.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from resnet_jax import train_lib

    logging.getLogger().setLevel(logging.INFO)
    # orbax logs every step of every save at INFO through absl; keep warnings.
    logging.getLogger("absl").setLevel(logging.WARNING)
    config = FLAGS.config
    logging.info(
        "JAX %s: process %d of %d, %d local / %d global devices (%s).",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    summary = train_lib.train_and_evaluate(config, FLAGS.workdir, progress=FLAGS.progress)
    if jax.process_index() == 0:
        print(train_lib.summary_line(summary), flush=True)
    if summary.get("preempted"):
        sys.exit(0)


if __name__ == "__main__":
    app.run(main)
