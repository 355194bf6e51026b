"""What every adapter must do identically: names, header rules, running a handler.

Keeping these in one place is what makes the adapters agree under the conformance suite:
the destination names, which headers survive a round trip, and the rule that a delivery a
handler raises on (or forgets) goes back to the queue.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable, Mapping

from .base import EVENTS_EXCHANGE, RESULTS_EXCHANGE, Delivery, Handler, HeaderValue, PoolSettings  # noqa: F401
from .errors import BrokerError, PublishFailed

PREFIX = "enclaveq"

# Reply and dead-letter queues need a bound too (PoolSettings says no queue relies on broker
# defaults); a reply nacked this often is poison, and there is nowhere further to send it.
REPLY_DELIVERY_LIMIT = 10
DEAD_DELIVERY_LIMIT = 10
# Dead letters are kept for an operator to look at, not forever: at most this many per pool (the
# oldest dropped first) and at most this long. Abandoned requests (a producer that went away) and
# a flood of malformed messages would otherwise grow the queue without end.
MAX_DEAD_LETTERS = 10_000
DEAD_LETTER_TTL_MS = 7 * 24 * 3600 * 1000

# The broker-added headers a consumer may rely on; RabbitMQ sets these when dead-lettering
# and the memory broker imitates it. Every other ``x-`` header is broker bookkeeping.
DEAD_REASON_HEADER = "x-first-death-reason"
DEAD_QUEUE_HEADER = "x-first-death-queue"
_KEPT_BROKER_HEADERS = frozenset({DEAD_REASON_HEADER, DEAD_QUEUE_HEADER})

# Pool and reply names become AMQP queue names today and MQTT topic levels next, so they
# stay within what both accept without escaping.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"invalid {kind} name {name!r}: use 1-128 characters from A-Z a-z 0-9 _ . - "
            "starting with a letter or digit"
        )
    return name


def check_settings(settings: PoolSettings) -> PoolSettings:
    if settings.delivery_limit < 1:
        raise ValueError("PoolSettings.delivery_limit must be at least 1")
    if settings.max_message_bytes < 1:
        raise ValueError("PoolSettings.max_message_bytes must be positive")
    return settings


def jobs_queue(pool: str) -> str:
    return f"{PREFIX}.{pool}.jobs"


def dead_queue(pool: str) -> str:
    return f"{PREFIX}.{pool}.dead"


def dead_letter_exchange(pool: str) -> str:
    return f"{PREFIX}.{pool}.dlx"


def control_exchange(pool: str) -> str:
    return f"{PREFIX}.{pool}.control"


def lock_queue(pool: str, purpose: str = "") -> str:
    """The founder lock is ``enclaveq.P.lock``; other locks (e.g. rotation) ``enclaveq.P.<purpose>-lock``."""
    if purpose and not re.fullmatch(r"[a-z]{1,32}", purpose):
        raise ValueError(f"invalid lock purpose {purpose!r}")
    return f"{PREFIX}.{pool}.{purpose}-lock" if purpose else f"{PREFIX}.{pool}.lock"


# No "." inside a level: AMQP's topic exchanges separate levels with it, so a "." would change
# what a filter matches once mapped (``amqp_binding_key``).
_TOPIC_LEVEL = re.compile(r"[A-Za-z0-9_:=@-]{1,128}")


def check_topic(kind: str, topic: str, *, wildcards: bool) -> str:
    """A topic (``wildcards=False``) or topic filter in MQTT syntax, restricted to what maps onto
    AMQP binding keys unchanged: levels of ``A-Z a-z 0-9 _ : = @ -``; ``+`` a whole level; ``#``
    only as the last level. At most 16 levels and 255 characters (an AMQP routing key's limit)."""
    levels = topic.split("/") if isinstance(topic, str) and len(topic) <= 255 else []
    ok = 1 <= len(levels) <= 16
    for i, level in enumerate(levels):
        if wildcards and (level == "+" or (level == "#" and i == len(levels) - 1)):
            continue
        if not _TOPIC_LEVEL.fullmatch(level):
            ok = False
    if ok and any(filters_overlap(topic, internal) for internal in _INTERNAL_TOPICS):
        raise ValueError(f"{kind} {topic!r} could match enclaveq's own topics (enclaveq/<pool>/jobs, "
                         "enclaveq/reply/..., ...): choose another")
    if not ok:
        what = "topic filter" if wildcards else "topic (no wildcards)"
        raise ValueError(f"invalid {kind} {what} {topic!r}: levels of A-Z a-z 0-9 _ : = @ - separated by '/'"
                         + (", '+' for one level, '#' last" if wildcards else ""))
    return topic


# The shapes of the topics the MQTT adapter uses itself: no pipeline topic may overlap them.
_INTERNAL_TOPICS = tuple(f"{PREFIX}/{rest}" for rest in (
    "_probe/#", "_inbox/#", "reply/#", "+/jobs", "+/control", "+/dead", "+/meta", "+/sessions/#",
    "+/streams/#", "+/founder-lock/#", "+/rotation-lock/#"))


def filters_overlap(a: str, b: str) -> bool:
    """Whether some topic matches both MQTT filters."""
    x, y = a.split("/"), b.split("/")
    for i in range(max(len(x), len(y))):
        p = x[i] if i < len(x) else None
        q = y[i] if i < len(y) else None
        if p == "#" or q == "#":
            return True
        if p is None or q is None:
            return False
        if p != "+" and q != "+" and p != q:
            return False
    return True


def amqp_binding_key(topic: str) -> str:
    """The AMQP topic-exchange key of an MQTT topic or filter."""
    return ".".join("*" if level == "+" else level for level in topic.split("/"))


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching of a topic against a filter (both checked with ``check_topic``)."""
    f, t = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def stream_queue(pool: str, stream: str) -> str:
    return f"{PREFIX}.{pool}.stream.{stream}"


def inbox_queue(name: str) -> str:
    return f"{PREFIX}.inbox.{name}"




def reply_queue(name: str) -> str:
    return f"{PREFIX}.reply.{name}"


def check_headers(headers: Mapping[str, HeaderValue]) -> None:
    for key, value in headers.items():
        if not isinstance(key, str):
            raise TypeError("header names must be str")
        if not isinstance(value, (str, int, bytes, bool)):
            # Name the key, never the value: headers may carry sensitive metadata.
            raise TypeError(f"header {key!r} has unsupported type {type(value).__name__}")


def clean_headers(raw: Mapping[str, object] | None) -> dict[str, HeaderValue]:
    """Headers as a consumer sees them: the publisher's, plus the dead-letter reason."""
    if not raw:
        return {}
    out: dict[str, HeaderValue] = {}
    for key, value in raw.items():
        if key.startswith("x-") and key not in _KEPT_BROKER_HEADERS:
            continue
        if isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        if isinstance(value, (str, int, bytes, bool)):
            out[key] = value
    return out


def check_size(message_size: int, limit: int, destination: str) -> None:
    if message_size > limit:
        raise PublishFailed(
            f"message of {message_size} bytes for {destination} exceeds the limit of {limit} bytes"
        )


async def run_handler(
    handler: Handler,
    delivery: Delivery,
    log: logging.Logger,
    on_error: list[BaseException] | None = None,
) -> None:
    """Run one handler on one delivery; nack whatever it leaves unsettled.

    The aio-pika ``IncomingMessage.process()`` habit: whatever happens inside the handler,
    the delivery is settled when it is over, so a bug can never strand a message unacked.
    """
    try:
        await handler(delivery)
    except asyncio.CancelledError:
        # The subscription was cancelled or the connection went away: give it back.
        await _give_back(delivery, log)
        raise
    except Exception as exc:
        # Type only: an exception's text may quote whatever the handler was processing.
        log.warning(
            "handler raised %s on message_id=%s; returning it for redelivery",
            type(exc).__name__,
            delivery.message.message_id,
        )
        log.debug("handler traceback", exc_info=True)
        if on_error is not None:
            on_error.append(exc)
        await _give_back(delivery, log)
    else:
        if not delivery.settled:
            log.warning(
                "handler returned without settling message_id=%s; returning it for redelivery",
                delivery.message.message_id,
            )
            await _give_back(delivery, log)


async def _give_back(delivery: Delivery, log: logging.Logger) -> None:
    if delivery.settled:
        return
    try:
        await delivery.nack()
    except BrokerError as exc:
        # Typically the connection is gone, and with it the delivery: the broker requeues it.
        log.debug("could not nack message_id=%s: %s", delivery.message.message_id, exc)


async def cancel_task(task: asyncio.Task) -> None:
    """Cancel ``task`` and return once it has finished, however it ends.

    One ``cancel()`` is not always enough on Python 3.11: ``asyncio.wait_for`` (used inside
    aiomqtt and paho's glue) loses a cancellation that arrives as its inner future completes, and
    the task runs on into its next wait. So the cancellation is repeated until the task is done."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)


async def stop_tasks(tasks: Iterable[asyncio.Task], timeout: float = 5.0) -> None:
    """Cancel running handler tasks (except the caller's own) and wait for them to finish."""
    current = asyncio.current_task()
    pending = [t for t in tasks if t is not current and not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=timeout)
