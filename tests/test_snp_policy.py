"""The ``[snp]`` policy table and its validation, alone and through the front door.

Every policy field gets a report (from the fake AMD) that violates it, and the violation names
the field, the report's value and the expectation; all violations are reported at once.
"""

from __future__ import annotations

from datetime import datetime, UTC

import pytest

from attestation.errors import PolicyError, PolicyViolation
from attestation.platforms import VerificationInputs
from attestation.policy import policy_from_toml, policy_to_toml
from attestation.snp import PLATFORM, SnpPolicy
from attestation.snp.abi import encode_tcb
from attestation.testing.snp import FakeAmd
from attestation.verify import verify_evidence

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
M = "42" * 48
M2 = "43" * 48
H = "11" * 32
K = "22" * 48
A = "33" * 48
SMT, RESERVED, MIGRATE, DEBUG = 1 << 16, 1 << 17, 1 << 18, 1 << 19


AT = VerificationInputs(now=NOW)  # what violations() reads: the time collateral freshness is judged at


@pytest.fixture(scope="module")
def amd() -> FakeAmd:
    return FakeAmd(now=NOW)


def _crls(amd, product):
    """AMD KDS's CRL for the product's ARK (revoking nothing), as a policy requires by default."""
    return [amd.crl(product)]


def _verified(amd, product="Milan", signing_key="vcek", **fields):
    fields.setdefault("measurement", bytes.fromhex(M))
    ev = amd.evidence(product, signing_key, **fields)
    return PLATFORM.verify(ev.report, VerificationInputs(now=NOW, extra_certs=ev.certs, trust=amd.trust(),
                                                         collateral={"crls": _crls(amd, product)}))


def _fields(found) -> list[str]:
    return [v.field for v in found]


# --- the table --------------------------------------------------------------------------------


def test_defaults_are_the_safe_ones():
    section = SnpPolicy.from_table({"measurement": [M]})
    assert section.debug_allowed is False and section.migration_agent_allowed is False
    assert section.smt_allowed is True
    assert section.allowed_signing_keys == ("vcek", "vlek")
    assert section.products == () and section.vmpl == (0,) and section.min_tcb == {} and section.min_guest_svn == 0
    assert section.require_collateral is True and section.collateral_grace_seconds == 0


def test_a_full_table_round_trips_through_toml():
    text = f"""
measurements = []
[snp]
measurement = ["{M.upper()}", "{M2}", "{M}"]
host_data = ["{H}"]
id_key_digest = ["{K}"]
author_key_digest = ["{A}"]
debug_allowed = true
migration_agent_allowed = true
smt_allowed = false
vmpl = [1, 0, 1]
min_guest_svn = 3
allowed_signing_keys = ["VLEK"]
products = ["genoa", "Milan"]
[snp.min_tcb]
bootloader = 3
tee = 0
snp = 8
microcode = 115
fmc = 2
"""
    policy = policy_from_toml(text)
    section = policy.section("snp")
    assert isinstance(section, SnpPolicy)
    assert section.measurement == (M, M2)  # lowercased, de-duplicated, in order
    assert section.vmpl == (0, 1) and section.products == ("Milan", "Genoa")
    assert section.allowed_signing_keys == ("vlek",)
    assert section.min_tcb == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115, "fmc": 2}
    again = policy_from_toml(policy_to_toml(policy))
    assert again.section("snp") == section
    assert SnpPolicy.from_table(section.to_table()) == section


@pytest.mark.parametrize(
    "table, complaint",
    [
        ({"measurement": [M], "colour": "red"}, r"\[snp\] unknown policy key 'colour'"),
        ({"measurement": M}, r"\[snp\] measurement must be a list"),
        ({"measurement": [M[:-2]]}, r"\[snp\] measurement item 0 must be 96 hex digits"),
        ({"measurement": ["zz" * 48]}, r"\[snp\] measurement item 0 must be 96 hex digits"),
        ({"measurement": []}, r"\[snp\] measurement is an empty list; omit the key"),
        ({"measurement": [M], "host_data": [M]}, r"\[snp\] host_data item 0 must be 64 hex digits"),
        ({"measurement": [M], "id_key_digest": [1]}, r"\[snp\] id_key_digest item 0 must be 96 hex digits"),
        ({"measurement": [M], "debug_allowed": 1}, r"\[snp\] debug_allowed must be true or false"),
        ({"measurement": [M], "migration_agent_allowed": "no"}, r"\[snp\] migration_agent_allowed must be true or false"),
        ({"measurement": [M], "smt_allowed": None}, r"\[snp\] smt_allowed must be true or false"),
        ({"measurement": [M], "vmpl": 0}, r"\[snp\] vmpl must be a list"),
        ({"measurement": [M], "vmpl": [4]}, r"\[snp\] vmpl must be in 0..3"),
        ({"measurement": [M], "vmpl": [True]}, r"\[snp\] vmpl must be an integer"),
        ({"measurement": [M], "min_guest_svn": -1}, r"\[snp\] min_guest_svn must be in 0..4294967295"),
        ({"measurement": [M], "min_tcb": 3}, r"\[snp\] min_tcb must be a table"),
        ({"measurement": [M], "min_tcb": {"ucode": 1}}, r"\[snp\] unknown policy key 'min_tcb.ucode'"),
        ({"measurement": [M], "min_tcb": {"snp": 256}}, r"\[snp\] min_tcb.snp must be in 0..255"),
        ({"measurement": [M], "min_tcb": {"tee": "1"}}, r"\[snp\] min_tcb.tee must be an integer"),
        ({"measurement": [M], "allowed_signing_keys": ["ask"]}, r"\[snp\] allowed_signing_keys item 0 must be"),
        ({"measurement": [M], "allowed_signing_keys": []}, r"\[snp\] allowed_signing_keys is an empty list"),
        ({"measurement": [M], "products": ["Venice"]}, r"\[snp\] products item 0 must be one of Milan, Genoa, Turin"),
        ({"host_data": [H]}, r"\[snp\] measurement is missing: pin the guest"),
        ({}, r"\[snp\] measurement is missing"),
    ],
)
def test_every_bad_key_or_value_is_refused_naming_it(table, complaint):
    with pytest.raises(PolicyError, match=complaint):
        SnpPolicy.from_table(table)


