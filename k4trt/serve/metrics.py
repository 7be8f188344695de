"""`GET /metrics`: Prometheus text. Counts are read from the store when scraped, so they are right after a
restart too; stage latencies are histograms observed as jobs complete (since this server started)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from k4trt.serve.store import JobStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# From a tiny model on a CPU (milliseconds) to the released one on a GPU (seconds) and on a CPU (minutes).
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


class _StoreCollector(Collector):
    def __init__(self, store: JobStore, replicas: Callable[[], int]) -> None:
        self.store = store
        self.replicas = replicas

    def collect(self) -> Iterator[Metric]:
        counts = self.store.counts()
        yield GaugeMetricFamily("k4trt_queue_depth", "Jobs waiting for a replica.", value=counts["queued"])
        jobs = GaugeMetricFamily("k4trt_jobs", "Jobs in the store by status.", labels=["status"])
        for status, n in counts.items():
            jobs.add_metric([status], n)
        yield jobs
        yield GaugeMetricFamily("k4trt_replicas", "Replicas running, each one Pipeline.", value=self.replicas())


class Metrics:
    def __init__(self, store: JobStore, replicas: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StoreCollector(store, replicas))
        self._stages = Histogram("k4trt_stage_seconds", "Seconds per pipeline stage of completed jobs "
                                 "(total: text encoder to video encode).", ["stage"], buckets=_BUCKETS,
                                 registry=self.registry)
        self._lost = Counter("k4trt_replica_losses", "Jobs whose replica stopped under them (each is retried "
                             "once).", registry=self.registry)

    def observe(self, stages: dict[str, float]) -> None:
        for stage, seconds in stages.items():
            self._stages.labels(stage).observe(seconds)

    def replica_lost(self) -> None:
        self._lost.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
