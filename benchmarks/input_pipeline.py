"""Runs the input pipeline and the train step together; reports time waiting for data.

    python -m benchmarks.input_pipeline --config configs/cifar10.py \
        --config.mock_data=True --steps 300 [--config.key=value ...]

The trainer measures, for every logging window, the wall time spent in
``next(batches)`` (the host waiting for the input pipeline) and logs it as
``data_wait_fraction``; this script runs a real training loop for ``--steps``
steps in a temporary workdir and summarises those figures. A fraction near 0
means the accelerator is the bottleneck; near 1, the input pipeline is.
Prints a table and, last, one JSON line.
"""

import json
import os
import platform
import tempfile

import numpy as np
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/cifar10.py", "A configs/*.py file.")
flags.DEFINE_integer("steps", 300, "Training steps to run.")
flags.DEFINE_integer("log_every", 50, "Steps per measurement window.")


def main(argv):
    del argv
    import logging

    import jax

    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines

    from resnet_jax import train_lib

    config = FLAGS.config
    config.num_train_steps = FLAGS.steps
    config.log_every_steps = FLAGS.log_every
    config.eval_every_steps = 10**9  # only the final evaluation
    config.checkpoint_every_steps = 10**9
    with tempfile.TemporaryDirectory() as workdir:
        train_lib.train_and_evaluate(config, workdir, progress=False)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            lines = [json.loads(x) for x in f if "data_wait_fraction" in x]
    steady = lines[1:] or lines  # the first window includes compilation
    wait = float(np.mean([m["data_wait_fraction"] for m in steady]))
    ips = float(np.mean([m["images_per_sec"] for m in steady]))
    print(f"{'window end':>10} {'images/s':>10} {'waiting for data':>17}")
    for m in lines:
        print(f"{m['step']:>10} {m['images_per_sec']:>10.0f} {m['data_wait_fraction']:>16.1%}")
    result = {
        "dataset": config.dataset,
        "mock_data": bool(config.mock_data),
        "model": config.model,
        "batch_size": config.batch_size,
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "cpu": platform.processor() or platform.machine(),
        "steps": FLAGS.steps,
        "images_per_sec": ips,
        "data_wait_fraction": wait,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
