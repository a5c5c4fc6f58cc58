"""The modern recipe's options (issue 22): gradient accumulation, EMA, mixup
and CutMix, random erasing, LARS/LAMB/AdamW and the polynomial schedule, and
their config checks.

Runs on 8 simulated CPU devices (tests/conftest.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import imagenet_mlperf, imagenet_tv2
from resnet_jax.errors import UserError
from resnet_jax.training import checks as config_checks
from resnet_jax.training import mixing, recipe
from resnet_jax.training import steps as train_steps
from tests.helpers import tiny_config

# --------------------------------------------------------------------------- #
# Gradient accumulation
# --------------------------------------------------------------------------- #


def _run_steps(c, batch, n=3, **step_options):
    """``n`` jitted train steps of ``c``'s network from init key 0 on ``batch``."""
    mesh = recipe.create_mesh()
    repl = NamedSharding(mesh, P())
    lr_fn = recipe.create_learning_rate_fn(c)
    model = recipe.model_from_config(c, 10)
    state = recipe.create_train_state(
        model, recipe.create_optimizer(c, lr_fn), (16, 16, 3), jax.random.key(0), repl
    )
    step = jax.jit(
        functools.partial(
            train_steps.train_step, learning_rate_fn=lr_fn, num_classes=10, **step_options
        )
    )
    losses = []
    for _ in range(n):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return losses, state


def _batch(n=32, size=16, seed=0):
    shard = NamedSharding(recipe.create_mesh(), P("data"))
    rng = np.random.default_rng(seed)
    return {
        "image": jax.device_put(rng.normal(size=(n, size, size, 3)).astype(np.float32), shard),
        "label": jax.device_put(rng.integers(0, 10, n).astype(np.int32), shard),
    }


def _reordered(batch, k):
    """``batch`` micro-batch by micro-batch: examples ``j, j+k, ...`` of
    micro-batch ``j`` for j = 0..k-1 (the order of the accumulated step)."""
    n = batch["label"].shape[0]
    order = np.concatenate([np.arange(j, n, k) for j in range(k)])
    return {key: jax.device_put(np.asarray(v)[order], v.sharding) for key, v in batch.items()}


@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_equals_bn_groups_on_the_reordered_batch(k):
    """On 8 devices, 2 or 4 examples per device per micro-batch. (Consecutive
    micro-batches, resharded over the devices, failed this at k=2 on XLA 0.10
    on an AMD EPYC: gradients up to 2% off, parameters 1e-3 off in 3 steps.)"""
    batch = _batch()
    mesh = recipe.create_mesh()
    ref, ref_state = _run_steps(tiny_config(bn_groups=k), _reordered(batch, k))
    got, state = _run_steps(
        tiny_config(),
        batch,
        grad_accum_steps=k,
        micro_batch_sharding=NamedSharding(mesh, P(None, "data")),
    )
    # The same losses, parameters and statistics up to float32 summation order.
    np.testing.assert_allclose(got, ref, rtol=2e-6)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(state.batch_stats), jax.tree.leaves(ref_state.batch_stats)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    # ... and not those of the whole batch's statistics: the grouping matters.
    whole, _ = _run_steps(tiny_config(), batch)
    assert abs(whole[0] - ref[0]) > 1e-4


def test_accumulated_step_moves_no_example_between_devices():
    """The micro-batch split is local to each device's shard: the compiled
    step has all-reduces (BatchNorm statistics, gradients) but no all-to-all,
    collective-permute or all-gather, which consecutive micro-batches need."""
    c = tiny_config()
    mesh = recipe.create_mesh()
    lr_fn = recipe.create_learning_rate_fn(c)
    model = recipe.model_from_config(c, 10)
    state = recipe.create_train_state(
        model,
        recipe.create_optimizer(c, lr_fn),
        (16, 16, 3),
        jax.random.key(0),
        NamedSharding(mesh, P()),
    )
    step = functools.partial(
        train_steps.train_step,
        learning_rate_fn=lr_fn,
        num_classes=10,
        grad_accum_steps=2,
        micro_batch_sharding=NamedSharding(mesh, P(None, "data")),
    )
    hlo = jax.jit(step).lower(state, _batch()).compile().as_text()
    assert "all-reduce" in hlo
    for op in ("all-to-all", "collective-permute", "all-gather"):
        assert op not in hlo, op


