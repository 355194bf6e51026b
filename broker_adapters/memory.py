"""The in-process broker: the embedded default for the demo and for fast tests.

It owns an imitation of the RabbitMQ topology that ``amqp.py`` declares, with the same
observable behaviour (the conformance suite runs against both): at-least-once delivery with
manual settlement, per-consumer prefetch, nack and disconnect counting against a delivery limit,
dead-lettering with ``x-first-death-reason``, broadcast control channels, reply queues, and an
exclusive pool lock, and the topic-routed event streams and result inboxes (MQTT topic matching,
``common.topic_matches``, standing in for RabbitMQ's topic exchanges). Like dramatiq's stub broker it adds test helpers: ``join()`` waits for a
pool to drain and re-raises handler exceptions, ``simulate_disconnect()`` plays a reconnect.

Concurrency model. Broker state is keyed by the URL's name (``memory://NAME``) and shared by
every adapter in the process opened with that name, whatever event loop it runs on: the sync
producer client runs its loop in a background thread while the worker runs in the main one.
Every state change happens synchronously under one ``threading.RLock`` (no thread is ever
started here), and a delivery is handed to its consumer's own loop with
``call_soon_threadsafe``, so handlers always run on the loop that subscribed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import weakref
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from collections.abc import Callable

from . import _common as common
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
    BrokerError,
    BrokerUnavailable,
    PoolBusy,
    QueueNotFound,
    Unroutable,
)

log = logging.getLogger(__name__)

_REPLY_SIZE_LIMIT = PoolSettings().max_message_bytes


@dataclass(eq=False)
class _Envelope:
    """A message while it sits in (or is out from) a queue."""

    message: Message
    deliveries: int = 0
    redelivered: bool = False


class _Queue:
    def __init__(self, name: str, *, delivery_limit: int | None, dead: _Queue | None = None,
                 max_length: int | None = None):
        self.name = name
        self.delivery_limit = delivery_limit  # None: unlimited, like RabbitMQ classic queues
        self.dead = dead
        self.max_length = max_length  # ready messages kept at most, the oldest dropped (x-max-length)
        self.ready: deque[_Envelope] = deque()
        self.consumers: list[_Consumer] = []
        self.handler_errors: list[BaseException] = []
        self.deleted = False
        self._turn = itertools.count()


@dataclass(eq=False)
class _Routed:
    """A stream or an inbox: a durable queue and the topic filter it takes messages by."""

    topic_filter: str
    queue: _Queue


@dataclass(eq=False)
class _Pool:
    delivery_limit: int
    jobs: _Queue
    dead: _Queue
    control: list[_Queue]
    streams: dict[str, _Routed] = field(default_factory=dict)


class _State:
    """One named in-process broker. Every method expects ``lock`` to be held."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.RLock()
        self.pools: dict[str, _Pool] = {}
        self.replies: dict[str, _Queue] = {}
        self.inboxes: dict[str, _Routed] = {}
        self.pool_locks: dict[str, _MemoryPoolLock] = {}
        self.taps: list[Callable[[bytes], None]] = []
        # The adapters connected to this broker, for a simulated restart of all their connections.
        self.adapters: weakref.WeakSet[MemoryBroker] = weakref.WeakSet()

    def enqueue(self, queue: _Queue, message: Message) -> None:
        for tap in self.taps:
            tap(message.body)
        queue.ready.append(_Envelope(message))
        if queue.max_length is not None and len(queue.ready) > queue.max_length:
            queue.ready.popleft()  # RabbitMQ's default overflow, drop-head
        self.pump(queue)

    def pump(self, queue: _Queue) -> None:
        """Hand ready messages to consumers with free prefetch, round robin."""
        while queue.ready and not queue.deleted:
            consumer = self._next_consumer(queue)
            if consumer is None:
                return
            envelope = queue.ready.popleft()
            envelope.deliveries += 1
            delivery = _MemoryDelivery(consumer, envelope)
            consumer.in_flight.add(delivery)
            if not consumer.hand_over(delivery):
                # Its event loop is closed: the consumer died without cancelling.
                consumer.in_flight.discard(delivery)
                envelope.deliveries -= 1
                queue.ready.appendleft(envelope)
                consumer.detach()

    @staticmethod
    def _next_consumer(queue: _Queue) -> _Consumer | None:
        n = len(queue.consumers)
        if not n:
            return None
        start = next(queue._turn)
        for i in range(n):
            consumer = queue.consumers[(start + i) % n]
            if len(consumer.in_flight) < consumer.prefetch:
                return consumer
        return None

    def give_back(self, delivery: _MemoryDelivery) -> None:
        """A delivery returns unacknowledged (nack, cancel, disconnect): requeue or dead-letter."""
        queue = delivery.consumer.queue
        envelope = delivery.envelope
        if queue.deleted:
            return
        limit = queue.delivery_limit
        if limit is not None and envelope.deliveries >= limit:
            self.dead_letter(queue, envelope, "delivery_limit")
        else:
            envelope.redelivered = True
            # Returned messages go first, as quorum queues do.
            queue.ready.appendleft(envelope)
        self.pump(queue)

    def dead_letter(self, queue: _Queue, envelope: _Envelope, reason: str) -> None:
        if queue.dead is None or queue.dead.deleted:
            return
        headers = dict(envelope.message.headers)
        headers.setdefault(common.DEAD_REASON_HEADER, reason)
        headers.setdefault(common.DEAD_QUEUE_HEADER, queue.name)
        self.enqueue(queue.dead, replace(envelope.message, headers=headers))

    def matching_streams(self, topic: str) -> list[_Queue]:
        return [routed.queue for pool in self.pools.values() for routed in pool.streams.values()
                if common.topic_matches(routed.topic_filter, topic)]

    def matching_inboxes(self, topic: str) -> list[_Queue]:
        return [routed.queue for routed in self.inboxes.values()
                if common.topic_matches(routed.topic_filter, topic)]

    @staticmethod
    def drop(queue: _Queue) -> None:
        """Delete a queue: its messages go, and so do its consumers (their deliveries are stale)."""
        queue.deleted = True
        queue.ready.clear()
        for consumer in list(queue.consumers):
            consumer.active = False
        queue.consumers.clear()

    def settle(self, delivery: _MemoryDelivery, outcome: str) -> None:
        if delivery.stale:
            delivery.mark_settled()
            raise BrokerUnavailable(
                "the connection this delivery arrived on was lost; the broker redelivers it"
            )
        if delivery.settled:
            raise BrokerError("delivery already settled")
        delivery.mark_settled()
        consumer = delivery.consumer
        consumer.in_flight.discard(delivery)
        queue = consumer.queue
        if outcome == "nack":
            self.give_back(delivery)
            return
        if outcome == "reject" and not queue.deleted:
            self.dead_letter(queue, delivery.envelope, "rejected")
        self.pump(queue)


