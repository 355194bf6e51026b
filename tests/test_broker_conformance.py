"""One conformance suite, run against every broker adapter.

Each test reads as a sentence about the broker contract in ``broker_adapters/base.py`` and runs
unchanged against the in-process broker, RabbitMQ and Mosquitto.
Everything a test declares is deleted in fixture teardown, so shared brokers keep no leftovers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from broker_adapters import (
    BrokerAdapter,
    BrokerError,
    Delivery,
    Message,
    PoolBusy,
    PoolSettings,
    PublishFailed,
    QueueNotFound,
    Unroutable,
    open_broker,
)

from .support import RECONNECT_TIMEOUT, TIMEOUT

DELIVERY_LIMIT = 3


# -- fixtures ----------------------------------------------------------------------------
# `pool` and `lose_connection` come from conftest.py.


def adapter_for(url: str) -> BrokerAdapter:
    return open_broker(url)


@pytest.fixture
async def broker(broker_url: str) -> AsyncIterator[BrokerAdapter]:
    async with adapter_for(broker_url) as adapter:
        yield adapter


@pytest.fixture
async def declared_pool(broker: BrokerAdapter, pool: str) -> AsyncIterator[str]:
    """The test's pool, declared with a delivery limit of ``DELIVERY_LIMIT``."""
    await broker.declare_pool(pool, PoolSettings(delivery_limit=DELIVERY_LIMIT))
    try:
        yield pool
    finally:
        await broker.delete_pool(pool)


@pytest.fixture
async def replies(broker: BrokerAdapter, unique_name: str) -> AsyncIterator[str]:
    """The name of a declared reply queue."""
    name = f"{unique_name}-replies"
    await broker.declare_reply_queue(name)
    try:
        yield name
    finally:
        await broker.delete_reply_queue(name)


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
    open (the handler keeps running, as a slow job would) and acks the rest. Actions: ack, nack,
    reject, raise, forget (return unsettled), hold.
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


def job(n: int = 1, **fields: object) -> Message:
    return Message(body=f"ciphertext-{n}".encode(), message_id=f"job-{n}", **fields)


# -- jobs --------------------------------------------------------------------------------


async def test_a_published_job_is_consumed_with_all_its_fields_and_acked_once(broker, declared_pool):
    seen = Recorder("ack")
    sub = await broker.consume_jobs(declared_pool, seen)
    sent = job(
        correlation_id="corr-1",
        reply_to="enclaveq.reply.somebody",
        headers={"kind": "infer", "attempt": 1, "nonce": b"\x00\xff", "urgent": True},
    )
    try:
        await broker.publish_job(declared_pool, sent)
        got = await seen.next()
        assert got.message == sent
        assert (got.redelivered, got.delivery_count) == (False, 1)
        await seen.nothing_more()
    finally:
        await sub.cancel()


async def test_a_nacked_job_comes_back_flagged_redelivered_with_a_growing_count(broker, declared_pool):
    seen = Recorder("nack", "ack")
    sub = await broker.consume_jobs(declared_pool, seen)
    try:
        await broker.publish_job(declared_pool, job())
        first, second = await seen.next(), await seen.next()
        assert (first.redelivered, first.delivery_count) == (False, 1)
        assert (second.redelivered, second.delivery_count) == (True, 2)
        assert second.message.body == first.message.body
        await seen.nothing_more()
    finally:
        await sub.cancel()


async def test_a_job_nacked_up_to_the_delivery_limit_is_dead_lettered(broker, declared_pool):
    seen, dead = Recorder("nack"), Recorder("ack")
    subs = [await broker.consume_jobs(declared_pool, seen), await broker.consume_dead_letters(declared_pool, dead)]
    try:
        await broker.publish_job(declared_pool, job())
        counts = [(await seen.next()).delivery_count for _ in range(DELIVERY_LIMIT)]
        assert counts == [1, 2, 3]
        letter = await dead.next()
        assert letter.message.body == b"ciphertext-1"
        assert letter.message.headers["x-first-death-reason"] == "delivery_limit"
        await seen.nothing_more()
    finally:
        for sub in subs:
            await sub.cancel()


async def test_a_rejected_job_is_dead_lettered_at_once(broker, declared_pool):
    seen, dead = Recorder("reject"), Recorder("ack")
    subs = [await broker.consume_jobs(declared_pool, seen), await broker.consume_dead_letters(declared_pool, dead)]
    try:
        await broker.publish_job(declared_pool, job(headers={"kind": "infer"}))
        await seen.next()
        letter = await dead.next()
        assert letter.message.message_id == "job-1"
        assert letter.message.headers["kind"] == "infer"
        assert letter.message.headers["x-first-death-reason"] == "rejected"
        await seen.nothing_more()
    finally:
        for sub in subs:
            await sub.cancel()


