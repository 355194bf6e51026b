"""Whether an ONNX model's batch rows are independent: the static proof dynamic batching rests on.

This module owns one decision, :func:`analyse`: may jobs for this model (possibly from mutually
distrusting producers) be concatenated along axis 0 into one ONNX Runtime call and split back?
That is safe only if row ``i`` of every output depends on row ``i`` of the inputs alone: then no
job can observe another's data, and each job's result is what running it alone gives.
:mod:`enclave_worker.batcher` batches a model only when this says so.

The analysis is conservative: whatever it cannot prove row-independent it refuses, with a
one-line reason naming the node and the rule (never a tensor value: the weights are the model
owner's secret). Why the rules are sound:

- Every tensor gets one of two states. CONST: its value does not depend on any job (initializers,
  Constant nodes, and deterministic nodes all of whose inputs are CONST). ROW: axis 0 is the batch
  axis, of exactly the job's row count, and row ``i`` depends only on row ``i`` of the inputs.
  The graph inputs are ROW (they must all have the same symbolic leading dimension), and every
  graph output must be ROW. A node with a ROW input must match a rule of the allow-list below,
  which shows its outputs are ROW again; anything else is refused. By induction over the graph,
  every output row is a function of its own input row and of constants.
- A rule holds when the op computes each output row from the same input row only: elementwise
  maps; broadcasting where every ROW operand keeps axis 0 aligned with the output's and no CONST
  operand has a size > 1 along it; ops that work per sample (Conv, pooling, Softmax over another
  axis, max/min reductions that keep axis 0); reshapes that keep axis 0 in place and
  its size (row-major order then maps row ``i`` to row ``i``). Rules whose safety depends on an
  axis or a shape read it from the attribute or a CONST input and refuse when it cannot be read.
- The allow-list names no op whose result depends on the batch as a whole: reading a shape
  (Shape, Size: the batch size would enter the arithmetic), data-dependent output shapes
  (NonZero, Compress), whole-tensor statistics (DynamicQuantizeLinear), sorting across rows
  (TopK), indices flattened over the whole tensor (MaxPool's second output), randomness.
- Only the standard ONNX domain: a custom op's semantics are unknown. No subgraphs and no
  model-local functions: their bodies would need their own proof.
- The ranks the rules use come from ONNX shape inference on a copy of the graph without the
  ``value_info`` and output shapes the model declares: a model's author could declare false ranks,
  and the analysis must hold against the author too. ONNX Runtime checks the declared ranks of
  the graph inputs at run time, and ranks then follow from the ops.

What it relies on from the worker: every input of one job has the same leading dimension
(checked when a job is queued), an overridable initializer is never fed by a job (ONNX Runtime
lists only the true inputs), and an output whose leading dimension is not the batch's stops
batching (checked after each batched call).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

ROWS_ARE_INDEPENDENT = "rows are independent"


@dataclass(frozen=True)
class Batchability:
    batchable: bool
    reason: str          # one line: why not, or "rows are independent"
    batch_dim: str | None = None   # the shared dim_param of axis 0 when batchable


def analyse(model_bytes: bytes) -> Batchability:
    """Whether jobs for this model may be concatenated along axis 0 into one call. Never raises."""
    try:
        return _analyse(model_bytes)
    except _Refused as refused:
        return Batchability(False, str(refused))
    except Exception as exc:  # any bytes at all: a parser or shape inference error means "not proven"
        return Batchability(False, f"the model could not be analysed ({type(exc).__name__})")


class _Refused(Exception):
    """Not proven row-independent; the message is the one-line reason."""


DEFAULT_DOMAINS = ("", "ai.onnx")
# Values the rules read (axes, pads, shapes, scales) have at most a few elements; a tensor larger
# than this is never converted (weights stay untouched) and shape inference sees only its shape.
_MAX_VALUE_ELEMENTS = 1024
_NAME_CHARS = 64

Dims = tuple[int | str | None, ...]

_NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                               "Multinomial", "Bernoulli"})

_UNARY = frozenset({
    "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Abs", "Neg", "Sqrt", "Erf", "Cast", "CastLike", "Identity",
    "Softplus", "Softsign", "LeakyRelu", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Gelu", "Mish",
    "Clip", "Not", "Floor", "Ceil", "Round", "Reciprocal", "Sign", "IsNaN", "IsInf", "Sin", "Cos", "Tan",
    "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "ThresholdedRelu", "Shrink",
    "BitwiseNot",
})

_BROADCASTING = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Equal", "Greater",
    "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor", "Where", "PRelu", "BitShift",
    "BitwiseAnd", "BitwiseOr", "BitwiseXor",
})

_PER_SAMPLE = frozenset({
    "Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
    "GlobalLpPool", "LRN", "BatchNormalization",
})

# Only the reductions whose result does not depend on the order of their terms. ONNX Runtime's
# summing reductions (and InstanceNormalization) add a row's terms in an order that depends on the
# row's offset in memory: batched, a job's result differs from running alone in the last bits,
# depending on how many rows came before it (measured; tests/test_batchability.py). Rows stay
# independent, but a job could learn something of the others and results would not be exact.
_REDUCE = frozenset({"ReduceMax", "ReduceMin"})

_ROUNDS_BY_OFFSET = ("ONNX Runtime rounds it differently depending on the row's offset in the batch "
                     "(a job's result would depend on how many rows came before it)")

# Why the usual suspects are refused, in words a model owner can act on.
_KNOWN_MIXERS = {
    "Shape": "reads the shape of a batched tensor (the batch size would enter the computation)",
    "Size": "reads the size of a batched tensor (the batch size would enter the computation)",
    "NonZero": "its output shape depends on the data of every row",
    "Compress": "its output shape depends on the data of every row",
    "TopK": "selects across a batched tensor",
    "DynamicQuantizeLinear": "computes one scale from the whole batched tensor",
    "Range": "builds a tensor from batched values",
    "ConstantOfShape": "builds a tensor whose shape comes from batched values",
    **dict.fromkeys(("ReduceMean", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                     "ReduceLogSumExp", "ReduceSumSquare", "InstanceNormalization"), _ROUNDS_BY_OFFSET),
}


def _analyse(model_bytes: bytes) -> Batchability:
    model = onnx.load_model_from_string(model_bytes)
    graph = model.graph
    opsets = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    if not opsets:
        raise _Refused("the model imports no default-domain ONNX opset")
    if len(model.functions):
        raise _Refused("the model defines local functions (their bodies are not analysed)")
    for node in graph.node:
        if node.domain not in DEFAULT_DOMAINS:
            raise _Refused(f"{_describe(node)}: op of domain {_clip(node.domain)!r} (only the standard ONNX "
                           "domain has known semantics)")
        if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) or a.HasField("g") or len(a.graphs)
               for a in node.attribute):
            raise _Refused(f"{_describe(node)}: has a subgraph (If/Loop/Scan bodies are not analysed)")
    batch_dim = _batch_dim_of_inputs(graph)
    try:
        inferred = onnx.shape_inference.infer_shapes(_inference_copy(model), strict_mode=False)
    except Exception as exc:
        raise _Refused(f"ONNX shape inference failed ({type(exc).__name__})") from None
    _Propagation(model, inferred, max(opsets)).run()
    _check_outputs(graph, inferred.graph, batch_dim)
    return Batchability(True, ROWS_ARE_INDEPENDENT, batch_dim)


def _batch_dim_of_inputs(graph: onnx.GraphProto) -> str:
    constant = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    batch_dims = set()
    inputs = [i for i in graph.input if i.name not in constant]
    if not inputs:
        raise _Refused("the model has no input to batch")
    for value in inputs:
        dims = _dims_of(value.type)
        if dims is None or not dims:
            raise _Refused(f"input {_clip(value.name)!r} is not a tensor of known rank >= 1")
        if not isinstance(dims[0], str):
            raise _Refused(f"input {_clip(value.name)!r}: axis 0 is not a symbolic (batch) dimension")
        batch_dims.add(dims[0])
    if len(batch_dims) != 1:
        raise _Refused("the inputs do not share one symbolic leading (batch) dimension")
    return batch_dims.pop()


def _check_outputs(graph: onnx.GraphProto, inferred: onnx.GraphProto, batch_dim: str) -> None:
    inferred_dims = {o.name: _dims_of(o.type) for o in inferred.output}
    for output in graph.output:
        declared = _dims_of(output.type)
        dims = declared if declared is not None else inferred_dims.get(output.name)
        if not dims:
            raise _Refused(f"output {_clip(output.name)!r} has no known rank >= 1")
        if dims[0] is not None and dims[0] != batch_dim:
            raise _Refused(f"output {_clip(output.name)!r}: axis 0 is not the batch dimension {_clip(batch_dim)!r}")


def _inference_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph as shape inference should see it: no declared intermediate or output shapes (they
    are the author's claims, not facts), and large initializers as typed inputs (their shapes are
    what matters; copying hundreds of MiB of weights through inference would not be)."""
    graph = model.graph
    copy = onnx.ModelProto(ir_version=max(model.ir_version, 4))
    copy.opset_import.extend(model.opset_import)
    target = copy.graph
    target.name = graph.name
    target.node.extend(graph.node)
    constant = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    target.input.extend(i for i in graph.input if i.name not in constant)
    for tensor in graph.initializer:
        if _readable(tensor):
            target.initializer.append(tensor)
        else:
            target.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    for sparse in graph.sparse_initializer:
        target.input.append(helper.make_tensor_value_info(sparse.values.name, sparse.values.data_type,
                                                          list(sparse.dims)))
    for output in graph.output:
        added = target.output.add()
        added.CopyFrom(output)
        if added.type.HasField("tensor_type"):
            added.type.tensor_type.ClearField("shape")
    return copy


