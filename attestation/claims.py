"""The platform-neutral result of verifying evidence: :class:`Claims` and :class:`CertSummary`.

Every platform verifier (simulation now; SGX, TDX, SEV-SNP and Nitro later) turns its own
evidence format into the same frozen :class:`Claims`, and policy validation only ever looks
at :class:`Claims`. Claims are produced only from evidence whose signatures and chain have
already been verified: holding a ``Claims`` object means "this is what an authentic piece of
evidence says", not yet "the policy accepts it".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from collections.abc import Mapping

from cryptography import x509
from cryptography.hazmat.primitives import hashes

__all__ = ["CertSummary", "Claims", "CollateralUse"]


def _iso(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class CertSummary:
    """What a human or a log needs to know about one certificate of a verified chain."""

    subject: str  # RFC 4514 string, e.g. "CN=enclaveq SIMULATION root — no confidentiality"
    not_before: datetime  # UTC
    not_after: datetime  # UTC
    sha256: bytes  # fingerprint of the DER encoding

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> CertSummary:
        return cls(
            subject=cert.subject.rfc4514_string(),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            sha256=cert.fingerprint(hashes.SHA256()),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "not_before": _iso(self.not_before),
            "not_after": _iso(self.not_after),
            "sha256": self.sha256.hex(),
        }


@dataclass(frozen=True)
class CollateralUse:
    """One piece of vendor collateral a verification used: what it is, who issued it, when, and
    how old it was at the verification time.

    ``kind`` is ``"tcb_info"``, ``"qe_identity"`` (Intel) or ``"crl"`` (any platform);
    ``issuer`` the issuer's common name (a CRL's issuer, the certificate that signed a TCB Info or
    QE Identity); ``issued_at`` the issueDate / thisUpdate; ``next_update`` the nextUpdate (None
    for a CRL without one); ``age_seconds`` is ``now - issued_at`` at the verification (0 when
    the issue date is unknown; negative if it was issued after ``now``). Whether it was too old is
    the policy's judgement (``collateral_grace_seconds``), made against the same ``now``.
    """

    kind: str
    issuer: str
    issued_at: datetime | None
    next_update: datetime | None
    age_seconds: float

    def stale_by(self, now: datetime) -> float:
        """Seconds by which ``now`` is past ``next_update`` (0 or less: fresh; a document without
        a nextUpdate is never stale)."""
        if self.next_update is None:
            return 0.0
        return (now - self.next_update).total_seconds()

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "issuer": self.issuer,
            "issued_at": _iso(self.issued_at) if self.issued_at is not None else None,
            "next_update": _iso(self.next_update) if self.next_update is not None else None,
            "age_seconds": round(self.age_seconds, 3),
        }


def _jsonable(value: Any) -> Any:
    """Platform claim values for JSON: bytes as lowercase hex, datetimes as ISO 8601, maps and lists recursively."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True)
class Claims:
    """What authentic evidence asserts about the worker that produced it.

    ``measurement`` is the platform's code identity (simulation and SGX MRENCLAVE: 32 bytes;
    TDX MRTD, SNP MEASUREMENT, Nitro PCR0: 48). ``report_data`` is what the worker bound into
    the evidence (64 bytes everywhere but Nitro, whose ``user_data`` may differ in length).
    ``issued_at`` exists only where the evidence carries a signed time (simulation, Nitro).
    ``details`` holds every parsed field of the platform's evidence, named as in the
    ``enclaveq evidence verify --json`` contract. ``chain`` is leaf first, root last.

    ``tcb_evaluated`` is True only when the platform's TCB (and the revocation of its chain) was
    judged against vendor collateral: Intel TCB Info, QE Identity and the PCK chain's CRLs (SGX,
    TDX); AMD's ARK-issued CRL (SEV-SNP). False means the evidence was accepted without that
    judgement (a policy with ``require_collateral = false``), and always for simulation and
    Nitro, which have no collateral. ``collateral`` lists every collateral document the
    verification used, with its age.
    """

    platform: str
    measurement: bytes
    debug: bool
    security_version: int
    report_data: bytes
    issued_at: datetime | None
    simulated: bool
    chain: tuple[CertSummary, ...]
    details: Mapping[str, Any] = field(default_factory=dict)
    trailing_bytes: int = 0
    tcb_status: str | None = None
    advisory_ids: tuple[str, ...] = ()
    tcb_evaluated: bool = False
    collateral: tuple[CollateralUse, ...] = ()

    def __post_init__(self) -> None:
        # Claims are built by verifiers, not parsed from the wire, so these are bug catchers.
        if self.issued_at is not None and self.issued_at.tzinfo is None:
            raise ValueError("Claims.issued_at must be timezone-aware (UTC)")
        if len(self.report_data) > 1024:
            raise ValueError(f"Claims.report_data is {len(self.report_data)} bytes; at most 1024")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: bytes as lowercase hex, datetimes as ISO 8601 UTC (``...Z``)."""
        doc = {
            "platform": self.platform,
            "measurement": self.measurement.hex(),
            "debug": self.debug,
            "security_version": self.security_version,
            "report_data": self.report_data.hex(),
            "issued_at": _iso(self.issued_at) if self.issued_at is not None else None,
            "simulated": self.simulated,
            "chain": [c.to_json() for c in self.chain],
        }
        if self.details:
            doc["claims"] = _jsonable(dict(self.details))
        if self.trailing_bytes:
            doc["trailing_bytes"] = self.trailing_bytes
        if self.tcb_status is not None:
            doc["tcb_status"] = self.tcb_status
            doc["advisory_ids"] = list(self.advisory_ids)
        if self.platform != "sim":
            doc["tcb_evaluated"] = self.tcb_evaluated
            doc["collateral"] = [c.to_json() for c in self.collateral]
        return doc
