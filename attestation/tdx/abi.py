"""Intel TDX quotes, versions 4 and 5: bytes -> :class:`TdxQuote`, and no judgement.

Layouts (Intel *TDX DCAP Quoting Library API*, Appendix A)::

    v4: 0x000 header (48; version 4, att_key_type 2, tee_type 0x81)
        0x030 TD quote body, TDX 1.0 (584)
        0x278 signature data length n, then n bytes of signature data
    v5: 0x000 header (48; version 5)
        0x030 body descriptor: body_type (u16), body_size (u32)
        0x036 body: type 2 = TDX 1.0 (584), type 3 = TDX 1.5 (648)
        then signature data length n and n bytes of signature data

Signature data (both versions): quote signature, attestation key, certification data type 6
(QE report, its signature, QE auth data, certification data type 5 = PCK chain PEM). The signed
region is everything before the signature data length. Bytes after the signature data are
outside every signature: counted (``trailing_bytes``), never trusted.
"""

from __future__ import annotations

from dataclasses import dataclass

from attestation.errors import EvidenceMalformed
from attestation.intel.abi import (
    HEADER_SIZE,
    MAX_QUOTE_BYTES,
    TD_BODY_SIZES,
    TEE_TYPE_TDX,
    EcdsaSignatureData,
    QuoteHeader,
    TdReportBody,
    encode_signature_data,
    parse_header,
    parse_signature_data,
    parse_td_report_body,
)

__all__ = ["BODY_DESCRIPTOR_SIZE", "TdxQuote", "encode_quote", "parse_quote"]

BODY_DESCRIPTOR_SIZE = 6
SUPPORTED_VERSIONS = (4, 5)


@dataclass(frozen=True)
class TdxQuote:
    """A parsed TDX quote. ``body_type`` is 2 (TDX 1.0) or 3 (TDX 1.5); v4 quotes are always 2.
    ``signed_region`` is the exact bytes the quote signature covers."""

    header: QuoteHeader
    body_type: int
    body: TdReportBody
    signature_data: EcdsaSignatureData
    signed_region: bytes
    signature_data_len: int
    trailing: bytes = b""

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def trailing_bytes(self) -> int:
        return len(self.trailing)


def parse_quote(data: bytes) -> TdxQuote:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise EvidenceMalformed(f"TDX quote must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_QUOTE_BYTES:
        raise EvidenceMalformed(f"TDX quote is {len(data)} bytes, more than {MAX_QUOTE_BYTES}")
    header = parse_header(data)
    if header.version not in SUPPORTED_VERSIONS:
        hint = " (an SGX quote: use platform sgx)" if header.version == 3 else ""
        raise EvidenceMalformed(f"TDX quote version {header.version} is not supported (4 or 5){hint}")
    if header.tee_type != TEE_TYPE_TDX:
        raise EvidenceMalformed(f"quote TEE type {header.tee_type:#x} is not TDX (0x81)")
    if header.version == 4:
        body_type, body_offset = 2, HEADER_SIZE
        body_size = TD_BODY_SIZES[2]
    else:
        if len(data) < HEADER_SIZE + BODY_DESCRIPTOR_SIZE:
            raise EvidenceMalformed(f"TDX quote v5 is {len(data)} bytes, too short for its body descriptor")
        body_type = int.from_bytes(data[HEADER_SIZE:HEADER_SIZE + 2], "little")
        body_size = int.from_bytes(data[HEADER_SIZE + 2:HEADER_SIZE + 6], "little")
        if body_type not in TD_BODY_SIZES:
            raise EvidenceMalformed(f"TDX quote v5 body type {body_type} is not supported "
                                    "(2 = TDX 1.0 TD report, 3 = TDX 1.5 TD report)")
        if body_size != TD_BODY_SIZES[body_type]:
            raise EvidenceMalformed(f"TDX quote v5 body type {body_type} must be {TD_BODY_SIZES[body_type]} bytes, "
                                    f"descriptor says {body_size}")
        body_offset = HEADER_SIZE + BODY_DESCRIPTOR_SIZE
    signed_end = body_offset + body_size
    sig_offset = signed_end + 4
    if len(data) < sig_offset:
        raise EvidenceMalformed(f"TDX quote v{header.version} is {len(data)} bytes, shorter than header + body + "
                                f"signature length ({sig_offset})")
    body = parse_td_report_body(data[body_offset:signed_end], body_type)
    sig_len = int.from_bytes(data[signed_end:sig_offset], "little")
    end = sig_offset + sig_len
    if end > len(data):
        raise EvidenceMalformed(f"TDX quote announces {sig_len} bytes of signature data at {sig_offset:#x}, "
                                f"but only {len(data) - sig_offset} follow")
    sig = parse_signature_data(data[sig_offset:end], nested=True, base=sig_offset)
    return TdxQuote(header, body_type, body, sig, data[:signed_end], sig_len, data[end:])


def encode_quote(header: QuoteHeader, body: TdReportBody, sig: EcdsaSignatureData, trailing: bytes = b"") -> bytes:
    """The quote bytes for these parts (v4: TDX 1.0 body only; v5: body descriptor added)."""
    body_bytes = body.encode()
    prefix = header.encode()
    if header.version == 5:
        prefix += body.body_type.to_bytes(2, "little") + len(body_bytes).to_bytes(4, "little")
    sig_bytes = encode_signature_data(sig)
    return prefix + body_bytes + len(sig_bytes).to_bytes(4, "little") + sig_bytes + trailing
