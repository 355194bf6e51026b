"""AMD KDS certificates: loading them, telling their roles apart, reading the VCEK/VLEK extensions.

Profile: *Versioned Chip Endorsement Key (VCEK) Certificate and KDS Interface Specification*
(AMD #57230). The chain is ARK (self-signed root, RSA-4096) -> ASK (signs VCEKs, CN
``SEV-<product>``) or ASVK (signs VLEKs, CN ``SEV-VLEK-<product>``) -> VCEK / VLEK (EC P-384
key, CN ``SEV-VCEK`` / ``SEV-VLEK``). Every signature in it is RSASSA-PSS with SHA-384,
MGF1-SHA-384 and a 48-byte salt.

VCEK/VLEK extensions under 1.3.6.1.4.1.3704.1: ``.1`` structVersion (INTEGER), ``.2``
productName (IA5String, "Milan-B0", "Genoa", "Turin-B0"...), ``.3.1`` blSPL, ``.3.2`` teeSPL,
``.3.3`` snpSPL, ``.3.4``-``.3.7`` reserved SPLs (Turin has no ``.3.4``), ``.3.8`` ucodeSPL,
``.3.9`` fmcSPL (Turin), ``.4`` hwID (VCEK only: 64 bytes, 8 on Turin; seen both raw and wrapped
in an OCTET STRING), ``.5`` csp_id (VLEK only, IA5String).

The optional KDS fetcher (:class:`KdsFetcher`) is used only when the caller passes one in
``VerificationInputs.fetcher``; nothing here opens a network connection by itself.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable
from collections.abc import Callable, Hashable, Mapping

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from attestation.errors import EvidenceInvalid, EvidenceMalformed
from attestation.snp.abi import PRODUCTS, TcbParts, decode_tcb, encode_tcb

__all__ = [
    "AMD_OID",
    "KDS_BASE_URL",
    "EndorsementExtensions",
    "CertInfo",
    "KdsFetcher",
    "load_certificates",
    "cert_info",
    "endorsement_extensions",
    "verify_amd_signature",
    "product_line",
    "vcek_url",
    "cert_chain_url",
    "crl_url",
    "certificates_from_table",
    "BoundedCache",
]

AMD_OID = "1.3.6.1.4.1.3704.1"
_OID_STRUCT_VERSION = AMD_OID + ".1"
_OID_PRODUCT_NAME = AMD_OID + ".2"
_OID_SPL = AMD_OID + ".3."
_OID_HWID = AMD_OID + ".4"
_OID_CSP_ID = AMD_OID + ".5"
SPL_BOOTLOADER, SPL_TEE, SPL_SNP, SPL_UCODE, SPL_FMC = 1, 2, 3, 8, 9
CHIP_ID_SIZE = 64
TURIN_HWID_SIZE = 8

KDS_BASE_URL = "https://kdsintf.amd.com"

AMD_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_SERIAL_WARNING = "Parsed a serial number which wasn't positive"

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """A small thread-safe LRU map. Values are computed outside the lock (a race computes twice)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> V:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self._size:
                self._data.popitem(last=False)
        return value

    def get_or_compute(self, key: K, compute: Callable[[], V]) -> V:
        value = self.get(key)
        return value if value is not None else self.put(key, compute())

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


# --------------------------------------------------------------------------------------------
# Loading


