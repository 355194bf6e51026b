"""A worker's sealed state on disk: what it does when the disk fails it (issue 14, items 7 and 8).

An upload is either durable (its sealed copy written) and acknowledged, or refused and never
served; a damaged sealed model is set aside at start and the worker serves the rest; a state
directory that cannot be used stops the worker before it takes any work, saying which and why.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from enclave_worker.errors import WorkerStartupError
from enclave_worker.models import model_id_of
from producer_sdk import AsyncClient
from producer_sdk.errors import UnknownModel, WorkerFailure

from .support import batch_of, mlp_model, run_directly, running_worker, wait_until


async def test_an_upload_that_cannot_be_made_durable_is_refused_and_never_served(tee, memory_url, pool):
    async with (running_worker(tee, memory_url, pool) as worker,
                AsyncClient(memory_url, pool, tee.policy(), timeout=30) as client):
        models = worker.sealed_state.dir / "models"
        shutil.rmtree(models, ignore_errors=True)
        models.write_bytes(b"")  # where the sealed copies go, a file: every write fails
        with pytest.raises(WorkerFailure, match="could not write model .* sealed storage"):
            await client.upload_model(mlp_model())
        with pytest.raises(UnknownModel):
            await client.run(model_id_of(mlp_model()), batch_of(1)[0])
        models.unlink()
        # Once the disk works again, the same upload succeeds and the model runs.
        model_id = await client.upload_model(mlp_model())
        outputs = await client.run(model_id, batch_of(1)[0])
    np.testing.assert_array_equal(outputs["logits"], run_directly(mlp_model(), batch_of(1)[0])["logits"])


async def test_a_worker_whose_disk_fills_up_takes_no_jobs_until_it_can_seal_them_and_loses_none(
        tee, broker_url, pool, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="enclaveq.worker")
    jobs = batch_of(3)
    async with (running_worker(tee, broker_url, pool) as worker,
                AsyncClient(broker_url, pool, tee.policy(), timeout=60) as client):
        model_id = await client.upload_model(mlp_model())
        await client.run(model_id, jobs[0])
        state = worker.sealed_state
        write = state._write

        def disk_full(path, blob):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(state, "_write", disk_full)  # every sealed write from now on, probes included
        await wait_until(lambda: not worker.ready, "the worker notices it cannot seal its answered jobs")
        def metric(name, **labels):
            return worker.metrics.registry.get_sample_value(name, labels)

        answered = metric("enclaveq_worker_requests_total", kind="job", outcome="ok")
        held = asyncio.ensure_future(client.run(model_id, jobs[1]))
        await wait_until(lambda: metric("enclaveq_worker_requests_held") == 1, "the job reaches the worker and is held")
        assert not held.done() and metric("enclaveq_worker_requests_total", kind="job", outcome="ok") == answered
        monkeypatch.setattr(state, "_write", write)  # space freed
        outputs = await held
        assert worker.ready
        outputs_after = await client.run(model_id, jobs[2])
    np.testing.assert_array_equal(outputs["logits"], run_directly(mlp_model(), jobs[1])["logits"])
    np.testing.assert_array_equal(outputs_after["logits"], run_directly(mlp_model(), jobs[2])["logits"])
    said = [r.getMessage() for r in caplog.records if "state directory" in r.getMessage()]
    assert len(said) == 2 and "No space left on device" in said[0] and "writable again" in said[1], said


async def test_a_damaged_sealed_model_is_set_aside_and_the_worker_serves_the_others(tee, memory_url, pool, caplog):
    async with (running_worker(tee, memory_url, pool) as worker,
                AsyncClient(memory_url, pool, tee.policy(), timeout=30) as client):
        damaged = await client.upload_model(mlp_model(seed=1))
        kept = await client.upload_model(mlp_model(seed=2))
    models = worker.sealed_state.dir / "models"
    sealed = models / f"{damaged}.sealed"
    data = bytearray(sealed.read_bytes())
    data[len(data) // 2] ^= 0x01
    sealed.write_bytes(bytes(data))
    caplog.set_level(logging.ERROR, logger="enclaveq.worker")
    async with running_worker(tee, memory_url, pool), AsyncClient(memory_url, pool, tee.policy(), timeout=30) as client:
        with pytest.raises(UnknownModel):
            await client.run(damaged, batch_of(1)[0])
        outputs = await client.run(kept, batch_of(1)[0])
    np.testing.assert_array_equal(outputs["logits"], run_directly(mlp_model(seed=2), batch_of(1)[0])["logits"])
    quarantine = models / "quarantine"
    assert sorted(p.name.split(".")[0] for p in quarantine.iterdir()) == [damaged, damaged]  # model and manifest
    assert not sealed.exists()
    said = [r.getMessage() for r in caplog.records if damaged in r.getMessage()]
    assert said and "does not unseal" in said[0] and str(quarantine) in said[0]
    # The pool key beside it unseals: the file is named damaged, not blamed on another measurement.
    assert "is damaged" in said[0] and "another measurement" not in said[0]


async def test_a_state_directory_that_cannot_be_used_stops_the_worker_before_it_takes_work(tee, memory_url, pool,
                                                                                        tmp_path):
    not_a_directory = tmp_path / "state-is-a-file"
    not_a_directory.write_bytes(b"")
    worker = tee.worker(memory_url, pool, state_dir=not_a_directory)
    with pytest.raises(WorkerStartupError, match=f"state directory {re.escape(str(not_a_directory))}/.* cannot be used "
                                                 r"\(Not a directory\)"):
        await worker.start()
    assert not worker.consuming


async def test_a_missing_state_directory_is_created(tee, memory_url, pool, tmp_path):
    missing = tmp_path / "does" / "not" / "exist"
    async with running_worker(tee, memory_url, pool, state_dir=missing) as worker:
        assert worker.consuming
    assert (worker.sealed_state.dir / "pool.sealed").exists()


def test_loading_the_custom_operator_library_imports_no_machine_learning_framework():
    # onnxruntime-extensions' package imports PyTorch when it is installed (the examples' extra):
    # a worker must find the operator library without that (hundreds of MiB at every start).
    script = ("import sys; from enclave_worker.models import ModelStore; "
              "ModelStore(max_model_bytes=1024, custom_op_domains=('ai.onnx.contrib',)); "
              "print(sorted(m for m in ('torch', 'onnxruntime_extensions', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_a_model_with_an_operator_the_worker_lacks_is_refused_naming_the_operator():
    from onnx import TensorProto, helper

    from enclave_worker.errors import ModelRejected
    from enclave_worker.models import ModelStore

    graph = helper.make_graph([helper.make_node("NoSuchOperator", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    with pytest.raises(ModelRejected, match=r"operator NoSuchOperator \(opset 17\) is not supported"):
        ModelStore(max_model_bytes=1 << 20).load(model_id_of(data), data)


async def test_a_model_over_the_workers_size_limit_is_refused_at_its_first_chunk(tee, memory_url, pool):
    from onnx import TensorProto, helper, numpy_helper

    from enclave_worker.config import WorkerConfig
    from producer_sdk.errors import Oversized

    weights = numpy_helper.from_array(np.ones((3 * 1024 * 1024,), np.float32), "w")  # 12 MiB: three chunks
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])], initializer=[weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    small = WorkerConfig(max_model_bytes=1024 * 1024)
    async with (running_worker(tee, memory_url, pool, config=small) as worker,
                AsyncClient(memory_url, pool, tee.policy(), timeout=30) as client):
        with pytest.raises(Oversized, match="exceeds the worker limit of 1048576"):
            await client.upload_model(model.SerializeToString())
        chunks = sum(sample.value for metric in worker.metrics.registry.collect()
                     if metric.name == "enclaveq_worker_requests" for sample in metric.samples
                     if sample.name.endswith("_total") and sample.labels.get("kind") == "model_chunk")
    assert chunks == 1  # the other two were never sent
