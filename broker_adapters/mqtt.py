"""The MQTT 5 adapter (aiomqtt 2.5 over paho-mqtt 2.2), written against Mosquitto 2.0. FIRST CUT.

It owns the MQTT mapping of the broker contract (docs/mqtt-plan.md has the design and its gaps):

- jobs of pool ``P``: topic ``enclaveq/P/jobs``, consumed through the shared subscription
  ``$share/enclaveq-P/enclaveq/P/jobs`` at QoS 1; each subscription is its own MQTT connection
  and session, so that its prefetch is the session's Receive Maximum;
- control: topic ``enclaveq/P/control``, a plain (non-shared) QoS 1 subscription per consumer;
- dead letters: topic ``enclaveq/P/dead``, held by the persistent session
  ``enclaveq-dead-P`` that ``declare_pool`` creates, so dead letters queue with nobody online;
- replies: topic ``enclaveq/reply/NAME``, held by the persistent session ``enclaveq-reply-NAME``
  that ``declare_reply_queue`` creates; ``correlation_id`` travels as MQTT correlation data,
  ``reply_to`` as the response topic.

Acknowledgement is manual: aiomqtt does not expose it, so each connection switches its paho
client (``aiomqtt.Client._client``) to ``manual_ack_set(True)`` before connecting and sends
the PUBACK with ``paho.ack(mid, 1)`` when the handler settles. MQTT has no nack and no delivery
counter: ``nack`` republishes the message with its ``enclaveq-attempt`` user property
incremented (or dead-letters it at the pool's delivery limit), waits for the broker's PUBACK,
then acks the original; ``reject`` does the same towards the dead-letter topic.

Publishes are QoS 1 and wait for the PUBACK; reason code 0x10 (No matching subscribers) means
``Unroutable``. Every paho/aiomqtt failure is mapped to ``errors`` here; bodies are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from . import _common as common
from .base import BrokerAdapter, Delivery, Handler, HeaderValue, Message, PoolLock, PoolSettings, Subscription
from .errors import (
    BrokerError,
    BrokerUnavailable,
    PoolBusy,
    PublishFailed,
    PublishTimeout,
    QueueNotFound,
    Unroutable,
)
from .urls import redact_url

log = logging.getLogger(__name__)

_NO_MATCHING_SUBSCRIBERS = 0x10
# Mosquitto (and the MQTT 5 packet format) cannot carry more than this in one PUBLISH.
_MQTT_MAX_PACKET = 268_435_455
_ID_PROPERTY = "enclaveq-id"
_ATTEMPT_PROPERTY = "enclaveq-attempt"
_HEADER_PREFIX = "h:"
# Broker redeliveries (DUP after a reconnect) seen per consumer, by message id; bounded.
_DUP_MEMORY = 10_000
_REPLY_SIZE_LIMIT = PoolSettings().max_message_bytes


# -- names --------------------------------------------------------------------------------
def jobs_topic(pool: str) -> str:
    return f"{common.PREFIX}/{pool}/jobs"


def jobs_filter(pool: str) -> str:
    return f"$share/{common.PREFIX}-{pool}/{jobs_topic(pool)}"


def control_topic(pool: str) -> str:
    return f"{common.PREFIX}/{pool}/control"


def dead_topic(pool: str) -> str:
    return f"{common.PREFIX}/{pool}/dead"


def meta_topic(pool: str) -> str:
    return f"{common.PREFIX}/{pool}/meta"


def lock_topic(pool: str, purpose: str = "") -> str:
    common.lock_queue(pool, purpose)  # validates the purpose
    return f"{common.PREFIX}/{pool}/{purpose or 'founder'}-lock"


def reply_topic(name: str) -> str:
    return f"{common.PREFIX}/reply/{name}"


# -- message <-> MQTT properties ----------------------------------------------------------
def _encode_header(value: HeaderValue) -> str:
    # User properties are UTF-8 string pairs: a one-letter tag keeps the header's type.
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, int):
        return f"i{value}"
    if isinstance(value, bytes):
        return f"x{value.hex()}"
    return f"s{value}"


def _decode_header(raw: str) -> HeaderValue | None:
    tag, rest = raw[:1], raw[1:]
    try:
        if tag == "t":
            return True
        if tag == "f":
            return False
        if tag == "i":
            return int(rest)
        if tag == "x":
            return bytes.fromhex(rest)
        if tag == "s":
            return rest
    except ValueError:
        return None
    return None


def _properties(message: Message, attempt: int) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    if message.correlation_id is not None:
        props.CorrelationData = message.correlation_id.encode()
    if message.reply_to is not None:
        props.ResponseTopic = message.reply_to
    user = [(_ID_PROPERTY, message.message_id or uuid.uuid4().hex), (_ATTEMPT_PROPERTY, str(attempt))]
    user += [(_HEADER_PREFIX + key, _encode_header(value)) for key, value in message.headers.items()]
    props.UserProperty = user
    return props


def _parse(msg: paho.MQTTMessage) -> tuple[Message, int]:
    """The contract's message and its attempt number from a PUBLISH (attacker-written bytes)."""
    props = msg.properties
    correlation = getattr(props, "CorrelationData", None)
    reply_to = getattr(props, "ResponseTopic", None)
    message_id: str | None = None
    attempt = 1
    headers: dict[str, HeaderValue] = {}
    for key, value in getattr(props, "UserProperty", None) or []:
        if key == _ID_PROPERTY:
            message_id = value
        elif key == _ATTEMPT_PROPERTY:
            with contextlib.suppress(ValueError):
                attempt = max(1, min(int(value), 1_000_000))
        elif key.startswith(_HEADER_PREFIX):
            decoded = _decode_header(value)
            if decoded is not None:
                headers[key[len(_HEADER_PREFIX):]] = decoded
    message = Message(
        body=bytes(msg.payload),
        correlation_id=correlation.decode(errors="replace") if isinstance(correlation, bytes) else None,
        reply_to=reply_to if isinstance(reply_to, str) else None,
        message_id=message_id,
        headers=headers,
    )
    return message, attempt


