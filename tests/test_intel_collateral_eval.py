"""TCB status evaluation: SGX platform levels, TDX platform + TDX module, QE identity, convergence.
Real quotes against the real collateral, and every status through synthetic TCB Info."""

from __future__ import annotations

from dataclasses import replace

from datetime import datetime, UTC
from pathlib import Path

import pytest

from attestation.errors import EvidenceInvalid, EvidenceMalformed
from attestation.intel.collateral import (
    IntelCollateral,
    TcbResult,
    converge_tcb_status,
    evaluate_qe_identity,
    evaluate_sgx_tcb,
    evaluate_tdx_tcb,
    parse_qe_identity,
    parse_tcb_info,
    verify_qe_identity,
    verify_tcb_info,
)
from attestation.intel.pck import PckExtensions, parse_pck_extensions
from attestation.intel.tcb_status import TCB_STATUSES
from attestation.testing.intel import default_pki
from attestation.testing.intel_collateral import enclave_level, tcb_level, tdx_module_identity

from .intel_vectors import vector_quote

UTC = UTC
NOW = datetime(2026, 11, 27, tzinfo=UTC)
IN_2023 = datetime(2023, 6, 20, tzinfo=UTC)
FMSPC = bytes.fromhex("00906ea10000")
COLLATERAL = "tdx/go-tdx-guest/collateral"


def _pck(svn: int | list[int], pcesvn: int, *, fmspc: bytes = FMSPC, pce_id: bytes = b"\0\0") -> PckExtensions:
    comps = tuple(svn) if isinstance(svn, list) else (svn,) * 16
    return PckExtensions(fmspc=fmspc, pce_id=pce_id, cpusvn=bytes(comps), pcesvn=pcesvn, tcb_components=comps,
                         sgx_type=1)


# ------------------------------------------------------------------ the real quotes and collateral


def _real_collateral(vectors_dir: Path) -> IntelCollateral:
    d = vectors_dir / COLLATERAL
    t3 = parse_tcb_info((d / "sample_tcbInfo_response").read_bytes())
    t5 = parse_tcb_info((d / "sample_tcbinfo_response_v5").read_bytes())
    qe = parse_qe_identity((d / "sample_qeIdentity_response").read_bytes())
    return IntelCollateral(tcb_info=t3, qe_identity=qe, tcb_infos=(t3, t5), qe_identities=(qe,))


@pytest.mark.parametrize("relative, tcb_date, qe_isvsvn", [
    ("tdx/trustee/tdx_quote_4.dat", "2023-02-15T00:00:00Z", 4),
    ("tdx/go-tdx-guest/quote_v5_sample.dat", "2024-11-13T00:00:00Z", 7),
])
def test_real_tdx_quotes_are_up_to_date(vectors_dir: Path, relative: str, tcb_date: str, qe_isvsvn: int) -> None:
    """The PCK certificate's TCB, the quote's TEE_TCB_SVN and MRSIGNERSEAM/SEAMATTRIBUTES, and the
    QE report, evaluated against Intel's TCB Info (picked by FMSPC among two) and TD_QE identity."""
    q = vector_quote(vectors_dir, relative)
    coll = _real_collateral(vectors_dir)
    pck = parse_pck_extensions(q.chain[0])
    platform = evaluate_tdx_tcb(coll, pck, q.tee_tcb_svn, IN_2023, mrsignerseam=q.mrsignerseam,
                                seam_attributes=q.seam_attributes)
    assert (platform.status, platform.advisory_ids, platform.tcb_date) == ("UpToDate", (), tcb_date)
    report = q.qe_report
    qe = evaluate_qe_identity(coll, report[128:160], int.from_bytes(report[256:258], "little"),
                              int.from_bytes(report[258:260], "little"), int.from_bytes(report[16:20], "little"),
                              report[48:64], IN_2023, expected_id="TD_QE")
    assert int.from_bytes(report[258:260], "little") == qe_isvsvn
    assert qe.status == "UpToDate"
    assert converge_tcb_status(platform, qe).status == "UpToDate"
    # Evaluated today, the 2023 (and early-2026) collateral is past its nextUpdate: reported, not hidden.
    late = evaluate_tdx_tcb(coll, pck, q.tee_tcb_svn, NOW)
    assert late.collateral_expired and "nextUpdate" in late.notes[0]


