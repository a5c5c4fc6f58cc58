"""Regenerates the tables of BENCHMARKS.md from the results files.

    python -m benchmarks.report            # rewrite the tables in BENCHMARKS.md
    python -m benchmarks.report --check    # exit 1 when BENCHMARKS.md is out of date

A table is the text between ``<!-- table:NAME [KEY=VALUE ...] -->`` and
``<!-- /table -->``, each at the start of a line; everything outside the
markers is left as it is. NAME is
a benchmark (``throughput``, ``compare_torch``, ``cifar_fast``,
``profile_step``, ``input_pipeline``, ``host_memory``, ``model_table``,
``accumulation_memory``, ``option_cost``);
``KEY=VALUE`` keeps the lines whose result has that value (``platform=cpu``,
``materialize=true``). Each row is the newest line of one setting (the
table's key fields, the hardware and the devices), and cites its commit, UTC
time and hardware; under the table, each row's command. Repeated figures show
as ``median (min–max)``. Every number comes from a line of the results files
(default: ``benchmarks/results/*.jsonl``, written by ``benchmarks.common.record``);
a line without the provenance that ``record`` writes is refused, so no figure
of unknown origin reaches a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import glob
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import common
from resnet_jax import launch

MARKDOWN = os.path.join(common.REPO, "BENCHMARKS.md")
RESULTS_GLOB = os.path.join(common.REPO, "benchmarks", "results", "*.jsonl")
NO_RUN = "_No run recorded yet._"
_BLOCK = re.compile(
    r"^(?P<open><!-- table:(?P<name>[\w-]+)(?P<filters>(?: [\w.]+=[^\s>]+)*) -->\n)"
    r"(?P<body>.*?)^(?P<close><!-- /table -->)",
    re.S | re.M,
)


# --------------------------------------------------------------------------- #
# Reading the results
# --------------------------------------------------------------------------- #


def read_results(paths: Sequence[str]) -> list[dict[str, Any]]:
    """Every line of the files, checked: ``benchmark``, ``result`` and every
    provenance key (a hand-written line without them is an error)."""
    lines = []
    for path in paths:
        with open(path) as f:
            for i, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    line = json.loads(text)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{i}: not JSON ({e}).") from e
                missing = _missing(line)
                if missing:
                    raise SystemExit(
                        f"{path}:{i}: not a line written by benchmarks.common.record "
                        f"(missing {', '.join(missing)})."
                    )
                lines.append(line)
    return lines


def _missing(line: Any) -> list[str]:
    """The keys a recorded line must have and ``line`` lacks."""
    if not isinstance(line, dict):
        return ["benchmark", "result", "provenance"]
    missing = [k for k in ("benchmark", "result", "provenance") if k not in line]
    prov = line.get("provenance")
    return missing + [
        k for k in common.PROVENANCE_KEYS if not isinstance(prov, dict) or k not in prov
    ]


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)


def select(lines: list[dict], benchmark: str, filters: dict[str, str]) -> list[dict]:
    """The lines of ``benchmark`` whose result matches every ``KEY=VALUE`` filter."""
    return [
        line
        for line in lines
        if line["benchmark"] == benchmark
        and all(_text(line["result"].get(k)) == v for k, v in filters.items())
    ]


def newest_per_setting(lines: list[dict], key: Sequence[str | Callable[[dict], str]]) -> list[dict]:
    """The newest line of each setting, in the order of the settings. A key
    is a result field or a function of the result."""
    newest: dict[tuple, dict] = {}
    for line in lines:
        r = line["result"]
        setting = (hardware(line), r.get("platform"), r.get("devices"), r.get("device_kind"))
        setting += tuple(k(r) if callable(k) else _text(r.get(k)) for k in key)
        old = newest.get(setting)
        if old is None or line["provenance"]["time_utc"] >= old["provenance"]["time_utc"]:
            newest[setting] = line
    return [newest[s] for s in sorted(newest, key=lambda s: tuple(map(str, s)))]


# --------------------------------------------------------------------------- #
# Cells
# --------------------------------------------------------------------------- #


def num(x: float) -> str:
    """A figure with 3-4 significant digits."""
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def spread(s: dict[str, float], scale: float = 1.0, unit: str = "") -> str:
    """``median (min–max)`` of repeats; the median alone for one measurement."""
    median = num(s["median"] * scale) + unit
    if s["n"] < 2:
        return median
    return f"{median} ({num(s['min'] * scale)}–{num(s['max'] * scale)}{unit})"


def hardware(line: dict) -> str:
    p = line["provenance"]
    return p["gpu"] or f"{p['cpu_model']}, {p['cpu_count']} CPUs"


def devices(r: dict) -> str:
    return f"{r['devices']} × {r['device_kind']}"


def conv(r: dict) -> str:
    """XLA:CPU's convolutions; '-' where they do not apply."""
    if r.get("platform") != "cpu":
        return "-"
    return {"eigen": "Eigen", "ynn": "YNNPACK"}.get(r.get("cpu_conv"), "-")


