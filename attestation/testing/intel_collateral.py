"""The content of Intel collateral for tests: TCB Info and QE Identity values (the JSON that PCS
signs) with chosen levels, statuses, dates and identities. Unsigned: the fake PKI in
:mod:`attestation.testing.intel` signs them (:meth:`FakeIntelPki.tcb_info_document`,
:meth:`FakeIntelPki.qe_identity_document`), or a test signs a value it has altered with
:meth:`FakeIntelPki.sign_document`.

Typical use::

    pki = default_pki()
    body = pki.tcb_info_document(fmspc=bytes(6), levels=[tcb_level("UpToDate", sgx=[2] * 16, pcesvn=10)])
    info = verify_tcb_info(body, pki.issuer_chain_pem(), now=NOW, trust=pki.trust())
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = ["enclave_level", "iso", "qe_identity", "tcb_info", "tcb_level", "tdx_module_identity"]


def iso(when: datetime) -> str:
    """A time as Intel's collateral writes it: UTC, whole seconds, ``Z``."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def tcb_level(status: str, *, sgx: Sequence[int] = (0,) * 16, pcesvn: int = 0,
              tdx: Sequence[int] | None = None, advisories: Sequence[str] = (),
              date: str = "2024-01-01T00:00:00Z", version: int = 3) -> dict[str, Any]:
    """One ``tcbLevels`` entry (TCB Info v3 component arrays, or v2 ``sgxtcbcompNNsvn`` keys)."""
    tcb: dict[str, Any]
    if version == 2:
        tcb = {f"sgxtcbcomp{i + 1:02d}svn": svn for i, svn in enumerate(sgx)}
    else:
        tcb = {"sgxtcbcomponents": [{"svn": svn} for svn in sgx]}
    tcb["pcesvn"] = pcesvn
    if tdx is not None:
        tcb["tdxtcbcomponents"] = [{"svn": svn} for svn in tdx]
    level: dict[str, Any] = {"tcb": tcb, "tcbDate": date, "tcbStatus": status}
    if advisories:
        level["advisoryIDs"] = list(advisories)
    return level


def enclave_level(status: str, isvsvn: int, *, advisories: Sequence[str] = (),
                  date: str = "2024-01-01T00:00:00Z") -> dict[str, Any]:
    """One ``tcbLevels`` entry of an enclave identity (QE Identity, TDX module identity)."""
    level: dict[str, Any] = {"tcb": {"isvsvn": isvsvn}, "tcbDate": date, "tcbStatus": status}
    if advisories:
        level["advisoryIDs"] = list(advisories)
    return level


def tdx_module_identity(version: int, levels: Sequence[dict[str, Any]], *, mrsigner: bytes = bytes(48),
                        attributes: bytes = bytes(8), attributes_mask: bytes = b"\xff" * 8) -> dict[str, Any]:
    """One ``tdxModuleIdentities`` entry (``id`` "TDX_<version>")."""
    return {"id": f"TDX_{version:02X}", "mrsigner": mrsigner.hex().upper(), "attributes": attributes.hex().upper(),
            "attributesMask": attributes_mask.hex().upper(), "tcbLevels": list(levels)}


def tcb_info(*, levels: Sequence[dict[str, Any]], issue_date: datetime, fmspc: bytes = bytes(6),
             tcb_id: str = "SGX", version: int = 3, pce_id: bytes = b"\x00\x00", next_update: datetime | None = None,
             evaluation_number: int = 17, tdx_module: dict[str, Any] | None = None,
             tdx_module_identities: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``tcbInfo`` value (v3 with ``id``, or v2 without); ``nextUpdate`` defaults to 30 days
    after ``issue_date``."""
    info: dict[str, Any] = {}
    if version == 3:
        info["id"] = tcb_id
    info.update({"version": version, "issueDate": iso(issue_date),
                 "nextUpdate": iso(next_update or issue_date + timedelta(days=30)),
                 "fmspc": fmspc.hex(), "pceId": pce_id.hex(), "tcbType": 0,
                 "tcbEvaluationDataNumber": evaluation_number})
    if tcb_id == "TDX":
        info["tdxModule"] = tdx_module or {"mrsigner": "00" * 48, "attributes": "00" * 8, "attributesMask": "FF" * 8}
        if tdx_module_identities is not None:
            info["tdxModuleIdentities"] = list(tdx_module_identities)
    info["tcbLevels"] = list(levels)
    return info


def qe_identity(*, levels: Sequence[dict[str, Any]], issue_date: datetime, qe_id: str = "QE",
                mrsigner: bytes = b"\x8c" * 32, isvprodid: int = 1, miscselect: int = 0,
                miscselect_mask: int = 0xFFFFFFFF,
                attributes: bytes = bytes.fromhex("11000000000000000000000000000000"),
                attributes_mask: bytes = bytes.fromhex("FBFFFFFFFFFFFFFF0000000000000000"),
                next_update: datetime | None = None) -> dict[str, Any]:
    """The ``enclaveIdentity`` value (version 2); ``nextUpdate`` defaults to 30 days after ``issue_date``."""
    return {"id": qe_id, "version": 2, "issueDate": iso(issue_date),
            "nextUpdate": iso(next_update or issue_date + timedelta(days=30)), "tcbEvaluationDataNumber": 17,
            "miscselect": f"{miscselect:08X}", "miscselectMask": f"{miscselect_mask:08X}",
            "attributes": attributes.hex().upper(), "attributesMask": attributes_mask.hex().upper(),
            "mrsigner": mrsigner.hex().upper(), "isvprodid": isvprodid, "tcbLevels": list(levels)}
