"""A fake Intel PKI for tests: root, TCB Signing certificate, PCK CA and PCK leaves with SGX
Extensions, CRLs, and signed TCB Info / QE Identity documents with chosen levels.

Nothing here is trusted by default: tests inject :meth:`FakeIntelPki.trust` (a ``TrustAnchors``
pinning the fake root for "sgx" and "tdx"). The certificates use Intel's subject names (the
verifier checks the CN "Intel SGX TCB Signing") under a fake organisation, so they can never be
mistaken for Intel's in a log.

Typical use::

    pki = FakeIntelPki()
    body = pki.tcb_info_document(fmspc=bytes(6), levels=[tcb_level("UpToDate", sgx=[2] * 16, pcesvn=10)])
    info = verify_tcb_info(body, pki.issuer_chain_pem(), now=NOW, trust=pki.trust())
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, UTC
from functools import lru_cache
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from ..trust import TrustAnchors

__all__ = [
    "FakeIntelPki",
    "default_pki",
    "encode_sgx_extensions",
    "tcb_level",
    "enclave_level",
    "tdx_module_identity",
    "iso",
    "NOT_BEFORE",
    "NOT_AFTER",
]

NOT_BEFORE = datetime(2024, 1, 1, tzinfo=UTC)
NOT_AFTER = datetime(2034, 1, 1, tzinfo=UTC)
SGX_EXT = "1.2.840.113741.1.13.1"


def iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- DER writer (SGX Extensions)

def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


def _der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return _tlv(0x06, bytes(out))


def _der_int(value: int, tag: int = 0x02) -> bytes:
    length = max(1, (value.bit_length() + 8) // 8)
    return _tlv(tag, value.to_bytes(length, "big", signed=True))


def _entry(oid: str, value: bytes) -> bytes:
    return _tlv(0x30, _der_oid(oid) + value)


def encode_sgx_extensions(*, fmspc: bytes, tcb_components: Sequence[int], pcesvn: int,
                          cpusvn: bytes | None = None, pce_id: bytes = b"\x00\x00",
                          ppid: bytes = bytes(range(16)), sgx_type: int | None = 0,
                          platform_instance_id: bytes | None = None,
                          configuration: dict[int, bool] | None = None) -> bytes:
    """The DER value of the SGX Extensions extension, as Intel's PCK certificates carry it."""
    comps = list(tcb_components)
    if cpusvn is None:
        cpusvn = bytes((list(c & 0xFF for c in comps)) + [0] * 16)[:16]
    tcb = b"".join(_entry(f"{SGX_EXT}.2.{i + 1}", _der_int(svn)) for i, svn in enumerate(comps))
    tcb += _entry(f"{SGX_EXT}.2.17", _der_int(pcesvn))
    tcb += _entry(f"{SGX_EXT}.2.18", _tlv(0x04, cpusvn))
    items = [
        _entry(f"{SGX_EXT}.1", _tlv(0x04, ppid)),
        _entry(f"{SGX_EXT}.2", _tlv(0x30, tcb)),
        _entry(f"{SGX_EXT}.3", _tlv(0x04, pce_id)),
        _entry(f"{SGX_EXT}.4", _tlv(0x04, fmspc)),
    ]
    if sgx_type is not None:
        items.append(_entry(f"{SGX_EXT}.5", _der_int(sgx_type, 0x0A)))
    if platform_instance_id is not None:
        items.append(_entry(f"{SGX_EXT}.6", _tlv(0x04, platform_instance_id)))
    if configuration is not None:
        conf = b"".join(_entry(f"{SGX_EXT}.7.{k}", _tlv(0x01, b"\xff" if v else b"\x00"))
                        for k, v in sorted(configuration.items()))
        items.append(_entry(f"{SGX_EXT}.7", _tlv(0x30, conf)))
    return _tlv(0x30, b"".join(items))


# ---------------------------------------------------------------- JSON builders

