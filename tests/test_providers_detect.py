"""TEE detection, provider_for, the Nitro refusal, the worker identity on a real TEE, and
`enclaveq worker --tee ...` as a process."""

from __future__ import annotations

import logging
import os
import uuid

import pytest

from attestation.providers import (
    REAL_TEES,
    TEE_CHOICES,
    ConfigfsTsmProvider,
    GramineSgxProvider,
    NitroNsmProvider,
    NoTeeDetected,
    ProviderFailed,
    ProviderNotSupported,
    ProviderUnavailable,
    detect_tee,
    provider_for,
)
from attestation.providers.binding import bound_report_data
from attestation.providers.configfs_tsm import TSM_REPORT_DIR
from attestation.providers.fakes import FakeGramine, FakeTsmKernel
from attestation.sim.init import init_sim_dir
from attestation.sim.provider import SimProvider
from enclaveq.cli.worker import TEE_CHOICES as CLI_TEE_CHOICES, refuse_unopenable_state
from enclave_worker.errors import WorkerStartupError
from enclave_worker.measurement import measure_worker
from enclave_worker.config import DEFAULT_WORKER_CONFIG
from enclave_worker.platform import EPHEMERAL_SEALING_WARNING, tee_identity
from protocol.handshake import Challenge

from .processes import enclaveq

REPORT_DATA = b"\x5a" * 64


def nsm_tree(root):
    (root / "dev").mkdir(parents=True, exist_ok=True)
    (root / "dev" / "nsm").touch()  # a placeholder: only its existence is looked at


# -- detection -----------------------------------------------------------------------------
def test_nothing_is_detected_in_an_empty_tree(tmp_path):
    assert detect_tee(tmp_path) is None


@pytest.mark.parametrize("provider, expected", [("tdx_guest", "tdx"), ("sev_guest", "snp")])
def test_configfs_tsm_is_detected_by_its_provider_name(tmp_path, provider, expected):
    kernel = FakeTsmKernel(tmp_path, provider=provider)
    assert detect_tee(tmp_path, ops=kernel) == expected
    assert kernel.live_entries() == []  # the probe entry is gone


def test_configfs_tsm_without_a_provider_or_with_an_unknown_one_is_not_detected(tmp_path):
    assert detect_tee(tmp_path, ops=FakeTsmKernel(tmp_path, provider=None)) is None
    assert detect_tee(tmp_path, ops=FakeTsmKernel(tmp_path, provider="arm_cca_guest")) is None


def test_a_plain_report_directory_is_not_detected(tmp_path):
    (tmp_path / TSM_REPORT_DIR).mkdir(parents=True)
    assert detect_tee(tmp_path) is None