def on_off(value: bool | None) -> str:
    return "-" if value is None else ("on" if value else "off")


def model(r: dict) -> str:
    v = r.get("variant", "v1")
    return r["model"] if v == "v1" else f"{r['model']} {v}"


# --------------------------------------------------------------------------- #
# The tables
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Table:
    """One kind of table: the result fields that name a setting, the header
    cells (``>``: right-aligned) and the rows a line makes."""

    key: tuple[str | Callable[[dict], str], ...]
    headers: tuple[str, ...]
    rows: Callable[[dict], list[list[str]]]
    benchmark: str | None = None  # the script whose lines it shows (default: the table's name)
    notes: Callable[[list[dict]], str] | None = None  # a paragraph under the commands


def _throughput(r: dict) -> list[list[str]]:
    compile_s = f"{num(r['compile_seconds'])} ({r['compile_cache']})"
    return [
        [model(r), r["mode"], str(r["batch_size"]), r["dtype"], devices(r)]
        + [on_off(r["materialize"]), conv(r), spread(r["step_ms"])]
        + [spread(r["images_per_sec"]), compile_s]
    ]


def _compare_torch(r: dict) -> list[list[str]]:
    pt = r["torch"]
    kind = ("torch.compile" if pt["compile"] else "eager") + f", {pt['threads']} threads"
    return [
        [model(r), str(r["batch_size"]), r["dtype"], devices(r), on_off(r["materialize"])]
        + [conv(r), spread(r["step_ms"]), spread(r["images_per_sec"])]
        + [spread(pt["step_ms"]), spread(pt["images_per_sec"]), kind]
        + [f"**{r['ratio_jax_over_torch']:.2f}**"]
    ]


def _cifar_fast(r: dict) -> list[list[str]]:
    return [
        [model(r), str(r["batch_size"]), r["dtype"], devices(r), on_off(r["materialize"])]
        + [
            conv(r),
            str(r["steps_per_call"]),
            {True: "unrolled", False: "rolled"}.get(r.get("unroll"), "-"),
        ]
        + [spread(r["steps_per_sec"])]
        + [spread(r["images_per_sec"]), num(r["paper_schedule_64k_hours"])]
        + [f"{num(r['compile_seconds'])} ({r['compile_cache']})"]
    ]


def _profile_step(r: dict, top: int = 4) -> list[list[str]]:
    setting = [model(r), str(r["batch_size"]), r["dtype"], devices(r)]
    setting += [on_off(r["materialize"]), conv(r), num(r["wall_ms_per_step"])]
    setting += [f"{num(r['op_ms_per_step'])} ({r['source']})"]
    kinds, rest = r["kinds"][:top], r["kinds"][top:]
    if rest:
        other_ms = sum(k["ms_per_step"] for k in rest)
        other_share = sum(k["share"] for k in rest)
        kinds.append({"kind": "everything else", "ms_per_step": other_ms, "share": other_share})
    rows = []
    for i, k in enumerate(kinds):
        name = k["kind"] if k["kind"] == "everything else" else f"`{k['kind']}`"
        cells = [name, num(k["ms_per_step"]), f"{100 * k['share']:.1f}%"]
        rows.append((setting if i == 0 else [""] * len(setting)) + cells)
    return rows


