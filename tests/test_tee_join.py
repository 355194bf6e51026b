"""Real-TEE workers share a pool: each admits exactly its own hardware identity (issue 4).

Every worker here is built by the production ``tee_identity`` on a fake TEE tree
(attestation/providers/fakes.py) whose evidence is signed by the fake vendor chains of
attestation/testing; ``join_verify_options`` makes peers trust those fake roots instead of
AMD's or Intel's, and nothing else differs from production. Workers run in-process on the
memory broker.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, UTC

import pytest
from cryptography.hazmat.primitives import serialization

from attestation.errors import PolicyViolation
from attestation.providers.fakes import (ARK_GUID, ASK_GUID, VCEK_GUID, FakeGramine, FakeTdxGuest, FakeTsmKernel,
                                         cert_table)
from attestation.testing.intel import FakeIntelPki, FakeQuotingEnclave, sgx_report_body
from attestation.testing.nitro import FakeNitro, default_pcrs
from attestation.testing.snp import FakeAmd
from attestation.verify import verify_evidence
from enclave_worker.errors import WorkerStartupError
from enclave_worker.platform import JOIN_UNAVAILABLE_WARNING, own_identity, tee_identity, tee_join_policy
from enclave_worker.worker import Worker

MEASUREMENT = bytes.fromhex("5e" * 48)
OTHER = bytes.fromhex("66" * 48)
DEBUG_POLICY = (1 << 17) | (1 << 16) | (1 << 19)


def h(label: str) -> bytes:
    return hashlib.sha384(label.encode()).digest()


@pytest.fixture(scope="module")
def intel():
    pki = FakeIntelPki(datetime.now(UTC))
    return pki, FakeQuotingEnclave(pki)


def refused(exc_info) -> str:
    text = str(exc_info.value)
    assert "refuses to admit" in text or "not admitted" in text, text
    return text


class Workers:
    """Starts workers on one pool and stops them all at the end."""

    def __init__(self, url: str, pool: str, tmp_path) -> None:
        self.url, self.pool, self.tmp_path = url, pool, tmp_path
        self.started: list[Worker] = []

    async def start(self, identity, label: str) -> Worker:
        worker = Worker(broker_url=self.url, pool=self.pool, identity=identity,
                        state_dir=self.tmp_path / f"state-{label}", worker_id=label)
        await worker.start()
        self.started.append(worker)
        return worker

    async def stop(self) -> None:
        for worker in reversed(self.started):
            await worker.stop()


@pytest.fixture
async def workers(memory_url, pool, tmp_path):
    """Workers on the test's pool of the in-process broker, started one by one by the test."""
    started = Workers(memory_url, pool, tmp_path)
    yield started
    await started.stop()


# -- SEV-SNP ------------------------------------------------------------------------------------
def snp_kernel(amd: FakeAmd, root, measurement: bytes, *, policy: int | None = None) -> FakeTsmKernel:
    def report_new(_provider, inblob, privlevel):
        fields = {} if policy is None else {"policy": policy}
        fake = amd.evidence("Genoa", report_data=inblob.ljust(64, b"\0"), measurement=measurement, vmpl=privlevel,
                            **fields)
        der = lambda c: c.public_bytes(serialization.Encoding.DER)  # noqa: E731
        return fake.report, cert_table([(VCEK_GUID, der(fake.leaf)), (ASK_GUID, der(fake.issuer)),
                                        (ARK_GUID, der(fake.ark))])

    return FakeTsmKernel(root, provider="sev_guest", report_new=report_new)


def snp_identity(amd, tmp_path, label, measurement=MEASUREMENT, **kwargs):
    kernel = snp_kernel(amd, tmp_path / f"tee-{label}", measurement, **kwargs)
    return tee_identity("snp", root=kernel.root, ops=kernel, join_verify_options={"trust": amd.trust()},
                        join_without_collateral=True)


def test_an_snp_worker_pins_exactly_its_own_launch_identity(amd, tmp_path):
    identity = snp_identity(amd, tmp_path, "a")
    section = identity.join_policy.section("snp")
    assert section.measurement == (MEASUREMENT.hex(),) and section.vmpl == (0,)
    assert section.debug_allowed is False and section.migration_agent_allowed is False
    assert identity.join_policy.measurements == () and identity.join_verify_options == {"trust": amd.trust()}


