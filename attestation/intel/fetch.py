"""Optional collateral fetcher for Intel's Provisioning Certification Service (PCS API v4).

Off by default: nothing in the package constructs a fetcher. A caller who wants network access
builds ``IntelPcsFetcher(base_url, http_get)`` and passes it explicitly (``VerificationInputs.fetcher``);
``http_get`` is injected too, so tests use a fake and run offline, and a deployment may route it
through its own HTTP client or a caching service (PCCS speaks the same API). :func:`urllib_http_get`
is a plain standard-library implementation for callers who want one.

What comes back is *unverified* bytes plus the issuer chain from the response header;
:func:`fetch_collateral` verifies everything (same functions as files from a directory) before
returning an :class:`~attestation.intel.collateral.IntelCollateral`.

Endpoints of Intel PCS API v4 (``{kind}`` is ``sgx`` or ``tdx``):

- ``GET {base}/{kind}/certification/v4/tcb?fmspc=<hex>`` → TCB Info, header ``TCB-Info-Issuer-Chain``
- ``GET {base}/{kind}/certification/v4/qe/identity`` → QE / TD_QE identity, header
  ``SGX-Enclave-Identity-Issuer-Chain``
- ``GET {base}/sgx/certification/v4/pckcrl?ca=platform|processor&encoding=der`` → PCK CA CRL, header
  ``SGX-PCK-CRL-Issuer-Chain``
- the Intel SGX Root CA CRL is a static file (``root_crl_url``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol
from collections.abc import Callable, Mapping
from urllib.parse import quote

from cryptography import x509

from ..errors import EvidenceInvalid, EvidenceMalformed
from ..trust import DEFAULT_TRUST, TrustAnchors
from .collateral import IntelCollateral, load_crl, load_issuer_chain, verify_qe_identity, verify_tcb_info

__all__ = [
    "CollateralDocument",
    "CollateralFetcher",
    "IntelPcsFetcher",
    "HttpGet",
    "urllib_http_get",
    "fetch_collateral",
    "PCS_BASE_URL",
    "ROOT_CRL_URL",
]

PCS_BASE_URL = "https://api.trustedservices.intel.com"
ROOT_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"

# http_get(url) -> (status, headers, body). Header names are matched case-insensitively.
HttpGet = Callable[[str], "tuple[int, Mapping[str, str], bytes]"]


@dataclass(frozen=True)
class CollateralDocument:
    body: bytes                                   # the response body, untouched (signatures cover its bytes)
    issuer_chain: tuple[x509.Certificate, ...]    # from the response header


class CollateralFetcher(Protocol):
    def get_tcb_info(self, fmspc: bytes, kind: str) -> CollateralDocument: ...

    def get_qe_identity(self, kind: str) -> CollateralDocument: ...

    def get_crl(self, ca: str) -> x509.CertificateRevocationList: ...


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def _kind(kind: str) -> str:
    if kind not in ("sgx", "tdx"):
        raise ValueError(f"kind must be 'sgx' or 'tdx', not {kind!r}")
    return kind


class IntelPcsFetcher:
    """Fetches collateral over ``http_get``. Never created implicitly."""

    def __init__(self, base_url: str = PCS_BASE_URL, http_get: HttpGet | None = None, *,
                 root_crl_url: str = ROOT_CRL_URL) -> None:
        if http_get is None:
            raise ValueError("IntelPcsFetcher needs an explicit http_get (e.g. attestation.intel.fetch.urllib_http_get)")
        self.base_url = base_url.rstrip("/")
        self.http_get = http_get
        self.root_crl_url = root_crl_url

    def _get(self, url: str) -> tuple[Mapping[str, str], bytes]:
        try:
            status, headers, body = self.http_get(url)
        except OSError as exc:
            raise EvidenceInvalid(f"collateral fetch failed: {url}: {exc}") from None
        if status != 200:
            raise EvidenceInvalid(f"collateral fetch failed: {url}: HTTP {status}")
        return headers, bytes(body)

    def _document(self, url: str, header: str) -> CollateralDocument:
        headers, body = self._get(url)
        chain = _header(headers, header)
        if chain is None:
            raise EvidenceMalformed(f"{url}: response has no {header} header")
        return CollateralDocument(body, load_issuer_chain(chain))

    def get_tcb_info(self, fmspc: bytes, kind: str) -> CollateralDocument:
        if len(fmspc) != 6:
            raise ValueError("fmspc must be 6 bytes")
        url = f"{self.base_url}/{_kind(kind)}/certification/v4/tcb?fmspc={quote(fmspc.hex())}"
        return self._document(url, "TCB-Info-Issuer-Chain")

    def get_qe_identity(self, kind: str) -> CollateralDocument:
        url = f"{self.base_url}/{_kind(kind)}/certification/v4/qe/identity"
        return self._document(url, "SGX-Enclave-Identity-Issuer-Chain")

    def get_crl(self, ca: str) -> x509.CertificateRevocationList:
        if ca == "root":
            url = self.root_crl_url
        elif ca in ("platform", "processor"):
            url = f"{self.base_url}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der"
        else:
            raise ValueError(f"ca must be 'platform', 'processor' or 'root', not {ca!r}")
        _, body = self._get(url)
        return load_crl(body)


def urllib_http_get(url: str, *, timeout: float = 10.0) -> tuple[int, Mapping[str, str], bytes]:
    """A standard-library ``http_get`` (HTTPS only). Used only when a caller passes it."""
    import urllib.error
    import urllib.request

    if not url.startswith("https://"):
        raise OSError(f"refusing non-HTTPS collateral URL {url!r}")
    request = urllib.request.Request(url, headers={"Accept": "application/json, application/pkix-crl"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (https enforced)
            return response.status, dict(response.headers.items()), response.read(16 * 1024 * 1024)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), b""


def fetch_collateral(fetcher: CollateralFetcher, *, fmspc: bytes, kind: str, now: datetime,
                     trust: TrustAnchors = DEFAULT_TRUST, pck_ca: str | None = "platform") -> IntelCollateral:
    """Fetch and verify TCB Info for ``fmspc``, the QE identity for ``kind`` and the CRLs
    (root CA, and the PCK CA named by ``pck_ca`` unless it is None)."""
    crls: list[x509.CertificateRevocationList] = [fetcher.get_crl("root")]
    if pck_ca is not None:
        crls.append(fetcher.get_crl(pck_ca))
    tcb = fetcher.get_tcb_info(fmspc, kind)
    qe = fetcher.get_qe_identity(kind)
    tcb_info = verify_tcb_info(tcb.body, list(tcb.issuer_chain), now=now, trust=trust, crls=crls)
    qe_identity = verify_qe_identity(qe.body, list(qe.issuer_chain), now=now, trust=trust, crls=crls)
    return IntelCollateral(tcb_info=tcb_info, qe_identity=qe_identity, crls=tuple(crls),
                           tcb_infos=(tcb_info,), qe_identities=(qe_identity,))