def load_certificates(data: bytes) -> tuple[x509.Certificate, ...]:
    """Certificates from DER (one) or PEM (one or more, e.g. KDS ``cert_chain``) bytes.

    Genuine VCEKs/VLEKs have serial number 0, which RFC 5280 forbids and cryptography 50 loads
    with a deprecation warning (a future release will refuse them); the warning is silenced
    here because the certificate is authenticated by its AMD signature, not by its serial.
    Raises :class:`EvidenceMalformed` if the bytes hold no certificate.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise EvidenceMalformed(f"certificate data must be bytes, not {type(data).__name__}")
    data = bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_SERIAL_WARNING, category=CryptographyDeprecationWarning)
            if b"-----BEGIN" in data:
                certs = tuple(x509.load_pem_x509_certificates(data.rstrip(b"\x00")))
            else:
                certs = (x509.load_der_x509_certificate(data),)
            for cert in certs:  # parse lazily-parsed parts now, inside the warning filter
                cert.serial_number  # noqa: B018
    except Exception as exc:  # noqa: BLE001 - any parser failure is "malformed", by contract
        raise EvidenceMalformed(f"not a DER or PEM X.509 certificate ({type(exc).__name__})") from None
    if not certs:
        raise EvidenceMalformed("no certificate found")
    return certs


_TABLE_ENTRY = 24
_TABLE_MAX_ENTRIES = 16


def certificates_from_table(data: bytes) -> tuple[x509.Certificate, ...]:
    """The certificates of a GHCB certificate table (the extended report's / configfs-tsm
    ``auxblob``: 24-byte entries GUID, offset, length, ended by an all-zero entry; offsets from
    the table's start), or () if ``data`` is not one. GUIDs are not trusted or needed: each
    certificate is classified by its content like any other. Never raises."""
    certs: list[x509.Certificate] = []
    if len(data) < _TABLE_ENTRY:
        return ()
    for index in range(_TABLE_MAX_ENTRIES + 1):
        entry = data[index * _TABLE_ENTRY:(index + 1) * _TABLE_ENTRY]
        if len(entry) < _TABLE_ENTRY:
            return ()
        if entry == bytes(_TABLE_ENTRY):
            return tuple(certs)
        offset = int.from_bytes(entry[16:20], "little")
        length = int.from_bytes(entry[20:24], "little")
        if offset < _TABLE_ENTRY or length == 0 or offset + length > len(data):
            return ()
        try:
            certs.extend(load_certificates(data[offset:offset + length]))
        except EvidenceMalformed:
            continue  # not a certificate (or not one we read): other entries may still be
    return ()


# --------------------------------------------------------------------------------------------
# Small strict DER readers for the AMD extension values


def _der_tlv(value: bytes, tag: int, what: str) -> bytes:
    if len(value) < 2 or value[0] != tag:
        raise ValueError(f"{what} is not DER tag 0x{tag:02x}")
    length = value[1]
    header = 2
    if length & 0x80:
        count = length & 0x7F
        if count not in (1, 2) or len(value) < 2 + count:
            raise ValueError(f"{what} has an unsupported length encoding")
        length = int.from_bytes(value[2:2 + count], "big")
        header += count
        if length < 0x80 or (count == 2 and length < 0x100):
            raise ValueError(f"{what} length is not minimally encoded")
    if len(value) != header + length:
        raise ValueError(f"{what} has {len(value) - header - length:+d} bytes beyond its DER length")
    return value[header:]


def _der_uint8(value: bytes, what: str) -> int:
    body = _der_tlv(value, 0x02, what)
    if not body or len(body) > 2:
        raise ValueError(f"{what} is not an INTEGER 0..255")
    if len(body) == 2 and (body[0] != 0 or body[1] < 0x80):
        raise ValueError(f"{what} INTEGER is not minimally encoded or out of 0..255")
    if len(body) == 1 and body[0] >= 0x80:
        raise ValueError(f"{what} INTEGER is negative")
    return body[-1]


def _der_ia5(value: bytes, what: str) -> str:
    body = _der_tlv(value, 0x16, what)
    if any(b > 0x7F for b in body):
        raise ValueError(f"{what} is not IA5 (ASCII)")
    return body.decode("ascii")


def _hwid(value: bytes, sizes: tuple[int, ...]) -> bytes:
    # KDS writes the hwID as raw bytes; some certificates wrap it in an OCTET STRING.
    if len(value) in sizes:
        return value
    body = _der_tlv(value, 0x04, "hwID")
    if len(body) not in sizes:
        raise ValueError(f"hwID is {len(body)} bytes; expected {' or '.join(map(str, sizes))}")
    return body


def product_line(product_name: str) -> str | None:
    """"Milan-B0" -> "Milan"; None for an unknown product line."""
    line = product_name.split("-", 1)[0]
    return line if line in PRODUCTS else None


@dataclass(frozen=True)
class EndorsementExtensions:
    """The AMD extensions of a VCEK or VLEK certificate."""

    struct_version: int
    product_name: str                  # as written, e.g. "Milan-B0"
    spl: Mapping[int, int]             # SPL extension .3.N -> value
    hwid: bytes | None                 # VCEK only
    csp_id: str | None                 # VLEK only

    @property
    def product(self) -> str | None:
        return product_line(self.product_name)

    def tcb(self, product: str) -> TcbParts:
        """The TCB the certificate was issued for, laid out for ``product`` (reserved SPLs included)."""
        spl = self.spl
        reserved: tuple[int, ...]
        if product == "Turin":
            reserved = (spl.get(5, 0), spl.get(6, 0), spl.get(7, 0))
            parts = {"fmc": spl.get(SPL_FMC, 0)}
        else:
            reserved = (spl.get(4, 0), spl.get(5, 0), spl.get(6, 0), spl.get(7, 0))
            parts = {}
        parts.update(bootloader=spl.get(SPL_BOOTLOADER, 0), tee=spl.get(SPL_TEE, 0), snp=spl.get(SPL_SNP, 0),
                     microcode=spl.get(SPL_UCODE, 0))
        return decode_tcb(encode_tcb(parts, product, reserved=reserved), product)


def endorsement_extensions(cert: x509.Certificate) -> EndorsementExtensions | None:
    """The AMD extensions of ``cert``, None if it has none; ValueError if they are malformed."""
    amd: dict[str, bytes] = {}
    for ext in cert.extensions:
        oid = ext.oid.dotted_string
        if oid.startswith(AMD_OID + "."):
            if not isinstance(ext.value, x509.UnrecognizedExtension):
                raise ValueError(f"extension {oid} is not an opaque AMD extension")
            amd[oid] = ext.value.value
    if not amd:
        return None
    for oid in amd:
        if oid not in (_OID_STRUCT_VERSION, _OID_PRODUCT_NAME, _OID_HWID, _OID_CSP_ID) and not (
            oid.startswith(_OID_SPL) and oid[len(_OID_SPL):].isdigit() and 1 <= int(oid[len(_OID_SPL):]) <= 9
        ):
            raise ValueError(f"unknown AMD extension {oid}")
    if _OID_STRUCT_VERSION not in amd or _OID_PRODUCT_NAME not in amd:
        raise ValueError("structVersion (.1) and productName (.2) extensions are required")
    struct_version = _der_uint8(amd[_OID_STRUCT_VERSION], "structVersion")
    product_name = _der_ia5(amd[_OID_PRODUCT_NAME], "productName")
    spl = {int(oid[len(_OID_SPL):]): _der_uint8(value, f"SPL {oid}")
           for oid, value in amd.items() if oid.startswith(_OID_SPL)}
    required = {SPL_BOOTLOADER, SPL_TEE, SPL_SNP, SPL_UCODE}
    if product_line(product_name) == "Turin":
        required.add(SPL_FMC)
    missing = sorted(required - set(spl))
    if missing:
        raise ValueError(f"SPL extension(s) {', '.join(f'.3.{m}' for m in missing)} missing")
    sizes = (CHIP_ID_SIZE, TURIN_HWID_SIZE) if product_line(product_name) == "Turin" else (CHIP_ID_SIZE,)
    hwid = _hwid(amd[_OID_HWID], sizes) if _OID_HWID in amd else None
    csp_id = _der_ia5(amd[_OID_CSP_ID], "csp_id") if _OID_CSP_ID in amd else None
    return EndorsementExtensions(struct_version, product_name, spl, hwid, csp_id)


# --------------------------------------------------------------------------------------------
# Roles


@dataclass(frozen=True)
class CertInfo:
    """One user-supplied certificate, classified.

    ``role``: "vcek", "vlek" (EC P-384 key with AMD extensions: hwID, resp. csp_id), "ark"
    (self-signed RSA), "intermediate" (other RSA: an ASK or ASVK), or "other" with ``problem``
    saying why it fits none (it is then ignored, and named if nothing else fits).
    ``product`` comes from productName (VCEK/VLEK) or the CN pattern (``ARK-<p>``,
    ``SEV-<p>``, ``SEV-VLEK-<p>``) when it matches one; else None.
    """

    cert: x509.Certificate
    role: str
    product: str | None = None
    extensions: EndorsementExtensions | None = None
    problem: str | None = None
    public_key: Any = None

    @property
    def subject(self) -> str:
        return _subject(self.cert)


def _subject(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string()
    except Exception:  # noqa: BLE001 - only used in messages
        return "<unprintable subject>"


def _common_name(cert: x509.Certificate) -> str:
    try:
        attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except Exception:  # noqa: BLE001
        return ""
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else ""


def _classify(cert: x509.Certificate) -> CertInfo:
    try:
        key = cert.public_key()
        issuer, subject = cert.issuer, cert.subject
    except Exception as exc:  # noqa: BLE001 - a lazily parsed field may be garbage
        return CertInfo(cert, "other", problem=f"unreadable certificate ({type(exc).__name__})")
    cn = _common_name(cert)
    if isinstance(key, ec.EllipticCurvePublicKey):
        try:
            exts = endorsement_extensions(cert)
        except Exception as exc:  # noqa: BLE001 - ValueError, or cryptography's own parse errors
            return CertInfo(cert, "other", problem=f"malformed AMD extensions: {exc}", public_key=key)
        if exts is None:
            return CertInfo(cert, "other", problem="EC certificate without AMD VCEK/VLEK extensions", public_key=key)
        if not isinstance(key.curve, ec.SECP384R1):
            return CertInfo(cert, "other", problem=f"VCEK/VLEK key is on {key.curve.name}, not P-384",
                            extensions=exts, public_key=key)
        if exts.hwid is not None and exts.csp_id is None:
            role = "vcek"
        elif exts.csp_id is not None and exts.hwid is None:
            role = "vlek"
        else:
            return CertInfo(cert, "other", problem="AMD certificate with both or neither of hwID and csp_id",
                            extensions=exts, public_key=key)
        return CertInfo(cert, role, product=exts.product, extensions=exts, public_key=key)
    if isinstance(key, rsa.RSAPublicKey):
        if issuer == subject:
            product = cn[4:] if cn.startswith("ARK-") else None
            return CertInfo(cert, "ark", product=product if product in PRODUCTS else None, public_key=key)
        product = cn[9:] if cn.startswith("SEV-VLEK-") else (cn[4:] if cn.startswith("SEV-") else None)
        return CertInfo(cert, "intermediate", product=product if product in PRODUCTS else None, public_key=key)
    return CertInfo(cert, "other", problem=f"unexpected key type {type(key).__name__}")


_INFO_CACHE: BoundedCache[x509.Certificate, CertInfo] = BoundedCache(256)


def cert_info(cert: x509.Certificate) -> CertInfo:
    """:class:`CertInfo` of ``cert``, cached by certificate content (DER equality)."""
    try:
        hash(cert)
    except Exception:  # noqa: BLE001 - not a usable certificate object
        return CertInfo(cert, "other", problem="not an X.509 certificate")
    return _INFO_CACHE.get_or_compute(cert, lambda: _classify(cert))


def verify_amd_signature(child: x509.Certificate, parent: x509.Certificate, role: str) -> None:
    """Check ``child`` is signed by ``parent`` exactly as AMD signs: RSASSA-PSS, SHA-384,
    MGF1-SHA-384, 48-byte salt, with an RSA-4096 parent key. :class:`EvidenceInvalid` if not.

    Stricter than ``verify_directly_issued_by`` (which accepts whatever PSS parameters the
    certificate declares) and total: every failure, including unsupported algorithms in a
    damaged certificate, is an ``EvidenceInvalid``.
    """
    try:
        if child.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS:
            raise ValueError(f"signature algorithm {child.signature_algorithm_oid.dotted_string} is not RSASSA-PSS")
        if not isinstance(child.signature_hash_algorithm, hashes.SHA384):
            raise ValueError("signature hash is not SHA-384")
        if child.issuer != parent.subject:
            raise ValueError("issuer name does not match the parent's subject")
        key = parent.public_key()
        if not isinstance(key, rsa.RSAPublicKey) or key.key_size != 4096:
            raise ValueError("signer key is not RSA-4096")
        key.verify(child.signature, child.tbs_certificate_bytes, AMD_PSS, hashes.SHA384())
    except InvalidSignature:
        raise EvidenceInvalid(f"{role} certificate {_subject(child)!r} is not signed by {_subject(parent)!r} "
                              "(RSASSA-PSS SHA-384 signature does not verify)") from None
    except Exception as exc:  # noqa: BLE001 - ValueError, UnsupportedAlgorithm, parse errors
        raise EvidenceInvalid(f"{role} certificate {_subject(child)!r} is not signed by {_subject(parent)!r} "
                              f"the way AMD signs: {exc}") from None


# --------------------------------------------------------------------------------------------
# KDS fetching (optional, never by default)


@runtime_checkable
class KdsFetcher(Protocol):
    """What ``VerificationInputs.fetcher`` must offer for SEV-SNP: an HTTPS GET.

    ``get(url)`` returns the response body or raises (any exception is reported as
    :class:`EvidenceInvalid` naming the URL). The verifier asks only for missing certificates:
    the VCEK (``/vcek/v1/<product>/<hwid>?blSPL=..``) and the product's ``cert_chain``. VLEKs
    need a cloud provider's credentials and are never fetched.
    """

    def get(self, url: str) -> bytes: ...


def vcek_url(product: str, chip_id: bytes, tcb: TcbParts) -> str:
    """KDS URL of the VCEK for ``chip_id`` at ``tcb`` (Turin identifies chips by 8 bytes)."""
    hwid = chip_id[:TURIN_HWID_SIZE] if product == "Turin" else chip_id
    args = f"blSPL={tcb.bootloader}&teeSPL={tcb.tee}&snpSPL={tcb.snp}&ucodeSPL={tcb.microcode}"
    if product == "Turin":
        args = f"fmcSPL={tcb.fmc}&" + args
    return f"{KDS_BASE_URL}/vcek/v1/{product}/{hwid.hex()}?{args}"


def cert_chain_url(product: str, signing_key: str) -> str:
    """KDS URL of ``product``'s ASK+ARK (``signing_key`` "vcek") or ASVK+ARK ("vlek") PEM."""
    return f"{KDS_BASE_URL}/{signing_key}/v1/{product}/cert_chain"


def crl_url(product: str, signing_key: str) -> str:
    """KDS URL of the ARK-issued CRL for ``product``."""
    return f"{KDS_BASE_URL}/{signing_key}/v1/{product}/crl"