# -- one connection ------------------------------------------------------------------------
class _Conn:
    """One MQTT 5 connection with manual acks, reconnected under the same client id.

    A persistent session (``session_expiry`` > 0, ``clean_start=False`` on reconnect) makes
    Mosquitto redeliver unacknowledged QoS 1 messages, DUP-flagged, after a reconnect."""

    def __init__(
        self,
        broker: MqttBroker,
        client_id: str,
        *,
        session_expiry: int = 0,
        clean_start: bool = True,
        receive_maximum: int | None = None,
        subscriptions: Sequence[str] = (),
        on_message: Callable[[_Conn, paho.MQTTMessage], None] | None = None,
        will: aiomqtt.Will | None = None,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self.session_expiry = session_expiry
        self.clean_start = clean_start
        self.receive_maximum = receive_maximum
        self.subscriptions = list(subscriptions)
        self.on_message = on_message
        self.will = will
        self.generation = 0
        self.client: aiomqtt.Client | None = None
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._supervisor: asyncio.Task | None = None
        self._closing = False

    async def open(self) -> None:
        await self._connect(self.clean_start)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def _connect(self, clean_start: bool) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry
        if self.receive_maximum is not None:
            props.ReceiveMaximum = self.receive_maximum
        b = self.broker
        client = aiomqtt.Client(
            b.host, b.port, username=b.username, password=b.password, identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5, clean_start=clean_start, properties=props,
            tls_context=b.tls_context, timeout=b.connect_timeout, will=self.will,
        )
        raw = client._client  # noqa: SLF001 - the only way to manual acks in aiomqtt 2.5
        raw.manual_ack_set(True)
        raw.on_message = self._on_message
        raw.on_publish = self._on_publish
        try:
            await client.__aenter__()
            # Set before subscribing: retained and queued messages arrive right after the SUBACK.
            self.client = client
            self.generation += 1
            for topic in self.subscriptions:
                granted = await client.subscribe(topic, qos=1)
                if any(getattr(code, "value", code) >= 0x80 for code in granted):
                    raise BrokerError(f"broker refused the subscription to {topic!r}")
        except aiomqtt.MqttError as exc:
            raise BrokerUnavailable(
                f"cannot connect to {redact_url(b.url)}: {type(exc).__name__}: {exc}"
            ) from exc

    def _on_message(self, _client: Any, _userdata: Any, msg: paho.MQTTMessage) -> None:
        if self.on_message is None or msg.qos != 1:
            return
        self.on_message(self, msg)

    def _on_publish(self, _client: Any, _userdata: Any, mid: int, reason: Any, _props: Any) -> None:
        future = self._pending.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(int(getattr(reason, "value", reason or 0)))

    async def _supervise(self) -> None:
        while not self._closing:
            client = self.client
            assert client is not None
            with contextlib.suppress(Exception):
                await asyncio.shield(client._disconnected)  # noqa: SLF001
            if self._closing:
                return
            log.warning("MQTT connection %s lost; reconnecting", self.client_id)
            self._fail_pending()
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)
            while not self._closing:
                await asyncio.sleep(self.broker.reconnect_interval)
                try:
                    # The session (and its unacked deliveries) is resumed, not restarted.
                    await self._connect(clean_start=self.session_expiry == 0)
                    break
                except BrokerError:
                    continue
            self.broker._conn_reconnected(self)

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(BrokerUnavailable("MQTT connection lost before the PUBACK"))

    def ack(self, mid: int, generation: int) -> None:
        if generation != self.generation or self.client is None:
            # The mid belongs to a dead connection; the broker resends the message (DUP).
            raise BrokerUnavailable("the connection this delivery arrived on was lost; the broker redelivers it")
        self.client._client.ack(mid, 1)  # noqa: SLF001

    async def publish(self, topic: str, payload: bytes, props: Properties | None, *, retain: bool = False) -> int:
        """Publish at QoS 1 and return the PUBACK's reason code."""
        client = self.client
        if client is None:
            raise BrokerUnavailable("MQTT adapter is not connected")
        info = client._client.publish(topic, payload, qos=1, retain=retain, properties=props)  # noqa: SLF001
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise BrokerUnavailable(f"MQTT publish failed: {paho.error_string(info.rc)}")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending[info.mid] = future
        try:
            return await asyncio.wait_for(future, self.broker.confirm_timeout)
        except TimeoutError:
            raise PublishTimeout(f"no PUBACK for a publish to {topic!r} within {self.broker.confirm_timeout} s") from None
        finally:
            self._pending.pop(info.mid, None)

    async def close(self, *, end_session: bool = False) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._supervisor
        client, self.client = self.client, None
        self._fail_pending()
        if client is None:
            return
        if end_session:
            # A DISCONNECT may lower the session expiry: 0 ends the session with the connection.
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
            with contextlib.suppress(Exception):
                client._client.disconnect(properties=props)  # noqa: SLF001
        with contextlib.suppress(Exception):
            await client.__aexit__(None, None, None)


