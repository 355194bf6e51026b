"""The worker's measured configuration: limits and settings that change what the worker does.

Everything returned by :meth:`WorkerConfig.measured` enters the worker's measurement
(:func:`enclave_worker.measurement.measure_worker`), so a verifier that trusts a measurement
also trusts these exact values: a host cannot quietly raise a limit or change the version
without changing the measurement that policies pin. Settings that do not affect security
(log level, broker URL, metrics port) must stay out of this class.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["MiB", "WorkerConfig", "DEFAULT_WORKER_CONFIG"]

MiB = 1024 * 1024

# Custom-operator domain -> the Python distribution whose shared library provides it.
CUSTOM_OP_LIBRARIES = {"ai.onnx.contrib": "onnxruntime-extensions"}


def custom_op_library_version(domain: str) -> str:
    from importlib.metadata import version

    library = CUSTOM_OP_LIBRARIES[domain]
    return f"{library} {version(library)}"


@dataclass(frozen=True)
class WorkerConfig:
    """Measured worker settings. Defaults are the ones the published measurement is made of."""

    max_message_bytes: int = 64 * MiB  # largest broker message the worker will even open
    max_tensor_bytes: int = 32 * MiB  # largest single decoded tensor
    max_model_bytes: int = 512 * MiB  # largest ONNX model accepted for upload
    intra_op_threads: int = 1  # ONNX Runtime threads per job
    max_jobs_in_flight: int = 8  # concurrent jobs per worker process
    # Dynamic batching (enclave_worker/batcher.py, Triton's semantics): jobs for one model, from any
    # frames, messages and producers, share one ONNX Runtime call of at most this many rows, if the
    # model's graph is proven row-independent. Measured because it decides whose jobs share a call.
    max_batch_rows: int = 64
    # How long a batch may wait for more jobs once it has one, in microseconds. 0: never wait; a
    # batch is whatever queued while the inference threads were busy.
    max_queue_delay_us: int = 0
    # Batch sizes (rows) that leave at once even before the delay is over (empty: none preferred).
    preferred_batch_rows: tuple[int, ...] = ()
    # Longest grace period a rotation may give the previous epoch's key (P6): bounds how long a
    # rotated-away key can still open captured traffic, whatever an operator asks for.
    max_rotation_grace_seconds: int = 3600
    # Custom-operator domains a model may use beyond standard ONNX: "ai.onnx.contrib" is
    # onnxruntime-extensions (tokenizers, string ops, image decoding), the only library the worker
    # can register. Measured, with the library's version: pre/post-processing graphs then run
    # without the worker's code changing, and a producer's pin covers the operators they may call.
    custom_op_domains: tuple[str, ...] = ("ai.onnx.contrib",)
    version: str = "1"  # bump when the meaning of any field changes

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "version":
                if type(value) is not str or not value:
                    raise ValueError("WorkerConfig.version must be a non-empty string")
            elif f.name == "max_queue_delay_us":
                if type(value) is not int or not 0 <= value <= 60_000_000:
                    raise ValueError(f"WorkerConfig.max_queue_delay_us must be 0..60000000 (a minute), got {value!r}")
            elif f.name == "preferred_batch_rows":
                if type(value) is not tuple or any(type(v) is not int or not 1 <= v <= self.max_batch_rows
                                                   for v in value):
                    raise ValueError("WorkerConfig.preferred_batch_rows must be a tuple of sizes 1..max_batch_rows")
            elif f.name == "custom_op_domains":
                if type(value) is not tuple or not set(value) <= set(CUSTOM_OP_LIBRARIES):
                    raise ValueError(f"WorkerConfig.custom_op_domains must be a tuple of {sorted(CUSTOM_OP_LIBRARIES)}")
            elif type(value) is not int or value < 1:
                raise ValueError(f"WorkerConfig.{f.name} must be a positive integer, got {value!r}")

    def measured(self) -> dict[str, Any]:
        """The fields that enter the measurement (all of them, plus the version of each custom
        operator library in use), as a plain dict."""
        measured = asdict(self)
        measured["custom_op_domains"] = {domain: custom_op_library_version(domain) for domain in self.custom_op_domains}
        return measured


DEFAULT_WORKER_CONFIG = WorkerConfig()
