"""The enclave worker: the loop that takes deliveries from the broker and wires the parts that
own the pool's state.

One job's life: peek the cleartext header -> check it came on the channel its kind travels on
-> open the sealed session (cached) -> open the body with the header as associated data ->
refuse expired or replayed jobs -> run it (``request_handlers``) -> seal the result -> publish
it and wait for the broker's confirm -> only then ack the job, and remember it as answered
until its deadline (``replay_guard``, sealed to disk about once a second and at stop, so a
restart does not forget it). A crash anywhere before the ack means the broker redelivers the
job, and it runs again (it was never remembered); the producer drops the duplicate result if
the first one had already gone out. Nothing in this module logs payloads.

The parts, each owning its own state:

* :class:`~enclave_worker.keyring.Keyring` -- the pool keys by epoch (current, retiring);
* :class:`~enclave_worker.membership.Membership` -- founding, joining, admitting, catching up;
* :class:`~enclave_worker.rotation.Rotation` -- new epochs, announcements, erasure on time;
* :class:`~enclave_worker.model_library.ModelLibrary` -- models, owner manifests, sealed copies;
* :class:`~enclave_worker.model_sync.ModelSync` -- models to and from other members;
* :class:`~enclave_worker.request_handlers.RequestHandlers` -- what each request kind does;
* :class:`~enclave_worker.control.ControlChannel` -- what each control-channel message does;
* :class:`~enclave_worker.sessions.SessionCache` -- opened sessions: secrets, proved producer keys;
* :class:`~enclave_worker.replay_guard.SeenJobs` / ``SeenJournal`` -- jobs already answered;
* :class:`~enclave_worker.attester.Attester` -- statements and evidence about this worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from broker_adapters import BrokerAdapter, Delivery, Message, PoolSettings, Subscription, open_broker
from broker_adapters.errors import BrokerError, BrokerUnavailable, Unroutable
from broker_adapters.retry import publish_until_confirmed
from protocol import bodies, crypto
from protocol.envelope import RequestHeader, open_request, peek_request, seal_result
from protocol.errors import DecryptionFailed, ProtocolError
from protocol.handshake import Challenge, ControlError, EvidenceResponse, Statement
from protocol.pipeline import SignedPipeline
from protocol.routing import Route, route_for

from .attester import Attester
from .budget import noisy
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
from .batcher import Batcher, BatchSettings
from .rotation import DEFAULT_ROTATION_GRACE_SECONDS, Rotation
from .pipelines import PipelineLibrary
from .replay_guard import SeenJobs, SeenJournal, job_key
from .sealed_state import PoolKeys, SealedState
from .sessions import SessionCache

log = logging.getLogger("enclaveq.worker")

Clock = Callable[[], float]

# How often the worker seals newly answered jobs and expires idle uploads.
HOUSEKEEPING_SECONDS = 1.0
# How long a new pipeline's stream is retried while the broker is unreachable (then the
# definition is refused, and rolled back: see PipelineLibrary.put).
_STREAM_RETRY_SECONDS = 30.0
# How long a result the broker refuses (or cannot take: connection lost) is published again
# before the job is handed back to the queue.
_REPLY_RETRY_SECONDS = 30.0
# In the pool's state directory: held (flock) by the one worker using that directory.
STATE_LOCK_FILE = "worker.lock"


class StateDirLock:
    """One worker at a time per state directory: an exclusive advisory lock (``flock``) on
    ``STATE_DIR/<pool>/worker.lock``, taken before the worker reads its sealed state and held
    until it stops (released by :meth:`release`, or by the kernel when the process dies). Two
    workers writing the same ``pool.sealed`` and models would overwrite each other's state.

    The file is opened without following a symlink, mode 0600, and holds the holder's pid (for
    the refusal message only: the lock, not the pid, is what decides). ``flock`` locks belong to
    an open file, so a second worker in the same process is refused as well."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / STATE_LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`WorkerStartupError` saying who holds it or why it cannot be taken."""
        if self._fd is not None:
            return
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            why = "it is a symbolic link, which a worker never follows" if exc.errno == errno.ELOOP else (
                exc.strerror or type(exc).__name__)
            raise WorkerStartupError(f"the state directory's lock file {self.path} cannot be used ({why}); "
                                     "remove it, or give the worker another --state-dir") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise WorkerStartupError(f"the state directory's lock file {self.path} is not a regular file; "
                                         "remove it, or give the worker another --state-dir")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WorkerStartupError(
                    f"state directory {self.path.parent} is in use by another worker{self._holder(fd)}; "
                    "give each worker its own --state-dir") from None
            with contextlib.suppress(OSError):  # a lock file left with a wider mode (not ours to change: kept)
                os.fchmod(fd, 0o600)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            return ""
        return f" (pid {pid})" if pid.isdigit() else ""

    def release(self) -> None:
        """Give the lock up (idempotent): closing its only descriptor releases the flock."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class Worker:
    def __init__(self, *, broker_url: str, pool: str, identity: WorkerIdentity, state_dir: Path,
                 config: WorkerConfig = DEFAULT_WORKER_CONFIG, clock: Clock = time.time,
                 rng: crypto.Random = os.urandom, worker_id: str | None = None,
                 metrics: WorkerMetrics | None = None, prefetch: int | None = None,
                 rotate_every: float | None = None,
                 rotation_grace: float = DEFAULT_ROTATION_GRACE_SECONDS,
                 monotonic: Clock = time.monotonic) -> None:
        self.pool = pool
        self.config = config
        self.identity = identity
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.metrics = metrics or WorkerMetrics()
        self._rng = rng
        self._prefetch = prefetch or max(2 * config.max_jobs_in_flight, 16)
        self._broker: BrokerAdapter = open_broker(broker_url)
        ctx = self._ctx = WorkerContext(broker=self._broker, pool=pool, worker_id=self.worker_id, identity=identity,
                                        config=config, clock=clock, monotonic=monotonic)
        self.sealed_state = SealedState(state_dir, pool, identity.sealing_key, identity.seal, identity.unseal)
        self._state_lock = StateDirLock(self.sealed_state.dir)
        self._sessions = SessionCache(pool)
        self._seen = SeenJobs()
        self._journal = SeenJournal(self.sealed_state)
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
        self.metrics.watch_refusals(self._refusals)
        self._subs: list[Subscription] = []
        self._streams: dict[str, Subscription] = {}  # pipeline id -> its event stream's consumer
        self.pipelines: PipelineLibrary | None = None
        self._slots = asyncio.Semaphore(config.max_jobs_in_flight)
        self._batcher = Batcher(BatchSettings(max_batch_rows=config.max_batch_rows,
                                              max_queue_delay_us=config.max_queue_delay_us,
                                              preferred_batch_rows=config.preferred_batch_rows),
                                on_batch=self.metrics.batch_rows.observe, on_inference=self.metrics.inference.observe)
        self.metrics.watch_attestations(lambda: self._attester.answered)
        self.metrics.watch_state(in_flight=lambda: self._active,
                                 models=lambda: len(self.models.list()) if self.models is not None else 0,
                                 epoch=lambda: self.keyring.epoch if self.keyring.has_keys else 0)
        self._draining = False
        self._stopped = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = asyncio.Event()
        # Cleared while the state directory cannot be written (disk full, read-only): jobs and
        # events then wait unrun (see _serve), since their answers could not be made durable.
        self._state_writable = asyncio.Event()
        self._state_writable.set()
        self._housekeeper: asyncio.Task[None] | None = None

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
    def ready(self) -> bool:
        """Joined its pool with a key and consuming jobs, and not draining (readiness probes)."""
        return (self.consuming and self.keyring.has_keys and not self._draining
                and self._state_writable.is_set())

    @property
    def consuming(self) -> bool:
        """Whether this worker consumes the pool's queues (a refused worker never does)."""
        return bool(self._subs)

    def cached_session_epochs(self) -> set[int]:
        return self._sessions.epochs()

    def _refusals(self) -> dict[str, float]:
        """What hostile or stale traffic this worker turned away, by reason (for the metrics)."""
        counts: dict[str, float] = {
            "control_oversized": self._control.dropped_oversized,
            "replay_entries_evicted": self._seen.evicted,
            "log_lines_left_out": noisy.suppressed_total,
        }
        if self._model_sync is not None:
            counts.update({f"model_sync_{reason}": n for reason, n in self._model_sync.refused.items()})
        return counts

    def remembered_jobs(self) -> int:
        """How many answered jobs this worker refuses to run again (bounded; tests check it)."""
        return len(self._seen)

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
            self.sealed_state.ensure_usable()
        except SealedStateError as exc:
            raise WorkerStartupError(str(exc)) from None
        # Held until stop(): before anything reads or writes the pool's sealed state.
        self._state_lock.acquire()
        try:
            try:
                models = ModelLibrary(self.sealed_state, max_model_bytes=self.config.max_model_bytes,
                                      intra_op_threads=self.config.intra_op_threads,
                                      custom_op_domains=self.config.custom_op_domains, clock=self._ctx.clock)
                sealed = self.sealed_state.load_pool_keys()
            except SealedStateError as exc:
                raise WorkerStartupError(str(exc)) from None
            # The jobs answered before a restart.
            self._seen.restore(await asyncio.to_thread(self._journal.load, self._ctx.now_ms()), self._ctx.now_ms())
            await self._broker.connect()
        except BaseException:
            self._state_lock.release()
            raise
        try:
            await self._broker.declare_pool(self.pool, PoolSettings(max_message_bytes=self.config.max_message_bytes))
            self.keyring.adopt(await self._membership.obtain_keys(sealed))
            models.load_sealed()
            self.models = models
            self._model_sync = ModelSync(self._ctx, keyring=self.keyring, library=models)
            self.pipelines = PipelineLibrary(self.sealed_state, models=models, on_installed=self._serve_pipeline,
                                             on_removed=self._stop_pipeline, clock=self._ctx.clock)
            self.pipelines.load_sealed()
            await self.pipelines.check_restored()
            self._handlers = RequestHandlers(self._ctx, library=models, rotation=self._rotation,
                                             sessions=self._sessions, pipelines=self.pipelines, keyring=self.keyring,
                                             publish_result=self._publish_result, rng=self._rng,
                                             batcher=self._batcher, ready=lambda: self.ready)
            self._control.serve_model_sync(self._model_sync)
            if self.identity.can_join:
                await self._model_sync.fetch_missing(self._membership.admitted_by)
            self._subs.append(await self._broker.consume_control(self.pool, self._control.on_message))
            self._subs.append(await self._broker.consume_jobs(self.pool, self._on_job, prefetch=self._prefetch))
            for signed in self.pipelines.pipelines.values():
                await self._serve_pipeline(signed)
        except BaseException:
            try:
                await self._membership.release()
                await self._broker.close()
            finally:
                self._state_lock.release()
            raise
        self._broker.on_reconnect(self._after_reconnect)
        self._rotation.start()
        self._housekeeper = asyncio.create_task(self._housekeeping())
        log.info("worker %s serving pool %r (epoch %d, %d models)", self.worker_id, self.pool,
                 self.keyring.epoch, len(models.list()))

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Finish in-flight jobs, hand the rest back to the queue, disconnect. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._draining = True
            self._rotation.stop()
            try:
                await asyncio.wait_for(self._idle.wait(), drain_timeout)
            except TimeoutError:
                log.warning("stopping with %d jobs still running; the broker will redeliver them", self._active)
            for sub in [*self._streams.values(), *reversed(self._subs)]:
                try:
                    await sub.cancel()
                except Exception:  # best effort: closing the connection cancels it anyway
                    pass
            self._subs.clear()
            self._streams.clear()
            self._stopping.set()
            if self._housekeeper is not None:
                await self._housekeeper  # its last round seals the jobs answered until now
            self._batcher.close()
            await self._membership.release()
            await self._broker.close()
        finally:
            self._state_lock.release()  # the state directory is free for the next worker

    async def _after_reconnect(self) -> None:
        """The broker connection dropped and came back: broadcasts sent meanwhile (uploads,
        deletes, allow-list changes, epoch announcements) never reached this worker's control
        queue. Catch up exactly as at a restart: current keys, then a model sync."""
        self.metrics.reconnects.inc()
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

    async def _housekeeping(self) -> None:
        """About once a second: seal the jobs answered since the last round (so that a restart
        still refuses their replays), and drop uploads idle for too long. A last round at stop."""
        while True:
            try:
                await asyncio.wait_for(self._stopping.wait(), HOUSEKEEPING_SECONDS)
            except TimeoutError:
                pass
            try:
                if self.models is not None:
                    self.models.expire_uploads()
                await self._seal_answered()
            except Exception:  # a bug here must not end the rounds, nor make stop() fail
                log.exception("a housekeeping round failed")
            if self._stopping.is_set():
                return

    async def _seal_answered(self) -> None:
        fresh = self._seen.take_fresh()
        try:
            if fresh or self._journal.segments:
                # Off the event loop: sealing and fsync. Costs O(jobs answered since the last round).
                await asyncio.to_thread(self._journal.flush, fresh, self._ctx.now_ms())
            elif not self._state_writable.is_set():
                await asyncio.to_thread(self.sealed_state.ensure_usable)  # nothing to seal: probe
        except (OSError, SealedStateError) as exc:
            self._seen.give_back_fresh(fresh)
            if self._state_writable.is_set():
                self._state_writable.clear()
                log.warning("the state directory cannot be written (%s): taking no jobs until it can (they wait "
                            "unrun, on this worker or in the queue); retrying every %g s", exc, HOUSEKEEPING_SECONDS)
            return
        if not self._state_writable.is_set():
            self._state_writable.set()
            log.warning("the state directory is writable again: taking jobs")

    # -- jobs -------------------------------------------------------------------------------------
    async def _on_job(self, delivery: Delivery) -> None:
        await self._serve(delivery, Route.JOBS)

    # -- pipelines: each one's event stream -------------------------------------------------------
    async def _serve_pipeline(self, signed: SignedPipeline) -> None:
        """Consume a pipeline's events (its stream is declared idempotently: the owner's client
        declared it before sending the definition, and a worker restarting does it again)."""
        pid = signed.pipeline_id
        if pid in self._streams or self._stopped:
            return
        # A connection lost meanwhile (a broker restart, an MQTT session taken over mid-subscribe)
        # is retried for a while: both calls are idempotent, and failing would make the owner's
        # whole definition fail for a moment's outage.
        deadline = time.monotonic() + _STREAM_RETRY_SECONDS
        delay = 0.2
        while True:
            try:
                await self._broker.declare_stream(self.pool, pid, signed.spec.source_topic,
                                                  PoolSettings(max_message_bytes=self.config.max_message_bytes),
                                                  exchange=signed.spec.source_exchange)
                self._streams[pid] = await self._broker.consume_stream(self.pool, pid, self._on_event,
                                                                       prefetch=self._prefetch)
                return
            except BrokerUnavailable as exc:
                if time.monotonic() + delay > deadline or self._stopped:
                    raise
                log.warning("pipeline %s: cannot consume its events yet (%s); retrying", pid, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _publish_result(self, topic: str, message: Message, exchange: str) -> None:
        await self._broker.publish_result(topic, message, exchange=exchange)

    async def _stop_pipeline(self, pipeline_id: str) -> None:
        sub = self._streams.pop(pipeline_id, None)
        if sub is not None:
            await sub.cancel()

    async def _on_event(self, delivery: Delivery) -> None:
        await self._serve(delivery, Route.STREAM)

    async def _serve_broadcast(self, delivery: Delivery) -> None:
        # Model uploads and deletes are broadcast so that every worker of the pool gets them;
        # they are sealed requests like any job, answered on the producer's reply queue.
        await self._serve(delivery, Route.BROADCAST)

    async def _serve(self, delivery: Delivery, route: Route) -> None:
        if self._draining:
            return await self._park()
        delivered = time.perf_counter()
        if route is not Route.BROADCAST and not self._state_writable.is_set():
            # Held, not run and not handed back: a nack would count against the job's delivery
            # limit every round until it is dead-lettered. Held deliveries fill this worker's
            # prefetch, so the broker sends the rest of the queue to workers that can take it;
            # they run here once the state directory is writable again.
            self.metrics.held.inc()
            try:
                while not self._state_writable.is_set():
                    if self._draining:
                        return await self._park()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._state_writable.wait(), 0.5)
            finally:
                self.metrics.held.dec()
        async with self._slots:
            if self._draining:
                return await self._park()
            self.metrics.queueing.observe(time.perf_counter() - delivered)
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
        caught_up = False
        try:
            try:
                session_key = self._sessions.open(header, self.keyring).secret
            except EpochAhead:
                # We missed a rotation: fetch the current keys from a member, then try again. The
                # epoch is an unauthenticated claim, so the catch-ups it may start are budgeted.
                caught_up = await self._membership.catch_up(join_in_flight=False)
                session_key = self._sessions.open(header, self.keyring).secret
        except EpochAhead:
            noisy.warning("job %s is sealed to epoch %d, newer than ours (%d); handing it back", header.job_id,
                        header.epoch, self.keyring.epoch)
            self.metrics.requests.labels(header.kind, "epoch_ahead").inc()
            if caught_up:
                # The members had nothing newer just now: give them a moment before the next try.
                # Only the job that started a catch-up waits (a few per catch-up budget); others go
                # back at once, so a flood of jobs claiming a future epoch cannot hold the slots.
                await asyncio.sleep(0.5)
            await delivery.nack()
            return
        except EpochRetired:
            return await self._stale_epoch(delivery, header)
        except DecryptionFailed:
            return await self._dead_letter(
                delivery, "session", f"job {header.job_id}: session sealed to epoch {header.epoch} does not open "
                f"with this pool's epoch-{self.keyring.epoch} key")
        replay_key = job_key(header.session_id, header.job_id)
        now_ms = self._ctx.now_ms()
        try:
            plaintext = open_request(sealed, header, session_key)
        except DecryptionFailed:
            answer = Answer.error(bodies.ErrorCode.DOES_NOT_OPEN, "the request does not open: it was modified after sealing")
            await self._reply(delivery, header, session_key, answer)
            return
        if self._seen.running(replay_key):
            await self._seen.wait_while_running(replay_key)
        if self._seen.contains(replay_key):
            # Already answered: a redelivery after a lost ack, or a replay, possibly recorded
            # before this worker restarted. Never run it twice.
            noisy.debug("job %s already answered; dropping the duplicate", header.job_id)
            self.metrics.requests.labels(header.kind, "duplicate").inc()
            await delivery.ack()
            return
        self._seen.start(replay_key)
        answered = False
        try:
            if header.deadline_ms < now_ms:
                answer = Answer.error(bodies.ErrorCode.EXPIRED, "the job's deadline passed before it ran")
            else:
                assert self._handlers is not None  # consuming starts after start() built them
                answer = await self._handlers.execute(header, plaintext)
            answered = await self._reply(delivery, header, session_key, answer)
        finally:
            # Remembered only once its answer went out: a job whose result was never published
            # (not confirmed and handed back, or the worker stopped or died first) runs again when
            # it is redelivered. (Not ``delivery.settled``: a job handed back is settled too.)
            self._seen.finish(replay_key, header.deadline_ms, now_ms, answered=answered)

    async def _reply(self, delivery: Delivery, header: RequestHeader, session_key: crypto.SessionSecret,
                     answer: Answer) -> bool:
        """Publish the sealed answer, then settle the job. True when the job is done with (its
        answer confirmed, or dead-lettered); False when it was handed back to run again."""
        if answer.silent:
            self.metrics.requests.labels(header.kind, "ok").inc()
            await delivery.ack()
            return True
        code = answer.code
        if code != "ok":
            noisy.debug("request %s (%s) refused: %s", header.job_id, header.kind, code)
        self.metrics.requests.labels(header.kind, code).inc()
        for job_code in answer.job_codes:  # a frame's jobs count as the jobs they are
            self.metrics.requests.labels("job", job_code).inc()
        result = seal_result(session_key, header, answer.status, answer.content_type, answer.body, rng=self._rng,
                             current_epoch=self.keyring.epoch)
        reply = Message(body=result, correlation_id=header.job_id, message_id=header.job_id)
        try:
            # A refusal or a lost connection is retried while the job is held: handing it back
            # at once would spend its delivery attempts (dead-lettering it) on a broker hiccup,
            # such as a reply queue electing a new leader.
            await publish_until_confirmed(lambda: self._broker.publish_reply(header.reply_to, reply),
                                          deadline=asyncio.get_running_loop().time() + _REPLY_RETRY_SECONDS,
                                          what=f"the result of job {header.job_id}", log=log, level=logging.DEBUG)
        except Unroutable:
            await self._dead_letter(delivery, "no_reply_queue",
                                    f"job {header.job_id}: reply queue is gone; the result is dropped")
            return True
        except BrokerError as exc:
            noisy.warning("result of job %s not confirmed (%s); the job goes back to the queue", header.job_id, exc)
            await delivery.nack()
            return False
        await delivery.ack()
        return True

    async def _dead_letter(self, delivery: Delivery, reason: str, detail: str) -> None:
        noisy.warning("dead-lettering a request: %s", detail)
        self.metrics.dead_lettered.labels(reason).inc()
        await delivery.reject()

    async def _stale_epoch(self, delivery: Delivery, header: RequestHeader) -> None:
        """A job sealed to an erased epoch can never be opened again. Tell its producer, in clear
        (there is no key left to seal with, and the notice holds nothing secret), so the SDK
        re-attests and sends it again; then drop it."""
        noisy.debug("job %s is sealed to retired epoch %d; asking its producer to re-attest", header.job_id,
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
            noisy.warning("could not tell the producer of job %s to re-attest (%s)", header.job_id, exc)
            await delivery.nack()
            return
        await delivery.ack()


__all__ = ["Worker", "WorkerIdentity", "EvidenceProvider"]
