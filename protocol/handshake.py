"""Control-channel messages: the attestation challenge, the worker's statement and evidence.

These travel in clear: their integrity comes from the evidence itself, whose 64-byte report
data is SHA-512 of the canonical statement below (pool, epoch, HPKE suite, pool public key,
worker identity key, the producer's nonce and the worker's config digest). A verifier that
recomputes the report data from the statement it received and finds it equal to the value
inside verified evidence knows that a measured worker produced exactly that statement, in
answer to exactly that nonce.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .codec import PROTOCOL_VERSION, bounded_str, field, fixed_bytes, pack, unpack_map
from typing import Any

from .errors import MalformedMessage

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
    :data:`SEALED_REQUEST` for a sealed request envelope (a map with a header and no ``t``)."""
    m = unpack_map(data, kind=None, max_bytes=max_bytes)
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
MODEL_SYNC_CHUNK_BYTES = 4 * 1024 * 1024


def model_sync_info(pool: str, epoch: int, nonce: bytes, model_id: str, index: int, count: int,
                    total_size: int) -> bytes:
    """HPKE ``info`` of one sealed model-sync message: binds the request's fresh nonce, so a
    message recorded from an earlier sync (e.g. an older manifest) cannot be replayed into this one."""
    return pack([MODEL_SYNC_LABEL, pool, epoch, nonce, model_id, index, count, total_size])


@dataclass(frozen=True)
class ModelSyncRequest:
    """A worker that just joined (or restarted) lists the models it has; members send the rest.

    Anyone could send this, so members seal every chunk to the *pool* key with HPKE: only a
    worker that holds the epoch key -- an admitted member -- can open what comes back."""

    have: tuple[str, ...]
    worker_id: str
    nonce: bytes
    source: str = ""  # the member that should answer (the one that admitted us); "" = any member

    def to_bytes(self) -> bytes:
        return pack({"v": PROTOCOL_VERSION, "t": "model_sync_request", "have": list(self.have),
                     "worker": self.worker_id, "nonce": self.nonce, "source": self.source})

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelSyncRequest:
        m = unpack_map(data, kind="model_sync_request", max_bytes=1024 * 1024)
        have = m.get("have")
        if not isinstance(have, list) or not all(isinstance(h, str) and len(h) == 64 for h in have):
            raise MalformedMessage("model_sync_request: have must be a list of model ids")
        return cls(have=tuple(have), worker_id=bounded_str(m, "worker", what="model_sync_request", max_len=128),
                   nonce=fixed_bytes(m, "nonce", NONCE_BYTES, what="model_sync_request"),
                   source=bounded_str(m, "source", what="model_sync_request", max_len=128, optional=True) or "")


@dataclass(frozen=True)
class ModelSyncChunk:
    """One HPKE-sealed message of a model sync, sealed to the pool key.

    A chunk (``count >= 1``) seals ``[owner-signed manifest, bytes of the model]``; the end
    marker (``count == 0``) seals ``{"manifests": [...], "deletes": [...]}``: the member's
    manifests of models the requester already has (allow-list changes it missed) and the
    owner-signed delete orders it knows (deletes it missed). Everything that names owners or
    producers is inside the ciphertext."""

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
