"""Workers that die or stop mid-batch lose nothing, and the producer sees each result once (P5).

The worker runs as a real process, over RabbitMQ and over Mosquitto (MQTT 5), so SIGKILL leaves
unacknowledged jobs exactly where a crashed enclave would leave them: in the quorum queue, or in
the dead worker's persistent MQTT session.
"""

from __future__ import annotations

import asyncio

import numpy as np
import onnxruntime as ort
import pytest

from producer_sdk import AsyncClient

from .processes import WorkerProcess
from .support import batch_of, dead_letters, mlp_model

pytestmark = pytest.mark.slow

# Bounds each job from publishing to its result. A job waits behind at most `max_in_flight`
# others plus a worker restart (seconds): a minute only bounds a failure, e.g. a job stranded
# in a dead worker's session.
JOB_TIMEOUT = 60.0


async def run_batch_with_interruption(broker_url, pool, tee, tmp_path, *, jobs: int, interrupt_at: int, interrupt,
                                      frames=None):
    model = mlp_model()
    batch = batch_of(jobs)
    worker = await asyncio.to_thread(WorkerProcess(broker_url, pool, tee.dir, tmp_path / "w1.log").wait_ready)
    replacement = None
    seen: dict[int, dict] = {}
    try:
        async with AsyncClient(broker_url, pool, tee.policy(), timeout=JOB_TIMEOUT) as client:
            model_id = await client.upload_model(model)
            async for result in client.submit(model_id, batch, max_in_flight=200, frames=frames):
                assert result.ok and result.outputs is not None, result.error
                assert result.index not in seen, f"job {result.index} delivered twice to the producer"
                seen[result.index] = result.outputs
                if len(seen) == interrupt_at:
                    await asyncio.to_thread(interrupt, worker)
                    replacement = await asyncio.to_thread(
                        WorkerProcess(broker_url, pool, tee.dir, tmp_path / "w2.log").wait_ready)
            core = client._core
            assert core is not None
            duplicates = core.duplicates
    finally:
        worker.close()
        if replacement is not None:
            replacement.terminate()
            replacement.close()
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    assert sorted(seen) == list(range(jobs))
    for index, outputs in seen.items():
        logits, label = session.run(None, batch[index])
        assert np.array_equal(outputs["logits"], logits) and np.array_equal(outputs["label"], label)
    assert await dead_letters(broker_url, pool) == 0, "a job was dead-lettered instead of redelivered"
    return worker, duplicates


@pytest.mark.parametrize("frames", [None, False], ids=["framed", "per-message"])
async def test_a_worker_killed_mid_batch_and_restarted_loses_no_job(process_broker_url, pool, tee, tmp_path, frames):
    # Framed (submit's default), the worker dies holding whole frames: each is redelivered and
    # every job in it is yielded once.
    worker, duplicates = await run_batch_with_interruption(
        process_broker_url, pool, tee, tmp_path, jobs=1000, interrupt_at=300, interrupt=WorkerProcess.kill,
        frames=frames)
    assert worker.proc.returncode == -9
    assert duplicates >= 0  # reported, never surfaced: the producer yielded each job exactly once


async def test_sigterm_finishes_in_flight_jobs_returns_the_rest_and_exits_zero(process_broker_url, pool, tee,
                                                                               tmp_path):
    worker, _ = await run_batch_with_interruption(
        process_broker_url, pool, tee, tmp_path, jobs=400, interrupt_at=100, interrupt=WorkerProcess.terminate)
    assert worker.proc.returncode == 0, worker.log()
    assert "stopping: finishing in-flight jobs" in worker.log()
