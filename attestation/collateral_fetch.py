"""Fetching collateral from Intel PCS and AMD KDS into a collateral directory (``enclaveq collateral fetch``).

Only when asked: nothing else in enclaveq opens a network connection for collateral. What is
fetched is laid out as :mod:`attestation.collateral_source` reads it (``DIR/intel/``,
``DIR/snp/<product>/``).

- Intel (``sgx`` / ``tdx``) for one FMSPC: TCB Info and the QE (TD_QE) Identity through
  :class:`~attestation.intel.fetch.IntelPcsFetcher`, verified as
  :func:`~attestation.intel.fetch.fetch_collateral` does (signature, issuer chain to the pinned
  Intel root, root CRL) and written with their issuer chains embedded; the PCK Platform
  and Processor CA CRLs (each checked against its ``SGX-PCK-CRL-Issuer-Chain``: PCK CA signed by
  the pinned root, CRL signed by the PCK CA); the Intel SGX Root CA CRL (signed by the pinned
  root). With the default PCS the root CRL comes from Intel's certificate site
  (:data:`~attestation.intel.fetch.ROOT_CRL_URL`); with another base URL (a PCCS or a mirror),
  from its ``/sgx/certification/v4/rootcacrl``.
- AMD (``snp``) for one product line: the ARK's CRLs for VCEKs and VLEKs (KDS ``crl``), each
  signed by the product's pinned ARK (with AMD's real pins: exactly that product's ARK, the one
  ``attestation.trust.amd`` pins and ships); the ``cert_chain`` files themselves (ARK pinned and
  self-signed, ASK/ASVK signed by it and not revoked); and, for a chip ID and TCB, its VCEK
  (signed by the ASK).

Every document is verified before anything is written; a run that fails writes nothing. Files
are written atomically (a temporary file in the same directory, then a rename), mode 0644, and
never through a symbolic link. :func:`loopback_or_https_get` allows HTTPS anywhere and plain
HTTP only to 127.0.0.1, ::1 or localhost (tests, local mirrors), with a timeout and a bounded
response size. Errors are :class:`CollateralFetchError` (the network or the server failed) or
the attestation package's typed errors (a document that does not verify).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from .errors import AttestationError, EvidenceInvalid, EvidenceMalformed
from .intel.collateral import load_crl, load_issuer_chain, verify_qe_identity, verify_tcb_info
from .intel.fetch import PCS_BASE_URL, ROOT_CRL_URL, HttpGet, IntelPcsFetcher
from .snp.abi import PRODUCTS, TcbParts
from .snp.kds import KDS_BASE_URL, cert_chain_url, cert_info, crl_url, load_certificates, vcek_url, \
    verify_amd_signature
from .trust import TrustAnchors
from .trust.amd import ARK_FINGERPRINTS, SNP_ROOTS

__all__ = ["CollateralFetchError", "FetchedDocument", "MAX_RESPONSE", "loopback_or_https_get", "check_url",
           "fetch_intel", "fetch_snp", "write_atomic", "fmspc_of_quote", "snp_target_of_report", "SnpTarget"]

MAX_RESPONSE = 16 * 1024 * 1024
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class CollateralFetchError(AttestationError):
    """Fetching failed: the URL is refused, the network or the server failed, or the response
    is too large. The message names the URL."""


@dataclass(frozen=True)
class FetchedDocument:
    """One verified document, as written."""

    path: Path
    kind: str                        # "TCB Info", "QE Identity", "CRL", "cert chain", "VCEK"
    issuer: str                      # who signed it
    next_update: datetime | None     # CRLs and Intel documents; None for certificates


def _default_trust() -> TrustAnchors:
    # Looked up at each call, not bound at import: the pinned vendor roots.
    from . import trust

    return trust.DEFAULT_TRUST


# --------------------------------------------------------------------------------------------
# HTTP


def check_url(url: str) -> None:
    """HTTPS anywhere; plain HTTP only to the loopback (127.0.0.1, ::1, localhost)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and (parts.hostname or "") in _LOOPBACK:
        return
    raise CollateralFetchError(f"refusing collateral URL {url!r}: only https:// (or http:// to 127.0.0.1, ::1 "
                               "or localhost) is allowed")


