"""Faults over MQTT 5 (issue 10): worker processes on Mosquitto that die, a broker that restarts,
a pool shared by three workers, and a job that can never be processed.

Workers run as real processes (``enclaveq worker``), so SIGKILL leaves their unacknowledged jobs
where a crashed enclave would: in the dead worker's persistent MQTT session. The broker restart
runs on a Mosquitto of the test's own (``private_mosquitto``), with persistence flushed on every
change; everything else runs on the shared Mosquitto, in a pool of the test's own.
"""

from __future__ import annotations

import asyncio
import os
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker_adapters import Delivery, Message, open_broker
from producer_sdk import AsyncClient, FrameSettings
from protocol import crypto
from protocol.envelope import RequestHeader, encode_envelope

from .mosquitto import free_port
from .processes import WorkerProcess
from .support import SimTEE, batch_of, dead_letters, mlp_model

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]

# Bounds each job from publishing to its result. A whole 1000-job batch takes seconds, a worker
# or broker restart a few more: this only bounds a failure (a job stranded in a dead session).
JOB_TIMEOUT = 45.0
# PoolSettings().delivery_limit, which the worker declares its pool with.
DELIVERY_LIMIT = 5

# Not strict: the race below loses about one run in six; the rest pass.
def start(url: str, pool: str, tee: SimTEE, tmp_path: Path, name: str, *extra: str) -> WorkerProcess:
    """A worker process with a state directory of its own: the first founds the pool, the
    others join it by mutual attestation."""
    return WorkerProcess(url, pool, tee.dir, tmp_path / f"{name}.log", "--state-dir", str(tmp_path / name),
                         *extra).wait_ready()


def stop_all(workers: list[WorkerProcess]) -> None:
    for worker in workers:
        if worker.proc.poll() is None:
            worker.terminate()
        worker.close()


async def run_batch(client: AsyncClient, model_id: str, batch: list, *, at: int,
                    interrupt: Callable[[], Awaitable[None]]) -> dict[int, dict]:
    """Submit ``batch`` and await ``interrupt()`` once ``at`` results are in. Each result must
    arrive once, and every job must succeed."""
    seen: dict[int, dict] = {}
    # Small frames: the batch stays framed (submit's default) and still spreads over every worker.
    async for result in client.submit(model_id, batch, max_in_flight=200, frames=FrameSettings(max_jobs=5)):
        assert result.ok and result.outputs is not None, result.error
        assert result.index not in seen, f"job {result.index} delivered twice to the producer"
        seen[result.index] = result.outputs
        if len(seen) == at:
            await interrupt()
    return seen


def assert_equal_to_onnxruntime(model: bytes, batch: list, seen: dict[int, dict]) -> None:
    assert sorted(seen) == list(range(len(batch))), "some jobs have no result"
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    for index, outputs in seen.items():
        logits, label = session.run(None, batch[index])
        assert np.array_equal(outputs["logits"], logits) and np.array_equal(outputs["label"], label)


