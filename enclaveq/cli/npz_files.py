"""The .npz files of `enclaveq submit`: job inputs read ahead, results written behind.

`submit` reads one .npz per job and writes one per result; at thousands of jobs a second the
per-file cost of ``np.load`` and ``np.savez`` (zipfile, npy header parsing and formatting in
Python) is more than the SDK's whole cost per job. This module owns the cheaper path:

``parse_npz`` / ``read_npz``
    an .npz into ``{name: array}``, each array a read-only view of the file's bytes. The common
    case -- what ``np.savez`` writes: stored (uncompressed) ``NAME.npy`` members, no zip64 in the
    central directory -- is parsed here, with the CRC checked and npy headers parsed once per
    distinct header; everything else (``np.savez_compressed``, zip64 archives, members that are
    not .npy) goes through ``np.load``, so any file ``np.load(allow_pickle=False)`` reads is read,
    and refused alike (pickled object arrays are refused).
``npz_bytes`` / ``write_npz``
    ``{name: array}`` into the bytes of a stored zip of ``NAME.npy`` members -- the format
    ``np.savez`` writes and ``np.load`` reads -- with npy headers made once per dtype and shape
    and the file written with one open, write and close. String tensors (object arrays of
    ``str``, as the SDK returns them) are stored as numpy unicode arrays, so that ``np.load``
    reads them without pickle.
``ReadAhead``
    the input files read by one thread, a bounded window (in files and bytes) ahead of the
    consumer, each file's arrays or the exception that made it unreadable.
``ResultWriter``
    results written by one thread behind a queue bounded in results and bytes; a failed write is
    reported to a callback, never raised, and every result put is written before ``close`` returns.
"""

from __future__ import annotations

import io
import contextlib
import os
import struct
import threading
import time
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Arrays = dict[str, np.ndarray]

_EOCD = struct.Struct("<4s4H2LH")            # end of central directory
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")   # central directory entry
_LOCAL = struct.Struct("<4s2B4HL2L2H")       # local file header
_EOCD_SIG, _CENTRAL_SIG, _LOCAL_SIG = b"PK\x05\x06", b"PK\x01\x02", b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
_MAX_COMMENT = 0xFFFF
# Archives at or beyond this size (zip64 territory) are left to zipfile; results never get near it.
_ZIP32_LIMIT = 0x7FFFFFFF
_HEADER_CACHE_SIZE = 256


class _Fallback(Exception):
    """The fast path does not handle this file: np.load decides."""


# npy header bytes (with the version) -> (dtype, shape, fortran order); cleared when full.
_parsed_headers: dict[tuple[int, bytes], tuple[np.dtype, tuple[int, ...], bool]] = {}
# (dtype, shape) -> the npy header np.lib.format.write_array writes for a C-ordered array of them.
_made_headers: dict[tuple[np.dtype, tuple[int, ...]], bytes] = {}


def read_npz(path: str | os.PathLike[str]) -> Arrays:
    """The arrays of an .npz file, as ``np.load(path, allow_pickle=False)`` would give them."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # fewer system calls than open(): no isatty, one fstat
    try:
        size = os.fstat(fd).st_size
        chunks = [os.read(fd, size or 1)]
        while chunks[-1] and sum(map(len, chunks)) < size:  # one read but for huge files (or one growing)
            chunks.append(os.read(fd, size - sum(map(len, chunks))))
    finally:
        os.close(fd)
    return parse_npz(chunks[0] if len(chunks) == 1 else b"".join(chunks))


def parse_npz(data: bytes) -> Arrays:
    """The arrays of an .npz file's bytes (views of ``data``); see the module docstring."""
    try:
        return _parse_stored(data)
    except _Fallback:
        if not data.startswith((_LOCAL_SIG, _EOCD_SIG)):
            # np.load would take it for a pickle (or an .npy) and say so: it is not an .npz.
            raise zipfile.BadZipFile("File is not a zip file") from None
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}


