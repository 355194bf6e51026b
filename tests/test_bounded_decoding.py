"""One cheap message must never cost a decoder much (issue 9, item 3): every parser of bytes a
broker can write refuses a message beyond its structural limits -- nesting depth, number of
msgpack objects, container and string lengths -- before msgpack builds anything, so refusing
costs the same small amount whatever the message's size, and always with a typed error (item 7).

Costs are measured as tracemalloc peaks, which are deterministic; before these limits a 16 MiB
message of empty arrays made a peek allocate more than 1 GiB (73x its size) and take seconds.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import msgpack
import numpy as np
import pytest

from broker_adapters import Message
from enclave_worker.config import DEFAULT_WORKER_CONFIG
from producer_sdk import AsyncClient
from protocol import bodies, crypto
from protocol.codec import pack, unpack, unpack_map
from protocol.envelope import (MAX_REPLY_TO, Chunk, ProducerSession, RequestHeader, ResultHeader, decode_envelope,
                               encode_envelope, peek_request, peek_result)
from protocol.errors import MalformedMessage, OversizedMessage, ProtocolError
from protocol.handshake import (Challenge, ControlError, EpochAnnounce, EvidenceResponse, JoinRequest, JoinResponse,
                                ModelSyncChunk, ModelSyncRequest, Statement, control_kind)
from protocol.limits import check_structure
from protocol.ownership import DeleteOrder, ModelManifest, ProducerProof

from .support import TIMEOUT, mlp_model, running_worker, wait_until

MiB = 1 << 20
# The largest message a worker accepts at all; the peeks on its job queue and control channel
# run with this byte limit.
WORKER_MAX_BYTES = DEFAULT_WORKER_CONFIG.max_message_bytes
# What refusing a hostile message may allocate, whatever its size: the scan allocates nothing
# per object, so this is the exception and its message.
REFUSAL_PEAK_BYTES = 64 * 1024


# -- hostile messages: cheap to send, each costing ~60 bytes of Python objects per byte to decode --

def many_empty_arrays(size: int) -> bytes:
    """[[], [], [], ...]: one byte per empty list."""
    count = size - 5
    return b"\xdd" + count.to_bytes(4, "big") + b"\x90" * count


def many_empty_maps(size: int) -> bytes:
    count = size - 5
    return b"\xdd" + count.to_bytes(4, "big") + b"\x80" * count


def many_shallow_nests(size: int, depth: int = 100) -> bytes:
    """[[[[...]]], [[[...]]], ...]: many nests, each too shallow for msgpack's own stack limit."""
    nest = b"\x91" * (depth - 1) + b"\x90"
    count = (size - 5) // depth
    return b"\xdd" + count.to_bytes(4, "big") + nest * count


def a_map_holding_many_empty_arrays(size: int) -> bytes:
    """{"v": 1, "h": [[], [], ...]}: starts like an envelope."""
    prefix = b"\x82\xa1v\x01\xa1h\xdd"
    count = size - len(prefix) - 4
    return prefix + count.to_bytes(4, "big") + b"\x90" * count


def a_map_of_many_small_maps(size: int) -> bytes:
    """{"v": 1, "t": "challenge", "": {"": {}}, ...} as one map of many duplicate keys: each entry
    passes any per-container limit of 16, the map itself declares millions of entries."""
    prefix = b"\xdf"
    entry = b"\xa0\x81\xa0\x80"
    count = (size - 5) // len(entry)
    return prefix + count.to_bytes(4, "big") + entry * count


HOSTILE = [many_empty_arrays, many_empty_maps, many_shallow_nests, a_map_holding_many_empty_arrays,
           a_map_of_many_small_maps]


