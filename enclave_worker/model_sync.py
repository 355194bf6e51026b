"""Model sync between pool members: what a member seals for a (re)starting worker, and how that
worker puts it back together.

Every message is HPKE-sealed to the pool's current epoch key (only admitted members can open
it) with an ``info`` that binds the requester's fresh nonce, the model id and the chunk
position, so nothing can be moved between models, positions or sync sessions. Inside: the
model bytes together with the owner's signed manifest, and in the end marker the member's
manifests for models the requester already holds plus the delete orders it knows. The receiver
checks the owner's signatures itself (a member cannot make it hold a model its owner did not
sign) and the SHA-256 model id when it loads the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Iterator

from protocol import crypto
from protocol.codec import pack, unpack
from protocol.errors import MalformedMessage
from protocol.handshake import MODEL_SYNC_CHUNK_BYTES, ModelSyncChunk, model_sync_info

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
    private_key: object
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
