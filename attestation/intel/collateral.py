"""Intel DCAP collateral: TCB Info, QE Identity, CRLs — parsing, signature checks, TCB status evaluation.

Source: Intel PCS (*Intel SGX and Intel TDX Provisioning Certification Service for ECDSA
Attestation*, API v4): the TCB Info and Enclave Identity JSON and the TCB evaluation rules.

Signatures
    A PCS response body is ``{"tcbInfo": {...}, "signature": "<hex r||s>"}`` (or
    ``{"enclaveIdentity": {...}, "signature": ...}``). Intel signs, with ECDSA P-256 / SHA-256, the
    **exact bytes** of the ``tcbInfo`` / ``enclaveIdentity`` value as they appear in the body. We
    locate that byte span (:func:`json_member_spans`, with the JSON parser's own scanner), verify
    the signature over it, and then parse *that span* (never the surrounding document, never a re-serialisation),
    so what is evaluated is exactly what was signed. Duplicate keys anywhere are refused (with
    duplicates, two JSON parsers may disagree about what was signed).

    The signer is the "Intel SGX TCB Signing" certificate, which PCS sends in the
    ``TCB-Info-Issuer-Chain`` / ``SGX-Enclave-Identity-Issuer-Chain`` HTTP header (URL-encoded PEM:
    signing certificate, then the Intel SGX Root CA). The chain must be exactly [signer, root], the
    signer's CN must be "Intel SGX TCB Signing", and the root must be pinned
    (``trust.for_platform("sgx")``). Requiring a direct child of the root keeps a PCK leaf key —
    also under the Intel root, but held by a platform that may be compromised — from signing
    TCB Info that declares its own platform up to date.

Errors
    malformed JSON, missing or wrongly typed fields, unknown versions or statuses → ``EvidenceMalformed``;
    a bad signature, a missing / wrong / expired / revoked issuer chain → ``EvidenceInvalid``;
    collateral that does not apply to the evidence (FMSPC, PCE-ID, TDX module identity, QE identity
    mismatch) or a platform TCB below every level Intel lists → ``EvidenceInvalid``.
    Stale collateral (``now`` past ``nextUpdate``, or before ``issueDate``) is *reported*
    (``TcbResult.collateral_expired``, ``notes`` and, with issue date, nextUpdate and age, in
    ``TcbResult.sources``), never silently ignored and never fatal here: the policy decides
    (``collateral_grace_seconds``, :mod:`attestation.collateral_rules`).

Decisions (documented here because callers must know them)
    - A QE report that does not match the QE Identity (MRSIGNER, ISVPRODID, masked MISCSELECT or
      masked ATTRIBUTES) raises ``EvidenceInvalid``: it is not Intel's quoting enclave, so the
      quote is not authentic. An ISVSVN below every listed level yields status ``Revoked`` (as
      Intel's QVL does for enclave identities).
    - TCB levels are matched in the order the (signed) document lists them; PCS lists them newest
      first, and the first level whose SVNs are all <= the platform's gives the status.
    - A platform whose SGX/TDX TCB matches no TCB level raises ``EvidenceInvalid`` (QVL's
      "TCB not supported"); there is no "Unrecognized" status.
    - TDX: TEE_TCB_SVN[1] (TDX module major version) = 0 → all 16 ``tdxtcbcomponents`` are
      compared and ``tdxModule`` identifies the module; otherwise components 2..15 are compared and
      the module is judged by ``tdxModuleIdentities["TDX_%02X" % TEE_TCB_SVN[1]]`` (its ``tcbLevels``
      by ISVSVN = TEE_TCB_SVN[0]); its status converges with the platform's as QVL does
      (OutOfDate → OutOfDate / OutOfDateConfigurationNeeded, Revoked → Revoked).
      MRSIGNERSEAM / SEAMATTRIBUTES are checked against that identity when the caller passes them.
      Not implemented: TEE_TCB_SVN2 of TDX 1.5 bodies (TD-preserving module updates, QVL's
      "TDRelaunchAdvised" statuses) — pass TEE_TCB_SVN; TCB Info ``tcbType`` other than 0;
      QE Identity version 1 (``qeIdentity`` key, retired by Intel).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import urllib.parse
from dataclasses import dataclass, replace
from datetime import datetime, UTC
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Mapping, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from ..chain import common_name, subject, verify_chain
from ..claims import CertSummary, CollateralUse
from ..errors import EvidenceInvalid, EvidenceMalformed
from ..trust import DEFAULT_TRUST, TrustAnchors
from .pck import PckExtensions
from .tcb_status import TCB_STATUSES

__all__ = [
    "TcbLevel",
    "EnclaveTcbLevel",
    "TdxModuleIdentity",
    "TcbInfo",
    "QeIdentity",
    "IntelCollateral",
    "TcbResult",
    "parse_tcb_info",
    "parse_qe_identity",
    "verify_tcb_info",
    "verify_qe_identity",
    "load_collateral",
    "load_crl",
    "load_issuer_chain",
    "evaluate_sgx_tcb",
    "evaluate_tdx_tcb",
    "evaluate_qe_identity",
    "converge_tcb_status",
    "document_use",
    "json_member_spans",
    "signature_valid",
    "TCB_SIGNING_CN",
]

TCB_SIGNING_CN = "Intel SGX TCB Signing"
MAX_DOCUMENT = 4 * 1024 * 1024
MAX_FILE = 16 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# Parsed documents

@dataclass(frozen=True)
class TcbLevel:
    """One entry of ``tcbInfo.tcbLevels``."""

    sgx_components: tuple[int, ...]           # 16 SVNs
    pcesvn: int
    tdx_components: tuple[int, ...] | None    # 16 SVNs (TDX TCB Info only)
    tcb_date: str
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class EnclaveTcbLevel:
    """One ``tcbLevels`` entry of an enclave identity (QE) or of a TDX module identity."""

    isvsvn: int
    tcb_date: str
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class TdxModuleIdentity:
    """``tcbInfo.tdxModule`` (id "", no levels) or one of ``tcbInfo.tdxModuleIdentities``."""

    id: str
    mrsigner: bytes          # 48
    attributes: bytes        # 8
    attributes_mask: bytes   # 8
    tcb_levels: tuple[EnclaveTcbLevel, ...] = ()


@dataclass(frozen=True)
class TcbInfo:
    id: str                  # "SGX" or "TDX" (version 2 documents have no id: "SGX")
    version: int             # 2 or 3
    issue_date: datetime
    next_update: datetime
    fmspc: bytes             # 6
    pce_id: bytes            # 2
    tcb_type: int
    tcb_evaluation_data_number: int
    tcb_levels: tuple[TcbLevel, ...]
    tdx_module: TdxModuleIdentity | None
    tdx_module_identities: tuple[TdxModuleIdentity, ...]
    signed_bytes: bytes      # the exact bytes of the "tcbInfo" value
    signature: bytes         # r || s, 64 bytes
    signer_chain: tuple[CertSummary, ...] = ()   # filled in by verify_tcb_info


@dataclass(frozen=True)
class QeIdentity:
    id: str                  # "QE" (SGX), "TD_QE" (TDX), "QVE"
    version: int             # 2
    issue_date: datetime
    next_update: datetime
    tcb_evaluation_data_number: int
    miscselect: int
    miscselect_mask: int
    attributes: bytes        # 16
    attributes_mask: bytes   # 16
    mrsigner: bytes          # 32
    isvprodid: int
    tcb_levels: tuple[EnclaveTcbLevel, ...]
    signed_bytes: bytes
    signature: bytes
    signer_chain: tuple[CertSummary, ...] = ()


@dataclass(frozen=True)
class IntelCollateral:
    """Verified collateral. ``tcb_info`` / ``qe_identity`` are the first document of each kind that
    was loaded (sorted file names); ``tcb_infos`` / ``qe_identities`` hold all of them (a directory
    may hold TCB Info for several FMSPCs, SGX and TDX, and both the QE and TD_QE identities).
    The ``evaluate_*`` functions pick the document that applies (FMSPC and kind; QE id)."""

    tcb_info: TcbInfo | None = None
    qe_identity: QeIdentity | None = None
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    tcb_infos: tuple[TcbInfo, ...] = ()
    qe_identities: tuple[QeIdentity, ...] = ()
    notes: tuple[str, ...] = ()          # stale CRLs, ignored files ... (informational)

    def all_tcb_infos(self) -> tuple[TcbInfo, ...]:
        if self.tcb_infos:
            return self.tcb_infos
        return (self.tcb_info,) if self.tcb_info is not None else ()

    def all_qe_identities(self) -> tuple[QeIdentity, ...]:
        if self.qe_identities:
            return self.qe_identities
        return (self.qe_identity,) if self.qe_identity is not None else ()

    def as_mapping(self) -> dict[str, Any]:
        """For ``VerificationInputs.collateral``: ``{"intel": self, "crls": [...], ...}``."""
        return {"intel": self, "tcb_info": self.tcb_info, "qe_identity": self.qe_identity,
                "crls": list(self.crls)}


@dataclass(frozen=True)
class TcbResult:
    status: str                       # one of TCB_STATUSES
    advisory_ids: tuple[str, ...]
    tcb_date: str | None
    collateral_expired: bool = False  # now > nextUpdate of a document used
    notes: tuple[str, ...] = ()       # e.g. "TCB Info (FMSPC ...) nextUpdate ... is before now ..."
    sources: tuple[CollateralUse, ...] = ()   # the documents this result was judged from, with their ages


# --------------------------------------------------------------------------------------------
# JSON: strict parsing and the exact byte span of a top-level member

def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise EvidenceMalformed(f"collateral JSON has duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise EvidenceMalformed(f"collateral JSON contains {name}")


def _loads(data: bytes, what: str) -> Any:
    if len(data) > MAX_DOCUMENT:
        raise EvidenceMalformed(f"{what}: {len(data)} bytes is larger than {MAX_DOCUMENT}")
    try:
        text = data.decode("utf-8")
        return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except EvidenceMalformed:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EvidenceMalformed(f"{what} is not valid JSON ({type(exc).__name__})") from None


_WS = " \t\r\n"
_DECODER = json.JSONDecoder()


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _decode_at(text: str, pos: int) -> tuple[Any, int]:
    try:
        return _DECODER.raw_decode(text, pos)
    except (ValueError, RecursionError) as exc:
        raise EvidenceMalformed(f"collateral JSON: bad value at offset {pos} ({type(exc).__name__})") from None


def json_member_spans(document: bytes) -> dict[str, tuple[int, int]]:
    """Byte spans ``(start, end)`` of the values of the top-level members of a JSON object.

    Each value's extent is found by the standard library's own JSON scanner
    (``JSONDecoder.raw_decode`` returns where a value ends), so the boundaries are exactly those
    of the parser that reads the document; character offsets are converted to byte offsets
    for non-ASCII documents. The signed bytes are then ``document[start:end]``, untouched.
    """
    try:
        text = bytes(document).decode("utf-8")
    except UnicodeDecodeError:
        raise EvidenceMalformed("collateral JSON is not UTF-8") from None
    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "{":
        raise EvidenceMalformed("collateral JSON is not an object")
    pos = _skip_ws(text, pos + 1)
    spans: dict[str, tuple[int, int]] = {}
    if pos < len(text) and text[pos] == "}":
        return spans
    ascii_only = text.isascii()

    def to_bytes(index: int) -> int:
        return index if ascii_only else len(text[:index].encode("utf-8"))

    while True:
        if pos >= len(text) or text[pos] != '"':
            raise EvidenceMalformed("collateral JSON: expected a member name")
        key, pos = _decode_at(text, pos)
        pos = _skip_ws(text, pos)
        if pos >= len(text) or text[pos] != ":":
            raise EvidenceMalformed("collateral JSON: expected ':'")
        start = _skip_ws(text, pos + 1)
        _, end = _decode_at(text, start)
        if key in spans:
            raise EvidenceMalformed(f"collateral JSON has duplicate key {key!r}")
        spans[key] = (to_bytes(start), to_bytes(end))
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "}":
            return spans
        raise EvidenceMalformed("collateral JSON: expected ',' or '}'")


# --------------------------------------------------------------------------------------------
# Field readers (strict types)

def _field(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(obj, dict):
        raise EvidenceMalformed(f"{where} is not a JSON object")
    if key not in obj:
        raise EvidenceMalformed(f"{where}.{key} is missing")
    return obj[key]


def _int(obj: Mapping[str, Any], key: str, where: str, maximum: int) -> int:
    value = _field(obj, key, where)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise EvidenceMalformed(f"{where}.{key} must be an integer in 0..{maximum}, got {value!r}")
    return value


def _str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = _field(obj, key, where)
    if not isinstance(value, str):
        raise EvidenceMalformed(f"{where}.{key} must be a string")
    return value


_HEX = re.compile(r"[0-9a-fA-F]*")


def _hex(obj: Mapping[str, Any], key: str, where: str, size: int) -> bytes:
    value = _str(obj, key, where)
    if len(value) != 2 * size or not _HEX.fullmatch(value):
        raise EvidenceMalformed(f"{where}.{key} must be {size} bytes of hex")
    return bytes.fromhex(value)


def _date(obj: Mapping[str, Any], key: str, where: str) -> datetime:
    value = _str(obj, key, where)
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise EvidenceMalformed(f"{where}.{key} is not an ISO 8601 date-time: {value!r}") from None
    if when.tzinfo is None:
        raise EvidenceMalformed(f"{where}.{key} has no time zone: {value!r}")
    return when.astimezone(UTC)


def _status(obj: Mapping[str, Any], where: str) -> str:
    value = _str(obj, "tcbStatus", where)
    if value not in TCB_STATUSES:
        raise EvidenceMalformed(f"{where}.tcbStatus {value!r} is not a known TCB status")
    return value


def _advisories(obj: Mapping[str, Any], where: str) -> tuple[str, ...]:
    value = obj.get("advisoryIDs", [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise EvidenceMalformed(f"{where}.advisoryIDs must be a list of strings")
    return tuple(value)


def _list(obj: Mapping[str, Any], key: str, where: str, *, nonempty: bool = True) -> list[Any]:
    value = _field(obj, key, where)
    if not isinstance(value, list) or (nonempty and not value):
        raise EvidenceMalformed(f"{where}.{key} must be a {'non-empty ' if nonempty else ''}list")
    return value


def _components(tcb: Mapping[str, Any], key: str, where: str) -> tuple[int, ...]:
    items = _list(tcb, key, where)
    if len(items) != 16:
        raise EvidenceMalformed(f"{where}.{key} has {len(items)} entries, expected 16")
    return tuple(_int(item, "svn", f"{where}.{key}[{i}]", 255) for i, item in enumerate(items))


def _enclave_levels(obj: Mapping[str, Any], where: str) -> tuple[EnclaveTcbLevel, ...]:
    levels = []
    for i, level in enumerate(_list(obj, "tcbLevels", where)):
        lw = f"{where}.tcbLevels[{i}]"
        tcb = _field(level, "tcb", lw)
        levels.append(EnclaveTcbLevel(
            isvsvn=_int(tcb, "isvsvn", f"{lw}.tcb", 0xFFFF),
            tcb_date=_str(level, "tcbDate", lw),
            status=_status(level, lw),
            advisory_ids=_advisories(level, lw),
        ))
    return tuple(levels)


def _module(obj: Mapping[str, Any], where: str, *, with_levels: bool) -> TdxModuleIdentity:
    return TdxModuleIdentity(
        id=_str(obj, "id", where) if with_levels else "",
        mrsigner=_hex(obj, "mrsigner", where, 48),
        attributes=_hex(obj, "attributes", where, 8),
        attributes_mask=_hex(obj, "attributesMask", where, 8),
        tcb_levels=_enclave_levels(obj, where) if with_levels else (),
    )


def _signed_member(document: bytes, member: str, what: str) -> tuple[bytes, bytes, dict[str, Any]]:
    """(signed bytes of ``member``, signature, parsed value of the signed bytes)."""
    whole = _loads(document, what)
    if not isinstance(whole, dict):
        raise EvidenceMalformed(f"{what} is not a JSON object")
    if member not in whole:
        raise EvidenceMalformed(f"{what} has no {member!r} member")
    spans = json_member_spans(document)
    start, end = spans[member]
    signed = document[start:end]
    value = _loads(signed, f"{what}.{member}")
    if not isinstance(value, dict):
        raise EvidenceMalformed(f"{what}.{member} is not a JSON object")
    signature = _hex(whole, "signature", what, 64)
    return signed, signature, value


def parse_tcb_info(document: bytes) -> TcbInfo:
    """Parse a PCS TCB Info response body. **No signature check** — use :func:`verify_tcb_info`."""
    signed, signature, info = _signed_member(bytes(document), "tcbInfo", "TCB Info")
    where = "tcbInfo"
    version = _int(info, "version", where, 1 << 31)
    if version not in (2, 3):
        raise EvidenceMalformed(f"TCB Info version {version} is not supported (2 and 3 are)")
    tcb_id = _str(info, "id", where) if version == 3 else "SGX"
    if tcb_id not in ("SGX", "TDX"):
        raise EvidenceMalformed(f"TCB Info id {tcb_id!r} is neither SGX nor TDX")
    tcb_type = _int(info, "tcbType", where, 1 << 31)
    if tcb_type != 0:
        raise EvidenceMalformed(f"TCB Info tcbType {tcb_type} is not supported (only 0)")
    levels: list[TcbLevel] = []
    for i, level in enumerate(_list(info, "tcbLevels", where)):
        lw = f"{where}.tcbLevels[{i}]"
        tcb = _field(level, "tcb", lw)
        tw = f"{lw}.tcb"
        if version == 2:
            sgx = tuple(_int(tcb, f"sgxtcbcomp{n:02d}svn", tw, 255) for n in range(1, 17))
            tdx = None
        else:
            sgx = _components(tcb, "sgxtcbcomponents", tw)
            tdx = _components(tcb, "tdxtcbcomponents", tw) if tcb_id == "TDX" else None
        levels.append(TcbLevel(
            sgx_components=sgx,
            pcesvn=_int(tcb, "pcesvn", tw, 0xFFFF),
            tdx_components=tdx,
            tcb_date=_str(level, "tcbDate", lw),
            status=_status(level, lw),
            advisory_ids=_advisories(level, lw),
        ))
    tdx_module = None
    identities: tuple[TdxModuleIdentity, ...] = ()
    if tcb_id == "TDX":
        if "tdxModule" in info:
            tdx_module = _module(info["tdxModule"], f"{where}.tdxModule", with_levels=False)
        if "tdxModuleIdentities" in info:
            identities = tuple(_module(m, f"{where}.tdxModuleIdentities[{i}]", with_levels=True)
                               for i, m in enumerate(_list(info, "tdxModuleIdentities", where)))
            ids = [m.id.upper() for m in identities]
            if len(set(ids)) != len(ids):
                raise EvidenceMalformed("TCB Info tdxModuleIdentities has duplicate ids")
    return TcbInfo(
        id=tcb_id,
        version=version,
        issue_date=_date(info, "issueDate", where),
        next_update=_date(info, "nextUpdate", where),
        fmspc=_hex(info, "fmspc", where, 6),
        pce_id=_hex(info, "pceId", where, 2),
        tcb_type=tcb_type,
        tcb_evaluation_data_number=_int(info, "tcbEvaluationDataNumber", where, 1 << 31),
        tcb_levels=tuple(levels),
        tdx_module=tdx_module,
        tdx_module_identities=identities,
        signed_bytes=signed,
        signature=signature,
    )


def parse_qe_identity(document: bytes) -> QeIdentity:
    """Parse a PCS Enclave Identity response body. **No signature check** — use :func:`verify_qe_identity`."""
    document = bytes(document)
    whole = _loads(document, "QE Identity")
    if isinstance(whole, dict) and "qeIdentity" in whole and "enclaveIdentity" not in whole:
        raise EvidenceMalformed("QE Identity version 1 ('qeIdentity') is not supported; use PCS v3/v4 "
                                "'enclaveIdentity'")
    signed, signature, ident = _signed_member(document, "enclaveIdentity", "QE Identity")
    where = "enclaveIdentity"
    version = _int(ident, "version", where, 1 << 31)
    if version != 2:
        raise EvidenceMalformed(f"Enclave Identity version {version} is not supported (2 is)")
    qe_id = _str(ident, "id", where)
    if qe_id not in ("QE", "QVE", "TD_QE"):
        raise EvidenceMalformed(f"Enclave Identity id {qe_id!r} is not QE, QVE or TD_QE")
    return QeIdentity(
        id=qe_id,
        version=version,
        issue_date=_date(ident, "issueDate", where),
        next_update=_date(ident, "nextUpdate", where),
        tcb_evaluation_data_number=_int(ident, "tcbEvaluationDataNumber", where, 1 << 31),
        miscselect=int.from_bytes(_hex(ident, "miscselect", where, 4), "big"),
        miscselect_mask=int.from_bytes(_hex(ident, "miscselectMask", where, 4), "big"),
        attributes=_hex(ident, "attributes", where, 16),
        attributes_mask=_hex(ident, "attributesMask", where, 16),
        mrsigner=_hex(ident, "mrsigner", where, 32),
        isvprodid=_int(ident, "isvprodid", where, 0xFFFF),
        tcb_levels=_enclave_levels(ident, where),
        signed_bytes=signed,
        signature=signature,
    )


# --------------------------------------------------------------------------------------------
# Issuer chains and signatures

def _decode_chain_text(data: bytes) -> bytes:
    text = data.strip()
    if b"%2D" in text[:16].upper() or b"%0A" in text.upper():
        text = urllib.parse.unquote_to_bytes(text)
    return text


def load_issuer_chain(data: bytes | str | Sequence[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """Certificates from PEM text, URL-encoded PEM (the PCS header value) or a list of certificates."""
    if isinstance(data, str):
        raw = data.encode("utf-8")
    elif isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
    else:
        certs = tuple(data)
        if not all(isinstance(c, x509.Certificate) for c in certs):
            raise EvidenceMalformed("issuer chain: not a list of certificates")
        return certs
    if raw[:1] == b"\x30":
        # One DER certificate. Tried on the bytes as given: it is binary, and the text clean-up
        # below (strip, URL-decode) would corrupt one that happens to end in a whitespace byte.
        try:
            return (x509.load_der_x509_certificate(raw),)
        except ValueError:
            pass
    text = _decode_chain_text(raw)
    if b"-----BEGIN CERTIFICATE-----" not in text:
        raise EvidenceMalformed("issuer chain: no PEM certificate found")
    try:
        return tuple(x509.load_pem_x509_certificates(text.rstrip(b"\x00")))
    except ValueError as exc:
        raise EvidenceMalformed(f"issuer chain does not parse ({exc})") from None


def _verify_raw_signature(cert: x509.Certificate, signed: bytes, signature: bytes) -> bool:
    return signature_valid(cert.public_key(), signed, signature)


def signature_valid(key: Any, signed: bytes, signature: bytes) -> bool:
    """True if ``signature`` (r||s, 64 bytes) is ECDSA P-256 / SHA-256 over ``signed`` by ``key``."""
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        return False
    if len(signature) != 64:
        return False
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
        return True
    except (InvalidSignature, ValueError):
        return False


def _common_name(cert: x509.Certificate) -> str | None:
    try:
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return None
    return str(names[0].value) if names else None


def _signer_candidates(candidates: Sequence[x509.Certificate], signed: bytes, signature: bytes,
                       what: str) -> list[x509.Certificate]:
    signers = [c for c in candidates if _common_name(c) == TCB_SIGNING_CN
               and _verify_raw_signature(c, signed, signature)]
    if not signers:
        if any(_verify_raw_signature(c, signed, signature) for c in candidates):
            raise EvidenceInvalid(f"{what} is signed by a certificate that is not {TCB_SIGNING_CN!r}")
        raise EvidenceInvalid(f"{what} signature does not verify with any {TCB_SIGNING_CN!r} certificate "
                              "of its issuer chain")
    return signers


def _root_candidates(signer: x509.Certificate, candidates: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    roots = []
    for cert in candidates:
        if cert is signer or cert.subject != signer.issuer or cert.subject != cert.issuer:
            continue
        try:
            signer.verify_directly_issued_by(cert)
        except (InvalidSignature, ValueError, TypeError):
            continue
        roots.append(cert)
    return roots


def _verify_document(signed: bytes, signature: bytes, issuer_chain: Any, *, now: datetime,
                     trust: TrustAnchors, crls: Sequence[x509.CertificateRevocationList],
                     what: str) -> tuple[CertSummary, ...]:
    """The chain must be exactly [TCB Signing certificate that made ``signature``, pinned root].
    The candidates may come in any order and include other certificates (a pool from a
    directory); the first [signer, root] pair that verifies at ``now`` wins, else the first error."""
    if issuer_chain is None:
        raise EvidenceInvalid(f"{what}: no issuer chain given (PCS header TCB-Info-Issuer-Chain / "
                              "SGX-Enclave-Identity-Issuer-Chain)")
    certs = load_issuer_chain(issuer_chain)
    first_error: EvidenceInvalid | None = None
    for signer in _signer_candidates(certs, signed, signature, what):
        roots = _root_candidates(signer, certs)
        if not roots:
            first_error = first_error or EvidenceInvalid(
                f"{what} issuer chain has no root certificate that issued {subject(signer)!r}")
        for root in roots:
            try:
                return verify_chain([signer, root], now=now, trusted_roots=trust.for_platform("sgx"), crls=crls)
            except EvidenceInvalid as exc:
                first_error = first_error or EvidenceInvalid(f"{what}: {exc}")
    assert first_error is not None
    raise first_error


def _embedded_chain(document: bytes, header: str) -> str | None:
    try:
        whole = json.loads(document)
    except (ValueError, RecursionError):
        return None
    if not isinstance(whole, dict):
        return None
    for key in (header, "issuerChain", "issuer_chain"):
        value = whole.get(key)
        if isinstance(value, str):
            return value
    return None


def verify_tcb_info(raw: bytes, issuer_chain: Any = None, *, now: datetime,
                    trust: TrustAnchors = DEFAULT_TRUST,
                    crls: Sequence[x509.CertificateRevocationList] = ()) -> TcbInfo:
    """Parse a PCS TCB Info body and verify its signature and issuer chain at ``now``.

    ``issuer_chain``: certificates, PEM, or the URL-encoded ``TCB-Info-Issuer-Chain`` header value;
    ``None`` reads it from the document itself (``"TCB-Info-Issuer-Chain"`` or ``"issuerChain"``).
    """
    info = parse_tcb_info(raw)
    if issuer_chain is None:
        issuer_chain = _embedded_chain(bytes(raw), "TCB-Info-Issuer-Chain")
    chain = _verify_document(info.signed_bytes, info.signature, issuer_chain, now=now, trust=trust,
                             crls=crls, what=f"TCB Info (FMSPC {info.fmspc.hex()})")
    return replace(info, signer_chain=chain)


def verify_qe_identity(raw: bytes, issuer_chain: Any = None, *, now: datetime,
                       trust: TrustAnchors = DEFAULT_TRUST,
                       crls: Sequence[x509.CertificateRevocationList] = ()) -> QeIdentity:
    """Parse a PCS Enclave Identity body and verify its signature and issuer chain at ``now``."""
    ident = parse_qe_identity(raw)
    if issuer_chain is None:
        issuer_chain = _embedded_chain(bytes(raw), "SGX-Enclave-Identity-Issuer-Chain")
    chain = _verify_document(ident.signed_bytes, ident.signature, issuer_chain, now=now, trust=trust,
                             crls=crls, what=f"QE Identity ({ident.id})")
    return replace(ident, signer_chain=chain)


# --------------------------------------------------------------------------------------------
# CRLs

_HEXTEXT = re.compile(rb"[0-9a-fA-F\s]+")
_BASE64 = re.compile(rb"[A-Za-z0-9+/]+={0,2}")


def load_crl(data: bytes) -> x509.CertificateRevocationList:
    """A CRL from DER, PEM, base64 DER, or hex-encoded DER text (as some PCS/PCCS responses carry it)."""
    data = bytes(data)
    stripped = data.strip()
    try:
        if b"-----BEGIN X509 CRL-----" in stripped:
            return x509.load_pem_x509_crl(stripped)
        if stripped[:1] == b"\x30":
            return x509.load_der_x509_crl(data)
        compact = b"".join(stripped.split())
        if compact and _HEXTEXT.fullmatch(compact) and len(compact) % 2 == 0:
            return x509.load_der_x509_crl(bytes.fromhex(compact.decode("ascii")))
        if compact.startswith(b"MI") and _BASE64.fullmatch(compact):
            return x509.load_der_x509_crl(base64.b64decode(compact, validate=True))
    except (ValueError, binascii.Error) as exc:
        raise EvidenceMalformed(f"CRL does not parse ({exc})") from None
    raise EvidenceMalformed("CRL is neither DER, PEM, base64 nor hex-encoded DER")


# --------------------------------------------------------------------------------------------
# A collateral directory

def _classify(path: Path, data: bytes) -> str:
    stripped = data.strip()
    if stripped[:1] == b"{":
        return "json"
    if b"-----BEGIN X509 CRL-----" in stripped:
        return "crl"
    if stripped.startswith(b"-----BEGIN") or b"-----BEGIN CERTIFICATE-----" in stripped \
            or stripped[:21].upper() == b"%2D%2D%2D%2D%2DBEGIN":
        return "certs"
    if stripped[:1] == b"\x30":
        try:
            x509.load_der_x509_crl(data)
            return "crl"
        except ValueError:
            pass
        try:
            x509.load_der_x509_certificate(data)
            return "certs"
        except ValueError:
            pass
        return "bad"
    compact = b"".join(stripped.split())
    if compact and (_HEXTEXT.fullmatch(compact) or (compact.startswith(b"MI") and _BASE64.fullmatch(compact))):
        return "crl"
    return "unknown"


_KNOWN_SUFFIXES = {".json", ".crl", ".der", ".pem", ".cer", ".crt"}


def load_collateral(directory: Path, *, now: datetime, trust: TrustAnchors = DEFAULT_TRUST) -> IntelCollateral:
    """Read and verify every collateral file in ``directory`` (not recursive).

    Recognised by content, whatever the name (documented names in parentheses):

    - TCB Info JSON (``tcb_info.json``) — a PCS body ``{"tcbInfo": ..., "signature": ...}``,
      optionally with the issuer chain embedded as a string member ``"TCB-Info-Issuer-Chain"`` or
      ``"issuerChain"`` (PEM or the URL-encoded header value);
    - QE Identity JSON (``qe_identity.json``) — ``{"enclaveIdentity": ..., "signature": ...}``,
      chain member ``"SGX-Enclave-Identity-Issuer-Chain"`` or ``"issuerChain"``;
    - issuer chain certificates (``tcb_signing_chain.pem``; any PEM/URL-encoded-PEM/DER
      certificate file): the pool from which the TCB Signing certificate and root are taken for
      documents without an embedded chain;
    - CRLs (``*.crl``, ``*.der``, ``*.pem``; DER, PEM, base64 or hex text), e.g. the PCK Platform/Processor
      CA CRL and the Intel SGX Root CA CRL. The CRLs also apply to the collateral issuer chains.

    A file with a known suffix (.json .crl .der .pem .cer .crt) that does not parse is
    ``EvidenceMalformed``; other unrecognised files are skipped and named in ``notes``.
    Every JSON document must verify (``EvidenceInvalid`` otherwise): unverified collateral is never
    returned.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise EvidenceMalformed(f"collateral directory {str(directory)!r} does not exist")
    documents: list[tuple[str, bytes]] = []
    pool: list[x509.Certificate] = []
    crls: list[x509.CertificateRevocationList] = []
    notes: list[str] = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.stat().st_size > MAX_FILE:
            raise EvidenceMalformed(f"collateral file {path.name!r} is larger than {MAX_FILE} bytes")
        data = path.read_bytes()
        kind = _classify(path, data)
        known = path.suffix.lower() in _KNOWN_SUFFIXES
        if kind == "json":
            whole = _loads(data, path.name)
            if isinstance(whole, dict) and ("tcbInfo" in whole or "enclaveIdentity" in whole
                                            or "qeIdentity" in whole):
                documents.append((path.name, data))
            elif known:
                raise EvidenceMalformed(f"{path.name}: JSON without 'tcbInfo' or 'enclaveIdentity'")
            else:
                notes.append(f"ignored {path.name}: JSON that is not Intel collateral")
        elif kind == "crl":
            try:
                if b"-----BEGIN X509 CRL-----" in data and data.count(b"-----BEGIN X509 CRL-----") > 1:
                    for block in re.findall(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", data, re.S):
                        crls.append(load_crl(block))
                else:
                    crls.append(load_crl(data))
            except EvidenceMalformed as exc:
                raise EvidenceMalformed(f"{path.name}: {exc}") from None
        elif kind == "certs":
            try:
                pool.extend(load_issuer_chain(data))
            except EvidenceMalformed as exc:
                raise EvidenceMalformed(f"{path.name}: {exc}") from None
        elif known:
            raise EvidenceMalformed(f"{path.name}: not a CRL, certificate or collateral JSON")
        else:
            notes.append(f"ignored {path.name}: not recognised as collateral")
    for crl in crls:
        if crl.next_update_utc is not None and now > crl.next_update_utc:
            notes.append(f"CRL of {crl.issuer.rfc4514_string()!r} is stale: nextUpdate "
                         f"{crl.next_update_utc.isoformat()} is before {now.isoformat()}")
    tcb_infos: list[TcbInfo] = []
    qe_identities: list[QeIdentity] = []
    for name, data in documents:
        is_tcb = "tcbInfo" in _loads(data, name)
        header = "TCB-Info-Issuer-Chain" if is_tcb else "SGX-Enclave-Identity-Issuer-Chain"
        embedded = _embedded_chain(data, header)
        chain: Any = list(load_issuer_chain(embedded)) + pool if embedded is not None else (pool or None)
        try:
            if is_tcb:
                tcb_infos.append(verify_tcb_info(data, chain, now=now, trust=trust, crls=crls))
            else:
                qe_identities.append(verify_qe_identity(data, chain, now=now, trust=trust, crls=crls))
        except (EvidenceMalformed, EvidenceInvalid) as exc:
            raise type(exc)(f"{name}: {exc}") from None
    return IntelCollateral(
        tcb_info=tcb_infos[0] if tcb_infos else None,
        qe_identity=qe_identities[0] if qe_identities else None,
        crls=tuple(crls),
        tcb_infos=tuple(tcb_infos),
        qe_identities=tuple(qe_identities),
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------------------------
# Evaluation

def document_use(doc: TcbInfo | QeIdentity, now: datetime) -> CollateralUse:
    """A TCB Info or QE Identity as a :class:`CollateralUse`: the CN of the certificate that signed
    it (Intel SGX TCB Signing), its issueDate and nextUpdate, its age at ``now``."""
    issuer = "<issuer not verified>"
    if doc.signer_chain:
        try:
            issuer = common_name(x509.Name.from_rfc4514_string(doc.signer_chain[0].subject))
        except ValueError:
            issuer = doc.signer_chain[0].subject
    return CollateralUse(kind="tcb_info" if isinstance(doc, TcbInfo) else "qe_identity", issuer=issuer,
                         issued_at=doc.issue_date, next_update=doc.next_update,
                         age_seconds=(now - doc.issue_date).total_seconds())


def _freshness(doc: TcbInfo | QeIdentity, label: str, now: datetime) -> tuple[bool, list[str]]:
    notes: list[str] = []
    expired = now > doc.next_update
    if expired:
        notes.append(f"{label} nextUpdate {doc.next_update.isoformat()} is before the verification time "
                     f"{now.isoformat()} (collateral expired)")
    if now < doc.issue_date:
        notes.append(f"{label} issueDate {doc.issue_date.isoformat()} is after the verification time "
                     f"{now.isoformat()}")
    return expired, notes


def _select_tcb_info(coll: IntelCollateral, pck: PckExtensions, kind: str) -> TcbInfo:
    infos = coll.all_tcb_infos()
    if not infos:
        raise EvidenceInvalid("no TCB Info collateral was given")
    of_kind = [i for i in infos if i.id == kind]
    if not of_kind:
        raise EvidenceInvalid(f"no {kind} TCB Info among the collateral (have: "
                              f"{', '.join(sorted({i.id for i in infos}))})")
    matching = [i for i in of_kind if i.fmspc == pck.fmspc]
    if not matching:
        raise EvidenceInvalid(f"{kind} TCB Info is for FMSPC {', '.join(sorted(i.fmspc.hex() for i in of_kind))}; "
                              f"the PCK certificate's FMSPC is {pck.fmspc.hex()}")
    info = max(matching, key=lambda i: (i.tcb_evaluation_data_number, i.issue_date))
    if info.pce_id != pck.pce_id:
        raise EvidenceInvalid(f"TCB Info PCE-ID {info.pce_id.hex()} differs from the PCK certificate's "
                              f"{pck.pce_id.hex()}")
    return info


def _sgx_level_matches(level: TcbLevel, pck: PckExtensions) -> bool:
    return (all(have >= need for have, need in zip(pck.tcb_components, level.sgx_components))
            and pck.pcesvn >= level.pcesvn)


def evaluate_sgx_tcb(coll: IntelCollateral, pck: PckExtensions, now: datetime) -> TcbResult:
    """The SGX platform TCB status of the PCK certificate's platform (Intel PCS): the first TCB level
    whose 16 SGX component SVNs and PCESVN are all ≤ the PCK certificate's."""
    info = _select_tcb_info(coll, pck, "SGX")
    expired, notes = _freshness(info, f"TCB Info (FMSPC {info.fmspc.hex()})", now)
    for level in info.tcb_levels:
        if _sgx_level_matches(level, pck):
            return TcbResult(level.status, level.advisory_ids, level.tcb_date, expired, tuple(notes),
                             (document_use(info, now),))
    raise EvidenceInvalid(f"TCB not supported: the PCK certificate's TCB (components "
                          f"{list(pck.tcb_components)}, PCESVN {pck.pcesvn}) is below every level of the "
                          f"TCB Info for FMSPC {info.fmspc.hex()}")


def _masked_equal(value: bytes, expected: bytes, mask: bytes) -> bool:
    return all((v & m) == (e & m) for v, e, m in zip(value, expected, mask))


def _worse(platform_status: str, other_status: str) -> str:
    """QVL's convergence of the platform TCB status with a QE or TDX-module status."""
    if other_status == "Revoked":
        return "Revoked"
    if other_status in ("OutOfDate", "OutOfDateConfigurationNeeded"):
        if platform_status in ("UpToDate", "SWHardeningNeeded", "OutOfDate"):
            return "OutOfDate"
        if platform_status in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded",
                               "OutOfDateConfigurationNeeded"):
            return "OutOfDateConfigurationNeeded"
    return platform_status


def _merge(*groups: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for group in groups:
        for item in group:
            if item not in out:
                out.append(item)
    return tuple(out)


def _earliest(*dates: str | None) -> str | None:
    present = [d for d in dates if d]
    return min(present) if present else None


def evaluate_tdx_tcb(coll: IntelCollateral, pck: PckExtensions, tee_tcb_svn: bytes, now: datetime, *,
                     mrsignerseam: bytes | None = None, seam_attributes: bytes | None = None) -> TcbResult:
    """The TDX platform TCB status (Intel PCS, TCB Info v3 "TDX"), see the module docstring.

    Pass ``mrsignerseam`` (48 bytes) and ``seam_attributes`` (8 bytes) from the TD report to have
    the TDX module identity checked too (a mismatch is ``EvidenceInvalid``).
    """
    tee_tcb_svn = bytes(tee_tcb_svn)
    if len(tee_tcb_svn) != 16:
        raise EvidenceMalformed(f"TEE_TCB_SVN must be 16 bytes, got {len(tee_tcb_svn)}")
    info = _select_tcb_info(coll, pck, "TDX")
    expired, notes = _freshness(info, f"TDX TCB Info (FMSPC {info.fmspc.hex()})", now)
    module_version = tee_tcb_svn[1]
    first = 2 if module_version != 0 else 0
    matched: TcbLevel | None = None
    for level in info.tcb_levels:
        if not _sgx_level_matches(level, pck) or level.tdx_components is None:
            continue
        if all(tee_tcb_svn[i] >= level.tdx_components[i] for i in range(first, 16)):
            matched = level
            break
    if matched is None:
        raise EvidenceInvalid(f"TCB not supported: the platform TCB (PCK components {list(pck.tcb_components)}, "
                              f"PCESVN {pck.pcesvn}, TEE_TCB_SVN {tee_tcb_svn.hex()}) is below every level of "
                              f"the TDX TCB Info for FMSPC {info.fmspc.hex()}")

    if module_version == 0:
        module = info.tdx_module
        module_level: EnclaveTcbLevel | None = None
    else:
        wanted = f"TDX_{module_version:02X}"
        module = next((m for m in info.tdx_module_identities if m.id.upper() == wanted), None)
        if module is None:
            raise EvidenceInvalid(f"TDX TCB Info has no tdxModuleIdentities entry {wanted!r} for TDX module "
                                  f"major version {module_version}")
        module_level = next((lv for lv in module.tcb_levels if lv.isvsvn <= tee_tcb_svn[0]), None)
        if module_level is None:
            raise EvidenceInvalid(f"TCB not supported: TDX module {wanted} ISVSVN {tee_tcb_svn[0]} is below "
                                  "every level of its identity")
    if module is not None:
        if mrsignerseam is not None and bytes(mrsignerseam) != module.mrsigner:
            raise EvidenceInvalid(f"MRSIGNERSEAM {bytes(mrsignerseam).hex()} is not the TDX module signer "
                                  f"{module.mrsigner.hex()} of the TCB Info")
        if seam_attributes is not None and not _masked_equal(bytes(seam_attributes), module.attributes,
                                                              module.attributes_mask):
            raise EvidenceInvalid(f"SEAMATTRIBUTES {bytes(seam_attributes).hex()} do not match the TDX module "
                                  f"attributes {module.attributes.hex()} under mask {module.attributes_mask.hex()}")
    sources = (document_use(info, now),)
    if module_level is None:
        return TcbResult(matched.status, matched.advisory_ids, matched.tcb_date, expired, tuple(notes), sources)
    status = _worse(matched.status, module_level.status)
    return TcbResult(status, _merge(matched.advisory_ids, module_level.advisory_ids),
                     _earliest(matched.tcb_date, module_level.tcb_date), expired, tuple(notes), sources)


def evaluate_qe_identity(coll: IntelCollateral, qe_report_mrsigner: bytes, isvprodid: int, isvsvn: int,
                         miscselect: int, attributes: bytes, now: datetime, *,
                         expected_id: str | None = None) -> TcbResult:
    """Check a QE report against the QE Identity and return the QE's TCB status.

    ``expected_id`` ("QE" for SGX quotes, "TD_QE" for TDX) picks the identity when several are
    loaded (pass it; without it the identity whose MRSIGNER and ISVPRODID the report carries is
    used, and none or several such is ``EvidenceInvalid``). Mismatching MRSIGNER / ISVPRODID / MISCSELECT / ATTRIBUTES → ``EvidenceInvalid``;
    ISVSVN below every level → status ``Revoked``.
    """
    idents = coll.all_qe_identities()
    if expected_id is not None:
        idents = tuple(i for i in idents if i.id == expected_id)
    if not idents:
        raise EvidenceInvalid(f"no {expected_id or 'QE'} Identity collateral was given")
    mrsigner = bytes(qe_report_mrsigner)
    if len({i.id for i in idents}) > 1:
        # Several kinds loaded (QE and TD_QE) and no expected_id: the one whose MRSIGNER and
        # ISVPRODID the report carries; every other check below still applies to it.
        fitting = tuple(i for i in idents if i.mrsigner == mrsigner and i.isvprodid == isvprodid)
        if len({i.id for i in fitting}) != 1:
            raise EvidenceInvalid(f"several QE Identities loaded ({', '.join(sorted({i.id for i in idents}))}) "
                                  "and the QE report does not single one out; pass expected_id")
        idents = fitting
    ident = max(idents, key=lambda i: (i.tcb_evaluation_data_number, i.issue_date))
    attributes = bytes(attributes)
    if len(attributes) != 16:
        raise EvidenceMalformed(f"QE report ATTRIBUTES must be 16 bytes, got {len(attributes)}")
    problems = []
    if mrsigner != ident.mrsigner:
        problems.append(f"MRSIGNER {mrsigner.hex()} != {ident.mrsigner.hex()}")
    if isvprodid != ident.isvprodid:
        problems.append(f"ISVPRODID {isvprodid} != {ident.isvprodid}")
    if (miscselect & ident.miscselect_mask) != (ident.miscselect & ident.miscselect_mask):
        problems.append(f"MISCSELECT {miscselect:08x} does not match {ident.miscselect:08x} under mask "
                        f"{ident.miscselect_mask:08x}")
    if not _masked_equal(attributes, ident.attributes, ident.attributes_mask):
        problems.append(f"ATTRIBUTES {attributes.hex()} do not match {ident.attributes.hex()} under mask "
                        f"{ident.attributes_mask.hex()}")
    if problems:
        raise EvidenceInvalid(f"QE report does not match the {ident.id} Identity: " + "; ".join(problems))
    expired, notes = _freshness(ident, f"{ident.id} Identity", now)
    sources = (document_use(ident, now),)
    for level in ident.tcb_levels:
        if level.isvsvn <= isvsvn:
            return TcbResult(level.status, level.advisory_ids, level.tcb_date, expired, tuple(notes), sources)
    notes.append(f"QE ISVSVN {isvsvn} is below every level of the {ident.id} Identity")
    return TcbResult("Revoked", (), None, expired, tuple(notes), sources)


def converge_tcb_status(platform: TcbResult, qe: TcbResult) -> TcbResult:
    """The quote's TCB status from the platform's and the QE's, as Intel's QVL converges them:
    a Revoked QE makes it Revoked, an OutOfDate QE makes it OutOfDate (or
    OutOfDateConfigurationNeeded when the platform needs configuration); otherwise the platform's."""
    return TcbResult(
        status=_worse(platform.status, qe.status),
        advisory_ids=_merge(platform.advisory_ids, qe.advisory_ids),
        tcb_date=_earliest(platform.tcb_date, qe.tcb_date),
        collateral_expired=platform.collateral_expired or qe.collateral_expired,
        notes=_merge(platform.notes, qe.notes),
        sources=platform.sources + qe.sources,
    )
