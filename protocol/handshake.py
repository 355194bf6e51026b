"""Control-channel messages: the attestation challenge, the worker's statement and evidence.

These travel in clear: their integrity comes from the evidence itself, whose 64-byte report
data is SHA-512 of the canonical statement below (pool, epoch, HPKE suite, pool public key,
worker identity key, the producer's nonce and the worker's config digest). A verifier that
recomputes the report data from the statement it received and finds it equal to the value
inside verified evidence knows that a measured worker produced exactly that statement, in
answer to exactly that nonce.

Model-sync messages are the exception: they pass between members only, so they are
authenticated with keys derived from the epoch's pool private key, which only members hold
(:func:`member_mac_key`, :func:`model_sync_key`; the argument is in
:mod:`enclave_worker.model_sync`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .codec import PROTOCOL_VERSION, bounded_str, field, fixed_bytes, pack, unpack_map
from .errors import MalformedMessage, SignatureInvalid

STATEMENT_LABEL = b"enclaveq/v1/attestation-statement"
NONCE_BYTES = 32
MAX_EVIDENCE_BYTES = 256 * 1024


@dataclass(frozen=True)
class Challenge:
    nonce: bytes

    def to_bytes(self) -> bytes:
        return pack({"v": PROTOCOL_VERSION, "t": "challenge", "nonce": self.nonce})

    @classmethod
    def from_bytes(cls, data: bytes) -> Challenge:
        m = unpack_map(data, kind="challenge", max_bytes=4096)
        return cls(nonce=fixed_bytes(m, "nonce", NONCE_BYTES, what="challenge"))


@dataclass(frozen=True)
class Statement:
    """What a worker asserts about itself; hashed into the evidence's report data."""

    pool: str
    epoch: int
    suite: str
    pool_public_key: bytes
    worker_identity_key: bytes
    nonce: bytes
    config_digest: bytes

    def canonical(self) -> bytes:
        return pack([
            STATEMENT_LABEL, self.pool, self.epoch, self.suite, self.pool_public_key,
            self.worker_identity_key, self.nonce, self.config_digest,
        ])

    def report_data(self) -> bytes:
        return hashlib.sha512(self.canonical()).digest()

    def to_map(self) -> dict[str, Any]:
        return {
            "pool": self.pool, "epoch": self.epoch, "suite": self.suite,
            "pool_public_key": self.pool_public_key, "worker_identity_key": self.worker_identity_key,
            "nonce": self.nonce, "config_digest": self.config_digest,
        }

    @classmethod
    def from_map(cls, m: object) -> Statement:
        what = "statement"
        if not isinstance(m, dict):
            raise MalformedMessage("statement: expected a map")
        epoch = field(m, "epoch", int, what=what)
        if epoch < 0:
            raise MalformedMessage("statement: negative epoch")
        return cls(
            pool=bounded_str(m, "pool", what=what),
            epoch=epoch,
            suite=bounded_str(m, "suite", what=what),
            pool_public_key=fixed_bytes(m, "pool_public_key", 32, what=what),
            worker_identity_key=fixed_bytes(m, "worker_identity_key", 32, what=what),
            nonce=fixed_bytes(m, "nonce", NONCE_BYTES, what=what),
            config_digest=fixed_bytes(m, "config_digest", 32, what=what),
        )


@dataclass(frozen=True)
class EvidenceResponse:
    platform: str
    evidence: bytes
    statement: Statement
    worker_id: str

    def to_bytes(self) -> bytes:
        return pack({
            "v": PROTOCOL_VERSION, "t": "evidence", "platform": self.platform,
            "evidence": self.evidence, "statement": self.statement.to_map(), "worker": self.worker_id,
        })

    @classmethod
    def from_bytes(cls, data: bytes) -> EvidenceResponse:
        m = unpack_map(data, kind="evidence", max_bytes=MAX_EVIDENCE_BYTES + 4096)
        evidence = field(m, "evidence", bytes, what="evidence")
        if len(evidence) > MAX_EVIDENCE_BYTES:
            raise MalformedMessage("evidence: larger than the evidence limit")
        return cls(
            platform=bounded_str(m, "platform", what="evidence", max_len=32),
            evidence=evidence,
            statement=Statement.from_map(m.get("statement")),
            worker_id=bounded_str(m, "worker", what="evidence", max_len=128),
        )


