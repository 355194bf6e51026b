"""Plaintext bodies inside sealed envelopes, by content type.

    tensors/v1   msgpack {"tensors": [[name, dtype, shape, data], ...], "outputs": [names] | nil}
    error/v1     msgpack {"code": str, "message": str}        -- status "error" results
    models/v1    msgpack {"models": [{"id", "size", "inputs", "outputs"}]}
    ack/v1       msgpack {"model_id": str | nil, "received": int, "complete": bool}
    empty/v1     msgpack {}
    rotate/v1    msgpack {"grace_seconds": int}                -- pool_rotate requests
    rotated/v1   msgpack {"epoch": int, "retire_at_ms": int}  -- their answer
    bytes/v1     raw bytes
    model-chunk/v1  msgpack {"manifest": bin (owner-signed ModelManifest), "data": bin}
    delete-order/v1 an owner-signed DeleteOrder (protocol.ownership)
    pipeline/v1     an owner-signed pipeline definition (protocol.pipeline.SignedPipeline)
    pipeline-delete/v1  an owner-signed PipelineDelete
    pipelines/v1    msgpack {"pipelines": [{"id", "name", "owner", "issued_ms", "source", "sink",
                    "models": [ids], "recipients": int}]}
    event/v1        msgpack {"pipeline": id, "event": id, "tensors": [[name, dtype, shape, data], ...]}
    member-status/v1  msgpack {"worker", "platform", "measurement": bin, "epoch", "models": [ids],
                    "model_count", "pipelines", "in_flight", "max_in_flight", "ok", "failed",
                    "uptime_s", "max_batch_rows", "ready": bool}  -- one member's pool_status answer
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from collections.abc import Mapping, Sequence

import numpy as np

from .codec import bounded_str, field, pack, unpack
from .errors import MalformedMessage
from .results import EVENT_ID_PATTERN
from .tensors import MAX_NAME_LEN, MAX_RANK, MAX_TENSORS, TensorLimits, decode_tensors, encode_tensors

TENSORS = "tensors/v1"
ERROR = "error/v1"
MODELS = "models/v1"
ACK = "ack/v1"
EMPTY = "empty/v1"
BYTES = "bytes/v1"
MODEL_CHUNK = "model-chunk/v1"
DELETE_ORDER = "delete-order/v1"
ROTATE = "rotate/v1"
ROTATED = "rotated/v1"
PIPELINE = "pipeline/v1"
PIPELINE_DELETE = "pipeline-delete/v1"
PIPELINES = "pipelines/v1"
EVENT = "event/v1"
MEMBER_STATUS = "member-status/v1"


# Structural limits of each body (see protocol.limits). Bodies are decoded only once their
# envelope opened, but anyone who attested the pool can open a session and seal a job, so the
# worker's limits fit the exact shape; the producer's (result bodies) are authenticated by its
# session key, which only the producer and the pool's workers hold.
# A tensor is [name, dtype, shape, data] with at most MAX_RANK dimensions: 5 + MAX_RANK objects.
_TENSOR_ITEMS = 5 + MAX_RANK
# {"tensors": [...], "outputs": [names] | nil}, nested map > list > tensor > shape: the map, its
# 2 keys and 2 lists, MAX_TENSORS tensors and as many output names.
JOB_BODY_ITEMS = 1 + 2 + 2 + MAX_TENSORS * _TENSOR_ITEMS + MAX_TENSORS
# {"tensors": [...]}: the map, its key, the list and the tensors.
TENSORS_BODY_ITEMS = 1 + 1 + 1 + MAX_TENSORS * _TENSOR_ITEMS
# A flat map of a few scalar fields (error, ack, rotate, rotated, model chunk).
_FLAT_FIELDS = 8
FLAT_BODY_ITEMS = 1 + 2 * _FLAT_FIELDS
# models/v1 from a pool member: map > list > model map > inputs list > [name, type, shape] > shape.
MODEL_LIST_ITEMS = 1 << 19
MODEL_LIST_CONTAINER_LEN = 1 << 16


class ErrorCode:
    """Stable codes of encrypted error results; the SDK maps each to an exception type."""

    DOES_NOT_OPEN = "does_not_open"
    EXPIRED = "expired"
    UNKNOWN_MODEL = "unknown_model"
    MODEL_INVALID = "model_invalid"
    BAD_INPUT = "bad_input"
    OVERSIZED = "oversized"
    INFERENCE_FAILED = "inference_failed"
    UNSUPPORTED = "unsupported"
    INTERNAL = "internal"
    ROTATION_REFUSED = "rotation_refused"
    BAD_SIGNATURE = "bad_signature"      # an upload or delete whose owner signature does not verify
    NOT_OWNER = "not_owner"              # replace or delete by a key that does not own the model
    NOT_ALLOWED = "not_allowed"          # the model's owner did not allow this producer's key
    STALE_ORDER = "stale_order"          # a manifest or delete order older than the one in force
    UNKNOWN_PIPELINE = "unknown_pipeline"  # an event or delete for a pipeline the pool does not hold
    PIPELINE_INVALID = "pipeline_invalid"  # a definition that does not parse or does not type-check
    FRAME_FULL = "frame_full"            # a framed job whose result did not fit in its frame's answer


def encode_job(inputs: Mapping[str, Any], outputs: Sequence[str] | None = None) -> bytes:
    return pack({"tensors": encode_tensors(inputs), "outputs": list(outputs) if outputs is not None else None})


def decode_job(body: bytes, limits: TensorLimits = TensorLimits()) -> tuple[dict[str, np.ndarray], list[str] | None]:
    m = unpack(body, max_bytes=limits.max_total_bytes + 1024 * 1024, what="job body", max_depth=4,
               max_items=JOB_BODY_ITEMS, max_container_len=MAX_TENSORS, max_str_len=4 * MAX_NAME_LEN)
    if not isinstance(m, dict):
        raise MalformedMessage("job body: expected a map")
    outputs = m.get("outputs")
    if outputs is not None and not (isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)):
        raise MalformedMessage("job body: outputs must be a list of names")
    return decode_tensors(m.get("tensors"), limits), outputs


def encode_tensors_body(tensors: Mapping[str, Any]) -> bytes:
    return pack({"tensors": encode_tensors(tensors)})


def decode_tensors_body(body: bytes, limits: TensorLimits = TensorLimits()) -> dict[str, np.ndarray]:
    m = unpack(body, max_bytes=limits.max_total_bytes + 1024 * 1024, what="result body", max_depth=4,
               max_items=TENSORS_BODY_ITEMS, max_container_len=MAX_TENSORS, max_str_len=4 * MAX_NAME_LEN)
    if not isinstance(m, dict):
        raise MalformedMessage("result body: expected a map")
    return decode_tensors(m.get("tensors"), limits)


@dataclass(frozen=True)
class ErrorBody:
    code: str
    message: str

    def to_bytes(self) -> bytes:
        return pack({"code": self.code, "message": self.message})

    @classmethod
    def from_bytes(cls, body: bytes) -> ErrorBody:
        m = unpack(body, max_bytes=16384, what="error body", max_depth=1, max_items=FLAT_BODY_ITEMS)
        if not isinstance(m, dict):
            raise MalformedMessage("error body: expected a map")
        return cls(code=bounded_str(m, "code", what="error body", max_len=64),
                   message=bounded_str(m, "message", what="error body", max_len=4096))


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    size: int
    inputs: tuple[tuple[str, str, tuple[Any, ...]], ...]   # (name, onnx type, shape with None/str for dynamic dims)
    outputs: tuple[tuple[str, str, tuple[Any, ...]], ...]


def encode_models(models: Sequence[ModelInfo]) -> bytes:
    return pack({"models": [
        {"id": m.model_id, "size": m.size,
         "inputs": [[n, t, list(s)] for n, t, s in m.inputs],
         "outputs": [[n, t, list(s)] for n, t, s in m.outputs]}
        for m in models
    ]})


def decode_models(body: bytes) -> list[ModelInfo]:
    m = unpack(body, max_bytes=4 * 1024 * 1024, what="model list", max_depth=6, max_items=MODEL_LIST_ITEMS,
               max_container_len=MODEL_LIST_CONTAINER_LEN)
    if not isinstance(m, dict) or not isinstance(m.get("models"), list):
        raise MalformedMessage("model list: expected a map with a list")
    out = []
    for item in m["models"]:
        if not isinstance(item, dict):
            raise MalformedMessage("model list: entries must be maps")
        def io(key: str, item: dict[str, Any] = item) -> tuple[tuple[str, str, tuple[Any, ...]], ...]:
            v = item.get(key)
            if not isinstance(v, list) or not all(
                    isinstance(e, list) and len(e) == 3 and isinstance(e[2], list) for e in v):
                raise MalformedMessage(f"model list: {key} must be a list of [name, type, shape]")
            return tuple((str(n), str(t), tuple(s)) for n, t, s in v)
        out.append(ModelInfo(model_id=bounded_str(item, "id", what="model list", max_len=64),
                             size=field(item, "size", int, what="model list"),
                             inputs=io("inputs"), outputs=io("outputs")))
    return out


def encode_ack(model_id: str | None, received: int, complete: bool) -> bytes:
    return pack({"model_id": model_id, "received": received, "complete": complete})


def decode_ack(body: bytes) -> dict[str, Any]:
    m = unpack(body, max_bytes=4096, what="ack", max_depth=1, max_items=FLAT_BODY_ITEMS)
    if not isinstance(m, dict):
        raise MalformedMessage("ack: expected a map")
    return m


def encode_rotate(grace_seconds: int) -> bytes:
    return pack({"grace_seconds": grace_seconds})


def decode_rotate(body: bytes) -> int:
    m = unpack(body, max_bytes=1024, what="rotate request", max_depth=1, max_items=FLAT_BODY_ITEMS)
    if not isinstance(m, dict):
        raise MalformedMessage("rotate request: expected a map")
    grace: int = field(m, "grace_seconds", int, what="rotate request")
    if grace < 0:
        raise MalformedMessage("rotate request: negative grace period")
    return grace


def encode_rotated(epoch: int, retire_at_ms: int) -> bytes:
    return pack({"epoch": epoch, "retire_at_ms": retire_at_ms})


def decode_rotated(body: bytes) -> tuple[int, int]:
    m = unpack(body, max_bytes=1024, what="rotate answer", max_depth=1, max_items=FLAT_BODY_ITEMS)
    if not isinstance(m, dict):
        raise MalformedMessage("rotate answer: expected a map")
    return field(m, "epoch", int, what="rotate answer"), field(m, "retire_at_ms", int, what="rotate answer")


def encode_model_chunk(signed_manifest: bytes, data: bytes) -> bytes:
    return pack({"manifest": signed_manifest, "data": data})


def decode_model_chunk(body: bytes, *, max_bytes: int) -> tuple[bytes, bytes]:
    m = unpack(body, max_bytes=max_bytes, what="model chunk", max_depth=1, max_items=FLAT_BODY_ITEMS)
    if not isinstance(m, dict):
        raise MalformedMessage("model chunk: expected a map")
    return field(m, "manifest", bytes, what="model chunk"), field(m, "data", bytes, what="model chunk")


# -- pipelines ---------------------------------------------------------------------------------
# {"pipeline": id, "event": id, "tensors": [...]}: the map, 3 keys, the list and the tensors.
EVENT_BODY_ITEMS = 1 + 3 + 1 + MAX_TENSORS * _TENSOR_ITEMS
MAX_PIPELINES_LISTED = 1024
# Elements of all string tensors of one event (raw text is usually one).
MAX_STRINGS = 65_536


def encode_event(pipeline_id: str, event_id: str, inputs: Mapping[str, Any]) -> bytes:
    return pack({"pipeline": pipeline_id, "event": event_id, "tensors": encode_tensors(inputs)})


def decode_event(body: bytes, limits: TensorLimits = TensorLimits()) -> tuple[str, str, dict[str, np.ndarray]]:
    m = unpack(body, max_bytes=limits.max_total_bytes + 1024 * 1024, what="event body", max_depth=4,
               max_items=EVENT_BODY_ITEMS + MAX_STRINGS, max_container_len=MAX_STRINGS,
               max_str_len=limits.max_tensor_bytes)
    if not isinstance(m, dict):
        raise MalformedMessage("event body: expected a map")
    pipeline_id = field(m, "pipeline", str, what="event body")
    event_id = field(m, "event", str, what="event body")
    if len(pipeline_id) != 64 or not EVENT_ID_PATTERN.fullmatch(event_id):
        raise MalformedMessage("event body: the pipeline id or the event id is malformed")
    return pipeline_id, event_id, decode_tensors(m.get("tensors"), limits)


@dataclass(frozen=True)
class PipelineInfo:
    pipeline_id: str
    name: str
    owner: str  # hex Ed25519 public key
    issued_ms: int
    source: str
    sink: str
    models: tuple[str, ...]
    recipients: int
    # What an event must carry: (name, wire dtype, shape; None dims are symbolic), from the type
    # check against the stage models when the pipeline was installed.
    event_inputs: tuple[tuple[str, str, tuple[int | None, ...] | None], ...] = ()
    # The AMQP topic exchanges of the source and the sink (MQTT has one topic space).
    source_exchange: str = "enclaveq.events"
    sink_exchange: str = "enclaveq.results"


def encode_pipelines(pipelines: Sequence[PipelineInfo]) -> bytes:
    return pack({"pipelines": [{"id": p.pipeline_id, "name": p.name, "owner": p.owner, "issued_ms": p.issued_ms,
                                "source": p.source, "sink": p.sink, "models": list(p.models),
                                "recipients": p.recipients,
                                "inputs": [[n, d, None if shape is None else list(shape)] for n, d, shape in p.event_inputs],
                                "source_exchange": p.source_exchange, "sink_exchange": p.sink_exchange}
                               for p in pipelines[:MAX_PIPELINES_LISTED]]})


def decode_pipelines(body: bytes) -> list[PipelineInfo]:
    m = unpack(body, max_bytes=16 * 1024 * 1024, what="pipeline list", max_depth=6,
               max_items=MAX_PIPELINES_LISTED * 400, max_container_len=MAX_PIPELINES_LISTED, max_str_len=1024)
    items = m.get("pipelines") if isinstance(m, dict) else None
    if not isinstance(items, list):
        raise MalformedMessage("pipeline list: expected a list")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise MalformedMessage("pipeline list: expected maps")
        models = item.get("models")
        if not (isinstance(models, list) and all(isinstance(x, str) for x in models)):
            raise MalformedMessage("pipeline list: models must be a list of ids")
        raw_inputs = item.get("inputs", [])
        if not isinstance(raw_inputs, list):
            raise MalformedMessage("pipeline list: inputs must be a list")
        inputs = []
        for entry in raw_inputs:
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                    and isinstance(entry[1], str) and (entry[2] is None or (isinstance(entry[2], list) and all(
                        d is None or (isinstance(d, int) and not isinstance(d, bool)) for d in entry[2])))):
                raise MalformedMessage("pipeline list: an input must be [name, dtype, shape]")
            inputs.append((entry[0], entry[1], None if entry[2] is None else tuple(entry[2])))
        out.append(PipelineInfo(
            pipeline_id=field(item, "id", str, what="pipeline list"), name=field(item, "name", str, what="pipeline list"),
            owner=field(item, "owner", str, what="pipeline list"), issued_ms=field(item, "issued_ms", int, what="pipeline list"),
            source=field(item, "source", str, what="pipeline list"), sink=field(item, "sink", str, what="pipeline list"),
            models=tuple(models), recipients=field(item, "recipients", int, what="pipeline list"),
            event_inputs=tuple(inputs),
            source_exchange=field(item, "source_exchange", str, what="pipeline list", optional=True) or "enclaveq.events",
            sink_exchange=field(item, "sink_exchange", str, what="pipeline list", optional=True) or "enclaveq.results"))
    return out


# -- pool status -------------------------------------------------------------------------------
# A pool_status request (body empty/v1) is broadcast; every member answers with its own
# member-status/v1. Only a pool member can seal one (it is a result under the producer's
# session), but a member may be buggy or compromised, so the producer decodes each answer with
# limits fitted to its exact shape and refuses anything else: the SDK skips (and counts) it.
MAX_STATUS_MODELS = 1024        # model ids listed per member ("model_count" still counts them all)
MAX_WORKER_ID_LEN = 256
MAX_PLATFORM_LEN = 32
MAX_MEASUREMENT_BYTES = 64      # 32 (sim, SGX MRENCLAVE) or 48 (SEV-SNP, TDX MRTD)
_STATUS_FIELDS = 16             # 14 today; a few more from a newer worker are read past
# The map, its keys and scalar values, and the model id list with its ids.
MEMBER_STATUS_ITEMS = 1 + 2 * _STATUS_FIELDS + MAX_STATUS_MODELS
MEMBER_STATUS_MAX_BYTES = 96 * 1024  # 1024 ids of 66 bytes plus the scalars
_MAX_COUNT = (1 << 63) - 1
_MODEL_ID = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class MemberStatus:
    """One pool member's answer to a ``pool_status`` request: who it is, what it serves, its load.

    ``model_ids`` are the models this producer's session may see (what ``model_list`` shows it),
    at most :data:`MAX_STATUS_MODELS`; ``model_count`` counts them all. Jobs are counted as the
    member ran them since it started serving (each job of a frame, and each pipeline event,
    counts as one); requests refused before running (expired, replayed) are not counted."""

    worker_id: str
    platform: str
    measurement: bytes
    epoch: int
    model_count: int
    model_ids: tuple[str, ...]
    pipelines: int
    jobs_in_flight: int
    max_jobs_in_flight: int
    jobs_ok: int
    jobs_failed: int
    uptime_seconds: int
    max_batch_rows: int
    ready: bool

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the measurement in hex)."""
        return {"worker": self.worker_id, "platform": self.platform, "measurement": self.measurement.hex(),
                "epoch": self.epoch, "ready": self.ready, "model_count": self.model_count,
                "models": list(self.model_ids), "pipelines": self.pipelines, "jobs_in_flight": self.jobs_in_flight,
                "max_jobs_in_flight": self.max_jobs_in_flight, "jobs_ok": self.jobs_ok,
                "jobs_failed": self.jobs_failed, "uptime_seconds": self.uptime_seconds,
                "max_batch_rows": self.max_batch_rows}


