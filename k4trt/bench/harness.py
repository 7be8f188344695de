"""Measure every requested subject in turn: load, warm up, repeat, record memory, release.

Subjects run one after another in this process, each released before the next loads, so each one's peak
memory is its own. A backend that cannot run here is reported as skipped with the reason; one that breaks
is reported as failed with its error. Nothing is ever estimated in place of a measurement.
"""

from __future__ import annotations

import gc
import re
import statistics
import sys
import traceback
from collections.abc import Callable

import torch

from k4trt import config
from k4trt.bench import flops, models
from k4trt.bench.settings import ORIGINAL, Settings
from k4trt.bench.subjects import Subject, Unavailable, load_k4trt
from k4trt.bench.timing import Recorder, summarize, timed
from k4trt.config import DiTConfig
from k4trt.errors import K4TRTError, first_line
from k4trt.models.vae import VAEConfig

GIB = 1024**3
DIT = "dit"  # the four steps together: measured as one stage inside a CUDA graph, else summed per run
_STEP = re.compile(r"dit step \d+")

Log = Callable[[str], None]


def run_all(settings: Settings, workload: flops.Workload, log: Log) -> dict[str, dict]:
    """{subject: result} in the order of `settings.measured`; `workload` is `model_flops(settings)`."""
    results = {}
    for name in settings.measured:
        log(f"[{name}] loading")
        result = measure(name, settings, log)
        if result["status"] == "ok":
            result["roofline"] = _roofline(result["summary"], result["samples"], workload)
            log(f"[{name}] total {result['summary']['total']['median_s']:.3f} s (median of {settings.repeat})")
        else:
            log(f"[{name}] {result['status']}: {result.get('reason') or result.get('error')}")
        results[name] = result
    return results


def model_flops(settings: Settings) -> flops.Workload:
    return flops.Workload.of(*model_configs(settings), *settings.latent_shape)


def model_configs(settings: Settings) -> tuple[DiTConfig, VAEConfig]:
    """The DiT and VAE this run measures (a weights folder's are read from its files, not assumed)."""
    if settings.tiny:
        return models.TINY_DIT, models.TINY_VAE
    if settings.weights is None:
        return config.RELEASED_DIT, models.COGVIDEOX_5B_VAE
    from k4trt.models.dit import infer_dit_config
    from k4trt.weights.checkpoint import read_dit_state_dict
    from k4trt.weights.layout import WeightsFolder

    folder = WeightsFolder(settings.weights)
    return infer_dit_config(read_dit_state_dict(folder.dit)), VAEConfig.from_json(folder.vae / "config.json")


def measure(name: str, settings: Settings, log: Log) -> dict:
    device = settings.device
    _release(device)
    try:
        subject, load_total = timed(lambda: _load(name, settings), device)
    except Exception as e:
        return _not_measured(e)
    try:
        samples = _repeat(name, subject, settings, log)
        memory = _memory(device)
    except Exception as e:
        return _not_measured(e)
    finally:
        subject.close()
        _release(device)
    return {
        "status": "ok",
        "notes": subject.notes,
        "load_s": {**subject.load_s, "total": load_total},
        "samples": samples,
        "summary": stage_summary(samples),
        "memory": memory,
    }


def _load(name: str, settings: Settings) -> Subject:
    if name == ORIGINAL:
        from k4trt.bench.original import load_original

        return load_original(settings)
    return load_k4trt(name, settings)


def _repeat(name: str, subject: Subject, settings: Settings, log: Log) -> dict[str, list[float]]:
    """Warm-up runs (their times are dropped), then `repeat` timed runs; raw seconds per stage."""
    for i in range(settings.warmup):
        log(f"[{name}] warm-up {i + 1}/{settings.warmup}")
        subject.run(Recorder(settings.device))
    samples: dict[str, list[float]] = {}
    for i in range(settings.repeat):
        rec = Recorder(settings.device)
        subject.run(rec)
        for stage, seconds in rec.stages().items():
            samples.setdefault(stage, []).append(seconds)
        log(f"[{name}] run {i + 1}/{settings.repeat}: {samples['total'][-1]:.3f} s")
    return samples


def _not_measured(error: Exception) -> dict:
    """Unavailable here (skipped, with the reason) or broken (failed, with the error and a traceback on stderr)."""
    if isinstance(error, (Unavailable, K4TRTError)):
        return {"status": "skipped", "reason": str(error)}
    traceback.print_exception(error, file=sys.stderr)
    return {"status": "failed", "error": first_line(error)}


def stage_summary(samples: dict[str, list[float]]) -> dict[str, dict]:
    """Per stage median/min/max, plus the DiT's four steps together when they were timed one by one."""
    steps = [stage for stage in samples if _STEP.fullmatch(stage)]
    summary = {}
    for stage, values in samples.items():
        summary[stage] = summarize(values)
        if steps and stage == steps[-1]:
            summary[DIT] = summarize([sum(run) for run in zip(*(samples[s] for s in steps), strict=True)])
    summary["total"] = summary.pop("total")
    return summary


def dit_step_median(samples: dict[str, list[float]]) -> float:
    """Median time of one DiT step: over every timed step, or a quarter of the loop when it ran as one graph."""
    steps = [t for stage, values in samples.items() if _STEP.fullmatch(stage) for t in values]
    if steps:
        return statistics.median(steps)
    return statistics.median(samples[DIT]) / config.NUM_STEPS


def _roofline(summary: dict[str, dict], samples: dict[str, list[float]], workload: flops.Workload) -> dict:
    result = {"dit_step": flops.roofline(workload.dit_step.total, dit_step_median(samples))}
    if "vae decode" in summary:
        result["vae_decode"] = flops.roofline(workload.vae_decode, summary["vae decode"]["median_s"])
    return result


def _memory(device: torch.device) -> dict[str, float] | None:
    """PyTorch's allocator peaks since the subject started loading, and what the whole device has in use
    (the latter includes TensorRT's own allocations, the CUDA context and any other process)."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return {
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
        "device_in_use_gib": (total - free) / GIB,
    }


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