def refusal_peak(parse: Callable[[bytes], object], data: bytes) -> int:
    """Run ``parse`` on ``data``, require a typed refusal, and return the peak it allocated."""
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            parse(data)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# Every clear-text parse on the network path, with the byte limit its receiver applies.
PEEKS: dict[str, Callable[[bytes], object]] = {
    "envelope": lambda data: decode_envelope(data, max_bytes=WORKER_MAX_BYTES),
    "job or upload peek (worker)": lambda data: peek_request(data, max_bytes=WORKER_MAX_BYTES),
    "result peek (producer)": peek_result,
    "control dispatch (worker)": lambda data: control_kind(data, max_bytes=WORKER_MAX_BYTES),
}
CONTROL_PARSERS: dict[str, Callable[[bytes], object]] = {
    "evidence": EvidenceResponse.from_bytes,
    "join request": JoinRequest.from_bytes,
    "join response": JoinResponse.from_bytes,
    "epoch announcement": EpochAnnounce.from_bytes,
    "model sync request": ModelSyncRequest.from_bytes,
    "model sync chunk": ModelSyncChunk.from_bytes,
    "control error": ControlError.from_bytes,
    "challenge": Challenge.from_bytes,
    "request header": RequestHeader.from_bytes,
    "result header": ResultHeader.from_bytes,
    "producer proof": ProducerProof.from_bytes,
    "model manifest": ModelManifest.verify,
    "delete order": DeleteOrder.verify,
}


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda f: f.__name__)
@pytest.mark.parametrize("peek", PEEKS.values(), ids=PEEKS.keys())
def test_a_16_mib_message_of_empty_containers_is_refused_at_a_cost_independent_of_its_size(peek, hostile):
    assert refusal_peak(peek, hostile(16 * MiB)) < REFUSAL_PEAK_BYTES


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda f: f.__name__)
@pytest.mark.parametrize("parse", CONTROL_PARSERS.values(), ids=CONTROL_PARSERS.keys())
def test_every_control_message_parser_refuses_a_hostile_message_cheaply(parse, hostile):
    # 256 KiB fits under the byte limit of the evidence-carrying messages; the smaller ones
    # refuse it by size, which is cheap too.
    assert refusal_peak(parse, hostile(256 * 1024)) < REFUSAL_PEAK_BYTES


BODY_DECODERS: dict[str, Callable[[bytes], object]] = {
    "job body (worker)": bodies.decode_job,
    "tensors result (producer)": bodies.decode_tensors_body,
    "model list (producer)": bodies.decode_models,
    "error body": bodies.ErrorBody.from_bytes,
    "model chunk (worker)": lambda body: bodies.decode_model_chunk(body, max_bytes=WORKER_MAX_BYTES),
}


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda f: f.__name__)
@pytest.mark.parametrize("decode", BODY_DECODERS.values(), ids=BODY_DECODERS.keys())
def test_a_sealed_body_is_bounded_too(decode, hostile):
    # Anyone who attested the pool can open a session and seal such a body to a worker.
    size = 4 * MiB if decode is bodies.decode_models else 16 * MiB  # the model list's byte limit
    assert refusal_peak(decode, hostile(size)) < REFUSAL_PEAK_BYTES


# -- the limits themselves: exact, and applied before anything is built ---------------------------

def nested(depth: int) -> bytes:
    """``depth`` arrays, one inside the other, around a 7 (a lone 7 at depth 0)."""
    return b"\x91" * depth + b"\x07"


@pytest.mark.parametrize("depth", [0, 1, 2, 5])
def test_nesting_up_to_max_depth_is_accepted_and_one_level_more_is_refused(depth):
    assert unpack(nested(depth), max_depth=depth) == msgpack.unpackb(nested(depth))
    with pytest.raises(OversizedMessage, match="nested deeper"):
        unpack(nested(depth + 1), max_depth=depth)


def test_every_msgpack_object_counts_toward_max_items_map_keys_included():
    value = {"a": [1, 2], "b": None}  # map, 2 keys, list, 2 ints, nil: 7 objects
    assert unpack(pack(value), max_items=7) == value
    with pytest.raises(OversizedMessage, match="more than 6"):
        unpack(pack(value), max_items=6)


def test_a_container_declaring_more_children_than_the_items_left_is_refused_at_its_header():
    # 2**32 - 1 declared elements and no bytes behind them: refused as too many, not read to the end.
    with pytest.raises(OversizedMessage):
        unpack(b"\xdd\xff\xff\xff\xff", max_items=100, max_container_len=2**32)
    with pytest.raises(OversizedMessage, match="container of 4294967295"):
        unpack(b"\xdf\xff\xff\xff\xff")


def test_container_and_string_lengths_are_limited_separately():
    assert unpack(pack([1, 2, 3]), max_container_len=3) == [1, 2, 3]
    with pytest.raises(OversizedMessage):
        unpack(pack([1, 2, 3]), max_container_len=2)
    assert unpack(pack("x" * 300), max_str_len=300) == "x" * 300
    with pytest.raises(OversizedMessage):
        unpack(pack("x" * 301), max_str_len=300)
    # A bin is one copy, whatever its length: only the message's byte limit applies.
    assert unpack(pack(b"x" * 100_000), max_items=1, max_str_len=0) == b"x" * 100_000


