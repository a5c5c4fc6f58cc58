"""The benchmark scripts record what they measured, with provenance; the report
builds tables from those lines only (tiny sizes; no speed is asserted)."""

import datetime
import glob
import gzip
import importlib.util
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from benchmarks import (
    cifar_fast,
    common,
    compare_torch,
    host_memory,
    input_pipeline,
    model_table,
    profile_step,
    report,
    throughput,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model=resnet8", "--batch-size=8", "--compilation-cache-dir="]


@pytest.fixture(autouse=True)
def _keep_xla_flags(monkeypatch):
    # The scripts append XLA:CPU flags to XLA_FLAGS (no effect once JAX has
    # started); keep them from reaching other tests' subprocesses.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))


def run(script, argv, tmp_path):
    """Runs ``script.main(argv)`` recording to a file in ``tmp_path``; the one line it wrote,
    checked to make a table of the report."""
    path = tmp_path / "results.jsonl"
    line = script.main([*argv, f"--results={path}"])
    written = [json.loads(x) for x in path.read_text().splitlines()]
    assert written == [line]
    # The report reads what the script wrote: a row, and the command under the table.
    table = report.render_table(line["benchmark"], {}, written)
    assert table.startswith("| # |") and f"1. `{line['provenance']['command']}`" in table
    return line


def git(*args):
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def assert_repeats_add_up(r, batch_size, steps, n):
    """Each repeat's figures follow from its time, and the summary from the repeats."""
    assert len(r["repeats"]) == n
    for rep in r["repeats"]:
        assert rep["images_per_sec"] == pytest.approx(batch_size * steps / rep["seconds"])
        assert rep["step_ms"] == pytest.approx(1000 * rep["seconds"] / steps)
    ips = [rep["images_per_sec"] for rep in r["repeats"]]
    assert r["images_per_sec"] == {
        "median": statistics.median(ips),
        "min": min(ips),
        "max": max(ips),
        "n": n,
    }


# --------------------------------------------------------------------------- #
# Every script records its line
# --------------------------------------------------------------------------- #


def test_throughput_records_every_repeat_and_the_provenance(tmp_path):
    argv = [*TINY, "--steps=2", "--warmup=1", "--repeats=3"]
    t0 = time.perf_counter()
    line = run(throughput, argv, tmp_path)
    wall = time.perf_counter() - t0
    p, r = line["provenance"], line["result"]
    assert line["benchmark"] == "throughput"
    assert set(common.PROVENANCE_KEYS) <= set(p)
    assert p["commit"] == git("rev-parse", "HEAD")
    # Dirty: a change outside benchmarks/results/ (whose files every run appends to).
    assert p["dirty"] is bool(git("status", "--porcelain", "--", ".", ":!benchmarks/results"))
    assert datetime.datetime.fromisoformat(p["time_utc"]).utcoffset() == datetime.timedelta(0)
    assert p["command"] == "python -m benchmarks.throughput " + shlex.join(
        [*argv, f"--results={tmp_path / 'results.jsonl'}"]
    )
    assert p["xla_flags"] == os.environ["XLA_FLAGS"] and p["gpu"] is None
    assert {"python", "jax", "jaxlib", "flax", "optax", "numpy"} <= set(p["versions"])
    assert p["cpu_count"] == os.cpu_count() and p["cpu_model"]
    assert r["materialize"] is True  # auto: on for the CPU backend
    assert r["devices"] == 8 and r["mode"] == "train"
    # The session's compilation cache (conftest.py), where there is one, was asked.
    cached = bool(jax.config.jax_compilation_cache_dir)
    assert r["compile_cache"] in (("hit", "miss") if cached else ("off",))
    assert_repeats_add_up(r, batch_size=8, steps=2, n=3)
    assert 0 < sum(rep["seconds"] for rep in r["repeats"]) < wall  # seconds, inside the run


def test_throughput_eval_step_with_materialize_off(tmp_path):
    argv = [*TINY, "--steps=3", "--warmup=0", "--repeats=1", "--mode=eval", "--materialize=off"]
    r = run(throughput, argv, tmp_path)["result"]
    assert r["materialize"] is False and r["mode"] == "eval"
    assert_repeats_add_up(r, batch_size=8, steps=3, n=1)


def test_profile_step_shares_sum_to_one_and_name_the_top_operation(tmp_path):
    argv = [*TINY, "--steps=2", "--warmup=1", f"--trace-dir={tmp_path}"]
    r = run(profile_step, argv, tmp_path)["result"]
    assert r["source"] == "host" and r["trace"].startswith(str(tmp_path))
    assert sum(k["share"] for k in r["kinds"]) == pytest.approx(1.0)
    assert sum(k["ms_per_step"] for k in r["kinds"]) == pytest.approx(r["op_ms_per_step"])
    top = r["kinds"][0]
    assert top["ms_per_step"] == max(k["ms_per_step"] for k in r["kinds"])
    # Named XLA operations (all-reduce with 8 devices, a fusion or convolution
    # with one), never the runtime's bookkeeping nested inside them.
    assert re.fullmatch(r"[a-z][a-z_-]*", top["kind"]), r["kinds"][:3]
    assert any(o["op"].startswith(top["kind"] + ".") for o in r["top_ops"]), r["top_ops"]
    bookkeeping = ("$", "ThunkExecutor", "Wait", "Rendezvous", "InvokeRendezvous")
    assert not any(k["kind"].startswith(bookkeeping) for k in r["kinds"]), r["kinds"]


def test_profile_summary_counts_each_device_operation_once(tmp_path):
    # A device process shows the step on a module line, an op line and a kernel line.
    def meta(kind, pid, tid, name):
        return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}

    def ev(pid, tid, name, dur):
        return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": 0, "dur": dur}

    events = [
        meta("process_name", 1, 0, "/device:GPU:0"),
        meta("process_name", 2, 0, "/host:CPU"),
        meta("thread_name", 1, 10, "XLA Modules"),
        meta("thread_name", 1, 11, "XLA Ops"),
        meta("thread_name", 1, 12, "Stream #7(Compute)"),
        ev(1, 10, "jit_train_step", 9000),
        ev(1, 11, "convolution.3", 6000),
        ev(1, 11, "fusion.12", 2000),
        ev(1, 12, "sm90_xmma_fprop_kernel", 5800),
        ev(2, 20, "convolution.3", 100),  # host-side launch, not device time
    ]
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    r = profile_step.summarize(str(path), steps=2)
    assert r["source"] == "device"
    assert r["op_ms_per_step"] == pytest.approx(4.0)  # (6 + 2) ms over 2 steps
    assert [k["kind"] for k in r["kinds"]] == ["convolution", "fusion"]
    # Without an "XLA Ops" line, the kernels count and the module line does not.
    events = [e for e in events if e.get("tid") != 11]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    r = profile_step.summarize(str(path), steps=2)
    assert r["op_ms_per_step"] == pytest.approx(2.9)
    # Two devices (two trace processes): the figure is per device.
    events += [
        meta("process_name", 3, 0, "/device:GPU:1"),
        ev(3, 12, "sm90_xmma_fprop_kernel", 5800),
    ]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    r = profile_step.summarize(str(path), steps=2)
    assert r["devices_summed"] == 2 and r["op_ms_per_step"] == pytest.approx(2.9)