@dataclass(frozen=True)
class ControlError:
    """A worker's refusal on the control channel (e.g. a malformed challenge)."""

    code: str
    message: str

    def to_bytes(self) -> bytes:
        return pack({"v": PROTOCOL_VERSION, "t": "control_error", "code": self.code, "message": self.message})

    @classmethod
    def from_bytes(cls, data: bytes) -> ControlError:
        m = unpack_map(data, kind="control_error", max_bytes=8192)
        return cls(code=bounded_str(m, "code", what="control_error", max_len=64),
                   message=bounded_str(m, "message", what="control_error", max_len=2048))


# What ``control_kind`` says of a sealed request (uploads and deletes are broadcast on the
# control channel too): its real type is inside its header, read by ``peek_request``.
SEALED_REQUEST = "sealed_request"


def control_kind(data: bytes, *, max_bytes: int = MAX_EVIDENCE_BYTES + 4096) -> str:
    """The ``t`` of a control message, for dispatch, without trusting anything else in it;
    :data:`SEALED_REQUEST` for a sealed request envelope (a map with a header and no ``t``).

    The structural limits are the clear-text defaults, except that one list may be as long as a
    :class:`ModelSyncRequest`'s list of held models (the longest clear control message); each
    kind's parser then applies its own."""
    m = unpack_map(data, kind=None, max_bytes=max_bytes, max_items=_SYNC_REQUEST_MAX_ITEMS,
                   max_container_len=MAX_SYNC_HAVE)
    kind = m.get("t")
    if kind is None and "h" in m:
        return SEALED_REQUEST
    if not isinstance(kind, str):
        raise MalformedMessage("control message without a type")
    return kind


JOIN_LABEL = b"enclaveq/v1/join"


def join_info(pool: str, epoch: int, nonce: bytes, joiner_identity_key: bytes) -> bytes:
    """HPKE ``info`` for epoch keys sealed to a joiner: binds pool, epoch, the joiner's nonce and key."""
    return pack([JOIN_LABEL, pool, epoch, nonce, joiner_identity_key])


@dataclass(frozen=True)
class JoinRequest:
    """A worker without pool keys asks the pool's members for them.

    Its statement carries a fresh identity key and nonce (``pool_public_key`` is 32 zero bytes:
    it has none yet); its evidence binds that statement, so a member knows the key it seals to
    belongs to a measured worker."""

    platform: str
    evidence: bytes
    statement: Statement
    worker_id: str

    def to_bytes(self) -> bytes:
        return pack({"v": PROTOCOL_VERSION, "t": "join_request", "platform": self.platform,
                     "evidence": self.evidence, "statement": self.statement.to_map(), "worker": self.worker_id})

    @classmethod
    def from_bytes(cls, data: bytes) -> JoinRequest:
        m = unpack_map(data, kind="join_request", max_bytes=MAX_EVIDENCE_BYTES + 4096)
        evidence = field(m, "evidence", bytes, what="join_request")
        if len(evidence) > MAX_EVIDENCE_BYTES:
            raise MalformedMessage("join_request: larger than the evidence limit")
        return cls(platform=bounded_str(m, "platform", what="join_request", max_len=32), evidence=evidence,
                   statement=Statement.from_map(m.get("statement")),
                   worker_id=bounded_str(m, "worker", what="join_request", max_len=128))


