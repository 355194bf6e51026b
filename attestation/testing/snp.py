"""A fake AMD in memory: ARK/ASK/ASVK per product, VCEKs and VLEKs, and signed SEV-SNP reports.

Everything has the shape of the real thing -- RSA-4096 ARK, ASK and ASVK signing with
RSASSA-PSS/SHA-384/salt 48, AMD's subject names (``ARK-<p>``, ``SEV-<p>``, ``SEV-VLEK-<p>``,
``SEV-VCEK``, ``SEV-VLEK``), EC P-384 VCEK/VLEK keys with the AMD extensions (SPLs, productName,
hwID or csp_id; Turin with structVersion 1, fmcSPL and no ``.3.4``), reports of version 2-5 --
but is rooted in fake ARKs whose fingerprints only :meth:`FakeAmd.trust` pins. Knobs let tests
build wrong things: other validity periods, mismatching TCB or hwID, masked chip IDs, foreign
signers.

RSA-4096 key generation takes about a second per key, so the three RSA keys (ARK, ASK, ASVK;
shared by the products, whose certificates differ) are generated once per process and cached.
"""

from __future__ import annotations

import secrets
import struct
import threading
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, UTC
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from attestation.snp.abi import PRODUCTS, REPORT_SIZE, SIGNED_SIZE, encode_tcb
from attestation.snp.kds import AMD_OID, AMD_PSS
from attestation.trust import TrustAnchors

__all__ = ["FakeAmd", "FakeEvidence", "ReportFields", "amd_name", "fake_rsa_key", "sign_report",
           "DEFAULT_CPUID"]

_KEYS: dict[str, rsa.RSAPrivateKey] = {}
_KEYS_LOCK = threading.Lock()

# A CPUID family/model/stepping per product for v3+ reports.
DEFAULT_CPUID = {"Milan": (0x19, 0x01, 0x01), "Genoa": (0x19, 0x11, 0x01), "Turin": (0x1A, 0x02, 0x00)}
_PRODUCT_NAME = {"Milan": "Milan-B0", "Genoa": "Genoa", "Turin": "Turin-B0"}


def fake_rsa_key(name: str) -> rsa.RSAPrivateKey:
    """A process-wide cached RSA-4096 key for role ``name`` ("ark", "ask", "asvk", or any other)."""
    with _KEYS_LOCK:
        key = _KEYS.get(name)
        if key is None:
            key = _KEYS[name] = rsa.generate_private_key(public_exponent=65537, key_size=4096)
        return key


