"""What each kind of opened request does: one handler per kind, in one table.

The worker hands every request that opened, is not a replay and has not expired to
:meth:`RequestHandlers.execute`, which answers with an :class:`Answer` (status, content type,
body) to seal back to the producer. Every refusal is a typed error answer -- a worker never
crashes on a request and never puts payloads in its logs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from protocol import bodies, frames
from protocol.envelope import RequestHeader
from protocol.errors import MalformedMessage, OversizedMessage, ProtocolError, TensorError
from protocol.tensors import TensorLimits

import numpy as np

from broker_adapters import Message, Unroutable

from .batcher import Batcher
from .budget import noisy
from .context import WorkerContext
from .errors import JobRejected
from .keyring import Keyring
from .model_library import ModelLibrary
from .pipelines import PipelineLibrary
from .rotation import Rotation
from .sessions import OpenedSession, SessionCache

log = logging.getLogger("enclaveq.worker")

@dataclass(frozen=True)
class Answer:
    status: str        # "ok" or "error"
    content_type: str
    body: bytes
    # A frame's answer: the code of each job in it ("ok" or its error), for the job metrics.
    job_codes: tuple[str, ...] = ()

    @classmethod
    def error(cls, code: str, message: str) -> Answer:
        return cls("error", bodies.ERROR, bodies.ErrorBody(code=code, message=message).to_bytes())

    @classmethod
    def done(cls) -> Answer:
        """Handled, and nothing to send back: an event's result goes to its recipients, not to
        its publisher (who hears only of failures)."""
        return cls("done", bodies.EMPTY, b"")

    @property
    def code(self) -> str:
        """"ok", or the error code (for metrics and logs)."""
        return bodies.ErrorBody.from_bytes(self.body).code if self.status == "error" else "ok"

    @property
    def silent(self) -> bool:
        return self.status == "done"


Handler = Callable[[RequestHeader, bytes], Awaitable[Answer]]
# Publishes a sealed pipeline result on a sink topic (and, on AMQP, exchange): the worker's broker.
ResultPublisher = Callable[[str, Message, str], Awaitable[None]]


class JobCounts:
    """Jobs (each job of a frame counts as one) and pipeline events this worker is running now
    and has run since it started serving, for the ``pool_status`` answer. Counted around the
    handlers that run them: requests refused before (expired, replayed) are in the metrics only."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.ok = 0
        self.failed = 0

    def counted(self, handler: Handler) -> Handler:
        async def run(header: RequestHeader, plaintext: bytes) -> Answer:
            self.in_flight += 1
            failed = True
            try:
                answer = await handler(header, plaintext)
                failed = answer.status == "error"
                return answer
            finally:
                self.in_flight -= 1
                if failed:
                    self.failed += 1
                else:
                    self.ok += 1
        return run


