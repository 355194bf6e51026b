"""Intel DCAP quote pieces shared by SGX (quote v3) and TDX (quotes v4 and v5): bytes <-> frozen
dataclasses, and no judgement.

Layouts follow the Intel DCAP quote library specifications (*SGX DCAP ECDSA Quote Library API*,
Appendix A, for v3; *TDX DCAP Quoting Library API*, Appendix A, for v4/v5; the absolute offsets
are in :mod:`attestation.sgx.abi` and :mod:`attestation.tdx.abi`). All integers are little-endian.

What lives here:

- :class:`QuoteHeader` (48 bytes, every version);
- :class:`ReportBody` -- the 384-byte SGX report body, used for the ISV enclave report of an
  SGX quote *and* for the Quoting Enclave's report in every quote;
- :class:`TdReportBody` -- the TD quote body, TDX 1.0 (584 bytes) or TDX 1.5 (648 bytes);
- :class:`EcdsaSignatureData` -- the ECDSA-P256 quote signature data: quote signature, raw
  attestation key, QE report + its signature, QE authentication data, and the PCK certificate
  chain (certification data type 5), found inline (v3) or nested in certification data type 6
  (v4/v5): :func:`parse_signature_data`;
- :func:`parse_pck_chain` -- strict PEM for certification data type 5.

Every function here either returns a well-typed value or raises :class:`EvidenceMalformed`,
whatever the input (this is fuzzed). Strictness choices:

- every length field must match the bytes it announces *exactly*: the signature data is
  consumed to its last byte, nested structures fill their declared size; nothing in between is
  skipped or tolerated. Only bytes after the declared end of the whole signature data (outside
  every signature) are allowed, and the platform parsers report their count;
- the PCK chain PEM must be canonical: ``BEGIN``/``END CERTIFICATE`` lines, base64 lines of the
  base64 alphabet only whose decoding re-encodes to the very same characters (no non-zero pad
  bits: a flipped pad bit would otherwise decode to the same certificate), LF or CRLF line ends,
  nothing between certificates, optionally NUL bytes after the last one (Intel's quoting library
  NUL-terminates the chain in TDX quotes). Each certificate is strict DER (cryptography's parser)
  whose signature BIT STRING has no unused bits. So every byte of the certification data matters:
  changing any one of them is refused here or breaks a signature or the pinned root.
"""

from __future__ import annotations

from attestation.chain import signature_is_octet_aligned

import base64
import re
import struct
from dataclasses import dataclass
from functools import lru_cache

from cryptography import x509

from attestation.errors import EvidenceMalformed

__all__ = [
    "ATT_KEY_ECDSA_P256",
    "ATT_KEY_ECDSA_P384",
    "CERT_PCK_CHAIN",
    "CERT_QE_REPORT",
    "CERTIFICATION_DATA_TYPES",
    "HEADER_SIZE",
    "INTEL_QE_VENDOR_ID",
    "MAX_QUOTE_BYTES",
    "REPORT_BODY_SIZE",
    "TD_BODY_SIZES",
    "TEE_TYPE_SGX",
    "TEE_TYPE_TDX",
    "CertificationData",
    "EcdsaSignatureData",
    "PckCertChain",
    "QuoteHeader",
    "Reader",
    "ReportBody",
    "TdReportBody",
    "encode_signature_data",
    "parse_header",
    "parse_pck_chain",
    "parse_report_body",
    "parse_signature_data",
    "parse_td_report_body",
]

HEADER_SIZE = 48
REPORT_BODY_SIZE = 384
# TD quote body sizes by v5 body descriptor type: 2 = TDX 1.0, 3 = TDX 1.5 (1.0 + TEE_TCB_SVN2 + MRSERVICETD).
TD_BODY_SIZES = {2: 584, 3: 648}
ATT_KEY_ECDSA_P256 = 2
ATT_KEY_ECDSA_P384 = 3
TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")

