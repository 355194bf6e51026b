"""Publishers: sealed events to a pipeline, fire and forget (issue 11, docs/pipelines.md).

    async with AsyncEventPublisher(broker_url, "my-pool", "policy.toml", pipeline=pipeline_id) as publisher:
        event_id = await publisher.publish("Hello, my dog is cute")     # the single text input
        event_id = await publisher.publish({"frame": array})            # named inputs
        event_ids = await publisher.publish_many(events)                # bounded in flight
    publisher.errors    # typed errors the workers sent back for events that failed

A publisher is an :class:`AsyncClient` underneath (composition: the same attestation, session,
remembered epochs and re-attestation after a key rotation). On entering it attests the pool
once, then asks the pool for its pipelines to learn the pipeline's source topic filter: events
go to a concrete topic matching it (the filter itself when it has no wildcard, else the
``topic`` the caller names), and the broker routes them to the pipeline's stream.

``publish`` returns once the broker confirmed the event (MQTT QoS 1, RabbitMQ publisher
confirms). Nothing comes back on success: the result goes to the pipeline's recipients, never
to the publisher. A failure (an input of the wrong shape, a producer the pipeline does not
allow, ...) comes back sealed on the publisher's reply queue and is kept in ``errors`` (the
newest ``max_errors``), each with the ``event_id`` it belongs to; a stale-epoch notice (the
pool rotated its key and the grace period ended before a worker took the event) makes the
publisher re-attest and send the event again with the same event id, so recipients still get
one result. A connection lost mid-publish is retried within ``timeout``: a worker runs one
sealed copy at most once, and recipients drop a second result of one event id.

``ttl`` is the deadline sealed into each event: a worker that takes it later (workers were down,
the stream was long) refuses it as expired, and says so in ``errors`` if the publisher is still
there. ``EventPublisher`` is the synchronous twin.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from attestation.claims import Claims
from attestation.policy import Policy
from protocol import bodies, crypto
from protocol.errors import ProtocolError
from protocol.pipeline import PipelineError, check_event_topic
from protocol.results import check_event_id
from protocol.tensors import misfit

from .async_client import AsyncClient, CollateralLike, KeyLike
from .client import BackgroundLoop
from .core import Request
from .epochs import EpochState
from .errors import BadInput, ClientClosed, EventTopicError, JobError, UnknownPipeline

log = logging.getLogger("enclaveq.producer")

__all__ = ["AsyncEventPublisher", "EventInputs", "EventPublisher", "topic_matches"]

# What one event is: named inputs (arrays, or anything numpy takes), or -- for pipelines with a
# single string (or uint8) event input -- a str (or bytes: a file's raw bytes).
EventInputs = Mapping[str, Any] | str | bytes

# The names a str / bytes event goes to when the pool does not say which event inputs the
# pipeline takes: those of the shipped examples (`pipeline init --example text-embedding`,
# `--example document`).
DEFAULT_TEXT_INPUT = "text"
DEFAULT_BYTES_INPUT = "content"
DEFAULT_TTL_SECONDS = 3600.0


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Does ``topic`` (no wildcards) match ``topic_filter`` (MQTT syntax: ``+`` one level,
    ``#`` the rest, including nothing: ``a/#`` matches ``a``)?"""
    levels, wanted = topic.split("/"), topic_filter.split("/")
    for i, pattern in enumerate(wanted):
        if pattern == "#":
            return True
        if i >= len(levels) or (pattern != "+" and pattern != levels[i]):
            return False
    return len(levels) == len(wanted)


def _has_wildcard(topic: str) -> bool:
    return any(level in ("+", "#") for level in topic.split("/"))


