"""Errors a producer sees.

    EnclaveqError
     ├── BrokerUnreachable          the broker cannot be reached or refused us
     ├── AttestationFailed          the pool's evidence does not satisfy the policy (or is malformed)
     │    ├── NoWorkerAnswered      nobody answered the challenge in time
     │    └── EpochRollback         the pool attested an older epoch than this producer already
     │                              used (a lagging or rolled-back worker; or a re-created pool)
     ├── JobError                   a worker refused a request; ``code`` is the protocol error code
     │    ├── UnknownModel          the model id is not loaded on the pool
     │    ├── ModelRejected         an uploaded model is invalid (hash, not ONNX, too large,
     │    │                         an older manifest or delete order than the one in force)
     │    ├── BadInput              inputs do not fit the model (names, dtypes, shapes)
     │    ├── Oversized             a message or tensor is above a limit
     │    ├── JobExpired            the deadline passed before a worker ran the job
     │    ├── RequestTampered       the worker could not open the request: modified in transit
     │    ├── RotationRefused       the pool would not rotate (grace above its limit, rotation running)
     │    ├── NotOwner              only the model's owner may replace or delete it
     │    ├── NotAllowed            the model's owner did not allow this producer's key
     │    ├── BadSignature          an owner signature or producer key proof does not verify
     │    ├── UnknownPipeline       the pool holds no pipeline of that id
     │    ├── PipelineRejected      a pipeline definition is invalid (the TOML key at fault), its
     │    │                         wiring does not type-check against the models, or it is older
     │    │                         than the definition or delete order in force
     │    └── WorkerFailure         inference failed, unsupported output, or an internal error
     ├── EventTopicError            no usable topic to publish a pipeline's events on
     ├── InboxNotFound              no inbox for this recipient key: not a recipient of the pipeline
     ├── JobTimeout                 no result arrived before the timeout
 ├── BatchJournalError          a resumable batch's journal is unreadable, damaged, or another batch's
     └── ClientClosed               the client was used after close()

Errors of events (fire and forget) do not raise: a publisher collects them (``errors``), each
with the ``event_id`` it belongs to.

Third-party errors (broker, attestation, protocol) are mapped to these at the SDK boundary.
"""

from __future__ import annotations

from typing import Any

from protocol.bodies import ErrorCode


class EnclaveqError(Exception):
    """Base of every error the producer SDK raises."""


class BrokerUnreachable(EnclaveqError):
    pass


class AttestationFailed(EnclaveqError):
    """``violations``: every policy violation of genuine evidence; ``busy``: the workers were
    over their evidence budget (a flood of challenges), so trying again later may succeed."""

    def __init__(self, message: str, violations: tuple[Any, ...] = (), *, busy: bool = False) -> None:
        super().__init__(message)
        self.violations = violations
        self.busy = busy


class NoWorkerAnswered(AttestationFailed):
    pass


class EpochRollback(AttestationFailed):
    """Genuine evidence, but for an epoch older than one this producer already used (P13).
    ``epoch`` is what was attested, ``newest`` the epoch already seen, ``state_file`` where that
    was remembered (None: seen by this client)."""

    def __init__(self, message: str, *, epoch: int, newest: int, state_file: str | None = None) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.newest = newest
        self.state_file = state_file


# Error codes of pipeline requests (the worker's enclave_worker.pipelines names them too).
UNKNOWN_PIPELINE = ErrorCode.UNKNOWN_PIPELINE
PIPELINE_INVALID = ErrorCode.PIPELINE_INVALID


class JobError(EnclaveqError):
    """``code`` is the worker's error code; ``job_id`` the request it answers; ``event_id`` the
    event, when the request was a pipeline event."""

    code = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: str | None = None, job_id: str | None = None,
                 event_id: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.job_id = job_id
        self.event_id = event_id


class UnknownModel(JobError):
    code = ErrorCode.UNKNOWN_MODEL


class ModelRejected(JobError):
    code = ErrorCode.MODEL_INVALID


class BadInput(JobError):
    code = ErrorCode.BAD_INPUT


class Oversized(JobError):
    code = ErrorCode.OVERSIZED


class JobExpired(JobError):
    code = ErrorCode.EXPIRED


class RequestTampered(JobError):
    code = ErrorCode.DOES_NOT_OPEN


class RotationRefused(JobError):
    code = ErrorCode.ROTATION_REFUSED


class NotOwner(JobError):
    code = ErrorCode.NOT_OWNER


class NotAllowed(JobError):
    code = ErrorCode.NOT_ALLOWED


class BadSignature(JobError):
    code = ErrorCode.BAD_SIGNATURE


class UnknownPipeline(JobError):
    code = UNKNOWN_PIPELINE


class PipelineRejected(JobError):
    """``key``: the pipeline.toml key at fault (``stage[1].inputs.input_ids``), "" when the
    definition as a whole was refused or the key is not known."""

    code = PIPELINE_INVALID

    def __init__(self, message: str, *, code: str | None = None, job_id: str | None = None,
                 event_id: str | None = None, key: str = "") -> None:
        super().__init__(message, code=code, job_id=job_id, event_id=event_id)
        self.key = key


class WorkerFailure(JobError):
    pass


class EventTopicError(EnclaveqError):
    """A publisher has no concrete topic for the pipeline's events: its source filter has
    wildcards and no ``topic`` was given, or the given one does not match the filter."""


class InboxNotFound(EnclaveqError):
    """No inbox exists for this (pipeline, recipient key): the key is not one of the pipeline's
    recipients (creating the pipeline declares an inbox for each of them)."""


class JobTimeout(EnclaveqError):
    pass


class BatchJournalError(EnclaveqError):
    """A resumable batch's journal cannot be used: unreadable, damaged, or of another batch, pool
    or model (producer_sdk.journal)."""


class ClientClosed(EnclaveqError):
    pass


_BY_CODE = {
    ErrorCode.UNKNOWN_MODEL: UnknownModel,
    ErrorCode.MODEL_INVALID: ModelRejected,
    ErrorCode.BAD_INPUT: BadInput,
    ErrorCode.OVERSIZED: Oversized,
    ErrorCode.EXPIRED: JobExpired,
    ErrorCode.DOES_NOT_OPEN: RequestTampered,
    ErrorCode.ROTATION_REFUSED: RotationRefused,
    ErrorCode.NOT_OWNER: NotOwner,
    ErrorCode.NOT_ALLOWED: NotAllowed,
    ErrorCode.BAD_SIGNATURE: BadSignature,
    ErrorCode.STALE_ORDER: ModelRejected,
    UNKNOWN_PIPELINE: UnknownPipeline,
    PIPELINE_INVALID: PipelineRejected,
}


def job_error(code: str, message: str, job_id: str | None, *, event_id: str | None = None) -> JobError:
    return _BY_CODE.get(code, WorkerFailure)(f"{code}: {message}", code=code, job_id=job_id, event_id=event_id)
