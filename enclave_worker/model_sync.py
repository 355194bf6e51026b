"""Model sync between pool members: what a member sends a (re)starting worker, and how that
worker puts it back together.

:class:`ModelSync` is the worker's side of both ends: :meth:`ModelSync.fetch_missing` (a
starting, joining or reconnected worker asks) and :meth:`ModelSync.send` (one member answers).

**Who may ask.** Answering reads, unseals and re-seals every model the requester lacks: one
1.4 KB request could cost a member (and the broker) the whole library. So only a pool member
may ask: a :class:`~protocol.handshake.ModelSyncRequest` carries an HMAC-SHA256 under
:func:`~protocol.handshake.member_mac_key`, derived with HKDF-SHA256 from the epoch's pool
private key. The answering member checks, cheapest first and before it reads any model: the
request's time is within :data:`REQUEST_FRESHNESS_MS` of its clock; it holds the epoch the
request names (current or retiring, :meth:`Keyring.private_for`); the MAC verifies (one HKDF
and one HMAC, microseconds); the nonce was not already taken within the window
(:data:`MAX_REMEMBERED_REQUESTS`). Then a global budget: one sync sent at a time, at most
:data:`MAX_QUEUED_SYNCS` admitted requests in hand (one sending, the others waiting their
turn), and a byte budget of
``max(SYNC_BUDGET_COPIES x library size, SYNC_BUDGET_FLOOR_BYTES)`` per
:data:`SYNC_BUDGET_WINDOW_SECONDS`. Anything else is dropped, counted in
:attr:`ModelSync.refused` and logged (at most one line per :data:`REFUSAL_LOG_SECONDS`).

**What it sends.** Every message is AES-256-GCM under :func:`~protocol.handshake.model_sync_key`
(HKDF-SHA256 of the same epoch key and the requester's fresh nonce) with
:func:`~protocol.handshake.model_sync_info` (pool, epoch, nonce, model id, position) as
associated data. Inside: the model bytes with the owner's signed manifest, and in the end
marker the member's manifests for models the requester already holds, the delete orders it
knows, its worker id and its catalog version (:class:`~enclave_worker.ownership.CatalogVersion`).
The receiver checks the owners' signatures itself (a member cannot make it hold a model its
owner did not sign, nor an older manifest than the one it holds) and the SHA-256 model id when
it loads the bytes; it compares the member's version with its own and logs which side was stale.

**Why the composition is sound.**

- Only members hold the IKM. The epoch's pool private key reaches a worker only by founding,
  by mutual attestation (sealed to the joiner's attested identity key) or from its own sealed
  state; producers and the broker see only the public key. HKDF-SHA256 with a uniformly random
  32-byte IKM is a PRF in its ``info``, so the MAC key and each sync key are independent
  pseudorandom keys that nobody without the IKM can compute, and learning one reveals neither
  the IKM nor another.
- Distinct labels separate every use of the IKM: ``enclaveq/v1/member-mac`` (with pool and
  epoch) and ``enclaveq/v1/model-sync`` (with pool, epoch and nonce) are HKDF ``info``s; the
  X25519 uses of the same key (HPKE opening of sessions, join and rotation blobs) feed it to
  scalar multiplication, never to HKDF as IKM, and no HPKE ``info`` is ever used as HKDF
  ``info`` here. HKDF's one-wayness means the derived keys give no handle on the scalar.
- The request MAC covers everything the member acts on: pool, epoch, nonce, worker id, the
  list of held models, the requested source, the issue time and the reply queue (so a broker
  cannot aim a genuine request's answer at another queue). HMAC-SHA256 is a secure MAC under
  a pseudorandom key; it is compared in constant time.
- Answers: AES-GCM under a key only members can derive authenticates *and* encrypts, so a
  non-member can neither read a sync nor inject into one (the old HPKE base-mode sealing to
  the public pool key let anyone write a message that opened, e.g. an early end marker that
  cut a rolled-back worker's catch-up short). The key is fresh per requester nonce, and the
  associated data binds each message to its model and position. GCM nonces are random 96-bit
  values: a sync is a few hundred messages (and several members may answer the same
  request with the same key), far below the 2^32 messages per key where random nonces stop
  being safe.
- Replay: the nonce makes each request single-use per member within the freshness window,
  and a request older than the window is refused, so what the member remembers is bounded by
  what members sent in two minutes (and capped). A recorded answer cannot be replayed into a
  later sync: the key depends on the requester's new nonce.

**What remains.** Every member can authenticate requests, and a member that is itself
compromised is outside this threat model. The broker can still drop a request or its answers
(the requester then serves its sealed catalog and logs that no end marker came), and can
claim the control channel is unroutable (the requester then believes it is alone): a lone
worker's rollback of its catalog cannot be detected by sealing without a trusted monotonic
counter. See the report on issue 9 and docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from broker_adapters import Message
from broker_adapters.errors import Unroutable
from protocol import crypto
from protocol.codec import pack, unpack
from protocol.errors import MalformedMessage, ProtocolError, SignatureInvalid
from protocol.handshake import (MAX_SYNC_HAVE, MODEL_SYNC_CHUNK_BYTES, ModelSyncChunk, ModelSyncRequest,
                                member_mac_key, model_sync_info, model_sync_key)

from .budget import noisy
from .context import WorkerContext
from .errors import SealedStateError
from .inbox import open_inbox
from .keyring import EpochAhead, EpochRetired, Keyring
from .model_library import MODEL_WAIT_SECONDS, ModelLibrary
from .ownership import MAX_DELETE_ORDERS, CatalogVersion

log = logging.getLogger("enclaveq.worker")

MAX_SYNC_RECORDS = MAX_SYNC_HAVE  # manifests in one end marker: one per model the requester listed
MAX_SYNC_DELETES = MAX_DELETE_ORDERS  # delete orders in one end marker: all a member keeps (~200 B each)
# The end marker's records stay under this many bytes (the receiver opens content up to
# MODEL_SYNC_CHUNK_BYTES + 1 MiB; a manifest with a full allow-list is ~35 KiB).
MAX_END_MARKER_RECORD_BYTES = 4 * 1024 * 1024
_CONTENT_MAX_BYTES = MODEL_SYNC_CHUNK_BYTES + 1024 * 1024

# A request is answered only if its time is within this much of the member's clock: wide enough
# for clock skew between hosts, and it bounds how long a member must remember a nonce.
REQUEST_FRESHNESS_MS = 60_000
# Nonces taken within the window. Only members can add one (after the MAC), so reaching this
# means a member misbehaves: further requests are dropped until old ones leave the window.
MAX_REMEMBERED_REQUESTS = 1024
# One sync is sent at a time; a few admitted requests may wait for it (workers restarting
# together), the rest are dropped. A request that waited longer than the requester listens
# (MODEL_WAIT_SECONDS of silence) is dropped when its turn comes.
MAX_QUEUED_SYNCS = 5
# Byte budget of model data a member sends in syncs: refilled continuously, full after
# SYNC_BUDGET_WINDOW_SECONDS; a sync takes what it will send up front, or is dropped. Four
# copies of the library a minute serve four members restarting at once from one source
# (joiners spread over whichever member admitted them); the floor lets a small library be sent
# often (it costs little). Worst case per member: max(4 x library, 256 MiB) a minute, and only
# for requests a member made.
SYNC_BUDGET_WINDOW_SECONDS = 60.0
SYNC_BUDGET_COPIES = 4
SYNC_BUDGET_FLOOR_BYTES = 256 * 1024 * 1024
REFUSAL_LOG_SECONDS = 10.0


def _aead_key(pool: str, epoch: int, nonce: bytes, pool_private_key: X25519PrivateKey) -> bytes:
    return model_sync_key(crypto.private_bytes(pool_private_key), pool, epoch, nonce)


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    gcm_nonce, ciphertext = crypto.seal(key, plaintext, aad)
    return gcm_nonce + ciphertext


def seal_model(pool: str, epoch: int, nonce: bytes, pool_private_key: X25519PrivateKey, model_id: str, data: bytes,
               manifest: bytes) -> Iterator[ModelSyncChunk]:
    """The chunks of one model for the sync of requester nonce ``nonce`` (sealed with the key
    of ``epoch``, whose private key ``pool_private_key`` is)."""
    key = _aead_key(pool, epoch, nonce, pool_private_key)
    count = max(1, -(-len(data) // MODEL_SYNC_CHUNK_BYTES))
    for index in range(count):
        piece = data[index * MODEL_SYNC_CHUNK_BYTES:(index + 1) * MODEL_SYNC_CHUNK_BYTES]
        sealed = _seal(key, pack([manifest, piece]), model_sync_info(pool, epoch, nonce, model_id, index, count,
                                                                     len(data)))
        yield ModelSyncChunk(epoch=epoch, model_id=model_id, index=index, count=count, total_size=len(data),
                             sealed=sealed)


def _within(records: list[bytes], budget: int, count: int) -> list[bytes]:
    taken: list[bytes] = []
    for record in records[:count]:
        budget -= len(record)
        if budget < 0:
            break
        taken.append(record)
    return taken


def seal_end(pool: str, epoch: int, nonce: bytes, pool_private_key: X25519PrivateKey, manifests: list[bytes],
             deletes: list[bytes], *, version: CatalogVersion, worker_id: str) -> ModelSyncChunk:
    """The end marker: the sender's manifests of models the requester has, its delete orders,
    its catalog version and its worker id (everything after the byte cap is left out)."""
    deletes = _within(deletes, MAX_END_MARKER_RECORD_BYTES // 2, MAX_SYNC_DELETES)  # newest first
    manifests = _within(manifests, MAX_END_MARKER_RECORD_BYTES - sum(map(len, deletes)), MAX_SYNC_RECORDS)
    body = pack({"manifests": manifests, "deletes": deletes, "version": version.to_wire(), "worker": worker_id})
    sealed = _seal(_aead_key(pool, epoch, nonce, pool_private_key), body, model_sync_info(pool, epoch, nonce, "", 0, 0, 0))
    return ModelSyncChunk(epoch=epoch, model_id="", index=0, count=0, total_size=0, sealed=sealed)


@dataclass
class SyncCollector:
    """Gathers one sync's messages; raises DecryptionFailed (not written by a member for this
    sync) or MalformedMessage for a bad one."""

    pool: str
    epoch: int
    nonce: bytes
    private_key: X25519PrivateKey
    parts: dict[str, dict[int, bytes]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    manifests: dict[str, bytes] = field(default_factory=dict)
    updated_manifests: list[bytes] = field(default_factory=list)
    deletes: list[bytes] = field(default_factory=list)
    member_version: CatalogVersion | None = None
    member: str = ""
    _key: bytes = field(init=False, repr=False, default=b"")

    def __post_init__(self) -> None:
        self._key = _aead_key(self.pool, self.epoch, self.nonce, self.private_key)

    def add(self, chunk: ModelSyncChunk) -> bool:
        """Take one message; True once it was the end marker."""
        if chunk.epoch != self.epoch:
            raise MalformedMessage("model sync message sealed to another epoch")
        aad = model_sync_info(self.pool, chunk.epoch, self.nonce, chunk.model_id, chunk.index, chunk.count,
                              chunk.total_size)
        raw = crypto.open_(self._key, chunk.sealed[:crypto.NONCE_BYTES], chunk.sealed[crypto.NONCE_BYTES:], aad)
        content = unpack(raw, max_bytes=_CONTENT_MAX_BYTES, what="model sync content")
        if chunk.count == 0:
            if not isinstance(content, dict):
                raise MalformedMessage("model sync end marker: expected a map")
            member = content.get("worker")
            if not isinstance(member, str) or len(member) > 128:
                raise MalformedMessage("model sync end marker: expected the member's worker id")
            self.updated_manifests = _blobs(content.get("manifests"), MAX_SYNC_RECORDS)
            self.deletes = _blobs(content.get("deletes"), MAX_SYNC_DELETES)
            self.member_version = CatalogVersion.from_wire(content.get("version"))
            self.member = member
            return True
        if not (isinstance(content, list) and len(content) == 2 and all(isinstance(x, bytes) for x in content)):
            raise MalformedMessage("model sync chunk: expected [manifest, bytes]")
        self.manifests[chunk.model_id], piece = content
        self.parts.setdefault(chunk.model_id, {})[chunk.index] = piece
        self.shapes[chunk.model_id] = (chunk.count, chunk.total_size)
        return False

    def complete(self) -> Iterator[tuple[str, bytes, bytes]]:
        """(model id, signed manifest, whole bytes) for every model whose chunks all arrived."""
        for model_id, chunks in self.parts.items():
            count, size = self.shapes[model_id]
            if len(chunks) == count:
                whole = b"".join(chunks[i] for i in range(count))
                if len(whole) == size:
                    yield model_id, self.manifests[model_id], whole


def _blobs(value: object, most: int) -> list[bytes]:
    if not isinstance(value, list) or len(value) > most or not all(isinstance(v, bytes) for v in value):
        raise MalformedMessage("model sync end marker: expected lists of signed records")
    return value


class SyncRefused(Exception):
    """A sync request this member will not answer; the message is the reason (a counter label)."""


class SyncAdmission:
    """The member's checks on a sync request before it reads any model: fresh, for an epoch it
    holds, authenticated by a member, not taken before (see the module docstring)."""

    def __init__(self, pool: str, keyring: Keyring) -> None:
        self._pool = pool
        self._keyring = keyring
        self._taken: dict[bytes, int] = {}  # nonce -> issue time, while within the window

    def admit(self, request: ModelSyncRequest, reply_to: str, now_ms: int) -> X25519PrivateKey:
        """The private key of the request's epoch, to answer with; raises SyncRefused."""
        if abs(now_ms - request.issued_at_ms) > REQUEST_FRESHNESS_MS:
            raise SyncRefused("stale")
        try:
            private = self._keyring.private_for(request.epoch)
        except (EpochAhead, EpochRetired):
            raise SyncRefused("epoch") from None
        try:
            request.verify(member_mac_key(crypto.private_bytes(private), self._pool, request.epoch),
                           pool=self._pool, reply_to=reply_to)
        except SignatureInvalid:
            raise SyncRefused("unauthenticated") from None
        if request.nonce in self._taken:
            raise SyncRefused("replayed")
        self._forget_before(now_ms - REQUEST_FRESHNESS_MS)
        if len(self._taken) >= MAX_REMEMBERED_REQUESTS:
            raise SyncRefused("too_many")
        self._taken[request.nonce] = request.issued_at_ms
        return private

    def _forget_before(self, oldest_ms: int) -> None:
        # A request issued before this is refused as stale anyway, so its nonce need not be kept.
        for nonce in [n for n, issued in self._taken.items() if issued < oldest_ms]:
            del self._taken[nonce]