class AsyncEventPublisher:
    """Publish sealed events to one pipeline of an attested pool (``EventPublisher``: the sync twin).

    ``pipeline`` is the pipeline id (``create_pipeline``, ``enclaveq pipeline create``).
    ``topic``: the concrete topic to publish on, needed when the pipeline's source filter has
    wildcards (``sensors/+/frames``: say ``sensors/cam-7/frames``), and checked against it.
    ``producer_key`` proves who publishes (pipelines may allow only listed producer keys).
    ``timeout`` bounds each publish (the broker's confirm), ``ttl`` how long workers still take
    an event (its sealed deadline), ``max_in_flight`` how many events ``publish_many`` keeps
    unconfirmed, ``max_errors`` how many failures ``errors`` keeps (the newest). The other
    arguments are :class:`AsyncClient`'s.
    """

    def __init__(self, broker_url: str, pool: str, policy: Policy | str | os.PathLike[str], pipeline: str, *,
                 topic: str | None = None, producer_key: KeyLike | None = None, timeout: float = 30.0,
                 ttl: float = DEFAULT_TTL_SECONDS, max_in_flight: int = 256, max_errors: int = 1000,
                 attest_timeout: float = 10.0, name: str | None = None, trust: Any = None,
                 collateral: CollateralLike | None = None, epoch_state: EpochState = None,
                 clock: Callable[[], float] = time.time, rng: crypto.Random = os.urandom) -> None:
        if max_in_flight < 1 or max_errors < 1:
            raise ValueError("max_in_flight and max_errors must be at least 1")
        self.pipeline = pipeline
        self.requested_topic = topic
        self.timeout = timeout
        self.ttl = ttl
        self.max_in_flight = max_in_flight
        self._client = AsyncClient(broker_url, pool, policy, name=name, timeout=timeout,
                                   attest_timeout=attest_timeout, max_in_flight=max_in_flight, clock=clock, rng=rng,
                                   trust=trust, collateral=collateral, producer_key=producer_key,
                                   epoch_state=epoch_state)
        self._errors: deque[JobError] = deque(maxlen=max_errors)
        self.info: bodies.PipelineInfo | None = None
        self.topic: str | None = None  # where events go, once connected
        self.published = 0

    async def __aenter__(self) -> AsyncEventPublisher:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def client(self) -> AsyncClient:
        """The attested client underneath (its claims, statement, pipelines)."""
        return self._client

    @property
    def claims(self) -> Claims | None:
        return self._client.claims

    @property
    def errors(self) -> list[JobError]:
        """Typed errors workers sent back for failed events (``event_id`` on each), oldest first;
        at most ``max_errors``, the newest kept."""
        return list(self._errors)

    async def connect(self) -> Claims:
        """Attest the pool, find the pipeline and the topic its events go to."""
        claims = await self._client.connect()
        try:
            pipelines = await self._client.list_pipelines()
            info = next((p for p in pipelines if p.pipeline_id == self.pipeline), None)
            if info is None:
                raise UnknownPipeline(f"pool {self._client.pool!r} has no pipeline {self.pipeline[:80]!r}")
            self.info = info
            self.topic = _event_topic(info.source, self.requested_topic)
        except BaseException:
            await self._client.close()
            raise
        return claims

    async def close(self) -> None:
        """Stop listening for failures and close the connection. Events already confirmed are the
        broker's; failures that arrive after this are not seen."""
        await self._client.close()

    def _connected(self) -> tuple[bodies.PipelineInfo, str]:
        if self.info is None or self.topic is None:
            raise ClientClosed("the publisher is not connected")
        return self.info, self.topic

    def check(self, inputs: EventInputs) -> None:
        """Raise :class:`BadInput`, as :meth:`publish` would before sending anything, if the
        pipeline cannot take ``inputs``: an input it does not take or one it misses, a dtype or a
        fixed dimension other than what the pool listed for it. Sends nothing: a caller with many
        events checks them all before publishing any."""
        info, _ = self._connected()
        _check_event(_event_arrays(inputs, info), info)

    async def publish(self, inputs: EventInputs, *, event_id: str | None = None) -> str:
        """Seal one event to the attested pool and publish it; returns its event id once the
        broker confirmed it. ``event_id`` (1-64 of ``A-Z a-z 0-9 _ . -``, not starting with
        ".") names the result; recipients drop a second result of the same id. Default: a
        fresh random one."""
        info, topic = self._connected()
        arrays = _event_arrays(inputs, info)
        _check_event(arrays, info)
        event_id = uuid.uuid4().hex if event_id is None else event_id
        try:
            check_event_id(event_id)
        except ProtocolError as exc:
            raise BadInput(str(exc), event_id=None) from None
        core = self._client._core_or_raise()
        ttl = self.ttl

        def make() -> Request:
            return core.event(self.pipeline, event_id, arrays, topic=topic, timeout=ttl,
                              exchange=info.source_exchange)
        try:
            make_first = make()  # sealing errors (dtypes numpy or the wire cannot carry) raise here
        except (ProtocolError, TypeError, ValueError) as exc:
            raise BadInput(f"event {event_id}: {exc}", event_id=event_id) from None
        first: list[Request] = [make_first]

        def make_once() -> Request:
            # The first copy is already sealed; a resend after a rotation seals again.
            return first.pop() if first else make()
        await self._client._fire(make_once, event_id=event_id, timeout=self.timeout, on_error=self._failed)
        self.published += 1
        return event_id

    async def publish_many(self, events: Iterable[EventInputs], *, max_in_flight: int | None = None,
                           progress: Callable[[int], None] | None = None,
                           published: Callable[[int, str], None] | None = None) -> list[str]:
        """Publish every event of ``events`` (read lazily), at most ``max_in_flight`` unconfirmed
        at a time; returns their event ids in order.

        ``published(index, event_id)`` is called as soon as the broker confirmed an event
        (``index``: its position in ``events``), then ``progress(n)`` with the number confirmed
        so far. The first publish that fails stops reading ``events``; once the publishes still
        in flight settled (each confirmed or failed), that first failure is raised as
        :meth:`publish` raised it. The events reported to ``published`` (and only those) were
        then published: the rest were not, except that a publish which failed because the
        connection went away may have reached the broker without its confirm coming back.
        ``published`` is how a caller learns, on a failure, which events to send again."""
        confirmed = 0
        window = asyncio.Semaphore(max_in_flight or self.max_in_flight)
        ids: list[str | None] = []
        tasks: set[asyncio.Task[None]] = set()
        failure: list[Exception] = []

        async def one(index: int, event: EventInputs) -> None:
            nonlocal confirmed
            try:
                event_id = await self.publish(event)
                ids[index] = event_id
                confirmed += 1
                if published is not None:
                    published(index, event_id)
                if progress is not None:
                    progress(confirmed)
            except Exception as exc:  # raised by publish_many once the publishes in flight settled
                failure.append(exc)
            finally:
                window.release()

        try:
            for index, event in enumerate(events):
                await window.acquire()
                if failure:
                    window.release()
                    break
                ids.append(None)
                task = asyncio.create_task(one(index, event))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(set(tasks))
        finally:
            for task in list(tasks):
                task.cancel()
        if failure:
            raise failure[0]
        return [i for i in ids if i is not None]

    def _failed(self, error: JobError) -> None:
        log.info("event %s failed at the pool: %s", error.event_id, error.code)
        self._errors.append(error)


