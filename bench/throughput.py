"""Throughput of enclaveq against the plain-text job queues, on one RabbitMQ, in one run.

    python -m bench.throughput [--jobs N] [--concurrency C] [--repeat R] [--json PATH]
                               [--only a,b,...] [--warmup W] [--broker URL]

    make bench-throughput BENCH_ARGS="--jobs 2000 --repeat 3"

Seven systems move the same ``N`` jobs through the same broker, each with ``C`` jobs in flight
and its answering side in a process of its own (started by this command, stopped with SIGTERM
at the end). The clients run in this process. Keys for ``--only`` in brackets.

aio-pika plain [plain]
    the simple request/reply pattern: a responder (``bench/peers.py``) consumes a classic queue
    with prefetch 16, acks each request at once and publishes a transient reply, without
    publisher confirms, to the client's exclusive reply queue; the client publishes transient
    requests without confirms and takes replies with automatic acks. No crypto, no inference;
    request and reply have the sizes of a sealed enclaveq request and result.
aio-pika + guarantees [baseline]
    ``bench/request_reply.py``'s baseline (its ``Baseline`` class, reused as is): enclaveq's
    delivery guarantees without crypto or inference -- durable quorum queues with enclaveq's
    arguments, persistent mandatory messages on publisher-confirm channels, the responder
    acking a request only after its reply's confirm.
Dramatiq [dramatiq]
    a Dramatiq worker with 8 threads on ``RabbitmqBroker`` (no confirms) runs the tiny ONNX model
    with ONNX Runtime in the actor; the client sends with ``actor.send`` (x as 16 JSON floats,
    plus a reply queue and correlation id) and the actor publishes the outputs as JSON to that
    reply queue (an exclusive aio-pika queue of this process): Dramatiq's Results middleware has
    no RabbitMQ backend (``bench/peers.py`` says more).
Celery [celery]
    a Celery worker, ``--pool solo``, AMQP broker, ``rpc://`` result backend, runs the same model;
    the client (in one thread of this process) calls ``apply_async`` and ``AsyncResult.get``,
    keeping ``C`` tasks outstanding (results come back in order: one solo worker runs them FIFO).
enclaveq per-message [per-message]
    one real worker started with the CLI (``enclaveq sim init``, ``enclaveq policy init``,
    ``enclaveq worker``, through ``bench/request_reply.py``'s ``Enclaveq``) and
    ``AsyncClient.submit(model_id, batch, max_in_flight=C, frames=False)``: one message per job.
    (Before ``submit`` had a ``frames=`` keyword, it always sent one message per job: then the
    keyword is left out.)
enclaveq framed [framed]
    the same worker and client, ``AsyncClient.submit(model_id, batch, max_in_flight=C)``: framing,
    the default. Reported as "not available" when ``submit`` has no ``frames=`` keyword.
enclaveq CLI [cli]
    ``enclaveq submit --broker ... --pool ... --policy ... --model ID --inputs DIR --output DIR
    --max-in-flight C`` on a directory of ``N`` .npz files, against the same worker, timed end to
    end as a subprocess (interpreter start-up, attestation of the pool, reading the inputs and
    writing one result .npz per job included). It has no per-job latencies; its client CPU is
    the subprocess's.
SDK + np.load/np.savez [sdk-files]
    the script a user would write to do the CLI's job with the SDK: ``AsyncClient.submit`` (as
    framed, already connected) fed from the CLI row's input files, each read with ``np.load``
    as the SDK takes it, each result written with ``np.savez`` as it arrives. The same jobs and
    the same files as the CLI row, so "CLI once started / SDK + np.load/np.savez" compares the
    CLI with the SDK doing the same work.

Every model-running system runs the tiny ONNX graph ``bench/request_reply.py`` builds (float32
x[1,16] -> x + 1). For each system and round: a warm-up batch of ``W`` jobs (default 200, not
timed), then ``N`` timed jobs. Reported: jobs/s, p50 and p99 latency (from sending a job to
having its decoded result), CPU ms per job of the client, the answering process and the RabbitMQ
node, and the cores other programs took meanwhile; then the ratios framed/plain aio-pika,
framed/Dramatiq, CLI/SDK (framed) and per-message/plain. ``--repeat R`` runs R rounds, rotating
the order of the systems each round; the table shows medians and each ratio is the median of the
per-round ratios (phases of one round run close together, which cancels some of a busy machine's
drift).

With the CLI in the run, the bench then measures what its files cost, on ``--cli-dir``'s file
system, reading the phase's inputs again and writing as many results to a scratch directory:
the kernel's least per job (open, read, close an input; create, write, close and rename a
result -- what any program that reads a file and atomically writes one per job pays) and the
CLI's own ``read_npz`` plus ``write_npz``, in CPU microseconds. With the SDK row's CPU per job
(client + worker + broker) it prints the most a CLI can reach of the SDK when every core is
busy: the SDK's CPU per job over that plus the files'. On 2 shared cores the SDK keeps both busy,
so that bound, not the CLI's code, sets the CLI/SDK ratio there; ``--producer-cpus`` shows it
once the files have a core of their own.

``--producer-cpus LIST`` (e.g. ``1``) lays the run out as a deployment does, where producers run
on machines of their own: this process, and so every client and the CLI subprocess, runs on the
CPUs in LIST; every answering process and the RabbitMQ node (all of its threads; put back as
they were at the end) on the others. Without it everything shares every core, as on a laptop.

Every queue, exchange and pool the run declares has a unique name (containing the run id) and
is deleted at the end, also after Ctrl-C or SIGTERM or a failure; every process it started is
stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import datetime
import inspect
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bench.request_reply import (
    DEFAULT_BROKER, _CpuMeter, _enclaveq_exe, _find_broker_pid, _median, _phase, _stop_process, Baseline, cancel_on_sigterm, Enclaveq, make_workload, PhaseResult, run_cleaning_up, timed_submit, warn_if_disturbed, Workload,
)
from broker_adapters import redact_url

SYSTEMS: dict[str, str] = {
    "plain": "aio-pika plain",
    "baseline": "aio-pika + guarantees",
    "dramatiq": "Dramatiq (8 threads)",
    "celery": "Celery (solo, rpc://)",
    "per-message": "enclaveq per-message",
    "framed": "enclaveq framed",
    "cli": "enclaveq CLI",
    "sdk-files": "SDK + np.load/np.savez",
}
# (numerator, denominator, label)
RATIOS = [
    ("framed", "plain", "framed / aio-pika plain"),
    ("framed", "dramatiq", "framed / Dramatiq"),
    ("cli", "framed", "CLI / SDK (framed)"),
    ("cli", "sdk-files", "CLI / SDK + np.load/np.savez"),
    ("per-message", "plain", "per-message / aio-pika plain"),
]
REPO = Path(__file__).resolve().parent.parent
JOB_TIMEOUT = 120.0


def _threads(pid: int | str) -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def pin(pid: int | str, cpus: set[int]) -> dict[int, set[int]]:
    """Put every thread of process ``pid`` on ``cpus``; returns what each had before (for unpin).
    Threads the process starts later inherit their creator's CPUs."""
    before: dict[int, set[int]] = {}
    for tid in _threads(pid):
        with contextlib.suppress(OSError):  # a thread that just ended, or not ours to move
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
    return before


