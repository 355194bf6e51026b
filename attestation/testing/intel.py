"""Fake Intel signers for tests: one PKI that issues every Intel certificate, CRL and collateral
signature, and a Quoting Enclave that signs SGX v3 and TDX v4/v5 quotes with chosen fields.
Never used by production paths.

- :class:`FakeIntelPki`: a fake "Intel SGX Root CA" with, under it, the "Intel SGX TCB Signing"
  certificate (signs TCB Info and QE Identity) and the "Intel SGX PCK Platform CA" (or "Processor
  CA", ``processor=True``) that issues the "Intel SGX PCK Certificate" leaf. The leaf carries the
  SGX Extensions (OID 1.2.840.113741.1.13.1: PPID, TCB component SVNs, PCESVN, CPUSVN, PCE-ID,
  FMSPC, SGX type and, for Platform CA leaves, platform instance ID and configuration) encoded
  as Intel's PCK Certificate and CRL Profile Specification describes (:func:`sgx_extensions_der`).
  Every certificate's validity window is chosen around the PKI's ``now``; :meth:`~FakeIntelPki.crl`
  signs CRLs, :meth:`~FakeIntelPki.tcb_info_document` and :meth:`~FakeIntelPki.qe_identity_document`
  sign collateral (contents from :mod:`attestation.testing.intel_collateral`), and
  :meth:`~FakeIntelPki.trust` gives the ``TrustAnchors`` that pin the fake root. Subjects use
  Intel's common names (verifiers check them) under a fake organisation, so they can never be
  mistaken for Intel's in a log.
- :class:`FakeQuotingEnclave`: an attestation key and a QE report bound to it, signed by the PCK
  leaf key; :meth:`~FakeQuotingEnclave.sgx_quote` and :meth:`~FakeQuotingEnclave.tdx_quote` sign
  quotes whose report body fields are keyword arguments, with knobs to break each signature.

The quotes are produced with :mod:`attestation.intel.abi` encoders, so they exercise exactly the
layout the parsers read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote as url_quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from attestation.intel.abi import (
    ATT_KEY_ECDSA_P256,
    CERT_PCK_CHAIN,
    INTEL_QE_VENDOR_ID,
    TEE_TYPE_SGX,
    TEE_TYPE_TDX,
    CertificationData,
    EcdsaSignatureData,
    QuoteHeader,
    ReportBody,
    TdReportBody,
)
from attestation.testing.intel_collateral import qe_identity, tcb_info
from attestation.trust import TrustAnchors

__all__ = [
    "DEFAULT_NOW",
    "SGX_EXTENSIONS_OID",
    "SGX_QE_MRSIGNER",
    "TD_QE_MRSIGNER",
    "FakeIntelPki",
    "FakeQuotingEnclave",
    "QuoteRegions",
    "default_pki",
    "intel_name",
    "mutation_failures",
    "quote_regions",
    "sgx_code_pin",
    "tdx_code_pin",
    "sgx_extensions_der",
    "sgx_report_body",
    "td_report_body",
]

SGX_EXTENSIONS_OID = "1.2.840.113741.1.13.1"
# Intel's production QE identities (from the vectors): SGX QE and TD QE MRSIGNER.
SGX_QE_MRSIGNER = bytes.fromhex("8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff")
TD_QE_MRSIGNER = bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5")
# The moment :func:`default_pki` is built around (the project's tests verify at this date).
DEFAULT_NOW = datetime(2026, 11, 27, tzinfo=UTC)


# --------------------------------------------------------------------------------------------
# A tiny DER writer: just what the SGX Extensions need. It writes whatever it is given (a
# negative SVN, 15 components, no SGX type), so tests can also build malformed extensions.


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    digits = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(digits)]) + digits


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(body)) + body


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out.extend(reversed(chunk))
    return _tlv(0x06, bytes(out))


def _int(value: int, tag: int = 0x02) -> bytes:
    """A minimal two's complement INTEGER (or, with ``tag=0x0A``, ENUMERATED)."""
    return _tlv(tag, value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True))


def _seq(*items: bytes) -> bytes:
    return _tlv(0x30, b"".join(items))


def _entry(suffix: str, value: bytes) -> bytes:
    return _seq(_oid(f"{SGX_EXTENSIONS_OID}.{suffix}"), value)


