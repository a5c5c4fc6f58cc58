"""The training system: steps, schedules, pipelines and the real loop on mock data.

Runs on 8 simulated CPU devices (tests/conftest.py).
"""

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import cifar10, cifar10_preact, cifar10_wrn, imagenet, imagenet_modern
from resnet_jax.training import checkpoints, loop, recipe
from resnet_jax.training import checks as config_checks
from resnet_jax.training import steps as train_steps
from tests.helpers import read_metrics, tiny_config


def tiny_cifar(**overrides):
    # 37 examples: not a multiple of any batch size below.
    return tiny_config(**({"mock_num_examples": 37, "log_every_steps": 2} | overrides))


def test_eight_devices_are_simulated():
    assert jax.device_count() == 8


def test_cifar10_mock_run_on_eight_devices(tmp_path):
    # Checkpoints at 2, 4 and 6; keep_checkpoints=2 leaves the two newest.
    c = tiny_cifar(checkpoint_every_steps=2, keep_checkpoints=2)
    summary = loop.train_and_evaluate(c, str(tmp_path), progress=False)
    lines = read_metrics(tmp_path)
    train = [m for m in lines if "train_loss" in m]
    evals = [m for m in lines if "eval_loss" in m]
    assert [m["step"] for m in train] == [2, 4, 6]
    for m in train:
        assert {"train_loss", "train_accuracy", "learning_rate", "images_per_sec"} <= set(m)
        assert np.isfinite(m["train_loss"]) and m["learning_rate"] == pytest.approx(0.1)
    assert len(evals) == 1 and evals[0]["eval_count"] == 37  # every example exactly once
    assert summary["eval_count"] == 37 and summary["step"] == 6
    assert summary["eval_loss"] == evals[0]["eval_loss"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "6"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))


def test_imagenet_mock_run_reports_top5(tmp_path):
    c = imagenet.get_config()
    c.update(
        model="resnet18",
        mock_data=True,
        mock_num_examples=21,
        image_size=32,
        train_scale_range=(36, 48),
        eval_resize=36,
        batch_size=8,
        eval_batch_size=8,
        num_train_steps=2,
        log_every_steps=1,
        eval_every_steps=2,
        checkpoint_every_steps=2,
        shuffle_buffer=16,
    )
    summary = loop.train_and_evaluate(c, str(tmp_path), progress=False)
    assert summary["eval_count"] == 21
    assert 0.0 <= summary["eval_accuracy"] <= summary["eval_top5_accuracy"] <= 1.0
    assert len([m for m in read_metrics(tmp_path) if "train_loss" in m]) == 2


def _state_and_batch(c, image_size=32, batch_size=16):
    """A fresh TrainState of ``c`` (init key 0) and a random sharded batch."""
    mesh = recipe.create_mesh()
    repl, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    model = recipe.model_from_config(c, 10)
    lr_fn = recipe.create_learning_rate_fn(c)
    shape = (image_size, image_size, 3)
    state = recipe.create_train_state(
        model, recipe.create_optimizer(c, lr_fn), shape, jax.random.key(0), repl
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": jax.device_put(rng.normal(size=(batch_size, *shape)).astype(np.float32), shard),
        "label": jax.device_put(rng.integers(0, 10, batch_size).astype(np.int32), shard),
    }
    step = jax.jit(
        functools.partial(train_steps.train_step, learning_rate_fn=lr_fn, num_classes=10),
        donate_argnums=0,
    )
    return state, batch, step


def test_overfitting_one_batch_drives_the_loss_down():
    state, batch, step = _state_and_batch(tiny_cifar(weight_decay=0.0, learning_rate=0.05))
    losses = []
    for _ in range(40):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.1 * losses[0]
    assert float(m["accuracy"]) == 1.0
    assert int(state.step) == 40


def test_step_schedule_and_resnet110_warmup():
    c = cifar10.get_config()
    lr = recipe.create_learning_rate_fn(c)
    assert [float(lr(s)) for s in (0, 31_999, 32_000, 47_999, 48_000, 63_999)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )
    c.warmup_steps = 400
    lr = recipe.create_learning_rate_fn(c)
    assert [float(lr(s)) for s in (0, 399, 400, 32_000)] == pytest.approx([0.01, 0.01, 0.1, 0.01])


