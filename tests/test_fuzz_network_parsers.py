"""Fuzz every parse of bytes a broker can write: whatever arrives, a parser returns a value or
raises a ``ProtocolError`` -- never ValueError, TypeError, KeyError, IndexError, RecursionError,
MemoryError or OverflowError (issue 9, item 7 and "Also").

Targets: the envelope peeks (worker and producer), both headers, the worker's control dispatch
and every control message parser, producer proofs, the signed ownership forms and the bodies a
worker opens from any session, and the producer's reply queue (``ProducerCore.receive`` with a
live session, which must never raise at all, and ``accept_evidence``, whose only error is
``AttestationFailed``). Each gets three kinds of input:

(a) random bytes;
(b) a valid message -- of its own kind mostly, of another kind sometimes -- with its bytes mutated:
    bit flips, truncation, insertion (of random bytes or of hostile msgpack headers), deletion,
    duplication, overwriting with msgpack type bytes;
(c) msgpack values: arbitrary ones (recursive strategy), and valid messages whose fields,
    recursively (into nested maps, and into the bytes an envelope carries as its header), are
    replaced by arbitrary values, deleted, or joined by extra fields.

The suite runs a small budget with derandomized (fixed) inputs; ``make fuzz`` sets
ENCLAVEQ_FUZZ_EXAMPLES (examples per target and kind of input) for a large run with fresh
randomness, and prints how many inputs each target received.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation.errors import AttestationError
from producer_sdk.core import ProducerCore
from producer_sdk.errors import AttestationFailed
from protocol import bodies, crypto
from protocol.codec import pack
from protocol.envelope import (RequestHeader, ResultHeader, decode_envelope, peek_request, peek_result,
                               seal_result)
from protocol.errors import ProtocolError
from protocol.handshake import (Challenge, ControlError, EpochAnnounce, EvidenceResponse, JoinRequest, JoinResponse,
                                ModelSyncChunk, ModelSyncRequest, Statement, control_kind)
from protocol.ownership import DeleteOrder, ModelManifest, ProducerProof, public_key_bytes

FUZZ_EXAMPLES = int(os.environ.get("ENCLAVEQ_FUZZ_EXAMPLES", "0"))
SUITE_EXAMPLES = 40
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES or SUITE_EXAMPLES,
    derandomize=not FUZZ_EXAMPLES,  # the suite always runs the same inputs
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
WORKER_MAX_BYTES = 64 * 1024 * 1024
POOL = "fuzz-pool"
ATTESTATION_NONCE = b"\x07" * 32

# Inputs each target received, and those that raised anything else, printed at the end of the
# module (``make fuzz`` shows them).
INPUTS: Counter[str] = Counter()
ESCAPED: Counter[str] = Counter()


# -- valid messages, as value trees (Packed marks bytes that are themselves a msgpack message) --

@dataclass(frozen=True)
class Packed:
    value: Any


def encode(tree: Any) -> bytes:
    return pack(materialize(tree))


def materialize(tree: Any) -> Any:
    if isinstance(tree, Packed):
        return encode(tree.value)
    if isinstance(tree, dict):
        return {k: materialize(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [materialize(v) for v in tree]
    return tree


NESTED_FIELDS = {"h", "m", "pp"}  # envelope header, signed part of an ownership form, producer proof


def as_tree(data: bytes) -> Any:
    """The value tree of a valid message: the nested messages it carries become ``Packed``."""
    value = msgpack.unpackb(data, raw=False)
    return _nest(value)


def _nest(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: Packed(_nest(msgpack.unpackb(v, raw=False))) if k in NESTED_FIELDS and isinstance(v, bytes)
                else _nest(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nest(v) for v in value]
    return value


def fixed_rng(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


@cache
def world() -> dict[str, Any]:
    """One pool key, producer, session and a valid message of every kind, made once."""
    pool_key = crypto.load_private_key(bytes(range(32)))
    pool_public = crypto.public_bytes(pool_key)
    producer = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
    owner = Ed25519PrivateKey.from_private_bytes(b"\x02" * 32)

    # The producer's core, with a session opened by an answer our fake verifier accepts.
    core = ProducerCore(pool=POOL, policy=None, reply_to="reply-queue", rng=fixed_rng(1),
                        verifier=lambda *args, **kwargs: object(), producer_key=producer)
    correlation_id, challenge = core.challenge()
    statement = Statement(pool=POOL, epoch=3, suite=crypto.SUITE_ID, pool_public_key=pool_public,
                          worker_identity_key=b"i" * 32, nonce=Challenge.from_bytes(challenge).nonce,
                          config_digest=b"d" * 32)
    core.accept_evidence(correlation_id, EvidenceResponse(platform="sim", evidence=b"e" * 64, statement=statement,
                                                          worker_id="worker-1").to_bytes())
    session = core.session
    assert session is not None
    model_id = "ab" * 32
    job = core.job(model_id, {"x": np.ones((2, 4), np.float32), "bias": np.zeros(3, np.float32)},
                   outputs=["logits"], timeout=10)
    _, header = peek_request(job.body)
    session_key = crypto.open_session_key(session.sealed_session, pool_key, pool=POOL, epoch=3,
                                          session_id=session.session_id)
    result = seal_result(session_key, header, "ok", bodies.TENSORS,
                         bodies.encode_tensors_body({"logits": np.ones((2, 3), np.float32)}), current_epoch=4)
    error_result = seal_result(session_key, header, "error", bodies.ERROR,
                               bodies.ErrorBody(code="bad_input", message="no").to_bytes())
    _, chunks = core.model_chunks(b"model bytes", owner_key=owner, allowed_producers=[public_key_bytes(producer)],
                                  timeout=10, chunk_bytes=4)
    upload = chunks[1]()
    delete = core.model_delete(model_id, owner_key=owner, timeout=10)

    # A second core whose challenge nonce is fixed, whose verifier refuses everything: its
    # accept_evidence parses any answer as far as it goes, and never opens a session.
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AttestationError("fuzz: evidence refused")
    attesting = ProducerCore(pool=POOL, policy=None, reply_to="reply-queue", rng=lambda n: b"\x07" * n,
                             verifier=refuse)

    evidence_statement = Statement(pool=POOL, epoch=3, suite=crypto.SUITE_ID, pool_public_key=pool_public,
                                   worker_identity_key=b"i" * 32, nonce=ATTESTATION_NONCE, config_digest=b"d" * 32)
    next_statement = Statement(pool=POOL, epoch=4, suite=crypto.SUITE_ID, pool_public_key=b"p" * 32,
                               worker_identity_key=b"i" * 32, nonce=b"r" * 32, config_digest=b"d" * 32)
    signed_manifest = ModelManifest(model_id=model_id, size=11, owner_key=public_key_bytes(owner),
                                    allowed_producers=(public_key_bytes(producer),), issued_at_ms=1).sign(owner)
    signed_delete = DeleteOrder(model_id=model_id, owner_key=public_key_bytes(owner), issued_at_ms=2).sign(owner)
    messages = {
        "job": job.body,
        "upload": upload.body,
        "delete": delete.body,
        "result": result,
        "error result": error_result,
        "challenge": Challenge(nonce=b"c" * 32).to_bytes(),
        "evidence": EvidenceResponse(platform="sim", evidence=b"e" * 64, statement=evidence_statement,
                                     worker_id="worker-1").to_bytes(),
        "control error": ControlError(code="malformed", message="no").to_bytes(),
        "stale epoch": ControlError(code="stale_epoch", message="attest again").to_bytes(),
        "join request": JoinRequest(platform="sim", evidence=b"e" * 64, statement=evidence_statement,
                                    worker_id="worker-2").to_bytes(),
        "join response": JoinResponse(platform="sim", evidence=b"e" * 64, statement=evidence_statement,
                                      sealed_keys=b"k" * 100, worker_id="worker-1").to_bytes(),
        "model sync request": ModelSyncRequest(have=(model_id, "cd" * 32), worker_id="worker-2", nonce=b"n" * 32,
                                               epoch=3, issued_at_ms=5, mac=b"m" * 32, source="worker-1").to_bytes(),
        "model sync chunk": ModelSyncChunk(epoch=3, model_id=model_id, index=0, count=2, total_size=11,
                                           sealed=b"s" * 40).to_bytes(),
        "epoch announce": EpochAnnounce(platform="sim", evidence=b"e" * 64, statement=next_statement,
                                        previous_epoch=3, retire_at_ms=9, sealed_key=b"k" * 80,
                                        worker_id="worker-1").to_bytes(),
        "producer proof": session.producer_proof,
        "manifest": signed_manifest,
        "delete order": signed_delete,
        "job body": bodies.encode_job({"x": np.ones((2, 4), np.float32)}, ["logits"]),
        "tensors body": bodies.encode_tensors_body({"y": np.arange(6, dtype=np.int64).reshape(2, 3)}),
        "error body": bodies.ErrorBody(code="bad_input", message="no").to_bytes(),
        "model list": bodies.encode_models([bodies.ModelInfo(model_id=model_id, size=11,
                                                             inputs=(("x", "tensor(float)", (None, 4)),),
                                                             outputs=(("y", "tensor(float)", ("n", 3)),))]),
        "ack": bodies.encode_ack(model_id, 2, False),
        "rotate": bodies.encode_rotate(30),
        "rotated": bodies.encode_rotated(4, 9),
        "model chunk body": bodies.encode_model_chunk(signed_manifest, b"data"),
    }
    return {"core": core, "job_id": header.job_id, "attesting": attesting, "messages": messages}


# -- the targets: what each one calls, which valid messages it mostly gets, what it may raise ----

def receive(data: bytes) -> None:
    w = world()
    core = w["core"]
    for correlation_id in (None, w["job_id"], "att-" + "0" * 32):
        core.receive(correlation_id, data)  # returns what to do, or None: never raises


def accept_evidence(data: bytes) -> None:
    core = world()["attesting"]
    correlation_id, _ = core.challenge()
    core.accept_evidence(correlation_id, data)


@dataclass(frozen=True)
class Target:
    parse: Callable[[bytes], object]
    seeds: tuple[str, ...]
    may_raise: tuple[type[BaseException], ...] = (ProtocolError,)


CONTROL = ("challenge", "evidence", "control error", "join request", "join response", "model sync request",
           "model sync chunk", "epoch announce")
TARGETS: dict[str, Target] = {
    "decode_envelope": Target(lambda d: decode_envelope(d, max_bytes=WORKER_MAX_BYTES), ("job", "upload", "result")),
    "peek_request": Target(lambda d: peek_request(d, max_bytes=WORKER_MAX_BYTES), ("job", "upload", "delete")),
    "peek_result": Target(peek_result, ("result", "error result")),
    "RequestHeader": Target(RequestHeader.from_bytes, ("job", "upload", "delete")),
    "ResultHeader": Target(ResultHeader.from_bytes, ("result", "error result")),
    "control_kind": Target(lambda d: control_kind(d, max_bytes=WORKER_MAX_BYTES), (*CONTROL, "upload")),
    "Challenge": Target(Challenge.from_bytes, ("challenge",)),
    "EvidenceResponse": Target(EvidenceResponse.from_bytes, ("evidence",)),
    "ControlError": Target(ControlError.from_bytes, ("control error", "stale epoch")),
    "JoinRequest": Target(JoinRequest.from_bytes, ("join request",)),
    "JoinResponse": Target(JoinResponse.from_bytes, ("join response",)),
    "ModelSyncRequest": Target(ModelSyncRequest.from_bytes, ("model sync request",)),
    "ModelSyncChunk": Target(ModelSyncChunk.from_bytes, ("model sync chunk",)),
    "EpochAnnounce": Target(EpochAnnounce.from_bytes, ("epoch announce",)),
    "ProducerProof": Target(ProducerProof.from_bytes, ("producer proof",)),
    "ModelManifest.verify": Target(ModelManifest.verify, ("manifest",)),
    "DeleteOrder.verify": Target(DeleteOrder.verify, ("delete order",)),
    "decode_job": Target(bodies.decode_job, ("job body",)),
    "decode_tensors_body": Target(bodies.decode_tensors_body, ("tensors body",)),
    "ErrorBody": Target(bodies.ErrorBody.from_bytes, ("error body",)),
    "decode_models": Target(bodies.decode_models, ("model list",)),
    "decode_ack": Target(bodies.decode_ack, ("ack",)),
    "decode_rotate": Target(bodies.decode_rotate, ("rotate",)),
    "decode_rotated": Target(bodies.decode_rotated, ("rotated",)),
    "decode_model_chunk": Target(lambda d: bodies.decode_model_chunk(d, max_bytes=WORKER_MAX_BYTES),
                                 ("model chunk body",)),
    "ProducerCore.receive": Target(receive, ("result", "error result", "stale epoch", "control error"), ()),
    "ProducerCore.accept_evidence": Target(accept_evidence, ("evidence", "control error"), (AttestationFailed,)),
}


def check(name: str, data: bytes) -> None:
    """Feed ``data`` to target ``name``; anything but its typed errors fails the test."""
    target = TARGETS[name]
    INPUTS[name] += 1
    try:
        target.parse(data)
    except target.may_raise:
        pass
    except BaseException:
        ESCAPED[name] += 1
        raise


@pytest.fixture(scope="module", autouse=True)
def report_inputs(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not INPUTS:
        return
    with capture.global_and_fixture_disabled():  # past pytest's output capture, also without -s
        reporter.write_line("")
        for name, count in sorted(INPUTS.items()):
            outcome = f"{ESCAPED[name]:,} raised an untyped error" if ESCAPED[name] else "nothing but typed errors"
            reporter.write_line(f"fuzz: {count:>9,} inputs to {name}: {outcome}")
        reporter.write_line(f"fuzz: {sum(INPUTS.values()):>9,} inputs in all, {sum(ESCAPED.values()):,} untyped errors")


# -- (a) random bytes ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", TARGETS)
@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_raise_only_typed_errors(name, data):
    check(name, data)


# -- (b) valid messages with mutated bytes ---------------------------------------------------------

# Headers of hostile msgpack objects: huge declared lengths, the reserved byte, ext types,
# deep nests, extreme numbers.
HOSTILE_PIECES = [
    b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff",
    b"\xc1", b"\xd4\x00\x00", b"\xc7\x01\x05x", b"\xd6\xff\x00\x00\x00\x00", b"\x91" * 40 + b"\x90",
    b"\x90" * 64, b"\x80", b"\xc0", b"\xc2", b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00", b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",
    b"\xcb\x7f\xf0\x00\x00\x00\x00\x00\x00", b"\xa3\xff\xfe\xfd", b"\xd9\x02\xed\xa0",
]
TYPE_BYTES = [0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7,
              0xCA, 0xCB, 0xCC, 0xCF, 0xD0, 0xD3, 0xD4, 0xD8, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xE0, 0xFF]


def seed_names(name: str) -> st.SearchStrategy[str]:
    own = st.sampled_from(TARGETS[name].seeds)
    return st.one_of(own, own, own, st.sampled_from(sorted(world()["messages"])))


@st.composite
def mutated(draw: st.DrawFn, name: str) -> bytes:
    data = bytearray(world()["messages"][draw(seed_names(name))])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "flip", "truncate", "insert", "hostile", "delete", "duplicate",
                                   "type byte"]))
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "hostile":
            data[at:at] = draw(st.sampled_from(HOSTILE_PIECES))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "duplicate":
            data[at:at] = data[at:at + draw(st.integers(1, 64))]
        elif op == "type byte" and at < len(data):
            data[at] = draw(st.sampled_from(TYPE_BYTES))
    return bytes(data)


@pytest.mark.parametrize("name", TARGETS)
@FUZZ
@given(data=st.data())
def test_mutated_valid_messages_raise_only_typed_errors(name, data):
    check(name, data.draw(mutated(name)))


# -- (c) structured msgpack values -------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=80),
    st.binary(max_size=80), st.sampled_from([0, -1, 1, 2**32, 2**63 - 1, 2**64 - 1, -(2**63), "", b"", "job",
                                             "model_chunk", "result", "ok", "error", "challenge", "evidence"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=6), st.dictionaries(st.text(max_size=8), children,
                                                                               max_size=6)),
    max_leaves=30,
)


@st.composite
def altered(draw: st.DrawFn, tree: Any) -> Any:
    """``tree`` with some of its fields, at any depth, replaced, deleted or joined by others."""
    if isinstance(tree, Packed):
        if draw(st.integers(0, 9)) == 0:
            return draw(VALUES)  # not even bytes any more
        return Packed(draw(altered(tree.value)))
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            roll = draw(st.integers(0, 9))
            if roll == 0:
                continue  # deleted
            out[key] = draw(VALUES) if roll == 1 else draw(altered(value))
        for key in draw(st.lists(st.text(max_size=8), max_size=2)):
            out[key] = draw(VALUES)
        return out
    if isinstance(tree, list):
        items = [draw(VALUES) if draw(st.integers(0, 9)) == 0 else draw(altered(v)) for v in tree]
        if draw(st.integers(0, 9)) == 0:
            items = items[:draw(st.integers(0, len(items)))]
        return items
    return draw(VALUES) if draw(st.integers(0, 9)) == 0 else tree


@pytest.mark.parametrize("name", TARGETS)
@FUZZ
@given(data=st.data())
def test_structured_values_raise_only_typed_errors(name, data):
    if data.draw(st.integers(0, 3)) == 0:
        value = data.draw(VALUES)
    else:
        value = data.draw(altered(as_tree(world()["messages"][data.draw(seed_names(name))])))
    check(name, encode(value))