def _input_pipeline(r: dict) -> list[list[str]]:
    if r.get("mode") == "pipeline_only":  # the host pipeline alone: not this table's rows
        return []
    data = r["dataset"] + (" (tfds mock data)" if r["mock_data"] else "")
    return [
        [data, r["model"], str(r["batch_size"]), devices(r), on_off(r["materialize"])]
        + [spread(r["images_per_sec"]), spread(r["data_wait_fraction"], 100, "%")]
    ]


def _figure(x: float | dict | None) -> str:
    """A plain number (older lines) or a spread of repeats; '-' when absent."""
    if x is None:
        return "-"
    return spread(x) if isinstance(x, dict) else num(x)


def _pipeline_only(r: dict) -> list[list[str]]:
    p = r["pipelines"]

    def per_core(name):
        return _figure(p[name]["images_per_sec_per_core"]) if name in p else "-"

    def rss(name):
        return _figure(p[name]["rss_mb"]) if name in p else "-"

    ratio = r.get("per_core_vs_torchvision")
    return [
        [r["train_crop"], r.get("auto_augment") or "paper's", str(r["batch_size"]), str(r["cores"])]
        + [per_core("crop"), per_core("full"), per_core("torchvision")]
        + [f"**{ratio:.2f}**" if ratio else "-"]
        + [rss("crop"), rss("full"), rss("torchvision"), str(r["cores_for_8x3000"])]
    ]


_DESIGN_NAMES = {
    "crop": "(a) tf.data: encoded shuffle, `decode_and_crop_jpeg`",
    "full": "tf.data: decoded shuffle, full decode (before)",
    "grain": "(b) grain over ArrayRecord, Pillow, worker processes",
    "torchvision": "torchvision `ImageFolder` + `DataLoader`",
}


def _tensorflow(name: str, row: dict) -> str:
    """Whether the design imports TensorFlow while it trains."""
    if name == "grain":
        return "no (import blocked)" if row.get("tensorflow_imported") is False else "?"
    return "yes" if name in ("crop", "full") else "no"


def _resume(row: dict) -> str:
    if "resume_first_batch_s" not in row:
        return "-"
    exact = "exact" if row["resume_exact"] else "**differs**"
    return f"{spread(row['resume_first_batch_s'])} ({exact})"


def _pipeline_designs(r: dict) -> list[list[str]]:
    setting = [r["train_crop"], str(r["batch_size"]), str(r["cores"])]
    setting += [f"{r['train_examples']:,}", f"{r['shuffle_buffer']:,}", str(r["repeats"])]
    setting += [spread(r["load_average_1m"])]
    rows = []
    for i, (name, p) in enumerate(r["pipelines"].items()):
        step = f"step {p['resume_step']} of {p['steps_per_epoch']}" if "resume_step" in p else ""
        cells = [_DESIGN_NAMES.get(name, name), spread(p["images_per_sec"])]
        cells += [spread(p["images_per_sec_per_core"]), _figure(p.get("images_per_cpu_second"))]
        cells += [spread(p["rss_mb"]), _figure(p.get("pss_mb")), spread(p["first_batch_s"])]
        cells += [_resume(p) + (f", {step}" if step else ""), _tensorflow(name, p)]
        rows.append((setting if i == 0 else [""] * len(setting)) + cells)
    return rows


