"""The wire protocol: published vectors, tensors of every dtype, and tamper resistance -- only
ciphertext on the wire (P1), any change fails to open (P3), results only for their producer (P4),
malformed input is a typed error (P9)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from protocol import bodies, crypto
from protocol.codec import pack, unpack
from protocol.envelope import (ProducerSession, RequestHeader, decode_envelope, encode_envelope, open_request,
                               peek_request, peek_result, seal_result)
from protocol.errors import DecryptionFailed, MalformedMessage, OversizedMessage, ProtocolError, TensorError, UnsupportedVersion
from protocol.handshake import Challenge, EvidenceResponse, Statement
from protocol.tensors import DTYPES, TensorLimits, decode_tensors, encode_tensors
from protocol.vectors import build_vectors, sample_tensors

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "docs" / "protocol-vectors.json").read_text())


@pytest.fixture
def pool_key():
    return crypto.generate_private_key()


def new_session(pool_key, pool="p", epoch=1):
    return ProducerSession(pool=pool, epoch=epoch, pool_public_key=crypto.public_bytes(pool_key))


def sealed_job(session, *, job_id="job-1", inputs=None):
    header = session.header("job", job_id=job_id, deadline_ms=10**13, reply_to="enclaveq.reply.me",
                            content_type=bodies.TENSORS, model_id="ab" * 32)
    return session.seal(header, bodies.encode_job(inputs or {"x": np.arange(4, dtype=np.float32)}))


def worker_open(data, pool_key, pool="p"):
    sealed, header = peek_request(data)
    key = crypto.open_session_key(header.sealed_session, pool_key, pool=pool, epoch=header.epoch,
                                  session_id=header.session_id)
    return header, key, open_request(sealed, header, key)


# -- published vectors -------------------------------------------------------------------------

def test_the_published_vectors_are_reproduced_byte_for_byte():
    rebuilt = build_vectors(bytes.fromhex(VECTORS["session"]["sealed_session"]))
    assert json.loads(json.dumps(rebuilt)) == VECTORS


def test_the_vector_sealed_session_opens_with_the_vector_pool_key():
    s = VECTORS["session"]
    key = crypto.open_session_key(bytes.fromhex(s["sealed_session"]), crypto.load_private_key(bytes.fromhex(s["pool_private_key"])),
                                  pool=s["pool"], epoch=s["epoch"], session_id=bytes.fromhex(s["session_id"]))
    assert key.hex() == s["session_key"]


def test_the_vector_job_opens_to_the_vector_tensors():
    s = VECTORS["session"]
    sealed, header = peek_request(bytes.fromhex(VECTORS["job"]["envelope"]))
    body = open_request(sealed, header, bytes.fromhex(s["session_key"]))
    inputs, _ = bodies.decode_job(body)
    expected = sample_tensors()
    assert set(inputs) == set(expected)
    for name, value in expected.items():
        assert inputs[name].dtype == value.dtype and np.array_equal(inputs[name], value)


def test_the_vector_keys_are_plain_rfc5869_hkdf_of_the_session_key():
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    s, job = VECTORS["session"], VECTORS["job"]
    for purpose, name in ((crypto.KeyPurpose.JOB, "job_key"), (crypto.KeyPurpose.RESULT, "result_key")):
        info = pack([purpose, bytes.fromhex(s["session_id"]), job["job_id"]])
        expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(bytes.fromhex(s["session_key"]))
        assert VECTORS["keys"][name] == expected.hex()


# -- sessions ----------------------------------------------------------------------------------

def test_a_sealed_session_opens_only_for_its_pool_epoch_and_session_id(pool_key):
    session = new_session(pool_key)
    sid = session.session_id
    assert len(crypto.open_session_key(session.sealed_session, pool_key, pool="p", epoch=1, session_id=sid)) == 32
    for pool, epoch, session_id in [("other", 1, sid), ("p", 2, sid), ("p", 1, bytes(16))]:
        with pytest.raises(DecryptionFailed):
            crypto.open_session_key(session.sealed_session, pool_key, pool=pool, epoch=epoch, session_id=session_id)


def test_a_session_sealed_to_one_pool_key_does_not_open_with_another(pool_key):
    session = new_session(pool_key)
    with pytest.raises(DecryptionFailed):
        crypto.open_session_key(session.sealed_session, crypto.generate_private_key(), pool="p", epoch=1,
                                session_id=session.session_id)


def test_the_session_key_never_appears_in_its_repr(pool_key):
    session = new_session(pool_key)
    assert session._key.hex() not in repr(session) and "key" not in repr(session).lower().replace("pool", "")


# -- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (1,), (3, 1, 2), (2, 0, 5)])
def test_every_dtype_and_shape_round_trips_exactly(dtype, shape):
    rng = np.random.default_rng(7)
    if dtype == "bool":
        value = rng.integers(0, 2, size=shape).astype(bool)
    elif dtype.startswith("float"):
        value = rng.standard_normal(size=shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        value = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    decoded = decode_tensors(unpack(pack(encode_tensors({"v": value}))))["v"]
    assert decoded.dtype == value.dtype and decoded.shape == value.shape
    assert decoded.tobytes() == value.tobytes()


def test_big_endian_and_non_contiguous_inputs_are_sent_as_little_endian_c_order():
    value = np.arange(12, dtype=">i4").reshape(3, 4).T
    decoded = decode_tensors(encode_tensors({"v": value}))["v"]
    assert np.array_equal(decoded, value) and decoded.dtype == np.dtype("int32")


def test_a_job_and_its_result_round_trip_through_worker_and_producer(pool_key):
    session = new_session(pool_key)
    header, key, body = worker_open(sealed_job(session, inputs={"a": np.ones((2, 2), np.float64), "b": np.zeros(3, np.int8)}), pool_key)
    inputs, outputs = bodies.decode_job(body)
    assert set(inputs) == {"a", "b"} and outputs is None
    result = seal_result(key, header, "ok", bodies.TENSORS, bodies.encode_tensors_body({"y": inputs["a"] * 2}))
    rheader, rbody = session.open_result(result)
    assert rheader.job_id == "job-1" and rheader.status == "ok"
    assert np.array_equal(bodies.decode_tensors_body(rbody)["y"], np.full((2, 2), 2.0))


def test_every_encryption_uses_a_fresh_nonce_even_for_the_same_job(pool_key):
    session = new_session(pool_key)
    header, key, _ = worker_open(sealed_job(session), pool_key)
    first = decode_envelope(seal_result(key, header, "ok", bodies.EMPTY, b"\x80"))
    second = decode_envelope(seal_result(key, header, "ok", bodies.EMPTY, b"\x80"))
    assert first.nonce != second.nonce


# -- tampering (P3) and isolation (P4) ---------------------------------------------------------

def _flip_every_byte(data: bytes):
    for i in range(len(data)):
        yield i, data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]


def test_changing_any_byte_of_a_job_makes_it_fail_to_open(pool_key):
    session = new_session(pool_key)
    job = sealed_job(session)
    for i, tampered in _flip_every_byte(job):
        with pytest.raises(ProtocolError):
            worker_open(tampered, pool_key)
            pytest.fail(f"job with byte {i} changed still opened")


def test_changing_any_byte_of_a_result_makes_it_fail_to_open(pool_key):
    session = new_session(pool_key)
    header, key, _ = worker_open(sealed_job(session), pool_key)
    result = seal_result(key, header, "ok", bodies.TENSORS, bodies.encode_tensors_body({"y": np.ones(3, np.float32)}))
    for i, tampered in _flip_every_byte(result):
        with pytest.raises(ProtocolError):
            session.open_result(tampered)
            pytest.fail(f"result with byte {i} changed still opened")


@pytest.mark.parametrize("change", [
    {"reply_to": "enclaveq.reply.attacker"}, {"deadline_ms": 10**13 + 1}, {"model_id": "cd" * 32},
    {"job_id": "job-2"}, {"content_type": "error/v1"}, {"kind": "model_delete"},
])
def test_re_encoding_a_job_header_with_another_steering_value_fails_to_open(pool_key, change):
    session = new_session(pool_key)
    sealed, header = peek_request(sealed_job(session))
    forged = dataclasses.replace(header, **change).to_bytes()
    key = crypto.open_session_key(header.sealed_session, pool_key, pool="p", epoch=1, session_id=header.session_id)
    with pytest.raises(DecryptionFailed):
        open_request(dataclasses.replace(sealed, header_bytes=forged), RequestHeader.from_bytes(forged), key)


def test_a_result_cannot_be_moved_to_another_job(pool_key):
    session = new_session(pool_key)
    header, key, _ = worker_open(sealed_job(session, job_id="job-A"), pool_key)
    result = decode_envelope(seal_result(key, header, "ok", bodies.EMPTY, b"\x80"))
    _, rheader = peek_result(encode_envelope(result.header_bytes, result.nonce, result.ciphertext))
    moved = dataclasses.replace(rheader, job_id="job-B").to_bytes()
    with pytest.raises(DecryptionFailed):
        session.open_result(encode_envelope(moved, result.nonce, result.ciphertext))


def test_another_producer_on_the_same_pool_cannot_open_a_result(pool_key):
    alice, mallory = new_session(pool_key), new_session(pool_key)
    header, key, _ = worker_open(sealed_job(alice), pool_key)
    result = seal_result(key, header, "ok", bodies.EMPTY, b"\x80")
    with pytest.raises(DecryptionFailed):
        mallory.open_result(result)


def test_a_job_sealed_under_one_session_does_not_open_under_another_session_key(pool_key):
    alice, mallory = new_session(pool_key), new_session(pool_key)
    sealed, header = peek_request(sealed_job(alice))
    mallory_key = mallory._key
    with pytest.raises(DecryptionFailed):
        open_request(sealed, header, mallory_key)


# -- malformed input (P9) ----------------------------------------------------------------------

def test_every_truncation_of_a_job_is_a_typed_error(pool_key):
    job = sealed_job(new_session(pool_key))
    for n in range(len(job)):
        with pytest.raises(ProtocolError):
            worker_open(job[:n], pool_key)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_parsers(data):
    for parse in (peek_request, peek_result, Challenge.from_bytes, EvidenceResponse.from_bytes,
                  bodies.ErrorBody.from_bytes, bodies.decode_models, lambda d: bodies.decode_job(d)):
        try:
            parse(data)
        except ProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5),
                    max_leaves=30))
def test_arbitrary_msgpack_values_never_crash_the_parsers(value):
    data = pack(value)
    for parse in (peek_request, peek_result, Challenge.from_bytes, EvidenceResponse.from_bytes,
                  lambda d: bodies.decode_job(d), bodies.decode_tensors_body):
        try:
            parse(data)
        except ProtocolError:
            pass


def test_a_newer_protocol_version_is_refused_by_name():
    with pytest.raises(UnsupportedVersion, match="version 2"):
        Challenge.from_bytes(pack({"v": 2, "t": "challenge", "nonce": bytes(32)}))


def test_oversized_messages_and_tensors_are_refused_before_parsing():
    with pytest.raises(OversizedMessage):
        peek_request(b"\x00" * 1001, max_bytes=1000)
    big = encode_tensors({"x": np.zeros(1000, np.float64)})
    with pytest.raises(OversizedMessage):
        decode_tensors(big, TensorLimits(max_tensor_bytes=4000))


@pytest.mark.parametrize("wire, error", [
    ([["x", "complex64", [1], b"\x00" * 8]], TensorError),
    ([["x", "float32", [2], b"\x00" * 4]], TensorError),
    ([["x", "float32", [-1], b""]], TensorError),
    ([["x", "float32", [1], b"\x00" * 4], ["x", "float32", [1], b"\x00" * 4]], TensorError),
    ([["x", "float32", [1]]], MalformedMessage),
    ("not a list", MalformedMessage),
])
def test_inconsistent_tensors_are_typed_errors(wire, error):
    with pytest.raises(error):
        decode_tensors(wire)


def test_unsupported_dtypes_are_refused_when_encoding():
    with pytest.raises(TensorError, match="not supported"):
        encode_tensors({"x": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(TensorError, match="not supported"):
        encode_tensors({"x": np.array([1 + 2j])})


def test_string_tensors_round_trip_as_utf8_strings():
    text = np.array([["Hello, my dog is cute", "héllo"], ["", "🐕"]])
    decoded = decode_tensors(encode_tensors({"text": text, "labels": np.array(["a"], dtype=object)}))
    assert decoded["text"].dtype == object and decoded["text"].tolist() == text.tolist()
    assert decoded["labels"].tolist() == ["a"]


@pytest.mark.parametrize("data, error", [
    (["a", "b", "c"], TensorError),   # 3 strings for a shape of 2
    ([b"a", b"b"], MalformedMessage),  # bytes are not strings
    ("ab", MalformedMessage),          # not a list
])
def test_malformed_string_tensors_are_refused(data, error):
    with pytest.raises(error):
        decode_tensors([["text", "string", [2], data]])


def test_a_string_tensor_counts_against_the_size_limits():
    with pytest.raises(OversizedMessage):
        decode_tensors([["text", "string", [1], ["x" * 2000]]], TensorLimits(max_tensor_bytes=1000))


def test_the_statement_hash_changes_with_every_field():
    base = Statement(pool="p", epoch=1, suite=crypto.SUITE_ID, pool_public_key=bytes(32), worker_identity_key=bytes(32),
                     nonce=bytes(32), config_digest=bytes(32))
    variants = [dataclasses.replace(base, pool="q"), dataclasses.replace(base, epoch=2),
                dataclasses.replace(base, suite="x"), dataclasses.replace(base, pool_public_key=b"\x01" * 32),
                dataclasses.replace(base, worker_identity_key=b"\x01" * 32),
                dataclasses.replace(base, nonce=b"\x01" * 32), dataclasses.replace(base, config_digest=b"\x01" * 32)]
    digests = {base.report_data()} | {v.report_data() for v in variants}
    assert len(digests) == len(variants) + 1 and all(len(d) == 64 for d in digests)


def test_changing_any_byte_of_a_model_chunk_or_model_operation_makes_it_fail_to_open(pool_key):
    from protocol.envelope import Chunk
    session = new_session(pool_key)
    chunk = session.seal(session.header("model_chunk", job_id="c-1", deadline_ms=10**13, reply_to="r",
                                        content_type=bodies.BYTES, model_id="ab" * 32,
                                        chunk=Chunk(upload_id="u", index=0, count=2, total_size=9)), b"onnx-part")
    delete = session.seal(session.header("model_delete", job_id="d-1", deadline_ms=10**13, reply_to="r",
                                         content_type=bodies.EMPTY, model_id="ab" * 32), b"\x80")
    for message in (chunk, delete):
        assert worker_open(message, pool_key)[2] in (b"onnx-part", b"\x80")
        for i, tampered in _flip_every_byte(message):
            with pytest.raises(ProtocolError):
                worker_open(tampered, pool_key)
                pytest.fail(f"model message with byte {i} changed still opened")
