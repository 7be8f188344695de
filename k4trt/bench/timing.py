"""The statistics of repeated runs, and how they were timed.

Stage boundaries are marked by `k4trt.runtime.report.Recorder`, the clock `k4trt run` uses too: CUDA events
on a GPU (device time between boundaries, stages back to back as in production), wall clock after a
synchronise on the CPU. The method is stored with every result.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from k4trt.runtime.report import Recorder, synchronize

__all__ = ["CUDA_EVENTS", "WALL_CLOCK", "Recorder", "format_seconds", "summarize", "timed", "timer_method"]

T = TypeVar("T")

CUDA_EVENTS = "cuda events"
WALL_CLOCK = "wall clock + synchronize"


def timer_method(device: torch.device) -> str:
    return CUDA_EVENTS if device.type == "cuda" else WALL_CLOCK


def summarize(samples: list[float]) -> dict[str, float | int]:
    """Median with min and max: the median resists the odd slow run, min/max show the spread."""
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples), "n": len(samples)}


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """(fn(), wall seconds) with the device drained on both sides: for one-off work such as loading."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def format_seconds(value: float) -> str:
    """Seconds as a person reads them: '3.217 s', or '41.2 ms' below a second."""
    return f"{value:.3f} s" if value >= 1 else f"{value * 1e3:.3g} ms"