@pytest.mark.parametrize("misbehaviour", ["raise", "forget"])
async def test_a_job_whose_handler_raises_or_forgets_to_settle_is_redelivered(broker, declared_pool, misbehaviour):
    seen = Recorder(misbehaviour, "ack")
    sub = await broker.consume_jobs(declared_pool, seen)
    try:
        await broker.publish_job(declared_pool, job())
        await seen.next()
        again = await seen.next()
        assert (again.redelivered, again.delivery_count) == (True, 2)
        await seen.nothing_more()
    finally:
        await sub.cancel()


async def test_a_dead_letter_waits_until_someone_consumes_it(broker, declared_pool):
    seen = Recorder("reject")
    sub = await broker.consume_jobs(declared_pool, seen)
    try:
        await broker.publish_job(declared_pool, job())
        await seen.next()
    finally:
        await sub.cancel()
    dead = Recorder("ack")
    sub = await broker.consume_dead_letters(declared_pool, dead)
    try:
        assert (await dead.next()).message.message_id == "job-1"
    finally:
        await sub.cancel()


async def test_a_job_published_without_a_message_id_gets_one(broker, declared_pool):
    seen = Recorder("ack")
    sub = await broker.consume_jobs(declared_pool, seen)
    try:
        await broker.publish_job(declared_pool, Message(body=b"anonymous"))
        assert (await seen.next()).message.message_id
    finally:
        await sub.cancel()


async def test_redeclaring_a_pool_is_idempotent_but_its_delivery_limit_cannot_change(broker, declared_pool):
    await broker.declare_pool(declared_pool, PoolSettings(delivery_limit=DELIVERY_LIMIT))
    with pytest.raises(BrokerError):
        await broker.declare_pool(declared_pool, PoolSettings(delivery_limit=DELIVERY_LIMIT + 1))


async def test_adapters_declaring_one_pool_at_the_same_time_all_succeed_and_share_it(broker, broker_url, pool):
    # Workers of a new pool start together; on MQTT their declarations take the same fixed-name
    # sessions from each other (session takeover), which must not fail either of them.
    async with adapter_for(broker_url) as a, adapter_for(broker_url) as b:
        settings = PoolSettings(delivery_limit=DELIVERY_LIMIT)
        await asyncio.gather(*(x.declare_pool(pool, settings) for x in (broker, a, b)))
        seen = Recorder("ack")
        sub = await a.consume_jobs(pool, seen)
        try:
            await b.publish_job(pool, job(1))
            assert (await seen.next()).message.message_id == "job-1"
        finally:
            await sub.cancel()
            await broker.delete_pool(pool)


async def test_a_job_for_an_undeclared_pool_is_unroutable(broker, unique_name):
    with pytest.raises(Unroutable):
        await broker.publish_job(f"{unique_name}-nowhere", job())


async def test_consuming_an_undeclared_pool_fails_clearly(broker, unique_name):
    with pytest.raises(QueueNotFound):
        await broker.consume_jobs(f"{unique_name}-nowhere", Recorder())


async def test_an_oversized_job_is_refused_before_it_reaches_the_queue(broker, pool):
    await broker.declare_pool(pool, PoolSettings(delivery_limit=DELIVERY_LIMIT, max_message_bytes=1024))
    try:
        payload = b"SECRET" * 200
        with pytest.raises(PublishFailed) as refused:
            await broker.publish_job(pool, Message(body=payload[:1025]))
        assert "1025 bytes" in str(refused.value) and "SECRET" not in str(refused.value)
        await broker.publish_job(pool, Message(body=payload[:1024]))
    finally:
        await broker.delete_pool(pool)


async def test_a_consumer_never_holds_more_unsettled_jobs_than_its_prefetch(broker, declared_pool):
    seen = Recorder("hold")
    sub = await broker.consume_jobs(declared_pool, seen, prefetch=2)
    try:
        for n in range(4):
            await broker.publish_job(declared_pool, job(n))
        await seen.next(), await seen.next()
        await seen.nothing_more()
    finally:
        await sub.cancel()


async def test_cancelling_a_subscription_returns_its_unsettled_jobs_to_the_queue(broker, declared_pool):
    holder = Recorder("hold")
    sub = await broker.consume_jobs(declared_pool, holder)
    await broker.publish_job(declared_pool, job())
    await holder.next()
    await sub.cancel()

    successor = Recorder("ack")
    sub = await broker.consume_jobs(declared_pool, successor)
    try:
        again = await successor.next()
        assert again.message.message_id == "job-1"
        assert again.redelivered
    finally:
        await sub.cancel()


async def test_after_a_lost_connection_unsettled_jobs_come_back_and_consumption_resumes(broker, declared_pool,
                                                                                      lose_connection):
    seen = Recorder("hold", "ack")
    sub = await broker.consume_jobs(declared_pool, seen)
    try:
        await broker.publish_job(declared_pool, job(1))
        first = await seen.next()
        assert not first.redelivered

        await lose_connection(broker)

        again = await seen.next(timeout=RECONNECT_TIMEOUT)
        assert again.message.message_id == "job-1"
        assert (again.redelivered, again.delivery_count) == (True, 2)
        await asyncio.wait_for(broker.publish_job(declared_pool, job(2)), RECONNECT_TIMEOUT)
        fresh = await seen.next()
        assert (fresh.message.message_id, fresh.redelivered) == ("job-2", False)
    finally:
        await sub.cancel()


