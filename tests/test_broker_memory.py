"""What only the in-process broker does: URL selection, ``join()``, sharing across event loops,
and the settlement rules it enforces the way RabbitMQ would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from broker_adapters import (
    BrokerError,
    BrokerUnavailable,
    Delivery,
    Message,
    PoolSettings,
    UnsupportedBrokerURL,
    open_broker,
)
from broker_adapters.amqp import AmqpBroker
from broker_adapters.memory import MemoryBroker, forget_memory_broker

from .support import TIMEOUT


@pytest.fixture
async def broker(memory_url: str) -> AsyncIterator[MemoryBroker]:
    async with open_broker(memory_url) as adapter:
        assert isinstance(adapter, MemoryBroker)
        yield adapter


@pytest.fixture
async def declared_pool(broker: MemoryBroker, pool: str) -> AsyncIterator[str]:
    """The test's pool, declared with a delivery limit of 2."""
    await broker.declare_pool(pool, PoolSettings(delivery_limit=2))
    yield pool
    await broker.delete_pool(pool)


# -- open_broker -------------------------------------------------------------------------


def test_open_broker_picks_the_adapter_by_scheme():
    assert isinstance(open_broker("memory://x"), MemoryBroker)
    assert open_broker("memory://").name == "default"
    assert isinstance(open_broker("amqp://guest:guest@127.0.0.1/"), AmqpBroker)
    assert isinstance(open_broker("amqps://guest:guest@127.0.0.1/"), AmqpBroker)


def test_mqtt_urls_pick_the_mqtt_adapter():
    from broker_adapters.mqtt import MqttBroker

    assert isinstance(open_broker("mqtt://127.0.0.1:1883/"), MqttBroker)
    assert isinstance(open_broker("mqtts://user:pass@127.0.0.1:8883/"), MqttBroker)


def test_an_unknown_scheme_is_refused_without_echoing_the_url():
    with pytest.raises(UnsupportedBrokerURL) as refused:
        open_broker("redis://user:hunter2@host/0")
    assert "hunter2" not in str(refused.value)


async def test_adapters_share_state_by_memory_name_only(unique_name):
    async with open_broker(f"memory://{unique_name}") as a, open_broker(f"memory://{unique_name}") as b:
        await a.declare_pool("p")
        await b.publish_job("p", Message(body=b"x"))  # b sees the pool a declared
        async with open_broker(f"memory://{unique_name}-elsewhere") as c:
            with pytest.raises(BrokerError):
                await c.publish_job("p", Message(body=b"x"))
    forget_memory_broker(unique_name)
    forget_memory_broker(f"{unique_name}-elsewhere")


# -- join --------------------------------------------------------------------------------


async def test_join_returns_once_every_job_is_settled(broker, declared_pool):
    done: list[bytes] = []

    async def handler(delivery: Delivery) -> None:
        await asyncio.sleep(0.01)
        done.append(delivery.message.body)
        await delivery.ack()

    sub = await broker.consume_jobs(declared_pool, handler, prefetch=3)
    for n in range(10):
        await broker.publish_job(declared_pool, Message(body=b"%d" % n))
    await broker.join(declared_pool, timeout=TIMEOUT)
    assert sorted(done) == sorted(b"%d" % n for n in range(10))
    await sub.cancel()


async def test_join_reraises_what_a_handler_raised(broker, declared_pool):
    async def handler(delivery: Delivery) -> None:
        raise ValueError("model exploded")

    dead: list[Message] = []

    async def dead_letters(delivery: Delivery) -> None:
        dead.append(delivery.message)
        await delivery.ack()

    subs = [await broker.consume_jobs(declared_pool, handler),
            await broker.consume_dead_letters(declared_pool, dead_letters)]
    await broker.publish_job(declared_pool, Message(body=b"x"))
    with pytest.raises(ValueError, match="model exploded"):
        await broker.join(declared_pool, timeout=TIMEOUT)
    assert len(dead) == 1  # two deliveries, then the limit
    for sub in subs:
        await sub.cancel()


async def test_join_times_out_when_nobody_consumes(broker, declared_pool):
    await broker.publish_job(declared_pool, Message(body=b"x"))
    with pytest.raises(TimeoutError):
        await broker.join(declared_pool, timeout=0.05)


# -- settlement --------------------------------------------------------------------------


