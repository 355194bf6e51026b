"""The producer's I/O-free core: challenge, verify, seal requests, decode every reply.

Both ``AsyncClient`` and the synchronous ``Client`` (which drives an ``AsyncClient``) sit on this
class; it never touches the network, and takes the clock, randomness and the evidence verifier
as arguments, so tests pin all three. What it owns:

* attestation: the open challenges (each takes answers until one verifies -- anyone who sees a
  nonce can answer it -- with a bounded verification budget, keeping only its most informative
  refusal), the verified claims and the sessions (the current one and a few earlier ones whose
  jobs may still be answered);
* the newest pool epoch seen (:mod:`.epochs`, P13): a statement below it is refused even when
  its evidence verifies, so no request is ever sealed to a key the pool rotated away from;
* requests: sealing each under the current session, with the broker channel it goes on
  (:mod:`protocol.routing`) and the model its result must name; pipeline definitions, delete
  orders and listings like model requests, and events on their topic (an event's result goes
  to the pipeline's recipients, so only a failure comes back here);
* replies: :meth:`ProducerCore.receive` turns any message from the reply queue into what the
  client must do with it -- an attestation answer, an authenticated outcome for a pending
  request (duplicates dropped, the pinned model checked), a stale-epoch notice, or nothing.
"""

from __future__ import annotations

import dataclasses

import functools
import hashlib
import logging
import os
import time
import itertools
import uuid
from dataclasses import dataclass
from datetime import datetime, UTC
from typing import Any
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation.claims import Claims
from attestation.errors import AttestationError, PolicyViolation
from attestation.verify import verify_evidence
from protocol import bodies, crypto, frames
from protocol.envelope import Chunk, ProducerSession, ResultHeader, peek_result
from protocol.errors import ProtocolError
from protocol.handshake import Challenge, ControlError, EvidenceResponse, Statement, control_kind
from protocol.routing import Route, route_for
from protocol.ownership import DeleteOrder, ModelManifest, ProducerProof, public_key_bytes
from protocol.pipeline import PipelineDelete, SignedPipeline
from protocol.results import check_event_id

from .epochs import EpochMark, EpochMarks
from .errors import AttestationFailed, EpochRollback, JobError, job_error
from .journal import SentRequest, SessionRecord

log = logging.getLogger("enclaveq.producer")

MODEL_CHUNK_BYTES = 4 * 1024 * 1024
KEPT_SESSIONS = 8  # earlier sessions still open results of jobs sent before a re-attestation
# Answers a challenge runs the evidence verifier on before it closes. Anyone who sees the nonce
# (the broker does) can answer as often as they like, and each such answer costs a verification;
# answers refused before that (malformed, another nonce, a clear-text refusal) cost no more than
# receiving them, so they are not counted and cannot close the challenge.
MAX_VERIFICATIONS_PER_CHALLENGE = 16
MAX_OPEN_CHALLENGES = 8  # a backstop: clients close every challenge they open


def to_numpy(value: Any) -> np.ndarray:
    """numpy arrays as they are; torch tensors (when torch is installed) via .numpy()."""
    if type(value).__module__.startswith("torch"):
        array: np.ndarray = value.detach().cpu().numpy()
        return array
    return np.asarray(value)


ATTESTATION_PREFIX = "att-"  # correlation ids of challenges; every other reply answers a request


def inbox_name(pool: str, pipeline_id: str, recipient_public_key: bytes) -> str:
    """The broker inbox of one recipient of one pipeline on one pool (docs/pipelines.md): created
    with the pipeline (``AsyncClient.create_pipeline``), consumed by the recipient's subscriber.

    The pool is part of the name: a pipeline's id depends only on its owner and its name, so the
    same pipeline created on two pools of one broker (staging and production, say) would otherwise
    share one inbox, and each pool's subscriber would take -- and refuse, as another pool's --
    results meant for the other's recipient. A digest stands for the pool, because a pool name may
    be as long as an inbox name may be."""
    pool_tag = hashlib.sha256(pool.encode()).hexdigest()[:16]
    return f"{pipeline_id}.{recipient_public_key.hex()[:32]}.{pool_tag}"


