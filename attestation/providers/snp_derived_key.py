"""SEV-SNP sealing: a key the AMD secure processor derives for exactly this launch image.

The guest asks the firmware with MSG_KEY_REQ (SEV-SNP Firmware ABI, "MSG_KEY_REQ" /
"MSG_KEY_RSP"), which Linux exposes as the ``SNP_GET_DERIVED_KEY`` ioctl on ``/dev/sev-guest``
(include/uapi/linux/sev-guest.h; Documentation/virt/coco/sev-guest.rst). The firmware mixes the
selected guest fields into a key derived from a root key that only the secure processor holds,
and returns it over the guest's VMPCK-encrypted channel: the host never sees it.

Request, ``struct snp_derived_key_req`` (32 bytes, little-endian)::

    offset  0  u32 root_key_select     0 = VCEK (chip-unique), 1 = VMRK (migration agent's)
    offset  4  u32 reserved            must be zero
    offset  8  u64 guest_field_select  which launch fields are mixed in (bits below)
    offset 16  u32 vmpl                must be >= the caller's current VMPL
    offset 20  u32 guest_svn           mixed in only with bit 4
    offset 24  u64 tcb_version         mixed in only with bit 5

GUEST_FIELD_SELECT bits: 0 guest POLICY, 1 IMAGE_ID, 2 FAMILY_ID, 3 MEASUREMENT, 4 GUEST_SVN,
5 TCB_VERSION. Response, ``struct snp_derived_key_resp {u8 data[64]}`` holds MSG_KEY_RSP: a u32
STATUS at 0 (0 = success, 0x16 = invalid parameters), reserved bytes up to 0x20, and the
32-byte DERIVED_KEY at 0x20.

enclaveq's choice (:data:`SEALING_FIELDS`): the VCEK root, with MEASUREMENT, guest POLICY,
FAMILY_ID and IMAGE_ID mixed in, at the VMPL this guest's reports are requested at. So only a
guest launched from exactly this image, with the same policy (debug, migration agent, SMT...)
and ID block, on this chip, re-derives the key. Neither the guest SVN nor the TCB version is
mixed in: a firmware update must not make sealed pool keys unreadable (the VCEK root itself is
still chip-bound, so sealed state never moves to another host; workers there get the keys from
a pool member instead). enclave_worker.platform stretches the key with HKDF and the measured
configuration digest, as it does for SGX.

The ioctl goes through ``ops.guest_request`` (:mod:`.fileops`, :mod:`.ioctl`) so tests replace the
device with a fake that checks every request byte (:class:`~.fakes.FakeSevGuest`). Errors are
:class:`~.errors.ProviderUnavailable` (no such device: not an SNP guest, or sev-guest not loaded)
or :class:`~.errors.ProviderFailed` (the kernel or firmware refused; the message decodes
``exitinfo2``). The response buffer is cleared after use; the returned ``bytes`` cannot be
wiped in Python, so callers keep it no longer than needed.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import ProviderFailed, ProviderUnavailable
from .fileops import FileOps, device_ops
from .ioctl import GuestRequestError, decode_exitinfo2, iowr

__all__ = [
    "DERIVED_KEY_SIZE",
    "DerivedKeyRequest",
    "FIELD_FAMILY_ID",
    "FIELD_GUEST_POLICY",
    "FIELD_GUEST_SVN",
    "FIELD_IMAGE_ID",
    "FIELD_MEASUREMENT",
    "FIELD_TCB_VERSION",
    "MSG_VERSION",
    "RESPONSE_SIZE",
    "ROOT_KEY_VCEK",
    "ROOT_KEY_VMRK",
    "SEALING_FIELDS",
    "SEV_GUEST_DEVICE",
    "SNP_GET_DERIVED_KEY",
    "parse_derived_key_response",
    "snp_derived_key",
]

SEV_GUEST_DEVICE = Path("dev/sev-guest")
SNP_GET_DERIVED_KEY = iowr("S", 0x1, 32)   # _IOWR('S', 0x1, struct snp_guest_request_ioctl) = 0xC0205301
MSG_VERSION = 1                             # the only message version; the kernel refuses 0

ROOT_KEY_VCEK = 0
ROOT_KEY_VMRK = 1

FIELD_GUEST_POLICY = 1 << 0
FIELD_IMAGE_ID = 1 << 1
FIELD_FAMILY_ID = 1 << 2
FIELD_MEASUREMENT = 1 << 3
FIELD_GUEST_SVN = 1 << 4
FIELD_TCB_VERSION = 1 << 5
_DEFINED_FIELDS = (1 << 6) - 1
SEALING_FIELDS = FIELD_MEASUREMENT | FIELD_GUEST_POLICY | FIELD_FAMILY_ID | FIELD_IMAGE_ID

_REQUEST = struct.Struct("<IIQIIQ")
REQUEST_SIZE = _REQUEST.size                # 32
RESPONSE_SIZE = 64                          # struct snp_derived_key_resp
_KEY_OFFSET = 0x20
DERIVED_KEY_SIZE = 32
assert REQUEST_SIZE == 32


@dataclass(frozen=True)
class DerivedKeyRequest:
    """One MSG_KEY_REQ. The defaults are enclaveq's sealing key request at VMPL 0."""

    field_select: int = SEALING_FIELDS
    vmpl: int = 0
    guest_svn: int = 0
    tcb_version: int = 0
    root_key_select: int = ROOT_KEY_VCEK

    def __post_init__(self) -> None:
        if self.root_key_select not in (ROOT_KEY_VCEK, ROOT_KEY_VMRK):
            raise ValueError("root_key_select must be 0 (VCEK) or 1 (VMRK)")
        if not 0 <= self.field_select <= _DEFINED_FIELDS:
            raise ValueError("guest_field_select may only set bits 0-5")
        if not 0 <= self.vmpl <= 3:
            raise ValueError("vmpl must be 0..3")
        if not 0 <= self.guest_svn < 1 << 32 or not 0 <= self.tcb_version < 1 << 64:
            raise ValueError("guest_svn is a u32 and tcb_version a u64")

    def encode(self) -> bytes:
        """``struct snp_derived_key_req``, exactly as the kernel copies it to the firmware."""
        return _REQUEST.pack(self.root_key_select, 0, self.field_select, self.vmpl, self.guest_svn, self.tcb_version)


