"""Frames: many jobs of one model in one sealed request, their results in one sealed answer (issue 12).

A frame is an ordinary sealed request (``protocol.envelope``) of kind ``job_frame``: its header
names the session, the frame's own id, the deadline, the reply target and the model, exactly as
a job's does, and is the AEAD's associated data. Its plaintext body (content type
:data:`JOB_FRAME`) is::

    {"jobs": [[job_id, job_body], ...]}        # job_body: a job's body, bodies.encode_job

The worker runs each job as if it had arrived alone (same model, deadline and session), and
answers with one sealed result of the frame's id whose body (content type :data:`JOB_RESULTS`)
is::

    {"results": [[job_id, status, content_type, body], ...]}   # one per job, in frame order

Why this composition is sound (docs/protocol.md, "Frames"): the frame's plaintext is sealed
with AES-256-GCM under a key derived (HKDF) from the session key and the frame id, with the
header as associated data -- the construction every job already uses. So every job id, every
job body and their order are authenticated together: nothing in a frame can be added, dropped,
reordered or moved to another frame without failing to open. The answer is sealed the same way
under the result key of the frame id; each job's status and result are authenticated, and bound
to its job id, by that one tag. Replay protection is the frame's (its id enters the worker's
replay guard like a job id), and the producer accepts each job id at most once.

What a frame reveals to the broker: its size and the size of its answer, as for a job, and
therefore roughly how many jobs it carries. Frames are *not* padded: the number of jobs per
frame depends on the producer's linger and batch settings, which the broker can already
infer from timing; padding would cost every frame bandwidth for little. A producer that must
hide it sends frames of a fixed number of jobs (``FrameSettings(max_jobs=N)`` with full frames).

Limits: at most :data:`MAX_FRAME_JOBS` jobs, unique ids of at most ``MAX_JOB_ID`` characters,
and the message size limit of the pool for the whole frame. The structure is checked before
msgpack builds anything (``protocol.limits``); the frame is authenticated before it is decoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .codec import DEFAULT_MAX_MESSAGE_BYTES, pack, unpack
from .envelope import MAX_JOB_ID, RESULT_STATUSES
from .errors import MalformedMessage

JOB_FRAME = "job-frame/v1"
JOB_RESULTS = "job-results/v1"
MAX_FRAME_JOBS = 1024
# {"jobs": [[id, body] x N]}: the map, its key, the list, N pairs of 3 objects each.
FRAME_ITEMS = 3 + 3 * MAX_FRAME_JOBS
# {"results": [[id, status, content type, body] x N]}.
RESULTS_ITEMS = 3 + 5 * MAX_FRAME_JOBS
_MAX_CONTENT_TYPE = 64


@dataclass(frozen=True)
class FramedJob:
    job_id: str
    body: bytes  # bodies.encode_job


@dataclass(frozen=True)
class FramedResult:
    job_id: str
    status: str        # "ok" or "error"
    content_type: str  # bodies.TENSORS for "ok", bodies.ERROR for "error"
    body: bytes


def encode_frame(jobs: Sequence[FramedJob]) -> bytes:
    _check_ids([job.job_id for job in jobs])
    return pack({"jobs": [[job.job_id, job.body] for job in jobs]})


def decode_frame(body: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[FramedJob]:
    """The jobs of an opened frame; ``MalformedMessage`` for anything else."""
    m = unpack(body, max_bytes=max_bytes, what="job frame", max_depth=3, max_items=FRAME_ITEMS,
               max_container_len=MAX_FRAME_JOBS, max_str_len=4 * MAX_JOB_ID)
    rows = m.get("jobs") if isinstance(m, dict) else None
    if not isinstance(rows, list) or not rows:
        raise MalformedMessage("job frame: expected a non-empty list of jobs")
    jobs = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], str) and isinstance(row[1], bytes)):
            raise MalformedMessage("job frame: each job is [job id, body]")
        jobs.append(FramedJob(row[0], row[1]))
    _check_ids([job.job_id for job in jobs])
    return jobs


def encode_frame_results(results: Sequence[FramedResult]) -> bytes:
    _check_ids([r.job_id for r in results])
    return pack({"results": [[r.job_id, r.status, r.content_type, r.body] for r in results]})


def decode_frame_results(body: bytes, expected: Sequence[str], *,
                         max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[FramedResult]:
    """The results of an opened answer to a frame of the jobs ``expected`` (in order): exactly
    one per job. Authenticated by the session key, so only a pool member could break this; the
    producer still refuses an answer that does not fit its frame rather than guess."""
    m = unpack(body, max_bytes=max_bytes, what="frame results", max_depth=3, max_items=RESULTS_ITEMS,
               max_container_len=MAX_FRAME_JOBS, max_str_len=4 * MAX_JOB_ID)
    rows = m.get("results") if isinstance(m, dict) else None
    if not isinstance(rows, list):
        raise MalformedMessage("frame results: expected a list")
    results = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 4 and isinstance(row[0], str) and row[1] in RESULT_STATUSES
                and isinstance(row[2], str) and len(row[2]) <= _MAX_CONTENT_TYPE and isinstance(row[3], bytes)):
            raise MalformedMessage("frame results: each result is [job id, status, content type, body]")
        results.append(FramedResult(row[0], row[1], row[2], row[3]))
    if [r.job_id for r in results] != list(expected):
        raise MalformedMessage("frame results: they do not answer the frame's jobs, in its order")
    return results


def _check_ids(ids: Sequence[str]) -> None:
    if len(ids) > MAX_FRAME_JOBS:
        raise MalformedMessage(f"a frame holds at most {MAX_FRAME_JOBS} jobs")
    if any(not job_id or len(job_id) > MAX_JOB_ID for job_id in ids):
        raise MalformedMessage(f"a framed job id is 1 to {MAX_JOB_ID} characters")
    if len(set(ids)) != len(ids):
        raise MalformedMessage("a frame names a job id twice")


__all__ = [
    "FramedJob", "FramedResult", "JOB_FRAME", "JOB_RESULTS", "MAX_FRAME_JOBS", "decode_frame",
    "decode_frame_results", "encode_frame", "encode_frame_results",
]
