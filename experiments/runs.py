"""What the experiments share: runs (workdirs), their configs and metrics, their
trained state, and starting JAX as train.py does.

A *run* is a workdir of :func:`resnet_jax.training.loop.train_and_evaluate`
(``metrics.jsonl``, ``checkpoints/STEP``). The sweep names its runs
``{kind}{depth}_seed{seed}`` (``plain20_seed1``, ``resnet56_seed0``) and writes
each run's config beside them (``config.json``) and, once the run is finished
and analysed, ``result.json``. Workdirs the sweep did not make are recognised
by their ``config.json`` or by a name such as ``plain34``, ``resnet18_seed2``
or ``cifar_resnet20``; analysing their checkpoints needs their config
(``--config`` and overrides, as train.py took them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from etils import epath

from resnet_jax.errors import UserError
from resnet_jax.training import checkpoints

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
RUN_NAME = re.compile(r"(?:cifar_)?(plain|resnet|preact_resnet)(\d+)(?:_seed(\d+))?")
KINDS = ("plain", "resnet", "preact")
# The model name's prefix of each kind (``preact_resnet56``: pre-activation, He et al. 2016b).
MODEL_PREFIX = {"plain": "plain", "resnet": "resnet", "preact": "preact_resnet"}
LABELS = {"plain": "plain", "resnet": "ResNet", "preact": "pre-act ResNet"}
_KIND_OF_PREFIX = {v: k for k, v in MODEL_PREFIX.items()}


@dataclasses.dataclass(frozen=True)
class Run:
    """A workdir and the network it trained: ``kind`` ('plain', 'resnet' or
    'preact'), ``depth``, ``seed``."""

    workdir: str
    kind: str
    depth: int
    seed: int

    @property
    def model(self) -> str:
        return model_name(self.kind, self.depth)

    @property
    def label(self) -> str:
        """The paper's name: ``plain-20``, ``ResNet-56``, ``pre-act ResNet-110``."""
        return f"{LABELS[self.kind]}-{self.depth}"


def model_name(kind: str, depth: int) -> str:
    """The model of a kind and depth: ``plain20``, ``resnet56``, ``preact_resnet110``."""
    return f"{MODEL_PREFIX[kind]}{depth}"


def run_name(kind: str, depth: int, seed: int) -> str:
    """The sweep's workdir name of a run: ``plain20_seed1``."""
    return f"{model_name(kind, depth)}_seed{seed}"


def as_run(workdir: str | os.PathLike) -> Run | None:
    """``workdir`` as a :class:`Run`, or None when it holds no ``metrics.jsonl``
    or neither its config nor its name says which network it trained."""
    path = epath.Path(workdir)
    if not (path / METRICS_FILE).exists():
        return None
    stored = read_config_dict(workdir)
    by_name = RUN_NAME.fullmatch(path.name)
    model = RUN_NAME.fullmatch(stored["model"]) if stored else by_name
    if model is None:
        return None
    if stored:
        seed = int(stored["seed"])
    else:
        seed = int(by_name.group(3)) if by_name and by_name.group(3) else 0
    return Run(os.fspath(workdir), _KIND_OF_PREFIX[model.group(1)], int(model.group(2)), seed)


def find_runs(root: str | os.PathLike) -> list[Run]:
    """``root`` itself if it is a run, else the runs directly under it, sorted
    by kind (plain first), depth and seed."""
    run = as_run(root)
    if run is not None:
        return [run]
    path = epath.Path(root)
    if not path.is_dir():
        raise UserError(f"{root} is not a directory of runs (nor a run's workdir).")
    found = [as_run(os.fspath(child)) for child in path.iterdir() if child.is_dir()]
    return sorted(
        (r for r in found if r is not None), key=lambda r: (KINDS.index(r.kind), r.depth, r.seed)
    )


# --------------------------------------------------------------------------- #
# A run's files
# --------------------------------------------------------------------------- #


def write_config(workdir: str, config: Any) -> None:
    """Stores ``config`` as ``WORKDIR/config.json`` (tuples become lists)."""
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=1, sort_keys=True) + "\n")


