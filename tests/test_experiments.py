"""experiments/: the sweep and Table 6, the training curves (Fig. 6, Fig. 4) and
the layer responses (Fig. 7), end to end on tiny runs of real digits data and
ImageNet mock data; the response statistics against a direct computation."""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("matplotlib")
from matplotlib import image as mpimg  # noqa: E402

import resnet_jax as rj  # noqa: E402
from configs import imagenet  # noqa: E402
from experiments import plot_curves, responses, runs, sweep  # noqa: E402
from resnet_jax.errors import UserError  # noqa: E402
from resnet_jax.training import experiment, loop  # noqa: E402

CACHE = f"--compilation-cache-dir={os.environ.get('RESNET_JAX_TEST_COMPILE_CACHE', '')}"
# plain8 and resnet8 on digits, 4 steps, evaluated every 2.
TINY_SWEEP = [
    "--dataset=digits",
    "--depths=8",
    "--seeds=0",
    "--kinds=plain,resnet",
    "--steps=4",
    "--config.log_every_steps=2",
    "--config.eval_every_steps=2",
    CACHE,
]
RUNS = ("plain8_seed0", "resnet8_seed0")


def _image(path, height, width):
    img = mpimg.imread(str(path))
    assert img.shape[:2] == (height, width)
    assert float(img[..., :3].std()) > 0.0  # not blank
    return img


# --------------------------------------------------------------------------- #
# Fig. 7: the statistic itself
# --------------------------------------------------------------------------- #


def _conv3x3(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _bn(y, params, stats, eps=1e-5):
    return (y - stats["mean"]) / jnp.sqrt(stats["var"] + eps) * params["scale"] + params["bias"]


def test_response_std_equals_a_direct_computation():
    model = rj.create_model("resnet8", num_classes=10)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 8, 8, 3)).astype(np.float32)
    variables = model.init(jax.random.key(0), x[:1])
    # Running statistics and BatchNorm parameters far from their initial values.
    variables = {
        "params": jax.tree_util.tree_map_with_path(
            lambda p, v: (
                (v * rng.uniform(0.5, 1.5, v.shape) if p[-1].key == "scale" else v)
                + (rng.normal(0, 0.3, v.shape) if p[-1].key == "bias" else 0)
            ),
            variables["params"],
        ),
        "batch_stats": jax.tree_util.tree_map_with_path(
            lambda p, v: (
                rng.normal(0, 0.5, v.shape).astype(np.float32)
                if p[-1].key == "mean"
                else rng.uniform(0.5, 2.0, v.shape).astype(np.float32)
            ),
            variables["batch_stats"],
        ),
    }
    # 10 examples in two batches of 6; the 2 padding examples (mask 0) must not count.
    pad = np.full((2, 8, 8, 3), 7.0, np.float32)
    batches = [
        {"image": x[:6], "mask": np.ones(6, np.float32)},
        {"image": np.concatenate([x[6:], pad]), "mask": np.array([1, 1, 1, 1, 0, 0], np.float32)},
    ]
    got = responses.layer_response_std(model, variables, batches)
    assert list(got) == [
        "stem_bn",
        "stage1_block1/bn1",
        "stage1_block1/bn2",
        "stage2_block1/bn1",
        "stage2_block1/bn2",
        "stage3_block1/bn1",
        "stage3_block1/bn2",
    ]
    # By hand: stem conv -> BN with the running statistics; then the first
    # block's conv1 on the stem's ReLU -> bn1. Std over examples, positions, channels.
    p, s = variables["params"], variables["batch_stats"]
    stem = _bn(_conv3x3(x, p["stem_conv"]["kernel"]), p["stem_bn"], s["stem_bn"])
    block = p["stage1_block1"]
    y = _bn(
        _conv3x3(jax.nn.relu(stem), block["conv1"]["kernel"]),
        block["bn1"],
        s["stage1_block1"]["bn1"],
    )
    np.testing.assert_allclose(got["stem_bn"], np.std(np.asarray(stem, np.float64)), rtol=1e-5)
    np.testing.assert_allclose(
        got["stage1_block1/bn1"], np.std(np.asarray(y, np.float64)), rtol=1e-5
    )