CERT_PCK_CHAIN = 5
CERT_QE_REPORT = 6
CERTIFICATION_DATA_TYPES = {
    1: "PPID in clear text",
    2: "PPID encrypted with RSA-2048-OAEP",
    3: "PPID encrypted with RSA-3072-OAEP",
    4: "PCK leaf certificate",
    5: "concatenated PCK certificate chain (PEM)",
    6: "QE report certification data",
    7: "platform manifest",
}

# Real quotes are about 5 KB; anything far larger is refused before it is looked at.
MAX_QUOTE_BYTES = 64 * 1024
MAX_PCK_CHAIN_CERTS = 8

ECDSA_SIGNATURE_SIZE = 64   # r || s, big-endian, P-256
ECDSA_KEY_SIZE = 64         # X || Y, big-endian, P-256


class Reader:
    """Sequential little-endian reader over bytes; every shortfall is ``EvidenceMalformed``
    naming the field and its absolute offset."""

    __slots__ = ("data", "pos", "end", "base", "where")

    def __init__(self, data: bytes, *, base: int = 0, where: str = "quote") -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)
        self.base = base  # absolute offset of data[0] in the quote, for messages
        self.where = where

    def take(self, size: int, field: str) -> bytes:
        if size < 0 or self.pos + size > self.end:
            raise EvidenceMalformed(
                f"{self.where}: {field} needs {size} bytes at offset {self.base + self.pos:#x}, "
                f"only {self.end - self.pos} left"
            )
        chunk = self.data[self.pos:self.pos + size]
        self.pos += size
        return chunk

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "little")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "little")

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def expect_end(self, what: str) -> None:
        if self.pos != self.end:
            raise EvidenceMalformed(
                f"{self.where}: {self.end - self.pos} unexpected bytes after {what} "
                f"(offset {self.base + self.pos:#x})"
            )


# --------------------------------------------------------------------------------------------
# Header


@dataclass(frozen=True)
class QuoteHeader:
    """The 48-byte quote header. In v3 (SGX) bytes 4..7 are reserved (zero) and 8..11 hold the
    QE and PCE SVNs; in v4/v5 bytes 4..7 are the TEE type and 8..11 are reserved."""

    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes

    def encode(self) -> bytes:
        return struct.pack("<HHIHH", self.version, self.att_key_type, self.tee_type, self.qe_svn,
                           self.pce_svn) + self.qe_vendor_id + self.user_data


def parse_header(data: bytes) -> QuoteHeader:
    if len(data) < HEADER_SIZE:
        raise EvidenceMalformed(f"quote is {len(data)} bytes, shorter than its {HEADER_SIZE}-byte header")
    version, att_key_type, tee_type, qe_svn, pce_svn = struct.unpack_from("<HHIHH", data, 0)
    return QuoteHeader(version, att_key_type, tee_type, qe_svn, pce_svn, bytes(data[12:28]),
                       bytes(data[28:48]))


# --------------------------------------------------------------------------------------------
# SGX report body (ISV enclave report and QE report)


_REPORT_LAYOUT = struct.Struct("<16sI12s16s16s32s32s32s32s64sHHH42s16s64s")
assert _REPORT_LAYOUT.size == REPORT_BODY_SIZE


@dataclass(frozen=True)
class ReportBody:
    """sgx_report_body_t (384 bytes). ``attributes`` is the raw 16-byte ATTRIBUTES field:
    FLAGS (u64 LE) then XFRM (u64 LE). Reserved fields are kept as read (they are signed)."""

    cpusvn: bytes
    miscselect: int
    reserved1: bytes
    isv_ext_prod_id: bytes
    attributes: bytes
    mrenclave: bytes
    reserved2: bytes
    mrsigner: bytes
    reserved3: bytes
    config_id: bytes
    isvprodid: int
    isvsvn: int
    config_svn: int
    reserved4: bytes
    isv_family_id: bytes
    report_data: bytes

    @property
    def attributes_flags(self) -> int:
        return int.from_bytes(self.attributes[:8], "little")

    @property
    def attributes_xfrm(self) -> int:
        return int.from_bytes(self.attributes[8:], "little")

    @property
    def debug(self) -> bool:
        """ATTRIBUTES.FLAGS bit 1 (DEBUG; Intel SDM Vol. 3D, SGX data structures)."""
        return bool(self.attributes_flags & 0x2)

    def encode(self) -> bytes:
        return _REPORT_LAYOUT.pack(
            self.cpusvn, self.miscselect, self.reserved1, self.isv_ext_prod_id, self.attributes,
            self.mrenclave, self.reserved2, self.mrsigner, self.reserved3, self.config_id,
            self.isvprodid, self.isvsvn, self.config_svn, self.reserved4, self.isv_family_id,
            self.report_data,
        )