@dataclass(frozen=True)
class JoinResponse:
    """A member's answer: its own evidence bound to the joiner's nonce (mutual attestation), and
    the epoch's pool private key HPKE-sealed to the joiner's identity key."""

    platform: str
    evidence: bytes
    statement: Statement
    sealed_keys: bytes
    worker_id: str

    def to_bytes(self) -> bytes:
        return pack({"v": PROTOCOL_VERSION, "t": "join_response", "platform": self.platform,
                     "evidence": self.evidence, "statement": self.statement.to_map(),
                     "sealed_keys": self.sealed_keys, "worker": self.worker_id})

    @classmethod
    def from_bytes(cls, data: bytes) -> JoinResponse:
        m = unpack_map(data, kind="join_response", max_bytes=MAX_EVIDENCE_BYTES + 24 * 1024)
        evidence = field(m, "evidence", bytes, what="join_response")
        sealed = field(m, "sealed_keys", bytes, what="join_response")
        if len(evidence) > MAX_EVIDENCE_BYTES or len(sealed) > 16 * 1024:
            raise MalformedMessage("join_response: a field is larger than its limit")
        return cls(platform=bounded_str(m, "platform", what="join_response", max_len=32), evidence=evidence,
                   statement=Statement.from_map(m.get("statement")), sealed_keys=sealed,
                   worker_id=bounded_str(m, "worker", what="join_response", max_len=128))


MODEL_SYNC_LABEL = b"enclaveq/v1/model-sync"
MODEL_SYNC_REQUEST_LABEL = b"enclaveq/v1/model-sync-request"
MEMBER_MAC_LABEL = b"enclaveq/v1/member-mac"
MODEL_SYNC_CHUNK_BYTES = 4 * 1024 * 1024
MEMBER_MAC_BYTES = 32
# Model ids a sync request may list as held. A worker holding more lists only this many; the
# member then sends some it already has, which it skips (a pool of that many models is far
# beyond what a worker loads today). Bounds what every member decodes before the MAC check.
MAX_SYNC_HAVE = 1024
_SYNC_REQUEST_MAX_BYTES = MAX_SYNC_HAVE * (64 + 2) + 4096
_SYNC_REQUEST_MAX_ITEMS = MAX_SYNC_HAVE + 32  # the list's ids, plus the map's 10 keys and values