def parse_derived_key_response(data: bytes) -> bytes:
    """The DERIVED_KEY of a MSG_KEY_RSP; :class:`ProviderFailed` if STATUS is not success."""
    if len(data) != RESPONSE_SIZE:
        raise ProviderFailed(f"SNP_GET_DERIVED_KEY returned {len(data)} bytes; MSG_KEY_RSP is {RESPONSE_SIZE}")
    status, = struct.unpack_from("<I", data, 0)
    if status != 0:
        meaning = " (invalid parameters)" if status == 0x16 else ""
        raise ProviderFailed(f"the SEV-SNP firmware refused the key request: MSG_KEY_RSP status 0x{status:x}{meaning}")
    key = bytes(data[_KEY_OFFSET:_KEY_OFFSET + DERIVED_KEY_SIZE])
    if not any(key):
        raise ProviderFailed("the SEV-SNP firmware returned an all-zero derived key")
    return key


def _errno_text(code: int) -> str:
    return f"{errno.errorcode.get(code, '?')}: {os.strerror(code)}"


def snp_derived_key(request: DerivedKeyRequest = DerivedKeyRequest(), *, root: Path = Path("/"),
                    ops: FileOps | None = None) -> bytes:
    """The 32-byte key the SEV-SNP firmware derives for ``request`` (see the module docstring)."""
    device = Path(root) / SEV_GUEST_DEVICE
    try:
        response = device_ops(ops).guest_request(device, SNP_GET_DERIVED_KEY, MSG_VERSION, request.encode(),
                                                 RESPONSE_SIZE)
    except GuestRequestError as exc:
        code = exc.errno or 0
        if code == errno.ENOTTY:
            raise ProviderFailed(f"{device} does not understand SNP_GET_DERIVED_KEY ({_errno_text(code)}): "
                                 "not the sev-guest driver, or a kernel without it") from None
        raise ProviderFailed(f"SNP_GET_DERIVED_KEY on {device} failed ({_errno_text(code)}; "
                             f"{decode_exitinfo2(exc.exitinfo2)})") from None
    except OSError as exc:
        code = exc.errno or 0
        if code in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            raise ProviderUnavailable(f"{device} not found ({_errno_text(code)}): not an SEV-SNP guest, or the "
                                      "sev-guest driver is not loaded (modprobe sev-guest)") from None
        if code in (errno.EACCES, errno.EPERM):
            raise ProviderFailed(f"cannot open {device} ({_errno_text(code)}): the worker needs read-write "
                                 "access to it (run it as root, or give its user the device)") from None
        raise ProviderFailed(f"SNP_GET_DERIVED_KEY on {device} failed ({_errno_text(code)})") from None
    return parse_derived_key_response(response)