def test_configfs_tsm_that_refuses_mkdir_is_an_error_not_nothing(tmp_path, monkeypatch):
    kernel = FakeTsmKernel(tmp_path)
    monkeypatch.setattr(kernel, "mkdir", lambda p: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(ProviderFailed, match="permission"):
        detect_tee(tmp_path, ops=kernel)


@pytest.mark.parametrize("kind, expected", [("dcap", "sgx"), ("none", None), ("epid", None)])
def test_gramine_is_detected_only_with_dcap(tmp_path, kind, expected):
    fake = FakeGramine(tmp_path, attestation_type=kind)
    assert detect_tee(tmp_path, ops=fake) == expected


def test_gramine_is_detected_with_the_real_file_operations(tmp_path):
    directory = tmp_path / "dev" / "attestation"
    directory.mkdir(parents=True)
    (directory / "attestation_type").write_text("dcap")
    assert detect_tee(tmp_path) == "sgx"


def test_the_nitro_device_is_detected(tmp_path):
    nsm_tree(tmp_path)
    assert detect_tee(tmp_path) == "nitro"


# -- provider_for --------------------------------------------------------------------------
def test_auto_refuses_when_nothing_is_detected_and_never_simulates(tmp_path):
    sim = tmp_path / "sim"
    init_sim_dir(sim)
    measurement = measure_worker(DEFAULT_WORKER_CONFIG.measured()).value
    with pytest.raises(NoTeeDetected) as info:
        provider_for("auto", root=tmp_path, sim_dir=sim, measurement=measurement)
    message = str(info.value)
    assert "no TEE detected" in message and "never falls back to simulation" in message
    assert "--tee sim" in message and "tsm/report" in message and "/dev/nsm" in message.replace(str(tmp_path), "")
    assert isinstance(info.value, ProviderUnavailable)


def test_auto_picks_the_detected_provider(tmp_path):
    kernel = FakeTsmKernel(tmp_path / "tdx", provider="tdx_guest")
    p = provider_for("auto", root=kernel.root, ops=kernel)
    assert isinstance(p, ConfigfsTsmProvider) and p.platform == "tdx"
    fake = FakeGramine(tmp_path / "sgx")
    p = provider_for("auto", root=fake.root, ops=fake)
    assert isinstance(p, GramineSgxProvider) and p.platform == "sgx"


def test_each_explicit_choice_gives_its_provider(tmp_path):
    snp = FakeTsmKernel(tmp_path / "snp", provider="sev_guest")
    assert provider_for("snp", root=snp.root, ops=snp).platform == "snp"
    with pytest.raises(ProviderUnavailable, match="not a TDX guest"):
        provider_for("tdx", root=snp.root, ops=snp)
    sim = tmp_path / "sim"
    init_sim_dir(sim)
    p = provider_for("sim", sim_dir=sim, measurement=bytes(32))
    assert isinstance(p, SimProvider) and p.platform == "sim"
    with pytest.raises(ValueError, match="sim_dir and measurement"):
        provider_for("sim")
    with pytest.raises(ValueError, match="unknown TEE"):
        provider_for("sev", root=tmp_path)


@pytest.mark.parametrize("tee", REAL_TEES)
def test_every_real_tee_is_unavailable_in_an_empty_tree(tmp_path, tee):
    with pytest.raises(ProviderUnavailable):
        provider_for(tee, root=tmp_path)


def test_nitro_is_unavailable_without_the_device_and_not_supported_with_it(tmp_path):
    with pytest.raises(ProviderUnavailable, match="dev/nsm not found"):
        NitroNsmProvider(root=tmp_path)
    nsm_tree(tmp_path)
    with pytest.raises(ProviderNotSupported, match="Nitro NSM needs .*not supported in this build"):
        NitroNsmProvider(root=tmp_path)
    with pytest.raises(ProviderNotSupported):
        provider_for("auto", root=tmp_path)


def test_the_cli_offers_exactly_the_provider_choices():
    assert CLI_TEE_CHOICES == TEE_CHOICES


# -- the worker's identity on a real TEE ---------------------------------------------------
def test_a_real_tee_identity_has_an_ephemeral_sealing_key_and_says_so(tmp_path, caplog):
    kernel = FakeTsmKernel(tmp_path, provider="tdx_guest")
    caplog.set_level(logging.WARNING, logger="enclaveq.worker")
    first = tee_identity("tdx", root=tmp_path, ops=kernel)
    second = tee_identity("auto", root=tmp_path, ops=kernel)
    assert first.provider.platform == second.provider.platform == "tdx"
    assert len(first.sealing_key) == 32 and first.sealing_key != second.sealing_key
    expected = measure_worker(DEFAULT_WORKER_CONFIG.measured())
    assert first.config_digest == expected.config_digest and first.measurement == expected.value
    assert caplog.text.count("EPHEMERAL SEALING KEY") == 2 and "live member" in EPHEMERAL_SEALING_WARNING
    blob = first.seal(first.sealing_key, b"pool key", b"aad")
    assert first.unseal(first.sealing_key, blob, b"aad") == b"pool key"


def test_state_sealed_by_an_earlier_run_is_refused_with_the_reason(tmp_path):
    refuse_unopenable_state(tmp_path, "pool")  # nothing there: fine
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "pool.sealed").write_bytes(b"old")
    with pytest.raises(WorkerStartupError, match="no sealing key that survives"):
        refuse_unopenable_state(tmp_path, "pool")


