"""benchmarks.grain_pipeline (issue 12, design b): grain over tfds' ArrayRecord
files of a tiny miniature ImageNet of real JPEGs, prepared by tfds' own builder."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("grain")

from benchmarks import grain_pipeline as gp  # noqa: E402
from resnet_jax import mini_imagenet  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES, PER_CLASS, BATCH, SEED = 4, 5, 4, 3  # 20 examples, 5 steps per epoch


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("array_record"))
    mini_imagenet.write(path, CLASSES, PER_CLASS, seed=0)
    gp.prepare(path)
    return path


def test_batches_are_uint8_crops_and_int32_labels(data_dir):
    ds = gp.train_dataset(data_dir, BATCH, SEED)
    assert gp.steps_per_epoch(data_dir, BATCH) == CLASSES * PER_CLASS // BATCH
    batch = ds[0]
    assert batch["image"].shape == (BATCH, 224, 224, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (BATCH,) and batch["label"].dtype == np.int32
    assert batch["image"].std() > 0  # photographs, not padding


def test_every_example_once_per_epoch_in_a_new_order(data_dir):
    n = CLASSES * PER_CLASS
    examples = gp.shuffled_examples(data_dir, SEED)
    names = [[examples[e * n + i]["file_name"] for i in range(n)] for e in range(2)]
    everything = sorted(ex["file_name"] for ex in gp.source(data_dir))
    assert sorted(names[0]) == sorted(names[1]) == everything
    assert names[0] != names[1]
    # The batches are those examples, in that order: step 5 is epoch 1's first.
    ds = gp.train_dataset(data_dir, BATCH, SEED)
    steps = gp.steps_per_epoch(data_dir, BATCH)
    for k in (0, steps - 1, steps):
        e, i = divmod(k, steps)
        labels = [examples[e * n + i * BATCH + j]["label"] for j in range(BATCH)]
        np.testing.assert_array_equal(ds[k]["label"], labels)


def test_the_window_has_the_scale_augmentation_distribution():
    rng = np.random.default_rng(0)
    windows = [gp.train_window(300, 500, rng, 224, (256, 480)) for _ in range(2000)]
    sides = np.array([w[2] for w in windows])
    # side = 224 * 300 / s, s uniform in [256, 480]
    assert sides.min() >= round(224 * 300 / 480) and sides.max() <= round(224 * 300 / 256)
    assert all(0 <= t <= 300 - s and 0 <= left <= 500 - s for t, left, s, _ in windows)
    assert 0.45 < np.mean([w[3] for w in windows]) < 0.55


def test_a_restored_iterator_continues_the_uninterrupted_stream(data_dir):
    ds = gp.train_dataset(data_dir, BATCH, SEED)
    it = gp.train_iterator(ds, workers=2)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]  # crosses into the second epoch
    it.close()
    resumed = gp.train_iterator(ds, workers=2, state=state)
    got = [next(resumed) for _ in range(4)]
    resumed.close()
    for k, (a, b) in enumerate(zip(expected, got)):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_array_equal(a["label"], ds[3 + k]["label"])


def test_runs_where_tensorflow_cannot_be_imported(data_dir):
    code = (
        "import sys\n"
        "from benchmarks import grain_pipeline as gp\n"
        "gp.hide_tensorflow()\n"
        "try:\n"
        "    import tensorflow\n"
        "    raise SystemExit('tensorflow imported')\n"
        "except ModuleNotFoundError:\n"
        "    pass\n"
        "if __name__ == '__main__':\n"
        f"    ds = gp.train_dataset({data_dir!r}, {BATCH}, {SEED})\n"
        "    it = gp.train_iterator(ds, workers=1, worker_init_fn=gp.hide_tensorflow)\n"
        "    batch = next(it)\n"
        "    it.close()\n"
        "    assert batch['image'].shape == (4, 224, 224, 3)\n"
        "    assert 'tensorflow' not in sys.modules\n"
        "    print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.slow
def test_the_benchmark_measures_and_reports_both_designs(tmp_path):
    from benchmarks import input_pipeline, report

    path = tmp_path / "results.jsonl"
    argv = ["--config=configs/imagenet.py", "--pipeline_only", "--designs=crop,grain"]
    argv += ["--mini-classes=4", "--mini-per-class=5", "--batch-size=4"]
    argv += ["--steps=1", "--warmup=0", "--compilation-cache-dir=", f"--results={path}"]
    line = input_pipeline.main(argv)
    assert [json.loads(x) for x in path.read_text().splitlines()] == [line]
    r = line["result"]
    assert r["designs"] == ["crop", "grain"] and r["with_grain"] and r["train_examples"] == 20
    for name in ("crop", "grain"):
        p = r["pipelines"][name]
        assert p["resume_step"] == 2 and p["steps_per_epoch"] == 5 and p["resume_exact"]
        assert p["images_per_sec"]["n"] == 1 and p["rss_mb"]["median"] > 0
    assert r["pipelines"]["grain"]["tensorflow_imported"] is False
    table = report.render_table("input_pipeline_designs", {"with_grain": "true"}, [line])
    assert "(b) grain over ArrayRecord" in table and "**Which design stays.**" in table