def _readable(tensor: TensorProto) -> bool:
    """Small enough to read, and stored in the model (external data would be read from a path)."""
    return (tensor.data_location != TensorProto.EXTERNAL
            and math.prod(tensor.dims) <= _MAX_VALUE_ELEMENTS)


def _dims_of(type_proto: onnx.TypeProto) -> Dims | None:
    if type_proto.WhichOneof("value") != "tensor_type" or not type_proto.tensor_type.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for dim in type_proto.tensor_type.shape.dim:
        kind = dim.WhichOneof("value")
        dims.append(dim.dim_value if kind == "dim_value" else dim.dim_param if kind == "dim_param" and dim.dim_param
                    else None)
    return tuple(dims)


def _clip(text: str) -> str:
    """A name from the model, fit for a one-line reason: short, and printable."""
    shown = "".join(c if c.isprintable() else "?" for c in text[:_NAME_CHARS])
    return shown if len(text) <= _NAME_CHARS else shown + "..."


def _describe(node: onnx.NodeProto) -> str:
    # repr() keeps the reason on one line whatever the name holds.
    return f"{_clip(node.op_type)} node {_clip(node.name)!r}" if node.name else f"{_clip(node.op_type)} node"


class _Propagation:
    """CONST/ROW states through the graph in node order, and the rules of the allow-list."""

    def __init__(self, model: onnx.ModelProto, inferred: onnx.ModelProto, opset: int) -> None:
        self.opset = opset
        self.graph = model.graph
        self.row: dict[str, bool] = {}
        self.dims: dict[str, Dims | None] = {}
        # Name -> where its value can be read: a small initializer or a Constant node's attribute.
        self.literals: dict[str, TensorProto | AttributeProto] = {}
        for value in (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info):
            self.dims[value.name] = _dims_of(value.type)
        for tensor in self.graph.initializer:
            self.row[tensor.name] = False
            self.dims[tensor.name] = tuple(tensor.dims)
            if _readable(tensor):
                self.literals[tensor.name] = tensor
        for sparse in self.graph.sparse_initializer:
            self.row[sparse.values.name] = False
            self.dims[sparse.values.name] = tuple(sparse.dims)
        for value in self.graph.input:
            if value.name not in self.row:
                self.row[value.name] = True
                self.dims[value.name] = _dims_of(value.type)  # the declared input shape: ONNX Runtime enforces it
        self.rules: dict[str, Callable[[onnx.NodeProto, list[str]], None]] = {
            **dict.fromkeys(_UNARY, self._unary), **dict.fromkeys(_BROADCASTING, self._broadcasting),
            **dict.fromkeys(_PER_SAMPLE, self._per_sample), **dict.fromkeys(_REDUCE, self._reduce),
            "Dropout": self._dropout, "QuantizeLinear": self._quantize, "DequantizeLinear": self._quantize,
            "MatMul": self._matmul, "Gemm": self._gemm,
            "Softmax": self._softmax, "LogSoftmax": self._softmax, "Hardmax": self._softmax,
            "LpNormalization": self._lp_normalization, "LayerNormalization": self._layer_normalization,
            "ArgMax": self._arg, "ArgMin": self._arg, "Transpose": self._transpose, "Reshape": self._reshape,
            "Flatten": self._flatten, "Squeeze": self._squeeze, "Unsqueeze": self._unsqueeze,
            "Concat": self._concat, "Split": self._split, "Slice": self._slice, "Gather": self._gather,
            "Pad": self._pad, "Expand": self._expand, "Tile": self._tile, "Resize": self._resize,
        }

    def run(self) -> None:
        for node in self.graph.node:
            inputs = list(node.input)
            for name in inputs:
                if name and name not in self.row:
                    raise _Refused(f"{_describe(node)}: reads a tensor no earlier node produces (the graph is "
                                   "not in topological order)")
            if node.op_type in _NONDETERMINISTIC or node.op_type.startswith("Random"):
                raise _Refused(f"{_describe(node)}: random")
            batched = any(name and self.row[name] for name in inputs)
            if batched:
                rule = self.rules.get(node.op_type)
                if rule is None:
                    why = _KNOWN_MIXERS.get(node.op_type, "not on the allow-list of row-independent ops")
                    raise _Refused(f"{_describe(node)}: {why}")
                rule(node, inputs)
            elif node.op_type == "Constant":
                self._constant(node)
            for name in node.output:
                if not name:
                    continue
                if name in self.row:
                    raise _Refused(f"{_describe(node)}: writes a tensor that is already defined")
                self.row[name] = batched
        for output in self.graph.output:
            if not self.row.get(output.name, False):
                raise _Refused(f"output {_clip(output.name)!r} does not depend on the batched inputs row by row")

    # -- reading the graph ------------------------------------------------------------------------

    def _constant(self, node: onnx.NodeProto) -> None:
        for attr in node.attribute:
            if attr.name in ("value", "value_int", "value_ints", "value_float", "value_floats") and node.output:
                self.literals[node.output[0]] = attr

    def refuse(self, node: onnx.NodeProto, why: str) -> _Refused:
        return _Refused(f"{_describe(node)}: {why}")

    def is_row(self, name: str) -> bool:
        return bool(name) and self.row[name]

    def rank(self, node: onnx.NodeProto, name: str) -> int:
        dims = self.dims.get(name)
        if dims is None:
            raise self.refuse(node, f"the rank of {_clip(name)!r} is unknown after shape inference")
        return len(dims)

    def leading(self, name: str) -> int | str | None:
        dims = self.dims.get(name)
        return dims[0] if dims else None

    def const(self, node: onnx.NodeProto, inputs: Sequence[str], *positions: int) -> None:
        """The inputs at ``positions`` (those present) must be CONST."""
        for i in positions:
            if i < len(inputs) and self.is_row(inputs[i]):
                raise self.refuse(node, f"input {i} must be constant, not batched")

    def values(self, node: onnx.NodeProto, name: str, what: str) -> np.ndarray:
        """The value of a CONST tensor the rule needs (axes, pads, ...), or refuse."""
        literal = self.literals.get(name) if name and not self.row[name] else None
        if literal is None:
            raise self.refuse(node, f"its {what} must be a literal constant (initializer or Constant node)")
        if isinstance(literal, TensorProto):
            return numpy_helper.to_array(literal)
        if literal.name == "value":
            if not _readable(literal.t):
                raise self.refuse(node, f"its {what} must be a small literal constant")
            return numpy_helper.to_array(literal.t)
        return np.asarray(helper.get_attribute_value(literal))

    def ints(self, node: onnx.NodeProto, name: str, what: str) -> list[int]:
        array = self.values(node, name, what)
        if array.dtype.kind not in "iu":
            raise self.refuse(node, f"its {what} must be integers")
        return [int(v) for v in array.reshape(-1)]

    def input_ints(self, node: onnx.NodeProto, inputs: Sequence[str], position: int, attr: str,
                   since: int, what: str) -> list[int] | None:
        """A list the op takes as an attribute before opset ``since`` and as an input from then on;
        None when absent."""
        if self.opset >= since:
            if position < len(inputs) and inputs[position]:
                return self.ints(node, inputs[position], what)
            return None
        found = _attr(node, attr, None)
        return None if found is None else [int(v) for v in found]

    def normalise(self, node: onnx.NodeProto, axis: int, rank: int) -> int:
        normal = axis + rank if axis < 0 else axis
        if not 0 <= normal < rank:
            raise self.refuse(node, "axis out of range")
        return normal

    def first_row_rest_const(self, node: onnx.NodeProto, inputs: Sequence[str]) -> None:
        if not self.is_row(inputs[0]):
            raise self.refuse(node, "only its first input may be batched")
        self.const(node, inputs, *range(1, len(inputs)))

    # -- the rules: each returns when every output is ROW, raises otherwise ---------------------

    def _unary(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        # Elementwise on the first input; Clip's min/max and CastLike's target are CONST.
        self.first_row_rest_const(node, inputs)

    def _dropout(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        # Inference-mode Dropout is the identity (its mask all true); training mode would be random.
        if self.opset < 7:
            raise self.refuse(node, "Dropout before opset 7 may run in training mode")
        self.first_row_rest_const(node, inputs)
        if len(inputs) > 2 and inputs[2] and any(self.values(node, inputs[2], "training_mode").reshape(-1)):
            raise self.refuse(node, "training mode is random")

    def _quantize(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        self.first_row_rest_const(node, inputs)
        if _attr(node, "block_size", 0):
            raise self.refuse(node, "blocked quantization scales follow axis 0")
        scale_rank = self.rank(node, inputs[1])
        if scale_rank == 1:
            # Per-axis: one scale per index of `axis`, which must not be the batch axis.
            if self.normalise(node, _attr(node, "axis", 1), self.rank(node, inputs[0])) == 0:
                raise self.refuse(node, "per-axis scale along the batch axis")
        elif scale_rank != 0:
            raise self.refuse(node, "scale must be per-tensor or per-axis")

    def _broadcasting(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        present = [name for name in inputs if name]
        ranks = [self.rank(node, name) for name in present]
        out = max(ranks)
        for name, rank in zip(present, ranks):
            if self.is_row(name):
                if rank != out:
                    raise self.refuse(node, "a batched operand would be broadcast off axis 0")
            elif rank == out and self.leading(name) != 1:
                raise self.refuse(node, "a constant operand is not of size 1 along the batch axis")

    def _matmul(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        a, b = inputs[0], inputs[1]
        ra, rb = self.rank(node, a), self.rank(node, b)
        if self.is_row(a) and self.is_row(b):
            if ra != rb or ra < 3:
                raise self.refuse(node, "two batched operands must be of equal rank >= 3 (batched matmul)")
        elif self.is_row(a):
            if ra < 2:
                raise self.refuse(node, "a batched rank-1 A would be contracted over the batch axis")
            # B's batch dims are right-aligned with A's: they reach axis 0 only at equal rank.
            if not (rb <= 2 or rb < ra or (rb == ra and self.leading(b) == 1)):
                raise self.refuse(node, "constant B would broadcast over the batch axis")
        else:
            if rb < 3:
                raise self.refuse(node, "a batched B of rank < 3 would be contracted over the batch axis")
            if not (ra <= 2 or ra < rb or (ra == rb and self.leading(a) == 1)):
                raise self.refuse(node, "constant A would broadcast over the batch axis")

    def _gemm(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        self.first_row_rest_const(node, inputs)
        if _attr(node, "transA", 0):
            raise self.refuse(node, "transA would contract over the batch axis")
        if len(inputs) > 2 and inputs[2]:
            c = inputs[2]
            if self.rank(node, c) == 2 and self.leading(c) != 1:
                raise self.refuse(node, "C is not of size 1 along the batch axis")

    def _per_sample(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        # Conv, pooling and batch normalisation (inference) compute each sample (axis 0) from itself.
        self.first_row_rest_const(node, inputs)
        if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
            raise self.refuse(node, "its Indices output flattens over the batch axis")
        if node.op_type == "BatchNormalization":
            if _attr(node, "training_mode", 0) or sum(1 for o in node.output if o) != 1:
                raise self.refuse(node, "training mode uses batch statistics")
            if self.opset < 7 and not _attr(node, "is_test", 0):
                raise self.refuse(node, "training mode uses batch statistics")

    def _softmax(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        # From opset 13 along one axis; before, over the 2-D coercion [d0..axis-1] x [axis..], whose
        # rows stay within a batch row exactly when axis >= 1.
        self.first_row_rest_const(node, inputs)
        axis = _attr(node, "axis", -1 if self.opset >= 13 else 1)
        if self.normalise(node, axis, self.rank(node, inputs[0])) == 0:
            raise self.refuse(node, "normalises over the batch axis")

    def _lp_normalization(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        self.first_row_rest_const(node, inputs)
        if self.normalise(node, _attr(node, "axis", -1), self.rank(node, inputs[0])) == 0:
            raise self.refuse(node, "normalises over the batch axis")

    def _layer_normalization(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        self.first_row_rest_const(node, inputs)
        if self.normalise(node, _attr(node, "axis", -1), self.rank(node, inputs[0])) == 0:
            raise self.refuse(node, "normalises over the batch axis")

    def _reduce(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        self.first_row_rest_const(node, inputs)
        since = 13 if node.op_type == "ReduceSum" else 18
        axes = self.input_ints(node, inputs, 1, "axes", since, "axes")
        if not axes:
            raise self.refuse(node, "reduces every axis, the batch axis too (axes absent or empty)")
        rank = self.rank(node, inputs[0])
        if any(self.normalise(node, a, rank) == 0 for a in axes):
            raise self.refuse(node, "reduces over the batch axis")

    def _arg(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        self.first_row_rest_const(node, inputs)
        if self.normalise(node, _attr(node, "axis", 0), self.rank(node, inputs[0])) == 0:
            raise self.refuse(node, "selects over the batch axis")

    def _transpose(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        self.first_row_rest_const(node, inputs)
        perm = _attr(node, "perm", None)
        if not perm or perm[0] != 0:
            raise self.refuse(node, "moves the batch axis (perm absent or perm[0] != 0)")

    def _reshape(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        # shape[0] == 0 copies the batch dimension; the rest regroups each row's own elements.
        self.first_row_rest_const(node, inputs)
        if self.opset >= 5:
            shape = self.ints(node, inputs[1], "shape") if len(inputs) > 1 and inputs[1] else []
        else:
            shape = [int(v) for v in _attr(node, "shape", [])]
        if not shape or shape[0] != 0 or _attr(node, "allowzero", 0):
            raise self.refuse(node, "does not keep the batch axis (needs shape[0] == 0 and allowzero 0)")

    def _flatten(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        # Only axis 1 keeps axis 0 as it is: axis k > 1 would fold d1..dk-1 into it.
        self.first_row_rest_const(node, inputs)
        rank = self.rank(node, inputs[0])
        axis = _attr(node, "axis", 1)
        if (axis + rank if axis < 0 else axis) != 1:
            raise self.refuse(node, "does not keep the batch axis (needs axis 1)")

    def _squeeze(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        self.first_row_rest_const(node, inputs)
        axes = self.input_ints(node, inputs, 1, "axes", 13, "axes")
        if not axes:
            raise self.refuse(node, "axes absent: a batch of one row would lose its batch axis")
        rank = self.rank(node, inputs[0])
        if any(self.normalise(node, a, rank) == 0 for a in axes):
            raise self.refuse(node, "removes the batch axis")

    def _unsqueeze(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        self.first_row_rest_const(node, inputs)
        axes = self.input_ints(node, inputs, 1, "axes", 13, "axes")
        if not axes:
            raise self.refuse(node, "axes absent")
        rank = self.rank(node, inputs[0]) + len(axes)
        if any(self.normalise(node, a, rank) == 0 for a in axes):
            raise self.refuse(node, "inserts an axis before the batch axis")

    def _concat(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        if not all(self.is_row(name) for name in inputs if name):
            raise self.refuse(node, "concatenates a constant with batched tensors")
        if self.normalise(node, _attr(node, "axis", 0), self.rank(node, inputs[0])) == 0:
            raise self.refuse(node, "concatenates along the batch axis")

    def _split(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        self.first_row_rest_const(node, inputs)
        if self.normalise(node, _attr(node, "axis", 0), self.rank(node, inputs[0])) == 0:
            raise self.refuse(node, "splits along the batch axis")

    def _slice(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        self.first_row_rest_const(node, inputs)
        axes = self.input_ints(node, inputs, 3, "axes", 10, "axes")
        if not axes:
            raise self.refuse(node, "axes absent: it would slice the batch axis")
        rank = self.rank(node, inputs[0])
        if any(self.normalise(node, a, rank) == 0 for a in axes):
            raise self.refuse(node, "slices the batch axis")

    def _gather(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        data, indices = inputs[0], inputs[1]
        axis = self.normalise(node, _attr(node, "axis", 0), self.rank(node, data))
        if not self.is_row(data) and axis == 0:
            return  # embedding lookup: output rows are the index rows, looked up in a constant table
        if self.is_row(data) and not self.is_row(indices) and axis != 0:
            return  # constant indices along another axis, the same for every row
        raise self.refuse(node, "gathers across the batch axis")

    def _pad(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        self.first_row_rest_const(node, inputs)
        rank = self.rank(node, inputs[0])
        if self.opset >= 11:
            pads = self.ints(node, inputs[1], "pads") if len(inputs) > 1 and inputs[1] else []
            axes_given = len(inputs) > 3 and bool(inputs[3])
            axes = self.ints(node, inputs[3], "axes") if axes_given else list(range(rank))
        else:
            pads, axes = [int(v) for v in _attr(node, "pads", [])], list(range(rank))
        if len(pads) != 2 * len(axes):
            raise self.refuse(node, "pads do not match the axes")
        for i, axis in enumerate(axes):
            if self.normalise(node, axis, rank) == 0 and (pads[i] or pads[i + len(axes)]):
                raise self.refuse(node, "pads the batch axis")

    def _expand(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        self.first_row_rest_const(node, inputs)
        rank = self.rank(node, inputs[0])
        shape = self.ints(node, inputs[1], "shape")
        if len(shape) > rank or (len(shape) == rank and shape[0] != 1):
            raise self.refuse(node, "expands along or before the batch axis")

    def _tile(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        self.first_row_rest_const(node, inputs)
        repeats = self.ints(node, inputs[1], "repeats")
        if not repeats or repeats[0] != 1:
            raise self.refuse(node, "repeats along the batch axis")

    def _resize(self, node: onnx.NodeProto, inputs: list[str]) -> None:
        self.first_row_rest_const(node, inputs)
        if _attr(node, "coordinate_transformation_mode", b"") in (b"tf_crop_and_resize", "tf_crop_and_resize"):
            raise self.refuse(node, "tf_crop_and_resize crops along every axis")
        if len(inputs) > 3 and inputs[3]:
            raise self.refuse(node, "the sizes form is not analysed (use scales)")
        position = 1 if self.opset < 11 else 2
        if position >= len(inputs) or not inputs[position]:
            raise self.refuse(node, "scales absent")
        scales = self.values(node, inputs[position], "scales").reshape(-1)
        rank = self.rank(node, inputs[0])
        axes = _attr(node, "axes", None) or list(range(rank))
        if len(scales) != len(axes):
            raise self.refuse(node, "scales do not match the axes")
        if any(self.normalise(node, int(a), rank) == 0 and s != 1 for a, s in zip(axes, scales)):
            raise self.refuse(node, "resizes the batch axis")


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default
