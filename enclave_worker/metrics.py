"""Worker metrics: counts and latencies only -- never ids, payloads or tensor shapes (P10)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # A registry per worker so that several workers in one process (tests, the demo) coexist.
        self.registry = registry or CollectorRegistry()
        self.requests = Counter("enclaveq_worker_requests_total", "Requests handled, by kind and outcome",
                                ["kind", "outcome"], registry=self.registry)
        self.dead_lettered = Counter("enclaveq_worker_dead_lettered_total",
                                     "Requests sent to the dead-letter queue because no producer could be addressed",
                                     ["reason"], registry=self.registry)
        self.latency = Histogram("enclaveq_worker_job_seconds", "Time from delivery to confirmed result",
                                 registry=self.registry)
        # Rows per ONNX Runtime call (1 for a job that ran alone): how much dynamic batching happens.
        self.batch_rows = Histogram("enclaveq_worker_batch_rows", "Rows per ONNX Runtime call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)

    def watch_refusals(self, read: Callable[[], Mapping[str, float]]) -> None:
        """Export, at each scrape, what ``read()`` counts of messages refused or dropped without
        the work they asked for (by reason): a flood shows up here, not in the logs."""
        self.registry.register(_Refusals(read))

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        start_http_server(port, addr=addr, registry=self.registry)


class _Refusals(Collector):
    def __init__(self, read: Callable[[], Mapping[str, float]]) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("enclaveq_worker_refused_messages",
                                     "Messages refused or dropped before the work they asked for, by reason",
                                     labels=["reason"])
        for reason, count in sorted(self._read().items()):
            family.add_metric([reason], count)
        yield family
