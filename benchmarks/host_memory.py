"""A long mock-data run of a tiny model; records host memory along the run.

    python -m benchmarks.host_memory --steps 3000

Runs train.py's loop (``loop.train_and_evaluate``: CIFAR-10 mock data,
64 examples, so a new tf.data epoch every 64 / ``--batch-size`` steps,
evaluation and checkpoints every ``--eval-every`` steps) and reads the
``host_rss_mb`` the trainer logs every ``--log-every`` steps. A leak shows as
RSS growing with the step; a healthy run is flat after the first evaluation
and checkpoint. Records the whole series, the RSS at the first window after
the first one and at the last, the growth between them and the maximum.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

from benchmarks import common


def rss_series(a) -> list[tuple[int, float]]:
    """Runs the loop; ``(step, host RSS in MiB)`` of every logging window."""
    from configs import cifar10
    from resnet_jax.training import loop

    c = cifar10.get_config()
    c.update(
        model=a.model,
        materialize=common.resolve_materialize(a.materialize),
        mock_data=True,
        mock_num_examples=64,
        batch_size=a.batch_size,
        eval_batch_size=a.batch_size,
        num_train_steps=a.steps,
        log_every_steps=a.log_every,
        eval_every_steps=a.eval_every,
        checkpoint_every_steps=a.eval_every,
    )
    with tempfile.TemporaryDirectory() as workdir:
        loop.train_and_evaluate(c, workdir, progress=False)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return [(m["step"], m["host_rss_mb"]) for m in map(json.loads, f) if "host_rss_mb" in m]


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__, model="resnet8", batch_size=16, steps=3000)
    p.add_argument("--log-every", type=int, default=100, help="steps between RSS readings")
    p.add_argument("--eval-every", type=int, default=500, help="steps between eval + checkpoint")
    a = p.parse_args(argv)
    common.configure(a)
    from resnet_jax import data

    data.configure_tensorflow()
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines
    rss = rss_series(a)
    if len(rss) < 2:
        raise SystemExit("Too few readings: --steps must be at least twice --log-every.")
    for step, mb in rss:
        print(f"step {step:>6}: host RSS {mb:8.1f} MiB")
    first, last = rss[1], rss[-1]  # rss[0]: the first window, still starting up
    result = {
        "model": a.model,
        "batch_size": a.batch_size,
        "materialize": common.resolve_materialize(a.materialize),
        **common.device_info(),
        "steps": a.steps,
        "log_every": a.log_every,
        "eval_every": a.eval_every,
        "rss_mb": [{"step": s, "mb": mb} for s, mb in rss],
        "rss_first": {"step": first[0], "mb": first[1]},
        "rss_last": {"step": last[0], "mb": last[1]},
        "rss_growth_mb": last[1] - first[1],
        "rss_max_mb": max(mb for _, mb in rss),
    }
    return common.record(result, a.results, benchmark="host_memory", argv=argv)


if __name__ == "__main__":
    main()
