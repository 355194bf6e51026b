"""Fake Intel PCS and AMD KDS HTTP servers on 127.0.0.1 (ephemeral ports), serving collateral
signed by the fake vendor PKIs of attestation/testing, with the headers the real services send.

- :class:`FakePcs`: PCS v4 for a :class:`~attestation.testing.intel.FakeIntelPki`: SGX and TDX
  TCB Info for the PKI's FMSPC (levels that rate the fake quotes of
  :class:`~attestation.testing.intel.FakeQuotingEnclave` UpToDate), the QE and TD_QE identities,
  the PCK Platform and Processor CA CRLs with their issuer chains, and the root CA CRL (at
  ``/sgx/certification/v4/rootcacrl``, hex text as PCCS serves it).
- :class:`FakeKds`: KDS for a :class:`~attestation.testing.snp.FakeAmd`: cert chains, ARK-signed
  CRLs (built here with the fake ARK key) and VCEKs.

``routes`` maps "path?query" to (status, headers, body); tests replace entries to break one
thing, and ``requests`` records every path asked for. Never the real services.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import datetime, timedelta, UTC
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote as url_quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from attestation.snp.abi import decode_tcb
from attestation.snp.kds import AMD_PSS
from attestation.testing.intel import SGX_QE_MRSIGNER, TD_QE_MRSIGNER, FakeIntelPki
from attestation.testing.intel_collateral import enclave_level, tcb_level
from attestation.testing.snp import FakeAmd, fake_rsa_key

DER = serialization.Encoding.DER
PEM = serialization.Encoding.PEM
Route = tuple[int, dict[str, str], bytes]


class FakeServer:
    """A tiny HTTP server on 127.0.0.1 answering from ``routes``; a context manager."""

    def __init__(self, routes: dict[str, Route] | None = None) -> None:
        self.routes: dict[str, Route] = dict(routes or {})
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server hook name
                server.requests.append(self.path)
                status, headers, body = server.routes.get(self.path, (404, {}, b"not found"))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(PEM) for c in certs)


def intel_levels(pki: FakeIntelPki, *, tdx: bool) -> list[dict[str, Any]]:
    """TCB levels that rate the fake PKI's platform UpToDate (its PCK components and PCESVN)."""
    return [tcb_level("UpToDate", sgx=list(pki.tcb_components), pcesvn=pki.pcesvn,
                      tdx=[0] * 16 if tdx else None)]


class FakePcs(FakeServer):
    """Intel PCS v4 (and PCCS's root CA CRL endpoint) for ``pki``."""

    def __init__(self, pki: FakeIntelPki, *, next_update: datetime | None = None) -> None:
        super().__init__()
        self.pki = pki
        now = pki.now
        header = pki.issuer_chain_header()
        chain = {"TCB-Info-Issuer-Chain": header, "Content-Type": "application/json"}
        ident = {"SGX-Enclave-Identity-Issuer-Chain": header, "Content-Type": "application/json"}
        fmspc = pki.fmspc.hex()
        self.processor_key, self.processor_ca = pki.issue("Intel SGX PCK Processor CA", issuer="root", ca=True)
        nu = {"next_update": next_update} if next_update else {}
        self.routes.update({
            f"/sgx/certification/v4/tcb?fmspc={fmspc}": (
                200, chain, pki.tcb_info_document(fmspc=pki.fmspc, levels=intel_levels(pki, tdx=False), **nu)),
            f"/tdx/certification/v4/tcb?fmspc={fmspc}": (
                200, chain, pki.tcb_info_document(fmspc=pki.fmspc, tcb_id="TDX", levels=intel_levels(pki, tdx=True),
                                                  **nu)),
            "/sgx/certification/v4/qe/identity": (
                200, ident, pki.qe_identity_document(levels=[enclave_level("UpToDate", 8)], mrsigner=SGX_QE_MRSIGNER,
                                                     **nu)),
            "/tdx/certification/v4/qe/identity": (
                200, ident, pki.qe_identity_document(levels=[enclave_level("UpToDate", 8)], qe_id="TD_QE",
                                                     mrsigner=TD_QE_MRSIGNER, isvprodid=2, **nu)),
            "/sgx/certification/v4/pckcrl?ca=platform&encoding=der": (
                200, {"SGX-PCK-CRL-Issuer-Chain": url_quote(_pem((pki.ca, pki.root)).decode(), safe="")},
                pki.crl(issuer="ca").public_bytes(DER)),
            "/sgx/certification/v4/pckcrl?ca=processor&encoding=der": (
                200, {"SGX-PCK-CRL-Issuer-Chain": url_quote(_pem((self.processor_ca, pki.root)).decode(), safe="")},
                self.processor_crl().public_bytes(DER)),
            "/sgx/certification/v4/rootcacrl": (200, {}, pki.crl(issuer="root").public_bytes(DER).hex().encode()),
        })
        self.now = now

    def processor_crl(self) -> x509.CertificateRevocationList:
        return (x509.CertificateRevocationListBuilder().issuer_name(self.processor_ca.subject)
                .last_update(self.pki.now - timedelta(days=1)).next_update(self.pki.now + timedelta(days=30))
                .sign(self.processor_key, hashes.SHA256()))


def amd_crl(amd: FakeAmd, product: str, *, revoked: Iterable[int] = (), next_update: datetime | None = None,
            key: Any = None) -> x509.CertificateRevocationList:
    """A CRL of ``product``'s fake ARK (RSASSA-PSS/SHA-384, as AMD signs), or forged with ``key``."""
    now = datetime.now(UTC)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(amd.ark(product).subject)
               .last_update(now - timedelta(days=1)).next_update(next_update or now + timedelta(days=7)))
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - timedelta(hours=1)).build())
    return builder.sign(key or fake_rsa_key("ark"), hashes.SHA384(), rsa_padding=AMD_PSS)


class FakeKds(FakeServer):
    """AMD KDS for ``amd``: /{vcek,vlek}/v1/<product>/cert_chain and /crl, and VCEKs added with
    :meth:`add_vcek`."""

    def __init__(self, amd: FakeAmd, products: Iterable[str] = ("Milan", "Genoa", "Turin")) -> None:
        super().__init__()
        self.amd = amd
        for product in products:
            self.routes[f"/vcek/v1/{product}/cert_chain"] = (
                200, {"Content-Type": "application/x-pem-file"}, _pem((amd.ask(product), amd.ark(product))))
            self.routes[f"/vlek/v1/{product}/cert_chain"] = (
                200, {"Content-Type": "application/x-pem-file"}, _pem((amd.asvk(product), amd.ark(product))))
            crl = amd_crl(amd, product).public_bytes(DER)
            self.routes[f"/vcek/v1/{product}/crl"] = (200, {"Content-Type": "application/pkix-crl"}, crl)
            self.routes[f"/vlek/v1/{product}/crl"] = (200, {"Content-Type": "application/pkix-crl"}, crl)

    def add_vcek(self, product: str, chip_id: bytes, raw_tcb: int, cert: x509.Certificate) -> str:
        """Serve ``cert`` as the VCEK of ``chip_id`` at ``raw_tcb``; returns its path."""
        from attestation.snp.kds import vcek_url, KDS_BASE_URL

        path = vcek_url(product, chip_id, decode_tcb(raw_tcb, product))[len(KDS_BASE_URL):]
        self.routes[path] = (200, {"Content-Type": "application/pkix-cert"}, cert.public_bytes(DER))
        return path
