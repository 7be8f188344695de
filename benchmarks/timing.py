"""Stage boundaries on the device's own timeline, and the statistics of repeated runs.

On a GPU each boundary is a CUDA event recorded on the current stream: recording does not wait, so the
stages run back to back as they do in production and the events give device time between boundaries. On the
CPU there are no device events, so a boundary is the wall clock after synchronising the device (for CPU
tensors the ops are synchronous and the synchronise is a no-op). The method is stored with every result.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TypeVar, Union

import torch

T = TypeVar("T")
Mark = Union[float, torch.cuda.Event]  # a wall-clock reading or a recorded event

CUDA_EVENTS = "cuda events"
WALL_CLOCK = "wall clock + synchronize"


def timer_method(device: torch.device) -> str:
    return CUDA_EVENTS if device.type == "cuda" else WALL_CLOCK


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Recorder:
    """`start()`, then `lap(stage)` at the end of each stage; a stage lapped more than once (the VAE, once per
    chunk) adds up. `stages()` waits for the device and returns seconds per stage plus `total`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._start: Mark | None = None
        self._laps: list[tuple[str, Mark]] = []

    def _now(self) -> Mark:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        synchronize(self.device)
        return time.perf_counter()

    @staticmethod
    def _seconds(a: Mark, b: Mark) -> float:
        if isinstance(a, torch.cuda.Event) and isinstance(b, torch.cuda.Event):
            return a.elapsed_time(b) / 1e3
        if isinstance(a, float) and isinstance(b, float):
            return b - a
        raise TypeError("marks of one recorder are all CUDA events or all clock readings")

    def start(self) -> None:
        self._start, self._laps = self._now(), []

    def lap(self, stage: str) -> None:
        if self._start is None:
            raise RuntimeError("Recorder.lap before start")
        self._laps.append((stage, self._now()))

    def stages(self) -> dict[str, float]:
        if self._start is None or not self._laps:
            raise RuntimeError("Recorder.stages needs start() and at least one lap()")
        synchronize(self.device)
        seconds: dict[str, float] = {}
        before = self._start
        for stage, after in self._laps:
            seconds[stage] = seconds.get(stage, 0.0) + self._seconds(before, after)
            before = after
        seconds["total"] = self._seconds(self._start, before)
        return seconds


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
