"""The [sgx] policy table: strict parsing (every problem a PolicyError naming `[sgx] key`),
defaults, and a lossless round trip through TOML."""

from __future__ import annotations

import pytest

from attestation.errors import PolicyError
from attestation.policy import policy_from_toml, policy_to_toml
from attestation.sgx import SgxPolicy

H32 = "ab" * 32


def test_defaults_are_safe():
    p = SgxPolicy.from_table({"mrenclave": [H32]})
    assert p.debug_allowed is False
    assert p.accepted_tcb_statuses == ("UpToDate",) and p.accepted_advisory_ids == ()
    # Fail closed: no collateral is a violation, and collateral is not accepted past its nextUpdate.
    assert p.require_collateral is True and p.collateral_grace_seconds == 0 and p.allow_expired_collateral is False
    assert p.mrsigner is None and p.isvprodid is None and p.min_isvsvn == 0


def test_values_are_normalised():
    p = SgxPolicy.from_table({"mrenclave": H32.upper(), "mrsigner": [H32, H32], "isvprodid": 7,
                              "xfrm": "0300000000000000", "miscselect": 1})
    assert p.mrenclave == (bytes.fromhex(H32),) and p.mrsigner == (bytes.fromhex(H32),)
    assert p.isvprodid == (7,)
    assert p.xfrm_mask == b"\xff" * 8 and p.miscselect_mask == 0xFFFFFFFF


@pytest.mark.parametrize("table, key", [
    ({"mrenclaves": [H32]}, "mrenclaves"),
    ({"mrenclave": [H32[:-2]]}, "mrenclave"),
    ({"mrenclave": ["zz" * 32]}, "mrenclave"),
    ({"mrenclave": []}, "mrenclave"),
    ({"mrenclave": 5}, "mrenclave"),
    ({"mrsigner": [H32, 1]}, "mrsigner"),
    ({"isvprodid": "1"}, "isvprodid"),
    ({"isvprodid": 70000}, "isvprodid"),
    ({"isvprodid": [True]}, "isvprodid"),
    ({"min_isvsvn": -1}, "min_isvsvn"),
    ({"min_isvsvn": 1.0}, "min_isvsvn"),
    ({"debug_allowed": 1}, "debug_allowed"),
    ({"debug_allowed": "false"}, "debug_allowed"),
    ({"attributes": "00" * 8}, "attributes"),
    ({"attributes_mask": "ff" * 16}, "attributes_mask"),
    ({"attributes": "07" + "00" * 15, "attributes_mask": "05" + "00" * 15}, "attributes"),
    ({"xfrm": "00" * 16}, "xfrm"),
    ({"xfrm_mask": "ff" * 8}, "xfrm_mask"),
    ({"miscselect": 2**32}, "miscselect"),
    ({"miscselect": 3, "miscselect_mask": 1}, "miscselect"),
    ({"miscselect_mask": 1}, "miscselect_mask"),
    ({"accepted_tcb_statuses": ["UpToDate", "Fine"]}, "accepted_tcb_statuses"),
    ({"accepted_tcb_statuses": ["Revoked"]}, "accepted_tcb_statuses"),
    ({"accepted_tcb_statuses": []}, "accepted_tcb_statuses"),
    ({"accepted_tcb_statuses": "UpToDate"}, "accepted_tcb_statuses"),
    ({"accepted_advisory_ids": [""]}, "accepted_advisory_ids"),
    ({"accepted_advisory_ids": "INTEL-SA-00334"}, "accepted_advisory_ids"),
    ({"allow_expired_collateral": 1}, "allow_expired_collateral"),
    ({"require_collateral": "yes"}, "require_collateral"),
    ({"collateral_grace_seconds": -1}, "collateral_grace_seconds"),
    ({"collateral_grace_seconds": 2592001}, "collateral_grace_seconds"),
    ({"collateral_grace_seconds": True}, "collateral_grace_seconds"),
    ({"collateral_grace_seconds": 60, "allow_expired_collateral": True}, "allow_expired_collateral"),
])
def test_bad_values_name_the_key(table, key):
    with pytest.raises(PolicyError, match=rf"\[sgx\] {key}\b"):
        SgxPolicy.from_table(table)


def test_round_trip_through_the_policy_file():
    table = {"mrenclave": [H32], "mrsigner": [H32], "isvprodid": [1, 2], "min_isvsvn": 3, "debug_allowed": True,
             "attributes": "05" + "00" * 15, "attributes_mask": "07" + "00" * 15, "xfrm": "03" + "00" * 7,
             "xfrm_mask": "0f" + "00" * 7, "miscselect": 1, "miscselect_mask": 3,
             "accepted_tcb_statuses": ["UpToDate", "SWHardeningNeeded"], "accepted_advisory_ids": ["INTEL-SA-00334"],
             "require_collateral": True, "allow_expired_collateral": True}
    p = SgxPolicy.from_table(table)
    assert SgxPolicy.from_table(p.to_table()) == p
    assert SgxPolicy.from_table(SgxPolicy.from_table({"mrenclave": [H32]}).to_table()) == SgxPolicy(mrenclave=(bytes.fromhex(H32),))
    text = "[sgx]\n" + "\n".join(
        f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v).replace(chr(39), chr(34))}" for k, v in table.items())
    policy = policy_from_toml(text)
    assert policy.section("sgx") == p
    assert policy_from_toml(policy_to_toml(policy)).section("sgx") == p


def test_policy_file_errors_name_the_table():
    with pytest.raises(PolicyError, match=r"\[sgx\] mrenclave"):
        policy_from_toml('[sgx]\nmrenclave = ["00"]\n')
    with pytest.raises(PolicyError, match=r"\[sgx\] nonsense"):
        policy_from_toml('[sgx]\nnonsense = 1\n')
