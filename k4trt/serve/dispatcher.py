"""Hands queued jobs from the store to the replicas, as many at once as there are replicas, oldest first.

The queue is the store, not Ray's request queue: a queue that outlives the server has to be on disk anyway,
and keeping no more jobs in flight than there are replicas means a queued job is never inside Ray, so
cancelling one is deleting a row, a restart loses nothing, and the queue's order is the store's. Ray Serve does
the rest — which replica is free, restarting a dead one, routing a retry to a live one.

A job whose replica dies under it (the call raises, where a failure of the job itself arrives as an event) goes
back to the queue once; the second time it fails with the reason, so a job that kills every replica it lands
on cannot take the service down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from k4trt.errors import K4TRTError, first_line
from k4trt.serve.metrics import Metrics
from k4trt.serve.request import VideoRequest
from k4trt.serve.store import Job, JobStore
from k4trt.serve.worker import Event, Failed, Finished, Progress

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # the first try and one retry on another replica

RunJob = Callable[[VideoRequest], AsyncIterator[Event]]


class Dispatcher:
    def __init__(self, store: JobStore, run_job: RunJob, slots: int, metrics: Metrics) -> None:
        self.store = store
        self.run_job = run_job
        self.slots = slots
        self.metrics = metrics
        self._wake = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()

    def start(self) -> asyncio.Task[None]:
        """On the event loop that serves the requests; the task runs as long as the server does."""
        return asyncio.create_task(self._loop())

    def notify(self) -> None:
        """A job was queued: fill a free slot now rather than when a running job ends."""
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            while len(self._running) < self.slots and (job := self.store.claim_next()) is not None:
                task = asyncio.create_task(self._run(job))
                self._running.add(task)
                task.add_done_callback(self._finished)
            await self._wake.wait()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._wake.set()

    async def _run(self, job: Job) -> None:
        try:
            result = await self._follow(job)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the replica (or the call to it) was lost, not the job
            self._lost(job, error)
            return
        if isinstance(result, Failed):
            self.store.fail(job.id, result.message)
            return
        try:
            await asyncio.to_thread(self.store.complete, job, result.content, result.stages, result.peak_memory_mb)
        except (OSError, K4TRTError) as error:  # the store's file write names the cause (disk full, ...) in a K4TRTError
            log.exception("could not store the result of %s", job.id)
            self.store.fail(job.id, f"the video was made but could not be stored ({error})")
            return
        self.metrics.observe(result.stages)

    async def _follow(self, job: Job) -> Finished | Failed:
        async for event in self.run_job(job.request):
            if isinstance(event, Progress):
                self.store.set_progress(job.id, event.percent)
            else:
                return event
        raise RuntimeError("the replica's stream ended without a result")

    def _lost(self, job: Job, error: Exception) -> None:
        reason = first_line(error)
        self.metrics.replica_lost()
        if job.attempts < MAX_ATTEMPTS:
            log.warning("replica lost during %s (attempt %d), re-queued: %s", job.id, job.attempts, reason)
            self.store.requeue(job.id)
        else:
            log.error("replica lost during %s again, failed: %s", job.id, reason)
            self.store.fail(job.id, f"the replica generating this video stopped {job.attempts} times ({reason})")