_REGISTRY: dict[str, _State] = {}
_REGISTRY_LOCK = threading.Lock()


def _state_for(name: str) -> _State:
    with _REGISTRY_LOCK:
        state = _REGISTRY.get(name)
        if state is None:
            state = _REGISTRY[name] = _State(name)
        return state


def forget_memory_broker(name: str = "default") -> None:
    """Drop a named in-process broker and everything in it (for test isolation)."""
    with _REGISTRY_LOCK:
        _REGISTRY.pop(name, None)


class _MemoryDelivery(Delivery):
    def __init__(self, consumer: _Consumer, envelope: _Envelope) -> None:
        self.consumer = consumer
        self.envelope = envelope
        self.message = replace(envelope.message, headers=common.clean_headers(envelope.message.headers))
        self.redelivered = envelope.redelivered
        self.delivery_count = envelope.deliveries
        self.stale = False
        self._settled = False

    @property
    def settled(self) -> bool:
        return self._settled

    def mark_settled(self) -> None:
        self._settled = True

    async def ack(self) -> None:
        self._settle("ack")

    async def nack(self) -> None:
        self._settle("nack")

    async def reject(self) -> None:
        self._settle("reject")

    def _settle(self, outcome: str) -> None:
        state = self.consumer.state
        with state.lock:
            state.settle(self, outcome)


