"""A worker's health endpoints and metrics (issue 16, observability).

Liveness answers while the process runs; readiness only once the worker joined its pool with a
key and consumes jobs. The metrics count jobs, batches, attestations and reconnects and time
queueing and inference, and never carry an id, a payload or a shape (P10).
"""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request

import pytest

from enclave_worker.health import MAX_REQUEST_LINE, HealthServer
from producer_sdk import AsyncClient

from .processes import WorkerProcess, enclaveq
from .support import batch_of, mlp_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


async def test_live_answers_at_once_and_ready_only_once_the_worker_is():
    ready = False
    server = HealthServer(lambda: ready)
    port = await server.start(0)
    try:
        assert await asyncio.to_thread(get, f"http://127.0.0.1:{port}/live") == (200, "live\n")
        assert await asyncio.to_thread(get, f"http://127.0.0.1:{port}/ready") == (503, "not ready\n")
        ready = True
        assert await asyncio.to_thread(get, f"http://127.0.0.1:{port}/ready") == (200, "ready\n")
        assert (await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics"))[0] == 404
        assert (await raw(port, b"POST /ready HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
        # A request line longer than the limit gets no answer at all: the connection is closed.
        assert await raw(port, b"GET /" + b"a" * (2 * MAX_REQUEST_LINE) + b"\r\n") == b""
    finally:
        await server.close()


@pytest.mark.rabbitmq
def test_a_worker_process_serves_health_and_metrics_without_ids(tmp_path, rabbitmq_url, unique_name):
    sim = tmp_path / "sim"
    enclaveq("sim", "init", "--dir", str(sim))
    policy = tmp_path / "policy.toml"
    enclaveq("policy", "init", "--sim-dir", str(sim), "--out", str(policy))
    health, metrics = free_port(), free_port()
    worker = WorkerProcess(rabbitmq_url, unique_name, sim, tmp_path / "worker.log", "--health-port", str(health),
                           "--metrics-port", str(metrics)).wait_ready()
    try:
        assert get(f"http://127.0.0.1:{health}/live") == (200, "live\n")
        assert get(f"http://127.0.0.1:{health}/ready") == (200, "ready\n")

        async def jobs() -> str:
            async with AsyncClient(rabbitmq_url, unique_name, policy, timeout=60) as client:
                model_id = await client.upload_model(mlp_model(seed=9))
                results = [r async for r in client.submit(model_id, batch_of(20))]
                assert all(r.ok for r in results)
                return model_id

        model_id = asyncio.run(jobs())
        status, page = get(f"http://127.0.0.1:{metrics}/metrics")
        assert status == 200
        values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in page.splitlines()
                  if line and not line.startswith("#")}
        assert values['enclaveq_worker_requests_total{kind="job",outcome="ok"}'] == 20
        assert values["enclaveq_worker_models_loaded"] == 1 and values["enclaveq_worker_pool_epoch"] == 1
        assert values["enclaveq_worker_requests_in_flight"] == 0
        assert values["enclaveq_worker_inference_seconds_count"] >= 1
        # mlp_model's bias input has no batch dimension: every job ran alone, one call each.
        assert values["enclaveq_worker_batch_rows_count"] == 20
        assert values["enclaveq_worker_queueing_seconds_count"] >= 1
        assert values["enclaveq_worker_attestations_total"] >= 1
        assert "enclaveq_worker_reconnects_total" in values
        assert model_id not in page and unique_name not in page  # no ids, no names
    finally:
        assert worker.terminate() == 0
        worker.close()
