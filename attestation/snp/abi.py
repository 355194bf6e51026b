"""AMD SEV-SNP ATTESTATION_REPORT: bytes -> frozen dataclasses, and nothing else.

Layout: *SEV Secure Nested Paging Firmware ABI Specification* (AMD #56860), table
"ATTESTATION_REPORT Structure". All integers are little-endian. The report is 0x4A0 = 1184
bytes; the signature covers bytes [0, 0x2A0) and sits at 0x2A0 as ECDSA P-384 R and S, each a
little-endian integer zero-extended to 72 bytes, followed by reserved bytes up to 0x4A0.

What this module guarantees: :func:`parse_report` returns an :class:`AttestationReport` or
raises :class:`EvidenceMalformed` -- for *any* input. It checks the format (size, a supported
VERSION, SIGNATURE_ALGO 1, must-be-one / must-be-zero bits and reserved ranges of the version it
parses), never authenticity or policy (that is :mod:`attestation.snp.verify` and
:mod:`attestation.snp.validate`).

Versions: 2 (the base layout), 3 (adds CPUID_FAM_ID / CPUID_MOD_ID / CPUID_STEP at 0x188), 4 and
5 (LAUNCH_MIT_VECTOR at 0x1F8 and CURRENT_MIT_VECTOR at 0x200; public sources disagree on
whether 4 or 5 introduced them, so both are read from version 4 on -- they are zero when
absent). Anything else is refused: an unknown version may move fields this parser would then
misread.

Bytes after the 1184-byte report (an extended report's certificate table, padding...) are
outside the signature: they are counted in ``trailing_bytes`` and otherwise ignored.

TCB_VERSION (8 bytes) is product-specific, so reports keep it raw (``int``) and
:func:`decode_tcb` splits it once the product is known:

- Milan, Genoa: byte 0 BOOT_LOADER, 1 TEE, 2-5 reserved, 6 SNP, 7 MICROCODE;
- Turin:        byte 0 FMC, 1 BOOT_LOADER, 2 TEE, 3 SNP, 4-6 reserved, 7 MICROCODE.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from attestation.errors import EvidenceMalformed

__all__ = [
    "REPORT_SIZE",
    "SIGNED_SIZE",
    "SIGNATURE_OFFSET",
    "SUPPORTED_VERSIONS",
    "PRODUCTS",
    "MAX_EVIDENCE_BYTES",
    "SIGNING_KEY_VCEK",
    "SIGNING_KEY_VLEK",
    "SIGNING_KEY_NONE",
    "GuestPolicy",
    "SignerInfo",
    "TcbParts",
    "AttestationReport",
    "parse_report",
    "decode_tcb",
    "encode_tcb",
    "product_from_cpuid",
]

REPORT_SIZE = 0x4A0          # 1184
SIGNED_SIZE = 0x2A0          # 672: the signature covers [0, SIGNED_SIZE)
SIGNATURE_OFFSET = 0x2A0
_R_OFFSET, _S_OFFSET, _RS_SIZE = 0x2A0, 0x2E8, 72
_SIG_RESERVED = (0x330, REPORT_SIZE)
SUPPORTED_VERSIONS = (2, 3, 4, 5)
SIGNATURE_ALGO_ECDSA_P384_SHA384 = 1
# Bound on what is accepted as "report plus trailing bytes" (an extended report's certificate
# table is a few kilobytes); anything larger is refused before it is looked at.
MAX_EVIDENCE_BYTES = 64 * 1024

PRODUCTS = ("Milan", "Genoa", "Turin")

SIGNING_KEY_VCEK = 0
SIGNING_KEY_VLEK = 1
SIGNING_KEY_NONE = 7
_SIGNING_KEY_NAMES = {SIGNING_KEY_VCEK: "vcek", SIGNING_KEY_VLEK: "vlek", SIGNING_KEY_NONE: "none"}

# Guest POLICY bits (AMD #56860, "Guest Policy").
_POLICY_SMT = 1 << 16
_POLICY_RESERVED_ONE = 1 << 17
_POLICY_MIGRATE_MA = 1 << 18
_POLICY_DEBUG = 1 << 19
_POLICY_SINGLE_SOCKET = 1 << 20
_POLICY_CXL_ALLOW = 1 << 21
_POLICY_MEM_AES_256_XTS = 1 << 22
_POLICY_RAPL_DIS = 1 << 23
_POLICY_CIPHERTEXT_HIDING = 1 << 24
_POLICY_PAGE_SWAP_DISABLE = 1 << 25
_POLICY_DEFINED = (1 << 26) - 1


@dataclass(frozen=True)
class GuestPolicy:
    """The guest POLICY the VM was launched with (fixed at launch, enforced by the firmware)."""

    raw: int
    abi_minor: int
    abi_major: int
    smt: bool                 # bit 16: SMT may be enabled on the host
    migrate_ma: bool          # bit 18: a migration agent may be associated
    debug: bool               # bit 19: the host may debug (decrypt) the guest
    single_socket: bool       # bit 20
    cxl_allow: bool           # bit 21
    mem_aes_256_xts: bool     # bit 22
    rapl_dis: bool            # bit 23
    ciphertext_hiding: bool   # bit 24
    page_swap_disable: bool   # bit 25

    @classmethod
    def from_raw(cls, raw: int) -> GuestPolicy:
        return cls(
            raw=raw,
            abi_minor=raw & 0xFF,
            abi_major=(raw >> 8) & 0xFF,
            smt=bool(raw & _POLICY_SMT),
            migrate_ma=bool(raw & _POLICY_MIGRATE_MA),
            debug=bool(raw & _POLICY_DEBUG),
            single_socket=bool(raw & _POLICY_SINGLE_SOCKET),
            cxl_allow=bool(raw & _POLICY_CXL_ALLOW),
            mem_aes_256_xts=bool(raw & _POLICY_MEM_AES_256_XTS),
            rapl_dis=bool(raw & _POLICY_RAPL_DIS),
            ciphertext_hiding=bool(raw & _POLICY_CIPHERTEXT_HIDING),
            page_swap_disable=bool(raw & _POLICY_PAGE_SWAP_DISABLE),
        )


@dataclass(frozen=True)
class SignerInfo:
    """The word at 0x48: AUTHOR_KEY_EN (bit 0), MASK_CHIP_KEY (bit 1), SIGNING_KEY (bits 2-4)."""

    raw: int
    author_key_en: bool
    mask_chip_key: bool
    signing_key: int          # 0 VCEK, 1 VLEK, 7 none

    @property
    def signing_key_name(self) -> str:
        return _SIGNING_KEY_NAMES[self.signing_key]


@dataclass(frozen=True)
class TcbParts:
    """One TCB_VERSION split into its security patch levels (SPLs) for a given product.

    ``fmc`` exists on Turin only (None elsewhere). ``reserved`` holds the reserved bytes in
    order (Milan/Genoa bytes 2-5, Turin bytes 4-6); they correspond to the VCEK's reserved
    SPL extensions and take part in the exact comparison with the certificate.
    """

    product: str
    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None
    reserved: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, int]:
        """``{bootloader, tee, snp, microcode}`` plus ``fmc`` on Turin: the claims' ``reported_tcb``."""
        parts = {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp, "microcode": self.microcode}
        if self.fmc is not None:
            parts["fmc"] = self.fmc
        return parts

    @property
    def raw(self) -> int:
        return encode_tcb(self.as_dict(), self.product, reserved=self.reserved)


