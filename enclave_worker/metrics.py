"""Worker metrics: counts and latencies only -- never ids, payloads or tensor shapes (P10)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
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
        self.inference = Histogram("enclaveq_worker_inference_seconds",
                                   "Time of one ONNX Runtime call (a batch or a job alone)", registry=self.registry)
        self.queueing = Histogram("enclaveq_worker_queueing_seconds",
                                  "Time a delivered request waited for one of the worker's slots",
                                  registry=self.registry)
        self.reconnects = Counter("enclaveq_worker_reconnects_total",
                                  "Times the broker connection came back after a loss", registry=self.registry)
        self.in_flight = Gauge("enclaveq_worker_requests_in_flight", "Requests being handled now",
                               registry=self.registry)
        self.models = Gauge("enclaveq_worker_models_loaded", "Models this worker serves", registry=self.registry)
        self.epoch = Gauge("enclaveq_worker_pool_epoch", "The pool key epoch this worker serves",
                           registry=self.registry)
        self.held = Gauge("enclaveq_worker_requests_held",
                          "Requests held unrun because the state directory cannot be written",
                          registry=self.registry)

    def watch_attestations(self, read: Callable[[], float]) -> None:
        """Export, at each scrape, how many attestation challenges ``read()`` says were answered."""
        self.registry.register(_Count("enclaveq_worker_attestations",
                                      "Attestation challenges answered with evidence", read))

    def watch_state(self, *, in_flight: Callable[[], float], models: Callable[[], float],
                    epoch: Callable[[], float]) -> None:
        """Read the gauges from the worker at each scrape (nothing to keep in step by hand)."""
        self.in_flight.set_function(in_flight)
        self.models.set_function(models)
        self.epoch.set_function(epoch)

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


class _Count(Collector):
    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self._name, self._documentation, self._read = name, documentation, read

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._documentation, value=self._read())