# -- deliveries and subscriptions -----------------------------------------------------------
class _MqttDelivery(Delivery):
    def __init__(self, sub: _MqttSubscription, conn: _Conn, msg: paho.MQTTMessage, message: Message,
                 attempt: int, count: int) -> None:
        self.sub = sub
        self.conn = conn
        self.mid = msg.mid
        self.generation = conn.generation
        self.message = replace(message, headers=common.clean_headers(message.headers))
        self._raw = message
        self.attempt = attempt
        self.delivery_count = count
        self.redelivered = count > 1 or bool(msg.dup)
        self._settled = False

    @property
    def settled(self) -> bool:
        return self._settled

    def _claim(self) -> None:
        if self._settled:
            raise BrokerError("delivery already settled")
        self._settled = True
        self.sub.in_flight.discard(self)

    async def ack(self) -> None:
        self._claim()
        self.conn.ack(self.mid, self.generation)

    async def nack(self) -> None:
        self._claim()
        await self.sub.give_back(self)
        self.conn.ack(self.mid, self.generation)

    async def reject(self) -> None:
        self._claim()
        await self.sub.dead_letter(self._raw, "rejected")
        self.conn.ack(self.mid, self.generation)


class _MqttSubscription(Subscription):
    """One consumer: its own connection (hence session and Receive Maximum) and handler tasks.

    ``kind`` is ``jobs`` (nack republishes, counted against the pool's limit), ``dead`` or
    ``replies`` (nack republishes, bounded by ``common.*_DELIVERY_LIMIT``), or ``control``
    (broadcast: nack only acks, the message was this consumer's copy)."""

    def __init__(self, broker: MqttBroker, kind: str, topic: str, handler: Handler, *,
                 pool: str | None, limit: int) -> None:
        self.broker = broker
        self.kind = kind
        self.topic = topic
        self.pool = pool
        self.handler = handler
        self.limit = limit
        self.conn: _Conn | None = None
        self.in_flight: set[_MqttDelivery] = set()
        self.tasks: set[asyncio.Task] = set()
        self._dups: OrderedDict[str, int] = OrderedDict()
        self.active = True
        self.handler_errors: list[BaseException] = []

    def on_message(self, conn: _Conn, msg: paho.MQTTMessage) -> None:
        if not self.active:
            return  # not acked: the session redelivers it (or it goes with the session)
        message, attempt = _parse(msg)
        count = attempt
        if msg.dup and message.message_id is not None:
            # A broker redelivery after a reconnect: the attempt property did not move, so
            # count it here (per consumer, bounded: see docs/mqtt-plan.md).
            seen = self._dups.pop(message.message_id, 0) + 1
            self._dups[message.message_id] = seen
            if len(self._dups) > _DUP_MEMORY:
                self._dups.popitem(last=False)
            count += seen
        delivery = _MqttDelivery(self, conn, msg, message, attempt, count)
        self.in_flight.add(delivery)
        task = asyncio.get_running_loop().create_task(self._run(delivery))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, delivery: _MqttDelivery) -> None:
        if self.kind == "jobs" and delivery.delivery_count > self.limit:
            # Over the limit through broker redeliveries: dead-letter without running it.
            delivery._claim()
            await self.dead_letter(delivery._raw, "delivery_limit")
            delivery.conn.ack(delivery.mid, delivery.generation)
            return
        await common.run_handler(self.handler, delivery, log, self.handler_errors)

    async def give_back(self, delivery: _MqttDelivery) -> None:
        if self.kind == "control":
            return
        if delivery.delivery_count >= self.limit:
            if self.kind == "jobs":
                await self.dead_letter(delivery._raw, "delivery_limit")
            return  # dead letters and replies have nowhere further to go: dropped (logged)
        await self.broker._publish_checked(self.topic, delivery._raw, attempt=delivery.delivery_count + 1)

    async def dead_letter(self, message: Message, reason: str) -> None:
        if self.kind != "jobs" or self.pool is None:
            return
        headers = dict(message.headers)
        headers.setdefault(common.DEAD_REASON_HEADER, reason)
        headers.setdefault(common.DEAD_QUEUE_HEADER, common.jobs_queue(self.pool))
        await self.broker._publish_checked(dead_topic(self.pool), replace(message, headers=headers), attempt=1)

    async def cancel(self) -> None:
        if not self.active:
            return
        self.active = False
        self.broker._subscriptions.discard(self)
        conn = self.conn
        if conn is not None and conn.client is not None and self.kind in ("jobs", "control"):
            # Stop the broker assigning us more; what it already queued for us is the gap
            # docs/mqtt-plan.md describes (shared subscriptions assign to sessions).
            with contextlib.suppress(Exception):
                await conn.client.unsubscribe(self.topic if self.kind == "control" else jobs_filter(self.pool or ""))
        # Running handlers give their deliveries back (republish + ack) as they unwind.
        await common.stop_tasks(self.tasks)
        if conn is not None:
            await conn.close(end_session=self.kind in ("jobs", "control"))