def parse_report_body(data: bytes) -> ReportBody:
    if len(data) != REPORT_BODY_SIZE:
        raise EvidenceMalformed(f"SGX report body must be {REPORT_BODY_SIZE} bytes, got {len(data)}")
    return ReportBody(*_REPORT_LAYOUT.unpack(data))


# --------------------------------------------------------------------------------------------
# TD quote body


_TD10_LAYOUT = struct.Struct("<16s48s48s8s8s8s48s48s48s48s48s48s48s48s64s")
_TD15_EXTRA = struct.Struct("<16s48s")
assert _TD10_LAYOUT.size == TD_BODY_SIZES[2]
assert _TD10_LAYOUT.size + _TD15_EXTRA.size == TD_BODY_SIZES[3]


@dataclass(frozen=True)
class TdReportBody:
    """TD quote body. ``td_attributes`` and ``xfam`` are the raw 8 bytes (u64 LE) as in the quote.
    ``tee_tcb_svn2`` and ``mrservicetd`` exist only in TDX 1.5 bodies (body type 3)."""

    tee_tcb_svn: bytes
    mrseam: bytes
    mrsignerseam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mrtd: bytes
    mrconfigid: bytes
    mrowner: bytes
    mrownerconfig: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mrservicetd: bytes | None = None

    @property
    def body_type(self) -> int:
        return 2 if self.tee_tcb_svn2 is None else 3

    @property
    def debug(self) -> bool:
        """TD_ATTRIBUTES bit 0 (TUD.DEBUG; Intel TDX Module ABI Specification)."""
        return bool(self.td_attributes[0] & 0x1)

    def encode(self) -> bytes:
        out = _TD10_LAYOUT.pack(
            self.tee_tcb_svn, self.mrseam, self.mrsignerseam, self.seam_attributes, self.td_attributes,
            self.xfam, self.mrtd, self.mrconfigid, self.mrowner, self.mrownerconfig, self.rtmr0,
            self.rtmr1, self.rtmr2, self.rtmr3, self.report_data,
        )
        if self.tee_tcb_svn2 is not None:
            out += _TD15_EXTRA.pack(self.tee_tcb_svn2, self.mrservicetd or bytes(48))
        return out


def parse_td_report_body(data: bytes, body_type: int) -> TdReportBody:
    size = TD_BODY_SIZES.get(body_type)
    if size is None:
        raise EvidenceMalformed(f"TD quote body type {body_type} is not a TD report body (2 = TDX 1.0, 3 = TDX 1.5)")
    if len(data) != size:
        raise EvidenceMalformed(f"TD quote body type {body_type} must be {size} bytes, got {len(data)}")
    fields = _TD10_LAYOUT.unpack_from(data, 0)
    if body_type == 3:
        fields += _TD15_EXTRA.unpack_from(data, _TD10_LAYOUT.size)
    return TdReportBody(*fields)


# --------------------------------------------------------------------------------------------
# PCK certificate chain (certification data type 5)


@dataclass(frozen=True)
class PckCertChain:
    """Certification data type 5, parsed: certificates leaf first (as Intel orders them), their
    DER, and how many NUL bytes ended the PEM text."""

    certs: tuple[x509.Certificate, ...]
    ders: tuple[bytes, ...]
    nul_padding: int = 0


