"""What only the RabbitMQ adapter does: the exact 3.10 topology it declares, negative confirms,
connection failures, and keeping the pool lock across a reconnect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import pytest

from broker_adapters import (
    BrokerUnavailable,
    Delivery,
    Message,
    PoolBusy,
    PoolSettings,
    PublishFailed,
    Unroutable,
    open_broker,
)
from broker_adapters import _common as common
from broker_adapters.amqp import AmqpBroker

from .support import RECONNECT_TIMEOUT, TIMEOUT, wait_until


@pytest.fixture
async def broker(rabbitmq_url: str) -> AsyncIterator[AmqpBroker]:
    async with open_broker(rabbitmq_url) as adapter:
        assert isinstance(adapter, AmqpBroker)
        yield adapter


async def test_a_pool_is_a_quorum_queue_with_explicit_limits_and_an_at_least_once_dead_letter_route(
    broker, unique_name, rabbitmqctl
):
    await broker.declare_pool(unique_name, PoolSettings(delivery_limit=4))
    try:
        queues = {
            q["name"]: q
            for q in await asyncio.to_thread(
                rabbitmqctl.json, "list_queues", "name", "type", "durable", "arguments"
            )
            if q["name"].startswith(f"enclaveq.{unique_name}.")
        }
        exchanges = {
            e["name"]: e["type"]
            for e in await asyncio.to_thread(rabbitmqctl.json, "list_exchanges", "name", "type")
            if e["name"].startswith(f"enclaveq.{unique_name}.")
        }
        jobs = queues[f"enclaveq.{unique_name}.jobs"]
        arguments = {name: value for name, _type, value in jobs["arguments"]}
        assert (jobs["type"], jobs["durable"]) == ("quorum", True)
        assert arguments == {
            "x-queue-type": "quorum",
            "x-delivery-limit": 3,  # 3.10 counts returns: 4 deliveries
            "x-dead-letter-exchange": f"enclaveq.{unique_name}.dlx",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
        assert queues[f"enclaveq.{unique_name}.dead"]["type"] == "quorum"
        assert exchanges == {
            f"enclaveq.{unique_name}.dlx": "fanout",
            f"enclaveq.{unique_name}.control": "fanout",
        }
    finally:
        await broker.delete_pool(unique_name)

    leftovers = [
        q["name"]
        for q in await asyncio.to_thread(rabbitmqctl.json, "list_queues", "name")
        if q["name"].startswith(f"enclaveq.{unique_name}.")
    ]
    assert leftovers == []


async def test_a_negative_confirm_is_publish_failed_not_unroutable(broker, rabbitmq_url, unique_name):
    # A reply queue someone declared with a length limit: RabbitMQ nacks once it is full.
    connection = await aio_pika.connect(rabbitmq_url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(
            f"enclaveq.reply.{unique_name}",
            durable=True,
            arguments={"x-queue-type": "quorum", "x-max-length": 1, "x-overflow": "reject-publish"},
        )
        address = f"enclaveq.reply.{unique_name}"
        with pytest.raises(PublishFailed) as refused:
            # Quorum queues enforce the limit one message late.
            for _ in range(3):
                await broker.publish_reply(address, Message(body=b"SECRET-RESULT"))
        assert not isinstance(refused.value, Unroutable)
        assert "nack" in str(refused.value)
        assert "SECRET" not in str(refused.value)
    finally:
        await broker.delete_reply_queue(unique_name)
        await connection.close()


async def test_concurrent_publishes_all_confirm(broker, unique_name):
    await broker.declare_pool(unique_name)
    received: set[str] = set()
    all_in = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        received.add(delivery.message.message_id)
        await delivery.ack()
        if len(received) == 200:
            all_in.set()

    sub = await broker.consume_jobs(unique_name, handler, prefetch=64)
    try:
        await asyncio.wait_for(
            asyncio.gather(
                *(broker.publish_job(unique_name, Message(body=b"x", message_id=str(n))) for n in range(200))
            ),
            TIMEOUT,
        )
        await asyncio.wait_for(all_in.wait(), TIMEOUT)
        assert received == {str(n) for n in range(200)}
    finally:
        await sub.cancel()
        await broker.delete_pool(unique_name)


async def test_an_unreachable_broker_is_broker_unavailable_without_the_password():
    adapter = open_broker("amqp://guest:hunter2@127.0.0.1:1/")
    with pytest.raises(BrokerUnavailable) as failed:
        await asyncio.wait_for(adapter.connect(), TIMEOUT)
    assert "hunter2" not in str(failed.value)
    assert "127.0.0.1:1" in str(failed.value)


async def test_the_pool_lock_is_taken_back_after_a_reconnect(broker, rabbitmq_url, unique_name, lose_connection):
    lock = await broker.acquire_pool_lock(unique_name)
    try:
        await lose_connection(broker)
        await wait_until(lambda: lock.generation >= 2,  # type: ignore[attr-defined]
                         "the adapter re-declares its lock after reconnecting", RECONNECT_TIMEOUT)
        async with open_broker(rabbitmq_url) as rival:
            with pytest.raises(PoolBusy):
                await rival.acquire_pool_lock(unique_name)
    finally:
        await lock.release()


async def test_a_pools_dead_letters_are_bounded_in_number_and_age(rabbitmq_url, pool, rabbitmqctl):
    async with open_broker(rabbitmq_url) as broker:
        await broker.declare_pool(pool)
        listing = await asyncio.to_thread(rabbitmqctl.json, "list_queues", "name", "arguments")
    (listed,) = [q["arguments"] for q in listing if q["name"] == common.dead_queue(pool)]
    arguments = {key: value for key, _type, value in listed}  # rabbitmqctl lists [key, type, value]
    assert arguments["x-max-length"] == common.MAX_DEAD_LETTERS == 10_000
    assert arguments["x-message-ttl"] == common.DEAD_LETTER_TTL_MS == 7 * 24 * 3600 * 1000


async def test_a_dead_letter_queue_declared_before_the_bound_still_works(rabbitmq_url, pool, caplog):
    # What an enclaveq from before the bound declared: the same queue without x-max-length/x-message-ttl.
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(common.dead_queue(pool), durable=True, arguments={
            "x-queue-type": "quorum", "x-delivery-limit": common.DEAD_DELIVERY_LIMIT - 1})
    async with open_broker(rabbitmq_url) as broker:
        await broker.declare_pool(pool)  # no PRECONDITION_FAILED: the old queue is kept, and named
    assert any("declared by an older enclaveq" in r.getMessage() for r in caplog.records)
