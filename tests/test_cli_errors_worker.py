"""Mistakes that reach a worker, through the real command line (issue 14, items 7 and 8 and the
"Also" list): a damaged sealed model, an upload the worker cannot make durable, output names
that `np.savez` would trip over, an operator the worker lacks.

Each row runs `enclaveq` in its own process against an `enclaveq worker` process serving a pool
of its own on RabbitMQ, and asserts the exit code, one line naming the problem, no traceback, and
that nothing the worker computed or was given is lost or served when it should not be. The pools
are deleted from the broker afterwards.

Not here: a model over the pool's size limit (refused on its first chunk, before the rest is
sent). The limit is the measured ``max_model_bytes`` (512 MiB), which no command line option
lowers: exercising it through the CLI takes a model file over 512 MiB (tests/test_worker_state.py
checks the refusal with a smaller measured limit).
"""

from __future__ import annotations

import asyncio
import hashlib
import stat
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from .conftest import RABBITMQ_URL, _listening, _need
from .processes import WorkerProcess, enclaveq
from .support import mlp_model
from .test_cli_errors import Mistake, assert_one_clear_line

pytestmark = pytest.mark.rabbitmq


@dataclass
class Pool:
    """A pool of one `enclaveq worker` process on RabbitMQ, with its sim dir, policy and state dir."""

    root: Path
    name: str
    sim: Path
    policy: Path
    state: Path
    owner_key: Path
    logs: int = 0
    worker: WorkerProcess | None = None
    all_workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def models_dir(self) -> Path:
        return self.state / self.name / "models"

    def start(self) -> WorkerProcess:
        self.logs += 1
        self.worker = WorkerProcess(RABBITMQ_URL, self.name, self.sim, self.root / f"worker-{self.logs}.log",
                                    "--state-dir", str(self.state)).wait_ready()
        self.all_workers.append(self.worker)
        return self.worker

    def stop(self) -> None:
        assert self.worker is not None
        assert self.worker.terminate() == 0, self.worker.log()
        self.worker.close()
        self.worker = None

    def conn(self) -> tuple[str, ...]:
        return ("--broker", RABBITMQ_URL, "--pool", self.name, "--policy", str(self.policy))

    def upload(self, model: Path, *, check: bool = True) -> subprocess.CompletedProcess:
        return enclaveq("model", "upload", str(model), *self.conn(), "--owner-key", str(self.owner_key), check=check)

    def model_list(self) -> str:
        return enclaveq("model", "list", *self.conn()).stdout


def model_id_of(result: subprocess.CompletedProcess) -> str:
    model_id = result.stdout.strip().splitlines()[-1]
    assert len(model_id) == 64, result.stdout
    return model_id


def open_pool(root: Path) -> Iterator[Pool]:
    """A fresh pool and its worker; stopped, and deleted from the broker, afterwards."""
    _need(_listening("127.0.0.1", 5672), "RabbitMQ on 127.0.0.1:5672")
    root.mkdir(parents=True, exist_ok=True)
    pool = Pool(root=root, name=f"t-{uuid.uuid4().hex[:12]}", sim=root / "sim", policy=root / "policy.toml",
                state=root / "state", owner_key=root / "owner.key")
    enclaveq("sim", "init", "--dir", str(pool.sim))
    enclaveq("policy", "init", "--sim-dir", str(pool.sim), "--out", str(pool.policy))
    enclaveq("keys", "generate", "--out", str(pool.owner_key))
    try:
        pool.start()
        yield pool
        if pool.worker is not None:
            pool.stop()
    finally:
        for worker in pool.all_workers:
            worker.close()
        asyncio.run(_delete_pool(pool.name))


async def _delete_pool(name: str) -> None:
    from broker_adapters import open_broker

    async with open_broker(RABBITMQ_URL) as broker:
        await broker.delete_pool(name)


@pytest.fixture(scope="module")
def shared_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """One worker for the rows that leave it running as they found it."""
    yield from open_pool(tmp_path_factory.mktemp("cli-errors-worker"))


@pytest.fixture
def own_pool(tmp_path: Path) -> Iterator[Pool]:
    """A worker of the test's own, for a row that stops and restarts it."""
    yield from open_pool(tmp_path / "pool")


