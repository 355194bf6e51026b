"""Authenticity of a Nitro attestation document: certificate chain to the pinned AWS root, the
validity of every certificate at ``inputs.now``, and the ES384 COSE_Sign1 signature.

No policy judgement happens here (PCRs, module_id, debug: :mod:`attestation.nitro.validate`;
report data and evidence age: the front door). Every failure is :class:`EvidenceInvalid`
naming the first problem; unparseable bytes are :class:`EvidenceMalformed` (from the abi).
Nothing else escapes :func:`verify_evidence`: third-party exceptions are mapped here.

Checks, in order (AWS ``aws-nitro-enclaves-nsm-api`` ``docs/attestation_process.md`` §3.2.3, RFC 9052 §4.4):

1. chain ``certificate, cabundle[n-1], ..., cabundle[0]`` (the bundle is root first, the chain
   is leaf first) through :func:`attestation.chain.verify_chain`: ``cabundle[0]`` hashes to a
   root pinned in ``inputs.trust.for_platform("nitro")`` (AWS Nitro Enclaves Root-G1 by
   default) and signs itself, and every certificate is signed by the next;
2. the certificate profile AWS requires: every CA has a critical basicConstraints with CA set,
   keyCertSign, and no more CAs below it than its pathLenConstraint; the leaf has
   digitalSignature, is not a CA, and holds a P-384 key; no certificate carries a critical
   extension we do not understand;
3. every certificate, the root included, is inside its validity window at ``inputs.now`` (the
   only step that depends on the time: steps 1-2 are cached, see below);
4. CRLs, only if the caller passed some in ``inputs.collateral["crls"]`` (AWS publishes none
   for this PKI and the reference process disables revocation);
5. ES384 over ``Sig_structure = ["Signature1", protected, b"", payload]`` with the leaf key,
   the 96-byte signature read as r || s (48 bytes each, big-endian).

Collateral keys read: ``crls`` (a sequence of ``x509.CertificateRevocationList``). Extra
certificates (``inputs.extra_certs``) are not used: a document carries its whole chain.

Caching: parsed certificates are cached by their DER bytes (:func:`abi.load_certificate`),
and the time-independent outcome of steps 1-2 by the exact DER of the whole chain plus the set
of trusted roots (an LRU of 256 chains). A cache entry exists only for a chain that passed;
the clock-dependent checks (3-5) run on every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, UTC
from functools import lru_cache
from typing import Any
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from attestation.chain import check_crl, subject, verify_chain
from attestation.claims import CertSummary
from attestation.errors import AttestationError, EvidenceInvalid
from attestation.nitro.abi import NitroEvidence, load_certificate, parse_evidence
from attestation.platforms import VerificationInputs, Verified

__all__ = ["PLATFORM_NAME", "DEBUG_PCRS", "is_debug", "verify_evidence", "verify_parsed", "clear_caches"]

PLATFORM_NAME = "nitro"
# Debug-mode enclaves report all-zero PCRs. PCR0 (image), PCR1 (kernel and bootstrap) and PCR2
# (application) are SHA-384 measurements of real content and are never all-zero otherwise, so
# any one of them being zero is treated as debug (stricter than "every PCR is zero", which
# would miss a debug document whose PCR3/PCR4 -- IAM role, instance -- were filled in).
DEBUG_PCRS = (0, 1, 2)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_P384_HALF = 48


def is_debug(pcrs: Any) -> bool:
    """True if PCR0, PCR1 or PCR2 (those present) is all zero bytes: a debug-mode enclave."""
    return any(index in pcrs and not any(pcrs[index]) for index in DEBUG_PCRS)


@dataclass(frozen=True)
class _AuthenticChain:
    summaries: tuple[CertSummary, ...]
    leaf_key: ec.EllipticCurvePublicKey


def _role(index: int, length: int) -> str:
    return "leaf" if index == 0 else ("root" if index == length - 1 else "intermediate")


def _extensions(cert: x509.Certificate, role: str) -> x509.Extensions:
    try:
        return cert.extensions
    except Exception as exc:  # noqa: BLE001 - duplicate or garbled extensions
        raise EvidenceInvalid(f"{role} certificate {subject(cert)!r} has unreadable extensions: {exc}") from None


def _check_profile(certs: Sequence[x509.Certificate]) -> ec.EllipticCurvePublicKey:
    """The certificate profile of AWS ``attestation_process.md`` §3.2.3.2-3; returns the leaf's P-384 key."""
    for index, cert in enumerate(certs):
        role = _role(index, len(certs))
        exts = _extensions(cert, role)
        name = subject(cert)
        for ext in exts:
            if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension):
                raise EvidenceInvalid(f"{role} certificate {name!r} has an unsupported critical "
                                      f"extension {ext.oid.dotted_string}")
        try:
            constraints = exts.get_extension_for_class(x509.BasicConstraints)
        except x509.ExtensionNotFound:
            constraints = None
        try:
            usage = exts.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        if index == 0:
            if constraints is not None and constraints.value.ca:
                raise EvidenceInvalid(f"leaf certificate {name!r} is a CA certificate")
            if usage is None or not usage.digital_signature:
                raise EvidenceInvalid(f"leaf certificate {name!r} does not allow digitalSignature")
            continue
        if constraints is None or not constraints.value.ca or not constraints.critical:
            raise EvidenceInvalid(f"{role} certificate {name!r} is not a CA (needs a critical "
                                  "basicConstraints with CA set)")
        below = index - 1  # CA certificates between this one and the leaf
        path_length = constraints.value.path_length
        if path_length is not None and below > path_length:
            raise EvidenceInvalid(f"{role} certificate {name!r} allows {path_length} CA certificates "
                                  f"below it, the chain has {below}")
        if usage is None or not usage.key_cert_sign:
            raise EvidenceInvalid(f"{role} certificate {name!r} does not allow keyCertSign")
    try:
        key = certs[0].public_key()
    except Exception as exc:  # noqa: BLE001 - unsupported or garbled key
        raise EvidenceInvalid(f"leaf certificate key cannot be loaded: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise EvidenceInvalid("leaf certificate key is not ECDSA P-384, as ES384 requires")
    return key


@lru_cache(maxsize=256)
def _authenticate_chain(ders: tuple[bytes, ...], trusted: frozenset[bytes]) -> _AuthenticChain:
    """Steps 1-2 for the chain ``ders`` (leaf first). Time-independent, hence cacheable."""
    certs = tuple(load_certificate(der) for der in ders)
    # check_time=False: validity is checked on every call (step 3); `now` is then unused.
    summaries = verify_chain(certs, now=_EPOCH, trusted_roots=trusted, check_time=False)
    return _AuthenticChain(summaries=summaries, leaf_key=_check_profile(certs))


def clear_caches() -> None:
    """Forget cached chains and certificates (tests; after rotating pinned roots nothing is
    needed: the trusted set is part of the cache key)."""
    _authenticate_chain.cache_clear()
    load_certificate.cache_clear()


def _check_validity(certs: Sequence[x509.Certificate], now: datetime) -> None:
    for index, cert in enumerate(certs):
        role = _role(index, len(certs))
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        if now < start:
            raise EvidenceInvalid(f"{role} certificate {subject(cert)!r} is not valid before "
                                  f"{start.isoformat()} (verification time {now.isoformat()})")
        if now > end:
            raise EvidenceInvalid(f"{role} certificate {subject(cert)!r} expired at "
                                  f"{end.isoformat()} (verification time {now.isoformat()})")


def _crls(inputs: VerificationInputs) -> tuple[x509.CertificateRevocationList, ...]:
    crls = tuple(inputs.collateral.get("crls", ()) or ())
    for crl in crls:
        if not isinstance(crl, x509.CertificateRevocationList):
            raise TypeError(f"collateral['crls'] must hold x509.CertificateRevocationList, not {type(crl).__name__}")
    return crls


def _check_signature(evidence: NitroEvidence, key: ec.EllipticCurvePublicKey) -> None:
    sig = evidence.signature
    der = encode_dss_signature(int.from_bytes(sig[:_P384_HALF], "big"), int.from_bytes(sig[_P384_HALF:], "big"))
    try:
        key.verify(der, evidence.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise EvidenceInvalid("COSE_Sign1 ES384 signature does not verify with the document's certificate") from None


def claims_of(evidence: NitroEvidence) -> dict[str, Any]:
    """The ``claims`` of the ``evidence verify --json`` contract (bytes stay bytes)."""
    doc = evidence.document
    return {
        "module_id": doc.module_id,
        "digest": doc.digest,
        "timestamp": doc.timestamp,
        "pcrs": {str(index): value for index, value in doc.pcrs.items()},
        "public_key": doc.public_key,
        "user_data": doc.user_data,
        "nonce": doc.nonce,
    }


def verify_parsed(evidence: NitroEvidence, inputs: VerificationInputs) -> Verified:
    """Authenticate parsed evidence at ``inputs.now``; see the module docstring for the steps."""
    now = inputs.now
    if now.tzinfo is None:
        raise ValueError("inputs.now must be timezone-aware")
    crls = _crls(inputs)
    trusted = frozenset(inputs.trust.for_platform(PLATFORM_NAME))
    doc = evidence.document
    try:
        certs = (evidence.leaf, *reversed(evidence.cabundle))
        chain = _authenticate_chain((doc.certificate, *reversed(doc.cabundle)), trusted)
        _check_validity(certs, now)
        for index in range(len(certs) - 1):
            check_crl(certs[index], certs[index + 1], crls, now=now)
        _check_signature(evidence, chain.leaf_key)
    except AttestationError:
        raise
    except Exception as exc:  # noqa: BLE001 - a third-party surprise must still be a typed refusal
        raise EvidenceInvalid(f"Nitro attestation document cannot be verified ({type(exc).__name__}: {exc})") from exc
    return Verified(
        platform=PLATFORM_NAME,
        measurement=doc.pcrs[0],
        # Nitro binds report data through user_data (any length 0..1024; absent -> b""). The
        # front door compares it with the expected value as is: enclaveq workers put their
        # 64-byte statement hash there, so anything else simply does not match.
        report_data=doc.user_data or b"",
        debug=is_debug(doc.pcrs),
        claims=claims_of(evidence),
        chain=chain.summaries,
        trailing_bytes=evidence.trailing_bytes,
        issued_at=doc.issued_at,
        report=evidence,
    )


def verify_evidence(evidence: bytes, inputs: VerificationInputs) -> Verified:
    """Parse and authenticate a Nitro attestation document (raw CBOR bytes).

    Raises :class:`EvidenceMalformed` or :class:`EvidenceInvalid`."""
    return verify_parsed(parse_evidence(evidence), inputs)
