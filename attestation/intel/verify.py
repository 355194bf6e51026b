"""Authenticity checks shared by SGX and TDX quotes (Intel's *SGX DCAP ECDSA Quote Library API* and
*TDX DCAP Quoting Library API*).

:func:`verify_ecdsa_quote` runs, in this order, and stops at the first failure
(:class:`EvidenceInvalid` unless the bytes are unusable, then :class:`EvidenceMalformed`):

1. the QE vendor ID is Intel's and the attestation key type is ECDSA-P256 (2);
2. the **quote signature**: ECDSA P-256 / SHA-256 by the attestation key over the signed region
   (header + body, exactly the bytes the platform parser says);
3. the **QE binding**: ``QE_REPORT.REPORTDATA == SHA-256(attestation_key || qe_auth_data) || 0^32``,
   so the attestation key is the one the Quoting Enclave vouched for;
4. the innermost certification data is type 5 (PCK chain) with exactly three certificates:
   PCK leaf, ``Intel SGX PCK Platform CA`` *or* ``Intel SGX PCK Processor CA``, root;
5. the **chain** with :func:`attestation.chain.verify_chain`: signatures, validity at
   ``inputs.now``, the root pinned in ``inputs.trust`` for the platform, CRLs from
   ``inputs.collateral["crls"]`` when given;
6. the **QE report signature**: ECDSA P-256 / SHA-256 by the PCK leaf key over the 384-byte QE
   report, and that QE report's MRSIGNER is Intel's (SGX QE3 or TD QE, :data:`INTEL_QE_MRSIGNERS`)
   and its DEBUG attribute is clear -- a baseline QE identity check that holds even without
   collateral (beyond the quote libraries' own checks, which leave QE identity to the collateral step);
7. the PCK leaf's SGX extensions (FMSPC, TCB components, PCESVN, CPUSVN) through
   :func:`attestation.intel.pck.parse_pck_extensions`;
8. TCB judgement only when the caller passed Intel collateral (``inputs.collateral["intel"]``):
   :func:`evaluate_tcb` -> a :class:`TcbOutcome` (status converged with the QE identity's,
   advisory IDs, whether the collateral was stale, the documents used). Without collateral no TCB
   status is computed (``Verified.tcb_status`` stays None) and nothing is fetched: ``inputs.fetcher``
   is not used here. ``inputs.extra_certs`` is not used either: quotes carry their whole PCK chain.
   :func:`collateral_report` then lists every collateral document used (CRLs, TCB Info, QE
   Identity, with ages) and what was missing for a full judgement, for the policy to judge
   (:mod:`attestation.collateral_rules`): nothing about freshness or absence is decided here.

Speed: parsed PCK chains are cached by content (:func:`attestation.intel.abi.parse_pck_chain`)
and attestation public keys by their 64 bytes, so a warm verification costs five ECDSA P-256
verifications and a few hashes.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from attestation.chain import common_name, crl_use, verify_chain_crls
from attestation.claims import CertSummary, CollateralUse
from attestation.errors import AttestationError, EvidenceInvalid, EvidenceMalformed

from .abi import (
    ATT_KEY_ECDSA_P256,
    CERT_PCK_CHAIN,
    CERTIFICATION_DATA_TYPES,
    INTEL_QE_VENDOR_ID,
    EcdsaSignatureData,
    QuoteHeader,
    ReportBody,
)
from .pck import PckExtensions, parse_pck_extensions

__all__ = [
    "INTEL_QE_MRSIGNERS",
    "PCK_CA_NAMES",
    "IntelVerification",
    "TcbOutcome",
    "VerifiedQuote",
    "attestation_public_key",
    "collateral_report",
    "evaluate_tcb",
    "verify_ecdsa_p256",
    "verify_ecdsa_quote",
]

PCK_LEAF_NAME = "Intel SGX PCK Certificate"
# MRSIGNER of Intel's Quoting Enclaves: the SGX QE3 and the TD QE (public values, also in Intel's QE
# Identity collateral and in every vector here). The PCK key signs the report of any enclave that
# holds the PROVISIONKEY attribute, which flexible launch control does not reserve to Intel, so
# without collateral this is the check that the quote came from Intel's QE and not from an enclave
# posing as one. With collateral, QE Identity (attestation.intel.collateral) checks it in full.
INTEL_QE_MRSIGNERS = frozenset({
    bytes.fromhex("8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff"),  # SGX QE3
    bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5"),  # TD QE
})
# Which of Intel's Quoting Enclaves vouches for which kind of quote: (MRSIGNER, ISVPRODID). An SGX
# quote comes from the SGX QE3 (product 1), a TDX quote from the TD QE (product 2); accepting
# either for both would let one QE's report stand in for the other's when no collateral is given.
INTEL_QE_IDENTITY = {
    "sgx": (bytes.fromhex("8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff"), 1),
    "tdx": (bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5"), 2),
}
PCK_CA_NAMES = {"Intel SGX PCK Platform CA": "platform", "Intel SGX PCK Processor CA": "processor"}
_P256_ORDER_BYTES = 32


@dataclass(frozen=True)
class IntelVerification:
    """What :func:`verify_ecdsa_quote` established."""

    chain: tuple[CertSummary, ...]
    pck_leaf: x509.Certificate
    pck_ca: str                        # "platform" or "processor"
    pck_extensions: PckExtensions
    crls: tuple[x509.CertificateRevocationList, ...] = ()   # consulted for the PCK chain (signature checked)
    crl_issuers: frozenset[str] = frozenset()             # CNs of the chain certificates those CRLs cover

    @property
    def fmspc(self) -> bytes:
        return bytes(self.pck_extensions.fmspc)


@lru_cache(maxsize=1024)
def attestation_public_key(raw: bytes) -> ec.EllipticCurvePublicKey:
    """The P-256 public key from its raw 64-byte X || Y encoding (cached: a worker reuses its key)."""
    if len(raw) != 64:
        raise EvidenceMalformed(f"attestation key must be 64 bytes (P-256 X || Y), got {len(raw)}")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError:
        raise EvidenceInvalid("attestation key is not a point on P-256") from None


def verify_ecdsa_p256(key: Any, signature: bytes, data: bytes, what: str) -> None:
    """Verify a raw r || s (big-endian, 32 + 32 bytes) ECDSA P-256 / SHA-256 signature."""
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise EvidenceInvalid(f"{what}: the signing key is not an ECDSA P-256 key")
    if len(signature) != 2 * _P256_ORDER_BYTES:
        raise EvidenceMalformed(f"{what}: signature must be 64 bytes r || s, got {len(signature)}")
    r = int.from_bytes(signature[:_P256_ORDER_BYTES], "big")
    s = int.from_bytes(signature[_P256_ORDER_BYTES:], "big")
    try:
        key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise EvidenceInvalid(f"{what} does not verify") from None


def _common_name(cert: x509.Certificate) -> str:
    try:
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        value = names[0].value if len(names) == 1 else ""
    except Exception:  # noqa: BLE001 - an unreadable name is simply not the expected one
        return ""
    return value if isinstance(value, str) else ""


@lru_cache(maxsize=256)
def _pck_extensions(leaf_der: bytes, leaf: x509.Certificate) -> PckExtensions:
    """The PCK leaf's SGX extensions, cached by the leaf's DER (a worker sends the same leaf with
    every quote; x509.Certificate also hashes and compares by its DER)."""
    try:
        return parse_pck_extensions(leaf)
    except AttestationError:
        raise
    except Exception as exc:  # noqa: BLE001 - keep the "typed errors only" promise
        raise EvidenceMalformed(f"PCK certificate SGX extensions are unreadable ({type(exc).__name__})") from None


def verify_ecdsa_quote(
    *,
    platform: str,
    header: QuoteHeader,
    signed_region: bytes,
    sig: EcdsaSignatureData,
    inputs: Any,
) -> IntelVerification:
    """Steps 1-7 of the module docstring; returns the verified chain and PCK facts."""
    if header.att_key_type != ATT_KEY_ECDSA_P256:
        raise EvidenceMalformed(f"attestation key type {header.att_key_type} is not supported (only 2, ECDSA-P256)")
    if header.qe_vendor_id != INTEL_QE_VENDOR_ID:
        raise EvidenceInvalid(f"QE vendor ID {header.qe_vendor_id.hex()} is not Intel's ({INTEL_QE_VENDOR_ID.hex()})")

    # 2. quote signature by the attestation key
    key = attestation_public_key(sig.attestation_key)
    verify_ecdsa_p256(key, sig.signature, signed_region, "quote signature (attestation key)")

    # 3. the QE report binds the attestation key and the QE authentication data
    expected = hashlib.sha256(sig.attestation_key + sig.qe_auth_data).digest() + bytes(32)
    if not hmac.compare_digest(sig.qe_report.report_data, expected):
        raise EvidenceInvalid("QE report data does not bind the attestation key and QE authentication data "
                              "(expected SHA-256(attestation_key || qe_auth_data) || 32 zero bytes)")

    # 4. the PCK chain, leaf first
    cert_data = sig.certification
    if cert_data.type != CERT_PCK_CHAIN or cert_data.pck_chain is None:
        raise EvidenceMalformed(
            f"certification data type {cert_data.type} ({CERTIFICATION_DATA_TYPES.get(cert_data.type, '?')}) "
            "is not supported: quotes must carry type 5, the PCK certificate chain"
        )
    certs = cert_data.pck_chain.certs
    if len(certs) != 3:
        raise EvidenceInvalid(f"PCK certificate chain has {len(certs)} certificates; expected 3 "
                              "(PCK leaf, PCK Platform or Processor CA, Intel SGX Root CA)")
    leaf, ca, _root = certs
    pck_ca = PCK_CA_NAMES.get(_common_name(ca))
    if pck_ca is None:
        raise EvidenceInvalid(f"PCK chain intermediate {_safe_subject(ca)!r} is neither the Intel SGX PCK "
                              "Platform CA nor the Processor CA")
    if _common_name(leaf) != PCK_LEAF_NAME:
        raise EvidenceInvalid(f"PCK chain leaf {_safe_subject(leaf)!r} is not an '{PCK_LEAF_NAME}'")

    # 5. chain to the pinned root at inputs.now, with CRLs when given (the "crls" entry, and those
    # that came with the Intel collateral, so {"intel": collateral} alone is enough)
    crls: list[x509.CertificateRevocationList] = list(inputs.collateral.get("crls", ()) or ())
    intel = inputs.collateral.get("intel")
    for crl in getattr(intel, "crls", ()) or ():
        if not any(crl is given or crl == given for given in crls):
            crls.append(crl)
    try:
        summaries, consulted = verify_chain_crls(certs, now=inputs.now,
                                                 trusted_roots=inputs.trust.for_platform(platform), crls=crls)
    except AttestationError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. an unsupported signature algorithm
        raise EvidenceInvalid(f"PCK certificate chain does not verify ({type(exc).__name__})") from None

    # 6. the QE report is signed by the PCK leaf key
    try:
        pck_key = leaf.public_key()
    except Exception:  # noqa: BLE001 - unsupported key types
        raise EvidenceInvalid("PCK leaf certificate key is unusable") from None
    verify_ecdsa_p256(pck_key, sig.qe_report_signature, sig.qe_report_raw, "QE report signature (PCK key)")

    # 6b. ... and the signed report is Intel's production Quoting Enclave
    qe = sig.qe_report
    if qe.mrsigner not in INTEL_QE_MRSIGNERS:
        raise EvidenceInvalid(f"QE report MRSIGNER {qe.mrsigner.hex()} is not Intel's Quoting Enclave signer")
    qe_identity = INTEL_QE_IDENTITY.get(platform)
    if qe_identity is not None and (qe.mrsigner, qe.isvprodid) != qe_identity:
        qe_signer, qe_product = qe_identity
        raise EvidenceInvalid(f"QE report (MRSIGNER {qe.mrsigner.hex()}, ISVPRODID {qe.isvprodid}) is not the Quoting "
                              f"Enclave of {platform.upper()} quotes (MRSIGNER {qe_signer.hex()}, "
                              f"ISVPRODID {qe_product})")
    if qe.debug:
        raise EvidenceInvalid("QE report has ATTRIBUTES.DEBUG set: a debug Quoting Enclave vouches for nothing")

    # 7. PCK extensions (FMSPC ...)
    return IntelVerification(summaries, leaf, pck_ca, _pck_extensions(cert_data.pck_chain.ders[0], leaf),
                             consulted, frozenset(common_name(crl.issuer) for crl in consulted))


def _safe_subject(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string()
    except Exception:  # noqa: BLE001
        return "<unprintable subject>"


# --------------------------------------------------------------------------------------------
# TCB judgement with collateral


@dataclass(frozen=True)
class TcbOutcome:
    """The quote's TCB judgement from collateral: platform (and TDX module) status converged with
    the QE identity status; ``collateral_expired`` when a document used was past its nextUpdate
    (reported, for the policy to judge: ``allow_expired_collateral``)."""

    status: str
    advisory_ids: tuple[str, ...] = ()
    collateral_expired: bool = False
    notes: tuple[str, ...] = ()
    sources: tuple[CollateralUse, ...] = ()   # the TCB Info and QE Identity used, with their ages


@dataclass(frozen=True)
class VerifiedQuote:
    """``Verified.report`` for SGX and TDX: the parsed quote and what verification established."""

    quote: Any                          # attestation.sgx.abi.SgxQuote or attestation.tdx.abi.TdxQuote
    pck_ca: str                         # "platform" or "processor"
    pck_extensions: PckExtensions
    tcb: TcbOutcome | None = None       # None: no collateral was given, no TCB judgement


def _merge(*groups: Any) -> tuple[str, ...]:
    out: list[str] = []
    for group in groups:
        for item in group:
            if item not in out:
                out.append(item)
    return tuple(out)


def evaluate_tcb(
    platform: str,
    inputs: Any,
    verification: IntelVerification,
    qe_report: ReportBody,
    td_body: Any = None,
) -> TcbOutcome | None:
    """The TCB judgement from Intel collateral, or None when no collateral was given. Collateral
    problems (bad signature, wrong FMSPC, QE identity mismatch) raise what
    attestation.intel.collateral raises (EvidenceInvalid / EvidenceMalformed). ``td_body`` (a
    TdReportBody) is required for TDX."""
    coll = inputs.collateral.get("intel")
    if coll is None:
        return None
    # Looked up at call time, not imported at the top: the wiring tests (tests/test_sgx_tcb.py)
    # substitute a recording fake for this module to see exactly what verification passes it.
    from attestation.intel import collateral as collateral_mod

    pck = verification.pck_extensions
    if platform == "tdx":
        tcb = collateral_mod.evaluate_tdx_tcb(coll, pck, td_body.tee_tcb_svn, inputs.now,
                                              mrsignerseam=td_body.mrsignerseam,
                                              seam_attributes=td_body.seam_attributes)
    else:
        tcb = collateral_mod.evaluate_sgx_tcb(coll, pck, inputs.now)
    qe = collateral_mod.evaluate_qe_identity(coll, qe_report.mrsigner, qe_report.isvprodid, qe_report.isvsvn,
                                             qe_report.miscselect, qe_report.attributes, inputs.now,
                                             expected_id="TD_QE" if platform == "tdx" else "QE")
    both = collateral_mod.converge_tcb_status(tcb, qe)
    status, advisories = both.status, tuple(both.advisory_ids)
    expired = tcb.collateral_expired or qe.collateral_expired
    notes = _merge(tcb.notes, qe.notes)
    return TcbOutcome(status, advisories, expired, notes, tuple(tcb.sources) + tuple(qe.sources))


ROOT_CA_NAME = "Intel SGX Root CA"


def collateral_report(inputs: Any, verification: IntelVerification, tcb: TcbOutcome | None
                      ) -> tuple[tuple[CollateralUse, ...], tuple[str, ...]]:
    """What Intel collateral the verification used (CRLs, TCB Info, QE Identity, each with its age
    at ``inputs.now``) and what the TCB judgement needed but did not get: TCB Info and QE Identity
    (without them there is no TCB status) and a CRL from each issuer of the PCK chain (without them
    a revoked PCK certificate or PCK CA would pass). The policy judges both."""
    uses = tuple(crl_use(crl, inputs.now) for crl in verification.crls)
    missing: list[str] = []
    if tcb is None:
        missing.append("Intel TCB Info and QE Identity (collateral 'intel')")
    else:
        uses += tcb.sources
    ca_name = next((name for name in PCK_CA_NAMES if PCK_CA_NAMES[name] == verification.pck_ca), "PCK CA")
    for issuer, what in ((ca_name, "the PCK CRL"), (ROOT_CA_NAME, "the Root CA CRL")):
        if issuer not in verification.crl_issuers:
            missing.append(f"{what} (issued by {issuer!r})")
    return uses, tuple(missing)
