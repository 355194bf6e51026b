"""Evidence from Linux configfs-tsm: TDX quotes and SEV-SNP reports inside a confidential VM.

The kernel ABI (Documentation/ABI/testing/configfs-tsm, Linux 6.7+; the report code lives in
drivers/virt/coco/guest/report.c in recent kernels) under ``/sys/kernel/config/tsm/report``:

- ``mkdir report/NAME`` creates a report entry; the kernel populates its attributes. It fails
  with ENXIO when no TSM provider (tdx_guest, sev_guest) is registered.
- ``provider`` (RO): "tdx_guest" (``outblob`` is a TDX quote) or "sev_guest" (an SNP report).
- ``inblob`` (WO, binary, up to 64 bytes): the report data. configfs commits binary attributes
  when the file is *closed* and cannot report a failure there (EBUSY from the generation
  counter is silently dropped).
- ``privlevel`` (WO, SNP only): the VMPL to request, from ``privlevel_floor`` (RO) to 3.
- ``generation`` (RO): incremented by every write to ``inblob`` or an option. Userspace
  "can detect conflicts by checking generation before writing to any attribute and making
  sure the number of writes matches expectations after reading outblob".
- ``outblob`` (RO, binary, up to 32 KiB): reading it makes the TEE generate the evidence for
  the current inblob and options (cached until the next write).
- ``auxblob`` (RO, binary, SNP only): the host-supplied certificate table of the GHCB spec
  (MSG_REPORT_REQ, section 4.1.8.1), with the VCEK or VLEK when the host provides it; may be
  empty.
- ``rmdir report/NAME`` drops the entry.

One evidence request here: mkdir a uniquely named entry (pid + random), read ``generation``,
write ``privlevel`` (if asked) and ``inblob``, read ``outblob`` and ``auxblob``, read
``generation`` again; if it moved by anything but our own writes, another writer interfered
(or our inblob write was dropped): rmdir, back off and retry in a fresh entry, up to
``max_attempts``. EAGAIN/EBUSY/EINTR from ``outblob`` (a busy quoting service) are retried the
same way. Finally the evidence must carry our report data (:mod:`.binding`). The entry is
removed on every path, success or failure.

Newer kernels add SVSM attributes (``service_provider``, ``service_guid``,
``service_manifest_version``, ``manifestblob``) for SNP guests running under an SVSM; this
provider does not write them, so it asks for the plain SNP report.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import struct
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterator

from .binding import REPORT_DATA_SIZE, bound_report_data
from .errors import ProviderFailed, ProviderNotSupported, ProviderUnavailable
from .fileops import FileOps, OsFileOps

__all__ = [
    "TSM_REPORT_DIR",
    "PROVIDER_PLATFORMS",
    "CertTableEntry",
    "ConfigfsTsmProvider",
    "TsmReport",
    "parse_cert_table",
    "probe_provider_name",
]

log = logging.getLogger("enclaveq.providers")

TSM_REPORT_DIR = Path("sys/kernel/config/tsm/report")
# configfs-tsm provider name -> enclaveq platform name.
PROVIDER_PLATFORMS = {"tdx_guest": "tdx", "sev_guest": "snp"}

OUTBLOB_MAX = 32 * 1024          # TSM_REPORT_OUTBLOB_MAX (SZ_32K) bounds outblob and auxblob
_TEXT_MAX = 4096
_PRIVLEVEL_MAX = 3               # TSM_REPORT_PRIVLEVEL_MAX
_TRANSIENT = {errno.EAGAIN, errno.EBUSY, errno.EINTR}
_ENTRY_PREFIX = "enclaveq"


def _errno_text(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "?")
    return f"{name}: {exc.strerror or exc}"


@dataclass(frozen=True)
class TsmReport:
    """One configfs-tsm report: the evidence and what came with it."""

    provider: str          # "tdx_guest" or "sev_guest"
    outblob: bytes         # TDX quote or SNP attestation report
    auxblob: bytes | None  # SNP certificate table (b"" if the host supplied none); None on TDX
    generation: int        # the entry's generation after our writes

    @property
    def platform(self) -> str:
        return PROVIDER_PLATFORMS[self.provider]


@dataclass(frozen=True)
class CertTableEntry:
    guid: uuid.UUID
    name: str              # "vcek", "vlek", "ask", "ark", "asvk", "crl" or "unknown"
    data: bytes            # usually a DER certificate


# GHCB spec 4.1.8.1 / SNP firmware ABI: the GUIDs the host uses in the certificate table; the
# 16 bytes are stored in RFC 4122 byte order (as AMD's sev-guest tools and go-sev-guest write them).
_CERT_GUIDS = {
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"): "vcek",
    uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"): "vlek",
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"): "ask",
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"): "ark",
    uuid.UUID("00000000-0000-0000-0000-000000000000"): "terminator",
}
_CERT_ENTRY = struct.Struct("<16sII")


def parse_cert_table(auxblob: bytes) -> tuple[CertTableEntry, ...]:
    """The entries of an SNP certificate table (``auxblob``), in table order; () if it is empty.

    Layout: entries of (GUID 16 bytes, offset u32, length u32), terminated by an all-zero entry;
    offsets count from the start of the table. The host writes this table, so it is untrusted:
    every bound is checked (``ProviderFailed`` if broken). Nothing here trusts a certificate;
    the verifier checks the chain to AMD's roots.
    """
    if not auxblob:
        return ()  # the host supplied no certificates (the kernel's auxblob is then empty)
    entries: list[CertTableEntry] = []
    pos = 0
    while True:
        if pos + _CERT_ENTRY.size > len(auxblob):
            raise ProviderFailed(f"SNP certificate table (auxblob, {len(auxblob)} bytes) has no terminator entry")
        raw_guid, offset, length = _CERT_ENTRY.unpack_from(auxblob, pos)
        pos += _CERT_ENTRY.size
        if raw_guid == bytes(16) and offset == 0 and length == 0:
            return tuple(entries)
        guid = uuid.UUID(bytes=raw_guid)
        if offset + length > len(auxblob) or offset < pos:
            raise ProviderFailed(f"SNP certificate table entry {guid} points outside the table "
                                 f"(offset {offset}, length {length}, table {len(auxblob)} bytes)")
        entries.append(CertTableEntry(guid=guid, name=_CERT_GUIDS.get(guid, "unknown"),
                                      data=bytes(auxblob[offset:offset + length])))


class _Retry(Exception):
    """One attempt lost a race or hit a transient error; try again in a fresh entry."""


def _read_text(ops: FileOps, path: Path) -> str:
    return ops.read(path, _TEXT_MAX).decode("ascii", "replace").strip()


@contextmanager
def _report_entry(ops: FileOps, report_dir: Path) -> Iterator[Path]:
    entry = report_dir / f"{_ENTRY_PREFIX}-{os.getpid()}-{secrets.token_hex(8)}"
    try:
        ops.mkdir(entry)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise ProviderUnavailable(
                f"{report_dir} exists but no TSM provider is registered (mkdir: {_errno_text(exc)}): "
                "this is not a TDX or SEV-SNP guest, or its guest driver (tdx_guest, sev_guest) is not loaded"
            ) from None
        if exc.errno == errno.ENOENT:
            raise ProviderUnavailable(f"{report_dir} disappeared (mkdir: {_errno_text(exc)})") from None
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise ProviderFailed(
                f"cannot create a report entry in {report_dir} ({_errno_text(exc)}): the worker needs "
                "permission to mkdir there (run it as root, or give its user that directory)"
            ) from None
        raise ProviderFailed(f"cannot create a report entry in {report_dir} ({_errno_text(exc)})") from None
    try:
        yield entry
    finally:
        try:
            ops.rmdir(entry)
        except OSError as exc:
            log.warning("could not remove configfs-tsm report entry %s (%s); remove it by hand", entry, _errno_text(exc))


def probe_provider_name(root: Path = Path("/"), *, ops: FileOps | None = None) -> str:
    """The configfs-tsm provider name ("tdx_guest", "sev_guest", ...) of this machine.

    Creates and removes a report entry (there is no other way to ask). ``ProviderUnavailable``
    when configfs-tsm is absent or has no provider; ``ProviderFailed`` when the kernel refuses.
    """
    ops = ops or OsFileOps()
    report_dir = Path(root) / TSM_REPORT_DIR
    if not report_dir.is_dir():
        raise ProviderUnavailable(
            f"{report_dir} not found: not a TDX or SEV-SNP guest, or configfs is not mounted "
            "(mount -t configfs none /sys/kernel/config) or the kernel is older than 6.7"
        )
    with _report_entry(ops, report_dir) as entry:
        try:
            name = _read_text(ops, entry / "provider")
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise ProviderUnavailable(
                    f"{entry} has no 'provider' attribute: {report_dir} is not a configfs-tsm report directory"
                ) from None
            if exc.errno == errno.ENXIO:
                raise ProviderUnavailable(f"no TSM provider is registered under {report_dir}") from None
            raise ProviderFailed(f"cannot read {entry / 'provider'} ({_errno_text(exc)})") from None
    if not name:
        raise ProviderFailed(f"{report_dir}: the kernel reported an empty provider name")
    return name


class ConfigfsTsmProvider:
    """Evidence from configfs-tsm: ``platform`` is "tdx" (tdx_guest) or "snp" (sev_guest).

    The constructor probes the provider once (so a misconfigured worker fails at start) and
    refuses a mismatch with ``platform`` when one is asked for. ``privlevel`` (SNP only) is the
    VMPL to request; None leaves the kernel's default. ``ops`` and ``sleep`` are for tests.
    :meth:`evidence` blocks while the TEE works (a TDX quote goes through the host's quoting
    service and can take a second): call it off the event loop.
    """

    def __init__(
        self,
        *,
        root: Path = Path("/"),
        platform: str | None = None,
        privlevel: int | None = None,
        ops: FileOps | None = None,
        max_attempts: int = 5,
        backoff: float = 0.05,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if platform is not None and platform not in PROVIDER_PLATFORMS.values():
            raise ValueError(f"configfs-tsm provides 'tdx' or 'snp' evidence, not {platform!r}")
        if privlevel is not None and (type(privlevel) is not int or not 0 <= privlevel <= _PRIVLEVEL_MAX):
            raise ValueError(f"privlevel must be an integer from 0 to {_PRIVLEVEL_MAX}")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._ops = ops or OsFileOps()
        self._dir = Path(root) / TSM_REPORT_DIR
        self._max_attempts = max_attempts
        self._backoff = backoff
        self._sleep = sleep
        self._privlevel = privlevel

        self.provider_name = probe_provider_name(root, ops=self._ops)
        detected = PROVIDER_PLATFORMS.get(self.provider_name)
        if detected is None:
            raise ProviderNotSupported(
                f"configfs-tsm provider {self.provider_name!r} is not supported "
                f"(supported: {', '.join(sorted(PROVIDER_PLATFORMS))})"
            )
        if platform is not None and platform != detected:
            raise ProviderUnavailable(
                f"asked for {platform} evidence, but this guest's configfs-tsm provider is "
                f"{self.provider_name!r} ({detected}): this is not a{'n' if platform == 'snp' else ''} "
                f"{platform.upper()} guest"
            )
        if privlevel is not None:
            self._check_privlevel(detected, privlevel)
        self.platform: str = detected

    def _check_privlevel(self, platform: str, privlevel: int) -> None:
        if platform != "snp":
            raise ProviderNotSupported(f"privlevel (VMPL) is an SEV-SNP option; {self.provider_name} has none")
        with _report_entry(self._ops, self._dir) as entry:
            try:
                floor_text = _read_text(self._ops, entry / "privlevel_floor")
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    raise ProviderNotSupported(f"{self.provider_name} has no privlevel attribute in this kernel") from None
                raise ProviderFailed(f"cannot read privlevel_floor ({_errno_text(exc)})") from None
        try:
            floor = int(floor_text)
        except ValueError:
            raise ProviderFailed(f"privlevel_floor is not a number: {floor_text[:32]!r}") from None
        if privlevel < floor:
            raise ProviderNotSupported(f"privlevel {privlevel} is below this guest's privlevel_floor {floor}")

    # -- evidence ---------------------------------------------------------------------------
    def evidence(self, report_data: bytes) -> bytes:
        """A fresh TDX quote or SNP report binding ``report_data`` (exactly 64 bytes).

        On SNP the host's certificate table (VCEK/VLEK, ASK, ARK), when it supplies one, is
        appended after the report: the verifier reads it from there (it lies outside the
        report's signature, and every certificate in it must still chain to a pinned AMD root),
        so producers need no --cert and no network access to AMD's KDS.
        """
        report = self.report(report_data)
        if report.provider == "sev_guest" and report.auxblob:
            return report.outblob + report.auxblob
        return report.outblob

    def report(self, report_data: bytes) -> TsmReport:
        """Like :meth:`evidence`, with the provider name, the SNP certificate table and generation."""
        if not isinstance(report_data, (bytes, bytearray)) or len(report_data) != REPORT_DATA_SIZE:
            raise ValueError(f"report_data must be exactly {REPORT_DATA_SIZE} bytes")
        report_data = bytes(report_data)
        reasons: list[str] = []
        for attempt in range(1, self._max_attempts + 1):
            try:
                with _report_entry(self._ops, self._dir) as entry:
                    return self._attempt(entry, report_data)
            except _Retry as exc:
                reasons.append(str(exc))
                log.warning("configfs-tsm attempt %d/%d: %s", attempt, self._max_attempts, exc)
                if attempt < self._max_attempts:
                    self._sleep(self._backoff * attempt)
        raise ProviderFailed(
            f"configfs-tsm gave no consistent report after {self._max_attempts} attempts; last: {reasons[-1]}"
        )

    def _generation(self, entry: Path) -> int:
        try:
            text = _read_text(self._ops, entry / "generation")
        except OSError as exc:
            raise ProviderFailed(f"cannot read {entry / 'generation'} ({_errno_text(exc)})") from None
        try:
            return int(text)
        except ValueError:
            raise ProviderFailed(f"{entry / 'generation'} is not a number: {text[:32]!r}") from None

    def _write(self, path: Path, data: bytes) -> None:
        try:
            self._ops.write(path, data)
        except OSError as exc:
            if exc.errno in _TRANSIENT:
                raise _Retry(f"writing {path.name}: {_errno_text(exc)}") from None
            raise ProviderFailed(f"the kernel refused {path} ({_errno_text(exc)})") from None

    def _read_blob(self, path: Path) -> bytes:
        try:
            return self._ops.read(path, OUTBLOB_MAX)
        except OSError as exc:
            if exc.errno in _TRANSIENT:
                raise _Retry(f"reading {path.name}: {_errno_text(exc)}") from None
            raise ProviderFailed(
                f"the TEE did not produce {path.name} ({_errno_text(exc)}); see the kernel log (dmesg) "
                f"for {self.provider_name}"
            ) from None

    def _attempt(self, entry: Path, report_data: bytes) -> TsmReport:
        before = self._generation(entry)
        writes = 0
        if self._privlevel is not None:
            self._write(entry / "privlevel", f"{self._privlevel}\n".encode())
            writes += 1
        self._write(entry / "inblob", report_data)
        writes += 1
        outblob = self._read_blob(entry / "outblob")
        auxblob = self._read_blob(entry / "auxblob") if (entry / "auxblob").exists() else None
        after = self._generation(entry)
        if after != before + writes:
            raise _Retry(f"generation went from {before} to {after} around our {writes} write(s): another "
                         "writer changed the report entry, or the kernel dropped our write")
        if not outblob:
            raise ProviderFailed(f"{entry / 'outblob'} is empty")
        try:
            bound = bound_report_data(self.platform, outblob)
        except ValueError as exc:
            raise ProviderFailed(f"{self.provider_name} returned unusable evidence: {exc}") from None
        if bound != report_data:
            raise ProviderFailed(f"{self.provider_name} returned evidence for other report data than ours")
        return TsmReport(provider=self.provider_name, outblob=outblob, auxblob=auxblob, generation=after)
