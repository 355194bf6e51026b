"""Authenticity of an SEV-SNP attestation report: signature, AMD chain, TCB and chip binding.

Input: report bytes (the 1184-byte report, possibly followed by unsigned bytes) and
:class:`~attestation.platforms.VerificationInputs`. Output: :class:`~attestation.platforms.Verified`,
or :class:`EvidenceMalformed` (the bytes are not a report) / :class:`EvidenceInvalid` (the first
authenticity failure, naming it). No policy judgement here (that is
:mod:`attestation.snp.validate`).

Checks, in order:

1. parse (:mod:`attestation.snp.abi`); SIGNING_KEY must be VCEK or VLEK (an unsigned report
   cannot be authenticated);
2. pick the endorsement key certificate (VCEK for SIGNING_KEY 0, VLEK for 1), its issuer (ASK
   resp. ASVK) and the ARK out of ``inputs.extra_certs`` -- and, after them, out of a GHCB
   certificate table appended to the report, if the trailing bytes are one -- by role (key
   type, AMD extensions, issuer/subject names). A VCEK/VLEK of another product line than the
   report's signed CPUID (v3+) is refused here. An ASK/ASVK or ARK the user's certificates do not
   give comes from AMD's built-in chain for the VCEK/VLEK's product
   (:func:`attestation.trust.amd.bundled_chain`), used only if its ARK is pinned in
   ``inputs.trust`` and the user gave no chain certificates of another product line; given
   certificates always come first, so a wrong given ASK is used, and refused, never replaced. A
   missing VCEK/VLEK (or a chain nothing completes) is an ``EvidenceInvalid`` that says which
   certificate to pass with ``--cert``; only if ``inputs.fetcher`` is given
   (:class:`~attestation.snp.kds.KdsFetcher`) are a missing VCEK and ASK/ARK fetched from AMD KDS;
3. the chain: the ARK's SHA-256 fingerprint is pinned (``inputs.trust.for_platform("snp")``),
   ARK and ASK/ASVK are CAs, every signature is RSASSA-PSS/SHA-384/MGF1-SHA-384/salt 48 by an
   RSA-4096 key (checked strictly here), then :func:`attestation.chain.verify_chain` (pin,
   signatures, validity of every certificate at ``inputs.now``, CRLs from
   ``inputs.collateral["crls"]``); the CRLs consulted are reported (``Verified.collateral``, with
   their ages) and, when none was issued by the chain's ARK, so is that revocation could not be
   checked (``Verified.collateral_missing``): the policy judges both
   (:mod:`attestation.collateral_rules`), nothing about freshness is decided or cached here;
4. the product line (Milan, Genoa, Turin): the VCEK/VLEK productName, the ASK/ASVK and ARK
   names, the product a genuine ARK fingerprint belongs to, and (v3+) the report's signed
   CPUID family/model must all agree;
5. REPORTED_TCB equals the TCB in the VCEK/VLEK SPL extensions (every byte, including the
   reserved SPLs and, on Turin, FMC); for a VCEK, CHIP_ID equals the hwID extension (8 bytes on
   Turin) unless MASK_CHIP_KEY is set, in which case CHIP_ID must be zero;
6. the report signature: ECDSA P-384 with SHA-384 over bytes [0, 0x2A0), R and S little-endian,
   by the VCEK/VLEK key.

Caches (warm path): certificate classification and extension parsing per certificate, and the
result of steps 3's signature/pin/CRL checks per (certificates, pinned roots, CRLs), valid for
the intersection of the certificates' validity periods; a ``now`` outside it re-runs the checks.
The cached result includes which CRLs were consulted (the CRLs are part of the key), not their freshness.
The report signature is checked every time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from attestation.chain import common_name, crl_use, verify_chain_crls
from attestation.claims import CertSummary, CollateralUse
from attestation.errors import AttestationError, EvidenceInvalid, EvidenceMalformed
from attestation.platforms import VerificationInputs, Verified
from attestation.snp import kds
from attestation.snp.abi import (
    PRODUCTS,
    REPORT_SIZE,
    SIGNING_KEY_NONE,
    AttestationReport,
    TcbParts,
    decode_tcb,
    parse_report,
)
from attestation.snp.kds import (
    BoundedCache,
    CertInfo,
    cert_chain_url,
    cert_info,
    crl_url,
    certificates_from_table,
    load_certificates,
    vcek_url,
    verify_amd_signature,
)
from attestation.trust.amd import PRODUCT_OF_ARK, BundledChainError, bundled_chain

__all__ = ["PLATFORM_NAME", "CLAIM_KEYS", "SnpEvidence", "verify_report", "clear_caches"]

PLATFORM_NAME = "snp"
CLAIM_KEYS = ("version", "guest_svn", "policy", "measurement", "host_data", "id_key_digest",
              "author_key_digest", "report_data", "chip_id", "reported_tcb", "vmpl", "signing_key", "product")
_P384_ORDER = int("ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf"
                  "581a0db248b0a77aecec196accc52973", 16)
_LEAF_NAME = {"vcek": "VCEK", "vlek": "VLEK"}
_ISSUER_NAME = {"vcek": "ASK", "vlek": "ASVK"}


@dataclass(frozen=True)
class SnpEvidence:
    """What :attr:`Verified.report` holds for SEV-SNP: the parsed report and what the chain said."""

    report: AttestationReport
    product: str
    reported_tcb: TcbParts
    signing_key: str                     # "vcek" or "vlek"
    product_name: str                    # the VCEK/VLEK productName, e.g. "Milan-B0"
    csp_id: str | None = None            # VLEK only


@dataclass(frozen=True)
class _ChainResult:
    not_before: datetime
    not_after: datetime
    summaries: tuple[CertSummary, ...]
    # Which of the given CRLs (indexes: the cache key holds the CRLs in order) were consulted. Their
    # freshness is judged by the policy at each verification's own time, never cached.
    crls_used: tuple[int, ...] = ()


_CHAIN_CACHE: BoundedCache[tuple, _ChainResult] = BoundedCache(64)


def clear_caches() -> None:
    """Forget cached chain results and certificate classifications (tests, key rotation)."""
    _CHAIN_CACHE.clear()
    kds._INFO_CACHE.clear()


def _subject(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string()
    except Exception:  # noqa: BLE001
        return "<unprintable subject>"


def _fingerprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


# --------------------------------------------------------------------------------------------
# Picking certificates by role


def _classified(certs: Iterable[Any]) -> list[CertInfo]:
    infos: list[CertInfo] = []
    seen: set[x509.Certificate] = set()
    for cert in certs:
        if not isinstance(cert, x509.Certificate):
            raise EvidenceMalformed(f"extra certificates must be x509.Certificate objects, not {type(cert).__name__}")
        if cert in seen:
            continue
        seen.add(cert)
        infos.append(cert_info(cert))
    return infos


def _ignored_note(infos: Sequence[CertInfo]) -> str:
    odd = [f"{i.subject!r} ({i.problem})" for i in infos if i.role == "other"]
    return f" Ignored certificate(s): {'; '.join(odd)}." if odd else ""


def _chip_matches(info: CertInfo, report: AttestationReport) -> bool:
    hwid = info.extensions.hwid if info.extensions else None
    if hwid is None:
        return False
    return hwid == (report.chip_id if len(hwid) == len(report.chip_id) else report.chip_id[:len(hwid)])


def _tcb_matches(info: CertInfo, report: AttestationReport) -> bool:
    product = info.product
    if product is None or info.extensions is None:
        return False
    return info.extensions.tcb(product).raw == report.reported_tcb


def _pick_leaf(infos: Sequence[CertInfo], report: AttestationReport, kind: str) -> CertInfo | None:
    candidates = [i for i in infos if i.role == kind]
    if len(candidates) > 1 and kind == "vcek" and not report.signer_info.mask_chip_key:
        candidates = [i for i in candidates if _chip_matches(i, report)] or candidates
    if len(candidates) > 1:
        candidates = [i for i in candidates if _tcb_matches(i, report)] or candidates
    return candidates[0] if candidates else None


def _product_hint(report: AttestationReport, infos: Sequence[CertInfo]) -> list[str]:
    """Products worth trying when fetching a VCEK: the CPUID's, else the chain's, else all."""
    if report.cpuid_product is not None:
        return [report.cpuid_product]
    named = [i.product for i in infos if i.role in ("intermediate", "ark") and i.product]
    return list(dict.fromkeys(named)) or list(PRODUCTS)


def _fetch(fetcher: Any, url: str) -> list[CertInfo]:
    getter = getattr(fetcher, "get", None)
    if not callable(getter):
        raise EvidenceInvalid("inputs.fetcher has no get(url) method (see attestation.snp.kds.KdsFetcher)")
    try:
        data = getter(url)
    except Exception as exc:  # noqa: BLE001 - the fetcher's errors are its own; report them typed
        raise EvidenceInvalid(f"fetching {url} failed: {type(exc).__name__}: {exc}") from None
    try:
        certs = load_certificates(data)
    except EvidenceMalformed as exc:
        raise EvidenceInvalid(f"{url} did not return a certificate: {exc}") from None
    return _classified(certs)


def _find_leaf(infos: list[CertInfo], report: AttestationReport, kind: str, fetcher: Any) -> CertInfo:
    leaf = _pick_leaf(infos, report, kind)
    if leaf is not None:
        return leaf
    name = _LEAF_NAME[kind]
    if kind == "vcek" and fetcher is not None:
        if report.signer_info.mask_chip_key:
            raise EvidenceInvalid("the report's CHIP_ID is masked (MASK_CHIP_KEY), so its VCEK cannot be looked up "
                                  "at AMD KDS: pass the VCEK with --cert FILE")
        errors = []
        for product in _product_hint(report, infos):
            url = vcek_url(product, report.chip_id, decode_tcb(report.reported_tcb, product))
            try:
                infos.extend(_fetch(fetcher, url))
            except EvidenceInvalid as exc:
                errors.append(str(exc))
                continue
            leaf = _pick_leaf(infos, report, kind)
            if leaf is not None:
                return leaf
        raise EvidenceInvalid(f"no VCEK could be fetched for this report: {'; '.join(errors) or 'no VCEK returned'}")
    where = ""
    if kind == "vcek" and report.cpuid_product is not None and not report.signer_info.mask_chip_key:
        product = report.cpuid_product
        where = f" (AMD KDS serves it at {vcek_url(product, report.chip_id, decode_tcb(report.reported_tcb, product))})"
    hint = (" A VLEK comes from the cloud provider (AMD KDS serves VLEKs only to it)." if kind == "vlek" else
            " A VCEK comes with the host's extended report (/dev/sev-guest, configfs-tsm auxblob) or from AMD KDS.")
    raise EvidenceInvalid(
        f"the SEV-SNP report is signed by a {name} (SIGNING_KEY {report.signer_info.signing_key}) but no {name} "
        f"certificate was given: pass it with --cert FILE (DER or PEM){where}.{hint}{_ignored_note(infos)}"
    )


def _given_issuers(infos: Sequence[CertInfo], leaf: CertInfo) -> tuple[CertInfo | None, CertInfo | None]:
    inter = next((i for i in infos if i.role == "intermediate" and i.cert.subject == leaf.cert.issuer), None)
    ark = None
    if inter is not None:
        ark = next((i for i in infos if i.role == "ark" and i.cert.subject == inter.cert.issuer), None)
    return inter, ark


def _builtin_issuers(infos: Sequence[CertInfo], leaf: CertInfo, kind: str,
                     trusted: frozenset[bytes]) -> tuple[CertInfo, CertInfo] | None:
    """Complete the leaf's chain from the given certificates, then AMD's built-in chain.

    None if there is no built-in chain for the leaf's product, its ARK is not pinned in
    ``trusted`` (tests with a fake AMD, or a user who pins other roots) or its intermediate is not
    the leaf's issuer by name; then the caller asks the fetcher or names what to pass.
    """
    if leaf.product is None:
        return None
    try:
        builtin = bundled_chain(leaf.product, kind)
    except BundledChainError as exc:
        raise EvidenceInvalid(f"AMD's built-in {leaf.product} {_ISSUER_NAME[kind]}/ARK chain cannot be used: {exc}. "
                              "Reinstall enclaveq, or pass the chain with --cert FILE") from None
    if builtin is None or _fingerprint(builtin.ark) not in trusted or builtin.intermediate.subject != leaf.cert.issuer:
        return None
    given_inter, given_ark = _given_issuers(infos, leaf)
    inter = given_inter or cert_info(builtin.intermediate)
    ark = given_ark or cert_info(builtin.ark)
    if inter.cert.issuer != ark.cert.subject:
        return None
    _refuse_stray_chain_certs(infos, leaf, kind, (inter.cert, ark.cert))
    return inter, ark


def _refuse_stray_chain_certs(infos: Sequence[CertInfo], leaf: CertInfo, kind: str,
                              used: tuple[x509.Certificate, ...]) -> None:
    """Fail closed on given certificates the built-in chain makes unnecessary but that are not AMD's.

    With a complete given chain, extra certificates never matter (the chain is checked). Once the
    built-in chain fills a gap, a given ASK/ARK that is not the leaf's (damaged, another product
    line's, a look-alike) would otherwise be silently set aside; it is refused instead. Copies of
    AMD's own certificates for this product (e.g. the ASVK in a file that also holds the ASK) pass.
    """
    assert leaf.product is not None
    genuine = set(used)
    for other_kind in _LEAF_NAME:
        chain = bundled_chain(leaf.product, other_kind)
        if chain is not None:
            genuine.update((chain.intermediate, chain.ark))
    stray = [i for i in infos if i.role in ("intermediate", "ark", "other") and i.cert not in genuine]
    if not stray:
        return
    name = leaf.extensions.product_name if leaf.extensions else "?"
    foreign = sorted({str(i.product) for i in stray if i.product not in (None, leaf.product)})
    what = (f"the certificate chain given is for {', '.join(foreign)}" if foreign
            else f"certificate(s) given with the {_LEAF_NAME[kind]} are not its chain")
    details = "; ".join(f"{i.subject!r}" + (f" ({i.problem})" if i.problem else "") for i in stray)
    raise EvidenceInvalid(
        f"{what} ({details}) but the {_LEAF_NAME[kind]} is for {leaf.product} (productName {name!r}): pass the "
        f"{_LEAF_NAME[kind]}'s own chain, or none (AMD's {leaf.product} chain is built in)"
    )


def _find_issuers(infos: list[CertInfo], leaf: CertInfo, kind: str, fetcher: Any,
                  trusted: frozenset[bytes]) -> tuple[CertInfo, CertInfo]:
    for attempt in range(2):
        inter, ark = _given_issuers(infos, leaf)
        if inter is not None and ark is not None:
            return inter, ark
        if attempt == 0:
            builtin = _builtin_issuers(infos, leaf, kind, trusted)
            if builtin is not None:
                return builtin
            if fetcher is not None and leaf.product is not None:
                infos.extend(_fetch(fetcher, cert_chain_url(leaf.product, kind)))
                continue
        break
    product = leaf.product or "<product>"
    missing = (f"its issuer {_ISSUER_NAME[kind]} ({_subject_of_issuer(leaf.cert)!r})" if inter is None
               else f"the ARK ({_subject_of_issuer(inter.cert)!r})")
    builtin_note = (f" (enclaveq has AMD's chains for {', '.join(PRODUCTS)} built in, but none pinned in the trust "
                    f"anchors names {_subject_of_issuer(leaf.cert)!r} as the {_ISSUER_NAME[kind]})"
                    if inter is None else "")
    raise EvidenceInvalid(
        f"the {_LEAF_NAME[kind]} certificate's chain is incomplete: {missing} was not given{builtin_note}. Pass "
        f"AMD's certificate chain with --cert FILE (PEM, {_ISSUER_NAME[kind]} and ARK, from "
        f"{cert_chain_url(product, kind)}).{_ignored_note(infos)}"
    )


def _check_report_product(report: AttestationReport, leaf: CertInfo, kind: str) -> None:
    """Refuse a VCEK/VLEK of another product line than the report's signed CPUID says (v3+)."""
    reported = report.cpuid_product
    if reported is None or leaf.product is None or leaf.product == reported:
        return
    name = leaf.extensions.product_name if leaf.extensions else "?"
    raise EvidenceInvalid(
        f"the {_LEAF_NAME[kind]} is of another product line than the report: it is for {leaf.product} "
        f"(productName {name!r}) but the report CPUID family 0x{report.cpuid_fam_id or 0:x} model "
        f"0x{report.cpuid_mod_id or 0:x} says {reported}: pass the {_LEAF_NAME[kind]} of the chip that signed the report"
    )