def sgx_extensions_der(
    *,
    fmspc: bytes,
    tcb_components: Sequence[int],
    pcesvn: int,
    cpusvn: bytes | None = None,
    pce_id: bytes = b"\x00\x00",
    ppid: bytes = bytes(range(16)),
    sgx_type: int | None = 0,
    platform_instance_id: bytes | None = None,
    configuration: Mapping[int, bool] | None = None,
) -> bytes:
    """The DER value of the SGX Extensions extension, in Intel's order and encodings.

    ``cpusvn`` defaults to the component SVNs (as Intel issues them); ``sgx_type=None`` leaves the
    SGX type out; ``configuration`` maps 1 (dynamicPlatform), 2 (cachedKeys), 3 (SMTEnabled) to
    their flags, and only the keys given are written."""
    components = list(tcb_components)
    if cpusvn is None:
        cpusvn = bytes([c & 0xFF for c in components] + [0] * 16)[:16]
    tcb = [_entry(f"2.{i + 1}", _int(svn)) for i, svn in enumerate(components)]
    tcb.append(_entry("2.17", _int(pcesvn)))
    tcb.append(_entry("2.18", _tlv(0x04, cpusvn)))
    items = [
        _entry("1", _tlv(0x04, ppid)),
        _entry("2", _seq(*tcb)),
        _entry("3", _tlv(0x04, pce_id)),
        _entry("4", _tlv(0x04, fmspc)),
    ]
    if sgx_type is not None:
        items.append(_entry("5", _int(sgx_type, 0x0A)))
    if platform_instance_id is not None:
        items.append(_entry("6", _tlv(0x04, platform_instance_id)))
    if configuration is not None:
        flags = [_entry(f"7.{k}", _tlv(0x01, b"\xff" if on else b"\x00")) for k, on in sorted(configuration.items())]
        items.append(_entry("7", _seq(*flags)))
    return _seq(*items)


# --------------------------------------------------------------------------------------------
# The PKI


