"""The models this worker holds, and everything that changes them.

One owner for four things that must move together: the loaded ONNX Runtime sessions
(:class:`~enclave_worker.models.ModelStore`), the owners' signed manifests and delete orders
(:class:`~enclave_worker.ownership.ModelRegistry`), the sealed copies on disk, and the models
still arriving (chunk by chunk, or by sync) that a job may wait for. A model is served only once
its bytes hash to its id, its owner's manifest verifies, and its sealed copy is written.
"""

from __future__ import annotations

import asyncio
import logging

from protocol import bodies
from protocol.bodies import ModelInfo
from protocol.envelope import RequestHeader
from protocol.errors import MalformedMessage, ProtocolError, SignatureInvalid
from protocol.ownership import DeleteOrder, ModelManifest

from .errors import JobRejected
from .models import LoadedModel, ModelStore
from .ownership import ModelRegistry
from .sealed_state import SealedState

log = logging.getLogger("enclaveq.worker")

MODEL_WAIT_SECONDS = 30.0  # a job may wait this long for a model still arriving on its worker


class ModelLibrary:
    def __init__(self, state: SealedState, *, max_model_bytes: int, intra_op_threads: int) -> None:
        self._state = state
        self._store = ModelStore(max_model_bytes=max_model_bytes, intra_op_threads=intra_op_threads)
        self._registry = ModelRegistry(state)
        self._arriving: dict[str, asyncio.Event] = {}

    # -- reading ---------------------------------------------------------------------------
    def has(self, model_id: str) -> bool:
        return self._store.has(model_id)

    def list(self) -> list[ModelInfo]:
        return self._store.list()

    def manifest(self, model_id: str) -> ModelManifest | None:
        return self._registry.manifest(model_id)

    def signed_manifest(self, model_id: str) -> bytes:
        return self._registry.signed_manifest(model_id)

    def delete_orders(self) -> tuple[bytes, ...]:
        return self._registry.delete_orders()

    def read_sealed(self, model_id: str) -> bytes:
        """The model's bytes from its sealed copy (for a sync); raises SealedStateError."""
        return self._state.read_model(model_id)

    def require_allowed(self, model_id: str, producer_key: bytes | None) -> None:
        """Raise ``not_allowed`` unless the model's owner lets ``producer_key`` run it."""
        self._registry.require_allowed(model_id, producer_key)

    def needs_producer_key(self, model_id: str) -> bool:
        return self._registry.needs_producer_key(model_id)

    async def get(self, model_id: str) -> LoadedModel:
        """The loaded model, waiting a while if it is still arriving on this worker (uploads
        reach every worker, and the producer may already hold another worker's confirmation)."""
        arriving = self._arriving.get(model_id)
        if arriving is not None and not self._store.has(model_id):
            try:
                await asyncio.wait_for(arriving.wait(), MODEL_WAIT_SECONDS)
            except TimeoutError:
                pass
        return self._store.get(model_id)

    # -- changing ----------------------------------------------------------------------------
    def load_sealed(self) -> None:
        """At start: load every sealed model whose sealed owner manifest verifies."""
        for model_id, data in self._state.iter_models():
            if not self._registry.load_sealed(model_id):
                log.warning("sealed model %s has no valid owner manifest; not loaded", model_id)
                continue
            try:
                self._store.load(model_id, data)
            except JobRejected as exc:
                log.warning("sealed model %s could not be loaded: %s", model_id, exc)

    async def receive_chunk(self, header: RequestHeader, plaintext: bytes, *, max_message_bytes: int) -> bytes:
        """Take one chunk of an owner-signed upload; the ack body to send back."""
        c = header.chunk
        if header.content_type != bodies.MODEL_CHUNK or c is None or header.model_id is None:
            raise JobRejected("model uploads must carry the owner's signed manifest (model-chunk/v1)",
                              bodies.ErrorCode.BAD_SIGNATURE)
        model_id = header.model_id
        signed, data = bodies.decode_model_chunk(plaintext, max_bytes=max_message_bytes)
        manifest = self._registry.check_upload(model_id, signed)
        if manifest.size != c.total_size:
            raise JobRejected("the upload's size differs from the size its owner signed", bodies.ErrorCode.MODEL_INVALID)
        if self._store.has(model_id):
            if manifest != self._registry.manifest(model_id):
                self._registry.record(manifest, signed)  # the owner's newer manifest (e.g. a new allow-list)
            return bodies.encode_ack(model_id, c.count, True)
        arriving = self._arriving.setdefault(model_id, asyncio.Event())
        received, whole = self._store.add_chunk(c.upload_id, model_id, c.index, c.count, c.total_size, data)
        if whole is None:
            return bodies.encode_ack(None, received, False)
        await asyncio.to_thread(self._store.load, model_id, whole)
        self._registry.record(manifest, signed)
        await asyncio.to_thread(self._state.save_model, model_id, whole)
        arriving.set()
        self._arriving.pop(model_id, None)
        log.info("model %s stored (%d bytes)", model_id, len(whole))
        return bodies.encode_ack(model_id, received, True)

    async def delete(self, model_id: str, signed_order: bytes) -> None:
        """Delete on the owner's signed order (raises ``not_owner`` / ``stale_order`` otherwise)."""
        order = self._registry.check_delete(model_id, signed_order)
        self._store.delete(model_id)
        await asyncio.to_thread(self._state.delete_model, model_id)
        self._registry.forget(order, signed_order)

    async def add_synced(self, model_id: str, signed_manifest: bytes, data: bytes) -> None:
        """Take a model a member sent: its owner's manifest and its hash are checked here."""
        if self._store.has(model_id):
            return
        try:
            manifest = self._registry.check_upload(model_id, signed_manifest)
            await asyncio.to_thread(self._store.load, model_id, data)  # checks SHA-256 == model id
        except JobRejected as exc:
            log.warning("synced model %s refused: %s", model_id, exc)
            return
        self._registry.record(manifest, signed_manifest)
        await asyncio.to_thread(self._state.save_model, model_id, data)
        log.info("model %s synced from a pool member (%d bytes)", model_id, len(data))

    def update_synced_manifest(self, signed: bytes) -> None:
        """A newer owner manifest for a model held here (an allow-list changed while away)."""
        try:
            manifest = ModelManifest.verify(signed)
            if self._store.has(manifest.model_id) and manifest != self._registry.manifest(manifest.model_id):
                self._registry.record(self._registry.check_upload(manifest.model_id, signed), signed)
                log.info("model %s: newer owner manifest synced", manifest.model_id)
        except (JobRejected, ProtocolError):
            pass

    async def apply_synced_delete(self, signed_order: bytes) -> None:
        """A delete order this worker missed while away; ignored unless its owner signed it."""
        try:
            model_id = DeleteOrder.verify(signed_order).model_id
        except (MalformedMessage, SignatureInvalid):
            return
        if not self._store.has(model_id):
            return
        try:
            await self.delete(model_id, signed_order)
            log.info("model %s was deleted by its owner while this worker was away: deleted", model_id)
        except JobRejected:
            pass