class _MqttPoolLock(PoolLock):
    def __init__(self, broker: MqttBroker, topic: str, conn: _Conn) -> None:
        self.broker = broker
        self.topic = topic
        self.conn = conn

    async def release(self) -> None:
        if self.broker._locks.pop(self.topic, None) is None:
            return
        with contextlib.suppress(BrokerError):
            await self.conn.publish(self.topic, b"", None, retain=True)  # clears the retained holder
        await self.conn.close(end_session=True)


# -- the adapter ---------------------------------------------------------------------------
class MqttBroker(BrokerAdapter):
    """An adapter onto one MQTT 5 broker: a publisher connection plus one per subscription."""

    reconnect_interval = 1.0
    connect_timeout = 10.0
    # Persistent sessions (jobs, dead letters, replies) outlive a disconnect by this long.
    session_expiry = 7 * 24 * 3600

    def __init__(self, url: str, *, confirm_timeout: float | None = None) -> None:
        self.url = url
        if confirm_timeout is not None:
            if confirm_timeout <= 0:
                raise ValueError("confirm_timeout must be positive")
            self.confirm_timeout = confirm_timeout
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError("MqttBroker takes mqtt:// or mqtts:// URLs")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.tls_context = ssl.create_default_context() if parts.scheme == "mqtts" else None
        self.client_prefix = f"enclaveq-{uuid.uuid4().hex[:12]}"
        self._publisher: _Conn | None = None
        self._subscriptions: set[_MqttSubscription] = set()
        self._locks: dict[str, _MqttPoolLock] = {}
        self._settings: dict[str, PoolSettings] = {}

    def __repr__(self) -> str:
        return f"<MqttBroker {redact_url(self.url)} {self.client_prefix}>"

    # -- connection ---------------------------------------------------------------------
    async def connect(self) -> None:
        conn = _Conn(self, f"{self.client_prefix}-pub")
        await conn.open()
        self._publisher = conn

    async def close(self) -> None:
        conn, self._publisher = self._publisher, None
        if conn is None:
            return
        for sub in list(self._subscriptions):
            with contextlib.suppress(BrokerError):
                await sub.cancel()
        for lock in list(self._locks.values()):
            with contextlib.suppress(BrokerError):
                await lock.release()
        await conn.close()

    def _live(self) -> _Conn:
        if self._publisher is None:
            raise BrokerUnavailable("MQTT adapter is not connected")
        return self._publisher

    def _conn_reconnected(self, conn: _Conn) -> None:
        if conn is self._publisher:
            self._reconnected()

    async def _publish_checked(self, topic: str, message: Message, *, attempt: int = 1,
                               what: str | None = None) -> None:
        code = await self._live().publish(topic, message.body, _properties(message, attempt))
        if code == _NO_MATCHING_SUBSCRIBERS:
            raise Unroutable(f"no subscriber takes {what or repr(topic)}")
        if code >= 0x80:
            raise PublishFailed(f"broker refused a publish to {what or repr(topic)} (reason 0x{code:02x})")

    async def _session(self, client_id: str, topic: str, *, end: bool) -> None:
        """Create (subscribe, keep) or end a persistent session that holds ``topic``'s messages."""
        conn = _Conn(self, client_id, session_expiry=0 if end else self.session_expiry,
                     clean_start=end, subscriptions=() if end else [topic])
        await conn._connect(clean_start=end)
        await conn.close(end_session=end)

    async def _read_retained(self, topic: str) -> bytes | None:
        """The retained message on ``topic``, if any. Mosquitto sends retained messages right
        after the SUBACK on the same connection, so an echo of our own probe publish that
        arrives after subscribing means nothing retained is still on its way."""
        got: list[bytes] = []
        probe = f"{common.PREFIX}/_probe/{uuid.uuid4().hex}"
        echoed = asyncio.Event()

        def on_message(conn: _Conn, msg: paho.MQTTMessage) -> None:
            if msg.topic == probe:
                echoed.set()
            elif msg.retain and msg.payload:
                got.append(bytes(msg.payload))
            conn.ack(msg.mid, conn.generation)

        conn = _Conn(self, f"{self.client_prefix}-r{uuid.uuid4().hex[:8]}", subscriptions=[topic, probe],
                     on_message=on_message)
        await conn._connect(clean_start=True)
        try:
            await conn.publish(probe, b"", None)
            await asyncio.wait_for(echoed.wait(), self.confirm_timeout)
        finally:
            await conn.close()
        return got[-1] if got else None

    # -- pools --------------------------------------------------------------------------
    async def declare_pool(self, pool: str, settings: PoolSettings = PoolSettings()) -> None:
        common.check_name("pool", pool)
        common.check_settings(settings)
        meta = json.dumps({"delivery_limit": settings.delivery_limit}).encode()
        existing = await self._read_retained(meta_topic(pool))
        if existing is not None and existing != meta:
            # Attacker-written bytes: compared, never parsed or echoed.
            raise BrokerError(f"pool {pool!r} already exists with different settings")
        if existing is None:
            await self._live().publish(meta_topic(pool), meta, None, retain=True)
            await self._session(f"{common.PREFIX}-dead-{pool}", dead_topic(pool), end=False)
        self._settings[pool] = settings

    async def delete_pool(self, pool: str) -> None:
        for sub in list(self._subscriptions):
            if sub.pool == pool:
                await sub.cancel()
        for topic, lock in list(self._locks.items()):
            if topic.startswith(f"{common.PREFIX}/{pool}/"):
                await lock.release()
        await self._live().publish(meta_topic(pool), b"", None, retain=True)
        await self._session(f"{common.PREFIX}-dead-{pool}", dead_topic(pool), end=True)
        self._settings.pop(pool, None)

    async def acquire_pool_lock(self, pool: str, *, purpose: str = "") -> PoolLock:
        """BEST EFFORT (see docs/mqtt-plan.md): a retained holder record, cleared by the
        holder's will if its connection dies. Two acquirers racing can both win."""
        common.check_name("pool", pool)
        topic = lock_topic(pool, purpose)
        if topic in self._locks or await self._read_retained(topic) is not None:
            raise PoolBusy(f"pool {pool!r}'s {purpose or 'founder'} lock is held by another worker")
        will = aiomqtt.Will(topic, b"", qos=1, retain=True)
        conn = _Conn(self, f"{self.client_prefix}-lock-{uuid.uuid4().hex[:8]}", will=will)
        await conn.open()
        holder = conn.client_id.encode()
        await conn.publish(topic, holder, None, retain=True)
        if await self._read_retained(topic) != holder:
            await conn.close()
            raise PoolBusy(f"pool {pool!r}'s {purpose or 'founder'} lock was taken by another worker")
        lock = self._locks[topic] = _MqttPoolLock(self, topic, conn)
        return lock

    # -- jobs ---------------------------------------------------------------------------
    async def publish_job(self, pool: str, message: Message) -> None:
        limit = min(self._settings.get(pool, PoolSettings()).max_message_bytes, _MQTT_MAX_PACKET)
        common.check_size(len(message.body), limit, f"pool {pool!r}")
        common.check_headers(message.headers)
        await self._publish_checked(jobs_topic(pool), message, what=f"pool {pool!r}'s jobs")

    async def consume_jobs(self, pool: str, handler: Handler, *, prefetch: int = 16) -> Subscription:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        if pool not in self._settings and await self._read_retained(meta_topic(pool)) is None:
            raise QueueNotFound(f"pool {pool!r} is not declared")
        limit = self._settings.get(pool, PoolSettings()).delivery_limit
        sub = _MqttSubscription(self, "jobs", jobs_topic(pool), handler, pool=pool, limit=limit)
        return await self._start(sub, f"{self.client_prefix}-jobs-{uuid.uuid4().hex[:8]}", jobs_filter(pool),
                                 session_expiry=self.session_expiry, receive_maximum=prefetch)

    # -- control -----------------------------------------------------------------------
    async def publish_control(self, pool: str, message: Message) -> None:
        common.check_headers(message.headers)
        await self._publish_checked(control_topic(pool), message, what=f"pool {pool!r}'s control channel")

    async def consume_control(self, pool: str, handler: Handler) -> Subscription:
        common.check_name("pool", pool)
        sub = _MqttSubscription(self, "control", control_topic(pool), handler, pool=pool, limit=1)
        return await self._start(sub, f"{self.client_prefix}-ctl-{uuid.uuid4().hex[:8]}", control_topic(pool),
                                 session_expiry=0, receive_maximum=16)

    # -- replies -----------------------------------------------------------------------
    async def declare_reply_queue(self, name: str) -> str:
        common.check_name("reply queue", name)
        await self._session(f"{common.PREFIX}-reply-{name}", reply_topic(name), end=False)
        return reply_topic(name)

    async def delete_reply_queue(self, name: str) -> None:
        for sub in list(self._subscriptions):
            if sub.kind == "replies" and sub.topic == reply_topic(name):
                await sub.cancel()
        await self._session(f"{common.PREFIX}-reply-{name}", reply_topic(name), end=True)

    async def publish_reply(self, address: str, message: Message) -> None:
        common.check_size(len(message.body), _REPLY_SIZE_LIMIT, f"reply address {address!r}")
        common.check_headers(message.headers)
        if not address.startswith(f"{common.PREFIX}/reply/"):
            # Attacker-chosen reply_to: never publish outside the reply namespace.
            raise Unroutable(f"reply address {address!r} is not an enclaveq reply topic")
        await self._publish_checked(address, message, what=f"reply address {address!r}")

    async def consume_replies(self, name: str, handler: Handler, *, prefetch: int = 256) -> Subscription:
        common.check_name("reply queue", name)
        sub = _MqttSubscription(self, "replies", reply_topic(name), handler, pool=None,
                                limit=common.REPLY_DELIVERY_LIMIT)
        # The declared session: joining it takes over what queued while nobody listened.
        return await self._start(sub, f"{common.PREFIX}-reply-{name}", None,
                                 session_expiry=self.session_expiry, receive_maximum=prefetch)

    # -- dead letters ------------------------------------------------------------------
    async def consume_dead_letters(self, pool: str, handler: Handler) -> Subscription:
        common.check_name("pool", pool)
        sub = _MqttSubscription(self, "dead", dead_topic(pool), handler, pool=pool, limit=common.DEAD_DELIVERY_LIMIT)
        return await self._start(sub, f"{common.PREFIX}-dead-{pool}", None,
                                 session_expiry=self.session_expiry, receive_maximum=16)

    # -- internals ----------------------------------------------------------------------
    async def _start(self, sub: _MqttSubscription, client_id: str, topic: str | None, *,
                     session_expiry: int, receive_maximum: int) -> Subscription:
        self._live()
        persistent_existing = topic is None  # joins a session declare_* created
        conn = _Conn(self, client_id, session_expiry=session_expiry, clean_start=not persistent_existing,
                     receive_maximum=receive_maximum, subscriptions=[topic] if topic else [],
                     on_message=sub.on_message)
        sub.conn = conn
        await conn.open()
        self._subscriptions.add(sub)
        return sub


__all__ = ["MqttBroker"]
