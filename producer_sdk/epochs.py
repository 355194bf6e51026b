"""The newest pool epoch a producer has seen, per pool, remembered across restarts (P13).

A pool's key only ever moves forward (epoch N+1 replaces N; N is erased after a grace period).
A statement at an *older* epoch than one this producer already used can only come from a worker
that missed a rotation, or from sealed state an operator rolled back; sealing new jobs to it
would hand them to a key that is retiring or was meant to be erased. So the producer keeps a
high-water mark per pool -- raised by every verified statement and by every authenticated
result that names the pool's current epoch -- and refuses any statement below it.

This module owns that mark: in memory for one client, and in a small JSON file shared by every
client of this user, so that a restarted producer still knows what it saw:

* the file is ``$ENCLAVEQ_HOME/epochs.json`` (``ENCLAVEQ_HOME`` defaults to ``~/.config/enclaveq``,
  the same rule as the command line's owner key; resolved here because libraries never import
  the ``enclaveq`` application package), or a path the caller names, or none at all;
* it is keyed by pool name: a pool deliberately deleted and created again under the same name
  starts at epoch 1 again and is refused until its entry is forgotten
  (:func:`forget_pool`, or remove the key from the file by hand -- the refusal names both);
* only marks above epoch 1 are written (every pool starts at 1, so a mark of 1 refuses nothing):
  a pool that never rotated leaves no trace on disk;
* writes are rare (once per rotation a client sees), atomic (a temporary file in the same
  directory, fsynced, renamed over the old one; mode 0600 in a 0700 directory), merged with
  what other processes wrote (highest epoch wins, under an advisory lock on the directory), and
  bounded (the :data:`MAX_POOLS` most recently raised marks are kept);
* an unreadable or corrupt file is set aside as ``epochs.json.corrupt`` with a warning and the
  marks start again from what this client sees. Refusing instead would turn a torn disk write
  into an outage of every pool; the file lives on the producer's own machine (trusted in our
  threat model, unlike the broker), so corruption is an accident, not an attack, and what is
  lost is exactly the protection a first-time client has. The in-memory mark still holds for
  the life of the client.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ._state_files import PROCESS_LOCK, directory_lock, read_state, write_atomically

log = logging.getLogger("enclaveq.producer")

ENV_HOME = "ENCLAVEQ_HOME"
DEFAULT_HOME = "~/.config/enclaveq"
FILE_NAME = "epochs.json"
FORMAT_VERSION = 1
MAX_POOLS = 1000
# 1000 entries take ~100 KB; anything far larger was not written by us.
MAX_FILE_BYTES = 1024 * 1024
FIRST_EPOCH = 1

# What a client takes as ``epoch_state``: None for the default file, False for memory only, or a path.
EpochState = str | os.PathLike[str] | Literal[False] | None


def enclaveq_home() -> Path:
    """``$ENCLAVEQ_HOME``, or ``~/.config/enclaveq`` when it is unset or empty."""
    return Path(os.environ.get(ENV_HOME) or DEFAULT_HOME).expanduser()


def default_epoch_file() -> Path:
    return enclaveq_home() / FILE_NAME


@dataclass(frozen=True)
class EpochMark:
    """The newest epoch seen for a pool, and the file it was remembered in (None: this client only)."""

    epoch: int
    file: Path | None = None


class EpochMarks:
    """High-water marks of pool epochs: this client's in memory, everybody's in ``path`` (if any)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path).expanduser() if path is not None else None
        self._clock = clock
        self._seen: dict[str, int] = {}

    def newest(self, pool: str) -> EpochMark | None:
        """The newest epoch seen for ``pool``, by this client or (from the file) any other."""
        own = self._seen.get(pool, 0)
        stored = self._load().get(pool, (0, 0))[0] if self.path is not None else 0
        if stored >= own and stored > 0:
            return EpochMark(stored, self.path)
        return EpochMark(own) if own > 0 else None

    def observe(self, pool: str, epoch: int) -> None:
        """``epoch`` is (verifiably) in use in ``pool``: raise the mark, and persist it if it rose.
        Never raises: failing to remember must not fail the job that taught us the epoch."""
        if epoch <= self._seen.get(pool, 0):
            return  # the common case (every result after a rotation says so): no I/O
        self._seen[pool] = epoch
        if self.path is None or epoch <= FIRST_EPOCH:
            return
        try:
            self._update(lambda marks: _raise(marks, pool, epoch, int(self._clock() * 1000)))
        except OSError as exc:
            log.warning("could not remember epoch %d of pool %r in %s (%s); this client still refuses older "
                        "epochs, a restarted one will not", epoch, pool, self.path, exc.strerror or exc)

    def forget(self, pool: str) -> bool:
        """Drop the mark of ``pool`` (a pool deliberately re-created under the same name)."""
        found = self._seen.pop(pool, None) is not None
        if self.path is not None and self.path.exists():
            removed: list[bool] = []
            self._update(lambda marks: removed.append(marks.pop(pool, None) is not None))
            found = found or removed[0]
        return found

    # -- the file --------------------------------------------------------------------------
    def _load(self) -> dict[str, tuple[int, int]]:
        """pool -> (epoch, when it was raised, ms); {} when missing, unreadable or corrupt."""
        assert self.path is not None
        return read_state(self.path, _parse, {}, max_bytes=MAX_FILE_BYTES, what="the remembered pool epochs",
                          consequence="rollback detection starts again from the epochs this client sees", log=log)

    def _update(self, change: Callable[[dict[str, tuple[int, int]]], Any]) -> None:
        """Read, change and atomically replace the file, under the process and directory locks."""
        assert self.path is not None
        with PROCESS_LOCK, directory_lock(self.path.parent):
            marks = self._load()
            change(marks)
            if len(marks) > MAX_POOLS:  # keep the most recently raised marks
                kept = sorted(marks.items(), key=lambda item: item[1][1], reverse=True)[:MAX_POOLS]
                marks = dict(kept)
            write_atomically(self.path, _dump(marks))


