"""Fake Intel signers for tests: a whole PCK PKI in memory and a Quoting Enclave that signs
SGX v3 and TDX v4/v5 quotes with chosen fields. Never used by production paths.

- :class:`FakeIntelPki`: a fake "Intel SGX Root CA" -> "Intel SGX PCK Platform CA" (or
  "Processor CA", ``processor=True``) -> "Intel SGX PCK Certificate" whose leaf carries the SGX
  Extensions (OID 1.2.840.113741.1.13.1: PPID, TCB component SVNs, PCESVN, CPUSVN, PCE-ID, FMSPC,
  SGX type and, for Platform CA leaves, platform instance ID and configuration) encoded as
  [INTEL-PCK] describes. Validity windows are chosen per certificate; :meth:`FakeIntelPki.crl`
  signs CRLs; :meth:`FakeIntelPki.trust` gives the ``TrustAnchors`` that pin the fake root.
- :class:`FakeQuotingEnclave`: an attestation key and a QE report bound to it, signed by the PCK
  leaf key; :meth:`~FakeQuotingEnclave.sgx_quote` and :meth:`~FakeQuotingEnclave.tdx_quote` sign
  quotes whose report body fields are keyword arguments, with knobs to break each signature.

The quotes are produced with :mod:`attestation.intel.abi` encoders, so they exercise exactly the
layout the parsers read.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from collections.abc import Sequence

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
from attestation.trust import TrustAnchors

__all__ = [
    "SGX_EXTENSIONS_OID",
    "SGX_QE_MRSIGNER",
    "TD_QE_MRSIGNER",
    "FakeIntelPki",
    "QuoteRegions",
    "quote_regions",
    "mutation_failures",
    "FakeQuotingEnclave",
    "intel_name",
    "sgx_extensions_der",
    "sgx_report_body",
    "td_report_body",
]

SGX_EXTENSIONS_OID = "1.2.840.113741.1.13.1"
# Intel's production QE identities (from the vectors): SGX QE and TD QE MRSIGNER.
SGX_QE_MRSIGNER = bytes.fromhex("8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff")
TD_QE_MRSIGNER = bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5")


# --------------------------------------------------------------------------------------------
# A tiny DER encoder: just what the SGX Extensions need.


def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    digits = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(digits)]) + digits


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _len(len(body)) + body


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out.extend(reversed(chunk))
    return _tlv(0x06, bytes(out))


def _int(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")  # minimal, non-negative
    return _tlv(0x02, body)


def _seq(*items: bytes) -> bytes:
    return _tlv(0x30, b"".join(items))


def _entry(suffix: str, value: bytes) -> bytes:
    return _seq(_oid(f"{SGX_EXTENSIONS_OID}.{suffix}"), value)


def sgx_extensions_der(
    *,
    fmspc: bytes,
    pce_id: bytes,
    cpusvn: bytes,
    pcesvn: int,
    tcb_components: Sequence[int],
    ppid: bytes = bytes(16),
    sgx_type: int = 0,
    platform_instance_id: bytes | None = None,
    configuration: tuple[bool, bool, bool] | None = None,
) -> bytes:
    """The DER value of the SGX Extensions extension, in Intel's order and encodings."""
    if len(tcb_components) != 16:
        raise ValueError("tcb_components must have 16 SVNs")
    tcb = [_entry(f"2.{i + 1}", _int(svn)) for i, svn in enumerate(tcb_components)]
    tcb.append(_entry("2.17", _int(pcesvn)))
    tcb.append(_entry("2.18", _tlv(0x04, cpusvn)))
    items = [
        _entry("1", _tlv(0x04, ppid)),
        _entry("2", _seq(*tcb)),
        _entry("3", _tlv(0x04, pce_id)),
        _entry("4", _tlv(0x04, fmspc)),
        _entry("5", _tlv(0x0A, bytes([sgx_type]))),
    ]
    if platform_instance_id is not None:
        items.append(_entry("6", _tlv(0x04, platform_instance_id)))
    if configuration is not None:
        flags = [_entry(f"7.{i + 1}", _tlv(0x01, b"\xff" if on else b"\x00")) for i, on in enumerate(configuration)]
        items.append(_entry("7", _seq(*flags)))
    return _seq(*items)


# --------------------------------------------------------------------------------------------
# The PKI


def intel_name(common_name: str) -> x509.Name:
    """A subject like Intel's: CN first in the encoding (so RFC 4514 prints ``C=US,...,CN=...``)."""
    return x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Intel Corporation"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
    ])