def test_real_tdx_quote_with_older_module_and_microcode(vectors_dir: Path) -> None:
    q = vector_quote(vectors_dir, "tdx/go-tdx-guest/quote_v5_sample.dat")
    coll = _real_collateral(vectors_dir)
    pck = parse_pck_extensions(q.chain[0])
    tee = bytearray(q.tee_tcb_svn)
    tee[0] = 4        # TDX module ISVSVN 4 → TDX_01 level "OutOfDate" (INTEL-SA-01036, -01099)
    result = evaluate_tdx_tcb(coll, pck, bytes(tee), IN_2023)
    assert result.status == "OutOfDate" and result.advisory_ids == ("INTEL-SA-01036", "INTEL-SA-01099")
    tee[0], tee[2] = 11, 2   # microcode component below the UpToDate level → second level
    result = evaluate_tdx_tcb(coll, pck, bytes(tee), IN_2023)
    assert result.status == "OutOfDate" and "INTEL-SA-01079" in result.advisory_ids
    tee[0] = 1        # below every TDX_01 level
    with pytest.raises(EvidenceInvalid, match="TDX module TDX_01"):
        evaluate_tdx_tcb(coll, pck, bytes(tee), IN_2023)
    tee[1] = 2        # no TDX_02 identity
    with pytest.raises(EvidenceInvalid, match="TDX_02"):
        evaluate_tdx_tcb(coll, pck, bytes(tee), IN_2023)


def test_real_collateral_does_not_fit_the_sgx_quote(vectors_dir: Path) -> None:
    q = vector_quote(vectors_dir, "sgx/trustee/occlum_quote.dat")
    coll = _real_collateral(vectors_dir)
    pck = parse_pck_extensions(q.chain[0])
    with pytest.raises(EvidenceInvalid, match="no SGX TCB Info"):
        evaluate_sgx_tcb(coll, pck, IN_2023)
    report = q.qe_report
    # The SGX QE is not the TD_QE: its MRSIGNER and ISVPRODID differ.
    with pytest.raises(EvidenceInvalid, match="MRSIGNER.*ISVPRODID"):
        evaluate_qe_identity(coll, report[128:160], 1, 8, 0, report[48:64], IN_2023)


# ------------------------------------------------------------------ SGX: every status

STATUS_LEVELS = [  # (status, svn of all components, pcesvn, advisories)
    ("UpToDate", 9, 9, ()),
    ("SWHardeningNeeded", 8, 8, ("INTEL-SA-00615",)),
    ("ConfigurationNeeded", 7, 7, ("INTEL-SA-00657",)),
    ("ConfigurationAndSWHardeningNeeded", 6, 6, ("INTEL-SA-00615", "INTEL-SA-00657")),
    ("OutOfDate", 5, 5, ("INTEL-SA-00828", "INTEL-SA-00837")),
    ("OutOfDateConfigurationNeeded", 4, 4, ("INTEL-SA-00828", "INTEL-SA-00657")),
    ("Revoked", 3, 3, ("INTEL-SA-00233",)),
]


def _sgx_collateral(version: int = 3, **kwargs) -> IntelCollateral:
    pki = default_pki()
    levels = [tcb_level(status, sgx=[svn] * 16, pcesvn=pce, advisories=adv, version=version,
                        date=f"20{20 + svn}-01-01T00:00:00Z")
              for status, svn, pce, adv in STATUS_LEVELS]
    body = pki.tcb_info_document(fmspc=FMSPC, levels=levels, version=version, **kwargs)
    return IntelCollateral(tcb_info=verify_tcb_info(body, pki.issuer_chain(), now=NOW, trust=pki.trust()))


def test_all_statuses_are_covered() -> None:
    assert {s for s, *_ in STATUS_LEVELS} == set(TCB_STATUSES)


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("status, svn, pcesvn, advisories", STATUS_LEVELS)
def test_sgx_status_reachable(version: int, status: str, svn: int, pcesvn: int, advisories: tuple) -> None:
    coll = _sgx_collateral(version)
    result = evaluate_sgx_tcb(coll, _pck(svn, pcesvn), NOW)
    assert replace(result, sources=()) == TcbResult(status, advisories, f"20{20 + svn}-01-01T00:00:00Z", False, ())
    # ... and it says which document it was judged from: the TCB Info, its dates and its age at NOW.
    (used,) = result.sources
    info = coll.all_tcb_infos()[0]
    assert (used.kind, used.issued_at, used.next_update) == ("tcb_info", info.issue_date, info.next_update)
    assert used.age_seconds == (NOW - info.issue_date).total_seconds()
    # Higher SVNs than a level still match it (first level whose SVNs are all <= the platform's).
    assert evaluate_sgx_tcb(coll, _pck(svn, pcesvn + 100), NOW).status == status


