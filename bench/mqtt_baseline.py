"""Plain aiomqtt request/reply over MQTT 5: the baseline ``bench.request_reply`` runs against
enclaveq when ``--broker`` is an ``mqtt://`` URL.

No crypto and no inference; the same delivery settings enclaveq's MQTT adapter uses
(``broker_adapters/mqtt.py``), with aiomqtt 2.5's public API only:

responder (its own process, ``python -m bench.mqtt_baseline --_responder ...``)
    one connection with a persistent session (``clean_start`` False, Session Expiry) and
    Receive Maximum 16 (the worker's prefetch), subscribed at QoS 1 through the shared
    subscription ``$share/<group>/bench/<run>/jobs``, like a worker; a second connection
    publishes the replies, like the adapter's publisher connection. For each request it
    publishes a reply of the size of an enclaveq result at QoS 1 to the request's Response
    Topic with its Correlation Data and awaits it (aiomqtt's ``publish`` returns on the PUBACK).
    At most 16 requests are being answered at once.

client (in the bench's process)
    a publisher connection (clean session) that sends requests of the size of an enclaveq
    request at QoS 1 with ``C`` in flight, awaiting each PUBACK; and a reply connection with a
    persistent session and Receive Maximum 256 (the SDK's reply prefetch) subscribed at QoS 1
    to its own reply topic.

Where the baseline is easier than enclaveq: aiomqtt 2.5 has no manual acknowledgement, so
paho sends the PUBACK of every incoming QoS 1 message as soon as it is read, before the
responder has answered (enclaveq's worker acks a job only after its result's PUBACK). A
responder crash therefore loses the requests it holds, and Receive Maximum does not bound what
Mosquitto pushes to it (the responder bounds its own concurrency to 16 instead). Where it is
harder: aiomqtt's message iterator costs an asyncio task per message, which enclaveq's adapter
avoids by taking paho's ``on_message`` callback directly.

Every name carries the run id; the two persistent sessions are ended at the end
(``end_sessions``: connect with clean start and Session Expiry 0, disconnect).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker_adapters.mqtt_url import MqttEndpoint, parse_mqtt_url

# What a persistent session outlives a disconnect by; the bench ends its sessions itself, this
# only bounds what a killed run leaves behind on the broker.
SESSION_EXPIRY_S = 3600
PUBLISH_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Names:
    """Topics and client ids of one run; unique per run id."""

    run_id: str

    @property
    def jobs_topic(self) -> str:
        return f"bench/{self.run_id}/jobs"

    @property
    def jobs_filter(self) -> str:
        return f"$share/bench-{self.run_id}/{self.jobs_topic}"

    @property
    def reply_topic(self) -> str:
        return f"bench/{self.run_id}/reply"

    @property
    def responder_jobs_id(self) -> str:
        return f"bench-{self.run_id}-responder-jobs"

    @property
    def responder_pub_id(self) -> str:
        return f"bench-{self.run_id}-responder-pub"

    @property
    def client_pub_id(self) -> str:
        return f"bench-{self.run_id}-client-pub"

    @property
    def client_reply_id(self) -> str:
        return f"bench-{self.run_id}-client-reply"

    @property
    def persistent_ids(self) -> tuple[str, ...]:
        return (self.responder_jobs_id, self.client_reply_id)


def _client(endpoint: MqttEndpoint, identifier: str, *, persistent: bool = False,
            receive_maximum: int | None = None, end_session: bool = False) -> aiomqtt.Client:
    """An MQTT 5 connection; ``persistent`` resumes or creates a session that outlives it."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = SESSION_EXPIRY_S if persistent else 0
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
    client = aiomqtt.Client(
        endpoint.host, endpoint.port, username=endpoint.username, password=endpoint.password,
        identifier=identifier, protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=end_session or not persistent, properties=props, tls_context=endpoint.ssl_context(),
        timeout=PUBLISH_TIMEOUT_S,
    )
    # aiomqtt logs a warning for every call made while more than this many are pending; C
    # requests in flight are the point of the bench, not a problem.
    client.pending_calls_threshold = 1_000_000
    return client


def _reply_properties(correlation: bytes) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = correlation
    return props


