"""The small state files a producer keeps in ``$ENCLAVEQ_HOME`` (epoch marks, attested pool
keys): written atomically, merged under a lock, mode 0600 in a 0700 directory.

This module owns only the file mechanics; what a file means belongs to its module
(``epochs.py``, ``pool_keys.py``)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

# Threads of one process (several sync clients) serialise here; processes on the directory lock.
PROCESS_LOCK = threading.Lock()


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: a temporary file in the same directory, fsynced, renamed."""
    fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(scratch, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(scratch)
        raise


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """An advisory lock on the directory itself (no lock file to leave behind), so that two
    processes updating one file at once both keep their change. Where flock is missing, merging
    on every write still keeps all but a simultaneous update."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


__all__ = ["PROCESS_LOCK", "directory_lock", "write_atomically"]
