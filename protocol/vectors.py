"""Deterministic test vectors for docs/protocol-vectors.json.

Everything is fixed (keys, ids, nonces) except the HPKE encapsulation, which is randomised by
design; the vector file therefore records one sealed session, and regenerating reuses it.
Run ``python -m protocol.vectors > docs/protocol-vectors.json`` to regenerate; the tests
rebuild every vector from its inputs and compare byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from . import bodies, crypto, frames
from .envelope import ProducerSession, peek_request, seal_result
from .handshake import Statement
from .tensors import DTYPES


def _fixed(label: str, size: int) -> bytes:
    return hashlib.sha256(label.encode()).digest()[:size]


def _rng_from(values: list[bytes]) -> Callable[[int], bytes]:
    queue = list(values)

    def rng(n: int) -> bytes:
        value = queue.pop(0)
        assert len(value) == n, (len(value), n)
        return value
    return rng


def sample_tensors() -> dict[str, np.ndarray]:
    return {
        f"t_{name}": (np.arange(6) % 2 == 1).reshape(2, 3) if name == "bool"
        else np.arange(-3, 3).astype(name).reshape(2, 3) if name.startswith(("int", "float"))
        else np.arange(6).astype(name).reshape(2, 3)
        for name in DTYPES
    }


def build_vectors(sealed_session: bytes | None = None) -> dict[str, Any]:
    pool_private = _fixed("enclaveq vector pool key", 32)
    pool_public = crypto.public_bytes(crypto.load_private_key(pool_private))
    pool, epoch = "vector-pool", 1
    session_key = _fixed("enclaveq vector session key", 32)
    session_id = _fixed("enclaveq vector session id", 16)
    if sealed_session is None:
        sealed_session = crypto.seal_session_key(session_key, pool_public, pool=pool, epoch=epoch, session_id=session_id)
    job_nonce = _fixed("enclaveq vector job nonce", 12)
    result_nonce = _fixed("enclaveq vector result nonce", 12)
    session = ProducerSession(pool=pool, epoch=epoch, pool_public_key=pool_public, rng=_rng_from([job_nonce]),
                              session_key=session_key, session_id=session_id, sealed_session=sealed_session)
    header = session.header("job", job_id="0123456789abcdef0123456789abcdef", deadline_ms=1_900_000_000_000,
                            reply_to="enclaveq.reply.vector-producer", content_type=bodies.TENSORS,
                            model_id=hashlib.sha256(b"vector model").hexdigest())
    job_body = bodies.encode_job(sample_tensors())
    job = session.seal(header, job_body)
    _, parsed = peek_request(job)
    result_body = bodies.encode_tensors_body({"y": np.array([[0.5, -1.25]], dtype=np.float32)})
    result = seal_result(session_key, parsed, "ok", bodies.TENSORS, result_body, rng=_rng_from([result_nonce]))
    # A frame of two jobs of the same model, and its answer: one result, one error.
    frame_nonce = _fixed("enclaveq vector frame nonce", 12)
    frame_result_nonce = _fixed("enclaveq vector frame result nonce", 12)
    frame_session = ProducerSession(pool=pool, epoch=epoch, pool_public_key=pool_public,
                                    rng=_rng_from([frame_nonce]), session_key=session_key, session_id=session_id,
                                    sealed_session=sealed_session)
    frame_header = frame_session.header("job_frame", job_id="f0123456789abcdef0123456789abcde",
                                        deadline_ms=1_900_000_000_000, reply_to="enclaveq.reply.vector-producer",
                                        content_type=frames.JOB_FRAME, model_id=header.model_id)
    frame_body = frames.encode_frame([frames.FramedJob("job-a", job_body),
                                      frames.FramedJob("job-b", bodies.encode_job({"x": np.zeros((1, 2), np.float32)}))])
    frame = frame_session.seal(frame_header, frame_body)
    _, parsed_frame = peek_request(frame)
    frame_results_body = frames.encode_frame_results([
        frames.FramedResult("job-a", "ok", bodies.TENSORS, result_body),
        frames.FramedResult("job-b", "error", bodies.ERROR,
                            bodies.ErrorBody(code=bodies.ErrorCode.BAD_INPUT, message="input 'x': wrong shape").to_bytes()),
    ])
    frame_result = seal_result(session_key, parsed_frame, "ok", frames.JOB_RESULTS, frame_results_body,
                               rng=_rng_from([frame_result_nonce]))
    statement = Statement(pool=pool, epoch=epoch, suite=crypto.SUITE_ID, pool_public_key=pool_public,
                          worker_identity_key=_fixed("enclaveq vector identity", 32),
                          nonce=_fixed("enclaveq vector nonce", 32), config_digest=_fixed("enclaveq vector config", 32))
    return {
        "description": "enclaveq protocol v1 test vectors; all byte strings are lowercase hex",
        "suite": crypto.SUITE_ID,
        "session": {
            "pool": pool, "epoch": epoch, "pool_private_key": pool_private.hex(), "pool_public_key": pool_public.hex(),
            "session_id": session_id.hex(), "session_key": session_key.hex(),
            "hpke_info": crypto.session_info(pool, epoch, session_id).hex(), "sealed_session": sealed_session.hex(),
        },
        "keys": {
            "job_key": crypto.derive_key(session_key, crypto.KeyPurpose.JOB, session_id, header.job_id).hex(),
            "result_key": crypto.derive_key(session_key, crypto.KeyPurpose.RESULT, session_id, header.job_id).hex(),
        },
        "job": {
            "job_id": header.job_id, "model_id": header.model_id, "deadline_ms": header.deadline_ms,
            "reply_to": header.reply_to, "nonce": job_nonce.hex(), "header": header.to_bytes().hex(),
            "body": job_body.hex(), "envelope": job.hex(),
        },
        "result": {"nonce": result_nonce.hex(), "body": result_body.hex(), "envelope": result.hex()},
        "frame": {
            "job_id": frame_header.job_id, "nonce": frame_nonce.hex(), "header": frame_header.to_bytes().hex(),
            "body": frame_body.hex(), "envelope": frame.hex(),
            "result": {"nonce": frame_result_nonce.hex(), "body": frame_results_body.hex(),
                       "envelope": frame_result.hex()},
        },
        "statement": {
            "canonical": statement.canonical().hex(), "report_data": statement.report_data().hex(),
            **{k: (v.hex() if isinstance(v, bytes) else v) for k, v in statement.to_map().items()},
        },
    }


if __name__ == "__main__":
    existing = None
    if len(sys.argv) > 1:
        with open(sys.argv[1]) as f:
            existing = bytes.fromhex(json.load(f)["session"]["sealed_session"])
    json.dump(build_vectors(existing), sys.stdout, indent=2)
    sys.stdout.write("\n")