def _designs_verdict(lines: list[dict]) -> str:
    """The paragraphs under the designs table: which design stays and why,
    every figure read from the newest line that measured (a) and (b)."""
    both = [x for x in lines if {"crop", "grain"} <= set(x["result"]["pipelines"])]
    if not both:
        return ""
    line = max(both, key=lambda x: x["provenance"]["time_utc"])
    r = line["result"]
    a, g = r["pipelines"]["crop"], r["pipelines"]["grain"]

    def med(row, k):
        return row[k]["median"]

    # Images per CPU-second where recorded: on a loaded machine the wall-clock
    # rate also measures the share of the cores each design won.
    cpu = "images_per_cpu_second" in a and "images_per_cpu_second" in g
    cost = "images_per_cpu_second" if cpu else "images_per_sec_per_core"
    unit = "images per CPU-second" if cost == "images_per_cpu_second" else "images/s per core"
    ratio = med(a, cost) / med(g, cost)
    faster, slower = ("(a)", "(b)") if ratio >= 1 else ("(b)", "(a)")
    when = line["provenance"]["time_utc"][:16].replace("T", " ")
    memory = "pss_mb" if "pss_mb" in a else "rss_mb"
    first = (
        f"**Which design stays.** Figures of the run of {when} UTC (medians of "
        f"{r['repeats']} runs in turn; 1-minute load average {num(med(r, 'load_average_1m'))} "
        f"on {r['cores']} cores). Speed: {faster} is {max(ratio, 1 / ratio):.2f}x cheaper "
        f"than {slower}, {num(med(a, cost))} {unit} for (a) against {num(med(g, cost))} for "
        f"(b) (wall clock: {num(med(a, 'images_per_sec_per_core'))} against "
        f"{num(med(g, 'images_per_sec_per_core'))} images/s per core). Memory "
        f"({memory[:3].upper()}): {num(med(a, memory))} MiB for (a), one process whose "
        f"shuffle buffer holds {min(r['shuffle_buffer'], r['train_examples']):,} encoded "
        f"JPEGs, against {num(med(g, memory))} MiB for (b), a main process and "
        f"{r['cores']} workers that each import grain, tfds and (through grain's "
        "profiler) JAX. On ImageNet (a)'s buffer of 16,384 JPEGs of about 110 kB "
        "holds some 1.8 GB; (b) shuffles indices."
    )
    skipped = a["resume_step"] * r["batch_size"]
    seek = med(a, "resume_first_batch_s") - med(a, "first_batch_s")
    if r["shuffle_buffer"] >= r["train_examples"]:
        seek_text = (
            "the shuffle buffer holds the whole miniature, so the start from step 0 "
            "reads the whole epoch as well"
        )
    elif seek <= 0.1 * med(a, "first_batch_s"):
        seek_text = (
            f"reading {skipped:,} encoded examples from the page cache cost nothing "
            "measurable next to starting the pipeline"
        )
    else:
        seek_text = f"{1e3 * seek / skipped:.2g} ms per skipped example"
    seek_text += (
        "; on ImageNet a resume late in an epoch reads up to its 1.28 million records, "
        "some 140 GB, again"
    )
    second = (
        f"Resume at step {a['resume_step']} of {a['steps_per_epoch']}: (a) rebuilds the "
        f"pipeline and reads through the epoch's {skipped:,} earlier examples, "
        f"{num(med(a, 'resume_first_batch_s'))} s to the first batch against "
        f"{num(med(a, 'first_batch_s'))} s from step 0 ({seek_text}); (b) restores grain's "
        f"iterator state ({g['state_bytes']} bytes of JSON) and starts its workers, "
        f"{num(med(g, 'resume_first_batch_s'))} s against {num(med(g, 'first_batch_s'))} s "
        "from step 0, whatever the step. Both resumed to the uninterrupted stream's next "
        f"batch exactly: {'yes' if a['resume_exact'] and g['resume_exact'] else '**no**'}."
    )
    reasons = _A_STAYS if ratio >= 1 else _B_FASTER
    return f"{first} {second}\n\n{reasons}\n"


