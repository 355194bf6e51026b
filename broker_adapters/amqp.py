"""The RabbitMQ adapter (aio-pika over aiormq), written against RabbitMQ 3.10.

It owns the AMQP topology of a pool ``P`` and the mapping of the broker contract onto it:

- ``enclaveq.P.jobs``: durable quorum queue, ``x-delivery-limit`` set explicitly,
  dead-lettering at-least-once (which needs ``x-overflow=reject-publish``) to the fanout
  exchange ``enclaveq.P.dlx``, bound to the durable quorum queue ``enclaveq.P.dead``;
- ``enclaveq.P.control``: fanout exchange; each control consumer binds its own exclusive,
  auto-delete queue ``enclaveq.P.control.<random>`` (named client side so that aio-pika can
  re-declare it under the same name after a reconnect);
- ``enclaveq.P.lock``: an exclusive queue whose existence is the pool lock;
- ``enclaveq.reply.NAME``: durable quorum reply queues (Direct Reply-to loses replies on
  reconnect);
- ``enclaveq.events``: durable topic exchange for events. Stream ``S`` of pool ``P`` is the durable
  quorum queue ``enclaveq.P.stream.S``, with the job queue's arguments (same delivery limit, same
  dead-letter route into the pool's dead letters), bound with its filter mapped to a binding key;
  ``enclaveq.P.streams`` (a classic queue of stream names) lets any adapter's ``delete_pool`` find
  them again, since AMQP cannot list queues;
- ``enclaveq.results``: durable topic exchange for results; inbox ``N`` is the durable quorum queue
  ``enclaveq.inbox.N`` (a reply queue's delivery limit) bound the same way.

RabbitMQ ignores unknown ``x-`` arguments when a queue is redeclared (measured on 3.10.8), so an
``x-enclaveq-filter`` argument only documents a stream's or inbox's filter for operators; what makes
a redeclare with another filter fail is the filter's binding key carried in
``x-dead-letter-routing-key``, which RabbitMQ does compare (PRECONDITION_FAILED). For a stream that
key is harmless (its dead-letter exchange is a fanout); an inbox dead-letters, like a reply queue,
nowhere: to the default exchange under an ``amq.`` name no client may give a queue.

Jobs and replies are published persistent, ``mandatory``, on the default exchange, on one
publisher-confirm channel; concurrent publishes wait for their confirms in parallel (aiormq
matches confirms by delivery tag and holds its channel lock only while writing frames).
Control messages use a second confirm channel, because publishing to an exchange that does
not exist closes the channel and must not take in-flight job confirms down with it; events and
results, for the same reason, a third one, opened on first use. Each
subscription gets its own channel so its prefetch never stalls publishing or other consumers.
Declarations, deletions and the lock use short-lived raw aiormq channels, which the robust
connection does not try to restore.

``connect_robust`` reconnects and restores the consumers; deliveries that were unsettled
when the connection dropped come back from the broker flagged redelivered.

Every aiormq/aio-pika exception is mapped to ``errors`` here; bodies are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import unquote, urlsplit
import logging
import uuid
from typing import Any
from collections.abc import AsyncIterator

import aio_pika
import aiormq
import aiormq.exceptions as amqp_errors
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection
from pamqp.commands import Basic
from yarl import URL

from . import _common as common
from .amqp_nodes import connect_first
from .urls import redact_url, split_broker_urls
from .base import (
    BrokerAdapter,
    Delivery,
    Handler,
    Message,
    PoolLock,
    PoolSettings,
    Subscription,
)
from .errors import (
    PublishTimeout,
    BrokerError,
    BrokerUnavailable,
    PoolBusy,
    PublishFailed,
    PublishRefused,
    QueueNotFound,
    Unroutable,
)

log = logging.getLogger(__name__)

_PERSISTENT = 2
_TRANSIENT = 1

# AMQP routing and binding keys are short strings.
_MAX_KEY_BYTES = 255
# An inbox dead-letters (after REPLY_DELIVERY_LIMIT deliveries) to the default exchange under this
# prefix: RabbitMQ refuses clients any queue named amq.*, so the message is dropped, as a reply's is.
_INBOX_DISCARD_PREFIX = "amq.enclaveq.discarded."
# Bounds the read of a stream registry, which only grows by one name per stream creation.
_REGISTRY_READ_LIMIT = 100_000
# At most one replacement of a nacked confirm channel per this many seconds (see _renew_after_nack).
_RENEW_INTERVAL = 1.0

# What "the connection is gone" looks like from aiormq and aio-pika.
_CONNECTION_LOST = (
    amqp_errors.AMQPConnectionError,
    amqp_errors.ChannelInvalidStateError,
    ConnectionError,
    OSError,
)


class AmqpBroker(BrokerAdapter):
    """An adapter onto one RabbitMQ virtual host, over one robust connection.

    Like any aio-pika connection it belongs to the event loop that called ``connect()``; a
    sync client running its own loop in a thread opens its own adapter there."""

    # aio-pika waits 5 s between reconnect attempts by default: five seconds of idle worker
    # after every network blip. A ``reconnect_interval`` in the URL query wins over this.
    reconnect_interval = 1.0
    connect_timeout = 10.0
    # How long a publish waits for a reconnect in progress before giving up.
    ready_timeout = 15.0

    def __init__(self, url: str, *, confirm_timeout: float | None = None) -> None:
        self.url = url
        if confirm_timeout is not None:
            if confirm_timeout <= 0:
                raise ValueError("confirm_timeout must be positive")
            self.confirm_timeout = confirm_timeout
        # Shown by `rabbitmqctl list_connections client_properties`; tests use it to find
        # and close this connection server side.
        self.connection_name = f"enclaveq-{uuid.uuid4().hex[:12]}"
        self._conn: AbstractRobustConnection | None = None
        self._publish_channel: AbstractRobustChannel | None = None
        self._control_channel: AbstractRobustChannel | None = None
        self._topic_channel: AbstractRobustChannel | None = None
        self._topic_channel_lock = asyncio.Lock()
        self._subscriptions: set[_AmqpSubscription] = set()
        self._locks: dict[str, _AmqpPoolLock] = {}
        self._settings: dict[str, PoolSettings] = {}
        self._renewed_at: dict[str, float] = {}
        self._background: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<AmqpBroker {redact_url(self.url)} {self.connection_name}>"

    # -- connection ---------------------------------------------------------------------
    async def connect(self) -> None:
        kwargs: dict[str, Any] = {}
        nodes = split_broker_urls(self.url)
        if "reconnect_interval" not in URL(nodes[0]).query:
            kwargs["reconnect_interval"] = self.reconnect_interval
        try:
            # Several node URLs (a cluster): the first that answers, then failover on reconnect.
            self._conn = await connect_first(
                nodes,
                client_properties={"connection_name": self.connection_name},
                timeout=self.connect_timeout,
                **kwargs,
            )
            self._publish_channel = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
            self._control_channel = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
        except (TimeoutError, *_CONNECTION_LOST, amqp_errors.AMQPError) as exc:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await self._conn.close()
                self._conn = None
            raise BrokerUnavailable(
                f"cannot connect to {redact_url(self.url)}: {_connect_failure(exc, nodes[-1])}"
            ) from exc
        self._conn.reconnect_callbacks.add(self._on_reconnect)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        self._topic_channel = None
        for task in list(self._background):
            task.cancel()
        if conn is None:
            return
        for sub in list(self._subscriptions):
            with contextlib.suppress(BrokerError):
                await sub.cancel()
        for lock in list(self._locks.values()):
            with contextlib.suppress(BrokerError):
                await lock.release()
        with contextlib.suppress(Exception):
            await conn.close()

    def _live(self) -> AbstractRobustConnection:
        if self._conn is None:
            raise BrokerUnavailable("AMQP adapter is not connected")
        return self._conn

    @contextlib.asynccontextmanager
    async def _raw_channel(self) -> AsyncIterator[aiormq.abc.AbstractChannel]:
        """A plain aiormq channel for declarations: not restored on reconnect, and a channel
        error on it (NOT_FOUND, PRECONDITION_FAILED, RESOURCE_LOCKED) disturbs nobody else."""
        conn = self._live()
        try:
            await asyncio.wait_for(conn.ready(), self.ready_timeout)
            transport = conn.transport
            if transport is None:
                raise BrokerUnavailable("AMQP connection is reconnecting")
            channel = await transport.connection.channel(publisher_confirms=False)
        except _CONNECTION_LOST + (asyncio.TimeoutError,) as exc:
            raise BrokerUnavailable(f"AMQP connection unavailable: {type(exc).__name__}") from exc
        try:
            yield channel
        finally:
            if not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.close()

    async def _on_reconnect(self, _connection: object) -> None:
        # The broker dropped our exclusive lock queues with the old connection. Awaited by
        # aio-pika before the reconnect counts as done.
        for lock in list(self._locks.values()):
            await lock.reacquire()
        self._reconnected()

    # -- pools --------------------------------------------------------------------------
    async def declare_pool(self, pool: str, settings: PoolSettings = PoolSettings()) -> None:
        common.check_name("pool", pool)
        common.check_settings(settings)
        jobs_arguments = _job_queue_arguments(pool, settings)
        await self._declare_dead_letters(pool)
        async with self._raw_channel() as channel:
            try:
                await channel.queue_bind(common.dead_queue(pool), common.dead_letter_exchange(pool), "")
                await channel.queue_declare(common.jobs_queue(pool), durable=True, arguments=jobs_arguments)
                await channel.exchange_declare(
                    common.control_exchange(pool), exchange_type="fanout", durable=True
                )
            except amqp_errors.ChannelPreconditionFailed as exc:
                raise BrokerError(f"pool {pool!r} already exists with different settings: {exc}") from exc
            except _CONNECTION_LOST as exc:
                raise BrokerUnavailable(f"connection lost while declaring pool {pool!r}") from exc
            except amqp_errors.AMQPError as exc:
                raise BrokerError(f"RabbitMQ refused to declare pool {pool!r}: {exc}") from exc
        self._settings[pool] = settings

    async def _declare_dead_letters(self, pool: str) -> None:
        """The pool's dead-letter exchange and bounded queue. A queue declared by an enclaveq from
        before the bound keeps working (RabbitMQ cannot change a queue's arguments); it is named
        in a warning, to be deleted when empty so that the next start declares it bounded."""
        async with self._raw_channel() as channel:
            try:
                await channel.exchange_declare(common.dead_letter_exchange(pool), exchange_type="fanout", durable=True)
                await channel.queue_declare(common.dead_queue(pool), durable=True, arguments={
                    "x-queue-type": "quorum",
                    "x-delivery-limit": common.DEAD_DELIVERY_LIMIT - 1,
                    "x-max-length": common.MAX_DEAD_LETTERS,
                    "x-message-ttl": common.DEAD_LETTER_TTL_MS,
                })
                return
            except amqp_errors.ChannelPreconditionFailed:
                pass  # declared before the bound (the channel is closed now): checked below
            except _CONNECTION_LOST as exc:
                raise BrokerUnavailable(f"connection lost while declaring pool {pool!r}") from exc
            except amqp_errors.AMQPError as exc:
                raise BrokerError(f"RabbitMQ refused to declare pool {pool!r}: {exc}") from exc
        async with self._raw_channel() as channel:
            try:
                await channel.queue_declare(common.dead_queue(pool), passive=True)
            except amqp_errors.AMQPError as exc:
                raise BrokerError(f"pool {pool!r} already exists with different settings: {exc}") from exc
        log.warning("the dead-letter queue %s was declared by an older enclaveq without a bound on its length "
                    "and age; delete it when it is empty and it is declared bounded at the next start",
                    common.dead_queue(pool))

    async def delete_pool(self, pool: str) -> None:
        # Our own consumers first: a consumer whose queue vanishes would make the robust
        # channel retry restoring it forever.
        for sub in list(self._subscriptions):
            if sub.pool == pool:
                await sub.cancel()
        for lock in [lock for lock in self._locks.values() if lock.pool == pool]:
            await lock.release()
        # Streams first (they dead-letter into the pool), their registry last: if this fails half
        # way, the registry still names them for the next attempt.
        streams = await self._registered_streams(pool)
        async with self._raw_channel() as channel:
            try:
                for stream in sorted(streams):
                    await channel.queue_delete(common.stream_queue(pool, stream))
                await channel.queue_delete(_stream_registry(pool))
                for queue in (common.jobs_queue(pool), common.dead_queue(pool)):
                    await channel.queue_delete(queue)
                for exchange in (common.dead_letter_exchange(pool), common.control_exchange(pool)):
                    await channel.exchange_delete(exchange)
            except _CONNECTION_LOST as exc:
                raise BrokerUnavailable(f"connection lost while deleting pool {pool!r}") from exc
            except amqp_errors.AMQPError as exc:
                raise BrokerError(f"RabbitMQ refused to delete pool {pool!r}: {exc}") from exc
        self._settings.pop(pool, None)

    async def acquire_pool_lock(self, pool: str, *, purpose: str = "") -> PoolLock:
        common.check_name("pool", pool)
        queue = common.lock_queue(pool, purpose)
        if queue in self._locks:
            raise PoolBusy(f"this adapter already holds pool {pool!r}'s {purpose or 'founder'} lock")
        lock = _AmqpPoolLock(self, pool, queue)
        await lock.acquire()
        self._locks[queue] = lock
        return lock

    # -- jobs ---------------------------------------------------------------------------
    async def publish_job(self, pool: str, message: Message) -> None:
        limit = self._settings.get(pool, PoolSettings()).max_message_bytes
        common.check_size(len(message.body), limit, f"pool {pool!r}")
        await self._publish(
            self._publish_channel,
            "",
            common.jobs_queue(pool),
            message,
            persistent=True,
            unroutable=f"pool {pool!r} is not declared: no job queue took the message",
        )

    async def consume_jobs(self, pool: str, handler: Handler, *, prefetch: int = 16) -> Subscription:
        return await self._subscribe(
            common.jobs_queue(pool), handler, prefetch, missing=f"pool {pool!r} is not declared", pool=pool
        )

    # -- control ------------------------------------------------------------------------
    async def publish_control(self, pool: str, message: Message) -> None:
        common.check_size(len(message.body), PoolSettings().max_message_bytes, f"pool {pool!r} control")
        await self._publish(
            self._control_channel,
            common.control_exchange(pool),
            "",
            message,
            persistent=False,
            unroutable=f"no worker is listening on pool {pool!r}'s control channel",
            missing=f"pool {pool!r} is not declared",
        )

    async def consume_control(self, pool: str, handler: Handler) -> Subscription:
        name = f"{common.control_exchange(pool)}.{uuid.uuid4().hex}"
        return await self._subscribe(
            name,
            handler,
            16,
            missing=f"pool {pool!r} is not declared",
            pool=pool,
            control_exchange=common.control_exchange(pool),
        )

    # -- replies ------------------------------------------------------------------------
    async def declare_reply_queue(self, name: str, *, expires: float | None = None) -> str:
        common.check_name("reply queue", name)
        address = common.reply_queue(name)
        arguments: dict[str, Any] = {"x-queue-type": "quorum", "x-delivery-limit": common.REPLY_DELIVERY_LIMIT - 1}
        if expires is not None:
            arguments["x-expires"] = max(1, int(expires * 1000))
        async with self._raw_channel() as channel:
            try:
                await channel.queue_declare(address, durable=True, arguments=arguments)
            except amqp_errors.ChannelPreconditionFailed as exc:
                raise BrokerError(f"reply queue {address!r} exists with different settings: {exc}") from exc
            except _CONNECTION_LOST as exc:
                raise BrokerUnavailable(f"connection lost while declaring {address!r}") from exc
            except amqp_errors.AMQPError as exc:
                raise BrokerError(f"RabbitMQ refused to declare {address!r}: {exc}") from exc
        return address

    async def delete_reply_queue(self, name: str) -> None:
        address = common.reply_queue(name)
        for sub in list(self._subscriptions):
            if sub.queue_name == address:
                await sub.cancel()
        async with self._raw_channel() as channel:
            try:
                await channel.queue_delete(address)
            except _CONNECTION_LOST as exc:
                raise BrokerUnavailable(f"connection lost while deleting {address!r}") from exc
            except amqp_errors.AMQPError as exc:
                raise BrokerError(f"RabbitMQ refused to delete {address!r}: {exc}") from exc

    async def publish_reply(self, address: str, message: Message) -> None:
        common.check_size(len(message.body), PoolSettings().max_message_bytes, f"reply queue {address!r}")
        await self._publish(
            self._publish_channel,
            "",
            address,
            message,
            persistent=True,
            unroutable=f"reply queue {address!r} does not exist",
        )

    async def consume_replies(self, name: str, handler: Handler, *, prefetch: int = 256) -> Subscription:
        address = common.reply_queue(name)
        return await self._subscribe(
            address, handler, prefetch, missing=f"reply queue {address!r} does not exist"
        )

    # -- dead letters -------------------------------------------------------------------
    async def consume_dead_letters(self, pool: str, handler: Handler) -> Subscription:
        return await self._subscribe(
            common.dead_queue(pool), handler, 16, missing=f"pool {pool!r} is not declared", pool=pool
        )

    # -- event streams ------------------------------------------------------------------
    async def declare_stream(self, pool: str, stream: str, topic_filter: str,
                             settings: PoolSettings = PoolSettings(), *,
                             exchange: str = common.EVENTS_EXCHANGE) -> None:
        common.check_name("exchange", exchange)
        common.check_name("pool", pool)
        common.check_name("stream", stream)
        key = _amqp_key("stream", topic_filter, wildcards=True)
        common.check_settings(settings)
        queue = common.stream_queue(pool, stream)
        if not await self._queue_exists(common.jobs_queue(pool)):
            raise QueueNotFound(f"pool {pool!r} is not declared: declare it before its streams")
        if not await self._queue_exists(queue):
            # Registered before it exists, so that no stream can exist unregistered.
            await self._register_stream(pool, stream)
        arguments: dict[str, Any] = {
            **_job_queue_arguments(pool, settings),
            "x-dead-letter-routing-key": key,  # compared on redeclare: see the module docstring
            "x-enclaveq-filter": topic_filter,
        }
        async with self._raw_channel() as channel:
            try:
                await channel.exchange_declare(exchange, exchange_type="topic", durable=True)
                await channel.queue_declare(queue, durable=True, arguments=arguments)
                await channel.queue_bind(queue, exchange, key)
            except amqp_errors.ChannelPreconditionFailed as exc:
                raise BrokerError(
                    f"stream {stream!r} of pool {pool!r} already exists with another topic filter or "
                    f"delivery limit: {exc}"
                ) from exc
            except _CONNECTION_LOST as exc:
                raise BrokerUnavailable(f"connection lost while declaring {queue!r}") from exc
            except amqp_errors.AMQPError as exc:
                raise BrokerError(f"RabbitMQ refused to declare {queue!r}: {exc}") from exc

    async def delete_stream(self, pool: str, stream: str) -> None:
        # Its name stays in the pool's registry: deleting a queue that is gone is harmless.
        await self._delete_queue(common.stream_queue(pool, stream))

    async def consume_stream(self, pool: str, stream: str, handler: Handler, *, prefetch: int = 16) -> Subscription:
        return await self._subscribe(
            common.stream_queue(pool, stream),
            handler,
            prefetch,
            missing=f"stream {stream!r} of pool {pool!r} is not declared",
            pool=pool,
        )

    async def publish_event(self, topic: str, message: Message, *, exchange: str = common.EVENTS_EXCHANGE) -> None:
        common.check_name("exchange", exchange)
        key = _amqp_key("event", topic, wildcards=False)
        common.check_size(len(message.body), PoolSettings().max_message_bytes, f"events on {topic!r}")
        unroutable = f"no stream takes events on topic {topic!r}"
        # No exchange yet means no stream was ever declared: unroutable as well.
        await self._publish(await self._topics(), exchange, key, message, persistent=True,
                            unroutable=unroutable, missing=unroutable)

    # -- inboxes ------------------------------------------------------------------------
    async def declare_inbox(self, name: str, topic_filter: str, *, exchange: str = common.RESULTS_EXCHANGE) -> None:
        common.check_name("exchange", exchange)
        common.check_name("inbox", name)
        key = _amqp_key("inbox", topic_filter, wildcards=True)
        queue = common.inbox_queue(name)
        arguments: dict[str, Any] = {
            "x-queue-type": "quorum",
            "x-delivery-limit": common.REPLY_DELIVERY_LIMIT - 1,  # 3.10 counts returns (declare_pool)
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": _INBOX_DISCARD_PREFIX + key,  # compared on redeclare
            "x-enclaveq-filter": topic_filter,
        }
        async with self._raw_channel() as channel:
            try:
                await channel.exchange_declare(exchange, exchange_type="topic", durable=True)
                await channel.queue_declare(queue, durable=True, arguments=arguments)
                await channel.queue_bind(queue, exchange, key)
            except amqp_errors.ChannelPreconditionFailed as exc:
                raise BrokerError(f"inbox {name!r} already exists with another topic filter: {exc}") from exc
            except _CONNECTION_LOST as exc:
                raise BrokerUnavailable(f"connection lost while declaring {queue!r}") from exc
            except amqp_errors.AMQPError as exc:
                raise BrokerError(f"RabbitMQ refused to declare {queue!r}: {exc}") from exc

    async def delete_inbox(self, name: str) -> None:
        await self._delete_queue(common.inbox_queue(name))

    async def consume_inbox(self, name: str, handler: Handler, *, prefetch: int = 256) -> Subscription:
        return await self._subscribe(
            common.inbox_queue(name), handler, prefetch, missing=f"inbox {name!r} is not declared"
        )

    async def publish_result(self, topic: str, message: Message, *, exchange: str = common.RESULTS_EXCHANGE) -> None:
        common.check_name("exchange", exchange)
        key = _amqp_key("result", topic, wildcards=False)
        common.check_size(len(message.body), PoolSettings().max_message_bytes, f"results on {topic!r}")
        unroutable = f"no inbox takes results on topic {topic!r}"
        await self._publish(await self._topics(), exchange, key, message, persistent=True,
                            unroutable=unroutable, missing=unroutable)

    # -- internals ----------------------------------------------------------------------
    async def _topics(self) -> AbstractRobustChannel:
        """The confirm channel for events and results, opened on first use: most adapters (a
        producer's, a worker's without pipelines) never publish either."""
        if self._topic_channel is None:
            async with self._topic_channel_lock:
                if self._topic_channel is None:
                    try:
                        self._topic_channel = await self._live().channel(
                            publisher_confirms=True, on_return_raises=True
                        )
                    except (TimeoutError, *_CONNECTION_LOST, amqp_errors.AMQPError) as exc:
                        raise BrokerUnavailable(f"cannot open a channel: {type(exc).__name__}") from exc
        return self._topic_channel

    async def _queue_exists(self, queue: str) -> bool:
        async with self._raw_channel() as channel:
            try:
                await channel.queue_declare(queue, passive=True)
            except amqp_errors.ChannelNotFoundEntity:
                return False
            except _CONNECTION_LOST as exc:
                raise BrokerUnavailable(f"connection lost while looking up {queue!r}") from exc
            except amqp_errors.AMQPError as exc:
                raise BrokerError(f"RabbitMQ refused to look up {queue!r}: {exc}") from exc
        return True

    async def _delete_queue(self, queue: str) -> None:
        for sub in list(self._subscriptions):
            if sub.queue_name == queue:
                await sub.cancel()
        async with self._raw_channel() as channel:
            try:
                await channel.queue_delete(queue)
            except _CONNECTION_LOST as exc:
                raise BrokerUnavailable(f"connection lost while deleting {queue!r}") from exc
            except amqp_errors.AMQPError as exc:
                raise BrokerError(f"RabbitMQ refused to delete {queue!r}: {exc}") from exc

    async def _register_stream(self, pool: str, stream: str) -> None:
        registry = _stream_registry(pool)
        async with self._raw_channel() as channel:
            try:
                await channel.queue_declare(registry, durable=True, arguments={"x-queue-type": "classic"})
            except _CONNECTION_LOST as exc:
                raise BrokerUnavailable(f"connection lost while declaring {registry!r}") from exc
            except amqp_errors.AMQPError as exc:
                raise BrokerError(f"RabbitMQ refused to declare {registry!r}: {exc}") from exc
        await self._publish(self._publish_channel, "", registry, Message(body=stream.encode()), persistent=True,
                            unroutable=f"pool {pool!r}'s stream registry vanished while declaring {stream!r}")

    async def _registered_streams(self, pool: str) -> set[str]:
        """The names in the pool's stream registry, read without acknowledging them: closing the
        channel puts them back until ``delete_pool`` deletes the registry itself."""
        names: set[str] = set()
        async with self._raw_channel() as channel:
            try:
                for _ in range(_REGISTRY_READ_LIMIT):
                    got = await channel.basic_get(_stream_registry(pool), no_ack=False)
                    if isinstance(got.delivery, Basic.GetEmpty):
                        break
                    names.add(got.body.decode("utf-8", errors="replace"))
            except amqp_errors.ChannelNotFoundEntity:
                return set()  # the pool never had a stream
            except _CONNECTION_LOST as exc:
                raise BrokerUnavailable(f"connection lost while listing pool {pool!r}'s streams") from exc
            except amqp_errors.AMQPError as exc:
                raise BrokerError(f"RabbitMQ refused to list pool {pool!r}'s streams: {exc}") from exc
        return {name for name in names if _valid_name(name)}

    async def _publish(
        self,
        channel: AbstractRobustChannel | None,
        exchange: str,
        routing_key: str,
        message: Message,
        *,
        persistent: bool,
        unroutable: str,
        missing: str | None = None,
    ) -> None:
        self._live()
        assert channel is not None
        common.check_headers(message.headers)
        properties = Basic.Properties(
            delivery_mode=_PERSISTENT if persistent else _TRANSIENT,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            message_id=message.message_id,
            headers={k: bytearray(v) if isinstance(v, bytes) else v for k, v in message.headers.items()}
            or None,
        )
        confirming = False
        try:
            if channel.is_closed:
                await self._wait_usable(channel)
            underlay = await channel.get_underlay_channel()
            confirming = True
            # One bound for the channel lock, the frames and the confirm, applied by aiormq in this
            # task (a publish not yet written is rolled back; one written stays written), as a
            # caller's own deadline would be. Its timer costs ~5 us a publish (measured).
            await underlay.basic_publish(
                message.body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=True,
                timeout=self.confirm_timeout,
            )
        # `from None` where the third-party exception holds the returned message (and body).
        except amqp_errors.PublishError:
            raise Unroutable(unroutable) from None
        except amqp_errors.DeliveryError:
            self._renew_after_nack(channel)
            raise PublishRefused(
                f"RabbitMQ refused the message for {routing_key or exchange!r} (nack: a full queue?)"
            ) from None
        except amqp_errors.ChannelNotFoundEntity:
            raise Unroutable(missing or unroutable) from None
        except amqp_errors.ChannelClosed as exc:
            raise PublishFailed(f"RabbitMQ closed the channel: {exc}") from exc
        except TimeoutError as exc:
            if not confirming:  # _wait_usable gave up on a reconnect
                raise BrokerUnavailable("the connection did not come back in time to publish") from exc
            raise PublishTimeout(
                f"RabbitMQ did not confirm the message for {routing_key or exchange!r} within "
                f"{self.confirm_timeout:g}s; it may or may not have been accepted"
            ) from None
        except _CONNECTION_LOST as exc:
            raise BrokerUnavailable(
                "connection lost while publishing; the message may or may not have been accepted"
            ) from exc

    def _renew_after_nack(self, channel: AbstractRobustChannel) -> None:
        """Replace a confirm channel that RabbitMQ nacked, in the background, at most once per
        ``_RENEW_INTERVAL`` per channel.

        Why: RabbitMQ 3.10 starts a channel's quorum-queue client at the leader named in the
        queue record, which lags a leader election (fixed in 3.11.x, rabbitmq-server#9241). A
        channel reopened during the election -- every client fails over just then when a cluster
        node dies -- stays bound to the dead leader and is nacked for minutes, while a fresh
        channel is confirmed at once (measured on a 3-node cluster, tests/test_rabbitmq_cluster.py).
        A genuine nack (a full queue) only costs one channel open per interval."""
        for attr in ("_publish_channel", "_control_channel", "_topic_channel"):
            if getattr(self, attr) is channel:
                break
        else:
            return  # already replaced
        now = asyncio.get_running_loop().time()
        if now - self._renewed_at.get(attr, -_RENEW_INTERVAL) < _RENEW_INTERVAL:
            return
        self._renewed_at[attr] = now
        task = asyncio.ensure_future(self._renew_channel(attr, channel))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _renew_channel(self, attr: str, old: AbstractRobustChannel) -> None:
        try:
            new = await self._live().channel(publisher_confirms=True, on_return_raises=True)
        except (BrokerError, TimeoutError, *_CONNECTION_LOST, amqp_errors.AMQPError):
            return  # keep the old one: the next nack tries again
        if getattr(self, attr) is not old:
            await _close_quietly(new)
            return
        setattr(self, attr, new)
        log.info("a confirm channel was nacked; publishing on a fresh channel from now on")
        # Publishes in flight on the old channel still get their confirm or nack.
        await asyncio.sleep(self.confirm_timeout)
        await _close_quietly(old)

    async def _wait_usable(self, channel: AbstractRobustChannel) -> None:
        """Wait out a reconnect, or the restore after a channel error, rather than fail.

        ``ready()`` alone is not enough: it can still report the channel restored for a moment
        after the broker closed it, before aio-pika's close callback has run."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout
        while channel.is_closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            await asyncio.wait_for(channel.ready(), remaining)
            if channel.is_closed:
                await asyncio.sleep(0.01)

    async def _subscribe(
        self,
        queue_name: str,
        handler: Handler,
        prefetch: int,
        *,
        missing: str,
        pool: str | None = None,
        control_exchange: str | None = None,
    ) -> _AmqpSubscription:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        conn = self._live()
        channel: AbstractRobustChannel | None = None
        try:
            channel = await conn.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=prefetch)
            if control_exchange is None:
                queue = await channel.declare_queue(queue_name, passive=True)
            else:
                # Passive first: binding to a missing exchange would leave a stray queue.
                await channel.declare_exchange(control_exchange, passive=True, robust=False)
                queue = await channel.declare_queue(
                    queue_name,
                    exclusive=True,
                    auto_delete=True,
                    arguments={"x-queue-type": "classic"},
                )
                await queue.bind(control_exchange, routing_key="")
            subscription = _AmqpSubscription(self, channel, queue, handler, pool)
            await subscription.start()
        except amqp_errors.ChannelNotFoundEntity:
            await _close_quietly(channel)
            raise QueueNotFound(missing) from None
        except (TimeoutError, *_CONNECTION_LOST) as exc:
            await _close_quietly(channel)
            raise BrokerUnavailable(f"connection lost while subscribing to {queue_name!r}") from exc
        except amqp_errors.AMQPError as exc:
            await _close_quietly(channel)
            raise BrokerError(f"RabbitMQ refused a consumer on {queue_name!r}: {exc}") from exc
        self._subscriptions.add(subscription)
        return subscription


def _job_queue_arguments(pool: str, settings: PoolSettings) -> dict[str, Any]:
    """A pool's job queue -- and each of its streams, which behave as one."""
    return {
        "x-queue-type": "quorum",
        # RabbitMQ 3.10 counts *returns* against x-delivery-limit, so a message is
        # delivered up to x-delivery-limit + 1 times; the contract counts deliveries.
        # (Measured on 3.10.8: x-delivery-limit=0 gives exactly one delivery.)
        "x-delivery-limit": settings.delivery_limit - 1,
        "x-dead-letter-exchange": common.dead_letter_exchange(pool),
        "x-dead-letter-strategy": "at-least-once",
        # at-least-once dead-lettering silently degrades to at-most-once without it.
        "x-overflow": "reject-publish",
    }


def _stream_registry(pool: str) -> str:
    return f"{common.PREFIX}.{pool}.streams"


def _amqp_key(kind: str, topic: str, *, wildcards: bool) -> str:
    """A checked MQTT topic or filter as an AMQP routing or binding key."""
    key = common.amqp_binding_key(common.check_topic(kind, topic, wildcards=wildcards))
    if len(key.encode()) > _MAX_KEY_BYTES:
        raise ValueError(f"{kind} topic {topic[:64]!r}... is longer than AMQP's {_MAX_KEY_BYTES} bytes")
    return key


def _valid_name(name: str) -> bool:
    try:
        common.check_name("stream", name)
    except ValueError:
        return False
    return True


async def _close_quietly(channel: AbstractRobustChannel | None) -> None:
    if channel is not None:
        with contextlib.suppress(Exception):
            await channel.close()


class _AckCoalescer:
    """Sends a subscription's acks in as few ``basic.ack`` frames as is safe.

    Quorum queues write every settlement to their Raft log, so one ``basic.ack(multiple=True)``
    for a run of deliveries costs the broker much less than one ack each (measured: about
    0.1 ms of RabbitMQ CPU per job, see docs/benchmarks.md). A multiple ack settles *every*
    unacked delivery up to its tag on that channel, so it is only used for tags below the lowest
    delivery still being processed; the rest are acked one by one. State is kept per underlying
    channel: delivery tags restart when aio-pika's robust channel reopens after a reconnect, and
    a stale high-water mark would otherwise ack deliveries still in progress.

    Deliveries register in arrival order (the first thing ``_on_message`` does, before any
    await), so a delivery the handler has not seen yet is always "outstanding" here.
    """

    def __init__(self) -> None:
        self._outstanding: dict[Any, set[int]] = {}
        self._pending: dict[Any, dict[int, AbstractIncomingMessage]] = {}
        self._flush_scheduled = False

    def delivered(self, incoming: AbstractIncomingMessage) -> None:
        self._outstanding.setdefault(_underlay(incoming), set()).add(_tag(incoming))

    def settled_elsewhere(self, incoming: AbstractIncomingMessage) -> None:
        """nack/reject went out directly: the delivery no longer holds back multiple acks."""
        self._outstanding.get(_underlay(incoming), set()).discard(incoming.delivery_tag)

    def ack(self, incoming: AbstractIncomingMessage) -> None:
        channel = _underlay(incoming)
        self._outstanding.get(channel, set()).discard(incoming.delivery_tag)
        self._pending.setdefault(channel, {})[_tag(incoming)] = incoming
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.flush()))

    async def flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for channel, acks in pending.items():
            outstanding = self._outstanding.get(channel, set())
            lowest = min(outstanding) if outstanding else None
            below = [tag for tag in acks if lowest is None or tag < lowest]
            above = [tag for tag in acks if lowest is not None and tag > lowest]
            try:
                if below:
                    await acks[max(below)].ack(multiple=len(below) > 1)
                for tag in above:
                    await acks[tag].ack()
            except Exception:  # the channel is gone: the broker redelivers, duplicates are dropped
                log.debug("acks lost with their channel; the broker will redeliver", exc_info=True)
            if channel.is_closed:
                self._outstanding.pop(channel, None)