def intel_name(common_name: str) -> x509.Name:
    """A subject laid out like Intel's, CN first in the encoding (so RFC 4514 prints
    ``C=US,...,CN=...``), under an organisation that says it is fake."""
    return x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "enclaveq FAKE Intel (tests only)"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
    ])


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=not ca, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def _certificate(subject: x509.Name, issuer: x509.Name, public_key: Any, signing_key: Any, *,
                 not_before: datetime, not_after: datetime, ca: bool, path_length: int | None,
                 serial: int | None = None, extensions: Sequence[x509.ExtensionType] = ()) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(_key_usage(ca=ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _raw_signature(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


_DAY = timedelta(days=1)


@dataclass
class FakeIntelPki:
    """Root -> TCB Signing; root -> Platform (or Processor) CA -> PCK leaf with SGX Extensions.
    All ECDSA P-256, all valid around ``now``.

    Every ``*_not_before`` / ``*_not_after`` defaults to a window around ``now`` (root: ten years,
    TCB Signing and CA: five, leaf: one). The leaf's SGX Extensions carry ``fmspc``, ``pce_id``,
    ``cpusvn``, ``pcesvn`` and ``tcb_components`` (default: the CPUSVN bytes, as Intel issues
    them)."""

    now: datetime
    processor: bool = False
    fmspc: bytes = bytes.fromhex("00906ed50000")
    pce_id: bytes = b"\x00\x00"
    cpusvn: bytes = bytes([4, 4, 3, 3, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    pcesvn: int = 11
    tcb_components: Sequence[int] = ()
    root_not_before: datetime | None = None
    root_not_after: datetime | None = None
    signing_not_before: datetime | None = None
    signing_not_after: datetime | None = None
    ca_not_before: datetime | None = None
    ca_not_after: datetime | None = None
    leaf_not_before: datetime | None = None
    leaf_not_after: datetime | None = None
    root_key: ec.EllipticCurvePrivateKey = field(init=False, repr=False)
    signing_key: ec.EllipticCurvePrivateKey = field(init=False, repr=False)
    ca_key: ec.EllipticCurvePrivateKey = field(init=False, repr=False)
    leaf_key: ec.EllipticCurvePrivateKey = field(init=False, repr=False)
    root: x509.Certificate = field(init=False, repr=False)
    signing: x509.Certificate = field(init=False, repr=False)
    ca: x509.Certificate = field(init=False, repr=False)
    leaf: x509.Certificate = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # An empty component list is never a valid TCB, so it safely means "not chosen".
        self.tcb_components = tuple(self.tcb_components or self.cpusvn)
        self.root_key, self.signing_key, self.ca_key, self.leaf_key = (_new_key() for _ in range(4))
        root_name = intel_name("Intel SGX Root CA")
        self.root = _certificate(
            root_name, root_name, self.root_key.public_key(), self.root_key,
            not_before=self.root_not_before or self.now - 365 * _DAY,
            not_after=self.root_not_after or self.now + 3650 * _DAY, ca=True, path_length=1)
        self.signing = _certificate(
            intel_name("Intel SGX TCB Signing"), root_name, self.signing_key.public_key(), self.root_key,
            not_before=self.signing_not_before or self.now - 180 * _DAY,
            not_after=self.signing_not_after or self.now + 1825 * _DAY, ca=False, path_length=None)
        self.ca = self.issue_ca()
        self.leaf = self.issue_leaf()

    @property
    def ca_name(self) -> str:
        return "Intel SGX PCK Processor CA" if self.processor else "Intel SGX PCK Platform CA"

    @property
    def root_sha256(self) -> bytes:
        return self.root.fingerprint(hashes.SHA256())

    def trust(self) -> TrustAnchors:
        """Trust anchors that pin this fake root for both sgx and tdx (and nothing else)."""
        return TrustAnchors({"sgx": frozenset({self.root_sha256}), "tdx": frozenset({self.root_sha256})})

    # -- certificates

    def issue_ca(self, *, name: str | None = None, signing_key: Any = None) -> x509.Certificate:
        """The PCK CA certificate for ``ca_key`` (the default one, or with another name / signer)."""
        return _certificate(
            intel_name(name or self.ca_name), self.root.subject, self.ca_key.public_key(), signing_key or self.root_key,
            not_before=self.ca_not_before or self.now - 180 * _DAY,
            not_after=self.ca_not_after or self.now + 1825 * _DAY, ca=True, path_length=0)

    def issue_leaf(self, *, extensions: bytes | None = None, name: str = "Intel SGX PCK Certificate",
                   signing_key: Any = None, public_key: Any = None, serial: int | None = None) -> x509.Certificate:
        """A PCK leaf issued by the CA: the default one, or with other SGX Extensions DER (e.g. from
        :func:`sgx_extensions_der`), name, signer, public key or serial number."""
        if extensions is None:
            extensions = sgx_extensions_der(
                fmspc=self.fmspc, pce_id=self.pce_id, cpusvn=self.cpusvn, pcesvn=self.pcesvn,
                tcb_components=self.tcb_components, ppid=hashlib.sha256(b"fake ppid").digest()[:16],
                sgx_type=0 if self.processor else 1,
                platform_instance_id=None if self.processor else bytes(range(16)),
                configuration=None if self.processor else {1: True, 2: True, 3: True},
            )
        return _certificate(
            intel_name(name), self.ca.subject, public_key or self.leaf_key.public_key(), signing_key or self.ca_key,
            not_before=self.leaf_not_before or self.now - 30 * _DAY,
            not_after=self.leaf_not_after or self.now + 365 * _DAY, ca=False, path_length=None, serial=serial,
            extensions=[x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_EXTENSIONS_OID), extensions)])

    def issue(self, common_name: str, *, issuer: str = "root", ca: bool = False, not_before: datetime | None = None,
              not_after: datetime | None = None,
              key: ec.EllipticCurvePrivateKey | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """Any other certificate (and its key: ``key`` or a new one) under the root
        (``issuer="root"``) or the PCK CA (``"ca"``), valid from ``now`` - 30 days for a year
        unless told otherwise."""
        parent, parent_key = self._issuer(issuer)
        key = key or _new_key()
        cert = _certificate(intel_name(common_name), parent.subject, key.public_key(), parent_key,
                            not_before=not_before or self.now - 30 * _DAY, not_after=not_after or self.now + 365 * _DAY,
                            ca=ca, path_length=0 if ca else None)
        return key, cert

    def _issuer(self, which: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if which == "root":
            return self.root, self.root_key
        if which == "ca":
            return self.ca, self.ca_key
        raise ValueError(f"issuer must be 'root' or 'ca', not {which!r}")

    # -- chains

    @property
    def chain(self) -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
        """The PCK chain, leaf first."""
        return (self.leaf, self.ca, self.root)

    def pem_chain(self, certs: Sequence[x509.Certificate] | None = None, *, nul: int = 0) -> bytes:
        """Certification data type 5: PEM leaf, CA, root (optionally NUL-terminated, as in TDX)."""
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (certs or self.chain))
        return pem + b"\x00" * nul

    def issuer_chain(self) -> list[x509.Certificate]:
        """The collateral issuer chain: TCB Signing, root."""
        return [self.signing, self.root]

    def issuer_chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.issuer_chain())

    def issuer_chain_header(self) -> str:
        """The issuer chain as PCS sends it in the ``TCB-Info-Issuer-Chain`` header (URL-encoded PEM)."""
        return url_quote(self.issuer_chain_pem().decode("ascii"), safe="")

    # -- CRLs

    def crl(self, *, issuer: str = "ca", revoked: Iterable[x509.Certificate | int] = (),
            last_update: datetime | None = None, next_update: datetime | None = None,
            signing_key: Any = None) -> x509.CertificateRevocationList:
        """A CRL by the PCK CA (``issuer="ca"``, the PCK CRL) or the root (``"root"``) revoking
        ``revoked`` (certificates or bare serial numbers), valid from ``now`` - 1 day for 30 days
        unless told otherwise; ``signing_key`` forges the signature."""
        issuer_cert, key = self._issuer(issuer)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer_cert.subject)
            .last_update(last_update or self.now - _DAY)
            .next_update(next_update or self.now + 30 * _DAY)
        )
        for item in revoked:
            serial = item if isinstance(item, int) else item.serial_number
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(self.now - timedelta(hours=1)).build())
        return builder.sign(signing_key or key, hashes.SHA256())

    # -- signed collateral

    def sign_document(self, member: str, value: Any, *, key: ec.EllipticCurvePrivateKey | None = None,
                      embed_chain: str | None = None, indent: bool = False) -> bytes:
        """``{"<member>": <value>, "signature": "<hex r||s>"}`` signed (by the TCB Signing key unless
        ``key``) over the exact bytes of the value, as PCS serves TCB Info and QE Identity.

        ``embed_chain`` adds a top-level string member with that name holding the URL-encoded issuer
        chain (e.g. "TCB-Info-Issuer-Chain"). ``indent`` lays the value out over several lines,
        to show that whitespace inside the signed span is part of what is signed.
        """
        raw = json.dumps(value, indent=2).encode() if indent else _compact(value)
        signature = _raw_signature(key or self.signing_key, raw)
        body = b'{"' + member.encode() + b'":' + raw + b',"signature":"' + signature.hex().encode() + b'"'
        if embed_chain:
            body += b"," + _compact(embed_chain) + b":" + _compact(self.issuer_chain_header())
        return body + b"}"

    def tcb_info_document(self, *, key: ec.EllipticCurvePrivateKey | None = None, embed_chain: str | None = None,
                          **fields: Any) -> bytes:
        """A signed TCB Info response body; ``fields`` go to
        :func:`attestation.testing.intel_collateral.tcb_info` (``issue_date`` defaults to ``now``)."""
        fields.setdefault("issue_date", self.now)
        return self.sign_document("tcbInfo", tcb_info(**fields), key=key, embed_chain=embed_chain)

    def qe_identity_document(self, *, key: ec.EllipticCurvePrivateKey | None = None, embed_chain: str | None = None,
                             **fields: Any) -> bytes:
        """A signed QE Identity response body; ``fields`` go to
        :func:`attestation.testing.intel_collateral.qe_identity` (``issue_date`` defaults to ``now``)."""
        fields.setdefault("issue_date", self.now)
        return self.sign_document("enclaveIdentity", qe_identity(**fields), key=key, embed_chain=embed_chain)

    def collateral(self, status: str = "UpToDate", *, tdx: bool = False, advisories: Sequence[str] = (),
                   qe_status: str = "UpToDate", issue_date: datetime | None = None,
                   tcb_next_update: datetime | None = None, qe_next_update: datetime | None = None,
                   crls: Sequence[x509.CertificateRevocationList] | None = None) -> dict[str, Any]:
        """Verified collateral for quotes of this PKI's platform (``VerificationInputs.collateral``):
        a TCB Info (SGX, or TDX with ``tdx``) whose one level, met by every quote of this PKI, has
        ``status`` and ``advisories``; the QE (or TD_QE) Identity of :class:`FakeQuotingEnclave`
        with ``qe_status``; and the PCK CRL and Root CA CRL revoking nothing (or ``crls``). Dates
        default to ``issue_date`` = ``now`` - 1 day and nextUpdate 30 days later."""
        from attestation.intel.collateral import IntelCollateral, verify_qe_identity, verify_tcb_info
        from attestation.testing.intel_collateral import enclave_level, tcb_level

        issued = issue_date or self.now - _DAY
        revocation = list(crls) if crls is not None else [self.crl(issuer="ca"), self.crl(issuer="root")]
        level = tcb_level(status, sgx=[0] * 16, pcesvn=0, tdx=[0] * 16 if tdx else None, advisories=advisories)
        info_doc = self.tcb_info_document(levels=[level], fmspc=self.fmspc, pce_id=self.pce_id,
                                          tcb_id="TDX" if tdx else "SGX", issue_date=issued,
                                          next_update=tcb_next_update)
        qe_doc = self.qe_identity_document(levels=[enclave_level(qe_status, 0)], issue_date=issued,
                                           qe_id="TD_QE" if tdx else "QE",
                                           mrsigner=TD_QE_MRSIGNER if tdx else SGX_QE_MRSIGNER,
                                           isvprodid=2 if tdx else 1, next_update=qe_next_update)
        # Verified at the documents' issue date: staleness is the policy's to judge, at its own time.
        chain, trust = self.issuer_chain(), self.trust()
        info = verify_tcb_info(info_doc, chain, now=issued, trust=trust)
        qe = verify_qe_identity(qe_doc, chain, now=issued, trust=trust)
        intel = IntelCollateral(tcb_info=info, qe_identity=qe, crls=tuple(revocation))
        return intel.as_mapping()

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
    """One shared fake PKI around :data:`DEFAULT_NOW` (key generation once per process)."""
    return FakeIntelPki(DEFAULT_NOW)


