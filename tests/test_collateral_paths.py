"""Collateral on every path (issue 15, item 4): the SDK's ``collateral=DIR``, ``enclaveq attest
--collateral DIR`` and a worker's ``--collateral DIR`` judge fake-hardware workers with what
``enclaveq collateral fetch`` cached.

The workers are the fake SEV-SNP and TDX workers of test_hardware_attestation_end_to_end.py and
test_tee_join.py, on the in-process memory broker; the collateral comes from the fake PCS and
KDS servers (tests/fake_collateral_servers.py) on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime, UTC

import pytest
from click.testing import CliRunner

from attestation import trust as trust_module
from attestation import verify as verify_module
from attestation.collateral_fetch import fetch_intel, fetch_snp, loopback_or_https_get, write_atomic
from attestation.collateral_source import CollateralDir
from attestation.policy import policy_from_mapping
from attestation.providers.self_identity import join_table
from attestation.sim import sealing
from attestation.testing.intel import FakeIntelPki, FakeQuotingEnclave
from attestation.trust import TrustAnchors
from enclave_worker.errors import WorkerStartupError
from enclave_worker.platform import NO_COLLATERAL_REFUSAL, NO_COLLATERAL_WARNING, own_identity, tee_identity
from enclave_worker.worker import Worker, WorkerIdentity
from producer_sdk import AsyncClient
from producer_sdk.errors import AttestationFailed

from .fake_collateral_servers import DER, FakeKds, FakePcs, amd_crl
from .test_hardware_attestation_end_to_end import MEASUREMENT, snp_policy, start_worker as start_snp_worker
from .test_tee_join import TD, Workers, tdx_kernel


@pytest.fixture(scope="module")
def intel():
    pki = FakeIntelPki(datetime.now(UTC))
    return pki, FakeQuotingEnclave(pki)


@pytest.fixture
def intel_dir(intel, tmp_path):
    """A collateral directory with SGX and TDX collateral fetched from the fake PCS."""
    pki, _ = intel
    with FakePcs(pki) as pcs:
        for kind in ("sgx", "tdx"):
            fetch_intel(tmp_path / "collateral", kind=kind, fmspc=pki.fmspc, now=datetime.now(UTC),
                        http_get=loopback_or_https_get(timeout=5), pcs_url=pcs.url, trust=pki.trust())
    return tmp_path / "collateral"


@pytest.fixture
def snp_dir(amd, tmp_path):
    with FakeKds(amd) as kds:
        fetch_snp(tmp_path / "collateral", product="Genoa", now=datetime.now(UTC),
                  http_get=loopback_or_https_get(timeout=5), kds_url=kds.url, trust=amd.trust())
    return tmp_path / "collateral"


class FakeTdxProvider:
    """A TD's quotes from the fake Intel quoting enclave."""

    platform = "tdx"

    def __init__(self, qe: FakeQuotingEnclave) -> None:
        self.qe = qe

    def evidence(self, report_data: bytes) -> bytes:
        return self.qe.tdx_quote(report_data=report_data, **TD)


async def start_tdx_worker(qe, tmp_path, url, pool) -> Worker:
    identity = WorkerIdentity(provider=FakeTdxProvider(qe), sealing_key=b"\x01" * 32, seal=sealing.seal,
                              unseal=sealing.unseal, measurement=MEASUREMENT, config_digest=b"\x02" * 32)
    worker = Worker(broker_url=url, pool=pool, identity=identity, state_dir=tmp_path / "state")
    await worker.start()
    return worker


def tdx_policy():
    return policy_from_mapping({"tdx": {k: [v.hex()] for k, v in TD.items()
                                        if k in ("mrtd", "rtmr0", "rtmr1", "rtmr2")}})


# -- the SDK --------------------------------------------------------------------------------------
async def test_the_sdk_judges_a_tdx_worker_with_a_collateral_directory(intel, intel_dir, tmp_path, memory_url, pool):
    pki, qe = intel
    worker = await start_tdx_worker(qe, tmp_path, memory_url, pool)
    try:
        async with AsyncClient(memory_url, pool, tdx_policy(), timeout=30, trust=pki.trust(),
                               collateral=intel_dir) as producer:
            assert producer.claims.platform == "tdx" and producer.claims.tcb_status == "UpToDate"
            assert isinstance(producer.collateral, CollateralDir) and producer.collateral.loads == 1
            await producer.attest()                                   # reused, not read again
            assert producer.collateral.loads == 1
    finally:
        await worker.stop()