def unpin(before: dict[int, set[int]]) -> None:
    for tid, cpus in before.items():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, cpus)


class System(Protocol):
    async def batch(self, n: int, concurrency: int) -> tuple[float, list[float], int]: ...


def submit_has_frames() -> bool:
    """Whether ``AsyncClient.submit`` takes the ``frames=`` keyword (framing) yet."""
    from producer_sdk import AsyncClient

    return "frames" in inspect.signature(AsyncClient.submit).parameters


async def _start_peer(system: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``python -m bench.peers SYSTEM ARGS`` in its own session; waits for its "ready" line (Celery
    prints a banner first), then drains its stdout into ``log`` so that the pipe never fills."""
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "bench.peers", system, *args], stdout=subprocess.PIPE,
                                stderr=err, start_new_session=True, cwd=str(REPO))
    stdout = proc.stdout
    assert stdout is not None
    seen: list[bytes] = []

    def wait_ready() -> bool:
        for line in iter(stdout.readline, b""):
            if line.strip() == b"ready":
                return True
            seen.append(line)
        return False

    try:
        ready = await asyncio.wait_for(asyncio.to_thread(wait_ready), 60)
    except BaseException:
        await _stop_process(proc, f"{system} peer")
        raise
    if not ready:
        await _stop_process(proc, f"{system} peer")
        raise RuntimeError(f"the {system} peer did not start:\n{b''.join(seen).decode(errors='replace')[-1000:]}"
                           f"{log.read_text()[-3000:]}")

    def drain() -> None:
        with open(log, "ab") as out:
            for line in iter(stdout.readline, b""):
                out.write(line)

    threading.Thread(target=drain, name=f"{system}-stdout", daemon=True).start()
    return proc


async def _delete(url: str, queues: list[str], exchanges: Sequence[str] = ()) -> None:
    """Delete queues and exchanges by name, each on a fresh channel; report, never raise."""
    import aio_pika

    try:
        conn = await aio_pika.connect(url)
    except Exception as exc:
        print(f"could not connect to delete {queues + list(exchanges)}: {exc}", file=sys.stderr)
        return
    try:
        for kind, names in (("queue", queues), ("exchange", list(exchanges))):
            for name in names:
                try:
                    ch = await conn.channel()
                    if kind == "queue":
                        await ch.queue_delete(name)
                    else:
                        await ch.exchange_delete(name)
                    await ch.close()
                except Exception as exc:
                    print(f"could not delete {kind} {name!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        with contextlib.suppress(Exception):
            await conn.close()


class _ReplyQueue:
    """An exclusive aio-pika reply queue of this process, resolving futures by correlation id."""

    def __init__(self, url: str, name: str, decode: Any) -> None:
        self.url, self.name, self.decode = url, name, decode
        self.pending: dict[str, asyncio.Future[Any]] = {}
        self.conn: Any = None
        self.channel: Any = None

    async def open(self, prefetch: int = 256) -> None:
        import aio_pika

        self.conn = await aio_pika.connect_robust(self.url)
        self.channel = await self.conn.channel(publisher_confirms=False)
        await self.channel.set_qos(prefetch_count=prefetch)
        queue = await self.channel.declare_queue(self.name, exclusive=True)
        await queue.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, msg: Any) -> None:
        future = self.pending.get(msg.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(self.decode(msg.body))

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close()  # an exclusive queue goes with its connection


async def _lanes(n: int, concurrency: int, one: Any) -> tuple[float, list[float], int]:
    """``concurrency`` lanes each running ``one()`` (send a job, await its result) until ``n`` jobs."""
    latencies: list[float] = []
    remaining, errors = n, 0

    async def lane() -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            try:
                await one()
                latencies.append(1000 * (time.perf_counter() - t0))
            except Exception as exc:
                errors += 1
                if errors == 1:
                    print(f"first error: {type(exc).__name__}: {exc}", file=sys.stderr)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies, errors


# -- 1. plain aio-pika ---------------------------------------------------------------------------
class PlainAioPika:
    def __init__(self, url: str, run_id: str, workload: Workload, tmp: Path) -> None:
        self.url, self.tmp = url, tmp
        self.queue = f"bench-thr.{run_id}.plain.jobs"
        self.replies = _ReplyQueue(url, f"bench-thr.{run_id}.plain.reply", bytes)
        self.body = os.urandom(workload.request_bytes)
        self.reply_bytes = workload.reply_bytes
        self.proc: subprocess.Popen[bytes] | None = None
        self._conn: Any = None
        self._exchange: Any = None

    async def start(self) -> None:
        import aio_pika

        self._conn = await aio_pika.connect_robust(self.url)
        channel = await self._conn.channel(publisher_confirms=False)
        await channel.declare_queue(self.queue)  # classic, transient
        self._exchange = channel.default_exchange
        await self.replies.open()
        self.proc = await _start_peer("plain", ["--broker", self.url, "--queue", self.queue,
                                                "--reply-bytes", str(self.reply_bytes)], self.tmp / "plain.log")

    async def batch(self, n: int, concurrency: int) -> tuple[float, list[float], int]:
        import aio_pika

        loop = asyncio.get_running_loop()

        async def one() -> None:
            cid = uuid.uuid4().hex
            future = self.replies.pending[cid] = loop.create_future()
            try:
                await self._exchange.publish(aio_pika.Message(self.body, correlation_id=cid,
                                                              reply_to=self.replies.name), routing_key=self.queue)
                await asyncio.wait_for(future, JOB_TIMEOUT)
            finally:
                self.replies.pending.pop(cid, None)

        return await _lanes(n, concurrency, one)

    async def cleanup(self) -> None:
        await _stop_process(self.proc, "plain aio-pika responder")
        await self.replies.close()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
        await _delete(self.url, [self.queue, self.replies.name])


# -- 3. Dramatiq -----------------------------------------------------------------------------------
class Dramatiq:
    def __init__(self, url: str, run_id: str, workload: Workload, tmp: Path, model_path: Path) -> None:
        self.url, self.workload, self.tmp, self.model_path = url, workload, tmp, model_path
        self.queue = f"bench-thr.{run_id}.dramatiq"
        self.replies = _ReplyQueue(url, f"bench-thr.{run_id}.dramatiq.reply", lambda b: np.asarray(json.loads(b)))
        self.xs = [s["x"].ravel().tolist() for s in workload.samples]
        self.proc: subprocess.Popen[bytes] | None = None
        self.broker: Any = None
        self.actor: Any = None

    async def start(self) -> None:
        from bench import peers

        self.broker = peers.dramatiq_broker(self.url)
        self.actor = peers.dramatiq_actor(self.broker, self.queue)
        await self.replies.open()
        self.proc = await _start_peer("dramatiq", ["--broker", self.url, "--queue", self.queue,
                                                   "--model", str(self.model_path)], self.tmp / "dramatiq.log")

    async def batch(self, n: int, concurrency: int) -> tuple[float, list[float], int]:
        loop = asyncio.get_running_loop()
        count = 0

        async def one() -> None:
            nonlocal count
            cid = uuid.uuid4().hex
            x = self.xs[count % len(self.xs)]
            count += 1
            future = self.replies.pending[cid] = loop.create_future()
            try:
                # Dramatiq's client is blocking (pika); without confirms a send is one socket write,
                # so it runs here on the loop rather than paying a thread hand-off per job.
                self.actor.send(x, self.replies.name, cid)
                await asyncio.wait_for(future, JOB_TIMEOUT)
            finally:
                self.replies.pending.pop(cid, None)

        return await _lanes(n, concurrency, one)

    async def cleanup(self) -> None:
        from bench import peers

        await _stop_process(self.proc, "Dramatiq worker")
        if self.broker is not None:
            with contextlib.suppress(Exception):
                self.broker.close()
        await self.replies.close()
        await _delete(self.url, [*peers.dramatiq_queues(self.queue), self.replies.name])


# -- 4. Celery -------------------------------------------------------------------------------------
class Celery:
    def __init__(self, url: str, run_id: str, workload: Workload, tmp: Path, model_path: Path) -> None:
        self.url, self.tmp, self.model_path = url, tmp, model_path
        self.queue = f"bench-thr.{run_id}.celery"
        self.xs = [s["x"].ravel().tolist() for s in workload.samples]
        self.proc: subprocess.Popen[bytes] | None = None
        self.app: Any = None
        self.reply_queue: str | None = None
        # One thread for every client call: Celery's rpc:// reply queue is per thread.
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="celery-client")
        self._stop = threading.Event()

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def start(self) -> None:
        from bench import peers

        self.app = peers.celery_app(self.url, self.queue)
        self.proc = await _start_peer("celery", ["--broker", self.url, "--queue", self.queue,
                                                 "--model", str(self.model_path)], self.tmp / "celery.log")
        self.reply_queue = await self._in_thread(lambda: self.app.backend.oid)

    def _sync_batch(self, n: int, concurrency: int) -> tuple[float, list[float], int]:
        from celery.exceptions import TimeoutError as CeleryTimeout  # type: ignore[import-untyped,unused-ignore]

        from bench.peers import CELERY_TASK

        task = self.app.tasks[CELERY_TASK]
        latencies: list[float] = []
        errors = 0
        pending: deque[tuple[float, Any]] = deque()

        def settle() -> None:
            nonlocal errors
            t0, result = pending.popleft()
            while True:
                if self._stop.is_set():  # interrupted: abandon the job at once
                    errors += 1
                    return
                try:
                    np.asarray(result.get(timeout=0.5))
                    latencies.append(1000 * (time.perf_counter() - t0))
                    return
                except CeleryTimeout:
                    if time.perf_counter() - t0 > JOB_TIMEOUT:
                        errors += 1
                        return
                except Exception as exc:
                    errors += 1
                    if errors == 1:
                        print(f"first Celery error: {type(exc).__name__}: {exc}", file=sys.stderr)
                    return

        started = time.perf_counter()
        for i in range(n):
            if self._stop.is_set():
                break
            while len(pending) >= concurrency:
                settle()
            pending.append((time.perf_counter(), task.apply_async(args=[self.xs[i % len(self.xs)]])))
        while pending:
            settle()
        return time.perf_counter() - started, latencies, errors

    async def batch(self, n: int, concurrency: int) -> tuple[float, list[float], int]:
        result: tuple[float, list[float], int] = await self._in_thread(self._sync_batch, n, concurrency)
        return result

    async def cleanup(self) -> None:
        self._stop.set()  # an interrupted batch in the client thread returns within 0.5 s
        await _stop_process(self.proc, "Celery worker")
        if self.app is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._in_thread(self.app.close), 10)
        self._thread.shutdown(wait=False, cancel_futures=True)
        await _delete(self.url, [self.queue] + ([self.reply_queue] if self.reply_queue else []), [self.queue])


# -- 5.-7. enclaveq --------------------------------------------------------------------------------
class EnclaveqSubmit:
    """``AsyncClient.submit`` on the shared worker and client, one message per job or framed."""

    def __init__(self, eq: Enclaveq, workload: Workload, *, framed: bool) -> None:
        self.eq, self.workload, self.framed = eq, workload, framed

    async def batch(self, n: int, concurrency: int) -> tuple[float, list[float], int]:
        kwargs: dict[str, Any] = {"max_in_flight": concurrency}
        if not self.framed and submit_has_frames():
            kwargs["frames"] = False
        return await timed_submit(self.eq.client, str(self.eq.model_id), self.workload.inputs(n), **kwargs)


class EnclaveqCli:
    """``enclaveq submit`` as a subprocess on a directory of .npz files, against the same worker."""

    def __init__(self, eq: Enclaveq, workload: Workload, tmp: Path) -> None:
        self.eq, self.workload, self.tmp = eq, workload, tmp
        self._inputs: dict[int, Path] = {}
        self._runs = 0
        self.child_cpu_s: float | None = None
        self.reported: str | None = None
        # Seconds of the latest run of each size, launch to exit: two sizes give the marginal rate.
        self.seconds_of: dict[int, float] = {}

    def prepare(self, *sizes: int) -> None:
        for n in sizes:
            if n:
                self.input_dir(n)

    def input_dir(self, n: int) -> Path:
        if n not in self._inputs:
            folder = self.tmp / f"cli-inputs-{n}"
            folder.mkdir()
            for i, inputs in enumerate(self.workload.inputs(n)):
                np.savez(folder / f"job-{i:07d}.npz", **inputs)  # type: ignore[arg-type]
            self._inputs[n] = folder
        return self._inputs[n]

    def marginal(self, small: int, large: int) -> float | None:
        """Jobs/s of the CLI once it is running: the extra jobs of the larger run over the extra
        seconds it took. Both runs pay the same fixed costs (interpreter start, imports, connection,
        attestation), which the SDK rows never pay (their client is connected before the phase)."""
        if small <= 0 or large <= small or small not in self.seconds_of or large not in self.seconds_of:
            return None
        extra = self.seconds_of[large] - self.seconds_of[small]
        return (large - small) / extra if extra > 0 else None

    async def batch(self, n: int, concurrency: int) -> tuple[float, list[float], int]:
        inputs = self.input_dir(n)
        self._runs += 1
        output = self.tmp / f"cli-out-{self._runs}"
        cmd = [_enclaveq_exe(), "submit", "--broker", self.eq.url, "--pool", self.eq.pool, "--policy",
               str(self.eq.policy), "--model", str(self.eq.model_id), "--inputs", str(inputs), "--output",
               str(output), "--max-in-flight", str(concurrency), "--timeout", str(JOB_TIMEOUT)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                env={**os.environ, "COLUMNS": "120"})
        try:
            out, err = await asyncio.to_thread(proc.communicate)
        except BaseException:
            # Ctrl-C: SIGINT lets the CLI close its client, which deletes its reply queue.
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    await asyncio.to_thread(proc.wait, 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            raise
        seconds = time.perf_counter() - started
        self.seconds_of[n] = seconds
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.child_cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        text = out.decode(errors="replace")
        summary = re.search(r"jobs: (\d+)\s+failed: (\d+)\s+([\d.]+) jobs/s", text)
        if summary is None:
            raise RuntimeError(f"enclaveq submit exited {proc.returncode} without its summary line:\n"
                               f"{err.decode(errors='replace')[-3000:]}")
        self.reported = summary.group(3)
        failed = int(summary.group(2))
        if failed:
            print(f"enclaveq submit: {failed} jobs failed:\n{err.decode(errors='replace')[-2000:]}", file=sys.stderr)
        return seconds, [], failed


class EnclaveqSdkFiles:
    """The CLI's job done by a script on the SDK: inputs from the CLI row's .npz files, read with
    ``np.load`` as ``submit`` takes them, results written with ``np.savez`` as they arrive."""

    def __init__(self, eq: Enclaveq, files: EnclaveqCli, tmp: Path) -> None:
        self.eq, self.files, self.tmp = eq, files, tmp
        self._runs = 0

    async def batch(self, n: int, concurrency: int) -> tuple[float, list[float], int]:
        paths = sorted(self.files.input_dir(n).iterdir())
        self._runs += 1
        output = self.tmp / f"sdk-out-{self._runs}"
        output.mkdir()

        def inputs() -> Any:
            for path in paths:
                with np.load(path, allow_pickle=False) as npz:
                    yield {name: npz[name] for name in npz.files}

        def keep(result: Any) -> None:
            np.savez(output / paths[result.index].name, **result.outputs)

        try:
            return await timed_submit(self.eq.client, str(self.eq.model_id), inputs(), kept=keep,
                                      max_in_flight=concurrency)
        finally:
            await asyncio.to_thread(shutil.rmtree, output, True)


def _thread_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


def file_costs(inputs: Path, scratch: Path, count: int) -> tuple[float, float]:
    """CPU microseconds per job of reading an input of ``inputs`` and writing a result of its size
    into ``scratch``: the kernel's least (bare system calls, the result created under a temporary
    name and renamed into place) and the CLI's own ``read_npz`` + ``write_npz``. Measured in the
    calling thread (``RUSAGE_THREAD``), so that nothing else in the process is counted."""
    from enclaveq.cli.npz_files import read_npz, write_npz

    paths = sorted(inputs.iterdir())[:count]
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    bare_dir, cli_dir = scratch / "bare", scratch / "cli"
    bare_dir.mkdir()
    cli_dir.mkdir()
    started = _thread_cpu()
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        data = os.read(fd, 1 << 20)
        os.close(fd)
        temp = bare_dir / f".partial-{path.name}"
        fd = os.open(temp, flags, 0o600)
        os.write(fd, data)
        os.close(fd)
        os.replace(temp, bare_dir / path.name)
    bare = _thread_cpu() - started
    started = _thread_cpu()
    for path in paths:
        write_npz(cli_dir / path.name, read_npz(path))
    cli = _thread_cpu() - started
    return 1e6 * bare / max(1, len(paths)), 1e6 * cli / max(1, len(paths))


# -- the run -----------------------------------------------------------------------------------------
def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None or v != v else f"{v:.{digits}f}"  # v != v: NaN (no latencies)


def _ratio_values(results: list[PhaseResult], num: str, den: str) -> list[float]:
    """Per round: jobs/s of ``num`` over jobs/s of ``den``."""
    index = {(r.round, r.system): r for r in results}
    return [index[(rnd, num)].jobs_per_s / index[(rnd, den)].jobs_per_s
            for (rnd, system) in sorted(index) if system == den and (rnd, num) in index and index[(rnd, den)].jobs_per_s]


def _table(results: list[PhaseResult], args: argparse.Namespace, workload: Workload, order: list[str]) -> Any:
    from rich.table import Table

    rounds = max((r.round for r in results), default=0) + 1
    title = (f"{args.jobs} timed jobs (+{args.warmup} warm-up) per system, C={args.concurrency}"
             + (f", median of {rounds} rounds" if rounds > 1 else "")
             + f"; model {workload.name}; RabbitMQ {redact_url(args.broker)}")
    table = Table(title=title, title_justify="left")
    for col in ("system", "jobs/s", "p50 ms", "p99 ms", "errors", "CPU ms/job: client", "server", "broker",
                "other load (cores)"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for key in order:
        rs = [r for r in results if r.system == key]
        if not rs:
            continue
        table.add_row(SYSTEMS[key], _fmt(_median([r.jobs_per_s for r in rs]), 0),
                      _fmt(_median([r.pct(50) for r in rs if r.latencies_ms])),
                      _fmt(_median([r.pct(99) for r in rs if r.latencies_ms])),
                      str(sum(r.errors for r in rs)),
                      _fmt(_median([r.cpu_ms_per_job("client") for r in rs]), 2),
                      _fmt(_median([r.cpu_ms_per_job("server") for r in rs]), 2),
                      _fmt(_median([r.cpu_ms_per_job("broker") for r in rs]), 2),
                      _fmt(_median([r.other_cores for r in rs]), 2))
    return table


async def run(args: argparse.Namespace, selected: list[str]) -> int:
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=150)
    run_id = uuid.uuid4().hex[:10]
    workload = make_workload("tiny")
    broker_pid = _find_broker_pid()
    cancel_on_sigterm()
    framed_ok = submit_has_frames()
    console.print(f"run {run_id}: broker {redact_url(args.broker)}, {os.cpu_count()} CPUs, python "
                  f"{platform.python_version()}, load average {os.getloadavg()[0]:.2f}, RabbitMQ node pid "
                  f"{broker_pid or 'not local'}; request {workload.request_bytes} B, reply {workload.reply_bytes} B")
    producer_cpus: set[int] | None = args.producer_cpus
    server_cpus: set[int] | None = None
    if producer_cpus is not None:
        server_cpus = os.sched_getaffinity(0) - producer_cpus
        console.print(f"layout: producers (this process, the CLI) on CPU {sorted(producer_cpus)}; answering "
                      f"processes and the RabbitMQ node on CPU {sorted(server_cpus)}")
    if "framed" in selected and not framed_ok:
        console.print("framed: not available (AsyncClient.submit has no frames= keyword yet)")
        selected = [s for s in selected if s != "framed"]
    results: list[PhaseResult] = []
    files: tuple[float, float] | None = None  # CPU µs per job: the kernel's least, the CLI's (file_costs)
    cli_reported: dict[int, str] = {}
    cli_marginal: dict[int, float] = {}  # round -> jobs/s of the CLI once started (see EnclaveqCli.marginal)
    with tempfile.TemporaryDirectory(prefix="enclaveq-bench-thr-") as tmpname, contextlib.ExitStack() as stack:
        tmp = Path(tmpname)
        model_path = tmp / "model.onnx"
        model_path.write_bytes(workload.model_bytes)
        owners: list[Any] = []  # everything with a cleanup(), in start order
        systems: dict[str, tuple[System, int | None]] = {}
        own_cpus = pin(os.getpid(), server_cpus) if server_cpus else {}  # answering processes inherit them
        node_cpus = pin(broker_pid, server_cpus) if server_cpus and broker_pid else {}
        try:
            with console.status("starting the answering processes"):
                if "plain" in selected:
                    plain = PlainAioPika(args.broker, run_id, workload, tmp)
                    owners.append(plain)
                    await plain.start()
                    systems["plain"] = (plain, plain.proc.pid if plain.proc else None)
                if "baseline" in selected:
                    baseline = Baseline(args.broker, run_id, workload, tmp, None)
                    owners.append(baseline)
                    await baseline.start()
                    systems["baseline"] = (baseline, baseline.proc.pid if baseline.proc else None)
                if "dramatiq" in selected:
                    dram = Dramatiq(args.broker, run_id, workload, tmp, model_path)
                    owners.append(dram)
                    await dram.start()
                    systems["dramatiq"] = (dram, dram.proc.pid if dram.proc else None)
                if "celery" in selected:
                    cel = Celery(args.broker, run_id, workload, tmp, model_path)
                    owners.append(cel)
                    await cel.start()
                    systems["celery"] = (cel, cel.proc.pid if cel.proc else None)
                cli: EnclaveqCli | None = None
                if {"per-message", "framed", "cli", "sdk-files"} & set(selected):
                    eq = Enclaveq(args.broker, f"thr-{run_id}", workload, tmp, None)
                    owners.append(eq)
                    await eq.start()
                    pid = eq.proc.pid if eq.proc else None
                    if "per-message" in selected:
                        systems["per-message"] = (EnclaveqSubmit(eq, workload, framed=False), pid)
                    if "framed" in selected:
                        systems["framed"] = (EnclaveqSubmit(eq, workload, framed=True), pid)
                    if {"cli", "sdk-files"} & set(selected):
                        cli_tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(
                            prefix="enclaveq-bench-cli-", dir=args.cli_dir)))
                        cli = EnclaveqCli(eq, workload, cli_tmp)
                        # The input files, written now: not in the phase's time or CPU.
                        await asyncio.to_thread(cli.prepare, args.warmup, args.jobs)
                        if "cli" in selected:
                            systems["cli"] = (cli, pid)
                        if "sdk-files" in selected:
                            systems["sdk-files"] = (EnclaveqSdkFiles(eq, cli, cli_tmp), pid)
            console.print("answering processes: " + ", ".join(
                f"{SYSTEMS[k]} pid {pid}" for k, (_, pid) in systems.items()))
            if producer_cpus is not None:
                pin(os.getpid(), producer_cpus)  # the clients, and the CLI subprocesses it starts
            keys = [k for k in SYSTEMS if k in systems]
            for rnd in range(args.repeat):
                # Rotate the order each round, so that no system always runs first or last.
                shift = rnd % len(keys)
                for key in keys[shift:] + keys[:shift]:
                    system, pid = systems[key]
                    meter = _CpuMeter(pid, broker_pid)
                    with console.status(f"round {rnd + 1}/{args.repeat}: {SYSTEMS[key]}: "
                                        f"{args.warmup} warm-up + {args.jobs} timed jobs"):
                        r = await _phase(system, args.jobs, args.warmup, args.concurrency, key, meter, None, [])
                    r.round = rnd
                    if key == "cli" and cli is not None:
                        # The client is the subprocess: its CPU, plus this process's waiting.
                        r.cpu_client_s = (r.cpu_client_s or 0.0) + (cli.child_cpu_s or 0.0)
                        if cli.reported:
                            cli_reported[rnd] = cli.reported
                        marginal = cli.marginal(args.warmup, args.jobs)
                        if marginal is not None:
                            cli_marginal[rnd] = marginal
                    results.append(r)
                    other = "" if r.other_cores is None else f"  other load {r.other_cores:.2f} cores"
                    console.print(f"  round {rnd + 1} {SYSTEMS[key]:22} {r.jobs_per_s:8.0f} jobs/s  "
                                  f"p50 {_fmt(r.pct(50)):>7} ms  p99 {_fmt(r.pct(99)):>7} ms  errors {r.errors}{other}")
            if cli is not None and "cli" in systems and args.jobs:
                with console.status("measuring what the CLI's files cost"):
                    scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(
                        prefix="enclaveq-bench-files-", dir=args.cli_dir)))
                    files = await asyncio.to_thread(file_costs, cli.input_dir(args.jobs), scratch,
                                                    min(args.jobs, 5000))
        finally:
            unpin(node_cpus)
            unpin(own_cpus)
            with console.status("cleaning up: stopping processes, deleting queues and the pool"):
                for owner in reversed(owners):
                    try:
                        await owner.cleanup()
                    except Exception as exc:
                        print(f"clean-up of {type(owner).__name__} failed: {type(exc).__name__}: {exc}",
                              file=sys.stderr)
    order = [k for k in SYSTEMS if k in systems]
    console.print(_table(results, args, workload, order))
    if cli_reported:
        console.print(f"enclaveq CLI: end to end above; its own summary line (after start-up and attestation) "
                      f"said {', '.join(cli_reported[r] for r in sorted(cli_reported))} jobs/s")
    ratios: dict[str, float | None] = {}
    if cli_marginal:
        console.print(f"enclaveq CLI once started (launch, imports, connection and attestation excluded: the extra "
                      f"{args.jobs - args.warmup} jobs of the timed run over the warm-up run): "
                      f"{', '.join(f'{cli_marginal[r]:.0f}' for r in sorted(cli_marginal))} jobs/s")
    for den in ("framed", "sdk-files"):
        by_round = {r.round: r.jobs_per_s for r in results if r.system == den and r.jobs_per_s}
        started_ratios = [cli_marginal[rnd] / by_round[rnd] for rnd in sorted(cli_marginal) if rnd in by_round]
        if started_ratios:
            label = f"CLI once started / {'SDK (framed)' if den == 'framed' else SYSTEMS[den]}"
            ratios[label] = _median(started_ratios)
            spread = (f" ({min(started_ratios):.2f}-{max(started_ratios):.2f} over {len(started_ratios)} rounds)"
                      if len(started_ratios) > 1 else "")
            console.print(f"{label:30} {_median(started_ratios):.2f}{spread}")
    for num, den, label in RATIOS:
        values = _ratio_values(results, num, den)
        ratios[label] = _median(values)
        if values:
            spread = f" ({min(values):.2f}-{max(values):.2f} over {len(values)} rounds)" if len(values) > 1 else ""
            console.print(f"{label:30} {_median(values):.2f}{spread}")
        else:
            missing = [SYSTEMS[k] for k in (num, den) if k not in systems]
            why = "framed: not available" if "framed" in (num, den) and not framed_ok else \
                f"not run: {', '.join(missing)}"
            console.print(f"{label:30} n/a ({why})")
    bound = _print_file_bound(console, results, files)
    if bound:
        ratios.update(bound)
    warn_if_disturbed(console, results)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "argv": sys.argv, "cpus": os.cpu_count(), "python": platform.python_version(), "model": workload.name,
            "request_bytes": workload.request_bytes, "reply_bytes": workload.reply_bytes,
            "concurrency": args.concurrency, "framed_available": framed_ok,
            "systems": {k: SYSTEMS[k] for k in order},
            "results": [r.summary() for r in results],
            "cli_dir": args.cli_dir, "cli_reported_jobs_per_s": cli_reported,
            "producer_cpus": sorted(producer_cpus) if producer_cpus is not None else None,
            "cli_once_started_jobs_per_s": {r: round(v, 1) for r, v in cli_marginal.items()},
            "ratios": {k: (None if v is None else round(v, 3)) for k, v in ratios.items()},
        }, indent=2))
    return 0


def _print_file_bound(console: Any, results: list[PhaseResult],
                      files: tuple[float, float] | None) -> dict[str, float]:
    """Print what the CLI's files cost and the most a CLI can reach of the SDK on busy cores."""
    if files is None:
        return {}
    bare_us, cli_us = files
    framed = [r for r in results if r.system == "framed"]
    parts = [_median([r.cpu_ms_per_job(which) for r in framed]) for which in ("client", "server", "broker")]
    rate = _median([r.jobs_per_s for r in framed])
    if not framed or any(part is None for part in parts) or not rate:
        console.print(f"files: the kernel's least per job (read an input, create and rename a result) {bare_us:.1f} "
                      f"µs of CPU, the CLI's read_npz + write_npz {cli_us:.1f} µs")
        return {}
    sdk_us = 1000 * sum(p for p in parts if p is not None)
    busy = rate * sdk_us / 1e6
    console.print(f"files: the kernel's least per job (read an input, create and rename a result) {bare_us:.1f} µs "
                  f"of CPU, the CLI's read_npz + write_npz {cli_us:.1f} µs; the SDK row used {sdk_us:.0f} µs per "
                  f"job (client + worker + broker), {busy:.2f} of {os.cpu_count()} cores at its rate")
    ceiling_bare, ceiling_cli = sdk_us / (sdk_us + bare_us), sdk_us / (sdk_us + cli_us)
    # A model, not a proof: it assumes the machine is kept as busy as the SDK phase kept it, so that
    # every µs of the files' CPU is a µs the worker, the broker or the client's loop did not get.
    console.print(f"{'CLI / SDK at most, cores busy':30} {ceiling_bare:.2f} for any program that reads and writes a "
                  f"file per job, {ceiling_cli:.2f} with the CLI's reading and writing, if the files' CPU comes out "
                  f"of the cores the SDK phase kept busy (shared CPUs; with --producer-cpus the files have a core "
                  f"of their own)")
    return {"CLI / SDK at most, files only": ceiling_bare, "CLI / SDK at most, CLI's files": ceiling_cli}


