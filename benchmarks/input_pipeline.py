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
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import os
import tempfile
from typing import Any

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
    a, overrides = p.parse_known_args(argv)
    common.configure(a)
    from resnet_jax import data

    data.configure_tensorflow()
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines
    config = load_config(a.config, overrides)
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


if __name__ == "__main__":
    main()