def test_modern_recipe_schedule_and_scaling():
    # The recipe is in epochs; a run resolves them for ImageNet's 1,281,167 images.
    c = config_checks.resolve_schedule(imagenet_modern.get_config(), 1_281_167)
    steps_per_epoch = 1_281_167 // 1024
    assert (c.num_train_steps, c.warmup_steps) == (90 * steps_per_epoch, 5 * steps_per_epoch)
    lr = recipe.create_learning_rate_fn(c)
    peak = 0.1 * c.batch_size / 256
    assert float(lr(0)) == 0.0
    assert float(lr(c.warmup_steps)) == pytest.approx(peak, rel=1e-5)
    assert float(lr(c.num_train_steps)) == pytest.approx(0.0, abs=1e-7)
    model = recipe.model_from_config(c, 1000)
    assert model.dtype == jnp.bfloat16 and model.variant == "v1.5" and model.zero_init_residual


def test_preact_recipe_is_the_cifar_recipe_with_warm_up_on_the_bottleneck_net():
    c = cifar10_preact.get_config()
    config_checks.validate_config(c, 1)
    lr = recipe.create_learning_rate_fn(c)
    assert float(lr(0)) == pytest.approx(0.01) and float(lr(400)) == pytest.approx(0.1)
    assert float(lr(32_000)) == pytest.approx(0.01) and c.num_train_steps == 64_000
    model = recipe.model_from_config(c, 10)
    assert model.preact and model.block_cls.__name__ == "BottleneckBlock"
    assert model.stage_sizes == (18, 18, 18) and model.variant == "v1"


def test_wrn_recipe_is_the_authors_200_epochs_with_decays_of_0_2():
    c = cifar10_wrn.get_config()
    config_checks.validate_config(c, 1)
    assert c.num_train_steps == 200 * 390 and not c.nesterov and c.weight_decay == 5e-4
    lr = recipe.create_learning_rate_fn(c)
    for step, want in [(0, 0.1), (23_399, 0.1), (23_400, 0.02), (46_800, 0.004), (62_400, 8e-4)]:
        assert float(lr(step)) == pytest.approx(want), step
    model = recipe.model_from_config(c, 10)
    assert model.preact and model.block_cls.__name__ == "BasicBlock"
    assert model.stage_sizes == (4, 4, 4)


def test_weight_decay_is_l2_and_can_exclude_batchnorm_and_biases():
    params = {
        "conv": {"kernel": jnp.ones((3,))},
        "bn": {"scale": jnp.ones((3,)), "bias": jnp.ones((3,))},
    }
    zeros = jax.tree.map(jnp.zeros_like, params)
    for exclude, expect_bn in ((False, -0.1 * 1e-4), (True, 0.0)):
        c = cifar10.get_config()
        c.weight_decay_exclude_bn_bias = exclude
        tx = recipe.create_optimizer(c, optax.constant_schedule(0.1))
        updates, _ = tx.update(zeros, tx.init(params), params)
        assert float(updates["conv"]["kernel"][0]) == pytest.approx(-0.1 * 1e-4)
        assert float(updates["bn"]["scale"][0]) == pytest.approx(expect_bn)
        assert float(updates["bn"]["bias"][0]) == pytest.approx(expect_bn)


def test_batch_not_divisible_by_devices_is_refused(tmp_path):
    with pytest.raises(ValueError, match="divisible by the number of devices \\(8\\)"):
        loop.train_and_evaluate(tiny_cifar(batch_size=12), str(tmp_path), progress=False)
    assert not os.path.exists(tmp_path / "checkpoints")


def test_bfloat16_run(tmp_path):
    summary = loop.train_and_evaluate(
        tiny_cifar(
            dtype="bfloat16", num_train_steps=2, checkpoint_every_steps=2, eval_every_steps=2
        ),
        str(tmp_path),
        progress=False,
    )
    assert np.isfinite(summary["eval_loss"])


# A convolution's operand types in StableHLO text: `: (tensor<AxB...xT>, tensor<...>) ->`.
_CONV = re.compile(r"stablehlo\.convolution.*: \(tensor<[0-9x]+x(\w+)>, tensor<[0-9x]+x(\w+)>\)")