def test_sgx_one_lower_component_or_pcesvn_drops_a_level() -> None:
    coll = _sgx_collateral()
    assert evaluate_sgx_tcb(coll, _pck([9] * 15 + [8], 9), NOW).status == "SWHardeningNeeded"
    assert evaluate_sgx_tcb(coll, _pck([8] + [9] * 15, 9), NOW).status == "SWHardeningNeeded"
    assert evaluate_sgx_tcb(coll, _pck(9, 8), NOW).status == "SWHardeningNeeded"
    assert evaluate_sgx_tcb(coll, _pck([9] * 8 + [3] + [9] * 7, 9), NOW).status == "Revoked"


def test_sgx_no_matching_level_is_invalid() -> None:
    with pytest.raises(EvidenceInvalid, match="TCB not supported"):
        evaluate_sgx_tcb(_sgx_collateral(), _pck(2, 9), NOW)
    with pytest.raises(EvidenceInvalid, match="TCB not supported"):
        evaluate_sgx_tcb(_sgx_collateral(), _pck(9, 2), NOW)


def test_sgx_fmspc_pce_id_and_kind_must_match() -> None:
    coll = _sgx_collateral()
    with pytest.raises(EvidenceInvalid, match="FMSPC"):
        evaluate_sgx_tcb(coll, _pck(9, 9, fmspc=bytes(6)), NOW)
    with pytest.raises(EvidenceInvalid, match="PCE-ID"):
        evaluate_sgx_tcb(coll, _pck(9, 9, pce_id=b"\0\1"), NOW)
    with pytest.raises(EvidenceInvalid, match="no TDX TCB Info"):
        evaluate_tdx_tcb(coll, _pck(9, 9), bytes(16), NOW)
    with pytest.raises(EvidenceInvalid, match="no TCB Info"):
        evaluate_sgx_tcb(IntelCollateral(), _pck(9, 9), NOW)


def test_sgx_collateral_freshness_is_reported() -> None:
    coll = _sgx_collateral(issue_date=datetime(2026, 1, 1, tzinfo=UTC), next_update=datetime(2026, 2, 1, tzinfo=UTC))
    late = evaluate_sgx_tcb(coll, _pck(9, 9), NOW)
    assert late.status == "UpToDate" and late.collateral_expired and "collateral expired" in late.notes[0]
    early = evaluate_sgx_tcb(coll, _pck(9, 9), datetime(2025, 12, 1, tzinfo=UTC))
    assert not early.collateral_expired and "issueDate" in early.notes[0]
    assert evaluate_sgx_tcb(coll, _pck(9, 9), datetime(2026, 1, 15, tzinfo=UTC)).notes == ()


def test_sgx_picks_the_tcb_info_for_the_fmspc() -> None:
    pki = default_pki()
    infos = tuple(
        verify_tcb_info(pki.tcb_info_document(fmspc=fmspc, levels=[tcb_level(status, sgx=[1] * 16, pcesvn=1)]),
                        pki.issuer_chain(), now=NOW, trust=pki.trust())
        for fmspc, status in ((bytes(6), "OutOfDate"), (FMSPC, "SWHardeningNeeded")))
    coll = IntelCollateral(tcb_info=infos[0], tcb_infos=infos)
    assert evaluate_sgx_tcb(coll, _pck(1, 1), NOW).status == "SWHardeningNeeded"
    assert evaluate_sgx_tcb(coll, _pck(1, 1, fmspc=bytes(6)), NOW).status == "OutOfDate"


# ------------------------------------------------------------------ TDX

