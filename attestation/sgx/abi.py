"""Intel SGX DCAP ECDSA quote, version 3: bytes -> :class:`SgxQuote`, and no judgement.

Layout (Intel *SGX DCAP ECDSA Quote Library API*, Appendix A)::

    0x000  48   header: version 3, att_key_type 2, reserved (0), qe_svn, pce_svn, qe_vendor_id, user_data
    0x030  384  ISV enclave report body
    0x1B0  4    signature data length n
    0x1B4  n    ECDSA signature data: quote signature, attestation key, QE report, QE report
                signature, QE auth data, certification data (type 5: PCK chain PEM)
    ...         trailing bytes: outside every signature; counted, never trusted

The signed region is bytes [0, 0x1B0). :func:`parse_quote` returns an :class:`SgxQuote` or raises
:class:`EvidenceMalformed`, for any input.
"""

from __future__ import annotations

from dataclasses import dataclass

from attestation.errors import EvidenceMalformed
from attestation.intel.abi import (
    HEADER_SIZE,
    MAX_QUOTE_BYTES,
    REPORT_BODY_SIZE,
    TEE_TYPE_SGX,
    TEE_TYPE_TDX,
    EcdsaSignatureData,
    QuoteHeader,
    ReportBody,
    encode_signature_data,
    parse_header,
    parse_report_body,
    parse_signature_data,
)

__all__ = ["SIGNED_REGION_END", "SIGNATURE_DATA_OFFSET", "SgxQuote", "encode_quote", "parse_quote"]

QUOTE_VERSION = 3
SIGNED_REGION_END = HEADER_SIZE + REPORT_BODY_SIZE      # 0x1B0
SIGNATURE_DATA_OFFSET = SIGNED_REGION_END + 4           # 0x1B4


@dataclass(frozen=True)
class SgxQuote:
    """A parsed SGX quote v3. ``signed_region`` is the exact bytes the quote signature covers."""

    header: QuoteHeader
    body: ReportBody
    signature_data: EcdsaSignatureData
    signed_region: bytes
    signature_data_len: int
    trailing: bytes = b""

    @property
    def trailing_bytes(self) -> int:
        return len(self.trailing)


def parse_quote(data: bytes) -> SgxQuote:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise EvidenceMalformed(f"SGX quote must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_QUOTE_BYTES:
        raise EvidenceMalformed(f"SGX quote is {len(data)} bytes, more than {MAX_QUOTE_BYTES}")
    header = parse_header(data)
    if header.version != QUOTE_VERSION:
        hint = " (a TDX quote: use platform tdx)" if header.version in (4, 5) and header.tee_type == TEE_TYPE_TDX else ""
        raise EvidenceMalformed(f"SGX quote version {header.version} is not supported (only 3){hint}")
    if header.tee_type != TEE_TYPE_SGX:
        raise EvidenceMalformed(f"SGX quote v3 has non-zero reserved bytes 4..7 ({header.tee_type:#010x})")
    if len(data) < SIGNATURE_DATA_OFFSET:
        raise EvidenceMalformed(f"SGX quote is {len(data)} bytes, shorter than header + report body + "
                                f"signature length ({SIGNATURE_DATA_OFFSET})")
    body = parse_report_body(data[HEADER_SIZE:SIGNED_REGION_END])
    sig_len = int.from_bytes(data[SIGNED_REGION_END:SIGNATURE_DATA_OFFSET], "little")
    end = SIGNATURE_DATA_OFFSET + sig_len
    if end > len(data):
        raise EvidenceMalformed(f"SGX quote announces {sig_len} bytes of signature data at {SIGNATURE_DATA_OFFSET:#x}, "
                                f"but only {len(data) - SIGNATURE_DATA_OFFSET} follow")
    sig = parse_signature_data(data[SIGNATURE_DATA_OFFSET:end], nested=False, base=SIGNATURE_DATA_OFFSET)
    return SgxQuote(header, body, sig, data[:SIGNED_REGION_END], sig_len, data[end:])


def encode_quote(header: QuoteHeader, body: ReportBody, sig: EcdsaSignatureData, trailing: bytes = b"") -> bytes:
    """The quote bytes for these parts (the inverse of :func:`parse_quote`)."""
    sig_bytes = encode_signature_data(sig)
    return header.encode() + body.encode() + len(sig_bytes).to_bytes(4, "little") + sig_bytes + trailing
