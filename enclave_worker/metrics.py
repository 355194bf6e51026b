"""Worker metrics: counts and latencies only -- never ids, payloads or tensor shapes (P10)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server


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

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