def test_cifar_fast_runs_steps_per_call_times_calls_steps(tmp_path):
    argv = [*TINY, "--steps-per-call=1", "--repeats=2", "--train-size=64"]
    r = run(cifar_fast, argv, tmp_path)["result"]
    assert r["final_step"] == 1 * (1 + 2)  # the warm-up call and two timed calls
    assert r["final_loss_finite"] and r["materialize"] is True and r["unroll"] is True
    assert_repeats_add_up(r, batch_size=8, steps=1, n=2)
    sps = [1 / rep["seconds"] for rep in r["repeats"]]
    assert r["steps_per_sec"]["median"] == pytest.approx(statistics.median(sps))
    assert r["paper_schedule_64k_hours"] == pytest.approx(64_000 / statistics.median(sps) / 3600)


def test_compare_torch_says_how_to_install_pytorch(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    with pytest.raises(SystemExit, match="pip install torch torchvision"):
        compare_torch.main(["--model=resnet8"])


def test_compare_torch_records_both_sides_and_the_ratio_of_medians(monkeypatch, tmp_path):
    # PyTorch's side stubbed (it is an optional dependency); JAX's runs in its child process.
    def fake_torch(a):
        fig = common.repeat_figures(a.batch_size, a.steps, [0.5] * a.repeats)
        return {"device": "cpu", "compile": False, "note": "", "threads": 1, **fig}

    monkeypatch.setattr(compare_torch, "require_torch", lambda: None)
    monkeypatch.setattr(compare_torch, "measure_torch", fake_torch)
    argv = [*TINY, "--steps=1", "--warmup=0", "--repeats=2"]
    line = run(compare_torch, argv, tmp_path)
    r = line["result"]
    assert line["provenance"]["command"].startswith("python -m benchmarks.compare_torch ")
    assert r["torch"]["images_per_sec"]["median"] == pytest.approx(8 * 1 / 0.5)
    assert_repeats_add_up(r, batch_size=8, steps=1, n=2)  # JAX's side, from the child
    assert r["ratio_jax_over_torch"] == pytest.approx(r["images_per_sec"]["median"] / 16)


@pytest.mark.slow
def test_input_pipeline_records_every_window_after_the_first(tmp_path):
    argv = [*TINY, "--batch-size=16", "--steps=6", "--log-every=2"]
    argv += ["--config.mock_data=True", "--config.mock_num_examples=64"]
    argv += ["--config.eval_batch_size=16"]
    r = run(input_pipeline, argv, tmp_path)["result"]
    assert [w["step"] for w in r["windows"]] == [4, 6]
    assert r["mock_data"] and r["model"] == "resnet8" and r["batch_size"] == 16
    waits = [w["data_wait_fraction"] for w in r["windows"]]
    assert 0 <= min(waits) and max(waits) <= 1
    assert r["data_wait_fraction"]["median"] == pytest.approx(statistics.median(waits))


@pytest.mark.slow
def test_host_memory_records_the_rss_series(tmp_path):
    argv = [*TINY, "--batch-size=16", "--steps=6", "--log-every=2", "--eval-every=3"]
    r = run(host_memory, argv, tmp_path)["result"]
    assert [x["step"] for x in r["rss_mb"]] == [2, 4, 6]
    assert r["rss_first"] == r["rss_mb"][1] and r["rss_last"] == r["rss_mb"][-1]
    assert r["rss_growth_mb"] == pytest.approx(r["rss_last"]["mb"] - r["rss_first"]["mb"])
    assert r["rss_max_mb"] == max(x["mb"] for x in r["rss_mb"]) > 0


def test_model_table_counts_resnet20_as_published(tmp_path):
    r = run(model_table, ["--models=resnet20,resnet50"], tmp_path)["result"]
    assert [(m["model"], m["params"]) for m in r["rows"]] == [
        ("resnet20", 269_722),  # He et al. Table 6: 0.27M
        ("resnet50", 25_557_032),  # torchvision's resnet50
    ]
    assert r["rows"][1]["macs"] == pytest.approx(3.8e9, rel=0.03)  # Table 1: 3.8 x 10^9


def test_record_appends_one_line_per_call(tmp_path):
    path = str(tmp_path / "sub" / "r.jsonl")
    common.record({"x": np.float32(1.5)}, path, benchmark="unit", argv=["--a", "b c"])
    line = common.record({"x": 2}, path, benchmark="unit", argv=[])
    lines = [json.loads(x) for x in open(path)]
    assert [x["result"]["x"] for x in lines] == [1.5, 2] and lines[1] == line
    assert lines[0]["provenance"]["command"] == "python -m benchmarks.unit --a 'b c'"
    assert lines[0]["provenance"]["commit"] == git("rev-parse", "HEAD")
    common.record({"x": 3}, "", benchmark="unit", argv=[])  # '' prints only
    assert len(open(path).readlines()) == 2


def test_the_benchmarks_without_a_training_loop_need_no_tensorflow():
    # Every module they import, at the top or inside their functions.
    code = (
        "import sys\n"
        "from benchmarks import throughput, cifar_fast, profile_step, compare_torch, report\n"
        "from benchmarks import model_table\n"
        "import optax, resnet_jax, resnet_jax.data.device, resnet_jax.training.steps\n"
        "import resnet_jax.xla_cpu\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_only_the_benchmark_test_files_import_benchmarks():
    """Library tests stay independent of benchmarks/ (tests/test_benchmarks*.py test it)."""
    mine = set(glob.glob(os.path.join(ROOT, "tests", "test_benchmarks*.py")))
    others = set(glob.glob(os.path.join(ROOT, "tests", "**", "*.py"), recursive=True)) - mine
    offenders = [
        os.path.basename(f)
        for f in sorted(others)
        if re.search(r"\bbenchmarks\.[a-z_]|(import|from) +benchmarks\b", open(f).read())
    ]
    assert not offenders, f"library tests must not import benchmarks: {offenders}"


# --------------------------------------------------------------------------- #
# The report: tables from synthetic lines, in a synthetic markdown file
# --------------------------------------------------------------------------- #


def synthetic_line(benchmark, result, time, commit="c0ffee0" * 6, gpu=None):
    provenance = dict.fromkeys(common.PROVENANCE_KEYS, "")
    provenance.update(
        commit=commit[:40],
        dirty=False,
        time_utc=time,
        cpu_model="Test CPU",
        cpu_count=2,
        gpu=gpu,
        command=f"python -m benchmarks.{benchmark} --at {time[11:16]}",
    )
    return {"benchmark": benchmark, "provenance": provenance, "result": result}


def throughput_result(images_per_sec, materialize=True, platform="cpu"):
    fig = common.repeat_figures(128, 10, [1280 / x for x in images_per_sec])
    return {
        "model": "resnet20",
        "variant": "v1",
        "mode": "train",
        "batch_size": 128,
        "image_size": 32,
        "dtype": "float32",
        "materialize": materialize,
        "cpu_conv": "eigen",
        "platform": platform,
        "devices": 2,
        "device_kind": "cpu" if platform == "cpu" else "H100",
        "compile_seconds": 2.5,
        "compile_cache": "miss",
        **fig,
    }


MARKDOWN = """# Benchmarks

Hand-written prose stays; tables sit between `<!-- table:NAME -->` lines.

<!-- table:throughput platform=cpu -->
stale text
<!-- /table -->

More prose.

<!-- table:cifar_fast -->
<!-- /table -->
"""


@pytest.fixture
def synthetic(tmp_path):
    lines = [
        synthetic_line(
            "throughput", throughput_result([200.0, 210.0, 190.0]), "2026-11-24T10:00:00+00:00"
        ),
        # The same setting later: it replaces the row above.
        synthetic_line(
            "throughput", throughput_result([250.0, 260.0, 240.0]), "2026-11-24T11:00:00+00:00"
        ),
        synthetic_line(
            "throughput", throughput_result([300.0], False), "2026-11-24T10:30:00+00:00"
        ),
        synthetic_line(
            "throughput",
            throughput_result([9000.0], platform="gpu"),
            "2026-11-24T12:00:00+00:00",
            gpu="H100",
        ),
    ]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(x) + "\n" for x in lines))
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text(MARKDOWN)
    return str(results), str(markdown)


