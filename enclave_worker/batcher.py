"""Dynamic batching: jobs waiting for the same model run as one ONNX Runtime call.

This module owns the jobs that wait to run, when a batch leaves, the runner threads that run
batches, and splitting a batch's outputs back into each job's result. The semantics are those of
Triton's dynamic batcher:

- jobs queue per *batch key*: the model, the outputs asked for, and each input's dtype and
  shape beyond axis 0. Only jobs with equal keys can be concatenated, so a batch never mixes
  models, output sets or shapes, whichever frames, messages or producers the jobs came from;
- a batch leaves when a runner is free and either it reached ``max_batch_rows``, or a preferred
  size (``preferred_batch_rows``), or its oldest job waited ``max_queue_delay_us``. With no
  delay (the default) a batch is whatever queued while the runners were busy: no job ever waits
  for company, and batches grow exactly when the worker is loaded;
- ``runners`` ONNX Runtime calls run at once, one per core by default, each single-threaded
  (``WorkerConfig.intra_op_threads``): the cores are used without oversubscribing them,
  however many jobs are in flight.

Only models that :mod:`enclave_worker.batchability` proves row-independent are batched (a model
that mixes rows would let one job observe another's data and change its result); every other
model, and every job larger than ``max_batch_rows``, runs alone through the same queue and
runners. If a batched call fails or returns outputs whose leading dimension is not the batch's,
each job of the batch runs again alone, so one bad job fails alone and no job gets a slice that
is not its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from protocol.bodies import ErrorCode

from .errors import JobRejected
from .models import LoadedModel, check_inputs

log = logging.getLogger("enclaveq.worker")

T = TypeVar("T")
Outputs = dict[str, np.ndarray]

# A model known to answer this fast on an input this small runs on the event loop: handing it to
# a thread (executor queue, wake-up, GIL hand-offs) costs several times more CPU than the
# inference itself. Everything else runs on a runner thread, which lets a slow model use every
# core while the loop keeps serving the broker.
INLINE_INFERENCE_SECONDS = 0.0005
INLINE_INFERENCE_BYTES = 64 * 1024


@dataclass(frozen=True)
class BatchSettings:
    """When a batch leaves. ``max_batch_rows`` 1 turns batching off."""

    max_batch_rows: int = 64
    max_queue_delay_us: int = 0
    preferred_batch_rows: tuple[int, ...] = ()
    runners: int = field(default_factory=lambda: os.cpu_count() or 1)

    def __post_init__(self) -> None:
        if self.max_batch_rows < 1 or self.max_queue_delay_us < 0 or self.runners < 1:
            raise ValueError("a batch holds at least one row, waits no negative time, and needs a runner")
        if any(p < 1 or p > self.max_batch_rows for p in self.preferred_batch_rows):
            raise ValueError("preferred batch sizes must lie between 1 and max_batch_rows")


@dataclass
class _Job(Generic[T]):
    inputs: dict[str, np.ndarray]
    rows: int
    nbytes: int
    finish: Callable[[Outputs], T]
    future: asyncio.Future[T]
    queued_at: float


@dataclass
class _Queue:
    """The jobs waiting under one batch key, oldest first."""

    model: LoadedModel
    names: list[str]  # the outputs to compute, in order
    batchable: bool
    jobs: list[_Job[Any]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(job.rows for job in self.jobs)


class Batcher:
    """Runs jobs, batched where the model allows it. One per worker; :meth:`close` at stop."""

    def __init__(self, settings: BatchSettings | None = None, *, clock: Callable[[], float] = time.monotonic,
                 on_batch: Callable[[int], None] | None = None,
                 on_inference: Callable[[float], None] | None = None) -> None:
        self.settings = settings or BatchSettings()
        self._clock = clock
        self._on_batch = on_batch or (lambda rows: None)
        # Seconds each batch took from leaving the queue to its results (metrics).
        self._on_inference = on_inference or (lambda seconds: None)
        self._queues: OrderedDict[Hashable, _Queue] = OrderedDict()
        self._executor = ThreadPoolExecutor(self.settings.runners, thread_name_prefix="enclaveq-inference")
        self._busy = 0
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    async def run(self, model: LoadedModel, inputs: dict[str, np.ndarray], outputs: list[str] | None,
                  finish: Callable[[Outputs], T]) -> T:
        """Run ``model`` on ``inputs`` (possibly within a batch) and return ``finish(outputs)``,
        called on the thread that ran the model (so encoding a large result does not cost the
        event loop). Inputs are checked first: a job that does not fit its model never queues."""
        if self._closed:
            raise JobRejected("the worker is stopping", ErrorCode.INTERNAL)
        check_inputs(model, inputs, outputs)
        names = list(outputs or model.output_names)
        rows = _rows(inputs)
        batchable = model.batchable and rows is not None and rows <= self.settings.max_batch_rows
        key: Hashable
        if batchable:
            key = (model.info.model_id, tuple(names),
                   tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items())))
        else:
            key = object()  # a queue of its own: runs alone
        loop = asyncio.get_running_loop()
        job: _Job[T] = _Job(inputs=inputs, rows=rows or 1, nbytes=sum(a.nbytes for a in inputs.values()),
                            finish=finish, future=loop.create_future(), queued_at=self._clock())
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(model, names, batchable)
        queue.jobs.append(job)
        self._schedule()
        return await job.future

    def close(self) -> None:
        """Refuse new jobs and let the runner threads end once their current batch is done."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- scheduling ---------------------------------------------------------------------------------
    def _schedule(self) -> None:
        # Dispatch on the next loop iteration, not now: the jobs of a frame (and of every message
        # that arrived together) all queue first, then leave as one batch.
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = self._clock()
        wake_at: float | None = None
        for key in list(self._queues):
            queue = self._queues[key]
            while queue.jobs:
                ready_at = self._ready_at(queue)
                if ready_at > now:
                    wake_at = ready_at if wake_at is None else min(wake_at, ready_at)
                    break
                if self._busy >= self.settings.runners and not self._inline(queue.model, queue.jobs[:1]):
                    break
                batch = self._take(queue)
                self._start(queue, batch)
            if not queue.jobs:
                del self._queues[key]
        if wake_at is not None and not self._closed:
            self._timer = asyncio.get_running_loop().call_later(wake_at - now, self._schedule)

    def _ready_at(self, queue: _Queue) -> float:
        """When the queue's next batch may leave: now if it is full or can make a preferred
        size, else once its oldest job has waited the maximum queue delay."""
        delay = self.settings.max_queue_delay_us / 1e6
        if not queue.batchable or delay == 0:
            return 0.0
        rows = queue.rows
        if rows >= self.settings.max_batch_rows or any(rows >= p for p in self.settings.preferred_batch_rows):
            return 0.0
        return queue.jobs[0].queued_at + delay

    def _take(self, queue: _Queue) -> list[_Job[Any]]:
        """The oldest jobs that fit in one batch, trimmed to the largest preferred size that
        falls on a job boundary, if any does."""
        if not queue.batchable:
            return [queue.jobs.pop(0)]
        taken, rows, boundaries = 0, 0, []
        for job in queue.jobs:
            if rows + job.rows > self.settings.max_batch_rows:
                break
            taken, rows = taken + 1, rows + job.rows
            boundaries.append((rows, taken))
        preferred = [count for total, count in boundaries if total in self.settings.preferred_batch_rows]
        if preferred:
            taken = preferred[-1]
        batch, queue.jobs[:] = queue.jobs[:taken], queue.jobs[taken:]
        return batch

    def _inline(self, model: LoadedModel, batch: list[_Job[Any]]) -> bool:
        return (model.typical_seconds < INLINE_INFERENCE_SECONDS
                and sum(job.nbytes for job in batch) <= INLINE_INFERENCE_BYTES)

    def _start(self, queue: _Queue, batch: list[_Job[Any]]) -> None:
        self._on_batch(sum(job.rows for job in batch))
        started = time.perf_counter()
        if self._inline(queue.model, batch):
            self._settle(batch, _run_batch(queue.model, queue.names, batch))
            self._on_inference(time.perf_counter() - started)
            return
        self._busy += 1
        future = asyncio.get_running_loop().run_in_executor(self._executor, _run_batch, queue.model, queue.names,
                                                            batch)
        future.add_done_callback(lambda done: self._finished(batch, done, started))

    def _finished(self, batch: list[_Job[Any]], done: asyncio.Future[list[Any]], started: float) -> None:
        self._busy -= 1
        self._on_inference(time.perf_counter() - started)
        if done.cancelled():
            # Never ran: the worker stopped (its drain timed out). No answer at all, so the broker
            # hands the job to another worker, rather than an error its producer would keep.
            for job in batch:
                job.future.cancel()
            return
        if done.exception() is not None:
            outcomes: list[Any] = [done.exception()] * len(batch)
        else:
            outcomes = done.result()
        self._settle(batch, outcomes)
        if self._queues:
            self._schedule()

    @staticmethod
    def _settle(batch: list[_Job[Any]], outcomes: list[Any]) -> None:
        for job, outcome in zip(batch, outcomes):
            if job.future.done():  # its handler was cancelled (the worker is stopping)
                continue
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)


