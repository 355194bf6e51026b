"""Publishing until the broker confirms: the one retry loop producers and workers share.

A publish fails in two ways that pass by themselves: the connection is lost (a broker restart,
a cluster node failing over) or the broker refuses the message (a full queue under
``x-overflow reject-publish``, a memory alarm, a quorum queue between leaders). Both are worth
another try after a short wait; anything else (an unroutable message, a message too large) is
not, and is raised at once. Callers must tolerate a duplicate: a message whose confirm was lost
may already be in the queue (workers never run one job id twice; producers take one result
per job).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .errors import BrokerUnavailable, PublishRefused

__all__ = ["RETRY_BACKOFF_SECONDS", "publish_until_confirmed"]

# The first wait after a failed publish; it doubles up to 2 s.
RETRY_BACKOFF_SECONDS = 0.1


async def publish_until_confirmed(publish: Callable[[], Awaitable[None]], *, deadline: float, what: str,
                                  log: logging.Logger, level: int = logging.INFO) -> None:
    """Await ``publish()`` until it returns; after a lost connection or a refusal, wait and call
    it again, unless the next try would pass ``deadline`` (event-loop time): then the last
    failure is raised. ``what`` names the message in the line each retry logs at ``level`` (a
    worker retrying many results through one outage passes DEBUG: the outage is said once)."""
    loop = asyncio.get_running_loop()
    backoff = RETRY_BACKOFF_SECONDS
    while True:
        try:
            await publish()
            return
        except (BrokerUnavailable, PublishRefused) as exc:
            if loop.time() + backoff >= deadline:
                raise
            log.log(level, "publishing %s: %s; publishing it again", what, exc)
        await asyncio.sleep(backoff)
        backoff = min(2 * backoff, 2.0)
