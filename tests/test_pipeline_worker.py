"""A worker runs pipelines: chains of models on events, results sealed to named recipients.

These sentences drive the worker with the protocol alone (the producer core seals each request),
so they pin what the worker does whatever the SDK and CLI on top of it look like: every broker
carries events and results, only recipients open results, a forged or replayed event produces
nothing, and a bad pipeline or event is a typed error that leaves the worker serving.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from broker_adapters import Unroutable
from broker_adapters.errors import BrokerUnavailable
from enclave_worker import worker as worker_module
from producer_sdk import AsyncClient
from protocol import bodies, crypto
from protocol.ownership import generate_signing_key, public_key_bytes
from protocol.pipeline import Reference, SignedPipeline, Stage, sign_pipeline, sign_pipeline_delete
from protocol.results import NotARecipient, ResultForged

from .pipeline_support import ADD_ONE, DOUBLE, OVER_TEN, Deployment, Inbox, directly, opened, sha
from .support import TIMEOUT, delete_exchanges, running_worker, wait_until


@pytest.fixture
async def deployment(tee, broker_url, pool) -> AsyncIterator[Deployment]:
    owner = generate_signing_key()
    async with running_worker(tee, broker_url, pool) as worker:
        async with AsyncClient(broker_url, pool, tee.policy(), owner_key=owner) as client:
            for model in (ADD_ONE, DOUBLE, OVER_TEN):
                await client.upload_model(model)
            yield Deployment(client=client, worker=worker, pool=pool, owner=owner)


@pytest.fixture
async def chain(deployment) -> AsyncIterator[tuple[SignedPipeline, Inbox]]:
    signed, outcome = await deployment.put(deployment.spec())
    assert outcome.ok, outcome.error()
    inbox = Inbox()
    sub = await deployment.broker.consume_inbox(deployment.inbox(signed), inbox)
    yield signed, inbox
    await sub.cancel()
    await deployment.broker.delete_inbox(deployment.inbox(signed))


# -- results ---------------------------------------------------------------------------------------


async def test_every_event_yields_a_result_equal_to_running_the_chain_directly(deployment, chain):
    signed, inbox = chain
    events = {f"e{i}": np.random.default_rng(i).standard_normal((1, 4)).astype(np.float32) for i in range(20)}
    for event_id, x in events.items():
        await deployment.publish(signed, event_id, {"x": x})
    await wait_until(lambda: len(inbox.raw) == 20, "20 results reach the recipient's inbox")
    results = {r.event_id: r for r in (opened(deployment, raw) for raw in inbox.raw)}
    assert results.keys() == events.keys()
    for event_id, x in events.items():
        result = results[event_id]
        np.testing.assert_allclose(result.outputs["z"], directly(x), rtol=1e-6)
        assert result.pipeline_id == signed.pipeline_id and result.stage_models == signed.spec.model_ids
        assert result.pool == deployment.pool


async def test_a_result_says_which_session_published_its_event(deployment, chain):
    signed, inbox = chain
    await deployment.publish(signed, "who", {"x": np.zeros((1, 4), np.float32)})
    await wait_until(lambda: len(inbox.raw) == 1, "the result arrives")
    assert opened(deployment, inbox.raw[0]).publisher == deployment.core.session.session_id


async def test_a_key_that_is_not_a_recipient_opens_nothing(deployment, chain):
    signed, inbox = chain
    await deployment.publish(signed, "secret", {"x": np.ones((1, 4), np.float32)})
    await wait_until(lambda: len(inbox.raw) == 1, "the result arrives")
    with pytest.raises(NotARecipient):
        opened(deployment, inbox.raw[0], key=crypto.generate_private_key())


async def test_a_result_altered_on_the_way_is_refused(deployment, chain):
    signed, inbox = chain
    await deployment.publish(signed, "altered", {"x": np.ones((1, 4), np.float32)})
    await wait_until(lambda: len(inbox.raw) == 1, "the result arrives")
    raw = bytearray(inbox.raw[0])
    raw[-5] ^= 1
    with pytest.raises(ResultForged):
        opened(deployment, bytes(raw))


async def test_a_replayed_event_yields_no_second_result(deployment, chain):
    signed, inbox = chain
    _, message = deployment.event(signed, "once", {"x": np.ones((1, 4), np.float32)})
    for _ in range(3):  # the broker (or anyone who captured it) publishes the same sealed event again
        await deployment.broker.publish_event(signed.spec.source_topic, message)
    await wait_until(lambda: deployment.worker.metrics.requests.labels("event", "duplicate")._value.get() == 2,
                     "the two replays are recognised")
    assert len(inbox.raw) == 1


async def test_an_event_that_does_not_meet_the_condition_yields_no_result(deployment):
    signed, outcome = await deployment.put(deployment.spec(when=True, name="alerts"))
    assert outcome.ok, outcome.error()
    inbox = Inbox()
    sub = await deployment.broker.consume_inbox(deployment.inbox(signed), inbox)
    try:
        await deployment.publish(signed, "quiet", {"x": np.zeros((1, 4), np.float32)})     # (0+1)*2 = 2
        await deployment.publish(signed, "loud", {"x": np.full((1, 4), 9, np.float32)})    # (9+1)*2 = 20
        await wait_until(lambda: len(inbox.raw) == 1, "the matching event's result arrives")
        await wait_until(lambda: deployment.worker.metrics.requests.labels("event", "ok")._value.get() == 2,
                         "both events were handled")
        assert [opened(deployment, raw).event_id for raw in inbox.raw] == ["loud"]
    finally:
        await sub.cancel()
        await deployment.broker.delete_inbox(deployment.inbox(signed))


# -- refusals ----------------------------------------------------------------------------------------


class Replies:
    """The publisher's view: errors the worker sends back for failed events."""

    def __init__(self, deployment: Deployment) -> None:
        self.d = deployment

    async def error_for(self, job_id: str) -> Exception:
        future = self.d.client._expect(job_id)
        outcome = await asyncio.wait_for(future, TIMEOUT)
        assert not outcome.ok
        return outcome.error()


