"""A pipeline's events outlive the workers that held them, over RabbitMQ and Mosquitto.

Three worker processes serve one pipeline; 500 events stream in; the first worker is SIGKILLed a
quarter of the way through, the second half way through, and the third -- whichever worker that
happens to be -- must take over what both held: every event id reaches the recipient, opened
and correct. (tests/test_pipeline_worker_faults.py kills one worker; killing two in turn leaves
no choice of rescuer, so a worker that cannot take over a dead peer's events cannot hide.)

Events are sealed and published at the protocol level (tests/pipeline_support.py); the
recipient counts distinct event ids (a redelivered event may be answered twice, never zero times).
"""

from __future__ import annotations

import asyncio
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from producer_sdk import AsyncClient
from protocol.ownership import generate_signing_key
from protocol.results import PipelineResult

from .mosquitto import free_port
from .pipeline_support import ADD_ONE, DOUBLE, Deployment, Inbox, directly, opened
from .processes import WorkerProcess
from .support import wait_until

pytestmark = pytest.mark.slow
EVENTS = 500
# Events wait in a killed worker's session until a survivor adopts it: their sealed deadline must
# outlast that, or the survivor rightly refuses them as expired and the test proves nothing.
EVENT_TTL = 120.0


def events_handled(port: int) -> float:
    """enclaveq_worker_requests_total{kind="event",outcome="ok"} of the worker serving metrics on ``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "enclaveq_worker_requests_total" and s.labels == {"kind": "event", "outcome": "ok"})


class Recipient:
    """The recipient's view of its inbox: every result opened once, by distinct event id."""

    def __init__(self, d: Deployment, inbox: Inbox) -> None:
        self.d, self.inbox = d, inbox
        self.results: dict[str, PipelineResult] = {}
        self._seen = 0

    def distinct(self) -> int:
        for raw in self.inbox.raw[self._seen:]:
            result = opened(self.d, raw)  # raises on anything that does not open: never skipped
            self.results.setdefault(result.event_id, result)
            self._seen += 1
        return len(self.results)


async def test_the_last_of_three_workers_takes_over_the_events_of_two_killed_mid_stream(
        process_broker_url, pool, tee, tmp_path):
    ports = [free_port() for _ in range(3)]
    workers: list[WorkerProcess] = []
    try:
        for n, port in enumerate(ports):
            workers.append(await asyncio.to_thread(
                lambda n=n, port=port: WorkerProcess(
                    process_broker_url, pool, tee.dir, tmp_path / f"w{n}.log", "--state-dir",
                    str(tmp_path / f"w{n}"), "--metrics-port", str(port)).wait_ready()))
        owner = generate_signing_key()
        async with AsyncClient(process_broker_url, pool, tee.policy(), owner_key=owner, timeout=60) as client:
            for model in (ADD_ONE, DOUBLE):
                await client.upload_model(model)
            # The workers run in other processes: the recipient trusts the pool key it attested.
            attested = SimpleNamespace(keyring=SimpleNamespace(public_key=client.statement.pool_public_key,
                                                               epoch=client.statement.epoch))
            d = Deployment(client=client, worker=attested, pool=pool, owner=owner)
            signed, outcome = await d.put(d.spec())
            assert outcome.ok, outcome.error()
            inbox = Inbox()
            recipient = Recipient(d, inbox)
            sub = await d.broker.consume_inbox(d.inbox(signed), inbox)
            try:
                inputs = {f"ev-{i}": np.full((1, 4), i % 50, np.float32) for i in range(EVENTS)}
                publishing = asyncio.ensure_future(asyncio.gather(
                    *(d.publish(signed, event_id, {"x": x}, ttl=EVENT_TTL) for event_id, x in inputs.items())))
                for victim, share in ((0, 0.25), (1, 0.5)):
                    await wait_until(lambda share=share: recipient.distinct() >= EVENTS * share,
                                     f"{share:.0%} of the results arrived", timeout=120)
                    took = await asyncio.to_thread(events_handled, ports[victim])
                    await asyncio.to_thread(workers[victim].kill)
                    assert took > 0, f"worker {victim} took no event before it was killed"
                await publishing
                await wait_until(lambda: recipient.distinct() == EVENTS,
                                 "every event has a result at the recipient", timeout=180)
                for event_id, result in recipient.results.items():
                    np.testing.assert_allclose(result.outputs["z"], directly(inputs[event_id]), rtol=1e-6)
                assert await asyncio.to_thread(events_handled, ports[2]) > 0
                assert [w.proc.returncode for w in workers[:2]] == [-9, -9]
            finally:
                await sub.cancel()
                await d.broker.delete_inbox(d.inbox(signed))
    finally:
        for w in workers:
            w.close()