def test_bfloat16_convolutions_and_loss_tracking_float32():
    losses = {}
    for dtype in ("float32", "bfloat16"):
        state, batch, step = _state_and_batch(tiny_cifar(dtype=dtype), image_size=16)
        convs = _CONV.findall(step.lower(state, batch).as_text())
        # Every convolution of the train step is in the compute dtype: resnet8's
        # 7 forward, 7 kernel gradients and 6 input gradients (none for the image).
        assert len(convs) == 7 + 7 + 6, len(convs)
        want = {"float32": "f32", "bfloat16": "bf16"}[dtype]
        assert set(convs) == {(want, want)}, set(convs)
        losses[dtype] = []
        for _ in range(4):
            state, m = step(state, batch)
            losses[dtype].append(float(m["loss"]))
        # Storage, BatchNorm statistics and the loss stay float32.
        for leaf in jax.tree.leaves((state.params, state.batch_stats, state.opt_state)):
            assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
        assert m["loss"].dtype == jnp.float32
    assert losses["bfloat16"] != losses["float32"]  # really computed in another precision
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)
    assert losses["bfloat16"][-1] < losses["bfloat16"][0]  # and it trains


def test_resume_continues_and_refuses_another_experiment(tmp_path):
    loop.train_and_evaluate(tiny_cifar(num_train_steps=3), str(tmp_path), progress=False)
    summary = loop.train_and_evaluate(tiny_cifar(), str(tmp_path), progress=False)
    assert summary["step"] == 6
    steps = [m["step"] for m in read_metrics(tmp_path) if "train_loss" in m]
    assert steps == [2, 3, 4, 6]  # the first run ended (and logged) at step 3
    # Running the finished command again trains nothing, changes nothing, and
    # still reports the evaluation.
    lines = read_metrics(tmp_path)
    again = loop.train_and_evaluate(tiny_cifar(), str(tmp_path), progress=False)
    assert again["step"] == 6 and again["eval_accuracy"] == summary["eval_accuracy"]
    assert read_metrics(tmp_path) == lines
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    with pytest.raises(
        checkpoints.IncompatibleCheckpointError,
        match="model: checkpoint 'resnet8' vs config 'resnet14'",
    ):
        loop.train_and_evaluate(
            tiny_cifar(model="resnet14", num_train_steps=9), str(tmp_path), progress=False
        )
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_ten_crop_eval_step_averages_softmax_over_crops():
    c = tiny_cifar()
    mesh = recipe.create_mesh()
    repl = NamedSharding(mesh, P())
    model = recipe.model_from_config(c, 10)
    lr_fn = recipe.create_learning_rate_fn(c)
    state = recipe.create_train_state(
        model, recipe.create_optimizer(c, lr_fn), (16, 16, 3), jax.random.key(0), repl
    )
    rng = np.random.default_rng(0)
    crops = rng.normal(size=(8, 10, 16, 16, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 8).astype(np.int32)
    mask = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)
    out = train_steps.eval_step(
        state, {"image": crops, "label": labels, "mask": mask}, num_classes=10
    )
    logits = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats}, crops.reshape(80, 16, 16, 3)
    )
    probs = np.asarray(jax.nn.softmax(logits)).reshape(8, 10, 10).mean(axis=1)
    expected_loss = -np.log(probs[np.arange(8), labels])
    assert float(out["count"]) == 6
    assert float(out["loss"]) == pytest.approx(float((expected_loss * mask).sum()), rel=1e-4)
    assert float(out["correct"]) == float(((probs.argmax(-1) == labels) * mask).sum())


