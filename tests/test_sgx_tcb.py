"""How SGX and TDX verification uses Intel collateral: the calls into attestation.intel.collateral
(replaced here by a recording fake, so this tests the wiring, not the TCB rules), the QVL-style
convergence of platform and QE identity statuses, and that nothing is judged without collateral."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from datetime import datetime, timezone

import pytest

import attestation.intel
from attestation.errors import EvidenceInvalid
from attestation.intel.verify import converge_tcb_status
from attestation.platforms import VerificationInputs
from attestation.sgx import PLATFORM as SGX
from attestation.tdx import PLATFORM as TDX
from attestation.testing.intel import SGX_QE_MRSIGNER, TD_QE_MRSIGNER, FakeIntelPki, FakeQuotingEnclave

pytest.importorskip("attestation.intel.pck")

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
PKI = FakeIntelPki(NOW, fmspc=bytes.fromhex("00906ed50000"), pcesvn=13)
QE = FakeQuotingEnclave(PKI, qe_isvsvn=6)


@dataclass(frozen=True)
class Result:
    status: str
    advisory_ids: tuple[str, ...] = ()


@pytest.fixture
def fake_collateral(monkeypatch):
    calls: list[tuple] = []
    module = types.ModuleType("attestation.intel.collateral")
    module.platform_result = Result("SWHardeningNeeded", ("INTEL-SA-00615", "INTEL-SA-00334"))
    module.qe_result = Result("UpToDate", ("INTEL-SA-00334",))

    def evaluate_sgx_tcb(coll, pck, now):
        calls.append(("sgx", coll, pck, now))
        return module.platform_result

    def evaluate_tdx_tcb(coll, pck, tee_tcb_svn, now):
        calls.append(("tdx", coll, pck, tee_tcb_svn, now))
        return module.platform_result

    def evaluate_qe_identity(coll, mrsigner, isvprodid, isvsvn, miscselect, attributes, now):
        calls.append(("qe", coll, mrsigner, isvprodid, isvsvn, miscselect, attributes, now))
        return module.qe_result

    module.evaluate_sgx_tcb = evaluate_sgx_tcb
    module.evaluate_tdx_tcb = evaluate_tdx_tcb
    module.evaluate_qe_identity = evaluate_qe_identity
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
    assert qe[5] == 0 and qe[6] == (0x15).to_bytes(8, "little") + (0xE7).to_bytes(8, "little") and qe[7] == NOW


def test_tdx_collateral_gets_tee_tcb_svn(fake_collateral):
    fake_collateral.qe_result = Result("OutOfDate")
    svn = bytes([7, 1, 3]) + bytes(13)
    v = TDX.verify(QE.tdx_quote(version=5, tee_tcb_svn=svn),
                   VerificationInputs(now=NOW, trust=PKI.trust(), collateral={"intel": COLLATERAL}))
    assert v.tcb_status == "OutOfDate"  # SWHardeningNeeded platform + OutOfDate QE
    (kind, coll, pck, tee_tcb_svn, now), qe = fake_collateral.calls
    assert (kind, coll, tee_tcb_svn, now) == ("tdx", COLLATERAL, svn, NOW)
    assert qe[2:5] == (TD_QE_MRSIGNER, 2, 6)


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
    assert converge_tcb_status(platform_status, qe_status) == expected