_BEGIN = b"-----BEGIN CERTIFICATE-----"
_END = b"-----END CERTIFICATE-----"
_B64_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2}")


def _load_der(der: bytes, index: int) -> x509.Certificate:
    try:
        cert = x509.load_der_x509_certificate(der)
        signature = cert.signature
        # Touch what verification reads later, so a certificate that only fails lazily fails here.
        cert.not_valid_before_utc, cert.not_valid_after_utc, cert.subject.rfc4514_string()
    except Exception as exc:  # noqa: BLE001 - any parser failure is "malformed", by contract
        raise EvidenceMalformed(f"PCK chain certificate {index} is not a DER X.509 certificate "
                                f"({type(exc).__name__})") from None
    if not signature_is_octet_aligned(der, signature):
        raise EvidenceMalformed(f"PCK chain certificate {index} has a non-canonical signature encoding")
    return cert


@lru_cache(maxsize=256)
def parse_pck_chain(data: bytes) -> PckCertChain:
    """Strictly parse certification data type 5 (see the module docstring). Cached by content:
    certificates are immutable, and a worker sends the same chain in every quote."""
    nul = len(data) - len(data.rstrip(b"\x00"))
    text = data[:len(data) - nul]
    if not text:
        raise EvidenceMalformed("PCK certificate chain (certification data type 5) is empty")
    lines = text.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the text ended with a newline (the usual case)
    ders: list[bytes] = []
    certs: list[x509.Certificate] = []
    i = 0
    while i < len(lines):
        if len(certs) >= MAX_PCK_CHAIN_CERTS:
            raise EvidenceMalformed(f"PCK certificate chain has more than {MAX_PCK_CHAIN_CERTS} certificates")
        if _strip_cr(lines[i]) != _BEGIN:
            raise EvidenceMalformed(f"PCK certificate chain: line {i + 1} is not '-----BEGIN CERTIFICATE-----'")
        i += 1
        body: list[bytes] = []
        while i < len(lines) and _strip_cr(lines[i]) != _END:
            line = _strip_cr(lines[i])
            if not _B64_LINE.fullmatch(line):
                raise EvidenceMalformed(f"PCK certificate chain: line {i + 1} is not base64")
            body.append(line)
            i += 1
        if i == len(lines):
            raise EvidenceMalformed("PCK certificate chain: a certificate has no END line")
        i += 1
        joined = b"".join(body)
        # Padding may only end the block: '=' inside it, or a wrong amount, fails to re-encode.
        try:
            der = base64.b64decode(joined, validate=True)
        except ValueError:
            raise EvidenceMalformed(f"PCK chain certificate {len(certs)}: invalid base64") from None
        if not der or base64.b64encode(der) != joined:
            raise EvidenceMalformed(f"PCK chain certificate {len(certs)}: non-canonical base64")
        ders.append(der)
        certs.append(_load_der(der, len(certs)))
    # A CR is only allowed as part of CRLF, never as the last byte of the text.
    if text.endswith(b"\r"):
        raise EvidenceMalformed("PCK certificate chain ends with a bare CR")
    return PckCertChain(tuple(certs), tuple(ders), nul)


def _strip_cr(line: bytes) -> bytes:
    return line[:-1] if line.endswith(b"\r") else line


# --------------------------------------------------------------------------------------------
# Certification data and the ECDSA quote signature data


@dataclass(frozen=True)
class CertificationData:
    """One certification data structure: its type, its raw bytes, and what they parse to for the
    types this package understands (5: :class:`PckCertChain`). Other types are kept raw."""

    type: int
    data: bytes
    pck_chain: PckCertChain | None = None


