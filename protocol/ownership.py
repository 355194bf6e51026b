"""Model ownership (P7): Ed25519 signatures that say who owns a model, who may use it, who deleted it.

Three signed statements, each the Ed25519 signature of one canonical msgpack list:

    model manifest   ["enclaveq/v1/model-manifest", model_id, size, owner_key, allowed_producers, issued_at_ms]
    delete order     ["enclaveq/v1/model-delete", model_id, owner_key, issued_at_ms]
    producer proof   ["enclaveq/v1/producer-session", pool, epoch, session_id, sealed_session, producer_key]

Why the composition is sound:

- Domain separation. The first element of every signed list is its own label (a ``bin``), so
  the bytes signed for one kind never parse as another kind: a manifest signature cannot be
  replayed as a delete order or a producer proof, nor as anything else the same key signs
  under a different label. The labels differ from every HPKE/HKDF ``info`` label in this
  package, though those are never signed anyway.
- One message, one encoding. A verifier re-encodes the statement it parsed and requires the
  exact bytes that were signed, so what it acts on is exactly what was signed: no alternative
  integer widths, no unsorted or duplicated allow-list, no trailing bytes.
- The signer is named inside what is signed (``owner_key``, ``producer_key``), and Ed25519
  also hashes the public key into every signature. Verifying against the embedded key
  proves only "the holder of this key signed this"; *which* keys to trust is the worker's
  decision (the owner recorded at upload time, the manifest's allow-list).
- Small-order public keys are refused. OpenSSL's Ed25519 verification accepts them, and for
  such a key "signatures" can be forged without any private key; refusing the eight
  small-order points (the same list libsodium refuses) keeps every accepted signature
  meaning "the holder of a private key signed this".
- A producer proof is bound to the session it opens (pool, epoch, session id and the sealed
  session key itself). The session key is known only to that producer and the pool, so a
  proof observed on the broker is useless for another session: whoever replays it cannot
  open the session it names, and cannot produce a new session it would fit.

Signatures use the ``cryptography`` package (OpenSSL); nothing here implements curve
arithmetic. Parsers raise ``MalformedMessage`` for anything not well formed and
``SignatureInvalid`` when a well-formed statement's signature does not verify -- nothing else.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .codec import PROTOCOL_VERSION, field, fixed_bytes, pack, unpack, unpack_map
from .errors import KeyFileError, MalformedMessage, OversizedMessage, SignatureInvalid

MANIFEST_LABEL = b"enclaveq/v1/model-manifest"
DELETE_LABEL = b"enclaveq/v1/model-delete"
PRODUCER_SESSION_LABEL = b"enclaveq/v1/producer-session"

MANIFEST_KIND = "model_manifest"
DELETE_KIND = "model_delete_order"

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
MAX_ALLOWED_PRODUCERS = 1024
MAX_UINT63 = 2**63 - 1

# Hard upper bounds of the wire forms (a full allow-list of 1024 keys is ~35 KiB). Anything
# larger cannot be one of these messages, so it is malformed rather than merely oversized.
MAX_MANIFEST_BYTES = 48 * 1024
MAX_DELETE_ORDER_BYTES = 1024
MAX_PRODUCER_PROOF_BYTES = 256
MAX_KEY_FILE_BYTES = 64 * 1024

_MODEL_ID = re.compile(r"[0-9a-f]{64}")
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")

# Encodings of the points of small order (compared with the sign bit cleared, which covers
# their non-canonical twins too), as refused by libsodium's ge25519_has_small_order.
# tests/test_ownership.py shows OpenSSL accepts a forged signature for each of them.
_SMALL_ORDER = frozenset(bytes.fromhex(h) for h in (
    "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
    "0100000000000000000000000000000000000000000000000000000000000000",  # order 1 (identity)
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p - 1, order 2
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p (= 0), order 4
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p + 1 (= 1), order 1
))


# --------------------------------------------------------------------------- keys


def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The raw 32-byte public key (what manifests, allow-lists and proofs carry)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    if not isinstance(public, Ed25519PublicKey):
        raise TypeError("expected an Ed25519 key")
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def save_signing_key(key: Ed25519PrivateKey, path: str | os.PathLike[str]) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM to a new file readable by its owner only.

    Never overwrites: losing an owner key means losing control of its models, so an existing
    file (or a symlink, even a dangling one) at ``path`` is a ``KeyFileError``."""
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError("expected an Ed25519 private key")
    path = Path(path)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        # O_EXCL: refuse anything already there; created 0600 so the key is never world-readable.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key file") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)  # the umask may have narrowed it; we want exactly 0600
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise KeyFileError(f"cannot write {path}: {exc.strerror}") from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def load_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read an Ed25519 private key written by ``save_signing_key`` (or any unencrypted PKCS#8 PEM)."""
    path = Path(path)
    key = _load_pem_private(path, _read_key_file(path))
    if key is None:
        raise KeyFileError(f"{path} is not a PEM Ed25519 private key")
    return key


def parse_public_key(text_or_path: str | os.PathLike[str]) -> bytes:
    """A raw 32-byte public key from 64 hex characters, or from a PEM public or private key file.

    A ``str`` of exactly 64 hex characters is a key; any other ``str`` (and any path object)
    is a file name. Small-order keys are refused. Errors never repeat the text or the file's
    contents: a mistyped private key must not end up in a log."""
    if isinstance(text_or_path, str) and not text_or_path.strip():
        raise KeyFileError("expected 64 hex characters or the path of a PEM key file; got nothing")
    if isinstance(text_or_path, str) and _HEX_KEY.fullmatch(text_or_path.strip()):
        raw = bytes.fromhex(text_or_path.strip())
        if _small_order(raw):
            raise KeyFileError("that public key is a small-order point; no one holds its private key")
        return raw
    path = Path(text_or_path)
    if not path.exists() and isinstance(text_or_path, str):
        raise KeyFileError("expected 64 hex characters or the path of a PEM key file; got neither")
    data = _read_key_file(path)
    found: bytes | None = None
    try:
        public = serialization.load_pem_public_key(data)
        if isinstance(public, Ed25519PublicKey):
            found = public_key_bytes(public)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        private = _load_pem_private(path, data)
        if private is not None:
            found = public_key_bytes(private)
    if found is None:
        raise KeyFileError(f"{path} is not a PEM Ed25519 public or private key")
    if _small_order(found):
        raise KeyFileError(f"{path} holds a small-order public key; no one holds its private key")
    return found


def _read_key_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise KeyFileError(f"no key file at {path}") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path} is too large to be a key file")
    return data