def test_report_builds_tables_from_the_newest_line_of_each_setting(synthetic):
    results, markdown = synthetic
    assert report.main([f"--results={results}", f"--markdown={markdown}"]) == 0
    text = open(markdown).read()
    assert text.startswith(MARKDOWN.split("<!-- table:throughput platform")[0])
    assert "More prose." in text
    assert "stale text" not in text
    rows = [x for x in text.splitlines() if re.match(r"\| \d+ \|", x)]
    assert len(rows) == 2  # the GPU line is filtered out, the older repeat replaced
    on = next(r for r in rows if "| on |" in r)
    assert "250 (240–260)" in on and "`c0ffee0`" in on and "2026-11-24 11:00" in on
    assert "Test CPU, 2 CPUs" in on and "10.00" not in text  # 10:00's run is gone
    off = next(r for r in rows if "| off |" in r)
    assert "| 300 |" in off  # one repeat: the median alone
    assert "`python -m benchmarks.throughput --at 11:00`" in text
    assert report.NO_RUN in text.split("<!-- table:cifar_fast -->")[1]


def _option_cost_result(variants: dict[str, float]) -> dict:
    rows = [
        {"variant": name, "images_per_sec": {"median": x, "min": x, "max": x, "n": 1}}
        for name, x in variants.items()
    ]
    for row in rows:
        row["relative_to_baseline"] = row["images_per_sec"]["median"] / variants["baseline"]
    return {"model": "resnet20", "batch_size": 128, "dtype": "float32", "materialize": True}, rows