def marks_for(epoch_state: EpochState, broker_url: str) -> EpochMarks:
    """The marks a client keeps: ``False`` memory only; a path that file; ``None`` the default
    file -- except on ``memory://`` brokers, whose pools die with this process, so a mark of
    theirs on disk could only refuse the next run's fresh pool of the same name (the demo's)."""
    if epoch_state is False:
        return EpochMarks(None)
    if epoch_state is None:
        if broker_url.lower().startswith("memory://"):
            return EpochMarks(None)
        return EpochMarks(default_epoch_file())
    if isinstance(epoch_state, (str, os.PathLike)):
        return EpochMarks(epoch_state)
    raise TypeError("epoch_state must be a path, None (the default file) or False (remember nothing on disk)")


def forget_pool(pool: str, path: str | os.PathLike[str] | None = None) -> bool:
    """Forget the remembered epoch of ``pool`` (in ``path``, default ``$ENCLAVEQ_HOME/epochs.json``).

    Needed only after a pool was deliberately deleted and created again under the same name:
    its epochs start again at 1, which clients that knew the old pool refuse as a rollback.
    Returns whether there was a mark to forget."""
    return EpochMarks(default_epoch_file() if path is None else path).forget(pool)


def _raise(marks: dict[str, tuple[int, int]], pool: str, epoch: int, now_ms: int) -> None:
    if epoch > marks.get(pool, (0, 0))[0]:
        marks[pool] = (epoch, now_ms)


def _parse(data: bytes) -> dict[str, tuple[int, int]]:
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION or not isinstance(doc.get("pools"), dict):
        raise ValueError(f"not a version-{FORMAT_VERSION} epochs file")
    marks: dict[str, tuple[int, int]] = {}
    for pool, entry in doc["pools"].items():
        epoch = entry.get("epoch") if isinstance(entry, dict) else None
        seen = entry.get("seen_ms", 0) if isinstance(entry, dict) else None
        if not (type(epoch) is int and epoch >= FIRST_EPOCH and type(seen) is int):  # not bool, not float
            raise ValueError(f"bad entry for pool {pool[:64]!r}")
        marks[pool] = (epoch, seen)
    return marks


def _dump(marks: dict[str, tuple[int, int]]) -> bytes:
    pools = {pool: {"epoch": epoch, "seen_ms": seen} for pool, (epoch, seen) in sorted(marks.items())}
    return json.dumps({"version": FORMAT_VERSION, "pools": pools}, indent=1).encode() + b"\n"


__all__ = ["EpochMark", "EpochMarks", "EpochState", "default_epoch_file", "enclaveq_home", "forget_pool",
           "marks_for"]