def loopback_or_https_get(*, timeout: float = 10.0, max_bytes: int = MAX_RESPONSE) -> HttpGet:
    """An ``http_get(url) -> (status, headers, body)`` for the fetchers (see module docstring).
    Redirects are followed only to URLs :func:`check_url` allows."""
    import urllib.error
    import urllib.request

    class _Redirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                             newurl: str) -> Any:
            check_url(newurl)
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    opener = urllib.request.build_opener(_Redirects())

    def get(url: str) -> tuple[int, Mapping[str, str], bytes]:
        check_url(url)
        request = urllib.request.Request(url, headers={"Accept": "application/json, application/pkix-crl, */*"})
        try:
            with opener.open(request, timeout=timeout) as response:
                body = response.read(max_bytes + 1)
                if len(body) > max_bytes:
                    raise CollateralFetchError(f"collateral fetch failed: {url}: response larger than {max_bytes} bytes")
                return response.status, dict(response.headers.items()), body
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers.items()) if exc.headers else {}, b""
        except urllib.error.URLError as exc:
            raise CollateralFetchError(f"collateral fetch failed: {url}: {exc.reason}") from None
        except (OSError, ValueError) as exc:
            raise CollateralFetchError(f"collateral fetch failed: {url}: {exc}") from None

    return get


def _get(http_get: HttpGet, url: str) -> tuple[Mapping[str, str], bytes]:
    try:
        status, headers, body = http_get(url)
    except AttestationError:
        raise
    except OSError as exc:
        raise CollateralFetchError(f"collateral fetch failed: {url}: {exc}") from None
    if status != 200:
        raise CollateralFetchError(f"collateral fetch failed: {url}: HTTP {status}")
    return headers, bytes(body)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    return next((value for key, value in headers.items() if key.lower() == wanted), None)


class _CheckedGet:
    """Wraps an ``http_get`` so that every URL is checked and failures are CollateralFetchError
    (IntelPcsFetcher would report them as EvidenceInvalid: here they are the network's)."""

    def __init__(self, http_get: HttpGet) -> None:
        self.http_get = http_get

    def __call__(self, url: str) -> tuple[int, Mapping[str, str], bytes]:
        check_url(url)
        try:
            status, headers, body = self.http_get(url)
        except OSError as exc:
            raise CollateralFetchError(f"collateral fetch failed: {url}: {exc}") from None
        if status != 200:
            raise CollateralFetchError(f"collateral fetch failed: {url}: HTTP {status}")
        return status, headers, body


# --------------------------------------------------------------------------------------------
# Writing


def write_atomic(directory: Path, name: str, data: bytes) -> Path:
    """Write ``directory/name`` atomically, mode 0644, never through a symlink (neither the file
    nor ``directory`` may be one; ``name`` must be a plain file name)."""
    if not name or "/" in name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"not a plain file name: {name!r}")
    directory = Path(directory)
    if directory.is_symlink():
        raise CollateralFetchError(f"refusing to write collateral into {directory}: it is a symbolic link")
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    if target.is_symlink() or (target.exists() and not stat.S_ISREG(target.lstat().st_mode)):
        raise CollateralFetchError(f"refusing to replace {target}: not a regular file")
    fd, temp = tempfile.mkstemp(prefix=".fetch-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, target)   # rename replaces a symlink created meanwhile, never follows it
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    return target


def _commit(pending: Sequence[tuple[Path, str, bytes, str, str, datetime | None]]) -> list[FetchedDocument]:
    written = []
    for directory, name, data, kind, issuer, next_update in pending:
        path = write_atomic(directory, name, data)
        written.append(FetchedDocument(path, kind, issuer, next_update))
    return written


# --------------------------------------------------------------------------------------------
# Intel


def _embed_chain(body: bytes, member: str, chain: Sequence[x509.Certificate]) -> bytes:
    """``body`` with its issuer chain as a top-level string member (the signed member's bytes
    are untouched), unless it already carries one."""
    whole = json.loads(body)
    if isinstance(whole, dict) and any(k in whole for k in (member, "issuerChain", "issuer_chain")):
        return body
    text = body.rstrip()
    if not text.endswith(b"}"):
        raise EvidenceMalformed("collateral JSON does not end with '}'")
    pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in chain)
    return text[:-1] + b"," + json.dumps(member).encode() + b":" + json.dumps(pem).encode() + b"}"


