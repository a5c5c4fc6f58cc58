"""Shared test fixtures: a tiny CIFAR-10 mock-data config and metrics readers."""

import json
import os

from configs import cifar10

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    """resnet8 on 64 mock CIFAR-10 examples, batch 16, 6 steps, checkpoints at 3 and 6."""
    c = cifar10.get_config()
    c.update(
        model="resnet8",
        mock_data=True,
        mock_num_examples=64,
        batch_size=16,
        eval_batch_size=16,
        num_train_steps=6,
        log_every_steps=1,
        eval_every_steps=6,
        checkpoint_every_steps=3,
    )
    c.update(overrides)
    return c


def read_metrics(workdir):
    """Every line of WORKDIR/metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(workdir):
    """(step, train_loss) of every training line."""
    return [(m["step"], m["train_loss"]) for m in read_metrics(workdir) if "train_loss" in m]