# --------------------------------------------------------------------------------------------
# Report bodies with chosen fields


def sgx_report_body(**fields: Any) -> ReportBody:
    """An SGX report body; any field of :class:`ReportBody` may be given, plus ``attributes_flags``
    and ``attributes_xfrm`` (integers) instead of the raw 16-byte ``attributes``."""
    flags = fields.pop("attributes_flags", 0x05)      # INIT | MODE64BIT, not DEBUG
    xfrm = fields.pop("attributes_xfrm", 0xE7)
    defaults: dict[str, Any] = dict(
        cpusvn=bytes(16), miscselect=0, reserved1=bytes(12), isv_ext_prod_id=bytes(16),
        attributes=flags.to_bytes(8, "little") + xfrm.to_bytes(8, "little"),
        mrenclave=hashlib.sha256(b"fake enclave").digest(), reserved2=bytes(32),
        mrsigner=hashlib.sha256(b"fake signer").digest(), reserved3=bytes(32), config_id=bytes(64),
        isvprodid=0, isvsvn=0, config_svn=0, reserved4=bytes(42), isv_family_id=bytes(16),
        report_data=bytes(64),
    )
    defaults.update(fields)
    return ReportBody(**defaults)


def td_report_body(body_type: int = 2, **fields: Any) -> TdReportBody:
    """A TD report body (2 = TDX 1.0, 3 = TDX 1.5); any field of :class:`TdReportBody` may be given,
    plus ``td_attributes`` / ``xfam`` as integers."""
    for key in ("td_attributes", "xfam"):
        if isinstance(fields.get(key), int):
            fields[key] = fields[key].to_bytes(8, "little")
    h = lambda label: hashlib.sha384(label.encode()).digest()  # noqa: E731
    defaults: dict[str, Any] = dict(
        tee_tcb_svn=bytes([3, 0, 5]) + bytes(13), mrseam=h("seam"), mrsignerseam=bytes(48),
        seam_attributes=bytes(8), td_attributes=(0x10000000).to_bytes(8, "little"),
        xfam=bytes.fromhex("e702060000000000"), mrtd=h("td"), mrconfigid=bytes(48), mrowner=bytes(48),
        mrownerconfig=bytes(48), rtmr0=h("rtmr0"), rtmr1=h("rtmr1"), rtmr2=h("rtmr2"), rtmr3=bytes(48),
        report_data=bytes(64),
    )
    if body_type == 3:
        defaults.update(tee_tcb_svn2=bytes([3, 0, 5]) + bytes(13), mrservicetd=bytes(48))
    elif body_type != 2:
        raise ValueError("body_type must be 2 or 3")
    defaults.update(fields)
    return TdReportBody(**defaults)


