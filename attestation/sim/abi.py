"""The simulated evidence format: bytes <-> frozen dataclasses, and nothing else.

This module owns the byte layout of simulated evidence and *no judgement* about it: it does
not check signatures, chains, clocks or policy (that is :mod:`attestation.sim.verify` and
:mod:`attestation.validate`). What it guarantees is that :func:`parse_evidence` either returns
a well-typed :class:`SimEvidence` or raises :class:`EvidenceMalformed`, for *any* input.

Layout (msgpack, arrays only, shortest encodings; version 1)::

    evidence = [
        "enclaveq/sim/evidence",    str   format tag
        1,                          int   container version
        body,                       bin   the exact bytes the attestation key signed
        [leaf_der, ..., root_der],  array of 2..4 bin: X.509 DER, leaf first, root last
        signature,                  bin   ECDSA P-256 / SHA-256, DER (r, s), over `body`
    ]
    body = msgpack [
        "enclaveq/sim/report",      str   domain tag: the attestation key signs nothing else
        1,                          int   report version (signed, so it cannot be downgraded)
        measurement,                bin   32 bytes
        debug,                      bool
        security_version,           int   0 .. 2**32-1
        report_data,                bin   exactly 64 bytes
        issued_at_ms,               int   unix time in milliseconds, 0 .. year 9999
    ]

Why these choices:

- The signature covers the *encoded* body bytes, carried as an opaque ``bin``: the verifier
  checks the signature over exactly the bytes it then parses, so no re-encoding ambiguity can
  separate what was signed from what is believed.
- Arrays, not maps: no duplicate or unknown keys to decide about.
- Parsing is canonical: the parsed value must re-encode to the very same bytes, so one piece
  of evidence has exactly one encoding (trailing bytes, over-long integer or length encodings
  are rejected).
- Size limits are checked before and during unpacking, so hostile input cannot make the
  parser allocate much.
"""

from __future__ import annotations

from attestation.chain import signature_is_octet_aligned

from dataclasses import dataclass
from datetime import datetime, timedelta, UTC
from typing import Any

import msgpack
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from attestation.errors import EvidenceMalformed

__all__ = [
    "EVIDENCE_TAG",
    "REPORT_TAG",
    "VERSION",
    "MEASUREMENT_SIZE",
    "REPORT_DATA_SIZE",
    "MAX_EVIDENCE_BYTES",
    "SimReport",
    "SimEvidence",
    "encode_report",
    "parse_report",
    "encode_evidence",
    "parse_evidence",
]

EVIDENCE_TAG = "enclaveq/sim/evidence"
REPORT_TAG = "enclaveq/sim/report"
VERSION = 1

MEASUREMENT_SIZE = 32
REPORT_DATA_SIZE = 64
MAX_SVN = 2**32 - 1
# 9999-12-31T23:59:59.999Z: keeps every accepted value convertible to a datetime.
MAX_ISSUED_AT_MS = 253_402_300_799_999

MIN_CHAIN = 2  # leaf and root at least: the root key never signs evidence itself
MAX_CHAIN = 4
MAX_CERT_BYTES = 8 * 1024
MAX_SIGNATURE_BYTES = 256
MAX_BODY_BYTES = 512
MAX_EVIDENCE_BYTES = 64 * 1024

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python; in this format they are different types.
    return type(value) is int


