"""How ``submit`` packs jobs into frames (protocol.frames): the settings, and the packer.

A frame closes when it holds ``max_jobs`` jobs, when the next job would take it past
``max_bytes``, when ``linger`` seconds passed since its first job (checked as jobs arrive), or
when the batch would otherwise wait: at its end, and before ``submit`` blocks on its in-flight
window -- jobs never sit in an open frame while nothing else can happen. Kafka's producer
(``batch.size``, ``linger.ms``) is the model: frames fill up when jobs come fast and leave at once
when they do not.

The defaults keep several frames in flight: with the window of ``max_in_flight`` jobs, a frame
holds at most a quarter of it, so the worker is never idle while the producer seals the next
frame and the broker carries the last answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.frames import MAX_FRAME_JOBS, FramedJob

# A frame's bytes beyond its jobs' bodies: the envelope, header and per-job framing.
_FRAME_OVERHEAD = 1024
_PER_JOB_OVERHEAD = 48


@dataclass(frozen=True)
class FrameSettings:
    """``max_jobs`` per frame (None: a quarter of the in-flight window, at most 64), ``max_bytes``
    of job bodies per frame (kept under the pool's message limit), ``linger`` seconds a frame
    waits for more jobs once it has one."""

    max_jobs: int | None = None
    max_bytes: int = 512 * 1024
    linger: float = 0.005

    def __post_init__(self) -> None:
        if self.max_jobs is not None and not 1 <= self.max_jobs <= MAX_FRAME_JOBS:
            raise ValueError(f"max_jobs must be between 1 and {MAX_FRAME_JOBS}")
        if self.max_bytes < 1024:
            raise ValueError("max_bytes must be at least 1024")
        if self.linger < 0:
            raise ValueError("linger must not be negative")

    def jobs_per_frame(self, window: int) -> int:
        if self.max_jobs is not None:
            return self.max_jobs
        return max(1, min(64, window // 4))


@dataclass
class Frame:
    """An open frame: the jobs (with their batch index) it holds so far."""

    jobs: list[FramedJob] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)
    size: int = _FRAME_OVERHEAD
    opened: float = 0.0


class FramePacker:
    """Collects jobs into frames; ``add`` returns the frames it closed (at most two)."""

    def __init__(self, settings: FrameSettings, window: int, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_jobs = settings.jobs_per_frame(window)
        self.max_bytes = settings.max_bytes
        self.linger = settings.linger
        self._clock = clock
        self._open = Frame()

    def add(self, index: int, job: FramedJob) -> list[Frame]:
        closed: list[Frame] = []
        cost = len(job.body) + len(job.job_id) + _PER_JOB_OVERHEAD
        if self._open.jobs and self._open.size + cost > self.max_bytes:
            closed.append(self.flush())
        if not self._open.jobs:
            self._open.opened = self._clock()
        self._open.jobs.append(job)
        self._open.indexes.append(index)
        self._open.size += cost
        if len(self._open.jobs) >= self.max_jobs or self._clock() - self._open.opened >= self.linger:
            closed.append(self.flush())
        return [frame for frame in closed if frame.jobs]

    def flush(self) -> Frame:
        """Close the open frame (possibly empty) and start a new one."""
        frame, self._open = self._open, Frame()
        return frame


__all__ = ["FramePacker", "FrameSettings"]
