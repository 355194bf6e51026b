"""Test building blocks: tiny ONNX models made with onnx.helper, simulated TEEs, in-process workers."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from attestation.policy import Policy
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
