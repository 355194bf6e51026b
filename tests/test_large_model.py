"""A 300 MiB model over real RabbitMQ: uploaded with the CLI in 4 MiB sealed chunks (each far
below RabbitMQ's 128 MiB max_message_size), held by every worker of a two-worker pool, served by
both, and handed to a third worker that joins late by model sync.

The model is built here with onnx.helper (no torch): a float32 embedding table of
19200 x 4096 (300 MiB) looked up with Gather, then projected by MatMul and summed. Every weight
is a multiple of 1/8 of magnitude <= 1, so every output is exactly representable in float32 and
the worker's result must equal direct onnxruntime bit for bit, whatever the summation order.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from producer_sdk import AsyncClient

from .processes import WorkerProcess, enclaveq

# A 300 MiB model on three workers: alone, in make test's serial pass (tests/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.serial]

MiB = 1024 * 1024
ROWS, DIM, OUT = 19200, 4096, 8  # the table alone is ROWS * DIM * 4 bytes = 300 MiB
CHUNK_BYTES = 4 * MiB  # producer_sdk.core.MODEL_CHUNK_BYTES


def large_model(seed: int = 300) -> bytes:
    """ids int64 [n] -> y = table[ids] @ proj (float32 [n, 8]), total = sum(table[ids]) (float32 scalar)."""
    rng = np.random.default_rng(seed)
    table = rng.integers(-8, 9, (ROWS, DIM), dtype=np.int8).astype(np.float32)
    table *= 0.125
    proj = (rng.integers(-8, 9, (DIM, OUT), dtype=np.int8).astype(np.float32) * 0.125)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
         helper.make_node("MatMul", ["rows", "proj"], ["y"]),
         helper.make_node("ReduceSum", ["rows"], ["total"], keepdims=0)],
        "large_embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", OUT]),
         helper.make_tensor_value_info("total", TensorProto.FLOAT, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    # The initializers go into the model in place: make_graph and make_model would each copy the
    # 300 MiB table once more (seconds). The bytes are those numpy_helper.from_array writes.
    initializer = model.graph.initializer.add()
    initializer.name, initializer.data_type = "table", TensorProto.FLOAT
    initializer.dims.extend(table.shape)
    initializer.raw_data = table.tobytes()
    del table
    model.graph.initializer.append(numpy_helper.from_array(proj, "proj"))
    return model.SerializeToString()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jobs_served(port: int) -> float:
    """The worker's own count of successful jobs, from its Prometheus endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    match = re.search(r'^enclaveq_worker_requests_total\{kind="job",outcome="ok"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def peak_rss_mib(worker: WorkerProcess) -> float:
    status = Path(f"/proc/{worker.proc.pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) / 1024


async def test_a_300_mib_model_uploads_with_the_cli_to_two_workers_and_syncs_to_a_late_third(
        rabbitmq_url, pool, tmp_path):
    clock = time.monotonic()
    timings: dict[str, float] = {}

    def lap(what: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timings[what] = now - clock
        clock = now

    path = tmp_path / "large.onnx"
    size, model_id = 0, ""
    reference: ort.InferenceSession | None = None

    def build() -> None:
        nonlocal size, model_id, reference
        model = large_model()
        size = len(model)
        model_id = hashlib.sha256(model).hexdigest()
        path.write_bytes(model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # as the worker runs it
        reference = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    sim, policy = tmp_path / "sim", tmp_path / "policy.toml"
    owner = ["--owner-key", str(tmp_path / "owner.key")]
    ports: dict[str, int] = {}
    peaks: dict[str, float] = {}
    workers: dict[str, WorkerProcess] = {}

    def start(name: str) -> WorkerProcess:
        ports[name] = free_port()
        workers[name] = WorkerProcess(rabbitmq_url, pool, sim, tmp_path / f"{name}.log", "--state-dir",
                                      str(tmp_path / name), "--metrics-port", str(ports[name]))
        return workers[name].wait_ready(90)

    def found_the_pool() -> None:
        enclaveq("sim", "init", "--dir", str(sim))
        enclaveq("policy", "init", "--sim-dir", str(sim), "--out", str(policy))
        enclaveq("keys", "generate", "--out", str(tmp_path / "owner.key"))
        start("w0")
        start("w1")  # after w0 is ready: w0 founds the pool, w1 joins it

    rng = np.random.default_rng(7)

    def batch(count: int) -> list[dict[str, np.ndarray]]:
        # The table's first and last rows in every job, then random ones.
        return [{"ids": np.concatenate([[0, ROWS - 1], rng.integers(0, ROWS, 6)]).astype(np.int64)}
                for _ in range(count)]

    async def run_and_check(client: AsyncClient, jobs: list[dict[str, np.ndarray]]) -> None:
        assert reference is not None
        async for result in client.submit(model_id, jobs, max_in_flight=len(jobs)):
            assert result.ok, result.error
            y, total = reference.run(None, jobs[result.index])
            assert np.array_equal(result.outputs["y"], y) and np.array_equal(result.outputs["total"], total)

    try:
        # The model is built (and its reference session made) while the first two workers start:
        # neither needs the other until the upload.
        await asyncio.gather(asyncio.to_thread(build), asyncio.to_thread(found_the_pool))
        assert size >= 300 * MiB
        assert "joined pool" in workers["w1"].log()
        lap("build model + reference session, alongside sim, policy, 2 workers")

        # -- the CLI uploads it: progress on stderr, the model id alone on stdout's last line -----
        upload = await asyncio.to_thread(enclaveq, "model", "upload", str(path), "--broker", rabbitmq_url,
                                         "--pool", pool, "--policy", str(policy), *owner, timeout=300)
        lap("CLI upload")
        chunks = -(-size // CHUNK_BYTES)
        assert upload.stdout.strip().splitlines()[-1] == model_id
        assert "uploading large.onnx" in upload.stderr and f"{chunks}/{chunks}" in upload.stderr, upload.stderr
        # The upload returns on the first worker's confirmation; each worker stores it on its own.
        for name in ("w0", "w1"):
            await asyncio.to_thread(workers[name].wait_for_log, f"model {model_id} stored ({size} bytes)")
        lap("both workers stored it")

        # -- both workers serve it: jobs until each one's metrics count some ----------------------
        async with AsyncClient(rabbitmq_url, pool, str(policy), timeout=60) as client:
            for _ in range(10):
                await run_and_check(client, batch(48))
                served = {name: jobs_served(ports[name]) for name in ("w0", "w1")}
                if all(served.values()):
                    break
            assert all(served.values()), f"a worker served no job: {served}"
            lap("jobs on both workers")

            # -- a third worker joins late and gets the model by sync, from live members ----------
            await asyncio.to_thread(start, "w2")
            lap("late worker joined and synced")
            peaks.update({name: peak_rss_mib(w) for name, w in workers.items()})
            log = workers["w2"].log()
            assert "joined pool" in log, log[-4000:]
            assert f"model {model_id} synced from a pool member" in log, log[-4000:]
            stopped = [asyncio.to_thread(workers[name].terminate) for name in ("w0", "w1")]
            assert await asyncio.gather(*stopped) == [0, 0]
            # Now only w2 consumes the pool's jobs: every result below is its own.
            await run_and_check(client, batch(8))
            assert jobs_served(ports["w2"]) >= 8
            lap("jobs on the late worker alone")
        for name in ("w0", "w1"):
            # A member never loops on a sync request whose requester is gone.
            assert "handler raised Unroutable" not in workers[name].log()
    finally:
        for w in workers.values():
            if w.proc.poll() is None:
                w.terminate()
            w.close()
        print(f"\n{size / MiB:.0f} MiB model: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
              + f"; total {sum(timings.values()):.1f} s; peak RSS MiB "
              + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    # When it completes the model a worker holds the chunks, the assembled bytes, ONNX Runtime's
    # copies and the sealed copy (and a member sending it by sync, the unsealed copy): measured
    # 4.3-6.3x the model's size. More would mean a copy too many.
    assert max(peaks.values()) < 8 * size / MiB, peaks