def _load_pem_private(path: Path, data: bytes) -> Ed25519PrivateKey | None:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography's way of saying "encrypted, and no password given".
        raise KeyFileError(f"{path} is an encrypted key; enclaveq key files are unencrypted PEM, "
                           f"protected by their 0600 file mode") from None
    except (ValueError, UnsupportedAlgorithm):
        return None  # never chain: the parser's message could quote the file
    return key if isinstance(key, Ed25519PrivateKey) else None


def _small_order(raw: bytes) -> bool:
    return raw[:31] + bytes([raw[31] & 0x7F]) in _SMALL_ORDER


# --------------------------------------------------------------------------- field checks


def _public_key(value: Any, *, what: str, name: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != PUBLIC_KEY_BYTES:
        raise MalformedMessage(f"{what}: {name} must be a {PUBLIC_KEY_BYTES}-byte Ed25519 public key")
    if _small_order(value):
        raise MalformedMessage(f"{what}: {name} is a small-order point, not a usable public key")
    return value


def _uint(value: Any, *, what: str, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_UINT63:
        raise MalformedMessage(f"{what}: {name} must be an integer in [{minimum}, 2**63)")
    return value


def _model_id(value: Any, *, what: str) -> str:
    if not isinstance(value, str) or not _MODEL_ID.fullmatch(value):
        raise MalformedMessage(f"{what}: model_id must be 64 lowercase hex characters (SHA-256 of the model)")
    return value


def _check_signer(key: Ed25519PrivateKey, expected: bytes, *, what: str) -> None:
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError("expected an Ed25519 private key")
    if public_key_bytes(key) != expected:
        raise ValueError(f"{what}: the signing key is not the key named in the {what}")


def _verify(public_key: bytes, signature: bytes, message: bytes, *, what: str) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise SignatureInvalid(f"{what}: signature does not verify") from None


# --------------------------------------------------------------------------- signed statements


def _signed_form(kind: str, message: bytes, signature: bytes) -> bytes:
    return pack({"v": PROTOCOL_VERSION, "t": kind, "m": message, "sig": signature})


def _open_signed(data: bytes, *, kind: str, label: bytes, arity: int, max_bytes: int,
                 max_list_len: int = 0) -> tuple[list[Any], bytes, bytes]:
    """Parse the signed wire form: (the signed list, the signed bytes, the signature). Not verified.

    The signed list holds ``arity`` elements, one of which may be a list of at most
    ``max_list_len`` scalars (a manifest's allow-list); anything bigger or deeper is refused
    before it is built. Every refusal is a ``MalformedMessage``: nothing else has this shape."""
    if isinstance(data, (bytes, bytearray, memoryview)) and len(data) > max_bytes:
        raise MalformedMessage(f"{kind}: {len(data)} bytes is larger than any valid {kind}")
    try:
        # {"v", "t", "m", "sig"}: 1 map + 4 keys + 4 scalar values.
        m = unpack_map(data, kind=kind, max_bytes=max_bytes, max_depth=1, max_items=9)
        message = field(m, "m", bytes, what=kind)
        signature = fixed_bytes(m, "sig", SIGNATURE_BYTES, what=kind)
        if set(m) != {"v", "t", "m", "sig"}:
            raise MalformedMessage(f"{kind}: unexpected fields")
        items = unpack(message, max_bytes=max_bytes, what=kind, max_depth=2 if max_list_len else 1,
                       max_items=1 + arity + max_list_len, max_container_len=max(arity, max_list_len))
    except OversizedMessage as exc:
        raise MalformedMessage(str(exc)) from None
    if not isinstance(items, list) or len(items) != arity:
        raise MalformedMessage(f"{kind}: signed part must be a list of {arity} elements")
    if items[0] != label:
        raise MalformedMessage(f"{kind}: signed part carries the wrong label")
    return items, message, signature


def _require_canonical(message: bytes, canonical: bytes, *, what: str) -> None:
    # What we act on must be exactly what was signed: one statement, one byte string.
    if message != canonical:
        raise MalformedMessage(f"{what}: signed part is not in canonical form")


@dataclass(frozen=True)
class ModelManifest:
    """The owner's statement about a model: its hash and size, its owner, who may use it.

    ``allowed_producers`` is ``None`` for "any producer the pool admits", otherwise a non-empty
    set of producer public keys, stored sorted and without duplicates. The owner is not
    implicitly on it."""

    model_id: str
    size: int
    owner_key: bytes
    allowed_producers: tuple[bytes, ...] | None
    issued_at_ms: int

    def __post_init__(self) -> None:
        what = MANIFEST_KIND
        _model_id(self.model_id, what=what)
        _uint(self.size, what=what, name="size", minimum=1)
        _public_key(self.owner_key, what=what, name="owner_key")
        _uint(self.issued_at_ms, what=what, name="issued_at_ms")
        object.__setattr__(self, "allowed_producers", _allow_list(self.allowed_producers))

    def allows(self, producer_key: bytes) -> bool:
        return self.allowed_producers is None or producer_key in self.allowed_producers

    def canonical(self) -> bytes:
        allowed = None if self.allowed_producers is None else list(self.allowed_producers)
        return pack([MANIFEST_LABEL, self.model_id, self.size, self.owner_key, allowed, self.issued_at_ms])

    def sign(self, key: Ed25519PrivateKey) -> bytes:
        """The signed wire form; ``key`` must be the private half of ``owner_key``."""
        _check_signer(key, self.owner_key, what=MANIFEST_KIND)
        message = self.canonical()
        return _signed_form(MANIFEST_KIND, message, key.sign(message))

    @classmethod
    def verify(cls, data: bytes) -> ModelManifest:
        """Parse a signed manifest and check it was signed by the owner key it names."""
        items, message, signature = _open_signed(data, kind=MANIFEST_KIND, label=MANIFEST_LABEL, arity=6,
                                                 max_bytes=MAX_MANIFEST_BYTES, max_list_len=MAX_ALLOWED_PRODUCERS)
        allowed = items[4]
        if allowed is not None and not isinstance(allowed, list):
            raise MalformedMessage(f"{MANIFEST_KIND}: allowed_producers must be a list or nil")
        manifest = cls(model_id=items[1], size=items[2], owner_key=items[3],
                       allowed_producers=None if allowed is None else tuple(allowed), issued_at_ms=items[5])
        _require_canonical(message, manifest.canonical(), what=MANIFEST_KIND)
        _verify(manifest.owner_key, signature, message, what=MANIFEST_KIND)
        return manifest


def _allow_list(value: Iterable[bytes] | None) -> tuple[bytes, ...] | None:
    what = MANIFEST_KIND
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, str)) or not isinstance(value, (list, tuple, set, frozenset)):
        raise MalformedMessage(f"{what}: allowed_producers must be a collection of public keys or None")
    keys = {_public_key(k, what=what, name="allowed_producers entry") for k in value}
    if not keys:
        # An empty list would lock everyone out, and is too easily meant as "no restriction".
        raise MalformedMessage(f"{what}: allowed_producers is empty; use None to allow any producer")
    if len(keys) > MAX_ALLOWED_PRODUCERS:
        raise MalformedMessage(f"{what}: {len(keys)} allowed producers exceed the limit of {MAX_ALLOWED_PRODUCERS}")
    return tuple(sorted(keys))