def _rfc4514(name: x509.Name) -> str:
    try:
        return name.rfc4514_string()
    except Exception:  # noqa: BLE001 - only for messages
        return "<unprintable name>"


def _pinned_root(candidates: Sequence[x509.Certificate], roots: frozenset[bytes]) -> x509.Certificate | None:
    for cert in candidates:
        if cert.fingerprint(hashes.SHA256()) in roots and cert.subject == cert.issuer:
            return cert
    return None


def _check_crl_signed(crl: x509.CertificateRevocationList, issuer: x509.Certificate, what: str) -> None:
    if crl.issuer != issuer.subject:
        raise EvidenceInvalid(f"{what}: issued by {_rfc4514(crl.issuer)!r}, not {_rfc4514(issuer.subject)!r}")
    try:
        valid = crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise EvidenceInvalid(f"{what}: the signature of {_rfc4514(crl.issuer)!r} does not verify")


def _check_fresh(crl: x509.CertificateRevocationList, now: datetime, what: str) -> None:
    if crl.next_update_utc is not None and now > crl.next_update_utc:
        raise EvidenceInvalid(f"{what} is stale: nextUpdate {crl.next_update_utc.isoformat()} is before "
                              f"{now.isoformat()}")


def fetch_intel(out: Path, *, kind: str, fmspc: bytes, now: datetime, http_get: HttpGet,
                pcs_url: str = PCS_BASE_URL, root_crl_url: str | None = None,
                trust: TrustAnchors | None = None) -> list[FetchedDocument]:
    """Fetch, verify and write Intel collateral for ``fmspc`` (``kind`` "sgx" or "tdx") into
    ``out/intel/`` (module docstring). Returns what was written."""
    from .chain import verify_chain

    if kind not in ("sgx", "tdx"):
        raise ValueError(f"kind must be 'sgx' or 'tdx', not {kind!r}")
    if len(fmspc) != 6:
        raise ValueError("an FMSPC is 6 bytes (12 hex digits)")
    trust = trust or _default_trust()
    base = pcs_url.rstrip("/")
    check_url(base + "/")
    if root_crl_url is None:
        root_crl_url = ROOT_CRL_URL if base == PCS_BASE_URL else f"{base}/sgx/certification/v4/rootcacrl"
    get = _CheckedGet(http_get)
    fetcher = IntelPcsFetcher(base, get, root_crl_url=root_crl_url)
    root_crl = fetcher.get_crl("root")
    tcb = fetcher.get_tcb_info(fmspc, kind)
    qe = fetcher.get_qe_identity(kind)
    roots = trust.for_platform("sgx")
    root = _pinned_root([*tcb.issuer_chain, *qe.issuer_chain], roots)
    if root is None:
        raise EvidenceInvalid("the collateral issuer chains hold no pinned Intel root")
    _check_crl_signed(root_crl, root, "Intel SGX Root CA CRL")
    _check_fresh(root_crl, now, "Intel SGX Root CA CRL")
    # Written with the chain embedded, and verified as written: exactly what the loader will read
    # (the same checks as attestation.intel.fetch.fetch_collateral: signature, chain to the pinned
    # root, revocation by the root CRL).
    tcb_body = _embed_chain(tcb.body, "TCB-Info-Issuer-Chain", tcb.issuer_chain)
    qe_body = _embed_chain(qe.body, "SGX-Enclave-Identity-Issuer-Chain", qe.issuer_chain)
    tcb_info = verify_tcb_info(tcb_body, None, now=now, trust=trust, crls=[root_crl])
    qe_identity = verify_qe_identity(qe_body, None, now=now, trust=trust, crls=[root_crl])
    if tcb_info.fmspc != fmspc or tcb_info.id != kind.upper():
        raise EvidenceInvalid(f"PCS answered with {tcb_info.id} TCB Info for FMSPC {tcb_info.fmspc.hex()}, not "
                              f"{kind.upper()} {fmspc.hex()}")
    directory = Path(out) / "intel"
    signer = _rfc4514(tcb.issuer_chain[0].subject) if tcb.issuer_chain else "?"
    pending: list[tuple[Path, str, bytes, str, str, datetime | None]] = [
        (directory, f"tcb_info-{kind}-{fmspc.hex()}.json", tcb_body, "TCB Info", signer, tcb_info.next_update),
        (directory, f"qe_identity-{kind}.json", qe_body, "QE Identity", signer, qe_identity.next_update),
    ]
    for ca in ("platform", "processor"):
        url = f"{base}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der"
        headers, body = _get(get, url)
        crl = load_crl(body)
        chain_text = _header(headers, "SGX-PCK-CRL-Issuer-Chain")
        if chain_text is None:
            raise EvidenceMalformed(f"{url}: response has no SGX-PCK-CRL-Issuer-Chain header")
        chain = load_issuer_chain(chain_text)
        if len(chain) != 2:
            raise EvidenceInvalid(f"{url}: the PCK CRL issuer chain must be [PCK CA, root], got {len(chain)} "
                                  "certificates")
        verify_chain(list(chain), now=now, trusted_roots=roots, crls=[root_crl])
        _check_crl_signed(crl, chain[0], f"PCK {ca} CA CRL")
        _check_fresh(crl, now, f"PCK {ca} CA CRL")
        pending.append((directory, f"pck_crl-{ca}.der", crl.public_bytes(serialization.Encoding.DER), "CRL",
                        _rfc4514(crl.issuer), crl.next_update_utc))
    pending.append((directory, "root_ca_crl.der", root_crl.public_bytes(serialization.Encoding.DER), "CRL",
                    _rfc4514(root_crl.issuer), root_crl.next_update_utc))
    return _commit(pending)