@dataclass(frozen=True)
class SimReport:
    """The signed content of simulated evidence. Construction checks shapes (ValueError)."""

    measurement: bytes
    debug: bool
    security_version: int
    report_data: bytes
    issued_at_ms: int
    version: int = VERSION

    def __post_init__(self) -> None:
        problems = []
        if self.version != VERSION or not _is_int(self.version):
            problems.append(f"report version {self.version!r} is not supported (only {VERSION})")
        if type(self.measurement) is not bytes or len(self.measurement) != MEASUREMENT_SIZE:
            problems.append(f"measurement must be {MEASUREMENT_SIZE} bytes")
        if type(self.debug) is not bool:
            problems.append("debug must be a boolean")
        if not _is_int(self.security_version) or not 0 <= self.security_version <= MAX_SVN:
            problems.append(f"security_version must be an integer in 0..{MAX_SVN}")
        if type(self.report_data) is not bytes or len(self.report_data) != REPORT_DATA_SIZE:
            problems.append(f"report_data must be exactly {REPORT_DATA_SIZE} bytes")
        if not _is_int(self.issued_at_ms) or not 0 <= self.issued_at_ms <= MAX_ISSUED_AT_MS:
            problems.append(f"issued_at_ms must be an integer in 0..{MAX_ISSUED_AT_MS}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def issued_at(self) -> datetime:
        """``issued_at_ms`` as an aware UTC datetime (exact: no float round trip)."""
        return _EPOCH + timedelta(milliseconds=self.issued_at_ms)

    @staticmethod
    def ms_from_datetime(when: datetime) -> int:
        """Milliseconds since the epoch for an aware datetime (truncated, never rounded up)."""
        if when.tzinfo is None:
            raise ValueError("issued_at must be timezone-aware")
        return (when - _EPOCH) // timedelta(milliseconds=1)


@dataclass(frozen=True)
class SimEvidence:
    """Parsed simulated evidence. ``signed_body`` is the exact byte string the signature covers;
    ``report`` is what those bytes say. ``chain`` is leaf first, root last."""

    report: SimReport
    signed_body: bytes
    chain: tuple[x509.Certificate, ...]
    signature: bytes
    version: int = VERSION


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            # Bound every container so hostile lengths fail early and cheaply.
            max_str_len=64,
            max_bin_len=MAX_EVIDENCE_BYTES,
            max_array_len=16,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # noqa: BLE001 - msgpack documents "catch Exception" for unpackb
        raise EvidenceMalformed(f"{what} is not valid msgpack ({type(exc).__name__}: {exc})") from exc


def encode_report(report: SimReport) -> bytes:
    """The canonical body bytes that the attestation key signs."""
    return _pack(
        [
            REPORT_TAG,
            report.version,
            report.measurement,
            report.debug,
            report.security_version,
            report.report_data,
            report.issued_at_ms,
        ]
    )


def parse_report(body: bytes) -> SimReport:
    """Parse signed body bytes. Raises :class:`EvidenceMalformed` on anything unexpected."""
    if len(body) > MAX_BODY_BYTES:
        raise EvidenceMalformed(f"report body is {len(body)} bytes, more than {MAX_BODY_BYTES}")
    fields = _unpack(body, "report body")
    if type(fields) is not list or len(fields) != 7:
        raise EvidenceMalformed("report body must be a msgpack array of 7 elements")
    tag, version, measurement, debug, svn, report_data, issued_at_ms = fields
    if tag != REPORT_TAG:
        raise EvidenceMalformed(f"report body tag must be {REPORT_TAG!r}")
    if not _is_int(version) or version != VERSION:
        raise EvidenceMalformed(f"report version {version!r} is not supported (only {VERSION})")
    try:
        report = SimReport(
            measurement=measurement,
            debug=debug,
            security_version=svn,
            report_data=report_data,
            issued_at_ms=issued_at_ms,
            version=version,
        )
    except ValueError as exc:
        raise EvidenceMalformed(f"report body: {exc}") from exc
    if encode_report(report) != body:
        raise EvidenceMalformed("report body is not canonically encoded")
    return report


def _der(cert: x509.Certificate | bytes) -> bytes:
    return cert if isinstance(cert, bytes) else cert.public_bytes(Encoding.DER)


def encode_evidence(
    signed_body: bytes, chain: tuple[x509.Certificate | bytes, ...] | list, signature: bytes
) -> bytes:
    """Assemble evidence bytes. ``chain`` is leaf first, root last (certificates or DER)."""
    return _pack([EVIDENCE_TAG, VERSION, signed_body, [_der(c) for c in chain], signature])


def parse_evidence(data: bytes) -> SimEvidence:
    """Parse simulated evidence. Returns :class:`SimEvidence` or raises
    :class:`EvidenceMalformed` -- never any other exception, whatever ``data`` is."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise EvidenceMalformed(f"evidence must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_EVIDENCE_BYTES:
        raise EvidenceMalformed(f"evidence is {len(data)} bytes, more than {MAX_EVIDENCE_BYTES}")
    fields = _unpack(data, "evidence")
    if type(fields) is not list or len(fields) != 5:
        raise EvidenceMalformed("evidence must be a msgpack array of 5 elements")
    tag, version, body, chain_der, signature = fields
    if tag != EVIDENCE_TAG:
        raise EvidenceMalformed(f"evidence tag must be {EVIDENCE_TAG!r} (is this simulated evidence?)")
    if not _is_int(version) or version != VERSION:
        raise EvidenceMalformed(f"evidence version {version!r} is not supported (only {VERSION})")
    if type(body) is not bytes:
        raise EvidenceMalformed("evidence body must be a msgpack bin")
    if type(signature) is not bytes or not 0 < len(signature) <= MAX_SIGNATURE_BYTES:
        raise EvidenceMalformed(f"signature must be a bin of 1..{MAX_SIGNATURE_BYTES} bytes")
    if type(chain_der) is not list or not MIN_CHAIN <= len(chain_der) <= MAX_CHAIN:
        raise EvidenceMalformed(
            f"certificate chain must be an array of {MIN_CHAIN}..{MAX_CHAIN} DER certificates"
        )
    report = parse_report(body)
    certs = []
    for index, der in enumerate(chain_der):
        if type(der) is not bytes or not 0 < len(der) <= MAX_CERT_BYTES:
            raise EvidenceMalformed(f"certificate {index} must be a bin of 1..{MAX_CERT_BYTES} bytes")
        try:
            cert = x509.load_der_x509_certificate(der)
            signature_bits = cert.signature
        except Exception as exc:  # noqa: BLE001 - any parser failure is "malformed", by contract
            raise EvidenceMalformed(f"certificate {index} is not a DER X.509 certificate") from exc
        if not signature_is_octet_aligned(der, signature_bits):
            raise EvidenceMalformed(f"certificate {index} has a non-canonical signature encoding")
        certs.append(cert)
    evidence = SimEvidence(report=report, signed_body=body, chain=tuple(certs), signature=signature)
    # Canonical form: the same evidence has one encoding. This also rejects certificates that
    # only a lenient parser accepts (they would not re-serialise to the same DER).
    try:
        canonical = encode_evidence(body, evidence.chain, signature)
    except Exception as exc:  # noqa: BLE001
        raise EvidenceMalformed("evidence cannot be re-encoded") from exc
    if canonical != data:
        raise EvidenceMalformed("evidence is not canonically encoded")
    return evidence
