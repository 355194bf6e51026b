"""The MQTT 5 adapter (aiomqtt 2.5 over paho-mqtt 2.2), written against Mosquitto 2.0.

It owns the MQTT mapping of the broker contract; docs/architecture.md ("MQTT 5") has the design
and what MQTT cannot give:

- jobs of pool ``P``: topic ``enclaveq/P/jobs``, consumed through the shared subscription
  ``$share/enclaveq-P/enclaveq/P/jobs`` at QoS 1; each subscription is its own MQTT connection
  and persistent session, so that its prefetch is the session's Receive Maximum; a session left
  behind by a worker that stopped or died is adopted by another consumer (``_Adopter``);
- control: topic ``enclaveq/P/control``, a plain (non-shared) QoS 1 subscription per consumer;
- dead letters: topic ``enclaveq/P/dead``, held by the persistent session
  ``enclaveq-dead-P`` that ``declare_pool`` creates, so dead letters queue with nobody online;
- replies: topic ``enclaveq/reply/NAME``, held by the persistent session ``enclaveq-reply-NAME``
  that ``declare_reply_queue`` creates; ``correlation_id`` travels as MQTT correlation data,
  ``reply_to`` as the response topic;
- pool locks: retained claims, cleared by their holder's will (``_MqttPoolLock``).

Acknowledgement is manual and in arrival order: aiomqtt does not expose it, so each connection
switches its paho client (``aiomqtt.Client._client``) to ``manual_ack_set(True)`` before
connecting and sends the PUBACK with ``paho.ack(mid, 1)`` once the handler and every earlier
delivery have settled. MQTT has no nack and no delivery counter: ``nack`` republishes the
message with its ``enclaveq-attempt`` user property incremented (or dead-letters it at the
pool's delivery limit), waits for the broker's PUBACK, then acks the original; ``reject`` does
the same towards the dead-letter topic.

Publishes are QoS 1 and wait for the PUBACK; reason code 0x10 (No matching subscribers) means
``Unroutable``. Every paho/aiomqtt failure is mapped to ``errors`` here; bodies are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import logging
import socket
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

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
from .mqtt_url import parse_mqtt_url
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
# Room for the fixed header, topic and properties of a PUBLISH beside its payload.
_PACKET_OVERHEAD = 4096
_SESSION_TAKEN_OVER = 0x8E
# How long after a reconnect a publish that finds no subscriber is retried (see _publish_checked).
_RESUBSCRIBE_GRACE = 10.0
# How long any publish that finds no subscriber is retried: a consumer whose session was adopted
# resubscribes under a new session at once, so a gap is short; an undeclared pool waits this long.
_REGROUP_GRACE = 1.0
# A job session's retained record: its worker is connected, or it was left behind for adoption.
_LIVE, _LEFT = b"live", b"left"
# Retained records read at once (a pool's sessions, a lock's claims); more is a hostile broker.
_MAX_RETAINED = 4096
# Pool lock claims (retained on ``<lock>/<client id>``): being decided, or held.
_CLAIMING, _HELD = b"claiming", b"held"
_LOCK_TRIES = 5
_SESSION_TRIES = 4


# -- names --------------------------------------------------------------------------------
def jobs_topic(pool: str) -> str:
    return f"{common.PREFIX}/{pool}/jobs"


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


def reply_session(name: str) -> str:
    return f"{common.PREFIX}-reply-{name}"


def dead_session(pool: str) -> str:
    return f"{common.PREFIX}-dead-{pool}"


def inbox_session(name: str) -> str:
    return f"{common.PREFIX}-inbox-{name}"


def inbox_requeue_topic(name: str) -> str:
    return f"{common.PREFIX}/_inbox/{name}/requeue"


def inbox_meta_topic(name: str) -> str:
    return f"{common.PREFIX}/_inbox/{name}/meta"


def stream_meta_topic(pool: str, stream: str) -> str:
    return f"{common.PREFIX}/{pool}/streams/{stream}/meta"


@dataclass(frozen=True)
class SharedQueue:
    """A competing-consumer queue built from a shared subscription: the pool's job queue
    (``stream`` None) or one of its event streams. Its sessions' client ids start with
    ``client_prefix`` ("~" cannot occur in pool or stream names, so prefixes never overlap), and
    what is given back (nack, adoption) goes to ``requeue_topic``, which reaches this queue only:
    republishing an event to its own topic would hand a copy to every other stream matching it."""

    pool: str
    stream: str | None
    topic_filter: str

    @property
    def requeue_topic(self) -> str:
        if self.stream is None:
            return jobs_topic(self.pool)
        return f"{common.PREFIX}/{self.pool}/streams/{self.stream}/requeue"

    @property
    def share_filters(self) -> list[str]:
        group = f"{common.PREFIX}-{self.pool}" + (f"~{self.stream}" if self.stream is not None else "")
        topics = [self.topic_filter] if self.topic_filter == self.requeue_topic else [self.topic_filter,
                                                                                     self.requeue_topic]
        return [f"$share/{group}/{topic}" for topic in topics]

    @property
    def client_prefix(self) -> str:
        return f"{common.PREFIX}~{self.pool}~" + ("jobs" if self.stream is None else f"s.{self.stream}") + "~"

    @property
    def dead_queue_name(self) -> str:
        """The queue named in a dead letter's ``x-first-death-queue`` (the AMQP names)."""
        return common.jobs_queue(self.pool) if self.stream is None else common.stream_queue(self.pool, self.stream)

    def owns(self, topic: str) -> bool:
        return topic == self.requeue_topic or common.topic_matches(self.topic_filter, topic)


def jobs_queue(pool: str) -> SharedQueue:
    return SharedQueue(pool, None, jobs_topic(pool))


def sessions_topic(pool: str, client_id: str) -> str:
    return f"{common.PREFIX}/{pool}/sessions/{client_id}"


def sessions_filter(pool: str) -> str:
    return f"{common.PREFIX}/{pool}/sessions/+"


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
    user = []
    # Absent means "the correlation id" (every enclaveq request and reply has message id ==
    # correlation id): one user property less to encode and parse per message.
    if message.message_id is None or message.message_id != message.correlation_id:
        user.append((_ID_PROPERTY, message.message_id or uuid.uuid4().hex))
    if attempt > 1:  # absent means 1: one property less to encode and parse per first delivery
        user.append((_ATTEMPT_PROPERTY, str(attempt)))
    user += [(_HEADER_PREFIX + key, _encode_header(value)) for key, value in message.headers.items()]
    if user:
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
    correlation_id = correlation.decode(errors="replace") if isinstance(correlation, bytes) else None
    message = Message(
        body=bytes(msg.payload),
        correlation_id=correlation_id,
        reply_to=reply_to if isinstance(reply_to, str) else None,
        message_id=message_id if message_id is not None else correlation_id,
        headers=headers,
    )
    return message, attempt