class SyncBudget:
    """Bytes of model data this member may still send in syncs: a token bucket that refills to
    ``capacity`` over :data:`SYNC_BUDGET_WINDOW_SECONDS`. A sync starts only if the bucket holds
    all the bytes it will send, taken up front, so no window sends more than ``capacity``."""

    def __init__(self) -> None:
        self._tokens: float | None = None  # full at the first use
        self._last = 0.0

    def take(self, now: float, capacity: int, size: int) -> bool:
        if self._tokens is None:
            self._tokens = float(capacity)
        else:
            elapsed = max(0.0, now - self._last)  # a clock stepped back refills nothing
            self._tokens = min(float(capacity), self._tokens + capacity * elapsed / SYNC_BUDGET_WINDOW_SECONDS)
        self._last = now
        if size > self._tokens:
            return False
        self._tokens -= size
        return True


class ModelSync:
    """Brings a worker's models up to date from a member, and answers others' requests."""

    def __init__(self, ctx: WorkerContext, *, keyring: Keyring, library: ModelLibrary) -> None:
        self._ctx = ctx
        self._keyring = keyring
        self._library = library
        self._admission = SyncAdmission(ctx.pool, keyring)
        self._budget = SyncBudget()
        self._sending = asyncio.Lock()
        self._queued = 0
        # Requests dropped, by reason (stale, epoch, unauthenticated, replayed, too_many, busy,
        # expired, budget); the worker may export them as metrics.
        self.refused: collections.Counter[str] = collections.Counter()
        self.syncs_sent = 0
        self._unlogged: collections.Counter[str] = collections.Counter()
        self._last_log = float("-inf")

    @property
    def catalog_version(self) -> CatalogVersion:
        """This worker's model catalog version (see :class:`~enclave_worker.ownership.CatalogVersion`)."""
        return self._library.catalog_version

    # -- the requester's side ---------------------------------------------------------------
    async def fetch_missing(self, source: str = "") -> None:
        """Fetch from a live member every model this worker lacks (a late joiner serves models
        uploaded before it existed; a restarted member catches up on what it missed), the newer
        manifests of models it has (allow-list changes) and the deletes it missed. ``source``:
        the member that admitted this worker, asked to answer alone ("" lets any member answer)."""
        loop = asyncio.get_running_loop()
        pool, epoch, private = self._ctx.pool, self._keyring.epoch, self._keyring.current_private
        nonce = os.urandom(32)
        collector = SyncCollector(pool, epoch, nonce, private)
        ours_before = self._library.catalog_version
        async with open_inbox(self._ctx.broker, "sync") as (address, answers):
            have = tuple(sorted(m.model_id for m in self._library.list()))[:MAX_SYNC_HAVE]
            request = ModelSyncRequest.create(
                member_mac_key(crypto.private_bytes(private), pool, epoch), pool=pool, epoch=epoch, nonce=nonce,
                worker_id=self._ctx.worker_id, have=have, source=source, issued_at_ms=self._ctx.now_ms(),
                reply_to=address)
            try:
                await self._ctx.broker.publish_control(pool, Message(body=request.to_bytes(), reply_to=address))
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
                except ProtocolError as exc:  # includes DecryptionFailed: not a member's message for this sync
                    noisy.warning("ignoring a model sync message that does not open or parse: %s", exc)
                    continue
                deadline = loop.time() + MODEL_WAIT_SECONDS  # a member is sending: keep listening
        if not ended:
            log.warning("model sync of pool %r ended without a member's end marker after %gs of silence; "
                        "serving the sealed catalog (version %s); missing models arrive with the next start",
                        pool, MODEL_WAIT_SECONDS, ours_before)
        for model_id, signed, whole in collector.complete():
            await self._library.add_synced(model_id, signed, whole)
        ours = {self._library.signed_manifest(m.model_id) for m in self._library.list()
                if self._library.manifest(m.model_id) is not None}
        for signed in collector.updated_manifests:  # allow-list changes made while this worker was away
            if signed not in ours:  # the same bytes change nothing: skip their verification
                self._library.update_synced_manifest(signed)
        # Deletes this worker missed while it was away, and those of models it never held (they
        # refuse a replayed old upload). Orders already held byte for byte are skipped unverified.
        held = set(self._library.delete_orders())
        missed = [signed for signed in collector.deletes if signed not in held]
        for signed in missed:
            await self._library.apply_synced_delete(signed)
        self._library.remember_deletes(missed)
        if collector.member_version is not None:
            self._compare_versions(collector.member, ours_before, collector.member_version)

    def _compare_versions(self, member: str, ours_before: CatalogVersion, theirs: CatalogVersion) -> None:
        """Say which side's catalog was stale: ours (restored from an older copy of the state
        directory, or away while it changed) or the member's."""
        pool, ours = self._ctx.pool, self._library.catalog_version
        relation = ours_before.compare(theirs)
        if relation == "older" and ours_before.records == 0:
            log.info("pool %r: took the model catalog of member %s (version %s)", pool, member, theirs)
        elif relation == "older":
            log.warning("pool %r: this worker's sealed model catalog (version %s) was OLDER than member %s's (%s): "
                        "its state was restored from an older copy, or it was away while models changed; it took "
                        "the newer owner-signed manifests and delete orders (now %s)", pool, ours_before, member,
                        theirs, ours)
        elif relation == "newer":
            log.warning("pool %r: member %s's model catalog (version %s) is OLDER than this worker's (%s): that "
                        "member is stale (restored from an older copy, or it missed changes)", pool, member, theirs,
                        ours_before)
        elif relation == "diverged":
            log.warning("pool %r: member %s's model catalog (version %s) differs from this worker's (%s) at the same "
                        "newest record and count", pool, member, theirs, ours_before)
        if relation != "same" and ours.compare(theirs) == "older":
            log.warning("pool %r: after the sync this worker's catalog (version %s) is still behind member %s's (%s)",
                        pool, ours, member, theirs)

    # -- the member's side -------------------------------------------------------------------
    def should_answer(self, request: ModelSyncRequest) -> bool:
        """One member answers (the one that admitted the requester, when it says so): every
        member sending its full copy would multiply the bytes on the broker. Whether the request
        is genuine is checked by :meth:`send`, before any model is read."""
        return request.worker_id != self._ctx.worker_id and request.source in ("", self._ctx.worker_id)

    async def send(self, request: ModelSyncRequest, reply_to: str) -> None:
        """Answer a member's request (if it is one, fresh, not taken before, and the budget
        allows): every model it lacks, then an end marker with our manifests of the models it
        has, the delete orders we know and our catalog version, all sealed for that sync."""
        try:
            private = self._admission.admit(request, reply_to, self._ctx.now_ms())
        except SyncRefused as exc:
            return self._refuse(str(exc), request)
        if self._queued >= MAX_QUEUED_SYNCS:
            return self._refuse("busy", request)
        self._queued += 1
        admitted_at = self._ctx.clock()
        try:
            async with self._sending:
                now = self._ctx.clock()
                if now - admitted_at > MODEL_WAIT_SECONDS:
                    return self._refuse("expired", request)  # its requester stopped listening
                held, have = self._library.list(), set(request.have)
                models = [m for m in held if m.model_id not in have]
                capacity = max(SYNC_BUDGET_COPIES * sum(m.size for m in held), SYNC_BUDGET_FLOOR_BYTES)
                if not self._budget.take(now, capacity, sum(m.size for m in models)):
                    return self._refuse("budget", request)
                await self._send(request, reply_to, private, [m.model_id for m in models])
        finally:
            self._queued -= 1

    async def _send(self, request: ModelSyncRequest, reply_to: str, private: X25519PrivateKey,
                    model_ids: list[str]) -> None:
        pool, epoch, nonce = self._ctx.pool, request.epoch, request.nonce
        self.syncs_sent += 1
        for model_id in model_ids:
            try:
                data = await asyncio.to_thread(self._library.read_sealed, model_id)
                signed = self._library.signed_manifest(model_id)
            except (SealedStateError, KeyError) as exc:  # deleted meanwhile, or unreadable
                log.warning("cannot send model %s: %s", model_id, exc)
                continue
            for chunk in seal_model(pool, epoch, nonce, private, model_id, data, signed):
                await self._ctx.broker.publish_reply(reply_to, Message(body=chunk.to_bytes()))
        manifests = [self._library.signed_manifest(m) for m in request.have if self._library.manifest(m) is not None]
        end = seal_end(pool, epoch, nonce, private, manifests, list(self._library.delete_orders()),
                       version=self._library.catalog_version, worker_id=self._ctx.worker_id)
        await self._ctx.broker.publish_reply(reply_to, Message(body=end.to_bytes()))
        log.info("sent a model sync to worker %s (%d models)", request.worker_id, len(model_ids))

    def _refuse(self, reason: str, request: ModelSyncRequest) -> None:
        """Count a dropped request; log at most one line per REFUSAL_LOG_SECONDS (a flood of
        forged requests must not become a flood of log lines)."""
        self.refused[reason] += 1
        self._unlogged[reason] += 1
        now = self._ctx.clock()
        if now - self._last_log >= REFUSAL_LOG_SECONDS:
            log.warning("model sync requests dropped since the last report: %s (latest claims worker %r)",
                        dict(self._unlogged), request.worker_id[:64])
            self._unlogged.clear()
            self._last_log = now
