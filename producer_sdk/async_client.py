"""AsyncClient: the producer SDK on asyncio, over the I/O-free ``ProducerCore``.

Connecting does nothing but attest: the client sends a fresh nonce on the pool's control
channel and verifies the answer against the policy before any request is sealed. Results
arrive on the producer's own durable reply queue and are matched to requests by job id;
a result is accepted once, duplicates and unopenable messages are dropped.

Pipelines (docs/pipelines.md): ``create_pipeline`` uploads the stage models the pool lacks,
declares the pipeline's event stream and every recipient's inbox, then sends the owner-signed
definition; ``list_pipelines`` and ``delete_pipeline`` complete the set. Events are sent by
:class:`producer_sdk.events.AsyncEventPublisher`, which drives this class: an event is
published on its topic and nothing comes back on success, so the client keeps, per event in
flight, just enough to report a failure the worker sends back or to seal it again after a key
rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation.collateral_source import CollateralDir, with_collateral
from attestation.policy import load_policy
from attestation.claims import Claims
from attestation.verify import verify_evidence
from broker_adapters import BrokerAdapter, Delivery, Message, Subscription, open_broker, redact_url
from broker_adapters.errors import BrokerError, BrokerUnavailable, QueueNotFound, Unroutable
from broker_adapters.retry import publish_until_confirmed
from protocol import bodies, crypto
from protocol.errors import ProtocolError
from protocol.frames import FramedJob
from protocol.handshake import Statement
from protocol.routing import Route
from protocol.ownership import generate_signing_key, load_signing_key, parse_public_key, public_key_bytes
from protocol.pipeline import (
    ModelSignature, PipelineError, PipelineSpec, check_stage_mapping, load_pipeline_toml, pipeline_id,
    sign_pipeline, sign_pipeline_delete,
)

from .core import AttestationAnswer, Outcome, ProducerCore, Reply, Request, StaleEpochNotice, inbox_name
from .epochs import EpochState, marks_for
from .framing import Frame, FramePacker, FrameSettings
from .journal import BatchJournal, ResumePlan, SentRequest
from .errors import (AttestationFailed, BrokerUnreachable, ClientClosed, EnclaveqError, JobError, JobTimeout,
                     ModelRejected, NoWorkerAnswered, PipelineRejected, UnknownModel, UnknownPipeline)

log = logging.getLogger("enclaveq.producer")

Progress = Callable[[int, int], None]
# An Ed25519 private key, or the path of a key file made by `enclaveq keys generate`.
KeyLike = Ed25519PrivateKey | str | os.PathLike[str]
# Collateral for hardware evidence: a fixed mapping for verify_evidence, or a collateral directory
# (its path, or a CollateralDir) read at each attestation (attestation.collateral_source).
CollateralLike = Mapping[str, Any] | str | os.PathLike[str] | CollateralDir


def collateral_source(collateral: CollateralLike | None, trust: Any = None) -> CollateralDir | None:
    """The collateral directory ``collateral`` names (a path becomes a :class:`CollateralDir`
    verified against ``trust``), or None for a mapping or nothing."""
    if collateral is None or isinstance(collateral, Mapping):
        return None
    if isinstance(collateral, CollateralDir):
        return collateral
    if isinstance(collateral, (str, os.PathLike)):
        return CollateralDir(collateral, trust=trust)
    raise TypeError(f"collateral must be a mapping, a directory path or a CollateralDir, not "
                    f"{type(collateral).__name__}")


def collateral_verifier(source: CollateralDir) -> Callable[..., Claims]:
    """``verify_evidence`` with ``source``'s collateral for the evidence's platform, read at each
    verification (so a long-running client picks up collateral refreshed on disk)."""
    def verify(platform: str, evidence: bytes, policy: Any, *, now: Any, **options: Any) -> Claims:
        return verify_evidence(platform, evidence, policy, now=now, **with_collateral(source, platform, now, options))
    return verify

# pool_status: at most this many members are collected, for at most this long.
MAX_STATUS_MEMBERS = 256
MAX_STATUS_WAIT_SECONDS = 60.0
# How often one request is sealed again after workers said its epoch was rotated away.
STALE_EPOCH_RETRIES = 3
# The most close() waits for a broker that stopped answering (per step), whatever ``timeout`` is.
CLOSE_TIMEOUT = 10.0
# A client's own reply queue is deleted at close(); one left by a process that died is deleted by
# RabbitMQ after this long unused (x-expires), with whatever results it still holds.
ORPHAN_REPLY_QUEUE_EXPIRY = 24 * 3600.0
# A resumed batch sends a request again under its first id only if this much of its deadline is
# left: a copy that would arrive after it is refused as expired anyway, so its jobs go anew at once.
RESEND_MIN_SECONDS = 2.0
# After an answer to a challenge was refused, how long another answer still has to verify before
# the refusal is reported. Genuine workers answer within milliseconds of each other, so a forged
# answer that arrives first does not fail connect(); a misconfigured policy still fails in about
# a second rather than after the whole ``attest_timeout``.
REFUSAL_GRACE_SECONDS = 1.0
# First wait before challenging again workers that answered "busy" (doubling, at most 2 s).
BUSY_BACKOFF_SECONDS = 0.25
# Events in flight: the client remembers, per event, whom to tell of a failure (at most this many,
# the oldest forgotten first) and, within a byte budget, the sealed copy's recipe to seal it again
# after a key rotation (the inputs: events can be large, so older ones lose it first).
MAX_EVENTS_REMEMBERED = 100_000
EVENT_RESEND_BUDGET_BYTES = 64 * 1024 * 1024
# How long after an event's deadline a failure may still come back (a worker answers "expired").
EVENT_ANSWER_GRACE_SECONDS = 60.0


@dataclass(frozen=True)
class _BatchEnd:
    count: int | None
    error: Exception | None


@dataclass
class _Fired:
    """An event published and not known to have failed: its id, whom to tell if the worker
    sends a failure back, and (while the resend budget allows) how to seal it again."""

    event_id: str
    epoch: int
    expires: float  # loop time after which no answer is expected any more
    timeout: float
    on_error: Callable[[JobError], None]
    make: Callable[[], Request] | None
    attempts: int


@dataclass(frozen=True)
class JobResult:
    """One finished job of a batch: ``outputs`` on success, ``error`` otherwise."""

    index: int
    job_id: str
    outputs: dict[str, np.ndarray] | None
    error: EnclaveqError | None

    @property
    def ok(self) -> bool:
        return self.error is None


class AsyncClient:
    """The producer SDK on asyncio (``Client`` is its synchronous twin).

    ``timeout`` bounds each request from publishing to its result; ``attest_timeout`` bounds an
    attestation, from sending the challenge to the first answer that verifies. ``epoch_state``
    says where the newest epoch seen per pool is remembered, so that no older one is accepted
    even after a restart (P13): None, the default, is ``$ENCLAVEQ_HOME/epochs.json`` (memory only
    on ``memory://`` brokers, whose pools die with the process), a path names another file, and
    False keeps it in this client's memory only. See :mod:`producer_sdk.epochs`.

    Hardware evidence: ``trust`` pins the vendor roots (default: Intel's, AMD's, AWS's; tests pass
    fakes). ``collateral`` is what the TCB is judged with (docs/collateral.md): a mapping as
    :func:`attestation.verify.verify_evidence` takes it (``{"intel": IntelCollateral, "crls":
    (...)}``, used as is for every attestation), or a collateral directory -- its path (``str`` or
    ``Path``, as ``enclaveq collateral fetch`` fills it) or an
    :class:`attestation.collateral_source.CollateralDir` -- read for the pool's platform at each
    attestation and reused until its earliest ``nextUpdate`` or until its files change, so a
    long-running client picks up refreshed collateral. None: no collateral.
    """

    def __init__(self, broker_url: str, pool: str, policy: Any, *, name: str | None = None,
                 timeout: float = 120.0, attest_timeout: float = 10.0, max_in_flight: int = 256,
                 clock: Callable[[], float] = time.time, rng: crypto.Random = os.urandom,
                 trust: Any = None, collateral: CollateralLike | None = None,
                 producer_key: Any = None, owner_key: Any = None, epoch_state: EpochState = None) -> None:
        self.broker_url = broker_url
        self.pool = pool
        self.policy = load_policy(policy) if isinstance(policy, (str, Path)) else policy
        self.timeout = timeout
        self.attest_timeout = attest_timeout
        self.max_in_flight = max_in_flight
        self._ephemeral = name is None
        self.name = name or f"producer-{uuid.uuid4().hex[:16]}"
        self._clock = clock
        self._rng = rng
        # Hardware evidence: pinned roots (default: the vendors'; tests pass fakes) and collateral:
        # a fixed mapping, or a directory read per platform at each attestation.
        fixed = collateral if isinstance(collateral, Mapping) else None
        self.collateral = collateral_source(collateral, trust)
        self._verify_options = {k: v for k, v in (("trust", trust), ("collateral", fixed)) if v is not None}
        self._verifier = collateral_verifier(self.collateral) if self.collateral is not None else verify_evidence
        # Ed25519 keys (objects or key files from `enclaveq keys generate`). The producer key proves
        # who runs jobs (models with an allow-list need it); the owner key signs uploads and deletes.
        self.producer_key = _signing_key(producer_key)
        self._owner_key = _signing_key(owner_key)
        # The newest epoch seen per pool (P13): None keeps it in $ENCLAVEQ_HOME/epochs.json (memory
        # only on memory:// brokers), a path in that file, False in this client's memory only.
        self._epochs = marks_for(epoch_state, broker_url)
        self._broker: BrokerAdapter | None = None
        self._sub: Subscription | None = None
        self._pending: dict[str, asyncio.Future[Any]] = {}
        # Broadcast requests every member answers (pool_status): job id -> where its answers go.
        self._collectors: dict[str, Callable[[Outcome | StaleEpochNotice | JobError], None]] = {}
        self.skipped_status_answers = 0  # members' pool_status answers that did not decode (all calls)
        # Per open challenge, the timer that reports a refusal if no other answer verifies in time.
        self._refusal_timers: dict[str, asyncio.TimerHandle] = {}
        self._core: ProducerCore | None = None
        self._closed = False
        self._refreshing: asyncio.Task[None] | None = None
        # Events in flight, by job id (see MAX_EVENTS_REMEMBERED), and the sizes of those that can
        # still be sealed again (EVENT_RESEND_BUDGET_BYTES).
        self._fired: OrderedDict[str, _Fired] = OrderedDict()
        self._resendable: OrderedDict[str, int] = OrderedDict()
        self._resendable_bytes = 0
        self._background: set[asyncio.Task[None]] = set()
        # Requests published and not answered yet, by job id: published again, the same sealed
        # bytes, after the broker connection came back (see _republish_unanswered).
        self._unanswered: dict[str, tuple[Request, Message]] = {}

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def claims(self) -> Claims | None:
        """What the pool's evidence vouched for, verified against the policy."""
        return self._core.claims if self._core else None

    @property
    def statement(self) -> Statement | None:
        """The attested statement (pool, epoch, pool key) the current session is sealed to."""
        return self._core.statement if self._core else None

    def _connection(self) -> tuple[BrokerAdapter, ProducerCore]:
        if self._closed or self._broker is None or self._core is None:
            raise ClientClosed("the client is closed or not connected")
        return self._broker, self._core

    # -- connection and attestation --------------------------------------------------------
    async def connect(self) -> Claims:
        """Open the reply queue and attest the pool. Setting up is bounded by ``timeout``, the
        attestation (sending the challenge included) by ``attest_timeout``."""
        self._broker = broker = open_broker(self.broker_url)
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    await broker.connect()
                    broker.on_reconnect(self._republish_unanswered)
                    # An ephemeral queue is deleted at close; one left by a process that died expires.
                    reply_to = await broker.declare_reply_queue(
                        self.name, expires=ORPHAN_REPLY_QUEUE_EXPIRY if self._ephemeral else None)
                    self._core = ProducerCore(pool=self.pool, policy=self.policy, reply_to=reply_to,
                                              clock=self._clock, rng=self._rng, verify_options=self._verify_options,
                                              verifier=self._verifier,
                                              producer_key=self.producer_key, epochs=self._epochs)
                    self._sub = await broker.consume_replies(self.name, self._on_reply)
            except TimeoutError:
                raise BrokerUnreachable(f"the broker at {redact_url(self.broker_url)} did not answer within "
                                        f"{self.timeout:g}s") from None
            except BrokerUnavailable as exc:
                # The adapter names the URL when connecting is what failed: it is said once.
                where = redact_url(self.broker_url)
                raise BrokerUnreachable(str(exc) if where in str(exc) else
                                        f"cannot reach the broker at {where}: {exc}") from None
            return await self.attest()
        except BaseException:
            await self.close()
            raise

    async def attest(self) -> Claims:
        """Challenge the pool with a fresh nonce and verify its evidence; (re)opens the session.

        The first answer that verifies is taken: anyone on the broker can answer a challenge, so a
        refused answer only matters if none verifies within :data:`REFUSAL_GRACE_SECONDS` after it
        (or the challenge spent its verification budget, ``MAX_VERIFICATIONS_PER_CHALLENGE``) --
        then the most informative refusal is raised: a genuine worker's policy violation, say,
        over garbage. Workers that answered ``busy`` (over their evidence budget: someone floods
        the pool with challenges) are challenged again, with backoff, until ``attest_timeout``."""
        deadline = asyncio.get_running_loop().time() + self.attest_timeout
        backoff = BUSY_BACKOFF_SECONDS
        while True:
            try:
                return await self._attest_once(deadline)
            except AttestationFailed as exc:
                if not exc.busy or asyncio.get_running_loop().time() + backoff >= deadline:
                    raise
                log.info("pool %r: the workers are busy answering challenges; asking again in %gs", self.pool,
                         backoff)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, 2.0)

    async def _attest_once(self, deadline: float) -> Claims:
        broker, core = self._connection()
        correlation_id, challenge = core.challenge()
        verified = self._expect(correlation_id)
        sent = False
        try:
            async with asyncio.timeout_at(deadline):
                await broker.publish_control(self.pool, Message(body=challenge, correlation_id=correlation_id,
                                                                 reply_to=core.reply_to))
                sent = True
                claims: Claims = await verified
                return claims
        except TimeoutError:
            refusal = core.close_challenge(correlation_id)
            if refusal is not None:
                raise refusal from None
            if not sent:
                raise NoWorkerAnswered(f"the broker did not confirm the attestation challenge for pool {self.pool!r} "
                                       f"within {self.attest_timeout:g}s") from None
            raise NoWorkerAnswered(f"no worker of pool {self.pool!r} answered the attestation challenge within "
                                   f"{self.attest_timeout:g}s; is a worker running on this pool?") from None
        except Unroutable:
            raise NoWorkerAnswered(f"no worker is listening on pool {self.pool!r}; start one with "
                                   f"`enclaveq worker --pool {self.pool} ...`") from None
        except BrokerError as exc:
            raise BrokerUnreachable(f"could not send the challenge: {exc}") from None
        finally:
            self._pending.pop(correlation_id, None)
            core.close_challenge(correlation_id)
            timer = self._refusal_timers.pop(correlation_id, None)
            if timer is not None:
                timer.cancel()

    def _take_answer(self, core: ProducerCore, answer: AttestationAnswer) -> None:
        """Verify an answer to a challenge someone is waiting on; settle the wait once one
        verifies, or once the challenge spent its verification budget."""
        waiting = self._pending.get(answer.correlation_id)
        if waiting is None or waiting.done():
            return  # a late answer, a second genuine one, or a forgery: nobody asked
        try:
            claims = core.accept_evidence(answer.correlation_id, answer.body, keep_open=True)
        except AttestationFailed as exc:
            log.info("pool %r: an answer to our attestation challenge was refused, waiting for another: %s",
                     self.pool, str(exc).splitlines()[0][:200])
            if not core.challenge_open(answer.correlation_id):
                waiting.set_exception(core.close_challenge(answer.correlation_id) or exc)
            elif answer.correlation_id not in self._refusal_timers:
                self._refusal_timers[answer.correlation_id] = asyncio.get_running_loop().call_later(
                    REFUSAL_GRACE_SECONDS, self._settle_refused, core, answer.correlation_id, exc)
            return
        waiting.set_result(claims)

    def _settle_refused(self, core: ProducerCore, correlation_id: str, first: AttestationFailed) -> None:
        """No answer verified within the grace after a refusal: report the most informative one."""
        self._refusal_timers.pop(correlation_id, None)
        waiting = self._pending.get(correlation_id)
        if waiting is not None and not waiting.done():
            waiting.set_exception(core.close_challenge(correlation_id) or first)

    def _expect(self, correlation_id: str) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        return future

    async def _on_reply(self, delivery: Delivery) -> None:
        received = self._core.receive(delivery.message.correlation_id, delivery.message.body) if self._core else None
        if isinstance(received, AttestationAnswer) and self._core is not None:
            self._take_answer(self._core, received)
        elif isinstance(received, Reply):
            collector = self._collectors.get(received.job_id)
            fired = self._fired.pop(received.job_id, None) if collector is None else None
            if collector is not None:
                collector(received.outcome)
            elif fired is not None:
                self._event_answered(received.job_id, fired, received.outcome)
            else:
                self._resolve(received.job_id, received.outcome)
        if self._core is not None and self._core.newer_epoch is not None:
            self._start_refresh()  # the pool rotated: pick up its new key for the next jobs
        await delivery.ack()

    def _resolve(self, key: str, value: object) -> None:
        future = self._pending.get(key)
        if future is not None and not future.done():
            future.set_result(value)

    def _start_refresh(self) -> asyncio.Task[None]:
        """One re-attestation at a time; requests sealed meanwhile use the old (still valid) session."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh())
        return self._refreshing

    async def _refresh(self) -> None:
        try:
            await self.attest()
            log.info("pool %r: re-attested, now sealing to epoch %d", self.pool, self._core_or_raise().epoch)
        except EnclaveqError as exc:
            log.warning("re-attesting pool %r after a key rotation failed: %s", self.pool, exc)
            if self._core is not None:
                self._core.newer_epoch = None  # don't retry on every result; a stale notice retries

    async def close(self) -> None:
        """Stop consuming and drop an ephemeral reply queue; bounded by ``timeout`` (and
        :data:`CLOSE_TIMEOUT`) even if the broker stops answering."""
        if self._closed:
            return
        self._closed = True
        if self._refreshing is not None and not self._refreshing.done():
            self._refreshing.cancel()
        for task in list(self._background):
            task.cancel()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ClientClosed("the client was closed"))
                future.exception()  # nobody may be waiting any more: don't log it as unretrieved
        if self._broker is not None:
            limit = min(self.timeout, CLOSE_TIMEOUT)
            try:
                async with asyncio.timeout(limit):
                    if self._sub is not None:
                        await self._sub.cancel()
                    if self._ephemeral:
                        await self._broker.delete_reply_queue(self.name)
            except (BrokerError, TimeoutError):
                pass
            finally:
                try:
                    async with asyncio.timeout(limit):
                        await self._broker.close()
                except TimeoutError:
                    log.warning("the broker at %s did not close the connection within %gs; abandoned",
                                redact_url(self.broker_url), limit)

    # -- requests --------------------------------------------------------------------------
    async def _request(self, make: Callable[[], Request], timeout: float, *, resend: bool = True,
                       reply_to: str | None = None) -> Outcome:
        """Send what ``make()`` seals and wait for its result. If workers answer that the epoch it
        was sealed to is rotated away, re-attest and send a freshly sealed copy (new job id) --
        unless ``resend`` is False (a request that must not run twice). ``reply_to``: where the
        request's header says to answer, when not this client's own queue (a resumable batch's)."""
        # One deadline for the whole request: publishing (a broker may take a frame and never
        # confirm it), waiting for the result, and any re-attestation in between.
        deadline = asyncio.get_running_loop().time() + timeout
        for _ in range(STALE_EPOCH_RETRIES + 1 if resend else 1):
            broker, core = self._connection()
            request = make()
            future = self._expect(request.job_id)
            message = Message(body=request.body, correlation_id=request.job_id, reply_to=reply_to or core.reply_to,
                              message_id=request.job_id)
            sent = False
            try:
                async with asyncio.timeout_at(deadline):
                    await self._publish_until_confirmed(broker, request, message, deadline)
                    sent = True
                    self._unanswered[request.job_id] = (request, message)
                    outcome = await future
            except TimeoutError:
                if not sent:
                    raise JobTimeout(f"the broker did not confirm job {request.job_id} within {timeout:g}s") from None
                raise JobTimeout(f"no result for job {request.job_id} within {timeout:g}s") from None
            except BrokerError as exc:
                raise BrokerUnreachable(f"could not publish job {request.job_id}: {exc}") from None
            finally:
                self._pending.pop(request.job_id, None)
                self._unanswered.pop(request.job_id, None)
                core.forget(request.job_id)
            if isinstance(outcome, JobError):
                raise outcome
            if isinstance(outcome, Outcome):
                return outcome
            if core.epoch <= request.epoch:
                try:
                    async with asyncio.timeout_at(deadline):
                        # Shielded: other requests may be waiting on the same re-attestation.
                        await asyncio.shield(self._start_refresh())
                except TimeoutError:
                    raise JobTimeout(f"no result for job {request.job_id} within {timeout:g}s (re-attesting the "
                                     f"pool after a key rotation)") from None
        raise JobError(f"the pool kept refusing the epoch of request {request.job_id} after "
                       f"{STALE_EPOCH_RETRIES} re-attestations", code="stale_epoch", job_id=request.job_id)

    async def _republish_unanswered(self) -> None:
        """The broker connection came back: publish every request still waiting for its answer
        again, the same sealed bytes. A broker restart can lose a message it had confirmed --
        Mosquitto 2.0 does not restore what it held for a shared subscription (the pool's job
        queue) -- and nothing else would ever send it. A copy is harmless: a worker that answered
        the request drops it (its replay guard, P5), one running it lets the copy wait for that
        run, and this client takes the first result of each job id. Bounded by the requests in
        flight (``max_in_flight`` at most per batch)."""
        broker = self._broker
        if broker is None or self._closed or not self._unanswered:
            return
        waiting = list(self._unanswered.items())
        log.info("reconnected to the broker: publishing the %d requests still waiting for an answer again",
                 len(waiting))
        deadline = asyncio.get_running_loop().time() + min(self.timeout, CLOSE_TIMEOUT * 3)
        for job_id, (request, message) in waiting:
            if job_id not in self._unanswered:
                continue  # answered meanwhile
            try:
                await self._publish_until_confirmed(broker, request, message, deadline)
            except Exception as exc:  # noqa: BLE001 - a task of its own: nobody else would see it
                log.debug("publishing request %s again after a reconnect failed: %s", job_id, exc)
                return  # the connection went again: the next reconnect tries again

    async def _publish_until_confirmed(self, broker: BrokerAdapter, request: Request, message: Message,
                                       deadline: float) -> None:
        """Publish, and publish again while the connection is lost (a broker restart, a failover) or
        the broker refuses the message (a full queue), until it confirms; once the next try would
        pass ``deadline`` (loop time), the last failure is raised (broker_adapters.retry). The
        broker may already hold an earlier copy: a worker never runs one job id twice, the client
        takes one result per job, and recipients drop a second result of an event."""
        await publish_until_confirmed(lambda: self._publish(broker, request, message), deadline=deadline,
                                      what=f"request {request.job_id}", log=log)

    async def _publish(self, broker: BrokerAdapter, request: Request, message: Message) -> None:
        """Publish a sealed request on the channel ``protocol.routing`` names for its kind."""
        if request.route is Route.BROADCAST:
            # Every worker of the pool must hold every model and pipeline: uploads, definitions and
            # deletes go to all; each answers, the first answer is taken.
            await broker.publish_control(self.pool, message)
        elif request.route is Route.STREAM:
            # An event goes to a topic, not to a pool: the broker routes it to the stream of every
            # pipeline whose source filter matches (declared by create_pipeline).
            assert request.topic is not None  # ProducerCore seals a topic into every event request
            await broker.publish_event(request.topic, message, exchange=request.exchange)
        else:
            await broker.publish_job(self.pool, message)

    # -- events (fire and forget; AsyncEventPublisher drives these) ------------------------
    async def _fire(self, make: Callable[[], Request], *, event_id: str, timeout: float,
                    on_error: Callable[[JobError], None], attempts: int = 0) -> str:
        """Publish the event ``make()`` seals; return its job id once the broker confirmed it.

        Nothing comes back on success. A failure the worker sends back (an encrypted error) goes
        to ``on_error``; a stale-epoch notice re-attests and seals the event again (same event
        id, new job id), at most :data:`STALE_EPOCH_RETRIES` times. A connection lost mid-publish
        is retried until ``timeout``: the broker may already hold the first copy, but a worker
        never runs one job id twice and recipients drop a second result of one event id."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        broker, core = self._connection()
        request = make()
        message = Message(body=request.body, correlation_id=request.job_id, reply_to=core.reply_to,
                          message_id=request.job_id)
        ttl = max(0.0, request.deadline_ms / 1000 - self._clock())
        # Remembered before publishing: a worker may answer before the broker's confirm arrives.
        self._remember_fired(request.job_id, len(request.body), _Fired(
            event_id=event_id, epoch=request.epoch, expires=loop.time() + ttl + EVENT_ANSWER_GRACE_SECONDS,
            timeout=timeout, on_error=on_error, make=make, attempts=attempts))
        try:
            async with asyncio.timeout_at(deadline):
                await self._publish_until_confirmed(broker, request, message, deadline)
            return request.job_id
        except BaseException as exc:
            self._forget_fired(request.job_id)
            if isinstance(exc, TimeoutError):
                raise JobTimeout(f"the broker did not confirm event {event_id} within {timeout:g}s") from None
            if isinstance(exc, Unroutable):
                raise UnknownPipeline(f"no pipeline stream takes events on topic {request.topic!r}: the pipeline "
                                      f"is not (or no longer) on the broker", event_id=event_id) from None
            if isinstance(exc, BrokerError):
                raise BrokerUnreachable(f"could not publish event {event_id}: {exc}") from None
            raise

    def _remember_fired(self, job_id: str, size: int, fired: _Fired) -> None:
        now = asyncio.get_running_loop().time()
        while self._fired:
            oldest_id, oldest = next(iter(self._fired.items()))
            if len(self._fired) < MAX_EVENTS_REMEMBERED and oldest.expires > now:
                break
            self._forget_fired(oldest_id)
        self._fired[job_id] = fired
        self._resendable[job_id] = size
        self._resendable_bytes += size
        while self._resendable_bytes > EVENT_RESEND_BUDGET_BYTES and len(self._resendable) > 1:
            # The oldest events can no longer be sealed again after a rotation (a failure is
            # still reported); their inputs are released.
            old_id, old_size = self._resendable.popitem(last=False)
            self._resendable_bytes -= old_size
            if old_id in self._fired:
                self._fired[old_id].make = None

    def _forget_fired(self, job_id: str) -> None:
        self._fired.pop(job_id, None)
        size = self._resendable.pop(job_id, None)
        if size is not None:
            self._resendable_bytes -= size

    def _event_answered(self, job_id: str, fired: _Fired, outcome: Outcome | StaleEpochNotice | JobError) -> None:
        """A worker answered an event: only failures are ever answered."""
        self._forget_fired(job_id)
        make, fired.make = fired.make, None
        if isinstance(outcome, Outcome):
            if outcome.ok:
                return  # workers send nothing on success; an "ok" changes nothing
            error = outcome.error()
        elif isinstance(outcome, JobError):
            error = outcome
        elif make is None or fired.attempts >= STALE_EPOCH_RETRIES:
            error = JobError(f"event {fired.event_id} was sealed to a retired pool epoch and could not be sealed "
                             f"again", code="stale_epoch", job_id=job_id)
        else:
            task = asyncio.get_running_loop().create_task(self._refire(fired, make))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        error.event_id = fired.event_id
        fired.on_error(error)

    async def _refire(self, fired: _Fired, make: Callable[[], Request]) -> None:
        """Re-attest (if nobody did since the event was sealed) and send the event again."""
        try:
            core = self._core_or_raise()
            if core.epoch <= fired.epoch:
                try:
                    async with asyncio.timeout(self.attest_timeout + fired.timeout):
                        # Shielded: other events and requests may be waiting on the same re-attestation.
                        await asyncio.shield(self._start_refresh())
                except TimeoutError:
                    pass  # sealing again to the same epoch fails again, within the retry bound
            await self._fire(make, event_id=fired.event_id, timeout=fired.timeout, on_error=fired.on_error,
                             attempts=fired.attempts + 1)
        except EnclaveqError as exc:
            fired.on_error(JobError(f"event {fired.event_id} could not be sent again after a key rotation: {exc}",
                                    code="stale_epoch", event_id=fired.event_id))

    async def run(self, model_id: str, inputs: Mapping[str, Any], *, outputs: Sequence[str] | None = None,
                  timeout: float | None = None) -> dict[str, np.ndarray]:
        """Run one job and return its outputs by name."""
        timeout = timeout or self.timeout
        core = self._core_or_raise()
        outcome = await self._request(lambda: core.job(model_id, inputs, outputs=outputs, timeout=timeout), timeout)
        return outcome.tensors()

    async def submit(self, model_id: str, batch: Iterable[Mapping[str, Any] | None], *,
                     outputs: Sequence[str] | None = None,
                     timeout: float | None = None, max_in_flight: int | None = None,
                     frames: FrameSettings | Literal[False] | None = None,
                     resume: BatchJournal | str | os.PathLike[str] | None = None) -> AsyncIterator[JobResult]:
        """Run many jobs, at most ``max_in_flight`` at a time; yield each result as it completes.

        The batch is read lazily, so it can be a generator over more jobs than fit in memory: at
        most ``max_in_flight`` jobs are sent and not yet taken by the caller (a result waiting for
        the caller holds its slot), plus one read and waiting for a slot.
        An item None is skipped: no job, no result, and the other jobs keep their ``index``.
        Jobs travel packed into frames, many jobs per sealed message (``frames``: a
        :class:`FrameSettings`, None for the defaults, False for one message per job); each job
        keeps its own id, result and error either way.

        ``resume``: a :class:`~producer_sdk.journal.BatchJournal` (or the path of its file) that
        lets the batch outlive this process. Call ``submit`` again after a crash with the same
        model, the same batch in the same order and the same journal, and it yields only the
        results not taken before (``result.index`` counts the whole batch): results that reached
        the batch's own durable reply queue while nobody listened are collected, and only jobs
        without a result are sent again -- under their first id where a worker may not have run
        them yet, so its replay guard keeps them from running twice. Completed, the
        journal is deleted (with ``auto_keep``) and its queue too. See :mod:`producer_sdk.journal`.
        """
        timeout = timeout or self.timeout
        limit = max_in_flight or self.max_in_flight
        window = asyncio.Semaphore(limit)
        done: asyncio.Queue[JobResult | _BatchEnd] = asyncio.Queue()
        broker, core = self._connection()
        tasks: set[asyncio.Task[None]] = set()
        packer = FramePacker(frames or FrameSettings(), limit) if frames is not False else None
        journal = resume if isinstance(resume, BatchJournal) or resume is None else BatchJournal(resume)
        reply_to: str | None = None
        again_of: dict[int, SentRequest] = {}  # batch index -> the earlier request to send again
        gathered: dict[str, list[tuple[int, bytes]]] = {}  # its jobs read so far, by request id
        missing: dict[str, int] = {}  # how many of its jobs are still to read, by request id
        journal_sub: Subscription | None = None
        journaled: set[bytes] = set()  # sessions the journal holds
        anew: frozenset[int] = frozenset()  # jobs an earlier run saw answered and did not keep
        if journal is not None:
            reply_to, plan, journal_sub = await self._open_journal(journal, model_id)
            journaled.update(session.session_id for session in journal.sessions())
            anew = plan.fresh
            for request in plan.resend:
                unkept = [index for index, _ in request.jobs if not journal.is_kept(index)]
                missing[request.request_id] = len(unkept)
                again_of.update((index, request) for index in unkept)
                gathered[request.request_id] = []

        def spawn(coro: Any) -> None:
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        def record(request: Request, framed: bool, jobs: Iterable[tuple[int, str]]) -> None:
            """Journal a request before it is published (the session it is sealed under first)."""
            if journal is None:
                return
            session = core.session
            assert session is not None
            if session.session_id not in journaled:
                journal.record_session(core.session_record())
                journaled.add(session.session_id)
            journal.record_sent(SentRequest(request.job_id, framed, session.session_id, request.deadline_ms,
                                            tuple(jobs)))

        def answered(request_id: str) -> None:
            if journal is not None and request_id:
                journal.record_answered(request_id)

        def settle(frame_indexes: Sequence[int], frame_jobs: Sequence[FramedJob], answers: Sequence[Any]) -> None:
            """Hand each job's answer to the caller; a job whose result did not fit in the frame's
            answer goes again alone."""
            for index, job, answer in zip(frame_indexes, frame_jobs, answers, strict=True):
                if isinstance(answer, JobError) and answer.code == bodies.ErrorCode.FRAME_FULL:
                    spawn(one(index, job.body))
                elif isinstance(answer, EnclaveqError):
                    done.put_nowait(JobResult(index, job.job_id, None, answer))
                else:
                    done.put_nowait(JobResult(index, job.job_id, answer, None))

        async def framed(frame: Frame) -> None:
            ids = [job.job_id for job in frame.jobs]
            frame_id = ""

            def make() -> Request:
                nonlocal frame_id
                request = core.job_frame(model_id, frame.jobs, timeout=timeout, reply_to=reply_to)
                frame_id = request.job_id
                record(request, True, zip(frame.indexes, ids))
                return request

            try:
                outcome = await self._request(make, timeout, reply_to=reply_to)
                answered(frame_id)
                answers: list[Any] = outcome.framed(ids)
            except JobError as exc:  # the worker refused the frame as a whole
                answered(frame_id)
                answers = [exc] * len(ids)
            except EnclaveqError as exc:
                answers = [exc] * len(ids)
            except Exception as exc:  # noqa: BLE001 - e.g. a frame the codec refuses
                answers = [JobError(f"could not send frame {frame_id}: {exc}")] * len(ids)
            settle(frame.indexes, frame.jobs, answers)

        async def one(index: int, body: bytes) -> None:
            # One message per job (frames=False), or a job whose result did not fit in its frame's answer.
            job_id = ""

            def make() -> Request:
                nonlocal job_id
                request = core.job_of_body(model_id, body, timeout=timeout, reply_to=reply_to)
                job_id = request.job_id
                record(request, False, [(index, job_id)])
                return request

            try:
                outcome = await self._request(make, timeout, reply_to=reply_to)
                answered(job_id)
                result = JobResult(index, job_id, outcome.tensors(), None)
            except EnclaveqError as exc:
                if isinstance(exc, JobError):
                    answered(job_id)
                result = JobResult(index, job_id, None, exc)
            done.put_nowait(result)

        async def again(request: SentRequest, items: list[tuple[int, bytes]]) -> None:
            """A request a dead process sent and never got the answer of: take the answer from the
            batch's queue, or send a copy under its own session, id and deadline (a worker that
            already ran it drops the copy); no answer by its deadline -- the dead process took it
            and did not keep it -- or its epoch gone: its jobs go anew."""
            assert journal is not None
            order = {index: position for position, (index, _) in enumerate(request.jobs)}
            items.sort(key=lambda item: order[item[0]])
            outcome = await self._send_again(broker, core, journal, request, model_id, items, reply_to)
            if outcome is None:
                journal.sent_anew += len(items)
                jobs = [(index, FramedJob(core.new_job_id(), body)) for index, body in items]
                if request.framed:
                    spawn(framed(Frame(jobs=[job for _, job in jobs], indexes=[index for index, _ in jobs])))
                else:
                    spawn(one(items[0][0], items[0][1]))
                return
            answered(request.request_id)
            ids = dict(request.jobs)
            framed_jobs = [FramedJob(ids[index], body) for index, body in items]
            indexes = [index for index, _ in items]
            if isinstance(outcome, JobError):
                settle(indexes, framed_jobs, [outcome] * len(items))
            elif not request.framed:
                try:
                    settle(indexes, framed_jobs, [outcome.tensors()])
                except JobError as exc:
                    settle(indexes, framed_jobs, [exc])
            else:
                # The answer is to the first copy (every job it held) or to ours (those not kept).
                try:
                    try:
                        answers = outcome.framed(request.job_ids)
                        by_index = dict(zip([index for index, _ in request.jobs], answers, strict=True))
                    except JobError as exc:
                        if exc.code != "malformed":
                            raise
                        by_index = dict(zip(indexes, outcome.framed([job.job_id for job in framed_jobs]),
                                            strict=True))
                    settle(indexes, framed_jobs, [by_index[index] for index in indexes])
                except JobError as exc:
                    settle(indexes, framed_jobs, [exc] * len(items))

        def send(closed: list[Frame]) -> None:
            for frame in closed:
                if frame.jobs:
                    spawn(framed(frame))

        requests = {request.request_id: request for request in again_of.values()}

        def gather(index: int, body: bytes | None) -> None:
            """A job of an earlier run's unanswered request was read (None: skipped, or it failed
            here); the request goes again once all of its jobs were."""
            request = again_of.get(index)
            if request is None or request.request_id not in gathered:
                return
            if body is not None:
                gathered[request.request_id].append((index, body))
            missing[request.request_id] -= 1
            if missing[request.request_id] == 0:
                items = gathered.pop(request.request_id)
                if items:
                    spawn(again(request, items))
                else:
                    self._pending.pop(request.request_id, None)
                    core.forget(request.request_id)

        async def feed() -> None:
            try:
                count = 0
                for index, inputs in enumerate(batch):
                    if inputs is None or (journal is not None and journal.is_kept(index)):
                        gather(index, None)  # the caller skips it, or an earlier run kept its result
                        continue
                    if packer is not None and window.locked():
                        send([packer.flush()])  # never hold jobs back while waiting for room
                    await window.acquire()
                    count += 1
                    try:
                        body = core.job_body(inputs, outputs)
                    except Exception as exc:  # noqa: BLE001 - e.g. an unsupported dtype: this job fails alone
                        done.put_nowait(JobResult(index, "", None, JobError(f"could not send job {index}: {exc}")))
                        gather(index, None)
                        continue
                    if index in again_of:
                        gather(index, body)
                        continue
                    if journal is not None and index in anew:
                        journal.sent_anew += 1
                    if packer is None:
                        spawn(one(index, body))
                    else:
                        send(packer.add(index, FramedJob(core.new_job_id(), body)))
                if packer is not None:
                    send([packer.flush()])
                for request_id in list(gathered):  # the batch ended before all of their jobs were read
                    request = requests[request_id]
                    if gathered[request_id]:
                        spawn(again(request, gathered.pop(request_id)))
                    else:
                        self._pending.pop(request_id, None)
                        core.forget(request_id)
                done.put_nowait(_BatchEnd(count, None))
            except Exception as exc:  # the caller's iterable failed: surface it, keep what ran
                if packer is not None:
                    send([packer.flush()])
                done.put_nowait(_BatchEnd(None, exc))

        feeder = asyncio.create_task(feed())
        yielded, total = 0, None
        completed = False
        try:
            while total is None or yielded < total:
                item = await done.get()
                if isinstance(item, _BatchEnd):
                    if item.error is not None:
                        raise item.error
                    total = item.count
                    continue
                yielded += 1
                # The job's slot frees only once the caller takes its result: jobs in flight plus
                # results waiting for a slow caller stay within max_in_flight, so a caller that
                # writes each result somewhere slower than the worker computes them holds the
                # batch back instead of piling results up in memory.
                window.release()
                yield item
                if journal is not None and journal.auto_keep:
                    journal.kept(item.index)  # the caller asked for the next one: this one is theirs
            completed = True
        finally:
            feeder.cancel()
            for task in list(tasks):
                task.cancel()
            for request_id in gathered:  # expected by _open_journal, never sent again
                self._pending.pop(request_id, None)
                core.forget(request_id)
            if journal is not None:
                await self._close_journal(journal, journal_sub, completed=completed)

    async def _open_journal(self, journal: BatchJournal, model_id: str
                            ) -> tuple[str, ResumePlan, Subscription]:
        """Begin or resume a batch's journal: its reply queue consumed, the sessions of earlier
        runs restored, and every request they sent and did not see answered expected -- before the
        first message is read, so a result that waited in the queue finds someone waiting for it."""
        broker, core = self._connection()
        if journal.started:
            journal.check(pool=self.pool, model_id=model_id)
        else:
            journal.start(pool=self.pool, model_id=model_id, reply_queue=f"batch-{uuid.uuid4().hex[:24]}")
        journal.collected = journal.resent = journal.sent_anew = 0
        assert journal.reply_queue is not None
        for session in journal.sessions():
            core.restore_session(session)
        plan = journal.plan()
        resend = tuple(request for request in plan.resend if core.knows_session(request.session_id))
        plan = ResumePlan(resend=resend, fresh=plan.fresh)
        for request in resend:
            self._expect(request.request_id)
            core.pin(request.request_id, model_id)
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    reply_to = await broker.declare_reply_queue(journal.reply_queue, expires=journal.queue_expiry)
                    sub = await broker.consume_replies(journal.reply_queue, self._on_reply)
            except TimeoutError:
                raise BrokerUnreachable(f"the broker did not open the batch's reply queue within "
                                        f"{self.timeout:g}s") from None
            except BrokerError as exc:
                raise BrokerUnreachable(f"could not open the batch's reply queue: {exc}") from None
        except BaseException:
            for request in resend:
                self._pending.pop(request.request_id, None)
                core.forget(request.request_id)
            raise
        return reply_to, plan, sub

    async def _send_again(self, broker: BrokerAdapter, core: ProducerCore, journal: BatchJournal,
                          request: SentRequest, model_id: str, items: list[tuple[int, bytes]],
                          reply_to: str | None) -> Outcome | JobError | None:
        """The answer to a request an earlier run sent (see ``submit``'s ``again``); None when its
        jobs must go anew: its deadline too near, no answer by it, or its epoch rotated away."""
        future = self._pending.get(request.request_id)
        try:
            if future is None:
                return None
            left = request.deadline_ms / 1000 - self._clock()
            if not future.done():
                if left < RESEND_MIN_SECONDS:
                    return None
                ids = dict(request.jobs)
                if request.framed:
                    sealed = core.job_frame(model_id, [FramedJob(ids[index], body) for index, body in items],
                                            timeout=left, reply_to=reply_to, again=request)
                else:
                    sealed = core.job_of_body(model_id, items[0][1], timeout=left, reply_to=reply_to, again=request)
                message = Message(body=sealed.body, correlation_id=sealed.job_id, reply_to=reply_to or core.reply_to,
                                  message_id=sealed.job_id)
                deadline = asyncio.get_running_loop().time() + left
                try:
                    await self._publish_until_confirmed(broker, sealed, message, deadline)
                except BrokerError:
                    pass  # the first copy may still be queued: wait for its answer all the same
                journal.resent += len(items)
            else:
                journal.collected += len(items)
            try:
                async with asyncio.timeout(max(0.0, left)):
                    outcome = await future
            except TimeoutError:
                return None
        finally:
            self._pending.pop(request.request_id, None)
            core.forget(request.request_id)
        if isinstance(outcome, JobError):
            return None if outcome.code == bodies.ErrorCode.EXPIRED else outcome
        return outcome if isinstance(outcome, Outcome) else None  # a stale-epoch notice: anew

    async def _close_journal(self, journal: BatchJournal, sub: Subscription | None, *, completed: bool) -> None:
        """A batch completed: its queue is deleted (and, with ``auto_keep``, its journal). Stopped
        early: the queue keeps what still arrives for the next run."""
        try:
            async with asyncio.timeout(min(self.timeout, CLOSE_TIMEOUT)):
                if completed and self._broker is not None and journal.reply_queue is not None:
                    await self._broker.delete_reply_queue(journal.reply_queue)
                elif sub is not None:
                    await sub.cancel()
        except (BrokerError, TimeoutError):
            pass
        if completed and journal.auto_keep:
            journal.discard()
        else:
            journal.close()

    async def upload_model(self, model: bytes | str | Path, *, owner_key: Any = None,
                           allowed_producers: Iterable[Any] | None = None, timeout: float | None = None,
                           progress: Progress | None = None) -> str:
        """Upload an ONNX model (path or bytes) in sealed chunks; returns its id (SHA-256 hex).

        Every chunk carries a manifest signed by ``owner_key`` (default: the client's owner key,
        else its producer key, else a key made for this client alone -- then only this client can
        ever delete or replace the model). ``allowed_producers`` (public keys: 32 bytes, hex or
        key files) restricts who may run it; None lets every producer the pool serves run it."""
        # A model file can be hundreds of MB: read it off the event loop.
        data = await asyncio.to_thread(Path(model).read_bytes) if isinstance(model, (str, Path)) else bytes(model)
        timeout = timeout or self.timeout
        allowed = None if allowed_producers is None else [
            k if isinstance(k, bytes) else parse_public_key(k) for k in allowed_producers]
        model_id, chunks = self._core_or_raise().model_chunks(
            data, owner_key=self._owner(owner_key), allowed_producers=allowed, timeout=timeout)
        window = asyncio.Semaphore(4)  # chunks are large: keep a few in flight, not all
        sent, total = 0, len(chunks)

        async def one(make: Callable[[], Request]) -> Outcome:
            nonlocal sent
            async with window:
                outcome = await self._request(make, timeout)
            sent += 1
            if progress:
                progress(sent, total)
            return outcome

        # The first chunk alone: every chunk states the model's size and owner, so a pool that will
        # refuse the model (too large, another owner's id) says so before the rest is sent.
        first = await one(chunks[0])
        if not first.ok:
            raise first.error()
        refused: list[Outcome] = []

        async def rest(make: Callable[[], Request]) -> Outcome | None:
            if refused:  # one chunk was refused: the upload has failed, send nothing more
                return None
            outcome = await one(make)
            if not outcome.ok:
                refused.append(outcome)
            return outcome

        outcomes = [first, *[o for o in await asyncio.gather(*(rest(make) for make in chunks[1:])) if o is not None]]
        if refused:
            raise refused[0].error()
        acks = [bodies.decode_ack(o.body) for o in outcomes]
        if not any(a.get("complete") and a.get("model_id") == model_id for a in acks):
            raise ModelRejected("the worker did not confirm the complete model", job_id=None)
        return model_id

    # -- pipelines -------------------------------------------------------------------------
    async def create_pipeline(self, pipeline: PipelineSpec | str | os.PathLike[str], *,
                              models: Mapping[str, bytes | str | os.PathLike[str]] | None = None,
                              owner_key: Any = None, timeout: float | None = None,
                              progress: Callable[[str, int, int], None] | None = None) -> str:
        """Create (or replace) a pipeline on the pool; returns its id.

        ``pipeline`` is a pipeline.toml path (``protocol.pipeline.load_pipeline_toml``: stage
        models named by file are read from the TOML's directory) or a resolved ``PipelineSpec``.
        ``models`` adds model bytes (or files) by model id, for specs whose stages name models
        the pool may not hold. In order:

        1. every stage model the pool lacks and whose bytes are known is uploaded with
           ``upload_model`` under the same owner key (``progress(model_id, done, total)`` per chunk);
        2. the wiring is type-checked against the models' real inputs and outputs, so a mapping
           that cannot work fails here, naming the TOML key (``PipelineRejected.key``);
        3. the pipeline's event stream (pool, pipeline id, source topic) and one inbox per
           recipient (:func:`producer_sdk.core.inbox_name`, filtered by the sink topic) are
           declared, so results of events published before a recipient ever subscribes wait
           in its inbox;
        4. the definition, signed by ``owner_key`` (default as for ``upload_model``), is sent to
           every worker; replacing a pipeline takes a newer signature by the same owner key.

        Refusals: ``PipelineRejected`` (invalid definition, wiring, a stale definition, or a
        changed source or sink topic: delete the pipeline first), ``UnknownModel`` (a stage
        model neither in the pool nor given), ``NotOwner``/``BadSignature``, broker errors."""
        timeout = timeout or self.timeout
        files: dict[str, bytes] = {}
        if isinstance(pipeline, PipelineSpec):
            spec = pipeline
        else:
            try:
                spec, files = await asyncio.to_thread(load_pipeline_toml, pipeline)
            except PipelineError as exc:
                raise PipelineRejected(str(exc), key=exc.key) from None
        for model_id, given in (models or {}).items():
            data = (await asyncio.to_thread(Path(given).read_bytes) if isinstance(given, (str, os.PathLike))
                    else bytes(given))
            if hashlib.sha256(data).hexdigest() != model_id:
                raise PipelineRejected(f"models: the bytes given for model {model_id[:12]}... hash to another id")
            files[model_id] = data
        key = self._owner(owner_key)
        pid = pipeline_id(public_key_bytes(key), spec.name)

        held = {m.model_id: m for m in await self.list_models(timeout=timeout)}
        missing = [m for m in dict.fromkeys(spec.model_ids) if m not in held and m in files]
        for model_id in missing:
            def report(done: int, total: int, model_id: str = model_id) -> None:
                if progress is not None:
                    progress(model_id, done, total)
            await self.upload_model(files[model_id], owner_key=key, timeout=timeout, progress=report)
        if missing:
            held = {m.model_id: m for m in await self.list_models(timeout=timeout)}
        if all(m in held for m in spec.model_ids):
            try:
                check_stage_mapping(spec, {m: _signature(held[m]) for m in spec.model_ids})
            except PipelineError as exc:
                raise PipelineRejected(str(exc), key=exc.key) from None
        # else: a model this session may not see (an allow-list) or does not have -- the workers,
        # which check the same wiring, answer for it (unknown_model, or the mapping error).

        current = {p.pipeline_id: p for p in await self.list_pipelines(timeout=timeout)}.get(pid)
        await self._declare_pipeline_queues(pid, spec, timeout)
        core = self._core_or_raise()
        issued = _IssuedMs(self._clock, current.issued_ms if current is not None else 0)
        # Signed again for each attempt (a resend after a rotation): a worker that installed the
        # first copy would refuse an equal issued_ms as a replay.
        retries = 0
        while not (outcome := await self._request(
                lambda: core.pipeline_put(sign_pipeline(spec, key, issued()), timeout=timeout), timeout)).ok:
            error = _pipeline_error(outcome)
            # The pool listed every stage model, yet the worker that took the definition lacks one:
            # an upload still reaching it (an upload goes to every worker, and one confirmation is
            # enough for this client). Asked again, briefly; any other refusal is final.
            if not (isinstance(error, UnknownModel) and all(m in held for m in spec.model_ids)) \
                    or retries == _STAGE_MODEL_RETRIES:
                raise error
            await asyncio.sleep(_STAGE_MODEL_BACKOFF * 2**retries)
            retries += 1
        return pid

    async def _declare_pipeline_queues(self, pid: str, spec: PipelineSpec, timeout: float) -> None:
        broker, _ = self._connection()
        what = "the pipeline's event stream"
        try:
            async with asyncio.timeout(timeout):
                await broker.declare_stream(self.pool, pid, spec.source_topic, exchange=spec.source_exchange)
                what = "the recipients' inboxes"
                for recipient in spec.recipients:
                    await broker.declare_inbox(inbox_name(self.pool, pid, recipient), spec.sink_topic,
                                               exchange=spec.sink_exchange)
        except TimeoutError:
            raise BrokerUnreachable(f"the broker did not declare {what} within {timeout:g}s") from None
        except (BrokerUnavailable, QueueNotFound) as exc:
            raise BrokerUnreachable(f"could not declare {what}: {exc}") from None
        except BrokerError:
            # Brokers refuse to redeclare a queue with another binding: the pipeline exists with
            # another topic, and its queued events or results would be stranded by a silent change.
            topic = "source.topic" if what.startswith("the pipeline") else "sink.topic"
            raise PipelineRejected(f"{topic}: pipeline {pid} already exists with another {topic.split('.')[0]} "
                                   f"topic; delete it first to change the topic", key=topic) from None

    async def list_pipelines(self, *, timeout: float | None = None) -> list[bodies.PipelineInfo]:
        """The pipelines defined on the pool (as one worker holds them)."""
        timeout = timeout or self.timeout
        core = self._core_or_raise()
        outcome = await self._request(lambda: core.pipeline_list(timeout=timeout), timeout)
        if not outcome.ok:
            raise outcome.error()
        try:
            return bodies.decode_pipelines(outcome.body)
        except ProtocolError as exc:
            raise JobError(f"the pool's pipeline list does not decode: {exc}", job_id=outcome.job_id) from None

    async def delete_pipeline(self, pipeline_id: str, *, owner_key: Any = None, timeout: float | None = None) -> None:
        """Delete a pipeline from every worker (an order signed by its owner's key), then its
        event stream: events published afterwards are refused by the broker (``UnknownPipeline``
        for publishers) instead of piling up unread. The recipients' inboxes are kept, with the
        results they still hold; a recipient removes its own when done."""
        timeout = timeout or self.timeout
        if not _PIPELINE_ID.fullmatch(pipeline_id):
            raise UnknownPipeline(f"{pipeline_id[:80]!r} is not a pipeline id (64 lowercase hex characters)")
        core = self._core_or_raise()
        key = self._owner(owner_key)
        current = {p.pipeline_id: p for p in await self.list_pipelines(timeout=timeout)}.get(pipeline_id)
        issued = _IssuedMs(self._clock, current.issued_ms if current is not None else 0)
        outcome = await self._request(
            lambda: core.pipeline_delete(sign_pipeline_delete(pipeline_id, key, issued()), timeout=timeout), timeout)
        if not outcome.ok:
            raise _pipeline_error(outcome)
        broker, _ = self._connection()
        try:
            async with asyncio.timeout(timeout):
                await broker.delete_stream(self.pool, pipeline_id)
        except (BrokerError, TimeoutError) as exc:
            log.warning("pipeline %s is deleted, but its event stream could not be removed (%s)", pipeline_id, exc)

    def _owner(self, owner_key: Any) -> Any:
        key = _signing_key(owner_key) or self._owner_key or self.producer_key
        if key is None:
            key = self._owner_key = generate_signing_key()
            log.info("no owner key given: models uploaded by this client are owned by a key made for it alone")
        return key

    async def delete_model(self, model_id: str, *, owner_key: Any = None, timeout: float | None = None) -> None:
        """Delete a model from every worker of the pool; the order is signed by its owner's key."""
        timeout = timeout or self.timeout
        core = self._core_or_raise()
        key = self._owner(owner_key)
        outcome = await self._request(lambda: core.model_delete(model_id, owner_key=key, timeout=timeout), timeout)
        if not outcome.ok:
            raise outcome.error()

    async def list_models(self, *, timeout: float | None = None) -> list[bodies.ModelInfo]:
        timeout = timeout or self.timeout
        core = self._core_or_raise()
        outcome = await self._request(lambda: core.model_list(timeout=timeout), timeout)
        if not outcome.ok:
            raise outcome.error()
        return bodies.decode_models(outcome.body)

    async def rotate_pool(self, *, grace_seconds: int = 300, timeout: float | None = None) -> tuple[int, int]:
        """Ask the pool to rotate its key: returns (new epoch, when the old key is erased, ms since
        the Unix epoch). Jobs sealed to the old epoch are served until then; this client's next
        jobs use the new key."""
        timeout = timeout or self.timeout
        core = self._core_or_raise()
        # Never resent on a "stale epoch" notice: those are unauthenticated, and a forged one must
        # not turn one rotation into two.
        outcome = await self._request(lambda: core.pool_rotate(grace_seconds, timeout=timeout), timeout, resend=False)
        if not outcome.ok:
            raise outcome.error()
        epoch, retire_at_ms = bodies.decode_rotated(outcome.body)
        await self._start_refresh()
        return epoch, retire_at_ms

    async def pool_status(self, wait: float = 2.0, *, max_members: int = MAX_STATUS_MEMBERS,
                          timeout: float | None = None) -> list[bodies.MemberStatus]:
        """Ask every member of the pool for its status; return the answers that arrive within
        ``wait`` seconds of sending (at most ``max_members``, one per worker id), by worker id.

        The request is broadcast and each member answers for itself, sealed to this client's
        session like any result: only a producer that attested the pool can read the answers,
        and only a pool member can write one. An answer that opens but does not decode (or is an
        error, e.g. from a worker too old to know the request) is skipped and counted in
        :attr:`skipped_status_answers`; an empty list means no member answered in time. If the
        pool rotated away the epoch the request was sealed to, the client re-attests and asks
        again. ``timeout`` bounds publishing and is the request's deadline (default: the client's)."""
        if not 0 < wait <= MAX_STATUS_WAIT_SECONDS:
            raise ValueError(f"wait must be in (0, {MAX_STATUS_WAIT_SECONDS:g}] seconds")
        if not 1 <= max_members <= MAX_STATUS_MEMBERS:
            raise ValueError(f"max_members must be 1..{MAX_STATUS_MEMBERS}")
        timeout = timeout or self.timeout
        for _ in range(STALE_EPOCH_RETRIES + 1):
            members, stale, epoch = await self._collect_status(wait, max_members, timeout)
            if members or not stale:
                return sorted(members.values(), key=lambda m: m.worker_id)
            # Every answer said the session's epoch is erased: re-attest, then ask again.
            if self._core_or_raise().epoch <= epoch:
                try:
                    async with asyncio.timeout(self.attest_timeout):
                        await asyncio.shield(self._start_refresh())
                except TimeoutError:
                    return []
        return []

    async def _collect_status(self, wait: float, max_members: int,
                              timeout: float) -> tuple[dict[str, bodies.MemberStatus], int, int]:
        """One broadcast pool_status request: the members that answered within ``wait`` (by
        worker id), how many stale-epoch notices came, and the epoch the request was sealed to."""
        broker, core = self._connection()
        request = self._core_or_raise().pool_status(timeout=timeout)
        members: dict[str, bodies.MemberStatus] = {}
        stale = 0
        full = asyncio.Event()

        def take(outcome: Outcome | StaleEpochNotice | JobError) -> None:
            nonlocal stale
            if full.is_set():
                return
            if isinstance(outcome, StaleEpochNotice):
                stale += 1
                return
            try:
                if not isinstance(outcome, Outcome) or not outcome.ok:
                    raise ProtocolError("an error answer" if isinstance(outcome, Outcome) else str(outcome))
                if outcome.header.content_type != bodies.MEMBER_STATUS:
                    raise ProtocolError(f"content type {outcome.header.content_type!r}")
                status = bodies.decode_member_status(outcome.body)
            except ProtocolError as exc:
                self.skipped_status_answers += 1
                log.warning("pool %r: a member's status answer was skipped (%s)", self.pool, str(exc)[:200])
                return
            # One entry per worker id, the first kept: a copy the broker delivers again adds nothing.
            members.setdefault(status.worker_id, status)
            if len(members) >= max_members:
                full.set()

        message = Message(body=request.body, correlation_id=request.job_id, reply_to=core.reply_to,
                          message_id=request.job_id)
        core.collect(request.job_id)
        self._collectors[request.job_id] = take
        try:
            deadline = asyncio.get_running_loop().time() + timeout
            try:
                async with asyncio.timeout_at(deadline):
                    await self._publish_until_confirmed(broker, request, message, deadline)
            except TimeoutError:
                raise JobTimeout(f"the broker did not confirm status request {request.job_id} within "
                                 f"{timeout:g}s") from None
            except Unroutable:
                return members, stale, request.epoch  # nobody listens on the pool's control channel
            except BrokerError as exc:
                raise BrokerUnreachable(f"could not publish status request {request.job_id}: {exc}") from None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await full.wait()
            return dict(members), stale, request.epoch
        finally:
            self._collectors.pop(request.job_id, None)
            core.forget(request.job_id)

    def _core_or_raise(self) -> ProducerCore:
        _, core = self._connection()
        if core.session is None:
            raise ClientClosed("the client is closed or not connected")
        return core


_PIPELINE_ID = re.compile(r"[0-9a-f]{64}")


class _IssuedMs:
    """``issued_ms`` for successive signatures of one pipeline statement: the clock, but always
    above the one in force (``floor``) and above the previous call's (a resend is newer)."""

    def __init__(self, clock: Callable[[], float], floor: int) -> None:
        self._clock = clock
        self._last = floor

    def __call__(self) -> int:
        self._last = max(int(self._clock() * 1000), self._last + 1)
        return self._last


def _signature(info: bodies.ModelInfo) -> ModelSignature:
    """A model's inputs and outputs as ``check_stage_mapping`` takes them."""
    return ({name: (dtype, shape) for name, dtype, shape in info.inputs},
            {name: (dtype, shape) for name, dtype, shape in info.outputs})


# create_pipeline: how often (and from how long a pause, doubling) a definition refused for a stage
# model the pool listed is sent again: ~3 s in all, for an upload still reaching another worker.
_STAGE_MODEL_RETRIES = 5
_STAGE_MODEL_BACKOFF = 0.1


def _pipeline_error(outcome: Outcome) -> JobError:
    error = outcome.error()
    if error.code == bodies.ErrorCode.STALE_ORDER:
        # For a pipeline, "stale" means a definition or delete order at least as new is in force.
        return PipelineRejected(str(error), code=error.code, job_id=error.job_id)
    return error


def _signing_key(key: Any) -> Any:
    """An Ed25519 private key object, or one loaded from a key file path."""
    if key is None or isinstance(key, Ed25519PrivateKey):
        return key
    if isinstance(key, (str, Path)):
        return load_signing_key(key)
    raise TypeError("keys must be Ed25519 private keys or paths to key files from `enclaveq keys generate`")


__all__ = ["AsyncClient", "JobResult", "AttestationFailed"]
