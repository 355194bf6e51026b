"""Shared test helpers for the real Intel vectors: the parts of the real quotes that the PCK and
collateral tests need, cut at fixed offsets straight from the bytes (no project parser involved,
so the tests that use them check the parsers against an independent reading), and a stand-in for
an Intel CRL that revokes a given certificate."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from cryptography import x509

__all__ = ["VECTOR_QUOTES", "AlsoRevokes", "VectorQuote", "vector_quote"]

# The real SGX v3, TDX v4 and TDX v5 quotes, relative to the vectors folder.
VECTOR_QUOTES = ["sgx/trustee/occlum_quote.dat", "tdx/trustee/tdx_quote_4.dat",
                 "tdx/go-tdx-guest/quote_v5_sample.dat"]


@dataclass(frozen=True)
class VectorQuote:
    """The parts of a vector quote the collateral tests need, cut at the vectors' PROCEDURES.md offsets."""

    name: str
    chain: tuple[x509.Certificate, ...]   # PCK leaf, PCK CA, root
    tee_tcb_svn: bytes | None             # TDX only
    mrsignerseam: bytes | None
    seam_attributes: bytes | None
    qe_report: bytes                      # 384-byte QE report body


def _u16(data: bytes, at: int) -> int:
    value: int = struct.unpack_from("<H", data, at)[0]
    return value


def _u32(data: bytes, at: int) -> int:
    value: int = struct.unpack_from("<I", data, at)[0]
    return value


def vector_quote(vectors_dir: Path, relative: str) -> VectorQuote:
    """Read the quote ``relative`` (to ``vectors_dir``) at its version's fixed offsets."""
    quote = (vectors_dir / relative).read_bytes()
    version = _u16(quote, 0)
    tee = None
    body = None
    if version == 3:                                   # SGX, PROCEDURES A.1
        sig = 0x1B4
        qe_report = quote[sig + 128: sig + 512]
        auth = _u16(quote, sig + 576)
        cert_type, size = _u16(quote, sig + 578 + auth), _u32(quote, sig + 580 + auth)
        pem = quote[sig + 584 + auth: sig + 584 + auth + size]
    else:                                              # TDX v4 / v5, PROCEDURES B.1 / B.2
        if version == 4:
            body, sig = 0x30, 0x27C
        else:
            body_size = _u32(quote, 0x32)
            body, sig = 0x36, 0x36 + body_size + 4
        tee = quote[body: body + 16]
        assert _u16(quote, sig + 128) == 6
        qe_report = quote[sig + 134: sig + 518]
        auth = _u16(quote, sig + 582)
        cert_type, size = _u16(quote, sig + 584 + auth), _u32(quote, sig + 586 + auth)
        pem = quote[sig + 590 + auth: sig + 590 + auth + size]
    assert cert_type == 5
    chain = tuple(x509.load_pem_x509_certificates(pem.rstrip(b"\x00")))
    return VectorQuote(
        name=relative, chain=chain, tee_tcb_svn=tee,
        mrsignerseam=quote[body + 0x40: body + 0x70] if body is not None else None,
        seam_attributes=quote[body + 0x70: body + 0x78] if body is not None else None,
        qe_report=qe_report,
    )


class AlsoRevokes:
    """A real CRL (Intel's issuer name and signature, untouched) that also lists ``serial``: what
    Intel's CRL would look like had it revoked that certificate, which only Intel could sign. It
    offers what the chain check reads of a CRL (issuer, signature check, serial lookup)."""

    def __init__(self, crl: x509.CertificateRevocationList, serial: int,
                 revoked_at: datetime | None = None) -> None:
        self.crl, self.serial = crl, serial
        self.issuer = crl.issuer
        self.revoked_at = revoked_at or crl.last_update_utc

    def is_signature_valid(self, public_key: Any) -> bool:
        return self.crl.is_signature_valid(public_key)

    def get_revoked_certificate_by_serial_number(self, serial: int) -> Any:
        if serial == self.serial:
            # Not a RevokedCertificateBuilder entry: it refuses serials over 159 bits, as Intel's are.
            return SimpleNamespace(serial_number=serial, revocation_date_utc=self.revoked_at)
        return self.crl.get_revoked_certificate_by_serial_number(serial)