def _tag(incoming: AbstractIncomingMessage) -> int:
    """A consumed delivery always has a tag (only basic.get-less messages lack one)."""
    tag = incoming.delivery_tag
    assert tag is not None
    return tag


def _underlay(incoming: AbstractIncomingMessage) -> Any:
    try:
        return incoming.channel
    except Exception:  # aio-pika raises when the channel is already closed
        return None


class _AmqpDelivery(Delivery):
    __slots__ = ("message", "redelivered", "delivery_count", "_incoming", "_settled", "_acks")

    def __init__(self, incoming: AbstractIncomingMessage, acks: _AckCoalescer | None = None) -> None:
        self._incoming = incoming
        self._acks = acks
        self._settled = False
        headers = incoming.headers or {}
        self.message = Message(
            body=incoming.body,
            correlation_id=incoming.correlation_id,
            reply_to=incoming.reply_to,
            message_id=incoming.message_id,
            headers=common.clean_headers(headers),
        )
        self.redelivered = bool(incoming.redelivered)
        # Quorum queues count returns (nack, channel closed) in x-delivery-count; 3.10 sends 0
        # on the first delivery, other queue types send nothing.
        count = headers.get("x-delivery-count")
        self.delivery_count = count + 1 if isinstance(count, int) else 1

    @property
    def settled(self) -> bool:
        return self._settled

    async def ack(self) -> None:
        if self._acks is None:
            return await self._settle(self._incoming.ack)
        if self._settled:
            raise BrokerError("delivery already settled")
        if _underlay(self._incoming) is None:
            self._settled = True
            raise BrokerUnavailable("the channel this delivery arrived on is gone; the broker redelivers the message")
        self._settled = True
        self._acks.ack(self._incoming)

    async def nack(self) -> None:
        await self._settle(lambda: self._incoming.nack(requeue=True))
        if self._acks is not None:
            self._acks.settled_elsewhere(self._incoming)

    async def reject(self) -> None:
        await self._settle(lambda: self._incoming.reject(requeue=False))
        if self._acks is not None:
            self._acks.settled_elsewhere(self._incoming)

    async def _settle(self, operation: Any) -> None:
        if self._settled:
            raise BrokerError("delivery already settled")
        self._settled = True
        try:
            await operation()
        except (*_CONNECTION_LOST, amqp_errors.ChannelClosed) as exc:
            raise BrokerUnavailable(
                "the channel this delivery arrived on is gone; the broker redelivers the message"
            ) from exc


