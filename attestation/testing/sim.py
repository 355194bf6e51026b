"""A fake simulation authority in memory: root, attestation key, and knobs to break them.

Unlike :func:`attestation.sim.init.init_sim_dir` it keeps the root private key, so tests can
mint expired, mis-issued or otherwise wrong certificates and sign arbitrary reports, all at an
injected ``now``. It reuses the same certificate builders as ``init``, so a default authority
produces exactly the shape of chain a real simulation directory does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.sim.abi import SimReport, encode_evidence, encode_report
from attestation.sim.init import build_attestation_certificate, build_root_certificate

__all__ = ["FakeSimAuthority"]


@dataclass
class FakeSimAuthority:
    """``root`` certifies ``leaf``; ``evidence()`` signs reports with ``leaf_key``."""

    now: datetime
    days: int = 3650
    leaf_not_before: datetime | None = None
    leaf_not_after: datetime | None = None
    leaf_curve: ec.EllipticCurve = field(default_factory=ec.SECP256R1)
    root_key: ec.EllipticCurvePrivateKey = field(init=False)
    root: x509.Certificate = field(init=False)
    leaf_key: ec.EllipticCurvePrivateKey = field(init=False)
    leaf: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        start, end = self.now - timedelta(minutes=5), self.now + timedelta(days=self.days)
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = build_root_certificate(self.root_key, not_before=start, not_after=end)
        self.leaf_key = ec.generate_private_key(self.leaf_curve)
        self.leaf = build_attestation_certificate(
            self.leaf_key.public_key(),
            self.root,
            self.root_key,
            not_before=self.leaf_not_before or start,
            not_after=self.leaf_not_after or end,
        )

    @property
    def root_sha256(self) -> str:
        return self.root.fingerprint(hashes.SHA256()).hex()

    def evidence(
        self,
        report_data: bytes,
        *,
        measurement: bytes,
        issued_at: datetime | None = None,
        debug: bool = False,
        svn: int = 0,
        chain: tuple[x509.Certificate, ...] | None = None,
        signing_key: ec.EllipticCurvePrivateKey | None = None,
    ) -> bytes:
        """Signed evidence; override ``chain`` or ``signing_key`` to build broken evidence."""
        report = SimReport(
            measurement=measurement,
            debug=debug,
            security_version=svn,
            report_data=report_data,
            issued_at_ms=SimReport.ms_from_datetime(issued_at or self.now),
        )
        body = encode_report(report)
        key = signing_key or self.leaf_key
        signature = key.sign(body, ec.ECDSA(hashes.SHA256()))
        return encode_evidence(body, chain or (self.leaf, self.root), signature)