async def test_snp_workers_of_one_image_share_the_pool_and_another_image_is_refused(amd, tmp_path, workers):
    first = await workers.start(snp_identity(amd, tmp_path, "a"), "a")
    second = await workers.start(snp_identity(amd, tmp_path, "b"), "b")
    assert second.pool_public_key == first.pool_public_key
    with pytest.raises(WorkerStartupError) as exc:
        await workers.start(snp_identity(amd, tmp_path, "c", measurement=OTHER), "c")
    assert "snp.measurement" in refused(exc)


async def test_a_debug_snp_guest_of_the_same_image_is_refused(amd, tmp_path, workers):
    await workers.start(snp_identity(amd, tmp_path, "a"), "a")
    with pytest.raises(WorkerStartupError) as exc:
        await workers.start(snp_identity(amd, tmp_path, "dbg", policy=DEBUG_POLICY), "dbg")
    assert "snp.policy.debug" in refused(exc)


async def test_a_joiner_signed_by_an_untrusted_amd_chain_is_refused(amd, tmp_path, workers):
    await workers.start(snp_identity(amd, tmp_path, "a"), "a")
    rogue = FakeAmd()  # another (fake) AMD root: same shape, not pinned by the member
    kernel = snp_kernel(rogue, tmp_path / "tee-rogue", MEASUREMENT)
    identity = tee_identity("snp", root=kernel.root, ops=kernel, join_verify_options={"trust": rogue.trust()},
                            join_without_collateral=True)
    with pytest.raises(WorkerStartupError) as exc:
        await workers.start(identity, "rogue")
    refused(exc)


def test_a_worker_whose_own_evidence_fails_its_roots_says_so(amd, tmp_path, caplog):
    kernel = snp_kernel(amd, tmp_path / "tee", MEASUREMENT)
    caplog.set_level(logging.WARNING, logger="enclaveq.worker")
    # AMD's real roots: the fake chain fails
    identity = tee_identity("snp", root=kernel.root, ops=kernel, join_without_collateral=True)
    assert identity.join_policy is not None
    assert "own evidence does not pass its join policy" in caplog.text


# -- TDX ----------------------------------------------------------------------------------------
TD = {"td_attributes": (0x10000000).to_bytes(8, "little"), "xfam": bytes.fromhex("e702060000000000"),
      "mrtd": h("td"), "mrconfigid": bytes(48), "mrowner": bytes(48), "mrownerconfig": bytes(48),
      "rtmr0": h("rtmr0"), "rtmr1": h("rtmr1"), "rtmr2": h("rtmr2"), "rtmr3": bytes(48)}


def tdx_kernel(qe: FakeQuotingEnclave, root, td: dict, *, quoted: dict | None = None,
               tdx_guest: bool = True) -> FakeTsmKernel:
    """A TD described by ``td`` (its TDREPORT); its quotes describe ``quoted`` (default: the same TD)."""
    quote_td = quoted or td

    def report_new(_provider, inblob, _privlevel):
        return qe.tdx_quote(report_data=inblob.ljust(64, b"\0"), **quote_td), None

    return FakeTsmKernel(root, provider="tdx_guest", report_new=report_new,
                         tdx_guest=FakeTdxGuest(td=dict(td)) if tdx_guest else None)


def tdx_identity(intel, tmp_path, label, td=TD, **kwargs):
    pki, qe = intel
    kernel = tdx_kernel(qe, tmp_path / f"tee-{label}", td, **kwargs)
    return tee_identity("tdx", root=kernel.root, ops=kernel, join_verify_options={"trust": pki.trust()},
                        join_without_collateral=True)


def test_a_tdx_worker_pins_its_td_measurements_from_its_tdreport(intel, tmp_path):
    section = tdx_identity(intel, tmp_path, "a").join_policy.section("tdx")
    for key in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mrconfigid", "mrowner", "mrownerconfig"):
        assert getattr(section, key) == (TD[key],), key
    assert section.td_attributes == TD["td_attributes"] and section.debug_allowed is False


