"""Replay refusal (P5, issue 9 item 13): the jobs this worker already answered, kept until their
deadlines, bounded in memory, and sealed to disk so that a restart does not forget them.

* :class:`SeenJobs` -- in memory. A job is remembered from the moment its result was published
  (never before: a job whose worker died before publishing must run when it is redelivered)
  until its deadline; after the deadline the worker refuses it as expired anyway. A min-heap by
  deadline prunes expired entries in O(log n) per job. The set holds at most ``max_entries``;
  beyond that the entries answered longest ago go first (not the ones expiring soonest, which a
  flood of jobs with far deadlines could exploit to push out everyone else's). A copy that arrives while the job is
  still running waits for that run's outcome (:meth:`SeenJobs.wait_while_running`).
* :class:`SeenJournal` -- on disk, in the worker's sealed state. Every flush (the worker flushes
  about once a second when something changed, in a thread) seals the entries added since the
  previous flush as one new *segment*; a segment whose newest deadline has passed is deleted
  whole; when more than ``MAX_SEGMENTS`` are live they are merged into one. At start the worker
  loads every segment and drops what expired. So a flush costs O(entries since the last flush),
  never O(the whole set).

What remains replayable (stated in docs/protocol.md):

* a job answered in the last flush interval (~1 s) before the worker process was killed
  without stopping (a clean stop flushes);
* a job forgotten because more than ``MAX_SEEN_JOBS`` jobs with later deadlines were answered
  before its own deadline;
* every job, on *another* member: each member keeps its own set, so a recorded job replayed to
  the N members of a pool within its deadline runs at most once per member (at most N times);
* every job, when whoever controls the disk deletes or rolls back the state directory (sealing
  stops forgery, not deletion; see the rollback notes), and on a TEE whose sealing key does not
  survive a restart (TDX, Nitro): its segments no longer unseal, so a restart forgets them.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
from collections.abc import Iterable

from .sealed_state import SealedState

log = logging.getLogger("enclaveq.worker")

# At ~1,500 jobs/s per worker and the SDK's default 120 s deadline, ~180,000 entries are live;
# this leaves room for five times that. Measured: ~230 bytes per entry, so at most ~230 MB.
MAX_SEEN_JOBS = 1_000_000
MAX_SEGMENTS = 256

JobKey = bytes


def job_key(session_id: bytes, job_id: str) -> JobKey:
    """One bytes key per (session, job). Session ids have a fixed length, so the concatenation
    is unambiguous."""
    return session_id + job_id.encode()


class SeenJobs:
    """Jobs already answered, each kept until its deadline (see the module docstring)."""

    def __init__(self, max_entries: int = MAX_SEEN_JOBS) -> None:
        self._max = max_entries
        self._deadlines: dict[JobKey, int] = {}
        self._by_deadline: list[tuple[int, JobKey]] = []  # a heap by deadline (may hold evicted keys)
        self._fresh: list[tuple[JobKey, int]] = []  # added since the journal last took them
        # Jobs being run right now, each with an event once another copy waits for its outcome.
        self._running: dict[JobKey, asyncio.Event | None] = {}
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._deadlines)

    def contains(self, key: JobKey) -> bool:
        """Whether the job was answered (and its deadline has not passed)."""
        return key in self._deadlines

    def running(self, key: JobKey) -> bool:
        return key in self._running

    async def wait_while_running(self, key: JobKey) -> None:
        """Return once no copy of the job is being run. A copy that arrives while another runs
        (a replay published the moment the job crossed the broker, or a redelivery after a lost
        connection) waits for that run's outcome: answered, it is a duplicate; not answered (the
        result could not be published), it must run. Returns at once in the usual case."""
        while key in self._running:
            event = self._running[key]
            if event is None:
                event = self._running[key] = asyncio.Event()
            await event.wait()

    def start(self, key: JobKey) -> None:
        """A run of the job begins (the caller checked :meth:`wait_while_running` and
        :meth:`contains` without yielding since)."""
        self._running[key] = None

    def finish(self, key: JobKey, deadline_ms: int, now_ms: int, *, answered: bool) -> None:
        """The job's run ended; remember it if its answer went out (``answered``)."""
        event = self._running.pop(key, None)
        if answered:
            self.add(key, deadline_ms, now_ms)
        if event is not None:
            event.set()

    def add(self, key: JobKey, deadline_ms: int, now_ms: int) -> None:
        if deadline_ms < now_ms or key in self._deadlines:
            return  # past its deadline every copy is refused as expired: nothing to remember
        self._deadlines[key] = deadline_ms
        heapq.heappush(self._by_deadline, (deadline_ms, key))
        self._fresh.append((key, deadline_ms))
        self._prune(now_ms)

    def _prune(self, now_ms: int) -> None:
        heap, deadlines = self._by_deadline, self._deadlines
        while heap and heap[0][0] < now_ms:
            deadline, key = heapq.heappop(heap)
            if deadlines.get(key) == deadline:  # not already evicted
                del deadlines[key]
        while len(deadlines) > self._max:
            # Over the cap, the entry answered *longest ago* goes (dicts keep insertion order), not
            # the one expiring soonest: a producer that sends a flood of jobs with far deadlines
            # must then keep outpacing the worker itself to push out anyone else's recent entry.
            del deadlines[next(iter(deadlines))]
            self.evicted += 1
        if len(heap) > 2 * self._max:  # heap entries of evicted keys: drop them all at once
            self._by_deadline = [(d, k) for k, d in deadlines.items()]
            heapq.heapify(self._by_deadline)

    # -- for the journal ----------------------------------------------------------------------
    def take_fresh(self) -> list[tuple[JobKey, int]]:
        fresh, self._fresh = self._fresh, []
        return fresh

    def give_back_fresh(self, entries: list[tuple[JobKey, int]]) -> None:
        """A flush failed: these go out with the next one (at most the set's size of them, so a
        disk that keeps failing does not make this grow without end)."""
        self._fresh[:0] = entries
        if len(self._fresh) > self._max:
            del self._fresh[:len(self._fresh) - self._max]

    def restore(self, entries: Iterable[tuple[JobKey, int]], now_ms: int) -> None:
        """Entries loaded from sealed state at start (not fresh: they are on disk already)."""
        for key, deadline_ms in entries:
            if deadline_ms >= now_ms and key not in self._deadlines:
                self._deadlines[key] = deadline_ms
                self._by_deadline.append((deadline_ms, key))
        heapq.heapify(self._by_deadline)
        self._prune(now_ms)


