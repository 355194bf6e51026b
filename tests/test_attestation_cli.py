"""`enclaveq sim init` and `enclaveq policy init`, driven as a user would (click's runner)."""

from __future__ import annotations

import hashlib
from datetime import datetime, UTC

import pytest
from click.testing import CliRunner

from attestation import load_policy, verify_evidence
from attestation.sim import SimProvider, open_sim_dir
from enclave_worker.config import DEFAULT_WORKER_CONFIG
from enclave_worker.measurement import measure_worker
from enclaveq.cli.sim import policy_cli, sim_cli

M1 = "ab" * 32
M2 = "cd" * 32


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def sim_dir(runner, tmp_path):
    result = runner.invoke(sim_cli, ["init", "--dir", str(tmp_path / "sim")])
    assert result.exit_code == 0, result.output
    return tmp_path / "sim"


def test_sim_init_prints_what_it_created_and_the_root_fingerprint(runner, tmp_path):
    result = runner.invoke(sim_cli, ["init", "--dir", str(tmp_path / "sim")])

    assert result.exit_code == 0, result.output
    for name in ("root.pem", "attestation-key.pem", "attestation-cert.pem", "platform-secret"):
        assert name in result.output
    assert "root private key was not kept" in result.output
    fingerprint = next(line for line in result.output.splitlines() if line.startswith("Root SHA-256"))
    assert fingerprint.split()[-1] == open_sim_dir(tmp_path / "sim").sim_dir.root_sha256
    assert "NO confidentiality" in result.output


def test_sim_init_refuses_an_existing_directory_without_force(runner, sim_dir):
    refused = runner.invoke(sim_cli, ["init", "--dir", str(sim_dir)])
    assert refused.exit_code == 2  # an input error (README, exit codes)
    assert "already holds a simulation directory" in refused.output
    assert "Traceback" not in refused.output

    forced = runner.invoke(sim_cli, ["init", "--dir", str(sim_dir), "--force"])
    assert forced.exit_code == 0, forced.output


def test_policy_init_pins_the_sim_root_and_the_current_worker_measurement(runner, sim_dir, tmp_path):
    out = tmp_path / "policy.toml"
    result = runner.invoke(policy_cli, ["init", "--sim-dir", str(sim_dir), "--out", str(out)])

    assert result.exit_code == 0, result.output
    policy = load_policy(out)
    assert policy.allow_simulation is True
    assert policy.measurements == (measure_worker(DEFAULT_WORKER_CONFIG).hex(),)
    assert policy.sim_root_sha256 in result.output
    assert policy.debug_allowed is False
    assert policy.max_evidence_age_seconds == 300


def test_a_policy_from_the_cli_accepts_evidence_from_the_default_worker(runner, sim_dir, tmp_path):
    out = tmp_path / "policy.toml"
    assert runner.invoke(policy_cli, ["init", "--sim-dir", str(sim_dir), "--out", str(out)]).exit_code == 0
    # The certificates were made with the real clock; verify at a fixed point inside them.
    now = datetime.now(UTC).replace(microsecond=0)
    nonce_data = hashlib.sha512(b"nonce").digest()
    worker = SimProvider(sim_dir, measure_worker(DEFAULT_WORKER_CONFIG).value, clock=lambda: now)

    claims = verify_evidence(
        "sim", worker.evidence(nonce_data), load_policy(out), expected_report_data=nonce_data, now=now
    )
    assert claims.measurement == measure_worker(DEFAULT_WORKER_CONFIG).value


def test_policy_init_takes_explicit_measurements_debug_and_max_age(runner, sim_dir, tmp_path):
    out = tmp_path / "policy.toml"
    result = runner.invoke(
        policy_cli,
        ["init", "--sim-dir", str(sim_dir), "--out", str(out), "--measurement", M1,
         "--measurement", M2.upper(), "--allow-debug", "--max-age", "60"],
    )
    assert result.exit_code == 0, result.output
    policy = load_policy(out)
    assert policy.measurements == (M1, M2)
    assert policy.debug_allowed is True
    assert policy.max_evidence_age_seconds == 60


def test_policy_init_refuses_a_bad_measurement_clearly(runner, sim_dir, tmp_path):
    out = tmp_path / "policy.toml"
    result = runner.invoke(policy_cli, ["init", "--sim-dir", str(sim_dir), "--out", str(out), "--measurement", "xyz"])
    assert result.exit_code == 2
    assert "--measurement" in result.output and "hex digits" in result.output
    assert not out.exists()


def test_policy_init_refuses_to_overwrite_without_force(runner, sim_dir, tmp_path):
    out = tmp_path / "policy.toml"
    out.write_text("# hand-written policy\n")
    refused = runner.invoke(policy_cli, ["init", "--sim-dir", str(sim_dir), "--out", str(out), "--measurement", M1])
    assert refused.exit_code == 2  # an input error (README, exit codes)
    assert "already exists; pass --force" in refused.output
    assert out.read_text() == "# hand-written policy\n"

    forced = runner.invoke(
        policy_cli, ["init", "--sim-dir", str(sim_dir), "--out", str(out), "--measurement", M1, "--force"]
    )
    assert forced.exit_code == 0, forced.output
    assert load_policy(out).measurements == (M1,)


def test_policy_init_refuses_a_missing_sim_dir(runner, tmp_path):
    result = runner.invoke(
        policy_cli, ["init", "--sim-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "p.toml")]
    )
    assert result.exit_code == 2  # an input error (README, exit codes)
    assert "enclaveq sim init" in result.output


@pytest.mark.parametrize(
    "group, args, phrase",
    [
        (sim_cli, ["--help"], "NO confidentiality"),
        (sim_cli, ["init", "--help"], "root's private key"),
        (policy_cli, ["--help"], "TOML"),
        (policy_cli, ["init", "--help"], "--max-age SECONDS"),
    ],
)
def test_help_texts_explain_the_commands(runner, group, args, phrase):
    result = runner.invoke(group, args)
    assert result.exit_code == 0
    assert phrase in " ".join(result.output.split())
