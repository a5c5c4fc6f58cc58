"""Fine-tuning (resnet_jax/finetune.py): init_from, frozen and slower backbones,
frozen BatchNorm statistics, the digits class subset, and the experiment script.

Runs on 8 simulated CPU devices (tests/conftest.py).
"""

import functools
import json
import logging
import os

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import digits, finetune
from experiments import finetune_digits
from resnet_jax import data
from resnet_jax.errors import UserError
from resnet_jax.training import checks as config_checks
from resnet_jax.training import experiment, loop, recipe
from resnet_jax.training import finetune as ft
from resnet_jax.training import steps as train_steps
from tests.helpers import tiny_config


def tiny_digits(**overrides):
    """resnet8 on the digits, batch 16, 6 steps, checkpoints at 3 and 6."""
    c = digits.get_config()
    c.update(
        model="resnet8",
        batch_size=16,
        eval_batch_size=48,
        num_train_steps=6,
        lr_boundaries=(100,),
        log_every_steps=3,
        eval_every_steps=6,
        checkpoint_every_steps=3,
    )
    c.update(overrides)
    return c


def tiny_finetune(init_from=None, **overrides):
    """configs/finetune.py on resnet8: digits 5-9, 4 labels per class, 6 steps."""
    c = finetune.get_config()
    c.update(
        model="resnet8",
        train_examples_per_class=4,
        eval_batch_size=48,
        num_train_steps=6,
        lr_boundaries=(100,),
        log_every_steps=3,
        eval_every_steps=6,
        checkpoint_every_steps=3,
        init_from=init_from,
    )
    c.update(overrides)
    return c


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A resnet8 workdir trained 3 steps on the digits 0-4."""
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    c = tiny_digits(classes=(0, 1, 2, 3, 4), num_train_steps=3, eval_every_steps=3)
    loop.train_and_evaluate(c, workdir, progress=False)
    return workdir


def flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def is_head(key):
    return "head" in key.split("/")


def backbone(tree):
    return {k: v for k, v in flat(tree).items() if not is_head(k)}


# --------------------------------------------------------------------------- #
# The digits class subset
# --------------------------------------------------------------------------- #


def test_digits_class_subset_relabels_and_keeps_the_first_n_per_class():
    full_train, full_test = data.load_digits()
    train, test = data.load_digits(classes=(7, 2), train_examples_per_class=5, subset_seed=0)
    assert np.bincount(train.labels).tolist() == [5, 5]
    # Test split: every test image of 7 and 2, relabelled 0 and 1, never cut.
    np.testing.assert_array_equal(
        test.labels, np.where(full_test.labels[np.isin(full_test.labels, (7, 2))] == 7, 0, 1)
    )
    np.testing.assert_array_equal(test.images, full_test.images[np.isin(full_test.labels, (7, 2))])
    # Each kept training image is one of the split's images of its class.
    for image, label in zip(train.images, train.labels):
        of_class = full_train.images[full_train.labels == (7, 2)[label]]
        assert (of_class == image).all(axis=(1, 2, 3)).any()
    # The 5 are among the 10 of the same seed; another seed draws others.
    more, _ = data.load_digits(classes=(7, 2), train_examples_per_class=10, subset_seed=0)
    other, _ = data.load_digits(classes=(7, 2), train_examples_per_class=5, subset_seed=1)
    as_set = lambda s: {x.tobytes() for x in s.images}  # noqa: E731
    assert as_set(train) <= as_set(more) and as_set(train) != as_set(other)
    # The defaults change nothing.
    same_train, _ = data.load_digits(classes=(), train_examples_per_class=0)
    np.testing.assert_array_equal(same_train.images, full_train.images)
    with pytest.raises(UserError, match="train_examples_per_class=500 but class"):
        data.load_digits(classes=(1, 2), train_examples_per_class=500)


def test_a_class_or_label_subset_subtracts_the_whole_training_splits_mean():
    full = data.InputPipeline(digits.get_config())
    full_train, _ = data.load_digits()
    expected = (full_train.images.astype(np.float64).mean(axis=0) / 255.0).astype(np.float32)
    np.testing.assert_array_equal(full.mean, expected)  # no subset: its own split's mean
    pretrain = data.InputPipeline(tiny_digits(classes=(0, 1, 2, 3, 4)))
    assert pretrain.info.train_size < full.info.train_size
    for seed in (0, 1):
        sub = data.InputPipeline(tiny_finetune(train_subset_seed=seed))
        assert sub.info.train_size == 20  # 4 labels of each of 5 classes
        np.testing.assert_array_equal(sub.mean, full.mean)
    np.testing.assert_array_equal(pretrain.mean, full.mean)
    # The batches subtract it.
    eval_batch = next(sub.eval_batches())
    expected = sub.test.images[0].astype(np.float32) / 255.0 - full.mean
    np.testing.assert_allclose(eval_batch["image"][0], expected, atol=1e-6)


BAD = [
    ({"classes": (5, 6)}, "digits dataset only, not cifar10"),
    ({"train_examples_per_class": 3}, "digits dataset only"),
    ({"dataset": "digits", "classes": (5, 5)}, "two or more distinct digits"),
    ({"dataset": "digits", "classes": (3, 10)}, "two or more distinct digits"),
    ({"dataset": "digits", "train_examples_per_class": -1}, "train_examples_per_class=-1"),
    ({"backbone_lr_multiplier": 0.0}, "backbone_lr_multiplier=0.0 must be positive"),
    ({"freeze_backbone": True, "backbone_lr_multiplier": 0.1}, "set one of them"),
]


def test_a_missing_init_from_is_refused_on_a_fresh_start_only():
    # A resume ignores init_from, so the config check lets it be gone ...
    config_checks.validate_config(tiny_config(init_from="/nonexistent/run"), 8)
    # ... and the fresh start, which reads it, says so in one line.
    with pytest.raises(UserError, match="init_from='/nonexistent/run' does not exist"):
        ft.load_variables("/nonexistent/run")


@pytest.mark.parametrize("overrides, fragment", BAD, ids=[str(o) for o, _ in BAD])
def test_bad_finetuning_settings_are_refused(overrides, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        config_checks.validate_config(tiny_config(**overrides), 8)


# --------------------------------------------------------------------------- #
# The optimizer's groups and frozen BatchNorm statistics
# --------------------------------------------------------------------------- #


def _params():
    rng = np.random.default_rng(0)
    return {
        "stem_conv": {"kernel": rng.normal(size=(3, 3, 1, 4)).astype(np.float32)},
        "stem_bn": {"scale": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)},
        "head": {
            "kernel": rng.normal(size=(4, 5)).astype(np.float32),
            "bias": np.zeros(5, np.float32),
        },
    }


def test_backbone_learning_rate_multiplier_scales_its_update():
    params = _params()
    grads = jax.tree.map(lambda x: np.full_like(x, 0.5), params)
    updates = {}
    for m in (1.0, 0.1):
        c = tiny_config(momentum=0.0, weight_decay=0.0, backbone_lr_multiplier=m)
        tx = recipe.create_optimizer(c, optax.constant_schedule(0.2))
        updates[m], _ = tx.update(grads, tx.init(params), params)
    for k, v in flat(updates[1.0]).items():
        ratio = flat(updates[0.1])[k] / v
        np.testing.assert_allclose(ratio, 1.0 if is_head(k) else 0.1, rtol=1e-6)
    np.testing.assert_allclose(flat(updates[1.0])["head/bias"], -0.2 * 0.5)


def test_frozen_backbone_gets_no_update_not_even_weight_decay():
    params = _params()
    grads = jax.tree.map(lambda x: np.full_like(x, 0.5), params)
    tx = recipe.create_optimizer(
        tiny_config(freeze_backbone=True, weight_decay=0.1), optax.constant_schedule(0.2)
    )
    state = tx.init(params)
    for _ in range(2):  # momentum has something to carry on the second step
        updates, state = tx.update(grads, state, params)
    for k, v in flat(updates).items():
        assert (v == 0).all() != is_head(k), k


def _state_and_batch(c):
    mesh = recipe.create_mesh()
    repl, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    model = recipe.model_from_config(c, 5)
    lr_fn = recipe.create_learning_rate_fn(c)
    tx = recipe.create_optimizer(c, lr_fn)
    state = recipe.create_train_state(model, tx, (8, 8, 1), jax.random.key(0), repl)
    rng = np.random.default_rng(0)
    batch = {
        "image": jax.device_put(rng.normal(size=(16, 8, 8, 1)).astype(np.float32), shard),
        "label": jax.device_put(rng.integers(0, 5, 16).astype(np.int32), shard),
    }
    step = jax.jit(
        functools.partial(
            train_steps.train_step,
            learning_rate_fn=lr_fn,
            num_classes=5,
            freeze_bn_stats=bool(c.freeze_bn_stats),
        )
    )
    return state, batch, step


@pytest.mark.parametrize("freeze_backbone", [False, True])
@pytest.mark.parametrize("freeze_bn_stats", [False, True])
def test_train_steps_keep_what_is_frozen_bit_for_bit(freeze_backbone, freeze_bn_stats):
    c = tiny_digits(freeze_backbone=freeze_backbone, freeze_bn_stats=freeze_bn_stats)
    state, batch, step = _state_and_batch(c)
    before = jax.device_get((state.params, state.batch_stats))
    for _ in range(3):
        state, _ = step(state, batch)
    params, stats = jax.device_get((state.params, state.batch_stats))
    same_backbone = all(
        np.array_equal(v, backbone(before[0])[k]) for k, v in backbone(params).items()
    )
    same_stats = all(np.array_equal(v, flat(before[1])[k]) for k, v in flat(stats).items())
    assert same_backbone == freeze_backbone
    assert same_stats == freeze_bn_stats
    assert not np.array_equal(params["head"]["kernel"], before[0]["head"]["kernel"])


# --------------------------------------------------------------------------- #
# init_from
# --------------------------------------------------------------------------- #


def test_init_from_a_workdir_loads_all_but_the_new_head(pretrained, tmp_path, caplog, monkeypatch):
    source = ft.read_checkpoint_variables(pretrained)[1]
    monkeypatch.chdir(os.path.dirname(pretrained))  # a relative init_from, as users write it
    c = tiny_finetune(os.path.basename(pretrained), freeze_backbone=True, freeze_bn_stats=True)
    with caplog.at_level(logging.INFO, logger="resnet_jax"):
        loop.train_and_evaluate(c, str(tmp_path), progress=False)
    assert "classifier freshly initialised" in caplog.text
    tuned = ft.read_checkpoint_variables(str(tmp_path))[1]
    # Frozen backbone and statistics: still the pretrained network's, exactly.
    for k, v in backbone(tuned).items():
        np.testing.assert_array_equal(v, backbone(source)[k], err_msg=k)
    # The head (5 classes both times) is new: finetune_new_head=True in configs/finetune.py.
    assert not np.array_equal(tuned["params"]["head"]["kernel"], source["params"]["head"]["kernel"])


def test_init_from_keeps_a_head_that_fits_unless_told():
    target = {
        "params": {
            "conv": {"kernel": np.zeros((2, 3), np.float32)},
            "head": {"bias": np.zeros(5, np.float32)},
        }
    }
    loaded = {"params": {"conv": {"kernel": np.ones((2, 3))}, "head": {"bias": np.ones(5)}}}
    merged, kept = ft.merge_variables(target, loaded, new_head=False, source="x")
    assert kept and merged["params"]["head"]["bias"].tolist() == [1.0] * 5
    merged, kept = ft.merge_variables(target, loaded, new_head=True, source="x")
    assert not kept and merged["params"]["head"]["bias"].tolist() == [0.0] * 5
    assert merged["params"]["conv"]["kernel"].dtype == np.float32
    loaded["params"]["head"]["bias"] = np.ones(10)  # another num_classes: a fresh head
    assert not ft.merge_variables(target, loaded, new_head=False, source="x")[1]
    loaded["params"]["conv"]["kernel"] = np.ones((2, 4))
    with pytest.raises(
        UserError, match=r"params/conv/kernel has shape \(2, 4\) but .* needs \(2, 3\)"
    ):
        ft.merge_variables(target, loaded, new_head=False, source="x")


def test_init_from_another_network_names_the_first_mismatch(pretrained, tmp_path):
    with pytest.raises(
        UserError, match="has no params/stage1_block2/bn1/bias, which the config.s model needs"
    ):
        loop.train_and_evaluate(
            tiny_finetune(pretrained, model="resnet14"), str(tmp_path), progress=False
        )


def test_init_from_a_run_of_another_network_of_the_same_shapes_is_refused(pretrained, tmp_path):
    """resnet8 (option-A shortcuts: no parameters) and plain8 have the same
    arrays; the source run's fingerprint tells them apart. The variant of a
    basic-block net changes nothing, so it passes."""
    with pytest.raises(UserError, match="was trained as model='resnet8', shortcut='A'"):
        loop.train_and_evaluate(
            tiny_finetune(pretrained, model="plain8"), str(tmp_path / "plain"), progress=False
        )
    assert not (tmp_path / "plain").exists()
    c = tiny_finetune(pretrained, variant="v1.5", num_train_steps=1, eval_every_steps=1)
    assert loop.train_and_evaluate(c, str(tmp_path / "v15"), progress=False)["step"] == 1


def test_init_from_torchvision_weights(tmp_path):
    """A torchvision resnet18 state dict (.safetensors) into resnet18 on 10 CIFAR classes."""
    from safetensors.numpy import save_file

    import resnet_jax as rj

    module = rj.create_model("resnet18", num_classes=1000)
    variables = module.init(jax.random.key(1), np.zeros((1, 32, 32, 3), np.float32))
    path = str(tmp_path / "resnet18.safetensors")
    save_file(rj.weights.to_torchvision(module, variables), path)
    c = tiny_config(model="resnet18", init_from=path)
    exp = experiment.build_experiment(c, str(tmp_path / "w"))
    ckpt = experiment.open_checkpointer(exp)
    try:
        state, meta = experiment.restore_or_init(exp, ckpt)
    finally:
        ckpt.close()
    assert meta is None and int(state.step) == 0
    got = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    # The stem takes the trainer's x/255 - mean instead of (x/255 - mean) / std.
    std = np.asarray(rj.weights.IMAGENET_STD, np.float32).reshape(1, 1, 3, 1)
    want = backbone(variables)
    want["params/stem_conv/kernel"] = want["params/stem_conv/kernel"] / std
    for k, v in backbone(got).items():
        np.testing.assert_allclose(v, want[k], rtol=1e-6, err_msg=k)
    assert got["params"]["head"]["kernel"].shape == (512, 10)  # 1000 -> 10: a fresh head


def test_converted_weights_compute_the_same_function_on_the_trainers_input():
    import resnet_jax as rj

    module = rj.create_model("resnet18", num_classes=5)
    variables = module.init(jax.random.key(3), np.zeros((1, 32, 32, 3), np.float32))
    p = rj.weights.Preprocessing()  # torchvision's: ImageNet mean and std, RGB
    x = np.random.default_rng(0).uniform(0, 1, (2, 33, 35, 3)).astype(np.float32)
    centred = x - np.asarray(p.mean, np.float32)
    want = module.apply(variables, centred / np.asarray(p.std, np.float32), train=False)
    got = module.apply(ft.to_trainer_input(variables, p, "w"), centred, train=False)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="expects BGR input"):
        ft.to_trainer_input(variables, rj.weights.Preprocessing(channels="BGR"), "w")


def test_init_from_transformers_weights_directory_and_file(tmp_path):
    """Hugging Face names (embedder.*, encoder.*): a checkpoint directory, or a
    lone file (recognised by its names)."""
    from safetensors.numpy import save_file

    import resnet_jax as rj

    module = rj.create_model("resnet18", num_classes=7)
    variables = module.init(jax.random.key(2), np.zeros((1, 32, 32, 3), np.float32))
    hf = {
        "resnet." + rj.weights.torchvision_to_hf(k): v
        for k, v in rj.weights.to_torchvision(module, variables).items()
    }
    (tmp_path / "hf").mkdir()
    save_file(hf, str(tmp_path / "hf" / "model.safetensors"))
    save_file(hf, str(tmp_path / "lone.safetensors"))
    for path in (tmp_path / "hf", tmp_path / "lone.safetensors"):
        _, loaded, converted = ft.load_variables(str(path))
        assert converted is not None
        for k, v in flat(variables).items():
            np.testing.assert_array_equal(flat(loaded)[k], v, err_msg=k)
    with pytest.raises(UserError, match="init_from="):
        ft.load_variables(str(tmp_path / "hf" / "model.safetensors") + ".missing")


def test_resume_ignores_init_from_and_is_exact(pretrained, tmp_path, caplog):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    c = tiny_finetune(pretrained, backbone_lr_multiplier=0.1)
    s_whole = loop.train_and_evaluate(c, whole, progress=False)
    loop.train_and_evaluate(
        tiny_finetune(pretrained, backbone_lr_multiplier=0.1, num_train_steps=3),
        parts,
        progress=False,
    )
    with caplog.at_level(logging.INFO, logger="resnet_jax"):
        s_parts = loop.train_and_evaluate(c, parts, progress=False)
    assert "init_from is ignored" in caplog.text
    assert s_parts["step"] == s_whole["step"] == 6
    assert s_parts["eval_loss"] == s_whole["eval_loss"]
    a, b = ft.read_checkpoint_variables(whole)[1], ft.read_checkpoint_variables(parts)[1]
    for k, v in flat(a).items():
        np.testing.assert_array_equal(v, flat(b)[k], err_msg=k)
    # Fine-tuned, not trained from scratch: the backbone moved from the pretrained one only a little.
    source = backbone(ft.read_checkpoint_variables(pretrained)[1])
    kernel = "params/stage1_block1/conv1/kernel"
    assert np.abs(backbone(a)[kernel] - source[kernel]).max() < 0.1 * np.abs(source[kernel]).max()


# --------------------------------------------------------------------------- #
# The experiment script
# --------------------------------------------------------------------------- #


@pytest.fixture
def restore_resnet_jax_logger():
    """The script's setup_logging changes the 'resnet_jax' logger; put it back."""
    logger = logging.getLogger("resnet_jax")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]