def encode_member_status(status: MemberStatus) -> bytes:
    ids = sorted(status.model_ids)[:MAX_STATUS_MODELS]
    return pack({"worker": status.worker_id[:MAX_WORKER_ID_LEN], "platform": status.platform[:MAX_PLATFORM_LEN],
                 "measurement": status.measurement[:MAX_MEASUREMENT_BYTES], "epoch": status.epoch,
                 "models": ids, "model_count": max(status.model_count, len(ids)), "pipelines": status.pipelines,
                 "in_flight": status.jobs_in_flight, "max_in_flight": status.max_jobs_in_flight,
                 "ok": status.jobs_ok, "failed": status.jobs_failed, "uptime_s": status.uptime_seconds,
                 "max_batch_rows": status.max_batch_rows, "ready": status.ready})


def decode_member_status(body: bytes) -> MemberStatus:
    """One member's status; ``MalformedMessage``/``OversizedMessage`` for anything that is not
    exactly a member-status/v1 body within its limits (the SDK then skips the answer)."""
    what = "member status"
    m = unpack(body, max_bytes=MEMBER_STATUS_MAX_BYTES, what=what, max_depth=2, max_items=MEMBER_STATUS_ITEMS,
               max_container_len=MAX_STATUS_MODELS, max_str_len=MAX_WORKER_ID_LEN * 4)
    if not isinstance(m, dict):
        raise MalformedMessage(f"{what}: expected a map")

    def text(name: str, max_len: int) -> str:
        # Shown in a terminal: no control characters (escape sequences), nothing empty.
        value = bounded_str(m, name, what=what, max_len=max_len)
        if not value or not value.isprintable():
            raise MalformedMessage(f"{what}: field {name!r} must be printable text")
        return value

    def count(name: str) -> int:
        value: int = field(m, name, int, what=what)
        if not 0 <= value <= _MAX_COUNT:
            raise MalformedMessage(f"{what}: field {name!r} out of range")
        return value

    measurement: bytes = field(m, "measurement", bytes, what=what)
    if not 0 < len(measurement) <= MAX_MEASUREMENT_BYTES:
        raise MalformedMessage(f"{what}: the measurement must be 1..{MAX_MEASUREMENT_BYTES} bytes")
    models = m.get("models")
    if not isinstance(models, list) or not all(isinstance(i, str) and _MODEL_ID.fullmatch(i) for i in models):
        raise MalformedMessage(f"{what}: models must be a list of model ids (64 lowercase hex)")
    ready = m.get("ready")
    if not isinstance(ready, bool):
        raise MalformedMessage(f"{what}: field 'ready' must be a boolean")
    status = MemberStatus(
        worker_id=text("worker", MAX_WORKER_ID_LEN), platform=text("platform", MAX_PLATFORM_LEN),
        measurement=measurement, epoch=count("epoch"), model_count=count("model_count"), model_ids=tuple(models),
        pipelines=count("pipelines"), jobs_in_flight=count("in_flight"), max_jobs_in_flight=count("max_in_flight"),
        jobs_ok=count("ok"), jobs_failed=count("failed"), uptime_seconds=count("uptime_s"),
        max_batch_rows=count("max_batch_rows"), ready=ready)
    if status.model_count < len(status.model_ids):
        raise MalformedMessage(f"{what}: model_count is below the number of model ids listed")
    return status
