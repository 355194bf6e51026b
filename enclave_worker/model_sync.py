"""Model sync between pool members: what a member seals for a (re)starting worker, and how that
worker puts it back together.

Every message is HPKE-sealed to the pool's current epoch key (only admitted members can open
it) with an ``info`` that binds the requester's fresh nonce, the model id and the chunk
position, so nothing can be moved between models, positions or sync sessions. Inside: the
model bytes together with the owner's signed manifest, and in the end marker the member's
manifests for models the requester already holds plus the delete orders it knows. The receiver
checks the owner's signatures itself (a member cannot make it hold a model its owner did not
sign) and the SHA-256 model id when it loads the bytes.

:class:`ModelSync` is the worker's side of both ends: :meth:`ModelSync.fetch_missing` (a
starting, joining or reconnected worker asks) and :meth:`ModelSync.send` (one member answers).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from broker_adapters import Message
from broker_adapters.errors import Unroutable
from protocol import crypto
from protocol.codec import pack, unpack
from protocol.errors import MalformedMessage
from protocol.errors import ProtocolError
from protocol.handshake import MODEL_SYNC_CHUNK_BYTES, ModelSyncChunk, ModelSyncRequest, model_sync_info

from .context import WorkerContext
from .errors import SealedStateError
from .inbox import open_inbox
from .keyring import Keyring
from .model_library import MODEL_WAIT_SECONDS, ModelLibrary

log = logging.getLogger("enclaveq.worker")

MAX_SYNC_RECORDS = 512  # manifests or delete orders in one end marker


def seal_model(pool: str, epoch: int, nonce: bytes, pool_public_key: bytes, model_id: str, data: bytes,
               manifest: bytes) -> Iterator[ModelSyncChunk]:
    count = max(1, -(-len(data) // MODEL_SYNC_CHUNK_BYTES))
    for index in range(count):
        piece = data[index * MODEL_SYNC_CHUNK_BYTES:(index + 1) * MODEL_SYNC_CHUNK_BYTES]
        sealed = crypto.hpke_seal(pack([manifest, piece]), pool_public_key,
                                  model_sync_info(pool, epoch, nonce, model_id, index, count, len(data)))
        yield ModelSyncChunk(epoch=epoch, model_id=model_id, index=index, count=count, total_size=len(data),
                             sealed=sealed)


def seal_end(pool: str, epoch: int, nonce: bytes, pool_public_key: bytes, manifests: list[bytes],
             deletes: list[bytes]) -> ModelSyncChunk:
    body = pack({"manifests": manifests[:MAX_SYNC_RECORDS], "deletes": deletes[:MAX_SYNC_RECORDS]})
    sealed = crypto.hpke_seal(body, pool_public_key, model_sync_info(pool, epoch, nonce, "", 0, 0, 0))
    return ModelSyncChunk(epoch=epoch, model_id="", index=0, count=0, total_size=0, sealed=sealed)


@dataclass
class SyncCollector:
    """Gathers one sync's messages; raises DecryptionFailed / MalformedMessage for a bad one."""

    pool: str
    epoch: int
    nonce: bytes
    private_key: X25519PrivateKey
    parts: dict[str, dict[int, bytes]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    manifests: dict[str, bytes] = field(default_factory=dict)
    updated_manifests: list[bytes] = field(default_factory=list)
    deletes: list[bytes] = field(default_factory=list)

    def add(self, chunk: ModelSyncChunk) -> bool:
        """Take one message; True once it was the end marker."""
        if chunk.epoch != self.epoch:
            raise MalformedMessage("model sync message sealed to another epoch")
        raw = crypto.hpke_open(chunk.sealed, self.private_key, model_sync_info(
            self.pool, chunk.epoch, self.nonce, chunk.model_id, chunk.index, chunk.count, chunk.total_size))
        content = unpack(raw, max_bytes=MODEL_SYNC_CHUNK_BYTES + 1024 * 1024, what="model sync content")
        if chunk.count == 0:
            if not isinstance(content, dict):
                raise MalformedMessage("model sync end marker: expected a map")
            self.updated_manifests = _blobs(content.get("manifests"))
            self.deletes = _blobs(content.get("deletes"))
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


def _blobs(value: object) -> list[bytes]:
    if not isinstance(value, list) or len(value) > MAX_SYNC_RECORDS or not all(isinstance(v, bytes) for v in value):
        raise MalformedMessage("model sync end marker: expected lists of signed records")
    return value


class ModelSync:
    """Brings a worker's models up to date from a member, and answers others' requests."""

    def __init__(self, ctx: WorkerContext, *, keyring: Keyring, library: ModelLibrary) -> None:
        self._ctx = ctx
        self._keyring = keyring
        self._library = library

    async def fetch_missing(self, source: str = "") -> None:
        """Fetch from a live member every model this worker lacks (a late joiner serves models
        uploaded before it existed; a restarted member catches up on what it missed), the newer
        manifests of models it has (allow-list changes) and the deletes it missed. ``source``:
        the member that admitted this worker, asked to answer alone ("" lets any member answer)."""
        loop = asyncio.get_running_loop()
        nonce = os.urandom(32)
        collector = SyncCollector(self._ctx.pool, self._keyring.epoch, nonce, self._keyring.current_private)
        async with open_inbox(self._ctx.broker, "sync") as (address, answers):
            have = tuple(m.model_id for m in self._library.list())
            try:
                await self._ctx.broker.publish_control(self._ctx.pool, Message(
                    body=ModelSyncRequest(have=have, worker_id=self._ctx.worker_id, nonce=nonce,
                                          source=source).to_bytes(),
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
                        "missing models arrive with the next start", self._ctx.pool, MODEL_WAIT_SECONDS)
        for model_id, signed, whole in collector.complete():
            await self._library.add_synced(model_id, signed, whole)
        for signed in collector.updated_manifests:  # allow-list changes made while this worker was away
            self._library.update_synced_manifest(signed)
        for signed in collector.deletes:  # deletes this worker missed while it was away
            await self._library.apply_synced_delete(signed)

    def should_answer(self, request: ModelSyncRequest) -> bool:
        """One member answers (the one that admitted the requester, when it says so): every
        member sending its full copy would multiply the bytes on the broker."""
        return request.worker_id != self._ctx.worker_id and request.source in ("", self._ctx.worker_id)

    async def send(self, request: ModelSyncRequest, reply_to: str) -> None:
        """Send the requester every model it lacks, then an end marker with our manifests of the
        models it has and the delete orders we know, all sealed to the pool key."""
        have = set(request.have)
        epoch, public = self._keyring.epoch, self._keyring.public_key
        for info in self._library.list():
            if info.model_id in have:
                continue
            try:
                data = await asyncio.to_thread(self._library.read_sealed, info.model_id)
            except SealedStateError as exc:
                log.warning("cannot send model %s: %s", info.model_id, exc)
                continue
            for chunk in seal_model(self._ctx.pool, epoch, request.nonce, public, info.model_id, data,
                                    self._library.signed_manifest(info.model_id)):
                await self._ctx.broker.publish_reply(reply_to, Message(body=chunk.to_bytes()))
        manifests = [self._library.signed_manifest(m) for m in have if self._library.manifest(m) is not None]
        end = seal_end(self._ctx.pool, epoch, request.nonce, public, manifests, list(self._library.delete_orders()))
        await self._ctx.broker.publish_reply(reply_to, Message(body=end.to_bytes()))
