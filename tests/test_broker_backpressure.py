"""A full job queue slows the producer down instead of failing its jobs (issue 16, fault 5).

An operator may cap a pool's queue (a RabbitMQ policy: max-length with reject-publish); at the
cap RabbitMQ refuses publishes with a negative confirm. The producer backs off and publishes
again; every job still runs once and its result arrives once.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from broker_adapters import _common as common
from producer_sdk import AsyncClient

from .support import mlp_model, run_directly, running_worker, wait_until

JOBS = 300


async def test_a_queue_at_its_length_limit_slows_the_producer_and_loses_no_job(tee, rabbitmq_url, pool, rabbitmqctl,
                                                                               caplog):
    caplog.set_level(logging.INFO, logger="enclaveq.producer")
    policy_name = f"cap-{pool}"
    rng = np.random.default_rng(5)
    batch = [{"x": rng.standard_normal((1, 4)).astype(np.float32), "bias": np.zeros(3, np.float32)}
             for _ in range(JOBS)]
    # A worker that takes one job at a time (prefetch 1) while the producer keeps 64 in flight:
    # jobs wait in the queue and reach its cap of 2 whatever the machine's speed.
    async with running_worker(tee, rabbitmq_url, pool, prefetch=1), \
            AsyncClient(rabbitmq_url, pool, tee.policy(), timeout=120) as client:
        model_id = await client.upload_model(mlp_model())
        queue = common.jobs_queue(pool)
        pattern = f"^{queue.replace('.', '[.]')}$"
        await asyncio.to_thread(rabbitmqctl, "set_policy", "--apply-to", "queues", policy_name, pattern,
                                '{"max-length": 2, "overflow": "reject-publish"}')

        def capped() -> bool:
            rows = rabbitmqctl.json("list_queues", "name", "policy")
            return any(row["name"] == queue and row.get("policy") == policy_name for row in rows)

        await wait_until(capped, "RabbitMQ applies the length limit to the job queue")
        try:
            results = {}
            async for result in client.submit(model_id, batch, max_in_flight=64, frames=False):
                assert result.index not in results, f"job {result.index} yielded twice"
                results[result.index] = result
        finally:
            await asyncio.to_thread(rabbitmqctl, "clear_policy", policy_name)
    assert sorted(results) == list(range(JOBS))
    assert all(r.ok for r in results.values()), [r.error for r in results.values() if not r.ok][:3]
    np.testing.assert_array_equal(results[7].outputs["logits"], run_directly(mlp_model(), batch[7])["logits"])
    refused = [r for r in caplog.records if "refused the message" in r.getMessage() and "publishing it again" in r.getMessage()]
    assert refused, "the queue never reached its limit: the test did not exercise back-pressure"
