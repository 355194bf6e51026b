"""How SGX and TDX verification uses Intel collateral: the calls into attestation.intel.collateral
(replaced here by a recording fake, so this tests the wiring, not the TCB rules), the QVL-style
convergence of platform and QE identity statuses, and that nothing is judged without collateral."""

from __future__ import annotations

import sys
import types
from datetime import datetime, timedelta, UTC

import pytest

import attestation.intel
from attestation.claims import CollateralUse
from attestation.errors import EvidenceInvalid
from attestation.intel.collateral import TcbResult, converge_tcb_status, load_collateral
from attestation.platforms import VerificationInputs
from attestation.sgx import PLATFORM as SGX
from attestation.sgx import SgxPolicy
from attestation.tdx import PLATFORM as TDX
from attestation.tdx import TdxPolicy
from attestation.testing.intel import SGX_QE_MRSIGNER, TD_QE_MRSIGNER, FakeIntelPki, FakeQuotingEnclave, sgx_code_pin, tdx_code_pin
from attestation.testing.intel_collateral import enclave_level, tcb_level

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
PKI = FakeIntelPki(NOW, fmspc=bytes.fromhex("00906ed50000"), pcesvn=13)
QE = FakeQuotingEnclave(PKI, qe_isvsvn=6)


def Result(status: str, advisory_ids: tuple[str, ...] = (), collateral_expired: bool = False,
           notes: tuple[str, ...] = (), sources: tuple[CollateralUse, ...] = ()) -> TcbResult:
    return TcbResult(status, advisory_ids, None, collateral_expired, notes, sources)


@pytest.fixture
def fake_collateral(monkeypatch):
    calls: list[tuple] = []
    module = types.ModuleType("attestation.intel.collateral")
    module.platform_result = Result("SWHardeningNeeded", ("INTEL-SA-00615", "INTEL-SA-00334"))
    module.qe_result = Result("UpToDate", ("INTEL-SA-00334",))

    def evaluate_sgx_tcb(coll, pck, now):
        calls.append(("sgx", coll, pck, now))
        return module.platform_result

    def evaluate_tdx_tcb(coll, pck, tee_tcb_svn, now, *, mrsignerseam=None, seam_attributes=None):
        calls.append(("tdx", coll, pck, tee_tcb_svn, now, mrsignerseam, seam_attributes))
        return module.platform_result

    def evaluate_qe_identity(coll, mrsigner, isvprodid, isvsvn, miscselect, attributes, now, *, expected_id=None):
        calls.append(("qe", coll, mrsigner, isvprodid, isvsvn, miscselect, attributes, now, expected_id))
        return module.qe_result

    module.evaluate_sgx_tcb = evaluate_sgx_tcb
    module.evaluate_tdx_tcb = evaluate_tdx_tcb
    module.evaluate_qe_identity = evaluate_qe_identity
    module.converge_tcb_status = converge_tcb_status  # the real rule; the evaluations are faked
    module.calls = calls
    monkeypatch.setitem(sys.modules, "attestation.intel.collateral", module)
    monkeypatch.setattr(attestation.intel, "collateral", module, raising=False)
    return module


COLLATERAL = object()


def test_sgx_collateral_is_evaluated_and_statuses_converge(fake_collateral):
    v = SGX.verify(QE.sgx_quote(), VerificationInputs(now=NOW, trust=PKI.trust(), collateral={"intel": COLLATERAL}))
    assert v.tcb_status == "SWHardeningNeeded"
    assert v.advisory_ids == ("INTEL-SA-00615", "INTEL-SA-00334")
    (kind, coll, pck, now), qe = fake_collateral.calls
    assert (kind, coll, now) == ("sgx", COLLATERAL, NOW)
    assert pck.fmspc == bytes.fromhex("00906ed50000") and pck.pcesvn == 13 and pck.cpusvn == PKI.cpusvn
    assert qe[:5] == ("qe", COLLATERAL, SGX_QE_MRSIGNER, 1, 6)
    assert qe[5] == 0 and qe[6] == (0x15).to_bytes(8, "little") + (0xE7).to_bytes(8, "little")
    assert qe[7:] == (NOW, "QE")
    assert v.report.tcb.status == "SWHardeningNeeded" and v.report.tcb.collateral_expired is False


