"""Test building blocks: tiny ONNX models made with onnx.helper, direct onnxruntime runs, simulated
TEEs, in-process workers, waiting for events, and reaching into the brokers.

Plain functions and classes only; the fixtures that use them are in ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from attestation.policy import Policy
from broker_adapters import BrokerAdapter, open_broker
from broker_adapters.amqp import AmqpBroker
from broker_adapters.memory import MemoryBroker
from broker_adapters.mqtt import MqttBroker
from attestation.sim.init import init_sim_dir
from enclave_worker.config import DEFAULT_WORKER_CONFIG
from enclave_worker.measurement import measure_worker
from enclave_worker.platform import sim_identity
from enclave_worker.worker import Worker
from protocol.tensors import DTYPES

ONNX_DTYPE = {
    "bool": TensorProto.BOOL, "float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT,
    "float64": TensorProto.DOUBLE, "int8": TensorProto.INT8, "int16": TensorProto.INT16,
    "int32": TensorProto.INT32, "int64": TensorProto.INT64, "uint8": TensorProto.UINT8,
    "uint16": TensorProto.UINT16, "uint32": TensorProto.UINT32, "uint64": TensorProto.UINT64,
}


def _serialize(graph) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def every_dtype_model() -> bytes:
    """One input and one output per dtype (``x_<dtype>`` -> ``y_<dtype>``), dynamic shapes.
    Even rows pass through Identity; float outputs are doubled so the model computes something."""
    nodes, inputs, outputs = [], [], []
    for name in DTYPES:
        t = ONNX_DTYPE[name]
        inputs.append(helper.make_tensor_value_info(f"x_{name}", t, ["n", "m"]))
        outputs.append(helper.make_tensor_value_info(f"y_{name}", t, ["n", "m"]))
        if name.startswith("float"):
            nodes.append(helper.make_node("Add", [f"x_{name}", f"x_{name}"], [f"y_{name}"]))
        else:
            nodes.append(helper.make_node("Identity", [f"x_{name}"], [f"y_{name}"]))
    return _serialize(helper.make_graph(nodes, "every_dtype", inputs, outputs))


def mlp_model(seed: int = 0) -> bytes:
    """x[n,4] float32, bias[3] float32 -> logits = relu(x @ W) + bias, argmax int64: 2 inputs, 2 outputs."""
    w = np.random.default_rng(seed).standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Add", ["r", "bias"], ["logits"]),
         helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0)],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("bias", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3]),
         helper.make_tensor_value_info("label", TensorProto.INT64, ["n"])],
        initializer=[helper.make_tensor("W", TensorProto.FLOAT, [4, 3], w.flatten().tolist())],
    )
    return _serialize(graph)


def batch_of(n: int) -> list[dict[str, np.ndarray]]:
    """``n`` inputs for ``mlp_model``, always the same ones."""
    rng = np.random.default_rng(11)
    return [{"x": rng.standard_normal((2, 4)).astype(np.float32), "bias": rng.standard_normal(3).astype(np.float32)}
            for _ in range(n)]


def run_directly(model: bytes, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the model computes when onnxruntime runs it here, outside any worker: output name -> value."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))


def sample_every_dtype_inputs(rows: int = 2, cols: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name in DTYPES:
        if name == "bool":
            out[f"x_{name}"] = rng.integers(0, 2, (rows, cols)).astype(bool)
        elif name.startswith("float"):
            out[f"x_{name}"] = rng.standard_normal((rows, cols)).astype(name)
        else:
            info = np.iinfo(name)
            out[f"x_{name}"] = rng.integers(info.min, info.max, (rows, cols), dtype=name, endpoint=True)
    return out


class SimTEE:
    """A simulation directory plus a policy that trusts it and pins the current worker."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "sim"
        self.simdir = init_sim_dir(self.dir)
        self.measurement = measure_worker(DEFAULT_WORKER_CONFIG.measured()).value
        self.state_dir = root / "state"

    def policy(self, **overrides) -> Policy:
        fields = dict(measurements=(self.measurement.hex(),), allow_simulation=True,
                      sim_root_sha256=self.simdir.root_sha256, max_evidence_age_seconds=60)
        fields.update(overrides)
        return Policy(**fields)

    def worker(self, broker_url: str, pool: str, **kwargs) -> Worker:
        return Worker(broker_url=broker_url, pool=pool, identity=sim_identity(self.dir),
                      state_dir=kwargs.pop("state_dir", self.state_dir), **kwargs)


@contextlib.asynccontextmanager
async def running_worker(tee: SimTEE, broker_url: str, pool: str, **kwargs):
    worker = tee.worker(broker_url, pool, **kwargs)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