@dataclass(frozen=True)
class DeleteOrder:
    """The owner's order to delete a model from every worker of the pool.

    ``issued_at_ms`` lets a worker refuse an order older than the manifest it would delete, so
    an old order replayed after a re-upload deletes nothing."""

    model_id: str
    owner_key: bytes
    issued_at_ms: int

    def __post_init__(self) -> None:
        _model_id(self.model_id, what=DELETE_KIND)
        _public_key(self.owner_key, what=DELETE_KIND, name="owner_key")
        _uint(self.issued_at_ms, what=DELETE_KIND, name="issued_at_ms")

    def canonical(self) -> bytes:
        return pack([DELETE_LABEL, self.model_id, self.owner_key, self.issued_at_ms])

    def sign(self, key: Ed25519PrivateKey) -> bytes:
        """The signed wire form; ``key`` must be the private half of ``owner_key``."""
        _check_signer(key, self.owner_key, what=DELETE_KIND)
        message = self.canonical()
        return _signed_form(DELETE_KIND, message, key.sign(message))

    @classmethod
    def verify(cls, data: bytes) -> DeleteOrder:
        """Parse a signed delete order and check it was signed by the owner key it names."""
        items, message, signature = _open_signed(data, kind=DELETE_KIND, label=DELETE_LABEL, arity=4,
                                                 max_bytes=MAX_DELETE_ORDER_BYTES)
        order = cls(model_id=items[1], owner_key=items[2], issued_at_ms=items[3])
        _require_canonical(message, order.canonical(), what=DELETE_KIND)
        _verify(order.owner_key, signature, message, what=DELETE_KIND)
        return order