async def test_an_event_of_the_wrong_shape_is_a_typed_error_to_its_publisher_and_the_worker_goes_on(
        deployment, chain):
    signed, inbox = chain
    job_id, message = deployment.event(signed, "bad", {"x": np.ones((2, 3), np.float32)})
    replies = Replies(deployment)
    waiting = asyncio.ensure_future(replies.error_for(job_id))
    await deployment.broker.publish_event(signed.spec.source_topic, message)
    error = await waiting
    assert error.code == "bad_input" and "shape" in str(error)
    await deployment.publish(signed, "good", {"x": np.ones((1, 4), np.float32)})
    await wait_until(lambda: len(inbox.raw) == 1, "the next event still yields its result")


async def test_an_event_missing_an_input_is_refused_by_name(deployment, chain):
    signed, _ = chain
    job_id, message = deployment.event(signed, "missing", {"y": np.ones((1, 4), np.float32)})
    waiting = asyncio.ensure_future(Replies(deployment).error_for(job_id))
    await deployment.broker.publish_event(signed.spec.source_topic, message)
    error = await waiting
    assert error.code == "bad_input" and "missing ['x']" in str(error)


async def test_a_pipeline_naming_a_model_the_pool_lacks_is_refused_when_created(deployment):
    spec = deployment.spec(stages=(Stage("one", "ab" * 32, (("x", Reference("event", "x")),)),),
                           outputs=(("y", Reference("one", "y")),))
    _, outcome = await deployment.put(spec)
    assert not outcome.ok and outcome.error().code == "unknown_model"


async def test_a_pipeline_created_while_a_stage_model_is_still_arriving_on_the_worker_waits_for_it(
        deployment, monkeypatch):
    """`pipeline create` installs the definition once one worker confirmed each upload; uploads
    reach every worker, and the one that takes the definition may still be storing a model. It
    waits for the model, as a job does, instead of refusing it as unknown (seen in CI with three
    worker processes under load)."""
    models = deployment.worker.models
    real_get, real_has = models.get, models.has
    asked, arrived = asyncio.Event(), asyncio.Event()

    async def get_once_arrived(model_id):  # ModelLibrary.get waits so for an upload in progress
        asked.set()
        await arrived.wait()
        return await real_get(model_id)

    monkeypatch.setattr(models, "has", lambda model_id: arrived.is_set() and real_has(model_id))
    monkeypatch.setattr(models, "get", get_once_arrived)
    put = asyncio.create_task(deployment.put(deployment.spec()))
    await wait_until(lambda: asked.is_set() or put.done(), "the worker asking for the stage model")
    arrived.set()
    signed, outcome = await put
    assert outcome.ok, outcome.error()
    await deployment.broker.delete_inbox(deployment.inbox(signed))


