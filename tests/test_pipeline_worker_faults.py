"""Pipelines survive worker faults: a worker process killed mid-stream loses no event the broker
accepted, and the workers of a pool share a pipeline's events -- over RabbitMQ and Mosquitto.

Events are sealed and published at the protocol level (tests/pipeline_support.py); the recipient
counts distinct event ids (a redelivered event may be answered twice; never zero times).
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

from .mosquitto import free_port
from .pipeline_support import ADD_ONE, DOUBLE, Deployment, Inbox, directly, opened
from .processes import WorkerProcess
from .support import wait_until

pytestmark = pytest.mark.slow
EVENTS = 300


def events_done(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "enclaveq_worker_requests_total" and s.labels == {"kind": "event", "outcome": "ok"})


def start(url: str, pool: str, tee, tmp_path, name: str, *extra: str) -> WorkerProcess:
    return WorkerProcess(url, pool, tee.dir, tmp_path / f"{name}.log", "--state-dir", str(tmp_path / name),
                         *extra).wait_ready()


async def stream_with_a_kill(url, pool, tee, tmp_path, workers: list[WorkerProcess], kill: int, *,
                             restart: bool) -> tuple[Inbox, Deployment]:
    owner = generate_signing_key()
    async with AsyncClient(url, pool, tee.policy(), owner_key=owner, timeout=60) as client:
        for model in (ADD_ONE, DOUBLE):
            await client.upload_model(model)
        statement = client.statement
        # The recipient trusts the pool key it attested (the workers run in other processes).
        pool_view = SimpleNamespace(keyring=SimpleNamespace(public_key=statement.pool_public_key,
                                                            epoch=statement.epoch))
        d = Deployment(client=client, worker=pool_view, pool=pool, owner=owner)
        signed, outcome = await d.put_after_uploads(d.spec())
        assert outcome.ok, outcome.error()
        inbox = Inbox()
        sub = await d.broker.consume_inbox(d.inbox(signed), inbox)
        try:
            inputs = {i: np.full((1, 4), i % 50, np.float32) for i in range(EVENTS)}
            publishing = asyncio.ensure_future(asyncio.gather(
                *(d.publish(signed, f"ev-{i}", {"x": x}) for i, x in inputs.items())))
            await wait_until(lambda: len(inbox.raw) >= EVENTS // 3, "a third of the results arrived", timeout=120)
            victim = workers[kill]
            await asyncio.to_thread(victim.kill)
            if restart:
                workers.append(await asyncio.to_thread(start, url, pool, tee, tmp_path, "w1"))
            await publishing
            ids = lambda: {opened(d, raw).event_id for raw in inbox.raw}  # noqa: E731
            try:
                await wait_until(lambda: len(ids()) == EVENTS, "every event has a result", timeout=180)
            except AssertionError as exc:  # say what the workers were doing
                logs = "\n".join(f"--- {w.log_path.name}:\n{w.log()[-4000:]}" for w in workers)
                missing = sorted(set(range(EVENTS)) - {int(i.removeprefix("ev-")) for i in ids()})[:20]
                raise AssertionError(f"{exc}; missing events {missing}\n{logs}") from None
            for raw in inbox.raw:
                result = opened(d, raw)
                i = int(result.event_id.removeprefix("ev-"))
                np.testing.assert_allclose(result.outputs["z"], directly(inputs[i]), rtol=1e-6)
        finally:
            await sub.cancel()
            await d.broker.delete_inbox(d.inbox(signed))
    return inbox, d


async def test_a_worker_killed_mid_stream_and_restarted_loses_no_event(process_broker_url, pool, tee, tmp_path):
    workers = [await asyncio.to_thread(start, process_broker_url, pool, tee, tmp_path, "w1")]
    try:
        await stream_with_a_kill(process_broker_url, pool, tee, tmp_path, workers, 0, restart=True)
        assert workers[0].proc.returncode == -9
    finally:
        for w in workers:
            w.close()


async def test_three_workers_share_a_pipelines_events_and_lose_none_when_one_is_killed(
        process_broker_url, pool, tee, tmp_path):
    ports = [free_port() for _ in range(3)]
    workers = []
    try:
        for n, port in enumerate(ports):
            workers.append(await asyncio.to_thread(start, process_broker_url, pool, tee, tmp_path, f"w{n + 1}",
                                                   "--metrics-port", str(port)))
        await stream_with_a_kill(process_broker_url, pool, tee, tmp_path, workers, 1, restart=False)
        survivors = [events_done(ports[0]), events_done(ports[2])]
        assert all(count > 0 for count in survivors), f"a surviving worker took no event: {survivors}"
        assert workers[1].proc.returncode == -9
    finally:
        for w in workers:
            w.close()