def test_a_missing_tee_is_a_startup_error(tmp_path):
    with pytest.raises(WorkerStartupError, match="no TEE detected"):
        tee_identity("auto", root=tmp_path)
    with pytest.raises(ValueError):
        tee_identity("sim", root=tmp_path)


async def test_a_worker_on_a_fake_tdx_answers_challenges_with_quotes_binding_its_statement(tmp_path):
    from enclave_worker.worker import Worker

    kernel = FakeTsmKernel(tmp_path / "tee", provider="tdx_guest")
    identity = tee_identity("tdx", root=kernel.root, ops=kernel)
    worker = Worker(broker_url=f"memory://{uuid.uuid4().hex}", pool="fake-tdx", identity=identity,
                    state_dir=tmp_path / "state")
    await worker.start()
    try:
        nonce = os.urandom(32)
        response = worker.answer_challenge(Challenge(nonce=nonce))
    finally:
        await worker.stop()
    assert response.platform == "tdx" and response.statement.nonce == nonce
    assert bound_report_data("tdx", response.evidence) == response.statement.report_data()
    assert kernel.live_entries() == []


# -- `enclaveq worker --tee ...` as a process ----------------------------------------------
def test_worker_tee_auto_in_a_plain_environment_refuses_clearly():
    if detect_tee() is not None:
        pytest.skip("this machine is inside a TEE")
    result = enclaveq("worker", "--tee", "auto", "--broker", "memory://tee-auto", "--pool", "p", check=False)
    assert result.returncode == 3
    assert "no TEE detected" in result.stderr and "never falls back to simulation" in result.stderr
    assert "--tee sim --sim-dir" in result.stderr
    assert "SIMULATED TEE" not in result.stderr and "ready" not in result.stderr


def test_worker_without_tee_or_sim_dir_means_auto_not_simulation():
    if detect_tee() is not None:
        pytest.skip("this machine is inside a TEE")
    result = enclaveq("worker", "--broker", "memory://tee-default", "--pool", "p", check=False)
    assert result.returncode == 3 and "no TEE detected" in result.stderr


@pytest.mark.parametrize("tee, message", [("tdx", "tsm/report not found"), ("snp", "tsm/report not found"),
                                          ("sgx", "not running inside a Gramine SGX enclave"),
                                          ("nitro", "not running inside an AWS Nitro Enclave")])
def test_worker_with_an_absent_tee_refuses_with_its_reason(tee, message):
    if detect_tee() is not None:
        pytest.skip("this machine is inside a TEE")
    result = enclaveq("worker", "--tee", tee, "--broker", "memory://tee-x", "--pool", "p", check=False)
    assert result.returncode == 3 and message in result.stderr


def test_worker_tee_sim_still_needs_its_sim_dir_and_other_tees_refuse_one(tmp_path):
    missing = enclaveq("worker", "--tee", "sim", "--broker", "memory://x", "--pool", "p", check=False)
    assert missing.returncode == 2 and "--sim-dir" in missing.stderr
    extra = enclaveq("worker", "--tee", "tdx", "--sim-dir", str(tmp_path), "--broker", "memory://x", "--pool", "p",
                     check=False)
    assert extra.returncode == 2 and "only for --tee sim" in extra.stderr


def test_print_measurement_is_for_the_simulation_only(tmp_path):
    sim = tmp_path / "sim"
    init_sim_dir(sim)
    printed = enclaveq("worker", "--tee", "sim", "--sim-dir", str(sim), "--print-measurement").stdout.strip()
    assert printed == measure_worker(DEFAULT_WORKER_CONFIG.measured()).value.hex()
    refused = enclaveq("worker", "--tee", "tdx", "--print-measurement", check=False)
    assert refused.returncode == 2 and "hardware reports the measurement" in refused.stderr


def test_worker_help_explains_every_tee_choice():
    text = enclaveq("worker", "--help").stdout
    for choice in TEE_CHOICES:
        assert f"\n    {choice} " in text, choice
    assert "never falls back to simulation" in text and "not supported in this build" in text