def test_report_keeps_an_option_cost_run_of_other_options_beside_a_newer_one(tmp_path):
    def line(variants, at, **extra):
        result, rows = _option_cost_result(variants)
        result.update(variants=rows, devices=1, platform="cpu", device_kind="cpu")
        return synthetic_line("option_cost", result, f"2026-11-24T{at}:00+00:00")

    lines = [
        line({"baseline": 100.0, "accum2": 3.0}, "10:00"),
        line({"baseline": 110.0, "ema": 99.0}, "11:00"),
        line({"baseline": 120.0, "ema": 111.0}, "12:00"),  # replaces 11:00's run
    ]
    results, markdown = tmp_path / "results.jsonl", tmp_path / "BENCHMARKS.md"
    results.write_text("".join(json.dumps(x) + "\n" for x in lines))
    markdown.write_text("<!-- table:option_cost -->\n<!-- /table -->\n")
    assert report.main([f"--results={results}", f"--markdown={markdown}"]) == 0
    text = markdown.read_text()
    assert "| accum2 | 3.00 | 0.03 |" in text  # the 10:00 run of other options stays
    assert "| ema | 111 | 0.93 |" in text and "| 99.0 |" not in text


def test_report_check_fails_until_the_tables_are_regenerated(synthetic, capsys):
    results, markdown = synthetic
    args = [f"--results={results}", f"--markdown={markdown}"]
    assert report.main([*args, "--check"]) == 1
    assert open(markdown).read() == MARKDOWN  # --check writes nothing
    assert "out of date" in capsys.readouterr().out
    assert report.main(args) == 0
    assert report.main([*args, "--check"]) == 0
    with open(results, "a") as f:  # a new run makes it stale again
        line = synthetic_line("throughput", throughput_result([1.0]), "2026-11-25T00:00:00+00:00")
        f.write(json.dumps(line) + "\n")
    assert report.main([*args, "--check"]) == 1


