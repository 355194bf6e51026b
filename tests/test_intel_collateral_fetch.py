"""The optional PCS fetcher, with an injected fake ``http_get`` (no network in tests)."""

from __future__ import annotations

from datetime import datetime, UTC

import pytest
from cryptography.hazmat.primitives import serialization

from attestation.errors import EvidenceInvalid, EvidenceMalformed
from attestation.intel.collateral import evaluate_qe_identity, evaluate_sgx_tcb
from attestation.intel.fetch import IntelPcsFetcher, fetch_collateral, urllib_http_get
from attestation.intel.pck import PckExtensions
from attestation.testing.intel import default_pki
from attestation.testing.intel_collateral import enclave_level, tcb_level

NOW = datetime(2026, 11, 27, tzinfo=UTC)
FMSPC = bytes.fromhex("00906ea10000")
BASE = "https://pcs.example.test"


class FakePcs:
    """Serves what PCS v4 serves, from the fake PKI, and records the URLs asked for."""

    def __init__(self) -> None:
        self.pki = default_pki()
        self.urls: list[str] = []
        header = self.pki.issuer_chain_header()
        der = serialization.Encoding.DER
        self.routes = {
            f"{BASE}/sgx/certification/v4/tcb?fmspc={FMSPC.hex()}": (
                200, {"tcb-info-issuer-chain": header, "Content-Type": "application/json"},
                self.pki.tcb_info_document(fmspc=FMSPC, levels=[tcb_level("SWHardeningNeeded", sgx=[2] * 16, pcesvn=2,
                                                                          advisories=["INTEL-SA-00615"])])),
            f"{BASE}/sgx/certification/v4/qe/identity": (
                200, {"SGX-Enclave-Identity-Issuer-Chain": header},
                self.pki.qe_identity_document(levels=[enclave_level("UpToDate", 8)])),
            f"{BASE}/sgx/certification/v4/pckcrl?ca=platform&encoding=der": (
                200, {"SGX-PCK-CRL-Issuer-Chain": header}, self.pki.crl(revoked=[99]).public_bytes(der)),
            "https://root.example.test/IntelSGXRootCA.der": (200, {}, self.pki.crl(issuer="root").public_bytes(der)),
        }

    def __call__(self, url: str):
        self.urls.append(url)
        return self.routes.get(url, (404, {}, b""))


def _fetcher(pcs: FakePcs) -> IntelPcsFetcher:
    return IntelPcsFetcher(BASE, pcs, root_crl_url="https://root.example.test/IntelSGXRootCA.der")


def test_fetch_and_evaluate() -> None:
    pcs = FakePcs()
    coll = fetch_collateral(_fetcher(pcs), fmspc=FMSPC, kind="sgx", now=NOW, trust=pcs.pki.trust())
    assert len(coll.crls) == 2 and coll.tcb_info is not None and coll.qe_identity is not None
    pck = PckExtensions(fmspc=FMSPC, pce_id=b"\0\0", cpusvn=bytes([3] * 16), pcesvn=3, tcb_components=(3,) * 16,
                        sgx_type=0)
    result = evaluate_sgx_tcb(coll, pck, NOW)
    assert (result.status, result.advisory_ids) == ("SWHardeningNeeded", ("INTEL-SA-00615",))
    assert evaluate_qe_identity(coll, b"\x8c" * 32, 1, 8, 0, bytes.fromhex("11" + "00" * 15), NOW).status == "UpToDate"
    assert set(pcs.urls) == set(pcs.routes)


def test_fetched_documents_are_verified() -> None:
    pcs = FakePcs()
    url = f"{BASE}/sgx/certification/v4/tcb?fmspc={FMSPC.hex()}"
    status, headers, body = pcs.routes[url]
    pcs.routes[url] = (status, headers, body.replace(b'"SWHardeningNeeded"', b'"UpToDate"'))
    with pytest.raises(EvidenceInvalid, match="signature"):
        fetch_collateral(_fetcher(pcs), fmspc=FMSPC, kind="sgx", now=NOW, trust=pcs.pki.trust())
    pcs = FakePcs()
    with pytest.raises(EvidenceInvalid, match="pinned"):
        fetch_collateral(_fetcher(pcs), fmspc=FMSPC, kind="sgx", now=NOW)   # default trust: real Intel root


def test_fetch_errors() -> None:
    pcs = FakePcs()
    fetcher = _fetcher(pcs)
    with pytest.raises(EvidenceInvalid, match="HTTP 404"):
        fetcher.get_tcb_info(bytes(6), "sgx")
    with pytest.raises(EvidenceInvalid, match="HTTP 404"):
        fetcher.get_qe_identity("tdx")
    pcs.routes[f"{BASE}/sgx/certification/v4/qe/identity"] = (200, {}, b"{}")
    with pytest.raises(EvidenceMalformed, match="no SGX-Enclave-Identity-Issuer-Chain header"):
        fetcher.get_qe_identity("sgx")
    with pytest.raises(ValueError):
        fetcher.get_tcb_info(FMSPC, "snp")
    with pytest.raises(ValueError):
        fetcher.get_crl("intermediate")

    def broken(url: str):
        raise OSError("network unreachable")

    with pytest.raises(EvidenceInvalid, match="network unreachable"):
        IntelPcsFetcher(BASE, broken).get_crl("processor")


def test_fetcher_is_never_implicit() -> None:
    with pytest.raises(ValueError, match="explicit http_get"):
        IntelPcsFetcher(BASE)
    with pytest.raises(OSError, match="non-HTTPS"):
        urllib_http_get("http://example.test/")


def test_tdx_urls() -> None:
    pcs = FakePcs()
    fetcher = _fetcher(pcs)
    for call in (lambda: fetcher.get_tcb_info(FMSPC, "tdx"), lambda: fetcher.get_qe_identity("tdx"),
                 lambda: fetcher.get_crl("processor")):
        with pytest.raises(EvidenceInvalid):
            call()
    assert pcs.urls == [f"{BASE}/tdx/certification/v4/tcb?fmspc=00906ea10000", f"{BASE}/tdx/certification/v4/qe/identity",
                        f"{BASE}/sgx/certification/v4/pckcrl?ca=processor&encoding=der"]
