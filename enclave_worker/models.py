"""Models held by a worker: hash check, ONNX Runtime sessions, input checks.

A model's id is the SHA-256 of its plaintext ONNX bytes, so a producer that pins an id knows
exactly which weights ran. Uploads arrive as chunks in any order (redelivery reorders them;
:mod:`enclave_worker.uploads` assembles them); a model becomes visible only once every chunk
is present, the hash matches and ONNX Runtime has loaded it.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from protocol.bodies import ErrorCode, ModelInfo
from protocol.tensors import ONNX_TYPES, misfit

from .batchability import Batchability, analyse
from .errors import InputRejected, JobRejected, ModelRejected

log = logging.getLogger("enclaveq.worker")

NOT_ANALYSED = Batchability(False, "not analysed")


@dataclass
class LoadedModel:
    info: ModelInfo
    session: ort.InferenceSession
    # name -> (wire dtype or None if enclaveq cannot carry it, shape); computed once, read per job.
    expected_inputs: dict[str, tuple[str | None, tuple]] = field(init=False)
    output_names: list[str] = field(init=False)
    # Whether jobs for this model may share one ONNX Runtime call (see batchability.py); decided
    # once, from the graph, when the model is loaded.
    batching: Batchability = NOT_ANALYSED
    # Moving average of inference time; starts pessimistic so a new model runs off the event loop.
    typical_seconds: float = 1.0

    def __post_init__(self) -> None:
        self.expected_inputs = {name: (ONNX_TYPES.get(t), shape) for name, t, shape in self.info.inputs}
        self.output_names = [name for name, _, _ in self.info.outputs]

    @property
    def batchable(self) -> bool:
        return self.batching.batchable

    def stop_batching(self, reason: str) -> None:
        """Run this model job by job from now on (a batched call behaved unlike the analysis said)."""
        log.warning("model %s: batching turned off: %s", self.info.model_id, reason)
        self.batching = Batchability(False, reason)

    def record_run(self, seconds: float) -> None:
        self.typical_seconds = seconds if self.typical_seconds >= 1.0 else 0.9 * self.typical_seconds + 0.1 * seconds


def _custom_op_library(domain: str) -> str:
    """The shared library of a custom-operator domain, found without importing its package:
    ``import onnxruntime_extensions`` also imports its converters, which import PyTorch when it is
    installed (hundreds of MiB and seconds at every worker start, for nothing the worker runs)."""
    if domain != "ai.onnx.contrib":
        raise ValueError(f"no custom operator library for domain {domain!r}")
    spec = importlib.util.find_spec("onnxruntime_extensions")  # locates the package, runs none of it
    if spec is None or spec.origin is None:
        raise ValueError("onnxruntime-extensions is not installed")
    folder = Path(spec.origin).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        library = folder / f"_extensions_pydll{suffix}"
        if library.is_file():
            return str(library)
    raise ValueError(f"onnxruntime-extensions has no operator library in {folder}")


# ONNX Runtime's words for an operator it has no kernel for, e.g. "Could not find an implementation
# for Foo(13) node with name 'x'" or "...No Op registered for Foo with domain_version of 13"; in a
# custom domain "com.example:Foo(-1) is not a registered function/op" (the domain is named too).
_NO_KERNEL = re.compile(r"(?:implementation for |No Op registered for )([A-Za-z][A-Za-z0-9_]{0,63})"
                        r"(?:\((\d{1,4})\)| with domain_version of (\d{1,4}))?")
_NO_CUSTOM_OP = re.compile(r"([A-Za-z][A-Za-z0-9_.]{0,127}):([A-Za-z][A-Za-z0-9_]{0,63})\(-?\d{1,4}\) "
                           r"is not a registered function/op")


def _unsupported_operator(message: str) -> str:
    """": operator Foo (opset 13) is not supported by this worker", if that is why a model did not
    load; else "". Only the operator's type and version are repeated, never the rest of the message
    (which may quote the model's node names or values)."""
    custom = _NO_CUSTOM_OP.search(message)
    if custom is not None:
        return f": operator {custom.group(2)} of domain {custom.group(1)} is not supported by this worker"
    found = _NO_KERNEL.search(message)
    if found is None:
        return ""
    opset = found.group(2) or found.group(3)
    return f": operator {found.group(1)}{f' (opset {opset})' if opset else ''} is not supported by this worker"


def model_id_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _signature(args: list) -> tuple:
    return tuple((a.name, a.type, tuple(a.shape)) for a in args)


class ModelStore:
    """Thread-safe: inference runs in worker threads while uploads arrive on the event loop."""

    def __init__(self, *, max_model_bytes: int, intra_op_threads: int = 1,
                 custom_op_domains: tuple[str, ...] = ()) -> None:
        self.max_model_bytes = max_model_bytes
        self._intra = intra_op_threads
        # Resolved once: the shared library of each allowed custom-operator domain. ONNX Runtime
        # refuses to load a model that uses any other domain (unknown operators).
        self._custom_op_libraries = [_custom_op_library(domain) for domain in custom_op_domains]
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    # -- loading ---------------------------------------------------------------------------
    def load(self, model_id: str, data: bytes) -> LoadedModel:
        """:meth:`open` and :meth:`add` at once (for models whose manifest is already in force)."""
        return self.add(self.open(model_id, data))

    def open(self, model_id: str, data: bytes) -> LoadedModel:
        """Check the hash and load the model into ONNX Runtime, without serving it yet: its
        owner's manifest must be in force before any job can get it (see :meth:`add`)."""
        if model_id_of(data) != model_id:
            raise ModelRejected("model bytes do not hash to the declared model id")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self._intra
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        for library in self._custom_op_libraries:
            opts.register_custom_ops_library(library)
        try:
            session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises a zoo of types; the message may quote the model
            raise ModelRejected(f"ONNX Runtime could not load the model ({type(exc).__name__}"
                                f"{_unsupported_operator(str(exc))})") from None
        info = ModelInfo(model_id=model_id, size=len(data), inputs=_signature(session.get_inputs()),
                         outputs=_signature(session.get_outputs()))
        return LoadedModel(info=info, session=session, batching=_batching(session, data))

    def add(self, loaded: LoadedModel) -> LoadedModel:
        """Serve ``loaded`` from now on."""
        with self._lock:
            self._models[loaded.info.model_id] = loaded
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


def _batching(session: ort.InferenceSession, data: bytes) -> Batchability:
    """Whether the model's rows are independent. The graph is analysed only when every input
    has the same symbolic leading dimension, the one case batching can apply to: most models
    that cannot be batched are told apart without parsing their graph a second time."""
    leading = {tuple(arg.shape[:1]) for arg in session.get_inputs()}
    if len(leading) != 1 or not all(isinstance(d, str) and d for d in next(iter(leading))):
        return Batchability(False, "the inputs do not share a symbolic leading (batch) dimension")
    return analyse(data)


def check_inputs(model: LoadedModel, inputs: Mapping[str, np.ndarray], outputs: list[str] | None) -> None:
    """Refuse mismatched inputs with a precise message before ONNX Runtime sees them."""
    why = misfit(model.expected_inputs, inputs, subject="model")
    if why is not None:
        raise InputRejected(why)
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
