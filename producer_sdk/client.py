"""Client: the synchronous producer SDK. It runs an ``AsyncClient`` on an event loop in a
background thread, so scripts and notebooks get the same behaviour without writing asyncio.
Every method takes the same arguments as its ``AsyncClient`` twin and returns what it returns."""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from attestation.claims import Claims
from attestation.policy import Policy
from protocol import bodies, crypto
from protocol.handshake import Statement
from protocol.pipeline import PipelineSpec

from .async_client import MAX_STATUS_MEMBERS, AsyncClient, CollateralLike, JobResult, KeyLike, Progress
from .epochs import EpochState
from .framing import FrameSettings
from .journal import BatchJournal

T = TypeVar("T")
_DONE = object()


# How long an interrupted call waits for its coroutine to unwind (its cancellation handlers run
# on the loop; a broker that does not answer must not hold Ctrl-C up for long).
CANCEL_WAIT_SECONDS = 10.0


class BackgroundLoop:
    """An asyncio event loop in a daemon thread: how the synchronous classes (``Client``,
    ``EventPublisher``, ``ResultSubscriber``) drive their asyncio twins, so scripts and
    notebooks get the same behaviour without writing asyncio."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self.loop.is_closed()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result (its exception is raised here). If the
        wait is interrupted (Ctrl-C), ``coro`` is cancelled, and has unwound, before the
        interruption goes on: it must not keep publishing or submitting behind a caller who stopped."""
        unwound = threading.Event()
        started = False

        async def run() -> T:
            nonlocal started
            started = True
            try:
                return await coro
            finally:
                unwound.set()

        def if_never_started() -> None:
            # Queued after the task's cancellation: a task cancelled before its first step never
            # runs its body, so there is nothing to wait for (and ``coro`` is closed unawaited).
            if not started:
                coro.close()
                unwound.set()

        future = asyncio.run_coroutine_threadsafe(run(), self.loop)
        try:
            return future.result()
        except BaseException:
            if not future.done():
                future.cancel()  # cancels the task on the loop (run_coroutine_threadsafe chains them)
                self.loop.call_soon_threadsafe(if_never_started)
                unwound.wait(CANCEL_WAIT_SECONDS)
            raise

    def iterate(self, items: AsyncIterator[T]) -> Iterator[T]:
        """Yield what an async iterator yields, pumped on the loop; stopping early cancels it.

        The async iterator is asked for its next item only once the caller asked for theirs, as
        if the caller iterated it directly: ``submit`` frees a job's window slot, and with a batch
        journal marks its result kept, when the caller moves past it."""
        results: queue.Queue[object] = queue.Queue()
        taken = asyncio.Event()

        async def pump() -> None:
            try:
                async for item in items:
                    results.put(item)
                    await taken.wait()
                    taken.clear()
            except BaseException as exc:  # surfaces in the caller's thread
                results.put(exc)
            finally:
                results.put(_DONE)

        future = asyncio.run_coroutine_threadsafe(pump(), self.loop)
        try:
            while True:
                item = results.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]  # only T and the markers above are ever put
                self.loop.call_soon_threadsafe(taken.set)
        finally:
            future.cancel()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class Client:
    """Attest a pool, then upload models and run jobs sealed to its attested key.

    ``policy`` is a policy file path or a loaded :class:`attestation.policy.Policy`. Keys
    (``owner_key``, ``producer_key``) are Ed25519 private keys or paths of key files made by
    ``enclaveq keys generate``. See :class:`AsyncClient` for every argument.
    """

    def __init__(self, broker_url: str, pool: str, policy: Policy | str | os.PathLike[str], *,
                 name: str | None = None, timeout: float = 120.0, attest_timeout: float = 10.0,
                 max_in_flight: int = 256, clock: Callable[[], float] = time.time,
                 rng: crypto.Random = os.urandom, trust: Any = None, collateral: CollateralLike | None = None,
                 producer_key: KeyLike | None = None, owner_key: KeyLike | None = None,
                 epoch_state: EpochState = None) -> None:
        self._loop = BackgroundLoop("enclaveq-client")
        self._async = AsyncClient(broker_url, pool, policy, name=name, timeout=timeout,
                                  attest_timeout=attest_timeout, max_in_flight=max_in_flight, clock=clock, rng=rng,
                                  trust=trust, collateral=collateral, producer_key=producer_key, owner_key=owner_key,
                                  epoch_state=epoch_state)
        try:
            self._call(self._async.connect())
        except BaseException:
            self._loop.stop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.call(coro)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def claims(self) -> Claims | None:
        """What the pool's evidence vouched for, verified against the policy."""
        return self._async.claims

    @property
    def statement(self) -> Statement | None:
        """The attested statement (pool, epoch, pool key) the current session is sealed to."""
        return self._async.statement

    def close(self) -> None:
        if self._loop.closed:
            return
        try:
            self._call(self._async.close())
        finally:
            self._loop.stop()

    def attest(self) -> Claims:
        return self._call(self._async.attest())

    def upload_model(self, model: bytes | str | Path, *, owner_key: KeyLike | None = None,
                     allowed_producers: Iterable[bytes | str | os.PathLike[str]] | None = None,
                     timeout: float | None = None, progress: Progress | None = None) -> str:
        return self._call(self._async.upload_model(model, owner_key=owner_key, allowed_producers=allowed_producers,
                                                   timeout=timeout, progress=progress))

    def delete_model(self, model_id: str, *, owner_key: KeyLike | None = None, timeout: float | None = None) -> None:
        return self._call(self._async.delete_model(model_id, owner_key=owner_key, timeout=timeout))

    def list_models(self, *, timeout: float | None = None) -> list[bodies.ModelInfo]:
        return self._call(self._async.list_models(timeout=timeout))

    def rotate_pool(self, *, grace_seconds: int = 300, timeout: float | None = None) -> tuple[int, int]:
        return self._call(self._async.rotate_pool(grace_seconds=grace_seconds, timeout=timeout))

    def pool_status(self, wait: float = 2.0, *, max_members: int = MAX_STATUS_MEMBERS,
                    timeout: float | None = None) -> list[bodies.MemberStatus]:
        return self._call(self._async.pool_status(wait, max_members=max_members, timeout=timeout))

    @property
    def skipped_status_answers(self) -> int:
        """Members' ``pool_status`` answers that did not decode and were skipped (all calls)."""
        return self._async.skipped_status_answers

    def create_pipeline(self, pipeline: PipelineSpec | str | os.PathLike[str], *,
                        models: Mapping[str, bytes | str | os.PathLike[str]] | None = None,
                        owner_key: KeyLike | None = None, timeout: float | None = None,
                        progress: Callable[[str, int, int], None] | None = None) -> str:
        return self._call(self._async.create_pipeline(pipeline, models=models, owner_key=owner_key, timeout=timeout,
                                                      progress=progress))

    def list_pipelines(self, *, timeout: float | None = None) -> list[bodies.PipelineInfo]:
        return self._call(self._async.list_pipelines(timeout=timeout))

    def delete_pipeline(self, pipeline_id: str, *, owner_key: KeyLike | None = None,
                        timeout: float | None = None) -> None:
        return self._call(self._async.delete_pipeline(pipeline_id, owner_key=owner_key, timeout=timeout))

    def run(self, model_id: str, inputs: Mapping[str, Any], *, outputs: Sequence[str] | None = None,
            timeout: float | None = None) -> dict[str, np.ndarray]:
        return self._call(self._async.run(model_id, inputs, outputs=outputs, timeout=timeout))

    def submit(self, model_id: str, batch: Iterable[Mapping[str, Any] | None], *,
               outputs: Sequence[str] | None = None, timeout: float | None = None, max_in_flight: int | None = None,
               frames: FrameSettings | Literal[False] | None = None,
               resume: BatchJournal | str | os.PathLike[str] | None = None) -> Iterator[JobResult]:
        """Yield results as they complete; the batch is read lazily from this thread's iterable.
        ``frames`` and ``resume`` (a batch that outlives a crash of this process) as for
        :meth:`AsyncClient.submit` (jobs packed many per message by default)."""
        yield from self._loop.iterate(self._async.submit(model_id, batch, outputs=outputs, timeout=timeout,
                                                         max_in_flight=max_in_flight, frames=frames, resume=resume))