def _rows(inputs: dict[str, np.ndarray]) -> int | None:
    """The rows of a job: the common leading dimension of its inputs (None if they disagree)."""
    leading = {a.shape[0] for a in inputs.values() if a.ndim}
    if len(leading) != 1 or any(a.ndim == 0 for a in inputs.values()):
        return None
    (rows,) = leading
    return rows if rows >= 1 else None


def _run_batch(model: LoadedModel, names: list[str], batch: list[_Job[Any]]) -> list[Any]:
    """Run a batch on the calling thread: one ONNX Runtime call, split back per job; the result
    of each job's ``finish``, or the exception it raised, in order."""
    if len(batch) == 1:
        return [_alone(model, names, batch[0])]
    feed = {name: np.concatenate([job.inputs[name] for job in batch], axis=0) for name in batch[0].inputs}
    total = sum(job.rows for job in batch)
    started = time.perf_counter()
    try:
        values = model.session.run(names, feed)
    except Exception:  # a job's data made the call fail: find which, alone
        return [_alone(model, names, job) for job in batch]
    model.record_run(time.perf_counter() - started)
    if any(getattr(v, "ndim", 0) == 0 or v.shape[0] != total for v in values):
        # The static analysis proved rows independent, yet an output's leading dimension is not the
        # batch's: do not guess how to split it. Run these jobs alone, and the model alone from now on.
        model.stop_batching("an output's leading dimension did not follow the batch")
        return [_alone(model, names, job) for job in batch]
    outcomes: list[Any] = []
    offset = 0
    for job in batch:
        outputs = {name: value[offset:offset + job.rows] for name, value in zip(names, values)}
        offset += job.rows
        outcomes.append(_finish(job, outputs))
    return outcomes


def _alone(model: LoadedModel, names: list[str], job: _Job[Any]) -> Any:
    started = time.perf_counter()
    try:
        values = model.session.run(names, job.inputs)
    except Exception as exc:  # the message can quote tensor values: keep only the type
        return JobRejected(f"ONNX Runtime failed to run the model ({type(exc).__name__})",
                           ErrorCode.INFERENCE_FAILED)
    model.record_run(time.perf_counter() - started)
    return _finish(job, dict(zip(names, values)))


def _finish(job: _Job[Any], outputs: Outputs) -> Any:
    try:
        return job.finish(outputs)
    except Exception as exc:  # surfaces as this job's error, on the event loop
        return exc