TDX_LEVELS = [
    tcb_level("UpToDate", sgx=[5] * 16, pcesvn=5, tdx=[3, 0, 5] + [0] * 13),
    tcb_level("ConfigurationNeeded", sgx=[5] * 16, pcesvn=5, tdx=[3, 0, 4] + [0] * 13, advisories=["SA-C"]),
    tcb_level("OutOfDate", sgx=[5] * 16, pcesvn=5, tdx=[2, 0, 3] + [0] * 13, advisories=["SA-O"]),
    tcb_level("Revoked", sgx=[5] * 16, pcesvn=5, tdx=[0] * 16, advisories=["SA-R"]),
]
MODULE_SIGNER = bytes(range(48))


def _tdx_collateral(identities=None, module=None) -> IntelCollateral:
    pki = default_pki()
    body = pki.tcb_info_document(fmspc=FMSPC, tcb_id="TDX", levels=TDX_LEVELS, tdx_module=module,
                                 tdx_module_identities=identities)
    return IntelCollateral(tcb_info=verify_tcb_info(body, pki.issuer_chain(), now=NOW, trust=pki.trust()))


def _tee(*head: int) -> bytes:
    return bytes(head) + bytes(16 - len(head))


@pytest.mark.parametrize("tee, status", [
    (_tee(3, 0, 5), "UpToDate"), (_tee(9, 0, 9, 1), "UpToDate"), (_tee(3, 0, 4), "ConfigurationNeeded"),
    (_tee(2, 0, 4), "OutOfDate"), (_tee(2, 0, 9), "OutOfDate"), (_tee(1, 0, 2), "Revoked"),
])
def test_tdx_module_version_0_compares_all_components(tee: bytes, status: str) -> None:
    assert evaluate_tdx_tcb(_tdx_collateral(), _pck(5, 5), tee, NOW).status == status


def test_tdx_sgx_part_still_matters() -> None:
    with pytest.raises(EvidenceInvalid, match="TCB not supported"):
        evaluate_tdx_tcb(_tdx_collateral(), _pck(4, 5), _tee(3, 0, 5), NOW)


def test_tdx_module_identities() -> None:
    identities = [tdx_module_identity(1, [enclave_level("UpToDate", 6),
                                          enclave_level("OutOfDate", 4, advisories=["SA-M"]),
                                          enclave_level("Revoked", 2, advisories=["SA-MR"])],
                                      mrsigner=MODULE_SIGNER)]
    coll = _tdx_collateral(identities)
    pck = _pck(5, 5)
    # Module version 1: components 0 and 1 are the module's (judged by TDX_01), 2..15 by the level.
    assert evaluate_tdx_tcb(coll, pck, _tee(6, 1, 5), NOW).status == "UpToDate"
    assert evaluate_tdx_tcb(coll, pck, _tee(0xFF, 1, 5), NOW).status == "UpToDate"
    r = evaluate_tdx_tcb(coll, pck, _tee(4, 1, 5), NOW)
    assert (r.status, r.advisory_ids) == ("OutOfDate", ("SA-M",))
    r = evaluate_tdx_tcb(coll, pck, _tee(4, 1, 4), NOW)   # ConfigurationNeeded platform + OutOfDate module
    assert (r.status, r.advisory_ids) == ("OutOfDateConfigurationNeeded", ("SA-C", "SA-M"))
    r = evaluate_tdx_tcb(coll, pck, _tee(2, 1, 5), NOW)
    assert (r.status, r.advisory_ids) == ("Revoked", ("SA-MR",))
    with pytest.raises(EvidenceInvalid, match="below every level"):
        evaluate_tdx_tcb(coll, pck, _tee(1, 1, 5), NOW)
    with pytest.raises(EvidenceInvalid, match="TDX_03"):
        evaluate_tdx_tcb(coll, pck, _tee(6, 3, 5), NOW)
    # MRSIGNERSEAM and SEAMATTRIBUTES against the identity.
    assert evaluate_tdx_tcb(coll, pck, _tee(6, 1, 5), NOW, mrsignerseam=MODULE_SIGNER,
                            seam_attributes=bytes(8)).status == "UpToDate"
    with pytest.raises(EvidenceInvalid, match="MRSIGNERSEAM"):
        evaluate_tdx_tcb(coll, pck, _tee(6, 1, 5), NOW, mrsignerseam=bytes(48))
    with pytest.raises(EvidenceInvalid, match="SEAMATTRIBUTES"):
        evaluate_tdx_tcb(coll, pck, _tee(6, 1, 5), NOW, seam_attributes=b"\1" + bytes(7))


