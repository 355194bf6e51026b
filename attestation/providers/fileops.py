"""The few file operations the providers perform on a TEE's pseudo-filesystem.

configfs-tsm and Gramine's ``/dev/attestation`` look like files but behave like devices: a
``mkdir`` makes the kernel populate attribute files, a write is committed when the file is
*closed*, and reading ``outblob`` or ``quote`` makes the TEE produce fresh evidence. Plain files
cannot do that, so the providers go through this small interface instead of ``Path.read_bytes``:
:class:`OsFileOps` (the default) makes the real system calls; a fake that emulates the device on
an ordinary directory tree (:mod:`attestation.providers.fakes`) replaces it in tests. Existence
checks (``Path.is_dir`` / ``Path.exists``) stay plain ``pathlib`` calls on the same tree.

Two ioctls on guest devices go through the same object (:mod:`.ioctl`): ``guest_request`` (an
SEV-SNP guest request on ``/dev/sev-guest``, e.g. for a derived sealing key) and ``ioctl`` (a
flat in/out struct, e.g. TDX's ``TDX_CMD_GET_REPORT0`` on ``/dev/tdx_guest``). Callers look them
up with :func:`device_ops`, so an older fake without them falls back to the real system calls
(which, under a fake root, find no device).

Every failure is an ``OSError`` with the errno the system (or the fake) gave; the providers turn
them into :mod:`attestation.providers.errors`.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, Protocol

from .ioctl import os_guest_request, os_ioctl

__all__ = ["FileOps", "OsFileOps", "device_ops"]

_CHUNK = 64 * 1024


class FileOps(Protocol):
    def mkdir(self, path: Path) -> None: ...

    def rmdir(self, path: Path) -> None: ...

    def read(self, path: Path, limit: int) -> bytes:
        """The whole content; ``OSError(EFBIG)`` if it is longer than ``limit`` bytes."""
        ...

    def write(self, path: Path, data: bytes) -> None:
        """Write ``data`` to an *existing* file from offset 0, then close it."""
        ...

    def ioctl(self, path: Path, request: int, arg: bytes) -> bytes:
        """A read-write ioctl with a flat struct argument; returns the struct afterwards."""
        ...

    def guest_request(self, path: Path, request: int, msg_version: int, req: bytes, resp_size: int) -> bytes:
        """An SEV-SNP guest request; :class:`~.ioctl.GuestRequestError` on failure."""
        ...


class OsFileOps:
    """The real system calls, as the kernel ABIs expect them."""

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o700)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def read(self, path: Path, limit: int) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks: list[bytes] = []
            total = 0
            while True:
                chunk = os.read(fd, _CHUNK)
                if not chunk:
                    return b"".join(chunks)
                total += len(chunk)
                if total > limit:
                    raise OSError(errno.EFBIG, f"more than {limit} bytes", str(path))
                chunks.append(chunk)
        finally:
            os.close(fd)

    def write(self, path: Path, data: bytes) -> None:
        # No O_CREAT: the attribute exists, or this is not the device we think it is (creating a
        # plain file would only hide that). No O_TRUNC: configfs and Gramine attributes are not
        # truncatable. configfs commits a binary attribute on close() and cannot report an error
        # there, which is why the configfs-tsm provider also checks `generation`.
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        finally:
            os.close(fd)

    def ioctl(self, path: Path, request: int, arg: bytes) -> bytes:
        return os_ioctl(path, request, arg)

    def guest_request(self, path: Path, request: int, msg_version: int, req: bytes, resp_size: int) -> bytes:
        return os_guest_request(path, request, msg_version, req, resp_size)


def device_ops(ops: Any) -> Any:
    """``ops`` if it can make device ioctls, else the real system calls (:class:`OsFileOps`)."""
    if ops is not None and hasattr(ops, "ioctl") and hasattr(ops, "guest_request"):
        return ops
    return OsFileOps()
