"""The SGX Extensions of an Intel PCK certificate: FMSPC, PCE-ID, TCB component SVNs, PCESVN, CPUSVN.

Intel's *SGX PCK Certificate and CRL Profile Specification* puts everything the TCB
evaluation needs into one non-critical X.509 extension, OID ``1.2.840.113741.1.13.1``, whose value
is a DER ``SEQUENCE OF SEQUENCE { OID, value }``::

    .1   PPID                 OCTET STRING (16)
    .2   TCB                  SEQUENCE OF SEQUENCE { OID, value }
         .2.1 – .2.16           SGX TCB component SVNs, INTEGER 0..255
         .2.17                  PCESVN, INTEGER 0..65535
         .2.18                  CPUSVN, OCTET STRING (16)
    .3   PCE-ID               OCTET STRING (2)
    .4   FMSPC                OCTET STRING (6)
    .5   SGX Type             ENUMERATED (0 Standard, 1 Scalable, 2 Scalable with integrity)
    .6   PlatformInstanceID   OCTET STRING (16)            (Platform CA certificates only)
    .7   Configuration        SEQUENCE OF SEQUENCE { OID, BOOLEAN }: .7.1 dynamicPlatform,
                              .7.2 cachedKeys, .7.3 SMTEnabled   (Platform CA certificates only)

No ASN.1 library is installed in the project, so :class:`DerReader` below is a small strict DER
reader: definite lengths in minimal form only, no trailing bytes, minimal INTEGER encodings,
expected tags. Every problem is :class:`EvidenceMalformed`; nothing else escapes (the hypothesis
tests feed it arbitrary bytes). Unknown OIDs are ignored (forward compatibility); a known OID that
appears twice is malformed (two different FMSPCs must never be silently resolved).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from ..errors import EvidenceMalformed

__all__ = [
    "SGX_EXTENSIONS_OID",
    "PckExtensions",
    "parse_pck_extensions",
    "parse_sgx_extensions",
    "DerReader",
]

SGX_EXTENSIONS_OID = "1.2.840.113741.1.13.1"
_ROOT = SGX_EXTENSIONS_OID

TAG_BOOLEAN = 0x01
TAG_INTEGER = 0x02
TAG_OCTET_STRING = 0x04
TAG_OID = 0x06
TAG_ENUMERATED = 0x0A
TAG_SEQUENCE = 0x30

_MAX_DEPTH = 8  # the structure is three levels deep; anything deeper is not a PCK extension


@dataclass(frozen=True)
class PckExtensions:
    """The SGX Extensions of one PCK certificate (all byte strings as they appear in the DER)."""

    fmspc: bytes                      # 6 bytes
    pce_id: bytes                     # 2 bytes
    cpusvn: bytes                     # 16 bytes
    pcesvn: int
    tcb_components: tuple[int, ...]   # 16 SVNs, component 01 first
    sgx_type: int | None              # 0 Standard, 1 Scalable, 2 Scalable with integrity; None if absent
    ppid: bytes | None = None         # 16 bytes
    platform_instance_id: bytes | None = None
    dynamic_platform: bool | None = None
    cached_keys: bool | None = None
    smt_enabled: bool | None = None


class DerReader:
    """Reads consecutive DER TLVs from ``data[pos:end]``. Strict: see the module docstring."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def at_end(self) -> bool:
        return self.pos >= self.end

    def read_tlv(self) -> tuple[int, int, int]:
        """Return (tag, value_start, value_end) and advance past the element."""
        data, pos, end = self.data, self.pos, self.end
        if pos + 2 > end:
            raise EvidenceMalformed("DER: truncated element header")
        tag = data[pos]
        if tag & 0x1F == 0x1F:
            raise EvidenceMalformed("DER: multi-byte tags are not used by the SGX extensions")
        first = data[pos + 1]
        pos += 2
        if first < 0x80:
            length = first
        elif first == 0x80:
            raise EvidenceMalformed("DER: indefinite length is not DER")
        else:
            count = first & 0x7F
            if count > 4:
                raise EvidenceMalformed("DER: length field too long")
            if pos + count > end:
                raise EvidenceMalformed("DER: truncated length")
            length = int.from_bytes(data[pos:pos + count], "big")
            if data[pos] == 0 or length < 0x80:
                raise EvidenceMalformed("DER: length not minimally encoded")
            pos += count
        if pos + length > end:
            raise EvidenceMalformed("DER: element runs past its container")
        self.pos = pos + length
        return tag, pos, pos + length

    def expect(self, tag: int, what: str) -> tuple[int, int]:
        got, start, stop = self.read_tlv()
        if got != tag:
            raise EvidenceMalformed(f"DER: {what}: expected tag 0x{tag:02x}, got 0x{got:02x}")
        return start, stop

    def sequence(self, what: str) -> DerReader:
        start, stop = self.expect(TAG_SEQUENCE, what)
        return DerReader(self.data, start, stop)

    def oid(self, what: str) -> str:
        start, stop = self.expect(TAG_OID, what)
        return decode_oid(self.data[start:stop])

    def octets(self, what: str) -> bytes:
        start, stop = self.expect(TAG_OCTET_STRING, what)
        return bytes(self.data[start:stop])

    def integer(self, what: str, tag: int = TAG_INTEGER) -> int:
        start, stop = self.expect(tag, what)
        return decode_integer(self.data[start:stop], what)

    def boolean(self, what: str) -> bool:
        start, stop = self.expect(TAG_BOOLEAN, what)
        if stop - start != 1 or self.data[start] not in (0x00, 0xFF):
            raise EvidenceMalformed(f"DER: {what}: BOOLEAN must be one byte 00 or ff")
        return self.data[start] == 0xFF

    def finish(self, what: str) -> None:
        if self.pos != self.end:
            raise EvidenceMalformed(f"DER: {self.end - self.pos} unexpected trailing bytes after {what}")