def test_an_id_key_or_author_digest_alone_pins_the_guest():
    assert SnpPolicy.from_table({"id_key_digest": [K]}).id_key_digest == (K,)
    assert SnpPolicy.from_table({"author_key_digest": [A]}).author_key_digest == (A,)


def test_the_policy_file_names_the_table_in_errors():
    with pytest.raises(PolicyError, match=r"\[snp\] unknown policy key 'no_such_key'"):
        policy_from_toml(f'[snp]\nmeasurement = ["{M}"]\nno_such_key = 1\n')


def test_direct_construction_is_as_strict_as_the_table():
    with pytest.raises(PolicyError, match=r"\[snp\] vmpl must be in 0..3"):
        SnpPolicy(measurement=(M,), vmpl=(9,))
    assert SnpPolicy(measurement=(M.upper(),)).measurement == (M,)


# --- validation ---------------------------------------------------------------------------------


def test_a_report_that_meets_every_field_has_no_violations(amd):
    verified = _verified(amd, "Turin", host_data=bytes.fromhex(H), id_key_digest=bytes.fromhex(K),
                         author_key_digest=bytes.fromhex(A), policy=RESERVED, vmpl=1, guest_svn=5)
    section = SnpPolicy.from_table({
        "measurement": [M2, M], "host_data": [H], "id_key_digest": [K], "author_key_digest": [A],
        "smt_allowed": False, "vmpl": [1], "min_guest_svn": 5, "products": ["Turin"], "allowed_signing_keys": ["vcek"],
        "min_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115, "fmc": 1},
    })
    assert PLATFORM.violations(verified, section, AT) == []


@pytest.mark.parametrize(
    "table, fields, field, value, expected",
    [
        ({"measurement": [M2]}, {}, "snp.measurement", M, M2),
        ({"measurement": [M], "host_data": [H]}, {}, "snp.host_data", "00" * 32, H),
        ({"measurement": [M], "id_key_digest": [K]}, {}, "snp.id_key_digest", "00" * 48, K),
        ({"measurement": [M], "author_key_digest": [A]}, {}, "snp.author_key_digest", "00" * 48, A),
        ({"measurement": [M]}, {"policy": RESERVED | DEBUG}, "snp.policy.debug", "true", "debug_allowed = false"),
        ({"measurement": [M]}, {"policy": RESERVED | MIGRATE}, "snp.policy.migrate_ma", "true",
         "migration_agent_allowed = false"),
        ({"measurement": [M], "smt_allowed": False}, {"policy": RESERVED | SMT}, "snp.policy.smt", "true",
         "smt_allowed = false"),
        ({"measurement": [M], "vmpl": [0]}, {"vmpl": 2}, "snp.vmpl", "2", "one of [0]"),
        ({"measurement": [M], "min_guest_svn": 7}, {"guest_svn": 6}, "snp.guest_svn", "6", ">= 7"),
        ({"measurement": [M], "min_tcb": {"bootloader": 4}}, {}, "snp.reported_tcb.bootloader", "3", ">= 4"),
        ({"measurement": [M], "min_tcb": {"tee": 1}}, {}, "snp.reported_tcb.tee", "0", ">= 1"),
        ({"measurement": [M], "min_tcb": {"snp": 9}}, {}, "snp.reported_tcb.snp", "8", ">= 9"),
        ({"measurement": [M], "min_tcb": {"microcode": 200}}, {}, "snp.reported_tcb.microcode", "115", ">= 200"),
        ({"measurement": [M], "allowed_signing_keys": ["vlek"]}, {}, "snp.signing_key", "vcek", "one of [vlek]"),
        ({"measurement": [M], "products": ["Genoa", "Turin"]}, {}, "snp.product", "Milan", "one of [Genoa, Turin]"),
    ],
)
def test_each_policy_field_is_checked_and_named(amd, table, fields, field, value, expected):
    verified = _verified(amd, **fields)
    found = PLATFORM.violations(verified, SnpPolicy.from_table(table), AT)
    assert _fields(found) == [field]
    assert value in found[0].value and expected in found[0].expected