async def test_a_delivery_settles_once(broker, declared_pool):
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    async def handler(delivery: Delivery) -> None:
        await delivery.ack()
        try:
            await delivery.ack()
        except BrokerError as exc:
            outcome.set_result(exc)
        else:
            outcome.set_result(None)

    sub = await broker.consume_jobs(declared_pool, handler)
    await broker.publish_job(declared_pool, Message(body=b"x"))
    assert isinstance(await asyncio.wait_for(outcome, TIMEOUT), BrokerError)
    await sub.cancel()


async def test_settling_a_delivery_from_before_a_disconnect_fails_and_it_comes_back(broker, declared_pool):
    deliveries: asyncio.Queue[Delivery] = asyncio.Queue()

    async def handler(delivery: Delivery) -> None:
        deliveries.put_nowait(delivery)
        if delivery.redelivered:
            await delivery.ack()
        else:
            await asyncio.Event().wait()

    sub = await broker.consume_jobs(declared_pool, handler)
    await broker.publish_job(declared_pool, Message(body=b"x"))
    before = await asyncio.wait_for(deliveries.get(), TIMEOUT)
    await broker.simulate_disconnect()
    with pytest.raises(BrokerUnavailable):
        await before.ack()
    after = await asyncio.wait_for(deliveries.get(), TIMEOUT)
    assert after.redelivered and after.delivery_count == 2
    await broker.join(declared_pool, timeout=TIMEOUT)
    await sub.cancel()


async def test_a_closed_adapter_refuses_to_work(unique_name):
    adapter = open_broker(f"memory://{unique_name}")
    async with adapter:
        pass
    with pytest.raises(BrokerUnavailable):
        await adapter.publish_job("p", Message(body=b"x"))
    forget_memory_broker(unique_name)


# -- across event loops ------------------------------------------------------------------


async def test_a_sync_client_on_another_threads_loop_round_trips_with_a_worker_on_this_loop(broker, declared_pool):
    """The demo's shape: worker on the main loop, the sync producer's loop in a thread."""

    async def worker(delivery: Delivery) -> None:
        request = delivery.message
        await broker.publish_reply(
            request.reply_to, Message(body=request.body[::-1], correlation_id=request.correlation_id)
        )
        await delivery.ack()

    sub = await broker.consume_jobs(declared_pool, worker)

    def sync_client() -> list[tuple[str | None, bytes]]:
        async def main() -> list[tuple[str | None, bytes]]:
            async with open_broker(broker.url) as producer:
                address = await producer.declare_reply_queue(f"{declared_pool}-client")
                got: asyncio.Queue[Message] = asyncio.Queue()

                async def on_reply(delivery: Delivery) -> None:
                    got.put_nowait(delivery.message)
                    await delivery.ack()

                replies = await producer.consume_replies(f"{declared_pool}-client", on_reply)
                for n in range(20):
                    await producer.publish_job(
                        declared_pool, Message(body=b"job-%d" % n, correlation_id=str(n), reply_to=address)
                    )
                out = [await asyncio.wait_for(got.get(), TIMEOUT) for _ in range(20)]
                await replies.cancel()
                await producer.delete_reply_queue(f"{declared_pool}-client")
                return [(m.correlation_id, m.body) for m in out]

        return asyncio.run(main())

    replies = await asyncio.wait_for(asyncio.to_thread(sync_client), 2 * TIMEOUT)
    assert sorted(replies) == sorted((str(n), (b"job-%d" % n)[::-1]) for n in range(20))
    await sub.cancel()


async def test_a_tap_sees_the_body_of_every_message_the_memory_broker_carries(unique_name):
    seen: list[bytes] = []
    async with open_broker(f"memory://{unique_name}") as broker:
        broker.tap(seen.append)
        await broker.declare_pool("p")
        reply = await broker.declare_reply_queue("r")
        await broker.publish_job("p", Message(body=b"job"))
        await broker.publish_reply(reply, Message(body=b"result"))
    assert seen == [b"job", b"result"]


async def test_the_memory_brokers_dead_letters_are_bounded_like_rabbitmqs(memory_url, pool):
    from broker_adapters import _common as common

    async with open_broker(memory_url) as broker:
        await broker.declare_pool(pool)
        dead = broker._pool(pool).dead
        for n in range(common.MAX_DEAD_LETTERS + 5):
            broker._state.enqueue(dead, Message(body=str(n).encode()))
        assert len(dead.ready) == common.MAX_DEAD_LETTERS
        assert dead.ready[0].message.body == b"5"  # the oldest went first