def test_tdx_module_without_identities() -> None:
    coll = _tdx_collateral(module={"mrsigner": MODULE_SIGNER.hex(), "attributes": "00" * 8,
                                   "attributesMask": "00000000000000FF"})
    pck = _pck(5, 5)
    assert evaluate_tdx_tcb(coll, pck, _tee(3, 0, 5), NOW, mrsignerseam=MODULE_SIGNER,
                            seam_attributes=bytes.fromhex("ff00000000000000")).status == "UpToDate"
    with pytest.raises(EvidenceInvalid, match="SEAMATTRIBUTES"):
        evaluate_tdx_tcb(coll, pck, _tee(3, 0, 5), NOW, seam_attributes=bytes.fromhex("00000000000000ff"))
    with pytest.raises(EvidenceInvalid, match="MRSIGNERSEAM"):
        evaluate_tdx_tcb(coll, pck, _tee(3, 0, 5), NOW, mrsignerseam=bytes(48))
    with pytest.raises(EvidenceInvalid, match="no tdxModuleIdentities entry"):
        evaluate_tdx_tcb(coll, pck, _tee(3, 1, 5), NOW)
    with pytest.raises(EvidenceMalformed, match="16 bytes"):
        evaluate_tdx_tcb(coll, pck, bytes(15), NOW)


def test_tdx_levels_need_tdx_components() -> None:
    pki = default_pki()
    with pytest.raises(EvidenceMalformed, match="tdxtcbcomponents is missing"):
        parse_tcb_info(pki.tcb_info_document(fmspc=FMSPC, tcb_id="TDX",
                                             levels=[tcb_level("UpToDate", sgx=[1] * 16, pcesvn=1)]))


# ------------------------------------------------------------------ QE identity

QE_SIGNER = b"\x8c" * 32


def _qe_collateral(**kwargs) -> IntelCollateral:
    pki = default_pki()
    levels = [enclave_level("UpToDate", 8, date="2024-03-13T00:00:00Z"),
              enclave_level("OutOfDate", 6, advisories=["INTEL-SA-00615"], date="2023-02-15T00:00:00Z"),
              enclave_level("Revoked", 2, advisories=["INTEL-SA-00219"], date="2019-01-01T00:00:00Z")]
    body = pki.qe_identity_document(levels=levels, mrsigner=QE_SIGNER, isvprodid=1, **kwargs)
    return IntelCollateral(qe_identity=verify_qe_identity(body, pki.issuer_chain(), now=NOW, trust=pki.trust()))


ATTRS = bytes.fromhex("15000000000000000700000000000000")   # flags 0x15 (INIT|MODE64|PROVISIONKEY), xfrm 7


@pytest.mark.parametrize("isvsvn, status, advisories", [
    (8, "UpToDate", ()), (9, "UpToDate", ()), (7, "OutOfDate", ("INTEL-SA-00615",)), (6, "OutOfDate", ("INTEL-SA-00615",)),
    (3, "Revoked", ("INTEL-SA-00219",)), (2, "Revoked", ("INTEL-SA-00219",)), (1, "Revoked", ()),
])
def test_qe_isvsvn_levels(isvsvn: int, status: str, advisories: tuple) -> None:
    result = evaluate_qe_identity(_qe_collateral(), QE_SIGNER, 1, isvsvn, 0, ATTRS, NOW)
    assert (result.status, result.advisory_ids) == (status, advisories)


def test_qe_identity_mismatches_are_invalid() -> None:
    coll = _qe_collateral()
    with pytest.raises(EvidenceInvalid, match="MRSIGNER"):
        evaluate_qe_identity(coll, b"\x8d" * 32, 1, 8, 0, ATTRS, NOW)
    with pytest.raises(EvidenceInvalid, match="ISVPRODID 2 != 1"):
        evaluate_qe_identity(coll, QE_SIGNER, 2, 8, 0, ATTRS, NOW)
    with pytest.raises(EvidenceInvalid, match="MISCSELECT"):
        evaluate_qe_identity(coll, QE_SIGNER, 1, 8, 1, ATTRS, NOW)
    # DEBUG (flags bit 1) is inside the mask: a debug QE is not Intel's production QE.
    with pytest.raises(EvidenceInvalid, match="ATTRIBUTES"):
        evaluate_qe_identity(coll, QE_SIGNER, 1, 8, 0, bytes.fromhex("17") + ATTRS[1:], NOW)
    with pytest.raises(EvidenceMalformed):
        evaluate_qe_identity(coll, QE_SIGNER, 1, 8, 0, ATTRS[:15], NOW)