async def test_tdx_workers_of_one_image_share_the_pool_and_another_td_is_refused(intel, tmp_path, workers):
    first = await workers.start(tdx_identity(intel, tmp_path, "a"), "a")
    second = await workers.start(tdx_identity(intel, tmp_path, "b"), "b")
    assert second.pool_public_key == first.pool_public_key
    with pytest.raises(WorkerStartupError) as exc:
        await workers.start(tdx_identity(intel, tmp_path, "c", td={**TD, "rtmr2": h("another command line")}), "c")
    assert "tdx.rtmr2" in refused(exc)


async def test_a_restarted_tdx_worker_gets_the_pool_key_again_from_a_live_member(intel, tmp_path, workers):
    # TDX has no sealing key: a restart loses what the worker sealed, and a live member hands it back.
    first = await workers.start(tdx_identity(intel, tmp_path, "a"), "a")
    second = await workers.start(tdx_identity(intel, tmp_path, "b"), "b")
    assert not second.identity.persistent_sealing
    await second.stop()
    restarted = await workers.start(tdx_identity(intel, tmp_path, "b2"), "b2")  # fresh key, fresh state dir
    assert restarted.pool_public_key == first.pool_public_key


def test_a_quote_of_another_td_is_refused_at_start(intel, tmp_path):
    # The host hands the worker a genuine quote of *its own* TD over the worker's report data.
    with pytest.raises(WorkerStartupError, match=r"not of this TD: mrtd differ"):
        tdx_identity(intel, tmp_path, "a", quoted={**TD, "mrtd": h("the host's TD")})


def test_without_a_tdreport_a_tdx_worker_does_not_join_and_says_why(intel, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="enclaveq.worker")
    identity = tdx_identity(intel, tmp_path, "a", tdx_guest=False)
    assert identity.join_policy is None
    assert "JOINING UNAVAILABLE" in caplog.text and "dev/tdx_guest not found" in caplog.text
    assert JOIN_UNAVAILABLE_WARNING.startswith("JOINING UNAVAILABLE")


# -- SGX under Gramine --------------------------------------------------------------------------
ENCLAVE = {"mrenclave": hashlib.sha256(b"enclaveq worker").digest(), "mrsigner": hashlib.sha256(b"signer").digest(),
           "isvprodid": 7, "isvsvn": 3}


def sgx_identity(intel, tmp_path, label, enclave=ENCLAVE, *, quoted: dict | None = None):
    pki, qe = intel
    quote_enclave = quoted or enclave
    gramine = FakeGramine(tmp_path / f"tee-{label}",
                          quote_fn=lambda urd: qe.sgx_quote(report_data=urd, **quote_enclave),
                          report_body_fn=lambda rd: sgx_report_body(report_data=rd, **enclave).encode())
    return tee_identity("sgx", root=gramine.root, ops=gramine, join_verify_options={"trust": pki.trust()},
                        join_without_collateral=True)


def test_an_sgx_worker_pins_mrenclave_mrsigner_and_product(intel, tmp_path):
    section = sgx_identity(intel, tmp_path, "a").join_policy.section("sgx")
    assert section.mrenclave == (ENCLAVE["mrenclave"],) and section.mrsigner == (ENCLAVE["mrsigner"],)
    assert section.isvprodid == (7,) and section.min_isvsvn == 3 and section.debug_allowed is False


async def test_sgx_workers_of_one_enclave_share_the_pool_others_and_debug_copies_are_refused(intel, tmp_path, workers):
    first = await workers.start(sgx_identity(intel, tmp_path, "a"), "a")
    second = await workers.start(sgx_identity(intel, tmp_path, "b"), "b")
    assert second.pool_public_key == first.pool_public_key
    with pytest.raises(WorkerStartupError) as exc:
        await workers.start(sgx_identity(intel, tmp_path, "c", {**ENCLAVE, "mrenclave": bytes(32)}), "c")
    assert "sgx.mrenclave" in refused(exc)
    with pytest.raises(WorkerStartupError) as exc:
        await workers.start(sgx_identity(intel, tmp_path, "dbg", {**ENCLAVE, "attributes_flags": 0x07}), "dbg")
    assert "sgx.debug" in refused(exc)


def test_a_quote_of_another_enclave_is_refused_at_start(intel, tmp_path):
    with pytest.raises(WorkerStartupError, match=r"not of this enclave: mrenclave differ"):
        sgx_identity(intel, tmp_path, "a", quoted={**ENCLAVE, "mrenclave": bytes(32)})


