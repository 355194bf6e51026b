"""Dynamic batching (issue 12): jobs for one model share an ONNX Runtime call, and no job can tell.

Every sentence compares against the model run alone on the job's own inputs, with
``assert_array_equal``: a batched job's result is bit for bit what running it alone gives. (The
models here are row-wise maps; ONNX Runtime's CPU kernels compute each output row from its own
input row with the same instruction sequence whatever the batch, so no tolerance is needed, and
none is allowed: a tolerance would hide a row that another job's data moved.)
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from enclave_worker.batcher import Batcher, BatchSettings
from enclave_worker.config import DEFAULT_WORKER_CONFIG, WorkerConfig
from enclave_worker.errors import InputRejected, JobRejected
from enclave_worker.models import LoadedModel, ModelStore, model_id_of
from producer_sdk import AsyncClient, FrameSettings

from .support import every_dtype_model, run_directly, running_worker, sample_every_dtype_inputs


def _model(nodes, inputs, outputs, initializers=()) -> bytes:
    model = helper.make_model(helper.make_graph(nodes, "m", inputs, outputs, initializer=list(initializers)),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def rowwise_model(width: int = 4) -> bytes:
    """x[n, width] -> probs = softmax(x @ W + b), label = argmax: each row its own."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((width, 5)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    return _model(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["z"]),
         helper.make_node("Softmax", ["z"], ["probs"], axis=-1),
         helper.make_node("ArgMax", ["z"], ["label"], axis=1, keepdims=0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 5]),
         helper.make_tensor_value_info("label", TensorProto.INT64, ["n"])],
        [helper.make_tensor("W", TensorProto.FLOAT, [width, 5], w.flatten().tolist()),
         helper.make_tensor("b", TensorProto.FLOAT, [5], b.tolist())])


def row_mixing_model() -> bytes:
    """y = x - mean(x over the batch axis): each row depends on every other row."""
    return _model(
        [helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1), helper.make_node("Sub", ["x", "m"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])


def lookup_model() -> bytes:
    """ids[n] int64 -> rows of a 10 x 3 table: an id out of range fails the call that carries it."""
    table = np.arange(30, dtype=np.float32).reshape(10, 3)
    return _model([helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)],
                  [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
                  [helper.make_tensor("table", TensorProto.FLOAT, [10, 3], table.flatten().tolist())])


def load(data: bytes) -> LoadedModel:
    return ModelStore(max_model_bytes=1 << 20).load(model_id_of(data), data)


def rows(n: int, width: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)}