class RequestHandlers:
    def __init__(self, ctx: WorkerContext, *, library: ModelLibrary, rotation: Rotation,
                 sessions: SessionCache, pipelines: PipelineLibrary, keyring: Keyring,
                 publish_result: ResultPublisher, rng: Callable[[int], bytes], batcher: Batcher,
                 ready: Callable[[], bool] | None = None) -> None:
        self._ctx = ctx
        # Whether the worker is ready (its readiness probe, Worker.ready), for pool_status. Without
        # it, a worker that answers at all is consuming, not draining (it would park the request)
        # and holds a key: it counts as ready.
        self._ready = ready or (lambda: keyring.has_keys)
        self._started = ctx.monotonic()  # handlers are built as the worker starts serving
        self.jobs = JobCounts()
        self._batcher = batcher
        self._library = library
        self._rotation = rotation
        self._pipelines = pipelines
        self._keyring = keyring
        self._publish_result = publish_result
        self._rng = rng
        # The sessions the worker opened: the producer key a session proved is kept (and
        # verified) only inside the exact sealed session it was proved for (see sessions.py).
        self._sessions = sessions
        self._limits = TensorLimits(max_tensor_bytes=ctx.config.max_tensor_bytes,
                                   max_total_bytes=ctx.config.max_message_bytes)
        self._handlers: dict[str, Handler] = {
            "job": self.jobs.counted(self._run_job),
            "job_frame": self._run_frame,
            "model_chunk": self._model_chunk,
            "model_delete": self._model_delete,
            "model_list": self._model_list,
            "pool_rotate": self._pool_rotate,
            "pipeline_put": self._pipeline_put,
            "pipeline_delete": self._pipeline_delete,
            "pipeline_list": self._pipeline_list,
            "event": self.jobs.counted(self._event),
            "pool_status": self._pool_status,
        }

    async def execute(self, header: RequestHeader, plaintext: bytes) -> Answer:
        handler = self._handlers.get(header.kind)
        try:
            if handler is None:
                raise JobRejected(f"request type {header.kind!r} is not supported", bodies.ErrorCode.UNSUPPORTED)
            return await handler(header, plaintext)
        except JobRejected as exc:
            return Answer.error(exc.code, str(exc))
        except OversizedMessage as exc:
            return Answer.error(bodies.ErrorCode.OVERSIZED, str(exc))
        except ProtocolError as exc:  # malformed body, bad tensor
            return Answer.error(bodies.ErrorCode.BAD_INPUT, str(exc))
        except Exception as exc:
            noisy.exception("internal error on job %s (%s)", header.job_id, type(exc).__name__)
            return Answer.error(bodies.ErrorCode.INTERNAL, f"internal worker error ({type(exc).__name__})")

    # -- handlers ------------------------------------------------------------------------------
    async def _run_job(self, header: RequestHeader, plaintext: bytes) -> Answer:
        model_id = _model_id(header)
        session = self._sessions.get(header)  # taken before get() may wait: the cache may evict it meanwhile
        model = await self._library.get(model_id)
        # Checked once the model is here: one still arriving when the job came has no manifest yet.
        if self._library.needs_producer_key(model_id):
            self._library.require_allowed(model_id, self._producer_key(header, session))
        inputs, outputs = bodies.decode_job(plaintext, self._limits)
        # Queued with the jobs waiting for the same model: it may run in one ONNX Runtime call
        # with them (see batcher.py); its result is encoded on the thread that ran it.
        body = await self._batcher.run(model, inputs, outputs, _encode_result)
        if len(body) > self._ctx.config.max_message_bytes:
            raise JobRejected(f"result of {len(body)} bytes exceeds {self._ctx.config.max_message_bytes}",
                              bodies.ErrorCode.OVERSIZED)
        return Answer("ok", bodies.TENSORS, body)

    async def _run_frame(self, header: RequestHeader, plaintext: bytes) -> Answer:
        """Run each job of a frame as if it had come alone (same session, model and deadline):
        each gets its own result or its own error, and one bad job fails alone."""
        max_bytes = self._ctx.config.max_message_bytes
        jobs = frames.decode_frame(plaintext, max_bytes=max_bytes)

        codes: dict[str, str] = {}

        async def one(job: frames.FramedJob) -> frames.FramedResult:
            answer = await self.execute(replace(header, kind="job", job_id=job.job_id), job.body)
            codes[job.job_id] = answer.code
            return frames.FramedResult(job.job_id, answer.status, answer.content_type, answer.body)

        results = list(await asyncio.gather(*(one(job) for job in jobs)))
        # The answer must fit in one message too. Results that do not are replaced, last first,
        # by a small error the producer answers by sending those jobs again, alone.
        budget = max_bytes - 4096
        size = sum(len(r.body) + len(r.job_id) + 64 for r in results)
        for i in range(len(results) - 1, -1, -1):
            if size <= budget:
                break
            full = Answer.error(bodies.ErrorCode.FRAME_FULL, "the frame's results exceed the message size limit; "
                                "send this job alone")
            size -= len(results[i].body) - len(full.body)
            results[i] = frames.FramedResult(results[i].job_id, full.status, full.content_type, full.body)
            codes[results[i].job_id] = bodies.ErrorCode.FRAME_FULL
        return Answer("ok", frames.JOB_RESULTS, frames.encode_frame_results(results),
                      job_codes=tuple(codes[job.job_id] for job in jobs))

    async def _model_chunk(self, header: RequestHeader, plaintext: bytes) -> Answer:
        ack = await self._library.receive_chunk(header, plaintext, max_message_bytes=self._ctx.config.max_message_bytes)
        return Answer("ok", bodies.ACK, ack)

    async def _model_delete(self, header: RequestHeader, plaintext: bytes) -> Answer:
        model_id = _model_id(header)
        await self._library.delete(model_id, plaintext)
        return Answer("ok", bodies.ACK, bodies.encode_ack(model_id, 0, True))

    async def _model_list(self, header: RequestHeader, plaintext: bytes) -> Answer:
        # Allow-listed models (their input/output signatures) only for producers that may run them.
        visible = self._library.list_for(lambda: self._producer_key(header, self._sessions.get(header)))
        return Answer("ok", bodies.MODELS, bodies.encode_models(visible))

    async def _pool_rotate(self, header: RequestHeader, plaintext: bytes) -> Answer:
        # Rotate only if the pool is still at the epoch this request was sealed to: a request
        # replayed (or broadcast) to every member then rotates the pool once, not once per member.
        epoch, retire_at_ms = await self._rotation.rotate_on_request(bodies.decode_rotate(plaintext),
                                                                     from_epoch=header.epoch)
        return Answer("ok", bodies.ROTATED, bodies.encode_rotated(epoch, retire_at_ms))

    async def _pool_status(self, header: RequestHeader, plaintext: bytes) -> Answer:
        # Broadcast: every member answers for itself. Nothing secret, no payloads, no job ids; the
        # model ids are those model_list shows this producer (an allow-listed model stays hidden
        # from producers not on its list, count included).
        visible = self._library.list_for(lambda: self._producer_key(header, self._sessions.get(header)))
        identity = self._ctx.identity
        status = bodies.MemberStatus(
            worker_id=self._ctx.worker_id, platform=identity.provider.platform, measurement=identity.measurement,
            epoch=self._keyring.epoch, model_count=len(visible), model_ids=tuple(m.model_id for m in visible),
            pipelines=len(self._pipelines.pipelines), jobs_in_flight=self.jobs.in_flight,
            max_jobs_in_flight=self._ctx.config.max_jobs_in_flight, jobs_ok=self.jobs.ok,
            jobs_failed=self.jobs.failed, uptime_seconds=max(0, int(self._ctx.monotonic() - self._started)),
            max_batch_rows=self._ctx.config.max_batch_rows, ready=self._ready())
        return Answer("ok", bodies.MEMBER_STATUS, bodies.encode_member_status(status))

    # -- pipelines ---------------------------------------------------------------------------------
    async def _pipeline_put(self, header: RequestHeader, plaintext: bytes) -> Answer:
        await self._pipelines.put(plaintext)
        return Answer("ok", bodies.EMPTY, b"\x80")

    async def _pipeline_delete(self, header: RequestHeader, plaintext: bytes) -> Answer:
        await self._pipelines.delete(plaintext)
        return Answer("ok", bodies.EMPTY, b"\x80")

    async def _pipeline_list(self, header: RequestHeader, plaintext: bytes) -> Answer:
        return Answer("ok", bodies.PIPELINES, bodies.encode_pipelines(self._pipelines.list()))

    async def _event(self, header: RequestHeader, plaintext: bytes) -> Answer:
        session = self._sessions.get(header)  # before anything may wait (see _run_job)
        pipeline_id, event_id, inputs = bodies.decode_event(plaintext, self._limits)
        signed = self._pipelines.get(pipeline_id)
        producer_key = self._producer_key(header, session)
        if not signed.spec.allows(producer_key):
            raise JobRejected(f"pipeline {pipeline_id} does not accept events from this producer",
                              bodies.ErrorCode.NOT_ALLOWED)
        outputs = await self._pipelines.run(signed.spec, inputs)
        if outputs is None:
            return Answer.done()  # the event does not match the pipeline's condition: no result
        # Sealed under the current epoch (what recipients attest), whatever epoch the event used.
        try:
            sealed = self._pipelines.seal(
                signed, event_id=event_id, publisher=producer_key or header.session_id, pool=self._ctx.pool,
                epoch=self._keyring.epoch, pool_private_key=self._keyring.current_private, outputs=outputs,
                rng=self._rng)
        except TensorError as exc:
            raise JobRejected(f"the pipeline produced an output enclaveq cannot carry: {exc}",
                              bodies.ErrorCode.UNSUPPORTED) from None
        try:
            await self._publish_result(signed.spec.sink_topic, Message(body=sealed, message_id=event_id),
                                       signed.spec.sink_exchange)
        except Unroutable:
            raise JobRejected(f"no inbox takes the results of pipeline {pipeline_id}; the result is dropped",
                              bodies.ErrorCode.UNSUPPORTED) from None
        return Answer.done()

    # -- producer keys -----------------------------------------------------------------------------
    def _producer_key(self, header: RequestHeader, session: OpenedSession | None) -> bytes | None:
        """The producer key that ``header``'s own sealed session proved (verified once per
        session, against exactly that sealed session and epoch). ``session`` is the one the
        worker opened for this request, taken from the cache before the handler yielded."""
        if header.producer_proof is None:
            return None
        if session is None:  # cannot happen: the worker opened it just before, without yielding
            raise JobRejected("this request's session is not open on this worker; send it again",
                              bodies.ErrorCode.NOT_ALLOWED)
        return session.producer_key(header.producer_proof)


def _encode_result(outputs: dict[str, np.ndarray]) -> bytes:
    try:
        return bodies.encode_tensors_body(outputs)
    except TensorError as exc:
        raise JobRejected(f"the model produced an output enclaveq cannot carry: {exc}",
                          bodies.ErrorCode.UNSUPPORTED) from None


def _model_id(header: RequestHeader) -> str:
    if header.model_id is None:  # the header parser requires one for these kinds
        raise MalformedMessage(f"{header.kind} without a model id")
    return header.model_id
