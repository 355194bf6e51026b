"""A policy that looks like a code pin must pin code (issue 15, item 5).

Each test is an attacker's TEE, or an attacker's reading of a policy, that was accepted before:
a weak pin is now refused when the policy is loaded *and* when it is built in Python (the SDK
takes policy objects), and evidence that slipped past a table's defaults is now refused by them.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, UTC
from typing import Any

import pytest

from attestation.errors import EvidenceInvalid, PolicyError, PolicyViolation
from attestation.nitro import NitroSection
from attestation.platforms import VerificationInputs
from attestation.policy import Policy, policy_from_mapping, policy_from_toml, policy_to_toml
from attestation.sgx import SgxPolicy
from attestation.snp import PLATFORM as SNP, SnpPolicy
from attestation.snp.abi import encode_tcb
from attestation.tdx import TdxPolicy
from attestation.testing.intel import (
    SGX_QE_MRSIGNER, TD_QE_MRSIGNER, FakeIntelPki, FakeQuotingEnclave, sgx_code_pin, tdx_code_pin,
)
from attestation.testing.nitro import default_pcrs
from attestation.testing.snp import FakeAmd
from attestation.verify import verify_evidence

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
PKI = FakeIntelPki(NOW)
QE = FakeQuotingEnclave(PKI)
RD = b"\x07" * 64
# Intel collateral for PKI (UpToDate, fresh CRLs): what a hardware table requires by default.
SGX_COLLATERAL = PKI.collateral()
TDX_COLLATERAL = PKI.collateral(tdx=True)
H32 = "ab" * 32
H48 = "cd" * 48
PCR = {i: v.hex() for i, v in default_pcrs().items()}
SECTIONS = {"sgx": SgxPolicy, "tdx": TdxPolicy, "snp": SnpPolicy, "nitro": NitroSection}


def h(label: str) -> bytes:
    return hashlib.sha384(label.encode()).digest()


def _as_kwargs(table: dict[str, Any], platform: str = "sgx") -> dict[str, Any]:
    """What a Python caller would pass for ``table``: tuples for lists, and bytes for hex where
    the section holds bytes (SGX, TDX; SNP and Nitro sections hold hex strings)."""
    def convert(value: Any) -> Any:
        if isinstance(value, list):
            return tuple(convert(v) for v in value)
        if (platform in ("sgx", "tdx") and isinstance(value, str) and len(value) in (64, 96)
                and set(value) <= set("0123456789abcdef")):
            return bytes.fromhex(value)
        return value
    return {key: convert(value) for key, value in table.items()}


def _refused_both_ways(platform: str, table: dict[str, Any], match: str) -> None:
    """The TOML loader and the Python constructor refuse ``table`` with the same message."""
    with pytest.raises(PolicyError, match=match) as loaded:
        policy_from_mapping({platform: table})
    with pytest.raises(PolicyError, match=match) as built:
        SECTIONS[platform](**_as_kwargs(table, platform))
    assert str(built.value) in str(loaded.value)


# ---- 1. constructors validate exactly as the loader does ---------------------------------------


@pytest.mark.parametrize("platform", SECTIONS)
def test_an_empty_section_built_in_python_is_refused(platform):
    with pytest.raises(PolicyError, match=r"must pin|pin the guest"):
        SECTIONS[platform]()


@pytest.mark.parametrize("platform, pin", [
    ("sgx", sgx_code_pin()), ("tdx", tdx_code_pin()), ("snp", {"measurement": [H48]}), ("nitro", {"pcr0": [H48]}),
])
def test_a_string_for_a_boolean_is_refused_by_the_constructor_as_by_the_loader(platform, pin):
    table = pin | {"debug_allowed": "false"}
    _refused_both_ways(platform, table, "debug_allowed")


def test_wrong_values_in_intel_sections_are_refused_by_their_constructors():
    with pytest.raises(PolicyError, match=r"\[sgx\] min_isvsvn"):
        SgxPolicy(mrenclave=(bytes(32),), min_isvsvn=-1)
    with pytest.raises(PolicyError, match=r"\[sgx\] mrenclave"):
        SgxPolicy(mrenclave=(bytes(31),))
    with pytest.raises(PolicyError, match=r"\[tdx\] accepted_tcb_statuses"):
        TdxPolicy(**_as_kwargs(tdx_code_pin()), accepted_tcb_statuses=("Revoked",))


def test_a_section_built_in_python_equals_the_one_loaded_from_toml():
    built = SgxPolicy(mrenclave=(bytes.fromhex(H32),), attributes=bytes.fromhex("05" + "00" * 15))
    loaded = policy_from_toml(f'[sgx]\nmrenclave = ["{H32}"]\nattributes = "05{"00" * 15}"\n').section("sgx")
    assert built == loaded and built.attributes_mask == b"\xff" * 16


def test_a_policy_refuses_platform_sections_that_skipped_their_checks():
    for platforms in ({"sgx": {}}, {"sgx": TdxPolicy(**_as_kwargs(tdx_code_pin()))}, {"sev": SnpPolicy(measurement=(H48,))}):
        with pytest.raises(PolicyError):
            Policy(measurements=(), platforms=platforms)


# ---- 2. TDX: MRTD together with RTMR0-2 ------------------------------------------------------


@pytest.mark.parametrize("table", [
    {"mrtd": [H48]},
    {"rtmr0": [H48]},
    {"rtmr3": [H48]},
    {"mrtd": [H48], "rtmr0": [H48], "rtmr1": [H48]},
    {"rtmr0": [H48], "rtmr1": [H48], "rtmr2": [H48], "rtmr3": [H48]},
])
def test_a_tdx_table_without_mrtd_and_rtmr0_to_2_is_not_a_pin(table):
    _refused_both_ways("tdx", table, r"\[tdx\] must pin the code it trusts: set mrtd, rtmr0, rtmr1, rtmr2")


def test_a_td_with_the_same_firmware_and_other_software_is_refused():
    # The attack: stock OVMF (same MRTD), attacker's kernel (other RTMR1). `[tdx] mrtd` alone
    # used to accept it; that policy is now refused, and the full pin refuses the TD.
    with pytest.raises(PolicyError):
        policy_from_mapping({"nonce_required": True, "tdx": {"mrtd": [h("td").hex()]}})
    policy = policy_from_mapping({"tdx": tdx_code_pin()})
    verify_evidence("tdx", QE.tdx_quote(report_data=RD), policy, expected_report_data=RD, now=NOW, trust=PKI.trust(),
                    collateral=TDX_COLLATERAL)
    with pytest.raises(PolicyViolation) as info:
        verify_evidence("tdx", QE.tdx_quote(rtmr1=h("attacker kernel"), report_data=RD), policy,
                        expected_report_data=RD, now=NOW, trust=PKI.trust(), collateral=TDX_COLLATERAL)
    assert list(info.value.fields) == ["tdx.rtmr1"]


# ---- 3. Nitro: PCR0 or PCR2 ------------------------------------------------------------------


@pytest.mark.parametrize("table", [{"pcr1": [PCR[1]]}, {"pcr8": [H48]}, {"pcr1": [PCR[1]], "pcr8": [H48]}])
def test_a_nitro_table_without_pcr0_or_pcr2_is_not_a_pin(table):
    _refused_both_ways("nitro", table, r"pcr0 \(image\) or pcr2 \(application\)")


@pytest.mark.parametrize("pin", ["pcr0", "pcr2"])
def test_pcr0_or_pcr2_pins_a_nitro_enclave(pin):
    table = {pin: [H48], "pcr1": [PCR[1]]}
    assert NitroSection.from_table(table) == NitroSection(**{pin: (H48,), "pcr1": (PCR[1],)})


# ---- 4. no silently dropped pins; MRSIGNER needs ISVPRODID -----------------------------------


@pytest.mark.parametrize("measurement, table", [
    (H32, {"sgx": {"mrsigner": [H32], "isvprodid": 1}}),
    (H48, {"snp": {"measurement": [H48]}}),
    (H48, {"tdx": tdx_code_pin()}),
])
def test_a_top_level_pin_that_a_platform_table_would_drop_is_refused(measurement, table):
    with pytest.raises(PolicyError, match="ambiguous"):
        policy_from_mapping({"measurements": [measurement]} | table)
    section = next(iter(table.values()))
    name = next(iter(table))
    with pytest.raises(PolicyError, match="ambiguous"):
        Policy(measurements=(measurement,), platforms={name: SECTIONS[name](**_as_kwargs(section, name))})


def test_a_top_level_pin_for_a_platform_without_a_table_still_loads():
    policy = policy_from_mapping({"measurements": [H32], "snp": {"measurement": [H48]}})
    assert policy.measurements == (H32,) and policy_from_toml(policy_to_toml(policy)) == policy


def test_top_level_minimums_that_apply_to_nothing_are_refused():
    with pytest.raises(PolicyError, match="min_security_version"):
        policy_from_mapping({"min_security_version": 3, "sgx": sgx_code_pin()})
    with pytest.raises(PolicyError, match="debug_allowed"):
        policy_from_mapping({"debug_allowed": True, "sgx": sgx_code_pin()})


def test_mrsigner_alone_is_not_a_pin():
    _refused_both_ways("sgx", {"mrsigner": [H32]}, "mrsigner without isvprodid")


def test_mrsigner_with_isvprodid_refuses_another_product_of_the_same_signer():
    signer = hashlib.sha256(b"fake signer").digest().hex()
    policy = policy_from_mapping({"sgx": {"mrsigner": [signer], "isvprodid": 1, "min_isvsvn": 2}})
    assert policy.section("sgx").min_isvsvn == 2
    verify_evidence("sgx", QE.sgx_quote(isvprodid=1, isvsvn=2, report_data=RD), policy, expected_report_data=RD,
                    now=NOW, trust=PKI.trust(), collateral=SGX_COLLATERAL)
    with pytest.raises(PolicyViolation) as info:
        verify_evidence("sgx", QE.sgx_quote(isvprodid=7, isvsvn=1, report_data=RD), policy,
                        expected_report_data=RD, now=NOW, trust=PKI.trust(), collateral=SGX_COLLATERAL)
    assert list(info.value.fields) == ["sgx.isvprodid", "sgx.isvsvn"]


# ---- 5. SEV-SNP: VMPL by default, MIGRATE_MA, LAUNCH_TCB -------------------------------------


@pytest.fixture(scope="module")
def amd() -> FakeAmd:
    return FakeAmd(now=NOW)


def _snp_fields(amd: FakeAmd, table: dict[str, Any], **fields: Any) -> list[str]:
    fields.setdefault("measurement", bytes.fromhex(H48))
    ev = amd.evidence("Genoa", "vcek", **fields)
    inputs = VerificationInputs(now=NOW, extra_certs=ev.certs, trust=amd.trust(),
                                collateral={"crls": [amd.crl("Genoa")]})
    verified = SNP.verify(ev.report, inputs)
    return [v.field for v in SNP.violations(verified, SnpPolicy.from_table(table), inputs)]


def test_vmpl_is_checked_by_default(amd):
    # A report requested from VMPL 1 (e.g. by a paravisor's guest OS) was accepted by a table
    # that does not mention vmpl.
    assert SnpPolicy(measurement=(H48,)).vmpl == (0,)
    assert _snp_fields(amd, {"measurement": [H48]}, vmpl=1) == ["snp.vmpl"]
    assert _snp_fields(amd, {"measurement": [H48], "vmpl": [0, 1]}, vmpl=1) == []


def test_a_migration_agent_is_refused_unless_allowed(amd):
    migrate = (1 << 17) | (1 << 18)
    assert _snp_fields(amd, {"measurement": [H48]}, policy=migrate) == ["snp.policy.migrate_ma"]
    assert _snp_fields(amd, {"measurement": [H48], "migration_agent_allowed": True}, policy=migrate) == []


def test_a_guest_launched_on_old_firmware_and_hot_updated_is_refused(amd):
    current = {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    old = encode_tcb(current | {"snp": 5}, "Genoa")
    table = {"measurement": [H48], "min_tcb": {"snp": 8}}
    assert _snp_fields(amd, table) == []
    assert _snp_fields(amd, table, launch_tcb=old) == ["snp.launch_tcb.snp"]
    # An explicit minimum launch TCB decouples the two; {} states that launch is not checked.
    assert _snp_fields(amd, table | {"min_launch_tcb": {"snp": 5}}, launch_tcb=old) == []
    assert _snp_fields(amd, table | {"min_launch_tcb": {}}, launch_tcb=old) == []


def test_the_launch_tcb_minimum_round_trips():
    for table in ({"measurement": [H48], "min_tcb": {"snp": 8}},
                  {"measurement": [H48], "min_tcb": {"snp": 8}, "min_launch_tcb": {"snp": 5}},
                  {"measurement": [H48], "min_tcb": {"snp": 8}, "min_launch_tcb": {}}):
        section = SnpPolicy.from_table(table)
        assert SnpPolicy.from_table(section.to_table()) == section
        assert policy_from_toml(policy_to_toml(Policy(measurements=(), platforms={"snp": section}))).section("snp") == section
    assert SnpPolicy.from_table({"measurement": [H48], "min_tcb": {"snp": 8}}).min_launch_tcb == {"snp": 8}
    with pytest.raises(PolicyError, match=r"min_launch_tcb\.snp"):
        SnpPolicy.from_table({"measurement": [H48], "min_launch_tcb": {"snp": 256}})


# ---- the top-level route: TDX and SEV-SNP only through their tables --------------------------


def test_a_td_whose_mrtd_is_on_the_top_level_allow_list_is_refused_without_a_tdx_table():
    # Same firmware (MRTD), any software: the top-level allow-list cannot tell them apart.
    policy = policy_from_mapping({"measurements": [h("td").hex()], "nonce_required": True})
    with pytest.raises(PolicyViolation) as info:
        verify_evidence("tdx", QE.tdx_quote(rtmr1=h("attacker kernel"), report_data=RD), policy,
                        expected_report_data=RD, now=NOW, trust=PKI.trust())
    assert list(info.value.fields) == ["platform"] and "[tdx] table" in str(info.value)


def test_an_snp_guest_at_vmpl_1_is_refused_on_the_top_level_route(amd):
    ev = amd.evidence("Genoa", "vcek", measurement=bytes.fromhex(H48), vmpl=1)
    policy = policy_from_mapping({"measurements": [H48], "nonce_required": False})
    with pytest.raises(PolicyViolation) as info:
        verify_evidence("snp", ev.report, policy, expected_report_data=None, now=NOW, certs=ev.certs,
                        trust=amd.trust())
    assert list(info.value.fields) == ["platform"] and "[snp] table" in str(info.value)


# ---- 6. the Quoting Enclave of each quote type, without collateral ----------------------------


@pytest.mark.parametrize("quote_type, qe_mrsigner, qe_isvprodid", [
    ("sgx", TD_QE_MRSIGNER, 2),   # the TD QE's report behind an SGX quote
    ("tdx", SGX_QE_MRSIGNER, 1),  # the SGX QE3's report behind a TDX quote
    ("sgx", SGX_QE_MRSIGNER, 2),  # the right signer, another of its products
], ids=["TD QE for SGX", "SGX QE for TDX", "wrong QE product"])
def test_each_quote_type_needs_its_own_quoting_enclave_even_without_collateral(quote_type, qe_mrsigner, qe_isvprodid):
    other = FakeQuotingEnclave(PKI, qe_mrsigner=qe_mrsigner, qe_isvprodid=qe_isvprodid)
    quote = other.sgx_quote(report_data=RD) if quote_type == "sgx" else other.tdx_quote(report_data=RD)
    table = sgx_code_pin() if quote_type == "sgx" else tdx_code_pin()
    policy = policy_from_mapping({quote_type: table})
    with pytest.raises(EvidenceInvalid, match=f"is not the Quoting Enclave of {quote_type.upper()} quotes"):
        verify_evidence(quote_type, quote, policy, expected_report_data=RD, now=NOW, trust=PKI.trust())