_A_STAYS = (
    "(a) stays as `resnet_jax.data`'s pipeline: it is the cheaper per image, and host "
    "cores are what an input pipeline costs (the last column of the table above). Its "
    "speed comes from `decode_and_crop_jpeg`, which skips the inverse DCT and colour "
    "conversion outside the crop window; Pillow has no such call (it decodes the whole "
    "image, at 1/2 to 1/8 scale only when the window is at least twice the output) and "
    "grain's Python map handles one image at a time in each worker. It is also the one "
    "already built "
    "out: evaluation, per-host sharding, tfds' mock data. (b) is simpler to resume "
    "(a small state, whatever the step) and to install on GPU images without "
    "TensorFlow (its processes ran with `import tensorflow` blocked; preparing the "
    "ArrayRecord files still takes tfds' builder, which uses TensorFlow). It stays "
    "in `benchmarks/grain_pipeline.py`, measured by `--designs grain`; a JPEG decoder "
    "that decodes only a window (libjpeg-turbo's partial decoding) is what could "
    "close the gap."
)
_B_FASTER = (
    "(b) is the cheaper per image here, as well as the simpler to resume (a small "
    "state, whatever the step) and to install without TensorFlow (its processes ran "
    "with `import tensorflow` blocked; preparing the ArrayRecord files still takes "
    "tfds' builder, which uses TensorFlow): the case for moving it from "
    "`benchmarks/grain_pipeline.py` into `resnet_jax.data` (evaluation and per-host "
    "sharding are not built for it yet)."
)


def _accumulation_memory(r: dict) -> list[list[str]]:
    setting = [model(r), str(r["batch_size"]), str(r["image_size"]), r["dtype"], devices(r)]
    rows = []
    for i, row in enumerate(r["rows"]):
        k = row["grad_accum_steps"]
        cells = [str(k), str(row["micro_batch"]), f"{row['temp_bytes'] / 2**30:.2f}"]
        cells += [f"{r['temp_ratio_to_k1'][str(k)]:.2f}", num(row["argument_bytes"] / 2**20)]
        rows.append((setting if i == 0 else [""] * len(setting)) + cells)
    return rows


def _option_names(r: dict) -> str:
    return ",".join(v["variant"] for v in r["variants"])


def _option_cost(r: dict) -> list[list[str]]:
    setting = [model(r), str(r["batch_size"]), r["dtype"], devices(r), on_off(r["materialize"])]
    rows = []
    for i, v in enumerate(r["variants"]):
        cells = [v["variant"], spread(v["images_per_sec"]), f"{v['relative_to_baseline']:.2f}"]
        rows.append((setting if i == 0 else [""] * len(setting)) + cells)
    return rows


def _host_memory(r: dict) -> list[list[str]]:
    first, last = r["rss_first"], r["rss_last"]
    return [
        [r["model"], str(r["batch_size"]), f"{r['steps']:,}", devices(r)]
        + [f"{num(first['mb'])} (step {first['step']:,})"]
        + [f"{num(last['mb'])} (step {last['step']:,})"]
        + [f"{r['rss_growth_mb']:+.1f}", num(r["rss_max_mb"])]
    ]


_RUNTIME_NAMES = {
    "jax": "JAX jit", "onnxruntime": "onnxruntime (exported ONNX)",
    "savedmodel": "TensorFlow (exported SavedModel)", "torch": "PyTorch eager",
    "torch_compile": "torch.compile",
}  # fmt: skip


def _inference(r: dict) -> list[list[str]]:
    out = []
    for row in r["rows"]:
        name = _RUNTIME_NAMES.get(row["runtime"], row["runtime"])
        first = [r["model"], f"{r['image_size']}x{r['image_size']}", name]
        if "error" in row:  # the runtime could not run here: say why
            out.append([*first, str(row.get("batch", "-")), "-", "-", "-", "-", row["error"]])
            continue
        per_call = [t / r["steps"] for t in row["seconds"]]
        low, high = 1e3 * min(per_call), 1e3 * max(per_call)
        out.append([
            *first, str(row["batch"]), row.get("where", "-"),
            f"{num(row['latency_ms'])} ({num(low)}–{num(high)})",
            num(row["images_per_sec"]), f"{row['max_rel_error']:.1e}", "",
        ])  # fmt: skip
    return out


