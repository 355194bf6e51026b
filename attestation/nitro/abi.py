"""AWS Nitro Enclaves attestation documents: bytes -> frozen dataclasses, and no judgement.

This module owns the shape of a Nitro attestation document and nothing else: it checks no
signature, no chain, no clock and no policy (that is :mod:`attestation.nitro.verify` and
:mod:`attestation.nitro.validate`). :func:`parse_evidence` either returns a well-typed
:class:`NitroEvidence` or raises :class:`EvidenceMalformed`, for *any* input.

Format (AWS ``aws-nitro-enclaves-nsm-api`` ``docs/attestation_process.md``, RFC 9052)::

    COSE_Sign1 = [                    CBOR array, untagged (as the NSM emits it) or tag 18
        protected:   bstr .cbor {1: -35}      alg ES384, the only algorithm accepted
        unprotected: {}                       not signed; must not carry alg or crit
        payload:     bstr .cbor AttestationDocument    1..16384 bytes
        signature:   bstr .size 96            r || s, 48 bytes each, big-endian (P-384)
    ]
    AttestationDocument = {           exactly these text keys, no duplicates
        module_id:   text, non-empty
        digest:      "SHA384"
        timestamp:   uint > 0, milliseconds since the UNIX epoch (UTC)
        pcrs:        {1..32 entries: uint 0..31 => bstr of 32, 48 or 64 bytes}; PCR0 required
        certificate: bstr 1..1024, DER X.509, the signing (leaf) certificate
        cabundle:    [1..16 bstr 1..1024, DER X.509], ROOT FIRST: [root, interm_1, ..., interm_n]
        ? public_key: bstr 1..1024 / null
        ? user_data:  bstr 0..1024 / null
        ? nonce:      bstr 0..1024 / null
    }

Choices, where the AWS text leaves room:

- ``user_data`` and ``nonce`` may be up to **1024** bytes: the CDDL says ``bytes .size
  (0..1024)``; the prose limit of 512 contradicts it and would refuse genuine AWS documents
  (``nitro_attestation.b64`` carries 1024 bytes in all three optional fields).
- The prose says "no field content can be null", but genuine documents encode absent optional
  fields as CBOR ``null`` (evervault's sample): ``null`` is accepted for the three optional
  fields and means "absent"; a ``null`` mandatory field is refused.
- PCR0 must be present: it is enclaveq's measurement of a Nitro enclave (the NSM always
  reports PCR0..PCR15).
- ``cabundle`` is capped at 16 certificates (AWS documents carry 4) and the whole input at
  1 MiB, so hostile input cannot make verification expensive.
- Indefinite-length items, duplicate map keys and CBOR tags (but tag 18 around the whole
  structure) are refused everywhere: the NSM never emits them; they only create room for
  parser disagreement, and cbor2's interpretation of some tags is slow on hostile input.
- Bytes after the COSE_Sign1 structure are outside the signature: they are tolerated, never
  interpreted, and counted in :attr:`NitroEvidence.trailing_bytes`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime, timedelta, UTC
from functools import lru_cache
from types import MappingProxyType
from typing import Any
from collections.abc import Mapping

import cbor2
from cryptography import x509

from attestation.errors import EvidenceMalformed

__all__ = [
    "ALG_ES384",
    "COSE_SIGN1_TAG",
    "SIGNATURE_BYTES",
    "MAX_INPUT_BYTES",
    "MAX_PAYLOAD_BYTES",
    "MAX_CERT_BYTES",
    "MAX_CABUNDLE",
    "MAX_USER_BYTES",
    "PCR_SIZES",
    "MAX_PCRS",
    "MANDATORY_FIELDS",
    "OPTIONAL_FIELDS",
    "AttestationDocument",
    "NitroEvidence",
    "parse_evidence",
    "parse_document",
    "sig_structure",
    "encode_cose_sign1",
    "load_certificate",
]

ALG_ES384 = -35                 # COSE algorithm identifier (RFC 9053): ECDSA w/ SHA-384
COSE_SIGN1_TAG = 18
HEADER_ALG = 1
HEADER_CRIT = 2
SIGNATURE_BYTES = 96            # P-384: r || s, 48 bytes each

MAX_INPUT_BYTES = 1024 * 1024   # the COSE structure and any trailing bytes together
MAX_PROTECTED_BYTES = 256
MAX_PAYLOAD_BYTES = 16384       # AWS: payload bstr .size (1..16384)
MAX_CERT_BYTES = 1024           # AWS: cert = bytes .size (1..1024)
MAX_CABUNDLE = 16
MAX_USER_BYTES = 1024           # public_key, user_data, nonce
PCR_SIZES = (32, 48, 64)
MAX_PCRS = 32
# 9999-12-31T23:59:59.999Z: every accepted timestamp converts to a datetime.
MAX_TIMESTAMP_MS = 253_402_300_799_999
_MAX_DEPTH = 8

MANDATORY_FIELDS = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle")
OPTIONAL_FIELDS = ("public_key", "user_data", "nonce")
_KNOWN_FIELDS = frozenset(MANDATORY_FIELDS + OPTIONAL_FIELDS)
_OPTIONAL_MIN = {"public_key": 1, "user_data": 0, "nonce": 0}

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class AttestationDocument:
    """The signed payload. ``pcrs`` maps index -> value, in index order; ``cabundle`` is DER,
    root first, exactly as carried. Optional fields are None when absent or null."""

    module_id: str
    digest: str
    timestamp: int
    pcrs: Mapping[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None = None
    user_data: bytes | None = None
    nonce: bytes | None = None

    @property
    def issued_at(self) -> datetime:
        """``timestamp`` as an aware UTC datetime (exact milliseconds, no float round trip)."""
        return _EPOCH + timedelta(milliseconds=self.timestamp)


@dataclass(frozen=True)
class NitroEvidence:
    """A parsed COSE_Sign1 attestation document.

    ``protected`` and ``payload`` are the exact byte strings the signature covers (through
    :func:`sig_structure`); ``document`` is what ``payload`` says. ``leaf`` is the parsed
    ``certificate`` and ``cabundle`` the parsed ``cabundle`` (root first, as carried).
    """

    protected: bytes
    unprotected: Mapping[Any, Any]
    payload: bytes
    signature: bytes
    document: AttestationDocument
    leaf: x509.Certificate
    cabundle: tuple[x509.Certificate, ...]
    tagged: bool
    cose_length: int
    trailing_bytes: int

    @property
    def signed_bytes(self) -> bytes:
        return sig_structure(self.protected, self.payload)


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """RFC 9052 §4.4 ``Sig_structure`` for COSE_Sign1 with empty external AAD, CBOR-encoded
    with definite lengths: the exact bytes an ES384 signature covers."""
    return cbor2.dumps(["Signature1", bytes(protected), b"", bytes(payload)])


def encode_cose_sign1(protected: bytes, unprotected: Mapping[Any, Any], payload: bytes,
                      signature: bytes, *, tagged: bool = False) -> bytes:
    """Assemble a COSE_Sign1 (for tests and tools; the verifier never re-encodes)."""
    body = [bytes(protected), dict(unprotected), bytes(payload), bytes(signature)]
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, body) if tagged else body)


@lru_cache(maxsize=512)
def load_certificate(der: bytes) -> x509.Certificate:
    """Parse DER (cached by the DER bytes: documents repeat the same CA certificates).

    Raises ValueError for anything that is not one DER X.509 certificate."""
    cert = x509.load_der_x509_certificate(der)
    cert.subject  # noqa: B018 - force the lazily parsed fields that every later step reads
    cert.issuer  # noqa: B018
    if cert.serial_number <= 0:
        # RFC 5280 4.1.2.2; cryptography only warns today and will refuse such certificates.
        raise ValueError("certificate serial number is not positive")
    return cert


def _refuse_tag(value: Any, immutable: bool) -> Any:
    raise ValueError("CBOR tags are not allowed here")


class _OnlyTags(Mapping):
    """cbor2 ``semantic_decoders`` that refuse every tag but ``allowed`` (left as CBORTag).

    cbor2 otherwise interprets tags itself (dates, bignums, decimal fractions, regular
    expressions, MIME messages, shared references...), and some of that is expensive on
    hostile input: a 1 MB decimal fraction takes minutes, a 1 MB regex seconds. A Nitro
    document uses no tag at all except the optional COSE_Sign1 tag 18 around it, so nothing
    is interpreted. cbor2 looks every tag up here; ``tag_hook`` below catches the rest."""

    def __init__(self, allowed: frozenset[int]) -> None:
        self._allowed = allowed

    def __getitem__(self, tag: Any) -> Any:
        if tag in self._allowed:
            raise KeyError(tag)  # not "semantic": cbor2 hands it to tag_hook as a CBORTag
        return _refuse_tag

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0


def _tag_hook(allowed: frozenset[int]):
    def hook(tag: Any, immutable: bool) -> Any:
        if tag.tag not in allowed:
            raise ValueError(f"CBOR tag {tag.tag} is not allowed here")
        return tag
    return hook


_NO_TAGS: frozenset[int] = frozenset()
_OUTER_TAGS = frozenset({COSE_SIGN1_TAG})
_SEMANTIC = {tags: _OnlyTags(tags) for tags in (_NO_TAGS, _OUTER_TAGS)}
_HOOKS = {tags: _tag_hook(tags) for tags in (_NO_TAGS, _OUTER_TAGS)}


def _decode(data: bytes, what: str, tags: frozenset[int] = _NO_TAGS) -> tuple[Any, int]:
    """Decode the first CBOR item of ``data``; return it and the offset where it ended.

    Strict: no indefinite lengths, no duplicate map keys, nesting depth at most 8, and no CBOR
    tags except ``tags``."""
    stream = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(stream, max_depth=_MAX_DEPTH, allow_indefinite=False,
                                    allow_duplicate_keys=False, semantic_decoders=_SEMANTIC[tags],
                                    tag_hook=_HOOKS[tags])
        value = decoder.decode()
        end = stream.tell()
    except Exception as exc:  # noqa: BLE001 - CBORDecodeError, or whatever a hook raised:
        # all of it is "malformed".
        raise EvidenceMalformed(f"{what} is not valid CBOR ({type(exc).__name__}: {exc})") from None
    if not 0 < end <= len(data):  # pragma: no cover - a decoder that reads nothing or too far
        raise EvidenceMalformed(f"{what}: CBOR decoder reported an impossible end offset {end}")
    return value, end


def _decode_exact(data: bytes, what: str) -> Any:
    value, end = _decode(data, what)
    if end != len(data):
        raise EvidenceMalformed(f"{what} has {len(data) - end} bytes after its CBOR item")
    return value


def _bstr(value: Any, what: str, low: int, high: int) -> bytes:
    if type(value) is not bytes:
        raise EvidenceMalformed(f"{what} must be a byte string, got {_kind(value)}")
    if not low <= len(value) <= high:
        raise EvidenceMalformed(f"{what} is {len(value)} bytes; must be {low}..{high}")
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_uint(value: Any) -> bool:
    return type(value) is int and value >= 0  # bool is an int subclass; CBOR keeps them apart


def parse_document(payload: bytes) -> AttestationDocument:
    """Parse the COSE payload (the AttestationDocument map) with every syntactic check."""
    doc = _decode_exact(payload, "attestation document (COSE payload)")
    if type(doc) is not dict:
        raise EvidenceMalformed(f"attestation document must be a CBOR map, got {_kind(doc)}")
    unknown = [k for k in doc if type(k) is not str or k not in _KNOWN_FIELDS]
    if unknown:
        shown = ", ".join(repr(k)[:40] for k in unknown[:5])
        raise EvidenceMalformed(f"attestation document has unknown fields: {shown}")
    for name in MANDATORY_FIELDS:
        if name not in doc:
            raise EvidenceMalformed(f"attestation document lacks mandatory field {name!r}")
        if doc[name] is None:
            raise EvidenceMalformed(f"attestation document field {name!r} is null")

    module_id = doc["module_id"]
    if type(module_id) is not str or not module_id:
        raise EvidenceMalformed(f"module_id must be a non-empty text string, got {_kind(module_id)}")
    digest = doc["digest"]
    if type(digest) is not str or digest != "SHA384":
        raise EvidenceMalformed(f"digest must be \"SHA384\", got {repr(digest)[:40]}")
    timestamp = doc["timestamp"]
    if not _is_uint(timestamp) or not 0 < timestamp <= MAX_TIMESTAMP_MS:
        raise EvidenceMalformed(
            f"timestamp must be an integer in 1..{MAX_TIMESTAMP_MS} (ms since the epoch), "
            f"got {repr(timestamp)[:40]}"
        )

    raw_pcrs = doc["pcrs"]
    if type(raw_pcrs) is not dict or not 1 <= len(raw_pcrs) <= MAX_PCRS:
        raise EvidenceMalformed(f"pcrs must be a map of 1..{MAX_PCRS} entries, got {_kind(raw_pcrs)}")
    pcrs: dict[int, bytes] = {}
    for index, value in raw_pcrs.items():
        if not _is_uint(index) or index >= MAX_PCRS:
            raise EvidenceMalformed(f"pcrs key {repr(index)[:40]} is not a PCR index 0..{MAX_PCRS - 1}")
        if type(value) is not bytes or len(value) not in PCR_SIZES:
            size = len(value) if type(value) is bytes else _kind(value)
            raise EvidenceMalformed(f"PCR{index} must be 32, 48 or 64 bytes, got {size}")
        pcrs[index] = value
    if 0 not in pcrs:
        raise EvidenceMalformed("pcrs lacks PCR0, the enclave image measurement")

    certificate = _bstr(doc["certificate"], "certificate", 1, MAX_CERT_BYTES)
    raw_bundle = doc["cabundle"]
    if type(raw_bundle) is not list or not 1 <= len(raw_bundle) <= MAX_CABUNDLE:
        raise EvidenceMalformed(f"cabundle must be an array of 1..{MAX_CABUNDLE} certificates, "
                                f"got {_kind(raw_bundle)} of {len(raw_bundle) if type(raw_bundle) is list else '-'}")
    cabundle = tuple(_bstr(der, f"cabundle[{i}]", 1, MAX_CERT_BYTES) for i, der in enumerate(raw_bundle))

    optional: dict[str, bytes | None] = {}
    for name in OPTIONAL_FIELDS:
        value = doc.get(name)
        optional[name] = None if value is None else _bstr(value, name, _OPTIONAL_MIN[name], MAX_USER_BYTES)

    return AttestationDocument(
        module_id=module_id,
        digest=digest,
        timestamp=timestamp,
        pcrs=MappingProxyType(dict(sorted(pcrs.items()))),
        certificate=certificate,
        cabundle=cabundle,
        **optional,
    )


def _protected_header(protected: Any) -> bytes:
    protected = _bstr(protected, "COSE protected header", 1, MAX_PROTECTED_BYTES)
    header = _decode_exact(protected, "COSE protected header")
    if type(header) is not dict:
        raise EvidenceMalformed(f"COSE protected header must be a CBOR map, got {_kind(header)}")
    alg = header.get(HEADER_ALG)
    if type(alg) is not int or alg != ALG_ES384:
        raise EvidenceMalformed(f"COSE protected header must declare alg ES384 ({ALG_ES384}), "
                                f"got {repr(alg)[:40]}")
    if HEADER_CRIT in header:
        raise EvidenceMalformed("COSE protected header lists critical parameters, none of which is supported")
    return protected


def _certificate(der: bytes, what: str) -> x509.Certificate:
    try:
        return load_certificate(der)
    except Exception:  # noqa: BLE001 - any parser failure is "malformed", by contract
        raise EvidenceMalformed(f"{what} is not a DER X.509 certificate") from None


def parse_evidence(data: Any) -> NitroEvidence:
    """Parse a Nitro attestation document (raw CBOR bytes; the CLI decodes base64/hex first).

    Returns :class:`NitroEvidence` or raises :class:`EvidenceMalformed` -- never any other
    exception, whatever ``data`` is.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise EvidenceMalformed(f"evidence must be bytes, not {type(data).__name__}")
    try:
        data = bytes(data)
    except Exception:  # noqa: BLE001 - e.g. a non-contiguous memoryview
        raise EvidenceMalformed("evidence is not a contiguous byte buffer") from None
    if not data:
        raise EvidenceMalformed("evidence is empty")
    if len(data) > MAX_INPUT_BYTES:
        raise EvidenceMalformed(f"evidence is {len(data)} bytes, more than {MAX_INPUT_BYTES}")

    outer, end = _decode(data, "Nitro attestation document", _OUTER_TAGS)
    tagged = False
    if type(outer) is cbor2.CBORTag:
        if outer.tag != COSE_SIGN1_TAG:
            raise EvidenceMalformed(f"CBOR tag {outer.tag} is not COSE_Sign1 ({COSE_SIGN1_TAG})")
        tagged, outer = True, outer.value
    if type(outer) not in (list, tuple) or len(outer) != 4:
        raise EvidenceMalformed("a Nitro attestation document must be a COSE_Sign1 array of 4 items")
    protected_raw, unprotected, payload, signature = outer

    protected = _protected_header(protected_raw)
    if not isinstance(unprotected, Mapping):  # a dict, or cbor2's frozendict inside tag 18
        raise EvidenceMalformed(f"COSE unprotected header must be a map, got {_kind(unprotected)}")
    if HEADER_ALG in unprotected or HEADER_CRIT in unprotected:
        raise EvidenceMalformed("COSE unprotected header must not carry alg or crit (they are only trusted signed)")
    if payload is None:
        raise EvidenceMalformed("COSE payload is detached (null); a Nitro document carries it inline")
    payload = _bstr(payload, "COSE payload", 1, MAX_PAYLOAD_BYTES)
    signature = _bstr(signature, "COSE signature", SIGNATURE_BYTES, SIGNATURE_BYTES)

    document = parse_document(payload)
    leaf = _certificate(document.certificate, "certificate")
    cabundle = tuple(_certificate(der, f"cabundle[{i}]") for i, der in enumerate(document.cabundle))
    return NitroEvidence(
        protected=protected,
        unprotected=MappingProxyType(dict(unprotected)),
        payload=payload,
        signature=signature,
        document=document,
        leaf=leaf,
        cabundle=cabundle,
        tagged=tagged,
        cose_length=end,
        trailing_bytes=len(data) - end,
    )