async def test_reconnect_callbacks_run_once_the_connection_is_back(broker, declared_pool, lose_connection):
    reconnected = asyncio.Event()

    async def callback() -> None:
        reconnected.set()

    broker.on_reconnect(callback)
    await lose_connection(broker)
    await asyncio.wait_for(reconnected.wait(), RECONNECT_TIMEOUT)
    await asyncio.wait_for(broker.publish_job(declared_pool, job(3)), RECONNECT_TIMEOUT)  # usable again


# -- replies -----------------------------------------------------------------------------


async def test_replies_reach_the_reply_queue_with_their_correlation_id(broker, replies):
    address = await broker.declare_reply_queue(replies)  # idempotent: same address again
    seen = Recorder("ack")
    sub = await broker.consume_replies(replies, seen)
    try:
        await broker.publish_reply(address, Message(body=b"result-a", correlation_id="job-a"))
        await broker.publish_reply(address, Message(body=b"result-b", correlation_id="job-b"))
        got = {(s.message.correlation_id, s.message.body) for s in [await seen.next(), await seen.next()]}
        assert got == {("job-a", b"result-a"), ("job-b", b"result-b")}
    finally:
        await sub.cancel()


async def test_a_reply_published_before_its_consumer_starts_is_kept(broker, replies):
    address = await broker.declare_reply_queue(replies)
    await broker.publish_reply(address, Message(body=b"early", correlation_id="job-e"))
    seen = Recorder("ack")
    sub = await broker.consume_replies(replies, seen)
    try:
        assert (await seen.next()).message.correlation_id == "job-e"
    finally:
        await sub.cancel()


async def test_a_reply_to_a_missing_reply_queue_is_unroutable(broker, unique_name):
    with pytest.raises(Unroutable):
        await broker.publish_reply(f"enclaveq.reply.{unique_name}-gone", Message(body=b"result"))


async def test_the_reply_address_round_trips_through_a_job(broker, declared_pool, replies):
    """What a worker does: reply to whatever ``reply_to`` the producer put on the job."""
    address = await broker.declare_reply_queue(replies)

    async def worker(delivery: Delivery) -> None:
        request = delivery.message
        await broker.publish_reply(
            request.reply_to, Message(body=b"out", correlation_id=request.correlation_id)
        )
        await delivery.ack()

    got = Recorder("ack")
    subs = [await broker.consume_jobs(declared_pool, worker), await broker.consume_replies(replies, got)]
    try:
        await broker.publish_job(declared_pool, job(correlation_id="c-7", reply_to=address))
        reply = await got.next()
        assert (reply.message.correlation_id, reply.message.body) == ("c-7", b"out")
    finally:
        for sub in subs:
            await sub.cancel()


# -- control -----------------------------------------------------------------------------


async def test_a_control_message_reaches_every_worker_of_the_pool(broker, broker_url, declared_pool):
    async with adapter_for(broker_url) as other_worker:
        first, second = Recorder("ack"), Recorder("ack")
        subs = [await broker.consume_control(declared_pool, first),
                await other_worker.consume_control(declared_pool, second)]
        try:
            await broker.publish_control(declared_pool, Message(body=b"challenge", correlation_id="att-1"))
            for seen in (first, second):
                got = await seen.next()
                assert (got.message.body, got.message.correlation_id) == (b"challenge", "att-1")
            await first.nothing_more(within=0.1)
        finally:
            for sub in subs:
                await sub.cancel()


async def test_a_control_message_with_no_worker_listening_is_unroutable(broker, declared_pool):
    with pytest.raises(Unroutable):
        await broker.publish_control(declared_pool, Message(body=b"challenge"))


async def test_a_control_message_for_an_undeclared_pool_is_unroutable_every_time(broker, unique_name):
    for _ in range(3):
        with pytest.raises(Unroutable):
            await broker.publish_control(f"{unique_name}-nowhere", Message(body=b"challenge"))


# -- pool lock ---------------------------------------------------------------------------


async def test_a_second_worker_cannot_take_a_held_pool_lock_until_it_is_released(broker, broker_url, declared_pool):
    lock = await broker.acquire_pool_lock(declared_pool)
    async with adapter_for(broker_url) as other_worker:
        with pytest.raises(PoolBusy):
            await other_worker.acquire_pool_lock(declared_pool)
        with pytest.raises(PoolBusy):
            await broker.acquire_pool_lock(declared_pool)
        await lock.release()
        again = await other_worker.acquire_pool_lock(declared_pool)
        await again.release()


async def test_closing_an_adapter_frees_its_pool_lock(broker, broker_url, declared_pool):
    async with adapter_for(broker_url) as departing:
        await departing.acquire_pool_lock(declared_pool)
    lock = await asyncio.wait_for(broker.acquire_pool_lock(declared_pool), TIMEOUT)
    await lock.release()
