"""Who and where a worker is: what every part that speaks to the pool needs, in one object."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from broker_adapters import BrokerAdapter

from .config import WorkerConfig
from .identity import WorkerIdentity


@dataclass(frozen=True)
class WorkerContext:
    """The broker, the pool, this worker's id, platform identity and measured configuration,
    and the clocks (injected, so tests pin time): ``clock`` is wall time (deadlines, evidence
    ages), ``monotonic`` paces the budgets of what unauthenticated messages may trigger."""

    broker: BrokerAdapter
    pool: str
    worker_id: str
    identity: WorkerIdentity
    config: WorkerConfig
    clock: Callable[[], float]
    monotonic: Callable[[], float] = time.monotonic

    def now_ms(self) -> int:
        return int(self.clock() * 1000)