def _key_usage(*, sign: bool, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=sign, content_commitment=sign and not ca, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def _certificate(subject: x509.Name, issuer: x509.Name, public_key: Any, signing_key: Any, *,
                 not_before: datetime, not_after: datetime, ca: bool, path_length: int | None,
                 extensions: Sequence[x509.ExtensionType] = ()) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(_key_usage(sign=True, ca=ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(signing_key, hashes.SHA256())


@dataclass
class FakeIntelPki:
    """Fake root -> Platform (or Processor) CA -> PCK leaf with SGX Extensions, valid around ``now``.

    Every ``*_not_before`` / ``*_not_after`` defaults to a window around ``now`` (root: ten years,
    CA: five, leaf: one)."""

    now: datetime
    processor: bool = False
    fmspc: bytes = bytes.fromhex("00906ed50000")
    pce_id: bytes = b"\x00\x00"
    cpusvn: bytes = bytes([4, 4, 3, 3, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    pcesvn: int = 11
    tcb_components: tuple[int, ...] | None = None   # default: the CPUSVN bytes, as Intel issues them
    root_not_before: datetime | None = None
    root_not_after: datetime | None = None
    ca_not_before: datetime | None = None
    ca_not_after: datetime | None = None
    leaf_not_before: datetime | None = None
    leaf_not_after: datetime | None = None
    root_key: ec.EllipticCurvePrivateKey = field(init=False, repr=False)
    ca_key: ec.EllipticCurvePrivateKey = field(init=False, repr=False)
    leaf_key: ec.EllipticCurvePrivateKey = field(init=False, repr=False)
    root: x509.Certificate = field(init=False, repr=False)
    ca: x509.Certificate = field(init=False, repr=False)
    leaf: x509.Certificate = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.tcb_components is None:
            self.tcb_components = tuple(self.cpusvn)
        day = timedelta(days=1)
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.leaf_key = ec.generate_private_key(ec.SECP256R1())
        root_name = intel_name("Intel SGX Root CA")
        self.root = _certificate(
            root_name, root_name, self.root_key.public_key(), self.root_key,
            not_before=self.root_not_before or self.now - 365 * day,
            not_after=self.root_not_after or self.now + 3650 * day, ca=True, path_length=1)
        self.ca = self.issue_ca()
        self.leaf = self.issue_leaf()

    @property
    def ca_name(self) -> str:
        return "Intel SGX PCK Processor CA" if self.processor else "Intel SGX PCK Platform CA"

    def issue_ca(self, **overrides: Any) -> x509.Certificate:
        day = timedelta(days=1)
        return _certificate(
            intel_name(overrides.get("name", self.ca_name)), self.root.subject, self.ca_key.public_key(),
            overrides.get("signing_key", self.root_key),
            not_before=self.ca_not_before or self.now - 180 * day,
            not_after=self.ca_not_after or self.now + 1825 * day, ca=True, path_length=0)

    def issue_leaf(self, *, extensions: bytes | None = None, name: str = "Intel SGX PCK Certificate",
                   signing_key: Any = None, public_key: Any = None) -> x509.Certificate:
        """A PCK leaf (the default one, or with other SGX Extensions DER / name / signer / key)."""
        day = timedelta(days=1)
        if extensions is None:
            extensions = sgx_extensions_der(
                fmspc=self.fmspc, pce_id=self.pce_id, cpusvn=self.cpusvn, pcesvn=self.pcesvn,
                tcb_components=self.tcb_components, ppid=hashlib.sha256(b"fake ppid").digest()[:16],
                sgx_type=0 if self.processor else 1,
                platform_instance_id=None if self.processor else bytes(range(16)),
                configuration=None if self.processor else (True, True, True),
            )
        return _certificate(
            intel_name(name), self.ca.subject, public_key or self.leaf_key.public_key(),
            signing_key or self.ca_key,
            not_before=self.leaf_not_before or self.now - 30 * day,
            not_after=self.leaf_not_after or self.now + 365 * day, ca=False, path_length=None,
            extensions=[x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_EXTENSIONS_OID), extensions)])

    @property
    def chain(self) -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
        return (self.leaf, self.ca, self.root)

    @property
    def root_sha256(self) -> bytes:
        return self.root.fingerprint(hashes.SHA256())

    def pem_chain(self, certs: Sequence[x509.Certificate] | None = None, *, nul: int = 0) -> bytes:
        """Certification data type 5: PEM leaf, CA, root (optionally NUL-terminated, as in TDX)."""
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (certs or self.chain))
        return pem + b"\x00" * nul

    def trust(self) -> TrustAnchors:
        """Trust anchors that pin this fake root for both sgx and tdx (and nothing else)."""
        return TrustAnchors({"sgx": frozenset({self.root_sha256}), "tdx": frozenset({self.root_sha256})})

    def crl(self, *, issuer: str = "ca", revoked: Sequence[x509.Certificate] = (),
            last_update: datetime | None = None, next_update: datetime | None = None,
            signing_key: Any = None) -> x509.CertificateRevocationList:
        """A CRL by the CA (``issuer="ca"``, the PCK CRL) or the root (``"root"``) revoking ``revoked``."""
        issuer_cert, key = (self.ca, self.ca_key) if issuer == "ca" else (self.root, self.root_key)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer_cert.subject)
            .last_update(last_update or self.now - timedelta(days=1))
            .next_update(next_update or self.now + timedelta(days=30))
        )
        for cert in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
                .revocation_date(self.now - timedelta(hours=1)).build())
        return builder.sign(signing_key or key, hashes.SHA256())


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


def _raw_signature(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


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