async def test_a_pipeline_whose_wiring_does_not_type_check_is_refused_when_created(deployment):
    # The second stage's input "y" fed from the event's "x" is fine by name, but OVER_TEN takes "z".
    spec = deployment.spec(stages=(Stage("one", sha(ADD_ONE), (("x", Reference("event", "x")),)),
                                   Stage("two", sha(OVER_TEN), (("y", Reference("one", "y")),))),
                           outputs=(("m", Reference("two", "match")),))
    _, outcome = await deployment.put(spec)
    assert not outcome.ok and outcome.error().code == "pipeline_invalid"


async def test_only_the_owner_replaces_or_deletes_a_pipeline_and_an_old_definition_stays_refused(deployment, chain):
    signed, _ = chain
    stranger = generate_signing_key()
    # A stranger's definition of the same name is another pipeline (the id includes the owner key).
    theirs, outcome = await deployment.put(signed.spec, owner=stranger)
    assert outcome.ok and theirs.pipeline_id != signed.pipeline_id
    order = sign_pipeline_delete(signed.pipeline_id, stranger, int(time.time() * 1000))
    outcome = await deployment.client._request(lambda: deployment.core._seal(
        "pipeline_delete", order.to_bytes(), timeout=TIMEOUT, content_type=bodies.PIPELINE_DELETE), TIMEOUT)
    assert outcome.error().code == "not_owner"
    # Replaying the definition in force (same issued time) is refused.
    outcome = await deployment.client._request(lambda: deployment.core._seal(
        "pipeline_put", signed.to_bytes(), timeout=TIMEOUT, content_type=bodies.PIPELINE), TIMEOUT)
    assert outcome.error().code == "stale_order"
    order = sign_pipeline_delete(signed.pipeline_id, deployment.owner, int(time.time() * 1000) + 1)
    outcome = await deployment.client._request(lambda: deployment.core._seal(
        "pipeline_delete", order.to_bytes(), timeout=TIMEOUT, content_type=bodies.PIPELINE_DELETE), TIMEOUT)
    assert outcome.ok
    outcome = await deployment.client._request(lambda: deployment.core._seal(
        "pipeline_put", signed.to_bytes(), timeout=TIMEOUT, content_type=bodies.PIPELINE), TIMEOUT)
    assert outcome.error().code == "stale_order", "a definition older than the delete order came back"
    await deployment.broker.delete_inbox(deployment.inbox(theirs))


async def test_a_restarted_worker_serves_the_pipelines_it_had(tee, broker_url, pool, tmp_path):
    owner, recipient = generate_signing_key(), crypto.generate_private_key()
    state = tmp_path / "state"
    async with running_worker(tee, broker_url, pool, state_dir=state) as worker:
        async with AsyncClient(broker_url, pool, tee.policy(), owner_key=owner) as client:
            for model in (ADD_ONE, DOUBLE):
                await client.upload_model(model)
            d = Deployment(client=client, worker=worker, pool=pool, owner=owner, recipient=recipient)
            signed, outcome = await d.put(d.spec())
            assert outcome.ok
    async with running_worker(tee, broker_url, pool, state_dir=state) as worker:
        assert signed.pipeline_id in worker.pipelines.pipelines
        async with AsyncClient(broker_url, pool, tee.policy(), owner_key=owner) as client:
            d = Deployment(client=client, worker=worker, pool=pool, owner=owner, recipient=recipient)
            await answers_one_event(d, signed, "after-restart", "the restarted worker answers the event")


async def answers_one_event(d: Deployment, signed: SignedPipeline, event_id: str, what: str) -> None:
    """Publish one event to ``signed`` and wait (bounded) for its result in the recipient's inbox."""
    inbox = Inbox()
    sub = await d.broker.consume_inbox(d.inbox(signed), inbox)
    await d.publish(signed, event_id, {"x": np.ones((1, 4), np.float32)})
    await wait_until(lambda: len(inbox.raw) == 1, what)
    await sub.cancel()
    await d.broker.delete_inbox(d.inbox(signed))


def consume_stream_failing(worker, monkeypatch, times: int | None) -> list[int]:
    """Make the worker's broker refuse to consume a stream ``times`` times (None: always), as a
    connection lost mid-subscribe does; returns the calls seen."""
    broker = worker._broker
    real = broker.consume_stream
    calls: list[int] = []

    async def consume_stream(*args, **kwargs):
        calls.append(1)
        if times is None or len(calls) <= times:
            raise BrokerUnavailable("the connection closed while subscribing (injected)")
        return await real(*args, **kwargs)

    monkeypatch.setattr(broker, "consume_stream", consume_stream)
    return calls


