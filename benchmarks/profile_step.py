"""Where the train step's time goes: a jax.profiler trace, summed per XLA operation.

    python -m benchmarks.profile_step --model resnet20 --batch-size 128
    python -m benchmarks.profile_step --model resnet50 --batch-size 128 --dtype bfloat16 \\
        --trace-dir /tmp/rn50_trace --dump-hlo /tmp/rn50_hlo

Compiles the same train step as ``benchmarks.throughput``, runs ``--warmup``
steps, then traces ``--steps`` steps with ``jax.profiler`` (a Perfetto trace
is written next to the TensorBoard one, under ``--trace-dir``). Prints the
operations grouped by kind (an XLA operation's name without its ``.N`` numbers:
``ynn_fusion``, ``transpose_copy_fusion``, ...; on a GPU the kernels), with
milliseconds per step and their share of the summed operator time, the
biggest single operations, and records them (``benchmarks.common.record``;
no repeats: a trace is one measurement). Operator time can
exceed the step's wall time where operations run in parallel, and fall short
of it where work is not named in the trace (XLA:CPU's Eigen convolutions,
``--cpu-conv eigen``, the default; the script says so). With
``--dump-hlo DIR`` XLA also writes its optimised HLO there (look up an
operation's name in ``*train_step*after_optimizations.txt``). Needs jax, flax
and optax only.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

from benchmarks import common

# Runtime bookkeeping in the trace, not XLA operations. A collective's
# Rendezvous and Wait events lie inside its own event (all-reduce.N): counting
# them too would count that time twice.
_NOT_OPS = re.compile(
    r"^(\$|end: |ThunkExecutor|PjitFunction|Pjit|ParseArguments|Handle |Wait[: ]|"
    r"AllocateOutputBuffers|ThreadpoolListener|PythonRefManager|(Invoke)?Rendezvous)|::"
)


def _kind(name: str) -> str:
    """``fusion.12`` -> ``fusion``, ``cond.14.clone`` -> ``cond.clone``."""
    return re.sub(r"\.\d+", "", name)


def summarize(trace_file: str, steps: int, devices: int = 1) -> dict:
    """Sums the complete ('X') events of a Perfetto trace per operation.

    Uses the device processes (``/device:...``) when the trace has any
    (GPU/TPU), else the host's (XLA:CPU runs its operations there). A device
    process shows the same work on several lines (the whole module, each
    operation, each kernel); where it has an "XLA Ops" line only that one is
    summed, else every line but "XLA Modules" and "Steps". (Written from the
    trace format; no GPU trace has been read by it yet.)
    """
    with gzip.open(trace_file, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    meta = [e for e in events if e.get("ph") == "M"]
    process = {e["pid"]: e["args"]["name"] for e in meta if e.get("name") == "process_name"}
    thread = {
        (e["pid"], e.get("tid")): e["args"]["name"] for e in meta if e.get("name") == "thread_name"
    }
    device_pids = {pid for pid, n in process.items() if n.startswith("/device:")}
    op_lines = {k for k, n in thread.items() if k[0] in device_pids and n == "XLA Ops"}
    skipped_lines = {
        k for k, n in thread.items() if k[0] in device_pids and n in ("XLA Modules", "Steps")
    }

    def counted(e) -> bool:
        if not device_pids:
            return True
        line = (e.get("pid"), e.get("tid"))
        if op_lines:
            return line in op_lines
        return e.get("pid") in device_pids and line not in skipped_lines

    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or _NOT_OPS.search(e.get("name", "")) or not counted(e):
            continue
        per_op[e["name"]] += e.get("dur", 0) / 1000.0  # microseconds -> ms
    per_kind: collections.Counter = collections.Counter()
    for name, ms in per_op.items():
        per_kind[_kind(name)] += ms
    total = sum(per_kind.values())
    # Every device runs the whole step on its part of the batch: per device,
    # the summed time divides by their number (one trace process per device
    # on GPU/TPU; XLA:CPU's devices all run on the host's threads).
    n = len(device_pids) if device_pids else max(1, devices)
    per_step = steps * n
    return {
        "source": "device" if device_pids else "host",
        "devices_summed": n,
        "op_ms_per_step": total / per_step,
        "kinds": [
            {"kind": k, "ms_per_step": ms / per_step, "share": ms / total}
            for k, ms in per_kind.most_common()
        ],
        "top_ops": [
            {"op": name, "ms_per_step": ms / per_step} for name, ms in per_op.most_common(10)
        ],
    }


def _trace(a, trace_dir: str) -> tuple[float, str]:
    """Traces ``--steps`` train steps after ``--warmup``: ``(wall seconds, trace file)``."""
    import jax

    net, state, repl, data = common.setup(
        a.model,
        a.batch_size,
        a.dtype,
        materialize=common.resolve_materialize(a.materialize),
        image_size=a.image_size,
        variant=a.variant,
    )
    batch = common.synthetic_batch(net, a.batch_size, a.image_size, data)
    step = common.jit_train_step(net.num_classes, repl, data).lower(state, batch).compile()
    for _ in range(a.warmup):
        state, m = step(state, batch)
    jax.block_until_ready(state)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        t0 = time.perf_counter()
        for _ in range(a.steps):
            state, m = step(state, batch)
        jax.block_until_ready(state)
        wall = time.perf_counter() - t0
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not files:
        raise SystemExit(f"jax.profiler wrote no Perfetto trace under {trace_dir}.")
    return wall, files[-1]


def _print(r: dict, a) -> None:
    print(
        f"{a.model} train step, batch {a.batch_size}, {a.dtype}, {r['devices']} x "
        f"{r['device_kind']}, materialize={r['materialize']}: {r['wall_ms_per_step']:.1f} ms/step "
        f"wall (traced), {r['op_ms_per_step']:.1f} ms/step per device, summed over {r['source']} operations"
    )
    print(f"{'operation kind':<36} {'ms/step':>9} {'share':>7}")
    for k in r["kinds"][: a.top]:
        print(f"{k['kind']:<36} {k['ms_per_step']:>9.1f} {100 * k['share']:>6.1f}%")
    print("biggest operations:")
    for o in r["top_ops"][:5]:
        print(f"  {o['op']:<34} {o['ms_per_step']:>9.1f}")
    if r["op_ms_per_step"] < 0.8 * r["wall_ms_per_step"]:
        print(
            f"note: the named operations cover {r['op_ms_per_step']:.0f} of "
            f"{r['wall_ms_per_step']:.0f} ms/step. XLA:CPU's Eigen convolutions do not "
            "appear in the trace under their own names; --cpu-conv ynn shows YNNPACK's."
        )
    print(f"trace: {r['trace']}" + (f"; HLO: {a.dump_hlo}" if a.dump_hlo else ""))


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__, model="resnet20", batch_size=128, dtype="float32", steps=5, warmup=2)
    p.add_argument("--image-size", type=int, default=None, help="default: 224 ImageNet, 32 CIFAR")
    p.add_argument("--variant", default="v1", choices=["v1", "v1.5"])
    p.add_argument("--trace-dir", default=None, help="default: a new temporary folder")
    p.add_argument("--dump-hlo", default=None, help="also write XLA's HLO dumps to this folder")
    p.add_argument("--top", type=int, default=12, help="kinds to print")
    a = p.parse_args(argv)
    if a.dump_hlo:
        flags = f"--xla_dump_to={a.dump_hlo} --xla_dump_hlo_as_text"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
        a.compilation_cache_dir = ""  # a cached executable would skip the dump
    common.configure(a)
    trace_dir = a.trace_dir or tempfile.mkdtemp(prefix="resnet_jax_trace_")
    wall, trace = _trace(a, trace_dir)
    r = {
        "model": a.model,
        "variant": a.variant,
        "batch_size": a.batch_size,
        "dtype": a.dtype,
        "materialize": common.resolve_materialize(a.materialize),
        "cpu_conv": a.cpu_conv,
        **common.device_info(),
        "steps": a.steps,
        "wall_ms_per_step": 1000 * wall / a.steps,
        "trace": trace,
    }
    r |= summarize(trace, a.steps, devices=r["devices"])
    _print(r, a)
    return common.record(r, a.results, benchmark="profile_step", argv=argv)


if __name__ == "__main__":
    main()