def test_accumulated_step_keeps_one_micro_batch_of_activations():
    """The scan holds one micro-batch's activations: the compiled step's
    temporary memory falls as k grows (XLA's memory analysis)."""
    c = tiny_config(model="resnet20")
    mesh = recipe.create_mesh()
    lr_fn = recipe.create_learning_rate_fn(c)
    model = recipe.model_from_config(c, 10)
    state = jax.eval_shape(
        lambda: recipe.create_train_state(
            model,
            recipe.create_optimizer(c, lr_fn),
            (32, 32, 3),
            jax.random.key(0),
            NamedSharding(mesh, P()),
        )
    )
    batch = {
        "image": jax.ShapeDtypeStruct((256, 32, 32, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((256,), jnp.int32),
    }
    temp = {}
    for k in (1, 4):
        step = functools.partial(
            train_steps.train_step, learning_rate_fn=lr_fn, num_classes=10, grad_accum_steps=k
        )
        compiled = jax.jit(step).lower(state, batch).compile()
        temp[k] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[4] < 0.5 * temp[1], temp


# --------------------------------------------------------------------------- #
# EMA
# --------------------------------------------------------------------------- #


def _scalar_state(ema=True):
    """A one-parameter "network" (logits = images * w) with an EMA."""

    def apply_fn(variables, images, train, mutable=()):
        del train
        logits = images * variables["params"]["w"]
        stats = {"m": variables["batch_stats"]["m"] + 1.0}  # a statistic that moves
        return (logits, {"batch_stats": stats}) if mutable else logits

    params, stats = {"w": jnp.ones(())}, {"m": jnp.zeros(())}
    return train_steps.TrainState.create(
        apply_fn=apply_fn,
        params=params,
        batch_stats=stats,
        tx=optax.sgd(0.5),
        ema={"params": params, "batch_stats": stats} if ema else None,
    )


def test_ema_equals_the_hand_computed_average():
    decay, every, warmup = 0.8, 2, 4
    cfg = train_steps.EmaConfig(decay=decay, every_steps=every, warmup_steps=warmup)
    state = _scalar_state()
    batch = {"image": jnp.array([[1.0, -2.0, 0.5]]), "label": jnp.array([1])}
    step = jax.jit(
        functools.partial(
            train_steps.train_step, learning_rate_fn=lambda s: 0.5, num_classes=3, ema=cfg
        )
    )
    ema_w, ema_m = 1.0, 0.0
    for n in range(1, 11):
        state, _ = step(state, batch)
        w, m = float(state.params["w"]), float(state.batch_stats["m"])
        if n % every == 0:  # an update: a copy up to the warm-up's end, then a blend
            d = 0.0 if n <= warmup else decay
            ema_w, ema_m = d * ema_w + (1 - d) * w, d * ema_m + (1 - d) * m
        assert float(state.ema["params"]["w"]) == pytest.approx(ema_w, rel=1e-6)
        assert float(state.ema["batch_stats"]["m"]) == pytest.approx(ema_m, rel=1e-6)
    assert ema_w != pytest.approx(w)  # the average lags the model


def test_ema_state_swaps_in_the_average():
    state = _scalar_state()
    state = state.replace(
        ema={"params": {"w": jnp.full((), 3.0)}, "batch_stats": state.batch_stats}
    )
    assert float(train_steps.ema_state(state).params["w"]) == 3.0


# --------------------------------------------------------------------------- #
# Mixup, CutMix, random erasing
# --------------------------------------------------------------------------- #


def _images(n=8, h=12, w=20, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, h, w, 3)), jnp.float32)


def _targets(n=8, k=5, smoothing=0.1):
    return train_steps.targets(jnp.arange(n) % k, k, smoothing)