def amd_name(common_name: str) -> x509.Name:
    """A subject in AMD's attribute order (OU, C, L, ST, O, CN)."""
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _der_int(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return b"\x02" + bytes([len(body)]) + body


def _der_ia5(text: str) -> bytes:
    body = text.encode("ascii")
    return b"\x16" + bytes([len(body)]) + body


def _ext(suffix: str, value: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(f"{AMD_OID}.{suffix}"), value)


def _sign_cert(builder: x509.CertificateBuilder, key: rsa.RSAPrivateKey) -> x509.Certificate:
    return builder.sign(key, hashes.SHA384(), rsa_padding=AMD_PSS)


@dataclass(frozen=True)
class ReportFields:
    """Every field of an ATTESTATION_REPORT; ``encode()`` gives the 672 signed bytes."""

    version: int = 3
    guest_svn: int = 1
    policy: int = (1 << 17) | (1 << 16)        # reserved-one bit and SMT allowed
    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    vmpl: int = 0
    signature_algo: int = 1
    current_tcb: int = 0
    platform_info: int = 1
    author_key_en: bool = False
    mask_chip_key: bool = False
    signing_key: int = 0                        # 0 VCEK, 1 VLEK, 7 none
    report_data: bytes = bytes(64)
    measurement: bytes = bytes(48)
    host_data: bytes = bytes(32)
    id_key_digest: bytes = bytes(48)
    author_key_digest: bytes = bytes(48)
    report_id: bytes = bytes(32)
    report_id_ma: bytes = b"\xff" * 32
    reported_tcb: int = 0
    cpuid: tuple[int, int, int] | None = None   # written for version >= 3
    chip_id: bytes = bytes(64)
    committed_tcb: int = 0
    current_version: tuple[int, int, int] = (1, 55, 40)   # major, minor, build
    committed_version: tuple[int, int, int] = (1, 55, 40)
    launch_tcb: int = 0
    launch_mit_vector: int = 0                  # written for version >= 4
    current_mit_vector: int = 0

    def encode(self) -> bytes:
        b = bytearray(SIGNED_SIZE)
        struct.pack_into("<IIQ", b, 0, self.version, self.guest_svn, self.policy)
        b[0x10:0x20] = self.family_id
        b[0x20:0x30] = self.image_id
        info = int(self.author_key_en) | (int(self.mask_chip_key) << 1) | (self.signing_key << 2)
        struct.pack_into("<IIQQI", b, 0x30, self.vmpl, self.signature_algo, self.current_tcb, self.platform_info, info)
        for offset, value, size in ((0x50, self.report_data, 64), (0x90, self.measurement, 48),
                                    (0xC0, self.host_data, 32), (0xE0, self.id_key_digest, 48),
                                    (0x110, self.author_key_digest, 48), (0x140, self.report_id, 32),
                                    (0x160, self.report_id_ma, 32), (0x1A0, self.chip_id, 64)):
            if len(value) != size:
                raise ValueError(f"report field at 0x{offset:x} must be {size} bytes")
            b[offset:offset + size] = value
        struct.pack_into("<Q", b, 0x180, self.reported_tcb)
        if self.version >= 3 and self.cpuid is not None:
            b[0x188:0x18B] = bytes(self.cpuid)
        struct.pack_into("<Q", b, 0x1E0, self.committed_tcb)
        major, minor, build = self.current_version
        b[0x1E8:0x1EB] = bytes([build, minor, major])
        major, minor, build = self.committed_version
        b[0x1EC:0x1EF] = bytes([build, minor, major])
        struct.pack_into("<Q", b, 0x1F0, self.launch_tcb)
        if self.version >= 4:
            struct.pack_into("<QQ", b, 0x1F8, self.launch_mit_vector, self.current_mit_vector)
        return bytes(b)


def sign_report(signed: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """The 1184-byte report: ``signed`` (672 bytes) plus AMD's signature format (R, S little-endian)."""
    if len(signed) != SIGNED_SIZE:
        raise ValueError(f"the signed part of a report is {SIGNED_SIZE} bytes")
    r, s = decode_dss_signature(key.sign(signed, ec.ECDSA(hashes.SHA384())))
    signature = r.to_bytes(72, "little") + s.to_bytes(72, "little")
    return signed + signature + bytes(REPORT_SIZE - SIGNED_SIZE - len(signature))


@dataclass(frozen=True)
class FakeEvidence:
    """A signed report and the certificates that verify it (leaf, issuer, ARK)."""

    report: bytes
    leaf: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey
    issuer: x509.Certificate
    ark: x509.Certificate
    fields: ReportFields
    product: str

    @property
    def certs(self) -> tuple[x509.Certificate, ...]:
        return (self.leaf, self.issuer, self.ark)


@dataclass
class _ProductChain:
    ark: x509.Certificate
    ask: x509.Certificate
    asvk: x509.Certificate


@dataclass
class FakeAmd:
    """Fake ARK/ASK/ASVK for each product, valid from ``now - 30 days`` to ``now + days``."""

    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    days: int = 3650
    products: tuple[str, ...] = PRODUCTS
    _chains: dict[str, _ProductChain] = field(init=False, repr=False)
    _leaves: dict[tuple, tuple[x509.Certificate, ec.EllipticCurvePrivateKey]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._chains = {p: self._build_chain(p) for p in self.products}
        self._leaves = {}

    # -- CA certificates ----------------------------------------------------------------------

    @property
    def not_before(self) -> datetime:
        return self.now - timedelta(days=30)

    @property
    def not_after(self) -> datetime:
        return self.now + timedelta(days=self.days)

    def _ca_builder(self, subject: x509.Name, issuer: x509.Name, key: rsa.RSAPrivateKey, *,
                    path_length: int | None, serial: int) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(self.not_before)
            .not_valid_after(self.not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, path_length is None,
                                         False, False), critical=True)
        )

    def _build_chain(self, product: str) -> _ProductChain:
        ark_key, ask_key, asvk_key = fake_rsa_key("ark"), fake_rsa_key("ask"), fake_rsa_key("asvk")
        ark_name = amd_name(f"ARK-{product}")
        ark = _sign_cert(self._ca_builder(ark_name, ark_name, ark_key, path_length=None,
                                          serial=secrets.randbits(63) | 1), ark_key)
        ask = _sign_cert(self._ca_builder(amd_name(f"SEV-{product}"), ark_name, ask_key, path_length=0,
                                          serial=secrets.randbits(63) | 1), ark_key)
        asvk = _sign_cert(self._ca_builder(amd_name(f"SEV-VLEK-{product}"), ark_name, asvk_key, path_length=0,
                                           serial=secrets.randbits(63) | 1), ark_key)
        return _ProductChain(ark, ask, asvk)

    def ark(self, product: str) -> x509.Certificate:
        return self._chains[product].ark

    def ask(self, product: str) -> x509.Certificate:
        return self._chains[product].ask

    def asvk(self, product: str) -> x509.Certificate:
        return self._chains[product].asvk

    def issuer(self, product: str, signing_key: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
        """The ASK (``signing_key`` "vcek") or ASVK ("vlek") of ``product`` and its private key."""
        if signing_key == "vcek":
            return self.ask(product), fake_rsa_key("ask")
        if signing_key == "vlek":
            return self.asvk(product), fake_rsa_key("asvk")
        raise ValueError(f"signing_key must be 'vcek' or 'vlek', not {signing_key!r}")

    def crl(self, product: str = "Milan", *, issuer: str = "ark", revoked: Iterable[x509.Certificate | int] = (),
            last_update: datetime | None = None, next_update: datetime | None = None,
            signing_key: rsa.RSAPrivateKey | None = None) -> x509.CertificateRevocationList:
        """A CRL as AMD KDS serves it (``/vcek/v1/<product>/crl``): issued and signed (RSASSA-PSS,
        SHA-384) by ``product``'s ARK (``issuer="ark"``; ``"ask"`` / ``"asvk"`` for the
        intermediates), revoking ``revoked`` (certificates or serial numbers), valid from ``now`` -
        1 day for 7 days unless told otherwise; ``signing_key`` forges the signature."""
        certs = {"ark": (self.ark(product), "ark"), "ask": (self.ask(product), "ask"),
                 "asvk": (self.asvk(product), "asvk")}
        if issuer not in certs:
            raise ValueError(f"issuer must be 'ark', 'ask' or 'asvk', not {issuer!r}")
        cert, key_name = certs[issuer]
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(cert.subject)
            .last_update(last_update or self.now - timedelta(days=1))
            .next_update(next_update or self.now + timedelta(days=7))
        )
        for item in revoked:
            serial = item if isinstance(item, int) else item.serial_number
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(self.now - timedelta(hours=1)).build())
        return builder.sign(signing_key or fake_rsa_key(key_name), hashes.SHA384(), rsa_padding=AMD_PSS)

    def trust(self) -> TrustAnchors:
        """Trust anchors that pin exactly this fake AMD's ARKs for "snp"."""
        return TrustAnchors({"snp": frozenset(c.ark.fingerprint(hashes.SHA256()) for c in self._chains.values())})

    # -- VCEK / VLEK --------------------------------------------------------------------------

    def endorsement_cert(
        self,
        product: str,
        signing_key: str = "vcek",
        *,
        tcb: dict[str, int] | None = None,
        chip_id: bytes | None = None,
        hwid: bytes | None = None,
        hwid_encoding: str = "raw",
        csp_id: str = "CN=cc.example.test",
        product_name: str | None = None,
        public_key: ec.EllipticCurvePublicKey | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        issuer: tuple[x509.Certificate, rsa.RSAPrivateKey] | None = None,
        reserved_spl: Iterable[int] | None = None,
        drop: Iterable[str] = (),
    ) -> x509.Certificate:
        """A VCEK (``signing_key`` "vcek": hwID = ``hwid`` or ``chip_id``; Turin uses its first 8
        bytes) or VLEK ("vlek": csp_id) for ``public_key``, with SPLs from ``tcb``. ``drop``
        names AMD extension suffixes to leave out (e.g. "3.8")."""
        tcb = dict(tcb or {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115})
        turin = product == "Turin"
        spl = {"3.1": tcb["bootloader"], "3.2": tcb["tee"], "3.3": tcb["snp"], "3.8": tcb["microcode"]}
        reserved = list(reserved_spl) if reserved_spl is not None else ([0, 0, 0] if turin else [0, 0, 0, 0])
        for suffix, value in zip(("3.5", "3.6", "3.7") if turin else ("3.4", "3.5", "3.6", "3.7"), reserved):
            spl[suffix] = value
        if turin:
            spl["3.9"] = tcb.get("fmc", 0)
        extensions = [_ext("1", _der_int(1 if turin else 0)),
                      _ext("2", _der_ia5(product_name or _PRODUCT_NAME.get(product, product)))]
        extensions += [_ext(k, _der_int(v)) for k, v in spl.items()]
        if signing_key == "vcek":
            hw = hwid if hwid is not None else (chip_id if chip_id is not None else bytes(64))
            if turin and hwid is None:
                hw = hw[:8]
            extensions.append(_ext("4", hw if hwid_encoding == "raw" else b"\x04" + bytes([len(hw)]) + hw))
        else:
            extensions.append(_ext("5", _der_ia5(csp_id)))
        extensions = [e for e in extensions if e.oid.dotted_string[len(AMD_OID) + 1:] not in set(drop)]
        issuer_cert, issuer_key = issuer or self.issuer(product, signing_key)
        key = public_key or ec.generate_private_key(ec.SECP384R1()).public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(amd_name("SEV-VCEK" if signing_key == "vcek" else "SEV-VLEK"))
            .issuer_name(issuer_cert.subject)
            .public_key(key)
            .serial_number(secrets.randbits(63) | 1)
            .not_valid_before(not_before or self.not_before)
            .not_valid_after(not_after or self.now + timedelta(days=7 * 365))
        )
        for ext in extensions:
            builder = builder.add_extension(ext, critical=False)
        return _sign_cert(builder, issuer_key)

    def _leaf(self, product: str, signing_key: str, tcb: dict[str, int], chip_id: bytes
              ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cache_key = (product, signing_key, tuple(sorted(tcb.items())), chip_id)
        hit = self._leaves.get(cache_key)
        if hit is None:
            key = ec.generate_private_key(ec.SECP384R1())
            cert = self.endorsement_cert(product, signing_key, tcb=tcb, chip_id=chip_id, public_key=key.public_key())
            hit = self._leaves[cache_key] = (cert, key)
        return hit

    # -- reports ------------------------------------------------------------------------------

    def evidence(
        self,
        product: str = "Milan",
        signing_key: str = "vcek",
        *,
        tcb: dict[str, int] | None = None,
        chip_id: bytes | None = None,
        leaf: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
        trailing: bytes = b"",
        raw_signing_key: int | None = None,
        **fields,
    ) -> FakeEvidence:
        """A signed report for ``product`` with any :class:`ReportFields` overridden by ``fields``.

        By default the VCEK/VLEK is cached per (product, key kind, TCB, chip id) and the
        report's REPORTED_TCB, CHIP_ID and CPUID (v3+) agree with it; pass ``leaf`` (certificate
        and key) to sign with something else, or override ``reported_tcb`` / ``chip_id`` /
        ``cpuid`` in ``fields`` to disagree. ``raw_signing_key`` overrides the report's
        SIGNING_KEY field (e.g. 7, "none") while ``signing_key`` picks the certificate kind.
        """
        tcb = dict(tcb or ({"fmc": 1, "bootloader": 3, "tee": 0, "snp": 8, "microcode": 115} if product == "Turin"
                           else {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}))
        if chip_id is None:
            if signing_key == "vlek":
                chip_id = bytes(64)
            else:
                chip_id = (b"\x5a" * 8 + bytes(56)) if product == "Turin" else bytes(range(64))
        cert, key = leaf or self._leaf(product, signing_key, tcb, chip_id)
        raw_tcb = encode_tcb(tcb, product)
        base = ReportFields(
            signing_key=raw_signing_key if raw_signing_key is not None else (0 if signing_key == "vcek" else 1),
            reported_tcb=raw_tcb, current_tcb=raw_tcb, committed_tcb=raw_tcb, launch_tcb=raw_tcb,
            chip_id=chip_id, cpuid=DEFAULT_CPUID.get(product),
        )
        report_fields = replace(base, **fields)
        report = sign_report(report_fields.encode(), key) + trailing
        issuer_cert, _ = self.issuer(product, signing_key)
        return FakeEvidence(report=report, leaf=cert, leaf_key=key, issuer=issuer_cert, ark=self.ark(product),
                            fields=report_fields, product=product)
