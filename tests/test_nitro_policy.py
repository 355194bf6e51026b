"""The [nitro] policy table (strict loading) and the Nitro validator (every violation at once)."""

from __future__ import annotations

from datetime import datetime, UTC

import pytest

from attestation.errors import PolicyError, PolicyViolation
from attestation.nitro import PLATFORM, NitroSection
from attestation.nitro.validate import violations
from attestation.testing.nitro import DEBUG_PCRS, FakeNitro, default_pcrs

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
PCRS = default_pcrs()
HEX = {i: v.hex() for i, v in PCRS.items()}
OTHER = "ab" * 48
pytestmark = pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")


@pytest.fixture(scope="module")
def fake() -> FakeNitro:
    return FakeNitro(now=NOW)


def _verified(fake, **fields):
    return PLATFORM.verify(fake.document(**fields), fake.inputs())


# -- loading -------------------------------------------------------------------------------------

def test_full_table_round_trips():
    table = {f"pcr{i}": [HEX.get(i, "00" * 48)] for i in range(9)}
    table |= {"module_id": ["i-0123456789abcdef0-enc*", "i-exact"], "debug_allowed": True}
    section = NitroSection.from_table(table)
    assert section.pcr0 == (HEX[0],)
    assert section.module_id == ("i-0123456789abcdef0-enc*", "i-exact")
    assert section.debug_allowed is True
    assert NitroSection.from_table(section.to_table()) == section


def test_defaults_and_normalisation():
    section = NitroSection.from_table({"pcr0": [HEX[0].upper(), HEX[0], "aa" * 32, "bb" * 64]})
    assert section.pcr0 == (HEX[0], "aa" * 32, "bb" * 64)
    assert section.debug_allowed is False and section.module_id is None and section.pcr1 is None
    assert section.to_table() == {"pcr0": [HEX[0], "aa" * 32, "bb" * 64], "debug_allowed": False}


@pytest.mark.parametrize("pin", ["pcr0", "pcr2"])
def test_any_code_pcr_pins(pin):
    assert getattr(NitroSection.from_table({pin: [OTHER]}), pin) == (OTHER,)


@pytest.mark.parametrize(
    "table, message",
    [
        ({"pcr0": [OTHER], "pcr9": [OTHER]}, r"unknown policy key \[nitro\] 'pcr9'"),
        ({"pcr0": [OTHER], "PCR0": [OTHER]}, r"unknown policy key \[nitro\] 'PCR0'"),
        ({"pcr0": [OTHER], "measurement": OTHER}, r"unknown policy key \[nitro\] 'measurement'"),
        ({"pcr0": OTHER}, r"\[nitro\] pcr0 must be a list of strings"),
        ({"pcr0": []}, r"\[nitro\] pcr0 is an empty list"),
        ({"pcr0": [48]}, r"\[nitro\] pcr0 item 0 must be a string"),
        ({"pcr0": ["ab" * 47]}, r"\[nitro\] pcr0 item 0 must be 64, 96 or 128 hex digits"),
        ({"pcr0": ["zz" * 48]}, r"\[nitro\] pcr0 item 0 must be 64, 96 or 128 hex"),
        ({"pcr0": [" " + "a" * 95]}, r"\[nitro\] pcr0 item 0"),
        ({"pcr0": [OTHER], "pcr3": [OTHER, "xyz"]}, r"\[nitro\] pcr3 item 1"),
        ({"pcr0": [OTHER], "debug_allowed": "false"}, r"\[nitro\] debug_allowed must be true or false"),
        ({"pcr0": [OTHER], "debug_allowed": 0}, r"\[nitro\] debug_allowed must be true or false"),
        ({"pcr0": [OTHER], "module_id": "i-abc"}, r"\[nitro\] module_id must be a list"),
        ({"pcr0": [OTHER], "module_id": []}, r"\[nitro\] module_id is an empty list"),
        ({"pcr0": [OTHER], "module_id": ["*"]}, r"\[nitro\] module_id item 0 .* matches every"),
        ({"pcr0": [OTHER], "module_id": [""]}, r"\[nitro\] module_id item 0 .* matches every"),
        ({"pcr0": [OTHER], "module_id": ["i-*-enc1"]}, r"\[nitro\] module_id item 0 .* only allowed at the end"),
        ({"pcr0": [OTHER], "module_id": [1]}, r"\[nitro\] module_id item 0 must be a string"),
        ({}, r"\[nitro\] must pin the enclave code"),
        ({"debug_allowed": False, "module_id": ["i-x"]}, r"\[nitro\] must pin the enclave code"),
        ({"pcr3": [OTHER], "pcr4": [OTHER]}, r"\[nitro\] must pin the enclave code"),
    ],
)
def test_strict_loading(table, message):
    with pytest.raises(PolicyError, match=message):
        NitroSection.from_table(table)


def test_not_a_table():
    with pytest.raises(PolicyError, match=r"\[nitro\]"):
        NitroSection.from_table(["pcr0"])


# -- validation ----------------------------------------------------------------------------------

