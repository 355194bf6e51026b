"""Event streams and result inboxes (issue 11): one conformance suite, run against every adapter.

Each test reads as a sentence about the "event streams" and "inboxes" part of the broker contract
in ``broker_adapters/base.py`` and runs unchanged against the in-process broker, RabbitMQ and
Mosquitto. Topics are MQTT-style everywhere. Every topic a test uses lies under its own
``enclaveq-test/<unique name>`` prefix (the events and results exchanges are shared by every test
on the broker), and everything a test declares -- pools, streams, inboxes -- is deleted in fixture
teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

import pytest

from broker_adapters import (
    BrokerAdapter,
    BrokerError,
    Delivery,
    Message,
    PoolSettings,
    QueueNotFound,
    Subscription,
    Unroutable,
    open_broker,
)
from broker_adapters._common import REPLY_DELIVERY_LIMIT

from .support import RECONNECT_TIMEOUT, TIMEOUT

DELIVERY_LIMIT = 3
SETTINGS = PoolSettings(delivery_limit=DELIVERY_LIMIT)


# -- fixtures ----------------------------------------------------------------------------
# `pool`, `unique_name`, `broker_url` and `lose_connection` come from conftest.py.


def adapter_for(url: str) -> BrokerAdapter:
    return open_broker(url)


@pytest.fixture
async def broker(broker_url: str) -> AsyncIterator[BrokerAdapter]:
    async with adapter_for(broker_url) as adapter:
        yield adapter


@pytest.fixture
def base(unique_name: str) -> str:
    """The test's own topic prefix: no other test publishes or subscribes under it."""
    return f"enclaveq-test/{unique_name}"


class Topology:
    """Declares pools, streams and inboxes for a test, and deletes them all afterwards."""

    def __init__(self, broker: BrokerAdapter) -> None:
        self.broker = broker
        self._pools: list[str] = []
        self._streams: list[tuple[str, str]] = []
        self._inboxes: list[str] = []

    async def pool(self, name: str, settings: PoolSettings = SETTINGS) -> str:
        self._pools.append(name)
        await self.broker.declare_pool(name, settings)
        return name

    async def stream(self, pool: str, stream: str, topic_filter: str, settings: PoolSettings = SETTINGS) -> str:
        self._streams.append((pool, stream))
        await self.broker.declare_stream(pool, stream, topic_filter, settings)
        return stream

    async def inbox(self, name: str, topic_filter: str) -> str:
        self._inboxes.append(name)
        await self.broker.declare_inbox(name, topic_filter)
        return name

    async def delete_all(self) -> None:
        for pool, stream in reversed(self._streams):
            await self.broker.delete_stream(pool, stream)
        for name in reversed(self._inboxes):
            await self.broker.delete_inbox(name)
        for pool in reversed(self._pools):
            await self.broker.delete_pool(pool)


@pytest.fixture
async def declared(broker: BrokerAdapter) -> AsyncIterator[Topology]:
    topology = Topology(broker)
    try:
        yield topology
    finally:
        await topology.delete_all()


@pytest.fixture
async def declared_pool(declared: Topology, pool: str) -> str:
    """The test's pool, declared with a delivery limit of ``DELIVERY_LIMIT``."""
    return await declared.pool(pool)


# -- helpers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """What a consumer observed on one delivery."""

    message: Message
    redelivered: bool
    delivery_count: int