async def test_a_pipeline_whose_stream_is_briefly_unreachable_is_served_once_the_broker_answers(
        deployment, monkeypatch):
    calls = consume_stream_failing(deployment.worker, monkeypatch, times=2)
    signed, outcome = await deployment.put(deployment.spec())
    assert outcome.ok, outcome.error()
    assert len(calls) == 3
    await answers_one_event(deployment, signed, "after-outage", "the pipeline answers its event")


async def test_a_pipeline_that_cannot_be_served_is_refused_and_not_left_half_installed(
        tee, broker_url, pool, tmp_path, monkeypatch):
    monkeypatch.setattr(worker_module, "_STREAM_RETRY_SECONDS", 0.5)
    owner = generate_signing_key()
    state = tmp_path / "state"
    async with running_worker(tee, broker_url, pool, state_dir=state) as worker:
        async with AsyncClient(broker_url, pool, tee.policy(), owner_key=owner) as client:
            for model in (ADD_ONE, DOUBLE):
                await client.upload_model(model)
            d = Deployment(client=client, worker=worker, pool=pool, owner=owner)
            consume_stream_failing(worker, monkeypatch, times=None)
            signed, outcome = await d.put(d.spec())
            assert outcome.error().code == "internal"
            # Not in force: neither listed nor kept for a restart, so the owner's retry installs
            # it for real (before, the retry was accepted and nothing ever consumed its events).
            assert signed.pipeline_id not in worker.pipelines.pipelines
            monkeypatch.undo()
    async with running_worker(tee, broker_url, pool, state_dir=state) as worker:
        assert signed.pipeline_id not in worker.pipelines.pipelines
        async with AsyncClient(broker_url, pool, tee.policy(), owner_key=owner) as client:
            d = Deployment(client=client, worker=worker, pool=pool, owner=owner)
            retried, outcome = await d.put(d.spec())
            assert outcome.ok, outcome.error()
            await answers_one_event(d, retried, "after-retry", "the retried pipeline answers its event")


async def test_results_of_events_published_before_the_recipient_ever_subscribed_wait_in_its_inbox(deployment):
    # The inbox is declared with the pipeline, not by the subscriber: nothing is lost meanwhile.
    signed, outcome = await deployment.put(deployment.spec(name="early"))
    assert outcome.ok, outcome.error()
    for i in range(5):
        await deployment.publish(signed, f"early-{i}", {"x": np.full((1, 4), i, np.float32)})
    await wait_until(lambda: deployment.worker.metrics.requests.labels("event", "ok")._value.get() == 5,
                     "the five events were handled with nobody subscribed")
    inbox = Inbox()
    sub = await deployment.broker.consume_inbox(deployment.inbox(signed), inbox)
    try:
        await wait_until(lambda: len(inbox.raw) == 5, "the subscriber finds the five results")
        assert sorted(opened(deployment, raw).event_id for raw in inbox.raw) == [f"early-{i}" for i in range(5)]
    finally:
        await sub.cancel()
        await deployment.broker.delete_inbox(deployment.inbox(signed))


async def test_the_pool_lists_a_pipeline_with_what_its_events_must_carry(deployment, chain):
    signed, _ = chain
    outcome = await deployment.client._request(lambda: deployment.core.pipeline_list(timeout=TIMEOUT), TIMEOUT)
    (info,) = [p for p in bodies.decode_pipelines(outcome.body) if p.pipeline_id == signed.pipeline_id]
    assert info.event_inputs == (("x", "float32", (1, 4)),)
    assert (info.source, info.sink, info.models) == (signed.spec.source_topic, signed.spec.sink_topic,
                                                     signed.spec.model_ids)


async def test_a_replacement_that_moves_the_pipelines_topics_is_refused(deployment, chain):
    signed, _ = chain
    moved = sign_pipeline(deployment.spec(source_topic=f"elsewhere/{deployment.pool}"), deployment.owner,
                          signed.issued_ms + 1)
    outcome = await deployment.client._request(lambda: deployment.core._seal(
        "pipeline_put", moved.to_bytes(), timeout=TIMEOUT, content_type=bodies.PIPELINE), TIMEOUT)
    assert outcome.error().code == "pipeline_invalid" and "source or sink" in str(outcome.error())