def test_matching_document_has_no_violations(fake):
    verified = _verified(fake)
    table = {f"pcr{i}": [OTHER, HEX[i]] for i in range(9)} | {"module_id": [fake.module_id]}
    assert violations(verified, NitroSection.from_table(table), fake.inputs()) == []
    assert PLATFORM.violations(verified, NitroSection.from_table({"pcr0": [HEX[0]]}), fake.inputs()) == []


@pytest.mark.parametrize("index", range(9))
def test_each_pcr_is_checked(fake, index):
    verified = _verified(fake)
    section = NitroSection.from_table({"pcr0": [HEX[0]], f"pcr{index}": [OTHER]})
    found = violations(verified, section, fake.inputs())
    assert [v.field for v in found] == [f"nitro.pcr{index}"]
    assert found[0].value == HEX[index] and OTHER in found[0].expected


def test_absent_pcr_is_a_violation(fake):
    verified = _verified(fake, pcrs={0: PCRS[0], 1: PCRS[1]})
    found = violations(verified, NitroSection.from_table({"pcr0": [HEX[0]], "pcr8": [HEX[8]]}), fake.inputs())
    assert [(v.field, v.value) for v in found] == [("nitro.pcr8", "absent from the document")]


@pytest.mark.parametrize(
    "patterns, ok",
    [
        (["i-0123456789abcdef0-enc0123456789abcdef"], True),
        (["i-0123456789abcdef0-enc*"], True),
        (["i-0123456789abcdef0-*"], True),
        (["i-other", "i-0123456789abcdef0-enc*"], True),
        (["i-0123456789abcdef0-enc"], False),            # exact, not a prefix
        (["i-0123456789abcdef0-enc0123456789abcdef0"], False),
        (["i-0123456789abcdef1-enc*"], False),
        (["I-0123456789ABCDEF0-ENC*"], False),           # case matters
    ],
)
def test_module_id(fake, patterns, ok):
    verified = _verified(fake)
    found = violations(verified, NitroSection.from_table({"pcr0": [HEX[0]], "module_id": patterns}), fake.inputs())
    assert (found == []) is ok
    if not ok:
        assert [(v.field, v.value) for v in found] == [("nitro.module_id", fake.module_id)]


def test_debug_refused_unless_allowed(fake):
    verified = _verified(fake, pcrs=DEBUG_PCRS)
    assert verified.debug is True
    zero = "00" * 48
    found = violations(verified, NitroSection.from_table({"pcr0": [zero]}), fake.inputs())
    assert [v.field for v in found] == ["nitro.debug"]
    assert "PCR0, PCR1, PCR2 all zero" in found[0].value
    assert violations(verified, NitroSection.from_table({"pcr0": [zero], "debug_allowed": True}), fake.inputs()) == []
    # No [nitro] table: debug is still refused.
    assert [v.field for v in violations(verified, None, fake.inputs())] == ["nitro.debug"]
    assert violations(_verified(fake), None, fake.inputs()) == []


def test_every_violation_at_once(fake):
    verified = _verified(fake, pcrs=DEBUG_PCRS)
    table = {"pcr0": [OTHER], "pcr1": [OTHER], "pcr2": [OTHER], "pcr8": [OTHER], "module_id": ["i-nope*"]}
    found = violations(verified, NitroSection.from_table(table), fake.inputs())
    assert [v.field for v in found] == ["nitro.pcr0", "nitro.pcr1", "nitro.pcr2", "nitro.pcr8",
                                        "nitro.module_id", "nitro.debug"]
    message = str(PolicyViolation(found))
    assert "6 violations" in message and "nitro.module_id" in message


# -- through the front door ----------------------------------------------------------------------

def test_front_door_with_a_nitro_table(fake):
    """The policy file's [nitro] table reaches NitroSection, and verify_evidence applies it."""
    from attestation.policy import policy_from_toml
    from attestation.verify import verify_evidence

    statement = bytes(range(64))
    doc = fake.document(user_data=statement)
    policy = policy_from_toml(f'[nitro]\npcr0 = ["{HEX[0]}"]\nmodule_id = ["{fake.module_id[:20]}*"]\n')
    assert policy.section("nitro") == NitroSection(pcr0=(HEX[0],), module_id=(fake.module_id[:20] + "*",))
    claims = verify_evidence("nitro", doc, policy, expected_report_data=statement, now=NOW, trust=fake.trust)
    assert claims.measurement == PCRS[0] and claims.report_data == statement and claims.issued_at == NOW

    with pytest.raises(PolicyViolation) as refused:
        verify_evidence("nitro", fake.document(user_data=statement, pcrs=DEBUG_PCRS), policy,
                        expected_report_data=bytes(64), now=NOW, trust=fake.trust)
    assert {"nitro.pcr0", "nitro.debug", "report_data"} <= set(refused.value.fields)

    with pytest.raises(PolicyError, match=r"\[nitro\]"):
        policy_from_toml('[nitro]\npcr0 = ["xyz"]\n')