class Recorder:
    """A handler that records every delivery and settles it by script.

    ``Recorder("nack")`` nacks everything; ``Recorder("hold", "ack")`` holds the first delivery
    open and acks the rest. Actions: ack, nack, reject, raise, hold.
    """

    def __init__(self, *actions: str) -> None:
        self._actions = list(actions) or ["ack"]
        self._seen: asyncio.Queue[Seen] = asyncio.Queue()
        self.count = 0

    async def __call__(self, delivery: Delivery) -> None:
        action = self._actions[min(self.count, len(self._actions) - 1)]
        self.count += 1
        self._seen.put_nowait(Seen(delivery.message, delivery.redelivered, delivery.delivery_count))
        if action == "ack":
            await delivery.ack()
        elif action == "nack":
            await delivery.nack()
        elif action == "reject":
            await delivery.reject()
        elif action == "raise":
            raise RuntimeError("handler failed")
        elif action == "hold":
            await asyncio.Event().wait()

    async def next(self, timeout: float = TIMEOUT) -> Seen:
        return await asyncio.wait_for(self._seen.get(), timeout)

    async def nothing_more(self, within: float = 0.3) -> None:
        with pytest.raises(asyncio.TimeoutError):
            extra = await asyncio.wait_for(self._seen.get(), within)
            pytest.fail(f"unexpected extra delivery: {extra}")


@contextlib.asynccontextmanager
async def consuming(*subscribing: Coroutine[Any, Any, Subscription]) -> AsyncIterator[None]:
    """``async with consuming(broker.consume_stream(...), ...)``: subscribe in order, cancel them all
    afterwards (also when one of them fails to subscribe)."""
    subs: list[Subscription] = []
    pending = list(subscribing)
    try:
        while pending:
            subs.append(await pending.pop(0))
        yield
    finally:
        for never_awaited in pending:
            never_awaited.close()
        for sub in subs:
            await sub.cancel()


def event(n: int = 1, **fields: Any) -> Message:
    return Message(body=f"sealed-event-{n}".encode(), message_id=f"event-{n}", **fields)


def result(n: int = 1, **fields: Any) -> Message:
    return Message(body=f"sealed-result-{n}".encode(), message_id=f"result-{n}", **fields)


# -- streams: routing --------------------------------------------------------------------


async def test_an_event_reaches_the_stream_whose_filter_matches_its_topic_with_all_its_fields(
        broker, declared, declared_pool, base):
    await declared.stream(declared_pool, "frames", f"{base}/+/frames")
    seen = Recorder("ack")
    sent = event(correlation_id="corr-1", headers={"kind": "event", "seq": 7, "nonce": b"\x00\xff", "urgent": True})
    async with consuming(broker.consume_stream(declared_pool, "frames", seen)):
        await broker.publish_event(f"{base}/cam-1/frames", sent)
        got = await seen.next()
        assert got.message == sent
        assert (got.redelivered, got.delivery_count) == (False, 1)
        await seen.nothing_more()


@pytest.mark.parametrize(("topic_filter", "topic", "routed"), [
    ("{base}/+/frames", "{base}/cam-1/frames", True),
    ("{base}/+/frames", "{base}/cam-1/audio", False),
    ("{base}/+/frames", "{base}/cam-1/left/frames", False),
    ("{base}/#", "{base}", True),
    ("{base}/#", "{base}/cam-1/left/frames", True),
    ("{base}/cam-1/frames", "{base}/cam-1/frames", True),
    ("{base}/cam-1/frames", "{base}/cam-2/frames", False),
    ("{base}/cam-1", "{base}/cam-1/frames", False),
])
async def test_a_filter_matches_topics_as_mqtt_does_plus_one_level_hash_the_rest(
        broker, declared, declared_pool, base, topic_filter, topic, routed):
    await declared.stream(declared_pool, "s", topic_filter.format(base=base))
    seen = Recorder("ack")
    async with consuming(broker.consume_stream(declared_pool, "s", seen)):
        if routed:
            await broker.publish_event(topic.format(base=base), event())
            assert (await seen.next()).message.message_id == "event-1"
        else:
            with pytest.raises(Unroutable):
                await broker.publish_event(topic.format(base=base), event())
            await seen.nothing_more(within=0.1)


async def test_an_event_matching_no_stream_is_unroutable(broker, declared_pool, base):
    with pytest.raises(Unroutable) as refused:
        await broker.publish_event(f"{base}/nobody/listens", Message(body=b"SECRET-EVENT"))
    assert "SECRET" not in str(refused.value)


