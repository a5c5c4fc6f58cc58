"""A long mock-data run of a tiny model; reports host memory at start and end.

    python -m benchmarks.host_memory --steps 3000

Runs train.py's loop (resnet8, CIFAR-10 mock data, batch 16, a new tf.data
epoch every 4 steps, evaluation and checkpoints every 500 steps) and reads the
``host_rss_mb`` the trainer logs every 100 steps. A leak shows as RSS growing
with the step; a healthy run is flat after the first windows.
"""

import json
import os
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 3000, "Training steps.")


def main(argv):
    del argv
    import logging

    import jax

    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines

    from configs import cifar10
    from resnet_jax import train_lib

    c = cifar10.get_config()
    c.update(
        model="resnet8",
        mock_data=True,
        mock_num_examples=64,
        batch_size=16,
        eval_batch_size=16,
        num_train_steps=FLAGS.steps,
        log_every_steps=100,
        eval_every_steps=500,
        checkpoint_every_steps=500,
    )
    with tempfile.TemporaryDirectory() as workdir:
        train_lib.train_and_evaluate(c, workdir, progress=False)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rss = [(m["step"], m["host_rss_mb"]) for m in map(json.loads, f) if "host_rss_mb" in m]
    for step, mb in rss:
        print(f"step {step:>6}: host RSS {mb:8.1f} MiB")
    first, last = rss[1], rss[-1]  # rss[0] is before the first evaluation/checkpoint
    print(
        json.dumps(
            {
                "steps": FLAGS.steps,
                "devices": jax.device_count(),
                "rss_mb_at_step": {str(first[0]): first[1], str(last[0]): last[1]},
                "rss_growth_mb": last[1] - first[1],
                "rss_max_mb": max(m for _, m in rss),
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
