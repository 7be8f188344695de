"""The collectives of a sequence-parallel DiT call over torch.distributed's default group (NCCL or gloo).

Two of them: the dim-0 all-to-all of the head exchange and the all-gather of the velocity rows. Both are
plain c10d calls on the current stream with outputs allocated by the caller's allocator, which PyTorch lets a
CUDA graph capture on NCCL (CUDA semantics notes, "CUDA Graphs" > usage with torch.distributed: NCCL ≥ 2.9.6).
`seconds` adds up the time spent in them where it can be measured without changing the run: always on the
CPU (the calls return when done), on a GPU between CUDA events while not capturing a graph. It includes
waiting for the slowest rank to arrive, which is what the exchange costs the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor


class ProcessGroupExchange:
    def __init__(self, degree: int, device: torch.device) -> None:
        self.degree = degree
        self.device = device
        self._host_seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._timed_calls = 0

    def all_to_all(self, x: Tensor) -> Tensor:
        """Block j of `x` (split along dim 0 into P) to rank j; block i of the result from rank i."""
        x = x.contiguous()
        out = torch.empty_like(x)
        self._timed(lambda: dist.all_to_all_single(out, x))
        return out

    def all_gather(self, x: Tensor) -> Tensor:
        """Every rank's `x` concatenated along dim 0 in rank order (a list all-gather: gloo's single-tensor
        all-gather rejects equal-sized inputs in torch 2.13)."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.degree)]
        self._timed(lambda: dist.all_gather(parts, x))
        return torch.cat(parts)

    def reset(self) -> None:
        self._host_seconds, self._events, self._timed_calls = 0.0, [], 0

    def seconds(self) -> float | None:
        """Time in collectives since `reset` (waits for the GPU); None when none was timed (a replayed CUDA
        graph runs its collectives without calling in here)."""
        if not self._timed_calls:
            return None
        if self._events:
            torch.cuda.synchronize(self.device)
        return self._host_seconds + sum(a.elapsed_time(b) for a, b in self._events) / 1e3

    def _timed(self, collective: Callable[[], object]) -> None:
        if self.device.type != "cuda":
            start = time.perf_counter()
            collective()
            self._host_seconds += time.perf_counter() - start
            self._timed_calls += 1
        elif torch.cuda.is_current_stream_capturing():
            collective()
        else:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            collective()
            stop.record()
            self._events.append((start, stop))
            self._timed_calls += 1