async def test_two_matching_streams_of_different_pools_each_get_a_copy(broker, declared, declared_pool, base):
    other_pool = await declared.pool(f"{declared_pool}-b")
    await declared.stream(declared_pool, "all", f"{base}/#")
    await declared.stream(other_pool, "frames", f"{base}/+/frames")
    first, second = Recorder("ack"), Recorder("ack")
    async with consuming(broker.consume_stream(declared_pool, "all", first),
                         broker.consume_stream(other_pool, "frames", second)):
        await broker.publish_event(f"{base}/cam-1/frames", event(1))
        assert (await first.next()).message.body == b"sealed-event-1"
        assert (await second.next()).message.body == b"sealed-event-1"
        await broker.publish_event(f"{base}/cam-1/audio", event(2))  # the first stream's alone
        assert (await first.next()).message.body == b"sealed-event-2"
        await second.nothing_more(within=0.2)


async def test_events_and_results_are_routed_apart_a_stream_never_sees_a_result(
        broker, broker_url, declared, declared_pool, base):
    if broker_url.startswith("mqtt"):
        # MQTT has one topic namespace: a stream whose filter covers a result topic receives the
        # result (the worker refuses it as malformed). Pipelines refuse a sink that their own source
        # matches (protocol.pipeline); docs/architecture.md says the rest.
        pytest.skip("MQTT shares one topic namespace between events and results (documented)")
    await declared.stream(declared_pool, "s", f"{base}/#")
    with pytest.raises(Unroutable):
        await broker.publish_result(f"{base}/out", result())
    await declared.inbox(f"{declared_pool}-inbox", f"{base}/#")
    seen = Recorder("ack")
    async with consuming(broker.consume_stream(declared_pool, "s", seen)):
        await broker.publish_result(f"{base}/out", result())
        await seen.nothing_more()


# -- streams: delivery -------------------------------------------------------------------


async def test_an_event_published_before_any_worker_consumes_waits_in_the_stream(
        broker, declared, declared_pool, base):
    await declared.stream(declared_pool, "s", f"{base}/text")
    for n in (1, 2):
        await broker.publish_event(f"{base}/text", event(n))
    seen = Recorder("ack")
    async with consuming(broker.consume_stream(declared_pool, "s", seen)):
        got = {(await seen.next()).message.message_id for _ in range(2)}
        assert got == {"event-1", "event-2"}


async def test_the_pools_workers_share_a_stream_as_competing_consumers(
        broker, broker_url, declared, declared_pool, base):
    await declared.stream(declared_pool, "s", f"{base}/text")
    first, second = Recorder("hold"), Recorder("hold")
    async with adapter_for(broker_url) as other_worker:
        # Each worker holds at most one event: two events go one to each, a third waits.
        async with consuming(broker.consume_stream(declared_pool, "s", first, prefetch=1),
                             other_worker.consume_stream(declared_pool, "s", second, prefetch=1)):
            for n in (1, 2, 3):
                await broker.publish_event(f"{base}/text", event(n))
            got = {(await first.next()).message.message_id, (await second.next()).message.message_id}
            assert len(got) == 2 and got <= {"event-1", "event-2", "event-3"}
            await first.nothing_more(within=0.2)
            await second.nothing_more(within=0.1)


async def test_a_nacked_event_comes_back_flagged_redelivered_with_a_growing_count(
        broker, declared, declared_pool, base):
    await declared.stream(declared_pool, "s", f"{base}/text")
    seen = Recorder("nack", "ack")
    async with consuming(broker.consume_stream(declared_pool, "s", seen)):
        await broker.publish_event(f"{base}/text", event())
        first, second = await seen.next(), await seen.next()
        assert (first.redelivered, first.delivery_count) == (False, 1)
        assert (second.redelivered, second.delivery_count) == (True, 2)
        await seen.nothing_more()


