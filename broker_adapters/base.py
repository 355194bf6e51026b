"""The broker contract every adapter implements (memory, AMQP, and MQTT next).

The rest of enclaveq speaks only to this contract. It names *logical* destinations of a
pool rather than exchanges or topics, so that an adapter can map them onto whatever its
broker offers:

- the pool's **job queue**: competing consumers, manual acks, at-least-once delivery,
  a bounded delivery count after which a message is dead-lettered;
- the pool's **control channel**: broadcast to every live worker of the pool (attestation
  challenges, joins, rotation announcements, model sync requests, and the sealed model uploads
  and deletes that every worker must see -- ``protocol.routing`` says which requests go here);
- **reply queues**: durable, one per producer, addressed by an opaque string that a
  producer puts in ``Message.reply_to`` (AMQP: a queue name; MQTT: a response topic);
- the pool's **dead letters**: where messages go after ``Delivery.reject()`` or after the
  delivery limit;
- **event streams** (pipelines): a durable competing-consumer queue of a pool that receives every
  event published on a topic matching its filter (devices publish to topics, not to pools);
- **inboxes** (pipeline results): a recipient's durable queue that receives every result
  published on a topic matching its filter, also while the recipient is offline.

Topics and filters use MQTT syntax everywhere (``/`` separates levels, ``+`` matches one level,
``#`` the rest); the AMQP adapter maps them onto topic exchanges (``/`` -> ``.``, ``+`` -> ``*``).

Payloads are opaque bytes: adapters never parse them and never log them.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable, Mapping

HeaderValue = str | int | bytes | bool
# The default AMQP topic exchanges of pipeline events and results (broker_adapters._common).
EVENTS_EXCHANGE = "enclaveq.events"
RESULTS_EXCHANGE = "enclaveq.results"
_PENDING: set = set()  # reconnect callbacks still running (a task needs a reference to live)


@dataclass(frozen=True)
class Message:
    """What a publisher hands to the broker. ``body`` is opaque (ciphertext in practice)."""

    body: bytes
    correlation_id: str | None = None
    reply_to: str | None = None
    message_id: str | None = None
    headers: Mapping[str, HeaderValue] = field(default_factory=dict)


class Delivery(abc.ABC):
    """One delivery of a message to a consumer. Exactly one of ack/nack/reject must follow;
    adapters nack-with-requeue any delivery a handler leaves unsettled or raises on."""

    message: Message
    redelivered: bool
    # 1 on first delivery; counts redeliveries where the broker tells us (quorum queues do).
    delivery_count: int

    @abc.abstractmethod
    async def ack(self) -> None:
        """The message is done: remove it from the queue."""

    @abc.abstractmethod
    async def nack(self) -> None:
        """Give the message back for redelivery (counts against the delivery limit)."""

    @abc.abstractmethod
    async def reject(self) -> None:
        """Dead-letter the message now (it will not be redelivered)."""

    @property
    @abc.abstractmethod
    def settled(self) -> bool:
        """True once ack, nack or reject has been called."""


Handler = Callable[[Delivery], Awaitable[None]]


class Subscription(abc.ABC):
    """A running consumer. ``cancel()`` stops new deliveries; unsettled ones are requeued."""

    @abc.abstractmethod
    async def cancel(self) -> None: ...


class PoolLock(abc.ABC):
    """An exclusive, named lock on a pool, held until released or until its holder's connection
    dies: the founder of a pool (or its only worker, without a join policy) holds one for its
    lifetime; a rotation holds the ``rotation`` one while it mints the next epoch."""

    @abc.abstractmethod
    async def release(self) -> None: ...


@dataclass(frozen=True)
class PoolSettings:
    """Limits set explicitly on every queue (RabbitMQ 3.10 defaults are not relied on)."""

    delivery_limit: int = 5
    max_message_bytes: int = 64 * 1024 * 1024


class BrokerAdapter(abc.ABC):
    """Async broker client. Use as ``async with open_broker(url) as broker:``."""

    url: str
    # The longest a publish waits for the broker's confirm before raising ``PublishTimeout``: a
    # broker that takes a frame and never confirms it must not hang its publisher. Callers with a
    # deadline of their own (the SDK's ``timeout``) cancel a publish sooner.
    confirm_timeout: float = 30.0

    def on_reconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` (in a task of its own) each time the adapter has recovered a lost
        connection. Broadcasts sent while it was down are lost to this adapter's consumers (their
        queues went with the connection): a worker uses this to catch up."""
        self.__dict__.setdefault("_reconnect_callbacks", []).append(callback)

    def _reconnected(self) -> None:
        """Adapters call this once a reconnect is complete (consumers and locks restored)."""
        for callback in self.__dict__.get("_reconnect_callbacks", []):
            task = asyncio.get_running_loop().create_task(callback())
            _PENDING.add(task)
            task.add_done_callback(_PENDING.discard)

    async def __aenter__(self) -> BrokerAdapter:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def connect(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    # -- pools -------------------------------------------------------------------------
    @abc.abstractmethod
    async def declare_pool(self, pool: str, settings: PoolSettings = PoolSettings()) -> None:
        """Idempotently create the pool's job queue, dead-letter route and control channel."""

    @abc.abstractmethod
    async def delete_pool(self, pool: str) -> None:
        """Remove everything ``declare_pool`` created (tests and `pool delete`)."""

    @abc.abstractmethod
    async def acquire_pool_lock(self, pool: str, *, purpose: str = "") -> PoolLock:
        """Take one of the pool's exclusive locks, or raise ``PoolBusy`` at once. The default
        (founder) lock is held by the worker that founded the pool for its lifetime; other
        purposes (``"rotation"``) serialise rarer work among the pool's members."""

    # -- jobs --------------------------------------------------------------------------
    @abc.abstractmethod
    async def publish_job(self, pool: str, message: Message) -> None:
        """Publish to the job queue; returns once the broker has confirmed it.
        Raises ``Unroutable`` if no queue took it, ``PublishFailed`` if the broker refused,
        ``PublishTimeout`` if it did not confirm within ``confirm_timeout``. Safe to cancel."""

    @abc.abstractmethod
    async def consume_jobs(self, pool: str, handler: Handler, *, prefetch: int = 16) -> Subscription: ...

    # -- control -----------------------------------------------------------------------
    @abc.abstractmethod
    async def publish_control(self, pool: str, message: Message) -> None:
        """Broadcast to every worker currently consuming the pool's control channel."""

    @abc.abstractmethod
    async def consume_control(self, pool: str, handler: Handler) -> Subscription: ...

    # -- replies -----------------------------------------------------------------------
    @abc.abstractmethod
    async def declare_reply_queue(self, name: str, *, expires: float | None = None) -> str:
        """Create (idempotently) a durable reply queue; return the address for ``reply_to``.
        ``expires``: seconds the queue may stay unused (no consumer, not declared again) before the
        broker deletes it with what it holds -- a producer that died leaves nothing behind for long
        (AMQP ``x-expires``; MQTT sessions expire after the adapter's ``session_expiry`` instead;
        the memory broker dies with its process). Declaring a queue again with another
        ``expires`` is refused by RabbitMQ (``BrokerError``)."""

    @abc.abstractmethod
    async def delete_reply_queue(self, name: str) -> None: ...

    @abc.abstractmethod
    async def publish_reply(self, address: str, message: Message) -> None:
        """Publish to a reply address; returns once confirmed. ``Unroutable`` if it does not exist."""

    @abc.abstractmethod
    async def consume_replies(self, name: str, handler: Handler, *, prefetch: int = 256) -> Subscription: ...

    # -- dead letters ------------------------------------------------------------------
    @abc.abstractmethod
    async def consume_dead_letters(self, pool: str, handler: Handler) -> Subscription: ...

    # -- event streams (pipelines) -----------------------------------------------------
    @abc.abstractmethod
    async def declare_stream(self, pool: str, stream: str, topic_filter: str,
                             settings: PoolSettings = PoolSettings(), *, exchange: str = EVENTS_EXCHANGE) -> None:
        """Idempotently create stream ``stream`` of ``pool``: a durable queue, shared by the pool's
        workers (competing consumers, acks, the delivery limit, the pool's dead letters), that
        receives every event published on a topic matching ``topic_filter``. The pool must be
        declared. Declaring it again with another filter raises ``BrokerError``. ``exchange``:
        the AMQP topic exchange the events are published to (MQTT and the memory broker have one
        topic space and ignore it)."""

    @abc.abstractmethod
    async def delete_stream(self, pool: str, stream: str) -> None: ...

    @abc.abstractmethod
    async def consume_stream(self, pool: str, stream: str, handler: Handler, *, prefetch: int = 16) -> Subscription:
        """Like ``consume_jobs``; ``QueueNotFound`` if the stream is not declared."""

    @abc.abstractmethod
    async def publish_event(self, topic: str, message: Message, *, exchange: str = EVENTS_EXCHANGE) -> None:
        """Publish an event on ``topic`` (no wildcards); returns once confirmed. ``Unroutable`` if
        no stream takes it."""

    # -- inboxes (pipeline results) ----------------------------------------------------
    @abc.abstractmethod
    async def declare_inbox(self, name: str, topic_filter: str, *, exchange: str = RESULTS_EXCHANGE) -> None:
        """Idempotently create inbox ``name``: a durable queue that receives every result
        published on a topic matching ``topic_filter``, whether or not anyone consumes it
        (``exchange``: as for streams)."""

    @abc.abstractmethod
    async def delete_inbox(self, name: str) -> None: ...

    @abc.abstractmethod
    async def consume_inbox(self, name: str, handler: Handler, *, prefetch: int = 256) -> Subscription:
        """Consume inbox ``name`` (one consumer at a time); ``QueueNotFound`` if not declared."""

    @abc.abstractmethod
    async def publish_result(self, topic: str, message: Message, *, exchange: str = RESULTS_EXCHANGE) -> None:
        """Publish a result on ``topic`` (no wildcards); returns once confirmed. ``Unroutable`` if
        no inbox takes it."""