def test_qe_masks() -> None:
    coll = _qe_collateral(miscselect=0x1, miscselect_mask=0x0000000F)
    assert evaluate_qe_identity(coll, QE_SIGNER, 1, 8, 0xF1, ATTRS, NOW).status == "UpToDate"
    with pytest.raises(EvidenceInvalid, match="MISCSELECT"):
        evaluate_qe_identity(coll, QE_SIGNER, 1, 8, 0x2, ATTRS, NOW)
    # Bits outside the attributes mask (bit 2 of flags, XFRM) are ignored.
    assert evaluate_qe_identity(coll, QE_SIGNER, 1, 8, 1, bytes.fromhex("15") + bytes(7) + b"\xff" * 8,
                                NOW).status == "UpToDate"


def test_qe_identity_selection() -> None:
    pki = default_pki()
    qe = verify_qe_identity(pki.qe_identity_document(levels=[enclave_level("UpToDate", 8)], mrsigner=QE_SIGNER),
                            pki.issuer_chain(), now=NOW, trust=pki.trust())
    td = verify_qe_identity(pki.qe_identity_document(levels=[enclave_level("OutOfDate", 1)], qe_id="TD_QE",
                                                     mrsigner=b"\xdc" * 32, isvprodid=2),
                            pki.issuer_chain(), now=NOW, trust=pki.trust())
    coll = IntelCollateral(qe_identity=qe, qe_identities=(qe, td))
    assert evaluate_qe_identity(coll, b"\xdc" * 32, 2, 4, 0, ATTRS, NOW, expected_id="TD_QE").status == "OutOfDate"
    assert evaluate_qe_identity(coll, QE_SIGNER, 1, 8, 0, ATTRS, NOW, expected_id="QE").status == "UpToDate"
    # Without expected_id, the identity the report's MRSIGNER and ISVPRODID single out.
    assert evaluate_qe_identity(coll, QE_SIGNER, 1, 8, 0, ATTRS, NOW).status == "UpToDate"
    assert evaluate_qe_identity(coll, b"\xdc" * 32, 2, 4, 0, ATTRS, NOW).status == "OutOfDate"
    with pytest.raises(EvidenceInvalid, match="pass expected_id"):
        evaluate_qe_identity(coll, QE_SIGNER, 2, 8, 0, ATTRS, NOW)
    # expected_id forces the identity: the TD_QE report checked against the QE identity fails.
    with pytest.raises(EvidenceInvalid, match="MRSIGNER"):
        evaluate_qe_identity(coll, b"\xdc" * 32, 2, 4, 0, ATTRS, NOW, expected_id="QE")
    with pytest.raises(EvidenceInvalid, match="no QVE Identity"):
        evaluate_qe_identity(coll, QE_SIGNER, 1, 8, 0, ATTRS, NOW, expected_id="QVE")


# ------------------------------------------------------------------ convergence


def _r(status: str, *adv: str, expired: bool = False) -> TcbResult:
    return TcbResult(status, adv, "2024-01-01T00:00:00Z", expired, ())


@pytest.mark.parametrize("platform, qe, expected", [
    ("UpToDate", "UpToDate", "UpToDate"),
    ("SWHardeningNeeded", "UpToDate", "SWHardeningNeeded"),
    ("UpToDate", "OutOfDate", "OutOfDate"),
    ("SWHardeningNeeded", "OutOfDate", "OutOfDate"),
    ("ConfigurationNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
    ("ConfigurationAndSWHardeningNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
    ("OutOfDateConfigurationNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
    ("UpToDate", "Revoked", "Revoked"),
    ("Revoked", "UpToDate", "Revoked"),
    ("Revoked", "OutOfDate", "Revoked"),
    ("OutOfDate", "UpToDate", "OutOfDate"),
])
def test_converge(platform: str, qe: str, expected: str) -> None:
    result = converge_tcb_status(_r(platform, "A", "B"), _r(qe, "B", "C", expired=True))
    assert result.status == expected
    assert result.advisory_ids == ("A", "B", "C") and result.collateral_expired
