"""Trains a ResNet with a recipe from configs/.

    python train.py --config configs/cifar10.py --workdir runs/cifar10 \
        [--config.model=resnet56 --config.batch_size=256 ...]

Running the same command again in the same --workdir resumes from its newest
checkpoint. Multi-host: launch one process per host with
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (GPU), or
``--distributed`` where JAX detects the cluster itself (Cloud TPU, SLURM).

A mistake in the command (config, options, data, workdir) is reported as one
line on stderr with exit status 2; anything else is a bug and keeps its
traceback. Process start-up (cluster, XLA flags, compilation cache, logging)
is :mod:`resnet_jax.launch`, shared with every other command.
"""

import os
import sys

# Before jax (jaxlib) is imported, or TensorFlow's C++ warnings (a data loss
# aborting a tf.data rendezvous, say) surround the one-line error.
if "--verbose" not in sys.argv:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from resnet_jax import launch  # noqa: E402
from resnet_jax.errors import CheckpointSaveError  # noqa: E402
from resnet_jax.training import loop  # noqa: E402

PROG = "train.py"
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.", required=True)
config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.DEFINE_bool("progress", True, "Show a progress bar.")
launch.define_absl_flags(flags)


def _leave_now(e) -> None:
    """After a failed checkpoint save, orbax's writer threads are failing too
    and print as they die: leave at once, with nothing more on the screen."""
    if isinstance(e, CheckpointSaveError):
        sys.stdout.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os._exit(2)


def main(argv):
    del argv

    def train():
        jax = launch.start(launch.options_from(FLAGS))
        launch.describe_devices()
        summary = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
        if jax.process_index() == 0:
            print(loop.summary_line(summary), flush=True)

    launch.run(PROG, train, on_error=_leave_now)


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: launch.parse_absl_flags(PROG, flags, argv))