@pytest.mark.parametrize("data", [
    b"", b"\x92\x01", b"\xc4\x05abc", b"\xdb\x00\x00\x01\x00abc", b"\xcf\x00\x00", b"\x81\xa1v",
], ids=["empty", "short array", "short bin", "short str32", "short uint64", "map without value"])
def test_a_truncated_message_is_malformed(data):
    with pytest.raises(MalformedMessage, match="truncated"):
        unpack(data)


@pytest.mark.parametrize("data", [b"\xc1", b"\xd4\x01\x00", b"\xc7\x01\x05x", b"\xd6\xff\x00\x00\x00\x00"],
                         ids=["reserved 0xc1", "fixext", "ext8", "timestamp"])
def test_ext_types_and_the_reserved_byte_are_refused(data):
    with pytest.raises(MalformedMessage, match="unsupported msgpack type"):
        unpack(data)


def test_trailing_bytes_are_refused_before_decoding_anything():
    with pytest.raises(MalformedMessage, match="trailing"):
        unpack(pack({"v": 1}) + b"\x90" * 1000)


def test_the_scan_agrees_with_msgpack_on_every_object_type():
    value = {"nil": None, "t": True, "f": False, "pos": [0, 127, 128, 255, 256, 65535, 65536, 2**32, 2**64 - 1],
             "neg": [-1, -32, -33, -128, -129, -32768, -32769, -2**31 - 1, -2**63], "float": 1.5,
             "str": ["", "x" * 31, "x" * 32, "x" * 255, "x" * 256, "x" * 65536],
             "bin": [b"", b"x" * 255, b"x" * 256, b"x" * 65536], "map16": {str(i): i for i in range(16)},
             "array16": list(range(16))}
    data = pack(value)
    assert unpack(data) == value
    assert unpack(msgpack.packb(0.25, use_single_float=True)) == 0.25
    check_structure(data, max_depth=2, max_items=10_000, max_container_len=16, max_str_len=65536, what="x")


def test_an_explicit_larger_limit_admits_a_message_the_defaults_refuse():
    ids = [f"{i:064x}" for i in range(600)]
    data = pack({"v": 1, "t": "model_sync_request", "have": ids})
    with pytest.raises(OversizedMessage):
        unpack_map(data, kind="model_sync_request")
    assert unpack_map(data, kind="model_sync_request", max_items=1 + 6 + 600,
                      max_container_len=600)["have"] == ids


# -- every message we send fits the limits of its parser ---------------------------------------------

LONG = "\U0001d11e"  # 4 bytes in UTF-8: the longest a character can be


def statement() -> Statement:
    return Statement(pool=LONG * 256, epoch=2**63, suite=LONG * 256, pool_public_key=b"k" * 32,
                     worker_identity_key=b"i" * 32, nonce=b"n" * 32, config_digest=b"d" * 32)


def test_every_clear_message_at_its_longest_fits_its_parsers_limits():
    session = ProducerSession(pool="p", epoch=1, pool_public_key=crypto.public_bytes(crypto.generate_private_key()))
    session.producer_proof = b"p" * 256
    header = session.header("model_chunk", job_id=LONG * 128, deadline_ms=2**64 - 1, reply_to=LONG * MAX_REPLY_TO,
                            content_type=LONG * 64, model_id=LONG * 64, chunk=Chunk(LONG * 64, 2**63, 2**64 - 1, 2**64 - 1))
    assert peek_request(session.seal(header, b"x" * 1000))[1] == header
    result = ResultHeader(session_id=b"s" * 16, job_id=LONG * 128, status="error", content_type=LONG * 64,
                          model_id=LONG * 64, current_epoch=2**64 - 1)
    assert peek_result(encode_envelope(result.to_bytes(), b"n" * 12, b"c"))[1] == result
    evidence = EvidenceResponse(platform=LONG * 32, evidence=b"e" * 256 * 1024, statement=statement(),
                                worker_id=LONG * 128)
    assert EvidenceResponse.from_bytes(evidence.to_bytes()) == evidence
    assert control_kind(evidence.to_bytes()) == "evidence"
    error = ControlError(code=LONG * 64, message="m" * 2048)  # 4-byte characters would pass its byte limit
    assert ControlError.from_bytes(error.to_bytes()) == error


def test_a_job_body_with_the_most_tensors_of_the_highest_rank_fits_its_limits():
    tensors = {f"{i:0256d}": np.zeros((1,) * 32, np.float32) for i in range(256)}
    inputs, outputs = bodies.decode_job(bodies.encode_job(tensors, [f"{i:0256d}" for i in range(256)]))
    assert len(inputs) == 256 and len(outputs or ()) == 256


