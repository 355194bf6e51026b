"""The whole confidential job path over the memory broker and RabbitMQ, with in-process workers.

Each group of tests names the security property it would catch breaking, numbered as in the
README's "What is guaranteed, and how it is tested" table.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest

from broker_adapters import Message, open_broker
from enclave_worker.errors import WorkerStartupError
from enclave_worker.platform import sim_identity
from enclave_worker.worker import Worker
from producer_sdk import AsyncClient, Client
from producer_sdk.errors import (AttestationFailed, BadInput, JobExpired, NoWorkerAnswered, Oversized,
                                 RequestTampered, UnknownModel)
from protocol.envelope import decode_envelope, encode_envelope

from .support import (SimTEE, every_dtype_model, mlp_model, run_directly, running_worker, sample_every_dtype_inputs,
                      wait_until)


async def test_results_equal_direct_onnxruntime_for_every_dtype(tee, broker_url, pool):
    model = every_dtype_model()
    async with running_worker(tee, broker_url, pool):
        async with AsyncClient(broker_url, pool, tee.policy(), timeout=30) as client:
            model_id = await client.upload_model(model)
            for seed in range(3):
                inputs = sample_every_dtype_inputs(rows=seed + 1, cols=4, seed=seed)
                got = await client.run(model_id, inputs)
                want = run_directly(model, inputs)
                assert set(got) == set(want)
                for name in want:
                    assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
                    assert got[name].tobytes() == want[name].tobytes(), name


async def test_a_model_with_several_inputs_and_outputs_matches_onnxruntime_across_a_batch(tee, broker_url, pool):
    model = mlp_model()
    rng = np.random.default_rng(3)
    batch = [{"x": rng.standard_normal((5, 4)).astype(np.float32), "bias": rng.standard_normal(3).astype(np.float32)}
             for _ in range(50)]
    async with running_worker(tee, broker_url, pool):
        async with AsyncClient(broker_url, pool, tee.policy(), timeout=30) as client:
            model_id = await client.upload_model(model)
            results = [r async for r in client.submit(model_id, batch, max_in_flight=16)]
    assert sorted(r.index for r in results) == list(range(50))
    for r in results:
        assert r.ok
        want = run_directly(model, batch[r.index])
        assert np.array_equal(r.outputs["logits"], want["logits"]) and np.array_equal(r.outputs["label"], want["label"])


async def test_models_can_be_listed_and_deleted(tee, broker_url, pool):
    async with running_worker(tee, broker_url, pool):
        async with AsyncClient(broker_url, pool, tee.policy(), timeout=30) as client:
            a = await client.upload_model(mlp_model(0))
            b = await client.upload_model(mlp_model(1))
            listed = {m.model_id: m for m in await client.list_models()}
            assert set(listed) == {a, b}
            assert [n for n, _, _ in listed[a].inputs] == ["x", "bias"]
            await client.delete_model(a)
            assert [m.model_id for m in await client.list_models()] == [b]
            with pytest.raises(UnknownModel):
                await client.run(a, {"x": np.ones((1, 4), np.float32), "bias": np.ones(3, np.float32)})
            with pytest.raises(UnknownModel):
                await client.delete_model(a)


# -- P2 / P8: only an attested worker decrypts, simulation is never accepted silently -----------

async def test_a_policy_pinning_another_measurement_refuses_to_connect(tee, broker_url, pool):
    async with running_worker(tee, broker_url, pool):
        with pytest.raises(AttestationFailed) as refused:
            await AsyncClient(broker_url, pool, tee.policy(measurements=("ab" * 32,))).connect()
    assert "measurement" in {v.field for v in refused.value.violations}


async def test_a_policy_without_allow_simulation_refuses_simulated_evidence(tee, broker_url, pool):
    async with running_worker(tee, broker_url, pool):
        with pytest.raises(AttestationFailed, match="simulation"):
            await AsyncClient(broker_url, pool, tee.policy(allow_simulation=False)).connect()


async def test_evidence_older_than_the_policy_allows_is_refused(tee, broker_url, pool):
    # The producer's clock runs 10 minutes ahead: the fresh evidence looks 10 minutes old.
    async with running_worker(tee, broker_url, pool):
        client = AsyncClient(broker_url, pool, tee.policy(max_evidence_age_seconds=60), clock=lambda: time.time() + 600)
        with pytest.raises(AttestationFailed, match="issued_at|age"):
            await client.connect()


async def test_a_recorded_evidence_answer_is_refused_for_a_new_challenge(tee, broker_url, pool):
    async with running_worker(tee, broker_url, pool) as worker:
        client = AsyncClient(broker_url, pool, tee.policy())
        await client.connect()
        try:
            # Record a genuine answer, then offer it as the answer to the next challenge.
            from protocol.handshake import Challenge
            recorded = worker.answer_challenge(Challenge(nonce=b"\x07" * 32)).to_bytes()
            correlation_id, _ = client._core.challenge()
            with pytest.raises(AttestationFailed, match="nonce"):
                client._core.accept_evidence(correlation_id, recorded)
            with pytest.raises(AttestationFailed, match="no challenge"):
                client._core.accept_evidence(correlation_id, recorded)
        finally:
            await client.close()


async def test_connecting_to_a_pool_without_workers_fails_clearly(tee, broker_url, pool):
    async with open_broker(broker_url) as broker:
        await broker.declare_pool(pool)
    with pytest.raises(NoWorkerAnswered, match="no worker"):
        await AsyncClient(broker_url, pool, tee.policy(), attest_timeout=1).connect()


# -- P5: replays are harmless, each result reaches the caller once ------------------------------

async def test_a_replayed_job_yields_no_second_result(tee, broker_url, pool):
    async with running_worker(tee, broker_url, pool) as worker:
        async with AsyncClient(broker_url, pool, tee.policy(), timeout=30) as client:
            model_id = await client.upload_model(mlp_model())
            request = client._core.job(model_id, {"x": np.ones((1, 4), np.float32), "bias": np.ones(3, np.float32)},
                                       timeout=30)
            received = []
            original = client._on_reply

            async def counting(delivery):
                if delivery.message.correlation_id == request.job_id:
                    received.append(delivery.message.body)
                await original(delivery)
            client._on_reply = counting
            await client._sub.cancel()
            client._sub = await client._broker.consume_replies(client.name, counting)

            outcome = await client._request(lambda: request, 30)
            assert outcome.ok
            # An attacker re-publishes the captured ciphertext twice.
            async with open_broker(broker_url) as attacker:
                for _ in range(2):
                    await attacker.publish_job(pool, Message(body=request.body, correlation_id=request.job_id))
            duplicates = worker.metrics.requests.labels("job", "duplicate")
            await wait_until(lambda: duplicates._value.get() == 2, "the worker saw both replays")
            await asyncio.sleep(0.5)  # time for a second result to arrive, were one wrongly sent
            assert len(received) == 1
            assert duplicates._value.get() == 2


async def test_an_expired_job_is_refused_with_a_typed_error(tee, broker_url, pool):
    async with running_worker(tee, broker_url, pool):
        async with AsyncClient(broker_url, pool, tee.policy(), timeout=30) as client:
            model_id = await client.upload_model(mlp_model())
            request = client._core.job(model_id, {"x": np.ones((1, 4), np.float32), "bias": np.ones(3, np.float32)},
                                       timeout=-1)
            outcome = await client._request(lambda: request, 30)
            assert isinstance(outcome.error(), JobExpired)


# -- P3 / P9: a tampered request fails to open; bad input gets a typed error, the worker keeps serving

async def test_a_tampered_job_is_refused_and_the_worker_keeps_serving(tee, broker_url, pool):
    async with running_worker(tee, broker_url, pool):
        async with AsyncClient(broker_url, pool, tee.policy(), timeout=30) as client:
            model_id = await client.upload_model(mlp_model())
            inputs = {"x": np.ones((1, 4), np.float32), "bias": np.ones(3, np.float32)}
            request = client._core.job(model_id, inputs, timeout=30)
            env = decode_envelope(request.body)
            flipped = env.ciphertext[:-1] + bytes([env.ciphertext[-1] ^ 1])
            tampered = dataclasses.replace(request, body=encode_envelope(env.header_bytes, env.nonce, flipped))
            outcome = await client._request(lambda: tampered, 30)
            assert isinstance(outcome.error(), RequestTampered)
            async with open_broker(broker_url) as attacker:
                await attacker.publish_job(pool, Message(body=b"\x93not an envelope"))
            assert "label" in await client.run(model_id, inputs)


@pytest.mark.parametrize("inputs, error", [
    ({"x": np.ones((1, 4), np.float64), "bias": np.ones(3, np.float32)}, BadInput),     # wrong dtype
    ({"x": np.ones((1, 5), np.float32), "bias": np.ones(3, np.float32)}, BadInput),     # wrong shape
    ({"x": np.ones((1, 4), np.float32)}, BadInput),                                     # missing input
    ({"x": np.ones((1, 4), np.float32), "bias": np.ones(3, np.float32), "z": np.ones(1)}, BadInput),
])
async def test_mismatched_inputs_get_a_typed_error_naming_the_problem(tee, broker_url, pool, inputs, error):
    async with running_worker(tee, broker_url, pool):
        async with AsyncClient(broker_url, pool, tee.policy(), timeout=30) as client:
            model_id = await client.upload_model(mlp_model())
            with pytest.raises(error):
                await client.run(model_id, inputs)
            ok = await client.run(model_id, {"x": np.ones((2, 4), np.float32), "bias": np.ones(3, np.float32)})
            assert ok["label"].shape == (2,)


async def test_an_oversized_tensor_is_refused(tee, broker_url, pool):
    from dataclasses import replace
    from enclave_worker.config import DEFAULT_WORKER_CONFIG
    small = replace(DEFAULT_WORKER_CONFIG, max_tensor_bytes=1024)
    async with running_worker(tee, broker_url, pool, config=small):
        async with AsyncClient(broker_url, pool, tee.policy(), timeout=30) as client:
            model_id = await client.upload_model(mlp_model())
            with pytest.raises(Oversized):
                await client.run(model_id, {"x": np.ones((100, 4), np.float32), "bias": np.ones(3, np.float32)})


async def test_an_unknown_model_and_a_corrupt_model_are_refused(tee, broker_url, pool):
    async with running_worker(tee, broker_url, pool):
        async with AsyncClient(broker_url, pool, tee.policy(), timeout=30) as client:
            with pytest.raises(UnknownModel):
                await client.run("00" * 32, {"x": np.ones(1)})
            from producer_sdk.errors import ModelRejected
            with pytest.raises(ModelRejected):
                await client.upload_model(b"this is not an onnx model")


# -- sealed state and single worker per pool ------------------------------------------------------

async def test_a_restarted_worker_keeps_its_pool_key_and_models(tee, broker_url, pool):
    inputs = {"x": np.ones((1, 4), np.float32), "bias": np.zeros(3, np.float32)}
    async with running_worker(tee, broker_url, pool):
        client = AsyncClient(broker_url, pool, tee.policy(), timeout=30)
        await client.connect()
        model_id = await client.upload_model(mlp_model())
        before = await client.run(model_id, inputs)
    try:
        async with running_worker(tee, broker_url, pool):
            after = await client.run(model_id, inputs)  # same session, no re-upload
    finally:
        await client.close()
    assert np.array_equal(before["logits"], after["logits"])
    model_files = list((tee.state_dir / pool / "models").glob("*.sealed"))
    assert len(model_files) == 1 and mlp_model() not in model_files[0].read_bytes()


async def test_a_worker_with_another_measurement_or_root_is_not_admitted_and_takes_no_job(tee, broker_url, pool,
                                                                                           tmp_path):
    other = SimTEE(tmp_path / "other")  # another simulation root: the pool's join policy does not admit it
    async with running_worker(tee, broker_url, pool):
        outsider = other.worker(broker_url, pool)
        with pytest.raises(WorkerStartupError, match="refuses to admit"):
            await outsider.start()
        assert outsider.keys is None and not outsider.consuming  # it never consumed a job
        assert not (other.state_dir / pool / "pool.sealed").exists()


async def test_workers_of_one_measurement_share_the_pool_key_and_serve_its_jobs(tee, broker_url, pool, tmp_path):
    """Mutual attestation hands the founder's epoch key to a joiner; models reach both; jobs are
    spread over both, and every result matches direct onnxruntime."""
    model = mlp_model()
    batch = [{"x": np.full((1, 4), i, np.float32), "bias": np.zeros(3, np.float32)} for i in range(120)]
    async with running_worker(tee, broker_url, pool) as founder:
        async with running_worker(tee, broker_url, pool, state_dir=tmp_path / "second-state") as joiner:
            assert joiner.pool_public_key == founder.pool_public_key
            assert joiner.identity_public_key != founder.identity_public_key
            async with AsyncClient(broker_url, pool, tee.policy(), timeout=30) as client:
                model_id = await client.upload_model(model)
                results = [r async for r in client.submit(model_id, batch, max_in_flight=32)]
            await wait_until(lambda: founder.models.has(model_id) and joiner.models.has(model_id),
                             "both workers store the model")
            served = [w.metrics.requests.labels("job", "ok")._value.get() for w in (founder, joiner)]
    assert all(r.ok for r in results) and sorted(r.index for r in results) == list(range(120))
    for r in results:
        assert np.array_equal(r.outputs["logits"], run_directly(model, batch[r.index])["logits"])
    assert sum(served) >= 120 and min(served) > 0, served


async def test_two_workers_starting_together_on_an_empty_pool_end_with_one_key(tee, broker_url, pool, tmp_path):
    first = tee.worker(broker_url, pool, state_dir=tmp_path / "a")
    second = tee.worker(broker_url, pool, state_dir=tmp_path / "b")
    await asyncio.gather(first.start(), second.start())
    try:
        assert first.pool_public_key == second.pool_public_key
    finally:
        await asyncio.gather(first.stop(), second.stop())


async def test_the_synchronous_client_runs_the_same_flow(tee, broker_url, pool):
    model = mlp_model()
    batch = [{"x": np.full((1, 4), i, np.float32), "bias": np.zeros(3, np.float32)} for i in range(10)]
    async with running_worker(tee, broker_url, pool):
        def use_sync_client():
            with Client(broker_url, pool, tee.policy(), timeout=30) as client:
                model_id = client.upload_model(model)
                single = client.run(model_id, batch[0])
                results = list(client.submit(model_id, batch))
                return single, results
        single, results = await asyncio.to_thread(use_sync_client)
    assert np.array_equal(single["logits"], run_directly(model, batch[0])["logits"])
    assert sorted(r.index for r in results) == list(range(10)) and all(r.ok for r in results)


async def test_a_batch_reports_per_job_failures_and_surfaces_a_failing_iterable(tee, broker_url, pool):
    good = {"x": np.ones((1, 4), np.float32), "bias": np.ones(3, np.float32)}
    unsendable = {"x": np.array([1 + 2j]), "bias": np.ones(3, np.float32)}
    async with running_worker(tee, broker_url, pool):
        async with AsyncClient(broker_url, pool, tee.policy(), timeout=30) as client:
            model_id = await client.upload_model(mlp_model())
            results = {r.index: r async for r in client.submit(model_id, [good, unsendable, good])}
            assert results[0].ok and results[2].ok and not results[1].ok
            assert "not supported" in str(results[1].error)

            def broken_batch():
                yield good
                raise RuntimeError("the caller's data source failed")
            with pytest.raises(RuntimeError, match="data source failed"):
                async for _ in client.submit(model_id, broken_batch()):
                    pass


async def test_worker_and_producer_logs_carry_no_plaintext(tee, memory_url, pool, caplog):
    import logging
    caplog.set_level(logging.DEBUG)
    marker = np.full((1, 4), 987654.25, np.float32)  # a value whose digits would show in any repr
    async with running_worker(tee, memory_url, pool):
        async with AsyncClient(memory_url, pool, tee.policy(), timeout=30) as client:
            model_id = await client.upload_model(mlp_model())
            await client.run(model_id, {"x": marker, "bias": np.zeros(3, np.float32)})
            for bad in ({"x": marker.astype(np.float64), "bias": np.zeros(3, np.float32)}, {"x": marker}):
                with pytest.raises(BadInput):
                    await client.run(model_id, bad)
    text = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert "98765" not in text and marker.tobytes() not in text.encode()
    assert "bad_input" in text  # the refusals were logged, by code


async def test_a_tee_that_cannot_produce_evidence_is_reported_to_the_producer(tee, memory_url, pool):
    from attestation.providers.errors import ProviderFailed

    class FailsLater:  # the TEE works while the worker starts, then fails
        platform = "sim"

        def __init__(self, provider) -> None:
            self.provider, self.broken = provider, False

        def evidence(self, report_data: bytes) -> bytes:
            if self.broken:
                raise ProviderFailed("configfs-tsm: outblob read failed (EIO)")
            return self.provider.evidence(report_data)

    identity = sim_identity(tee.dir)
    provider = FailsLater(identity.provider)
    worker = Worker(broker_url=memory_url, pool=pool, identity=dataclasses.replace(identity, provider=provider),
                    state_dir=tee.state_dir)
    await worker.start()
    provider.broken = True
    try:
        with pytest.raises(AttestationFailed, match="evidence_unavailable"):
            await AsyncClient(memory_url, pool, tee.policy()).connect()
    finally:
        await worker.stop()


async def test_torch_tensors_are_accepted_where_numpy_arrays_are(tee, memory_url, pool):
    torch = pytest.importorskip("torch", reason="torch is an optional extra (pip install '.[torch]')")
    async with running_worker(tee, memory_url, pool):
        async with AsyncClient(memory_url, pool, tee.policy(), timeout=30) as client:
            model_id = await client.upload_model(mlp_model())
            x = torch.ones((2, 4), dtype=torch.float32)
            out = await client.run(model_id, {"x": x, "bias": torch.zeros(3)})
    assert np.array_equal(out["logits"], run_directly(mlp_model(), {"x": x.numpy(), "bias": np.zeros(3, np.float32)})["logits"])


async def test_a_late_joiner_serves_a_model_uploaded_before_it_existed(tee, broker_url, pool, tmp_path):
    model = mlp_model(seed=3)
    inputs = {"x": np.ones((1, 4), np.float32), "bias": np.zeros(3, np.float32)}
    async with running_worker(tee, broker_url, pool) as founder:
        async with AsyncClient(broker_url, pool, tee.policy(), timeout=30) as client:
            model_id = await client.upload_model(model)
            async with running_worker(tee, broker_url, pool, state_dir=tmp_path / "late") as late:
                assert late.models.has(model_id)  # synced, sealed to the pool key, checked by hash
                assert (tmp_path / "late" / pool / "models" / f"{model_id}.sealed").exists()
                await founder.stop()  # only the late joiner is left to serve
                out = await client.run(model_id, inputs)
    assert np.array_equal(out["logits"], run_directly(model, inputs)["logits"])
