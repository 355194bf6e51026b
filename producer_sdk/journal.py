"""BatchJournal: what lets a batch submitted with ``submit(..., resume=journal)`` finish after its
producer process died mid-batch (SIGKILL, a closed laptop, a lost session) -- issue 16, fault 3.

A journal is one append-only file of JSON lines (created 0600, never opened through a symlink):

* a header: the format, the pool and model of the batch, a name for its contents (``batch``, e.g.
  a digest of a file list: a journal of another batch is refused), and the name of the batch's
  own reply queue -- durable, so results wait there while nobody listens, and expiring after
  ``queue_expiry`` seconds unused (AMQP ``x-expires``), so a batch abandoned for good leaves
  nothing behind on the broker;
* every session requests were sealed under: its id, epoch, sealed session *and key*. The key
  opens every job and result of the batch, so the file is exactly as secret as the inputs and
  results the caller keeps next to it; it is deleted with the batch (:meth:`discard`);
* every request before it is published: its id, whether it is a frame, its session, deadline,
  and the batch index and job id of each job in it;
* every request whose answer reached this process, and every job whose result the caller kept.

What a resumed submit does with it (``AsyncClient.submit``): it opens the batch's reply queue with
the old sessions restored, so results that arrived while the producer was down are opened and
yielded; it skips kept jobs; a request sent but never answered is sent *again under its own
session, id and deadline* -- a worker that already ran it drops the copy (its replay guard, P5)
while the result waiting in the reply queue is taken, a worker that never got it runs it once;
a request answered to the dead process but not kept, one whose deadline is too near, or one that
gets no answer by its deadline, is sent as new jobs (run again: its first result is lost).

Records reach the operating system before the request they describe is published, so a killed
process loses none; a machine crash may lose the last few, and those jobs are then sent as new
ones -- at worst run twice, yielded once. This module only keeps the records; the client acts.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BatchJournalError

JOURNAL_FORMAT = "enclaveq-batch-journal/v1"
# A reply queue unused for this long (no consumer, no redeclare) is deleted by RabbitMQ: long
# enough for a laptop closed overnight, short enough that abandoned batches do not pile up.
DEFAULT_QUEUE_EXPIRY = 24 * 3600.0
# Every record is small: a frame of MAX_FRAME_JOBS job ids is ~10 KiB. A longer line is damage.
_MAX_LINE = 256 * 1024


@dataclass(frozen=True)
class SessionRecord:
    """A session the batch's requests were sealed under (its key opens their results)."""

    session_id: bytes
    epoch: int
    sealed_session: bytes
    key: bytes

    def __repr__(self) -> str:  # never show the key
        return f"SessionRecord(session_id={self.session_id.hex()}, epoch={self.epoch})"


@dataclass(frozen=True)
class SentRequest:
    """One published request of the batch: a frame of jobs, or one job alone (``framed`` False)."""

    request_id: str
    framed: bool
    session_id: bytes
    deadline_ms: int
    jobs: tuple[tuple[int, str], ...]  # (batch index, job id), in the frame's order

    @property
    def job_ids(self) -> list[str]:
        return [job_id for _, job_id in self.jobs]


@dataclass(frozen=True)
class ResumePlan:
    """What a resumed submit does with the jobs the journal knows and the caller did not keep."""

    resend: tuple[SentRequest, ...]  # sent, never answered: send again under the same id
    fresh: frozenset[int]  # answered to a dead process, or past their deadline: send as new jobs


