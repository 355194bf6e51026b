"""What unauthenticated messages may make a worker do: rate budgets and bounded memories.

Anyone who can publish to the broker can send a worker challenges, join requests and epoch
announcements. Each costs the worker real work -- TEE evidence, a verification of someone's
evidence, a round of join requests to every member -- so each kind of work that such a message
can trigger draws on a :class:`TokenBucket`: at most ``burst`` at once and ``rate`` per second
sustained, whatever arrives. What the worker remembers about such messages (nonces it answered,
announcements it checked) lives in a :class:`BoundedMemory`, which forgets the oldest entry
first, so no flood grows the worker's memory.

Clocks are injected (monotonic seconds), so tests move time by hand.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

Clock = Callable[[], float]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class OverBudget(Exception):
    """A budget is spent: the message that asked for the work is refused (cheaply) or dropped."""


class TokenBucket:
    """At most ``burst`` takes at once, refilled at ``rate`` per second.

    A clock that goes backwards refills nothing (it never adds tokens, nor takes any away)."""

    def __init__(self, *, rate: float, burst: int, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def _refill(self) -> None:
        now = self.clock()
        elapsed = now - self._last
        self._last = now
        if elapsed > 0:
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)

    def available(self) -> bool:
        """Whether :meth:`try_take` would succeed now (takes nothing)."""
        self._refill()
        return self._tokens >= 1.0

    def try_take(self) -> bool:
        """Take one token if there is one."""
        self._refill()
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def take(self, what: str) -> None:
        """Take one token or raise :class:`OverBudget` naming ``what`` was refused."""
        if not self.try_take():
            raise OverBudget(f"{what}: more than {self.burst} at once or {self.rate:g} per second")


class BoundedMemory(Generic[K, V]):
    """A dict of at most ``size`` entries; adding one more forgets the oldest."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a bounded memory holds at least one entry")
        self.size = size
        self._entries: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: K) -> V | None:
        return self._entries.get(key)

    def put(self, key: K, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class QuietLog:
    """Log lines that anyone can cause by sending messages (a dead-lettered request, a job claiming
    a future epoch, a replay) within a budget, so a flood cannot fill the worker's disk with
    logs; what was left out is counted and said in the next line that is written."""

    def __init__(self, logger: logging.Logger, *, rate: float = 2.0, burst: int = 20,
                 clock: Clock = time.monotonic) -> None:
        self._log = logger
        self._budget = TokenBucket(rate=rate, burst=burst, clock=clock)
        self.suppressed = 0  # since the last line written
        self.suppressed_total = 0

    def reset(self) -> None:
        """Start with a full budget (each test starts as a fresh worker process would)."""
        self._budget = TokenBucket(rate=self._budget.rate, burst=self._budget.burst, clock=self._budget.clock)
        self.suppressed = 0

    def log(self, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        if not self._log.isEnabledFor(level):
            return
        if not self._budget.try_take():
            self.suppressed += 1
            self.suppressed_total += 1
            return
        if self.suppressed:
            msg += " (and %d similar lines left out)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        self._log.log(level, msg, *args, exc_info=exc_info)

    def exception(self, msg: str, *args: object) -> None:
        """An ERROR with the traceback being handled, within the budget (a model that fails on
        every job must not write a traceback per job)."""
        self.log(logging.ERROR, msg, *args, exc_info=True)

    def warning(self, msg: str, *args: object) -> None:
        self.log(logging.WARNING, msg, *args)

    def info(self, msg: str, *args: object) -> None:
        self.log(logging.INFO, msg, *args)

    def debug(self, msg: str, *args: object) -> None:
        self.log(logging.DEBUG, msg, *args)


# The worker's lines that anyone can cause by publishing a message (a dead-lettered request, an
# announcement or a join request that does not verify...): one budget for all of them.
noisy = QuietLog(logging.getLogger("enclaveq.worker"))