def _parse_stored(data: bytes) -> Arrays:
    end = data.rfind(_EOCD_SIG, max(0, len(data) - _EOCD.size - _MAX_COMMENT))
    if end < 0 or len(data) - end < _EOCD.size:
        raise _Fallback  # np.load says what is wrong (not a zip file, truncated...)
    _, disk, cd_disk, _, count, cd_size, cd_offset, comment = _EOCD.unpack_from(data, end)
    if disk or cd_disk or count == 0xFFFF or cd_offset + cd_size > end or end + _EOCD.size + comment != len(data):
        raise _Fallback  # zip64, multi-disk or a stray signature in a comment
    view = memoryview(data)
    arrays: Arrays = {}
    at = cd_offset
    for _ in range(count):
        if data[at:at + 4] != _CENTRAL_SIG:
            raise _Fallback
        (_, _, _, _, _, flags, method, _, _, crc, csize, usize, name_len, extra_len, comment_len, _, _, _,
         local) = _CENTRAL.unpack_from(data, at)
        raw_name = data[at + _CENTRAL.size:at + _CENTRAL.size + name_len]
        at += _CENTRAL.size + name_len + extra_len + comment_len
        if method != zipfile.ZIP_STORED or flags & 0x1 or csize != usize or usize == 0xFFFFFFFF:
            raise _Fallback  # compressed, encrypted or zip64
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437")
        if not name.endswith(".npy") or name[:-4] in arrays or data[local:local + 4] != _LOCAL_SIG:
            raise _Fallback
        local_name, local_extra = struct.unpack_from("<2H", data, local + 26)
        start = local + _LOCAL.size + local_name + local_extra
        member = view[start:start + usize]
        if len(member) != usize:
            raise _Fallback
        if zlib.crc32(member) != crc:
            raise zipfile.BadZipFile(f"Bad CRC-32 for file {name!r}")
        arrays[name[:-4]] = _npy_view(data, start, usize)
    return arrays


def _npy_view(data: bytes, start: int, size: int) -> np.ndarray:
    if data[start:start + 6] != _NPY_MAGIC or size < 10:
        raise _Fallback
    major, minor = data[start + 6], data[start + 7]
    if (major, minor) == (1, 0):
        (header_len,) = struct.unpack_from("<H", data, start + 8)
        header_start = start + 10
    elif (major, minor) == (2, 0):
        (header_len,) = struct.unpack_from("<I", data, start + 8)
        header_start = start + 12
    else:
        raise _Fallback  # version 3.0 (utf-8 field names)
    header = data[header_start:header_start + header_len]
    key = (major, header)
    parsed = _parsed_headers.get(key)
    if parsed is None:
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(io.BytesIO(data[start + 8:header_start + header_len]))
        parsed = (dtype, tuple(shape), bool(fortran))
        if len(_parsed_headers) >= _HEADER_CACHE_SIZE:
            _parsed_headers.clear()
        _parsed_headers[key] = parsed
    dtype, shape, fortran = parsed
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    count = 1
    for dim in shape:
        count *= dim
    offset = header_start + header_len
    if dtype.itemsize == 0 or offset + count * dtype.itemsize != start + size:
        raise _Fallback
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)


def _storable(value: Any) -> np.ndarray:
    """A C-ordered array np.load reads without pickle; object arrays of str become unicode arrays."""
    array = np.asarray(value)
    if array.dtype.hasobject:
        if not all(isinstance(v, str) for v in array.flat):
            raise ValueError("object arrays other than strings cannot be written without pickle")
        array = array.astype(str) if array.size else np.zeros(array.shape, dtype="<U1")
    if not array.flags.c_contiguous:
        array = array.copy(order="C")
    return array


def _npy_header(array: np.ndarray) -> bytes:
    key = (array.dtype, array.shape)
    header = _made_headers.get(key)
    if header is None:
        header = _format_npy_header(array)
        if len(_made_headers) >= _HEADER_CACHE_SIZE:
            _made_headers.clear()
        _made_headers[key] = header
    return header


def _format_npy_header(array: np.ndarray) -> bytes:
    """The header np.lib.format.write_array writes for ``array`` (oldest version that holds it)."""
    fields = np.lib.format.header_data_from_array_1_0(array)
    for write_header in (np.lib.format.write_array_header_1_0, np.lib.format.write_array_header_2_0):
        buf = io.BytesIO()
        try:
            write_header(buf, fields)
        except (ValueError, UnicodeEncodeError):  # too long for 1.0, or utf-8 field names (3.0)
            continue
        return buf.getvalue()
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=False)
    return buf.getvalue()[:len(buf.getvalue()) - array.nbytes]


