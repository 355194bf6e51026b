"""Client: the synchronous producer SDK. It runs an ``AsyncClient`` on an event loop in a
background thread, so scripts and notebooks get the same behaviour without writing asyncio.
Every method takes the same arguments as its ``AsyncClient`` twin and returns what it returns."""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from attestation.claims import Claims
from attestation.policy import Policy
from protocol import bodies, crypto
from protocol.handshake import Statement

from .async_client import AsyncClient, JobResult, KeyLike, Progress
from .epochs import EpochState

T = TypeVar("T")
_DONE = object()


class Client:
    """Attest a pool, then upload models and run jobs sealed to its attested key.

    ``policy`` is a policy file path or a loaded :class:`attestation.policy.Policy`. Keys
    (``owner_key``, ``producer_key``) are Ed25519 private keys or paths of key files made by
    ``enclaveq keys generate``. See :class:`AsyncClient` for every argument.
    """

    def __init__(self, broker_url: str, pool: str, policy: Policy | str | os.PathLike[str], *,
                 name: str | None = None, timeout: float = 120.0, attest_timeout: float = 10.0,
                 max_in_flight: int = 256, clock: Callable[[], float] = time.time,
                 rng: crypto.Random = os.urandom, trust: Any = None, collateral: Mapping[str, Any] | None = None,
                 producer_key: KeyLike | None = None, owner_key: KeyLike | None = None,
                 epoch_state: EpochState = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="enclaveq-client", daemon=True)
        self._thread.start()
        self._async = AsyncClient(broker_url, pool, policy, name=name, timeout=timeout,
                                  attest_timeout=attest_timeout, max_in_flight=max_in_flight, clock=clock, rng=rng,
                                  trust=trust, collateral=collateral, producer_key=producer_key, owner_key=owner_key,
                                  epoch_state=epoch_state)
        try:
            self._call(self._async.connect())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

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
        if self._loop.is_closed():
            return
        try:
            self._call(self._async.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

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

    def run(self, model_id: str, inputs: Mapping[str, Any], *, outputs: Sequence[str] | None = None,
            timeout: float | None = None) -> dict[str, np.ndarray]:
        return self._call(self._async.run(model_id, inputs, outputs=outputs, timeout=timeout))

    def submit(self, model_id: str, batch: Iterable[Mapping[str, Any]], *, outputs: Sequence[str] | None = None,
               timeout: float | None = None, max_in_flight: int | None = None) -> Iterator[JobResult]:
        """Yield results as they complete; the batch is read lazily from this thread's iterable."""
        results: queue.Queue[object] = queue.Queue()

        async def pump() -> None:
            try:
                async for result in self._async.submit(model_id, batch, outputs=outputs, timeout=timeout,
                                                       max_in_flight=max_in_flight):
                    results.put(result)
            except BaseException as exc:  # surfaces in the caller's thread
                results.put(exc)
            finally:
                results.put(_DONE)

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while True:
                item = results.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, JobResult)
                yield item
        finally:
            future.cancel()