@dataclass(frozen=True)
class EcdsaSignatureData:
    """ECDSA-P256 quote signature data (att_key_type 2), the same content in every version:

    v3: signature, key, QE report, QE report signature, QE auth data, certification data (type 5);
    v4/v5: signature, key, certification data type 6 = {QE report, its signature, QE auth data,
    certification data (type 5)}. ``nested`` tells which shape was read.
    """

    signature: bytes              # 64 bytes r || s over the quote's signed region
    attestation_key: bytes        # 64 bytes X || Y (P-256)
    qe_report_raw: bytes          # the exact 384 bytes the PCK key signed
    qe_report: ReportBody
    qe_report_signature: bytes    # 64 bytes r || s by the PCK leaf key
    qe_auth_data: bytes
    certification: CertificationData   # the innermost certification data (the PCK chain)
    nested: bool                  # True when read from inside certification data type 6
    outer_certification_size: int = 0  # size field of the type-6 wrapper (v4/v5), else 0


def _parse_certification(reader: Reader, what: str) -> tuple[int, bytes]:
    cert_type = reader.u16(f"{what} type")
    size = reader.u32(f"{what} size")
    if cert_type not in CERTIFICATION_DATA_TYPES:
        raise EvidenceMalformed(f"{reader.where}: unknown {what} type {cert_type} (known: 1-7)")
    return cert_type, reader.take(size, f"{what} ({size} bytes announced)")


def _parse_qe_part(reader: Reader, *, inner_what: str) -> tuple[bytes, ReportBody, bytes, bytes, CertificationData]:
    qe_raw = reader.take(REPORT_BODY_SIZE, "QE report")
    qe_sig = reader.take(ECDSA_SIGNATURE_SIZE, "QE report signature")
    auth_size = reader.u16("QE authentication data size")
    auth = reader.take(auth_size, "QE authentication data")
    cert_type, cert_bytes = _parse_certification(reader, inner_what)
    chain = parse_pck_chain(cert_bytes) if cert_type == CERT_PCK_CHAIN else None
    return qe_raw, parse_report_body(qe_raw), qe_sig, auth, CertificationData(cert_type, cert_bytes, chain)


def parse_signature_data(data: bytes, *, nested: bool, base: int = 0) -> EcdsaSignatureData:
    """Parse ECDSA-P256 quote signature data that must span exactly ``data``.

    ``nested`` selects the v4/v5 shape (QE part inside certification data type 6). ``base`` is
    the absolute offset of ``data`` in the quote (for error messages)."""
    reader = Reader(data, base=base, where="quote signature data")
    signature = reader.take(ECDSA_SIGNATURE_SIZE, "quote signature")
    key = reader.take(ECDSA_KEY_SIZE, "attestation key")
    outer_size = 0
    if nested:
        outer_type, outer = _parse_certification(reader, "certification data")
        if outer_type != CERT_QE_REPORT:
            raise EvidenceMalformed(
                f"quote signature data: certification data type {outer_type} "
                f"({CERTIFICATION_DATA_TYPES[outer_type]}); v4/v5 quotes carry type {CERT_QE_REPORT} "
                "(QE report certification data)"
            )
        outer_size = len(outer)
        inner = Reader(outer, base=base + reader.pos - len(outer), where="QE report certification data")
        qe_raw, qe, qe_sig, auth, cert = _parse_qe_part(inner, inner_what="inner certification data")
        inner.expect_end("the inner certification data")
    else:
        qe_raw, qe, qe_sig, auth, cert = _parse_qe_part(reader, inner_what="certification data")
    reader.expect_end("the certification data")
    return EcdsaSignatureData(signature, key, qe_raw, qe, qe_sig, auth, cert, nested, outer_size)


def encode_signature_data(sig: EcdsaSignatureData) -> bytes:
    """The bytes :func:`parse_signature_data` reads (``outer_certification_size`` is recomputed)."""
    qe_part = (sig.qe_report_raw + sig.qe_report_signature + len(sig.qe_auth_data).to_bytes(2, "little")
               + sig.qe_auth_data + struct.pack("<HI", sig.certification.type, len(sig.certification.data))
               + sig.certification.data)
    if sig.nested:
        qe_part = struct.pack("<HI", CERT_QE_REPORT, len(qe_part)) + qe_part
    return sig.signature + sig.attestation_key + qe_part
