"""The Ray Serve application: `VideoAPI` (the FastAPI ingress, the store and the dispatcher, one replica) in front
of `Worker` (one loaded `Pipeline` per replica, one request at a time).

The ingress is pinned to the node `k4trt serve` runs on, because the store is a folder on that machine; workers
go wherever the cluster has the resources one asks for (a GPU each, or a share of the CPUs), so two replicas on
a two-GPU machine get one GPU each (Ray sets each one's CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from ray import serve
from ray.serve.handle import DeploymentHandle

from k4trt.serve import APP_NAME
from k4trt.serve.api import Service, create_app
from k4trt.serve.dispatcher import Dispatcher, RunJob
from k4trt.serve.metrics import Metrics
from k4trt.serve.request import VideoRequest
from k4trt.serve.store import JobStore
from k4trt.serve.worker import Event, JobRunner

WORKER = "Worker"


@dataclass(frozen=True)
class Settings:
    weights: Path
    engines: Path | None
    backend: str
    device: str
    replicas: int
    cpus_per_replica: float
    store: Path
    node_resource: str  # "node:<ip>" of the machine holding the store
    released: bool
    token: str | None


class Worker:
    def __init__(self, settings: Settings) -> None:
        from k4trt.runtime.pipeline import Pipeline

        pipe = Pipeline.from_pretrained(settings.weights, backend=settings.backend, device=settings.device,
                                        engines=settings.engines)
        self.runner = JobRunner(pipe)

    async def generate(self, request: VideoRequest) -> AsyncIterator[Event]:
        async for event in self.runner.run(request):
            yield event


@serve.ingress()
class VideoAPI:
    async def __init__(self, worker: DeploymentHandle, settings: Settings) -> None:
        self.store = JobStore(settings.store)
        self.store.recover()
        self.metrics = Metrics(self.store, _running_workers)
        self.dispatcher = Dispatcher(self.store, _streamed(worker), slots=settings.replicas, metrics=self.metrics)
        self.dispatching = self.dispatcher.start()  # held: asyncio keeps only a weak reference to a task
        self.service = Service(store=self.store, metrics=self.metrics, on_queued=self.dispatcher.notify,
                               released=settings.released, token=settings.token)

    def __serve_build_asgi_app__(self):  # noqa: ANN204 - Ray Serve's hook; returns the ASGI app
        return create_app(self.service)


def _streamed(worker: DeploymentHandle) -> RunJob:
    """`Worker.generate` on whichever replica Ray Serve picks, its events streamed back as they are made."""
    stream = worker.options(stream=True)

    def run_job(request: VideoRequest) -> AsyncIterator[Event]:
        return cast(AsyncIterator[Event], stream.generate.remote(request))

    return run_job


def _running_workers() -> int:
    status = serve.status().applications.get(APP_NAME)
    if status is None or WORKER not in status.deployments:
        return 0
    return sum(n for state, n in status.deployments[WORKER].replica_states.items() if state == "RUNNING")


def build_app(settings: Settings) -> serve.Application:
    worker_options: dict[str, object] = {"num_cpus": settings.cpus_per_replica}
    if settings.device == "cuda":
        worker_options["num_gpus"] = 1
    # A stopping server does not wait for jobs in flight: they are still in progress in the store, and the next
    # start re-queues them.
    workers = serve.deployment(name=WORKER, num_replicas=settings.replicas, max_ongoing_requests=1,
                               ray_actor_options=worker_options, graceful_shutdown_timeout_s=1)(Worker)
    api = serve.deployment(name="VideoAPI", num_replicas=1, max_ongoing_requests=256,
                           ray_actor_options={"num_cpus": 0, "resources": {settings.node_resource: 0.001}},
                           graceful_shutdown_timeout_s=1)(VideoAPI)
    return api.bind(workers.bind(settings), settings)