async def test_an_event_nacked_up_to_the_pools_delivery_limit_goes_to_the_pools_dead_letters(
        broker, declared, declared_pool, base):
    await declared.stream(declared_pool, "s", f"{base}/text")
    seen, dead = Recorder("nack"), Recorder("ack")
    async with consuming(broker.consume_stream(declared_pool, "s", seen), broker.consume_dead_letters(declared_pool, dead)):
        await broker.publish_event(f"{base}/text", event())
        counts = [(await seen.next()).delivery_count for _ in range(DELIVERY_LIMIT)]
        assert counts == [1, 2, 3]
        letter = await dead.next()
        assert (letter.message.message_id, letter.message.body) == ("event-1", b"sealed-event-1")
        assert letter.message.headers["x-first-death-reason"] == "delivery_limit"
        await seen.nothing_more()


async def test_a_rejected_event_is_dead_lettered_at_once(broker, declared, declared_pool, base):
    await declared.stream(declared_pool, "s", f"{base}/text")
    seen, dead = Recorder("reject"), Recorder("ack")
    async with consuming(broker.consume_stream(declared_pool, "s", seen), broker.consume_dead_letters(declared_pool, dead)):
        await broker.publish_event(f"{base}/text", event(headers={"kind": "event"}))
        await seen.next()
        letter = await dead.next()
        assert letter.message.headers["kind"] == "event"
        assert letter.message.headers["x-first-death-reason"] == "rejected"
        await seen.nothing_more()


async def test_an_event_whose_handler_raises_is_redelivered(broker, declared, declared_pool, base):
    await declared.stream(declared_pool, "s", f"{base}/text")
    seen = Recorder("raise", "ack")
    async with consuming(broker.consume_stream(declared_pool, "s", seen)):
        await broker.publish_event(f"{base}/text", event())
        await seen.next()
        again = await seen.next()
        assert (again.redelivered, again.delivery_count) == (True, 2)


async def test_after_a_lost_connection_unsettled_events_come_back_and_consumption_resumes(
        broker, declared, declared_pool, base, lose_connection):
    await declared.stream(declared_pool, "s", f"{base}/text")
    seen = Recorder("hold", "ack")
    async with consuming(broker.consume_stream(declared_pool, "s", seen)):
        await broker.publish_event(f"{base}/text", event(1))
        assert not (await seen.next()).redelivered

        await lose_connection(broker)

        again = await seen.next(timeout=RECONNECT_TIMEOUT)
        assert (again.message.message_id, again.redelivered) == ("event-1", True)
        await asyncio.wait_for(broker.publish_event(f"{base}/text", event(2)), RECONNECT_TIMEOUT)
        fresh = await seen.next()
        assert (fresh.message.message_id, fresh.redelivered) == ("event-2", False)


# -- streams: declaring and deleting -----------------------------------------------------


async def test_redeclaring_a_stream_with_its_filter_is_idempotent_with_another_filter_fails_and_changes_nothing(
        broker, declared, declared_pool, base):
    await declared.stream(declared_pool, "s", f"{base}/a")
    await broker.declare_stream(declared_pool, "s", f"{base}/a", SETTINGS)
    with pytest.raises(BrokerError):
        await broker.declare_stream(declared_pool, "s", f"{base}/b", SETTINGS)
    with pytest.raises(Unroutable):
        await broker.publish_event(f"{base}/b", event())
    seen = Recorder("ack")
    async with consuming(broker.consume_stream(declared_pool, "s", seen)):
        await broker.publish_event(f"{base}/a", event())
        assert (await seen.next()).message.message_id == "event-1"
        await seen.nothing_more(within=0.1)  # declared once: one copy


async def test_a_stream_cannot_be_declared_on_an_undeclared_pool(broker, unique_name, base):
    with pytest.raises(QueueNotFound):
        await broker.declare_stream(f"{unique_name}-nowhere", "s", f"{base}/a", SETTINGS)
    with pytest.raises(Unroutable):
        await broker.publish_event(f"{base}/a", event())


async def test_consuming_an_undeclared_stream_fails_clearly(broker, declared_pool, unique_name):
    with pytest.raises(QueueNotFound):
        await broker.consume_stream(declared_pool, "never-declared", Recorder())
    with pytest.raises(QueueNotFound):
        await broker.consume_stream(f"{unique_name}-nowhere", "s", Recorder())


