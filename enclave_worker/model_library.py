"""The models this worker holds, and everything that changes them.

One owner for four things that must move together: the loaded ONNX Runtime sessions
(:class:`~enclave_worker.models.ModelStore`), the owners' signed manifests and delete orders
(:class:`~enclave_worker.ownership.ModelRegistry`), the sealed copies on disk, and the models
still arriving (chunk by chunk, or by sync) that a job may wait for. A model is served only once
its bytes hash to its id, its owner's manifest verifies, and its sealed copy is written.

Models still arriving: a job for a model that is not here yet but whose upload is in progress
on this worker waits for it (at most ``MODEL_WAIT_SECONDS``). It waits only while an upload of
that model is actually in progress or loading: an upload that fails or expires
(:mod:`enclave_worker.uploads` bounds and expires them) releases its waiters at once, and they
get ``unknown_model``. So the map of arriving models holds at most one entry per incomplete
upload plus one per model being loaded.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from collections.abc import Callable, Iterable

from protocol import bodies
from protocol.bodies import ModelInfo
from protocol.envelope import RequestHeader
from protocol.errors import MalformedMessage, ProtocolError, SignatureInvalid
from protocol.ownership import DeleteOrder, ModelManifest

from .errors import JobRejected, SealedStateError
from .models import LoadedModel, ModelStore
from .ownership import CatalogVersion, ModelRegistry
from .sealed_state import SealedState
from .uploads import Uploads

log = logging.getLogger("enclaveq.worker")

MODEL_WAIT_SECONDS = 30.0  # a job may wait this long for a model still arriving on its worker


class ModelLibrary:
    def __init__(self, state: SealedState, *, max_model_bytes: int, intra_op_threads: int,
                 custom_op_domains: tuple[str, ...] = (), clock: Callable[[], float] = time.time) -> None:
        self._state = state
        self._store = ModelStore(max_model_bytes=max_model_bytes, intra_op_threads=intra_op_threads,
                                 custom_op_domains=custom_op_domains)
        self._registry = ModelRegistry(state)
        self.uploads = Uploads(max_model_bytes=max_model_bytes, clock=clock)
        # Models with an upload in progress or loading here, and how many are loading.
        self._arriving: dict[str, asyncio.Event] = {}
        self._loading: dict[str, int] = {}
        self._waiting = 0  # jobs waiting for an arriving model

    # -- reading ---------------------------------------------------------------------------
    @property
    def catalog_version(self) -> CatalogVersion:
        """The version of the owners' records held here (members compare it in a model sync)."""
        return self._registry.version

    def remember_deletes(self, signed_orders: Iterable[bytes]) -> int:
        """Keep owner-signed delete orders even for models never held here, so a replayed upload
        signed before the delete is refused on this worker too."""
        return self._registry.remember_deletes(signed_orders)

    def has(self, model_id: str) -> bool:
        return self._store.has(model_id)

    def list(self) -> list[ModelInfo]:
        return self._store.list()

    def list_for(self, producer_key: Callable[[], bytes | None]) -> builtins.list[ModelInfo]:
        """The models a producer may see (``model_list``): every model without an allow-list,
        and an allow-listed one only if the key its session proved is on the list or is the
        owner's. ``producer_key`` is asked only when an allow-listed model is held, so a session
        without allow-listed models around never pays for a proof check."""
        asked, key = False, None

        def may_see(info: ModelInfo) -> bool:
            nonlocal asked, key
            manifest = self._registry.manifest(info.model_id)
            if manifest is None or manifest.allowed_producers is None:
                return True
            if not asked:
                asked, key = True, producer_key()
            return key is not None and (manifest.allows(key) or key == manifest.owner_key)

        return [info for info in self._store.list() if may_see(info)]

    def arriving_count(self) -> int:
        """How many models are still arriving here (bounded; tests check it)."""
        return len(self._arriving)

    def waiting_count(self) -> int:
        """How many jobs are waiting for a model still arriving here."""
        return self._waiting

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
        reach every worker, and the producer may already hold another worker's confirmation).
        Check the allow-list *after* this returns: a model that arrives while a job waits comes
        with its manifest, which the job's producer must satisfy."""
        arriving = self._arriving.get(model_id)
        if arriving is not None and not self._store.has(model_id):
            self._waiting += 1
            try:
                await asyncio.wait_for(arriving.wait(), MODEL_WAIT_SECONDS)
            except TimeoutError:
                pass
            finally:
                self._waiting -= 1
        return self._store.get(model_id)

    # -- changing ----------------------------------------------------------------------------
    def load_sealed(self) -> None:
        """At start: load every sealed model whose sealed owner manifest verifies. A sealed model
        that does not unseal (damaged, or written under another measurement) is quarantined,
        named in the log, and the worker starts without it: one bad file must not stop a pool."""
        for model_id in self._state.model_ids():
            try:
                data = self._state.read_model(model_id)
            except SealedStateError as exc:
                self._quarantine(model_id, str(exc))
                continue
            if not self._registry.load_sealed(model_id):
                log.warning("sealed model %s has no valid owner manifest; not loaded", model_id)
                continue
            try:
                self._store.load(model_id, data)
            except JobRejected as exc:
                self._quarantine(model_id, str(exc))

    def _quarantine(self, model_id: str, why: str) -> None:
        try:
            folder = self._state.quarantine_model(model_id)
        except OSError as exc:
            log.error("sealed model %s is not usable (%s) and could not be moved aside (%s); not loaded",
                      model_id, why, exc.strerror or type(exc).__name__)
            return
        log.error("sealed model %s is not usable (%s): moved to %s, not loaded; upload it again or let a pool "
                  "member send it", model_id, why, folder)

    async def _persist(self, model_id: str, data: bytes, manifest: ModelManifest, signed: bytes) -> None:
        """Write the model and its owner's manifest to sealed storage, or raise ``JobRejected``
        (and leave nothing behind): a model is served only once a restart would find it again."""
        try:
            await asyncio.to_thread(self._state.save_model, model_id, data)
            self._registry.record(manifest, signed)
        except OSError as exc:
            try:
                await asyncio.to_thread(self._state.delete_model, model_id)
            except OSError:
                pass  # nothing was written, or nothing can be removed: the model is not served either way
            log.error("model %s could not be written to sealed storage (%s); refused", model_id,
                      exc.strerror or type(exc).__name__)
            raise JobRejected(f"the worker could not write model {model_id} to its sealed storage "
                              f"({exc.strerror or type(exc).__name__}); the model is not served",
                              bodies.ErrorCode.INTERNAL) from None

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
        self.expire_uploads()
        try:
            received, whole = self.uploads.add((c.upload_id, manifest.owner_key), model_id, c.index, c.count,
                                               c.total_size, data)
        except JobRejected:
            self._release(model_id)  # the chunk may have ended its upload (assembled to the wrong size)
            raise
        self._arriving.setdefault(model_id, asyncio.Event())
        if whole is None:
            return bodies.encode_ack(None, received, False)
        self._loading[model_id] = self._loading.get(model_id, 0) + 1
        try:
            loaded = await asyncio.to_thread(self._store.open, model_id, whole)
            # Durable first, then served: the manifest (its allow-list) is in force and the sealed
            # copy written before any job can get the model.
            await self._persist(model_id, whole, manifest, signed)
            self._store.add(loaded)
        finally:
            self._loading[model_id] -= 1
            if not self._loading[model_id]:
                del self._loading[model_id]
            self._release(model_id)
        log.info("model %s stored (%d bytes)", model_id, len(whole))
        return bodies.encode_ack(model_id, received, True)

    def expire_uploads(self) -> None:
        """Drop uploads idle for too long (by the worker's clock) and release their waiters."""
        for model_id in self.uploads.expire():
            log.info("an incomplete upload of model %s expired", model_id)
            self._release(model_id)

    def _release(self, model_id: str) -> None:
        """Wake the jobs waiting for ``model_id`` once nothing more can bring it: it is here, or
        no upload of it is in progress or loading any more."""
        if self._store.has(model_id) or not (self.uploads.arriving(model_id) or self._loading.get(model_id)):
            arriving = self._arriving.pop(model_id, None)
            if arriving is not None:
                arriving.set()

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
            loaded = await asyncio.to_thread(self._store.open, model_id, data)  # checks SHA-256 == model id
        except JobRejected as exc:
            log.warning("synced model %s refused: %s", model_id, exc)
            return
        try:
            await self._persist(model_id, data, manifest, signed_manifest)  # before any job can get it
        except JobRejected as exc:
            log.warning("synced model %s refused: %s", model_id, exc)
            return
        self._store.add(loaded)
        self._release(model_id)  # jobs waiting for an upload of it need not wait any longer
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