# -- one connection ------------------------------------------------------------------------
class _Conn:
    """One MQTT 5 connection with manual, in-order acks, reconnected by its supervisor.

    A persistent session (``session_expiry`` > 0, ``clean_start=False`` on reconnect) makes
    Mosquitto resend unacknowledged QoS 1 messages, DUP-flagged, after a reconnect.

    Acknowledgements leave in the order the PUBLISHes arrived (MQTT 5 §4.6, MQTT-4.6.0-2): a
    settled delivery's PUBACK waits until every earlier delivery of the connection is settled.
    Handlers finish out of order; the broker must still see ordered PUBACKs, and holding a
    PUBACK back only keeps a Receive Maximum slot busy a little longer."""

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
        will: Callable[[str], aiomqtt.Will] | None = None,
        reconnect: bool = True,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self.session_expiry = session_expiry
        self.clean_start = clean_start
        self.receive_maximum = receive_maximum
        self.subscriptions = list(subscriptions)
        self.on_message = on_message
        self.will = will
        self.reconnect = reconnect
        # Called (in a task) after every reconnect, before the adapter's on_reconnect callbacks.
        self.on_reconnected: Callable[[], Any] | None = None
        self.generation = 0
        self.client: aiomqtt.Client | None = None
        self.session_present = False
        self.max_packet = _MQTT_MAX_PACKET
        self.disconnect_reason: int | None = None
        self.up = asyncio.Event()  # set while connected
        self.connected_at = -_RESUBSCRIBE_GRACE  # loop time of the last reconnect (not the first connect)
        self._order: OrderedDict[int, bool] = OrderedDict()  # mid -> settled, in arrival order
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._supervisor: asyncio.Task | None = None
        self._closing = False

    async def open(self) -> None:
        await self._connect(self.clean_start)
        if self.reconnect:
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
            tls_context=b.tls_context, timeout=b.connect_timeout,
            will=self.will(self.client_id) if self.will is not None else None,
        )
        raw = client._client  # noqa: SLF001 - the only way to manual acks in aiomqtt 2.5
        raw.manual_ack_set(True)
        raw.on_message = self._on_message
        raw.on_publish = self._on_publish
        aiomqtt_on_connect: Any = raw.on_connect
        aiomqtt_on_disconnect: Any = raw.on_disconnect

        def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
            # A resumed session's unacknowledged messages follow the CONNACK at once, before
            # __aenter__ returns: they must already belong to this connection (its generation,
            # its ack order), or their acks would be refused as stale and the session would stall.
            self.client = client
            self.generation += 1
            self._order.clear()
            # What the CONNACK says: whether our session was there, and the broker's packet limit.
            self.session_present = bool(getattr(flags, "session_present", False))
            self.max_packet = int(getattr(properties, "MaximumPacketSize", _MQTT_MAX_PACKET) or _MQTT_MAX_PACKET)
            aiomqtt_on_connect(c, userdata, flags, reason, properties)

        # aiomqtt 2.5 ignores a disconnect before the CONNACK and waits out its timeout; a TLS 1.3
        # broker refuses a (missing) client certificate only after the handshake, i.e. exactly then.
        socket_errors: list[str] = []
        raw.on_log = lambda _c, _u, _level, text: socket_errors.append(text) if "socket" in text else None

        def on_disconnect(c: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
            self.disconnect_reason = int(getattr(reason, "value", reason or 0))
            if not client._connected.done():  # noqa: SLF001
                client._connected.set_exception(aiomqtt.MqttError(  # noqa: SLF001
                    f"connection closed before the CONNACK: {socket_errors[-1] if socket_errors else reason}"))
            aiomqtt_on_disconnect(c, userdata, flags, reason, properties)

        raw.on_connect, raw.on_disconnect = on_connect, on_disconnect
        self.disconnect_reason = None
        try:
            await client.__aenter__()
            # Only the connect needs paho's log lines; kept on, paho formats every packet
            # (properties included) into a string for it: a measurable share of a worker's CPU.
            raw.on_log = None
            self.up.set()
            for topic in self.subscriptions:
                await self.subscribe(topic)
        except aiomqtt.MqttError as exc:
            self.client = None
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)
            raise BrokerUnavailable(
                f"cannot connect to {redact_url(b.url)}: {_reason(exc, b.url)}"
            ) from None

    async def _unless_closed(self, call: Any, what: str) -> Any:
        """Await ``call`` (a SUBSCRIBE or UNSUBSCRIBE), raced with the connection's end: aiomqtt
        would wait out its whole timeout for a SUBACK or UNSUBACK that a lost connection (a session
        taken over by a concurrent declarer or adopter) never sends."""
        calling = asyncio.ensure_future(call)
        gone = asyncio.ensure_future(self.closed())
        try:
            done, _ = await asyncio.wait({calling, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if calling not in done:
            calling.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await calling
            raise BrokerUnavailable(f"the connection closed while {what}")
        try:
            return calling.result()
        except aiomqtt.MqttError as exc:
            raise BrokerUnavailable(f"{what} failed: {_reason(exc)}") from None

    async def subscribe(self, topic: str) -> None:
        client = self.client
        if client is None:
            raise BrokerUnavailable(f"the connection is down; cannot subscribe to {topic!r}")
        granted = await self._unless_closed(client.subscribe(topic, qos=1), f"subscribing to {topic!r}")
        if any(getattr(code, "value", code) >= 0x80 for code in granted):
            raise BrokerError(f"broker refused the subscription to {topic!r}")

    async def unsubscribe(self, topic: str) -> None:
        client = self.client
        if client is None:
            raise BrokerUnavailable(f"the connection is down; cannot unsubscribe from {topic!r}")
        await self._unless_closed(client.unsubscribe(topic), f"unsubscribing from {topic!r}")

    def _on_message(self, _client: Any, _userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.qos != 1:
            return  # we subscribe at QoS 1: anything else is not ours to settle
        if msg.mid in self._order:
            # A second PUBLISH under an unsettled packet id: a protocol violation. Not delivered
            # twice; the first one's settlement answers both.
            log.warning("MQTT broker reused packet id %d before it was acknowledged; ignored", msg.mid)
            return
        self._order[msg.mid] = False
        if self.on_message is None:
            # A connection with no handler (one that only declares a session) is handed what the
            # session holds when it resumes it: never acknowledged, so that the session keeps it
            # for the consumer that joins next. (Acknowledging it here dropped the results that
            # waited in a reply queue declared again by a resumed batch.)
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
            self.up.clear()
            self.client = None
            self.broker._conn_lost(self)
            self._fail_pending()
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)
            clean = self.session_expiry == 0
            pause = self.broker.reconnect_interval
            if self.disconnect_reason == _SESSION_TAKEN_OVER:
                if self.will is None:
                    # A fixed-name session (a reply queue, dead letters) another consumer took:
                    # reconnecting would take it back and forth forever. This consumer stops.
                    log.error("MQTT session %s was taken over by another consumer; this one stops", self.client_id)
                    return
                # A job session adopted by another worker while we were cut off: it drains what
                # was queued for us. We go on under a new session of our own.
                self.client_id = f"{self.client_id.rsplit('-', 1)[0]}-{uuid.uuid4().hex[:12]}"
                clean = True
                pause = 0.0  # no network failure: the broker is there, and the pool needs us back
            log.warning("MQTT connection %s lost; reconnecting", self.client_id)
            while not self._closing:
                await asyncio.sleep(pause)
                pause = self.broker.reconnect_interval
                try:
                    # The session (and its unacked deliveries) is resumed, not restarted.
                    await self._connect(clean_start=clean)
                    break
                except BrokerError:
                    continue
            if self._closing:
                return
            self.connected_at = asyncio.get_running_loop().time()
            if self.on_reconnected is not None:
                try:
                    await self.on_reconnected()
                except BrokerError as exc:
                    log.warning("MQTT connection %s: recovery step failed: %s", self.client_id, exc)
            self.broker._conn_back(self)

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(BrokerUnavailable("MQTT connection lost before the PUBACK"))

    def settle(self, mid: int, generation: int) -> None:
        """Mark a delivery settled and send every PUBACK that is now due, in arrival order."""
        if generation != self.generation or self.client is None:
            # The mid belongs to a dead connection; the broker resends the message (DUP).
            raise BrokerUnavailable("the connection this delivery arrived on was lost; the broker redelivers it")
        if mid in self._order:
            self._order[mid] = True
        raw = self.client._client  # noqa: SLF001
        while self._order:
            first, done = next(iter(self._order.items()))
            if not done:
                break
            del self._order[first]
            raw.ack(first, 1)

    async def publish(self, topic: str, payload: bytes, props: Properties | None, *, retain: bool = False) -> int:
        """Publish at QoS 1 and return the PUBACK's reason code.

        A connection lost before the PUBACK leaves the outcome unknown: the publish is sent again
        once the supervisor has reconnected (at least once, as MQTT's own DUP resend would),
        all within one ``confirm_timeout``. Every publish enclaveq makes tolerates a duplicate:
        jobs and control requests are replay-checked, replies deduplicated by the producer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.broker.confirm_timeout
        while True:
            try:
                return await self._publish_once(topic, payload, props, retain, deadline)
            except BrokerUnavailable:
                if self._supervisor is None or self._closing or loop.time() >= deadline:
                    raise

    async def _publish_once(self, topic: str, payload: bytes, props: Properties | None, retain: bool,
                            deadline: float) -> int:
        loop = asyncio.get_running_loop()
        client = self.client
        if client is None and self._supervisor is not None and not self._closing:
            # Down, and being re-established: wait for it (bounded), as AMQP's robust channel does.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.up.wait(), max(0.0, deadline - loop.time()))
            client = self.client
        if client is None:
            raise BrokerUnavailable("the MQTT connection is down")
        info = client._client.publish(topic, payload, qos=1, retain=retain, properties=props)  # noqa: SLF001
        if info.rc != paho.MQTT_ERR_SUCCESS:
            if info.rc == paho.MQTT_ERR_NO_CONN:
                # paho saw the connection go before our supervisor did: wait for the reconnect.
                self.up.clear()
                await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
            raise BrokerUnavailable(f"MQTT publish failed: {paho.error_string(info.rc)}")
        future: asyncio.Future[int] = loop.create_future()
        self._pending[info.mid] = future
        try:
            return await asyncio.wait_for(future, max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise PublishTimeout(f"no PUBACK for a publish to {topic!r} within {self.broker.confirm_timeout} s") from None
        finally:
            self._pending.pop(info.mid, None)

    async def close(self, *, end_session: bool = False) -> None:
        self._closing = True
        if self._supervisor is not None:
            await common.cancel_task(self._supervisor)
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

    async def closed(self) -> None:
        """Return once this connection is gone (also for a connection without a supervisor)."""
        client = self.client
        if client is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.shield(client._disconnected)  # noqa: SLF001

    def drop(self) -> None:
        """Shut the socket down as a failing network would (fault tests): the supervisor reconnects."""
        client = self.client
        sock: Any = client._client.socket() if client is not None else None  # noqa: SLF001
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _reason(exc: BaseException, url: str | None = None) -> str:
    """One line for a connection failure: paho's reason text, never a repr of an object; a refused
    TCP connection to ``url`` in the AMQP adapter's words, which name the address to fix."""
    refused = any(isinstance(e, ConnectionRefusedError) for e in (exc, exc.__cause__, exc.__context__))
    if url is not None and (refused or "Connection refused" in str(exc)):
        parts = urlsplit(url)
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        return f"connection refused: no broker listens on {parts.hostname}:{port}"
    rc = getattr(exc, "rc", None)
    text = str(getattr(rc, "getName", lambda: "")() or "") if rc is not None else ""
    return text or str(exc) or type(exc).__name__


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
        self.conn.settle(self.mid, self.generation)

    async def nack(self) -> None:
        self._claim()
        await self.sub.give_back(self._raw, self.delivery_count)
        self.conn.settle(self.mid, self.generation)

    async def reject(self) -> None:
        self._claim()
        await self.sub.dead_letter(self._raw, "rejected")
        self.conn.settle(self.mid, self.generation)


class _MqttSubscription(Subscription):
    """One consumer: its own connection (hence session and Receive Maximum) and handler tasks.

    ``kind`` is ``jobs`` (nack republishes, counted against the pool's limit), ``dead`` or
    ``replies`` (nack republishes, bounded by ``common.*_DELIVERY_LIMIT``), or ``control``
    (broadcast: nack only acks, the message was this consumer's copy)."""

    def __init__(self, broker: MqttBroker, kind: str, topic: str, handler: Handler, *,
                 pool: str | None, limit: int, queue: SharedQueue | None = None) -> None:
        self.broker = broker
        self.kind = kind
        self.topic = topic  # where a nack republishes (a reply topic, an inbox's requeue topic)
        self.queue = queue  # jobs and streams: a shared queue
        self.pool = pool
        self.handler = handler
        self.limit = limit
        self.conn: _Conn | None = None
        self.in_flight: set[_MqttDelivery] = set()
        self.tasks: set[asyncio.Task] = set()
        self._dups: OrderedDict[str, int] = OrderedDict()
        self.active = True
        self.handler_errors: list[BaseException] = []
        self.adopter: _Adopter | None = None

    def on_message(self, conn: _Conn, msg: paho.MQTTMessage) -> None:
        if self.adopter is not None and self.pool is not None and msg.topic.startswith(
                sessions_topic(self.pool, "")):
            # A queue session's record on ``sessions/+``: possibly one left behind to adopt.
            self.adopter.notice(msg.topic, bytes(msg.payload), conn.client_id)
            conn.settle(msg.mid, conn.generation)
            return
        if not self.active:
            return  # not acked: the session redelivers it (or whoever adopts the session does)
        message, attempt = _parse(msg)
        count = attempt
        if msg.dup and message.message_id is not None:
            # A broker redelivery after a reconnect: the attempt property did not move, so
            # count it here (per consumer, bounded: see docs/architecture.md).
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
        if self.queue is not None and delivery.delivery_count > self.limit:
            # Over the limit through broker redeliveries: dead-letter without running it.
            delivery._claim()
            await self.dead_letter(delivery._raw, "delivery_limit")
            delivery.conn.settle(delivery.mid, delivery.generation)
            return
        await common.run_handler(self.handler, delivery, log, self.handler_errors)

    async def give_back(self, message: Message, count: int) -> None:
        """Return a message for another delivery (MQTT has no nack): republish it with its
        attempt number raised, or dead-letter it at the limit."""
        if self.kind == "control":
            return
        if count >= self.limit:
            if self.queue is not None:
                await self.dead_letter(message, "delivery_limit")
            else:  # dead letters, replies and results have nowhere further to go
                log.warning("dropping a %s message after %d deliveries: message_id=%s",
                            self.kind, count, message.message_id)
            return
        topic = self.queue.requeue_topic if self.queue is not None else self.topic
        await self.broker._publish_checked(topic, message, attempt=count + 1, queue=self.queue is not None)

    async def dead_letter(self, message: Message, reason: str) -> None:
        if self.queue is None:
            return
        await self.broker._dead_letter(self.queue, message, reason)

    async def cancel(self) -> None:
        if not self.active:
            return
        self.active = False
        self.broker._subscriptions.discard(self)
        conn = self.conn
        if conn is not None and conn.client is not None and self.kind == "control":
            with contextlib.suppress(Exception):
                await conn.unsubscribe(self.topic)
        # Running handlers give their deliveries back (republish + ack) as they unwind.
        await common.stop_tasks(self.tasks)
        if self.adopter is not None:
            await self.adopter.stop()
        if conn is None:
            return
        if self.queue is not None and self.pool is not None:
            # The session stays in the share group and keeps this worker's share of the jobs
            # (a pool with no worker online holds its jobs this way); it is marked left behind
            # so that a live worker of the pool, or the next one to start, adopts and drains it.
            with contextlib.suppress(BrokerError):
                await conn.publish(sessions_topic(self.pool, conn.client_id), _LEFT, None, retain=True)
            await conn.close()
        else:
            await conn.close(end_session=self.kind == "control")


class _Adopter:
    """Adopts the job sessions of a pool that their workers left behind, one at a time.

    Mosquitto assigns a shared subscription's messages to *sessions*, offline ones included, and
    never hands an offline session's queue to another member. So every job session announces
    itself retained on ``sessions/<client id>`` (``live``) with a will that turns it into
    ``left`` when its connection dies; a worker that stops marks it ``left`` itself. Every job
    consumer of the pool watches ``sessions/+`` and, for each ``left`` session, connects under
    that client id (resuming the session and its unacked deliveries), unsubscribes it from the
    share group, republishes every job it holds to the jobs topic (a DUP-flagged one, in flight
    when its worker died, counts as a delivery) and acks it, until an echo of its own probe shows
    the session empty; then it ends the session. A crash in between duplicates a job, never loses
    one. The notices are attacker-writable: at most ``MAX_PENDING`` wait, one adoption runs at a
    time, and an adoption costs one connection and the messages that session really holds.

    An adoption that fails (our adopter lost the session to another adopter, or the broker went)
    is not forgotten: the record is read again after a randomised, growing pause, and adopted
    again while it still says ``left``. Otherwise a session whose adopter died mid-way would
    keep its jobs for good: its record says ``left`` but is never announced again."""

    MAX_PENDING = 64
    MAX_RETRY_PAUSE = 60.0

    def __init__(self, broker: MqttBroker, sub: _MqttSubscription, queue: SharedQueue) -> None:
        self.broker = broker
        self.sub = sub
        self.queue = queue
        self.pool = queue.pool
        self._pending: OrderedDict[str, None] = OrderedDict()
        self._wake = asyncio.Event()
        self.idle = asyncio.Event()  # nothing pending, no adoption running
        self.idle.set()
        self._stopping = False
        self._attempts: dict[str, int] = {}  # client id -> failed adoptions, for those to retry
        self._rechecks: set[asyncio.Task] = set()
        self._task = asyncio.get_running_loop().create_task(self._loop())
        self.adopted = 0

    def notice(self, topic: str, payload: bytes, own_id: str) -> None:
        client_id = topic.rsplit("/", 1)[-1]
        if payload != _LEFT or client_id == own_id or not client_id.startswith(self.queue.client_prefix):
            self._pending.pop(client_id, None)  # back to live (or cleared): nothing to adopt
            return
        if client_id not in self._pending and len(self._pending) >= self.MAX_PENDING:
            return  # picked up again from the retained record after the next reconnect
        self._pending[client_id] = None
        self.idle.clear()
        self._wake.set()

    async def _loop(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            while self._pending and not self._stopping:
                client_id, _ = self._pending.popitem(last=False)
                try:
                    moved = await self.broker._drain_session(self.queue, client_id, self.sub.limit)
                    self.adopted += 1
                    self._attempts.pop(client_id, None)
                    if moved:
                        log.info("pool %r: adopted a left-behind job session and requeued %d job(s)", self.pool, moved)
                except Exception as exc:  # noqa: BLE001 - whatever went wrong, the adopter lives on
                    # Not only BrokerError: an adopter that died here would leave every later
                    # left-behind session (and the jobs it holds) unadopted for good.
                    log.warning("pool %r: could not adopt a left-behind job session (will look again): %s",
                                self.pool, exc if isinstance(exc, BrokerError) else repr(exc))
                    self._retry_later(client_id)
            self.idle.set()

    def _retry_later(self, client_id: str) -> None:
        if client_id not in self._attempts and len(self._attempts) >= self.MAX_PENDING:
            return  # bounded: picked up again from the retained record after the next reconnect
        attempt = self._attempts.get(client_id, 0) + 1
        self._attempts[client_id] = attempt
        pause = min(self.MAX_RETRY_PAUSE, 2.0 ** attempt) * random.uniform(0.5, 1.0)
        task = asyncio.get_running_loop().create_task(self._recheck(client_id, pause))
        self._rechecks.add(task)
        task.add_done_callback(self._rechecks.discard)

    async def _recheck(self, client_id: str, pause: float) -> None:
        await asyncio.sleep(pause)
        topic = sessions_topic(self.pool, client_id)
        try:
            record = (await self.broker._read_retained(topic)).get(topic)
        except Exception:  # noqa: BLE001 - looked at again later, as a failed adoption is
            self._retry_later(client_id)
            return
        conn = self.sub.conn
        if record == _LEFT and conn is not None:
            self.notice(topic, record, conn.client_id)
        else:
            self._attempts.pop(client_id, None)  # adopted by someone else, or back to live

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        for task in list(self._rechecks):
            await common.cancel_task(task)
        await common.cancel_task(self._task)


class _MqttPoolLock(PoolLock):
    """A claim on ``<lock topic>/<client id>``, retained, cleared by the holder's will.

    Acquiring publishes the claim, then reads every claim on the lock: a contender wins only if
    its own claim is the only one (and marks it held), and otherwise withdraws: ``PoolBusy`` at
    once if another claim is held, a retry after a random pause if it was only contention.
    Mosquitto applies retained publishes one at a time, so of two contenders the later reader
    sees the earlier claim: at most one wins. The claim lives as long as the holder's
    connection: if it drops, the will clears it; after a reconnect the holder claims again and,
    if a rival took the lock meanwhile, knows it has lost it (like AMQP's exclusive queue)."""

    def __init__(self, broker: MqttBroker, pool: str, name: str, conn: _Conn) -> None:
        self.broker = broker
        self.pool = pool
        self.name = name
        self.conn = conn
        self.claim = f"{name}/{conn.client_id}"

    async def take(self) -> bool:
        """Claim the lock; True if ours. Contention without a holder (two claims, neither held)
        makes both withdraw and retry after a random pause, a few times, so that two contenders
        in lockstep do not lose to each other forever."""
        for attempt in range(_LOCK_TRIES):
            await self.conn.publish(self.claim, _CLAIMING, None, retain=True)
            claims = await self.broker._read_retained(f"{self.name}/+")
            if set(claims) == {self.claim}:
                await self.conn.publish(self.claim, _HELD, None, retain=True)
                return True
            with contextlib.suppress(BrokerError):
                await self.conn.publish(self.claim, b"", None, retain=True)
            if any(value == _HELD for topic, value in claims.items() if topic != self.claim):
                return False  # held by someone: busy at once
            await asyncio.sleep(random.uniform(0.02, 0.2) * (attempt + 1))
        return False

    async def retake(self) -> None:
        if self.conn.client_id not in self.claim:  # renamed after a takeover: a new claim topic
            self.claim = f"{self.name}/{self.conn.client_id}"
        if not await self.take():
            self.broker._locks.pop(self.name, None)
            log.error("pool %r: lock lost to another worker while reconnecting", self.pool)

    async def release(self) -> None:
        if self.broker._locks.get(self.name) is self:
            del self.broker._locks[self.name]
        with contextlib.suppress(BrokerError):
            await self.conn.publish(self.claim, b"", None, retain=True)
        await self.conn.close()


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
        endpoint = parse_mqtt_url(url)
        self.host, self.port = endpoint.host, endpoint.port
        self.username, self.password = endpoint.username, endpoint.password
        self.tls_context = endpoint.ssl_context()
        self.client_prefix = f"enclaveq-{uuid.uuid4().hex[:12]}"
        self._publisher: _Conn | None = None
        self._subscriptions: set[_MqttSubscription] = set()
        self._locks: dict[str, _MqttPoolLock] = {}
        self._settings: dict[str, PoolSettings] = {}
        self._down: set[_Conn] = set()

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

    def drop_connections(self) -> None:
        """Cut every connection of this adapter as a network failure would (for fault tests);
        each reconnects by itself and ``on_reconnect`` callbacks run once all are back."""
        for conn in self._connections():
            conn.drop()

    def _connections(self) -> list[_Conn]:
        conns = [self._publisher] if self._publisher is not None else []
        conns += [sub.conn for sub in self._subscriptions if sub.conn is not None]
        conns += [lock.conn for lock in self._locks.values()]
        return conns

    def _live(self) -> _Conn:
        if self._publisher is None:
            raise BrokerUnavailable("MQTT adapter is not connected")
        return self._publisher

    def _conn_lost(self, conn: _Conn) -> None:
        self._down.add(conn)

    def _conn_back(self, conn: _Conn) -> None:
        # One outage cuts every connection at once: the callbacks run once they are all back.
        self._down.discard(conn)
        self._down &= set(self._connections())
        if not self._down:
            self._reconnected()

    async def _publish_checked(self, topic: str, message: Message, *, attempt: int = 1,
                               what: str | None = None, queue: bool = False) -> None:
        conn = self._live()
        props = _properties(message, attempt)
        # The CONNACK's Maximum Packet Size: a bigger PUBLISH would cost us the connection.
        if len(message.body) + _PACKET_OVERHEAD > conn.max_packet:
            raise PublishFailed(
                f"message of {len(message.body)} bytes for {what or repr(topic)} exceeds the broker's "
                f"maximum packet size of {conn.max_packet} bytes")
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.confirm_timeout
        while True:
            code = await conn.publish(topic, message.body, props)
            if code != _NO_MATCHING_SUBSCRIBERS:
                break
            # Mosquitto 2.0 does not restore shared subscriptions from its persistence file: just
            # after a broker restart, a queue's consumers have not subscribed again yet. Within a
            # grace period after our own reconnect, "no subscriber" means "not yet": retry.
            # Outside it, a short retry still covers a shared queue (``queue``) whose last sessions
            # are being adopted while their consumers resubscribe under new sessions (a forged
            # "left"); a broadcast with nobody listening is refused at once.
            if loop.time() - conn.connected_at <= _RESUBSCRIBE_GRACE:
                grace = _RESUBSCRIBE_GRACE
            else:
                grace = _REGROUP_GRACE if queue else 0.0
            if loop.time() - started > grace or loop.time() >= deadline:
                raise Unroutable(f"no subscriber takes {what or repr(topic)}")
            await asyncio.sleep(0.2)
        if code >= 0x80:
            raise PublishFailed(f"broker refused a publish to {what or repr(topic)} (reason 0x{code:02x})")

    async def _session(self, client_id: str, topic: str | None, *, end: bool) -> bool:
        """Create (subscribe, keep) or end a persistent session that holds ``topic``'s messages.
        Returns whether the session was there before."""
        for attempt in range(_SESSION_TRIES):
            conn = _Conn(self, client_id, session_expiry=0 if end else self.session_expiry,
                         subscriptions=[topic] if topic and not end else [], reconnect=False)
            try:
                await conn._connect(clean_start=end)
            except BrokerUnavailable:
                # Two adapters declaring the same pool at once take this fixed-name session from
                # each other (MQTT session takeover); the other one's declaration did the work,
                # and the next try finds the session there.
                await conn.close()
                if attempt == _SESSION_TRIES - 1:
                    raise
                await asyncio.sleep(random.uniform(0.05, 0.3))
                continue
            present = conn.session_present
            await conn.close(end_session=end)
            return present
        raise AssertionError("unreachable")

    async def _read_retained(self, topic: str) -> dict[str, bytes]:
        """The retained messages on ``topic`` (a filter), by topic. Mosquitto sends retained
        messages right after the SUBACK on the same connection, so an echo of our own probe
        publish that arrives after subscribing means nothing retained is still on its way."""
        got: dict[str, bytes] = {}
        probe = f"{common.PREFIX}/_probe/{uuid.uuid4().hex}"
        echoed = asyncio.Event()

        def on_message(conn: _Conn, msg: paho.MQTTMessage) -> None:
            if msg.topic == probe:
                echoed.set()
            elif msg.retain and msg.payload and len(got) < _MAX_RETAINED:
                got[msg.topic] = bytes(msg.payload)
            conn.settle(msg.mid, conn.generation)

        conn = _Conn(self, f"{self.client_prefix}-r{uuid.uuid4().hex[:8]}", subscriptions=[topic, probe],
                     on_message=on_message, reconnect=False)
        await conn._connect(clean_start=True)
        try:
            await conn.publish(probe, b"", None)
            await asyncio.wait_for(echoed.wait(), self.confirm_timeout)
        except TimeoutError:
            raise BrokerUnavailable(f"the broker did not echo a probe within {self.confirm_timeout} s") from None
        finally:
            await conn.close()
        return got

    async def _dead_letter(self, queue: SharedQueue, message: Message, reason: str) -> None:
        headers = dict(message.headers)
        headers.setdefault(common.DEAD_REASON_HEADER, reason)
        headers.setdefault(common.DEAD_QUEUE_HEADER, queue.dead_queue_name)
        await self._publish_checked(dead_topic(queue.pool), replace(message, headers=headers), attempt=1)

    async def _seed(self, queue: SharedQueue) -> None:
        """A first session of ``queue``, left behind from the start: it holds what is published
        before any consumer subscribed, and the first consumer adopts it."""
        seed = f"{queue.client_prefix}seed"
        for topic in queue.share_filters:
            await self._session(seed, topic, end=False)
        await self._live().publish(sessions_topic(queue.pool, seed), _LEFT, None, retain=True)

    async def _end_sessions(self, pool: str, prefix: str) -> None:
        """End every recorded session of ``pool`` whose client id starts with ``prefix``."""
        for topic in await self._read_retained(sessions_filter(pool)):
            client_id = topic.rsplit("/", 1)[-1]
            if client_id.startswith(prefix):
                await self._session(client_id, None, end=True)
                await self._live().publish(topic, b"", None, retain=True)

    async def _drain_session(self, queue: SharedQueue, client_id: str, limit: int) -> int:
        """Adopt a left-behind session of ``queue`` (see ``_Adopter``); returns how many messages it held."""
        received: asyncio.Queue[paho.MQTTMessage] = asyncio.Queue()
        probe = f"{common.PREFIX}/_probe/{uuid.uuid4().hex}"
        conn = _Conn(self, client_id, session_expiry=self.session_expiry,
                     on_message=lambda _c, msg: received.put_nowait(msg), reconnect=False, receive_maximum=64)
        await conn._connect(clean_start=False)
        moved = 0
        complete = False
        try:
            if conn.session_present:
                for share_filter in queue.share_filters:
                    await conn.unsubscribe(share_filter)
                await conn.unsubscribe(sessions_filter(queue.pool))
                await conn.subscribe(probe)
                if await conn.publish(probe, b"", None) >= 0x80:
                    raise BrokerError("the broker refused the adoption probe")
                while True:
                    get = asyncio.ensure_future(received.get())
                    lost = asyncio.ensure_future(conn.closed())
                    done, _ = await asyncio.wait({get, lost}, timeout=self.confirm_timeout,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    lost.cancel()
                    if get not in done:
                        get.cancel()
                        raise BrokerUnavailable("adoption stopped: connection lost or no echo")
                    msg = get.result()
                    if msg.topic == probe:
                        break
                    if queue.owns(msg.topic):
                        message, attempt = _parse(msg)
                        count = attempt + (1 if msg.dup else 0)
                        if count > limit:
                            await self._dead_letter(queue, message, "delivery_limit")
                        else:
                            await self._publish_checked(queue.requeue_topic, message, attempt=count, queue=True)
                        moved += 1
                    conn.settle(msg.mid, conn.generation)
            complete = True
        finally:
            # Only a drained session ends; otherwise it stays, still marked left, for a retry.
            await conn.close(end_session=complete)
        if complete:
            with contextlib.suppress(BrokerError):
                await self._live().publish(sessions_topic(queue.pool, client_id), b"", None, retain=True)
        return moved

    # -- pools --------------------------------------------------------------------------
    async def declare_pool(self, pool: str, settings: PoolSettings = PoolSettings()) -> None:
        common.check_name("pool", pool)
        common.check_settings(settings)
        meta = json.dumps({"delivery_limit": settings.delivery_limit}).encode()
        existing = (await self._read_retained(meta_topic(pool))).get(meta_topic(pool))
        if existing is not None and existing != meta:
            # Attacker-written bytes: compared, never parsed or echoed.
            raise BrokerError(f"pool {pool!r} already exists with different settings")
        if existing is None:
            await self._session(dead_session(pool), dead_topic(pool), end=False)
            await self._seed(jobs_queue(pool))
            await self._live().publish(meta_topic(pool), meta, None, retain=True)
        self._settings[pool] = settings

    async def delete_pool(self, pool: str) -> None:
        for sub in list(self._subscriptions):
            if sub.pool == pool:
                await sub.cancel()
        for lock in list(self._locks.values()):
            if lock.pool == pool:
                await lock.release()
        await self._end_sessions(pool, f"{common.PREFIX}~{pool}~")
        for topic in await self._read_retained(f"{common.PREFIX}/{pool}/#"):
            await self._live().publish(topic, b"", None, retain=True)
        await self._session(dead_session(pool), None, end=True)
        self._settings.pop(pool, None)

    async def acquire_pool_lock(self, pool: str, *, purpose: str = "") -> PoolLock:
        common.check_name("pool", pool)
        name = lock_topic(pool, purpose)
        if name in self._locks:
            raise PoolBusy(f"this adapter already holds pool {pool!r}'s {purpose or 'founder'} lock")
        conn = _Conn(self, f"{self.client_prefix}-lock-{uuid.uuid4().hex[:8]}",
                     will=lambda client_id: aiomqtt.Will(f"{name}/{client_id}", b"", qos=1, retain=True))
        await conn.open()
        lock = _MqttPoolLock(self, pool, name, conn)
        try:
            won = await lock.take()
        except BaseException:
            await conn.close()
            raise
        if not won:
            await conn.close()
            raise PoolBusy(f"pool {pool!r}'s {purpose or 'founder'} lock is held by another worker")
        conn.on_reconnected = lock.retake
        self._locks[name] = lock
        return lock

    # -- jobs ---------------------------------------------------------------------------
    async def publish_job(self, pool: str, message: Message) -> None:
        limit = min(self._settings.get(pool, PoolSettings()).max_message_bytes, _MQTT_MAX_PACKET)
        common.check_size(len(message.body), limit, f"pool {pool!r}")
        common.check_headers(message.headers)
        await self._publish_checked(jobs_topic(pool), message, what=f"pool {pool!r}'s jobs", queue=True)

    async def consume_jobs(self, pool: str, handler: Handler, *, prefetch: int = 16) -> Subscription:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        common.check_name("pool", pool)
        if pool not in self._settings and not await self._read_retained(meta_topic(pool)):
            raise QueueNotFound(f"pool {pool!r} is not declared")
        limit = self._settings.get(pool, PoolSettings()).delivery_limit
        return await self._consume_queue(jobs_queue(pool), "jobs", handler, prefetch=prefetch, limit=limit)

    async def _consume_queue(self, queue: SharedQueue, kind: str, handler: Handler, *, prefetch: int,
                             limit: int) -> Subscription:
        """A consumer of a shared queue: its own persistent session in the share group, announced
        on the pool's session records, adopting the sessions others left behind."""
        pool = queue.pool
        sub = _MqttSubscription(self, kind, queue.requeue_topic, handler, pool=pool, limit=limit, queue=queue)
        client_id = f"{queue.client_prefix}{uuid.uuid4().hex[:12]}"
        conn = _Conn(self, client_id, session_expiry=self.session_expiry, clean_start=True,
                     receive_maximum=prefetch, subscriptions=queue.share_filters, on_message=sub.on_message,
                     will=lambda cid: aiomqtt.Will(sessions_topic(pool, cid), _LEFT, qos=1, retain=True))

        async def announce() -> None:
            # Live first, then watch the others: our own record never reads as left behind.
            await conn.publish(sessions_topic(pool, conn.client_id), _LIVE, None, retain=True)
            await conn.subscribe(sessions_filter(pool))

        conn.on_reconnected = announce
        sub.conn = conn
        sub.adopter = _Adopter(self, sub, queue)
        self._live()
        try:
            await conn.open()
            await announce()
            # Adopt what is already left behind before returning (the queue's seed session, a
            # crashed worker's): what it holds comes first, and a consumer that starts finds the
            # queue's backlog in its own session. Bounded: the rest carries on in the background.
            for topic, record in (await self._read_retained(sessions_filter(pool))).items():
                sub.adopter.notice(topic, record, conn.client_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sub.adopter.idle.wait(), self.confirm_timeout)
        except BaseException:
            await sub.adopter.stop()
            await conn.close(end_session=True)
            raise
        self._subscriptions.add(sub)
        return sub

    # -- event streams -------------------------------------------------------------------
    async def _stream_meta(self, pool: str, stream: str) -> dict[str, Any] | None:
        raw = (await self._read_retained(stream_meta_topic(pool, stream))).get(stream_meta_topic(pool, stream))
        if raw is None:
            return None
        try:
            meta = json.loads(raw)
            # Broker-written: used only if it has exactly the shape we write.
            if (isinstance(meta, dict) and isinstance(meta.get("filter"), str)
                    and isinstance(meta.get("delivery_limit"), int) and 1 <= meta["delivery_limit"] <= 1000):
                common.check_topic("stream", meta["filter"], wildcards=True)
                return meta
        except (ValueError, UnicodeDecodeError):
            pass
        raise BrokerError(f"stream {stream!r} of pool {pool!r} has an unreadable record on the broker")

    async def declare_stream(self, pool: str, stream: str, topic_filter: str,
                             settings: PoolSettings = PoolSettings(), *, exchange: str = common.EVENTS_EXCHANGE) -> None:
        common.check_name("pool", pool)
        common.check_name("stream", stream)
        common.check_topic("stream", topic_filter, wildcards=True)
        common.check_settings(settings)
        if not await self._read_retained(meta_topic(pool)):
            raise QueueNotFound(f"pool {pool!r} is not declared")
        wanted = {"filter": topic_filter, "delivery_limit": settings.delivery_limit}
        existing = await self._stream_meta(pool, stream)
        if existing is not None and existing != wanted:
            raise BrokerError(f"stream {stream!r} of pool {pool!r} already exists with another filter or limit")
        if existing is None:
            await self._seed(SharedQueue(pool, stream, topic_filter))
            await self._live().publish(stream_meta_topic(pool, stream), json.dumps(wanted).encode(), None,
                                       retain=True)

    async def delete_stream(self, pool: str, stream: str) -> None:
        common.check_name("pool", pool)
        common.check_name("stream", stream)
        for sub in list(self._subscriptions):
            if sub.queue is not None and sub.queue.pool == pool and sub.queue.stream == stream:
                await sub.cancel()
        await self._end_sessions(pool, f"{common.PREFIX}~{pool}~s.{stream}~")
        await self._live().publish(stream_meta_topic(pool, stream), b"", None, retain=True)

    async def consume_stream(self, pool: str, stream: str, handler: Handler, *, prefetch: int = 16) -> Subscription:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        common.check_name("pool", pool)
        common.check_name("stream", stream)
        meta = await self._stream_meta(pool, stream)
        if meta is None:
            raise QueueNotFound(f"stream {stream!r} of pool {pool!r} is not declared")
        queue = SharedQueue(pool, stream, meta["filter"])
        return await self._consume_queue(queue, "stream", handler, prefetch=prefetch, limit=meta["delivery_limit"])

    async def publish_event(self, topic: str, message: Message, *, exchange: str = common.EVENTS_EXCHANGE) -> None:
        common.check_topic("event", topic, wildcards=False)
        common.check_size(len(message.body), PoolSettings().max_message_bytes, f"topic {topic!r}")
        common.check_headers(message.headers)
        await self._publish_checked(topic, message, what=f"event topic {topic!r}", queue=True)

    # -- inboxes -------------------------------------------------------------------------
    async def declare_inbox(self, name: str, topic_filter: str, *, exchange: str = common.RESULTS_EXCHANGE) -> None:
        common.check_name("inbox", name)
        common.check_topic("inbox", topic_filter, wildcards=True)
        existing = (await self._read_retained(inbox_meta_topic(name))).get(inbox_meta_topic(name))
        if existing is not None and existing != topic_filter.encode():
            raise BrokerError(f"inbox {name!r} already exists with another filter")
        for topic in (topic_filter, inbox_requeue_topic(name)):
            await self._session(inbox_session(name), topic, end=False)
        if existing is None:
            await self._live().publish(inbox_meta_topic(name), topic_filter.encode(), None, retain=True)

    async def delete_inbox(self, name: str) -> None:
        common.check_name("inbox", name)
        for sub in list(self._subscriptions):
            if sub.kind == "inbox" and sub.topic == inbox_requeue_topic(name):
                await sub.cancel()
        await self._session(inbox_session(name), None, end=True)
        await self._live().publish(inbox_meta_topic(name), b"", None, retain=True)

    async def consume_inbox(self, name: str, handler: Handler, *, prefetch: int = 256) -> Subscription:
        common.check_name("inbox", name)
        sub = _MqttSubscription(self, "inbox", inbox_requeue_topic(name), handler, pool=None,
                                limit=common.REPLY_DELIVERY_LIMIT)
        return await self._start(sub, inbox_session(name), None, session_expiry=self.session_expiry,
                                 receive_maximum=prefetch, missing=f"inbox {name!r} is not declared")

    async def publish_result(self, topic: str, message: Message, *, exchange: str = common.RESULTS_EXCHANGE) -> None:
        common.check_topic("result", topic, wildcards=False)
        common.check_size(len(message.body), _REPLY_SIZE_LIMIT, f"topic {topic!r}")
        common.check_headers(message.headers)
        await self._publish_checked(topic, message, what=f"result topic {topic!r}")

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
    async def declare_reply_queue(self, name: str, *, expires: float | None = None) -> str:
        common.check_name("reply queue", name)
        await self._session(reply_session(name), reply_topic(name), end=False)
        return reply_topic(name)

    async def delete_reply_queue(self, name: str) -> None:
        for sub in list(self._subscriptions):
            if sub.kind == "replies" and sub.topic == reply_topic(name):
                await sub.cancel()
        await self._session(reply_session(name), None, end=True)

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
        return await self._start(sub, reply_session(name), None, session_expiry=self.session_expiry,
                                 receive_maximum=prefetch, missing=f"reply queue {name!r} is not declared")

    # -- dead letters ------------------------------------------------------------------
    async def consume_dead_letters(self, pool: str, handler: Handler) -> Subscription:
        common.check_name("pool", pool)
        sub = _MqttSubscription(self, "dead", dead_topic(pool), handler, pool=pool, limit=common.DEAD_DELIVERY_LIMIT)
        return await self._start(sub, dead_session(pool), None, session_expiry=self.session_expiry,
                                 receive_maximum=16, missing=f"pool {pool!r} is not declared")

    # -- internals ----------------------------------------------------------------------
    async def _start(self, sub: _MqttSubscription, client_id: str, topic: str | None, *,
                     session_expiry: int, receive_maximum: int, missing: str = "") -> Subscription:
        self._live()
        joins_existing = topic is None  # joins a session declare_* created
        conn = _Conn(self, client_id, session_expiry=session_expiry, clean_start=not joins_existing,
                     receive_maximum=receive_maximum, subscriptions=[topic] if topic else [],
                     on_message=sub.on_message)
        sub.conn = conn
        await conn.open()
        if joins_existing and not conn.session_present:
            # Nobody declared it: the session we just created is empty; end it again.
            await conn.close(end_session=True)
            raise QueueNotFound(missing)
        self._subscriptions.add(sub)
        return sub


__all__ = ["MqttBroker"]
