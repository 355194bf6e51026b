"""Several worker processes share one pool over RabbitMQ (issue 4): they join by
mutual attestation, get every model, compete for jobs, and survive one of them being SIGKILLed."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest

from producer_sdk import AsyncClient

from .processes import WorkerProcess, enclaveq
from .support import SimTEE, batch_of, dead_letters, mlp_model, wait_until

pytestmark = pytest.mark.slow


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


async def test_three_workers_2000_jobs_one_killed_and_replaced_every_result_exactly_once(rabbitmq_url, pool, tee,
                                                                                         tmp_path):
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


class RotationMidBatch:
    """Hands a batch to ``submit`` job by job, and rotates the pool in the middle of it.

    ``submit`` keeps sending while results are read, so a fast machine could finish the whole
    batch before `enclaveq pool rotate` (a new process) is done. Here the batch does not go on
    without it: taking job ``start_at`` starts the rotation in a thread, and job ``done_by`` is
    not handed over before the rotation has returned. That wait blocks the event loop for the
    seconds the rotation takes; meanwhile the jobs in flight go on at the workers and their
    results wait in the reply queue."""

    def __init__(self, batch, rotate, *, start_at: int, done_by: int) -> None:
        self.batch, self.rotate, self.start_at, self.done_by = batch, rotate, start_at, done_by
        self.result = None

    def __iter__(self):
        with ThreadPoolExecutor(1) as thread:
            for index, inputs in enumerate(self.batch):
                if index == self.start_at:
                    rotation = thread.submit(self.rotate)
                if index == self.done_by:
                    self.result = rotation.result(timeout=120)
                yield inputs


async def test_a_rotation_in_the_middle_of_a_batch_loses_nothing(rabbitmq_url, pool, tee, tmp_path):
    """Three worker processes, 2,000 jobs, `enclaveq pool rotate --grace 1s` once 500 results are
    in (job 700 of at most 200 in flight): jobs sealed to the old epoch are served or (after the
    grace period) sent again under the new key; every result arrives exactly once and equals
    direct onnxruntime. Every member erases epoch 1."""
    policy_file = tmp_path / "policy.toml"
    await asyncio.to_thread(enclaveq, "policy", "init", "--sim-dir", str(tee.dir), "--out", str(policy_file))
    model = mlp_model()
    batch = batch_of(2000)
    workers = [await asyncio.to_thread(start, rabbitmq_url, pool, tee, tmp_path, f"w{i}") for i in range(3)]

    def rotate():
        return enclaveq("pool", "rotate", "--broker", rabbitmq_url, "--pool", pool, "--policy", str(policy_file),
                        "--grace", "1s")

    mid_batch = RotationMidBatch(batch, rotate, start_at=700, done_by=1000)
    try:
        async with AsyncClient(rabbitmq_url, pool, tee.policy(), timeout=180) as client:
            model_id = await client.upload_model(model)
            seen = await run_batch(client, model_id, mid_batch)
            await wait_until(lambda: client.statement.epoch == 2, "the producer follows the pool to epoch 2")
        # Each member erases epoch 1 when its grace period ends, which the batch may well beat.
        for w in workers:
            await asyncio.to_thread(w.wait_for_log, "erased the pool key of epoch(s) [1]", 60)
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.terminate()
            w.close()
    assert "rotated from epoch 1 to epoch 2" in mid_batch.result.stdout
    assert_equal_to_onnxruntime(model, batch, seen)
    logs = [w.log() for w in workers]
    assert sum("rotated pool" in log for log in logs) == 1
    assert all("erased the pool key of epoch(s) [1]" in log for log in logs)
    assert await dead_letters(rabbitmq_url, pool) == 0