def sgx_code_pin(**fields: Any) -> dict[str, Any]:
    """An ``[sgx]`` table fragment that pins the code of :func:`sgx_report_body` (with ``fields``):
    tests merge it under the keys they exercise (``sgx_code_pin() | table``)."""
    return {"mrenclave": [sgx_report_body(**fields).mrenclave.hex()]}


def tdx_code_pin(body_type: int = 2, **fields: Any) -> dict[str, Any]:
    """A ``[tdx]`` table fragment pinning MRTD and RTMR0-2 of :func:`td_report_body` (with
    ``fields``): the registers a ``[tdx]`` table must pin together."""
    body = td_report_body(body_type, **fields)
    return {key: [getattr(body, key).hex()] for key in ("mrtd", "rtmr0", "rtmr1", "rtmr2")}


def _raw_public(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint)[1:]


# --------------------------------------------------------------------------------------------
# The Quoting Enclave


@dataclass
class FakeQuotingEnclave:
    """Signs quotes with an attestation key that its QE report (signed by ``pki``'s PCK leaf key)
    vouches for. ``qe_*`` choose the QE report's identity fields."""

    pki: FakeIntelPki
    qe_auth_data: bytes = bytes(range(32))
    qe_mrsigner: bytes | None = None          # default: Intel's SGX QE or TD QE MRSIGNER
    qe_isvprodid: int | None = None           # default: 1 (SGX QE) or 2 (TD QE)
    qe_isvsvn: int = 8
    qe_svn: int = 8
    pce_svn: int = 13
    attestation_key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    def qe_report(self, *, tdx: bool, report_data: bytes | None = None, **fields: Any) -> ReportBody:
        if report_data is None:
            report_data = hashlib.sha256(_raw_public(self.attestation_key) + self.qe_auth_data).digest() + bytes(32)
        defaults: dict[str, Any] = dict(
            cpusvn=self.pki.cpusvn, attributes_flags=0x15, attributes_xfrm=0xE7,
            mrenclave=hashlib.sha256(b"fake QE").digest(),
            mrsigner=self.qe_mrsigner or (TD_QE_MRSIGNER if tdx else SGX_QE_MRSIGNER),
            isvprodid=self.qe_isvprodid if self.qe_isvprodid is not None else (2 if tdx else 1),
            isvsvn=self.qe_isvsvn, report_data=report_data,
        )
        defaults.update(fields)
        return sgx_report_body(**defaults)

    def signature_data(
        self,
        signed_region: bytes,
        *,
        nested: bool,
        quote_key: ec.EllipticCurvePrivateKey | None = None,
        qe_key: ec.EllipticCurvePrivateKey | None = None,
        qe_report: ReportBody | None = None,
        qe_report_data: bytes | None = None,
        pem: bytes | None = None,
        cert_type: int = CERT_PCK_CHAIN,
        attestation_key_raw: bytes | None = None,
    ) -> EcdsaSignatureData:
        """Signature data over ``signed_region``. The knobs break one thing each: sign the quote
        (``quote_key``) or the QE report (``qe_key``) with another key, change the QE report or its
        report data, carry another PEM chain or certification data type, or another raw key."""
        qe = qe_report or self.qe_report(tdx=nested, report_data=qe_report_data)
        qe_raw = qe.encode()
        cert_data = pem if pem is not None else self.pki.pem_chain(nul=1 if nested else 0)
        return EcdsaSignatureData(
            signature=_raw_signature(quote_key or self.attestation_key, signed_region),
            attestation_key=attestation_key_raw or _raw_public(self.attestation_key),
            qe_report_raw=qe_raw,
            qe_report=qe,
            qe_report_signature=_raw_signature(qe_key or self.pki.leaf_key, qe_raw),
            qe_auth_data=self.qe_auth_data,
            certification=CertificationData(cert_type, cert_data),
            nested=nested,
        )

    def sgx_quote(self, *, trailing: bytes = b"", header: QuoteHeader | None = None,
                  sig_options: dict[str, Any] | None = None, **body_fields: Any) -> bytes:
        """A signed SGX quote v3; ``body_fields`` go to :func:`sgx_report_body`."""
        from attestation.sgx.abi import encode_quote

        header = header or QuoteHeader(3, ATT_KEY_ECDSA_P256, TEE_TYPE_SGX, self.qe_svn, self.pce_svn,
                                       INTEL_QE_VENDOR_ID, bytes(20))
        body = sgx_report_body(**body_fields)
        sig = self.signature_data(header.encode() + body.encode(), nested=False, **(sig_options or {}))
        return encode_quote(header, body, sig, trailing)

    def tdx_quote(self, *, version: int = 4, body_type: int | None = None, trailing: bytes = b"",
                  header: QuoteHeader | None = None, sig_options: dict[str, Any] | None = None,
                  **body_fields: Any) -> bytes:
        """A signed TDX quote v4 (TDX 1.0 body) or v5 (body type 2 or 3, default 3)."""
        from attestation.tdx.abi import encode_quote

        if body_type is None:
            body_type = 2 if version == 4 else 3
        header = header or QuoteHeader(version, ATT_KEY_ECDSA_P256, TEE_TYPE_TDX, 0, 0, INTEL_QE_VENDOR_ID,
                                       bytes(20))
        body = td_report_body(body_type, **body_fields)
        unsigned = encode_quote(header, body, _placeholder_signature())
        signed_end = 48 + (6 if header.version == 5 else 0) + len(body.encode())
        sig = self.signature_data(unsigned[:signed_end], nested=True, **(sig_options or {}))
        return encode_quote(header, body, sig, trailing)


