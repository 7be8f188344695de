"""One run's result as a JSON document (raw samples included), a Markdown table and the stage chart.

The JSON is the record (a checkout's benchmarks/results/ keeps one per run, and `k4trt.bench.compare` reads it); the
Markdown and the PNG are views of it, written next to it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from k4trt.bench import environment, flops
from k4trt.bench.harness import DIT
from k4trt.bench.settings import Settings
from k4trt.bench.timing import format_seconds as seconds
from k4trt.bench.timing import timer_method
from k4trt.errors import K4TRTError
from k4trt.fsutil import atomic_path, check_writable_dir
from k4trt.runtime.report import ORIGINAL_SECONDS, TARGET_SECONDS

SCHEMA = 1
RESULTS = Path("k4trt-bench")  # relative: under the current directory, never inside the installed package
JSON_NAME, MARKDOWN_NAME, CHART_NAME = "result.json", "result.md", "stages.png"
RANDOM_WEIGHTS = "random weights: latency only"
TINY = "tiny random model: a smoke run of the harness, not a measurement of Kandinsky 4"


def document(settings: Settings, results: dict[str, dict], workload: flops.Workload, started: str) -> dict:
    step = workload.dit_step
    commit, dirty = environment.git_commit()
    notes = [TINY] if settings.tiny else ([RANDOM_WEIGHTS] if settings.weights is None else [])
    return {
        "schema": SCHEMA,
        "date": started,
        "commit": commit,
        "git_dirty": dirty,
        "device": environment.device_info(settings.device),
        "software": environment.software(),
        "timer": timer_method(settings.device),
        "settings": settings.to_json(),
        "notes": notes,
        "flops": {
            "dit_step": {"tokens": step.tokens, "linear": step.linear, "attention": step.attention,
                         "total": step.total, "floor_s": step.floor_s(), "floor_fa3_s": step.floor_fa3_s()},
            "vae_decode": workload.vae_decode,
            "bf16_gemm_peak": flops.BF16_GEMM_PEAK,
            "fa3_bf16_rate": flops.FA3_BF16_RATE,
        },
        "reference": {"original_s": ORIGINAL_SECONDS, "target_s": TARGET_SECONDS,
                      "applies": settings.is_reference_case},
        "summary": {name: _headline(result) for name, result in results.items()},
        "backends": results,
    }


def _headline(result: dict) -> dict:
    if result["status"] != "ok":
        return {"status": result["status"], "why": result.get("reason") or result.get("error")}
    summary = result["summary"]
    return {"status": "ok", "total_median_s": summary["total"]["median_s"],
            "dit_median_s": summary[DIT]["median_s"] if DIT in summary else None,
            "dit_step_times_floor": result["roofline"]["dit_step"]["times_floor"]}


def default_out_dir(date: str, device_name: str, commit: str) -> Path:
    """./k4trt-bench/<date>-<device>-<commit>/: one folder, holding one JSON, per run."""
    stamp = re.sub(r"[^0-9T]", "", date.split("+")[0]).replace("T", "-")
    device = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return RESULTS / f"{stamp}-{device}-{commit}"


def prepare(out_dir: Path) -> None:
    """Create the output folder before measuring, so an unwritable one fails in a second, not after an hour."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise K4TRTError(f"--out {out_dir}: cannot create it ({e.strerror}); choose a writable folder") from None
    if (out_dir / JSON_NAME).exists():
        raise K4TRTError(f"--out {out_dir} already holds a {JSON_NAME}; one folder holds one run, choose another")
    check_writable_dir(out_dir, f"--out {out_dir}")


def write(doc: dict, out_dir: Path) -> list[Path]:
    from k4trt.bench.chart import stage_chart

    paths = [out_dir / JSON_NAME, out_dir / MARKDOWN_NAME, out_dir / CHART_NAME]
    with atomic_path(paths[0]) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    with atomic_path(paths[1]) as tmp:
        tmp.write_text(markdown(doc))
    with atomic_path(paths[2]) as tmp:
        stage_chart(doc, tmp)
    return paths