class FaultMidway:
    """A batch fed to ``submit`` with a fault in its middle, whatever the machine's speed: once
    ``at`` jobs are sent, the feed pauses and ``fault(resume)`` runs in its own thread (it blocks:
    stopping a broker, killing a node); it calls ``resume()`` once the fault has struck, and the
    rest of the batch is fed from then on."""

    def __init__(self, batch: list, fault: Callable[[Callable[[], None]], None], *, at: int) -> None:
        self.batch, self.at = batch, at
        self._fault = fault
        self._reached, self._struck = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-midway", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._reached.wait(120), "the batch never got going"
        self._fault(self._struck.set)

    def jobs(self) -> Iterator:
        for index, job in enumerate(self.batch):
            if index == self.at:
                self._reached.set()
                assert self._struck.wait(120), "the fault did not strike"
            yield job

    async def finished(self) -> None:
        """Wait (bounded) for the fault's thread to end; fail if the fault never struck."""
        await asyncio.to_thread(self._thread.join, 120)
        assert not self._thread.is_alive() and self._struck.is_set()


# -- waiting for events ---------------------------------------------------------------------------

# How long a broker gets to deliver what a test waits for.
TIMEOUT = 5.0
# A RabbitMQ reconnect takes the adapter's reconnect interval (1 s) plus the restore.
RECONNECT_TIMEOUT = 15.0


async def wait_until(condition: Callable[[], bool], what: str = "the condition", timeout: float = 30.0) -> None:
    """Return as soon as ``condition()`` holds; fail, naming ``what``, if it does not within ``timeout``
    seconds. The timeout is generous on purpose: it only bounds a failure, and a fast machine never waits it."""
    give_up = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < give_up, f"{what}: not reached within {timeout:g} s"
        await asyncio.sleep(0.05)


# -- reaching into the brokers ----------------------------------------------------------------------


# Pipeline inboxes a test declared itself (tests/pipeline_support.py's Deployment.put): unlike the
# pool's queues they outlive the pool, so conftest's broker fixtures delete them after the test.
DECLARED_INBOXES: set[tuple[str, str]] = set()  # (broker URL, inbox name)


async def delete_exchanges(url: str, *names: str) -> None:
    """Delete RabbitMQ exchanges a test declared under names of its own (a pipeline's source and
    sink exchanges outlive its pool)."""
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for name in names:
            await channel.exchange_delete(name)


async def dead_letters(url: str, pool: str) -> int:
    """How many jobs of ``pool`` were dead-lettered (counted by draining its dead-letter queue
    briefly). Distinct message ids: giving a letter back may show it again within the window."""
    seen: set[str | None] = set()

    async def count(delivery):
        seen.add(delivery.message.message_id)
        await delivery.nack()
    async with open_broker(url) as broker:
        sub = await broker.consume_dead_letters(pool, count)
        await asyncio.sleep(0.5)
        await sub.cancel()
    return len(seen)


class Rabbitmqctl:
    """The local RabbitMQ node's control tool, run quietly with a timeout (blocking: use it from a thread)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, *args: str, timeout: float = 60) -> str:
        return subprocess.run([self.path, "-q", *args], check=True, capture_output=True, text=True,
                              timeout=timeout).stdout

    def json(self, *args: str) -> list[dict]:
        return json.loads(self(*args, "--formatter", "json"))

    async def close_connection(self, connection_name: str, reason: str) -> None:
        """Close the client connection named ``connection_name`` from the broker's side."""
        # Tab-separated, one connection per line; the JSON formatter's pids are not accepted back.
        listing = await asyncio.to_thread(self, "list_connections", "--no-table-headers", "pid", "client_properties")
        matches = [line.split("\t", 1)[0] for line in listing.splitlines() if connection_name in line]
        assert len(matches) == 1, f"connection {connection_name} not found on the broker"
        await asyncio.to_thread(self, "close_connection", matches[0], reason)


async def lose_connection(broker: BrokerAdapter, rabbitmqctl: Rabbitmqctl | None = None) -> None:
    """Drop the adapter's connection the way the network would, and let it recover."""
    if isinstance(broker, MemoryBroker):
        await broker.simulate_disconnect()
    elif isinstance(broker, AmqpBroker):
        if rabbitmqctl is None:
            raise ValueError("closing a RabbitMQ connection server side takes rabbitmqctl")
        await rabbitmqctl.close_connection(broker.connection_name, "test: simulated network loss")
    elif isinstance(broker, MqttBroker):
        broker.drop_connections()
    else:  # pragma: no cover - a new adapter must say how to lose its connection
        raise NotImplementedError(type(broker).__name__)


def windows(data: bytes, size: int = 24) -> list[bytes]:
    """Overlapping slices: a leak of any part of ``data`` longer than ``size`` is caught."""
    step = max(1, size // 2)
    return [data[i:i + size] for i in range(0, max(1, len(data) - size + 1), step)]