async def test_a_revoking_crl_in_the_directory_refuses_the_tdx_worker(intel, intel_dir, tmp_path, memory_url, pool):
    pki, qe = intel
    write_atomic(intel_dir / "intel", "pck_crl-platform.der", pki.crl(issuer="ca", revoked=[pki.leaf]).public_bytes(DER))
    worker = await start_tdx_worker(qe, tmp_path, memory_url, pool)
    try:
        with pytest.raises(AttestationFailed, match="revoked"):
            await AsyncClient(memory_url, pool, tdx_policy(), timeout=30, trust=pki.trust(),
                              collateral=str(intel_dir)).connect()
    finally:
        await worker.stop()


async def test_the_sdk_judges_an_snp_worker_with_a_collateral_directory(amd, snp_dir, tmp_path, memory_url, pool):
    worker = await start_snp_worker(amd, tmp_path, memory_url, pool)
    try:
        async with AsyncClient(memory_url, pool, snp_policy(MEASUREMENT), timeout=30, trust=amd.trust(),
                               collateral=CollateralDir(snp_dir, trust=amd.trust())) as producer:
            assert producer.claims.platform == "snp"
        # The same directory with the ARK's CRL revoking the ASK: refused.
        revoking = amd_crl(amd, "Genoa", revoked=[amd.ask("Genoa").serial_number])
        write_atomic(snp_dir / "snp" / "Genoa", "crl-vcek.der", revoking.public_bytes(DER))
        with pytest.raises(AttestationFailed, match="revoked"):
            await AsyncClient(memory_url, pool, snp_policy(MEASUREMENT), timeout=30, trust=amd.trust(),
                              collateral=snp_dir).connect()
    finally:
        await worker.stop()


async def test_without_collateral_a_tdx_worker_is_refused_collateral_required(intel, tmp_path, memory_url, pool):
    # Needs the fail-closed default of [tdx] require_collateral (issue 15: other half of item 4).
    pki, qe = intel
    worker = await start_tdx_worker(qe, tmp_path, memory_url, pool)
    try:
        with pytest.raises(AttestationFailed) as refused:
            await AsyncClient(memory_url, pool, tdx_policy(), timeout=30, trust=pki.trust()).connect()
        assert "tdx.collateral" in {v.field for v in refused.value.violations}
    finally:
        await worker.stop()


# -- enclaveq attest --collateral DIR -------------------------------------------------------------
@pytest.fixture
def fake_roots(monkeypatch, intel, amd):
    """The process's default trust anchors replaced by the fake Intel and AMD roots (in-process
    CLI runs only: no command line can do this)."""
    fake = TrustAnchors({**intel[0].trust().roots, **amd.trust().roots})
    monkeypatch.setattr(trust_module, "DEFAULT_TRUST", fake)
    monkeypatch.setattr(verify_module, "DEFAULT_TRUST", fake)
    return fake


async def test_enclaveq_attest_with_collateral_judges_the_tcb(fake_roots, intel, intel_dir, tmp_path, memory_url,
                                                             pool, monkeypatch):
    _, qe = intel
    monkeypatch.setenv("ENCLAVEQ_COLLATERAL_DIR", str(tmp_path / "no-cache"))
    policy = tmp_path / "policy.toml"
    policy.write_text("[tdx]\n" + "".join(f'{k} = ["{v.hex()}"]\n' for k, v in TD.items()
                                          if k in ("mrtd", "rtmr0", "rtmr1", "rtmr2")))
    worker = await start_tdx_worker(qe, tmp_path, memory_url, pool)

    def attest(*extra: str):
        from enclaveq.cli import cli

        return CliRunner().invoke(cli, ["attest", "--broker", memory_url, "--pool", pool, "--policy", str(policy),
                                        "--timeout", "20", *extra], catch_exceptions=False)
    try:
        result = await asyncio.to_thread(attest, "--collateral", str(intel_dir), "--json")
        assert result.exit_code == 0, result.output
        claims = json.loads(result.stdout)["claims"]
        assert claims["tcb_status"] == "UpToDate" and claims["tcb_evaluated"] is True
        assert {use["kind"] for use in claims["collateral"]} == {"tcb_info", "qe_identity", "crl"}
        # In words: each document the verdict rested on, who issued it and how old it was.
        result = await asyncio.to_thread(attest, "--collateral", str(intel_dir))
        assert result.exit_code == 0, result.output
        lines = [line for line in result.stdout.splitlines() if line.strip().startswith("collateral")]
        assert any("tcb_info by" in line and "h old" in line for line in lines), result.stdout
        # What `collateral fetch` cached in the default cache directory is used without the option.
        monkeypatch.setenv("ENCLAVEQ_COLLATERAL_DIR", str(intel_dir))
        result = await asyncio.to_thread(attest, "--json")
        assert json.loads(result.stdout)["claims"]["tcb_status"] == "UpToDate"
    finally:
        await worker.stop()


# -- a worker's --collateral DIR ------------------------------------------------------------------
def tdx_identity(intel, tmp_path, label, collateral=None):
    pki, qe = intel
    kernel = tdx_kernel(qe, tmp_path / f"tee-{label}", TD)
    return tee_identity("tdx", root=kernel.root, ops=kernel, join_verify_options={"trust": pki.trust()},
                        collateral=collateral)