def read_config_dict(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """``WORKDIR/config.json`` as a plain dict, or None when absent."""
    path = epath.Path(workdir) / CONFIG_FILE
    return json.loads(path.read_text()) if path.exists() else None


def read_config(workdir: str | os.PathLike) -> Any | None:
    """``WORKDIR/config.json`` as a ConfigDict over ``configs/common.py``'s base
    (keys the file lacks keep the base defaults), or None when absent.

    Raises:
      UserError: the file has a key the base config does not know.
    """
    stored = read_config_dict(workdir)
    if stored is None:
        return None
    from configs.common import base_config

    config = base_config()
    for key, value in stored.items():
        if key not in config:
            raise UserError(
                f"{epath.Path(workdir) / CONFIG_FILE} has the key {key!r}, which "
                "configs/common.py does not define (a config of another version?)."
            )
        if isinstance(config[key], tuple) and isinstance(value, list):
            value = tuple(value)
        config[key] = value
    return config


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, float]]:
    """Every whole line of ``WORKDIR/metrics.jsonl`` (a torn last line is skipped)."""
    path = epath.Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return lines


def train_errors(metrics: Sequence[dict]) -> tuple[list[int], list[float]]:
    """``(steps, errors)`` of the logged training lines: ``1 - train_accuracy``,
    the mean over each logging window of augmented batches in train mode."""
    points = [(m["step"], 1.0 - m["train_accuracy"]) for m in metrics if "train_accuracy" in m]
    return [p[0] for p in points], [p[1] for p in points]


def eval_errors(metrics: Sequence[dict]) -> tuple[list[int], list[float]]:
    """``(steps, errors)`` of the evaluation lines: ``1 - eval_accuracy`` (top-1)."""
    points = [(m["step"], 1.0 - m["eval_accuracy"]) for m in metrics if "eval_accuracy" in m]
    return [p[0] for p in points], [p[1] for p in points]


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps of ``WORKDIR/checkpoints/STEP`` that orbax has committed (sorted)."""
    return checkpoints.saved_steps(workdir)


def read_result(workdir: str | os.PathLike) -> dict[str, Any] | None:
    path = epath.Path(workdir) / RESULT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_json(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented JSON, written whole (a reader never sees half a file)."""
    path = epath.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


RESULTS_JSON, RESULTS_MD = "results.json", "results.md"


def write_results(out_dir: str | os.PathLike, results: Any, markdown: str) -> tuple[str, str]:
    """An experiment's ``OUT/results.json`` (``results``) and ``OUT/results.md``
    (``markdown``), each written whole; returns their paths."""
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RESULTS_JSON, results)
    tmp = out / (RESULTS_MD + ".tmp")
    tmp.write_text(markdown)
    tmp.replace(out / RESULTS_MD)
    return os.fspath(out / RESULTS_JSON), os.fspath(out / RESULTS_MD)


# --------------------------------------------------------------------------- #
# Command lines: JAX flags, config overrides, one-line errors
# --------------------------------------------------------------------------- #


