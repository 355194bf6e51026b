"""The [tdx] policy table: strict parsing (every problem a PolicyError naming `[tdx] key`),
defaults, and a lossless round trip through TOML."""

from __future__ import annotations

import pytest

from attestation.errors import PolicyError
from attestation.policy import policy_from_toml, policy_to_toml
from attestation.tdx import TdxPolicy
from attestation.tdx.policy import CODE_PIN_KEYS, MEASUREMENT_KEYS

H48 = "cd" * 48
PIN = {key: ["ef" * 48] for key in CODE_PIN_KEYS}


def test_defaults_are_safe():
    p = TdxPolicy.from_table(PIN)
    assert p.debug_allowed is False and p.min_tee_tcb_svn is None
    assert p.accepted_tcb_statuses == ("UpToDate",) and p.accepted_advisory_ids == ()
    assert p.require_collateral is True and p.collateral_grace_seconds == 0 and p.allow_expired_collateral is False
    assert all(getattr(p, key) is None for key in MEASUREMENT_KEYS if key not in CODE_PIN_KEYS)


@pytest.mark.parametrize("key", MEASUREMENT_KEYS)
def test_measurement_lists(key):
    assert getattr(TdxPolicy.from_table(PIN | {key: [H48, H48.upper()]}), key) == (bytes.fromhex(H48),)
    assert getattr(TdxPolicy.from_table(PIN | {key: H48}), key) == (bytes.fromhex(H48),)
    for bad in ([], ["cd" * 32], [H48 + "0"], "x" * 96, [None]):
        with pytest.raises(PolicyError, match=rf"\[tdx\] {key}\b"):
            TdxPolicy.from_table({key: bad})


@pytest.mark.parametrize("table, key", [
    ({"mrtds": [H48]}, "mrtds"),
    ({"xfam": "00" * 16}, "xfam"),
    ({"xfam_mask": "ff" * 8}, "xfam_mask"),
    ({"xfam": "03" + "00" * 7, "xfam_mask": "01" + "00" * 7}, "xfam"),
    ({"td_attributes": "01"}, "td_attributes"),
    ({"td_attributes_mask": "01" + "00" * 7}, "td_attributes_mask"),
    ({"debug_allowed": 0}, "debug_allowed"),
    ({"min_tee_tcb_svn": "03"}, "min_tee_tcb_svn"),
    ({"min_tee_tcb_svn": 3}, "min_tee_tcb_svn"),
    ({"accepted_tcb_statuses": ["uptodate"]}, "accepted_tcb_statuses"),
    ({"accepted_tcb_statuses": ["Revoked"]}, "accepted_tcb_statuses"),
    ({"accepted_advisory_ids": [1]}, "accepted_advisory_ids"),
    ({"allow_expired_collateral": 1}, "allow_expired_collateral"),
    ({"require_collateral": None}, "require_collateral"),
    ({"collateral_grace_seconds": 2592001}, "collateral_grace_seconds"),
    ({"collateral_grace_seconds": 1.5}, "collateral_grace_seconds"),
    ({"collateral_grace_seconds": 1, "allow_expired_collateral": True}, "allow_expired_collateral"),
])
def test_bad_values_name_the_key(table, key):
    with pytest.raises(PolicyError, match=rf"\[tdx\] {key}\b"):
        TdxPolicy.from_table(table)


def test_round_trip_through_the_policy_file():
    table = {key: [H48] for key in MEASUREMENT_KEYS} | {
        "xfam": "e702060000000000", "xfam_mask": "ffffffffffffffff", "td_attributes": "0000001000000000",
        "td_attributes_mask": "0100001000000000", "debug_allowed": False, "min_tee_tcb_svn": "03000500" + "00" * 12,
        "accepted_tcb_statuses": ["UpToDate", "OutOfDate"], "accepted_advisory_ids": ["INTEL-SA-00837"],
        "require_collateral": True, "allow_expired_collateral": True}
    p = TdxPolicy.from_table(table)
    assert TdxPolicy.from_table(p.to_table()) == p
    text = "[tdx]\n" + "\n".join(
        f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v).replace(chr(39), chr(34))}" for k, v in table.items())
    policy = policy_from_toml(text)
    assert policy.section("tdx") == p
    assert policy_from_toml(policy_to_toml(policy)).section("tdx") == p
    with pytest.raises(PolicyError, match=r"\[tdx\] rtmr4"):
        policy_from_toml('[tdx]\nrtmr4 = []\n')
