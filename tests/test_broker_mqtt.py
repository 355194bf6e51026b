"""What only the MQTT adapter has to get right, beyond the shared conformance suite.

MQTT 5 has no queues, no nack, no delivery counter and no exclusive queues, so the adapter builds
them from sessions, retained records and wills (docs/architecture.md, "MQTT 5"). These tests pin
the parts of that construction a broker-agnostic sentence cannot see: PUBACK order, adoption of
left-behind sessions (also when the broker forges a "left" record), lock exclusivity under
contention, and the broker's packet limit.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aiomqtt
import pytest

from broker_adapters import Delivery, Message, PoolBusy, PublishFailed, open_broker
from broker_adapters.mqtt import MqttBroker, sessions_filter

from .support import TIMEOUT, wait_until

pytestmark = pytest.mark.mosquitto


@pytest.fixture
async def broker(mosquitto_url: str) -> AsyncIterator[MqttBroker]:
    async with open_broker(mosquitto_url) as adapter:
        assert isinstance(adapter, MqttBroker)
        yield adapter


@pytest.fixture
async def declared_pool(broker: MqttBroker, pool: str) -> AsyncIterator[str]:
    await broker.declare_pool(pool)
    yield pool
    await broker.delete_pool(pool)


def job(n: int) -> Message:
    return Message(body=f"ciphertext-{n}".encode(), message_id=f"job-{n}")


class Held:
    """A handler that keeps ``job-0`` open until ``release`` is set and acks every other job."""

    def __init__(self) -> None:
        self.seen: asyncio.Queue[str] = asyncio.Queue()
        self.release = asyncio.Event()

    async def __call__(self, delivery: Delivery) -> None:
        self.seen.put_nowait(str(delivery.message.message_id))
        if delivery.message.message_id == "job-0":
            await self.release.wait()
        await delivery.ack()

    async def next(self) -> str:
        return await asyncio.wait_for(self.seen.get(), TIMEOUT)


async def test_a_settled_job_is_not_acknowledged_before_an_earlier_unsettled_one(broker, declared_pool):
    # MQTT 5 §4.6: PUBACKs in the order the PUBLISHes arrived. With a Receive Maximum of 2, job-1's
    # PUBACK must wait for job-0's, so the broker sends nothing more until job-0 is settled;
    # acknowledging job-1 at once would let job-2 through.
    handler = Held()
    sub = await broker.consume_jobs(declared_pool, handler, prefetch=2)
    try:
        for n in range(3):
            await broker.publish_job(declared_pool, job(n))
        assert {await handler.next(), await handler.next()} == {"job-0", "job-1"}
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(handler.seen.get(), 0.5)
        handler.release.set()
        assert await handler.next() == "job-2"
    finally:
        await sub.cancel()


class Counter:
    """Acks everything and counts deliveries per message id."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.ids.append(str(delivery.message.message_id))
        await delivery.ack()


async def retained_records(url: str, topic_filter: str) -> dict[str, bytes]:
    """The retained messages under ``topic_filter``, read by a plain MQTT client."""
    records: dict[str, bytes] = {}
    async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"reader-{uuid.uuid4().hex[:8]}",
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(topic_filter, qos=1)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):  # retained messages follow the SUBACK at once
                async for message in client.messages:
                    records[str(message.topic)] = bytes(message.payload)  # type: ignore[arg-type]
    return records


async def forge(topic: str, payload: bytes) -> None:
    async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"forger-{uuid.uuid4().hex[:8]}",
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.publish(topic, payload, qos=1, retain=True)


async def test_jobs_queued_in_a_consumers_session_reach_another_consumer_after_it_stops(
        broker, mosquitto_url, declared_pool):
    # Mosquitto queues a shared subscription's jobs in its members' sessions; a stopped member's
    # session is marked left and the live member adopts it: every job is delivered.
    async with open_broker(mosquitto_url) as other:
        stopping = Held()  # holds job-0 (and with it every later PUBACK) until it is cancelled
        first = await other.consume_jobs(declared_pool, stopping, prefetch=1)
        live = Counter()
        second = await broker.consume_jobs(declared_pool, live)
        try:
            for n in range(40):
                await broker.publish_job(declared_pool, job(n))
            await first.cancel()
            await wait_until(lambda: set(live.ids) == {f"job-{n}" for n in range(40)},
                             "every job reached the live consumer", timeout=TIMEOUT)
        finally:
            await second.cancel()


async def test_a_forged_left_record_for_a_live_consumer_loses_no_job(broker, mosquitto_url, declared_pool):
    # The broker (or anyone who may publish) marks a live consumer's session as left: another
    # consumer adopts it, the victim is told its session was taken and goes on under a new one.
    async with open_broker(mosquitto_url) as other:
        victim, adopter = Counter(), Counter()
        victim_sub = await other.consume_jobs(declared_pool, victim)
        adopter_sub = await broker.consume_jobs(declared_pool, adopter)
        try:
            live = {topic for topic, record in
                    (await retained_records(mosquitto_url, sessions_filter(declared_pool))).items()
                    if record == b"live"}
            assert len(live) == 2
            for topic in live:
                await forge(topic, b"left")
            for n in range(100):
                await broker.publish_job(declared_pool, job(n))
            await wait_until(lambda: set(victim.ids) | set(adopter.ids) == {f"job-{n}" for n in range(100)},
                             "every job was delivered despite the forged records", timeout=TIMEOUT)
        finally:
            await victim_sub.cancel()
            await adopter_sub.cancel()