class _AmqpSubscription(Subscription):
    def __init__(
        self,
        broker: AmqpBroker,
        channel: AbstractRobustChannel,
        queue: aio_pika.abc.AbstractRobustQueue,
        handler: Handler,
        pool: str | None,
    ) -> None:
        self._broker = broker
        self.pool = pool
        self._channel = channel
        self._queue = queue
        self._handler = handler
        self._tag: str | None = None
        self._tasks: set[asyncio.Task] = set()
        self._active = True
        self._acks = _AckCoalescer()
        self.queue_name = queue.name

    async def start(self) -> None:
        self._tag = await self._queue.consume(self._on_message)

    async def _on_message(self, incoming: AbstractIncomingMessage) -> None:
        if not self._active:
            return  # cancel() closes the channel, which requeues it
        self._acks.delivered(incoming)  # first, before any await: see _AckCoalescer
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await common.run_handler(self._handler, _AmqpDelivery(incoming, self._acks), log)
        finally:
            self._tasks.discard(task)

    async def cancel(self) -> None:
        if not self._active:
            return
        self._active = False
        self._broker._subscriptions.discard(self)
        if self._tag is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(self._tag)
        await common.stop_tasks(self._tasks)
        await self._acks.flush()  # acks of finished jobs must leave before the channel closes
        # Closing the channel returns whatever is still unacknowledged on it.
        await _close_quietly(self._channel)


