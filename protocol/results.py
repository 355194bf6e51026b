"""Pipeline results: what a worker sends to a pipeline's recipients, sealed so only they open it.

Wire form (msgpack map; ``pack`` writes the keys in this order)::

    {"v": 1, "h": header, "n": nonce(12), "c": payload,
     "r": [[slot_id(16), sealed_key(80), tag(32)], ...   one per recipient, 1-64],
     "b": bind(32)}

    header      = msgpack {"v": 1, "t": "pipeline_result", "pool": str, "ep": epoch,
                           "pid": pipeline id (64 hex), "eid": event id}        -- clear
    K           = 32 random bytes (one result, one K)
    k_payload || k_bind = HKDF-SHA256(IKM = K, salt = none,
                                      info = msgpack(["enclaveq/v1/result-content", SHA-256(header)]), L = 64)
    payload     = AES-256-GCM(k_payload, nonce, msgpack(result body), aad = header)
    sealed_key  = HPKE base mode (X25519, HKDF-SHA256, AES-256-GCM) of K to the recipient key,
                  info = msgpack(["enclaveq/v1/result-key", SHA-256(header)])
    Z_r         = X25519(pool epoch private key, recipient public key)
                = X25519(recipient private key, pool epoch public key)
    k_slot || k_tag = HKDF-SHA256(IKM = Z_r, salt = "enclaveq/v1/result-origin",
                                  info = msgpack(["enclaveq/v1/result-origin", pool, epoch,
                                                  pool public key, recipient public key]), L = 64)
    slot_id     = HMAC-SHA256(k_slot, msgpack(["enclaveq/v1/result-slot", pipeline id]))[:16]
    D           = SHA-256(msgpack(["enclaveq/v1/result-digest", header, nonce,
                                   [[slot_id, sealed_key], ...], len(payload)]) || payload)
    tag         = HMAC-SHA256(k_tag, D)
    bind        = HMAC-SHA256(k_bind, msgpack(["enclaveq/v1/result-bind", D, [tag, ...]]))

Why the composition is sound (at length, with what the broker sees, in docs/protocol.md §13):

- Confidentiality. The body is AES-256-GCM under a key derived from K, and K travels only
  HPKE-sealed (RFC 9180, the suite of protocol/crypto.py) to each listed recipient key: opening
  anything needs a recipient's private key (or the pool's, which made it). K is fresh per
  result and encrypts one message, so the random nonce can never repeat under it.
- Origin. Z_r is the static-static Diffie-Hellman value of HPKE's Auth mode, which the
  installed ``cryptography`` does not expose: only a holder of the pool's epoch private key (an
  attested member, the recipient checks the epoch's public key by attestation) or the
  recipient itself can compute it. The tag is an HMAC under a key derived from Z_r over a
  digest of everything but the tags -- header, nonce, payload and every slot's id and sealed
  key -- so a valid tag means a pool member wrote exactly these bytes for this recipient. The
  recipient checks it before it opens anything. Another recipient, who knows K, cannot make
  the tag (it lacks Z_r), so it cannot rewrite the payload for a co-recipient. The tag is
  deniable: the recipient could have computed it, so it proves the origin to the recipient
  and to nobody else (no signature a third party could check).
- Binding. The header is the AEAD associated data, is hashed into both HKDF ``info``\\s and
  the HPKE ``info``, and is covered by D: pool, epoch, pipeline id and event id cannot be
  changed, and a sealed key cannot be moved to another result. The body repeats pipeline id,
  event id, pool and epoch and the recipient requires them equal to the header's. ``bind``
  (under k_bind, from K, which the broker never knows) covers the other recipients' tags, the
  one part D cannot cover: any byte the broker changes anywhere is refused by every recipient.
- Separation. Every HKDF and HMAC input starts with its own label, distinct from every other
  label of the protocol (session keys, member MACs, model sync). The pool's epoch key also
  decapsulates HPKE sessions, but HPKE derives from its DH value through its own labelled
  Extract ("HPKE-v1" || suite id || ...), and this module through an Extract salted with the
  origin label, so the two never yield related keys; and no party ever learns Z_r from an
  HPKE exchange (HPKE reveals only keys derived through its own labels).

What a recipient learns from a refused result is the class of refusal (not a recipient, wrong
pool, unknown epoch, forged or altered); what the broker learns is in docs/pipelines.md: the
clear header and, per recipient, a slot id that is stable for one pipeline and epoch.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import crypto
from .codec import DEFAULT_MAX_MESSAGE_BYTES, PROTOCOL_VERSION, field, fixed_bytes, pack, unpack_map
from .errors import DecryptionFailed, MalformedMessage, ProtocolError, TensorError
from .pipeline import MAX_RECIPIENTS, MAX_STAGES
from .tensors import MAX_RANK, MAX_TENSORS, STRING, TensorLimits, decode_tensors, encode_tensors

RESULT_KIND = "pipeline_result"
ORIGIN_LABEL = b"enclaveq/v1/result-origin"
SLOT_LABEL = b"enclaveq/v1/result-slot"
KEY_LABEL = b"enclaveq/v1/result-key"
CONTENT_LABEL = b"enclaveq/v1/result-content"
DIGEST_LABEL = b"enclaveq/v1/result-digest"
BIND_LABEL = b"enclaveq/v1/result-bind"

CONTENT_KEY_BYTES = 32
SLOT_ID_BYTES = 16   # 2^-128 for two recipients to collide: only ever a forgery
SEALED_KEY_BYTES = crypto.SEALED_SESSION_BYTES  # HPKE of 32 bytes: enc 32 + ciphertext 32 + tag 16
TAG_BYTES = 32
PUBLISHER_KEY_BYTES = 32
MAX_POOL_NAME = 128
MAX_HEADER_BYTES = 1024
MAX_STRING_ELEMENTS = 65536  # strings in all string tensors of one result (labels, tokens)

# Event ids name the recipient's output files (``<event id>.npz``) and travel in clear headers,
# so they are plain file-name-safe ASCII: no "/", no leading ".", no control characters.
EVENT_ID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
_POOL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # as broker_adapters' check_name
_HEX_ID = re.compile(r"[0-9a-f]{64}")

# Structural limits of the clear envelope, read before anything is authenticated (see
# protocol.limits): a map of 6 entries (1 + 12 objects), the slot list of at most 64 slots,
# each a list of 3 bins. Keys are one-letter strings.
ENVELOPE_ITEMS = 1 + 2 * 6 + MAX_RECIPIENTS * (1 + 3)
HEADER_FIELDS = ("v", "t", "pool", "ep", "pid", "eid")
BODY_FIELDS = ("v", "pid", "eid", "sm", "pub", "pool", "ep", "ms", "t")
# The sealed body (written by a pool member only, but still bounded): the map, the stage model
# list, the tensors as in protocol.bodies, plus one object per string of the string tensors.
_TENSOR_ITEMS = 5 + MAX_RANK
BODY_ITEMS = 1 + 2 * len(BODY_FIELDS) + MAX_STAGES + MAX_TENSORS * _TENSOR_ITEMS + MAX_STRING_ELEMENTS


# --------------------------------------------------------------------------- errors


class ResultRefused(ProtocolError):
    """A well-formed pipeline result that this recipient must not accept."""


class NotARecipient(ResultRefused):
    """No slot of the result is for this key: not a recipient (or the pipeline id in the clear
    header was changed, which moves every recipient's slot id)."""


class WrongPool(ResultRefused):
    """The result names another pool than the one the recipient trusts."""


class UnknownEpoch(ResultRefused):
    """The recipient does not know (has not attested) the pool key of the result's epoch."""


class ResultForged(ResultRefused):
    """The result does not authenticate: not produced by the pool for this recipient, or
    altered. Deliberately says nothing more (as ``DecryptionFailed``)."""

    def __init__(self, message: str = "result does not authenticate") -> None:
        super().__init__(message)


# --------------------------------------------------------------------------- the plaintext


def check_event_id(event_id: object) -> str:
    if not isinstance(event_id, str) or not EVENT_ID_PATTERN.fullmatch(event_id):
        raise MalformedMessage("event id: 1-64 characters from A-Z a-z 0-9 _ . -, not starting with '.'")
    return event_id


def _uint(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise MalformedMessage(f"pipeline result: {name} must be an integer in [0, 2**63)")
    return value


@dataclass(frozen=True, eq=False)
class PipelineResult:
    """What a pipeline produced for one event (compare fields, not objects: ``outputs`` holds arrays).

    ``publisher`` is the producer's Ed25519 public key (32 bytes) when the event's session
    proved one, else the event's 16-byte session id. ``outputs`` are numpy arrays of any dtype
    protocol.tensors carries, strings included (ONNX string outputs such as labels come back,
    as onnxruntime gives them, as object arrays of ``str``)."""

    pipeline_id: str
    event_id: str
    stage_models: tuple[str, ...]
    publisher: bytes
    pool: str
    epoch: int
    produced_ms: int
    outputs: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        w = "pipeline result"
        if not isinstance(self.pipeline_id, str) or not _HEX_ID.fullmatch(self.pipeline_id):
            raise MalformedMessage(f"{w}: pipeline id must be 64 lowercase hex characters")
        check_event_id(self.event_id)
        if (not isinstance(self.stage_models, (tuple, list)) or not 1 <= len(self.stage_models) <= MAX_STAGES
                or not all(isinstance(m, str) and _HEX_ID.fullmatch(m) for m in self.stage_models)):
            raise MalformedMessage(f"{w}: stage models must be 1-{MAX_STAGES} model ids")
        object.__setattr__(self, "stage_models", tuple(self.stage_models))
        if not isinstance(self.publisher, bytes) or len(self.publisher) not in (PUBLISHER_KEY_BYTES,
                                                                                crypto.SESSION_ID_BYTES):
            raise MalformedMessage(f"{w}: publisher must be a 32-byte key or a 16-byte session id")
        if not isinstance(self.pool, str) or not _POOL.fullmatch(self.pool):
            raise MalformedMessage(f"{w}: invalid pool name")
        _uint(self.epoch, "epoch")
        _uint(self.produced_ms, "produced_ms")
        if not isinstance(self.outputs, Mapping) or len(self.outputs) > MAX_TENSORS:
            raise MalformedMessage(f"{w}: outputs must map at most {MAX_TENSORS} names to arrays")
        object.__setattr__(self, "outputs", dict(self.outputs))

    @property
    def publisher_key(self) -> bytes | None:
        """The producer's Ed25519 public key, if the event's session proved one."""
        return self.publisher if len(self.publisher) == PUBLISHER_KEY_BYTES else None

    @property
    def publisher_session(self) -> bytes | None:
        """The event's session id, when the session proved no producer key."""
        return self.publisher if len(self.publisher) == crypto.SESSION_ID_BYTES else None


def encode_result_body(result: PipelineResult) -> bytes:
    wire = encode_tensors(result.outputs)
    strings = sum(len(t[3]) for t in wire if t[1] == STRING)
    if strings > MAX_STRING_ELEMENTS:
        raise TensorError(f"string outputs hold {strings} strings, above the limit of {MAX_STRING_ELEMENTS}")
    return pack({
        "v": PROTOCOL_VERSION, "pid": result.pipeline_id, "eid": result.event_id, "sm": list(result.stage_models),
        "pub": result.publisher, "pool": result.pool, "ep": result.epoch, "ms": result.produced_ms, "t": wire,
    })


def decode_result_body(body: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                       limits: TensorLimits = TensorLimits()) -> PipelineResult:
    w = "pipeline result"
    m = unpack_map(body, kind=None, max_bytes=max_bytes, max_depth=4, max_items=BODY_ITEMS,
                   max_container_len=MAX_STRING_ELEMENTS, max_str_len=max_bytes, what=w)
    if tuple(m) != BODY_FIELDS:
        raise MalformedMessage(f"{w}: unexpected fields")
    return PipelineResult(
        pipeline_id=field(m, "pid", str, what=w), event_id=field(m, "eid", str, what=w),
        stage_models=tuple(field(m, "sm", list, what=w)), publisher=field(m, "pub", bytes, what=w),
        pool=field(m, "pool", str, what=w), epoch=field(m, "ep", int, what=w), produced_ms=field(m, "ms", int, what=w),
        outputs=decode_tensors(field(m, "t", list, what=w), limits),
    )


# --------------------------------------------------------------------------- the clear header


@dataclass(frozen=True)
class ResultHeader:
    """The clear part of a sealed result: what the broker sees and the AEAD associated data."""

    pool: str
    epoch: int
    pipeline_id: str
    event_id: str

    def to_bytes(self) -> bytes:
        return pack({"v": PROTOCOL_VERSION, "t": RESULT_KIND, "pool": self.pool, "ep": self.epoch,
                     "pid": self.pipeline_id, "eid": self.event_id})

    @classmethod
    def from_bytes(cls, data: bytes) -> ResultHeader:
        w = "pipeline result header"
        m = unpack_map(data, kind=RESULT_KIND, max_bytes=MAX_HEADER_BYTES, max_depth=1,
                       max_items=1 + 2 * len(HEADER_FIELDS), max_container_len=len(HEADER_FIELDS),
                       max_str_len=4 * MAX_POOL_NAME, what=w)
        if tuple(m) != HEADER_FIELDS:
            raise MalformedMessage(f"{w}: unexpected fields")
        pool, epoch, pid, eid = m["pool"], m["ep"], m["pid"], m["eid"]
        if not isinstance(pool, str) or not _POOL.fullmatch(pool):
            raise MalformedMessage(f"{w}: invalid pool name")
        if not isinstance(pid, str) or not _HEX_ID.fullmatch(pid):
            raise MalformedMessage(f"{w}: invalid pipeline id")
        header = cls(pool=pool, epoch=_uint(epoch, "epoch"), pipeline_id=pid, event_id=check_event_id(eid))
        if header.to_bytes() != data:
            raise MalformedMessage(f"{w}: not in canonical form")
        return header


@dataclass(frozen=True)
class _Slot:
    slot_id: bytes
    sealed_key: bytes
    tag: bytes


@dataclass(frozen=True)
class _Envelope:
    header: bytes
    nonce: bytes
    payload: bytes
    slots: tuple[_Slot, ...]
    bind: bytes


def _parse_envelope(data: bytes, max_bytes: int) -> _Envelope:
    w = "pipeline result"
    m = unpack_map(data, kind=None, max_bytes=max_bytes, max_depth=3, max_items=ENVELOPE_ITEMS,
                   max_container_len=MAX_RECIPIENTS, max_str_len=8, what=w)
    if tuple(m) != ("v", "h", "n", "c", "r", "b"):
        raise MalformedMessage(f"{w}: expected the fields v, h, n, c, r, b")
    header = field(m, "h", bytes, what=w)
    if len(header) > MAX_HEADER_BYTES:
        raise MalformedMessage(f"{w}: header larger than {MAX_HEADER_BYTES} bytes")
    payload = field(m, "c", bytes, what=w)
    if len(payload) < 16:
        raise MalformedMessage(f"{w}: payload shorter than its AEAD tag")
    slots = field(m, "r", list, what=w)
    if not 1 <= len(slots) <= MAX_RECIPIENTS:
        raise MalformedMessage(f"{w}: 1-{MAX_RECIPIENTS} recipient slots expected")
    parsed = []
    for slot in slots:
        if not (isinstance(slot, list) and len(slot) == 3 and all(isinstance(x, bytes) for x in slot)
                and (len(slot[0]), len(slot[1]), len(slot[2])) == (SLOT_ID_BYTES, SEALED_KEY_BYTES, TAG_BYTES)):
            raise MalformedMessage(f"{w}: a slot is [id(16), sealed key(80), tag(32)]")
        parsed.append(_Slot(*slot))
    if len({s.slot_id for s in parsed}) != len(parsed):
        raise MalformedMessage(f"{w}: two slots with one id")
    return _Envelope(header=header, nonce=fixed_bytes(m, "n", crypto.NONCE_BYTES, what=w), payload=payload,
                     slots=tuple(parsed), bind=fixed_bytes(m, "b", TAG_BYTES, what=w))


def peek_result_header(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> ResultHeader:
    """The clear header of a sealed result, NOT authenticated: for routing and logs only. Never
    drop a result as a duplicate on this (a forged header would suppress the real result):
    deduplicate on what ``open_result`` returns."""
    return ResultHeader.from_bytes(_parse_envelope(data, max_bytes).header)


# --------------------------------------------------------------------------- derivations


def _hkdf64(ikm: bytes, *, salt: bytes | None, info: bytes) -> tuple[bytes, bytes]:
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=info).derive(ikm)
    return okm[:32], okm[32:]


def _content_keys(content_key: bytes, header_hash: bytes) -> tuple[bytes, bytes]:
    """(k_payload, k_bind) from K; the header hash ties both to this result."""
    return _hkdf64(content_key, salt=None, info=pack([CONTENT_LABEL, header_hash]))


def _key_info(header_hash: bytes) -> bytes:
    return pack([KEY_LABEL, header_hash])


def _origin_keys(shared: bytes, *, pool: str, epoch: int, pool_public: bytes, recipient: bytes) -> tuple[bytes, bytes]:
    """(k_slot, k_tag) from the static-static X25519 value of the pool epoch key and a recipient key."""
    return _hkdf64(shared, salt=ORIGIN_LABEL, info=pack([ORIGIN_LABEL, pool, epoch, pool_public, recipient]))


def _mac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _slot_id(k_slot: bytes, pipeline_id: str) -> bytes:
    return _mac(k_slot, pack([SLOT_LABEL, pipeline_id]))[:SLOT_ID_BYTES]


def _digest(header: bytes, nonce: bytes, payload: bytes, slots: Sequence[tuple[bytes, bytes]]) -> bytes:
    # The msgpack prefix is self-delimiting and ends with the payload's length, so the payload
    # (up to the message limit) is hashed in place rather than copied into one more buffer.
    h = hashlib.sha256(pack([DIGEST_LABEL, header, nonce, [list(s) for s in slots], len(payload)]))
    h.update(payload)
    return h.digest()


def _bind(k_bind: bytes, digest: bytes, tags: Sequence[bytes]) -> bytes:
    return _mac(k_bind, pack([BIND_LABEL, digest, list(tags)]))


def _x25519(private: X25519PrivateKey, public: bytes) -> bytes:
    # ValueError: a small-order public key (all-zero shared value), refused by OpenSSL.
    return private.exchange(X25519PublicKey.from_public_bytes(public))


# --------------------------------------------------------------------------- seal / open


def seal_result_for_recipients(result: PipelineResult, recipients: Sequence[bytes], pool_private_key: X25519PrivateKey,
                               *, rng: crypto.Random = os.urandom) -> bytes:
    """Seal ``result`` so that exactly ``recipients`` (raw X25519 public keys, 1-64, distinct)
    open it, authenticated as coming from the holder of ``pool_private_key`` -- the pool's
    private key *of ``result.epoch``* (the recipient looks the public key up by that epoch)."""
    if isinstance(recipients, (bytes, str)) or not 1 <= len(recipients) <= MAX_RECIPIENTS:
        raise MalformedMessage(f"pipeline result: 1-{MAX_RECIPIENTS} recipients expected")
    if len(set(recipients)) != len(recipients):
        raise MalformedMessage("pipeline result: a recipient is listed twice")
    header = ResultHeader(pool=result.pool, epoch=result.epoch, pipeline_id=result.pipeline_id,
                          event_id=result.event_id).to_bytes()
    header_hash = hashlib.sha256(header).digest()
    content_key = rng(CONTENT_KEY_BYTES)
    nonce = rng(crypto.NONCE_BYTES)
    if len(content_key) != CONTENT_KEY_BYTES or len(nonce) != crypto.NONCE_BYTES:
        raise ValueError("rng returned the wrong number of bytes")
    k_payload, k_bind = _content_keys(content_key, header_hash)
    payload = AESGCM(k_payload).encrypt(nonce, encode_result_body(result), header)
    pool_public = crypto.public_bytes(pool_private_key)
    slots: list[tuple[bytes, bytes]] = []
    tag_keys: list[bytes] = []
    for i, recipient in enumerate(recipients):
        if not isinstance(recipient, bytes) or len(recipient) != crypto.PUBLIC_KEY_BYTES:
            raise MalformedMessage(f"pipeline result: recipient {i} is not a 32-byte X25519 public key")
        try:
            shared = _x25519(pool_private_key, recipient)
        except ValueError:
            raise MalformedMessage(f"pipeline result: recipient {i} is a small-order point") from None
        k_slot, k_tag = _origin_keys(shared, pool=result.pool, epoch=result.epoch, pool_public=pool_public,
                                     recipient=recipient)
        slots.append((_slot_id(k_slot, result.pipeline_id), crypto.hpke_seal(content_key, recipient,
                                                                              _key_info(header_hash))))
        tag_keys.append(k_tag)
    digest = _digest(header, nonce, payload, slots)
    tags = [_mac(k, digest) for k in tag_keys]
    return pack({"v": PROTOCOL_VERSION, "h": header, "n": nonce, "c": payload,
                 "r": [[sid, sealed, tag] for (sid, sealed), tag in zip(slots, tags)],
                 "b": _bind(k_bind, digest, tags)})


def open_result(data: bytes, recipient_private_key: X25519PrivateKey,
                pool_public_key_for_epoch: Callable[[int], bytes | None], *, pool: str,
                max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, limits: TensorLimits = TensorLimits()) -> PipelineResult:
    """Authenticate and open a sealed result for one recipient.

    ``pool_public_key_for_epoch(epoch)`` returns the pool's public key of that epoch as the
    recipient trusts it (from attesting the pool), or None. Refusals, in the order checked:
    ``MalformedMessage``/``OversizedMessage`` (not a result; bounded decoding first),
    ``WrongPool``, ``UnknownEpoch``, ``NotARecipient`` (no slot for this key), ``ResultForged``
    (origin tag, sealed key, bind or payload does not verify, or the sealed ids differ from the
    header's) -- the origin tag is checked before anything is decrypted."""
    env = _parse_envelope(data, max_bytes)
    header = ResultHeader.from_bytes(env.header)
    if header.pool != pool:
        raise WrongPool(f"pipeline result: from pool {header.pool}, expected {pool}")
    pool_public = pool_public_key_for_epoch(header.epoch)
    if pool_public is None:
        raise UnknownEpoch(f"pipeline result: no trusted key for epoch {header.epoch} of pool {pool}")
    if not isinstance(pool_public, bytes) or len(pool_public) != crypto.PUBLIC_KEY_BYTES:
        raise ValueError("pool_public_key_for_epoch must return a 32-byte X25519 public key or None")
    try:
        shared = _x25519(recipient_private_key, pool_public)
    except ValueError:
        raise ResultForged() from None
    k_slot, k_tag = _origin_keys(shared, pool=header.pool, epoch=header.epoch, pool_public=pool_public,
                                 recipient=crypto.public_bytes(recipient_private_key))
    wanted = _slot_id(k_slot, header.pipeline_id)
    mine = [slot for slot in env.slots if hmac.compare_digest(slot.slot_id, wanted)]
    if not mine:
        raise NotARecipient("pipeline result: this key is not among its recipients")
    slot = mine[0]  # slot ids are unique (_parse_envelope)
    digest = _digest(env.header, env.nonce, env.payload, [(s.slot_id, s.sealed_key) for s in env.slots])
    if not hmac.compare_digest(slot.tag, _mac(k_tag, digest)):
        raise ResultForged()
    header_hash = hashlib.sha256(env.header).digest()
    try:
        content_key = crypto.hpke_open(slot.sealed_key, recipient_private_key, _key_info(header_hash))
    except DecryptionFailed:
        raise ResultForged() from None
    if len(content_key) != CONTENT_KEY_BYTES:
        raise ResultForged()
    k_payload, k_bind = _content_keys(content_key, header_hash)
    if not hmac.compare_digest(env.bind, _bind(k_bind, digest, [s.tag for s in env.slots])):
        raise ResultForged()
    try:
        body = AESGCM(k_payload).decrypt(env.nonce, env.payload, env.header)
    except InvalidTag:
        raise ResultForged() from None
    result = decode_result_body(body, max_bytes=max_bytes, limits=limits)
    if (result.pool, result.epoch, result.pipeline_id, result.event_id) != (
            header.pool, header.epoch, header.pipeline_id, header.event_id):
        raise ResultForged()
    return result


def generate_recipient_key() -> X25519PrivateKey:
    """A fresh recipient key pair (X25519); its public half, ``crypto.public_bytes``, goes in
    ``access.recipients``."""
    return crypto.generate_private_key()