def test_response_layers_are_the_batchnorms_after_3x3_convolutions():
    def layers(name):
        model = rj.create_model(name)
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        return responses.response_layers(shapes["params"])

    # ImageNet basic blocks: both 3x3s of each block; not the 7x7 stem nor a projection.
    r18 = layers("resnet18")
    assert (
        len(r18) == 16
        and r18[0] == ("stage1_block1", "bn1")
        and r18[-1] == ("stage4_block2", "bn2")
    )
    # Bottlenecks: the 3x3 only; block 10 comes after block 9 (network order, not text order).
    r101 = layers("resnet101")
    assert len(r101) == 33 and all(p[-1] == "bn2" for p in r101)
    assert r101.index(("stage3_block10", "bn2")) == r101.index(("stage3_block9", "bn2")) + 1
    # CIFAR nets: the 3x3 stem too; 1 + 2 per block.
    assert len(layers("plain20")) == 19


# --------------------------------------------------------------------------- #
# The sweep's plan (no training)
# --------------------------------------------------------------------------- #


def test_plan_follows_the_paper_recipes():
    def config(dataset, kind, depth, steps=0, platform="gpu", overrides=()):
        return sweep.run_config(
            dataset, kind, depth, 0, steps=steps, overrides=overrides, platform=platform
        )

    c = config("cifar10", "resnet", 110)
    assert (c.num_train_steps, c.lr_boundaries, c.batch_size) == (64_000, (32_000, 48_000), 128)
    assert (c.warmup_steps, c.warmup_learning_rate) == (400, 0.01)  # ResNet-110's warm-up
    assert c.device_data and c.steps_per_call == 100
    assert config("cifar10", "plain", 56).warmup_steps == 0
    # CPU devices: the host input pipeline, unless asked for the fast path (K <= 10).
    d = config("digits", "plain", 20, platform="cpu")
    assert (d.model, d.num_train_steps, d.eval_every_steps) == ("plain20", 1200, 50)
    assert (d.device_data, d.steps_per_call) == (False, 1)
    forced = config("digits", "plain", 20, platform="cpu", overrides=["--config.device_data=True"])
    assert (forced.device_data, forced.steps_per_call) == (True, 10)
    assert config("digits", "plain", 20).steps_per_call == 50
    short = config("cifar10", "resnet", 110, steps=6400)
    assert (short.lr_boundaries, short.warmup_steps, short.eval_every_steps) == (
        (3200, 4800),
        40,
        2000,
    )
    over = config("digits", "resnet", 8, overrides=["--config.steps_per_call=5"])
    assert over.device_data
    assert over.steps_per_call == 5
    with pytest.raises(UserError, match="the sweep sets it"):
        sweep.main(["--dataset=digits", "--config.model=resnet20", "--dry-run", CACHE])
    with pytest.raises(UserError, match="multiples of steps_per_call=7"):
        sweep.main(
            [
                "--dataset=digits",
                "--config.device_data=True",
                "--config.steps_per_call=7",
                "--dry-run",
                CACHE,
            ]
        )