def test_the_fmc_minimum_applies_to_turin_only(amd):
    section = SnpPolicy.from_table({"measurement": [M], "min_tcb": {"fmc": 2}})
    turin = _verified(amd, "Turin")
    assert _fields(PLATFORM.violations(turin, section, AT)) == ["snp.reported_tcb.fmc"]
    assert PLATFORM.violations(_verified(amd, "Genoa"), section, AT) == []


def test_a_vlek_report_against_a_vcek_only_policy(amd):
    section = SnpPolicy.from_table({"measurement": [M], "allowed_signing_keys": ["vcek"]})
    assert _fields(PLATFORM.violations(_verified(amd, "Genoa", "vlek"), section, AT)) == ["snp.signing_key"]


def test_every_violation_is_reported_at_once(amd):
    verified = _verified(amd, policy=RESERVED | SMT | MIGRATE | DEBUG, vmpl=3, guest_svn=0)
    section = SnpPolicy.from_table({
        "measurement": [M2], "host_data": [H], "smt_allowed": False, "vmpl": [0], "min_guest_svn": 1,
        "min_tcb": {"bootloader": 9, "microcode": 200}, "products": ["Genoa"], "allowed_signing_keys": ["vlek"],
    })
    assert _fields(PLATFORM.violations(verified, section, AT)) == [
        "snp.measurement", "snp.host_data", "snp.policy.debug", "snp.policy.migrate_ma", "snp.policy.smt",
        "snp.vmpl", "snp.guest_svn", "snp.reported_tcb.bootloader", "snp.reported_tcb.microcode",
        "snp.signing_key", "snp.product",
    ]


# --- through the front door -----------------------------------------------------------------


def _policy(extra: str = "") -> str:
    return f'nonce_required = true\n[snp]\nmeasurement = ["{M}"]\n{extra}'


def test_the_front_door_accepts_and_refuses_snp_evidence(amd):
    report_data = b"\x5c" * 64
    ev = amd.evidence("Genoa", measurement=bytes.fromhex(M), report_data=report_data, trailing=b"\x00" * 8)
    claims = verify_evidence("snp", ev.report, policy_from_toml(_policy()), expected_report_data=report_data,
                             now=NOW, certs=ev.certs, trust=amd.trust(), collateral={"crls": _crls(amd, "Genoa")})
    assert claims.platform == "snp" and claims.measurement.hex() == M and claims.issued_at is None
    assert claims.details["product"] == "Genoa" and claims.trailing_bytes == 8
    assert claims.to_json()["claims"]["reported_tcb"] == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}

    debug = amd.evidence("Genoa", measurement=bytes.fromhex(M), report_data=b"\x00" * 64, policy=RESERVED | DEBUG)
    with pytest.raises(PolicyViolation) as info:
        verify_evidence("snp", debug.report, policy_from_toml(_policy("[snp.min_tcb]\nsnp = 9\n")),
                        expected_report_data=report_data, now=NOW, certs=debug.certs, trust=amd.trust(),
                        collateral={"crls": _crls(amd, "Genoa")})
    assert set(info.value.fields) == {"report_data", "snp.policy.debug", "snp.reported_tcb.snp"}


def test_a_policy_without_an_snp_table_refuses_snp_evidence(amd):
    ev = amd.evidence("Milan", measurement=bytes.fromhex(M))
    policy = policy_from_toml(f'measurements = ["{"aa" * 32}"]\nnonce_required = false\n')
    with pytest.raises(PolicyViolation) as info:
        verify_evidence("snp", ev.report, policy, expected_report_data=None, now=NOW, certs=ev.certs,
                        trust=amd.trust())
    assert info.value.fields == ("platform",)  # the top-level route does not judge SEV-SNP at all


def test_reported_tcb_minimums_compare_per_component_not_as_a_number(amd):
    # microcode 115 > 100 but bootloader 3 < 4: a numeric comparison of the raw TCB would pass.
    verified = _verified(amd, "Milan")
    section = SnpPolicy.from_table({"measurement": [M], "min_tcb": {"bootloader": 4, "microcode": 100}})
    assert encode_tcb({"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}, "Milan") > encode_tcb(
        {"bootloader": 4, "tee": 0, "snp": 0, "microcode": 100}, "Milan")
    assert _fields(PLATFORM.violations(verified, section, AT)) == ["snp.reported_tcb.bootloader"]
