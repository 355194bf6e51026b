"""The `enclaveq` command line, driven as a user would: real processes, real RabbitMQ."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from broker_adapters import open_broker

from .processes import WorkerProcess, enclaveq
from .support import mlp_model


@pytest.fixture(autouse=True)
def enclaveq_home(tmp_path, monkeypatch):
    """Every command run here (the CLI processes inherit the environment) keeps its default owner
    key under tmp_path, never in the real ~/.config/enclaveq."""
    home = tmp_path / "enclaveq-home"
    monkeypatch.setenv("ENCLAVEQ_HOME", str(home))
    monkeypatch.delenv("ENCLAVEQ_OWNER_KEY", raising=False)
    return home


COMMANDS = [[], ["demo"], ["sim"], ["sim", "init"], ["policy"], ["policy", "init"], ["worker"], ["attest"],
            ["model"], ["model", "upload"], ["model", "list"], ["model", "delete"], ["run"], ["submit"],
            ["pool"], ["pool", "rotate"], ["keys"], ["keys", "generate"], ["keys", "show"], ["evidence"],
            ["evidence", "verify"], ["pipeline"], ["pipeline", "init"], ["pipeline", "create"], ["pipeline", "list"],
            ["pipeline", "delete"], ["publish"], ["subscribe"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "enclaveq")
def test_every_command_has_a_help_that_explains_it(command):
    result = enclaveq(*command, "--help")
    assert result.returncode == 0
    assert "Usage:" in result.stdout and len(result.stdout.splitlines()) > 5


def test_the_policy_written_by_policy_init_pins_the_measurement_the_worker_prints(tmp_path):
    sim = tmp_path / "sim"
    created = enclaveq("sim", "init", "--dir", str(sim))
    assert (sim / "root.pem").exists() and "fingerprint" in created.stdout.lower()
    refused = enclaveq("sim", "init", "--dir", str(sim), check=False)
    assert refused.returncode != 0 and "already" in refused.stderr
    measurement = enclaveq("worker", "--sim-dir", str(sim), "--print-measurement").stdout.strip()
    assert len(measurement) == 64
    enclaveq("policy", "init", "--sim-dir", str(sim), "--out", str(tmp_path / "policy.toml"))
    text = (tmp_path / "policy.toml").read_text()
    assert measurement in text and "allow" in text


def test_a_worker_refuses_to_start_without_a_sim_dir(tmp_path, rabbitmq_url, unique_name):
    result = enclaveq("worker", "--broker", rabbitmq_url, "--pool", unique_name, "--sim-dir", str(tmp_path / "nope"),
                      check=False)
    assert result.returncode == 3 and "sim init" in result.stderr


@pytest.fixture
def deployment(tmp_path, rabbitmq_url, unique_name):
    """A sim dir, a policy, and a worker process serving a fresh pool on RabbitMQ."""
    sim = tmp_path / "sim"
    enclaveq("sim", "init", "--dir", str(sim))
    policy = tmp_path / "policy.toml"
    enclaveq("policy", "init", "--sim-dir", str(sim), "--out", str(policy))
    worker = WorkerProcess(rabbitmq_url, unique_name, sim, tmp_path / "worker.log").wait_ready()
    yield {"url": rabbitmq_url, "pool": unique_name, "policy": policy, "sim": sim, "worker": worker}
    assert worker.terminate() == 0
    worker.close()
    import asyncio

    async def cleanup():
        async with open_broker(rabbitmq_url) as broker:
            await broker.delete_pool(unique_name)
    asyncio.run(cleanup())


def conn(d):
    return ["--broker", d["url"], "--pool", d["pool"], "--policy", str(d["policy"])]


def test_attest_prints_verified_claims_as_json(deployment):
    result = enclaveq("attest", *conn(deployment), "--json")
    doc = json.loads(result.stdout)
    assert doc["verified"] is True and doc["claims"]["platform"] == "sim" and doc["epoch"] == 1


def test_attest_exits_non_zero_naming_each_violation(deployment, tmp_path):
    other = tmp_path / "other.toml"
    enclaveq("policy", "init", "--sim-dir", str(deployment["sim"]), "--out", str(other), "--measurement", "ab" * 32)
    result = enclaveq("attest", "--broker", deployment["url"], "--pool", deployment["pool"], "--policy", str(other),
                      check=False)
    assert result.returncode == 1
    assert "measurement" in result.stderr and "ab" * 32 in result.stderr
    as_json = enclaveq("attest", "--broker", deployment["url"], "--pool", deployment["pool"], "--policy", str(other),
                       "--json", check=False)
    doc = json.loads(as_json.stdout)
    assert as_json.returncode == 1 and doc["verified"] is False
    assert {"field": "measurement"}.items() <= doc["violations"][0].items() and "ab" * 32 in doc["violations"][0]["expected"]


def test_upload_list_run_submit_and_delete_from_the_command_line(deployment, tmp_path, enclaveq_home):
    model = mlp_model(seed=4)
    (tmp_path / "m.onnx").write_bytes(model)
    owner, stranger = tmp_path / "owner.key", tmp_path / "stranger.key"
    enclaveq("keys", "generate", "--out", str(owner))
    enclaveq("keys", "generate", "--out", str(stranger))
    # No key anywhere: delete names the default key file it looked for and creates nothing.
    keyless = enclaveq("model", "delete", "00" * 32, *conn(deployment), check=False)
    default_key = enclaveq_home / "owner.key"
    assert keyless.returncode == 2 and str(default_key) in keyless.stderr and not default_key.exists()
    upload = enclaveq("model", "upload", str(tmp_path / "m.onnx"), *conn(deployment), "--owner-key", str(owner))
    model_id = upload.stdout.strip().splitlines()[-1]
    assert len(model_id) == 64

    assert model_id in enclaveq("model", "list", *conn(deployment)).stdout

    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    bias = np.zeros(3, np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "bias.npy", bias)
    enclaveq("run", *conn(deployment), "--model", model_id, "--input", f"x={tmp_path / 'x.npy'}",
             "--input", f"bias={tmp_path / 'bias.npy'}", "--output", str(tmp_path / "out.npz"))
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    logits, label = session.run(None, {"x": x, "bias": bias})
    with np.load(tmp_path / "out.npz") as out:
        assert np.array_equal(out["logits"], logits) and np.array_equal(out["label"], label)

    jobs = tmp_path / "jobs"
    jobs.mkdir()
    for i in range(20):
        np.savez(jobs / f"job-{i:03d}.npz", x=np.full((2, 4), i, np.float32), bias=bias)
    np.savez(jobs / "broken.npz", x=np.ones((2, 5), np.float32), bias=bias)
    result = enclaveq("submit", *conn(deployment), "--model", model_id, "--inputs", str(jobs),
                      "--output", str(tmp_path / "results"), check=False)
    assert result.returncode == 1  # one job is broken, and says so
    assert "broken.npz" in result.stderr
    assert "jobs: 21" in result.stdout and "failed: 1" in result.stdout and "jobs/s" in result.stdout
    written = sorted(p.name for p in (tmp_path / "results").glob("*.npz"))
    assert written == [f"job-{i:03d}.npz" for i in range(20)]
    with np.load(tmp_path / "results" / "job-007.npz") as out:
        assert np.array_equal(out["logits"], session.run(None, {"x": np.full((2, 4), 7, np.float32), "bias": bias})[0])

    refused = enclaveq("model", "delete", model_id, *conn(deployment), "--owner-key", str(stranger), check=False)
    assert refused.returncode == 1 and "not_owner" in refused.stderr
    enclaveq("model", "delete", model_id, *conn(deployment), "--owner-key", str(owner))
    assert model_id not in enclaveq("model", "list", *conn(deployment)).stdout
    missing = enclaveq("run", *conn(deployment), "--model", model_id, "--input", f"x={tmp_path / 'x.npy'}",
                       "--input", f"bias={tmp_path / 'bias.npy'}", "--output", str(tmp_path / "o.npz"), check=False)
    assert missing.returncode == 1 and "unknown_model" in missing.stderr

    # The documented contract: no --owner-key; the default key in $ENCLAVEQ_HOME signs, and deletes.
    (tmp_path / "m2.onnx").write_bytes(mlp_model(seed=6))
    keyless_upload = enclaveq("model", "upload", str(tmp_path / "m2.onnx"), *conn(deployment))
    second_id = keyless_upload.stdout.splitlines()[-1]
    assert len(second_id) == 64 and str(default_key) in keyless_upload.stderr and default_key.exists()
    assert enclaveq("model", "delete", second_id, *conn(deployment)).stdout.strip() == f"deleted {second_id}"


def test_run_with_a_malformed_input_spec_is_a_usage_error(deployment, tmp_path):
    result = enclaveq("run", *conn(deployment), "--model", "00" * 32, "--input", "no-equals-sign",
                      "--output", str(tmp_path / "o.npz"), check=False)
    assert result.returncode == 2 and "NAME=FILE.npy" in result.stderr


def test_the_demo_runs_the_whole_flow_and_reports_what_it_verified():
    result = enclaveq("demo", timeout=300)
    out = " ".join(result.stdout.split())  # rich wraps lines at the terminal width
    assert "attestation verified" in out and "simulated=True" in out
    assert "every result equals direct onnxruntime" in out
    assert "none contains the model, a document or a result in clear" in out
    assert "demo complete" in out


def test_a_model_restricted_to_one_producer_key_runs_only_for_that_producer(deployment, tmp_path):
    (tmp_path / "m.onnx").write_bytes(mlp_model(seed=5))
    for name in ("owner", "alice", "bob"):
        enclaveq("keys", "generate", "--out", str(tmp_path / f"{name}.key"))
    alice_public = enclaveq("keys", "show", str(tmp_path / "alice.key")).stdout.split()[0]
    model_id = enclaveq("model", "upload", str(tmp_path / "m.onnx"), *conn(deployment), "--owner-key",
                        str(tmp_path / "owner.key"), "--allow-producer", alice_public).stdout.strip().splitlines()[-1]
    np.save(tmp_path / "x.npy", np.ones((1, 4), np.float32))
    np.save(tmp_path / "bias.npy", np.zeros(3, np.float32))
    run = ["run", *conn(deployment), "--model", model_id, "--input", f"x={tmp_path / 'x.npy'}",
           "--input", f"bias={tmp_path / 'bias.npy'}", "--output", str(tmp_path / "o.npz")]
    assert enclaveq(*run, "--producer-key", str(tmp_path / "alice.key")).returncode == 0
    for extra in (["--producer-key", str(tmp_path / "bob.key")], []):
        refused = enclaveq(*run, *extra, check=False)
        assert refused.returncode == 1 and "not_allowed" in refused.stderr
