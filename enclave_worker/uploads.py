"""Model uploads still arriving chunk by chunk: bounded in number, bytes and time (P11).

Any producer with a session can start an upload (the owner's manifest is checked first, but
anyone can sign a manifest with a key of her own), and every upload is broadcast to every
worker, so each incomplete upload holds memory on every worker of the pool. What one holds:

* at most ``MAX_INCOMPLETE_UPLOADS`` uploads at once, holding at most ``max_bytes`` of chunks
  together (the worker passes its ``max_model_bytes``: one upload of the largest model fits);
* per upload, never more chunk bytes than the total size it declared, and at most
  ``max_chunks`` chunks (one per ``MIN_AVERAGE_CHUNK_BYTES`` of declared size, or 16), so
  empty or tiny chunks cannot multiply entries;
* an upload that received no chunk for ``IDLE_SECONDS`` (by the worker's clock) is dropped.

A chunk beyond these bounds is refused with a typed error and changes nothing. Keyed by the
upload id (clear in every chunk's header) *and the owner key of the chunk's verified manifest*,
not by session: after a key rotation the producer seals the rest of an upload under its new
session, but every chunk carries the same owner-signed manifest. A stranger who copies an
upload id from the broker signs her chunks with her own key, so they fill an upload of their
own instead of spoiling the owner's (and the assembled bytes must hash to the model id anyway).

Used from the event loop only.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from protocol.bodies import ErrorCode

from .errors import JobRejected, ModelRejected

MAX_CHUNK_BYTES = 8 * 1024 * 1024
MIN_AVERAGE_CHUNK_BYTES = 64 * 1024  # the SDK sends 4 MiB chunks
MIN_CHUNKS_ALLOWED = 16  # any upload may come in this many chunks, however small
MAX_INCOMPLETE_UPLOADS = 16
IDLE_SECONDS = 60.0


@dataclass
class _Upload:
    model_id: str
    count: int
    total_size: int
    touched: float
    chunks: dict[int, bytes] = field(default_factory=dict)
    held: int = 0  # bytes of chunks held

    @property
    def received(self) -> int:
        return len(self.chunks)


def max_chunks(total_size: int) -> int:
    return max(MIN_CHUNKS_ALLOWED, -(-total_size // MIN_AVERAGE_CHUNK_BYTES))


class Uploads:
    def __init__(self, *, max_model_bytes: int, clock: Callable[[], float], max_bytes: int | None = None,
                 max_uploads: int = MAX_INCOMPLETE_UPLOADS, idle_seconds: float = IDLE_SECONDS) -> None:
        self.max_model_bytes = max_model_bytes
        self.max_bytes = max_model_bytes if max_bytes is None else max_bytes
        self.max_uploads = max_uploads
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._uploads: dict[Hashable, _Upload] = {}
        self._held = 0

    def __len__(self) -> int:
        return len(self._uploads)

    @property
    def held_bytes(self) -> int:
        return self._held

    def arriving(self, model_id: str) -> bool:
        """Whether an incomplete upload of ``model_id`` is in progress here."""
        return any(u.model_id == model_id for u in self._uploads.values())

    def add(self, upload_id: Hashable, model_id: str, index: int, count: int, total_size: int,
            data: bytes) -> tuple[int, bytes | None]:
        """Store one chunk; return (chunks received, the whole model's bytes once complete).
        Raises a JobRejected (typed) for a chunk beyond the bounds; nothing is kept then."""
        if total_size > self.max_model_bytes:
            raise JobRejected(f"model of {total_size} bytes exceeds the worker limit of {self.max_model_bytes}",
                              ErrorCode.OVERSIZED)
        if len(data) > MAX_CHUNK_BYTES:
            raise JobRejected(f"chunk of {len(data)} bytes exceeds {MAX_CHUNK_BYTES}", ErrorCode.OVERSIZED)
        if not data or count > max_chunks(total_size) or index >= count:
            raise ModelRejected(f"an upload of {total_size} bytes comes in at most {max_chunks(total_size)} "
                                "non-empty chunks")
        now = self._clock()
        upload = self._uploads.get(upload_id)
        if upload is None:
            if len(self._uploads) >= self.max_uploads:
                raise JobRejected(f"this worker already holds {self.max_uploads} incomplete uploads; "
                                  "try again when one has finished or expired", ErrorCode.OVERSIZED)
            upload = _Upload(model_id=model_id, count=count, total_size=total_size, touched=now)
        elif (upload.model_id, upload.count, upload.total_size) != (model_id, count, total_size):
            raise ModelRejected("chunk disagrees with the upload it belongs to")
        growth = len(data) - len(upload.chunks.get(index, b""))  # a redelivered chunk replaces itself
        if upload.held + growth > total_size:
            raise ModelRejected(f"the upload's chunks exceed the {total_size} bytes it declared")
        if self._held + growth > self.max_bytes:
            raise JobRejected(f"incomplete uploads on this worker would exceed {self.max_bytes} bytes; "
                              "try again when one has finished or expired", ErrorCode.OVERSIZED)
        self._uploads[upload_id] = upload
        upload.chunks[index] = data
        upload.held += growth
        upload.touched = now
        self._held += growth
        if upload.received < upload.count:
            return upload.received, None
        self._drop(upload_id)
        whole = b"".join(upload.chunks[i] for i in range(upload.count))
        if len(whole) != total_size:
            raise ModelRejected(f"model assembled to {len(whole)} bytes, declared {total_size}")
        return upload.count, whole

    def expire(self) -> list[str]:
        """Drop every upload idle for longer than ``idle_seconds``; the model ids they were for."""
        cutoff = self._clock() - self.idle_seconds
        idle = [uid for uid, u in self._uploads.items() if u.touched < cutoff]
        return [self._drop(uid).model_id for uid in idle]

    def _drop(self, upload_id: Hashable) -> _Upload:
        upload = self._uploads.pop(upload_id)
        self._held -= upload.held
        return upload