# -- item 7: a field of the wrong type is a typed error, not a crash ---------------------------------

@pytest.mark.parametrize("kind", [[], {}, ["job"]], ids=["list", "map", "list holding a kind"])
def test_a_request_header_whose_type_is_not_a_string_is_malformed(kind):
    # A list or map is unhashable: looking it up among the request kinds raised TypeError, which
    # escaped the worker's ProtocolError handler and had the job redelivered again and again.
    with pytest.raises(MalformedMessage):
        RequestHeader.from_bytes(pack({"v": 1, "t": kind}))


# Found by tests/test_fuzz_network_parsers.py: before the fix a worker answered these with an
# "internal" error and a logged traceback.
@pytest.mark.parametrize("tensor", [["x", [], [1], b"\0" * 4], ["x", "float32", [2**61, 0], b""]],
                         ids=["unhashable dtype", "zero-size tensor of impossible dimensions"])
def test_a_tensor_of_an_unhashable_dtype_or_an_impossible_shape_is_a_typed_error(tensor):
    with pytest.raises(ProtocolError):
        bodies.decode_job(pack({"tensors": [tensor]}))


# -- end to end: a running worker and a producer shrug the hostile message off ----------------------

X = {"x": np.asarray([[1.0, 2.0, 3.0, 4.0]], np.float32), "bias": np.zeros(3, np.float32)}


def dead_lettered(worker, reason: str) -> float:
    return worker.metrics.registry.get_sample_value("enclaveq_worker_dead_lettered_total", {"reason": reason}) or 0.0


async def test_hostile_messages_on_the_job_queue_and_the_control_channel_cost_the_worker_little(
        tee, broker_url, pool):
    # Just under RabbitMQ 4's default 16 MiB message limit: a job, and an upload-sized message
    # that starts like a sealed request (the control channel hands those to the request path).
    big = many_empty_arrays(15 * MiB)
    big_envelope = b"\x84" + a_map_holding_many_empty_arrays(15 * MiB)[1:]
    # A clear control message smaller than the evidence a worker must read, asking for an answer.
    clear = many_empty_maps(200 * 1024)
    async with running_worker(tee, broker_url, pool) as worker:
        async with AsyncClient(broker_url, pool, tee.policy(), timeout=10) as client:
            model_id = await client.upload_model(mlp_model())
            core = client._core
            tracemalloc.start()
            try:
                await client._broker.publish_job(pool, Message(body=big, correlation_id="hostile-job"))
                # On the control fanout one message reaches every worker of the pool.
                await client._broker.publish_control(pool, Message(body=big_envelope, correlation_id="hostile-upload"))
                # The worker's refusal goes to the producer's reply queue, which cannot open it either.
                await client._broker.publish_control(pool, Message(body=clear, correlation_id="hostile-control",
                                                                   reply_to=core.reply_to))
                await wait_until(lambda: dead_lettered(worker, "malformed") == 2 and core.unopenable == 1,
                                 "the worker refused the three hostile messages", timeout=60)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            # Over AMQP, the copies the client makes of two 15 MiB messages while publishing and
            # receiving them (3.5x one message, measured; 0.02x in memory). Without the limits each
            # peek built more than 1 GiB of empty lists. Over MQTT, paho also reassembles each packet
            # in a growing buffer before copying it into the message (6.2x measured at worst).
            assert peak < (8 if broker_url.startswith("mqtt") else 6) * len(big)
            out = await client.run(model_id, X)
            assert set(out) == {"logits", "label"}


async def test_a_job_whose_header_type_is_a_list_is_dead_lettered_once(tee, memory_url, pool):
    header = pack({"v": 1, "t": ["job"], "sid": b"s" * 16})
    async with running_worker(tee, memory_url, pool) as worker:
        async with AsyncClient(memory_url, pool, tee.policy(), timeout=10) as client:
            model_id = await client.upload_model(mlp_model())
            await client._broker.publish_job(pool, Message(body=encode_envelope(header, b"n" * 12, b"c" * 16)))
            await wait_until(lambda: dead_lettered(worker, "malformed") == 1, "the worker dead-lettered the job",
                             timeout=TIMEOUT * 6)
            out = await client.run(model_id, X)
            assert set(out) == {"logits", "label"}
            assert dead_lettered(worker, "malformed") == 1
