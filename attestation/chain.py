"""X.509 chain checks shared by every platform verifier.

One job: given certificates leaf first, check that each is signed by the next, that each is
valid at ``now``, that the last one is a self-signed root whose fingerprint is pinned, and
(optionally) that no certificate is revoked by a CRL signed by its issuer. Every failure is an
``EvidenceInvalid`` naming the certificate by its subject. Platforms call this; they never
re-implement path checks.

CRL freshness is not judged here, because it is a policy question (how stale may a CRL be?):
:func:`verify_chain_crls` returns every CRL it consulted, the platform records each as a
:class:`~attestation.claims.CollateralUse` (:func:`crl_use`) and the policy judges its
nextUpdate (:mod:`attestation.collateral_rules`). A CRL is never silently used past its
nextUpdate: it is either within the policy's grace or a violation.
"""

from __future__ import annotations

from datetime import datetime
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from .claims import CertSummary, CollateralUse
from .errors import EvidenceInvalid

__all__ = ["der_sha256", "verify_chain", "verify_chain_crls", "check_crl", "crl_use", "common_name", "subject",
           "signature_is_octet_aligned"]

# Issuer keys whose CRL signatures are checked. Every vendor CA here (Intel, AMD, AWS) is RSA or
# ECDSA; key-agreement keys (X25519, X448, ML-KEM) cannot sign, and DSA is deprecated.
_SIGNING_KEYS = (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)


def der_sha256(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


def subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def _check_time(cert: x509.Certificate, now: datetime, role: str) -> None:
    if now < cert.not_valid_before_utc:
        raise EvidenceInvalid(f"{role} certificate {subject(cert)!r} is not valid before "
                              f"{cert.not_valid_before_utc.isoformat()} (verification time {now.isoformat()})")
    if now > cert.not_valid_after_utc:
        raise EvidenceInvalid(f"{role} certificate {subject(cert)!r} expired at "
                              f"{cert.not_valid_after_utc.isoformat()} (verification time {now.isoformat()})")


def _signed_by(child: x509.Certificate, issuer: x509.Certificate, role: str) -> None:
    try:
        child.verify_directly_issued_by(issuer)
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError) as exc:
        raise EvidenceInvalid(f"{role} certificate {subject(child)!r} is not signed by "
                              f"{subject(issuer)!r} ({type(exc).__name__})") from None


def verify_chain(chain: Sequence[x509.Certificate], *, now: datetime, trusted_roots: Iterable[bytes],
                 crls: Sequence[x509.CertificateRevocationList] = (), check_time: bool = True) -> tuple[CertSummary, ...]:
    """Verify ``chain`` (leaf first, root last) against pinned root fingerprints (SHA-256 of DER).

    Returns the chain's summaries. ``crls`` are checked for every certificate whose issuer
    signed one of them (a CRL whose signature does not verify is an error, not ignored).
    """
    return verify_chain_crls(chain, now=now, trusted_roots=trusted_roots, crls=crls, check_time=check_time)[0]


def verify_chain_crls(chain: Sequence[x509.Certificate], *, now: datetime, trusted_roots: Iterable[bytes],
                      crls: Sequence[x509.CertificateRevocationList] = (), check_time: bool = True
                      ) -> tuple[tuple[CertSummary, ...], tuple[x509.CertificateRevocationList, ...]]:
    """:func:`verify_chain`, also returning the CRLs that were consulted (issued by a certificate of
    the chain, signature verified), in the order given, each once."""
    if not chain:
        raise EvidenceInvalid("empty certificate chain")
    trusted = frozenset(trusted_roots)
    root = chain[-1]
    if der_sha256(root) not in trusted:
        raise EvidenceInvalid(f"root certificate {subject(root)!r} (SHA-256 {der_sha256(root).hex()}) is not a "
                              "pinned trust anchor")
    _signed_by(root, root, "root")
    for index, cert in enumerate(chain):
        role = "leaf" if index == 0 else ("root" if index == len(chain) - 1 else "intermediate")
        if check_time:
            _check_time(cert, now, role)
        if index + 1 < len(chain):
            _signed_by(cert, chain[index + 1], role)
    used: list[x509.CertificateRevocationList] = []
    for index, cert in enumerate(chain[:-1]):
        for crl in check_crl(cert, chain[index + 1], crls, now=now):
            if not any(crl is seen for seen in used):
                used.append(crl)
    return tuple(CertSummary.from_certificate(c) for c in chain), tuple(used)


def check_crl(cert: x509.Certificate, issuer: x509.Certificate, crls: Sequence[x509.CertificateRevocationList],
              *, now: datetime) -> list[x509.CertificateRevocationList]:
    """Refuse ``cert`` if a CRL issued by ``issuer`` lists it. CRLs from other issuers are skipped.

    Returns the CRLs issued by ``issuer`` (each signature verified) that were consulted; their
    freshness is for the policy to judge (see the module docstring)."""
    consulted: list[x509.CertificateRevocationList] = []
    for crl in crls:
        if crl.issuer != issuer.subject:
            continue
        try:
            key = issuer.public_key()
            valid = isinstance(key, _SIGNING_KEYS) and crl.is_signature_valid(key)
        except (TypeError, ValueError, UnsupportedAlgorithm):
            valid = False
        if not valid:
            raise EvidenceInvalid(f"CRL claiming issuer {subject(issuer)!r} is not signed by it")
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise EvidenceInvalid(f"certificate {subject(cert)!r} (serial {cert.serial_number:x}) is revoked")
        consulted.append(crl)
    return consulted


def common_name(name: x509.Name) -> str:
    """The CN of ``name`` (the whole RFC 4514 string when it has none or is unreadable)."""
    try:
        names = name.get_attributes_for_oid(NameOID.COMMON_NAME)
        if names and isinstance(names[0].value, str):
            return names[0].value
        return name.rfc4514_string()
    except Exception:  # noqa: BLE001 - a name we cannot read is still worth reporting as something
        return "<unprintable name>"


def crl_use(crl: x509.CertificateRevocationList, now: datetime) -> CollateralUse:
    """What a consulted CRL was: issuer CN, thisUpdate, nextUpdate, age at ``now``."""
    issued = crl.last_update_utc
    return CollateralUse(kind="crl", issuer=common_name(crl.issuer), issued_at=issued,
                         next_update=crl.next_update_utc, age_seconds=(now - issued).total_seconds())


def signature_is_octet_aligned(der: bytes, signature: bytes) -> bool:
    """True if the DER certificate ends with its signature as a BIT STRING with 0 unused bits.

    cryptography ignores the unused-bits count, so a certificate whose final ``03 len 00``
    became ``03 len 01`` would still verify while its bytes (and fingerprint) differ: a malleable
    encoding. X.509 signatures are octet strings in a BIT STRING (RFC 5280 4.1.1.3), so the count
    must be 0; parsers call this on the exact bytes they were given.
    """
    content = b"\x00" + signature
    size = len(content)
    if size < 0x80:
        length = bytes([size])
    else:
        digits = size.to_bytes((size.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(digits)]) + digits
    return der.endswith(b"\x03" + length + content)