def decode_tcb(raw: int, product: str) -> TcbParts:
    """Split a raw TCB_VERSION for ``product`` ("Milan", "Genoa" or "Turin"); ValueError otherwise."""
    b = raw.to_bytes(8, "little")
    if product in ("Milan", "Genoa"):
        return TcbParts(product, bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7], reserved=tuple(b[2:6]))
    if product == "Turin":
        return TcbParts(product, fmc=b[0], bootloader=b[1], tee=b[2], snp=b[3], microcode=b[7],
                        reserved=tuple(b[4:7]))
    raise ValueError(f"unknown SEV-SNP product {product!r}; known: {', '.join(PRODUCTS)}")


def encode_tcb(parts: dict[str, int], product: str, *, reserved: tuple[int, ...] = ()) -> int:
    """The raw TCB_VERSION of ``parts`` (``bootloader``, ``tee``, ``snp``, ``microcode`` and, on
    Turin, ``fmc``; each 0..255) for ``product``. ValueError on a bad product or value."""
    def byte(name: str, default: int | None = None) -> int:
        value = parts.get(name, default)
        if type(value) is not int or not 0 <= value <= 255:
            raise ValueError(f"TCB part {name} must be an integer 0..255, got {value!r}")
        return value

    if product in ("Milan", "Genoa"):
        res = tuple(reserved) or (0, 0, 0, 0)
        if len(res) != 4:
            raise ValueError("Milan/Genoa TCB has 4 reserved bytes")
        b = bytes([byte("bootloader"), byte("tee"), *res, byte("snp"), byte("microcode")])
    elif product == "Turin":
        res = tuple(reserved) or (0, 0, 0)
        if len(res) != 3:
            raise ValueError("Turin TCB has 3 reserved bytes")
        b = bytes([byte("fmc", 0), byte("bootloader"), byte("tee"), byte("snp"), *res, byte("microcode")])
    else:
        raise ValueError(f"unknown SEV-SNP product {product!r}; known: {', '.join(PRODUCTS)}")
    return int.from_bytes(b, "little")


