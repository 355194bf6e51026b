"""Frames (issue 12): many jobs in one sealed message, each with its own id, result and error.

``submit`` packs jobs into frames by default (``frames=False``: one message per job). These
sentences hold over every broker: framed and per-message jobs give the same results for every
dtype; a frame with one bad job fails only that job; each job is yielded once. At the protocol
level: any byte of a frame flipped fails the whole frame, and the frame codec refuses what its
producer could not have sent. (A worker killed mid-frame: tests/test_crash_recovery.py runs both
ways; the firehose and MQTT spy tests see framed traffic, submit's default.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from producer_sdk import AsyncClient, FrameSettings
from producer_sdk.core import ProducerCore
from producer_sdk.errors import BadInput
from producer_sdk.framing import FramePacker
from protocol import crypto
from protocol.envelope import ProducerSession, open_request, peek_request
from protocol.errors import DecryptionFailed, MalformedMessage, ProtocolError
from protocol.frames import (
    JOB_FRAME, JOB_RESULTS, MAX_FRAME_JOBS, FramedJob, FramedResult, decode_frame, decode_frame_results, encode_frame, encode_frame_results,
)
from protocol.handshake import Challenge, EvidenceResponse, Statement

from .support import batch_of, every_dtype_model, mlp_model, run_directly, running_worker, sample_every_dtype_inputs


async def collect(client: AsyncClient, model_id: str, batch, **options) -> dict[int, object]:
    results = {}
    async for result in client.submit(model_id, batch, **options):
        assert result.index not in results, f"job {result.index} yielded twice"
        results[result.index] = result
    return results


async def test_framed_and_per_message_jobs_give_the_same_results_for_every_dtype(tee, broker_url, pool):
    batch = [sample_every_dtype_inputs(seed=n) for n in range(40)]
    async with running_worker(tee, broker_url, pool), AsyncClient(broker_url, pool, tee.policy(), timeout=60) as client:
        model_id = await client.upload_model(every_dtype_model())
        framed = await collect(client, model_id, batch, frames=FrameSettings(max_jobs=8))
        alone = await collect(client, model_id, batch, frames=False)
    assert sorted(framed) == sorted(alone) == list(range(40))
    for index, inputs in enumerate(batch):
        expected = run_directly(every_dtype_model(), inputs)
        for got in (framed[index], alone[index]):
            assert got.ok, got.error
            assert set(got.outputs) == set(expected)
            for name, value in expected.items():
                assert got.outputs[name].dtype == value.dtype
                np.testing.assert_array_equal(got.outputs[name], value)
    # Framed results carry the ids of the jobs, not of their frames: all distinct.
    assert len({r.job_id for r in framed.values()}) == 40


async def test_a_frame_with_one_bad_job_fails_only_that_job(tee, broker_url, pool):
    batch = batch_of(12)
    batch[5] = {"x": np.ones((2, 5), np.float32), "bias": np.ones(3, np.float32)}  # wrong shape
    async with running_worker(tee, broker_url, pool), AsyncClient(broker_url, pool, tee.policy(), timeout=60) as client:
        model_id = await client.upload_model(mlp_model())
        results = await collect(client, model_id, batch, frames=FrameSettings(max_jobs=12, linger=10.0))
    assert isinstance(results[5].error, BadInput)
    for index, inputs in enumerate(batch):
        if index != 5:
            assert results[index].ok, results[index].error
            np.testing.assert_array_equal(results[index].outputs["logits"],
                                          run_directly(mlp_model(), inputs)["logits"])


async def test_jobs_that_cannot_be_encoded_fail_alone_and_the_frame_still_goes(tee, memory_url, pool):
    batch = batch_of(6)
    batch[2] = {"x": object(), "bias": np.ones(3, np.float32)}  # not an array at all
    async with running_worker(tee, memory_url, pool), AsyncClient(memory_url, pool, tee.policy(), timeout=60) as client:
        model_id = await client.upload_model(mlp_model())
        results = await collect(client, model_id, batch)
    assert not results[2].ok and "could not send job 2" in str(results[2].error)
    assert all(results[i].ok for i in (0, 1, 3, 4, 5))


# --------------------------------------------------------------------------- the protocol


@pytest.fixture
def sealing():
    """A producer core with a session, and the pool key that opens what it seals."""
    pool_key = crypto.generate_private_key()
    core = ProducerCore(pool="frames", policy=None, reply_to="replies", verifier=lambda *a, **k: object())
    correlation_id, challenge = core.challenge()
    statement = Statement(pool="frames", epoch=1, suite=crypto.SUITE_ID, pool_public_key=crypto.public_bytes(pool_key),
                          worker_identity_key=b"i" * 32, nonce=Challenge.from_bytes(challenge).nonce,
                          config_digest=b"d" * 32)
    core.accept_evidence(correlation_id, EvidenceResponse(platform="sim", evidence=b"e" * 64, statement=statement,
                                                          worker_id="w").to_bytes())
    return core, pool_key


def test_flipping_any_byte_of_a_frame_fails_the_whole_frame(sealing):
    core, pool_key = sealing
    jobs = [FramedJob(f"job-{n}", core.job_body(inputs)) for n, inputs in enumerate(batch_of(3))]
    body = core.job_frame("m" * 64, jobs, timeout=60).body
    sealed, header = peek_request(body)
    key = crypto.open_session_key(core.session.sealed_session, pool_key, pool="frames", epoch=1,
                                  session_id=core.session.session_id)
    assert [job.job_id for job in decode_frame(open_request(sealed, header, key))] == ["job-0", "job-1", "job-2"]
    for position in range(len(body)):
        tampered = bytearray(body)
        tampered[position] ^= 0x01
        with pytest.raises(ProtocolError):
            sealed, header = peek_request(bytes(tampered))
            key = crypto.open_session_key(header.sealed_session, pool_key, pool="frames", epoch=header.epoch,
                                          session_id=header.session_id)
            open_request(sealed, header, key)


def test_the_frame_codec_refuses_what_no_producer_sends():
    job = FramedJob("a", b"\x80")
    assert decode_frame(encode_frame([job, FramedJob("b", b"\x80")])) == [job, FramedJob("b", b"\x80")]
    with pytest.raises(MalformedMessage, match="twice"):
        encode_frame([job, job])
    with pytest.raises(MalformedMessage, match="non-empty"):
        decode_frame(encode_frame([]))
    with pytest.raises(MalformedMessage):
        decode_frame(b"\x81\xa4jobs\x91\x92\x01\xc4\x00")  # a job id that is not a string
    with pytest.raises(ProtocolError):
        decode_frame(encode_frame([FramedJob(f"j{n}", b"") for n in range(MAX_FRAME_JOBS)])[:-1] + b"\xff")
    with pytest.raises(MalformedMessage, match="at most"):
        encode_frame([FramedJob(f"j{n}", b"") for n in range(MAX_FRAME_JOBS + 1)])


def test_results_must_answer_the_frames_jobs_in_order():
    results = [FramedResult("a", "ok", "tensors/v1", b""), FramedResult("b", "error", "error/v1", b"")]
    body = encode_frame_results(results)
    assert decode_frame_results(body, ["a", "b"]) == results
    with pytest.raises(MalformedMessage, match="order"):
        decode_frame_results(body, ["b", "a"])
    with pytest.raises(MalformedMessage, match="order"):
        decode_frame_results(body, ["a", "b", "c"])


def test_frames_close_on_jobs_bytes_and_linger():
    now = [0.0]
    packer = FramePacker(FrameSettings(max_jobs=3, max_bytes=4096, linger=0.01), 256, clock=lambda: now[0])
    closed = [packer.add(n, FramedJob(f"j{n}", b"x" * 10)) for n in range(3)]
    assert [len(c) for c in closed] == [0, 0, 1] and len(closed[2][0].jobs) == 3
    assert packer.add(3, FramedJob("big", b"x" * 3000)) == []
    assert [f.indexes for f in packer.add(4, FramedJob("big2", b"x" * 2000))] == [[3]]  # bytes
    now[0] += 0.02
    assert [f.indexes for f in packer.add(5, FramedJob("late", b""))] == [[4, 5]]  # linger
    assert FramePacker(FrameSettings(), 256).max_jobs == 64 and FramePacker(FrameSettings(), 8).max_jobs == 2
    with pytest.raises(ValueError):
        FrameSettings(max_jobs=0)
    assert isinstance(DecryptionFailed(), ProtocolError)


def test_the_published_frame_vector_opens_with_the_published_session_key():
    vectors = json.loads((Path(__file__).resolve().parents[1] / "docs" / "protocol-vectors.json").read_text())
    session, frame = vectors["session"], vectors["frame"]
    key = bytes.fromhex(session["session_key"])
    sealed, header = peek_request(bytes.fromhex(frame["envelope"]))
    assert (header.kind, header.job_id, header.content_type) == ("job_frame", frame["job_id"], JOB_FRAME)
    jobs = decode_frame(open_request(sealed, header, key))
    assert [job.job_id for job in jobs] == ["job-a", "job-b"]
    producer = ProducerSession(pool=session["pool"], epoch=session["epoch"], pool_public_key=b"",
                               session_key=key, session_id=bytes.fromhex(session["session_id"]),
                               sealed_session=bytes.fromhex(session["sealed_session"]))
    result_header, body = producer.open_result(bytes.fromhex(frame["result"]["envelope"]))
    assert (result_header.job_id, result_header.content_type) == (frame["job_id"], JOB_RESULTS)
    assert [(r.job_id, r.status) for r in decode_frame_results(body, ["job-a", "job-b"])] == [
        ("job-a", "ok"), ("job-b", "error")]


def tiling_model() -> bytes:
    """x float32[1,100] -> y = x tiled 50 times, float32[1,5000]: 400 bytes in, 20,000 out."""
    from onnx import TensorProto, helper

    repeats = helper.make_tensor("repeats", TensorProto.INT64, [2], [1, 50])
    graph = helper.make_graph([helper.make_node("Tile", ["x", "repeats"], ["y"])], "tile",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 100])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5000])],
                              initializer=[repeats])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


async def test_results_that_do_not_fit_in_the_frames_answer_come_back_alone(tee, memory_url, pool):
    # Eight jobs of 400 bytes fit in a frame; their eight 20 kB results do not fit in one 64 KiB
    # answer: the worker answers the last ones `frame_full`, and submit sends those again alone.
    from dataclasses import replace

    from enclave_worker.config import DEFAULT_WORKER_CONFIG

    small = replace(DEFAULT_WORKER_CONFIG, max_message_bytes=64 * 1024)
    batch = [{"x": np.full((1, 100), n, np.float32)} for n in range(8)]
    async with running_worker(tee, memory_url, pool, config=small) as worker, \
            AsyncClient(memory_url, pool, tee.policy(), timeout=60) as client:
        model_id = await client.upload_model(tiling_model())
        results = await collect(client, model_id, batch, frames=FrameSettings(max_jobs=8, linger=10.0))
        full = worker.metrics.registry.get_sample_value("enclaveq_worker_requests_total",
                                                        {"kind": "job", "outcome": "frame_full"})
    assert full and full > 0, "the answer fitted: the test would prove nothing"
    for index, inputs in enumerate(batch):
        assert results[index].ok, results[index].error
        np.testing.assert_array_equal(results[index].outputs["y"], np.tile(inputs["x"], (1, 50)))