def fmspc_of_quote(platform: str, evidence: bytes) -> bytes:
    """The FMSPC in the PCK certificate of an SGX or TDX quote (not verified: it only says what
    to fetch; what is fetched is verified, and the quote later against it)."""
    from .intel.pck import parse_pck_extensions

    if platform == "sgx":
        from .sgx.abi import parse_quote as parse_sgx
        signature_data = parse_sgx(evidence).signature_data
    elif platform == "tdx":
        from .tdx.abi import parse_quote as parse_tdx
        signature_data = parse_tdx(evidence).signature_data
    else:
        raise ValueError(f"no FMSPC in {platform} evidence")
    chain = signature_data.certification.pck_chain
    if chain is None or not chain.certs:
        raise EvidenceMalformed("the quote carries no PCK certificate chain (certification data type 5)")
    return parse_pck_extensions(chain.certs[0]).fmspc


# --------------------------------------------------------------------------------------------
# AMD


@dataclass(frozen=True)
class SnpTarget:
    """What a report says to fetch for: its product line and, for its VCEK, chip ID and TCB."""

    product: str | None
    chip_id: bytes
    tcb: TcbParts | None
    signing_key: str


def snp_target_of_report(evidence: bytes) -> SnpTarget:
    """Product (from the signed CPUID, v3+), chip ID and REPORTED_TCB of an SEV-SNP report."""
    from .snp.abi import decode_tcb, parse_report

    report = parse_report(evidence)
    product = report.cpuid_product
    tcb = decode_tcb(report.reported_tcb, product) if product is not None else None
    return SnpTarget(product, bytes(report.chip_id), tcb, report.signing_key)


def _kds(url: str, base: str) -> str:
    return base.rstrip("/") + url[len(KDS_BASE_URL):]


def _snp_chain(data: bytes, product: str, signing_key: str, roots: frozenset[bytes], now: datetime,
               url: str) -> tuple[x509.Certificate, x509.Certificate]:
    """(intermediate, ARK) of a KDS cert_chain: the ARK pinned and self-signed, the ASK/ASVK
    signed by it, both valid at ``now``."""
    try:
        certs = load_certificates(data)
    except EvidenceMalformed:
        raise EvidenceMalformed(f"{url}: not a PEM certificate chain") from None
    arks = [c for c in certs if c.fingerprint(hashes.SHA256()) in roots]
    others = [c for c in certs if c.fingerprint(hashes.SHA256()) not in roots]
    if len(arks) != 1 or len(others) != 1:
        raise EvidenceInvalid(f"{url}: expected a pinned {product} ARK and one intermediate, got {len(certs)} "
                              f"certificate(s), {len(arks)} of them a pinned ARK")
    ark, inter = arks[0], others[0]
    verify_amd_signature(ark, ark, "ARK")
    verify_amd_signature(inter, ark, "ASK" if signing_key == "vcek" else "ASVK")
    info = cert_info(inter)
    if info.role != "intermediate" or info.product != product:
        raise EvidenceInvalid(f"{url}: the intermediate is not {product}'s {signing_key.upper()} signer")
    for cert in (ark, inter):
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise EvidenceInvalid(f"{url}: {_rfc4514(cert.subject)!r} is not valid at {now.isoformat()}")
    return inter, ark