def product_from_cpuid(family: int, model: int) -> str | None:
    """The SEV-SNP product line of a CPUID family/model as reported in v3+ reports, or None.

    Family 0x19 (Zen 3/4): models 0x00-0x0F Milan, 0x10-0x1F and 0xA0-0xAF Genoa (Genoa,
    Bergamo, Siena share the Genoa ARK). Family 0x1A (Zen 5): models 0x00-0x11 Turin.
    """
    if family == 0x19:
        if model <= 0x0F:
            return "Milan"
        if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:
            return "Genoa"
    if family == 0x1A and model <= 0x11:
        return "Turin"
    return None


@dataclass(frozen=True)
class AttestationReport:
    """A parsed ATTESTATION_REPORT. TCB fields are raw TCB_VERSION values (see :func:`decode_tcb`).

    ``signed_bytes`` is exactly what the signature covers (bytes [0, 0x2A0)); ``signature_r`` /
    ``signature_s`` are the decoded little-endian integers. ``cpuid_*`` are None before
    version 3 and ``*_mit_vector`` None before version 4.
    """

    version: int
    guest_svn: int
    policy: GuestPolicy
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: int
    platform_info: int
    signer_info: SignerInfo
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    cpuid_fam_id: int | None
    cpuid_mod_id: int | None
    cpuid_step: int | None
    chip_id: bytes
    committed_tcb: int
    current_build: int
    current_minor: int
    current_major: int
    committed_build: int
    committed_minor: int
    committed_major: int
    launch_tcb: int
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature_r: int
    signature_s: int
    signed_bytes: bytes
    trailing_bytes: int = 0

    @property
    def signing_key(self) -> str:
        """"vcek", "vlek" or "none"."""
        return self.signer_info.signing_key_name

    @property
    def cpuid_product(self) -> str | None:
        """The product line the signed CPUID fields name (v3+), or None."""
        if self.cpuid_fam_id is None or (self.cpuid_fam_id == 0 and self.cpuid_mod_id == 0):
            return None
        return product_from_cpuid(self.cpuid_fam_id, self.cpuid_mod_id or 0)


def _u32(data: bytes, offset: int) -> int:
    return struct.unpack_from("<I", data, offset)[0]


def _u64(data: bytes, offset: int) -> int:
    return struct.unpack_from("<Q", data, offset)[0]


def _mbz(data: bytes, start: int, end: int, what: str) -> None:
    chunk = data[start:end]
    if chunk.count(0) != len(chunk):
        first = next(i for i, b in enumerate(chunk) if b)
        raise EvidenceMalformed(
            f"SEV-SNP report {what} (bytes 0x{start:x}..0x{end:x}) must be zero; byte 0x{start + first:x} "
            f"is 0x{chunk[first]:02x}"
        )