class BatchJournal:
    """The durable record of one batch (see the module docstring).

    ``path``: the journal file, created on first use (its directory must exist). ``batch``: a name
    for the batch's contents; a journal written for another is refused. ``auto_keep``: a result
    counts as kept once the caller asks for the next one (True) -- so the result a caller was
    handling when it stopped is yielded again by the next run (at least once, never lost); with
    False the caller calls :meth:`kept` itself once the result is stored (the CLI: once its file
    is written). A result yielded but not kept before a crash is computed again. Thread-safe."""

    def __init__(self, path: str | os.PathLike[str], *, batch: str | None = None, auto_keep: bool = True,
                 queue_expiry: float = DEFAULT_QUEUE_EXPIRY) -> None:
        if queue_expiry <= 0:
            raise ValueError("queue_expiry must be positive")
        self.path = Path(path)
        self.batch = batch
        self.auto_keep = auto_keep
        self.queue_expiry = queue_expiry
        self.pool: str | None = None
        self.model_id: str | None = None
        self.reply_queue: str | None = None
        self._sessions: dict[bytes, SessionRecord] = {}
        self._latest: dict[int, SentRequest] = {}  # batch index -> the last request that carried it
        self._answered: set[str] = set()
        self._kept: set[int] = set()
        self._lock = threading.Lock()
        self._fd: int | None = None
        # What the last submit over this journal did (set by the client, read by callers).
        self.collected = self.resent = self.sent_anew = 0
        if os.path.lexists(self.path):
            self._load()

    # -- state -----------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self.reply_queue is not None

    def sessions(self) -> list[SessionRecord]:
        with self._lock:
            return list(self._sessions.values())

    def is_kept(self, index: int) -> bool:
        return index in self._kept

    @property
    def jobs_sent(self) -> int:
        """How many of the batch's jobs some request carried."""
        return len(self._latest)

    def plan(self) -> ResumePlan:
        """The jobs sent before and not kept, split into requests to send again under their own id
        and jobs to send anew."""
        with self._lock:
            resend: dict[str, SentRequest] = {}
            fresh: set[int] = set()
            for index, request in self._latest.items():
                if index in self._kept:
                    continue
                if request.request_id in self._answered:
                    fresh.add(index)
                else:
                    resend[request.request_id] = request
            return ResumePlan(resend=tuple(resend.values()), fresh=frozenset(fresh))

    # -- records ---------------------------------------------------------------------------
    def start(self, *, pool: str, model_id: str, reply_queue: str) -> None:
        """Begin the journal of a new batch (the file must not exist)."""
        with self._lock:
            if self.reply_queue is not None:
                raise BatchJournalError(f"{self.path}: the journal has already begun")
            self.pool, self.model_id, self.reply_queue = pool, model_id, reply_queue
            self._append({"format": JOURNAL_FORMAT, "pool": pool, "model": model_id, "batch": self.batch,
                          "reply_queue": reply_queue}, create=True)
            for index in sorted(self._kept):  # kept before the journal began
                self._append({"kept": index})

    def check(self, *, pool: str, model_id: str) -> None:
        """Refuse to resume a journal of another pool, model or batch."""
        for what, held, given in (("pool", self.pool, pool), ("model", self.model_id, model_id)):
            if held != given:
                raise BatchJournalError(f"{self.path} is the journal of a batch for {what} {held!r}, not {given!r}")

    def record_session(self, record: SessionRecord) -> None:
        with self._lock:
            if record.session_id in self._sessions:
                return
            self._sessions[record.session_id] = record
            self._append({"session": [record.session_id.hex(), record.epoch, _b64(record.sealed_session),
                                      record.key.hex()]})

    def record_sent(self, request: SentRequest) -> None:
        """Call before publishing ``request``."""
        with self._lock:
            for index, _ in request.jobs:
                self._latest[index] = request
            self._append({"sent": [request.request_id, request.framed, request.session_id.hex(), request.deadline_ms,
                                   [list(job) for job in request.jobs]]})

    def record_answered(self, request_id: str) -> None:
        """The answer to ``request_id`` reached this process (and left the reply queue)."""
        with self._lock:
            if request_id not in self._answered:
                self._answered.add(request_id)
                self._append({"answered": request_id})

    def kept(self, *indexes: int) -> None:
        """The caller stored the results of jobs ``indexes`` (or no longer wants them): never sent
        again. Many at once cost one write (a line per job, as one record each)."""
        with self._lock:
            new = [index for index in dict.fromkeys(indexes) if index not in self._kept]
            if not new:
                return
            self._kept.update(new)
            if self.reply_queue is not None:  # else written when the journal begins
                self._append(*({"kept": index} for index in new))

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def discard(self) -> None:
        """The batch is done with: delete the journal (and the session keys in it)."""
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # -- the file --------------------------------------------------------------------------
    def _append(self, *records: dict[str, Any], create: bool = False) -> None:
        if self._fd is None:
            flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
            if create:
                flags |= os.O_CREAT | os.O_EXCL
            try:
                self._fd = os.open(self.path, flags, 0o600)
            except FileExistsError:
                raise BatchJournalError(f"{self.path} exists already: not a new journal") from None
            except OSError as exc:
                raise BatchJournalError(f"{self.path}: cannot write the batch journal "
                                        f"({exc.strerror or type(exc).__name__})") from None
        lines = "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records).encode()
        try:
            # One write per call: O_APPEND keeps records whole and in order; the OS holds them once
            # write returns, so a killed process loses nothing (fsync would guard against a machine
            # crash too, at ~1 ms a record; losing the last records only makes jobs run anew).
            view = memoryview(lines)
            while view:  # a regular file takes it whole; a short write is finished, never repeated
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            raise BatchJournalError(f"{self.path}: cannot write the batch journal "
                                    f"({exc.strerror or type(exc).__name__})") from None

    def _load(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise BatchJournalError(f"{self.path}: cannot read the batch journal "
                                    f"({exc.strerror or type(exc).__name__}; a symlink is refused)") from None
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise BatchJournalError(f"{self.path}: not a regular file")
            data = file.read()
        lines = data.split(b"\n")
        # The last line has no newline when the process died while writing it: that record never
        # described a published request (it was written first), so it is dropped.
        complete = lines[:-1]
        for number, line in enumerate(complete, start=1):
            try:
                if len(line) > _MAX_LINE:
                    raise ValueError("line too long")
                self._take(json.loads(line), first=number == 1)
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                raise BatchJournalError(f"{self.path}: line {number} is not a batch journal record ({exc}); "
                                        "remove the file to start the batch over") from None
        if self.reply_queue is None:
            if complete:
                raise BatchJournalError(f"{self.path}: not a batch journal")
            return  # created, then killed before the header was whole: a new journal
        if lines[-1]:
            self._truncate(len(data) - len(lines[-1]))

    def _take(self, record: Any, *, first: bool) -> None:
        if not isinstance(record, dict):
            raise ValueError("not an object")
        if first:
            if record.get("format") != JOURNAL_FORMAT:
                raise ValueError(f"format is not {JOURNAL_FORMAT}")
            if self.batch is not None and record["batch"] != self.batch:
                raise BatchJournalError(f"{self.path} is the journal of another batch (its inputs changed)")
            self.pool, self.model_id, self.reply_queue = (_str(record["pool"]), _str(record["model"]),
                                                          _str(record["reply_queue"]))
            return
        ((kind, value),) = record.items()
        if kind == "session":
            sid, epoch, sealed, key = value
            session = SessionRecord(bytes.fromhex(sid), _int(epoch), base64.b64decode(sealed, validate=True),
                                    bytes.fromhex(key))
            self._sessions[session.session_id] = session
        elif kind == "sent":
            request_id, framed, sid, deadline, jobs = value
            request = SentRequest(_str(request_id), bool(framed), bytes.fromhex(sid), _int(deadline),
                                  tuple((_int(index), _str(job_id)) for index, job_id in jobs))
            if not request.jobs:
                raise ValueError("a request without jobs")
            for index, _ in request.jobs:
                self._latest[index] = request
        elif kind == "answered":
            self._answered.add(_str(value))
        elif kind == "kept":
            self._kept.add(_int(value))
        else:
            raise ValueError(f"unknown record {kind!r}")

    def _truncate(self, size: int) -> None:
        """Cut a torn last record, so the next one starts on a line of its own."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        except OSError as exc:
            raise BatchJournalError(f"{self.path}: cannot repair the batch journal "
                                    f"({exc.strerror or type(exc).__name__})") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a string")
    return value


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("expected a non-negative integer")
    return value


__all__ = ["BatchJournal", "BatchJournalError", "DEFAULT_QUEUE_EXPIRY", "ResumePlan", "SentRequest",
           "SessionRecord"]
