"""Models held by a worker: chunked uploads, hash check, ONNX Runtime sessions, input checks.

A model's id is the SHA-256 of its plaintext ONNX bytes, so a producer that pins an id knows
exactly which weights ran. Uploads arrive as chunks in any order (redelivery reorders them);
a model becomes visible only once every chunk is present, the hash matches and ONNX Runtime
has loaded it.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from protocol.bodies import ErrorCode, ModelInfo
from protocol.tensors import ONNX_TYPES

from .errors import InputRejected, JobRejected, ModelRejected

MAX_CHUNK_BYTES = 8 * 1024 * 1024


@dataclass
class _Upload:
    model_id: str
    count: int
    total_size: int
    chunks: dict[int, bytes] = field(default_factory=dict)

    @property
    def received(self) -> int:
        return len(self.chunks)


@dataclass
class LoadedModel:
    info: ModelInfo
    session: ort.InferenceSession
    # name -> (wire dtype or None if enclaveq cannot carry it, shape); computed once, read per job.
    expected_inputs: dict[str, tuple[str | None, tuple]] = field(init=False)
    output_names: list[str] = field(init=False)
    # Moving average of inference time; starts pessimistic so a new model runs off the event loop.
    typical_seconds: float = 1.0

    def __post_init__(self) -> None:
        self.expected_inputs = {name: (ONNX_TYPES.get(t), shape) for name, t, shape in self.info.inputs}
        self.output_names = [name for name, _, _ in self.info.outputs]

    def record_run(self, seconds: float) -> None:
        self.typical_seconds = seconds if self.typical_seconds >= 1.0 else 0.9 * self.typical_seconds + 0.1 * seconds


def model_id_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _signature(args: list) -> tuple:
    return tuple((a.name, a.type, tuple(a.shape)) for a in args)


class ModelStore:
    """Thread-safe: inference runs in worker threads while uploads arrive on the event loop."""

    def __init__(self, *, max_model_bytes: int, intra_op_threads: int = 1) -> None:
        self.max_model_bytes = max_model_bytes
        self._intra = intra_op_threads
        self._models: dict[str, LoadedModel] = {}
        # By upload id alone, not by session: after a key rotation the producer seals the rest of
        # an upload under its new session. A stranger reusing an upload id can only spoil the
        # upload (the assembled bytes must hash to the model id), never substitute a model.
        self._uploads: dict[str, _Upload] = {}
        self._lock = threading.Lock()

    # -- loading ---------------------------------------------------------------------------
    def load(self, model_id: str, data: bytes) -> LoadedModel:
        if model_id_of(data) != model_id:
            raise ModelRejected("model bytes do not hash to the declared model id")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self._intra
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises a zoo of types; the message may quote the model
            raise ModelRejected(f"ONNX Runtime could not load the model ({type(exc).__name__})") from None
        info = ModelInfo(model_id=model_id, size=len(data), inputs=_signature(session.get_inputs()),
                         outputs=_signature(session.get_outputs()))
        loaded = LoadedModel(info=info, session=session)
        with self._lock:
            self._models[model_id] = loaded
        return loaded

    def has(self, model_id: str) -> bool:
        with self._lock:
            return model_id in self._models

    def get(self, model_id: str) -> LoadedModel:
        with self._lock:
            model = self._models.get(model_id)
        if model is None:
            raise JobRejected(f"model {model_id} is not loaded on this pool", ErrorCode.UNKNOWN_MODEL)
        return model

    def delete(self, model_id: str) -> bool:
        with self._lock:
            return self._models.pop(model_id, None) is not None

    def list(self) -> list[ModelInfo]:
        with self._lock:
            return [m.info for m in self._models.values()]

    # -- chunked upload --------------------------------------------------------------------
    def add_chunk(self, upload_id: str, model_id: str, index: int, count: int,
                  total_size: int, data: bytes) -> tuple[int, bytes | None]:
        """Store one chunk; return (chunks received, whole model bytes once complete)."""
        if total_size > self.max_model_bytes:
            raise JobRejected(f"model of {total_size} bytes exceeds the worker limit of {self.max_model_bytes}",
                              ErrorCode.OVERSIZED)
        if len(data) > MAX_CHUNK_BYTES:
            raise JobRejected(f"chunk of {len(data)} bytes exceeds {MAX_CHUNK_BYTES}", ErrorCode.OVERSIZED)
        key = upload_id
        with self._lock:
            upload = self._uploads.get(key)
            if upload is None:
                upload = self._uploads[key] = _Upload(model_id=model_id, count=count, total_size=total_size)
            if (upload.model_id, upload.count, upload.total_size) != (model_id, count, total_size):
                raise ModelRejected("chunk disagrees with the upload it belongs to")
            upload.chunks[index] = data  # a redelivered chunk simply overwrites itself
            if upload.received < upload.count:
                return upload.received, None
            del self._uploads[key]
        whole = b"".join(upload.chunks[i] for i in range(upload.count))
        if len(whole) != total_size:
            raise ModelRejected(f"model assembled to {len(whole)} bytes, declared {total_size}")
        return upload.count, whole


def check_inputs(model: LoadedModel, inputs: Mapping[str, np.ndarray], outputs: list[str] | None) -> None:
    """Refuse mismatched inputs with a precise message before ONNX Runtime sees them."""
    expected = model.expected_inputs
    if inputs.keys() != expected.keys():
        missing = sorted(set(expected) - set(inputs))
        extra = sorted(set(inputs) - set(expected))
        raise InputRejected(f"model expects inputs {sorted(expected)}; missing {missing}, unexpected {extra}")
    for name, array in inputs.items():
        want, shape = expected[name]
        if want is None:
            raise InputRejected(f"input {name!r} has a type enclaveq cannot carry")
        if array.dtype.name != want:
            raise InputRejected(f"input {name!r} must be {want}, got {array.dtype.name}")
        if len(shape) != array.ndim or any(
            isinstance(d, int) and d != got for d, got in zip(shape, array.shape)
        ):
            shown = [d if isinstance(d, int) else "?" for d in shape]
            raise InputRejected(f"input {name!r} must have shape {shown}, got {list(array.shape)}")
    if outputs is not None:
        unknown = sorted(set(outputs) - set(model.output_names))
        if unknown:
            raise InputRejected(f"model has no outputs named {unknown}; it has {sorted(model.output_names)}")


def run_model(model: LoadedModel, inputs: Mapping[str, np.ndarray], outputs: list[str] | None) -> dict[str, np.ndarray]:
    check_inputs(model, inputs, outputs)
    names = outputs or model.output_names
    try:
        values = model.session.run(names, dict(inputs))
    except Exception as exc:  # the message can quote tensor values: keep only the type
        raise JobRejected(f"ONNX Runtime failed to run the model ({type(exc).__name__})",
                          ErrorCode.INFERENCE_FAILED) from None
    return dict(zip(names, values))