# -- the responder process --------------------------------------------------------------------
async def responder_main(url: str, run_id: str, prefetch: int, reply_bytes: int) -> None:
    """Consume requests through the shared subscription, answer each at QoS 1, say "ready",
    serve until SIGTERM or SIGINT. The persistent session is left for ``end_sessions``."""
    endpoint = parse_mqtt_url(url)
    names = Names(run_id)
    reply_body = os.urandom(reply_bytes)
    slots = asyncio.Semaphore(prefetch)
    tasks: set[asyncio.Task[None]] = set()
    failures = 0

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async with _client(endpoint, names.responder_pub_id) as publisher, \
            _client(endpoint, names.responder_jobs_id, persistent=True, receive_maximum=prefetch) as jobs:

        async def answer(message: aiomqtt.Message) -> None:
            nonlocal failures
            try:
                props = message.properties
                topic = getattr(props, "ResponseTopic", None)
                correlation = getattr(props, "CorrelationData", None)
                if not isinstance(topic, str) or not isinstance(correlation, bytes):
                    raise ValueError("request without a response topic or correlation data")
                await publisher.publish(topic, reply_body, qos=1, properties=_reply_properties(correlation))
            except Exception as exc:  # the client counts the missing reply as an error
                failures += 1
                if failures <= 3:
                    print(f"responder: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            finally:
                slots.release()

        async def serve() -> None:
            async for message in jobs.messages:
                await slots.acquire()
                task = loop.create_task(answer(message))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        await jobs.subscribe(names.jobs_filter, qos=1)
        server = loop.create_task(serve())
        print("ready", flush=True)
        await asyncio.wait([server, loop.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        server.cancel()
        for task in list(tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await asyncio.gather(server, *tasks, return_exceptions=True)
    if failures:
        print(f"responder: {failures} requests not answered", file=sys.stderr, flush=True)


# -- the client ---------------------------------------------------------------------------------
class BaselineClient:
    """Sends requests to the jobs topic and matches replies by correlation data."""

    def __init__(self, url: str, run_id: str, request_bytes: int, reply_prefetch: int) -> None:
        self.endpoint = parse_mqtt_url(url)
        self.names = Names(run_id)
        self.reply_prefetch = reply_prefetch
        self._body = os.urandom(request_bytes)
        self._pending: dict[bytes, asyncio.Future[None]] = {}
        self._stack = contextlib.AsyncExitStack()
        self._publisher: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        self._publisher = await self._stack.enter_async_context(_client(self.endpoint, self.names.client_pub_id))
        replies = await self._stack.enter_async_context(
            _client(self.endpoint, self.names.client_reply_id, persistent=True, receive_maximum=self.reply_prefetch))
        await replies.subscribe(self.names.reply_topic, qos=1)
        self._reader = asyncio.get_running_loop().create_task(self._read(replies.messages))

    async def _read(self, messages: AsyncIterator[aiomqtt.Message]) -> None:
        async for message in messages:
            correlation = getattr(message.properties, "CorrelationData", None)
            future = self._pending.get(correlation) if isinstance(correlation, bytes) else None
            if future is not None and not future.done():
                future.set_result(None)

    async def batch(self, n: int, concurrency: int) -> tuple[float, list[float], int]:
        """``n`` requests, ``concurrency`` in flight: (seconds, latencies in ms, errors)."""
        publisher = self._publisher
        assert publisher is not None, "connect() first"
        loop = asyncio.get_running_loop()
        latencies: list[float] = []
        remaining = n
        errors = 0

        async def lane() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                cid = uuid.uuid4().hex
                correlation = cid.encode()
                future: asyncio.Future[None] = loop.create_future()
                self._pending[correlation] = future
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic = self.names.reply_topic
                props.CorrelationData = correlation
                # The AMQP baseline sets message_id, enclaveq's adapter a user property.
                props.UserProperty = [("id", cid)]
                t0 = time.perf_counter()
                try:
                    await publisher.publish(self.names.jobs_topic, self._body, qos=1, properties=props)
                    await asyncio.wait_for(future, PUBLISH_TIMEOUT_S)
                    latencies.append(1000 * (time.perf_counter() - t0))
                except Exception:
                    errors += 1
                finally:
                    self._pending.pop(correlation, None)

        started = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies, errors

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        with contextlib.suppress(aiomqtt.MqttError):
            await self._stack.aclose()


async def end_sessions(url: str, run_id: str) -> None:
    """End the run's persistent sessions: connect under each client id with clean start and
    Session Expiry 0, then disconnect (which ends the fresh session, and its subscriptions,
    with the connection)."""
    endpoint = parse_mqtt_url(url)
    for identifier in Names(run_id).persistent_ids:
        async with _client(endpoint, identifier, end_session=True):
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mqtt_baseline",
                                     description="the plain aiomqtt responder of bench.request_reply (internal)")
    parser.add_argument("--_responder", action="store_true", required=True)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--_run-id", dest="run_id", required=True)
    parser.add_argument("--_prefetch", dest="prefetch", type=int, default=16)
    parser.add_argument("--_reply-bytes", dest="reply_bytes", type=int, default=256)
    args = parser.parse_args(argv)
    asyncio.run(responder_main(args.broker, args.run_id, args.prefetch, args.reply_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