def _placeholder_signature() -> EcdsaSignatureData:
    qe = sgx_report_body()
    return EcdsaSignatureData(bytes(64), bytes(64), qe.encode(), qe, bytes(64), b"",
                              CertificationData(CERT_PCK_CHAIN, b""), True)


# --------------------------------------------------------------------------------------------
# Where things are in a quote, for tamper tests


@dataclass(frozen=True)
class QuoteRegions:
    """Absolute byte ranges ``[start, end)`` of a parsed SGX or TDX quote."""

    signed: tuple[int, int]             # header (+ v5 body descriptor) + body: the quote signature covers it
    signature_length: tuple[int, int]   # the u32 signature data length
    signature_data: tuple[int, int]     # everything the signature data holds, before the PEM chain
    certification: tuple[int, int]     # the PCK chain PEM (type 5 data), incl. NUL padding
    trailing: tuple[int, int]           # after the signature data


def quote_regions(quote: Any) -> QuoteRegions:
    """Regions of an ``SgxQuote`` or ``TdxQuote`` (from the platform's ``parse_quote``)."""
    signed_end = len(quote.signed_region)
    sig_start = signed_end + 4
    sig_end = sig_start + quote.signature_data_len
    cert_start = sig_end - len(quote.signature_data.certification.data)
    return QuoteRegions((0, signed_end), (signed_end, sig_start), (sig_start, cert_start), (cert_start, sig_end),
                        (sig_end, sig_end + quote.trailing_bytes))


def mutation_failures(verify: Any, evidence: bytes, inputs: Any, positions: Sequence[int],
                      xors: Sequence[int] = (0x01,)) -> list[str]:
    """Flip each byte at ``positions`` (XOR each of ``xors``) and verify: every mutant must raise
    ``EvidenceMalformed`` or ``EvidenceInvalid``. Returns a description of each mutant that did not
    (verified anyway, or raised something else) -- an empty list means all were refused."""
    from attestation.errors import EvidenceInvalid, EvidenceMalformed

    bad: list[str] = []
    data = bytearray(evidence)
    for pos in positions:
        original = data[pos]
        for xor in xors:
            data[pos] = original ^ xor
            try:
                verify(bytes(data), inputs)
            except (EvidenceMalformed, EvidenceInvalid):
                pass
            except Exception as exc:  # noqa: BLE001 - reported, not raised: the test lists them all
                bad.append(f"offset {pos:#x} ^ {xor:#04x}: {type(exc).__name__}: {exc}")
            else:
                bad.append(f"offset {pos:#x} ^ {xor:#04x}: still verifies")
        data[pos] = original
    return bad