# -- Nitro (no provider in this build: the policy is derived from a document all the same) -----
class FakeNsm:
    platform = "nitro"

    def __init__(self, nitro: FakeNitro, pcrs: dict[int, bytes]) -> None:
        self.nitro, self.pcrs = nitro, pcrs

    def evidence(self, report_data: bytes) -> bytes:
        return self.nitro.document(user_data=report_data, pcrs=self.pcrs)


def test_a_nitro_worker_admits_exactly_its_pcr0_to_pcr2_and_never_a_debug_enclave():
    nitro = FakeNitro(datetime.now(UTC))
    pcrs = default_pcrs()
    own = own_identity(FakeNsm(nitro, pcrs))
    policy = tee_join_policy(own)
    section = policy.section("nitro")
    assert section.pcr0 == (pcrs[0].hex(),) and section.pcr1 == (pcrs[1].hex(),) and section.pcr2 == (pcrs[2].hex(),)
    assert section.debug_allowed is False
    now, nonce = datetime.now(UTC), b"\x42" * 64

    def judge(peer_pcrs):
        return verify_evidence("nitro", nitro.document(user_data=nonce, pcrs=peer_pcrs), policy,
                               expected_report_data=nonce, now=now, trust=nitro.trust)

    assert judge(pcrs).platform == "nitro"
    with pytest.raises(PolicyViolation, match="pcr0"):
        judge({**pcrs, 0: h("another image")})
    with pytest.raises(PolicyViolation, match="debug"):
        judge({**pcrs, 0: bytes(48), 1: bytes(48), 2: bytes(48)})


# -- where the identity comes from --------------------------------------------------------------
def test_the_tdreport_ioctl_and_layout(tmp_path):
    from attestation.providers import ProviderFailed, ProviderUnavailable
    from attestation.providers.fakes import fake_tdreport
    from attestation.providers.tdx_guest import TDX_CMD_GET_REPORT0, parse_tdreport, tdx_report

    assert TDX_CMD_GET_REPORT0 == 0xC4405401  # _IOWR('T', 1, struct tdx_report_req): 64 + 1024 bytes
    raw = fake_tdreport(b"\x11" * 64, **TD)
    assert raw[0] == 0x81 and raw[128:192] == b"\x11" * 64            # REPORTTYPE.TYPE, REPORTDATA
    assert raw[528:576] == TD["mrtd"] and raw[816:864] == TD["rtmr2"]  # TDINFO.MRTD, RTMR2
    parsed = parse_tdreport(raw)
    assert parsed.mrtd == TD["mrtd"] and parsed.attributes == TD["td_attributes"] and not parsed.debug
    kernel = FakeTsmKernel(tmp_path, provider="tdx_guest", tdx_guest=FakeTdxGuest(td=dict(TD), errors=[5]))
    with pytest.raises(ProviderFailed, match="EIO"):
        tdx_report(b"\x22" * 64, root=tmp_path, ops=kernel)
    assert tdx_report(b"\x22" * 64, root=tmp_path, ops=kernel).rtmr0 == TD["rtmr0"]
    with pytest.raises(ProviderUnavailable, match="tdx_guest not found"):
        tdx_report(b"\x22" * 64, root=tmp_path / "elsewhere")
    with pytest.raises(ProviderFailed, match="type"):
        parse_tdreport(bytes(1024))


def test_gramine_local_reports_are_the_enclaves_own(tmp_path):
    from attestation.providers import GramineSgxProvider, ProviderFailed

    body = lambda rd: sgx_report_body(report_data=rd, **ENCLAVE).encode()  # noqa: E731
    gramine = FakeGramine(tmp_path / "a", report_body_fn=body)
    report = GramineSgxProvider(root=gramine.root, ops=gramine).local_report(b"\x33" * 64)
    assert len(report) == 432 and report[64:96] == ENCLAVE["mrenclave"] and report[320:384] == b"\x33" * 64
    assert gramine.target_info == gramine.my_target_info  # targeted at itself
    plain = FakeGramine(tmp_path / "b")  # a Gramine that refuses local reports
    with pytest.raises(ProviderFailed, match="no local SGX report"):
        GramineSgxProvider(root=plain.root, ops=plain).local_report(b"\x33" * 64)