def _raw(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without a copy when numpy can export its buffer."""
    if not array.nbytes:
        return memoryview(b"")
    try:
        return memoryview(array).cast("B")  # type: ignore[arg-type]  # ndarray exports a buffer
    except (TypeError, ValueError, NotImplementedError):  # e.g. 0-d arrays, dtypes without a buffer format
        return memoryview(array.tobytes())


def _dos_time(now: float) -> tuple[int, int]:
    t = time.localtime(now)
    return ((t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2),
            ((t.tm_year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday)


def npz_bytes(arrays: Mapping[str, Any]) -> bytes:
    """The bytes of an .npz holding ``arrays`` (stored zip of ``NAME.npy``), as np.load reads them."""
    dos_time, dos_date = _dos_time(time.time())
    chunks: list[bytes | memoryview] = []
    central: list[bytes] = []
    offset = 0
    for name, value in arrays.items():
        array = _storable(value)
        header = _npy_header(array)
        body = _raw(array)
        size = len(header) + array.nbytes
        crc = zlib.crc32(body, zlib.crc32(header))
        raw_name = f"{name}.npy".encode()
        flags = 0 if raw_name.isascii() else 0x800
        chunks += [_LOCAL.pack(_LOCAL_SIG, 20, 0, flags, zipfile.ZIP_STORED, dos_time, dos_date, crc, size, size,
                               len(raw_name), 0), raw_name, header, body]
        central.append(_CENTRAL.pack(_CENTRAL_SIG, 20, 3, 20, 0, flags, zipfile.ZIP_STORED, dos_time, dos_date, crc,
                                     size, size, len(raw_name), 0, 0, 0, 0, 0o600 << 16, offset) + raw_name)
        offset += _LOCAL.size + len(raw_name) + size
        if offset > _ZIP32_LIMIT:
            raise OverflowError("too large for a zip without zip64")
    directory = b"".join(central)
    chunks += [directory, _EOCD.pack(_EOCD_SIG, 0, 0, len(central), len(central), len(directory), offset, 0)]
    return b"".join(chunks)


# Results are decrypted model outputs: readable by their owner only. Each is written whole under a
# temporary name (O_EXCL | O_NOFOLLOW: never through a link someone planted) and renamed into place,
# which replaces whatever is at the name, a planted symbolic link included, without following it.
# So a result file that exists is complete: a rerun of `submit` may trust it and skip that job.
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
RESULT_MODE = 0o600
TEMP_PREFIX = ".enclaveq-partial-"


def write_npz(path: str | os.PathLike[str], arrays: Mapping[str, Any]) -> None:
    """Write ``arrays`` to ``path`` as an .npz, readable by ``np.load``, mode 0600, all at once:
    ``path`` never holds a partial file, and a symbolic link at ``path`` is replaced, not followed."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    temp = os.path.join(folder, f"{TEMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{name}")
    fd = os.open(temp, _TEMP_FLAGS, RESULT_MODE)
    try:
        try:
            data = npz_bytes(arrays)
        except OverflowError:  # a member beyond zip's 4 GiB: numpy writes zip64
            with os.fdopen(os.dup(fd), "wb") as f:
                np.savez(f, **{key: _storable(value) for key, value in arrays.items()})  # type: ignore[arg-type]
        else:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        os.unlink(temp)
        raise
    os.close(fd)
    try:
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


# The reader and writer threads run at a lower priority than the event loop: the loop's work
# (sealing, publishing, opening results) is on every frame's round trip, the files are not, and
# on a core the threads share with the loop a file written a moment later costs nothing while a
# frame sent a moment later costs throughput (bench.throughput --producer-cpus 1: CLI/SDK 0.90
# at the same priority, 0.94-0.96 with the threads at nice +10; docs/benchmarks.md).
BACKGROUND_NICE = 10


def _as_background_thread() -> None:
    with contextlib.suppress(AttributeError, OSError):  # not Linux (per-thread nice), or not allowed
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                       os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + BACKGROUND_NICE)


class ReadAhead:
    """Iterate ``(index, arrays or the exception that made the file unreadable)`` over ``paths``
    in order. One thread reads them ahead of the consumer, at most ``files`` files and about
    ``max_bytes`` bytes (plus one file), so a directory of any size is never in memory at once.

    Files travel in chunks of up to ``files // 4`` (and ``max_bytes // 4``) under one lock
    acquisition: handing tiny files over one at a time costs more than reading them."""

    def __init__(self, paths: Sequence[Path], *, files: int = 64, max_bytes: int = 32 * 1024 * 1024,
                 read: Callable[[Path], Arrays] = read_npz) -> None:
        self._paths, self._read = paths, read
        self._max_files, self._max_bytes = max(1, files), max_bytes
        self._chunk_files, self._chunk_bytes = max(1, files // 4), max(1, max_bytes // 4)
        self._ready: deque[list[tuple[int, Arrays | Exception, int]]] = deque()
        self._files = self._bytes = 0  # in self._ready
        self._cond = threading.Condition()
        self._stopped = self._finished = False
        # Who is waiting on the condition: a side is woken only when it waits, since waking a
        # thread for nothing costs a context switch on a machine whose cores the worker shares.
        self._reader_waits = self._consumer_waits = False
        self._thread = threading.Thread(target=self._run, name="enclaveq-read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        _as_background_thread()
        try:
            self._read_all()
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _read_all(self) -> None:
        index, count = 0, len(self._paths)
        while index < count:
            with self._cond:
                while self._ready and (self._files >= self._max_files or self._bytes >= self._max_bytes):
                    if self._stopped:
                        return
                    self._reader_waits = True
                    self._cond.wait()
                    self._reader_waits = False
                if self._stopped:
                    return
            chunk: list[tuple[int, Arrays | Exception, int]] = []
            chunk_bytes = 0
            while index < count and len(chunk) < self._chunk_files and chunk_bytes < self._chunk_bytes:
                item: Arrays | Exception
                try:
                    arrays = self._read(self._paths[index])
                    item, size = arrays, sum(int(a.nbytes) for a in arrays.values())
                except Exception as exc:  # noqa: BLE001 - an unreadable file is reported by whoever iterates
                    item, size = exc, 0
                chunk.append((index, item, size))
                chunk_bytes += size
                index += 1
            with self._cond:
                self._ready.append(chunk)
                self._files += len(chunk)
                self._bytes += chunk_bytes
                if self._consumer_waits:
                    self._cond.notify_all()

    def __iter__(self) -> Iterator[tuple[int, Arrays | Exception]]:
        left = len(self._paths)
        while left:
            with self._cond:
                while not self._ready:
                    if self._finished:
                        raise RuntimeError("the read-ahead thread stopped early")
                    self._consumer_waits = True
                    self._cond.wait()
                    self._consumer_waits = False
                chunk = self._ready.popleft()
                self._files -= len(chunk)
                self._bytes -= sum(size for _, _, size in chunk)
                if self._reader_waits:
                    self._cond.notify_all()
            left -= len(chunk)
            for index, item, _ in chunk:
                yield index, item

    def close(self) -> None:
        """Stop reading (files already read are dropped); returns once the thread is done."""
        with self._cond:
            self._stopped = True
            self._ready.clear()
            self._cond.notify_all()
        self._thread.join()


class ResultWriter:
    """Write ``(name, arrays)`` as ``directory/name`` in a thread of its own, at most ``results``
    and ``max_bytes`` (plus one result) put and not yet written; ``put`` blocks while the writer
    is that far behind. A write that fails goes to ``failed(name, exc)`` (called in the writer's thread) and
    the others carry on; ``written(names)`` is told, per run of writes, the names whose files are whole.

    An idle writer is woken once ``wake_at`` results wait, or by ``flush`` -- a caller that gets
    results in bursts puts a burst, then flushes -- not by every ``put``: waking a thread costs
    more than writing a small file, and results come a frame at a time."""

    def __init__(self, directory: str | os.PathLike[str], failed: Callable[[str, Exception], None], *,
                 results: int = 256, max_bytes: int = 64 * 1024 * 1024,
                 write: Callable[[str, Arrays], None] = write_npz,
                 written: Callable[[list[str]], None] | None = None, wake_at: int = 1) -> None:
        self._directory, self._failed, self._write = os.fspath(directory), failed, write
        self._written = written  # told the names whose files are whole on disk (writer's thread)
        self._max_items, self._max_bytes = max(1, results), max_bytes
        self._wake_at = max(1, min(wake_at, self._max_items))
        self._queue: deque[tuple[str, Arrays, int]] = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._closing = False
        self._idle = False  # the writer waits for results
        self.written = 0
        self._thread = threading.Thread(target=self._run, name="enclaveq-result-writer", daemon=True)
        self._thread.start()

    def put(self, name: str, arrays: Arrays) -> None:
        size = sum(int(a.nbytes) for a in arrays.values())
        with self._cond:
            while self._queue and (len(self._queue) >= self._max_items or self._bytes >= self._max_bytes):
                self._cond.notify_all()  # a full queue is written now, whatever wake_at says
                self._cond.wait()
            if self._closing:
                raise RuntimeError("the writer is closed")
            self._queue.append((name, arrays, size))
            self._bytes += size
            if self._idle and len(self._queue) >= self._wake_at:
                self._cond.notify_all()

    def flush(self) -> None:
        """Wake the writer for the results put so far (it writes them in the background)."""
        with self._cond:
            if self._idle and self._queue:
                self._cond.notify_all()

    def _run(self) -> None:
        _as_background_thread()
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._idle = True
                    self._cond.wait()
                    self._idle = False
                if not self._queue:
                    return
                batch = list(self._queue)  # written outside the lock, then released as a whole
            whole: list[str] = []
            for name, arrays, _ in batch:
                try:
                    # A string path: pathlib's joining costs more than writing a small file's bytes.
                    self._write(os.path.join(self._directory, name), arrays)
                    self.written += 1
                    whole.append(name)
                except Exception as exc:  # noqa: BLE001 - one failed write is that job's failure, not the batch's
                    self._failed(name, exc)
            if self._written is not None and whole:
                with contextlib.suppress(Exception):  # the files are whole; a rerun finds them either way
                    self._written(whole)
            with self._cond:
                for _ in batch:
                    self._bytes -= self._queue.popleft()[2]
                self._cond.notify_all()

    def close(self) -> None:
        """Write everything put so far, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
