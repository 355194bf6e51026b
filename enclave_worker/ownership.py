"""Who owns each model and who may run it (P7): the worker's side of owner-signed manifests.

Rules, all checked inside the worker (the broker and host only ever see them sealed):

- An upload carries the owner's signed manifest (model id = SHA-256 of the bytes, size, owner
  key, optional producer allow-list, issue time). Unsigned or badly signed uploads are refused.
- A model id already held with another owner's manifest cannot be replaced: ``not_owner``.
  The owner may replace its manifest (e.g. change the allow-list) with a *newer* one; an older
  manifest (a replay) is refused: ``stale_order``.
- Only the owner's signed delete order deletes a model, and only if it is newer than the
  manifest in force (an old order replayed after a re-upload deletes nothing). Applied delete
  orders are kept, sealed, so that a replayed older upload is refused too, and so members can
  hand them to a worker that was down when the delete happened.
- A model with an allow-list runs only for a session whose producer proved its key
  (``protocol.ownership.ProducerProof``, bound to the session); otherwise ``not_allowed``.

The owner's key is a model-level authority, independent of attestation: attestation says the
pool is genuine, the signature says this model's owner wanted this.

The catalog's version (:attr:`ModelRegistry.version`, :class:`CatalogVersion`) summarises the
manifests and delete orders in force without any new storage: the newest owner-signed
``issued_at_ms`` among them, how many there are, and a digest of them all. Members compare
versions in every model sync, so a worker whose sealed state was rolled back (a copy of its
state directory put back) learns it is behind, and takes the newer signed records it lacks.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from protocol import bodies
from protocol.codec import pack
from protocol.errors import MalformedMessage, SignatureInvalid
from protocol.ownership import DeleteOrder, ModelManifest

from .errors import JobRejected, SealedStateError
from .sealed_state import SealedState

log = logging.getLogger("enclaveq.worker")

MAX_DELETE_ORDERS = 4096  # kept newest first; older ones only guard against very old replays


def _verified(parse, signed: bytes, what: str):
    try:
        return parse(signed)
    except SignatureInvalid:
        raise JobRejected(f"the {what} is not signed by the key it names", bodies.ErrorCode.BAD_SIGNATURE) from None
    except MalformedMessage as exc:
        raise JobRejected(f"malformed {what}: {exc}", bodies.ErrorCode.BAD_SIGNATURE) from None


@dataclass(frozen=True)
class CatalogVersion:
    """What a worker's model catalog is at: the newest owner-signed issue time among its
    manifests and delete orders, how many it holds, and a SHA-256 over all of them.

    Legitimate changes only ever add newer signed records (an upload adds a manifest, an
    allow-list change replaces one with a newer, a delete turns a manifest into a newer order),
    so a catalog restored from an older copy has an older ``newest_ms`` or fewer ``records``
    than its live peers. Owners' clocks set ``newest_ms``, so this orders catalogs, it does not
    date them; the digest tells equal catalogs from different ones with the same numbers."""

    newest_ms: int
    records: int
    digest: bytes

    def compare(self, other: CatalogVersion) -> Literal["same", "newer", "older", "diverged"]:
        """How this catalog stands to ``other``'s."""
        if self.digest == other.digest:
            return "same"
        mine, theirs = (self.newest_ms, self.records), (other.newest_ms, other.records)
        if mine == theirs:
            return "diverged"
        return "newer" if mine > theirs else "older"

    def to_wire(self) -> list[object]:
        return [self.newest_ms, self.records, self.digest]

    @classmethod
    def from_wire(cls, value: object) -> CatalogVersion:
        if (not isinstance(value, list) or len(value) != 3 or type(value[0]) is not int
                or type(value[1]) is not int or not isinstance(value[2], bytes) or len(value[2]) != 32
                or value[0] < 0 or value[1] < 0):
            raise MalformedMessage("catalog version: expected [newest_ms, records, 32-byte digest]")
        return cls(newest_ms=value[0], records=value[1], digest=value[2])

    def __str__(self) -> str:
        return f"{self.newest_ms}/{self.records}/{self.digest[:4].hex()}"