class _Consumer(Subscription):
    def __init__(
        self,
        broker: MemoryBroker,
        queue: _Queue,
        handler: Handler,
        prefetch: int,
        *,
        on_cancel: Callable[[], None] | None = None,
    ) -> None:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        self.broker = broker
        self.state = broker._live()
        self.queue = queue
        self.handler = handler
        self.prefetch = prefetch
        self.loop = asyncio.get_running_loop()
        self.in_flight: set[_MemoryDelivery] = set()
        self.tasks: set[asyncio.Task] = set()
        self.active = True
        self._on_cancel = on_cancel

    # -- called with the state lock held, from any thread -------------------------------
    def hand_over(self, delivery: _MemoryDelivery) -> bool:
        try:
            self.loop.call_soon_threadsafe(self._start, delivery)
        except RuntimeError:  # loop closed
            return False
        return True

    def detach(self) -> None:
        """Stop receiving: off the queue, and everything in flight goes back."""
        self.active = False
        if self in self.queue.consumers:
            self.queue.consumers.remove(self)
        self.return_in_flight()
        if self._on_cancel is not None:
            self._on_cancel()
            self._on_cancel = None

    def return_in_flight(self) -> None:
        """What a lost connection does: unsettled deliveries go back, flagged redelivered."""
        returning = list(self.in_flight)
        # Emptied first: giving back pumps, and may hand this very consumer new deliveries.
        self.in_flight.clear()
        for delivery in returning:
            delivery.stale = True
            self.state.give_back(delivery)

    # -- on the consumer's loop ---------------------------------------------------------
    def _start(self, delivery: _MemoryDelivery) -> None:
        if not self.active or delivery.stale:
            return
        task = self.loop.create_task(self._run(delivery))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, delivery: _MemoryDelivery) -> None:
        await common.run_handler(self.handler, delivery, log, self.queue.handler_errors)

    async def stop_handlers(self) -> None:
        if asyncio.get_running_loop() is self.loop:
            await common.stop_tasks(self.tasks)
        else:
            for task in list(self.tasks):
                self.loop.call_soon_threadsafe(task.cancel)

    async def cancel(self) -> None:
        self.broker._subscriptions.discard(self)
        with self.state.lock:
            if not self.active:
                return
            self.active = False
            if self in self.queue.consumers:
                self.queue.consumers.remove(self)
        # Handlers still running give their deliveries back as they unwind.
        await self.stop_handlers()
        with self.state.lock:
            self.detach()


class _MemoryPoolLock(PoolLock):
    def __init__(self, broker: MemoryBroker, pool: str, key: str) -> None:
        self.broker = broker
        self.pool = pool
        self.key = key

    async def release(self) -> None:
        state = self.broker._state
        if state is None:  # the adapter never connected or was closed: nothing is held
            return
        with state.lock:
            if state.pool_locks.get(self.key) is self:
                del state.pool_locks[self.key]
        self.broker._locks.discard(self)


