"""Temporary reply queues for worker-to-worker exchanges (joining, catching up, model sync).

Anyone on the broker can publish to an inbox it has seen named in a request, so what an inbox
holds is bounded: beyond :data:`MAX_WAITING` unread messages, more are acknowledged and dropped
(a genuine answer lost that way is asked for again by the next join round or sync).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

from broker_adapters import BrokerAdapter, Delivery

# Unread messages an inbox keeps: a join round takes the first answer that verifies, a model sync
# processes each message as it comes, so honest traffic never comes near this.
MAX_WAITING = 256


@contextlib.asynccontextmanager
async def open_inbox(broker: BrokerAdapter, purpose: str) -> AsyncIterator[tuple[str, asyncio.Queue[bytes]]]:
    """A reply queue that lives for one exchange: (its address, a queue of the bodies received).
    Deleted on exit, so a member's late answer has nowhere to go."""
    name = f"{purpose}-{uuid.uuid4().hex[:16]}"
    address = await broker.declare_reply_queue(name)
    answers: asyncio.Queue[bytes] = asyncio.Queue(MAX_WAITING)

    async def collect(delivery: Delivery) -> None:
        if not answers.full():
            answers.put_nowait(delivery.message.body)
        await delivery.ack()

    sub = await broker.consume_replies(name, collect)
    try:
        yield address, answers
    finally:
        await sub.cancel()
        await broker.delete_reply_queue(name)