class Calls:
    """Rows per ONNX Runtime call, as the worker's metric sees them."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def __call__(self, n: int) -> None:
        self.rows.append(n)


def keep(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: value.copy() for name, value in outputs.items()}


def assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


# -- the batcher on its own -----------------------------------------------------------------------
async def test_jobs_queued_together_run_as_one_call_and_each_gets_exactly_its_own_result():
    model, calls = load(rowwise_model()), Calls()
    batcher = Batcher(BatchSettings(runners=1), on_batch=calls)
    jobs = [rows(1 + i % 3, seed=i) for i in range(12)]
    try:
        results = await asyncio.gather(*(batcher.run(model, job, None, keep) for job in jobs))
    finally:
        batcher.close()
    assert calls.rows == [sum(1 + i % 3 for i in range(12))]
    for job, got in zip(jobs, results):
        assert_same(got, run_directly(rowwise_model(), job))


async def test_a_model_whose_rows_depend_on_each_other_is_never_batched():
    # Batched, job A's result would be moved by job B's data: B could read A through its result.
    model, calls = load(row_mixing_model()), Calls()
    assert not model.batchable and "ReduceMean" in model.batching.reason
    batcher = Batcher(BatchSettings(runners=1), on_batch=calls)
    jobs = [rows(3, seed=i) for i in range(6)]
    try:
        results = await asyncio.gather(*(batcher.run(model, job, None, keep) for job in jobs))
    finally:
        batcher.close()
    assert calls.rows == [3] * 6
    for job, got in zip(jobs, results):
        assert_same(got, run_directly(row_mixing_model(), job))


async def test_jobs_of_different_models_shapes_or_outputs_never_share_a_call():
    narrow, wide, calls = load(rowwise_model(4)), load(rowwise_model(6)), Calls()
    batcher = Batcher(BatchSettings(runners=1), on_batch=calls)
    work = [(narrow, rows(2, 4, seed=1), None), (wide, rows(2, 6, seed=2), None),
            (narrow, rows(1, 4, seed=3), ["label"]), (narrow, rows(3, 4, seed=4), None),
            (wide, rows(1, 6, seed=5), None), (narrow, rows(2, 4, seed=6), ["label"])]
    try:
        results = await asyncio.gather(*(batcher.run(m, job, outputs, keep) for m, job, outputs in work))
    finally:
        batcher.close()
    # One call per (model, outputs asked for): 2+3 rows, 2+1 rows, 1+2 rows.
    assert sorted(calls.rows) == [3, 3, 5]
    for (m, job, outputs), got in zip(work, results):
        expected = run_directly(rowwise_model(4 if m is narrow else 6), job)
        assert_same(got, {k: v for k, v in expected.items() if outputs is None or k in outputs})


async def test_every_dtype_batches_and_comes_back_unchanged():
    model, calls = load(every_dtype_model()), Calls()
    assert model.batchable, model.batching.reason
    batcher = Batcher(BatchSettings(runners=1), on_batch=calls)
    jobs = [sample_every_dtype_inputs(rows=1 + n % 2, seed=n) for n in range(5)]
    try:
        results = await asyncio.gather(*(batcher.run(model, job, None, keep) for job in jobs))
    finally:
        batcher.close()
    assert calls.rows == [sum(1 + n % 2 for n in range(5))]
    for job, got in zip(jobs, results):
        assert_same(got, run_directly(every_dtype_model(), job))


async def test_a_job_whose_data_fails_the_batched_call_fails_alone():
    model = load(lookup_model())
    batcher = Batcher(BatchSettings(runners=1))
    ids = [np.array([1, 2]), np.array([3, 99]), np.array([9])]  # 99: out of the table
    try:
        results = await asyncio.gather(*(batcher.run(model, {"ids": i}, None, keep) for i in ids),
                                       return_exceptions=True)
    finally:
        batcher.close()
    assert isinstance(results[1], JobRejected) and "ONNX Runtime failed" in str(results[1])
    for index in (0, 2):
        assert_same(results[index], run_directly(lookup_model(), {"ids": ids[index]}))


async def test_a_job_that_does_not_fit_its_model_is_refused_before_it_queues():
    model, calls = load(rowwise_model()), Calls()
    batcher = Batcher(BatchSettings(runners=1), on_batch=calls)
    try:
        with pytest.raises(InputRejected, match="shape"):
            await batcher.run(model, rows(2, width=5), None, keep)
    finally:
        batcher.close()
    assert calls.rows == []


async def test_a_batch_holds_at_most_max_batch_rows_and_larger_jobs_run_alone():
    model, calls = load(rowwise_model()), Calls()
    batcher = Batcher(BatchSettings(max_batch_rows=8, runners=1), on_batch=calls)
    jobs = [rows(3, seed=i) for i in range(5)] + [rows(9, seed=9)]
    try:
        results = await asyncio.gather(*(batcher.run(model, job, None, keep) for job in jobs))
    finally:
        batcher.close()
    assert max(calls.rows) == 9 and calls.rows.count(9) == 1  # the 9-row job, alone
    assert all(n <= 8 for n in calls.rows if n != 9) and sum(calls.rows) == 24
    for job, got in zip(jobs, results):
        assert_same(got, run_directly(rowwise_model(), job))


async def test_a_preferred_size_leaves_at_once_and_a_smaller_batch_waits_the_queue_delay():
    model, calls = load(rowwise_model()), Calls()
    batcher = Batcher(BatchSettings(max_queue_delay_us=60_000_000, preferred_batch_rows=(4,), runners=1),
                      on_batch=calls)
    try:
        # Four rows make the preferred size: they do not wait the (one minute) delay.
        await asyncio.wait_for(asyncio.gather(*(batcher.run(model, rows(1, seed=i), None, keep) for i in range(4))), 30)
        assert calls.rows == [4]
    finally:
        batcher.close()
    calls = Calls()
    batcher = Batcher(BatchSettings(max_queue_delay_us=300_000, preferred_batch_rows=(4,), runners=1), on_batch=calls)
    try:
        started = time.monotonic()
        first = asyncio.ensure_future(batcher.run(model, rows(1, seed=1), None, keep))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(batcher.run(model, rows(1, seed=2), None, keep))
        await asyncio.wait_for(asyncio.gather(first, second), 30)
        # Two rows never make the preferred size: they left together once the first had waited.
        assert time.monotonic() - started >= 0.25
        assert calls.rows == [2]
    finally:
        batcher.close()


# -- through a worker -----------------------------------------------------------------------------
def batching_config(**overrides) -> WorkerConfig:
    fields = {**DEFAULT_WORKER_CONFIG.__dict__, **overrides}
    return WorkerConfig(**fields)


def batch_calls(worker) -> list[float]:
    """(calls, rows) the worker's batch metric counted."""
    registry = worker.metrics.registry
    return [registry.get_sample_value("enclaveq_worker_batch_rows_count") or 0.0,
            registry.get_sample_value("enclaveq_worker_batch_rows_sum") or 0.0]


