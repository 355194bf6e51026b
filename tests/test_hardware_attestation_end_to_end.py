"""A producer attests a worker on (fake-signed) SEV-SNP hardware through the same exchange as
the simulation: nonce -> evidence binding the statement -> [snp] policy -> session.

The fake AMD chain (attestation/testing/snp.py) signs real-format reports; the worker's
provider appends the host's certificate table after the report, as configfs-tsm does, so the
producer needs no --cert. The producer trusts the fake ARK instead of AMD's.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization

import numpy as np
import pytest

from attestation.policy import policy_from_toml
from attestation.providers.fakes import ARK_GUID, ASK_GUID, VCEK_GUID, cert_table
from attestation.testing.snp import FakeAmd
from enclave_worker.worker import Worker, WorkerIdentity
from producer_sdk import AsyncClient
from producer_sdk.errors import AttestationFailed
from attestation.sim import sealing

from .support import mlp_model

MEASUREMENT = bytes.fromhex("5e" * 48)


class FakeSnpProvider:
    """What ConfigfsTsmProvider returns inside an SNP guest: report || certificate table."""

    platform = "snp"

    def __init__(self, amd: FakeAmd, measurement: bytes) -> None:
        self.amd = amd
        self.measurement = measurement

    def evidence(self, report_data: bytes) -> bytes:
        fake = self.amd.evidence("Genoa", report_data=report_data, measurement=self.measurement)
        der = lambda c: c.public_bytes(serialization.Encoding.DER)  # noqa: E731
        return fake.report + cert_table([(VCEK_GUID, der(fake.leaf)), (ASK_GUID, der(fake.issuer)),
                                         (ARK_GUID, der(fake.ark))])


def snp_policy(measurement: bytes):
    return policy_from_toml(f'[snp]\nmeasurement = ["{measurement.hex()}"]\n')


async def start_worker(amd, tmp_path, url, pool, measurement=MEASUREMENT) -> Worker:
    identity = WorkerIdentity(provider=FakeSnpProvider(amd, measurement), sealing_key=b"\x01" * 32,
                              seal=sealing.seal, unseal=sealing.unseal, measurement=measurement,
                              config_digest=b"\x02" * 32)
    worker = Worker(broker_url=url, pool=pool, identity=identity, state_dir=tmp_path / "state")
    await worker.start()
    return worker


def client(url, pool, policy, amd) -> AsyncClient:
    # Trust the fake AMD root instead of the pinned real ones, and take its KDS CRL as collateral
    # (the policy fails closed without one); everything else is production code.
    return AsyncClient(url, pool, policy, timeout=30, trust=amd.trust(), collateral={"crls": (amd.crl("Genoa"),)})


async def test_a_producer_runs_jobs_on_a_worker_whose_snp_evidence_meets_its_policy(amd, tmp_path, memory_url, pool):
    worker = await start_worker(amd, tmp_path, memory_url, pool)
    try:
        async with client(memory_url, pool, snp_policy(MEASUREMENT), amd) as producer:
            claims = producer.claims
            assert claims.platform == "snp" and not claims.simulated and claims.measurement == MEASUREMENT
            assert claims.details["product"] == "Genoa" and claims.details["signing_key"] == "vcek"
            assert claims.tcb_evaluated and [use.kind for use in claims.collateral] == ["crl"]
            model_id = await producer.upload_model(mlp_model())
            out = await producer.run(model_id, {"x": np.ones((1, 4), np.float32), "bias": np.zeros(3, np.float32)})
            assert out["label"].shape == (1,)
    finally:
        await worker.stop()


async def test_a_worker_with_another_measurement_is_refused_naming_the_field(amd, tmp_path, memory_url, pool):
    worker = await start_worker(amd, tmp_path, memory_url, pool, measurement=bytes.fromhex("66" * 48))
    try:
        with pytest.raises(AttestationFailed) as refused:
            await client(memory_url, pool, snp_policy(MEASUREMENT), amd).connect()
        assert "snp.measurement" in {v.field for v in refused.value.violations}
    finally:
        await worker.stop()


async def test_real_amd_roots_refuse_evidence_signed_by_another_chain(amd, tmp_path, memory_url, pool):
    worker = await start_worker(amd, tmp_path, memory_url, pool)
    try:
        with pytest.raises(AttestationFailed, match="not valid|pinned|root"):
            await AsyncClient(memory_url, pool, snp_policy(MEASUREMENT)).connect()
    finally:
        await worker.stop()
