"""The README's flow across processes, over MQTT 5 (Mosquitto) instead of RabbitMQ.

The same commands a user types (`enclaveq sim init`, `policy init`, `worker`, `attest`, `keys
generate`, `model upload|list|delete`, `run`, `submit`, `pool rotate`), each a real process,
with the broker URL `mqtt://...`; and the Python SDK, sync and async, on the same broker. Every
result is compared with what onnxruntime computes here, outside any worker.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from producer_sdk import AsyncClient, Client

from .processes import WorkerProcess, enclaveq
from .support import batch_of, mlp_model, run_directly, running_worker

# Founding an MQTT pool asks for live members first and, when anything else subscribes to the
# control topic (a monitoring client on `#`), waits out a 30 s model sync: above the default 60 s
# on a loaded machine.
WORKER_READY_SECONDS = 120
# Each command attests, then waits this long for each result at most (the CLI's --timeout).
COMMAND_TIMEOUT = ["--timeout", "60"]
BATCH = 300


def outputs_match(result: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> bool:
    return result.keys() == expected.keys() and all(np.array_equal(result[k], expected[k]) for k in expected)


@pytest.fixture
def deployment(tmp_path, mosquitto_url, pool):
    """README steps 1-3 over MQTT: a sim dir, a policy pinning the worker's measurement, and a
    worker process serving a fresh pool (deleted from Mosquitto afterwards by ``mosquitto_url``)."""
    sim, policy = tmp_path / "sim", tmp_path / "policy.toml"
    enclaveq("sim", "init", "--dir", str(sim))
    enclaveq("policy", "init", "--sim-dir", str(sim), "--out", str(policy))
    measurement = enclaveq("worker", "--sim-dir", str(sim), "--print-measurement").stdout.strip()
    assert measurement in policy.read_text()
    worker = WorkerProcess(mosquitto_url, pool, sim, tmp_path / "worker.log")
    try:
        worker.wait_ready(timeout=WORKER_READY_SECONDS)
        yield {"url": mosquitto_url, "pool": pool, "policy": policy, "sim": sim, "worker": worker}
        # SIGTERM: the worker finishes in-flight jobs and exits 0.
        assert worker.terminate() == 0
    finally:
        worker.close()


def conn(d):
    return ["--broker", d["url"], "--pool", d["pool"], "--policy", str(d["policy"]), *COMMAND_TIMEOUT]


def test_the_readme_flow_runs_over_mqtt_from_the_command_line(deployment, tmp_path):
    # 4. The pool attests against the policy.
    attested = json.loads(enclaveq("attest", *conn(deployment), "--json").stdout)
    assert attested["verified"] is True and attested["claims"]["platform"] == "sim" and attested["epoch"] == 1

    # 5-6. An owner key of our own signs the upload; the model id is the last line.
    model = mlp_model(seed=21)
    (tmp_path / "model.onnx").write_bytes(model)
    owner = tmp_path / "owner.key"
    enclaveq("keys", "generate", "--out", str(owner))
    upload = enclaveq("model", "upload", str(tmp_path / "model.onnx"), *conn(deployment), "--owner-key", str(owner))
    model_id = upload.stdout.strip().splitlines()[-1]
    assert len(model_id) == 64
    assert model_id in enclaveq("model", "list", *conn(deployment)).stdout

    # 7. One job: named inputs from .npy files, outputs to an .npz.
    one = batch_of(1)[0]
    np.save(tmp_path / "x.npy", one["x"])
    np.save(tmp_path / "bias.npy", one["bias"])
    run = ["run", *conn(deployment), "--model", model_id, "--input", f"x={tmp_path / 'x.npy'}",
           "--input", f"bias={tmp_path / 'bias.npy'}"]
    enclaveq(*run, "--output", str(tmp_path / "one.npz"))
    with np.load(tmp_path / "one.npz") as out:
        assert outputs_match(dict(out), run_directly(model, one))

    # 8. A batch: each .npz in a directory is one job; results get the same file names.
    jobs, results = tmp_path / "jobs", tmp_path / "results"
    jobs.mkdir()
    batch = batch_of(BATCH)
    for i, inputs in enumerate(batch):
        np.savez(jobs / f"job-{i:03d}.npz", **inputs)  # type: ignore[arg-type]  # numpy types **kwds as allow_pickle
    submitted = enclaveq("submit", *conn(deployment), "--model", model_id, "--inputs", str(jobs),
                         "--output", str(results), timeout=600)
    assert f"jobs: {BATCH}" in submitted.stdout and "failed: 0" in submitted.stdout
    assert sorted(p.name for p in results.glob("*.npz")) == [f"job-{i:03d}.npz" for i in range(BATCH)]
    for i, inputs in enumerate(batch):
        with np.load(results / f"job-{i:03d}.npz") as out:
            assert outputs_match(dict(out), run_directly(model, inputs)), f"job-{i:03d} differs from onnxruntime"

    # 9. A new pool key; the pool attests the new epoch and jobs keep running under it.
    rotated = enclaveq("pool", "rotate", *conn(deployment), "--grace", "10m")
    assert "from epoch 1 to epoch 2" in rotated.stdout
    assert json.loads(enclaveq("attest", *conn(deployment), "--json").stdout)["epoch"] == 2
    enclaveq(*run, "--output", str(tmp_path / "after-rotation.npz"))
    with np.load(tmp_path / "after-rotation.npz") as out:
        assert outputs_match(dict(out), run_directly(model, one))

    # 10. Delete the model with its owner's key: it is gone from the pool.
    deleted = enclaveq("model", "delete", model_id, *conn(deployment), "--owner-key", str(owner))
    assert deleted.stdout.strip() == f"deleted {model_id}"
    assert model_id not in enclaveq("model", "list", *conn(deployment)).stdout
    missing = enclaveq(*run, "--output", str(tmp_path / "gone.npz"), check=False)
    assert missing.returncode == 1 and "unknown_model" in missing.stderr


async def test_the_sync_and_async_sdk_clients_run_batches_over_mqtt(tmp_path, mosquitto_url, pool, tee):
    model = mlp_model(seed=22)
    batch = batch_of(20)
    expected = [run_directly(model, inputs) for inputs in batch]

    def with_the_sync_client(model_id: str) -> list[bool]:
        # Blocking calls: run in a thread so the in-process worker keeps serving on this loop.
        with Client(mosquitto_url, pool, tee.policy(), timeout=60) as client:
            assert client.claims is not None and client.claims.simulated
            matches = [False] * len(batch)
            for result in client.submit(model_id, batch):
                assert result.ok and result.outputs is not None, result.error
                matches[result.index] = outputs_match(result.outputs, expected[result.index])
            matches.append(outputs_match(client.run(model_id, batch[0]), expected[0]))
            return matches

    async with running_worker(tee, mosquitto_url, pool):
        async with AsyncClient(mosquitto_url, pool, tee.policy(), timeout=60) as client:
            model_id = await client.upload_model(model)
            async_results = [result async for result in client.submit(model_id, batch)]
            assert sorted(r.index for r in async_results) == list(range(len(batch)))
            for result in async_results:
                assert result.ok and result.outputs is not None, result.error
                assert outputs_match(result.outputs, expected[result.index]), f"job {result.index} differs"
            assert outputs_match(await client.run(model_id, batch[-1]), expected[-1])

            assert all(await asyncio.to_thread(with_the_sync_client, model_id))
            await client.delete_model(model_id)
