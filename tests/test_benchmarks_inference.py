"""benchmarks/inference.py runs every runtime on the same weights and records what it measured."""

import json

import pytest
import torch  # noqa: F401  (before TensorFlow, see tests/conftest.py)
import torchvision  # noqa: F401  (it loads torch._dynamo and triton, which crash after TensorFlow)

from benchmarks import inference, report


@pytest.mark.slow
def test_inference_benchmark_records_each_runtime(tmp_path):
    results = tmp_path / "r.jsonl"
    argv = [
        "--model=resnet18", "--image-size=32", "--batch-sizes=1,2", "--steps=1", "--warmup=0",
        "--repeats=1", "--runtimes=jax,onnxruntime,torch", f"--results={results}",
        "--compilation-cache-dir=",
    ]  # fmt: skip
    inference.main(argv)
    (line,) = [json.loads(x) for x in results.read_text().splitlines()]
    rows = line["result"]["rows"]
    assert [(r["runtime"], r["batch"]) for r in rows] == [
        (n, b) for n in ("jax", "onnxruntime", "torch") for b in (1, 2)
    ]
    for r in rows:
        assert r["latency_ms"] > 0 and r["max_rel_error"] < 1e-4, r
    assert {r["where"] for r in rows} == {"cpu", "CPUExecutionProvider"}
    table = report.render_table("inference", {"platform": "cpu"}, [line])
    assert table.count("| resnet18 | 32x32 |") == 6 and "onnxruntime (exported ONNX)" in table
    assert line["provenance"]["command"].startswith(
        "python -m benchmarks.inference --model=resnet18"
    )
