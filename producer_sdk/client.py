"""Client: the synchronous producer SDK. It runs an ``AsyncClient`` on an event loop in a
background thread, so scripts and notebooks get the same behaviour without writing asyncio."""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

from .async_client import AsyncClient, JobResult

_DONE = object()


class Client:
    def __init__(self, broker_url: str, pool: str, policy: Any, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="enclaveq-client", daemon=True)
        self._thread.start()
        self._async = AsyncClient(broker_url, pool, policy, **kwargs)
        try:
            self._call(self._async.connect())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def claims(self):
        return self._async.claims

    @property
    def statement(self):
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

    def attest(self) -> Any:
        return self._call(self._async.attest())

    def upload_model(self, model, **kwargs: Any) -> str:
        return self._call(self._async.upload_model(model, **kwargs))

    def delete_model(self, model_id: str, **kwargs: Any) -> None:
        return self._call(self._async.delete_model(model_id, **kwargs))

    def list_models(self, **kwargs: Any):
        return self._call(self._async.list_models(**kwargs))

    def rotate_pool(self, **kwargs: Any) -> tuple[int, int]:
        return self._call(self._async.rotate_pool(**kwargs))

    def run(self, model_id: str, inputs: Mapping[str, Any], **kwargs: Any) -> dict[str, np.ndarray]:
        return self._call(self._async.run(model_id, inputs, **kwargs))

    def submit(self, model_id: str, batch: Iterable[Mapping[str, Any]], *, outputs: Sequence[str] | None = None,
               timeout: float | None = None, max_in_flight: int | None = None) -> Iterator[JobResult]:
        """Yield results as they complete; the batch is read lazily from this thread's iterable."""
        results: queue.Queue = queue.Queue()

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
                yield item
        finally:
            future.cancel()
