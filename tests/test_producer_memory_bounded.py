"""A producer reads its batch a window at a time, and RabbitMQ holds no more than the window
(issue 16, fault 5: slow consumers and back-pressure).

``AsyncClient.submit(model_id, batch, max_in_flight=W)`` takes a job from ``batch`` only when one
of the W slots of its window is free, so a generator over more jobs than fit in memory (here:
an endless one) is read just ahead of the results. A slot is freed only when the caller takes
the job's result, so the SDK is never more than W + 1 jobs ahead of the results it has yielded
(in flight or finished and waiting for the caller, plus one taken and waiting for a slot) --
whether the caller keeps up with the worker or is slower. ``bench/backpressure.py`` measures the
same over 100,000 jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterator

import aio_pika
import numpy as np
import pytest

from bench.backpressure import ready_count, slow_model
from broker_adapters import _common as common
from producer_sdk import AsyncClient

from .support import mlp_model, running_worker

WINDOW = 16


class CountingJobs:
    """An endless batch that counts the jobs the SDK takes from it and the results it gave back,
    and remembers the largest gap seen at any result."""

    def __init__(self) -> None:
        self.taken = 0
        self.yielded = 0
        self.most_ahead = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        job = {"x": np.ones((1, 4), np.float32), "bias": np.zeros(3, np.float32)}
        for _ in itertools.count():
            self.taken += 1
            yield job

    def result_yielded(self) -> None:
        self.yielded += 1
        self.most_ahead = max(self.most_ahead, self.taken - self.yielded)


@pytest.fixture(params=["memory_url", pytest.param("rabbitmq_url", marks=pytest.mark.rabbitmq)])
def url(request: pytest.FixtureRequest) -> str:
    """The in-process broker, then RabbitMQ."""
    return str(request.getfixturevalue(request.param))


@pytest.mark.parametrize("frames", [None, False], ids=["framed", "one-message-per-job"])
async def test_an_endless_batch_is_read_at_most_one_window_ahead_of_the_results(tee, url, pool, frames):
    jobs = CountingJobs()
    async with running_worker(tee, url, pool), AsyncClient(url, pool, tee.policy(), timeout=60) as client:
        model_id = await client.upload_model(mlp_model())
        async with contextlib.aclosing(client.submit(model_id, jobs, max_in_flight=WINDOW, frames=frames)) as results:
            async for result in results:
                assert result.ok, result.error
                jobs.result_yielded()
                if jobs.yielded == 2_000:
                    break
    assert jobs.most_ahead <= WINDOW + 1, f"the SDK took {jobs.most_ahead} jobs ahead of its results"
    assert jobs.most_ahead >= WINDOW, "the window never filled: the test did not exercise it"


class QueueWatch:
    """Asks RabbitMQ for the job queue's ready messages (a passive declare, answered with the live
    count; rabbitmqctl's figures are refreshed only every few seconds) until stopped."""

    def __init__(self, url: str, pool: str) -> None:
        self.url, self.queue = url, common.jobs_queue(pool)
        self.ready: list[int] = []
        self.stopped = asyncio.Event()

    async def run(self) -> None:
        connection = await aio_pika.connect(self.url)
        try:
            channel = await connection.channel()
            while not self.stopped.is_set():
                count = await ready_count(channel, self.queue)
                if count is not None:
                    self.ready.append(count)
                await asyncio.sleep(0.02)
        finally:
            await connection.close()


async def test_rabbitmq_holds_no_more_jobs_than_the_window_while_a_slow_worker_runs_them(tee, rabbitmq_url, pool):
    # A slow worker: the bench's model (~2.5 ms of ONNX Runtime per job, the same at any batch size)
    # and a prefetch of 2 (the worker holds two unacknowledged messages at most), so the producer,
    # sending one message per job, outpaces it and jobs wait in the queue, one message each.
    window, prefetch = 48, 2
    jobs = ({"x": np.ones((1, 16), np.float32)} for _ in itertools.count())
    watch = QueueWatch(rabbitmq_url, pool)
    yielded = 0
    async with running_worker(tee, rabbitmq_url, pool, prefetch=prefetch), \
            AsyncClient(rabbitmq_url, pool, tee.policy(), timeout=60) as client:
        model_id = await client.upload_model(slow_model(384))
        watching = asyncio.create_task(watch.run())
        try:
            async with contextlib.aclosing(client.submit(model_id, jobs, max_in_flight=window, frames=False)) as results:
                async for result in results:
                    assert result.ok, result.error
                    yielded += 1
                    if yielded == 1_000:
                        break
        finally:
            watch.stopped.set()
            await watching
    assert len(watch.ready) >= 20, "too few samples of the queue"
    # The producer has at most W+1 jobs unanswered (a slot comes back when the caller takes a result),
    # and the queue holds a subset of them: ready ones plus the worker's unacknowledged (at most its
    # prefetch, but fewer between an ack and the next delivery, so only the ready count is bounded
    # here). Without the window the queue fills with hundreds of jobs.
    assert max(watch.ready) <= window + 1, f"the job queue held {max(watch.ready)} ready messages, W={window}"
    assert max(watch.ready) >= window // 2, "jobs hardly waited in the queue: the worker kept up, nothing was tested"


async def test_a_caller_slower_than_the_worker_holds_the_batch_back_too(tee, memory_url, pool):
    jobs = CountingJobs()
    async with running_worker(tee, memory_url, pool), AsyncClient(memory_url, pool, tee.policy(), timeout=60) as client:
        model_id = await client.upload_model(mlp_model())
        async with contextlib.aclosing(client.submit(model_id, jobs, max_in_flight=WINDOW)) as results:
            async for _ in results:
                jobs.result_yielded()
                await asyncio.sleep(0.002)  # e.g. writing each result somewhere
                if jobs.yielded == 300:
                    break
    # Before the fix the slot came back when the result reached the SDK's queue, not the caller:
    # this caller found 4,933 jobs taken after 300 results (W=8).
    assert jobs.most_ahead <= WINDOW + 1, f"the SDK took {jobs.most_ahead} jobs ahead of its results"