def parse_report(data: Any) -> AttestationReport:
    """Parse an SEV-SNP attestation report (1184 bytes, optionally followed by unsigned bytes).

    Raises :class:`EvidenceMalformed` -- never anything else -- on any input that is not one.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise EvidenceMalformed(f"SEV-SNP report must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) < REPORT_SIZE:
        raise EvidenceMalformed(
            f"SEV-SNP report is {len(data)} bytes; an ATTESTATION_REPORT is {REPORT_SIZE} (0x{REPORT_SIZE:x}) bytes"
        )
    if len(data) > MAX_EVIDENCE_BYTES:
        raise EvidenceMalformed(f"SEV-SNP evidence is {len(data)} bytes; at most {MAX_EVIDENCE_BYTES} are accepted")
    trailing = len(data) - REPORT_SIZE
    rep = data[:REPORT_SIZE]

    version = _u32(rep, 0x00)
    if version not in SUPPORTED_VERSIONS:
        raise EvidenceMalformed(
            f"SEV-SNP report VERSION {version} is not supported (supported: "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}); is this an SEV-SNP attestation report?"
        )
    policy_raw = _u64(rep, 0x08)
    if not policy_raw & _POLICY_RESERVED_ONE:
        raise EvidenceMalformed("SEV-SNP report POLICY bit 17 is reserved and must be 1; it is 0")
    if policy_raw & ~_POLICY_DEFINED:
        raise EvidenceMalformed(f"SEV-SNP report POLICY 0x{policy_raw:x} sets reserved bits 26-63")
    signature_algo = _u32(rep, 0x34)
    if signature_algo != SIGNATURE_ALGO_ECDSA_P384_SHA384:
        raise EvidenceMalformed(
            f"SEV-SNP report SIGNATURE_ALGO is {signature_algo}; only 1 (ECDSA P-384 with SHA-384) is defined"
        )
    info_raw = _u32(rep, 0x48)
    if info_raw >> 5:
        raise EvidenceMalformed(f"SEV-SNP report signer info 0x{info_raw:x} sets reserved bits 5-31")
    signing_key = (info_raw >> 2) & 7
    if signing_key not in _SIGNING_KEY_NAMES:
        raise EvidenceMalformed(f"SEV-SNP report SIGNING_KEY {signing_key} is reserved (0 VCEK, 1 VLEK, 7 none)")
    signer_info = SignerInfo(raw=info_raw, author_key_en=bool(info_raw & 1), mask_chip_key=bool(info_raw & 2),
                             signing_key=signing_key)
    _mbz(rep, 0x4C, 0x50, "reserved field")
    vmpl = _u32(rep, 0x30)
    if vmpl > 3:
        raise EvidenceMalformed(f"SEV-SNP report VMPL is {vmpl}; VMPLs are 0..3")

    cpuid: tuple[int | None, int | None, int | None]
    if version >= 3:
        cpuid = (rep[0x188], rep[0x189], rep[0x18A])
        _mbz(rep, 0x18B, 0x1A0, "reserved field after CPUID")
    else:
        cpuid = (None, None, None)
        _mbz(rep, 0x188, 0x1A0, "reserved field (version 2)")
    _mbz(rep, 0x1EB, 0x1EC, "reserved byte after CURRENT_MAJOR")
    _mbz(rep, 0x1EF, 0x1F0, "reserved byte after COMMITTED_MAJOR")
    mit: tuple[int | None, int | None]
    if version >= 4:
        mit = (_u64(rep, 0x1F8), _u64(rep, 0x200))
        _mbz(rep, 0x208, SIGNED_SIZE, "reserved field")
    else:
        mit = (None, None)
        _mbz(rep, 0x1F8, SIGNED_SIZE, "reserved field")
    # Outside the signed bytes, so a change here could not be detected by the signature: the
    # signature structure's reserved tail must be zero, and R and S fit P-384 (48 bytes).
    _mbz(rep, *_SIG_RESERVED, "signature reserved field")
    _mbz(rep, _R_OFFSET + 48, _R_OFFSET + _RS_SIZE, "signature R high bytes (P-384 R is 48 bytes)")
    _mbz(rep, _S_OFFSET + 48, _S_OFFSET + _RS_SIZE, "signature S high bytes (P-384 S is 48 bytes)")

    return AttestationReport(
        version=version,
        guest_svn=_u32(rep, 0x04),
        policy=GuestPolicy.from_raw(policy_raw),
        family_id=rep[0x10:0x20],
        image_id=rep[0x20:0x30],
        vmpl=vmpl,
        signature_algo=signature_algo,
        current_tcb=_u64(rep, 0x38),
        platform_info=_u64(rep, 0x40),
        signer_info=signer_info,
        report_data=rep[0x50:0x90],
        measurement=rep[0x90:0xC0],
        host_data=rep[0xC0:0xE0],
        id_key_digest=rep[0xE0:0x110],
        author_key_digest=rep[0x110:0x140],
        report_id=rep[0x140:0x160],
        report_id_ma=rep[0x160:0x180],
        reported_tcb=_u64(rep, 0x180),
        cpuid_fam_id=cpuid[0],
        cpuid_mod_id=cpuid[1],
        cpuid_step=cpuid[2],
        chip_id=rep[0x1A0:0x1E0],
        committed_tcb=_u64(rep, 0x1E0),
        current_build=rep[0x1E8],
        current_minor=rep[0x1E9],
        current_major=rep[0x1EA],
        committed_build=rep[0x1EC],
        committed_minor=rep[0x1ED],
        committed_major=rep[0x1EE],
        launch_tcb=_u64(rep, 0x1F0),
        launch_mit_vector=mit[0],
        current_mit_vector=mit[1],
        signature_r=int.from_bytes(rep[_R_OFFSET:_R_OFFSET + _RS_SIZE], "little"),
        signature_s=int.from_bytes(rep[_S_OFFSET:_S_OFFSET + _RS_SIZE], "little"),
        signed_bytes=rep[:SIGNED_SIZE],
        trailing_bytes=trailing,
    )
