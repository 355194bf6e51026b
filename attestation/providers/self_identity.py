"""What this worker's own TEE is, from a source the host cannot substitute, as a policy table.

A worker on a real TEE admits to its pool exactly the identity it has itself
(enclave_worker.platform). :func:`self_identity` finds that identity once at start and returns
the ``[platform]`` policy table that pins it, with the worker's own evidence so the caller can
check that it passes (a worker that would refuse a copy of itself should say so).

Where the identity comes from matters. On SGX and TDX the *quote* is made outside the TEE: by
the host's quoting enclave (SGX, through AESM) or quote generation service (TDX, from a TDREPORT
passed in shared memory). A host that also runs a TEE of its own, with code of its choosing,
could hand the worker that TEE's perfectly genuine quote over the same report data; a worker
that took its pins from it would then admit the host's TEE and hand it the pool key. So:

======== ========================================================== ============================
platform identity from (the host cannot forge or substitute it)      pinned ([platform] table)
======== ========================================================== ============================
sgx      EREPORT of the enclave about itself, via Gramine's          mrenclave, mrsigner,
         /dev/attestation/report (:meth:`GramineSgxProvider.         isvprodid, min_isvsvn = own
         local_report`)                                              ISVSVN
tdx      TDREPORT from TDG.MR.REPORT, /dev/tdx_guest                 mrtd, rtmr0-3, mrconfigid,
         (:mod:`.tdx_guest`)                                         mrowner, mrownerconfig,
                                                                     td_attributes
snp      the attestation report itself: the AMD secure processor     measurement, vmpl (+ the ID
         returns it over the guest's VMPCK-encrypted channel         block's id_key_digest and
                                                                     author_key_digest if set)
nitro    the attestation document from the NSM, a device inside      pcr0, pcr1, pcr2 (+ pcr8 for
         the enclave                                                 signed images)
======== ========================================================== ============================

Every table sets ``debug_allowed = false`` (SNP also ``migration_agent_allowed = false``): a
debug TEE is never admitted, not even a copy of a debug worker. On SGX and TDX the quote is
still requested once here and must describe the same enclave/TD as the local report
(:class:`EvidenceMismatch` otherwise: only a host substituting quotes produces that).

Collateral (:func:`join_table`): on SGX, TDX and SEV-SNP the table leaves the platform's
``require_collateral`` default (true: a peer's TCB must be judged against collateral) when the
worker verifies peers with collateral (``enclaveq worker --collateral DIR``), and sets
``require_collateral = false`` explicitly when it has none, so that a pool without collateral
still forms (the worker warns that peers' TCB is not evaluated).

Report data: SHA-512 of a label and 32 fresh random bytes, so this evidence answers nothing a
producer or a peer could ask.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable, Mapping

from attestation.errors import EvidenceMalformed

from .binding import REPORT_DATA_SIZE
from .errors import EvidenceMismatch, ProviderFailed, ProviderNotSupported, ProviderUnavailable
from .fileops import FileOps

__all__ = ["COLLATERAL_PLATFORMS", "SELF_IDENTITY_LABEL", "SelfIdentity", "join_table", "self_identity"]

SELF_IDENTITY_LABEL = b"enclaveq/self-identity/v1"
# Platforms whose TCB is judged with collateral (Intel PCS, AMD KDS); their tables know
# require_collateral.
COLLATERAL_PLATFORMS = ("sgx", "tdx", "snp")


@dataclass(frozen=True)
class SelfIdentity:
    """This TEE's identity: the ``[platform]`` policy table pinning it, and its own evidence."""

    platform: str
    table: Mapping[str, Any]     # the [platform] policy table (TOML form) that admits exactly this TEE
    evidence: bytes              # this TEE's evidence over report_data, as peers will see it
    report_data: bytes
    debug: bool
    source: str                  # where the pinned identity was read, for the log
    vmpl: int | None = None      # SEV-SNP: the VMPL this guest's reports are requested at
    details: Mapping[str, str] = field(default_factory=dict)   # the pinned values, hex, for the log


def join_table(identity: SelfIdentity, *, collateral: bool) -> dict[str, Any]:
    """The ``[platform]`` table of the join policy: ``identity.table``, and, on a platform judged
    with collateral when the worker has none, ``require_collateral = false`` (module docstring)."""
    table = dict(identity.table)
    if not collateral and identity.platform in COLLATERAL_PLATFORMS:
        table["require_collateral"] = False
    return table


def _report_data(rng: Callable[[int], bytes]) -> bytes:
    return hashlib.sha512(SELF_IDENTITY_LABEL + rng(32)).digest()


def _hex(value: bytes) -> str:
    return bytes(value).hex()


def _mismatch(platform: str, what: str, pairs: Mapping[str, tuple[bytes | int, bytes | int]]) -> None:
    differ = [name for name, (local, quoted) in pairs.items() if local != quoted]
    if differ:
        raise EvidenceMismatch(
            f"the {platform.upper()} quote from the host's quoting service is not of this {what}: "
            f"{', '.join(differ)} differ from the {what}'s own report. The host is substituting "
            "quotes; refusing to derive a join policy (or attest) from them")


def _snp(provider: Any, report_data: bytes) -> SelfIdentity:
    from attestation.snp.abi import parse_report

    evidence = provider.evidence(report_data)
    try:
        report = parse_report(evidence)
    except EvidenceMalformed as exc:
        raise ProviderFailed(f"this guest's own SEV-SNP report does not parse: {exc}") from None
    if report.report_data != report_data:
        raise ProviderFailed("this guest's own SEV-SNP report carries other report data than requested")
    table: dict[str, Any] = {"measurement": [_hex(report.measurement)], "vmpl": [report.vmpl],
                             "debug_allowed": False, "migration_agent_allowed": False}
    for key in ("id_key_digest", "author_key_digest"):
        value = getattr(report, key)
        if any(value):
            table[key] = [_hex(value)]
    details = {"measurement": _hex(report.measurement), "vmpl": str(report.vmpl),
               "policy": hex(report.policy.raw)}
    return SelfIdentity("snp", table, evidence, report_data, report.policy.debug,
                        "the SEV-SNP attestation report (AMD secure processor)", vmpl=report.vmpl, details=details)


