"""Where the 64 report-data bytes sit in the evidence a TEE returns: the providers' self-check.

After the TEE produced evidence, the provider checks that the evidence carries exactly the
report data it asked for. This is not verification (nothing here checks a signature; the
producer's verifier does that): it catches a concurrent writer that slipped past the
generation counter, a Gramine process whose ``user_report_data`` was overwritten by another
thread, or an interface returning stale output -- before the worker sends evidence that a
producer would refuse anyway, with a far less helpful error.

Layouts (little-endian; offsets in bytes):

- SGX ECDSA quote (Intel SGX DCAP Quote Library API, "Quote Format"): a 48-byte header with
  ``version`` (u16) at 0 and ``tee_type`` (u32) at 4 (0x00000000 = SGX), then the 384-byte
  enclave report body whose ``report_data`` is at 320. Version 3 and 4: body at 48; version 5:
  ``body_type`` (u16, 1 = SGX report) and ``body_size`` (u32) follow the header, body at 54.
- TDX quote (Intel TDX DCAP Quoting Library API, Appendix A): same header with ``tee_type`` =
  0x00000081; the TD report body's ``report_data`` is at 520 (TD 1.0 body, version 4, body at
  48; version 5: body type 2 (TD 1.0) or 3 (TD 1.5), body at 54 -- the 1.5 fields come after
  ``report_data``).
- SEV-SNP attestation report (SEV-SNP Firmware ABI, "ATTESTATION_REPORT Structure"):
  ``report_data`` at 0x50 in every published version.
"""

from __future__ import annotations

import struct

__all__ = ["REPORT_DATA_SIZE", "bound_report_data"]

REPORT_DATA_SIZE = 64

_QUOTE_HEADER = 48
_V5_BODY = _QUOTE_HEADER + 2 + 4
_TEE_SGX = 0x00000000
_TEE_TDX = 0x00000081
_SGX_REPORT_DATA = 320
_TDX_REPORT_DATA = 520
_SNP_REPORT_DATA = 0x50


def _quote_report_data(blob: bytes, want_tee: int, body_offset: int) -> bytes:
    if len(blob) < _QUOTE_HEADER:
        raise ValueError(f"quote of {len(blob)} bytes is shorter than its 48-byte header")
    version, = struct.unpack_from("<H", blob, 0)
    tee_type, = struct.unpack_from("<I", blob, 4)
    if tee_type != want_tee:
        names = {_TEE_SGX: "SGX", _TEE_TDX: "TDX"}
        raise ValueError(f"quote tee_type is 0x{tee_type:08x} ({names.get(tee_type, 'unknown')}), "
                         f"expected 0x{want_tee:08x} ({names[want_tee]})")
    if want_tee == _TEE_SGX and version in (3, 4):
        start = _QUOTE_HEADER + body_offset
    elif want_tee == _TEE_TDX and version == 4:
        start = _QUOTE_HEADER + body_offset
    elif version == 5 and len(blob) >= _V5_BODY:
        body_type, = struct.unpack_from("<H", blob, _QUOTE_HEADER)
        allowed = (1,) if want_tee == _TEE_SGX else (2, 3)
        if body_type not in allowed:
            raise ValueError(f"quote v5 body type {body_type} is not one of {allowed} for this TEE")
        start = _V5_BODY + body_offset
    else:
        raise ValueError(f"quote version {version} has no known layout for this TEE")
    end = start + REPORT_DATA_SIZE
    if len(blob) < end:
        raise ValueError(f"quote of {len(blob)} bytes ends before its report data (bytes {start}..{end})")
    return bytes(blob[start:end])


def bound_report_data(platform: str, evidence: bytes) -> bytes:
    """The report data carried by ``evidence`` of ``platform`` ("sgx", "tdx" or "snp").

    ``ValueError`` (with the reason) if the evidence is too short or of an unknown layout.
    """
    if platform == "sgx":
        return _quote_report_data(evidence, _TEE_SGX, _SGX_REPORT_DATA)
    if platform == "tdx":
        return _quote_report_data(evidence, _TEE_TDX, _TDX_REPORT_DATA)
    if platform == "snp":
        end = _SNP_REPORT_DATA + REPORT_DATA_SIZE
        if len(evidence) < end:
            raise ValueError(f"SEV-SNP report of {len(evidence)} bytes ends before its report data")
        return bytes(evidence[_SNP_REPORT_DATA:end])
    raise ValueError(f"no report-data layout for platform {platform!r}")