def decode_oid(body: bytes) -> str:
    if not body:
        raise EvidenceMalformed("DER: empty OBJECT IDENTIFIER")
    if body[-1] & 0x80:
        raise EvidenceMalformed("DER: truncated OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    fresh = True
    for byte in body:
        if fresh and byte == 0x80:
            raise EvidenceMalformed("DER: OBJECT IDENTIFIER arc not minimally encoded")
        value = (value << 7) | (byte & 0x7F)
        fresh = not (byte & 0x80)
        if fresh:
            arcs.append(value)
            value = 0
        elif value > (1 << 64):
            raise EvidenceMalformed("DER: OBJECT IDENTIFIER arc too large")
    first = arcs[0]
    if first < 40:
        head = [0, first]
    elif first < 80:
        head = [1, first - 40]
    else:
        head = [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def decode_integer(body: bytes, what: str) -> int:
    if not body:
        raise EvidenceMalformed(f"DER: {what}: empty INTEGER")
    if len(body) > 1 and ((body[0] == 0x00 and body[1] < 0x80) or (body[0] == 0xFF and body[1] >= 0x80)):
        raise EvidenceMalformed(f"DER: {what}: INTEGER not minimally encoded")
    if len(body) > 9:
        raise EvidenceMalformed(f"DER: {what}: INTEGER too large")
    return int.from_bytes(body, "big", signed=True)


def _svn(value: int, maximum: int, what: str) -> int:
    if not 0 <= value <= maximum:
        raise EvidenceMalformed(f"SGX extension {what} = {value} outside 0..{maximum}")
    return value


def _octets(reader: DerReader, size: int, what: str) -> bytes:
    value = reader.octets(what)
    if len(value) != size:
        raise EvidenceMalformed(f"SGX extension {what} is {len(value)} bytes, expected {size}")
    return value


def _parse_tcb(reader: DerReader) -> tuple[tuple[int, ...], int, bytes]:
    components: dict[int, int] = {}
    pcesvn: int | None = None
    cpusvn: bytes | None = None
    seen: set[str] = set()
    while not reader.at_end():
        item = reader.sequence("TCB entry")
        oid = item.oid("TCB entry OID")
        if oid in seen:
            raise EvidenceMalformed(f"SGX extension: duplicate TCB entry {oid}")
        seen.add(oid)
        prefix = _ROOT + ".2."
        arc = oid[len(prefix):] if oid.startswith(prefix) else ""
        if arc.isdigit() and 1 <= int(arc) <= 16:
            components[int(arc)] = _svn(item.integer(f"TCB component {arc}"), 255, f"TCB component {arc}")
        elif arc == "17":
            pcesvn = _svn(item.integer("PCESVN"), 0xFFFF, "PCESVN")
        elif arc == "18":
            cpusvn = _octets(item, 16, "CPUSVN")
        else:
            item.pos = item.end  # unknown entry: skip its value
        item.finish(f"TCB entry {oid}")
    missing = [str(i) for i in range(1, 17) if i not in components]
    if missing:
        raise EvidenceMalformed(f"SGX extension: TCB components missing: {', '.join(missing)}")
    if pcesvn is None:
        raise EvidenceMalformed("SGX extension: PCESVN missing")
    if cpusvn is None:
        raise EvidenceMalformed("SGX extension: CPUSVN missing")
    return tuple(components[i] for i in range(1, 17)), pcesvn, cpusvn


def _parse_configuration(reader: DerReader) -> dict[str, bool]:
    names = {"1": "dynamic_platform", "2": "cached_keys", "3": "smt_enabled"}
    out: dict[str, bool] = {}
    while not reader.at_end():
        item = reader.sequence("Configuration entry")
        oid = item.oid("Configuration entry OID")
        arc = oid[len(_ROOT + ".7."):] if oid.startswith(_ROOT + ".7.") else ""
        name = names.get(arc)
        if name is None:
            item.pos = item.end
        else:
            if name in out:
                raise EvidenceMalformed(f"SGX extension: duplicate Configuration entry {oid}")
            out[name] = item.boolean(name)
        item.finish(f"Configuration entry {oid}")
    return out


def parse_sgx_extensions(der: bytes) -> PckExtensions:
    """Parse the DER value of the SGX Extensions extension. Malformed → :class:`EvidenceMalformed`."""
    try:
        return _parse_sgx_extensions(bytes(der))
    except EvidenceMalformed:
        raise
    except (ValueError, IndexError, TypeError, OverflowError) as exc:  # defensive: never a crash
        raise EvidenceMalformed(f"SGX extension: {type(exc).__name__}") from None


def _parse_sgx_extensions(der: bytes) -> PckExtensions:
    outer = DerReader(der)
    top = outer.sequence("SGX Extensions")
    outer.finish("SGX Extensions")
    ppid: bytes | None = None
    tcb: tuple[tuple[int, ...], int, bytes] | None = None
    pce_id: bytes | None = None
    fmspc: bytes | None = None
    sgx_type: int | None = None
    platform_instance_id: bytes | None = None
    config: dict[str, bool] = {}
    seen: set[str] = set()
    while not top.at_end():
        item = top.sequence("SGX extension entry")
        oid = item.oid("SGX extension entry OID")
        if oid in seen:
            raise EvidenceMalformed(f"SGX extension: duplicate entry {oid}")
        seen.add(oid)
        arc = oid[len(_ROOT) + 1:] if oid.startswith(_ROOT + ".") else ""
        if arc == "1":
            ppid = _octets(item, 16, "PPID")
        elif arc == "2":
            tcb = _parse_tcb(item.sequence("TCB"))
        elif arc == "3":
            pce_id = _octets(item, 2, "PCE-ID")
        elif arc == "4":
            fmspc = _octets(item, 6, "FMSPC")
        elif arc == "5":
            sgx_type = _svn(item.integer("SGX Type", TAG_ENUMERATED), 255, "SGX Type")
        elif arc == "6":
            platform_instance_id = _octets(item, 16, "PlatformInstanceID")
        elif arc == "7":
            config = _parse_configuration(item.sequence("Configuration"))
        else:
            item.pos = item.end
        item.finish(f"SGX extension entry {oid}")
    if tcb is None:
        raise EvidenceMalformed("SGX extension: TCB missing")
    if pce_id is None:
        raise EvidenceMalformed("SGX extension: PCE-ID missing")
    if fmspc is None:
        raise EvidenceMalformed("SGX extension: FMSPC missing")
    components, pcesvn, cpusvn = tcb
    return PckExtensions(
        fmspc=fmspc,
        pce_id=pce_id,
        cpusvn=cpusvn,
        pcesvn=pcesvn,
        tcb_components=components,
        sgx_type=sgx_type,
        ppid=ppid,
        platform_instance_id=platform_instance_id,
        dynamic_platform=config.get("dynamic_platform"),
        cached_keys=config.get("cached_keys"),
        smt_enabled=config.get("smt_enabled"),
    )


def parse_pck_extensions(cert: x509.Certificate) -> PckExtensions:
    """The SGX Extensions of a PCK leaf certificate. Absent or malformed → :class:`EvidenceMalformed`."""
    oid = x509.ObjectIdentifier(SGX_EXTENSIONS_OID)
    try:
        ext = cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        raise EvidenceMalformed("PCK certificate has no SGX Extensions (1.2.840.113741.1.13.1)") from None
    except (ValueError, TypeError) as exc:  # a different extension of the certificate does not parse
        raise EvidenceMalformed(f"PCK certificate extensions do not parse ({type(exc).__name__})") from None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):  # pragma: no cover - cryptography does not know it
        raise EvidenceMalformed("SGX Extensions decoded by cryptography as an unexpected type")
    return parse_sgx_extensions(value.value)
