"""Authenticity of simulated evidence: signature, certificate chain, validity, pinned root.

Input is parsed :class:`~attestation.sim.abi.SimEvidence`, the trusted root fingerprint (from
the policy) and ``now`` (injected, never read from a clock here). Output is
:class:`~attestation.claims.Claims`, or :class:`EvidenceInvalid` naming the first failure.
No policy judgement happens here (measurement, debug, age... are :mod:`attestation.validate`).

Checks, in order:

1. the last certificate (the root) has exactly the pinned SHA-256 fingerprint;
2. every certificate is inside its validity window at ``now`` (checked here as well as by the
   path validator, for an error that names the certificate and its dates);
3. RFC 5280 path validation from the leaf to that root with ``cryptography.x509.verification``
   (signatures, issuer/subject chaining, CA basic constraints and key usage, path length), and
   the validated path must be exactly the chain carried in the evidence;
4. the leaf is an ECDSA P-256 end-entity key allowed to sign (digitalSignature);
5. the leaf's ECDSA P-256 / SHA-256 signature over the exact signed body bytes.
"""

from __future__ import annotations

import hmac
from datetime import datetime
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store

from attestation.claims import CertSummary, Claims
from attestation.errors import EvidenceInvalid
from attestation.sim.abi import SimEvidence

__all__ = ["verify_sim_evidence"]

PLATFORM = "sim"


def _subject(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string()
    except Exception:  # noqa: BLE001 - only used inside error messages
        return "<unprintable subject>"


def _check_validity(chain: tuple[x509.Certificate, ...], now: datetime) -> None:
    for index, cert in enumerate(chain):
        role = "attestation certificate" if index == 0 else (
            "root certificate" if index == len(chain) - 1 else "intermediate certificate"
        )
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        if not start <= now <= end:
            state = "expired" if now > end else "not yet valid"
            raise EvidenceInvalid(
                f"{role} {_subject(cert)!r} is {state} at {now.isoformat()}: "
                f"valid from {start.isoformat()} to {end.isoformat()}"
            )


def _validate_path(chain: tuple[x509.Certificate, ...], now: datetime) -> None:
    leaf, intermediates, root = chain[0], list(chain[1:-1]), chain[-1]
    verifier = (
        PolicyBuilder()
        .store(Store([root]))
        .time(now)
        .max_chain_depth(len(chain))
        # CAs get the Web PKI checks (basicConstraints CA, keyCertSign, ...). The end entity is
        # an attestation key, not a TLS client, so its extensions are checked by us below.
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, intermediates)
    except Exception as exc:  # noqa: BLE001 - VerificationError, ValueError, unsupported algorithms
        raise EvidenceInvalid(
            f"certificate chain does not validate to the trusted simulation root: {exc}"
        ) from exc
    if list(verified.chain) != list(chain):
        # Any extra or reordered certificate would make Claims.chain describe a path that was
        # not the one validated.
        raise EvidenceInvalid("certificate chain in the evidence is not the validated path")


_E = TypeVar("_E", bound=x509.ExtensionType)


def _extension(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except Exception as exc:  # noqa: BLE001 - extensions are parsed lazily and may be garbage
        raise EvidenceInvalid(f"attestation certificate has unreadable extensions: {exc}") from exc


def _leaf_key(leaf: x509.Certificate) -> ec.EllipticCurvePublicKey:
    constraints = _extension(leaf, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise EvidenceInvalid("attestation certificate is a CA certificate, not an end entity")
    usage = _extension(leaf, x509.KeyUsage)
    if usage is not None and not usage.digital_signature:
        raise EvidenceInvalid("attestation certificate's key usage does not allow digitalSignature")
    try:
        key = leaf.public_key()
    except Exception as exc:  # noqa: BLE001 - unsupported or garbled key
        raise EvidenceInvalid(f"attestation certificate key cannot be loaded: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise EvidenceInvalid("attestation certificate key is not ECDSA P-256")
    return key


def verify_sim_evidence(
    evidence: SimEvidence, *, trusted_root_sha256: bytes, now: datetime
) -> Claims:
    """Check that ``evidence`` is authentic and return what it claims.

    ``trusted_root_sha256`` is the 32-byte SHA-256 fingerprint of the only simulation root to
    trust. ``now`` must be timezone-aware. Raises :class:`EvidenceInvalid` on the first failure.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    chain = evidence.chain
    root = chain[-1]
    fingerprint = root.fingerprint(hashes.SHA256())
    if not hmac.compare_digest(fingerprint, trusted_root_sha256):
        raise EvidenceInvalid(
            f"evidence is signed under simulation root {fingerprint.hex()}, "
            f"but the policy trusts only {trusted_root_sha256.hex()} ([simulation] root_sha256)"
        )
    _check_validity(chain, now)
    _validate_path(chain, now)
    key = _leaf_key(chain[0])
    try:
        key.verify(evidence.signature, evidence.signed_body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise EvidenceInvalid("evidence signature does not verify with the attestation certificate") from None

    report = evidence.report
    try:
        summaries = tuple(CertSummary.from_certificate(c) for c in chain)
    except Exception as exc:  # noqa: BLE001 - a validated chain should always summarise
        raise EvidenceInvalid(f"certificate chain cannot be summarised: {exc}") from exc
    return Claims(
        platform=PLATFORM,
        measurement=report.measurement,
        debug=report.debug,
        security_version=report.security_version,
        report_data=report.report_data,
        issued_at=report.issued_at,
        simulated=True,
        chain=summaries,
    )