class MemoryBroker(BrokerAdapter):
    """An adapter onto the named in-process broker ``memory://NAME``."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self._state: _State | None = None
        self._closed = False
        self._subscriptions: set[_Consumer] = set()
        self._locks: set[_MemoryPoolLock] = set()
        self._settings: dict[str, PoolSettings] = {}

    def __repr__(self) -> str:
        return f"<MemoryBroker {self.name!r}>"

    async def connect(self) -> None:
        if self._closed:
            raise BrokerUnavailable("this adapter was closed; open a new one")
        self._state = _state_for(self.name)
        with self._state.lock:
            self._state.adapters.add(self)

    async def close(self) -> None:
        if self._closed or self._state is None:
            self._closed = True
            return
        for sub in list(self._subscriptions):
            await sub.cancel()
        for lock in list(self._locks):
            await lock.release()
        self._closed = True

    def _live(self) -> _State:
        if self._state is None or self._closed:
            raise BrokerUnavailable("memory broker adapter is not connected")
        return self._state

    # -- pools --------------------------------------------------------------------------
    async def declare_pool(self, pool: str, settings: PoolSettings = PoolSettings()) -> None:
        common.check_name("pool", pool)
        common.check_settings(settings)
        state = self._live()
        with state.lock:
            existing = state.pools.get(pool)
            if existing is not None:
                if existing.delivery_limit != settings.delivery_limit:
                    raise BrokerError(
                        f"pool {pool!r} already exists with delivery_limit={existing.delivery_limit}"
                    )
            else:
                dead = _Queue(common.dead_queue(pool), delivery_limit=common.DEAD_DELIVERY_LIMIT,
                              max_length=common.MAX_DEAD_LETTERS)
                jobs = _Queue(common.jobs_queue(pool), delivery_limit=settings.delivery_limit, dead=dead)
                state.pools[pool] = _Pool(settings.delivery_limit, jobs, dead, [])
        self._settings[pool] = settings

    async def delete_pool(self, pool: str) -> None:
        state = self._live()
        with state.lock:
            doomed = state.pools.get(pool)
        if doomed is not None:
            queues = (doomed.jobs, doomed.dead, *doomed.control,
                      *(routed.queue for routed in doomed.streams.values()))
            for sub in list(self._subscriptions):
                if sub.queue in queues:
                    await sub.cancel()
        for lock in list(self._locks):
            if lock.pool == pool:
                await lock.release()
        with state.lock:
            removed = state.pools.pop(pool, None)
            if removed is not None:
                # A pool's streams go with it: nothing may dead-letter into a deleted pool.
                for queue in (removed.jobs, removed.dead, *removed.control,
                              *(routed.queue for routed in removed.streams.values())):
                    state.drop(queue)
        self._settings.pop(pool, None)

    async def acquire_pool_lock(self, pool: str, *, purpose: str = "") -> PoolLock:
        common.check_name("pool", pool)
        key = common.lock_queue(pool, purpose)
        state = self._live()
        with state.lock:
            if key in state.pool_locks:
                raise PoolBusy(f"pool {pool!r}'s {purpose or 'founder'} lock is held by another worker")
            lock = state.pool_locks[key] = _MemoryPoolLock(self, pool, key)
        self._locks.add(lock)
        return lock

    # -- jobs ---------------------------------------------------------------------------
    async def publish_job(self, pool: str, message: Message) -> None:
        state = self._live()
        limit = self._settings.get(pool, PoolSettings()).max_message_bytes
        common.check_size(len(message.body), limit, f"pool {pool!r}")
        message = _prepared(message)
        with state.lock:
            target = state.pools.get(pool)
            if target is None:
                raise Unroutable(f"pool {pool!r} is not declared: no job queue took the message")
            state.enqueue(target.jobs, message)
        await _confirmed()

    async def consume_jobs(self, pool: str, handler: Handler, *, prefetch: int = 16) -> Subscription:
        return self._subscribe(self._pool(pool).jobs, handler, prefetch)

    # -- control ------------------------------------------------------------------------
    async def publish_control(self, pool: str, message: Message) -> None:
        state = self._live()
        common.check_size(len(message.body), _REPLY_SIZE_LIMIT, f"pool {pool!r} control")
        message = _prepared(message)
        with state.lock:
            target = state.pools.get(pool)
            if target is None:
                raise Unroutable(f"pool {pool!r} is not declared")
            if not target.control:
                raise Unroutable(f"no worker is listening on pool {pool!r}'s control channel")
            for queue in target.control:
                state.enqueue(queue, message)
        await _confirmed()

    async def consume_control(self, pool: str, handler: Handler) -> Subscription:
        state = self._live()
        with state.lock:
            target = self._pool(pool)
            # One private queue per consumer, as the AMQP adapter's exclusive queue.
            queue = _Queue(f"{common.control_exchange(pool)}.{uuid.uuid4().hex}", delivery_limit=None)

            def unbind() -> None:
                queue.deleted = True
                if queue in target.control:
                    target.control.remove(queue)

            target.control.append(queue)
            return self._subscribe(queue, handler, 16, on_cancel=unbind)

    # -- replies ------------------------------------------------------------------------
    async def declare_reply_queue(self, name: str, *, expires: float | None = None) -> str:
        common.check_name("reply queue", name)
        state = self._live()
        address = common.reply_queue(name)
        with state.lock:
            if address not in state.replies:
                state.replies[address] = _Queue(address, delivery_limit=common.REPLY_DELIVERY_LIMIT)
        return address

    async def delete_reply_queue(self, name: str) -> None:
        state = self._live()
        address = common.reply_queue(name)
        for sub in list(self._subscriptions):
            if sub.queue.name == address:
                await sub.cancel()
        with state.lock:
            queue = state.replies.pop(address, None)
            if queue is not None:
                queue.deleted = True
                queue.ready.clear()
                queue.consumers.clear()

    async def publish_reply(self, address: str, message: Message) -> None:
        state = self._live()
        common.check_size(len(message.body), _REPLY_SIZE_LIMIT, f"reply queue {address!r}")
        message = _prepared(message)
        with state.lock:
            queue = state.replies.get(address)
            if queue is None:
                raise Unroutable(f"reply queue {address!r} does not exist")
            state.enqueue(queue, message)
        await _confirmed()

    async def consume_replies(self, name: str, handler: Handler, *, prefetch: int = 256) -> Subscription:
        state = self._live()
        address = common.reply_queue(name)
        with state.lock:
            queue = state.replies.get(address)
            if queue is None:
                raise QueueNotFound(f"reply queue {address!r} does not exist")
            return self._subscribe(queue, handler, prefetch)

    # -- dead letters -------------------------------------------------------------------
    async def consume_dead_letters(self, pool: str, handler: Handler) -> Subscription:
        return self._subscribe(self._pool(pool).dead, handler, 16)

    # -- event streams ------------------------------------------------------------------
    async def declare_stream(self, pool: str, stream: str, topic_filter: str,
                             settings: PoolSettings = PoolSettings(), *, exchange: str = common.EVENTS_EXCHANGE) -> None:
        common.check_name("pool", pool)
        common.check_name("stream", stream)
        common.check_topic("stream", topic_filter, wildcards=True)
        common.check_settings(settings)
        state = self._live()
        with state.lock:
            target = state.pools.get(pool)
            if target is None:
                raise QueueNotFound(f"pool {pool!r} is not declared: declare it before its streams")
            existing = target.streams.get(stream)
            if existing is not None:
                # RabbitMQ refuses a redeclare with other queue arguments; so do we.
                if existing.topic_filter != topic_filter:
                    raise BrokerError(f"stream {stream!r} of pool {pool!r} already exists with another topic filter")
                if existing.queue.delivery_limit != settings.delivery_limit:
                    raise BrokerError(f"stream {stream!r} of pool {pool!r} already exists with "
                                      f"delivery_limit={existing.queue.delivery_limit}")
                return
            queue = _Queue(common.stream_queue(pool, stream), delivery_limit=settings.delivery_limit,
                           dead=target.dead)
            target.streams[stream] = _Routed(topic_filter, queue)

    async def delete_stream(self, pool: str, stream: str) -> None:
        state = self._live()
        with state.lock:
            target = state.pools.get(pool)
            routed = target.streams.get(stream) if target is not None else None
        if target is None or routed is None:
            return
        for sub in list(self._subscriptions):
            if sub.queue is routed.queue:
                await sub.cancel()
        with state.lock:
            if target.streams.get(stream) is routed:
                del target.streams[stream]
            state.drop(routed.queue)

    async def consume_stream(self, pool: str, stream: str, handler: Handler, *, prefetch: int = 16) -> Subscription:
        state = self._live()
        with state.lock:
            routed = self._pool(pool).streams.get(stream)
            if routed is None:
                raise QueueNotFound(f"stream {stream!r} of pool {pool!r} is not declared")
            return self._subscribe(routed.queue, handler, prefetch)

    async def publish_event(self, topic: str, message: Message, *, exchange: str = common.EVENTS_EXCHANGE) -> None:
        common.check_topic("event", topic, wildcards=False)
        common.check_size(len(message.body), _REPLY_SIZE_LIMIT, f"events on {topic!r}")
        message = _prepared(message)
        state = self._live()
        with state.lock:
            targets = state.matching_streams(topic)
            if not targets:
                raise Unroutable(f"no stream takes events on topic {topic!r}")
            for queue in targets:
                state.enqueue(queue, message)
        await _confirmed()

    # -- inboxes ------------------------------------------------------------------------
    async def declare_inbox(self, name: str, topic_filter: str, *, exchange: str = common.RESULTS_EXCHANGE) -> None:
        common.check_name("inbox", name)
        common.check_topic("inbox", topic_filter, wildcards=True)
        state = self._live()
        with state.lock:
            existing = state.inboxes.get(name)
            if existing is not None:
                if existing.topic_filter != topic_filter:
                    raise BrokerError(f"inbox {name!r} already exists with another topic filter")
                return
            queue = _Queue(common.inbox_queue(name), delivery_limit=common.REPLY_DELIVERY_LIMIT)
            state.inboxes[name] = _Routed(topic_filter, queue)

    async def delete_inbox(self, name: str) -> None:
        state = self._live()
        with state.lock:
            routed = state.inboxes.get(name)
        if routed is None:
            return
        for sub in list(self._subscriptions):
            if sub.queue is routed.queue:
                await sub.cancel()
        with state.lock:
            if state.inboxes.get(name) is routed:
                del state.inboxes[name]
            state.drop(routed.queue)

    async def consume_inbox(self, name: str, handler: Handler, *, prefetch: int = 256) -> Subscription:
        state = self._live()
        with state.lock:
            routed = state.inboxes.get(name)
            if routed is None:
                raise QueueNotFound(f"inbox {name!r} is not declared")
            return self._subscribe(routed.queue, handler, prefetch)

    async def publish_result(self, topic: str, message: Message, *, exchange: str = common.RESULTS_EXCHANGE) -> None:
        common.check_topic("result", topic, wildcards=False)
        common.check_size(len(message.body), _REPLY_SIZE_LIMIT, f"results on {topic!r}")
        message = _prepared(message)
        state = self._live()
        with state.lock:
            targets = state.matching_inboxes(topic)
            if not targets:
                raise Unroutable(f"no inbox takes results on topic {topic!r}")
            for queue in targets:
                state.enqueue(queue, message)
        await _confirmed()

    # -- test helpers -------------------------------------------------------------------
    async def join(self, pool: str, timeout: float = 10.0) -> None:
        """Wait until the pool's job queue is empty and every delivery settled, then re-raise
        the first exception a job handler raised meanwhile (dramatiq's ``StubBroker.join``)."""
        state = self._live()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with state.lock:
                jobs = self._pool(pool).jobs
                idle = not jobs.ready and not any(c.in_flight or c.tasks for c in jobs.consumers)
                if idle and jobs.handler_errors:
                    first = jobs.handler_errors[0]
                    jobs.handler_errors.clear()
                    raise first
            if idle:
                return
            if loop.time() >= deadline:
                raise TimeoutError(f"pool {pool!r} did not drain within {timeout} s")
            await asyncio.sleep(0.002)

    def tap(self, callback: Callable[[bytes], None]) -> None:
        """Call ``callback`` with the body of every message this broker enqueues -- what an
        operator with full access to the broker sees. The demo uses it to show ciphertext only."""
        with self._live().lock:
            self._live().taps.append(callback)

    async def simulate_disconnect(self) -> None:
        """Play a dropped connection and its automatic recovery: running handlers are
        cancelled, every unsettled delivery of this adapter's consumers returns to its queue
        flagged redelivered (counting against the delivery limit, as RabbitMQ 3.10 does), and
        the consumers keep consuming."""
        state = self._live()
        with state.lock:
            consumers = [c for c in self._subscriptions if c.active]
            for consumer in consumers:
                for delivery in consumer.in_flight:
                    delivery.stale = True
        for consumer in consumers:
            await consumer.stop_handlers()
        with state.lock:
            for consumer in consumers:
                consumer.return_in_flight()
        self._reconnected()

    async def simulate_restart(self, *, lose_queued_jobs: bool = False) -> int:
        """Play a broker restart: every connected adapter loses its connection and recovers it
        (:meth:`simulate_disconnect`). With ``lose_queued_jobs`` the restart also loses every
        job waiting in a pool's queue although it was confirmed -- what Mosquitto 2.0 does with
        messages held for a shared subscription. Returns how many jobs were lost."""
        state = self._live()
        lost = 0
        with state.lock:
            if lose_queued_jobs:
                for target in state.pools.values():
                    lost += len(target.jobs.ready)
                    target.jobs.ready.clear()
            adapters = [adapter for adapter in state.adapters if not adapter._closed]
        for adapter in adapters:
            await adapter.simulate_disconnect()
        return lost

    # -- internals ----------------------------------------------------------------------
    def _pool(self, pool: str) -> _Pool:
        state = self._live()
        with state.lock:
            target = state.pools.get(pool)
            if target is None:
                raise QueueNotFound(f"pool {pool!r} is not declared")
            return target

    def _subscribe(
        self, queue: _Queue, handler: Handler, prefetch: int, *, on_cancel: Callable[[], None] | None = None
    ) -> _Consumer:
        state = self._live()
        consumer = _Consumer(self, queue, handler, prefetch, on_cancel=on_cancel)
        with state.lock:
            queue.consumers.append(consumer)
            self._subscriptions.add(consumer)
            state.pump(queue)
        return consumer


async def _confirmed() -> None:
    # A real broker's confirm is a suspension point; without one, a publishing loop on the
    # consumer's own event loop would starve its handlers until it finished.
    await asyncio.sleep(0)


def _prepared(message: Message) -> Message:
    common.check_headers(message.headers)
    # RabbitMQ's client assigns a message id when the publisher gives none; so do we.
    if message.message_id is None:
        return replace(message, message_id=uuid.uuid4().hex, headers=dict(message.headers))
    return replace(message, headers=dict(message.headers))


__all__ = ["MemoryBroker", "forget_memory_broker"]