async def test_a_deleted_stream_takes_no_more_events_and_its_consumers_stop(broker, declared, declared_pool, base):
    await declared.stream(declared_pool, "gone", f"{base}/a")
    seen = Recorder("ack")
    async with consuming(broker.consume_stream(declared_pool, "gone", seen)):
        await broker.delete_stream(declared_pool, "gone")
        with pytest.raises(Unroutable):
            await broker.publish_event(f"{base}/a", event(1))
        with pytest.raises(QueueNotFound):
            await broker.consume_stream(declared_pool, "gone", Recorder())
        # Another stream matching the topic takes it from now on.
        await declared.stream(declared_pool, "other", f"{base}/+")
        await broker.publish_event(f"{base}/a", event(2))
        await seen.nothing_more()


async def test_deleting_a_pool_from_any_adapter_deletes_its_streams(broker, broker_url, declared, declared_pool, base):
    await declared.stream(declared_pool, "s", f"{base}/a")
    await broker.publish_event(f"{base}/a", event(1))
    async with adapter_for(broker_url) as operator:  # `enclaveq pool delete`
        await operator.delete_pool(declared_pool)
    with pytest.raises(Unroutable):
        await broker.publish_event(f"{base}/a", event(2))
    await broker.declare_pool(declared_pool, SETTINGS)
    with pytest.raises(QueueNotFound):
        await broker.consume_stream(declared_pool, "s", Recorder())
    # Declared again, the stream starts empty: the old event went with the pool.
    await broker.declare_stream(declared_pool, "s", f"{base}/a", SETTINGS)
    seen = Recorder("ack")
    async with consuming(broker.consume_stream(declared_pool, "s", seen)):
        await broker.publish_event(f"{base}/a", event(3))
        assert (await seen.next()).message.message_id == "event-3"
        await seen.nothing_more(within=0.1)


@pytest.mark.parametrize("bad_filter", ["", "a//b", "a/#/b", "a/b#", "a/+x", "a.b", "a b", "/".join("a" * 17)])
async def test_a_malformed_stream_filter_is_a_value_error(broker, declared_pool, bad_filter):
    with pytest.raises(ValueError):
        await broker.declare_stream(declared_pool, "s", bad_filter, SETTINGS)


@pytest.mark.parametrize("bad_topic", ["a/+", "a/#", "#", "", "a//b", "a.b"])
async def test_events_and_results_are_published_on_topics_without_wildcards(broker, bad_topic):
    with pytest.raises(ValueError):
        await broker.publish_event(bad_topic, event())
    with pytest.raises(ValueError):
        await broker.publish_result(bad_topic, result())


@pytest.mark.parametrize("bad_name", ["", "-s", "a/b", "a b", "s" * 129])
async def test_a_stream_or_inbox_with_a_malformed_name_is_a_value_error(broker, declared_pool, base, bad_name):
    with pytest.raises(ValueError):
        await broker.declare_stream(declared_pool, bad_name, f"{base}/a", SETTINGS)
    with pytest.raises(ValueError):
        await broker.declare_inbox(bad_name, f"{base}/a")


# -- inboxes -----------------------------------------------------------------------------


async def test_a_result_reaches_every_inbox_whose_filter_matches_with_all_its_fields(
        broker, declared, unique_name, base):
    alerts = await declared.inbox(f"{unique_name}-alerts", f"{base}/+/alerts")
    everything = await declared.inbox(f"{unique_name}-all", f"{base}/#")
    first, second = Recorder("ack"), Recorder("ack")
    sent = result(correlation_id="event-9", headers={"pipeline": "p" * 64, "seq": 1, "tag": b"\x01"})
    async with consuming(broker.consume_inbox(alerts, first), broker.consume_inbox(everything, second)):
        await broker.publish_result(f"{base}/dog/alerts", sent)
        for seen in (first, second):
            got = await seen.next()
            assert got.message == sent
            assert (got.redelivered, got.delivery_count) == (False, 1)
        await broker.publish_result(f"{base}/dog/embeddings", result(2))
        assert (await second.next()).message.message_id == "result-2"
        await first.nothing_more(within=0.2)