def fetch_snp(out: Path, *, product: str, now: datetime, http_get: HttpGet, kds_url: str = KDS_BASE_URL,
              vcek_for: tuple[bytes, TcbParts] | None = None, signing_keys: Sequence[str] = ("vcek", "vlek"),
              trust: TrustAnchors | None = None) -> list[FetchedDocument]:
    """Fetch, verify and write AMD KDS collateral for ``product`` into ``out/snp/<product>/``:
    for each of ``signing_keys`` its cert chain and CRL; and the VCEK for ``vcek_for``
    (chip ID, TCB) if given. Returns what was written."""
    if product not in PRODUCTS:
        raise ValueError(f"product must be one of {', '.join(PRODUCTS)}, not {product!r}")
    roots = (trust or _default_trust()).for_platform("snp")
    if roots == SNP_ROOTS:
        roots = frozenset({ARK_FINGERPRINTS[product]})   # AMD's real pins: exactly this product's ARK
    base = kds_url.rstrip("/")
    check_url(base + "/")
    get = _CheckedGet(http_get)
    directory = Path(out) / "snp" / product
    pending: list[tuple[Path, str, bytes, str, str, datetime | None]] = []
    ask: x509.Certificate | None = None
    for signing_key in signing_keys:
        url = _kds(cert_chain_url(product, signing_key), base)
        _, chain_pem = _get(get, url)
        inter, ark = _snp_chain(chain_pem, product, signing_key, roots, now, url)
        if signing_key == "vcek":
            ask = inter
        url = _kds(crl_url(product, signing_key), base)
        _, body = _get(get, url)
        try:
            crl = load_crl(body)
        except EvidenceMalformed as exc:
            raise EvidenceMalformed(f"{url}: {exc}") from None
        _check_crl_signed(crl, ark, f"{url}: the {product} ARK's CRL")
        _check_fresh(crl, now, f"{url}: the {product} ARK's CRL")
        for revoked in (inter,):
            if crl.get_revoked_certificate_by_serial_number(revoked.serial_number) is not None:
                raise EvidenceInvalid(f"{url}: the ARK has revoked {_rfc4514(revoked.subject)!r}")
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (inter, ark))
        pending.append((directory, f"cert_chain-{signing_key}.pem", pem, "cert chain", _rfc4514(ark.subject), None))
        pending.append((directory, f"crl-{signing_key}.der", crl.public_bytes(serialization.Encoding.DER), "CRL",
                        _rfc4514(crl.issuer), crl.next_update_utc))
    if vcek_for is not None:
        if ask is None:
            raise ValueError("fetching a VCEK needs the vcek cert chain (signing_keys must include 'vcek')")
        chip_id, tcb = vcek_for
        url = _kds(vcek_url(product, chip_id, tcb), base)
        _, body = _get(get, url)
        try:
            (vcek,) = load_certificates(body)
        except (EvidenceMalformed, ValueError):
            raise EvidenceMalformed(f"{url}: not one DER certificate") from None
        verify_amd_signature(vcek, ask, "VCEK")
        info = cert_info(vcek)
        if info.role != "vcek" or info.product != product:
            raise EvidenceInvalid(f"{url}: not a {product} VCEK ({info.problem or info.role})")
        hwid = chip_id[:8] if product == "Turin" else chip_id
        name = f"vcek-{hwid.hex()[:16]}-{tcb.raw:016x}.der"
        pending.append((directory, name, vcek.public_bytes(serialization.Encoding.DER), "VCEK",
                        _rfc4514(ask.subject), None))
    return _commit(pending)