def split_config_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` split into the script's own arguments and ``--config.KEY=VALUE`` overrides."""
    own, overrides = [], []
    for arg in argv:
        (overrides if arg.startswith("--config.") else own).append(arg)
    return own, overrides


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """``config`` with train.py's ``--config.KEY=VALUE`` overrides applied (in
    place; also returned), parsed by ml_collections exactly as train.py parses them.

    Raises:
      UserError: an unknown key or a value of the wrong type.
    """
    if not overrides:
        return config
    from absl import flags
    from ml_collections import config_flags

    argv = ["experiments", *overrides]
    values = flags.FlagValues()
    try:
        config_flags.DEFINE_config_dict(
            "config", config, flag_values=values, lock_config=True, sys_argv=argv
        )
        values(argv)
    except (flags.Error, LookupError, AttributeError, TypeError, ValueError) as e:
        while e.args and isinstance(e.args[0], BaseException):  # ml_collections wraps errors
            e = e.args[0]
        text = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
        raise UserError(f"bad config override ({text}); every key is in configs/common.py.") from e
    return values.config


def load_config_file(path: str, overrides: Sequence[str] = ()) -> Any:
    """``get_config()`` of a ``configs/*.py`` file, with overrides."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_experiment_config", path)
    if spec is None or not os.path.exists(path):
        raise UserError(f"cannot load the config file {path}.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return apply_overrides(module.get_config(), overrides)


def run_config(run: Run, config_file: str | None, overrides: Sequence[str]) -> Any:
    """The config a run was trained with: its ``config.json``, else ``config_file``
    (the model and seed taken from the run's name), then ``overrides``.

    Raises:
      UserError: neither is there.
    """
    config = read_config(run.workdir)
    if config is None:
        if config_file is None:
            raise UserError(
                f"{run.workdir} has no {CONFIG_FILE}: give the config it was trained with, "
                "as train.py took it (--config FILE --config.KEY=VALUE ...)."
            )
        config = load_config_file(config_file)
        config.model, config.seed = run.model, run.seed
    return apply_overrides(config, overrides)


# --------------------------------------------------------------------------- #
# A trained run: its state from the newest checkpoint
# --------------------------------------------------------------------------- #


def analysis_config(config: Any) -> Any:
    """A copy of ``config`` for analysis: the host input path (no training set on
    the devices, one step per call); the network and data are the run's."""
    c = config.copy_and_resolve_references()
    c.device_data = False
    c.steps_per_call = 1
    return c


def restore(config: Any, workdir: str) -> tuple[Any, Any]:
    """``(experiment, state)``: the run's parts built from ``config`` and its
    newest readable checkpoint (refused if it belongs to another config).

    Raises:
      UserError: no checkpoint, or one of another experiment.
    """
    from resnet_jax.training import experiment

    if not checkpoint_steps(workdir):
        raise UserError(f"{workdir} has no checkpoint (checkpoints/STEP) to analyse.")
    exp = experiment.build_experiment(analysis_config(config), workdir)
    ckpt = experiment.open_checkpointer(exp)
    try:
        state, meta = experiment.restore_or_init(exp, ckpt)
    finally:
        ckpt.close()
    if meta is None:
        raise UserError(f"{workdir}: no checkpoint could be read.")
    return exp, state


def _train_split_batches(
    images: np.ndarray, labels: np.ndarray, mean: np.ndarray, batch: int
) -> Iterator[dict[str, np.ndarray]]:
    """The unaugmented split normalised as the eval split is (``x / 255 - mean``),
    in whole batches of ``batch``; the last one padded with ``mask == 0``."""
    for lo in range(0, len(labels), batch):
        x = images[lo : lo + batch].astype(np.float32) / np.float32(255.0) - mean
        y = labels[lo : lo + batch].astype(np.int32)
        pad = batch - len(y)
        yield {
            "image": np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)]),
            "label": np.concatenate([y, np.zeros(pad, np.int32)]),
            "mask": np.concatenate([np.ones(len(y), np.float32), np.zeros(pad, np.float32)]),
        }


def train_split_error(exp: Any, state: Any) -> dict[str, float] | None:
    """The training error as the paper defines it: top-1 error of the network in
    eval mode (BatchNorm running statistics) on the whole unaugmented training
    split. ``train_error``, ``train_loss``, ``train_count``; None for datasets
    not held in memory (ImageNet) or a multi-process run."""
    import jax

    from resnet_jax import data as data_lib
    from resnet_jax.training import experiment

    if exp.config.dataset not in data_lib.IN_MEMORY or jax.process_count() > 1:
        return None
    split = exp.pipeline.train
    batches = _train_split_batches(
        split.images, split.labels, exp.pipeline.mean, int(exp.config.eval_batch_size)
    )
    m = experiment.evaluate(state, batches, exp.eval_fn, exp.data_sharding)
    return {
        "train_error": 1.0 - m["eval_accuracy"],
        "train_loss": m["eval_loss"],
        "train_count": m["eval_count"],
    }


def num_params(state: Any) -> int:
    import jax

    return int(sum(np.size(x) for x in jax.tree.leaves(state.params)))