@pytest.mark.parametrize("model_bytes, batched", [(rowwise_model(), True), (row_mixing_model(), False)],
                         ids=["row-wise model: batched", "row-mixing model: alone"])
async def test_jobs_from_two_producers_share_a_call_only_when_no_result_can_change(tee, broker_url, pool, model_bytes,
                                                                                  batched):
    # The worker holds a lone job for up to a minute unless a second row arrives: each producer's
    # job waits for the other's, so the two jobs (two sealed sessions) meet in the batcher.
    config = batching_config(max_queue_delay_us=60_000_000, preferred_batch_rows=(2,))
    policy = tee.policy()  # the sim identity attests the default config (tests/support.py)
    jobs = [rows(1, seed=21), rows(1, seed=22)]
    async with (running_worker(tee, broker_url, pool, config=config) as worker,
                AsyncClient(broker_url, pool, policy, timeout=60) as first,
                AsyncClient(broker_url, pool, policy, timeout=60) as second):
        model_id = await first.upload_model(model_bytes)
        before = batch_calls(worker)
        results = await asyncio.wait_for(asyncio.gather(first.run(model_id, jobs[0]), second.run(model_id, jobs[1])), 60)
        after = batch_calls(worker)
    for job, got in zip(jobs, results):
        assert_same(got, run_directly(model_bytes, job))
    calls, total_rows = after[0] - before[0], after[1] - before[1]
    assert total_rows == 2
    assert calls == (1 if batched else 2)


async def test_a_framed_submit_runs_its_jobs_in_batches(tee, broker_url, pool):
    jobs = [rows(1 + i % 2, seed=i) for i in range(48)]
    async with (running_worker(tee, broker_url, pool) as worker,
                AsyncClient(broker_url, pool, tee.policy(), timeout=60) as client):
        model_id = await client.upload_model(rowwise_model())
        results = {r.index: r async for r in client.submit(model_id, jobs, frames=FrameSettings(max_jobs=16))}
        calls, total_rows = batch_calls(worker)
    assert sorted(results) == list(range(48))
    for index, job in enumerate(jobs):
        assert results[index].ok, results[index].error
        assert_same(results[index].outputs, run_directly(rowwise_model(), job))
    assert total_rows == sum(1 + i % 2 for i in range(48))
    assert calls < 48  # at least one call carried several jobs