def _event_topic(source: str, requested: str | None) -> str:
    if requested is None:
        if _has_wildcard(source):
            raise EventTopicError(f"the pipeline's source topic filter {source!r} has wildcards: name the topic to "
                                  f"publish on (topic=..., --topic)")
        return source
    if _has_wildcard(requested):
        raise EventTopicError(f"topic {requested!r}: events are published on one topic, without + or #")
    try:
        check_event_topic(requested)
    except PipelineError as exc:
        raise EventTopicError(f"topic {requested!r}: {exc}") from None
    if not topic_matches(source, requested):
        raise EventTopicError(f"topic {requested!r} does not match the pipeline's source filter {source!r}")
    return requested


def _event_inputs(info: bodies.PipelineInfo) -> list[tuple[str, str]]:
    """(name, wire dtype) of the pipeline's event inputs, if the pool says (newer pools do)."""
    listed = getattr(info, "event_inputs", None) or ()
    return [(str(item[0]), str(item[1])) for item in listed
            if isinstance(item, (tuple, list)) and len(item) >= 2]


def _single_input(info: bodies.PipelineInfo, dtype: str, default: str) -> str:
    inputs = _event_inputs(info)
    if not inputs:
        return default
    typed = [name for name, wire in inputs if wire == dtype]
    if len(typed) == 1:
        return typed[0]
    if len(inputs) == 1:
        return inputs[0][0]
    raise BadInput(f"pipeline {info.pipeline_id} takes the event inputs {[n for n, _ in inputs]}: "
                   f"pass them by name")


def _describe(name: str, wire: str, shape: tuple[int | None, ...] | None) -> str:
    dims = "" if shape is None else " [" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
    return f"{name}: {wire}{dims}"


