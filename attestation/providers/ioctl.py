"""The two Linux ioctls a worker makes on its TEE's guest device, and nothing else.

- SEV-SNP ``/dev/sev-guest``: a *guest request* (``SNP_GET_DERIVED_KEY`` here) takes a
  ``struct snp_guest_request_ioctl`` that *points* at a request and a response buffer
  (include/uapi/linux/sev-guest.h)::

      struct snp_guest_request_ioctl {
          __u8  msg_version;        /* must be non-zero; 1 today        offset 0  */
          __u64 req_data;           /* address of the request struct   offset 8  */
          __u64 resp_data;          /* address of the response struct  offset 16 */
          union { __u64 exitinfo2;  /* bits 31:0 firmware error,       offset 24 */
                  struct { __u32 fw_error; __u32 vmm_error; }; };  /* 63:32 VMM error */
      };                            /* 32 bytes on x86-64 */

  The kernel sets ``exitinfo2`` to SEV_RET_NO_FW_CALL before it starts and copies the struct
  back to user space whenever ``exitinfo2`` is non-zero -- on failure too -- so the caller
  learns *why* the firmware refused. :func:`os_guest_request` therefore calls ``ioctl(2)``
  through ctypes (``fcntl.ioctl`` does not copy a small buffer back when the call fails).
- TDX ``/dev/tdx_guest``: ``TDX_CMD_GET_REPORT0`` takes ``struct tdx_report_req {__u8
  reportdata[64]; __u8 tdreport[1024];}`` in place (include/uapi/linux/tdx-guest.h): no
  pointers, so :func:`os_ioctl` is ``fcntl.ioctl`` on a mutable buffer.

Both are reached through a :class:`~attestation.providers.fileops.FileOps` (``guest_request``,
``ioctl``), so tests replace the device with a fake that checks the bytes it is given
(:mod:`attestation.providers.fakes`). Errors are ``OSError`` with the errno; a failed guest
request is a :class:`GuestRequestError` that also carries ``exitinfo2``.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
from pathlib import Path

__all__ = [
    "GuestRequestError",
    "SNP_GUEST_REQUEST_IOCTL",
    "decode_exitinfo2",
    "encode_guest_request_ioctl",
    "iowr",
    "os_guest_request",
    "os_ioctl",
]

# <asm-generic/ioctl.h>: nr bits 0-7, type 8-15, size 16-29, direction 30-31 (write 1, read 2).
_IOC_WRITE, _IOC_READ = 1, 2


def iowr(kind: str, nr: int, size: int) -> int:
    """``_IOWR(kind, nr, size)``: a read-write ioctl request number."""
    if not 0 <= size < 1 << 14 or not 0 <= nr < 256 or len(kind) != 1:
        raise ValueError("ioctl size, number or type out of range")
    return ((_IOC_READ | _IOC_WRITE) << 30) | (size << 16) | (ord(kind) << 8) | nr


class _SnpGuestRequestIoctl(ctypes.Structure):
    _fields_ = [("msg_version", ctypes.c_uint8), ("req_data", ctypes.c_uint64),
                ("resp_data", ctypes.c_uint64), ("exitinfo2", ctypes.c_uint64)]


SNP_GUEST_REQUEST_IOCTL = struct.Struct("<B7xQQQ")
assert SNP_GUEST_REQUEST_IOCTL.size == 32
# On x86-64 (the only architecture with SEV-SNP) ctypes lays the struct out as the C compiler does.
assert ctypes.sizeof(_SnpGuestRequestIoctl) == SNP_GUEST_REQUEST_IOCTL.size

# exitinfo2 before any firmware call: SEV_RET_NO_FW_CALL (-1) since Linux 6.8, 0xff before.
_NO_FW_CALL = (0xFFFFFFFFFFFFFFFF, 0xFFFFFFFF, 0xFF)
_VMM_ERRORS = {1: "SNP_GUEST_VMM_ERR_INVALID_LEN", 2: "SNP_GUEST_VMM_ERR_BUSY (the host is throttling guest requests)"}
# Firmware status codes (SEV-SNP firmware ABI "Status Codes"; Linux psp-sev.h SEV_RET_*) that a
# key request can meet; any other code is printed as a number.
_FW_ERRORS = {0x16: "INVALID_PARAM (the firmware refused a field of the request)",
              0x15: "UNSUPPORTED", 0x17: "RESOURCE_LIMIT"}


def encode_guest_request_ioctl(msg_version: int, req_data: int, resp_data: int, exitinfo2: int = 0) -> bytes:
    """The 32 bytes of ``struct snp_guest_request_ioctl`` (little-endian, x86-64 padding)."""
    return SNP_GUEST_REQUEST_IOCTL.pack(msg_version, req_data, resp_data, exitinfo2)


def decode_exitinfo2(exitinfo2: int) -> str:
    """What a failed guest request's ``exitinfo2`` says, in words (for error messages)."""
    if exitinfo2 in _NO_FW_CALL or exitinfo2 == 0:
        return "the request did not reach the firmware"
    vmm, fw = exitinfo2 >> 32, exitinfo2 & 0xFFFFFFFF
    parts = []
    if vmm:
        parts.append(f"host (VMM) error {vmm}" + (f" {_VMM_ERRORS[vmm]}" if vmm in _VMM_ERRORS else ""))
    if fw:
        parts.append(f"firmware error 0x{fw:x}" + (f" {_FW_ERRORS[fw]}" if fw in _FW_ERRORS else ""))
    return ", ".join(parts)


class GuestRequestError(OSError):
    """An SEV-SNP guest request ioctl failed: ``errno`` from the kernel plus its ``exitinfo2``."""

    def __init__(self, errno_: int, strerror: str, filename: str, *, exitinfo2: int = 0) -> None:
        super().__init__(errno_, strerror, filename)
        self.exitinfo2 = exitinfo2


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
        libc.ioctl.restype = ctypes.c_int
        _LIBC = libc
    return _LIBC


def os_guest_request(device: Path, request: int, msg_version: int, req: bytes, resp_size: int) -> bytes:
    """One SEV-SNP guest request on ``device``: ``req`` in, ``resp_size`` bytes out.

    ``OSError`` if the device cannot be opened; :class:`GuestRequestError` (errno and
    ``exitinfo2``) if the ioctl fails. The response buffer is zeroed after it is copied out.
    """
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    req_buf = ctypes.create_string_buffer(bytes(req), len(req))
    resp_buf = ctypes.create_string_buffer(resp_size)
    try:
        arg = _SnpGuestRequestIoctl(msg_version, ctypes.addressof(req_buf), ctypes.addressof(resp_buf), 0)
        if _libc().ioctl(fd, request, ctypes.byref(arg)) < 0:
            err = ctypes.get_errno()
            raise GuestRequestError(err, os.strerror(err), str(device), exitinfo2=arg.exitinfo2)
        return resp_buf.raw
    finally:
        ctypes.memset(resp_buf, 0, resp_size)
        os.close(fd)


def os_ioctl(device: Path, request: int, arg: bytes) -> bytes:
    """A read-write ioctl whose argument is a flat struct (no pointers): ``arg`` in, the
    struct as the kernel left it out. ``OSError`` on failure."""
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        buf = bytearray(arg)
        fcntl.ioctl(fd, request, buf, True)
        return bytes(buf)
    finally:
        os.close(fd)