def markdown(doc: dict) -> str:
    s, dev, sw = doc["settings"], doc["device"], doc["software"]
    ok = {name: r for name, r in doc["backends"].items() if r["status"] == "ok"}
    step = doc["flops"]["dit_step"]
    lines = [
        f"# k4trt benchmark: {dev['name']}, {s['width']}x{s['height']}, {s['duration_s']} s",
        "",
        *(f"**{note}**" for note in doc["notes"]),
        "",
        f"- {doc['date']}, commit {doc['commit']}{' (uncommitted changes)' if doc['git_dirty'] else ''}",
        f"- torch {sw['torch']}, CUDA {sw['cuda']}, TensorRT {sw['tensorrt']}"
        + (f", driver {dev['driver_version']}" if dev.get("driver_version") else ""),
        f"- latents {'x'.join(map(str, s['latent_shape']))} -> {s['video_frames']} frames; "
        f"{step['tokens']} tokens per DiT step; weights: {s['weights']}",
        f"- {s['warmup']} warm-up + {s['repeat']} timed runs per backend, timed with {doc['timer']}; "
        "cells are median [min-max]",
        "",
    ]
    if ok:
        lines += _latency_table(doc, ok) + [""] + _roofline_table(doc, ok) + [""] + _load_table(ok) + [""]
    notes = [f"- {name}: {note}" for name, result in ok.items() for note in result["notes"]]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    skipped = {name: r for name, r in doc["backends"].items() if r["status"] != "ok"}
    if skipped:
        lines += ["## Not measured", ""]
        lines += [f"- **{name}** {r['status']}: {r.get('reason') or r.get('error')}" for name, r in skipped.items()]
    return "\n".join(lines).rstrip() + "\n"


def _latency_table(doc: dict, ok: dict[str, dict]) -> list[str]:
    stages: list[str] = []
    for result in ok.values():
        stages += [st for st in result["summary"] if st not in stages and st != "total"]
    stages.append("total")
    lines = ["## Latency", "", "| stage | " + " | ".join(ok) + " |", "|---|" + "---:|" * len(ok)]
    for stage in stages:
        cells = []
        for result in ok.values():
            cell = result["summary"].get(stage)
            cells.append(f"{seconds(cell['median_s'])} [{seconds(cell['min_s'])}-{seconds(cell['max_s'])}]"
                         if cell else "")
        label = "dit (4 steps)" if stage == DIT else stage
        lines.append(f"| {'**total**' if stage == 'total' else label} | " + " | ".join(cells) + " |")
    if doc["reference"]["applies"]:
        original = doc["reference"]["original_s"]
        ratios = [f"{original / r['summary']['total']['median_s']:.2f}x" for r in ok.values()]
        lines.append(f"| speed-up vs the original's {original:.0f} s | " + " | ".join(ratios) + " |")
    return lines


def _roofline_table(doc: dict, ok: dict[str, dict]) -> list[str]:
    f = doc["flops"]
    step = f["dit_step"]
    peak = f["bf16_gemm_peak"] / 1e12
    lines = [
        "## Against the floor",
        "",
        f"One DiT step is {_flop(step['total'])} ({_flop(step['linear'])} Linear + "
        f"{_flop(step['attention'])} attention); the VAE decode {_flop(f['vae_decode'])}. "
        f"Floor = FLOPs at the {peak:.0f} TFLOP/s bf16 GEMM peak; with attention at FlashAttention-3's "
        f"{f['fa3_bf16_rate'] / 1e12:.0f} TFLOP/s a DiT step's floor is {seconds(step['floor_fa3_s'])}.",
        "",
        f"| backend | stage | median | TFLOP/s | % of {peak:.0f} peak | floor | x floor |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, result in ok.items():
        for stage, r in result["roofline"].items():
            lines.append(f"| {name} | {stage.replace('_', ' ')} | {seconds(r['seconds'])} | "
                         f"{r['achieved_tflops']:.3g} | {r['percent_of_peak']:.3g} | {seconds(r['floor_s'])} | "
                         f"{r['times_floor']:.3g} |")
    return lines


def _load_table(ok: dict[str, dict]) -> list[str]:
    lines = ["## Load and memory", "",
             "| backend | load | load parts | peak allocated | peak reserved | device in use |",
             "|---|---:|---|---:|---:|---:|"]
    for name, result in ok.items():
        load = result["load_s"]
        parts = ", ".join(f"{part} {seconds(t)}" for part, t in load.items() if part != "total")
        mem = result["memory"]
        gib = [f"{mem[key]:.1f} GiB" for key in ("peak_allocated_gib", "peak_reserved_gib", "device_in_use_gib")] \
            if mem else ["n/a (CPU)"] * 3
        lines.append(f"| {name} | {seconds(load['total'])} | {parts} | " + " | ".join(gib) + " |")
    lines += ["", "Peaks are PyTorch's allocator since the backend began loading; TensorRT allocates outside it, "
              "so for trt-* read 'device in use' (everything on the GPU after the runs, CUDA context included)."]
    return lines


def _flop(value: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if value >= scale:
            return f"{value / scale:.4g} {unit}"
    return f"{value / 1e6:.4g} MFLOP"
