"""The small state files a producer keeps in ``$ENCLAVEQ_HOME`` (epoch marks, attested pool
keys): written atomically, merged under a lock, mode 0600 in a 0700 directory.

This module owns only the file mechanics; what a file means belongs to its module
(``epochs.py``, ``pool_keys.py``)."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# Threads of one process (several sync clients) serialise here; processes on the directory lock.
PROCESS_LOCK = threading.Lock()


def read_state(path: Path, parse: Callable[[bytes], T], empty: T, *, max_bytes: int, what: str, consequence: str,
               log: logging.Logger) -> T:
    """``parse`` of the file at ``path`` (read up to ``max_bytes`` + 1), or ``empty`` when it is
    missing, unreadable (warned) or refused by ``parse`` with ValueError: then it is set aside as
    ``<name>.corrupt`` and a warning says so. ``what`` names the contents ("the remembered pool
    epochs"), ``consequence`` what losing them means."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        return empty
    except OSError as exc:
        log.warning("cannot read %s in %s (%s); %s", what, path, exc.strerror or exc, consequence)
        return empty
    try:
        return parse(data)
    except ValueError as exc:
        aside = path.with_name(path.name + ".corrupt")
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        log.warning("%s in %s are unusable (%s) and were moved to %s; %s", what, path, exc, aside, consequence)
        return empty


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


__all__ = ["PROCESS_LOCK", "directory_lock", "read_state", "write_atomically"]
