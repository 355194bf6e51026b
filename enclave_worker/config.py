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


@dataclass(frozen=True)
class WorkerConfig:
    """Measured worker settings. Defaults are the ones the published measurement is made of."""

    max_message_bytes: int = 64 * MiB  # largest broker message the worker will even open
    max_tensor_bytes: int = 32 * MiB  # largest single decoded tensor
    max_model_bytes: int = 512 * MiB  # largest ONNX model accepted for upload
    intra_op_threads: int = 1  # ONNX Runtime threads per job
    max_jobs_in_flight: int = 8  # concurrent jobs per worker process
    # Longest grace period a rotation may give the previous epoch's key (P6): bounds how long a
    # rotated-away key can still open captured traffic, whatever an operator asks for.
    max_rotation_grace_seconds: int = 3600
    version: str = "1"  # bump when the meaning of any field changes

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "version":
                if type(value) is not str or not value:
                    raise ValueError("WorkerConfig.version must be a non-empty string")
            elif type(value) is not int or value < 1:
                raise ValueError(f"WorkerConfig.{f.name} must be a positive integer, got {value!r}")

    def measured(self) -> dict[str, Any]:
        """The fields that enter the measurement (today: all of them), as a plain dict."""
        return asdict(self)


DEFAULT_WORKER_CONFIG = WorkerConfig()