def _check_event(arrays: Mapping[str, Any], info: bodies.PipelineInfo) -> None:
    """Refuse, before anything is sealed or sent, an event the pipeline cannot run: an input it
    does not take or one it misses, a dtype or a fixed dimension other than its first stage's
    model expects (what the pool listed when the pipeline was installed; older pools list
    nothing, and then the pool alone checks). A publish is fire-and-forget: the pool's typed error
    for such an event would reach only a publisher still listening when it came back."""
    listed = [item for item in getattr(info, "event_inputs", None) or ()
              if isinstance(item, (tuple, list)) and len(item) == 3]
    if not listed:
        return
    expected = {str(name): (str(wire), shape) for name, wire, shape in listed}
    why = misfit(expected, arrays, subject="the pipeline")
    if why is not None:
        takes = ", ".join(_describe(str(name), str(wire), shape) for name, wire, shape in listed)
        raise BadInput(f"event: {why} (pipeline {info.pipeline_id[:12]} takes {takes})", event_id=None)


def _event_arrays(inputs: EventInputs, info: bodies.PipelineInfo) -> dict[str, Any]:
    if isinstance(inputs, str):
        # A text event: one string, as onnxruntime-extensions' tokenizers take it.
        return {_single_input(info, "string", DEFAULT_TEXT_INPUT): np.array([inputs], dtype=object)}
    if isinstance(inputs, (bytes, bytearray, memoryview)):
        return {_single_input(info, "uint8", DEFAULT_BYTES_INPUT): np.frombuffer(bytes(inputs), dtype=np.uint8).copy()}
    if not isinstance(inputs, Mapping) or not inputs:
        raise BadInput("an event is a mapping of input names to arrays, a str (the text input) or bytes")
    return dict(inputs)


class EventPublisher:
    """The synchronous twin of :class:`AsyncEventPublisher`: connects on construction, same
    arguments, same methods; use it as a context manager (``with EventPublisher(...) as p``)."""

    def __init__(self, broker_url: str, pool: str, policy: Policy | str | os.PathLike[str], pipeline: str, *,
                 topic: str | None = None, producer_key: KeyLike | None = None, timeout: float = 30.0,
                 ttl: float = DEFAULT_TTL_SECONDS, max_in_flight: int = 256, max_errors: int = 1000,
                 attest_timeout: float = 10.0, name: str | None = None, trust: Any = None,
                 collateral: CollateralLike | None = None, epoch_state: EpochState = None,
                 clock: Callable[[], float] = time.time, rng: crypto.Random = os.urandom) -> None:
        self._loop = BackgroundLoop("enclaveq-publisher")
        self._async = AsyncEventPublisher(
            broker_url, pool, policy, pipeline, topic=topic, producer_key=producer_key, timeout=timeout, ttl=ttl,
            max_in_flight=max_in_flight, max_errors=max_errors, attest_timeout=attest_timeout, name=name,
            trust=trust, collateral=collateral, epoch_state=epoch_state, clock=clock, rng=rng)
        try:
            self._loop.call(self._async.connect())
        except BaseException:
            self._loop.stop()
            raise

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pipeline(self) -> str:
        return self._async.pipeline

    @property
    def topic(self) -> str | None:
        return self._async.topic

    @property
    def info(self) -> bodies.PipelineInfo | None:
        return self._async.info

    @property
    def claims(self) -> Claims | None:
        return self._async.claims

    @property
    def errors(self) -> list[JobError]:
        return self._async.errors

    @property
    def published(self) -> int:
        return self._async.published

    def check(self, inputs: EventInputs) -> None:
        """As :meth:`AsyncEventPublisher.check`."""
        self._async.check(inputs)

    def publish(self, inputs: EventInputs, *, event_id: str | None = None) -> str:
        return self._loop.call(self._async.publish(inputs, event_id=event_id))

    def publish_many(self, events: Iterable[EventInputs], *, max_in_flight: int | None = None,
                     progress: Callable[[int], None] | None = None,
                     published: Callable[[int, str], None] | None = None) -> list[str]:
        """As :meth:`AsyncEventPublisher.publish_many`: on a failure, the events reported to
        ``published(index, event_id)`` (and only those) were published. The iterable is read,
        and ``progress`` and ``published`` called, on the publisher's loop thread."""
        return self._loop.call(self._async.publish_many(events, max_in_flight=max_in_flight, progress=progress,
                                                        published=published))

    def close(self) -> None:
        if self._loop.closed:
            return
        try:
            self._loop.call(self._async.close())
        finally:
            self._loop.stop()

