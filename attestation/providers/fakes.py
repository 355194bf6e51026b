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

Nothing here is used outside tests.
"""

from __future__ import annotations

import errno
import os
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .configfs_tsm import TSM_REPORT_DIR
from .fileops import OsFileOps
from .gramine import ATTESTATION_DIR

__all__ = [
    "FakeGramine",
    "FakeTsmKernel",
    "cert_table",
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


# -- Gramine --------------------------------------------------------------------------------
QuoteFn = Callable[[bytes], bytes]


@dataclass
class FakeGramine:
    """Gramine's /dev/attestation under ``root``. ``quote_fn(user_report_data)`` makes the quote;
    ``quote_errors`` are errnos raised by successive quote reads."""

    root: Path
    attestation_type: str = "dcap"
    quote_fn: QuoteFn = fake_sgx_quote
    quote_errors: list[int] = field(default_factory=list)
    user_report_data: bytes = bytes(64)
    quotes_made: int = 0

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
        raise OSError(errno.EACCES, "Permission denied", str(path))
