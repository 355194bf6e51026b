"""The worker's sealed state on disk: the pool's epoch keys, the uploaded models, and the jobs
it already answered.

Everything written here is AEAD-sealed under the platform sealing key (simulation: derived
inside the worker from the sim directory's platform secret and the worker's measurement), with
the pool name and the kind of record as associated data, so a file cannot be swapped between
pools or between the key slot and a model slot. A worker with another measurement derives
another key and cannot read the state: that is the point.

Layout::

    STATE_DIR/<pool>/pool.sealed            msgpack {epoch, pool_private_key, identity_private_key,
                                                     created_ms, previous: [[epoch, key, retire_at_ms]]}
    STATE_DIR/<pool>/models/<model id>.sealed
    STATE_DIR/<pool>/models/<model id>.manifest   the owner-signed manifest (sealed like the rest)
    STATE_DIR/<pool>/delete-orders.sealed         msgpack [owner-signed delete orders]
    STATE_DIR/<pool>/seen/<writer>-<n>.sealed     records (deadline ms, key length, job key): jobs already
                                                  answered (enclave_worker.replay_guard), one segment per flush

Rotation (P6): a previous epoch's key stays here only until its retirement time; erasing it
rewrites the pool file without it (write-then-rename, so the old file's bytes are unlinked, not
kept beside the new one). The identity key stored here is never one a join response was sealed
to (see ``Worker._accept_join``), so this file plus recorded traffic cannot recover erased keys.
"""

from __future__ import annotations

import os
import time
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Callable, Iterator

from protocol.codec import pack, unpack

from .errors import SealedStateError

Seal = Callable[[bytes, bytes, bytes], bytes]
Unseal = Callable[[bytes, bytes, bytes], bytes]

_MODEL_ID = re.compile(r"^[0-9a-f]{64}$")
_SEGMENT = re.compile(r"^[0-9a-f]{8}-[0-9]{12}$")  # writer id, then its segment number


@dataclass(frozen=True)
class RetiringKey:
    """A previous epoch's private key, still opening jobs sealed to it until ``retire_at_ms``."""

    epoch: int
    private_key: bytes
    retire_at_ms: int

    def __repr__(self) -> str:
        return f"RetiringKey(epoch={self.epoch}, retire_at_ms={self.retire_at_ms})"


@dataclass(frozen=True)
class PoolKeys:
    epoch: int
    pool_private_key: bytes
    identity_private_key: bytes
    created_ms: int = 0
    previous: tuple[RetiringKey, ...] = ()

    def __repr__(self) -> str:  # private keys never reach a log line
        return f"PoolKeys(epoch={self.epoch}, previous={[k.epoch for k in self.previous]})"

    def without_retired(self, now_ms: int) -> PoolKeys:
        """The same keys minus every previous epoch whose grace period is over."""
        keep = tuple(k for k in self.previous if k.retire_at_ms > now_ms)
        return self if keep == self.previous else replace(self, previous=keep)


# A replay-guard segment is a run of records: 8-byte deadline (ms), 2-byte key length, key.
# Not msgpack: a segment may hold hundreds of thousands of entries, and this form costs one
# bytes object per entry to write and to read.
_SEEN_RECORD = struct.Struct(">QH")


def _encode_seen(entries: list[tuple[bytes, int]]) -> bytes:
    pack_record = _SEEN_RECORD.pack
    return b"".join(pack_record(deadline, len(key)) + key for key, deadline in entries)


def _decode_seen(raw: bytes) -> list[tuple[bytes, int]]:
    entries = []
    unpack_record, size, pos, end = _SEEN_RECORD.unpack_from, _SEEN_RECORD.size, 0, len(raw)
    while pos < end:
        deadline, length = unpack_record(raw, pos)
        pos += size
        if pos + length > end:
            raise ValueError("truncated record")
        entries.append((raw[pos:pos + length], deadline))
        pos += length
    return entries