async def test_a_pipeline_restricted_to_listed_producers_runs_only_their_events(tee, broker_url, pool):
    from producer_sdk import AsyncEventPublisher
    from producer_sdk.errors import NotAllowed

    owner, alice = generate_signing_key(), generate_signing_key()
    async with running_worker(tee, broker_url, pool) as worker:
        async with AsyncClient(broker_url, pool, tee.policy(), owner_key=owner) as client:
            for model in (ADD_ONE, DOUBLE):
                await client.upload_model(model)
            d = Deployment(client=client, worker=worker, pool=pool, owner=owner)
            signed, outcome = await d.put(d.spec(producers=(public_key_bytes(alice),)))
            assert outcome.ok, outcome.error()
            inbox = Inbox()
            sub = await d.broker.consume_inbox(d.inbox(signed), inbox)
            try:
                async with AsyncEventPublisher(broker_url, pool, tee.policy(), signed.pipeline_id) as stranger:
                    await stranger.publish({"x": np.ones((1, 4), np.float32)}, event_id="stranger")
                    await wait_until(lambda: bool(stranger.errors), "the stranger hears it was refused")
                    assert isinstance(stranger.errors[0], NotAllowed)
                async with AsyncEventPublisher(broker_url, pool, tee.policy(), signed.pipeline_id,
                                               producer_key=alice) as listed:
                    await listed.publish({"x": np.ones((1, 4), np.float32)}, event_id="alice")
                await wait_until(lambda: len(inbox.raw) == 1, "alice's event yields a result")
                result = opened(d, inbox.raw[0])
                assert result.event_id == "alice" and result.publisher_key == public_key_bytes(alice)
            finally:
                await sub.cancel()
                await d.broker.delete_inbox(d.inbox(signed))


async def test_a_publisher_whose_connection_drops_goes_on_without_losing_an_event(
        deployment, chain, broker_url, lose_connection):
    from producer_sdk import AsyncEventPublisher

    signed, inbox = chain
    async with AsyncEventPublisher(broker_url, deployment.pool, deployment.client.policy,
                                   signed.pipeline_id) as publisher:
        for i in range(5):
            await publisher.publish({"x": np.full((1, 4), i, np.float32)}, event_id=f"before-{i}")
        await lose_connection(publisher.client._broker)
        for i in range(5):
            await publisher.publish({"x": np.full((1, 4), i, np.float32)}, event_id=f"after-{i}")
        assert not publisher.errors
    await wait_until(lambda: len({opened(deployment, raw).event_id for raw in inbox.raw}) == 10,
                     "all ten events have a result", timeout=60)


async def test_a_pipeline_on_exchanges_of_its_own_carries_events_and_results_through_them(deployment, broker_url):
    # On RabbitMQ the source and sink exchanges are the TOML's; MQTT and memory have one topic space.
    exchanges = dict(source_exchange=f"sensors.{deployment.pool}", sink_exchange=f"dashboards.{deployment.pool}")
    signed, outcome = await deployment.put(deployment.spec(name="own-exchanges", **exchanges))
    assert outcome.ok, outcome.error()
    inbox = Inbox()
    sub = await deployment.broker.consume_inbox(deployment.inbox(signed), inbox)
    try:
        if broker_url.startswith("amqp"):
            # The stream is bound to the pipeline's exchange only: the default one does not reach it.
            _, message = deployment.event(signed, "via-default", {"x": np.ones((1, 4), np.float32)})
            with pytest.raises(Unroutable):
                await deployment.broker.publish_event(signed.spec.source_topic, message)
        await deployment.publish(signed, "via-own", {"x": np.ones((1, 4), np.float32)})
        await wait_until(lambda: len(inbox.raw) == 1, "the result comes through the sink exchange")
        np.testing.assert_allclose(opened(deployment, inbox.raw[0]).outputs["z"], directly(np.ones((1, 4))))
        listed = await deployment.client.list_pipelines()
        (info,) = [p for p in listed if p.pipeline_id == signed.pipeline_id]
        assert (info.source_exchange, info.sink_exchange) == (exchanges["source_exchange"], exchanges["sink_exchange"])
    finally:
        await sub.cancel()
        await deployment.broker.delete_inbox(deployment.inbox(signed))
        if broker_url.startswith("amqp"):
            await delete_exchanges(broker_url, *exchanges.values())
