"""Several worker processes share one pool over RabbitMQ (issue 4): they join by
mutual attestation, get every model, compete for jobs, and survive one of them being SIGKILLed."""

from __future__ import annotations

import asyncio

import numpy as np
import onnxruntime as ort
import pytest

from broker_adapters import open_broker
from producer_sdk import AsyncClient

from .processes import WorkerProcess, enclaveq
from .support import SimTEE, mlp_model
from .test_crash_recovery import batch_of, dead_letters

pytestmark = pytest.mark.slow


@pytest.fixture
async def pool(rabbitmq_url, unique_name):
    yield unique_name
    async with open_broker(rabbitmq_url) as broker:
        await broker.delete_pool(unique_name)


def start(url, pool, tee, tmp_path, name) -> WorkerProcess:
    return WorkerProcess(url, pool, tee.dir, tmp_path / f"{name}.log", "--state-dir", str(tmp_path / name)).wait_ready()


async def run_batch(client, model_id, batch, at=None, count=None) -> dict[int, dict]:
    """Submit ``batch``; call ``at()`` once when ``count`` results are in. Each result must arrive once."""
    seen: dict[int, dict] = {}
    async for result in client.submit(model_id, batch, max_in_flight=200):
        assert result.ok, result.error
        assert result.index not in seen, f"job {result.index} delivered twice to the producer"
        seen[result.index] = result.outputs
        if len(seen) == count:
            await at()
    return seen


def assert_equal_to_onnxruntime(model: bytes, batch, seen: dict[int, dict]) -> None:
    assert sorted(seen) == list(range(len(batch)))
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    for index, outputs in seen.items():
        logits, label = session.run(None, batch[index])
        assert np.array_equal(outputs["logits"], logits) and np.array_equal(outputs["label"], label)


async def test_three_workers_2000_jobs_one_killed_and_replaced_every_result_exactly_once(rabbitmq_url, pool, tmp_path):
    tee = SimTEE(tmp_path)
    model = mlp_model()
    batch = batch_of(2000)
    workers = [await asyncio.to_thread(start, rabbitmq_url, pool, tee, tmp_path, f"w{i}") for i in range(3)]

    async def kill_one_and_start_another() -> None:
        await asyncio.to_thread(workers[1].kill)
        workers.append(await asyncio.to_thread(start, rabbitmq_url, pool, tee, tmp_path, "w3"))

    try:
        logs = [w.log() for w in workers]
        assert "founded pool" in logs[0] and all("joined pool" in log for log in logs[1:])
        async with AsyncClient(rabbitmq_url, pool, tee.policy(), timeout=180) as client:
            model_id = await client.upload_model(model)
            seen = await run_batch(client, model_id, batch, kill_one_and_start_another, 600)
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.terminate()
            w.close()
    assert_equal_to_onnxruntime(model, batch, seen)
    assert "joined pool" in workers[3].log() and f"model {model_id} synced" in workers[3].log()
    assert await dead_letters(rabbitmq_url, pool) == 0


async def test_a_worker_of_another_measurement_is_refused_and_consumes_nothing(rabbitmq_url, pool, tmp_path):
    tee, other = SimTEE(tmp_path / "a"), SimTEE(tmp_path / "b")
    member = await asyncio.to_thread(start, rabbitmq_url, pool, tee, tmp_path, "member")
    try:
        outsider = WorkerProcess(rabbitmq_url, pool, other.dir, tmp_path / "outsider.log", "--state-dir",
                                 str(tmp_path / "outsider"))
        assert await asyncio.to_thread(outsider.proc.wait, 60) == 3
        assert "refuses to admit" in outsider.log()
        assert not (tmp_path / "outsider" / pool / "pool.sealed").exists()
        outsider.close()
    finally:
        member.terminate()
        member.close()


async def test_a_rotation_in_the_middle_of_a_batch_loses_nothing(rabbitmq_url, pool, tmp_path):
    """Three worker processes, 2,000 jobs, `enclaveq pool rotate --grace 1s` at 500 results: jobs
    sealed to the old epoch are served or (after the grace period) sent again under the new key;
    every result arrives exactly once and equals direct onnxruntime."""
    tee = SimTEE(tmp_path)
    policy_file = tmp_path / "policy.toml"
    await asyncio.to_thread(enclaveq, "policy", "init", "--sim-dir", str(tee.dir), "--out", str(policy_file))
    model = mlp_model()
    batch = batch_of(2000)
    workers = [await asyncio.to_thread(start, rabbitmq_url, pool, tee, tmp_path, f"w{i}") for i in range(3)]
    rotation: list[asyncio.Task] = []

    async def rotate() -> None:
        rotation.append(asyncio.create_task(asyncio.to_thread(
            enclaveq, "pool", "rotate", "--broker", rabbitmq_url, "--pool", pool, "--policy", str(policy_file),
            "--grace", "1s")))

    try:
        async with AsyncClient(rabbitmq_url, pool, tee.policy(), timeout=180) as client:
            model_id = await client.upload_model(model)
            seen = await run_batch(client, model_id, batch, rotate, 500)
            assert client.statement.epoch == 2
        rotated = await rotation[0]
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.terminate()
            w.close()
    assert "rotated from epoch 1 to epoch 2" in rotated.stdout
    assert_equal_to_onnxruntime(model, batch, seen)
    logs = [w.log() for w in workers]
    assert sum("rotated pool" in log for log in logs) == 1
    assert all("erased the pool key of epoch(s) [1]" in log for log in logs)
    assert await dead_letters(rabbitmq_url, pool) == 0