class SealedState:
    def __init__(self, root: Path, pool: str, key: bytes, seal: Seal, unseal: Unseal) -> None:
        self.dir = Path(root) / pool
        self._pool = pool
        self._key = key
        self._seal = seal
        self._unseal = unseal

    def _aad(self, kind: str, name: str = "") -> bytes:
        return pack(["enclaveq/v1/sealed-state", self._pool, kind, name])

    def ensure_usable(self) -> None:
        """Create the state directory if needed and prove it writable, or raise
        :class:`SealedStateError` saying why: a worker that cannot make its state durable
        (pool key, models, answered jobs) must not start taking work."""
        probe = self.dir / f".probe.{os.getpid()}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            # A block's worth, written as every sealed file is (and fsynced): an empty file can
            # still be created on a full disk.
            self._write(probe, bytes(4096))
            probe.unlink()
        except OSError as exc:
            raise SealedStateError(f"the state directory {self.dir} cannot be used "
                                   f"({exc.strerror or type(exc).__name__}); give the worker a writable "
                                   "directory (--state-dir)") from None

    def _write(self, path: Path, blob: bytes) -> None:
        # Write-then-rename so a crash never leaves a half-written sealed file behind.
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _read(self, path: Path, aad: bytes, what: str) -> bytes:
        try:
            return self._unseal(self._key, path.read_bytes(), aad)
        except Exception:
            raise SealedStateError(
                f"{what} at {path} does not unseal with this worker's sealing key "
                "(written by a worker with another measurement or sim directory?)"
            ) from None

    # -- pool keys ------------------------------------------------------------------------
    def load_pool_keys(self) -> PoolKeys | None:
        path = self.dir / "pool.sealed"
        if not path.exists():
            return None
        m = unpack(self._read(path, self._aad("pool"), "pool key"), what="sealed pool key")
        try:
            return PoolKeys(epoch=int(m["epoch"]), pool_private_key=bytes(m["pool_private_key"]),
                            identity_private_key=bytes(m["identity_private_key"]),
                            created_ms=int(m.get("created_ms", 0)),
                            previous=tuple(RetiringKey(int(e), bytes(k), int(r)) for e, k, r in m.get("previous", [])))
        except (KeyError, TypeError, ValueError):
            raise SealedStateError(f"sealed pool key at {path} has an unexpected layout") from None

    def save_pool_keys(self, keys: PoolKeys) -> None:
        body = pack({"epoch": keys.epoch, "pool_private_key": keys.pool_private_key,
                     "identity_private_key": keys.identity_private_key, "created_ms": keys.created_ms,
                     "previous": [[k.epoch, k.private_key, k.retire_at_ms] for k in keys.previous]})
        self._write(self.dir / "pool.sealed", self._seal(self._key, body, self._aad("pool")))

    # -- models ---------------------------------------------------------------------------
    def save_model(self, model_id: str, data: bytes) -> None:
        self._write(self.dir / "models" / f"{model_id}.sealed", self._seal(self._key, data, self._aad("model", model_id)))

    def delete_model(self, model_id: str) -> None:
        (self.dir / "models" / f"{model_id}.sealed").unlink(missing_ok=True)
        (self.dir / "models" / f"{model_id}.manifest").unlink(missing_ok=True)

    # -- ownership records ------------------------------------------------------------------
    def save_manifest(self, model_id: str, signed: bytes) -> None:
        self._write(self.dir / "models" / f"{model_id}.manifest",
                    self._seal(self._key, signed, self._aad("manifest", model_id)))

    def read_manifest(self, model_id: str) -> bytes | None:
        path = self.dir / "models" / f"{model_id}.manifest"
        if not path.exists():
            return None
        return self._read(path, self._aad("manifest", model_id), f"manifest of model {model_id}")

    def save_delete_orders(self, orders: list[bytes]) -> None:
        self._write(self.dir / "delete-orders.sealed",
                    self._seal(self._key, pack(list(orders)), self._aad("delete-orders")))

    def load_delete_orders(self) -> list[bytes]:
        path = self.dir / "delete-orders.sealed"
        if not path.exists():
            return []
        orders = unpack(self._read(path, self._aad("delete-orders"), "delete orders"), what="delete orders")
        if not isinstance(orders, list) or not all(isinstance(o, bytes) for o in orders):
            raise SealedStateError(f"sealed delete orders at {path} have an unexpected layout")
        return orders

    # -- pipelines ------------------------------------------------------------------------------
    def save_pipeline(self, pipeline_id: str, signed: bytes) -> None:
        """An owner-signed pipeline definition (protocol.pipeline.SignedPipeline), or a delete
        order for it (kept so that an older definition replayed later is refused)."""
        if not _MODEL_ID.match(pipeline_id):
            raise ValueError("not a pipeline id")
        self._write(self.dir / "pipelines" / f"{pipeline_id}.sealed",
                    self._seal(self._key, signed, self._aad("pipeline", pipeline_id)))

    def forget_pipeline(self, pipeline_id: str) -> None:
        """Remove a definition that never came into force (its stream could not be served)."""
        if not _MODEL_ID.match(pipeline_id):
            raise ValueError("not a pipeline id")
        (self.dir / "pipelines" / f"{pipeline_id}.sealed").unlink(missing_ok=True)

    def iter_pipelines(self) -> Iterator[tuple[str, bytes]]:
        folder = self.dir / "pipelines"
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.sealed")):
            pipeline_id = path.name.removesuffix(".sealed")
            if _MODEL_ID.match(pipeline_id):
                yield pipeline_id, self._read(path, self._aad("pipeline", pipeline_id), f"pipeline {pipeline_id}")

    # -- jobs already answered (replay_guard) --------------------------------------------------
    def save_seen_segment(self, name: str, entries: list[tuple[bytes, int]]) -> None:
        if not _SEGMENT.match(name):
            raise ValueError(f"not a replay-guard segment name: {name!r}")
        self._write(self.dir / "seen" / f"{name}.sealed",
                    self._seal(self._key, _encode_seen(entries), self._aad("seen-jobs", name)))

    def delete_seen_segment(self, name: str) -> None:
        if _SEGMENT.match(name):
            (self.dir / "seen" / f"{name}.sealed").unlink(missing_ok=True)

    def iter_seen_segments(self) -> Iterator[tuple[str, list[tuple[bytes, int]] | None]]:
        """Every segment, as (name, entries); entries None for one that does not unseal or parse
        (sealed under another key: a TEE whose sealing key does not survive a restart)."""
        folder = self.dir / "seen"
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.sealed")):
            name = path.name.removesuffix(".sealed")
            if not _SEGMENT.match(name):
                continue
            try:
                entries = _decode_seen(self._read(path, self._aad("seen-jobs", name), "replay-guard segment"))
            except SealedStateError:
                if not path.exists():  # merged and deleted by another worker sharing this directory
                    continue
                yield name, None
                continue
            except (struct.error, ValueError):
                yield name, None
                continue
            yield name, entries

    def read_model(self, model_id: str) -> bytes:
        path = self.dir / "models" / f"{model_id}.sealed"
        try:
            return self._read(path, self._aad("model", model_id), f"model {model_id}")
        except SealedStateError:
            if not self._pool_key_unseals():
                raise
        # The pool key next to it unseals with this worker's key: so the key is right and the
        # model's file is what is wrong (a flipped byte, a truncated or replaced file).
        raise SealedStateError(f"model {model_id} at {path} is damaged: it does not unseal, while this worker's "
                               "pool key, sealed with the same key, does")

    def _pool_key_unseals(self) -> bool:
        path = self.dir / "pool.sealed"
        try:
            self._read(path, self._aad("pool"), "pool key")
        except (SealedStateError, OSError):
            return False
        return True

    def model_ids(self) -> list[str]:
        """The ids of the sealed models on disk (quarantined ones excluded)."""
        folder = self.dir / "models"
        if not folder.is_dir():
            return []
        ids = (path.name.removesuffix(".sealed") for path in sorted(folder.glob("*.sealed")))
        return [model_id for model_id in ids if _MODEL_ID.match(model_id)]

    def quarantine_model(self, model_id: str) -> Path:
        """Move a sealed model that cannot be used (and its manifest) out of the way, into
        ``models/quarantine/``, kept for whoever investigates; returns that folder."""
        folder = self.dir / "models"
        target = folder / "quarantine"
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        stamp = int(time.time())
        for suffix in (".sealed", ".manifest"):
            source = folder / f"{model_id}{suffix}"
            if source.exists():
                os.replace(source, target / f"{model_id}{suffix}.{stamp}")
        return target