def tcb_level(status: str, *, sgx: Sequence[int] = (0,) * 16, pcesvn: int = 0,
              tdx: Sequence[int] | None = None, advisories: Sequence[str] = (),
              date: str = "2024-01-01T00:00:00Z", version: int = 3) -> dict[str, Any]:
    """One ``tcbLevels`` entry (TCB Info v3 component arrays, or v2 ``sgxtcbcompNNsvn`` keys)."""
    if version == 2:
        tcb: dict[str, Any] = {f"sgxtcbcomp{i + 1:02d}svn": svn for i, svn in enumerate(sgx)}
    else:
        tcb = {"sgxtcbcomponents": [{"svn": svn} for svn in sgx]}
    tcb["pcesvn"] = pcesvn
    if tdx is not None:
        tcb["tdxtcbcomponents"] = [{"svn": svn} for svn in tdx]
    level: dict[str, Any] = {"tcb": tcb, "tcbDate": date, "tcbStatus": status}
    if advisories:
        level["advisoryIDs"] = list(advisories)
    return level


def enclave_level(status: str, isvsvn: int, *, advisories: Sequence[str] = (),
                  date: str = "2024-01-01T00:00:00Z") -> dict[str, Any]:
    level: dict[str, Any] = {"tcb": {"isvsvn": isvsvn}, "tcbDate": date, "tcbStatus": status}
    if advisories:
        level["advisoryIDs"] = list(advisories)
    return level


