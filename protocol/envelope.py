"""Sealed requests (jobs, model chunks, model operations) and their sealed results.

Wire form of both directions::

    envelope = msgpack {"v": 1, "h": <header bytes>, "n": <12-byte nonce>, "c": <AES-256-GCM ciphertext>}

The header is itself a msgpack map, kept as the exact bytes that were authenticated: it is the
AEAD associated data, so changing any field that steers a message (type, session, job id,
model id, deadline, reply target, content type, chunk position, status) makes it fail to open.
The key comes from the session key via HKDF with the job id in ``info``, so a result sealed for
one job cannot be opened as the result of another.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from . import crypto
from .codec import DEFAULT_MAX_MESSAGE_BYTES, PROTOCOL_VERSION, bounded_str, field, fixed_bytes, pack, unpack, unpack_map
from .routing import REQUEST_KINDS
from .errors import DecryptionFailed, MalformedMessage

RESULT_STATUSES = ("ok", "error")
MAX_JOB_ID = 128
MAX_REPLY_TO = 255

# Structural limits of the clear parts, read before anything is authenticated (see
# protocol.limits). Each fits its exact shape: the peek that runs on every job, and on every
# result a producer receives, builds a few dozen objects at most, whatever the broker sends.
# An envelope is a map of 4 entries whose values are scalars: 1 + 4 keys + 4 values, the keys
# one-letter strings.
ENVELOPE_ITEMS = 9
ENVELOPE_STR_BYTES = 8
# Headers are maps of at most 12 (request) or 8 (result) fields today; room for 16 keeps a few
# optional fields to come. Only a request header nests anything: the 4-element chunk position.
# The parsers bound strings in characters; 4 UTF-8 bytes each for the longest (reply_to, job id).
MAX_HEADER_BYTES = 8192
MAX_HEADER_FIELDS = 16
REQUEST_HEADER_ITEMS = 1 + 2 * MAX_HEADER_FIELDS + 4
RESULT_HEADER_ITEMS = 1 + 2 * MAX_HEADER_FIELDS


@dataclass(frozen=True)
class Chunk:
    upload_id: str
    index: int
    count: int
    total_size: int


@dataclass(frozen=True)
class RequestHeader:
    kind: str
    session_id: bytes
    epoch: int
    sealed_session: bytes
    job_id: str
    deadline_ms: int
    reply_to: str
    content_type: str
    model_id: str | None = None
    chunk: Chunk | None = None
    # The producer's Ed25519 key and its signature over this session (protocol.ownership.
    # ProducerProof), when the producer has a key: models with an allow-list require it.
    producer_proof: bytes | None = None

    def to_bytes(self) -> bytes:
        m: dict[str, Any] = {
            "v": PROTOCOL_VERSION, "t": self.kind, "sid": self.session_id, "ep": self.epoch,
            "ss": self.sealed_session, "jid": self.job_id, "dl": self.deadline_ms,
            "rt": self.reply_to, "ct": self.content_type,
        }
        if self.model_id is not None:
            m["mid"] = self.model_id
        if self.chunk is not None:
            c = self.chunk
            m["ch"] = [c.upload_id, c.index, c.count, c.total_size]
        if self.producer_proof is not None:
            m["pp"] = self.producer_proof
        return pack(m)

    @classmethod
    def from_bytes(cls, data: bytes) -> RequestHeader:
        w = "request header"
        m = unpack_map(data, kind=None, max_bytes=MAX_HEADER_BYTES, max_depth=2, max_items=REQUEST_HEADER_ITEMS,
                       max_container_len=MAX_HEADER_FIELDS, max_str_len=4 * (MAX_REPLY_TO + 1), what=w)
        kind = m.get("t")
        if not isinstance(kind, str) or kind not in REQUEST_KINDS:  # a list or map is not hashable
            raise MalformedMessage(f"{w}: unknown request type")
        epoch = field(m, "ep", int, what=w)
        deadline = field(m, "dl", int, what=w)
        if epoch < 0 or deadline < 0:
            raise MalformedMessage(f"{w}: negative epoch or deadline")
        chunk = None
        if kind == "model_chunk":
            ch = m.get("ch")
            if not (isinstance(ch, list) and len(ch) == 4 and isinstance(ch[0], str) and len(ch[0]) <= 64
                    and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ch[1:])
                    and ch[1] < ch[2]):
                raise MalformedMessage(f"{w}: invalid chunk position")
            chunk = Chunk(*ch)
        model_id = bounded_str(m, "mid", what=w, max_len=64, optional=True)
        proof = field(m, "pp", bytes, what=w, optional=True)
        if proof is not None and len(proof) > 256:
            raise MalformedMessage(f"{w}: producer proof too large")
        if kind in ("job", "job_frame", "model_chunk", "model_delete") and model_id is None:
            raise MalformedMessage(f"{w}: {kind} needs a model id")
        return cls(
            kind=kind,
            session_id=fixed_bytes(m, "sid", crypto.SESSION_ID_BYTES, what=w),
            epoch=epoch,
            sealed_session=fixed_bytes(m, "ss", crypto.SEALED_SESSION_BYTES, what=w),
            job_id=bounded_str(m, "jid", what=w, max_len=MAX_JOB_ID),
            deadline_ms=deadline,
            reply_to=bounded_str(m, "rt", what=w, max_len=MAX_REPLY_TO),
            content_type=bounded_str(m, "ct", what=w, max_len=64),
            model_id=model_id,
            chunk=chunk,
            producer_proof=proof,
        )


@dataclass(frozen=True)
class ResultHeader:
    session_id: bytes
    job_id: str
    status: str
    content_type: str
    model_id: str | None = None
    # The answering worker's current pool epoch. Authenticated like every header field, so only
    # a pool member can set it; a producer whose session is older re-attests to pick up the new
    # key (rotation) without failing a job.
    current_epoch: int | None = None

    def to_bytes(self) -> bytes:
        m: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": "result", "sid": self.session_id,
                             "jid": self.job_id, "st": self.status, "ct": self.content_type}
        if self.model_id is not None:
            m["mid"] = self.model_id
        if self.current_epoch is not None:
            m["cep"] = self.current_epoch
        return pack(m)

    @classmethod
    def from_bytes(cls, data: bytes) -> ResultHeader:
        w = "result header"
        m = unpack_map(data, kind="result", max_bytes=MAX_HEADER_BYTES, max_depth=1, max_items=RESULT_HEADER_ITEMS,
                       max_container_len=MAX_HEADER_FIELDS, max_str_len=4 * MAX_JOB_ID, what=w)
        status = m.get("st")
        if status not in RESULT_STATUSES:
            raise MalformedMessage(f"{w}: unknown status")
        current_epoch = m.get("cep")
        if current_epoch is not None and (type(current_epoch) is not int or current_epoch < 0):
            raise MalformedMessage(f"{w}: invalid current epoch")
        return cls(
            session_id=fixed_bytes(m, "sid", crypto.SESSION_ID_BYTES, what=w),
            job_id=bounded_str(m, "jid", what=w, max_len=MAX_JOB_ID),
            status=status,
            content_type=bounded_str(m, "ct", what=w, max_len=64),
            model_id=bounded_str(m, "mid", what=w, max_len=64, optional=True),
            current_epoch=current_epoch,
        )


@dataclass(frozen=True)
class Sealed:
    """A parsed but unopened envelope: the header is readable, nothing in it is trusted yet."""

    header_bytes: bytes
    nonce: bytes
    ciphertext: bytes


def encode_envelope(header_bytes: bytes, nonce: bytes, ciphertext: bytes) -> bytes:
    return pack({"v": PROTOCOL_VERSION, "h": header_bytes, "n": nonce, "c": ciphertext})


def decode_envelope(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Sealed:
    m = unpack_map(data, kind=None, max_bytes=max_bytes, max_depth=1, max_items=ENVELOPE_ITEMS,
                   max_str_len=ENVELOPE_STR_BYTES, what="envelope")
    return Sealed(
        header_bytes=field(m, "h", bytes, what="envelope"),
        nonce=fixed_bytes(m, "n", crypto.NONCE_BYTES, what="envelope"),
        ciphertext=field(m, "c", bytes, what="envelope"),
    )


def peek_request(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[Sealed, RequestHeader]:
    """Parse a request without opening it: the worker needs the header to find the session."""
    sealed = decode_envelope(data, max_bytes=max_bytes)
    return sealed, RequestHeader.from_bytes(sealed.header_bytes)


def open_request(sealed: Sealed, header: RequestHeader, session_key: bytes | crypto.SessionSecret) -> bytes:
    key = crypto.as_secret(session_key).key(crypto.KeyPurpose.JOB, header.session_id, header.job_id)
    return crypto.open_(key, sealed.nonce, sealed.ciphertext, sealed.header_bytes)


def seal_result(session_key: bytes | crypto.SessionSecret, request: RequestHeader, status: str, content_type: str, body: bytes,
                *, rng: crypto.Random = os.urandom, current_epoch: int | None = None) -> bytes:
    header = ResultHeader(session_id=request.session_id, job_id=request.job_id, status=status,
                          content_type=content_type, model_id=request.model_id, current_epoch=current_epoch)
    header_bytes = header.to_bytes()
    key = crypto.as_secret(session_key).key(crypto.KeyPurpose.RESULT, request.session_id, request.job_id)
    nonce, ct = crypto.seal(key, body, header_bytes, rng=rng)
    return encode_envelope(header_bytes, nonce, ct)


def peek_result(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[Sealed, ResultHeader]:
    sealed = decode_envelope(data, max_bytes=max_bytes)
    return sealed, ResultHeader.from_bytes(sealed.header_bytes)


class ProducerSession:
    """A producer's session with one pool epoch: seals requests and opens their results.

    I/O free: the SDK's sync and async clients both drive it. ``rng`` is injectable so that
    the published test vectors are reproducible.
    """

    def __init__(self, *, pool: str, epoch: int, pool_public_key: bytes, rng: crypto.Random = os.urandom,
                 session_key: bytes | None = None, session_id: bytes | None = None,
                 sealed_session: bytes | None = None) -> None:
        self.producer_proof: bytes | None = None  # set by a producer that has a key
        self.pool = pool
        self.epoch = epoch
        self._rng = rng
        self._key = session_key if session_key is not None else rng(crypto.SESSION_KEY_BYTES)
        self.session_id = session_id if session_id is not None else rng(crypto.SESSION_ID_BYTES)
        self.sealed_session = sealed_session if sealed_session is not None else crypto.seal_session_key(
            self._key, pool_public_key, pool=pool, epoch=epoch, session_id=self.session_id)
        self._secret = crypto.SessionSecret(self._key)

    def __repr__(self) -> str:  # never show the key
        return f"ProducerSession(pool={self.pool!r}, epoch={self.epoch}, session_id={self.session_id.hex()})"

    def export_key(self) -> bytes:
        """The session key, for a producer that must open this session's results after a restart
        (``producer_sdk.journal`` keeps it in a 0600 file). Whoever holds it reads every job and
        result of the session: never log it, never send it."""
        return self._key

    def header(self, kind: str, *, job_id: str, deadline_ms: int, reply_to: str, content_type: str,
               model_id: str | None = None, chunk: Chunk | None = None) -> RequestHeader:
        return RequestHeader(kind=kind, session_id=self.session_id, epoch=self.epoch,
                             sealed_session=self.sealed_session, job_id=job_id, deadline_ms=deadline_ms,
                             reply_to=reply_to, content_type=content_type, model_id=model_id, chunk=chunk,
                             producer_proof=self.producer_proof)

    def seal(self, header: RequestHeader, body: bytes) -> bytes:
        if header.session_id != self.session_id:
            raise ValueError("header belongs to another session")
        header_bytes = header.to_bytes()
        key = self._secret.key(crypto.KeyPurpose.JOB, self.session_id, header.job_id)
        nonce, ct = crypto.seal(key, body, header_bytes, rng=self._rng)
        return encode_envelope(header_bytes, nonce, ct)

    def open_result(self, data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[ResultHeader, bytes]:
        return self.open_peeked(*peek_result(data, max_bytes=max_bytes))

    def open_peeked(self, sealed: Sealed, header: ResultHeader) -> tuple[ResultHeader, bytes]:
        """Open a result already parsed with :func:`peek_result` (the caller chose the session by it)."""
        if header.session_id != self.session_id:
            raise DecryptionFailed()
        key = self._secret.key(crypto.KeyPurpose.RESULT, self.session_id, header.job_id)
        return header, crypto.open_(key, sealed.nonce, sealed.ciphertext, sealed.header_bytes)


__all__ = [
    "Chunk", "RequestHeader", "ResultHeader", "Sealed", "ProducerSession", "REQUEST_KINDS",
    "encode_envelope", "decode_envelope", "peek_request", "open_request", "seal_result", "peek_result",
    "replace", "unpack",
]