class SeenJournal:
    """The sealed segments of :class:`SeenJobs` on disk. Its methods block (file I/O, sealing):
    the worker calls them in a thread, one at a time.

    Segment names start with a random id of this journal, so workers that share a state
    directory (simulated workers started with one ``--sim-dir``) never overwrite each other's
    segments; each loads all of them at start, and deletes or merges only whole segments whose
    entries it has read, so none is lost."""

    def __init__(self, state: SealedState, max_segments: int = MAX_SEGMENTS, *, writer: str | None = None) -> None:
        self._state = state
        self._max_segments = max_segments
        self._writer = writer or os.urandom(4).hex()
        self._segments: dict[str, int] = {}  # segment name -> its latest deadline
        self._next = 0

    @property
    def segments(self) -> int:
        return len(self._segments)

    def load(self, now_ms: int) -> list[tuple[JobKey, int]]:
        """Every unexpired entry on disk; expired segments are deleted. A segment that does not
        unseal is skipped with a warning: it tells nothing this worker could use, and refusing
        to start would protect nothing (whoever can corrupt a file can delete it)."""
        live: list[tuple[JobKey, int]] = []
        for name, entries in self._state.iter_seen_segments():
            if entries is None:
                log.warning("replay-guard segment %s does not unseal with this worker's sealing key; "
                            "skipped (jobs it recorded could be replayed to this worker)", name)
                continue
            latest = max((d for _, d in entries), default=-1)
            if latest < now_ms:
                self._state.delete_seen_segment(name)
                continue
            self._segments[name] = latest
            live.extend(e for e in entries if e[1] >= now_ms)
        return live

    def flush(self, fresh: list[tuple[JobKey, int]], now_ms: int) -> None:
        """Seal ``fresh`` as a new segment; delete expired segments; merge when too many."""
        if fresh:
            self._write(fresh)
        for name, latest in list(self._segments.items()):
            if latest < now_ms:
                self._state.delete_seen_segment(name)
                del self._segments[name]
        if len(self._segments) > self._max_segments:
            self._merge(now_ms)

    def _write(self, entries: list[tuple[JobKey, int]]) -> None:
        name = f"{self._writer}-{self._next:012d}"
        self._next += 1
        self._state.save_seen_segment(name, entries)
        self._segments[name] = max(d for _, d in entries)

    def _merge(self, now_ms: int) -> None:
        old = set(self._segments)
        merged = [e for name, entries in self._state.iter_seen_segments() if name in old and entries
                  for e in entries if e[1] >= now_ms]
        if merged:
            self._write(merged)  # written before the old ones go: a crash in between keeps both
        for name in old:
            self._state.delete_seen_segment(name)
            del self._segments[name]
        log.info("merged %d replay-guard segments into one (%d live jobs)", len(old), len(merged))
