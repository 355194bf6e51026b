"""Pipelines driven at the protocol level: what tests of the worker's pipeline path share.

``Deployment`` seals pipeline definitions and events with the producer core (no SDK layer on
top), so tests pin the worker's behaviour whatever the SDK and CLI look like; ``Inbox`` records a
recipient's inbox; the tiny models make a two-stage chain ``(x + 1) * 2`` and a condition.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto, helper

from broker_adapters import Delivery, Message
from producer_sdk import AsyncClient
from producer_sdk.core import inbox_name
from protocol import bodies, crypto
from protocol.pipeline import PipelineSpec, Reference, SignedPipeline, Stage, sign_pipeline
from protocol.results import PipelineResult, open_result

from .support import DECLARED_INBOXES, TIMEOUT


def _model(op: str, constant: float, x: str, y: str, *, out_type: int = TensorProto.FLOAT) -> bytes:
    nodes = [helper.make_node(op, [x, "c"], [y])]
    graph = helper.make_graph(nodes, op, [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info(y, out_type, [1, 4])],
                              [helper.make_tensor("c", TensorProto.FLOAT, [1], [constant])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


ADD_ONE = _model("Add", 1.0, "x", "y")
DOUBLE = _model("Mul", 2.0, "y", "z")


def _over_ten() -> bytes:
    """``match`` = any(z > 10): the condition of the alerting variant."""
    nodes = [helper.make_node("Greater", ["z", "ten"], ["gt"]),
             helper.make_node("Cast", ["gt"], ["gt_i"], to=TensorProto.INT32),
             helper.make_node("ReduceMax", ["gt_i"], ["any_i"], keepdims=0),
             helper.make_node("Cast", ["any_i"], ["match"], to=TensorProto.BOOL)]
    graph = helper.make_graph(nodes, "over_ten", [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("match", TensorProto.BOOL, [])],
                              [helper.make_tensor("ten", TensorProto.FLOAT, [1], [10.0])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


OVER_TEN = _over_ten()


def directly(x: np.ndarray) -> np.ndarray:
    return (x + 1) * 2


@dataclass
class Deployment:
    """A worker, a producer client (the pipeline's owner and publisher), one recipient key."""

    client: AsyncClient
    worker: object
    pool: str
    owner: object
    recipient: object = field(default_factory=crypto.generate_private_key)

    @property
    def broker(self):
        return self.client._broker

    @property
    def core(self):
        return self.client._core

    def spec(self, *, when: bool = False, **overrides) -> PipelineSpec:
        add, dbl = sha(ADD_ONE), sha(DOUBLE)
        stages = [Stage("one", add, (("x", Reference("event", "x")),)),
                  Stage("two", dbl, (("y", Reference("one", "y")),))]
        if when:
            stages.append(Stage("check", sha(OVER_TEN), (("z", Reference("two", "z")),)))
        fields = dict(name="chain", source_topic=f"sensors/{self.pool}/x", sink_topic=f"results/{self.pool}",
                      stages=tuple(stages), outputs=(("z", Reference("two", "z")),),
                      when=Reference("check", "match") if when else None,
                      recipients=(crypto.public_bytes(self.recipient),))
        fields.update(overrides)
        return PipelineSpec(**fields)

    def inbox(self, signed: SignedPipeline, key=None) -> str:
        key = key or self.recipient
        return inbox_name(self.pool, signed.pipeline_id, crypto.public_bytes(key))

    async def put(self, spec: PipelineSpec, *, owner=None, issued_ms: int | None = None) -> tuple[SignedPipeline, object]:
        signed = sign_pipeline(spec, owner or self.owner, issued_ms or int(time.time() * 1000))
        await self.broker.declare_stream(self.pool, signed.pipeline_id, spec.source_topic,
                                         exchange=spec.source_exchange)
        for recipient in spec.recipients:
            inbox = inbox_name(self.pool, signed.pipeline_id, recipient)
            if not self.client.broker_url.startswith("memory:"):  # the in-process broker goes with the process
                DECLARED_INBOXES.add((self.client.broker_url, inbox))
            await self.broker.declare_inbox(inbox, spec.sink_topic, exchange=spec.sink_exchange)
        outcome = await self.client._request(lambda: self.core._seal(
            "pipeline_put", signed.to_bytes(), timeout=TIMEOUT, content_type=bodies.PIPELINE), TIMEOUT)
        return signed, outcome

    async def put_after_uploads(self, spec: PipelineSpec) -> tuple[SignedPipeline, object]:
        """:meth:`put` on a pool of several worker processes right after uploading its models: a
        worker that has not received an upload yet refuses the definition (``unknown_model``), and
        it is sent again briefly, as ``AsyncClient.create_pipeline`` does."""
        signed, outcome = await self.put(spec)
        for retry in range(5):
            if outcome.ok or outcome.error().code != "unknown_model":  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.1 * 2**retry)
            signed, outcome = await self.put(spec)
        return signed, outcome

    def event(self, signed: SignedPipeline, event_id: str, inputs, *, ttl: float = TIMEOUT) -> tuple[str, Message]:
        request = self.core._seal("event", bodies.encode_event(signed.pipeline_id, event_id, inputs),
                                  timeout=ttl, content_type=bodies.EVENT, topic=signed.spec.source_topic)
        message = Message(body=request.body, correlation_id=request.job_id, reply_to=self.core.reply_to,
                          message_id=request.job_id)
        return request.job_id, message

    async def publish(self, signed: SignedPipeline, event_id: str, inputs, *, ttl: float = TIMEOUT) -> str:
        job_id, message = self.event(signed, event_id, inputs, ttl=ttl)
        await self.broker.publish_event(signed.spec.source_topic, message, exchange=signed.spec.source_exchange)
        return job_id

    def trusted_key(self, epoch: int) -> bytes | None:
        keyring = self.worker.keyring
        return keyring.public_key if epoch == keyring.epoch else None


def sha(model: bytes) -> str:
    return hashlib.sha256(model).hexdigest()


class Inbox:
    """Everything a recipient's inbox receives, raw, acked."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.raw.append(delivery.message.body)
        await delivery.ack()


def opened(d: Deployment, raw: bytes, key=None) -> PipelineResult:
    return open_result(raw, key or d.recipient, d.trusted_key, pool=d.pool)


