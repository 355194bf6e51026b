"""Fake TEE interfaces for tests: configfs-tsm and Gramine's /dev/attestation on a plain tree.

A real configfs or Gramine pseudo-file cannot be reproduced with ordinary files: ``mkdir``
must populate attributes, a write must bump a counter, a read must *produce* evidence. So a
fake here is two things together:

- a directory tree under a test's ``root`` (``sys/kernel/config/tsm/report``,
  ``dev/attestation``) whose files are placeholders: they exist exactly where the real
  attributes exist, so ``Path.is_dir``/``exists`` checks and detection see the real layout;
- a :class:`~attestation.providers.fileops.FileOps` that the provider is given as ``ops`` and
  that emulates the device behind those paths (following the kernel's report.c and Gramine's
  documented behaviour), passing every other path to the real OS.

Limits, stated plainly: the fakes model the documented ABI, not a kernel. They do not model
configfs buffering of partial writes, file modes (a read-only attribute opened for writing
gives EACCES here as there, but nothing else about permissions), the real quote/report formats
beyond their headers and report-data offsets (the evidence they produce is unsigned filler
with the right layout, which no verifier accepts), or timing. A provider passing these tests has
followed the ABI as documented; only a run inside a real TDX/SNP guest or Gramine enclave shows
that the documented ABI is what the kernel does.

Guest devices: :class:`FakeSevGuest` (``/dev/sev-guest``'s SNP_GET_DERIVED_KEY: checks every
request byte against the ABI and derives a deterministic key from a fake chip secret and the
selected launch fields, the way the firmware mixes them) and :class:`FakeTdxGuest`
(``/dev/tdx_guest``'s TDX_CMD_GET_REPORT0: a TDREPORT of a chosen TD). A
:class:`FakeTsmKernel` given one of them routes the ioctls on that device path to it; Gramine's
local reports (``my_target_info``/``target_info``/``report``) are part of :class:`FakeGramine`.

Nothing here is used outside tests.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

from .configfs_tsm import TSM_REPORT_DIR
from .fileops import OsFileOps
from .gramine import ATTESTATION_DIR, LOCAL_REPORT_SIZE, TARGET_INFO_SIZE
from .ioctl import GuestRequestError
from .snp_derived_key import MSG_VERSION, RESPONSE_SIZE, SEV_GUEST_DEVICE, SNP_GET_DERIVED_KEY
from .tdx_guest import TDREPORT_SIZE, TDX_CMD_GET_REPORT0, TDX_GUEST_DEVICE

__all__ = [
    "FakeGramine",
    "FakeSevGuest",
    "FakeTdxGuest",
    "FakeTsmKernel",
    "cert_table",
    "fake_tdreport",
    "fake_sgx_quote",
    "fake_snp_report",
    "fake_tdx_quote",
]

VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
ASK_GUID = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
ARK_GUID = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")


# -- fake evidence with the real layouts' headers and report-data offsets --------------------
def _quote(version: int, tee_type: int, body: bytes, body_type: int | None = None) -> bytes:
    header = struct.pack("<HHI", version, 2, tee_type) + bytes(40)  # version, ECDSA-P256, tee_type
    middle = b"" if body_type is None else struct.pack("<HI", body_type, len(body))
    signature = b"FAKE-SIGNATURE-NOT-VALID"
    return header + middle + body + struct.pack("<I", len(signature)) + signature


def fake_tdx_quote(report_data: bytes, *, version: int = 4) -> bytes:
    body = bytearray(584)                     # TD 1.0 report body
    body[520:584] = report_data
    return _quote(version, 0x81, bytes(body), body_type=2 if version == 5 else None)


def fake_sgx_quote(report_data: bytes, *, version: int = 3) -> bytes:
    body = bytearray(384)                     # SGX enclave report body
    body[320:384] = report_data
    return _quote(version, 0x00, bytes(body), body_type=1 if version == 5 else None)


def fake_snp_report(report_data: bytes, *, vmpl: int = 0) -> bytes:
    report = bytearray(0x4A0)                 # ATTESTATION_REPORT, 1184 bytes
    struct.pack_into("<I", report, 0x00, 2)   # version
    struct.pack_into("<I", report, 0x30, vmpl)
    report[0x50:0x90] = report_data
    return bytes(report)


def cert_table(certs: list[tuple[uuid.UUID, bytes]]) -> bytes:
    """A GHCB certificate table: entries, an all-zero terminator, then the certificates."""
    offset = 24 * (len(certs) + 1)
    entries, blobs = b"", b""
    for guid, data in certs:
        entries += guid.bytes + struct.pack("<II", offset + len(blobs), len(data))
        blobs += data
    return entries + bytes(24) + blobs


# -- configfs-tsm ---------------------------------------------------------------------------
ReportNew = Callable[[str, bytes, int], tuple[bytes, bytes | None]]


def _default_report_new(provider: str, inblob: bytes, privlevel: int) -> tuple[bytes, bytes | None]:
    if provider == "tdx_guest":
        return fake_tdx_quote(inblob.ljust(64, b"\0")), None
    if provider == "sev_guest":
        return (fake_snp_report(inblob.ljust(64, b"\0"), vmpl=privlevel),
                cert_table([(VCEK_GUID, b"fake VCEK DER"), (ASK_GUID, b"fake ASK"), (ARK_GUID, b"fake ARK")]))
    return b"opaque-" + inblob, None


@dataclass
class _Entry:
    inblob: bytes = b""
    privlevel: int = 0
    write_generation: int = 0
    read_generation: int = 0
    outblob: bytes | None = None
    auxblob: bytes | None = None


_TEXT_ATTRS = {"tdx_guest": ("generation", "provider"),
               "sev_guest": ("generation", "provider", "privlevel", "privlevel_floor")}
_BIN_ATTRS = {"tdx_guest": ("inblob", "outblob"),
              "sev_guest": ("inblob", "outblob", "auxblob")}
_WRITABLE = {"inblob", "privlevel"}


@dataclass
class FakeTsmKernel:
    """configfs-tsm under ``root`` with one registered provider (None: none registered).

    Knobs for failure tests: ``outblob_errors`` (errnos raised by successive outblob reads),
    ``interfering_writes`` (for that many report generations, another writer writes inblob right
    after ours was turned into a report), ``drop_inblob_writes`` (the kernel silently ignores
    that many inblob writes, as configfs does when a commit at close fails), ``privlevel_floor``.
    ``report_new(provider, inblob, privlevel) -> (outblob, auxblob)`` makes the evidence.
    """

    root: Path
    provider: str | None = "tdx_guest"
    report_new: ReportNew = _default_report_new
    privlevel_floor: int = 0
    outblob_errors: list[int] = field(default_factory=list)
    interfering_writes: int = 0
    drop_inblob_writes: int = 0
    entries_made: list[str] = field(default_factory=list)
    reports_generated: int = 0
    sev_guest: FakeSevGuest | None = None     # /dev/sev-guest (SEV-SNP guests)
    tdx_guest: FakeTdxGuest | None = None     # /dev/tdx_guest (TDX guests)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.report_dir.mkdir(parents=True, exist_ok=True)
        self._entries: dict[Path, _Entry] = {}
        self._os = OsFileOps()

    @property
    def report_dir(self) -> Path:
        return self.root / TSM_REPORT_DIR

    def live_entries(self) -> list[str]:
        return sorted(p.name for p in self.report_dir.iterdir())

    def _attr(self, path: Path) -> tuple[_Entry, str] | None:
        entry = self._entries.get(path.parent)
        return (entry, path.name) if entry is not None else None

    # FileOps ---------------------------------------------------------------------------------
    def mkdir(self, path: Path) -> None:
        if path.parent != self.report_dir:
            return self._os.mkdir(path)
        if self.provider is None:
            raise OSError(errno.ENXIO, "No such device or address", str(path))
        os.mkdir(path, 0o700)
        attrs = _TEXT_ATTRS.get(self.provider, ("generation", "provider")) + \
            _BIN_ATTRS.get(self.provider, ("inblob", "outblob"))
        for name in attrs:
            (path / name).touch()
        self._entries[path] = _Entry()
        self.entries_made.append(path.name)

    def rmdir(self, path: Path) -> None:
        if self._entries.pop(path, None) is None:
            return self._os.rmdir(path)
        for child in path.iterdir():
            child.unlink()
        os.rmdir(path)

    def write(self, path: Path, data: bytes) -> None:
        found = self._attr(path)
        if found is None:
            return self._os.write(path, data)
        entry, name = found
        if not path.exists():
            raise OSError(errno.ENOENT, "No such file or directory", str(path))
        if name not in _WRITABLE:
            raise OSError(errno.EACCES, "Permission denied", str(path))
        if name == "inblob":
            if len(data) > 64:
                raise OSError(errno.EFBIG, "File too large", str(path))
            if self.drop_inblob_writes:
                self.drop_inblob_writes -= 1
                return  # configfs reports nothing: the commit happens at close()
            entry.inblob = bytes(data)
        else:
            try:
                value = int(data.decode().strip(), 0)
            except ValueError:
                raise OSError(errno.EINVAL, "Invalid argument", str(path)) from None
            if not self.privlevel_floor <= value <= 3:
                raise OSError(errno.EINVAL, "Invalid argument", str(path))
            entry.privlevel = value
        entry.write_generation += 1

    def read(self, path: Path, limit: int) -> bytes:
        found = self._attr(path)
        if found is None:
            return self._os.read(path, limit)
        entry, name = found
        if not path.exists():
            raise OSError(errno.ENOENT, "No such file or directory", str(path))
        if name in _WRITABLE:
            raise OSError(errno.EACCES, "Permission denied", str(path))
        if name == "provider":
            return f"{self.provider}\n".encode()
        if name == "generation":
            return f"{entry.write_generation}\n".encode()
        if name == "privlevel_floor":
            return f"{self.privlevel_floor}\n".encode()
        # outblob / auxblob: the kernel's tsm_report_read()
        if not entry.inblob:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        if entry.outblob is None or entry.read_generation != entry.write_generation:
            if self.outblob_errors:
                code = self.outblob_errors.pop(0)
                raise OSError(code, os.strerror(code), str(path))
            if self.provider is None:  # entries exist only while a provider is registered
                raise OSError(errno.ENXIO, "No such device or address", str(path))
            entry.outblob, entry.auxblob = self.report_new(self.provider, entry.inblob, entry.privlevel)
            entry.read_generation = entry.write_generation
            self.reports_generated += 1
            if self.interfering_writes:
                self.interfering_writes -= 1
                entry.inblob = b"\xee" * 64      # someone else's report data
                entry.write_generation += 1
        blob = entry.outblob if name == "outblob" else (entry.auxblob or b"")
        if len(blob) > limit:
            raise OSError(errno.EFBIG, "File too large", str(path))
        return blob

    # guest devices --------------------------------------------------------------------------
    def ioctl(self, path: Path, request: int, arg: bytes) -> bytes:
        if self.tdx_guest is not None and path == self.root / TDX_GUEST_DEVICE:
            return self.tdx_guest.ioctl(path, request, arg)
        return self._os.ioctl(path, request, arg)

    def guest_request(self, path: Path, request: int, msg_version: int, req: bytes, resp_size: int) -> bytes:
        if self.sev_guest is not None and path == self.root / SEV_GUEST_DEVICE:
            return self.sev_guest.guest_request(path, request, msg_version, req, resp_size)
        return self._os.guest_request(path, request, msg_version, req, resp_size)


# -- /dev/sev-guest: SNP_GET_DERIVED_KEY --------------------------------------------------------
_KEY_REQ = struct.Struct("<IIQIIQ")


@dataclass
class FakeSevGuest:
    """The SEV-SNP firmware's MSG_KEY_REQ behind ``/dev/sev-guest``, for one launched guest.

    The key is SHA-256 over a fake chip secret, the root key choice, the requested VMPL and,
    for each GUEST_FIELD_SELECT bit that is set, that field's value for this guest -- so a
    guest with another measurement (or policy, family or image ID) derives another key exactly
    when that field is selected, as with the real firmware. Requests are checked like the
    kernel and firmware check them: wrong ioctl number, message version 0, wrong sizes (errno
    EINVAL), reserved bits or a VMPL below the guest's current one (firmware status 0x16,
    INVALID_PARAM, in MSG_KEY_RSP). ``errors`` are raised by successive requests instead:
    ``(errno, exitinfo2)`` pairs. Every request's bytes are kept in ``requests``.
    """

    measurement: bytes = bytes(48)
    policy: int = (1 << 17) | (1 << 16)
    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    guest_svn: int = 0
    committed_tcb: int = 0
    current_vmpl: int = 0
    chip_secret: bytes = b"fake AMD chip"
    errors: list[tuple[int, int]] = field(default_factory=list)
    requests: list[bytes] = field(default_factory=list)

    def key(self, root_key_select: int, field_select: int, vmpl: int, guest_svn: int, tcb_version: int) -> bytes:
        parts = [self.chip_secret, struct.pack("<II", root_key_select, vmpl)]
        values = (struct.pack("<Q", self.policy), self.image_id, self.family_id, self.measurement,
                  struct.pack("<I", guest_svn), struct.pack("<Q", tcb_version))
        for bit, value in enumerate(values):
            parts.append(value if field_select & (1 << bit) else b"-")
        return hashlib.sha256(b"|".join(parts)).digest()

    def guest_request(self, path: Path, request: int, msg_version: int, req: bytes, resp_size: int) -> bytes:
        if request != SNP_GET_DERIVED_KEY:
            raise GuestRequestError(errno.ENOTTY, os.strerror(errno.ENOTTY), str(path), exitinfo2=0xFF)
        if msg_version == 0 or len(req) != _KEY_REQ.size or resp_size != RESPONSE_SIZE:
            raise GuestRequestError(errno.EINVAL, os.strerror(errno.EINVAL), str(path), exitinfo2=0xFF)
        self.requests.append(bytes(req))
        if self.errors:
            code, exitinfo2 = self.errors.pop(0)
            raise GuestRequestError(code, os.strerror(code), str(path), exitinfo2=exitinfo2)
        root_key, reserved, fields, vmpl, guest_svn, tcb = _KEY_REQ.unpack(req)
        status = 0
        if (reserved or fields >> 6 or root_key > 1 or not self.current_vmpl <= vmpl <= 3
                or guest_svn > self.guest_svn or tcb > self.committed_tcb or msg_version != MSG_VERSION):
            status = 0x16
        key = bytes(32) if status else self.key(root_key, fields, vmpl, guest_svn, tcb)
        return struct.pack("<I", status) + bytes(28) + key


# -- /dev/tdx_guest: TDX_CMD_GET_REPORT0 ---------------------------------------------------------
_TDINFO_FIELDS = ("td_attributes", "xfam", "mrtd", "mrconfigid", "mrowner", "mrownerconfig",
                  "rtmr0", "rtmr1", "rtmr2", "rtmr3", "servtd_hash")
_TDINFO_SIZES = {"td_attributes": 8, "xfam": 8}


def fake_tdreport(report_data: bytes, **td: bytes) -> bytes:
    """A TDREPORT_STRUCT (1024 bytes, unMACed) over ``report_data`` for the TD described by
    ``td``: any of td_attributes, xfam (8 raw bytes each), mrtd, mrconfigid, mrowner,
    mrownerconfig, rtmr0..3, servtd_hash (48 bytes each); missing fields are zero."""
    unknown = set(td) - set(_TDINFO_FIELDS)
    if unknown:
        raise ValueError(f"unknown TDINFO fields {sorted(unknown)}")
    out = bytearray(TDREPORT_SIZE)
    out[0] = 0x81                                   # REPORTTYPE.TYPE: TDX
    out[128:192] = report_data
    offset = 512
    for name in _TDINFO_FIELDS:
        size = _TDINFO_SIZES.get(name, 48)
        value = td.get(name, bytes(size))
        if len(value) != size:
            raise ValueError(f"{name} must be {size} bytes")
        out[offset:offset + size] = value
        offset += size
    return bytes(out)


@dataclass
class FakeTdxGuest:
    """``/dev/tdx_guest`` for a TD whose TDINFO is ``td`` (see :func:`fake_tdreport`);
    ``errors`` are errnos raised by successive ioctls."""

    td: dict[str, bytes] = field(default_factory=dict)
    errors: list[int] = field(default_factory=list)
    reports: int = 0

    def ioctl(self, path: Path, request: int, arg: bytes) -> bytes:
        if request != TDX_CMD_GET_REPORT0 or len(arg) != 64 + TDREPORT_SIZE:
            raise OSError(errno.ENOTTY if request != TDX_CMD_GET_REPORT0 else errno.EINVAL, "bad ioctl", str(path))
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, os.strerror(code), str(path))
        self.reports += 1
        return bytes(arg[:64]) + fake_tdreport(bytes(arg[:64]), **self.td)


# -- Gramine --------------------------------------------------------------------------------
QuoteFn = Callable[[bytes], bytes]


@dataclass
class FakeGramine:
    """Gramine's /dev/attestation under ``root``. ``quote_fn(user_report_data)`` makes the quote;
    ``quote_errors`` are errnos raised by successive quote reads. ``report_body_fn(report_data)``
    makes the 384-byte body of the enclave's local report (``report``, for the target written to
    ``target_info``; the fake appends a zero KEYID and MAC); None: reading ``report`` is refused
    (EACCES), like a Gramine that cannot produce one."""

    root: Path
    attestation_type: str = "dcap"
    quote_fn: QuoteFn = fake_sgx_quote
    quote_errors: list[int] = field(default_factory=list)
    user_report_data: bytes = bytes(64)
    quotes_made: int = 0
    report_body_fn: Callable[[bytes], bytes] | None = None
    my_target_info: bytes = b"\x7e" * TARGET_INFO_SIZE
    target_info: bytes = bytes(TARGET_INFO_SIZE)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in ("attestation_type", "user_report_data", "quote", "target_info", "my_target_info", "report"):
            (self.dir / name).touch()
        self._os = OsFileOps()

    @property
    def dir(self) -> Path:
        return self.root / ATTESTATION_DIR

    def mkdir(self, path: Path) -> None:
        self._os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        self._os.rmdir(path)

    def write(self, path: Path, data: bytes) -> None:
        if path.parent != self.dir:
            return self._os.write(path, data)
        if path.name == "target_info":
            if len(data) != TARGET_INFO_SIZE:
                raise OSError(errno.EINVAL, "Invalid argument", str(path))
            self.target_info = bytes(data)
            return
        if path.name != "user_report_data":
            raise OSError(errno.EACCES, "Permission denied", str(path))
        if len(data) != 64:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        self.user_report_data = bytes(data)

    def read(self, path: Path, limit: int) -> bytes:
        if path.parent != self.dir:
            return self._os.read(path, limit)
        if path.name == "attestation_type":
            return self.attestation_type.encode() + b"\n"
        if path.name == "user_report_data":
            return self.user_report_data
        if path.name == "quote":
            if self.quote_errors:
                code = self.quote_errors.pop(0)
                raise OSError(code, os.strerror(code), str(path))
            self.quotes_made += 1
            return self.quote_fn(self.user_report_data)
        if path.name == "my_target_info":
            return self.my_target_info
        if path.name == "report" and self.report_body_fn is not None:
            if self.target_info != self.my_target_info:
                raise OSError(errno.EINVAL, "Invalid argument (target_info is not this enclave's)", str(path))
            report = self.report_body_fn(self.user_report_data) + bytes(LOCAL_REPORT_SIZE - 384)
            return report
        raise OSError(errno.EACCES, "Permission denied", str(path))
