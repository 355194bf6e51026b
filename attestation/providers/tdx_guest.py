"""A TD's own TDREPORT, straight from the TDX module: ``TDX_CMD_GET_REPORT0`` on ``/dev/tdx_guest``.

Why a worker wants it besides its quote: a TDX quote is signed *outside* the TD, by the host's
quote generation service, from a TDREPORT the TD hands over in shared memory. A host that also
runs a TD of its own could hand back *that* TD's genuine quote over the same report data. The
TDREPORT comes from ``TDG.MR.REPORT``, a call into the TDX module that the host cannot
intercept, so it is what this TD really is; enclave_worker.platform derives the pool's join
policy from it and refuses to start if the quote describes another TD.

Linux (include/uapi/linux/tdx-guest.h)::

    struct tdx_report_req { __u8 reportdata[64]; __u8 tdreport[1024]; };
    #define TDX_CMD_GET_REPORT0 _IOWR('T', 1, struct tdx_report_req)   /* -EIO: TDCALL failed */

TDREPORT_STRUCT (1024 bytes; Intel TDX Module ABI, "TDREPORT_STRUCT"): REPORTMACSTRUCT (256
bytes: REPORTTYPE at 0 -- type 0x81 is TDX --, CPUSVN at 16, TEE_TCB_INFO_HASH at 32,
TEE_INFO_HASH at 80, REPORTDATA at 128, MAC at 224), TEE_TCB_INFO (239 bytes) at 256, 17
reserved bytes, TDINFO_STRUCT (512 bytes) at 512: ATTRIBUTES (8) at 512, XFAM (8) at 520, MRTD
at 528, MRCONFIGID at 576, MROWNER at 624, MROWNERCONFIG at 672, RTMR0..3 at 720, 768, 816,
864 (48 bytes each), SERVTD_HASH at 912. ATTRIBUTES and XFAM are kept raw (u64 LE), as the
quote body and the ``[tdx]`` policy table have them.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from .binding import REPORT_DATA_SIZE
from .errors import ProviderFailed, ProviderUnavailable
from .fileops import FileOps, device_ops
from .ioctl import iowr

__all__ = ["TDREPORT_SIZE", "TDX_CMD_GET_REPORT0", "TDX_GUEST_DEVICE", "TdReport", "parse_tdreport", "tdx_report"]

TDX_GUEST_DEVICE = Path("dev/tdx_guest")
TDREPORT_SIZE = 1024
TDX_CMD_GET_REPORT0 = iowr("T", 1, REPORT_DATA_SIZE + TDREPORT_SIZE)
REPORT_TYPE_TDX = 0x81

_TDINFO = 512
_FIELDS = {"attributes": (_TDINFO, 8), "xfam": (_TDINFO + 8, 8), "mrtd": (_TDINFO + 16, 48),
           "mrconfigid": (_TDINFO + 64, 48), "mrowner": (_TDINFO + 112, 48), "mrownerconfig": (_TDINFO + 160, 48),
           "rtmr0": (_TDINFO + 208, 48), "rtmr1": (_TDINFO + 256, 48), "rtmr2": (_TDINFO + 304, 48),
           "rtmr3": (_TDINFO + 352, 48), "servtd_hash": (_TDINFO + 400, 48), "report_data": (128, 64)}


@dataclass(frozen=True)
class TdReport:
    """The TDREPORT fields enclaveq reads (raw bytes, as in the quote's TD report body)."""

    report_data: bytes
    attributes: bytes
    xfam: bytes
    mrtd: bytes
    mrconfigid: bytes
    mrowner: bytes
    mrownerconfig: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    servtd_hash: bytes

    @property
    def debug(self) -> bool:
        """TD_ATTRIBUTES bit 0 (TUD.DEBUG)."""
        return bool(self.attributes[0] & 1)


def parse_tdreport(data: bytes) -> TdReport:
    """A TDREPORT_STRUCT -> :class:`TdReport`; :class:`ProviderFailed` if it is not one."""
    if len(data) != TDREPORT_SIZE:
        raise ProviderFailed(f"TDREPORT is {len(data)} bytes; TDREPORT_STRUCT is {TDREPORT_SIZE}")
    if data[0] != REPORT_TYPE_TDX:
        raise ProviderFailed(f"TDREPORT type is 0x{data[0]:02x}, not 0x{REPORT_TYPE_TDX:02x} (TDX)")
    return TdReport(**{name: bytes(data[at:at + size]) for name, (at, size) in _FIELDS.items()})


def tdx_report(report_data: bytes, *, root: Path = Path("/"), ops: FileOps | None = None) -> TdReport:
    """This TD's TDREPORT over ``report_data`` (64 bytes).

    :class:`ProviderUnavailable` without ``/dev/tdx_guest`` (not a TD, or the tdx_guest driver is
    not loaded); :class:`ProviderFailed` if the kernel or the TDX module refuses.
    """
    if len(report_data) != REPORT_DATA_SIZE:
        raise ValueError(f"report_data must be exactly {REPORT_DATA_SIZE} bytes")
    device = Path(root) / TDX_GUEST_DEVICE
    try:
        out = device_ops(ops).ioctl(device, TDX_CMD_GET_REPORT0, bytes(report_data) + bytes(TDREPORT_SIZE))
    except OSError as exc:
        code = exc.errno or 0
        text = f"{errno.errorcode.get(code, '?')}: {os.strerror(code)}"
        if code in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            raise ProviderUnavailable(f"{device} not found ({text}): not a TDX guest, or the tdx_guest driver "
                                      "is not loaded") from None
        if code in (errno.EACCES, errno.EPERM):
            raise ProviderFailed(f"cannot open {device} ({text}): the worker needs read-write access to it") from None
        raise ProviderFailed(f"TDX_CMD_GET_REPORT0 on {device} failed ({text})") from None
    if len(out) != REPORT_DATA_SIZE + TDREPORT_SIZE:
        raise ProviderFailed(f"TDX_CMD_GET_REPORT0 returned {len(out)} bytes")
    report = parse_tdreport(out[REPORT_DATA_SIZE:])
    if report.report_data != bytes(report_data):
        raise ProviderFailed("the TDREPORT carries other report data than requested")
    return report