def test_tdx_collateral_gets_tee_tcb_svn(fake_collateral):
    fake_collateral.qe_result = Result("OutOfDate")
    svn = bytes([7, 1, 3]) + bytes(13)
    v = TDX.verify(QE.tdx_quote(version=5, tee_tcb_svn=svn),
                   VerificationInputs(now=NOW, trust=PKI.trust(), collateral={"intel": COLLATERAL}))
    assert v.tcb_status == "OutOfDate"  # SWHardeningNeeded platform + OutOfDate QE
    (kind, coll, pck, tee_tcb_svn, now, mrsignerseam, seam_attributes), qe = fake_collateral.calls
    assert (kind, coll, tee_tcb_svn, now) == ("tdx", COLLATERAL, svn, NOW)
    assert (mrsignerseam, seam_attributes) == (bytes(48), bytes(8))  # the TDX module identity is checked too
    assert qe[2:5] == (TD_QE_MRSIGNER, 2, 6) and qe[-1] == "TD_QE"


def test_the_collateral_modules_own_convergence_is_used(fake_collateral):
    fake_collateral.converge_tcb_status = lambda platform, qe: Result("ConfigurationNeeded", ("X",))
    v = SGX.verify(QE.sgx_quote(), VerificationInputs(now=NOW, trust=PKI.trust(), collateral={"intel": COLLATERAL}))
    assert (v.tcb_status, v.advisory_ids) == ("ConfigurationNeeded", ("X",))


def test_expired_collateral_is_a_violation_unless_allowed(fake_collateral):
    stale = CollateralUse("qe_identity", "Intel SGX TCB Signing", datetime(2023, 6, 8, tzinfo=UTC),
                          datetime(2023, 7, 8, tzinfo=UTC), (NOW - datetime(2023, 6, 8, tzinfo=UTC)).total_seconds())
    fake_collateral.qe_result = Result("UpToDate", (), True, ("QE Identity nextUpdate 2023-07-08 is before now",),
                                       (stale,))
    inputs = VerificationInputs(now=NOW, trust=PKI.trust(),
                                collateral={"intel": COLLATERAL, "crls": [PKI.crl(issuer="ca"), PKI.crl(issuer="root")]})
    for platform, quote, section in ((SGX, QE.sgx_quote(), SgxPolicy), (TDX, QE.tdx_quote(), TdxPolicy)):
        v = platform.verify(quote, inputs)
        assert v.report.tcb.collateral_expired is True
        accepted = {"accepted_tcb_statuses": ["SWHardeningNeeded"],
                    "accepted_advisory_ids": ["INTEL-SA-00615", "INTEL-SA-00334"]}
        pin = sgx_code_pin() if section is SgxPolicy else tdx_code_pin()
        (found,) = platform.violations(v, section.from_table(pin | accepted), inputs)
        assert found.field == f"{platform.name}.collateral" and "2023-07-08" in found.value
        assert "allow_expired_collateral" in found.expected and "collateral_grace_seconds = 0" in found.expected
        assert stale in v.collateral  # the verifier reports what it used; the policy judged it
        assert platform.violations(v, section.from_table(pin | accepted | {"allow_expired_collateral": True}), inputs) == []


def test_no_collateral_no_evaluation(fake_collateral):
    v = SGX.verify(QE.sgx_quote(), VerificationInputs(now=NOW, trust=PKI.trust(), collateral={"crls": []}))
    assert v.tcb_status is None and v.advisory_ids == () and fake_collateral.calls == []


def test_collateral_errors_propagate(fake_collateral):
    def refuse(*args):
        raise EvidenceInvalid("TCB Info is for FMSPC 000000000000, the PCK certificate says 00906ed50000")

    fake_collateral.evaluate_sgx_tcb = refuse
    with pytest.raises(EvidenceInvalid, match="FMSPC"):
        SGX.verify(QE.sgx_quote(), VerificationInputs(now=NOW, trust=PKI.trust(), collateral={"intel": COLLATERAL}))