def tdx_module_identity(version: int, levels: Sequence[dict[str, Any]], *, mrsigner: bytes = bytes(48),
                        attributes: bytes = bytes(8), attributes_mask: bytes = b"\xff" * 8) -> dict[str, Any]:
    return {"id": f"TDX_{version:02X}", "mrsigner": mrsigner.hex().upper(), "attributes": attributes.hex().upper(),
            "attributesMask": attributes_mask.hex().upper(), "tcbLevels": list(levels)}


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def _raw_signature(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


# ---------------------------------------------------------------- the PKI

def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "enclaveq FAKE Intel (tests only)"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
    ])


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool, path_length: int | None = None,
          not_before: datetime = NOT_BEFORE, not_after: datetime = NOT_AFTER,
          extensions: Iterable[x509.ExtensionType] = (), serial: int | None = None) -> x509.Certificate:
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject))
               .issuer_name(issuer.subject if issuer is not None else _name(subject))
               .public_key(key.public_key())
               .serial_number(serial if serial is not None else x509.random_serial_number())
               .not_valid_before(not_before)
               .not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True))
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class FakeIntelPki:
    """Root → TCB Signing; Root → PCK Platform CA → PCK leaves. All ECDSA P-256."""

    root_cn: str = "Intel SGX Root CA"
    signing_cn: str = "Intel SGX TCB Signing"
    not_before: datetime = NOT_BEFORE
    not_after: datetime = NOT_AFTER
    root_key: ec.EllipticCurvePrivateKey = field(init=False)
    root: x509.Certificate = field(init=False)
    signing_key: ec.EllipticCurvePrivateKey = field(init=False)
    signing: x509.Certificate = field(init=False)
    pck_ca_key: ec.EllipticCurvePrivateKey = field(init=False)
    pck_ca: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = _cert(self.root_cn, self.root_key, None, self.root_key, ca=True, path_length=1,
                          not_before=self.not_before, not_after=self.not_after)
        self.signing_key = ec.generate_private_key(ec.SECP256R1())
        self.signing = _cert(self.signing_cn, self.signing_key, self.root, self.root_key, ca=False,
                             not_before=self.not_before, not_after=self.not_after)
        self.pck_ca_key = ec.generate_private_key(ec.SECP256R1())
        self.pck_ca = _cert("Intel SGX PCK Platform CA", self.pck_ca_key, self.root, self.root_key, ca=True,
                            path_length=0, not_before=self.not_before, not_after=self.not_after)

    # -- trust and chains
    def trust(self) -> TrustAnchors:
        fp = self.root.fingerprint(hashes.SHA256())
        return TrustAnchors({"sgx": frozenset({fp}), "tdx": frozenset({fp})})

    def issuer_chain(self) -> list[x509.Certificate]:
        return [self.signing, self.root]

    def issuer_chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.issuer_chain())

    def issuer_chain_header(self) -> str:
        """The chain as PCS sends it in the ``TCB-Info-Issuer-Chain`` header (URL-encoded PEM)."""
        from urllib.parse import quote
        return quote(self.issuer_chain_pem().decode("ascii"), safe="")

    # -- PCK certificates
    def pck_leaf(self, *, fmspc: bytes = bytes(6), tcb_components: Sequence[int] = (0,) * 16, pcesvn: int = 0,
                 pce_id: bytes = b"\x00\x00", sgx_type: int | None = 0, serial: int | None = None,
                 extension_der: bytes | None = None,
                 key: ec.EllipticCurvePrivateKey | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A PCK leaf with SGX Extensions (or the given raw ``extension_der``), issued by the PCK CA."""
        key = key or ec.generate_private_key(ec.SECP256R1())
        der = extension_der if extension_der is not None else encode_sgx_extensions(
            fmspc=fmspc, tcb_components=tcb_components, pcesvn=pcesvn, pce_id=pce_id, sgx_type=sgx_type)
        ext = x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_EXT), der)
        cert = _cert("Intel SGX PCK Certificate", key, self.pck_ca, self.pck_ca_key, ca=False,
                     not_before=self.not_before, not_after=self.not_after, extensions=[ext], serial=serial)
        return key, cert

    def issue(self, cn: str, *, issuer: str = "root", ca: bool = False,
              not_before: datetime | None = None,
              not_after: datetime | None = None,
              key: ec.EllipticCurvePrivateKey | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """Any other certificate under the root (``issuer="root"``) or the PCK CA (``"pck_ca"``)."""
        parent, parent_key = (self.root, self.root_key) if issuer == "root" else (self.pck_ca, self.pck_ca_key)
        key = key or ec.generate_private_key(ec.SECP256R1())
        cert = _cert(cn, key, parent, parent_key, ca=ca, path_length=0 if ca else None,
                     not_before=not_before or self.not_before, not_after=not_after or self.not_after)
        return key, cert

    # -- CRLs
    def crl(self, revoked_serials: Iterable[int] = (), *, issuer: str = "pck_ca",
            last_update: datetime | None = None, next_update: datetime | None = None) -> x509.CertificateRevocationList:
        """A CRL signed by the PCK CA (``issuer="pck_ca"``) or the root (``"root"``)."""
        cert, key = (self.pck_ca, self.pck_ca_key) if issuer == "pck_ca" else (self.root, self.root_key)
        last = last_update or self.not_before
        builder = (x509.CertificateRevocationListBuilder().issuer_name(cert.subject)
                   .last_update(last).next_update(next_update or last + timedelta(days=30)))
        for serial in revoked_serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(last).build())
        return builder.sign(key, hashes.SHA256())

    # -- signed documents
    def sign_document(self, member: str, value: Any, *, key: ec.EllipticCurvePrivateKey | None = None,
                      embed_chain: str | None = None, indent: bool = False) -> bytes:
        """``{"<member>": <value>, "signature": "<hex r||s>"}`` signed over the exact bytes of the value.

        ``embed_chain`` adds a top-level string member with that name holding the URL-encoded issuer
        chain (e.g. "TCB-Info-Issuer-Chain"). ``indent`` lays the value out over several lines,
        to show that whitespace inside the signed span is part of what is signed.
        """
        raw = json.dumps(value, indent=2).encode() if indent else _compact(value)
        signature = _raw_signature(key or self.signing_key, raw)
        body = b'{"' + member.encode() + b'":' + raw + b',"signature":"' + signature.hex().encode() + b'"'
        if embed_chain:
            body += b',' + _compact(embed_chain) + b':' + _compact(self.issuer_chain_header())
        return body + b"}"

    def tcb_info(self, *, fmspc: bytes = bytes(6), levels: Sequence[dict[str, Any]], tcb_id: str = "SGX",
                 version: int = 3, pce_id: bytes = b"\x00\x00", issue_date: datetime | None = None,
                 next_update: datetime | None = None, evaluation_number: int = 17,
                 tdx_module: dict[str, Any] | None = None,
                 tdx_module_identities: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
        issue = issue_date or datetime(2026, 11, 1, tzinfo=UTC)
        info: dict[str, Any] = {}
        if version == 3:
            info["id"] = tcb_id
        info.update({"version": version, "issueDate": iso(issue),
                     "nextUpdate": iso(next_update or issue + timedelta(days=30)),
                     "fmspc": fmspc.hex(), "pceId": pce_id.hex(), "tcbType": 0,
                     "tcbEvaluationDataNumber": evaluation_number})
        if tcb_id == "TDX":
            info["tdxModule"] = tdx_module or {"mrsigner": "00" * 48, "attributes": "00" * 8,
                                               "attributesMask": "FF" * 8}
            if tdx_module_identities is not None:
                info["tdxModuleIdentities"] = list(tdx_module_identities)
        info["tcbLevels"] = list(levels)
        return info

    def tcb_info_document(self, **kwargs: Any) -> bytes:
        embed = kwargs.pop("embed_chain", None)
        key = kwargs.pop("key", None)
        return self.sign_document("tcbInfo", self.tcb_info(**kwargs), key=key, embed_chain=embed)

    def qe_identity(self, *, levels: Sequence[dict[str, Any]], qe_id: str = "QE", mrsigner: bytes = b"\x8c" * 32,
                    isvprodid: int = 1, miscselect: int = 0, miscselect_mask: int = 0xFFFFFFFF,
                    attributes: bytes = bytes.fromhex("11000000000000000000000000000000"),
                    attributes_mask: bytes = bytes.fromhex("FBFFFFFFFFFFFFFF0000000000000000"),
                    issue_date: datetime | None = None, next_update: datetime | None = None) -> dict[str, Any]:
        issue = issue_date or datetime(2026, 11, 1, tzinfo=UTC)
        return {"id": qe_id, "version": 2, "issueDate": iso(issue),
                "nextUpdate": iso(next_update or issue + timedelta(days=30)), "tcbEvaluationDataNumber": 17,
                "miscselect": f"{miscselect:08X}", "miscselectMask": f"{miscselect_mask:08X}",
                "attributes": attributes.hex().upper(), "attributesMask": attributes_mask.hex().upper(),
                "mrsigner": mrsigner.hex().upper(), "isvprodid": isvprodid, "tcbLevels": list(levels)}

    def qe_identity_document(self, **kwargs: Any) -> bytes:
        embed = kwargs.pop("embed_chain", None)
        key = kwargs.pop("key", None)
        return self.sign_document("enclaveIdentity", self.qe_identity(**kwargs), key=key, embed_chain=embed)

    def write_collateral_dir(self, directory: Path, *, tcb_info: bytes | None = None,
                             qe_identity: bytes | None = None, chain: bool = True,
                             crls: Sequence[x509.CertificateRevocationList] = ()) -> Path:
        """Lay out a collateral directory with the documented file names."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if tcb_info is not None:
            (directory / "tcb_info.json").write_bytes(tcb_info)
        if qe_identity is not None:
            (directory / "qe_identity.json").write_bytes(qe_identity)
        if chain:
            (directory / "tcb_signing_chain.pem").write_bytes(self.issuer_chain_pem())
        for i, crl in enumerate(crls):
            (directory / f"crl{i}.der").write_bytes(crl.public_bytes(serialization.Encoding.DER))
        return directory


@lru_cache(maxsize=1)
def default_pki() -> FakeIntelPki:
    """One shared fake PKI (key generation once per process)."""
    return FakeIntelPki()
