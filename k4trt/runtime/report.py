"""Per-stage wall times of one generation, printed as a table and saved as JSON beside the original's 11 s.

Wall-clock with a device synchronise at each boundary: on a GPU this is the latency a user sees per stage.
(The benchmark harness uses CUDA events and repetitions; this report is for a single run.)
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from k4trt.fsutil import atomic_path

ORIGINAL_SECONDS = 11.0  # the original on one H100, 12 s at 672x384 (authors' figure)
TARGET_SECONDS = 3.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StageTimes:
    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)
    _last: float = 0.0

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a block; repeated names accumulate (the video encoder runs once per VAE chunk)."""
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def mark(self) -> None:
        """Start a sequence of laps (per-step times recorded from inside a loop's callback)."""
        synchronize(self.device)
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def table(self) -> str:
        width = max([len(n) for n in self.seconds] + [5])
        rows = [f"{name:<{width}}  {secs:8.3f} s" for name, secs in self.seconds.items()]
        rows.append(f"{'total':<{width}}  {self.total:8.3f} s   (original: {ORIGINAL_SECONDS:.0f} s on one H100)")
        return "\n".join(rows)

    def to_json(self, settings: dict[str, object]) -> dict[str, object]:
        return {
            "stages_s": self.seconds,
            "total_s": self.total,
            "original_s": ORIGINAL_SECONDS,
            "target_s": TARGET_SECONDS,
            "settings": settings,
        }

    def save(self, path: Path, settings: dict[str, object]) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_json(settings), indent=2) + "\n")