@dataclass(frozen=True)
class Request:
    """A sealed request, ready to publish on ``route``."""

    job_id: str
    kind: str
    body: bytes
    deadline_ms: int
    epoch: int  # the pool epoch its session is sealed to
    route: Route
    model_id: str | None = None  # the model the result must name (pinning)
    # Route.STREAM only: the concrete topic the event is published on (it matches the pipeline's
    # source filter; the broker routes it to the pipeline's stream by that topic).
    topic: str | None = None
    exchange: str = "enclaveq.events"  # the AMQP exchange of that topic (MQTT: one topic space)


class StaleEpochNotice:
    """A worker's clear-text notice that a request's epoch key is erased: re-attest, seal again.
    Unauthenticated (the worker has no key left to seal with), so it may only trigger that."""


STALE_EPOCH_NOTICE = StaleEpochNotice()


@dataclass(frozen=True)
class AttestationAnswer:
    """A worker's answer to one of our challenges, to pass to :meth:`ProducerCore.accept_evidence`."""

    correlation_id: str
    body: bytes


@dataclass(frozen=True)
class Reply:
    """What a pending request receives: its authenticated outcome, a stale-epoch notice (re-attest
    and seal again), or the error an authenticated but unacceptable result amounts to."""

    job_id: str
    outcome: Outcome | StaleEpochNotice | JobError


@dataclass(frozen=True)
class Outcome:
    """An opened, authenticated result."""

    job_id: str
    header: ResultHeader
    body: bytes

    @property
    def ok(self) -> bool:
        return self.header.status == "ok"

    def error(self) -> JobError:
        err = bodies.ErrorBody.from_bytes(self.body)
        return job_error(err.code, err.message, self.job_id)

    def tensors(self) -> dict[str, np.ndarray]:
        if not self.ok:
            raise self.error()
        return bodies.decode_tensors_body(self.body)

    def framed(self, expected: Sequence[str]) -> list[dict[str, np.ndarray] | JobError]:
        """The answer to a frame of the jobs ``expected``: each job's outputs or its own error,
        in frame order. A frame refused as a whole (expired, unknown model...) raises its error."""
        if not self.ok:
            raise self.error()
        if self.header.content_type != frames.JOB_RESULTS:
            raise JobError(f"the answer to frame {self.job_id} is not a frame's results", code="malformed",
                           job_id=self.job_id)
        try:
            results = frames.decode_frame_results(self.body, expected)
        except ProtocolError as exc:
            raise JobError(f"the answer to frame {self.job_id} is malformed: {exc}", code="malformed",
                           job_id=self.job_id) from None
        out: list[dict[str, np.ndarray] | JobError] = []
        for result in results:
            if result.status == "ok":
                try:
                    out.append(bodies.decode_tensors_body(result.body))
                except ProtocolError as exc:
                    out.append(JobError(f"the result of job {result.job_id} is malformed: {exc}", code="malformed",
                                        job_id=result.job_id))
            else:
                try:
                    err = bodies.ErrorBody.from_bytes(result.body)
                    out.append(job_error(err.code, err.message, result.job_id))
                except ProtocolError:
                    out.append(JobError(f"job {result.job_id} failed (unreadable error)", code="malformed",
                                        job_id=result.job_id))
        return out


# How much a refused answer tells the user; the most informative one is reported if none verifies.
_MALFORMED, _WORKER_REFUSED, _MISMATCHED, _INVALID, _POLICY, _ROLLED_BACK = range(6)


class _Refusal(Exception):
    def __init__(self, rank: int, error: AttestationFailed) -> None:
        self.rank = rank
        self.error = error


class _OpenChallenge:
    """A challenge still taking answers: its nonce, how many answers were refused, the best refusal."""

    __slots__ = ("nonce", "verifications", "refusal", "_rank")

    def __init__(self, nonce: bytes) -> None:
        self.nonce = nonce
        self.verifications = 0  # refused answers that cost an evidence verification
        self.refusal: AttestationFailed | None = None
        self._rank = -1

    @property
    def spent(self) -> bool:
        return self.verifications >= MAX_VERIFICATIONS_PER_CHALLENGE

    def refused(self, refusal: _Refusal) -> None:
        if refusal.rank >= _INVALID:
            self.verifications += 1
        if refusal.rank > self._rank:  # ties keep the first
            self.refusal, self._rank = refusal.error, refusal.rank


