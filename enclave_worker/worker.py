"""The enclave worker: the loop that takes deliveries from the broker and wires the parts that
own the pool's state.

One job's life: peek the cleartext header -> check it came on the channel its kind travels on
-> open the sealed session (cached) -> open the body with the header as associated data ->
refuse expired or replayed jobs -> run it (``request_handlers``) -> seal the result -> publish
it and wait for the broker's confirm -> only then ack the job. A crash anywhere before the ack
means the broker redelivers the job; the producer drops the duplicate result if the first one
had already gone out. Nothing in this module logs payloads.

The parts, each owning its own state:

* :class:`~enclave_worker.keyring.Keyring` -- the pool keys by epoch (current, retiring);
* :class:`~enclave_worker.membership.Membership` -- founding, joining, admitting, catching up;
* :class:`~enclave_worker.rotation.Rotation` -- new epochs, announcements, erasure on time;
* :class:`~enclave_worker.model_library.ModelLibrary` -- models, owner manifests, sealed copies;
* :class:`~enclave_worker.model_sync.ModelSync` -- models to and from other members;
* :class:`~enclave_worker.request_handlers.RequestHandlers` -- what each request kind does;
* :class:`~enclave_worker.control.ControlChannel` -- what each control-channel message does;
* :class:`~enclave_worker.sessions.SessionCache` / ``SeenJobs`` -- per-session secrets, replays;
* :class:`~enclave_worker.attester.Attester` -- statements and evidence about this worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from broker_adapters import BrokerAdapter, Delivery, Message, PoolSettings, Subscription, open_broker
from broker_adapters.errors import BrokerError, Unroutable
from protocol import bodies, crypto
from protocol.envelope import RequestHeader, open_request, peek_request, seal_result
from protocol.errors import DecryptionFailed, ProtocolError
from protocol.handshake import Challenge, ControlError, EvidenceResponse, Statement
from protocol.routing import Route, route_for

from .attester import Attester
from .config import DEFAULT_WORKER_CONFIG, WorkerConfig
from .control import ControlChannel
from .context import WorkerContext
from .errors import SealedStateError, WorkerStartupError
from .identity import EvidenceProvider, WorkerIdentity
from .keyring import EpochAhead, EpochRetired, Keyring
from .membership import Membership
from .metrics import WorkerMetrics
from .model_library import ModelLibrary
from .model_sync import ModelSync
from .request_handlers import Answer, RequestHandlers
from .rotation import DEFAULT_ROTATION_GRACE_SECONDS, Rotation
from .sealed_state import PoolKeys, SealedState
from .sessions import SeenJobs, SessionCache

log = logging.getLogger("enclaveq.worker")

Clock = Callable[[], float]


class Worker:
    def __init__(self, *, broker_url: str, pool: str, identity: WorkerIdentity, state_dir: Path,
                 config: WorkerConfig = DEFAULT_WORKER_CONFIG, clock: Clock = time.time,
                 rng: crypto.Random = os.urandom, worker_id: str | None = None,
                 metrics: WorkerMetrics | None = None, prefetch: int | None = None,
                 rotate_every: float | None = None,
                 rotation_grace: float = DEFAULT_ROTATION_GRACE_SECONDS) -> None:
        self.pool = pool
        self.config = config
        self.identity = identity
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.metrics = metrics or WorkerMetrics()
        self._rng = rng
        self._prefetch = prefetch or max(2 * config.max_jobs_in_flight, 16)
        self._broker: BrokerAdapter = open_broker(broker_url)
        ctx = self._ctx = WorkerContext(broker=self._broker, pool=pool, worker_id=self.worker_id, identity=identity,
                                        config=config, clock=clock)
        self.sealed_state = SealedState(state_dir, pool, identity.sealing_key, identity.seal, identity.unseal)
        self._sessions = SessionCache(pool)
        self._seen = SeenJobs()
        self.keyring = Keyring(self.sealed_state, ctx.now_ms, on_erase=self._sessions.forget_epochs)
        self._attester = Attester(ctx, keyring=self.keyring)
        self._membership = Membership(ctx, keyring=self.keyring, attester=self._attester)
        self._rotation = Rotation(ctx, keyring=self.keyring, attester=self._attester,
                                  catch_up=self._membership.catch_up, every=rotate_every, grace=rotation_grace)
        self.models: ModelLibrary | None = None  # opened at start: it reads sealed state
        self._model_sync: ModelSync | None = None
        self._handlers: RequestHandlers | None = None
        self._control = ControlChannel(ctx, attester=self._attester, membership=self._membership,
                                       rotation=self._rotation, serve_broadcast=self._serve_broadcast)
        self._subs: list[Subscription] = []
        self._slots = asyncio.Semaphore(config.max_jobs_in_flight)
        self._draining = False
        self._stopped = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- what others may look at ---------------------------------------------------------------
    @property
    def keys(self) -> PoolKeys | None:
        """The pool keys this worker serves with (None before it has any)."""
        return self.keyring.keys if self.keyring.has_keys else None

    @property
    def pool_public_key(self) -> bytes:
        return self.keyring.public_key

    @property
    def identity_public_key(self) -> bytes:
        return self.keyring.identity_public_key

    @property
    def consuming(self) -> bool:
        """Whether this worker consumes the pool's queues (a refused worker never does)."""
        return bool(self._subs)

    def cached_session_epochs(self) -> set[int]:
        return self._sessions.epochs()

    def statement(self, nonce: bytes) -> Statement:
        return self._attester.statement(nonce)

    def answer_challenge(self, challenge: Challenge) -> EvidenceResponse:
        return self._attester.answer(challenge)

    async def rotate(self, grace_seconds: float) -> tuple[int, int]:
        """Rotate the pool key now (see :class:`~enclave_worker.rotation.Rotation`)."""
        return await self._rotation.rotate(grace_seconds)

    def erase_retired(self) -> list[int]:
        return self.keyring.erase_retired()

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            models = ModelLibrary(self.sealed_state, max_model_bytes=self.config.max_model_bytes,
                                  intra_op_threads=self.config.intra_op_threads)
            sealed = self.sealed_state.load_pool_keys()
        except SealedStateError as exc:
            raise WorkerStartupError(str(exc)) from None
        await self._broker.connect()
        try:
            await self._broker.declare_pool(self.pool, PoolSettings(max_message_bytes=self.config.max_message_bytes))
            self.keyring.adopt(await self._membership.obtain_keys(sealed))
            models.load_sealed()
            self.models = models
            self._model_sync = ModelSync(self._ctx, keyring=self.keyring, library=models)
            self._handlers = RequestHandlers(self._ctx, library=models, rotation=self._rotation)
            self._control.serve_model_sync(self._model_sync)
            if self.identity.can_join:
                await self._model_sync.fetch_missing(self._membership.admitted_by)
            self._subs.append(await self._broker.consume_control(self.pool, self._control.on_message))
            self._subs.append(await self._broker.consume_jobs(self.pool, self._on_job, prefetch=self._prefetch))
        except BaseException:
            await self._membership.release()
            await self._broker.close()
            raise
        self._broker.on_reconnect(self._after_reconnect)
        self._rotation.start()
        log.info("worker %s serving pool %r (epoch %d, %d models)", self.worker_id, self.pool,
                 self.keyring.epoch, len(models.list()))

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Finish in-flight jobs, hand the rest back to the queue, disconnect. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._draining = True
        self._rotation.stop()
        try:
            await asyncio.wait_for(self._idle.wait(), drain_timeout)
        except TimeoutError:
            log.warning("stopping with %d jobs still running; the broker will redeliver them", self._active)
        for sub in reversed(self._subs):
            try:
                await sub.cancel()
            except Exception:  # best effort: closing the connection cancels it anyway
                pass
        self._subs.clear()
        await self._membership.release()
        await self._broker.close()

    async def _after_reconnect(self) -> None:
        """The broker connection dropped and came back: broadcasts sent meanwhile (uploads,
        deletes, allow-list changes, epoch announcements) never reached this worker's control
        queue. Catch up exactly as at a restart: current keys, then a model sync."""
        if not self.identity.can_join or self._stopped or self._model_sync is None:
            return
        for attempt in range(3):
            if self._stopped:
                return
            try:
                log.info("reconnected to the broker: catching up on what pool %r broadcast meanwhile", self.pool)
                await self._membership.catch_up()
                await self._model_sync.fetch_missing(self._membership.admitted_by)
                return
            except BrokerError as exc:
                log.warning("catching up after a reconnect failed (%s); retrying", exc)
                await asyncio.sleep(1.0 + attempt)

    # -- jobs -------------------------------------------------------------------------------------
    async def _on_job(self, delivery: Delivery) -> None:
        await self._serve(delivery, Route.JOBS)

    async def _serve_broadcast(self, delivery: Delivery) -> None:
        # Model uploads and deletes are broadcast so that every worker of the pool gets them;
        # they are sealed requests like any job, answered on the producer's reply queue.
        await self._serve(delivery, Route.BROADCAST)

    async def _serve(self, delivery: Delivery, route: Route) -> None:
        if self._draining:
            return await self._park()
        async with self._slots:
            if self._draining:
                return await self._park()
            self._active += 1
            self._idle.clear()
            started = time.perf_counter()
            try:
                await self._handle(delivery, route)
                self.metrics.latency.observe(time.perf_counter() - started)
            finally:
                self._active -= 1
                if self._active == 0:
                    self._idle.set()

    async def _park(self) -> None:
        """Hold a delivery that arrived while draining until ``stop()`` cancels the consumer.

        Nacking it at once would hand it straight back to this same consumer (its prefetch is
        still open), over and over, each time counting against the queue's delivery limit
        until the job is dead-lettered. Once the consumer is cancelled, the adapter returns
        parked deliveries and the broker gives them to another worker.
        """
        await asyncio.Event().wait()

    async def _handle(self, delivery: Delivery, route: Route) -> None:
        try:
            sealed, header = peek_request(delivery.message.body, max_bytes=self.config.max_message_bytes)
        except ProtocolError as exc:
            return await self._dead_letter(delivery, "malformed", f"malformed envelope ({exc})")
        if route_for(header.kind) is not route:
            # protocol.routing decides where each kind travels; a request on the other channel was
            # moved there (a broadcast job would run on every worker): refuse it unopened.
            return await self._dead_letter(delivery, "misrouted",
                                           f"job {header.job_id}: a {header.kind} request arrived on the {route} channel")
        try:
            try:
                session_key = self._sessions.secret_for(header, self.keyring)
            except EpochAhead:
                # We missed a rotation: fetch the current keys from a member, then try again.
                await self._membership.catch_up()
                session_key = self._sessions.secret_for(header, self.keyring)
        except EpochAhead:
            log.warning("job %s is sealed to epoch %d, newer than ours (%d); handing it back", header.job_id,
                        header.epoch, self.keyring.epoch)
            await asyncio.sleep(0.5)
            await delivery.nack()
            return
        except EpochRetired:
            return await self._stale_epoch(delivery, header)
        except DecryptionFailed:
            return await self._dead_letter(
                delivery, "session", f"job {header.job_id}: session sealed to epoch {header.epoch} does not open "
                f"with this pool's epoch-{self.keyring.epoch} key")
        replay_key = (header.session_id, header.job_id)
        now_ms = self._ctx.now_ms()
        try:
            plaintext = open_request(sealed, header, session_key)
        except DecryptionFailed:
            answer = Answer.error(bodies.ErrorCode.DOES_NOT_OPEN, "the request does not open: it was modified after sealing")
            return await self._reply(delivery, header, session_key, answer)
        if self._seen.contains(replay_key):
            # Already answered: a redelivery after a lost ack, or a replay. Never answer twice.
            log.info("job %s already answered; dropping the duplicate", header.job_id)
            self.metrics.requests.labels(header.kind, "duplicate").inc()
            await delivery.ack()
            return
        if header.deadline_ms < now_ms:
            answer = Answer.error(bodies.ErrorCode.EXPIRED, "the job's deadline passed before it ran")
        else:
            assert self._handlers is not None  # consuming starts after start() built them
            answer = await self._handlers.execute(header, plaintext)
        await self._reply(delivery, header, session_key, answer)
        if delivery.settled:
            self._seen.add(replay_key, header.deadline_ms, now_ms)

    async def _reply(self, delivery: Delivery, header: RequestHeader, session_key: crypto.SessionSecret,
                     answer: Answer) -> None:
        code = answer.code
        if code != "ok":
            log.info("request %s (%s) refused: %s", header.job_id, header.kind, code)
        self.metrics.requests.labels(header.kind, code).inc()
        result = seal_result(session_key, header, answer.status, answer.content_type, answer.body, rng=self._rng,
                             current_epoch=self.keyring.epoch)
        try:
            await self._broker.publish_reply(header.reply_to, Message(body=result, correlation_id=header.job_id))
        except Unroutable:
            return await self._dead_letter(delivery, "no_reply_queue",
                                           f"job {header.job_id}: reply queue is gone; the result is dropped")
        except BrokerError as exc:
            log.warning("result of job %s not confirmed (%s); the job goes back to the queue", header.job_id, exc)
            await delivery.nack()
            return
        await delivery.ack()

    async def _dead_letter(self, delivery: Delivery, reason: str, detail: str) -> None:
        log.warning("dead-lettering a request: %s", detail)
        self.metrics.dead_lettered.labels(reason).inc()
        await delivery.reject()

    async def _stale_epoch(self, delivery: Delivery, header: RequestHeader) -> None:
        """A job sealed to an erased epoch can never be opened again. Tell its producer, in clear
        (there is no key left to seal with, and the notice holds nothing secret), so the SDK
        re-attests and sends it again; then drop it."""
        log.info("job %s is sealed to retired epoch %d; asking its producer to re-attest", header.job_id,
                 header.epoch)
        self.metrics.requests.labels(header.kind, "stale_epoch").inc()
        notice = ControlError(code="stale_epoch", message=f"epoch {header.epoch} of pool {self.pool!r} is retired; "
                              f"the current epoch is {self.keyring.epoch}: attest again")
        try:
            await self._broker.publish_reply(header.reply_to, Message(body=notice.to_bytes(),
                                                                      correlation_id=header.job_id))
        except Unroutable:
            return await self._dead_letter(delivery, "no_reply_queue", f"job {header.job_id}: reply queue is gone")
        except BrokerError as exc:
            log.warning("could not tell the producer of job %s to re-attest (%s)", header.job_id, exc)
            await delivery.nack()
            return
        await delivery.ack()


__all__ = ["Worker", "WorkerIdentity", "EvidenceProvider"]
