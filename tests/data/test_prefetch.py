"""resnet_jax.data.prefetch: global batches assembled ahead on a background thread,
and what the trainer builds on it (uint8 batches normalised on the devices,
data-wait and images/s accounting)."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.data import prefetch
from resnet_jax.training import experiment, loop, recipe
from resnet_jax.training import steps as train_steps
from tests.helpers import read_metrics, tiny_config


def _threads():
    return [t for t in threading.enumerate() if t.name == "resnet_jax-prefetch"]


@pytest.mark.parametrize("size", [0, 1, 3])
def test_batches_come_out_in_order_as_device_arrays(size):
    mesh = recipe.create_mesh()
    sharding = NamedSharding(mesh, P("data"))
    host = ({"x": np.full((8, 2), i, np.float32)} for i in range(7))

    def to_global(b):
        return experiment.host_batch_to_global(b, sharding)

    with prefetch.prefetch(host, to_global, size) as it:
        out = list(it)
    assert [float(b["x"][0, 0]) for b in out] == list(range(7))
    assert all(isinstance(b["x"], jax.Array) and b["x"].sharding == sharding for b in out)
    assert not _threads()


def test_errors_reach_the_consumer_at_their_batch():
    def host():
        yield 1
        yield 2
        raise FileNotFoundError("shard 3 is missing")

    it = prefetch.Prefetcher(host(), lambda b: jnp.asarray(b), size=2)
    assert int(next(it)) == 1 and int(next(it)) == 2
    with pytest.raises(FileNotFoundError, match="shard 3"):
        next(it)
    assert not _threads()


def test_close_stops_an_endless_producer_that_waits_for_room():
    made = []

    def endless():
        i = 0
        while True:
            made.append(i)
            yield i
            i += 1

    it = prefetch.Prefetcher(endless(), lambda b: b, size=2)
    assert next(it) == 0
    time.sleep(0.2)  # the thread fills the queue and waits for room
    it.close()
    assert not _threads()
    assert len(made) <= 5  # bounded by the queue, not run ahead without limit
    with pytest.raises(StopIteration):
        next(it)


def test_the_wait_includes_the_copy_to_the_devices():
    # A copy that takes 0.3 s per batch, a consumer that takes no time:
    # each next() waits for a copy, so the waits add up to about 3 x 0.3 s.
    def slow_copy(b):
        time.sleep(0.3)
        return jnp.asarray(b)

    waited = 0.0
    with prefetch.Prefetcher(iter(range(3)), slow_copy, size=2) as it:
        for _ in range(3):
            t0 = time.perf_counter()
            next(it)
            waited += time.perf_counter() - t0
    assert waited > 0.6


def test_uint8_batches_are_normalised_inside_the_step():
    """A uint8 batch with the mean equals the host-normalised float batch."""
    c = tiny_config()
    mesh = recipe.create_mesh()
    model = recipe.model_from_config(c, 10)
    lr = recipe.create_learning_rate_fn(c)
    tx = recipe.create_optimizer(c, lr)
    replicated = NamedSharding(mesh, P())
    state = recipe.create_train_state(model, tx, (32, 32, 3), jax.random.key(0), replicated)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (16,), dtype=np.int32)
    mean = np.array([0.49, 0.48, 0.45], np.float32)
    as_float = (pixels.astype(np.float32) / np.float32(255.0) - mean).astype(np.float32)
    step = jax.jit(
        lambda s, b, m: train_steps.train_step(s, b, learning_rate_fn=lr, num_classes=10, mean=m)
    )
    s8, m8 = step(state, {"image": pixels, "label": labels}, mean)
    sf, mf = step(state, {"image": as_float, "label": labels}, None)
    np.testing.assert_allclose(float(m8["loss"]), float(mf["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(sf.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mean"):
        train_steps.model_input(jnp.asarray(pixels), None)
    # The program that runs takes uint8: 4x fewer bytes cross to the devices.
    hlo = step.lower(state, {"image": pixels, "label": labels}, mean).as_text()
    assert "tensor<16x32x32x3xui8>" in hlo


def test_images_per_sec_leaves_out_evaluation_and_the_first_step(tmp_path, monkeypatch):
    """An evaluation that takes 1.5 s at steps 2 and 4 must not count as
    training time (before this was fixed, train_seconds held both)."""
    real = loop.EvalAction.__call__

    def slow_eval(self, step, state):
        time.sleep(1.5)
        real(self, step, state)

    monkeypatch.setattr(loop.EvalAction, "__call__", slow_eval)
    c = tiny_config(eval_every_steps=2, log_every_steps=3, checkpoint_every_steps=1000)
    summary = loop.train_and_evaluate(c, str(tmp_path), progress=False)
    train_lines = [m for m in read_metrics(tmp_path) if "images_per_sec" in m]
    assert [m["step"] for m in train_lines] == [3, 6]
    assert summary["eval_seconds"] >= 3 * 1.5  # steps 2, 4 and 6
    assert summary["first_step_seconds"] > 0
    # Steps 2..6 of resnet8 at batch 16 take well under 1 s of training here;
    # with the evaluations counted, the two windows would hold 3 s.
    train_seconds = 5 * 16 / summary["train_images_per_sec"]
    assert train_seconds < 1.5
    # The summary is the logged windows' images over their seconds: step 1
    # (compilation) is out of the first window, which holds steps 2 and 3.
    ips = [m["images_per_sec"] for m in train_lines]
    assert summary["train_images_per_sec"] == pytest.approx(
        5 * 16 / (2 * 16 / ips[0] + 3 * 16 / ips[1]), rel=1e-6
    )
    assert all(0 <= m["data_wait_fraction"] <= 1 for m in train_lines)


def test_close_returns_soon_when_the_producer_is_stuck_in_the_pipeline():
    """A pipeline call that blocks (a shuffle buffer filling) does not hold
    close() for long, and no batch is made after close()."""
    release, pulled = threading.Event(), []

    def host():
        for i in range(100):
            pulled.append(i)
            if i == 1:
                release.wait(30)
            yield i

    it = prefetch.Prefetcher(host(), lambda b: b, size=2)
    assert next(it) == 0
    time.sleep(0.2)  # the producer is inside the pipeline's second call
    t0 = time.perf_counter()
    it.close(timeout=0.5)
    assert time.perf_counter() - t0 < 2.0
    release.set()
    for t in _threads():  # it ends once the blocked call returns (slow on a loaded CI machine)
        t.join(10)
    assert pulled == [0, 1]  # it stopped instead of reading on
    assert not _threads()


def test_a_finished_run_reads_no_training_batch(tmp_path, monkeypatch):
    loop.train_and_evaluate(tiny_config(num_train_steps=2), str(tmp_path), progress=False)
    calls = []
    real = experiment.HostStepRunner.start
    monkeypatch.setattr(
        experiment.HostStepRunner, "start", lambda self, *a: calls.append(a) or real(self, *a)
    )
    summary = loop.train_and_evaluate(tiny_config(num_train_steps=2), str(tmp_path), progress=False)
    assert calls == [] and summary["step"] == 2 and summary["eval_count"] == 64