def _rollback(pool: str, epoch: int, mark: EpochMark) -> EpochRollback:
    where = (f"remembered in {mark.file}" if mark.file is not None else "seen by this client")
    forget = (f" If pool {pool!r} was deliberately deleted and created again under the same name, forget the old "
              f"pool's epoch: remove the key {pool!r} from {mark.file}, or call "
              f"producer_sdk.epochs.forget_pool({pool!r}, {str(mark.file)!r})." if mark.file is not None else "")
    return EpochRollback(
        f"pool {pool!r} attested epoch {epoch}, older than epoch {mark.epoch} which this producer already used "
        f"({where}): a worker that missed a key rotation, or whose sealed state was rolled back, answered; "
        f"refusing to seal to the older key.{forget}",
        epoch=epoch, newest=mark.epoch, state_file=str(mark.file) if mark.file is not None else None)


class ProducerCore:
    def __init__(self, *, pool: str, policy: Any, reply_to: str, clock: Callable[[], float] = time.time,
                 rng: crypto.Random = os.urandom, verifier: Callable[..., Claims] = verify_evidence,
                 verify_options: Mapping[str, Any] | None = None,
                 producer_key: Ed25519PrivateKey | None = None, epochs: EpochMarks | None = None) -> None:
        self.pool = pool
        # Ed25519 key proving who this producer is, for models whose owner keeps an allow-list.
        self.producer_key = producer_key
        self.policy = policy
        self.reply_to = reply_to
        self._clock = clock
        self._rng = rng
        self._verify = verifier
        # Extra inputs for hardware evidence: trust anchors (tests inject fake roots) and collateral.
        self._verify_options = dict(verify_options or {})
        self._challenges: dict[str, _OpenChallenge] = {}
        # The newest epoch seen for the pool (P13): no statement below it is ever accepted.
        self._epochs = epochs if epochs is not None else EpochMarks()
        self.session: ProducerSession | None = None
        self._sessions: dict[bytes, ProducerSession] = {}
        # Set when a result says the pool moved to a newer epoch than our session's (rotation).
        self.newer_epoch: int | None = None
        self.claims: Claims | None = None
        self.statement: Statement | None = None
        self._done: dict[str, int] = {}
        # Broadcast requests every member answers (pool_status): each answer is passed on, not
        # dropped as a duplicate of the first; the caller tells members apart (collect()).
        self._collecting: set[str] = set()
        # The model each request's result must name, by job id, while it is pending.
        self._pins: dict[str, str] = {}
        self.duplicates = 0
        self.unopenable = 0
        self._job_id_prefix: str | None = None
        self._job_numbers = itertools.count()

    def new_job_id(self) -> str:
        """A job id no other job of this client has: a random prefix drawn once, then a counter.
        Ids need to be unique, not secret (they are bound to each job by its seal); one draw of
        randomness per job cost more than sealing a small job (os.urandom is a system call)."""
        if self._job_id_prefix is None:
            self._job_id_prefix = self._rng(8).hex()
        return f"{self._job_id_prefix}{next(self._job_numbers):016x}"

    # -- attestation -----------------------------------------------------------------------
    def challenge(self) -> tuple[str, bytes]:
        correlation_id = ATTESTATION_PREFIX + uuid.UUID(bytes=self._rng(16)).hex
        nonce = self._rng(32)
        self._challenges[correlation_id] = _OpenChallenge(nonce)
        while len(self._challenges) > MAX_OPEN_CHALLENGES:  # a caller that never closes its challenges
            del self._challenges[next(iter(self._challenges))]
        return correlation_id, Challenge(nonce=nonce).to_bytes()

    def challenge_open(self, correlation_id: str) -> bool:
        """Whether ``correlation_id`` still takes answers (none verified, the verification budget not spent)."""
        challenge = self._challenges.get(correlation_id)
        return challenge is not None and not challenge.spent

    def close_challenge(self, correlation_id: str) -> AttestationFailed | None:
        """Stop taking answers to ``correlation_id``; the most informative refusal of an answer
        to it, if any was refused (None: nobody answered)."""
        challenge = self._challenges.pop(correlation_id, None)
        return challenge.refusal if challenge is not None else None

    @property
    def epoch(self) -> int:
        """The pool epoch new requests are sealed to (0 before the first attestation)."""
        return self.session.epoch if self.session is not None else 0

    def accept_evidence(self, correlation_id: str, data: bytes, *, keep_open: bool = False) -> Claims:
        """Verify a worker's answer to our challenge; on success, open a session bound to it.

        The broker can answer a challenge too (it sees the nonce), so one refused answer proves
        nothing about the pool. With ``keep_open`` the challenge keeps taking answers until one
        verifies, running the verifier on at most :data:`MAX_VERIFICATIONS_PER_CHALLENGE` of them --
        what ``AsyncClient`` does. Without it the challenge is spent by this one answer."""
        challenge = self._challenges.get(correlation_id)
        if challenge is None or challenge.spent:
            raise AttestationFailed("evidence answers no challenge of ours (replayed or unsolicited)")
        if not keep_open:
            del self._challenges[correlation_id]
        try:
            claims, st = self._verify_answer(challenge.nonce, data)
            try:
                session = ProducerSession(pool=self.pool, epoch=st.epoch, pool_public_key=st.pool_public_key,
                                          rng=self._rng)
            except ValueError:  # e.g. a small-order X25519 point: no shared secret can come of it
                raise _Refusal(_INVALID, AttestationFailed(
                    "the attested pool public key is not a usable X25519 key")) from None
        except _Refusal as refusal:
            challenge.refused(refusal)
            raise refusal.error from None
        self._challenges.pop(correlation_id, None)
        self.claims = claims
        self.statement = st
        self._epochs.observe(self.pool, st.epoch)
        self.session = session
        if self.producer_key is not None:
            self.session.producer_proof = ProducerProof.create(
                self.producer_key, pool=self.pool, epoch=st.epoch, session_id=self.session.session_id,
                sealed_session=self.session.sealed_session).to_bytes()
        self._sessions[self.session.session_id] = self.session
        while len(self._sessions) > KEPT_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        if self.newer_epoch is not None and self.newer_epoch <= st.epoch:
            self.newer_epoch = None
        return claims

    def _verify_answer(self, nonce: bytes, data: bytes) -> tuple[Claims, Statement]:
        """The verified claims and statement of one answer, or a :class:`_Refusal` ranked by how
        much it tells the user (a garbled message least, genuine evidence of an old epoch most)."""
        try:
            if control_kind(data) == "control_error":
                err = ControlError.from_bytes(data)
                raise _Refusal(_WORKER_REFUSED,
                               AttestationFailed(f"worker refused the challenge: {err.code}: {err.message}",
                                                 busy=err.code == "busy"))
            response = EvidenceResponse.from_bytes(data)
        except ProtocolError as exc:
            raise _Refusal(_MALFORMED, AttestationFailed(f"malformed attestation response: {exc}")) from None
        st = response.statement
        problems = []
        if st.nonce != nonce:
            problems.append("statement.nonce does not equal the nonce of this challenge (a replayed answer)")
        if st.pool != self.pool:
            problems.append(f"statement.pool is {st.pool!r}, expected {self.pool!r}")
        if st.suite != crypto.SUITE_ID:
            problems.append(f"statement.suite is {st.suite!r}, expected {crypto.SUITE_ID!r}")
        if problems:
            raise _Refusal(_MISMATCHED, AttestationFailed("; ".join(problems)))
        now = datetime.fromtimestamp(self._clock(), tz=UTC)
        try:
            claims = self._verify(response.platform, response.evidence, self.policy,
                                  expected_report_data=st.report_data(), now=now, **self._verify_options)
        except PolicyViolation as exc:
            raise _Refusal(_POLICY, AttestationFailed(f"the pool's evidence violates the policy:\n{exc}",
                                                      violations=tuple(exc.violations))) from None
        except AttestationError as exc:
            raise _Refusal(_INVALID, AttestationFailed(f"the pool's evidence is not valid: {exc}")) from None
        except Exception as exc:  # attacker-written bytes must never escape as anything but a refusal
            log.debug("evidence verification raised", exc_info=True)
            raise _Refusal(_INVALID, AttestationFailed(
                f"the pool's evidence could not be verified ({type(exc).__name__})")) from None
        # Only now is the statement's epoch vouched for by a TEE: never seal to an older one than
        # we have seen (a worker that missed a rotation, or a rolled-back one).
        mark = self._epochs.newest(self.pool)
        if mark is not None and st.epoch < mark.epoch:
            raise _Refusal(_ROLLED_BACK, _rollback(self.pool, st.epoch, mark))
        return claims, st

    # -- requests --------------------------------------------------------------------------
    def _seal(self, kind: str, body: bytes, *, timeout: float, content_type: str, model_id: str | None = None,
              chunk: Chunk | None = None, topic: str | None = None, reply_to: str | None = None,
              again: SentRequest | None = None) -> Request:
        """Seal a request under the current session -- or, ``again``, a copy of a request sent
        before (by a process that died) under its own session, id and deadline, so that a worker
        that already answered it drops the copy (the replay guard keys on session and id)."""
        if self.session is None:
            raise AttestationFailed("no verified session: connect first")
        route = route_for(kind)
        if (route is Route.STREAM) != (topic is not None):
            raise ValueError("events, and only events, are published on a topic")
        if again is None:
            session, job_id = self.session, self.new_job_id()
            deadline_ms = int((self._clock() + timeout) * 1000)
        else:
            session, job_id, deadline_ms = self._sessions[again.session_id], again.request_id, again.deadline_ms
        header = session.header(kind, job_id=job_id, deadline_ms=deadline_ms, reply_to=reply_to or self.reply_to,
                                content_type=content_type, model_id=model_id, chunk=chunk)
        if model_id is not None:
            self._pins[job_id] = model_id
        return Request(job_id=job_id, kind=kind, body=session.seal(header, body), deadline_ms=deadline_ms,
                       epoch=session.epoch, route=route, model_id=model_id, topic=topic)

    # -- resumable batches (producer_sdk.journal) ------------------------------------------
    def session_record(self) -> SessionRecord:
        """The current session as a batch journal keeps it (its key included)."""
        if self.session is None:
            raise AttestationFailed("no verified session: connect first")
        return SessionRecord(session_id=self.session.session_id, epoch=self.session.epoch,
                             sealed_session=self.session.sealed_session, key=self.session.export_key())

    def restore_session(self, record: SessionRecord) -> None:
        """Open results of (and seal copies of) requests a dead process sent under ``record``. It
        never becomes the session new requests are sealed under: that one comes from a fresh
        attestation of this process."""
        if record.session_id in self._sessions:
            return
        session = ProducerSession(pool=self.pool, epoch=record.epoch, pool_public_key=b"", session_key=record.key,
                                  session_id=record.session_id, sealed_session=record.sealed_session)
        if self.producer_key is not None:
            session.producer_proof = ProducerProof.create(
                self.producer_key, pool=self.pool, epoch=record.epoch, session_id=record.session_id,
                sealed_session=record.sealed_session).to_bytes()
        # Ahead of the current one in eviction order: a restored session only serves one batch.
        self._sessions = {record.session_id: session, **self._sessions}

    def knows_session(self, session_id: bytes) -> bool:
        return session_id in self._sessions

    def pin(self, job_id: str, model_id: str) -> None:
        """Expect ``job_id``'s result to name ``model_id`` (a request a dead process sent)."""
        self._pins[job_id] = model_id

    def forget(self, job_id: str) -> None:
        """The caller stopped waiting for ``job_id`` (timeout, failure to publish, close)."""
        self._pins.pop(job_id, None)
        if job_id in self._collecting:
            # Answers after the window are duplicates from now on, as for any finished request.
            self._collecting.discard(job_id)
            self._done[job_id] = int(self._clock() * 1000)

    def collect(self, job_id: str) -> None:
        """Pass on every answer to ``job_id`` (until :meth:`forget`), not only the first: a
        request every member of the pool answers for itself (``pool_status``)."""
        self._collecting.add(job_id)

    def job(self, model_id: str, inputs: Mapping[str, Any], *, outputs: Sequence[str] | None = None,
            timeout: float) -> Request:
        return self.job_of_body(model_id, self.job_body(inputs, outputs), timeout=timeout)

    def job_of_body(self, model_id: str, body: bytes, *, timeout: float, reply_to: str | None = None,
                    again: SentRequest | None = None) -> Request:
        """A job whose body (``job_body``) is already encoded."""
        return self._seal("job", body, timeout=timeout, content_type=bodies.TENSORS, model_id=model_id,
                          reply_to=reply_to, again=again)

    @staticmethod
    def job_body(inputs: Mapping[str, Any], outputs: Sequence[str] | None = None) -> bytes:
        """A job's body, to put in a frame (``job_frame``)."""
        return bodies.encode_job({name: to_numpy(value) for name, value in inputs.items()}, outputs)

    def job_frame(self, model_id: str, jobs: Sequence[frames.FramedJob], *, timeout: float,
                  reply_to: str | None = None, again: SentRequest | None = None) -> Request:
        """Many jobs of one model, sealed as one request (protocol.frames)."""
        return self._seal("job_frame", frames.encode_frame(jobs), timeout=timeout, content_type=frames.JOB_FRAME,
                          model_id=model_id, reply_to=reply_to, again=again)

    def model_chunks(self, data: bytes, *, owner_key: Ed25519PrivateKey,
                     allowed_producers: Sequence[bytes] | None = None,
                     timeout: float, chunk_bytes: int = MODEL_CHUNK_BYTES) -> tuple[str, list[Callable[[], Request]]]:
        """The model id and, per chunk, a function sealing it under the current session (called
        again if the pool rotated away the epoch a first attempt was sealed to). Every chunk
        carries the manifest signed with ``owner_key``."""
        model_id = hashlib.sha256(data).hexdigest()
        manifest = ModelManifest(model_id=model_id, size=len(data), owner_key=public_key_bytes(owner_key),
                                 allowed_producers=None if allowed_producers is None else tuple(allowed_producers),
                                 issued_at_ms=int(self._clock() * 1000)
                                 ).sign(owner_key)
        upload_id = uuid.UUID(bytes=self._rng(16)).hex
        count = max(1, -(-len(data) // chunk_bytes))
        view = memoryview(data)

        def chunk(i: int) -> Request:
            part = bytes(view[i * chunk_bytes:(i + 1) * chunk_bytes])
            return self._seal("model_chunk", bodies.encode_model_chunk(manifest, part), timeout=timeout,
                              content_type=bodies.MODEL_CHUNK, model_id=model_id,
                              chunk=Chunk(upload_id=upload_id, index=i, count=count, total_size=len(data)))

        return model_id, [functools.partial(chunk, i) for i in range(count)]

    def model_delete(self, model_id: str, *, owner_key: Ed25519PrivateKey, timeout: float) -> Request:
        order = DeleteOrder(model_id=model_id, owner_key=public_key_bytes(owner_key),
                            issued_at_ms=int(self._clock() * 1000)).sign(owner_key)
        return self._seal("model_delete", order, timeout=timeout, content_type=bodies.DELETE_ORDER, model_id=model_id)

    def model_list(self, *, timeout: float) -> Request:
        return self._seal("model_list", b"\x80", timeout=timeout, content_type=bodies.EMPTY)

    def pool_rotate(self, grace_seconds: int, *, timeout: float) -> Request:
        return self._seal("pool_rotate", bodies.encode_rotate(grace_seconds), timeout=timeout,
                          content_type=bodies.ROTATE)

    # -- pipelines -------------------------------------------------------------------------
    def pipeline_put(self, signed: SignedPipeline, *, timeout: float) -> Request:
        """Install (or replace) an owner-signed pipeline definition on every worker (broadcast)."""
        return self._seal("pipeline_put", signed.to_bytes(), timeout=timeout, content_type=bodies.PIPELINE)

    def pipeline_delete(self, order: PipelineDelete, *, timeout: float) -> Request:
        """Delete a pipeline from every worker, by its owner's signed order (broadcast)."""
        return self._seal("pipeline_delete", order.to_bytes(), timeout=timeout, content_type=bodies.PIPELINE_DELETE)

    def pipeline_list(self, *, timeout: float) -> Request:
        return self._seal("pipeline_list", b"\x80", timeout=timeout, content_type=bodies.EMPTY)

    def pool_status(self, *, timeout: float) -> Request:
        """Ask every member for its status (broadcast; each answers, see :meth:`collect`)."""
        return self._seal("pool_status", b"\x80", timeout=timeout, content_type=bodies.EMPTY)

    def event(self, pipeline_id: str, event_id: str, inputs: Mapping[str, Any], *, topic: str,
              timeout: float, exchange: str = "enclaveq.events") -> Request:
        """One event for ``pipeline_id``, sealed like a job, published on ``topic`` (its stream).

        On success the worker sends nothing back (the result goes to the pipeline's recipients);
        an encrypted error or a stale-epoch notice comes back on the reply queue under this
        request's job id. ``event_id`` names the result (and recipients drop duplicates by it),
        so a resend after a rotation keeps it and only the job id changes."""
        check_event_id(event_id)
        arrays = {name: to_numpy(value) for name, value in inputs.items()}
        request = self._seal("event", bodies.encode_event(pipeline_id, event_id, arrays), timeout=timeout,
                             content_type=bodies.EVENT, topic=topic)
        return dataclasses.replace(request, exchange=exchange)

    # -- replies ---------------------------------------------------------------------------
    def receive(self, correlation_id: str | None, data: bytes) -> AttestationAnswer | Reply | None:
        """Decode one message from the reply queue; None for anything to ignore (a duplicate, a
        foreign or tampered message). Only what opens under one of our sessions, or a notice
        that can at most make us re-attest, ever reaches a pending request."""
        cid = correlation_id or ""
        if cid.startswith(ATTESTATION_PREFIX):
            return AttestationAnswer(cid, data)
        outcome = self.open_result(data)
        if outcome is None:
            return None
        if isinstance(outcome, StaleEpochNotice):
            # The notice names its job only by correlation id; all it can make us do is re-attest
            # and seal the request again, a bounded number of times.
            if not cid:
                return None
            self._pins.pop(cid, None)
            return Reply(cid, outcome)
        pinned = self._pins.pop(outcome.job_id, None)
        if pinned is not None and outcome.header.model_id != pinned:
            # Authenticated by the session key, so only a pool member could get this wrong.
            return Reply(outcome.job_id, JobError(
                f"the result of job {outcome.job_id} names model {outcome.header.model_id}, not the pinned "
                f"{pinned}", code="model_mismatch", job_id=outcome.job_id))
        return Reply(outcome.job_id, outcome)

    def open_result(self, data: bytes) -> Outcome | StaleEpochNotice | None:
        """Open a result; None for anything that must be ignored (duplicate, foreign, tampered)."""
        if self.session is None:
            return None
        try:
            sealed, peeked = peek_result(data)
            header, body = self._sessions.get(peeked.session_id, self.session).open_peeked(sealed, peeked)
        except ProtocolError:
            if _is_stale_epoch_notice(data):  # checked only for what is not a result
                return STALE_EPOCH_NOTICE
            # Garbage or a tampered result on our reply queue: never accepted, never fatal.
            self.unopenable += 1
            log.warning("a message on the reply queue does not open; ignored")
            return None
        if header.current_epoch is not None and header.current_epoch > self.session.epoch:
            self.newer_epoch = max(header.current_epoch, self.newer_epoch or 0)
            # Authenticated by the session key: a pool member says the pool moved on.
            self._epochs.observe(self.pool, header.current_epoch)
        if header.job_id in self._collecting:
            return Outcome(job_id=header.job_id, header=header, body=body)
        if header.job_id in self._done:
            self.duplicates += 1
            return None
        now_ms = int(self._clock() * 1000)
        self._done[header.job_id] = now_ms
        if len(self._done) > 200_000:
            # Forget the oldest half: the worker refuses jobs past their deadline anyway.
            for key in list(self._done)[: len(self._done) // 2]:
                del self._done[key]
        return Outcome(job_id=header.job_id, header=header, body=body)


def _is_stale_epoch_notice(body: bytes) -> bool:
    if len(body) > 4096:
        return False  # a notice is small
    try:
        return control_kind(body) == "control_error" and ControlError.from_bytes(body).code == "stale_epoch"
    except ProtocolError:
        return False
