"""Routing is decided once (protocol.routing): the producer publishes each request kind on its
channel, and a worker refuses, unopened, a request that a broker moved to the other channel."""

from __future__ import annotations

import asyncio

import pytest

from broker_adapters import Message
from producer_sdk import AsyncClient
from protocol.routing import REQUEST_KINDS, Route, route_for

from .support import mlp_model, running_worker, wait_until

X = {"x": [[1.0, 2.0, 3.0, 4.0]], "bias": [0.0, 0.0, 0.0]}


def test_every_request_kind_has_exactly_one_route():
    assert {route_for(kind) for kind in REQUEST_KINDS} == {Route.JOBS, Route.BROADCAST, Route.STREAM}
    assert route_for("model_chunk") is route_for("model_delete") is Route.BROADCAST
    assert route_for("pipeline_put") is route_for("pipeline_delete") is Route.BROADCAST
    assert route_for("job") is route_for("model_list") is route_for("pool_rotate") is Route.JOBS
    assert route_for("pipeline_list") is Route.JOBS and route_for("event") is Route.STREAM


def dead_lettered(worker, reason: str) -> float:
    return worker.metrics.registry.get_sample_value("enclaveq_worker_dead_lettered_total", {"reason": reason}) or 0.0


async def test_a_job_moved_onto_the_broadcast_channel_is_refused_unopened(tee, memory_url, pool):
    import numpy as np

    async with running_worker(tee, memory_url, pool) as worker:
        async with AsyncClient(memory_url, pool, tee.policy(), timeout=10) as client:
            model_id = await client.upload_model(mlp_model())
            core = client._core
            request = core.job(model_id, {k: np.asarray(v, np.float32) for k, v in X.items()}, timeout=10)
            assert request.route is Route.JOBS
            # The broker copies the job into the pool's broadcast: every worker would run it.
            await client._broker.publish_control(pool, Message(body=request.body, correlation_id=request.job_id,
                                                               reply_to=core.reply_to))
            for _ in range(200):  # bounded wait for the refusal itself
                if dead_lettered(worker, "misrouted") >= 1:
                    break
                await asyncio.sleep(0.02)
            assert dead_lettered(worker, "misrouted") == 1
            assert worker.metrics.registry.get_sample_value(
                "enclaveq_worker_requests_total", {"kind": "job", "outcome": "ok"}) is None  # it never ran
            # The same job on its own channel runs.
            out = await client.run(model_id, {k: np.asarray(v, np.float32) for k, v in X.items()})
            assert set(out) == {"logits", "label"}


async def test_an_upload_moved_onto_the_job_queue_is_refused_unopened(tee, memory_url, pool):
    async with running_worker(tee, memory_url, pool) as worker:
        async with AsyncClient(memory_url, pool, tee.policy(), timeout=10) as client:
            _, chunks = client._core.model_chunks(mlp_model(), owner_key=client._owner(None), timeout=10)
            request = chunks[0]()
            assert request.route is Route.BROADCAST
            await client._broker.publish_job(pool, Message(body=request.body, correlation_id=request.job_id,
                                                           reply_to=client._core.reply_to))
            for _ in range(200):
                if dead_lettered(worker, "misrouted") >= 1:
                    break
                await asyncio.sleep(0.02)
            assert dead_lettered(worker, "misrouted") == 1
            assert worker.models is not None and worker.models.list() == []


@pytest.mark.parametrize("kind", ["no-such-kind", ""])
def test_an_unknown_kind_has_no_route(kind):
    from protocol.errors import MalformedMessage

    with pytest.raises(MalformedMessage):
        route_for(kind)


async def test_a_job_published_on_a_pipeline_stream_and_an_event_moved_onto_the_job_queue_are_refused(
        tee, memory_url, pool):
    import numpy as np

    from protocol.ownership import generate_signing_key

    from .pipeline_support import ADD_ONE, DOUBLE, Deployment, Inbox

    owner = generate_signing_key()
    async with running_worker(tee, memory_url, pool) as worker:
        async with AsyncClient(memory_url, pool, tee.policy(), owner_key=owner, timeout=10) as client:
            model_id = await client.upload_model(mlp_model())
            for model in (ADD_ONE, DOUBLE):
                await client.upload_model(model)
            d = Deployment(client=client, worker=worker, pool=pool, owner=owner)
            signed, outcome = await d.put(d.spec())
            assert outcome.ok
            inbox = Inbox()
            sub = await client._broker.consume_inbox(d.inbox(signed), inbox)
            core = client._core
            job = core.job(model_id, {k: np.asarray(v, np.float32) for k, v in X.items()}, timeout=10)
            await client._broker.publish_event(signed.spec.source_topic, Message(
                body=job.body, correlation_id=job.job_id, reply_to=core.reply_to))
            _, event = d.event(signed, "moved", {"x": np.ones((1, 4), np.float32)})
            await client._broker.publish_job(pool, event)
            await wait_until(lambda: dead_lettered(worker, "misrouted") == 2, "the worker refused both")
            assert inbox.raw == []
            await sub.cancel()

