"""One job on a loaded `Pipeline`, as a stream of events: progress, then the finished file or the failure.

The replica sends the file's bytes back rather than writing into the store because a replica may run on another
node of the cluster than the store; the file is made by the very `Pipeline.generate` call `k4trt run` makes, so
it is byte for byte what `k4trt run` writes for the same request. Generation runs in a thread so the replica's
event loop keeps answering Ray Serve's health checks and streams progress while the model works.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from k4trt.errors import K4TRTError, first_line
from k4trt.runtime.pipeline import Pipeline
from k4trt.serve.request import VideoRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    percent: int  # 0-99: 100 is only said once the file is stored


@dataclass(frozen=True)
class Finished:
    content: bytes
    stages: dict[str, float]  # seconds per stage and "total", as `k4trt run --report` records them
    peak_memory_mb: float


@dataclass(frozen=True)
class Failed:
    message: str  # one line for the user


Event = Progress | Finished | Failed


def peak_memory_mb(device: torch.device) -> float:
    """On a GPU: the most memory PyTorch held during the job (reset per job). On the CPU: the replica process's
    peak resident memory since it started (the kernel keeps no per-job peak), which includes the loaded model."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class JobRunner:
    """A loaded pipeline and the one job it works on at a time. Ray Serve already sends a replica one request
    at a time; the lock also covers a request cancelled mid-way (its caller gone), whose thread cannot be stopped
    and finishes before the next job starts, so two jobs never share the pipeline."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self._busy = threading.Lock()

    def generate(self, request: VideoRequest, on_progress: Callable[[int, int], None]) -> Finished:
        device = self.pipe.executor.device
        with self._busy, tempfile.TemporaryDirectory(prefix="k4trt-serve-") as folder:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            output = Path(folder) / f"video{request.suffix}"
            result = self.pipe.generate(request.prompt, seed=request.seed, seconds=request.seconds,
                                        width=request.width, height=request.height, output=output, progress=False,
                                        on_progress=on_progress)
            return Finished(content=output.read_bytes(), stages=result.stages,
                            peak_memory_mb=peak_memory_mb(device))

    async def run(self, request: VideoRequest) -> AsyncIterator[Event]:
        """Progress events as the work units finish, then exactly one `Finished` or `Failed`. A failure of the
        job itself is an event, not an exception: only a lost replica raises, which the dispatcher retries."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Progress | None] = asyncio.Queue()

        def on_progress(done: int, total: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, Progress(min(99, 100 * done // total)))

        def work() -> Finished:
            try:
                return self.generate(request, on_progress)
            finally:
                loop.call_soon_threadsafe(events.put_nowait, None)

        result = loop.run_in_executor(None, work)
        while (event := await events.get()) is not None:
            yield event
        try:
            finished: Event = await result
        except K4TRTError as error:
            finished = Failed(str(error))
        except Exception as error:  # the job failed, the replica did not: say what, keep the traceback in its log
            log.exception("job failed: %s", request)
            finished = Failed(f"generation failed ({first_line(error)})")
        yield finished