def _subject_of_issuer(cert: x509.Certificate) -> str:
    try:
        return cert.issuer.rfc4514_string()
    except Exception:  # noqa: BLE001
        return "<unprintable issuer>"


# --------------------------------------------------------------------------------------------
# The chain


def _check_ca(cert: x509.Certificate, role: str) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        ca = constraints.ca
    except x509.ExtensionNotFound:
        ca = False
    except Exception as exc:  # noqa: BLE001 - malformed extensions
        raise EvidenceInvalid(f"{role} certificate {_subject(cert)!r} has unreadable extensions: {exc}") from None
    if not ca:
        raise EvidenceInvalid(f"{role} certificate {_subject(cert)!r} is not a CA (basicConstraints cA is not true)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    except Exception as exc:  # noqa: BLE001
        raise EvidenceInvalid(f"{role} certificate {_subject(cert)!r} has unreadable extensions: {exc}") from None
    if not usage.key_cert_sign:
        raise EvidenceInvalid(f"{role} certificate {_subject(cert)!r} may not sign certificates (keyUsage)")


def _crl_key(crls: Sequence[x509.CertificateRevocationList]) -> tuple[bytes, ...]:
    keys = []
    for crl in crls:
        try:
            keys.append(hashlib.sha256(crl.public_bytes(serialization.Encoding.DER)).digest())
        except Exception as exc:  # noqa: BLE001
            raise EvidenceMalformed(f"collateral 'crls' holds something that is not a CRL ({type(exc).__name__})") from None
    return tuple(keys)


def _verify_amd_chain(leaf: CertInfo, inter: CertInfo, ark: CertInfo, kind: str, *, now: datetime,
                      trusted: frozenset[bytes], crls: Sequence[x509.CertificateRevocationList]
                      ) -> tuple[tuple[CertSummary, ...], tuple[x509.CertificateRevocationList, ...]]:
    """The chain's summaries and the CRLs consulted for it (issued by the ARK or the ASK/ASVK)."""
    key = (leaf.cert, inter.cert, ark.cert, trusted, _crl_key(crls))
    hit = _CHAIN_CACHE.get(key)
    if hit is not None and hit.not_before <= now <= hit.not_after:
        return hit.summaries, tuple(crls[i] for i in hit.crls_used)
    if not trusted:
        raise EvidenceInvalid("no SEV-SNP root is pinned in the trust anchors (trust.for_platform('snp') is empty)")
    if _fingerprint(ark.cert) not in trusted:
        raise EvidenceInvalid(f"ARK {ark.subject!r} (SHA-256 {_fingerprint(ark.cert).hex()}) is not a pinned AMD root")
    _check_ca(ark.cert, "ARK")
    _check_ca(inter.cert, _ISSUER_NAME[kind])
    verify_amd_signature(ark.cert, ark.cert, "ARK")
    verify_amd_signature(inter.cert, ark.cert, _ISSUER_NAME[kind])
    verify_amd_signature(leaf.cert, inter.cert, _LEAF_NAME[kind])
    try:
        summaries, consulted = verify_chain_crls([leaf.cert, inter.cert, ark.cert], now=now, trusted_roots=trusted,
                                                 crls=crls)
    except AttestationError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. UnsupportedAlgorithm from a damaged certificate's
        # declared signature parameters, which attestation.chain does not map
        raise EvidenceInvalid(f"the AMD certificate chain does not verify: {type(exc).__name__}: {exc}") from None
    certs = (leaf.cert, inter.cert, ark.cert)
    _CHAIN_CACHE.put(key, _ChainResult(
        not_before=max(c.not_valid_before_utc for c in certs),
        not_after=min(c.not_valid_after_utc for c in certs),
        summaries=summaries,
        crls_used=tuple(i for i, crl in enumerate(crls) if any(crl is used for used in consulted)),
    ))
    return summaries, consulted


def _collateral(crls: Sequence[x509.CertificateRevocationList], ark: CertInfo, product: str, kind: str,
                now: datetime) -> tuple[tuple[CollateralUse, ...], tuple[str, ...]]:
    """The CRLs used (with their ages at ``now``) and what revocation checking lacked: AMD KDS's CRL
    issued by the chain's ARK (it lists revoked ASKs and ASVKs). Judged by the policy."""
    uses = tuple(crl_use(crl, now) for crl in crls)
    if any(crl.issuer == ark.cert.subject for crl in crls):
        return uses, ()
    return uses, (f"the CRL issued by {common_name(ark.cert.subject)!r} (AMD KDS {crl_url(product, kind)})",)


# --------------------------------------------------------------------------------------------
# Product, TCB, chip


def _product(report: AttestationReport, leaf: CertInfo, inter: CertInfo, ark: CertInfo, kind: str) -> str:
    exts = leaf.extensions
    assert exts is not None
    if leaf.product is None:
        raise EvidenceInvalid(f"{_LEAF_NAME[kind]} productName {exts.product_name!r} is not a supported product line "
                              f"({', '.join(PRODUCTS)})")
    sources = {f"{_LEAF_NAME[kind]} productName {exts.product_name!r}": leaf.product}
    if inter.product is not None:
        sources[f"{_ISSUER_NAME[kind]} {inter.subject!r}"] = inter.product
    pinned = PRODUCT_OF_ARK.get(_fingerprint(ark.cert))
    if pinned is not None:
        sources["pinned AMD ARK"] = pinned
    elif ark.product is not None:
        sources[f"ARK {ark.subject!r}"] = ark.product
    if report.cpuid_fam_id is not None and (report.cpuid_fam_id or report.cpuid_mod_id):
        cpuid = report.cpuid_product
        if cpuid is None:
            raise EvidenceInvalid(f"the report's CPUID family 0x{report.cpuid_fam_id:x} model 0x{report.cpuid_mod_id:x} "
                                  f"is not a supported product line ({', '.join(PRODUCTS)})")
        sources[f"report CPUID family 0x{report.cpuid_fam_id:x} model 0x{report.cpuid_mod_id:x}"] = cpuid
    if len(set(sources.values())) != 1:
        raise EvidenceInvalid("the product line is inconsistent: " + ", ".join(f"{k} says {v}" for k, v in sources.items()))
    return leaf.product


def _check_tcb(report: AttestationReport, leaf: CertInfo, product: str, kind: str) -> TcbParts:
    reported = decode_tcb(report.reported_tcb, product)
    assert leaf.extensions is not None
    certified = leaf.extensions.tcb(product)
    if reported.raw != certified.raw:
        ours, theirs = reported.as_dict(), certified.as_dict()
        diffs = [f"{name} {ours[name]} vs {theirs[name]}" for name in ours if ours[name] != theirs[name]]
        if reported.reserved != certified.reserved:
            diffs.append(f"reserved SPLs {list(reported.reserved)} vs {list(certified.reserved)}")
        raise EvidenceInvalid(
            f"the report's REPORTED_TCB (0x{report.reported_tcb:016x}) is not the TCB the {_LEAF_NAME[kind]} was "
            f"issued for (0x{certified.raw:016x}): {', '.join(diffs)} (report vs certificate)"
        )
    return reported


def _check_chip(report: AttestationReport, leaf: CertInfo) -> None:
    if report.signer_info.mask_chip_key:
        if any(report.chip_id):
            raise EvidenceInvalid("MASK_CHIP_KEY is set but the report's CHIP_ID is not zero")
        return
    assert leaf.extensions is not None and leaf.extensions.hwid is not None
    if not _chip_matches(leaf, report):
        raise EvidenceInvalid(
            f"the report's CHIP_ID {report.chip_id.hex()} is not the VCEK's hwID {leaf.extensions.hwid.hex()}: "
            "the VCEK belongs to another chip"
        )


def _check_signature(report: AttestationReport, leaf: CertInfo, kind: str) -> None:
    r, s = report.signature_r, report.signature_s
    if not (0 < r < _P384_ORDER and 0 < s < _P384_ORDER):
        raise EvidenceInvalid("the report signature is not a valid ECDSA P-384 signature (R or S out of range)")
    try:
        leaf.public_key.verify(encode_dss_signature(r, s), report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise EvidenceInvalid(f"the report signature does not verify with the {_LEAF_NAME[kind]} key "
                              f"({leaf.subject!r}): the report was altered or signed by another key") from None


# --------------------------------------------------------------------------------------------


def verify_report(evidence: bytes, inputs: VerificationInputs) -> Verified:
    """Parse and authenticate an SEV-SNP report (see the module docstring for every check)."""
    if not isinstance(inputs, VerificationInputs):
        raise TypeError(f"inputs must be VerificationInputs, not {type(inputs).__name__}")
    now = inputs.now
    if now.tzinfo is None:
        raise ValueError("inputs.now must be timezone-aware")
    report = parse_report(evidence)
    if report.signer_info.signing_key == SIGNING_KEY_NONE:
        raise EvidenceInvalid("the SEV-SNP report is not signed (SIGNING_KEY 7 = none): it cannot be authenticated")
    kind = report.signing_key

    # The caller's certificates first, then any in a certificate table after the report (the
    # extended report's / configfs-tsm auxblob appended to it): unsigned bytes, but certificates
    # authenticate themselves through the chain to the pinned ARK.
    table = certificates_from_table(bytes(evidence)[REPORT_SIZE:]) if report.trailing_bytes else ()
    infos = _classified(tuple(inputs.extra_certs) + table)
    leaf = _find_leaf(infos, report, kind, inputs.fetcher)
    _check_report_product(report, leaf, kind)
    trusted = inputs.trust.for_platform(PLATFORM_NAME)
    inter, ark = _find_issuers(infos, leaf, kind, inputs.fetcher, trusted)
    crls = tuple((inputs.collateral or {}).get("crls", ()) or ())
    chain, consulted = _verify_amd_chain(leaf, inter, ark, kind, now=now, trusted=trusted, crls=crls)
    product = _product(report, leaf, inter, ark, kind)
    uses, missing = _collateral(consulted, ark, product, kind, now)
    tcb = _check_tcb(report, leaf, product, kind)
    if kind == "vcek":
        _check_chip(report, leaf)
    _check_signature(report, leaf, kind)

    claims = {
        "version": report.version,
        "guest_svn": report.guest_svn,
        "policy": report.policy.raw,
        "measurement": report.measurement,
        "host_data": report.host_data,
        "id_key_digest": report.id_key_digest,
        "author_key_digest": report.author_key_digest,
        "report_data": report.report_data,
        "chip_id": report.chip_id,
        "reported_tcb": tcb.as_dict(),
        "vmpl": report.vmpl,
        "signing_key": kind,
        "product": product,
    }
    assert leaf.extensions is not None
    return Verified(
        platform=PLATFORM_NAME,
        measurement=report.measurement,
        report_data=report.report_data,
        debug=report.policy.debug,
        claims=claims,
        chain=chain,
        trailing_bytes=report.trailing_bytes,
        security_version=report.guest_svn,
        report=SnpEvidence(report=report, product=product, reported_tcb=tcb, signing_key=kind,
                           product_name=leaf.extensions.product_name, csp_id=leaf.extensions.csp_id),
        collateral=uses,
        collateral_missing=missing,
        tcb_evaluated=not missing,
    )