async def test_results_published_while_nobody_consumes_are_delivered_when_a_consumer_comes(
        broker, broker_url, declared, unique_name, base):
    inbox = await declared.inbox(f"{unique_name}-inbox", f"{base}/out")
    await broker.publish_result(f"{base}/out", result(1))  # before anyone ever consumed
    seen = Recorder("ack")
    async with consuming(broker.consume_inbox(inbox, seen)):
        assert (await seen.next()).message.message_id == "result-1"
    await broker.publish_result(f"{base}/out", result(2))  # while the recipient is offline
    await broker.publish_result(f"{base}/out", result(3))
    async with adapter_for(broker_url) as recipient, consuming(recipient.consume_inbox(inbox, seen)):
        got = {(await seen.next()).message.message_id for _ in range(2)}
        assert got == {"result-2", "result-3"}
        await seen.nothing_more(within=0.1)


async def test_a_result_matching_no_inbox_is_unroutable(broker, declared, unique_name, base):
    await declared.inbox(f"{unique_name}-inbox", f"{base}/out")
    with pytest.raises(Unroutable) as refused:
        await broker.publish_result(f"{base}/elsewhere", Message(body=b"SECRET-RESULT"))
    assert "SECRET" not in str(refused.value)


async def test_consuming_an_undeclared_inbox_fails_clearly(broker, unique_name):
    with pytest.raises(QueueNotFound):
        await broker.consume_inbox(f"{unique_name}-never", Recorder())


async def test_an_unsettled_result_comes_back_as_a_reply_does_and_is_dropped_after_the_reply_limit(
        broker, declared, unique_name, base):
    inbox = await declared.inbox(f"{unique_name}-inbox", f"{base}/out")
    seen = Recorder("nack")
    async with consuming(broker.consume_inbox(inbox, seen)):
        await broker.publish_result(f"{base}/out", result())
        counts = [(await seen.next()).delivery_count for _ in range(REPLY_DELIVERY_LIMIT)]
        assert counts == list(range(1, REPLY_DELIVERY_LIMIT + 1))
        await seen.nothing_more()


async def test_redeclaring_an_inbox_with_its_filter_is_idempotent_with_another_filter_fails_and_changes_nothing(
        broker, declared, unique_name, base):
    inbox = await declared.inbox(f"{unique_name}-inbox", f"{base}/a")
    await broker.declare_inbox(inbox, f"{base}/a")
    with pytest.raises(BrokerError):
        await broker.declare_inbox(inbox, f"{base}/b")
    with pytest.raises(Unroutable):
        await broker.publish_result(f"{base}/b", result())
    seen = Recorder("ack")
    async with consuming(broker.consume_inbox(inbox, seen)):
        await broker.publish_result(f"{base}/a", result())
        assert (await seen.next()).message.message_id == "result-1"
        await seen.nothing_more(within=0.1)


async def test_a_deleted_inbox_takes_no_more_results_and_loses_what_it_held(broker, declared, unique_name, base):
    inbox = await declared.inbox(f"{unique_name}-inbox", f"{base}/out")
    await broker.publish_result(f"{base}/out", result(1))
    await broker.delete_inbox(inbox)
    with pytest.raises(Unroutable):
        await broker.publish_result(f"{base}/out", result(2))
    with pytest.raises(QueueNotFound):
        await broker.consume_inbox(inbox, Recorder())
    await broker.declare_inbox(inbox, f"{base}/out")
    seen = Recorder("ack")
    async with consuming(broker.consume_inbox(inbox, seen)):
        await seen.nothing_more()


@pytest.mark.parametrize("bad_filter", ["", "a//b", "a/#/b", "a/+x", "a.b"])
async def test_a_malformed_inbox_filter_is_a_value_error(broker, unique_name, bad_filter):
    with pytest.raises(ValueError):
        await broker.declare_inbox(f"{unique_name}-inbox", bad_filter)
