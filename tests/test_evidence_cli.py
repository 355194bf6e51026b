"""`enclaveq evidence verify`: formats detected, exit codes, the JSON contract."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone

import pytest

from attestation.evidence_cli import decode_evidence
from attestation.sim.provider import SimProvider

from .processes import enclaveq
from .support import SimTEE

NOW = datetime(2027, 6, 1, 12, 0, tzinfo=timezone.utc)  # inside the fresh sim chain's validity


@pytest.mark.parametrize("encode, name", [
    (lambda b: b, "raw"), (lambda b: b.hex().encode(), "hex"), (lambda b: b.hex().upper().encode() + b"\n", "hex"),
    (lambda b: base64.b64encode(b), "base64"), (lambda b: base64.urlsafe_b64encode(b).rstrip(b"="), "base64"),
    (lambda b: base64.encodebytes(b), "base64"),
])
def test_evidence_files_may_be_raw_hex_or_base64(encode, name):
    original = bytes(range(256)) * 3
    assert decode_evidence(encode(original)) == (original, name)


@pytest.fixture
def sim_evidence(tmp_path):
    tee = SimTEE(tmp_path)
    report_data = bytes(range(64))
    evidence = SimProvider(tee.dir, tee.measurement, clock=lambda: NOW).evidence(report_data)
    policy = tmp_path / "policy.toml"
    enclaveq("policy", "init", "--sim-dir", str(tee.dir), "--out", str(policy))
    path = tmp_path / "evidence.b64"
    path.write_bytes(base64.b64encode(evidence))
    return {"path": path, "policy": policy, "report_data": report_data, "evidence": evidence, "tee": tee}


def test_simulated_evidence_verifies_against_its_policy_as_json(sim_evidence):
    result = enclaveq("evidence", "verify", str(sim_evidence["path"]), "--platform", "sim", "--policy",
                      str(sim_evidence["policy"]), "--at", "2027-06-01T12:00:30Z", "--report-data",
                      sim_evidence["report_data"].hex(), "--json")
    doc = json.loads(result.stdout)
    assert doc["verified"] is True and doc["errors"] == [] and doc["encoding"] == "base64"
    assert doc["measurement"] == sim_evidence["tee"].measurement.hex()
    assert doc["report_data"] == sim_evidence["report_data"].hex() and doc["debug"] is False
    assert [c["subject"] for c in doc["chain"]][-1].startswith("CN=enclaveq SIMULATION root")


def test_a_violated_policy_exits_1_listing_each_violation(sim_evidence):
    result = enclaveq("evidence", "verify", str(sim_evidence["path"]), "--platform", "sim", "--policy",
                      str(sim_evidence["policy"]), "--at", "2027-06-02T12:00:00Z", "--report-data", "00" * 64,
                      "--json", check=False)
    assert result.returncode == 1
    doc = json.loads(result.stdout)
    assert doc["verified"] is False
    assert {e["field"] for e in doc["errors"]} == {"issued_at", "report_data"}
    assert all(e["code"] == "policy" for e in doc["errors"])


def test_tampered_evidence_exits_1_with_a_typed_error(sim_evidence, tmp_path):
    tampered = bytearray(sim_evidence["evidence"])
    tampered[40] ^= 1
    path = tmp_path / "tampered.bin"
    path.write_bytes(bytes(tampered))
    result = enclaveq("evidence", "verify", str(path), "--platform", "sim", "--policy", str(sim_evidence["policy"]),
                      "--at", "2027-06-01T12:00:30Z", "--json", check=False)
    assert result.returncode == 1
    assert json.loads(result.stdout)["errors"][0]["code"] in ("malformed", "invalid")


@pytest.mark.parametrize("args", [
    ["--platform", "quantum"], ["--platform", "sgx", "--at", "yesterday"], ["--platform", "sim"],
    ["--platform", "sgx", "--report-data", "xyz"],
])
def test_usage_errors_exit_2(sim_evidence, args):
    result = enclaveq("evidence", "verify", str(sim_evidence["path"]), *args, check=False)
    assert result.returncode == 2, result.stderr