async def test_a_worker_with_collateral_judges_its_joiner_with_it(intel, intel_dir, tmp_path, memory_url, pool):
    pki, _ = intel
    workers = Workers(memory_url, pool, tmp_path)
    try:
        first = await workers.start(tdx_identity(intel, tmp_path, "a", CollateralDir(intel_dir, trust=pki.trust())),
                                    "a")
        second = await workers.start(tdx_identity(intel, tmp_path, "b", CollateralDir(intel_dir, trust=pki.trust())),
                                     "b")
        assert second.pool_public_key == first.pool_public_key
        # A member whose collateral revokes the joiners' PCK certificate refuses them.
        write_atomic(intel_dir / "intel", "pck_crl-platform.der",
                     pki.crl(issuer="ca", revoked=[pki.leaf]).public_bytes(DER))
        with pytest.raises(WorkerStartupError, match="revoked"):
            await workers.start(tdx_identity(intel, tmp_path, "c"), "c")
    finally:
        await workers.stop()


def tdx_identity_waiving_collateral(intel, tmp_path, label):
    pki, qe = intel
    kernel = tdx_kernel(qe, tmp_path / f"tee-{label}", TD)
    return tee_identity("tdx", root=kernel.root, ops=kernel, join_verify_options={"trust": pki.trust()},
                        join_without_collateral=True)


def test_a_worker_without_collateral_requires_it_of_peers_unless_told_explicitly_not_to(intel, intel_dir, tmp_path,
                                                                                       caplog):
    pki, qe = intel
    caplog.set_level(logging.WARNING, logger="enclaveq.worker")
    without = tdx_identity(intel, tmp_path, "a")
    assert without.join_policy.section("tdx").require_collateral is True  # fail closed
    assert caplog.text.count("NO COLLATERAL") == 1 and "admits no other TDX worker" in caplog.text
    assert "--join-without-collateral" in NO_COLLATERAL_REFUSAL and "--collateral DIR" in NO_COLLATERAL_REFUSAL
    caplog.clear()
    waived = tdx_identity_waiving_collateral(intel, tmp_path, "w")
    assert waived.join_policy.section("tdx").require_collateral is False
    assert caplog.text.count("NO COLLATERAL (--join-without-collateral)") == 1
    assert NO_COLLATERAL_WARNING.startswith("NO COLLATERAL")
    caplog.clear()
    with_dir = tdx_identity(intel, tmp_path, "b", CollateralDir(intel_dir, trust=pki.trust()))
    assert "NO COLLATERAL" not in caplog.text and with_dir.collateral is not None
    assert with_dir.join_policy.section("tdx").require_collateral is True
    kernel = tdx_kernel(qe, tmp_path / "tee-c", TD)
    from attestation.providers import provider_for

    own = own_identity(provider_for("tdx", root=kernel.root, ops=kernel), root=kernel.root, ops=kernel)
    assert "require_collateral" not in join_table(own, collateral=True)
    assert join_table(own, collateral=False)["require_collateral"] is False


async def test_a_member_without_collateral_refuses_a_joiner_whose_tcb_it_cannot_judge(intel, tmp_path, memory_url,
                                                                                     pool):
    """The joiner may run the same image on a revoked or out-of-date platform: a member that
    cannot tell does not hand it the pool key. Told to (--join-without-collateral), it does."""
    workers = Workers(memory_url, pool, tmp_path)
    try:
        await workers.start(tdx_identity(intel, tmp_path, "a"), "a")
        with pytest.raises(WorkerStartupError, match="(?i)collateral"):
            await workers.start(tdx_identity(intel, tmp_path, "b"), "b")
    finally:
        await workers.stop()
    waiving = Workers(memory_url, f"{pool}-waived", tmp_path / "waived")
    try:
        first = await waiving.start(tdx_identity_waiving_collateral(intel, tmp_path, "c"), "c")
        second = await waiving.start(tdx_identity_waiving_collateral(intel, tmp_path, "d"), "d")
        assert second.pool_public_key == first.pool_public_key
    finally:
        await waiving.stop()


def test_the_worker_command_takes_collateral(tmp_path):
    from enclaveq.cli import cli

    help_text = CliRunner().invoke(cli, ["worker", "--help"]).output
    assert "--collateral DIR" in help_text
    for command in (["attest"], ["run"], ["submit"], ["model", "upload"], ["pool", "rotate"]):
        assert "--collateral DIR" in CliRunner().invoke(cli, [*command, "--help"]).output, command
    missing = CliRunner().invoke(cli, ["worker", "--broker", "memory://x", "--pool", "p", "--tee", "tdx",
                                       "--collateral", str(tmp_path / "absent")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