def _hkdf(pool_private_key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(pool_private_key)


def member_mac_key(pool_private_key: bytes, pool: str, epoch: int) -> bytes:
    """The key members authenticate worker-to-worker requests with:
    HKDF-SHA256(IKM = the epoch's raw X25519 pool private key, salt = none,
    info = msgpack([MEMBER_MAC_LABEL, pool, epoch]), L = 32). Only admitted members hold the
    IKM, so only they can derive it (see :mod:`enclave_worker.model_sync` for the argument)."""
    return _hkdf(pool_private_key, pack([MEMBER_MAC_LABEL, pool, epoch]))


def model_sync_key(pool_private_key: bytes, pool: str, epoch: int, nonce: bytes) -> bytes:
    """The AES-256-GCM key of one sync's messages: HKDF-SHA256(IKM = the epoch's pool private
    key, salt = none, info = msgpack([MODEL_SYNC_LABEL, pool, epoch, requester's nonce]), L = 32).
    Only members can derive it, so a message that opens under it was written by a member, for
    this sync."""
    return _hkdf(pool_private_key, pack([MODEL_SYNC_LABEL, pool, epoch, nonce]))


def model_sync_info(pool: str, epoch: int, nonce: bytes, model_id: str, index: int, count: int,
                    total_size: int) -> bytes:
    """Associated data of one sealed model-sync message: binds the request's fresh nonce and the
    message's position, so nothing is moved between syncs, models or positions."""
    return pack([MODEL_SYNC_LABEL, pool, epoch, nonce, model_id, index, count, total_size])


@dataclass(frozen=True)
class ModelSyncRequest:
    """A worker that just joined (or restarted, or reconnected) lists the models it has; a member
    sends the rest.

    Answering costs a member a read, an unseal and a re-seal of every model the requester lacks,
    so only a member may ask: ``mac`` is HMAC-SHA256 under :func:`member_mac_key` of ``epoch``
    over :meth:`signed_bytes` (pool, epoch, nonce, worker, have, source, issue time and the
    reply queue), checked before anything is read. ``issued_at_ms`` and ``nonce`` let the member
    refuse stale and replayed requests."""

    have: tuple[str, ...]
    worker_id: str
    nonce: bytes
    epoch: int
    issued_at_ms: int
    mac: bytes
    source: str = ""  # the member that should answer (the one that admitted us); "" = any member

    @staticmethod
    def signed_bytes(*, pool: str, epoch: int, nonce: bytes, worker_id: str, have: tuple[str, ...], source: str,
                     issued_at_ms: int, reply_to: str) -> bytes:
        return pack([MODEL_SYNC_REQUEST_LABEL, pool, epoch, nonce, worker_id, list(have), source, issued_at_ms,
                     reply_to])

    @classmethod
    def create(cls, mac_key: bytes, *, pool: str, epoch: int, nonce: bytes, worker_id: str, have: tuple[str, ...],
               source: str, issued_at_ms: int, reply_to: str) -> ModelSyncRequest:
        """A request authenticated with ``mac_key`` (:func:`member_mac_key` of ``epoch``)."""
        h = hmac.HMAC(mac_key, hashes.SHA256())
        h.update(cls.signed_bytes(pool=pool, epoch=epoch, nonce=nonce, worker_id=worker_id, have=have,
                                  source=source, issued_at_ms=issued_at_ms, reply_to=reply_to))
        return cls(have=have, worker_id=worker_id, nonce=nonce, epoch=epoch, issued_at_ms=issued_at_ms,
                   mac=h.finalize(), source=source)

    def verify(self, mac_key: bytes, *, pool: str, reply_to: str) -> None:
        """Raise ``SignatureInvalid`` unless a holder of ``mac_key`` made this request for ``pool``
        with replies to ``reply_to`` (constant-time comparison)."""
        h = hmac.HMAC(mac_key, hashes.SHA256())
        h.update(self.signed_bytes(pool=pool, epoch=self.epoch, nonce=self.nonce, worker_id=self.worker_id,
                                   have=self.have, source=self.source, issued_at_ms=self.issued_at_ms,
                                   reply_to=reply_to))
        try:
            h.verify(self.mac)
        except InvalidSignature:
            raise SignatureInvalid("model_sync_request: not authenticated by a pool member") from None

    def to_bytes(self) -> bytes:
        return pack({"v": PROTOCOL_VERSION, "t": "model_sync_request", "have": list(self.have),
                     "worker": self.worker_id, "nonce": self.nonce, "source": self.source, "ep": self.epoch,
                     "ts": self.issued_at_ms, "mac": self.mac})

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelSyncRequest:
        w = "model_sync_request"
        # The one clear control message with a long list: explicit structural limits that fit it.
        m = unpack_map(data, kind=w, max_bytes=_SYNC_REQUEST_MAX_BYTES, max_depth=2,
                       max_items=_SYNC_REQUEST_MAX_ITEMS, max_container_len=MAX_SYNC_HAVE)
        have = m.get("have")
        if not isinstance(have, list) or not all(isinstance(h, str) and len(h) == 64 for h in have):
            raise MalformedMessage(f"{w}: have must be a list of model ids")
        epoch, issued = field(m, "ep", int, what=w), field(m, "ts", int, what=w)
        if epoch < 1 or issued < 0:
            raise MalformedMessage(f"{w}: invalid epoch or time")
        return cls(have=tuple(have), worker_id=bounded_str(m, "worker", what=w, max_len=128),
                   nonce=fixed_bytes(m, "nonce", NONCE_BYTES, what=w), epoch=epoch, issued_at_ms=issued,
                   mac=fixed_bytes(m, "mac", MEMBER_MAC_BYTES, what=w),
                   source=bounded_str(m, "source", what=w, max_len=128, optional=True) or "")


@dataclass(frozen=True)
class ModelSyncChunk:
    """One sealed message of a model sync: AES-256-GCM under :func:`model_sync_key` (so it
    opens only for members, and only a member can have written it), with
    :func:`model_sync_info` as associated data; ``sealed`` is the 12-byte GCM nonce followed by
    the ciphertext.

    A chunk (``count >= 1``) seals ``[owner-signed manifest, bytes of the model]``; the end
    marker (``count == 0``) seals ``{"manifests": [...], "deletes": [...], "version": [...],
    "worker": ...}``: the member's manifests of models the requester already has (allow-list
    changes it missed), the owner-signed delete orders it knows (deletes it missed), the
    version of its model catalog and its worker id. Everything that names owners or producers
    is inside the ciphertext."""

    epoch: int
    model_id: str
    index: int
    count: int
    total_size: int
    sealed: bytes

    def to_bytes(self) -> bytes:
        return pack({"v": PROTOCOL_VERSION, "t": "model_sync_chunk", "ep": self.epoch, "mid": self.model_id,
                     "i": self.index, "n": self.count, "size": self.total_size, "c": self.sealed})

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelSyncChunk:
        w = "model_sync_chunk"
        m = unpack_map(data, kind=w, max_bytes=MODEL_SYNC_CHUNK_BYTES + 1024 * 1024)
        index, count = field(m, "i", int, what=w), field(m, "n", int, what=w)
        size, epoch = field(m, "size", int, what=w), field(m, "ep", int, what=w)
        if min(index, count, size, epoch) < 0 or (count and index >= count):
            raise MalformedMessage(f"{w}: invalid position")
        return cls(epoch=epoch, model_id=bounded_str(m, "mid", what=w, max_len=64), index=index, count=count,
                   total_size=size, sealed=field(m, "c", bytes, what=w))


ROTATION_LABEL = b"enclaveq/v1/rotation"


def rotation_info(pool: str, epoch: int, previous_epoch: int, retire_at_ms: int) -> bytes:
    """HPKE ``info`` of a new epoch key sealed to the previous epoch's pool key."""
    return pack([ROTATION_LABEL, pool, epoch, previous_epoch, retire_at_ms])


def rotation_nonce(pool: str, epoch: int, previous_epoch: int, retire_at_ms: int, sealed: bytes) -> bytes:
    """The statement nonce of an epoch announcement: binds the rotator's evidence to exactly this
    sealed key and retirement time, so neither can be swapped under a valid piece of evidence."""
    return hashlib.sha256(pack([ROTATION_LABEL, pool, epoch, previous_epoch, retire_at_ms, sealed])).digest()


@dataclass(frozen=True)
class EpochAnnounce:
    """A member rotated the pool key: epoch ``statement.epoch`` replaces ``previous_epoch``.

    The new private key is HPKE-sealed to the *previous* epoch's pool key, which only admitted
    members hold; the rotator's evidence (checked against the receiver's join policy) vouches for
    the statement, whose pool public key is the new one and whose nonce binds the sealed key and
    ``retire_at_ms`` -- the time (ms since the epoch, rotator's clock) after which every member
    erases the previous key."""

    platform: str
    evidence: bytes
    statement: Statement
    previous_epoch: int
    retire_at_ms: int
    sealed_key: bytes
    worker_id: str

    def to_bytes(self) -> bytes:
        return pack({"v": PROTOCOL_VERSION, "t": "epoch_announce", "platform": self.platform,
                     "evidence": self.evidence, "statement": self.statement.to_map(),
                     "prev": self.previous_epoch, "retire": self.retire_at_ms, "sealed": self.sealed_key,
                     "worker": self.worker_id})

    @classmethod
    def from_bytes(cls, data: bytes) -> EpochAnnounce:
        w = "epoch_announce"
        m = unpack_map(data, kind=w, max_bytes=MAX_EVIDENCE_BYTES + 8192)
        evidence = field(m, "evidence", bytes, what=w)
        sealed = field(m, "sealed", bytes, what=w)
        if len(evidence) > MAX_EVIDENCE_BYTES or len(sealed) > 1024:
            raise MalformedMessage(f"{w}: a field is larger than its limit")
        previous, retire = field(m, "prev", int, what=w), field(m, "retire", int, what=w)
        statement = Statement.from_map(m.get("statement"))
        if previous < 1 or retire < 0 or statement.epoch != previous + 1:
            raise MalformedMessage(f"{w}: the new epoch must follow the previous one")
        return cls(platform=bounded_str(m, "platform", what=w, max_len=32), evidence=evidence,
                   statement=statement, previous_epoch=previous, retire_at_ms=retire, sealed_key=sealed,
                   worker_id=bounded_str(m, "worker", what=w, max_len=128))
