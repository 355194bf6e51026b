"""Reading TEE evidence, extra certificates and collateral from files.

Library logic shared by ``enclaveq evidence verify`` (enclaveq/cli/evidence.py) and the
verification benchmark (bench/verify_evidence.py): evidence files may hold raw bytes, hex or
base64 text (detected); certificate files are DER or PEM (several per PEM); a collateral
directory holds Intel TCB Info / QE Identity JSON and CRLs, or CRLs alone. Nothing here
fetches from the network, prints or exits: errors are :class:`~attestation.errors.AttestationError`.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from .errors import EvidenceMalformed

__all__ = ["decode_evidence", "load_certificates", "load_collateral"]

_HEX = re.compile(rb"^[0-9a-fA-F]+$")
_B64 = re.compile(rb"^[A-Za-z0-9+/=_-]+$")


def decode_evidence(raw: bytes) -> tuple[bytes, str]:
    """Raw bytes, hex text or base64 text -> (bytes, which). Text is tried hex first: every hex
    string is also valid base64, never the other way round."""
    text = b"".join(raw.split())
    if text and len(text) % 2 == 0 and _HEX.match(text):
        return binascii.unhexlify(text), "hex"
    if text and _B64.match(text) and len(text) >= 16:
        try:
            padded = text + b"=" * (-len(text) % 4)
            altchars = b"-_" if (b"-" in text or b"_" in text) else None
            return base64.b64decode(padded, altchars=altchars, validate=True), "base64"
        except (binascii.Error, ValueError):
            pass
    return raw, "raw"


def load_certificates(paths: tuple[Path, ...]) -> tuple[x509.Certificate, ...]:
    """DER or PEM certificate files (several certificates per PEM). Genuine AMD VCEKs have serial
    number 0, which cryptography loads with a deprecation warning; the SNP loader silences just
    that warning (the certificate is authenticated by its signature, not its serial).

    Raises :class:`EvidenceMalformed` naming the first file that holds no certificate."""
    from .snp.kds import load_certificates as load_any

    certs: list[x509.Certificate] = []
    for path in paths:
        try:
            certs.extend(load_any(Path(path).read_bytes().rstrip(b"\x00")))
        except EvidenceMalformed:
            raise EvidenceMalformed(f"{path}: not a DER or PEM certificate") from None
    return tuple(certs)


def load_collateral(platform: str, directory: Path | None, now: datetime) -> dict[str, Any]:
    """Collateral a platform reads from a directory: Intel TCB Info / QE Identity / CRLs, or CRLs."""
    if directory is None:
        return {}
    if platform in ("sgx", "tdx"):
        from .intel.collateral import load_collateral as load_intel
        from .trust import DEFAULT_TRUST

        intel = load_intel(directory, now=now, trust=DEFAULT_TRUST)
        return {"intel": intel, "crls": tuple(intel.crls)}
    crls = []
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() in (".crl", ".der", ".pem"):
            data = path.read_bytes()
            try:
                crls.append(x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data))
            except ValueError:
                continue  # not a CRL (a certificate, say): other loaders take it
    return {"crls": tuple(crls)}