def _model_table(r: dict) -> list[list[str]]:
    return [
        [m["model"], m["options"], m["input"], f"{m['params']:,}", f"{m['macs'] / 1e9:.3g} G"]
        for m in r["rows"]
    ]


_SETTING = ("devices", "materialize", "conv")
TABLES: dict[str, Table] = {
    "throughput": Table(
        ("model", "variant", "mode", "batch_size", "image_size", "dtype", "materialize")
        + ("cpu_conv", "compile_cache"),
        ("model", "mode", ">batch", "dtype", *_SETTING, ">ms/step", ">images/s")
        + (">compile s (cache)",),
        _throughput,
    ),
    "compare_torch": Table(
        ("model", "batch_size", "dtype", "materialize", "cpu_conv"),
        ("model", ">batch", "dtype", *_SETTING, ">JAX ms/step", ">JAX images/s")
        + (">PyTorch ms/step", ">PyTorch images/s", "PyTorch", ">JAX / PyTorch"),
        _compare_torch,
    ),
    "cifar_fast": Table(
        ("model", "batch_size", "dtype", "materialize", "cpu_conv", "steps_per_call", "unroll"),
        ("model", ">batch", "dtype", *_SETTING, ">k", "scan", ">steps/s", ">images/s")
        + (">64k steps, h", ">compile s (cache)"),
        _cifar_fast,
    ),
    "profile_step": Table(
        ("model", "batch_size", "dtype", "materialize", "cpu_conv"),
        ("model", ">batch", "dtype", *_SETTING, ">wall ms/step", ">summed op ms/step")
        + ("operation kind", ">ms/step", ">share"),
        _profile_step,
    ),
    "input_pipeline": Table(
        ("dataset", "mock_data", "model", "batch_size", "materialize"),
        ("data", "model", ">batch", "devices", "materialize", ">images/s", ">waiting for data"),
        _input_pipeline,
    ),
    "input_pipeline_only": Table(
        ("mode", "train_crop", "auto_augment", "batch_size"),
        ("train crop", "augmentation", ">batch", ">cores", ">img/s/core, crop decode")
        + (">img/s/core, full decode", ">img/s/core, torchvision", ">crop / torchvision")
        + (">RSS MiB, crop", ">RSS MiB, full", ">RSS MiB, torchvision")
        + (">cores for 8 x 3,000 img/s",),
        _pipeline_only,
        benchmark="input_pipeline",
    ),
    "input_pipeline_designs": Table(
        ("mode", "train_crop", "batch_size", "with_grain", "train_examples", "shuffle_buffer"),
        ("train crop", ">batch", ">cores", ">examples", ">shuffle buffer", ">repeats")
        + (">load avg", "design", ">images/s", ">img/s/core", ">img/CPU-s", ">RSS MiB")
        + (">PSS MiB", ">first batch s", ">first batch s, resumed", "TensorFlow at run time"),
        _pipeline_designs,
        benchmark="input_pipeline",
        notes=_designs_verdict,
    ),
    "accumulation_memory": Table(
        ("model", "variant", "batch_size", "image_size", "dtype", "materialize"),
        ("model", ">batch", ">input", "dtype", "devices", ">grad_accum_steps", ">micro-batch")
        + (">temporary GiB", ">temporary / k=1", ">arguments MiB"),
        _accumulation_memory,
    ),
    "option_cost": Table(
        # A run of some of the options does not replace one of the others.
        ("model", "batch_size", "dtype", "materialize", _option_names),
        ("model", ">batch", "dtype", "devices", "materialize", "option", ">images/s")
        + (">relative to the paper's step",),
        _option_cost,
    ),
    "host_memory": Table(
        ("model", "batch_size", "steps"),
        ("model", ">batch", ">steps", "devices", ">RSS MiB, first", ">RSS MiB, last")
        + (">growth MiB", ">max MiB"),
        _host_memory,
    ),
    "inference": Table(
        ("model", "image_size", "platform"),
        ("model", "input", "runtime", ">batch", "on", ">ms a call (min–max)", ">images/s")
        + (">max error vs JAX", "error"),
        _inference,
    ),
    "model_table": Table(
        ("models",), ("model", "options", "input", ">params", ">multiply-adds"), _model_table
    ),
}


