"""Authenticity of a TDX quote v4/v5 -> :class:`~attestation.platforms.Verified`.

Parse (:mod:`attestation.tdx.abi`), then the Intel checks shared with SGX
(:func:`attestation.intel.verify.verify_ecdsa_quote`: quote signature over header (+ body
descriptor) + TD body, QE binding, PCK chain to the pinned Intel SGX Root CA at ``inputs.now``
with CRLs, QE report signature by the PCK key), then -- only when ``inputs.collateral["intel"]``
is given -- the TCB status from Intel TDX TCB Info (incl. TEE_TCB_SVN) and TD_QE Identity. No
policy judgement happens here (:mod:`attestation.tdx.validate`).

Collateral keys read: ``"crls"`` and ``"intel"``, as for SGX (:mod:`attestation.sgx.verify`).

``Verified.claims``: ``version mrtd rtmr0 rtmr1 rtmr2 rtmr3 mrconfigid mrowner mrownerconfig
mrseam td_attributes xfam tee_tcb_svn report_data`` (``td_attributes`` and ``xfam`` are the raw 8
bytes, little-endian, as in the quote). ``measurement`` = MRTD, ``debug`` = TD_ATTRIBUTES bit 0,
``security_version`` = 0 (TDX has no single SVN: policies use ``min_tee_tcb_svn``), ``report``
= an :class:`~attestation.intel.verify.VerifiedQuote` whose ``quote`` is the parsed
:class:`~attestation.tdx.abi.TdxQuote` (with MRSIGNERSEAM, SEAM attributes and, for TDX 1.5
bodies, TEE_TCB_SVN2 and MRSERVICETD) and whose ``tcb`` is the TCB outcome. With collateral the
TDX TCB evaluation also gets MRSIGNERSEAM and SEAM_ATTRIBUTES, so the TDX module identity is checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

from attestation.claims import CertSummary
from attestation.claims import CollateralUse
from attestation.intel.verify import TcbOutcome, VerifiedQuote, collateral_report, evaluate_tcb, verify_ecdsa_quote
from attestation.platforms import VerificationInputs, Verified

from .abi import TdxQuote, parse_quote

__all__ = ["verify_quote", "verified_from"]

PLATFORM = "tdx"


def verify_quote(evidence: bytes, inputs: VerificationInputs) -> Verified:
    """Parse and authenticate a TDX quote. Raises EvidenceMalformed or EvidenceInvalid."""
    quote = parse_quote(evidence)
    result = verify_ecdsa_quote(platform=PLATFORM, header=quote.header, signed_region=quote.signed_region,
                                sig=quote.signature_data, inputs=inputs)
    tcb = evaluate_tcb(PLATFORM, inputs, result, quote.signature_data.qe_report, td_body=quote.body)
    report = VerifiedQuote(quote, result.pck_ca, result.pck_extensions, tcb)
    uses, missing = collateral_report(inputs, result, tcb)
    return verified_from(quote, chain=result.chain, tcb=tcb, report=report, collateral=uses,
                         collateral_missing=missing)


def verified_from(quote: TdxQuote, *, chain: Sequence[CertSummary], tcb: TcbOutcome | None,
                  report: VerifiedQuote, collateral: Sequence[CollateralUse] = (),
                  collateral_missing: Sequence[str] = ("Intel collateral",)) -> Verified:
    body = quote.body
    claims = {
        "version": quote.version,
        "mrtd": body.mrtd,
        "rtmr0": body.rtmr0,
        "rtmr1": body.rtmr1,
        "rtmr2": body.rtmr2,
        "rtmr3": body.rtmr3,
        "mrconfigid": body.mrconfigid,
        "mrowner": body.mrowner,
        "mrownerconfig": body.mrownerconfig,
        "mrseam": body.mrseam,
        "td_attributes": body.td_attributes,
        "xfam": body.xfam,
        "tee_tcb_svn": body.tee_tcb_svn,
        "report_data": body.report_data,
    }
    return Verified(
        platform=PLATFORM,
        measurement=body.mrtd,
        report_data=body.report_data,
        debug=body.debug,
        claims=MappingProxyType(claims),
        chain=tuple(chain),
        trailing_bytes=quote.trailing_bytes,
        security_version=0,
        tcb_status=None if tcb is None else tcb.status,
        advisory_ids=() if tcb is None else tuple(tcb.advisory_ids),
        report=report,
        collateral=tuple(collateral),
        collateral_missing=tuple(collateral_missing),
        tcb_evaluated=not collateral_missing,
    )
