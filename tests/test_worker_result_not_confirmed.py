"""A result the broker refuses to confirm is never lost (seen on a RabbitMQ cluster losing a node:
the reply queue's new leader nacked the first results published after the failover).

A brief refusal is published again while the worker holds the job; a refusal that outlasts that
hands the job back, and the redelivered copy runs again and answers -- it is not dropped as a
duplicate of an answer that never went out."""

from __future__ import annotations

import numpy as np

from broker_adapters.errors import PublishRefused
from enclave_worker import worker as worker_module
from producer_sdk import AsyncClient

from .support import mlp_model, run_directly, running_worker

JOB = {"x": np.ones((1, 4), np.float32), "bias": np.zeros(3, np.float32)}


def refuse_results(worker, monkeypatch, times: int) -> list[str]:
    """Make the worker's broker nack its first ``times`` results; returns the job ids refused."""
    broker = worker._broker
    real = broker.publish_reply
    refused: list[str] = []

    async def publish_reply(reply_to, message, **kwargs):
        if len(refused) < times:
            refused.append(message.correlation_id)
            raise PublishRefused("RabbitMQ refused the message (nack) -- injected")
        return await real(reply_to, message, **kwargs)

    monkeypatch.setattr(broker, "publish_reply", publish_reply)
    return refused


async def test_a_briefly_refused_result_is_published_again_without_handing_the_job_back(
        tee, broker_url, pool, monkeypatch):
    async with running_worker(tee, broker_url, pool) as worker:
        async with AsyncClient(broker_url, pool, tee.policy(), timeout=30) as client:
            model_id = await client.upload_model(mlp_model())
            refused = refuse_results(worker, monkeypatch, times=3)
            out = await client.run(model_id, JOB)
    assert len(refused) == 3 and len(set(refused)) == 1, refused
    np.testing.assert_array_equal(out["logits"], run_directly(mlp_model(), JOB)["logits"])


async def test_a_job_handed_back_after_its_result_was_refused_runs_again_and_answers(
        tee, broker_url, pool, monkeypatch):
    monkeypatch.setattr(worker_module, "_REPLY_RETRY_SECONDS", 0.05)  # one try, then the job goes back
    async with running_worker(tee, broker_url, pool) as worker:
        async with AsyncClient(broker_url, pool, tee.policy(), timeout=30) as client:
            model_id = await client.upload_model(mlp_model())
            refused = refuse_results(worker, monkeypatch, times=1)
            out = await client.run(model_id, JOB)
    assert len(refused) == 1, "no result was refused: the test injected nothing"
    np.testing.assert_array_equal(out["logits"], run_directly(mlp_model(), JOB)["logits"])