@pytest.mark.parametrize("seed", range(6))
def test_mixup_mixes_images_and_labels_with_one_lambda(seed):
    images, t = _images(), _targets()
    cfg = mixing.MixConfig(mixup_alpha=0.4)
    out, mixed, info = mixing.mix_batch(jax.random.key(seed), images, t, cfg)
    lam = float(info["mix_lambda"])
    assert 0.0 <= lam <= 1.0 and float(info["cutmix"]) == 0.0
    np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mixed, lam * t + (1 - lam) * t[::-1], rtol=1e-6)
    np.testing.assert_allclose(mixed.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_box_area_matches_its_lambda(seed):
    images, t = _images(), _targets()
    cfg = mixing.MixConfig(cutmix_alpha=1.0)
    out, mixed, info = mixing.mix_batch(jax.random.key(seed), images, t, cfg)
    lam = float(info["mix_lambda"])
    pasted = np.asarray(jnp.all(out != images, axis=-1))  # (B, H, W): pixels from the reverse
    assert float(info["cutmix"]) == 1.0
    # One box, the same in every image (its example's mirror differs everywhere).
    assert (pasted == pasted[0]).all()
    assert pasted[0].mean() == pytest.approx(1.0 - lam, abs=1e-6)
    np.testing.assert_allclose(out[pasted], images[::-1][pasted])
    np.testing.assert_allclose(mixed.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(mixed, lam * t + (1 - lam) * t[::-1], rtol=1e-6)


def test_mix_switch_and_mix_prob_choose_per_batch():
    images, t = _images(), _targets()
    both = mixing.MixConfig(mixup_alpha=0.2, cutmix_alpha=1.0, mix_switch_prob=0.5)
    kinds = [
        float(mixing.mix_batch(jax.random.key(s), images, t, both)[2]["cutmix"]) for s in range(40)
    ]
    assert 10 <= sum(kinds) <= 30  # about half CutMix
    never = mixing.MixConfig(mixup_alpha=0.2, mix_prob=0.0)
    out, mixed, info = mixing.mix_batch(jax.random.key(0), images, t, never)
    assert float(info["mix_lambda"]) == 1.0
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(mixed, t)


def test_mixing_is_a_function_of_the_key():
    images, t = _images(), _targets()
    cfg = mixing.MixConfig(mixup_alpha=0.2, cutmix_alpha=1.0)
    a = mixing.mix_batch(jax.random.key(3), images, t, cfg)
    b = mixing.mix_batch(jax.random.key(3), images, t, cfg)
    c = mixing.mix_batch(jax.random.key(4), images, t, cfg)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


def test_random_erasing_erases_one_box_per_image_as_torchvision():
    images = _images(n=256, h=32, w=32) + 5.0  # no zeros of its own
    out = np.asarray(mixing.random_erasing(jax.random.key(0), images, 0.5))
    erased = (out == 0).all(-1)  # (B, H, W)
    assert ((out == np.asarray(images)) | (out == 0)).all()  # nothing else changes
    area = erased.mean((1, 2))
    hit = area > 0
    assert 0.4 < hit.mean() < 0.6  # p = 0.5
    # torchvision's scale (0.02, 0.33) of the area, rounded sides: within them.
    assert area[hit].min() >= 0.015 and area[hit].max() <= 0.36
    for e in erased[hit][:20]:  # a filled rectangle
        ys, xs = np.nonzero(e)
        assert e[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].all()
    np.testing.assert_array_equal(mixing.random_erasing(jax.random.key(0), images, 0.0), images)
    again = mixing.random_erasing(jax.random.key(0), images, 0.5)
    np.testing.assert_array_equal(out, again)


def test_train_step_with_mixing_is_deterministic_per_step_and_changes_the_loss():
    batch = _batch(n=16)
    c = tiny_config()
    key = jax.random.key(7)
    mix = mixing.MixConfig(mixup_alpha=0.2, cutmix_alpha=1.0)
    a, _ = _run_steps(c, batch, n=2, mix=mix, augment_key=key, random_erasing=0.25)
    b, _ = _run_steps(c, batch, n=2, mix=mix, augment_key=key, random_erasing=0.25)
    plain, _ = _run_steps(c, batch, n=2)
    assert a == b
    assert a[0] != plain[0]


# --------------------------------------------------------------------------- #
# Optimizers and the polynomial schedule
# --------------------------------------------------------------------------- #


def test_lars_equals_a_hand_written_update_on_a_small_tree():
    c = tiny_config(optimizer="lars", weight_decay=1e-3, momentum=0.9, lars_trust_coefficient=0.01)
    tx = recipe.create_optimizer(c, lambda step: 0.5)
    params = {
        "conv": {"kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]])},
        "bn": {"scale": jnp.array([1.0, 2.0]), "bias": jnp.array([0.1, -0.1])},
    }
    grads = {
        "conv": {"kernel": jnp.array([[0.2, 0.1], [-0.3, 0.4]])},
        "bn": {"scale": jnp.array([0.5, -0.5]), "bias": jnp.array([1.0, 2.0])},
    }
    opt = tx.init(params)
    p = params
    velocity = jax.tree.map(np.zeros_like, params)
    expected = jax.tree.map(np.asarray, params)
    for _ in range(2):
        updates, opt = tx.update(grads, opt, p)
        p = optax.apply_updates(p, updates)
        # By hand, as MLPerf's lars_optimizer.py: kernels get weight decay and
        # the trust ratio eta * |w| / (|g| + wd * |w|), BatchNorm neither.
        w, g = expected["conv"]["kernel"], np.asarray(grads["conv"]["kernel"])
        ratio = 0.01 * np.linalg.norm(w) / (np.linalg.norm(g) + 1e-3 * np.linalg.norm(w))
        g = g + 1e-3 * w
        velocity["conv"]["kernel"] = 0.9 * velocity["conv"]["kernel"] + 0.5 * ratio * g
        expected["conv"]["kernel"] = w - velocity["conv"]["kernel"]
        for name in ("scale", "bias"):
            gb = np.asarray(grads["bn"][name])
            velocity["bn"][name] = 0.9 * velocity["bn"][name] + 0.5 * gb
            expected["bn"][name] = expected["bn"][name] - velocity["bn"][name]
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6)


def test_lars_state_is_optax_lars_state_and_a_zero_norm_keeps_the_update():
    """A checkpoint written with optax.lars restores into this LARS (same
    state tree); a zero gradient or weight leaves the update unscaled (MLPerf)."""
    params = {"conv": {"kernel": jnp.zeros((2, 2))}, "bn": {"scale": jnp.ones(2)}}
    ours = recipe.lars(lambda step: 0.5, 1e-3, 0.01, 0.0, 0.9, False)
    theirs = optax.lars(lambda step: 0.5, 1e-3, momentum=0.9)
    assert jax.tree.structure(ours.init(params)) == jax.tree.structure(theirs.init(params))
    grads = {"conv": {"kernel": jnp.ones((2, 2))}, "bn": {"scale": jnp.ones(2)}}
    updates, _ = ours.update(grads, ours.init(params), params)
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.5 * np.ones((2, 2)), rtol=1e-6)


@pytest.mark.parametrize("name", ["lamb", "adamw"])
def test_adaptive_optimizers_train_and_mask_the_decay(name):
    c = tiny_config(
        optimizer=name, learning_rate=1e-3, weight_decay=0.5, weight_decay_exclude_bn_bias=True
    )
    tx = recipe.create_optimizer(c, lambda step: 1e-3)
    params = {"conv": {"kernel": jnp.ones((2, 2))}, "bn": {"scale": jnp.ones(2)}}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    # A zero gradient: only the decoupled decay moves the kernel, nothing the scale.
    assert float(jnp.abs(updates["conv"]["kernel"]).max()) > 0
    assert float(jnp.abs(updates["bn"]["scale"]).max()) == 0
    losses, _ = _run_steps(tiny_config(optimizer=name, learning_rate=1e-3), _batch(), n=4)
    assert losses[-1] < losses[0]


def test_polynomial_schedule_is_mlperfs():
    c = tiny_config(
        lr_schedule="polynomial",
        learning_rate=10.0,
        warmup_steps=5,
        num_train_steps=45,
        lr_end_value=1e-4,
        lr_power=2.0,
    )
    lr = recipe.create_learning_rate_fn(c)
    T = 45 - 5 + 1
    for step in (0, 1, 3, 5, 6, 20, 44, 45):
        if step <= 5:
            want = 10.0 * step / 5
        else:
            want = (10.0 - 1e-4) * (1 - (step - 5) / T) ** 2 + 1e-4
        assert float(lr(step)) == pytest.approx(want, rel=1e-5), step


# --------------------------------------------------------------------------- #
# Config checks and the recipes
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"optimizer": "adam"}, "Unknown optimizer 'adam'"),
        ({"lr_schedule": "poly"}, "Unknown lr_schedule 'poly'"),
        ({"lr_power": 0.0}, "lr_power=0.0"),
        ({"lr_end_value": 1.0}, "lr_end_value=1.0"),
        ({"lars_trust_coefficient": -1.0}, "lars_trust_coefficient=-1.0"),
        ({"adam_b2": 1.0}, "adam_b2=1.0"),
        ({"adam_eps": 0.0}, "adam_eps=0.0"),
        ({"grad_accum_steps": 0}, "grad_accum_steps=0"),
        ({"grad_accum_steps": 4}, "grad_accum_steps=4 must be an integer"),  # 16 / 4 < 8 devices
        ({"grad_accum_steps": 2, "bn_groups": 16}, "/ grad_accum_steps=2 must be divisible"),
        ({"ema_decay": 1.0}, "ema_decay=1.0"),
        ({"ema_decay": 0.9, "ema_every_steps": 0}, "ema_every_steps=0"),
        ({"mixup_alpha": -0.2}, "mixup_alpha=-0.2"),
        ({"cutmix_alpha": float("nan")}, "cutmix_alpha=nan"),
        ({"mix_prob": 1.5}, "mix_prob=1.5"),
        ({"mix_switch_prob": -0.1}, "mix_switch_prob=-0.1"),
        ({"random_erasing": 2.0}, "random_erasing=2.0"),
        ({"auto_augment": "autoaugment"}, "auto_augment"),
        ({"auto_augment": "randaugment", "randaugment_magnitude": 31}, "randaugment_magnitude"),
        ({"auto_augment": "randaugment", "randaugment_num_ops": 0}, "randaugment_num_ops"),
        ({"auto_augment": "trivialaugment", "device_data": True}, "device_data=False"),
        ({"auto_augment": "trivialaugment", "augment": False}, "augment=False"),
        ({"init_from_ema": True}, "init_from_ema=True"),
        ({"repeated_augmentation": 0}, "repeated_augmentation=0"),
        ({"repeated_augmentation": 3, "device_data": True}, "device_data=False"),
        ({"repeated_augmentation": 3, "augment": False}, "augment=False"),
    ],
)
def test_every_new_key_is_checked_with_one_line(overrides, words):
    c = tiny_config(**overrides)
    with pytest.raises(UserError) as e:
        config_checks.validate_config(c, 8)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_grad_accum_hint_is_a_valid_setting():
    c = tiny_config(batch_size=48, grad_accum_steps=4)
    with pytest.raises(UserError, match=r"--config.grad_accum_steps=3") as e:
        config_checks.validate_config(c, 8)
    assert "\n" not in str(e.value)
    config_checks.validate_config(tiny_config(batch_size=48, grad_accum_steps=3), 8)


@pytest.mark.parametrize("module", [imagenet_tv2, imagenet_mlperf])
def test_recipes_are_valid_configs(module):
    c = module.get_config()
    config_checks.validate_config(c, 8)
    c = config_checks.resolve_schedule(c, 1_281_167)  # ImageNet's training set
    steps_per_epoch = 1_281_167 // c.batch_size
    assert c.warmup_steps == round(5 * steps_per_epoch)
    lr = recipe.create_learning_rate_fn(c)
    assert float(lr(c.warmup_steps)) == pytest.approx(c.learning_rate, rel=1e-4)
    assert float(lr(c.num_train_steps)) < 1e-3 * c.learning_rate
    assert recipe.create_optimizer(c, lr) is not None


def test_tv2_ema_decay_is_torchvisions_adjusted_rate():
    # torchvision's train.py: alpha = (1 - 0.99998) * 8 * 128 * 32 / 600 per update.
    c = imagenet_tv2.get_config()
    assert c.ema_decay == pytest.approx(1 - 2e-5 * 1024 * 32 / 600, rel=1e-12)
    assert (c.ema_every_steps, c.image_size, c.eval_image_size, c.eval_resize) == (
        32,
        176,
        224,
        232,
    )
