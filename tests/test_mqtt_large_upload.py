"""A model larger than the MQTT broker's packet limit uploads in sealed chunks and runs.

The broker announces ``max_packet_size`` 8 MiB in its CONNACK; the 40 MiB model could never be one
PUBLISH, and the adapter refuses anything above the limit before sending it. The SDK's 4 MiB
chunks pass, the worker reassembles them, and its results equal direct onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from broker_adapters import Message, PublishFailed
from producer_sdk import AsyncClient

from .mosquitto import PrivateMosquitto
from .support import running_worker

pytestmark = pytest.mark.mosquitto
MiB = 1024 * 1024


def forty_mib_model() -> bytes:
    rng = np.random.default_rng(40)
    table = (rng.integers(-8, 9, (2560, 4096), dtype=np.int8).astype(np.float32)) * 0.125  # 40 MiB
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
         helper.make_node("ReduceSum", ["rows"], ["total"], axes=None, keepdims=0)],
        "forty", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, [])],
        initializer=[numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


async def test_a_model_above_the_brokers_packet_limit_uploads_in_chunks_and_runs(tee, tmp_path, unique_name):
    broker = PrivateMosquitto(tmp_path / "mosquitto", extra=f"max_packet_size {8 * MiB}\n").start()
    try:
        model = forty_mib_model()
        assert len(model) > 5 * 8 * MiB // 2
        async with running_worker(tee, broker.url, unique_name):
            async with AsyncClient(broker.url, unique_name, tee.policy(), timeout=120) as client:
                with pytest.raises(PublishFailed, match="maximum packet size"):
                    await client._broker.publish_job(unique_name, Message(body=model))
                model_id = await client.upload_model(model)
                ids = np.array([0, 7, 2559], dtype=np.int64)
                got = await client.run(model_id, {"ids": ids})
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        assert np.array_equal(got["total"], session.run(None, {"ids": ids})[0])
    finally:
        broker.stop()
