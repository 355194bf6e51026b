"""Errors of the enclave worker.

    WorkerError
     ├── WorkerStartupError        the worker cannot start (pool busy, sim dir missing, ...)
     ├── SealedStateError          sealed state exists but does not unseal (other measurement/machine)
     └── JobRejected               a job is refused; carries the protocol ErrorCode sent back
          ├── ModelRejected        an uploaded model is invalid (hash mismatch, not ONNX, too large)
          └── InputRejected        inputs do not match the model (name, dtype, shape, size)

``JobRejected`` messages end up *inside* encrypted error results and in logs, so they name
fields, dtypes and shapes but never contain tensor or model bytes (P10).
"""

from protocol.bodies import ErrorCode


class WorkerError(Exception):
    """Base of every worker error."""


class WorkerStartupError(WorkerError):
    """The worker refuses to start; the message says why and what to do."""


class SealedStateError(WorkerError):
    """Sealed state on disk cannot be unsealed by this worker."""


class JobRejected(WorkerError):
    code = ErrorCode.INTERNAL

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ModelRejected(JobRejected):
    code = ErrorCode.MODEL_INVALID


class InputRejected(JobRejected):
    code = ErrorCode.BAD_INPUT
