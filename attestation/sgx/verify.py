"""Authenticity of an SGX DCAP quote v3 -> :class:`~attestation.platforms.Verified`.

Parse (:mod:`attestation.sgx.abi`), then the Intel checks shared with TDX
(:func:`attestation.intel.verify.verify_ecdsa_quote`: quote signature, QE binding, PCK chain to
the pinned Intel SGX Root CA at ``inputs.now`` with CRLs, QE report signature by the PCK key),
then -- only when ``inputs.collateral["intel"]`` is given -- the TCB status from Intel TCB Info
and QE Identity. No policy judgement happens here (:mod:`attestation.sgx.validate`).

Collateral keys read: ``"crls"`` (a sequence of ``x509.CertificateRevocationList``: the Root CA
CRL and/or the PCK Platform/Processor CA CRL) and ``"intel"`` (an
``attestation.intel.collateral.IntelCollateral``).

``Verified.claims`` (names fixed by the ``evidence verify --json`` contract): ``mrenclave
mrsigner isvprodid isvsvn attributes_flags attributes_xfrm miscselect cpusvn config_svn
report_data qe_svn pce_svn fmspc`` (bytes stay bytes; ``fmspc`` is read from the PCK
certificate). ``measurement`` = MRENCLAVE, ``debug`` = ATTRIBUTES.FLAGS bit 1,
``security_version`` = ISVSVN, ``report`` = an :class:`~attestation.intel.verify.VerifiedQuote`
(the parsed :class:`~attestation.sgx.abi.SgxQuote`, the PCK CA kind and extensions, and the TCB
outcome with ``collateral_expired``). ``collateral`` lists the CRLs, TCB Info and QE Identity used
(with their ages at ``inputs.now``), ``collateral_missing`` what a full TCB judgement lacked (TCB
Info / QE Identity, the PCK CRL, the Root CA CRL), ``tcb_evaluated`` is True when nothing was
missing; the policy judges them (:mod:`attestation.collateral_rules`).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

from attestation.claims import CertSummary
from attestation.claims import CollateralUse
from attestation.intel.verify import TcbOutcome, VerifiedQuote, collateral_report, evaluate_tcb, verify_ecdsa_quote
from attestation.platforms import VerificationInputs, Verified

from .abi import SgxQuote, parse_quote

__all__ = ["verify_quote", "verified_from"]

PLATFORM = "sgx"


def verify_quote(evidence: bytes, inputs: VerificationInputs) -> Verified:
    """Parse and authenticate an SGX quote. Raises EvidenceMalformed or EvidenceInvalid."""
    quote = parse_quote(evidence)
    result = verify_ecdsa_quote(platform=PLATFORM, header=quote.header, signed_region=quote.signed_region,
                                sig=quote.signature_data, inputs=inputs)
    tcb = evaluate_tcb(PLATFORM, inputs, result, quote.signature_data.qe_report)
    report = VerifiedQuote(quote, result.pck_ca, result.pck_extensions, tcb)
    uses, missing = collateral_report(inputs, result, tcb)
    return verified_from(quote, chain=result.chain, fmspc=result.fmspc, tcb=tcb, report=report,
                         collateral=uses, collateral_missing=missing)


def verified_from(quote: SgxQuote, *, chain: Sequence[CertSummary], fmspc: bytes, tcb: TcbOutcome | None,
                  report: VerifiedQuote, collateral: Sequence[CollateralUse] = (),
                  collateral_missing: Sequence[str] = ("Intel collateral",)) -> Verified:
    body = quote.body
    claims = {
        "mrenclave": body.mrenclave,
        "mrsigner": body.mrsigner,
        "isvprodid": body.isvprodid,
        "isvsvn": body.isvsvn,
        "attributes_flags": body.attributes_flags,
        "attributes_xfrm": body.attributes_xfrm,
        "miscselect": body.miscselect,
        "cpusvn": body.cpusvn,
        "config_svn": body.config_svn,
        "report_data": body.report_data,
        "qe_svn": quote.header.qe_svn,
        "pce_svn": quote.header.pce_svn,
        "fmspc": fmspc,
    }
    return Verified(
        platform=PLATFORM,
        measurement=body.mrenclave,
        report_data=body.report_data,
        debug=body.debug,
        claims=MappingProxyType(claims),
        chain=tuple(chain),
        trailing_bytes=quote.trailing_bytes,
        security_version=body.isvsvn,
        tcb_status=None if tcb is None else tcb.status,
        advisory_ids=() if tcb is None else tuple(tcb.advisory_ids),
        report=report,
        collateral=tuple(collateral),
        collateral_missing=tuple(collateral_missing),
        tcb_evaluated=not collateral_missing,
    )