def test_a_failed_run_is_reported_and_the_sweep_goes_on_or_stops(tmp_path):
    planned = [
        sweep.PlannedRun(
            kind,
            8,
            0,
            str(tmp_path / f"{kind}8_seed0"),
            sweep.run_config("digits", kind, 8, 0, steps=4, overrides=(), platform="cpu"),
        )
        for kind in ("plain", "resnet")
    ]

    def train(run, state):
        if run.kind == "plain":
            raise RuntimeError("boom")
        return {"test_error": 0.25, "train_error_eval_mode": 0.125}

    lines = []
    counts = sweep.run_sweep(planned, out=lines.append, train=train)
    assert counts["failed"] == 1 and counts["trained"] == 1
    assert lines[1].startswith("run 1 of 2: plain8 seed 0: FAILED: RuntimeError: boom (traceback: ")
    assert "boom" in (tmp_path / "plain8_seed0" / "error.log").read_text()
    assert lines[3].endswith("test error 25.00%, training error 12.50% (eval mode, unaugmented)")
    lines.clear()
    counts = sweep.run_sweep(planned, stop_on_error=True, out=lines.append, train=train)
    assert (
        counts["failed"] == 1
        and counts["trained"] == 0
        and lines[-1] == "stopping (--stop-on-error)."
    )

    # A signal saves the current run and stops the sweep: the next run does not start.
    def signalled(run, state):
        raise sweep.SweepStopped("stopped by a signal during plain8 seed 0")

    lines.clear()
    counts = sweep.run_sweep(planned, out=lines.append, train=signalled)
    assert counts["stopped"] == 1 and len(lines) == 2
    assert lines[1] == "run 1 of 2: plain8 seed 0: stopped by a signal during plain8 seed 0"


# --------------------------------------------------------------------------- #
# End to end: sweep, Table 6, Fig. 6, Fig. 7, re-run
# --------------------------------------------------------------------------- #