def jobs_done(metrics_port: int) -> float:
    """How many jobs a worker process answered successfully, from its Prometheus metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "enclaveq_worker_requests_total"
               and sample.labels == {"kind": "job", "outcome": "ok"})


# -- a worker dies and another takes over ---------------------------------------------------------


async def test_a_worker_killed_mid_batch_and_never_restarted_leaves_its_jobs_to_the_other(
        mosquitto_url, pool, tee, tmp_path):
    model, batch = mlp_model(), batch_of(1000)
    first_port = free_port()
    workers = [await asyncio.to_thread(start, mosquitto_url, pool, tee, tmp_path, "w1", "--metrics-port",
                                       str(first_port)),
               await asyncio.to_thread(start, mosquitto_url, pool, tee, tmp_path, "w2")]
    done_by_the_first: list[float] = []

    async def kill_the_first() -> None:
        done_by_the_first.append(await asyncio.to_thread(jobs_done, first_port))
        await asyncio.to_thread(workers[0].kill)

    try:
        assert "founded pool" in workers[0].log() and "joined pool" in workers[1].log()
        async with AsyncClient(mosquitto_url, pool, tee.policy(), timeout=JOB_TIMEOUT) as client:
            model_id = await client.upload_model(model)
            seen = await run_batch(client, model_id, batch, at=300, interrupt=kill_the_first)
    finally:
        stop_all(workers)
    assert workers[0].proc.returncode == -9
    assert done_by_the_first[0] > 0, "the killed worker was not taking a share of the batch"
    assert_equal_to_onnxruntime(model, batch, seen)
    assert await dead_letters(mosquitto_url, pool) == 0, "a job was dead-lettered instead of redelivered"


async def test_three_workers_share_the_jobs_and_lose_none_when_one_is_killed(mosquitto_url, pool, tee, tmp_path):
    model, batch = mlp_model(), batch_of(1000)
    ports = [free_port() for _ in range(3)]
    workers = [await asyncio.to_thread(start, mosquitto_url, pool, tee, tmp_path, f"w{i}", "--metrics-port", str(port))
               for i, port in enumerate(ports)]
    at_kill: list[float] = []

    async def kill_the_second() -> None:
        at_kill.extend([await asyncio.to_thread(jobs_done, port) for port in ports])
        await asyncio.to_thread(workers[1].kill)

    try:
        async with AsyncClient(mosquitto_url, pool, tee.policy(), timeout=JOB_TIMEOUT) as client:
            model_id = await client.upload_model(model)
            seen = await run_batch(client, model_id, batch, at=300, interrupt=kill_the_second)
        survivors = [await asyncio.to_thread(jobs_done, ports[i]) for i in (0, 2)]
    finally:
        stop_all(workers)
    assert all(done > 0 for done in at_kill), f"jobs answered by each worker before the kill: {at_kill}"
    assert survivors[0] > at_kill[0] and survivors[1] > at_kill[2], "the survivors took no jobs after the kill"
    assert_equal_to_onnxruntime(model, batch, seen)
    assert await dead_letters(mosquitto_url, pool) == 0, "a job was dead-lettered instead of redelivered"


# -- the broker restarts --------------------------------------------------------------------------


async def test_a_mosquitto_restart_mid_batch_completes_every_job_exactly_once(private_mosquitto, pool, tee, tmp_path):
    url = private_mosquitto.url
    model, batch = mlp_model(), batch_of(1000)
    worker = await asyncio.to_thread(start, url, pool, tee, tmp_path, "w1")

    async def restart_the_broker() -> None:
        await asyncio.to_thread(private_mosquitto.restart)

    try:
        async with AsyncClient(url, pool, tee.policy(), timeout=JOB_TIMEOUT) as client:
            model_id = await client.upload_model(model)
            seen = await run_batch(client, model_id, batch, at=300, interrupt=restart_the_broker)
    finally:
        stop_all([worker])
    assert worker.proc.returncode == 0, worker.log()[-4000:]
    assert_equal_to_onnxruntime(model, batch, seen)
    assert await dead_letters(url, pool) == 0, "a job was dead-lettered instead of redelivered"


# -- a job that can never be processed ------------------------------------------------------------


def job_sealed_to_a_future_epoch(reply_to: str) -> tuple[str, bytes]:
    """A well-formed request sealed (it claims) to an epoch the pool will not reach: the worker
    cannot open it, asks the members for newer keys, and hands it back, on every delivery."""
    job_id = f"future-{os.urandom(6).hex()}"
    header = RequestHeader(kind="model_list", session_id=os.urandom(crypto.SESSION_ID_BYTES), epoch=1_000_000,
                           sealed_session=os.urandom(crypto.SEALED_SESSION_BYTES), job_id=job_id,
                           deadline_ms=2**62, reply_to=reply_to, content_type="application/msgpack")
    return job_id, encode_envelope(header.to_bytes(), os.urandom(crypto.NONCE_BYTES), os.urandom(64))


async def test_a_job_no_worker_can_process_ends_on_the_dead_letter_topic_and_nowhere_else(
        mosquitto_url, pool, tee, tmp_path):
    worker = await asyncio.to_thread(start, mosquitto_url, pool, tee, tmp_path, "w1")
    dead: asyncio.Queue[Delivery] = asyncio.Queue()
    replies: list[Delivery] = []

    async def keep_dead_letter(delivery: Delivery) -> None:
        await dead.put(delivery)
        await delivery.ack()

    async def keep_reply(delivery: Delivery) -> None:
        replies.append(delivery)
        await delivery.ack()

    try:
        async with open_broker(mosquitto_url) as broker:
            reply_to = await broker.declare_reply_queue(pool)
            try:
                subs = [await broker.consume_dead_letters(pool, keep_dead_letter),
                        await broker.consume_replies(pool, keep_reply)]
                job_id, body = job_sealed_to_a_future_epoch(reply_to)
                await broker.publish_job(pool, Message(body=body, message_id=job_id, reply_to=reply_to,
                                                       correlation_id=job_id))
                letter = await asyncio.wait_for(dead.get(), 60)
                assert letter.message.message_id == job_id and letter.message.body == body
                assert letter.message.headers["x-first-death-reason"] == "delivery_limit"

                # A malformed job published after that is dead-lettered at once (rejected). Once
                # it is, the worker -- the pool's only consumer -- has been handed everything
                # queued before it: no copy of the first job was left in the jobs topic.
                await broker.publish_job(pool, Message(body=b"not an envelope", message_id="sentinel"))
                sentinel = await asyncio.wait_for(dead.get(), 60)
                assert sentinel.message.message_id == "sentinel"
                assert sentinel.message.headers["x-first-death-reason"] == "rejected"
                for sub in subs:
                    await sub.cancel()
            finally:
                await broker.delete_reply_queue(pool)
        # Stopped gracefully: it finishes whatever it was handling, so its log is complete.
        assert await asyncio.to_thread(worker.terminate) == 0, worker.log()[-4000:]
    finally:
        worker.close()
    handed_back = worker.log().count(f"job {job_id} is sealed to epoch")
    assert handed_back == DELIVERY_LIMIT, f"the worker handed the job back {handed_back} times"
    assert dead.empty(), "a job was dead-lettered twice"
    assert replies == [], "the job that could not be processed got an answer"