# --------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------- #


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def render_table(name: str, filters: dict[str, str], lines: list[dict]) -> str:
    """The markdown of one table (ending in a newline): the newest line per
    setting, each row citing its commit, UTC time and hardware, then the
    command of each row."""
    if name not in TABLES:
        raise SystemExit(f"Unknown table {name!r} in a marker; known: {', '.join(TABLES)}.")
    table = TABLES[name]
    chosen = newest_per_setting(select(lines, table.benchmark or name, filters), table.key)
    chosen = [line for line in chosen if table.rows(line["result"])]  # lines of another table
    if not chosen:
        return NO_RUN + "\n"
    headers = ("#", *table.headers, "commit", "UTC", "hardware")
    out = [
        _row(h.lstrip(">") for h in headers),
        _row("---:" if h.startswith(">") or h == "#" else "---" for h in headers),
    ]
    commands = []
    for i, line in enumerate(chosen, 1):
        p = line["provenance"]
        commit = (p["commit"] or "unknown")[:7] + ("+dirty" if p["dirty"] else "")
        when = p["time_utc"][:16].replace("T", " ")
        for j, cells in enumerate(table.rows(line["result"])):
            cite = [f"`{commit}`", when, hardware(line)] if j == 0 else ["", "", ""]
            out.append(_row([str(i) if j == 0 else "", *cells, *cite]))
        commands.append(f"{i}. `{p['command']}`")
    text = "\n".join([*out, "", "Commands:", "", *commands]) + "\n"
    notes = table.notes(chosen) if table.notes else ""
    return text + "\n" + notes if notes else text


def render(markdown: str, lines: list[dict]) -> str:
    """``markdown`` with the body of every table marker regenerated."""

    def replace(m: re.Match) -> str:
        filters = dict(f.split("=", 1) for f in m.group("filters").split())
        return m.group("open") + render_table(m.group("name"), filters, lines) + m.group("close")

    new = _BLOCK.sub(replace, markdown)
    opened = len(re.findall(r"^<!-- table:", markdown, re.M))
    if opened != len(_BLOCK.findall(markdown)):
        raise SystemExit("A <!-- table:NAME --> marker has no <!-- /table --> after it.")
    return new


def main(argv: list[str] | None = None) -> int:
    p = launch.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--markdown", default=MARKDOWN, help="the file whose tables are regenerated")
    p.add_argument(
        "--results",
        action="append",
        default=None,
        help="a results file (repeatable; default: benchmarks/results/*.jsonl)",
    )
    p.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    a = p.parse_args(argv)
    paths = a.results if a.results is not None else sorted(glob.glob(RESULTS_GLOB))
    with open(a.markdown) as f:
        old = f.read()
    new = render(old, read_results(paths))
    if a.check:
        if new == old:
            return 0
        diff = difflib.unified_diff(
            old.splitlines(True), new.splitlines(True), a.markdown, "regenerated"
        )
        sys.stdout.writelines(diff)
        print(f"{a.markdown} is out of date with the results: run python -m benchmarks.report")
        return 1
    if new != old:
        with open(a.markdown, "w") as f:
            f.write(new)
    print(f"{a.markdown}: {len(_BLOCK.findall(new))} tables from {len(paths)} results file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