def test_finetune_digits_writes_a_well_formed_results_file(tmp_path, restore_resnet_jax_logger):
    root, out = tmp_path / "runs", tmp_path / "results"
    argv = [
        f"--root={root}",
        f"--out={out}",
        "--labels=4",
        "--seeds=3",
        "--pretrain-steps=2",
        "--steps=2",
        "--config.model=resnet8",
        "--config.eval_batch_size=48",
        "--compilation-cache-dir=",
    ]
    assert finetune_digits.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    p = results["provenance"]
    assert p["command"].startswith("python -m experiments.finetune_digits --root=")
    assert {"started", "finished", "commit", "host", "devices", "versions"} <= set(p)
    assert len(p["commit"]) == 40 or p["commit"] == "unknown"
    assert results["pretrain"]["overrides"]["classes"] == [0, 1, 2, 3, 4]
    assert len(results["runs"]) == len(finetune_digits.METHODS)
    for r in results["runs"]:
        assert r["labels_per_class"] == 4 and r["steps"] == 2 and r["eval_count"] == 180
        assert 0.0 <= r["eval_accuracy"] <= 1.0
        assert (
            r["overrides"]["train_examples_per_class"] == 4 and r["overrides"]["seed"] == r["seed"]
        )
        assert (r["overrides"]["init_from"] is None) == (r["method"] == "scratch")
        slow = r["method"] == "finetune_slow_backbone"
        assert r["overrides"]["backbone_lr_multiplier"] == (0.1 if slow else 1.0)
    (row,) = results["summary"]
    for m in finetune_digits.METHODS:
        assert row[m]["seeds"] == [3] and np.isclose(row[m]["mean"], np.mean(row[m]["accuracies"]))
    for m in finetune_digits.FINETUNES:
        assert row[f"{m}_minus_scratch"]["seeds"] == [3]
    md = (out / "results.md").read_text()
    assert "| 4 | 20 |" in md and p["command"] in md and "backbone lr × 0.1" in md
    # Again: every run is finished, so nothing trains and the accuracies are the same.
    assert finetune_digits.main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert [r["eval_accuracy"] for r in again["runs"]] == [
        r["eval_accuracy"] for r in results["runs"]
    ]
    with pytest.raises(UserError, match="sets classes itself"):
        finetune_digits.main([*argv, "--config.classes=(1,2)"])