def test_report_rejects_hand_written_lines_and_broken_markers(synthetic, tmp_path):
    results, markdown = synthetic
    hand_written = tmp_path / "hand_written.jsonl"  # a figure without provenance
    hand_written.write_text(json.dumps({"run": "x", "result": {"images_per_sec": 1}}) + "\n")
    with pytest.raises(SystemExit, match="hand_written.jsonl:1: not a line written by"):
        report.main([f"--results={hand_written}", f"--markdown={markdown}"])
    with pytest.raises(SystemExit, match="no <!-- /table -->"):
        report.render("<!-- table:throughput -->\nno end\n", [])
    with pytest.raises(SystemExit, match="Unknown table 'nope'"):
        report.render("<!-- table:nope -->\n<!-- /table -->", [])


def test_compare_torch_runs_the_same_network_on_the_pytorch_side():
    """The real PyTorch side (torch is a test dependency): the same architecture
    as resnet_jax's (equal parameter counts; v1.5 bottlenecks like torchvision)
    and a measured, finite training step. In its own process, as the script runs
    it: torchvision's import can crash a process where TensorFlow already runs."""
    import subprocess
    import sys

    pytest.importorskip("torch")
    code = """
import argparse, json
import jax, jax.numpy as jnp
import resnet_jax as rj
from benchmarks import compare_torch

def jax_params(name, **kw):
    m = rj.create_model(name, **kw)
    v = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    return sum(x.size for x in jax.tree.leaves(v["params"]))

net, size, classes = compare_torch.torch_model("resnet20", None)
tv, _, _ = compare_torch.torch_model("resnet50", None)
a = argparse.Namespace(model="resnet8", image_size=None, batch_size=8, dtype="float32",
                       no_compile=True, warmup=1, steps=2, repeats=2)
r = compare_torch.measure_torch(a)
print(json.dumps({
    "size": [size, classes],
    "torch20": sum(p.numel() for p in net.parameters()), "jax20": jax_params("resnet20"),
    "torch50": sum(p.numel() for p in tv.parameters()),
    "jax50": jax_params("resnet50", variant="v1.5"),
    "variants": [compare_torch.jax_variant("resnet50"), compare_torch.jax_variant("resnet20")],
    "r": r,
}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=common.REPO, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["size"] == [32, 10]
    assert got["torch20"] == got["jax20"] == 269_722
    assert got["torch50"] == got["jax50"] == 25_557_032
    assert got["variants"] == ["v1.5", "v1"]
    r = got["r"]
    assert r["device"] == "cpu" and r["compile"] is False and r["cudnn_benchmark"] is False
    assert len(r["repeats"]) == 2 and r["images_per_sec"]["median"] > 0


def test_the_committed_benchmarks_md_is_the_report_of_the_committed_results():
    """BENCHMARKS.md holds exactly the tables benchmarks.report writes from
    benchmarks/results/results.jsonl: no figure edited by hand, none stale."""
    assert report.main(["--check"]) == 0