_TD_FIELDS = ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mrconfigid", "mrowner", "mrownerconfig")


def _tdx(provider: Any, report_data: bytes, root: Path, ops: FileOps | None) -> SelfIdentity:
    from attestation.tdx.abi import parse_quote

    from .tdx_guest import tdx_report

    local = tdx_report(report_data, root=root, ops=ops)
    evidence = provider.evidence(report_data)
    try:
        body = parse_quote(evidence).body
    except EvidenceMalformed as exc:
        raise ProviderFailed(f"this TD's own quote does not parse: {exc}") from None
    pairs = {name: (getattr(local, name), getattr(body, name)) for name in _TD_FIELDS}
    pairs.update(td_attributes=(local.attributes, body.td_attributes), xfam=(local.xfam, body.xfam),
                 report_data=(local.report_data, body.report_data))
    _mismatch("tdx", "TD", pairs)
    table: dict[str, Any] = {name: [_hex(getattr(local, name))] for name in _TD_FIELDS}
    table.update(td_attributes=_hex(local.attributes), debug_allowed=False)
    details = {name: _hex(getattr(local, name)) for name in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3")}
    return SelfIdentity("tdx", table, evidence, report_data, local.debug,
                        "the TDREPORT (TDG.MR.REPORT via /dev/tdx_guest)", details=details)


def _sgx(provider: Any, report_data: bytes) -> SelfIdentity:
    from attestation.intel.abi import REPORT_BODY_SIZE, parse_report_body
    from attestation.sgx.abi import parse_quote

    local_report = getattr(provider, "local_report", None)
    if local_report is None:
        raise ProviderUnavailable(f"{type(provider).__name__} gives no local SGX report")
    try:
        local = parse_report_body(local_report(report_data)[:REPORT_BODY_SIZE])
    except EvidenceMalformed as exc:
        raise ProviderFailed(f"this enclave's local SGX report does not parse: {exc}") from None
    evidence = provider.evidence(report_data)
    try:
        body = parse_quote(evidence).body
    except EvidenceMalformed as exc:
        raise ProviderFailed(f"this enclave's own quote does not parse: {exc}") from None
    pairs = {name: (getattr(local, name), getattr(body, name))
             for name in ("mrenclave", "mrsigner", "isvprodid", "isvsvn", "attributes", "miscselect", "config_id",
                          "report_data")}
    _mismatch("sgx", "enclave", pairs)
    table = {"mrenclave": [_hex(local.mrenclave)], "mrsigner": [_hex(local.mrsigner)],
             "isvprodid": [local.isvprodid], "min_isvsvn": local.isvsvn, "debug_allowed": False}
    details = {"mrenclave": _hex(local.mrenclave), "mrsigner": _hex(local.mrsigner),
               "isvprodid": str(local.isvprodid), "isvsvn": str(local.isvsvn)}
    return SelfIdentity("sgx", table, evidence, report_data, local.debug,
                        "the enclave's own SGX report (EREPORT via Gramine)", details=details)


def _nitro(provider: Any, report_data: bytes) -> SelfIdentity:
    from attestation.nitro.abi import parse_evidence
    from attestation.nitro.verify import is_debug

    evidence = provider.evidence(report_data)
    try:
        doc = parse_evidence(evidence).document
    except EvidenceMalformed as exc:
        raise ProviderFailed(f"this enclave's own Nitro attestation document does not parse: {exc}") from None
    if (doc.user_data or b"") != report_data:
        raise ProviderFailed("this enclave's own Nitro attestation document carries other user_data than requested")
    table: dict[str, Any] = {}
    for index in (0, 1, 2, 8):
        value = doc.pcrs.get(index)
        if value is not None and (index != 8 or any(value)):
            table[f"pcr{index}"] = [_hex(value)]
    if not any(key in table for key in ("pcr0", "pcr1", "pcr2")):
        raise ProviderFailed("this enclave's own Nitro attestation document has no PCR0-2")
    table["debug_allowed"] = False
    details: dict[str, str] = {key: table[key][0] for key in ("pcr0", "pcr1", "pcr2") if key in table}
    return SelfIdentity("nitro", table, evidence, report_data, is_debug(doc.pcrs),
                        "the Nitro attestation document (NSM)", details=details)


def self_identity(provider: Any, *, root: Path = Path("/"), ops: FileOps | None = None,
                  rng: Callable[[int], bytes] = os.urandom) -> SelfIdentity:
    """This TEE's identity and evidence (see the module docstring), for ``provider.platform``.

    :class:`ProviderUnavailable` when the trustworthy source is missing (no /dev/tdx_guest, a
    Gramine without local reports), :class:`EvidenceMismatch` when the quote is of another TEE,
    other :class:`ProviderError` when the TEE refuses.
    """
    report_data = _report_data(rng)
    assert len(report_data) == REPORT_DATA_SIZE
    platform = getattr(provider, "platform", None)
    if platform == "snp":
        return _snp(provider, report_data)
    if platform == "tdx":
        return _tdx(provider, report_data, Path(root), ops)
    if platform == "sgx":
        return _sgx(provider, report_data)
    if platform == "nitro":
        return _nitro(provider, report_data)
    raise ProviderNotSupported(f"no self-identity for platform {platform!r}")