def _logits_state(num_classes):
    """A TrainState whose "network" returns its input as the logits (scaled by a
    parameter, so that there is a gradient): steps on crafted logits."""

    def apply_fn(variables, images, train, mutable=()):
        del train
        logits = images.reshape(len(images), num_classes) * variables["params"]["scale"]
        return (logits, {"batch_stats": {}}) if mutable else logits

    return train_steps.TrainState.create(
        apply_fn=apply_fn, params={"scale": jnp.ones(())}, batch_stats={}, tx=optax.sgd(0.1)
    )


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_ten_crop_eval_step_averages_probabilities_not_logits():
    # Example 0 (label 0): nine undecided crops and one sure of class 0.
    # Example 1 (label 1): six crops sure of class 1, four surer of class 0;
    # averaged probabilities pick class 1, averaged logits would pick class 0.
    crops = np.zeros((2, 10, 3), np.float32)
    crops[0, 0] = [10.0, 0.0, 0.0]
    crops[1, :6] = [0.0, 8.0, 0.0]
    crops[1, 6:] = [15.0, 0.0, 0.0]
    labels = np.array([0, 1], np.int32)
    probs = np.exp(_log_softmax(crops)).mean(axis=1)
    assert probs[1].argmax() == 1 and crops[1].mean(0).argmax() == 0
    out = train_steps.eval_step(
        _logits_state(3),
        {"image": crops[:, :, None, None, :], "label": labels, "mask": np.ones(2, np.float32)},
        num_classes=3,
    )
    assert float(out["loss"]) == pytest.approx(-np.log(probs[[0, 1], labels]).sum(), rel=1e-5)
    assert float(out["correct"]) == 2


def test_label_smoothing_is_the_smoothed_cross_entropy():
    logits = np.array([[2.0, 1.0, 0.1, -1.0], [0.0, 3.0, -2.0, 0.5]], np.float32)
    labels = np.array([0, 3], np.int32)
    batch = {"image": logits, "label": labels}
    eps, k = 0.2, 4
    targets = np.eye(k)[labels] * (1 - eps) + eps / k  # the labels' weight spread evenly
    expected = {
        0.0: -_log_softmax(logits)[np.arange(2), labels].mean(),
        eps: -(targets * _log_softmax(logits)).sum(-1).mean(),
    }
    for smoothing, want in expected.items():
        _, m = train_steps.train_step(
            _logits_state(k),
            batch,
            learning_rate_fn=optax.constant_schedule(0.1),
            num_classes=k,
            label_smoothing=smoothing,
        )
        assert float(m["loss"]) == pytest.approx(want, rel=1e-6)
    assert expected[eps] != pytest.approx(expected[0.0], rel=1e-2)


def test_eval_step_counts_top5_and_masks():
    # Label ranks: 3rd (in the top 5), 6th (not), 1st, and 1st but masked out.
    logits = np.tile(np.arange(8, 0, -1, dtype=np.float32), (4, 1))  # class i ranks i+1
    labels = np.array([2, 5, 0, 0], np.int32)
    mask = np.array([1, 1, 1, 0], np.float32)
    out = train_steps.eval_step(
        _logits_state(8), {"image": logits, "label": labels, "mask": mask}, num_classes=8
    )
    assert float(out["correct_top5"]) == 2
    assert float(out["correct"]) == 1
    assert float(out["count"]) == 3
    ce = -_log_softmax(logits)[np.arange(4), labels]
    assert float(out["loss"]) == pytest.approx(float((ce * mask).sum()), rel=1e-6)


def test_nesterov_momentum_is_the_nesterov_update():
    # Two steps on known gradients, without weight decay: plain momentum moves
    # by -lr * t with the trace t = g + m * t_prev; Nesterov by -lr * (g + m * t)
    # (optax.sgd's definition, and PyTorch's).
    lr, m = 0.1, 0.9
    params = {"w": jnp.zeros((2,))}
    grads = [np.array([1.0, -2.0], np.float32), np.array([0.5, 3.0], np.float32)]
    t1, t2 = grads[0], grads[1] + m * grads[0]
    expected = {
        False: [-lr * t1, -lr * t2],
        True: [-lr * (grads[0] + m * t1), -lr * (grads[1] + m * t2)],
    }
    for nesterov, want in expected.items():
        c = cifar10.get_config()
        c.update(nesterov=nesterov, momentum=m, weight_decay=0.0)
        tx = recipe.create_optimizer(c, optax.constant_schedule(lr))
        opt_state = tx.init(params)
        for g, w in zip(grads, want):
            updates, opt_state = tx.update({"w": jnp.asarray(g)}, opt_state, params)
            np.testing.assert_allclose(updates["w"], w, rtol=1e-6)
    assert not np.allclose(expected[True][0], expected[False][0])