def _serialize(graph: onnx.GraphProto, *opsets: onnx.OperatorSetIdProto, check: bool = True) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *opsets])
    model.ir_version = 8
    if check:
        onnx.checker.check_model(model)
    return model.SerializeToString()


def awkward_names_model() -> bytes:
    """x[n] float32 -> file = x, allow_pickle = x + x: output names that are np.savez's own parameters."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["file"]), helper.make_node("Add", ["x", "x"], ["allow_pickle"])],
        "awkward_names",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("file", TensorProto.FLOAT, ["n"]),
         helper.make_tensor_value_info("allow_pickle", TensorProto.FLOAT, ["n"])],
    )
    return _serialize(graph)


def unknown_operator_model(domain: str) -> bytes:
    """x -> y through one node of op_type NoSuchOp in ``domain`` ("" is standard ONNX)."""
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], domain=domain)], "unknown_operator",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )
    extra = [helper.make_opsetid(domain, 1)] if domain else []
    return _serialize(graph, *extra, check=False)  # the checker itself refuses an unknown operator


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# -- item 8: one damaged sealed model ---------------------------------------------------------------


def test_a_damaged_sealed_model_is_quarantined_and_named_while_the_worker_serves_the_rest(own_pool, tmp_path):
    pool = own_pool
    (tmp_path / "good.onnx").write_bytes(mlp_model(seed=21))
    (tmp_path / "bad.onnx").write_bytes(mlp_model(seed=22))
    good, bad = model_id_of(pool.upload(tmp_path / "good.onnx")), model_id_of(pool.upload(tmp_path / "bad.onnx"))
    pool.stop()

    sealed = pool.models_dir / f"{bad}.sealed"
    damaged = bytearray(sealed.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    sealed.write_bytes(bytes(damaged))

    worker = pool.start()  # starts: one bad file does not stop the pool
    quarantine = pool.models_dir / "quarantine"
    lines = [line for line in worker.log().splitlines() if bad in line]
    assert len(lines) == 1, worker.log()
    assert "damaged" in lines[0] and str(quarantine) in lines[0], lines[0]
    assert "Traceback" not in worker.log()
    assert not sealed.exists() and any(p.name.startswith(f"{bad}.sealed") for p in quarantine.iterdir())

    listed = pool.model_list()
    assert good in listed and bad not in listed

    np.save(tmp_path / "x.npy", np.ones((2, 4), np.float32))
    np.save(tmp_path / "bias.npy", np.zeros(3, np.float32))

    def run(model_id: str) -> tuple[tuple[str, ...], subprocess.CompletedProcess]:
        args = ("run", *pool.conn(), "--model", model_id, "--input", f"x={tmp_path / 'x.npy'}",
                "--input", f"bias={tmp_path / 'bias.npy'}", "--output", str(tmp_path / f"{model_id[:8]}.npz"))
        return args, enclaveq(*args, check=False)

    _, served = run(good)
    assert served.returncode == 0, served.stderr
    with np.load(tmp_path / f"{good[:8]}.npz") as out:
        assert out["logits"].shape == (2, 3)
    args, refused = run(bad)
    assert_one_clear_line(refused, Mistake(args, 1, bad))
    assert not (tmp_path / f"{bad[:8]}.npz").exists()


# -- item 7: an upload that cannot be made durable ------------------------------------------------


def test_an_upload_the_worker_cannot_write_to_sealed_storage_is_refused_and_not_served(shared_pool, tmp_path):
    pool = shared_pool
    model = tmp_path / "model.onnx"
    model.write_bytes(mlp_model(seed=23))
    # Running as root, permissions stop nothing: a regular file where the models directory was
    # makes every write of a sealed model fail (mkdir of its folder: FileExistsError).
    model_id = hashlib.sha256(model.read_bytes()).hexdigest()
    pool.models_dir.mkdir(parents=True, exist_ok=True)
    aside = pool.models_dir.with_name("models.aside")
    pool.models_dir.rename(aside)
    try:
        pool.models_dir.write_text("not a directory")
        args = ("model", "upload", str(model), *pool.conn(), "--owner-key", str(pool.owner_key))
        refused = enclaveq(*args, check=False)
        assert_one_clear_line(refused, Mistake(args, 1, "could not write model"))
        assert "is not served" in refused.stderr
        assert model_id not in pool.model_list()  # refused, and not live meanwhile either
    finally:
        pool.models_dir.unlink(missing_ok=True)
        aside.rename(pool.models_dir)
    assert model_id not in pool.model_list()  # not brought back by the storage working again
    assert not (pool.models_dir / f"{model_id}.sealed").exists()
    assert pool.worker is not None
    said = [line for line in pool.worker.log().splitlines() if model_id in line]
    assert len(said) == 1 and "could not be written to sealed storage" in said[0], said

    assert model_id_of(pool.upload(model)) == model_id  # the same upload, once the storage works
    assert model_id in pool.model_list() and (pool.models_dir / f"{model_id}.sealed").exists()


# -- "Also": output names np.savez would take as its own parameters ----------------------------------


def test_outputs_named_file_and_allow_pickle_round_trip_through_run_and_submit_into_0600_files(shared_pool, tmp_path):
    pool = shared_pool
    (tmp_path / "awkward.onnx").write_bytes(awkward_names_model())
    model_id = model_id_of(pool.upload(tmp_path / "awkward.onnx"))
    victim = tmp_path / "victim.txt"
    victim.write_text("must stay as it is")

    x = np.arange(5, dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out.npz"
    out.symlink_to(victim)  # a link already there is replaced, not followed
    ran = enclaveq("run", *pool.conn(), "--model", model_id, "--input", f"x={tmp_path / 'x.npy'}", "--output",
                   str(out), check=False)
    assert ran.returncode == 0 and "Traceback" not in ran.stderr, ran.stderr
    assert not out.is_symlink() and mode_of(out) == 0o600 and victim.read_text() == "must stay as it is"
    with np.load(out) as result:
        assert sorted(result.files) == ["allow_pickle", "file"]
        assert np.array_equal(result["file"], x) and np.array_equal(result["allow_pickle"], x + x)

    inputs, results = tmp_path / "in", tmp_path / "results"
    inputs.mkdir()
    batch = {f"job-{i}": np.full(3, i, np.float32) for i in range(4)}
    for name, value in batch.items():
        np.savez(inputs / f"{name}.npz", x=value)
    submitted = enclaveq("submit", *pool.conn(), "--model", model_id, "--inputs", str(inputs), "--output",
                         str(results), check=False)
    assert submitted.returncode == 0 and "Traceback" not in submitted.stderr, submitted.stderr
    assert "jobs: 4" in submitted.stdout and "failed: 0" in submitted.stdout, submitted.stdout
    assert sorted(p.name for p in results.glob("*.npz")) == [f"{name}.npz" for name in batch]
    for name, value in batch.items():
        path = results / f"{name}.npz"
        assert mode_of(path) == 0o600
        with np.load(path) as result:
            assert sorted(result.files) == ["allow_pickle", "file"]
            assert np.array_equal(result["file"], value) and np.array_equal(result["allow_pickle"], value + value)


# -- "Also": an operator the worker lacks ---------------------------------------------------------


# ONNX Runtime words a missing operator of a custom domain differently ("<domain>:<op>(-1) is not a
# registered function/op"): it is named all the same.
@pytest.mark.parametrize("domain", [
    pytest.param("", id="standard domain"),
    pytest.param("com.example.nowhere", id="unknown custom domain"),
    pytest.param("ai.onnx.contrib", id="the worker's custom domain"),
])
def test_a_model_with_an_operator_the_worker_lacks_is_refused_naming_the_operator(shared_pool, tmp_path, domain):
    pool = shared_pool
    model = tmp_path / "unknown-op.onnx"
    model.write_bytes(unknown_operator_model(domain))
    args = ("model", "upload", str(model), *pool.conn(), "--owner-key", str(pool.owner_key))
    refused = enclaveq(*args, check=False)
    assert_one_clear_line(refused, Mistake(args, 1, "model_invalid"))
    assert hashlib.sha256(model.read_bytes()).hexdigest() not in pool.model_list()
    assert "operator NoSuchOp" in refused.stderr and "not supported" in refused.stderr, refused.stderr
    if domain:
        assert f"domain {domain}" in refused.stderr, refused.stderr


def test_the_shared_worker_logged_no_traceback(shared_pool):
    assert shared_pool.worker is not None and "Traceback" not in shared_pool.worker.log()