@dataclass(frozen=True)
class ProducerProof:
    """The holder of ``producer_key`` opened this producer session.

    Carried with a session's requests so a worker can apply a manifest's allow-list. The
    signature covers pool, epoch, session id and the sealed session key, so it is worthless
    outside the one session it was made for."""

    producer_key: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _public_key(self.producer_key, what="producer_proof", name="producer_key")
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_BYTES:
            raise MalformedMessage(f"producer_proof: signature must be {SIGNATURE_BYTES} bytes")

    @staticmethod
    def signed_bytes(*, pool: str, epoch: int, session_id: bytes, sealed_session: bytes, producer_key: bytes) -> bytes:
        what = "producer_proof"
        if not isinstance(pool, str) or not isinstance(session_id, bytes) or not isinstance(sealed_session, bytes):
            raise MalformedMessage(f"{what}: pool must be text, session_id and sealed_session bytes")
        _uint(epoch, what=what, name="epoch")
        return pack([PRODUCER_SESSION_LABEL, pool, epoch, session_id, sealed_session, producer_key])

    @classmethod
    def create(cls, key: Ed25519PrivateKey, *, pool: str, epoch: int, session_id: bytes,
               sealed_session: bytes) -> ProducerProof:
        producer_key = public_key_bytes(key)
        message = cls.signed_bytes(pool=pool, epoch=epoch, session_id=session_id, sealed_session=sealed_session,
                                   producer_key=producer_key)
        return cls(producer_key=producer_key, signature=key.sign(message))

    def verify(self, *, pool: str, epoch: int, session_id: bytes, sealed_session: bytes) -> None:
        """Raise ``SignatureInvalid`` unless this proof was made for exactly this session."""
        message = self.signed_bytes(pool=pool, epoch=epoch, session_id=session_id, sealed_session=sealed_session,
                                    producer_key=self.producer_key)
        _verify(self.producer_key, self.signature, message, what="producer_proof")

    def to_bytes(self) -> bytes:
        return pack({"v": PROTOCOL_VERSION, "k": self.producer_key, "s": self.signature})

    @classmethod
    def from_bytes(cls, data: bytes) -> ProducerProof:
        what = "producer_proof"
        if isinstance(data, (bytes, bytearray, memoryview)) and len(data) > MAX_PRODUCER_PROOF_BYTES:
            raise MalformedMessage(f"{what}: larger than any valid proof")
        try:
            # {"v", "k", "s"}: 1 map + 3 keys + 3 scalar values.
            m = unpack_map(data, kind=None, max_bytes=MAX_PRODUCER_PROOF_BYTES, max_depth=1, max_items=7,
                           what=what)
        except OversizedMessage as exc:  # callers treat every bad proof as malformed
            raise MalformedMessage(str(exc)) from None
        if set(m) != {"v", "k", "s"}:
            raise MalformedMessage(f"{what}: expected exactly the fields v, k, s")
        return cls(producer_key=fixed_bytes(m, "k", PUBLIC_KEY_BYTES, what=what),
                   signature=fixed_bytes(m, "s", SIGNATURE_BYTES, what=what))