class ModelRegistry:
    def __init__(self, state: SealedState) -> None:
        self._state = state
        self._manifests: dict[str, tuple[ModelManifest, bytes]] = {}
        self._deleted: dict[str, tuple[DeleteOrder, bytes]] = {}
        self._version: CatalogVersion | None = None  # computed on demand, dropped on every change
        for signed in state.load_delete_orders():
            try:
                order = DeleteOrder.verify(signed)
            except (MalformedMessage, SignatureInvalid):
                continue
            self._deleted[order.model_id] = (order, signed)

    def load_sealed(self, model_id: str) -> bool:
        """Adopt the sealed manifest of a sealed model; False if it has none that verifies."""
        try:
            signed = self._state.read_manifest(model_id)
        except SealedStateError as exc:
            log.warning("%s", exc)
            return False
        if signed is None:
            return False
        try:
            manifest = ModelManifest.verify(signed)
        except (MalformedMessage, SignatureInvalid):
            return False
        if manifest.model_id != model_id:
            return False
        self._manifests[model_id] = (manifest, signed)
        self._version = None
        return True

    def manifest(self, model_id: str) -> ModelManifest | None:
        entry = self._manifests.get(model_id)
        return entry[0] if entry else None

    def signed_manifest(self, model_id: str) -> bytes:
        return self._manifests[model_id][1]

    # -- uploads ------------------------------------------------------------------------------
    def check_upload(self, model_id: str, signed: bytes) -> ModelManifest:
        manifest = _verified(ModelManifest.verify, signed, "model manifest")
        if manifest.model_id != model_id:
            raise JobRejected("the manifest is for another model id", bodies.ErrorCode.MODEL_INVALID)
        current = self.manifest(model_id)
        if current is not None and current.owner_key != manifest.owner_key:
            raise JobRejected(f"model {model_id} belongs to another owner; only its owner can replace it",
                              bodies.ErrorCode.NOT_OWNER)
        if current is not None and manifest.issued_at_ms < current.issued_at_ms:
            raise JobRejected("this manifest is older than the one in force (a replay?)", bodies.ErrorCode.STALE_ORDER)
        deleted = self._deleted.get(model_id)
        if (deleted is not None and deleted[0].owner_key == manifest.owner_key
                and manifest.issued_at_ms <= deleted[0].issued_at_ms):
            raise JobRejected("its owner deleted this model after signing this manifest (a replay?)",
                              bodies.ErrorCode.STALE_ORDER)
        return manifest

    def record(self, manifest: ModelManifest, signed: bytes) -> None:
        self._state.save_manifest(manifest.model_id, signed)
        self._manifests[manifest.model_id] = (manifest, signed)
        self._version = None

    # -- deletes -------------------------------------------------------------------------------
    def check_delete(self, model_id: str, signed: bytes) -> DeleteOrder:
        order = _verified(DeleteOrder.verify, signed, "delete order")
        if order.model_id != model_id:
            raise JobRejected("the delete order is for another model id", bodies.ErrorCode.MODEL_INVALID)
        current = self.manifest(model_id)
        if current is None:
            raise JobRejected(f"model {model_id} is not loaded on this pool", bodies.ErrorCode.UNKNOWN_MODEL)
        if current.owner_key != order.owner_key:
            raise JobRejected(f"model {model_id} belongs to another owner; only its owner can delete it",
                              bodies.ErrorCode.NOT_OWNER)
        if order.issued_at_ms < current.issued_at_ms:
            raise JobRejected("this delete order is older than the model's manifest (a replay?)",
                              bodies.ErrorCode.STALE_ORDER)
        return order

    def forget(self, order: DeleteOrder, signed: bytes) -> None:
        self._manifests.pop(order.model_id, None)
        self._deleted[order.model_id] = (order, signed)
        self._save_delete_orders()

    def _save_delete_orders(self) -> None:
        newest = sorted(self._deleted.values(), key=lambda e: e[0].issued_at_ms, reverse=True)[:MAX_DELETE_ORDERS]
        self._deleted = {o.model_id: (o, s) for o, s in newest}
        self._state.save_delete_orders([s for _, s in newest])
        self._version = None

    def remember_deletes(self, signed_orders: Iterable[bytes]) -> int:
        """Keep owner-signed delete orders a member sent, also for models this worker never held:
        they refuse a replayed upload signed before the delete (a worker that joined after it
        would otherwise take it), and keep the catalogs of members comparable. An order is kept
        if it verifies, is newer than the one held for that model, and names the owner of the
        manifest held (if any). Deleting a held model is :meth:`check_delete`'s business.
        Returns how many were kept; sealed state is written once."""
        kept = 0
        for signed in signed_orders:
            try:
                order = DeleteOrder.verify(signed)
            except (MalformedMessage, SignatureInvalid):
                continue
            held = self._deleted.get(order.model_id)
            current = self.manifest(order.model_id)
            if held is not None and held[0].issued_at_ms >= order.issued_at_ms:
                continue
            if current is not None and current.owner_key != order.owner_key:
                continue
            self._deleted[order.model_id] = (order, signed)
            kept += 1
        if kept:
            self._save_delete_orders()
        return kept

    def delete_orders(self) -> tuple[bytes, ...]:
        return tuple(s for _, s in self._deleted.values())

    # -- version ---------------------------------------------------------------------------------
    @property
    def version(self) -> CatalogVersion:
        """The catalog's version (see :class:`CatalogVersion`), for members to compare."""
        if self._version is None:
            records = [s for _, s in self._manifests.values()] + [s for _, s in self._deleted.values()]
            newest = max([m.issued_at_ms for m, _ in self._manifests.values()]
                         + [o.issued_at_ms for o, _ in self._deleted.values()], default=0)
            self._version = CatalogVersion(newest_ms=newest, records=len(records),
                                           digest=hashlib.sha256(pack(sorted(records))).digest())
        return self._version

    # -- jobs ----------------------------------------------------------------------------------
    def require_allowed(self, model_id: str, producer_key: bytes | None) -> None:
        manifest = self.manifest(model_id)
        if manifest is None or manifest.allowed_producers is None:
            return
        if producer_key is None:
            raise JobRejected(f"model {model_id} runs only for the producer keys its owner allowed; this "
                              "session has no producer key", bodies.ErrorCode.NOT_ALLOWED)
        if not manifest.allows(producer_key):
            raise JobRejected(f"the owner of model {model_id} did not allow producer key {producer_key.hex()}",
                              bodies.ErrorCode.NOT_ALLOWED)

    def needs_producer_key(self, model_id: str) -> bool:
        manifest = self.manifest(model_id)
        return manifest is not None and manifest.allowed_producers is not None