@pytest.mark.parametrize("platform_status, qe_status, expected", [
    ("UpToDate", "UpToDate", "UpToDate"),
    ("SWHardeningNeeded", "UpToDate", "SWHardeningNeeded"),
    ("UpToDate", "OutOfDate", "OutOfDate"),
    ("SWHardeningNeeded", "OutOfDate", "OutOfDate"),
    ("ConfigurationNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
    ("ConfigurationAndSWHardeningNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
    ("OutOfDate", "OutOfDate", "OutOfDate"),
    ("UpToDate", "Revoked", "Revoked"),
    ("Revoked", "UpToDate", "Revoked"),
    ("OutOfDateConfigurationNeeded", "UpToDate", "OutOfDateConfigurationNeeded"),
])
def test_convergence_follows_intel_qvl(platform_status, qe_status, expected):
    assert converge_tcb_status(Result(platform_status), Result(qe_status)).status == expected


# ---- end to end with the real collateral module: quotes, TCB Info and QE Identity all signed
# under the one fake Intel root of PKI.

def _real_collateral(tmp_path, *, tdx: bool, platform_status: str, qe_svn_levels, next_update=None):
    levels = [tcb_level(platform_status, sgx=PKI.tcb_components, pcesvn=PKI.pcesvn,
                        tdx=[3, 0, 5] + [0] * 13 if tdx else None, advisories=("INTEL-SA-00615",)),
              tcb_level("OutOfDate", sgx=[0] * 16, pcesvn=0, tdx=[0] * 16 if tdx else None)]
    tcb_info = PKI.tcb_info_document(fmspc=PKI.fmspc, levels=levels, tcb_id="TDX" if tdx else "SGX",
                                     issue_date=datetime(2026, 11, 20, tzinfo=UTC), next_update=next_update)
    qe_identity = PKI.qe_identity_document(
        levels=[enclave_level(status, svn) for status, svn in qe_svn_levels],
        qe_id="TD_QE" if tdx else "QE", mrsigner=TD_QE_MRSIGNER if tdx else SGX_QE_MRSIGNER,
        isvprodid=2 if tdx else 1, issue_date=datetime(2026, 11, 20, tzinfo=UTC), next_update=next_update)
    directory = PKI.write_collateral_dir(tmp_path / ("tdx" if tdx else "sgx"), tcb_info=tcb_info,
                                         qe_identity=qe_identity, crls=[PKI.crl(issuer="ca"), PKI.crl(issuer="root")])
    coll = load_collateral(directory, now=NOW, trust=PKI.trust())
    return VerificationInputs(now=NOW, trust=PKI.trust(), collateral={"intel": coll, "crls": tuple(coll.crls)})


def test_end_to_end_sgx_with_signed_collateral(tmp_path):
    inputs = _real_collateral(tmp_path, tdx=False, platform_status="SWHardeningNeeded",
                              qe_svn_levels=[("UpToDate", 6), ("OutOfDate", 0)])
    v = SGX.verify(QE.sgx_quote(), inputs)
    assert (v.tcb_status, v.advisory_ids) == ("SWHardeningNeeded", ("INTEL-SA-00615",))
    assert [x.field for x in SGX.violations(v, SgxPolicy.from_table(sgx_code_pin()), inputs)] == ["sgx.tcb_status",
                                                                                    "sgx.advisory_ids"]
    ok = {"accepted_tcb_statuses": ["UpToDate", "SWHardeningNeeded"], "accepted_advisory_ids": ["INTEL-SA-00615"]}
    assert SGX.violations(v, SgxPolicy.from_table(sgx_code_pin() | ok), inputs) == []
    # an older QE (ISVSVN 6 < 7) converges the status to OutOfDate
    inputs = _real_collateral(tmp_path / "old", tdx=False, platform_status="UpToDate",
                              qe_svn_levels=[("UpToDate", 7), ("OutOfDate", 0)])
    assert SGX.verify(QE.sgx_quote(), inputs).tcb_status == "OutOfDate"


def test_end_to_end_tdx_with_signed_collateral(tmp_path):
    inputs = _real_collateral(tmp_path, tdx=True, platform_status="UpToDate", qe_svn_levels=[("UpToDate", 6)])
    v = TDX.verify(QE.tdx_quote(version=5), inputs)
    assert v.tcb_status == "UpToDate" and v.report.tcb.collateral_expired is False
    assert TDX.violations(v, TdxPolicy.from_table(tdx_code_pin() | {"accepted_advisory_ids": ["INTEL-SA-00615"]}), inputs) == []


def test_end_to_end_stale_collateral(tmp_path):
    inputs = _real_collateral(tmp_path, tdx=False, platform_status="UpToDate", qe_svn_levels=[("UpToDate", 6)],
                              next_update=datetime(2026, 11, 21, tzinfo=UTC))
    v = SGX.verify(QE.sgx_quote(), inputs)
    assert v.report.tcb.collateral_expired is True
    found = SGX.violations(v, SgxPolicy.from_table(sgx_code_pin() | {"accepted_advisory_ids": ["INTEL-SA-00615"]}), inputs)
    assert [x.field for x in found] == ["sgx.collateral", "sgx.collateral"]
    assert "stale TCB Info" in found[0].value and "stale QE Identity" in found[1].value
    # both are 6 days 12 hours past their nextUpdate: a week's grace accepts them, six days do not
    week = {"accepted_advisory_ids": ["INTEL-SA-00615"], "collateral_grace_seconds": int(timedelta(days=7).total_seconds())}
    assert SGX.violations(v, SgxPolicy.from_table(sgx_code_pin() | week), inputs) == []
    six = week | {"collateral_grace_seconds": int(timedelta(days=6).total_seconds())}
    assert len(SGX.violations(v, SgxPolicy.from_table(sgx_code_pin() | six), inputs)) == 2