async def test_an_adoption_that_fails_is_tried_again_and_its_jobs_arrive(broker, declared_pool, monkeypatch):
    # The seed session holds the jobs published before any consumer. The first two adoptions die
    # on an error from the MQTT client itself (as when a rival adopter takes the session over
    # mid-way; the seed's record may be noticed twice, from the read and from the subscription):
    # the adopter must live on and look at the record again, or those jobs stay there for good.
    for n in range(5):
        await broker.publish_job(declared_pool, job(n))
    drain = broker._drain_session
    failures = []

    async def fails_once(*args, **kwargs):
        if len(failures) < 2:
            failures.append(args)
            raise aiomqtt.MqttCodeError(4, "Could not unsubscribe from topic")
        return await drain(*args, **kwargs)

    monkeypatch.setattr(broker, "_drain_session", fails_once)
    seen = Counter()
    sub = await broker.consume_jobs(declared_pool, seen)
    try:
        await wait_until(lambda: sorted(seen.ids) == sorted(f"job-{n}" for n in range(5)),
                         "the jobs of the session whose first adoption failed arrived", timeout=TIMEOUT)
        assert len(failures) == 2
    finally:
        await sub.cancel()


async def test_two_adapters_racing_for_a_pool_lock_never_both_hold_it(broker, mosquitto_url, declared_pool):
    async with open_broker(mosquitto_url) as rival:
        won_by_one = 0
        for _ in range(8):
            results = await asyncio.gather(broker.acquire_pool_lock(declared_pool, purpose="rotation"),
                                           rival.acquire_pool_lock(declared_pool, purpose="rotation"),
                                           return_exceptions=True)
            locks = [r for r in results if not isinstance(r, BaseException)]
            assert all(isinstance(r, PoolBusy) for r in results if isinstance(r, BaseException))
            assert len(locks) <= 1, "both contenders hold the lock"
            won_by_one += len(locks)
            for lock in locks:
                await lock.release()
        # Collisions are retried after random pauses, so rounds rarely end with no winner at all.
        assert won_by_one >= 4


async def test_a_publish_over_the_brokers_packet_limit_is_refused_before_it_is_sent(tmp_path, unique_name):
    from .mosquitto import PrivateMosquitto

    mosquitto = PrivateMosquitto(tmp_path / "mosquitto", extra="max_packet_size 65536\n").start()
    try:
        async with open_broker(mosquitto.url) as adapter:
            await adapter.declare_pool(unique_name)
            seen = Counter()
            sub = await adapter.consume_jobs(unique_name, seen)
            with pytest.raises(PublishFailed, match="maximum packet size of 65536"):
                await adapter.publish_job(unique_name, Message(body=b"x" * 100_000, message_id="big"))
            await adapter.publish_job(unique_name, Message(body=b"x" * 1000, message_id="small"))
            await wait_until(lambda: seen.ids == ["small"], "the small job still goes through")
            await sub.cancel()
    finally:
        mosquitto.stop()


class HoldFirstDeliveries:
    """Holds the first ``n`` deliveries open (as jobs still running when the network fails) and
    acks every later one, recording message ids."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.ids: list[str] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.ids.append(str(delivery.message.message_id))
        if len(self.ids) <= self.n:
            await asyncio.Event().wait()
        await delivery.ack()


async def test_jobs_resent_right_after_a_reconnect_are_acknowledged_and_consumption_goes_on(
        broker, declared_pool, lose_connection):
    # A resumed session's unacknowledged jobs arrive together with the CONNACK. Acked as if they
    # belonged to the lost connection, they were refused, held their Receive Maximum slots for
    # ever, and the consumer stopped receiving anything (what a Mosquitto restart showed).
    handler = HoldFirstDeliveries(2)
    sub = await broker.consume_jobs(declared_pool, handler, prefetch=2)
    try:
        for n in range(2):
            await broker.publish_job(declared_pool, job(n))
        await wait_until(lambda: len(handler.ids) == 2, "both jobs are held")
        await lose_connection(broker)
        await wait_until(lambda: handler.ids.count("job-0") == 2 and handler.ids.count("job-1") == 2,
                         "the held jobs come back after the reconnect", timeout=TIMEOUT)
        for n in range(2, 7):
            await broker.publish_job(declared_pool, job(n))
        await wait_until(lambda: {f"job-{n}" for n in range(2, 7)} <= set(handler.ids),
                         "jobs published after the reconnect are delivered", timeout=TIMEOUT)
    finally:
        await sub.cancel()