class _AmqpPoolLock(PoolLock):
    """The pool lock is an exclusive queue: RabbitMQ refuses a second connection with
    RESOURCE_LOCKED, and deletes the queue itself if our connection dies."""

    def __init__(self, broker: AmqpBroker, pool: str, queue: str) -> None:
        self._broker = broker
        self.pool = pool
        self.queue = queue
        # Counts successful declarations (1 after acquire, +1 per reconnect that kept it);
        # ``lost`` turns True if a rival took the lock while we were disconnected.
        self.generation = 0
        self.lost = False

    async def _declare(self) -> None:
        async with self._broker._raw_channel() as channel:
            try:
                await channel.queue_declare(self.queue, exclusive=True, arguments={"x-queue-type": "classic"})
            except amqp_errors.ChannelLockedResource:
                raise PoolBusy(f"pool {self.pool!r} is locked by another worker") from None
            except _CONNECTION_LOST as exc:
                raise BrokerUnavailable(f"connection lost while locking pool {self.pool!r}") from exc
            except amqp_errors.AMQPError as exc:
                raise BrokerError(f"RabbitMQ refused pool {self.pool!r}'s lock queue: {exc}") from exc
        self.generation += 1

    async def acquire(self) -> None:
        await self._declare()

    async def reacquire(self) -> None:
        try:
            await self._declare()
        except PoolBusy:
            self.lost = True
            if self._broker._locks.get(self.queue) is self:
                del self._broker._locks[self.queue]
            log.error("pool %r: lock lost to another worker while reconnecting", self.pool)
        except BrokerUnavailable:
            pass  # the next reconnect tries again

    async def release(self) -> None:
        if self._broker._locks.get(self.queue) is self:
            del self._broker._locks[self.queue]
        if self._broker._conn is None:
            return
        try:
            async with self._broker._raw_channel() as channel:
                await channel.queue_delete(self.queue)
        except (BrokerUnavailable, *_CONNECTION_LOST):
            pass  # the broker drops an exclusive queue with its connection anyway
        except amqp_errors.ChannelLockedResource:
            pass  # lost across a reconnect: it belongs to someone else now


__all__ = ["AmqpBroker"]


def _connect_failure(exc: BaseException, url: str) -> str:
    """Why a connection attempt failed, in words that name the fix. A broker that closes the
    connection during the handshake (an unknown virtual host, or one the user may not use)
    reaches aiormq as an unexpected Connection.Close frame, which it reports only by its repr."""
    if isinstance(exc, amqp_errors.ProbableAuthenticationError):
        return "the broker refused the user name or password (ACCESS_REFUSED)"
    if isinstance(exc, amqp_errors.InvalidFrameError) and "Connection.Close" in str(exc):
        vhost = urlsplit(url).path[1:] or "/"
        return (f"the broker closed the connection during the handshake: virtual host {unquote(vhost)!r} does not "
                "exist or this user may not use it")
    if isinstance(exc, ConnectionRefusedError) or "Connect call failed" in str(exc):
        parts = urlsplit(url)
        return f"connection refused: no broker listens on {parts.hostname}:{parts.port or 5672}"
    return f"{type(exc).__name__}: {exc}"
