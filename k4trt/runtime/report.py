"""Stage times of a generation: marked on the device's own timeline, printed as a table, saved as JSON.

On a GPU each stage boundary is a CUDA event recorded on the current stream: recording does not wait, so
the stages run back to back as in production and the events give the time between boundaries. On the CPU
a boundary is the wall clock after synchronising. `k4trt run` and the benchmark harness use this one clock.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from k4trt.fsutil import atomic_file

ORIGINAL_SECONDS = 11.0  # the original on one H100, 12 s at 672x384 (its authors' figure)
TARGET_SECONDS = 3.0
REFERENCE_REQUEST = (12, 672, 384)  # (seconds, width, height): the only request those two figures are for

Mark = float | torch.cuda.Event  # a wall-clock reading or a recorded event
#: stages measured inside others, reported but never added up with them: the time a sequence-parallel
#: DiT spends in its collectives (part of the DiT steps)
WITHIN = ("dit exchange",)


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
        self._within: dict[str, float] = {}

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
        self._start, self._laps, self._within = self._now(), [], {}

    def note(self, stage: str, seconds: float) -> None:
        """A duration measured inside the laps (one of `WITHIN`): reported beside them, not part of the total."""
        if stage not in WITHIN:
            raise ValueError(f"{stage!r} is not a stage measured within others ({', '.join(WITHIN)})")
        self._within[stage] = self._within.get(stage, 0.0) + seconds

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
        seconds |= self._within
        seconds["total"] = self._seconds(self._start, before)
        return seconds


def is_reference(seconds: int, width: int, height: int) -> bool:
    """Whether a request is the one the original's 11 s (and our target) are stated for."""
    return (seconds, width, height) == REFERENCE_REQUEST


def format_table(stages: dict[str, float], reference: bool = False) -> str:
    """One row per stage; the original's time is quoted only beside a run of the request it was measured for."""
    width = max(len(name) for name in stages)
    rows = [f"{name:<{width}}  {secs:8.3f} s" for name, secs in stages.items()]
    if reference:
        rows[-1] += f"   (the original: {ORIGINAL_SECONDS:.0f} s for this request on one H100, its authors' figure)"
    return "\n".join(rows)


def save_report(path: Path, stages: dict[str, float], run: dict[str, object], reference: bool = False) -> None:
    """`run` says what was made and how (output, frames, weights, precision, settings, version); the original's
    and the target's times are added only for the request they are stated for."""
    document: dict[str, object] = {"stages_s": stages, **run}
    if reference:
        document["reference"] = {"original_s": ORIGINAL_SECONDS, "target_s": TARGET_SECONDS,
                                 "request": "12 s at 672x384 on one H100"}
    with atomic_file(path) as f:
        f.write((json.dumps(document, indent=2) + "\n").encode())