def test_sweep_table_and_figures_end_to_end_and_a_rerun_trains_nothing(
    tmp_path, capsys, monkeypatch
):
    root = tmp_path / "sweep"
    argv = [*TINY_SWEEP, f"--root={root}"]
    assert sweep.main([*argv, "--figures"]) == 0
    out = capsys.readouterr().out
    assert "run 1 of 2: plain8 seed 0 (fresh start), ETA after the first run" in out
    assert "run 2 of 2: resnet8 seed 0 (fresh start), ETA " in out
    assert "sweep: 2 trained, 0 skipped, 0 failed" in out
    for name in RUNS:
        result = runs.read_result(root / name)
        assert (result["step"], result["test_count"], result["train_count"]) == (4, 360, 1437)
        assert 0.0 <= result["train_error_eval_mode"] <= 1.0
        assert runs.read_config(root / name).num_train_steps == 4
        evals = [m["step"] for m in runs.read_metrics(root / name) if "eval_accuracy" in m]
        assert evals == [2, 4]
    table = json.loads((root / "table6.json").read_text())
    assert [r["model"] for r in table["rows"]] == ["plain8", "resnet8"]
    assert "| plain-8 | 0.08M | 1 | 4 |" in (root / "table6.md").read_text()

    # A finished sweep run again trains (and builds) nothing.
    before = {p: p.read_bytes() for p in root.glob("*/*.json*")}
    assert len(before) == 6  # metrics.jsonl, config.json, result.json of each run

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(loop, "train_and_evaluate", no_training)
    monkeypatch.setattr(experiment, "build_experiment", no_training)
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert "run 1 of 2: plain8 seed 0: skipped (finished at step 4)" in out
    assert "run 2 of 2: resnet8 seed 0: skipped (finished at step 4)" in out
    assert {p: p.read_bytes() for p in root.glob("*/*.json*")} == before
    # ... and refuses to resume a run with another schedule.
    with pytest.raises(UserError, match="started with another config"):
        sweep.main([*argv, "--steps=6"])
    monkeypatch.undo()

    # Fig. 6: two panels, one model each, train and test curves and the eval-mode end point.
    _image(root / "fig6.png", 450, 1200)
    rows = list(csv.DictReader((root / "fig6.csv").open()))
    assert {(r["model"], r["curve"]) for r in rows} == {
        (m, c) for m in ("plain-8", "ResNet-8") for c in ("train", "test", "train_eval_mode_final")
    }
    test_steps = [r["step"] for r in rows if r["model"] == "plain-8" and r["curve"] == "test"]
    assert test_steps == ["2", "4"]
    # Fig. 1: plain nets only, in its layout (training error left, test error right).
    import matplotlib.figure

    drawn, savefig = [], matplotlib.figure.Figure.savefig

    def record(fig, *a, **k):
        drawn.append(([ax.get_title() for ax in fig.axes], fig.get_suptitle()))
        return savefig(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    assert plot_curves.main([str(root), "--models=plain8", "--out", str(root / "fig1.png")]) == 0
    monkeypatch.undo()
    assert drawn[0][0] == ["training error", "test error"]
    assert drawn[0][1].startswith("Fig. 1: digits")
    _image(root / "fig1.png", 450, 1200)
    assert {r["model"] for r in csv.DictReader((root / "fig1.csv").open())} == {"plain-8"}

    # Fig. 7 from the runs' checkpoints and config.json (experiments.responses).
    _image(root / "fig7.png", 700, 800)
    data = json.loads((root / "fig7.json").read_text())
    assert [m["model"] for m in data["models"]] == ["plain8", "resnet8"]
    assert all(len(m["std"]) == 7 and min(m["std"]) > 0 for m in data["models"])


# --------------------------------------------------------------------------- #
# Fig. 4: ImageNet plain-18 against ResNet-18 (mock data)
# --------------------------------------------------------------------------- #


@pytest.mark.slow
def test_fig4_from_imagenet_runs_named_by_their_workdirs(tmp_path):
    for model in ("plain18", "resnet18"):
        c = imagenet.get_config()
        c.update(
            model=model,
            mock_data=True,
            mock_num_examples=16,
            image_size=32,
            train_scale_range=(36, 48),
            eval_resize=36,
            batch_size=8,
            eval_batch_size=8,
            num_train_steps=2,
            log_every_steps=1,
            eval_every_steps=1,
            checkpoint_every_steps=2,
            shuffle_buffer=16,
        )
        loop.train_and_evaluate(c, str(tmp_path / model), progress=False)
    out = tmp_path / "fig4.png"
    assert plot_curves.main([str(tmp_path), "--out", str(out)]) == 0
    _image(out, 450, 1200)
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert {(r["kind"], r["depth"], r["curve"]) for r in rows} == {
        (k, "18", c) for k in ("plain", "resnet") for c in ("train", "test")
    }


def test_modern_digits_records_raw_and_ema_accuracies_per_recipe(tmp_path):
    import logging

    from experiments import modern_digits

    logger = logging.getLogger("resnet_jax")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    root, out = tmp_path / "runs", tmp_path / "results"
    argv = [
        f"--root={root}",
        f"--out={out}",
        "--seeds=4",
        "--steps=2",
        "--config.model=resnet8",
        "--config.eval_batch_size=120",
        CACHE,
    ]
    try:
        assert modern_digits.main(argv) == 0
        with pytest.raises(UserError, match="sets ema_decay itself"):
            modern_digits.main([*argv, "--config.ema_decay=0.5"])
    finally:
        logger.handlers[:], logger.propagate, logger.level = saved
    results = json.loads((out / "results.json").read_text())
    assert results["provenance"]["command"].startswith("python -m experiments.modern_digits")
    by = {r["recipe"]: r for r in results["runs"]}
    assert list(by) == list(modern_digits.RECIPES)
    for name, r in by.items():
        assert r["seed"] == 4 and r["steps"] == 2 and r["eval_count"] == 360
        for k, v in modern_digits.RECIPES[name].items():
            assert r["overrides"][k] == v
        assert ("eval_ema_accuracy" in r) == bool(modern_digits.RECIPES[name].get("ema_decay"))
    assert 0.0 <= by["ema"]["eval_ema_accuracy"] <= 1.0
    rows = {row["recipe"]: row for row in results["summary"]}
    assert "minus_paper" not in rows["paper"]
    assert np.isclose(
        rows["all"]["minus_paper"]["mean"],
        by["all"]["eval_ema_accuracy"] - by["paper"]["eval_accuracy"],
    )
    md = (out / "results.md").read_text()
    assert "`auto_augment=trivialaugment`" in md and results["provenance"]["command"] in md
