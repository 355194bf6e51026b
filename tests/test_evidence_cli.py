"""`enclaveq evidence verify`: formats detected, exit codes, the JSON contract."""

from __future__ import annotations

import base64
import json
from datetime import datetime, UTC

import pytest

from attestation.evidence_files import decode_evidence
from attestation.sim.provider import SimProvider

from .processes import enclaveq
from .support import SimTEE

NOW = datetime(2027, 6, 1, 12, 0, tzinfo=UTC)  # inside the fresh sim chain's validity


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


VECTOR_CASES = [
    ("sgx/trustee/occlum_quote.dat", "sgx", (), "2026-11-27T00:00:00Z", "mrenclave"),
    ("tdx/trustee/tdx_quote_4.dat", "tdx", (), "2026-11-27T00:00:00Z", "mrtd"),
    ("tdx/go-tdx-guest/quote_v5_sample.dat", "tdx", (), "2026-11-27T00:00:00Z", "mrtd"),
    ("snp/trustee/test-report.bin", "snp",
     ("snp/trustee/test-vcek.der", "snp/virtee-sev/milan/ask.pem", "snp/virtee-sev/milan/ark.pem"),
     "2026-11-27T00:00:00Z", "measurement"),
    ("snp/trustee/az-snp-vtpm/evidence-genoa.snp-report.bin", "snp",
     ("snp/trustee/az-snp-vtpm/vcek-genoa.pem", "snp/go-sev-guest/ask_ark_genoa.pem"), "2026-11-27T00:00:00Z",
     "measurement"),
    ("nitro/blocky-nitrite/nitro_attestation.b64", "nitro", (), "2024-09-07T14:40:00Z", None),
    ("nitro/evervault/valid-attestation-doc-bytes", "nitro", (), "2022-10-13T09:00:00Z", None),
]


def _expected_measurement(expected: dict, key: str | None) -> str:
    if key is None:  # Nitro: PCR0
        return expected["PCR0"]
    body = expected.get("body") or expected.get("report")
    return body[key]


@pytest.mark.vectors
@pytest.mark.parametrize("name, platform, certs, at, key", VECTOR_CASES, ids=[c[0] for c in VECTOR_CASES])
def test_every_real_vector_verifies_through_the_cli_with_the_json_contract(vectors_dir, name, platform, certs, at, key):
    expected = json.loads((vectors_dir / "EXPECTED.json").read_text())[name]
    cert_args = [arg for c in certs for arg in ("--cert", str(vectors_dir / c))]
    result = enclaveq("evidence", "verify", str(vectors_dir / name), "--platform", platform, *cert_args,
                      "--at", at, "--json")
    doc = json.loads(result.stdout)
    assert doc["verified"] is True and doc["errors"] == [] and doc["platform"] == platform
    assert doc["measurement"] == _expected_measurement(expected, key)
    assert set(doc) >= {"verified", "platform", "measurement", "report_data", "debug", "claims", "trailing_bytes",
                        "chain", "errors"}
    assert doc["chain"] and all({"subject", "not_before", "not_after"} <= set(c) for c in doc["chain"])


@pytest.mark.vectors
def test_a_nitro_document_outside_its_certificates_validity_exits_1(vectors_dir):
    result = enclaveq("evidence", "verify", str(vectors_dir / "nitro/evervault/valid-attestation-doc-bytes"),
                      "--platform", "nitro", "--at", "2026-11-27T00:00:00Z", "--json", check=False)
    assert result.returncode == 1
    assert json.loads(result.stdout)["errors"][0]["code"] == "invalid"


@pytest.mark.vectors
def test_a_truncated_quote_exits_1_as_malformed(vectors_dir, tmp_path):
    truncated = tmp_path / "quote.bin"
    truncated.write_bytes((vectors_dir / "sgx/trustee/occlum_quote.dat").read_bytes()[:1000])
    result = enclaveq("evidence", "verify", str(truncated), "--platform", "sgx", "--json", check=False)
    assert result.returncode == 1 and json.loads(result.stdout)["errors"][0]["code"] == "malformed"


@pytest.mark.vectors
def test_an_snp_report_without_its_vcek_says_to_pass_it(vectors_dir):
    result = enclaveq("evidence", "verify", str(vectors_dir / "snp/trustee/test-report.bin"), "--platform", "snp",
                      check=False)
    assert result.returncode == 1 and "--cert" in result.stderr + result.stdout
