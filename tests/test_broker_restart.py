"""RabbitMQ stopped and started in the middle of a batch (issue 16, fault 1).

The worker and the producer reconnect by themselves; the batch completes; every result reaches
the caller exactly once and equals direct onnxruntime; nothing is dead-lettered; the worker says
the outage in a few lines, not one per job. The test runs its own RabbitMQ node (the machine's is
shared by every other test).
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from bench.backpressure import slow_model
from broker_adapters import open_broker
from producer_sdk import AsyncClient

from .support import FaultMidway, dead_letters, mlp_model, run_directly, running_worker, wait_until

JOBS = 2000


async def test_a_batch_survives_the_broker_stopping_and_starting_in_its_middle(tee, private_rabbitmq, pool, caplog):
    caplog.set_level(logging.WARNING)
    rng = np.random.default_rng(16)
    batch = [{"x": rng.standard_normal((1, 4)).astype(np.float32), "bias": np.zeros(3, np.float32)}
             for _ in range(JOBS)]
    url = private_rabbitmq.url
    results: dict[int, object] = {}

    def restart_broker(resume) -> None:
        private_rabbitmq.stop_app()
        resume()  # the rest of the batch is fed while the broker is down
        time.sleep(2)  # the outage: what the clients must ride out, not what the test waits for
        private_rabbitmq.start_app()

    fault = FaultMidway(batch, restart_broker, at=JOBS // 4)
    async with running_worker(tee, url, pool), AsyncClient(url, pool, tee.policy(), timeout=120) as client:
        model_id = await client.upload_model(mlp_model())
        async for result in client.submit(model_id, fault.jobs(), max_in_flight=64):
            assert result.index not in results, f"job {result.index} yielded twice"
            results[result.index] = result
    await fault.finished()
    assert sorted(results) == list(range(JOBS))
    failed = [r for r in results.values() if not r.ok]
    assert not failed, failed[:3]
    for index in (0, JOBS // 2, JOBS - 1):
        np.testing.assert_array_equal(results[index].outputs["logits"], run_directly(mlp_model(), batch[index])["logits"])
    assert await dead_letters(url, pool) == 0
    outage_lines = [r for r in caplog.records if r.name.startswith("enclaveq") and r.levelno >= logging.WARNING
                    and "SIMULATED" not in r.getMessage() and "simulation" not in r.getMessage()]
    assert len(outage_lines) <= 10, [r.getMessage() for r in outage_lines]


async def test_jobs_a_restarted_broker_lost_after_confirming_them_are_published_again_and_run_once(
        tee, memory_url, pool):
    # Mosquitto 2.0 restarted loses what it held for a shared subscription (the pool's job queue),
    # confirmed or not. The producer publishes every request still unanswered again once its
    # connection is back; the worker drops the copies of those it answered or is running.
    batch = [{"x": np.full((1, 16), i / 20, np.float32)} for i in range(20)]
    results: list = []
    async with running_worker(tee, memory_url, pool, prefetch=1) as worker, \
            AsyncClient(memory_url, pool, tee.policy(), timeout=600) as client:
        model_id = await client.upload_model(slow_model(1536))  # one job at a time, ~10 ms each

        async def take_all() -> None:
            async for result in client.submit(model_id, batch, frames=False, max_in_flight=20):
                results.append(result)

        taking = asyncio.create_task(take_all())
        await wait_until(lambda: len(results) >= 1, "a first result")
        async with open_broker(memory_url) as broker:
            lost = await broker.simulate_restart(lose_queued_jobs=True)
        assert lost > 0, "the restart lost no job: the test proves nothing"
        # Without the republish, the lost jobs would wait for their 600 s timeout.
        await asyncio.wait_for(taking, 60)
        ran = worker.metrics.requests.labels("job", "ok")._value.get()
    assert sorted(r.index for r in results) == list(range(20)) and all(r.ok for r in results)
    assert ran == 20, f"the worker ran {ran} jobs for 20"