def _check_installed(selected: list[str]) -> None:
    missing = []
    for key, module in (("dramatiq", "dramatiq"), ("celery", "celery")):
        if key in selected:
            try:
                __import__(module)
            except ImportError:
                missing.append(module)
    if missing:
        sys.exit(f"{', '.join(missing)} not installed: `.venv/bin/python -m pip install -e '.[bench]'`, "
                 f"or leave them out with --only")


def _cpu_list(text: str) -> set[int]:
    try:
        cpus = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of CPU numbers: {text!r}") from None
    if not cpus or min(cpus) < 0:
        raise argparse.ArgumentTypeError(f"not a list of CPU numbers: {text!r}")
    return cpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="timed jobs per system and round (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="untimed warm-up jobs before each phase (default 200)")
    parser.add_argument("--concurrency", type=int, default=64, help="jobs in flight (default 64)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds, rotating the order of systems; medians shown (default 1)")
    parser.add_argument("--broker", default=os.environ.get("ENCLAVEQ_BROKER", DEFAULT_BROKER),
                        help="AMQP URL of the RabbitMQ all systems share (default amqp://guest:guest@127.0.0.1:5672/)")
    parser.add_argument("--only", help=f"comma-separated subset of: {','.join(SYSTEMS)}")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--cli-dir", metavar="DIR", default=None,
                        help="where the CLI row's input and result files go (default: the system's temporary "
                             "directory). Creating a file costs the kernel 20-350 us on some disks (ext4 here), "
                             "more than a framed job; /dev/shm (tmpfs) measures the CLI without the disk")
    parser.add_argument("--producer-cpus", metavar="LIST", type=_cpu_list, default=None,
                        help="run the clients and the CLI on these CPUs (e.g. 1 or 2,3) and every answering "
                             "process and the RabbitMQ node on the others, as when producers have machines of "
                             "their own (default: everything shares every CPU)")
    args = parser.parse_args(argv)
    if args.producer_cpus is not None and not args.producer_cpus < os.sched_getaffinity(0):
        parser.error(f"--producer-cpus must leave CPUs for the answering side; this process may use "
                     f"{sorted(os.sched_getaffinity(0))}")
    if args.jobs < 1 or args.warmup < 0 or args.repeat < 1 or args.concurrency < 1:
        parser.error("--jobs, --concurrency and --repeat must be positive and --warmup non-negative")
    if not args.broker.lower().startswith(("amqp://", "amqps://")):
        parser.error("the peers (aio-pika, Dramatiq, Celery) need RabbitMQ: give an amqp:// URL")
    selected = list(SYSTEMS)
    if args.only:
        selected = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in selected if s not in SYSTEMS]
        if unknown:
            parser.error(f"unknown system(s) {', '.join(unknown)}; choose from {','.join(SYSTEMS)}")
    _check_installed(selected)
    return run_cleaning_up(run(args, selected))


if __name__ == "__main__":
    sys.exit(main())
