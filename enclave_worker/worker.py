"""The enclave worker: answers attestation challenges, opens sessions, holds models, runs jobs.

One job's life: peek the cleartext header -> open the sealed session (cached) -> open the body
with the header as associated data -> refuse expired or replayed jobs -> run -> seal the result
-> publish it and wait for the broker's confirm -> only then ack the job. A crash anywhere before
the ack means the broker redelivers the job; the producer drops the duplicate result if the
first one had already gone out. Nothing in this module logs payloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, UTC
from pathlib import Path
from typing import Any, Protocol
from collections.abc import Callable, Mapping

from attestation.errors import AttestationError
from attestation.providers.errors import ProviderError
from attestation.verify import verify_evidence
from broker_adapters import BrokerAdapter, Delivery, Message, PoolSettings, open_broker
from broker_adapters.errors import BrokerError, PoolBusy, Unroutable
from protocol import bodies, crypto
from protocol.envelope import RequestHeader, peek_request, open_request, seal_result
from protocol.errors import DecryptionFailed, OversizedMessage, ProtocolError, SignatureInvalid, TensorError
from protocol.ownership import DeleteOrder, ModelManifest, ProducerProof
from protocol.codec import pack, unpack
from protocol.errors import MalformedMessage
from protocol.handshake import (Challenge, ControlError, EpochAnnounce, EvidenceResponse, JoinRequest, JoinResponse,
                                ModelSyncChunk, ModelSyncRequest, Statement, control_kind, join_info)
from protocol.tensors import TensorLimits

from .config import DEFAULT_WORKER_CONFIG, WorkerConfig
from .errors import JobRejected, SealedStateError, WorkerStartupError
from .keyring import EpochAhead, EpochRetired, Keyring
from .metrics import WorkerMetrics
from .model_sync import SyncCollector, seal_end, seal_model
from .ownership import ModelRegistry
from .models import ModelStore, run_model
from .sealed_state import PoolKeys, RetiringKey, SealedState

log = logging.getLogger("enclaveq.worker")

MODEL_WAIT_SECONDS = 30.0     # a job may wait this long for a model still arriving on its worker
JOIN_WAIT_SECONDS = 1.5       # how long a joiner listens for members after each request
JOIN_TIMEOUT_SECONDS = 20.0   # how long it keeps asking while another worker holds the founder lock
INLINE_INFERENCE_SECONDS = 0.0005
INLINE_INFERENCE_BYTES = 64 * 1024
ROTATION_LOCK_SECONDS = 10.0  # how long a rotation waits for another member's rotation to finish
ROTATION_SETTLE_SECONDS = 0.5  # the rotator keeps the lock this long so members see its announcement first
DEFAULT_ROTATION_GRACE_SECONDS = 300
# Any producer the pool serves may ask for a rotation (it can send jobs anyway); this bounds how
# often such requests can force every other producer to re-attest.
MIN_REQUESTED_ROTATION_SECONDS = 10.0

Clock = Callable[[], float]


class EvidenceProvider(Protocol):
    platform: str

    def evidence(self, report_data: bytes) -> bytes: ...


@dataclass(frozen=True)
class WorkerIdentity:
    """What the worker needs from its platform: evidence, a sealing key, its measurement."""

    provider: EvidenceProvider
    sealing_key: bytes
    seal: Callable[[bytes, bytes, bytes], bytes]
    unseal: Callable[[bytes, bytes, bytes], bytes]
    measurement: bytes
    config_digest: bytes
    # False when the sealing key dies with the process (real TEEs without platform sealing yet):
    # sealed state on disk can then never be reopened, and the worker says so.
    persistent_sealing: bool = True
    # Whom this worker admits to its pool, and trusts to hand it pool keys (mutual attestation).
    # It is part of the measured code: the default rule admits exactly this worker's measurement
    # on this worker's platform root. None: joining is not available (one worker per pool).
    join_policy: Any = None
    # Extra keyword arguments for verify_evidence when checking a peer against the join policy
    # (trust=... pinned roots, collateral=...). Empty: the vendors' pinned roots.
    join_verify_options: Mapping[str, Any] = field(default_factory=dict)


def _is_request_envelope(body: bytes) -> bool:
    """Sealed requests are maps without a "t" (their type is inside the authenticated header)."""
    try:
        m = unpack(body, max_bytes=len(body) + 1, what="control message")
    except ProtocolError:
        return False
    return isinstance(m, dict) and "h" in m and "t" not in m


class _SeenJobs:
    """Jobs already answered, kept until their deadline: replays inside the deadline are dropped,
    replays after it are refused as expired, so the set stays bounded."""

    def __init__(self) -> None:
        self._seen: dict[tuple[bytes, str], int] = {}

    def contains(self, key: tuple[bytes, str]) -> bool:
        return key in self._seen

    def add(self, key: tuple[bytes, str], deadline_ms: int, now_ms: int) -> None:
        self._seen[key] = deadline_ms
        if len(self._seen) % 4096 == 0:
            self._seen = {k: d for k, d in self._seen.items() if d >= now_ms}


MAX_SEALED_KEYS = 16 * 1024  # a join hands over the current key plus the few still retiring


def _order_model_id(signed: bytes) -> str | None:
    try:
        return DeleteOrder.verify(signed).model_id
    except (MalformedMessage, SignatureInvalid):
        return None


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
        self._broker_url = broker_url
        self._clock = clock
        self._rng = rng
        self._prefetch = prefetch or max(2 * config.max_jobs_in_flight, 16)
        self._state = SealedState(state_dir, pool, identity.sealing_key, identity.seal, identity.unseal)
        self._registry: ModelRegistry | None = None
        self._producer_keys: OrderedDict[tuple[bytes, bytes], bytes] = OrderedDict()
        self._models = ModelStore(max_model_bytes=config.max_model_bytes, intra_op_threads=config.intra_op_threads)
        self._limits = TensorLimits(max_tensor_bytes=config.max_tensor_bytes, max_total_bytes=config.max_message_bytes)
        self._sessions: OrderedDict[tuple[bytes, int, bytes], crypto.SessionSecret] = OrderedDict()
        self._seen = _SeenJobs()
        self._model_ready: dict[str, asyncio.Event] = {}
        self._slots = asyncio.Semaphore(config.max_jobs_in_flight)
        self._broker: BrokerAdapter | None = None
        self._lock = None
        self._subs: list = []
        self._keyring: Keyring | None = None
        self._rotate_every = rotate_every
        self._rotation_grace = rotation_grace
        self._keys_changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._catching_up: asyncio.Task | None = None
        self._admitted_by = ""  # the member whose join answer we took: it sends us the models
        self._draining = False
        self._stopped = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        keys = self._load_sealed_keys()
        self._broker = open_broker(self._broker_url)
        await self._broker.connect()
        try:
            await self._broker.declare_pool(self.pool, PoolSettings(max_message_bytes=self.config.max_message_bytes))
            if self.identity.join_policy is None:
                keys = await self._sole_worker(keys)
            elif keys is None:
                keys = await self._join_or_found()
            else:
                # A restarted member may have missed rotations while it was down: a live member
                # hands it the current keys (mutual attestation again); none answering is fine.
                keys = await self._catch_up_keys(keys)
            self._adopt(keys)
            if self.identity.join_policy is not None:
                await self._sync_models()
            self._subs.append(await self._broker.consume_control(self.pool, self._on_control))
            self._subs.append(await self._broker.consume_jobs(self.pool, self._on_job, prefetch=self._prefetch))
        except BaseException:
            await self._broker.close()
            raise
        self._broker.on_reconnect(self._after_reconnect)
        self._tasks.append(asyncio.create_task(self._erase_when_due()))
        if self._rotate_every:
            self._tasks.append(asyncio.create_task(self._rotate_periodically()))
        log.info("worker %s serving pool %r (epoch %d, %d models)", self.worker_id, self.pool,
                 self._keys.epoch, len(self._models.list()))

    @property
    def _keys(self) -> PoolKeys | None:
        return self._keyring.keys if self._keyring is not None else None

    @property
    def pool_public_key(self) -> bytes:
        return self._keyring.public_key

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _load_sealed_keys(self) -> PoolKeys | None:
        try:
            self._registry = ModelRegistry(self._state)
            return self._state.load_pool_keys()
        except SealedStateError as exc:
            raise WorkerStartupError(str(exc)) from None

    async def _sole_worker(self, keys: PoolKeys | None) -> PoolKeys:
        """Without a join policy a pool has one worker: it holds the pool lock for its lifetime."""
        try:
            self._lock = await self._broker.acquire_pool_lock(self.pool)
        except PoolBusy:
            raise WorkerStartupError(
                f"pool {self.pool!r} already has a worker, and joining a pool needs a join policy, which "
                "this platform does not have yet; start this worker on another pool or stop the other one."
            ) from None
        return keys or self._found()

    def _found(self, identity_private: bytes | None = None) -> PoolKeys:
        keys = PoolKeys(epoch=1, pool_private_key=crypto.private_bytes(crypto.generate_private_key()),
                        identity_private_key=identity_private or crypto.private_bytes(crypto.generate_private_key()),
                        created_ms=self._now_ms())
        self._state.save_pool_keys(keys)
        log.info("founded pool %r: new epoch-1 pool key sealed to %s", self.pool, self._state.dir)
        return keys

    def _adopt(self, keys: PoolKeys) -> None:
        self._state.save_pool_keys(keys)
        self._keyring = Keyring(keys, self._state, self._now_ms, on_erase=self._forget_sessions)
        self.identity_public_key = crypto.public_bytes(crypto.load_private_key(keys.identity_private_key))
        for model_id, data in self._state.iter_models():
            if not self._registry.load_sealed(model_id):
                log.warning("sealed model %s has no valid owner manifest; not loaded", model_id)
                continue
            try:
                self._models.load(model_id, data)
            except JobRejected as exc:
                log.warning("sealed model %s could not be loaded: %s", model_id, exc)

    # -- joining a pool (mutual attestation) ------------------------------------------------
    async def _join_or_found(self) -> PoolKeys:
        """Get the pool key from a live member, or found the pool if it has none.

        Founding is serialised by the pool lock: a worker that hears no member takes the lock,
        asks once more (a rival founder may have just started answering) and only then founds;
        it keeps the lock while it lives, so no one else founds beside it. A worker that a member
        refuses never founds: the pool exists, it just is not admitted.
        """
        identity = crypto.generate_private_key()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + JOIN_TIMEOUT_SECONDS
        async with self._inbox("join") as (address, answers):
            while True:
                keys = await self._ask_to_join(identity, address, answers)
                if keys is not None:
                    return keys
                if self._lock is not None:
                    return self._found()
                try:
                    self._lock = await self._broker.acquire_pool_lock(self.pool)
                except PoolBusy:
                    # Someone holds the founder lock: a founder is starting or alive; ask again.
                    if loop.time() > give_up:
                        raise WorkerStartupError(
                            f"no member of pool {self.pool!r} answered the join request within "
                            f"{JOIN_TIMEOUT_SECONDS:g}s although the pool has a founder") from None
                    await asyncio.sleep(0.2)

    @contextlib.asynccontextmanager
    async def _inbox(self, purpose: str):
        """A temporary reply queue for worker-to-worker exchanges: (address, queue of bodies)."""
        name = f"{purpose}-{uuid.uuid4().hex[:16]}"
        address = await self._broker.declare_reply_queue(name)
        answers: asyncio.Queue[bytes] = asyncio.Queue()

        async def collect(delivery: Delivery) -> None:
            answers.put_nowait(delivery.message.body)
            await delivery.ack()

        sub = await self._broker.consume_replies(name, collect)
        try:
            yield address, answers
        finally:
            await sub.cancel()
            await self._broker.delete_reply_queue(name)

    async def _ask_to_join(self, identity, address: str, answers: asyncio.Queue) -> PoolKeys | None:
        identity_public = crypto.public_bytes(identity)
        nonce = os.urandom(32)
        statement = Statement(pool=self.pool, epoch=0, suite=crypto.SUITE_ID, pool_public_key=bytes(32),
                              worker_identity_key=identity_public, nonce=nonce,
                              config_digest=self.identity.config_digest)
        try:
            evidence = await asyncio.to_thread(self.identity.provider.evidence, statement.report_data())
        except ProviderError as exc:
            raise WorkerStartupError(f"the TEE gave no evidence to join pool {self.pool!r} with: {exc}") from None
        request = JoinRequest(platform=self.identity.provider.platform, evidence=evidence, statement=statement,
                              worker_id=self.worker_id)
        try:
            await self._broker.publish_control(self.pool, Message(body=request.to_bytes(), reply_to=address,
                                                                  correlation_id=f"join-{nonce.hex()}"))
        except Unroutable:
            return None  # nobody consumes the control channel: no live member
        deadline = asyncio.get_running_loop().time() + JOIN_WAIT_SECONDS
        while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                body = await asyncio.wait_for(answers.get(), remaining)
            except TimeoutError:
                return None
            try:
                kind = control_kind(body)
                if kind == "control_error":
                    error = ControlError.from_bytes(body)
                    if error.code == "not_admitted":
                        raise WorkerStartupError(f"pool {self.pool!r} refuses to admit this worker: {error.message}")
                    continue
                if kind == "join_response":
                    return self._accept_join(JoinResponse.from_bytes(body), nonce, identity)
            except (ProtocolError, AttestationError) as exc:
                log.warning("ignoring a join response that does not verify: %s", exc)
        return None

    def _accept_join(self, response: JoinResponse, nonce: bytes, identity) -> PoolKeys:
        """Mutual attestation, joiner's side: the member must satisfy *our* join policy too, so an
        operator cannot hand us a pool key the operator knows."""
        st = response.statement
        if st.nonce != nonce or st.pool != self.pool or st.suite != crypto.SUITE_ID:
            raise MalformedMessage("the join response answers another request or pool")
        verify_evidence(response.platform, response.evidence, self.identity.join_policy,
                        expected_report_data=st.report_data(), now=datetime.fromtimestamp(self._clock(), UTC),
                        **self.identity.join_verify_options)
        identity_public = crypto.public_bytes(identity)
        raw = crypto.hpke_open(response.sealed_keys, identity,
                               join_info(self.pool, st.epoch, nonce, identity_public))
        sealed = unpack(raw, max_bytes=MAX_SEALED_KEYS, what="sealed pool keys")
        if not isinstance(sealed, dict) or sealed.get("epoch") != st.epoch:
            raise MalformedMessage("sealed pool keys do not match the member's statement")
        private = sealed.get("pool_private_key")
        if not isinstance(private, bytes) or crypto.public_bytes(crypto.load_private_key(private)) != st.pool_public_key:
            raise MalformedMessage("the sealed pool key is not the key the member attested")
        # Our measured cap bounds how long a retiring key lives here, whatever the member says.
        latest_ms = self._now_ms() + self.config.max_rotation_grace_seconds * 1000
        try:
            previous = tuple(RetiringKey(e, bytes(k), min(r, latest_ms)) for e, k, r in sealed.get("previous", [])
                             if type(e) is int and type(r) is int and e < st.epoch)
        except (TypeError, ValueError):
            raise MalformedMessage("sealed pool keys: malformed retiring keys") from None
        # The identity key this response was sealed to is dropped here and never sealed to disk:
        # otherwise a recorded join response plus a later copy of the sealed state would give
        # back epoch keys that rotation has erased (P6). The worker attests a fresh identity key.
        keys = PoolKeys(epoch=st.epoch, pool_private_key=private,
                        identity_private_key=crypto.private_bytes(crypto.generate_private_key()),
                        created_ms=self._now_ms(), previous=previous).without_retired(self._now_ms())
        self._admitted_by = response.worker_id
        log.info("joined pool %r (epoch %d) from member %s after mutual attestation", self.pool, st.epoch,
                 response.worker_id)
        return keys

    # -- rotation (P6) -----------------------------------------------------------------------
    async def rotate(self, grace_seconds: float, *, only_from_epoch: int | None = None) -> tuple[int, int]:
        """Draw epoch N+1, make it current here and announce it to every member; epoch N keeps
        opening jobs for ``grace_seconds``, then every member erases it. Returns (epoch, retire_at_ms).

        Rotations are serialised by the pool's rotation lock so two members never mint rival keys
        for the same epoch; ``only_from_epoch`` (automatic rotation) skips the rotation if another
        member already rotated while this one waited for the lock."""
        lock = await self._take_rotation_lock()
        try:
            if only_from_epoch is not None and self._keys.epoch != only_from_epoch:
                return self._keys.epoch, 0
            new_private = crypto.private_bytes(crypto.generate_private_key())
            retire_at_ms = self._now_ms() + int(grace_seconds * 1000)
            sealed, nonce = self._keyring.seal_next(new_private, self.pool, retire_at_ms)
            epoch = self._keys.epoch + 1
            statement = Statement(pool=self.pool, epoch=epoch, suite=crypto.SUITE_ID,
                                  pool_public_key=crypto.public_bytes(crypto.load_private_key(new_private)),
                                  worker_identity_key=self.identity_public_key, nonce=nonce,
                                  config_digest=self.identity.config_digest)
            evidence = await asyncio.to_thread(self.identity.provider.evidence, statement.report_data())
            announce = EpochAnnounce(platform=self.identity.provider.platform, evidence=evidence, statement=statement,
                                     previous_epoch=epoch - 1, retire_at_ms=retire_at_ms, sealed_key=sealed,
                                     worker_id=self.worker_id)
            self._keyring.install(epoch, new_private, retire_at_ms)
            self._keys_changed.set()
            log.info("rotated pool %r to epoch %d; epoch %d is erased in %gs", self.pool, epoch, epoch - 1,
                     grace_seconds)
            if self.identity.join_policy is not None:
                # A member that misses this (broker hiccup) catches up when it first sees a job
                # sealed to the new epoch: it asks for the keys with a join request.
                await self._broker.publish_control(self.pool, Message(body=announce.to_bytes()))
                await asyncio.sleep(ROTATION_SETTLE_SECONDS)
            return epoch, retire_at_ms
        finally:
            await lock.release()

    async def _take_rotation_lock(self):
        loop = asyncio.get_running_loop()
        give_up = loop.time() + ROTATION_LOCK_SECONDS
        while True:
            try:
                return await self._broker.acquire_pool_lock(self.pool, purpose="rotation")
            except PoolBusy:
                if loop.time() > give_up:
                    raise JobRejected("another member of the pool is rotating its key; try again",
                                      bodies.ErrorCode.ROTATION_REFUSED) from None
                await asyncio.sleep(0.2)

    async def _on_epoch_announce(self, announce: EpochAnnounce) -> None:
        if announce.worker_id == self.worker_id or announce.statement.epoch <= self._keys.epoch:
            return
        if self.identity.join_policy is None:
            return
        if announce.previous_epoch != self._keys.epoch:
            log.warning("pool %r moved to epoch %d while this worker is at %d: catching up", self.pool,
                        announce.statement.epoch, self._keys.epoch)
            self._tasks.append(asyncio.create_task(self._catch_up()))
            return
        try:
            # The announcer must satisfy our join policy, exactly like a member handing us keys.
            verify_evidence(announce.platform, announce.evidence, self.identity.join_policy,
                            expected_report_data=announce.statement.report_data(),
                            now=datetime.fromtimestamp(self._clock(), UTC),
                            **self.identity.join_verify_options)
            private = self._keyring.open_announce(announce, self.pool)
        except (AttestationError, ProtocolError, ValueError) as exc:
            log.warning("ignoring an epoch announcement that does not verify: %s", str(exc).splitlines()[0])
            return
        # Our measured limit bounds how long any old key lives here, whatever the announcer's clock says.
        retire_at_ms = min(announce.retire_at_ms, self._now_ms() + self.config.max_rotation_grace_seconds * 1000)
        self._keyring.install(announce.statement.epoch, private, retire_at_ms)
        self._keys_changed.set()
        log.info("pool %r rotated to epoch %d by member %s", self.pool, self._keys.epoch, announce.worker_id)

    async def _erase_when_due(self) -> None:
        """Erase each retiring key at its retirement time (P6)."""
        while True:
            self._keys_changed.clear()
            due = self._keyring.next_retirement_ms()
            timeout = None if due is None else max(0.05, (due - self._now_ms()) / 1000)
            try:
                await asyncio.wait_for(self._keys_changed.wait(), timeout)
            except TimeoutError:
                self.erase_retired()

    def erase_retired(self) -> list[int]:
        return self._keyring.erase_retired()

    def _forget_sessions(self, epochs: set[int]) -> None:
        """A session secret opens its session's jobs as well as the epoch key that unsealed it:
        when an epoch is erased, so are the secrets derived from it."""
        self._sessions = OrderedDict((k, v) for k, v in self._sessions.items() if k[1] not in epochs)

    async def _rotate_periodically(self) -> None:
        """``--rotate-every``: rotate when the current epoch is older than the interval. Every member
        with the option runs this; the rotation lock and ``only_from_epoch`` make one of them win."""
        while True:
            epoch = self._keys.epoch
            wait = self._keys.created_ms / 1000 + self._rotate_every - self._clock()
            if wait > 0:
                await asyncio.sleep(min(wait, 5.0))
                continue
            await asyncio.sleep(random.uniform(0, min(5.0, self._rotate_every / 10)))
            if self._keys.epoch != epoch:
                continue
            try:
                await self.rotate(self._rotation_grace, only_from_epoch=epoch)
            except (BrokerError, JobRejected, ProviderError) as exc:
                log.warning("automatic rotation of pool %r failed: %s", self.pool, exc)
                await asyncio.sleep(5.0)

    async def _catch_up_keys(self, keys: PoolKeys) -> PoolKeys:
        """At start with sealed keys: take a live member's newer epoch, if there is one."""
        try:
            newer = await self._fetch_keys(crypto.generate_private_key())
        except WorkerStartupError as exc:
            log.warning("could not catch up with the pool's members (%s); serving with the sealed keys", exc)
            return keys
        return newer if self._members_keys_win(newer, keys) else keys

    def _members_keys_win(self, theirs: PoolKeys | None, ours: PoolKeys) -> bool:
        """Whether keys a live member handed over replace ours: a newer epoch (we missed a
        rotation), or another key for the same epoch -- we founded the pool while cut off from
        its members (a network partition); producers attest the live members, so theirs win."""
        if theirs is None or theirs.epoch < ours.epoch:
            return False
        if theirs.epoch > ours.epoch:
            log.info("pool %r rotated while this worker was away: now at epoch %d", self.pool, theirs.epoch)
            return True
        if theirs.pool_private_key != ours.pool_private_key:
            log.warning("pool %r: the live members hold another epoch-%d key than this worker "
                        "(founded during a partition?); adopting the members' key", self.pool, ours.epoch)
            return True
        return False

    async def _fetch_keys(self, identity) -> PoolKeys | None:
        """Ask members for the current keys, sealed to ``identity``: a fresh key used for this one
        request only (see :meth:`_accept_join` on why it must never be stored)."""
        async with self._inbox("join") as (address, answers):
            return await self._ask_to_join(identity, address, answers)

    async def _catch_up(self) -> None:
        """One catch-up at a time: ask a member for the current keys (mutual attestation)."""
        if self.identity.join_policy is None:
            return
        if self._catching_up is None or self._catching_up.done():
            self._catching_up = asyncio.create_task(self._fetch_newer_keys())
        await asyncio.shield(self._catching_up)

    async def _fetch_newer_keys(self) -> None:
        try:
            keys = await self._fetch_keys(crypto.generate_private_key())
        except (WorkerStartupError, BrokerError) as exc:
            log.warning("could not catch up with the pool's members: %s", exc)
            return
        if self._members_keys_win(keys, self._keys):
            self._keyring.replace_all(keys)
            self._keys_changed.set()
            log.info("caught up with pool %r: epoch %d", self.pool, keys.epoch)

    async def _after_reconnect(self) -> None:
        """The broker connection dropped and came back: broadcasts sent meanwhile (uploads,
        deletes, allow-list changes, epoch announcements) never reached this worker's control
        queue. Catch up exactly as at a restart: current keys, then a model sync."""
        if self.identity.join_policy is None or self._stopped:
            return
        for attempt in range(3):
            if self._stopped:
                return
            try:
                log.info("reconnected to the broker: catching up on what pool %r broadcast meanwhile", self.pool)
                await self._catch_up()
                await self._sync_models()
                return
            except BrokerError as exc:
                log.warning("catching up after a reconnect failed (%s); retrying", exc)
                await asyncio.sleep(1.0 + attempt)

    async def _stale_epoch(self, delivery: Delivery, header: RequestHeader) -> None:
        """A job sealed to an erased epoch can never be opened again. Tell its producer, in clear
        (there is no key left to seal with, and the notice holds nothing secret), so the SDK
        re-attests and sends it again; then drop it."""
        log.info("job %s is sealed to retired epoch %d; asking its producer to re-attest", header.job_id,
                 header.epoch)
        self.metrics.requests.labels(header.kind, "stale_epoch").inc()
        notice = ControlError(code="stale_epoch", message=f"epoch {header.epoch} of pool {self.pool!r} is retired; "
                              f"the current epoch is {self._keys.epoch}: attest again")
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

    # -- models for every worker ------------------------------------------------------------
    async def _sync_models(self) -> None:
        """Fetch from a live member every model this worker lacks (a late joiner serves models
        uploaded before it existed; a restarted member catches up on what it missed), the newer
        manifests of models it has (allow-list changes) and the deletes it missed. See
        :mod:`enclave_worker.model_sync` for what is sealed and checked."""
        loop = asyncio.get_running_loop()
        nonce = os.urandom(32)
        collector = SyncCollector(self.pool, self._keys.epoch, nonce, self._keyring.current_private)
        async with self._inbox("sync") as (address, answers):
            have = tuple(m.model_id for m in self._models.list())
            try:
                await self._broker.publish_control(self.pool, Message(
                    body=ModelSyncRequest(have=have, worker_id=self.worker_id, nonce=nonce,
                                      source=self._admitted_by).to_bytes(),
                    reply_to=address))
            except Unroutable:
                return  # no live member: nothing to catch up on
            # Someone consumes the control channel, so a member will answer, if only with its end
            # marker; before its first message it reads and unseals every model it sends (seconds
            # for a few hundred MB), so the first wait is as long as any later one.
            deadline = loop.time() + MODEL_WAIT_SECONDS
            ended = False
            while (remaining := deadline - loop.time()) > 0:
                try:
                    body = await asyncio.wait_for(answers.get(), remaining)
                except TimeoutError:
                    break
                try:
                    if collector.add(ModelSyncChunk.from_bytes(body)):
                        ended = True
                        break  # that member's end marker: everything it sent has arrived (one queue, in order)
                except ProtocolError as exc:  # includes DecryptionFailed
                    log.warning("ignoring a model sync message that does not open or parse: %s", exc)
                    continue
                deadline = loop.time() + MODEL_WAIT_SECONDS  # a member is sending: keep listening
        if not ended:
            log.warning("model sync of pool %r ended without a member's end marker after %gs of silence; "
                        "missing models arrive with the next start", self.pool, MODEL_WAIT_SECONDS)
        for model_id, signed, whole in collector.complete():
            if self._models.has(model_id):
                continue
            try:
                manifest = self._registry.check_upload(model_id, signed)
                await asyncio.to_thread(self._models.load, model_id, whole)  # checks SHA-256 == model id
            except JobRejected as exc:
                log.warning("synced model %s refused: %s", model_id, exc)
                continue
            self._registry.record(manifest, signed)
            await asyncio.to_thread(self._state.save_model, model_id, whole)
            log.info("model %s synced from a pool member (%d bytes)", model_id, len(whole))
        for signed in collector.updated_manifests:  # allow-list changes made while this worker was away
            try:
                manifest = ModelManifest.verify(signed)
                if self._models.has(manifest.model_id) and manifest != self._registry.manifest(manifest.model_id):
                    self._registry.record(self._registry.check_upload(manifest.model_id, signed), signed)
                    log.info("model %s: newer owner manifest synced", manifest.model_id)
            except (JobRejected, ProtocolError):
                continue
        for signed in collector.deletes:  # deletes this worker missed while it was away
            model_id = _order_model_id(signed)
            if model_id and self._models.has(model_id):
                try:
                    await self._delete_model(model_id, signed)
                    log.info("model %s was deleted by its owner while this worker was away: deleted", model_id)
                except JobRejected:
                    pass

    async def _send_models(self, request: ModelSyncRequest, reply_to: str) -> None:
        have = set(request.have)
        epoch, public = self._keys.epoch, self.pool_public_key
        for info in self._models.list():
            if info.model_id in have:
                continue
            try:
                data = await asyncio.to_thread(self._state.read_model, info.model_id)
            except SealedStateError as exc:
                log.warning("cannot send model %s: %s", info.model_id, exc)
                continue
            for chunk in seal_model(self.pool, epoch, request.nonce, public, info.model_id, data,
                                    self._registry.signed_manifest(info.model_id)):
                await self._broker.publish_reply(reply_to, Message(body=chunk.to_bytes()))
        manifests = [self._registry.signed_manifest(m) for m in have if self._registry.manifest(m) is not None]
        end = seal_end(self.pool, epoch, request.nonce, public, manifests, list(self._registry.delete_orders()))
        await self._broker.publish_reply(reply_to, Message(body=end.to_bytes()))

    async def _answer_join(self, request: JoinRequest) -> bytes:
        """Mutual attestation, member's side: admit the joiner only if its evidence satisfies the
        join policy, then seal the epoch key to the identity key its evidence vouches for."""
        st = request.statement
        if self.identity.join_policy is None:
            return ControlError(code="not_admitted", message="this pool's workers cannot admit others yet").to_bytes()
        try:
            if st.pool != self.pool or st.suite != crypto.SUITE_ID:
                raise MalformedMessage("join request for another pool or suite")
            verify_evidence(request.platform, request.evidence, self.identity.join_policy,
                            expected_report_data=st.report_data(),
                            now=datetime.fromtimestamp(self._clock(), UTC),
                            **self.identity.join_verify_options)
        except (AttestationError, ProtocolError) as exc:
            log.warning("refused to admit worker %s to pool %r: %s", request.worker_id, self.pool,
                        str(exc).splitlines()[0])
            return ControlError(code="not_admitted", message=str(exc)).to_bytes()
        # Retiring keys travel too: a worker joining during a grace period serves the old epoch's jobs.
        keys = pack({"epoch": self._keys.epoch, "pool_private_key": self._keys.pool_private_key,
                     "previous": self._keyring.retiring_for_join()})
        sealed = crypto.hpke_seal(keys, st.worker_identity_key,
                                  join_info(self.pool, self._keys.epoch, st.nonce, st.worker_identity_key))
        answer = await asyncio.to_thread(self.answer_challenge, Challenge(nonce=st.nonce))
        log.info("admitted worker %s to pool %r", request.worker_id, self.pool)
        return JoinResponse(platform=answer.platform, evidence=answer.evidence, statement=answer.statement,
                            sealed_keys=sealed, worker_id=self.worker_id).to_bytes()

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Finish in-flight jobs, hand the rest back to the queue, disconnect. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._draining = True
        for task in self._tasks:
            task.cancel()
        try:
            await asyncio.wait_for(self._idle.wait(), drain_timeout)
        except TimeoutError:
            log.warning("stopping with %d jobs still running; the broker will redeliver them", self._active)
        for sub in reversed(self._subs):
            try:
                await sub.cancel()
            except Exception:
                pass
        self._subs.clear()
        if self._lock is not None:
            try:
                await self._lock.release()
            except Exception:
                pass
        if self._broker is not None:
            await self._broker.close()

    # -- control channel ------------------------------------------------------------------
    async def _on_control(self, delivery: Delivery) -> None:
        msg = delivery.message
        if _is_request_envelope(msg.body):
            # Model uploads and deletes are broadcast so that every worker of the pool gets them.
            return await self._on_job(delivery)
        try:
            kind = control_kind(msg.body)
            if kind == "challenge":
                challenge = Challenge.from_bytes(msg.body)
                # A real TEE can take a second to produce a quote: keep the event loop serving jobs.
                reply = (await asyncio.to_thread(self.answer_challenge, challenge)).to_bytes()
            elif kind == "model_sync_request":
                request = ModelSyncRequest.from_bytes(msg.body)
                # One member answers (the one that admitted the requester, when it says so):
                # every member sending its full copy would multiply the bytes on the broker.
                if (request.worker_id != self.worker_id and msg.reply_to
                        and request.source in ("", self.worker_id)):
                    try:
                        await self._send_models(request, msg.reply_to)
                    except BrokerError as exc:
                        # The requester is gone (or took another copy): never requeue, which would
                        # hand the request straight back to us to re-read every model again.
                        log.info("model sync for worker %s abandoned: %s", request.worker_id, exc)
                await delivery.ack()
                return
            elif kind == "epoch_announce":
                await self._on_epoch_announce(EpochAnnounce.from_bytes(msg.body))
                await delivery.ack()
                return
            elif kind == "join_request":
                request = JoinRequest.from_bytes(msg.body)
                if request.worker_id == self.worker_id:
                    await delivery.ack()  # our own broadcast
                    return
                reply = await self._answer_join(request)
            else:
                await delivery.ack()  # other workers' or future control traffic
                return
        except ProtocolError as exc:
            reply = ControlError(code="malformed", message=str(exc)).to_bytes()
        except ProviderError as exc:
            # The TEE would not produce evidence (device busy, kernel error): say so to the
            # producer, whose connect then fails clearly, instead of redelivering forever.
            log.error("could not obtain evidence from the TEE: %s", exc)
            reply = ControlError(code="evidence_unavailable", message=str(exc)).to_bytes()
        if msg.reply_to:
            try:
                await self._broker.publish_reply(msg.reply_to, Message(body=reply, correlation_id=msg.correlation_id))
            except BrokerError as exc:
                log.warning("could not answer a control message: %s", exc)
        await delivery.ack()

    def statement(self, nonce: bytes) -> Statement:
        return Statement(pool=self.pool, epoch=self._keys.epoch, suite=crypto.SUITE_ID,
                         pool_public_key=self.pool_public_key, worker_identity_key=self.identity_public_key,
                         nonce=nonce, config_digest=self.identity.config_digest)

    def answer_challenge(self, challenge: Challenge) -> EvidenceResponse:
        statement = self.statement(challenge.nonce)
        evidence = self.identity.provider.evidence(statement.report_data())
        return EvidenceResponse(platform=self.identity.provider.platform, evidence=evidence,
                                statement=statement, worker_id=self.worker_id)

    # -- jobs -----------------------------------------------------------------------------
    async def _park(self) -> None:
        """Hold a delivery that arrived while draining until ``stop()`` cancels the consumer.

        Nacking it at once would hand it straight back to this same consumer (its prefetch is
        still open), over and over, each time counting against the queue's delivery limit
        until the job is dead-lettered. Once the consumer is cancelled, the adapter returns
        parked deliveries and the broker gives them to another worker.
        """
        await asyncio.Event().wait()

    async def _on_job(self, delivery: Delivery) -> None:
        if self._draining:
            return await self._park()
        async with self._slots:
            if self._draining:
                return await self._park()
            self._active += 1
            self._idle.clear()
            started = time.perf_counter()
            try:
                await self._handle(delivery)
                self.metrics.latency.observe(time.perf_counter() - started)
            finally:
                self._active -= 1
                if self._active == 0:
                    self._idle.set()

    def _session_key(self, header: RequestHeader) -> crypto.SessionSecret:
        cache_key = (header.session_id, header.epoch, header.sealed_session)
        key = self._sessions.get(cache_key)
        if key is not None:  # erasing an epoch also drops its sessions (_forget_sessions)
            self._sessions.move_to_end(cache_key)
            return key
        key = crypto.SessionSecret(crypto.open_session_key(
            header.sealed_session, self._keyring.private_for(header.epoch), pool=self.pool, epoch=header.epoch,
            session_id=header.session_id))
        self._sessions[cache_key] = key
        if len(self._sessions) > 10_000:
            self._sessions.popitem(last=False)
        return key

    async def _dead_letter(self, delivery: Delivery, reason: str, detail: str) -> None:
        log.warning("dead-lettering a request: %s", detail)
        self.metrics.dead_lettered.labels(reason).inc()
        await delivery.reject()

    async def _handle(self, delivery: Delivery) -> None:
        try:
            sealed, header = peek_request(delivery.message.body, max_bytes=self.config.max_message_bytes)
        except ProtocolError as exc:
            return await self._dead_letter(delivery, "malformed", f"malformed envelope ({exc})")
        try:
            try:
                session_key = self._session_key(header)
            except EpochAhead:
                # We missed a rotation: fetch the current keys from a member, then try again.
                await self._catch_up()
                session_key = self._session_key(header)
        except EpochAhead:
            log.warning("job %s is sealed to epoch %d, newer than ours (%d); handing it back", header.job_id,
                        header.epoch, self._keys.epoch)
            await asyncio.sleep(0.5)
            await delivery.nack()
            return
        except EpochRetired:
            return await self._stale_epoch(delivery, header)
        except DecryptionFailed:
            return await self._dead_letter(
                delivery, "session", f"job {header.job_id}: session sealed to epoch {header.epoch} does not open "
                f"with this pool's epoch-{self._keys.epoch} key")
        replay_key = (header.session_id, header.job_id)
        now_ms = int(self._clock() * 1000)
        try:
            plaintext = open_request(sealed, header, session_key)
        except DecryptionFailed:
            status, ctype, body = self._error(bodies.ErrorCode.DOES_NOT_OPEN,
                                              "the request does not open: it was modified after sealing")
            return await self._reply(delivery, header, session_key, status, ctype, body, kind=header.kind)
        if self._seen.contains(replay_key):
            # Already answered: a redelivery after a lost ack, or a replay. Never answer twice.
            log.info("job %s already answered; dropping the duplicate", header.job_id)
            self.metrics.requests.labels(header.kind, "duplicate").inc()
            await delivery.ack()
            return
        if header.deadline_ms < now_ms:
            status, ctype, body = self._error(bodies.ErrorCode.EXPIRED, "the job's deadline passed before it ran")
        else:
            status, ctype, body = await self._execute(header, plaintext)
        await self._reply(delivery, header, session_key, status, ctype, body, kind=header.kind)
        if delivery.settled:
            self._seen.add(replay_key, header.deadline_ms, now_ms)

    def _error(self, code: str, message: str) -> tuple[str, str, bytes]:
        return "error", bodies.ERROR, bodies.ErrorBody(code=code, message=message).to_bytes()

    async def _execute(self, header: RequestHeader, plaintext: bytes) -> tuple[str, str, bytes]:
        try:
            if header.kind == "job":
                return await self._run_job(header, plaintext)
            if header.kind == "model_chunk":
                return await self._model_chunk(header, plaintext)
            if header.kind == "model_delete":
                await self._delete_model(header.model_id, plaintext)
                return "ok", bodies.ACK, bodies.encode_ack(header.model_id, 0, True)
            if header.kind == "model_list":
                return "ok", bodies.MODELS, bodies.encode_models(self._models.list())
            if header.kind == "pool_rotate":
                grace = bodies.decode_rotate(plaintext)
                age = self._clock() - self._keys.created_ms / 1000
                if self._keys.epoch > 1 and age < MIN_REQUESTED_ROTATION_SECONDS:
                    raise JobRejected(f"the pool key was rotated {age:.1f}s ago; rotations are at least "
                                      f"{MIN_REQUESTED_ROTATION_SECONDS:g}s apart", bodies.ErrorCode.ROTATION_REFUSED)
                if grace > self.config.max_rotation_grace_seconds:
                    raise JobRejected(f"a grace period of {grace}s exceeds this pool's measured limit of "
                                      f"{self.config.max_rotation_grace_seconds}s", bodies.ErrorCode.ROTATION_REFUSED)
                epoch, retire_at_ms = await self.rotate(grace)
                return "ok", bodies.ROTATED, bodies.encode_rotated(epoch, retire_at_ms)
            raise JobRejected(f"request type {header.kind!r} is not supported", bodies.ErrorCode.UNSUPPORTED)
        except JobRejected as exc:
            return self._error(exc.code, str(exc))
        except OversizedMessage as exc:
            return self._error(bodies.ErrorCode.OVERSIZED, str(exc))
        except ProtocolError as exc:  # malformed body, bad tensor
            return self._error(bodies.ErrorCode.BAD_INPUT, str(exc))
        except Exception as exc:
            log.exception("internal error on job %s (%s)", header.job_id, type(exc).__name__)
            return self._error(bodies.ErrorCode.INTERNAL, f"internal worker error ({type(exc).__name__})")

    async def _delete_model(self, model_id: str, signed_order: bytes) -> None:
        order = self._registry.check_delete(model_id, signed_order)
        self._models.delete(model_id)
        await asyncio.to_thread(self._state.delete_model, model_id)
        self._registry.forget(order, signed_order)

    def _producer_key(self, header: RequestHeader) -> bytes | None:
        """The producer key this session proved (verified once per session and proof)."""
        if header.producer_proof is None:
            return None
        cache_key = (header.session_id, header.producer_proof)
        key = self._producer_keys.get(cache_key)
        if key is None:
            try:
                proof = ProducerProof.from_bytes(header.producer_proof)
                proof.verify(pool=self.pool, epoch=header.epoch, session_id=header.session_id,
                             sealed_session=header.sealed_session)
            except (SignatureInvalid, MalformedMessage):
                raise JobRejected("the producer key proof of this session does not verify",
                                  bodies.ErrorCode.BAD_SIGNATURE) from None
            key = self._producer_keys[cache_key] = proof.producer_key
            if len(self._producer_keys) > 10_000:
                self._producer_keys.popitem(last=False)
        return key

    async def _run_job(self, header: RequestHeader, plaintext: bytes) -> tuple[str, str, bytes]:
        if self._registry.needs_producer_key(header.model_id):
            self._registry.require_allowed(header.model_id, self._producer_key(header))
        inputs, outputs = bodies.decode_job(plaintext, self._limits)
        ready = self._model_ready.get(header.model_id)
        if ready is not None and not self._models.has(header.model_id):
            # The model is still arriving on this worker (uploads reach every worker, and the
            # producer may already have another worker's confirmation): wait for it.
            try:
                await asyncio.wait_for(ready.wait(), MODEL_WAIT_SECONDS)
            except TimeoutError:
                pass
        model = self._models.get(header.model_id)
        input_bytes = sum(a.nbytes for a in inputs.values())

        def infer() -> bytes:
            started = time.perf_counter()
            result = run_model(model, inputs, outputs)
            model.record_run(time.perf_counter() - started)
            try:
                return bodies.encode_tensors_body(result)
            except TensorError as exc:
                raise JobRejected(f"the model produced an output enclaveq cannot carry: {exc}",
                                  bodies.ErrorCode.UNSUPPORTED) from None

        # A model known to answer in well under a millisecond on a small input runs on the event
        # loop: handing it to a thread (executor queue, wake-up, GIL hand-offs) costs several times
        # more CPU than the inference itself. Everything else runs in a thread, which is what
        # lets a slow model use every core while the loop keeps serving the broker.
        if model.typical_seconds < INLINE_INFERENCE_SECONDS and input_bytes <= INLINE_INFERENCE_BYTES:
            body = infer()
        else:
            body = await asyncio.to_thread(infer)
        if len(body) > self.config.max_message_bytes:
            raise JobRejected(f"result of {len(body)} bytes exceeds {self.config.max_message_bytes}",
                              bodies.ErrorCode.OVERSIZED)
        return "ok", bodies.TENSORS, body

    async def _model_chunk(self, header: RequestHeader, plaintext: bytes) -> tuple[str, str, bytes]:
        c = header.chunk
        if header.content_type != bodies.MODEL_CHUNK:
            raise JobRejected("model uploads must carry the owner's signed manifest (model-chunk/v1)",
                              bodies.ErrorCode.BAD_SIGNATURE)
        signed, data = bodies.decode_model_chunk(plaintext, max_bytes=self.config.max_message_bytes)
        manifest = self._registry.check_upload(header.model_id, signed)
        if manifest.size != c.total_size:
            raise JobRejected("the upload's size differs from the size its owner signed", bodies.ErrorCode.MODEL_INVALID)
        if self._models.has(header.model_id):
            if manifest != self._registry.manifest(header.model_id):
                self._registry.record(manifest, signed)  # the owner's newer manifest (e.g. a new allow-list)
            return "ok", bodies.ACK, bodies.encode_ack(header.model_id, c.count, True)
        ready = self._model_ready.setdefault(header.model_id, asyncio.Event())
        received, whole = self._models.add_chunk(c.upload_id, header.model_id, c.index, c.count, c.total_size, data)
        if whole is None:
            return "ok", bodies.ACK, bodies.encode_ack(None, received, False)
        await asyncio.to_thread(self._models.load, header.model_id, whole)
        self._registry.record(manifest, signed)
        await asyncio.to_thread(self._state.save_model, header.model_id, whole)
        ready.set()
        self._model_ready.pop(header.model_id, None)
        log.info("model %s stored (%d bytes)", header.model_id, len(whole))
        return "ok", bodies.ACK, bodies.encode_ack(header.model_id, received, True)

    async def _reply(self, delivery: Delivery, header: RequestHeader, session_key: crypto.SessionSecret, status: str,
                     ctype: str, body: bytes, *, kind: str) -> None:
        if status == "error":
            code = bodies.ErrorBody.from_bytes(body).code
            log.info("request %s (%s) refused: %s", header.job_id, kind, code)
            self.metrics.requests.labels(kind, code).inc()
        else:
            self.metrics.requests.labels(kind, "ok").inc()
        result = seal_result(session_key, header, status, ctype, body, rng=self._rng,
                             current_epoch=self._keys.epoch)
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
