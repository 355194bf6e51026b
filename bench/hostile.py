"""Hostile floods: what one worker pays while the broker floods it with each hostile message kind.

    python -m bench.hostile [--broker URL] [--seconds N] [--kinds K[,K...]] [--rate R|max]
                            [--in-flight F] [--markdown] [--json PATH]

The threat model lets whoever runs the broker inject any message. This bench starts one simulated
worker and, for each hostile kind below, floods the pool for ``--seconds`` from a connection of
its own (a raw ``broker_adapters.open_broker`` adapter, at most ``--in-flight`` unconfirmed
publishes, ``--rate`` messages/s) while a legitimate producer (``producer_sdk.AsyncClient``)
starts a job on a tiny model every 1/50 s (``--probe-rate``), each on its own. It reports the
legitimate job's latency against an idle worker's, measured in the same command, and the
worker's memory and CPU.

The legitimate jobs run in an open loop on purpose: jobs run one after another would sample a
stalled worker once per stall and a fast one hundreds of times, so their median would hide stalls.

Why 200 msg/s by default and not as fast as possible (``--rate max``): a job-queue flood shares one
FIFO queue with the legitimate job, which waits behind whatever the pool has not drained yet.
Above the pool's drain rate (1,000-2,700 garbage messages/s on 2 busy cores with RabbitMQ on the
same machine, the worker itself 20-40 % busy) the ratio measures the queue's backlog, not what a
message costs the worker -- and a broker can delay or drop jobs anyway. 200 msg/s is a flood that
a worker paying microseconds per hostile message absorbs, and one paying milliseconds, holding a
job slot for half a second or re-sealing a model per message does not.

Kinds (every message is built with the protocol's own classes where one exists):

garbage-job        random bytes (1 B - 2 KiB) on the job queue.
nested-arrays      a 16 MiB msgpack array of 16 Mi empty arrays, alternately on the job queue and
                   the control channel; 1 message/s, 1 in flight (each one is big).
forged-challenge   valid ``Challenge`` messages (a fresh nonce each) on the control channel: each
                   asks for fresh evidence, answered to the attacker's reply queue.
forged-announce    ``EpochAnnounce`` for epoch 10**6 (previous 10**6-1), a random sealed key and
                   evidence recorded from a genuine challenge answer that does not bind this statement.
sync-request       ``ModelSyncRequest`` (fresh nonce, ``have`` empty, any member may answer) with a
                   reply queue of the attacker's. Fields the wire format may have gained since
                   (e.g. a MAC) are filled with junk of the declared type.
future-epoch-job   a well-formed job envelope whose header claims epoch 10**6; its sealed session
                   is random bytes of the right length.
replayed-job       one genuine job, sealed by the attacker's own attested session (as any producer
                   can), run once, then published over and over.
join-request       ``JoinRequest`` for this pool with a fresh identity key and the recorded genuine
                   evidence, which does not bind its statement: the member verifies it and refuses.

Measured per kind:

- messages and bytes sent;
- the legitimate job's median and p95 latency during the flood (jobs due while it runs, timed from
  when they were due; a job that times out counts with its full wait), and the median's ratio to
  the median of the same jobs at the same rate just before that flood (``--pre-idle-jobs``: the
  machine is shared and its load drifts; the 200-job idle figure of the run's start is shown);
- the worker's peak RSS (``VmHWM`` after resetting it through ``/proc/PID/clear_refs``, and
  ``VmRSS`` sampled every 50 ms) and its growth over the RSS just before the flood;
- the worker's CPU (``/proc/PID/stat`` utime + stime) during the flood, and per message sent: its
  CPU from the start of the flood until it is quiet again, less what the legitimate jobs cost an
  idle worker over that time;
- the jobs queued when the flood stopped (purged once the legitimate jobs among them finished or
  timed out), how long the worker took to be quiet again, the messages and bytes that came back to
  the attacker's reply queue, the growth of the pool's dead letters, and what the worker logged.

It doubles as a check: the exit status is 1 if, for any kind, the median ratio exceeds
``--max-ratio`` (default 2.0), the peak RSS grows by more than ``--max-rss-growth-mib`` (default
256 MiB) over the RSS before the flood, the worker died, or it was not quiet again within
``--settle`` seconds (default 60). A worker that died or never got quiet is killed and started
again on its sealed state, so that the next kind starts from a quiet worker.

Brokers: with ``amqp://`` (the default, RabbitMQ at 127.0.0.1:5672) the worker is a separate
``python -m enclaveq worker`` process from this tree, so its RSS and CPU are its own.
``memory://`` exists only inside one process: the worker then runs in this process, on the same
event loop as the flood and the prober, and the RSS and CPU columns are those of the whole process.

Every queue and pool the run declares has a unique name and is deleted at the end, also after
Ctrl-C or SIGTERM; the worker is stopped with SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from broker_adapters import redact_url

from .request_reply import (run_cleaning_up, DEFAULT_BROKER, _find_broker_pid, _machine_busy, _proc_cpu,
                            _self_cpu, _stop_process, delete_pool_quietly, tiny_model)

ROOT = Path(__file__).resolve().parents[1]
# `python -m enclaveq` from this tree: the worker runs the same code as this process's SDK and
# attacker (and a copy of an older tree benchmarks that tree's worker).
ENCLAVEQ = (sys.executable, "-m", "enclaveq")
MiB = 1024 * 1024
FUTURE_EPOCH = 10**6
NESTED_BYTES = 16 * MiB
SAMPLE_EVERY = 0.05  # seconds between RSS samples
# A flood every kind must absorb. Not "as fast as possible" by default: job-queue floods share one
# FIFO queue with the legitimate job, which waits behind whatever the pool has not yet drained, so
# beyond the pool's drain rate (1,000-2,700 msg/s here) the ratio measures the queue, not the
# worker. 200 msg/s keeps even the cheapest message well below that on 2 shared cores.
DEFAULT_RATE = 200
QUIET_CPU_SHARE = 0.2  # the worker counts as quiet below this share of one core over a 0.5 s window


# -- reading a process from /proc --------------------------------------------------------------
def _status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak_rss(pid: int) -> bool:
    """Reset the process's VmHWM (Linux >= 4.0) so that it then reports the peak of what follows."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Highest VmRSS seen while it runs, sampled every ``SAMPLE_EVERY`` s (a backup for VmHWM)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.max_kib = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.max_kib = _status_kib(self.pid, "VmRSS") or 0
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.max_kib = max(self.max_kib, _status_kib(self.pid, "VmRSS") or 0)
            await asyncio.sleep(SAMPLE_EVERY)

    async def stop(self) -> int:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return max(self.max_kib, _status_kib(self.pid, "VmRSS") or 0)


# -- the hostile messages ----------------------------------------------------------------------
@dataclass
class Target:
    """What the attacker knows about the pool: all of it public or recorded off the broker."""

    pool: str
    epoch: int
    pool_public_key: bytes
    config_digest: bytes
    model_id: str
    attacker_address: str
    evidence_platform: str = "sim"
    evidence: bytes = b""
    genuine_job: bytes = b""
    job_body: bytes = b""


def _junk_for(annotation: object) -> Any:
    """A junk value of a dataclass field's declared type (annotations are strings here)."""
    text = str(annotation)
    if text.startswith("bytes"):
        return os.urandom(32)
    if text.startswith("str"):
        return "x"
    if text.startswith("int"):
        return 0
    if text.startswith(("tuple", "list")):
        return ()
    return None


def _build(cls: type, **given: Any) -> Any:
    """``cls(**given)`` with every other field filled with junk of its declared type, defaulted or
    not: the wire format may gain fields after this bench was written (a MAC on sync requests),
    and a hostile sender fills them rather than leaving them out."""
    kwargs = dict(given)
    for f in dataclasses.fields(cls):
        if f.name not in kwargs:
            junk = _junk_for(f.type)
            if junk is not None:
                kwargs[f.name] = junk
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise TypeError(f"{cls.__name__}.{f.name}: no junk for a field of type {f.type}")
    return cls(**kwargs)


def _statement(t: Target, *, epoch: int, pool_public_key: bytes) -> Any:
    from protocol import crypto
    from protocol.handshake import Statement

    return _build(Statement, pool=t.pool, epoch=epoch, suite=crypto.SUITE_ID, pool_public_key=pool_public_key,
                  worker_identity_key=os.urandom(32), nonce=os.urandom(32), config_digest=t.config_digest)


def garbage_job(t: Target, i: int) -> bytes:
    return os.urandom(1 + (i * 7919) % 2048)


_NESTED: bytes | None = None


def nested_arrays(t: Target, i: int) -> bytes:
    """array32 of N empty arrays: 16 MiB on the wire, one Python list per byte once decoded."""
    global _NESTED
    if _NESTED is None:
        n = NESTED_BYTES - 5
        _NESTED = b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n
    return _NESTED


def forged_challenge(t: Target, i: int) -> bytes:
    from protocol.handshake import Challenge

    return Challenge(nonce=os.urandom(32)).to_bytes()


def forged_announce(t: Target, i: int) -> bytes:
    from protocol.handshake import EpochAnnounce

    return _build(EpochAnnounce, platform=t.evidence_platform, evidence=t.evidence or os.urandom(1024),
                  statement=_statement(t, epoch=FUTURE_EPOCH, pool_public_key=os.urandom(32)),
                  previous_epoch=FUTURE_EPOCH - 1, retire_at_ms=int(time.time() * 1000) + 60_000,
                  sealed_key=os.urandom(96), worker_id=f"attacker-{i}").to_bytes()


def sync_request(t: Target, i: int) -> bytes:
    from protocol.handshake import ModelSyncRequest

    return _build(ModelSyncRequest, have=(), worker_id=f"attacker-{i}", nonce=os.urandom(32), source="").to_bytes()


def future_epoch_job(t: Target, i: int) -> bytes:
    from protocol import bodies, crypto
    from protocol.envelope import ProducerSession

    session = ProducerSession(pool=t.pool, epoch=FUTURE_EPOCH, pool_public_key=t.pool_public_key,
                              sealed_session=os.urandom(crypto.SEALED_SESSION_BYTES))
    header = session.header("job", job_id=uuid.uuid4().hex, deadline_ms=int(time.time() * 1000) + 60_000,
                            reply_to=t.attacker_address, content_type=bodies.TENSORS, model_id=t.model_id)
    return session.seal(header, t.job_body)


def replayed_job(t: Target, i: int) -> bytes:
    return t.genuine_job


def join_request(t: Target, i: int) -> bytes:
    from protocol.handshake import JoinRequest

    return _build(JoinRequest, platform=t.evidence_platform, evidence=t.evidence or os.urandom(1024),
                  statement=_statement(t, epoch=0, pool_public_key=bytes(32)), worker_id=f"attacker-{i}").to_bytes()


@dataclass(frozen=True)
class Kind:
    name: str
    channels: tuple[str, ...]  # "jobs" and/or "control", used in turn
    build: Callable[[Target, int], bytes]
    rate: float | None = None  # messages/s; None: as fast as the in-flight window allows
    in_flight: int | None = None  # None: --in-flight
    reuse: bool = False  # the same bytes every time: built once, not per message


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("garbage-job", ("jobs",), garbage_job),
    Kind("nested-arrays", ("jobs", "control"), nested_arrays, rate=1.0, in_flight=1, reuse=True),
    Kind("forged-challenge", ("control",), forged_challenge),
    Kind("forged-announce", ("control",), forged_announce),
    Kind("sync-request", ("control",), sync_request),
    Kind("future-epoch-job", ("jobs",), future_epoch_job),
    Kind("replayed-job", ("jobs",), replayed_job, reuse=True),
    Kind("join-request", ("control",), join_request),
)}


# -- the worker under test -----------------------------------------------------------------------
class SubprocessWorker:
    """`enclaveq worker` in its own process (amqp://): its RSS and CPU are its own."""

    def __init__(self, url: str, pool: str, tmp: Path) -> None:
        self.url, self.pool, self.tmp = url, pool, tmp
        self.sim_dir, self.policy = tmp / "sim", tmp / "policy.toml"
        self.log_path = tmp / "worker.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def prepare(self) -> None:
        for cmd in ([*ENCLAVEQ, "sim", "init", "--dir", str(self.sim_dir)],
                    [*ENCLAVEQ, "policy", "init", "--sim-dir", str(self.sim_dir), "--out", str(self.policy)]):
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[3:5])} failed: {done.stderr.strip()}")

    async def start(self) -> None:
        """Start (or restart, on the same sealed state) and wait until it serves."""
        self.starts += 1
        cmd = [*ENCLAVEQ, "worker", "--broker", self.url, "--pool", self.pool, "--sim-dir", str(self.sim_dir),
               "--state-dir", str(self.tmp / "state")]
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.log_path, "ab"),
                                     start_new_session=True, cwd=ROOT)
        deadline = time.monotonic() + 60
        while b"ready; send SIGTERM" not in self.log_path.read_bytes()[offset:]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{self.log_path.read_text()[-3000:]}")
            await asyncio.sleep(0.1)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_bytes(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    async def stop(self) -> None:
        await _stop_process(self.proc, "worker")

    async def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)


class InProcessWorker(SubprocessWorker):
    """The worker on this process's event loop (memory:// exists only inside one process)."""

    def __init__(self, url: str, pool: str, tmp: Path) -> None:
        super().__init__(url, pool, tmp)
        self.worker: Any = None
        self._handler: logging.Handler | None = None

    @property
    def pid(self) -> int:
        return os.getpid()

    async def start(self) -> None:
        from enclave_worker.platform import sim_identity
        from enclave_worker.worker import Worker

        self.starts += 1
        if self._handler is None:  # the worker's log goes to a file, as a worker process's would
            self._handler = logging.FileHandler(self.log_path)
            self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger = logging.getLogger("enclaveq")
            logger.addHandler(self._handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
        self.worker = Worker(broker_url=self.url, pool=self.pool, identity=sim_identity(self.sim_dir),
                             state_dir=self.tmp / "state")
        await self.worker.start()

    def alive(self) -> bool:
        return self.worker is not None

    async def kill(self) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self.worker is not None:
            with contextlib.suppress(Exception):
                await self.worker.stop()
            self.worker = None
        if self._handler is not None:
            logging.getLogger("enclaveq").removeHandler(self._handler)
            self._handler.close()
            self._handler = None


# -- the attacker ---------------------------------------------------------------------------------
class Attacker:
    """A raw broker connection: publishes hostile messages and counts what comes back to it."""

    def __init__(self, url: str, run_id: str) -> None:
        from broker_adapters import open_broker

        self.broker = open_broker(url)
        self.reply_name = f"attacker-{run_id}"
        self.address = ""
        self.received = 0
        self.received_bytes = 0
        self._waiting: dict[str, asyncio.Future[bytes]] = {}

    async def start(self) -> None:
        await self.broker.connect()
        self.address = await self.broker.declare_reply_queue(self.reply_name)
        await self.broker.consume_replies(self.reply_name, self._on_reply)

    async def _on_reply(self, delivery: Any) -> None:
        msg = delivery.message
        self.received += 1
        self.received_bytes += len(msg.body)
        waiting = self._waiting.pop(msg.correlation_id or "", None)
        if waiting is not None and not waiting.done():
            waiting.set_result(msg.body)
        await delivery.ack()

    async def ask(self, pool: str, body: bytes, *, control: bool, timeout: float = 30,
                  correlation_id: str | None = None) -> bytes:
        """Publish one message and wait for the answer that names it (recording genuine traffic);
        a worker answers a sealed request under its job id, a control message under its correlation id."""
        from broker_adapters import Message

        cid = correlation_id or uuid.uuid4().hex
        future = self._waiting[cid] = asyncio.get_running_loop().create_future()
        message = Message(body=body, correlation_id=cid, reply_to=self.address, message_id=cid)
        if control:
            await self.broker.publish_control(pool, message)
        else:
            await self.broker.publish_job(pool, message)
        return await asyncio.wait_for(future, timeout)

    async def flood(self, pool: str, kind: Kind, target: Target, seconds: float, in_flight: int,
                    rate: float | None) -> tuple[int, int, int, float]:
        """Publish ``kind`` for ``seconds``: (messages, bytes, refused publishes, seconds taken)."""
        from broker_adapters import Message
        from broker_adapters.errors import BrokerError

        loop = asyncio.get_running_loop()
        window = asyncio.Semaphore(in_flight)
        sent = sent_bytes = refused = 0
        pending: set[asyncio.Task[None]] = set()
        cached = kind.build(target, 0) if kind.reuse else b""

        async def one(body: bytes, channel: str, i: int) -> None:
            nonlocal sent, sent_bytes, refused
            message = Message(body=body, reply_to=self.address, correlation_id=f"flood-{i}", message_id=f"flood-{i}")
            try:
                if channel == "jobs":
                    await self.broker.publish_job(pool, message)
                else:
                    await self.broker.publish_control(pool, message)
                sent += 1
                sent_bytes += len(body)
            except BrokerError:
                refused += 1
            finally:
                window.release()

        started = loop.time()
        stop_at = started + seconds
        next_at = started
        i = 0
        while loop.time() < stop_at:
            await window.acquire()
            if rate:
                now = loop.time()
                next_at = max(next_at, now - 1.0)  # no catch-up burst after a stall
                if next_at > now:
                    await asyncio.sleep(next_at - now)
                next_at += 1.0 / rate
                if loop.time() >= stop_at:
                    window.release()
                    break
            body = cached if kind.reuse else kind.build(target, i)
            task = loop.create_task(one(body, kind.channels[i % len(kind.channels)], i))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
            if i % 16 == 0:
                await asyncio.sleep(0)  # memory:// publishes never block: let the worker run
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        return sent, sent_bytes, refused, loop.time() - started

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.broker.delete_reply_queue(self.reply_name)
        with contextlib.suppress(Exception):
            await self.broker.close()


class QueueDepths:
    """Messages waiting in the pool's job queue and dead letters (RabbitMQ only), and a purge."""

    def __init__(self, url: str, pool: str) -> None:
        self.url, self.pool = url, pool
        self._conn: Any = None

    async def start(self) -> None:
        if not self.url.startswith(("amqp://", "amqps://")):
            return
        import aio_pika

        self._conn = await aio_pika.connect_robust(self.url)

    async def _count(self, name: str, *, purge: bool = False) -> int | None:
        if self._conn is None:
            return None
        try:
            channel = await self._conn.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
                count = queue.declaration_result.message_count
                if purge:
                    await queue.purge()
                return int(count)
            finally:
                await channel.close()
        except Exception:
            return None

    async def jobs(self, *, purge: bool = False) -> int | None:
        from broker_adapters._common import jobs_queue

        return await self._count(jobs_queue(self.pool), purge=purge)

    async def dead(self) -> int | None:
        from broker_adapters._common import dead_queue

        return await self._count(dead_queue(self.pool))

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()


# -- the legitimate producer -------------------------------------------------------------------
@dataclass
class Probes:
    latencies_ms: list[float] = field(default_factory=list)
    timeouts: int = 0
    errors: int = 0
    first_error: str = ""

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


async def probe(client: Any, model_id: str, inputs: dict, *, rate: float, count: int | None = None,
                until: float | None = None, timeout: float = 20.0) -> Probes:
    """Start a legitimate job every ``1/rate`` s (``count`` of them, or until loop time ``until``),
    each on its own, and time each from when it was due to when its result was in hand.

    Open loop on purpose: jobs run one after another would sample a stalled worker once per
    stall and a fast one hundreds of times, so their median hides stalls ("coordinated
    omission"); jobs due at fixed times sample the flood's whole duration evenly. A job that
    fails or times out counts with the time it took."""
    from producer_sdk.errors import JobTimeout

    loop = asyncio.get_running_loop()
    out = Probes()

    async def one(due: float) -> None:
        try:
            await client.run(model_id, inputs, timeout=timeout)
        except JobTimeout:
            out.timeouts += 1
        except Exception as exc:  # a refused job is a figure here, not a crash of the bench
            out.errors += 1
            out.first_error = out.first_error or f"{type(exc).__name__}: {exc}"
        out.latencies_ms.append(1000 * (loop.time() - due))

    tasks: list[asyncio.Task[None]] = []
    due = loop.time()
    while (count is not None and len(tasks) < count) or (until is not None and due < until):
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        tasks.append(loop.create_task(one(due)))
        due += 1.0 / rate
    await asyncio.gather(*tasks)
    return out


# -- one flood ---------------------------------------------------------------------------------
@dataclass
class Row:
    kind: str
    channels: str
    seconds: float = 0.0
    sent: int = 0
    sent_bytes: int = 0
    refused_publishes: int = 0
    idle_before_p50_ms: float = float("nan")
    p50_ms: float = float("nan")
    p95_ms: float = float("nan")
    probes: int = 0
    probe_timeouts: int = 0
    probe_errors: int = 0
    probe_first_error: str = ""
    ratio: float = float("nan")
    rss_before_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_growth_mib: float = 0.0
    cpu_flood_pct: float | None = None
    cpu_total_s: float | None = None
    cpu_ms_per_msg: float | None = None
    broker_cpu_pct: float | None = None
    bench_cpu_pct: float | None = None  # this process: the flooder and the legitimate producer
    other_cores: float | None = None
    backlog: int | None = None
    dead_lettered: int | None = None
    recovery_s: float = 0.0
    recovered: bool = True
    back_msgs: int = 0
    back_bytes: int = 0
    log_kib: float = 0.0
    worker_died: bool = False
    restarted: bool = False  # killed and started again after this kind: it died or never got quiet
    skipped: str = ""

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


class Bench:
    def __init__(self, args: argparse.Namespace, run_id: str, tmp: Path) -> None:
        self.args = args
        self.pool = f"bench-hostile-{run_id}"
        memory = args.broker.startswith("memory://")
        self.worker = (InProcessWorker if memory else SubprocessWorker)(args.broker, self.pool, tmp)
        self.attacker = Attacker(args.broker, run_id)
        self.depths = QueueDepths(args.broker, self.pool)
        self.broker_pid = None if memory else _find_broker_pid()
        self.client: Any = None
        self.reply_name: str | None = None
        self.model_id = ""
        self.inputs = {"x": np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)}
        self.target: Target | None = None
        self.idle = Probes()
        self.idle_after = Probes()
        self.idle_cpu_cores = 0.0  # what the worker spends serving the legitimate jobs alone

    async def start(self, console: Any) -> None:
        from producer_sdk import AsyncClient

        self.worker.prepare()
        await self.worker.start()
        self.client = AsyncClient(self.args.broker, self.pool, self.worker.policy, timeout=60)
        self.reply_name = self.client.name
        await self.client.connect()
        self.model_id = await self.client.upload_model(tiny_model())
        if self.args.sync_model_mib:
            from .large_upload import large_model

            # What a model-sync request makes a member read, unseal, re-seal and send.
            await self.client.upload_model(await asyncio.to_thread(large_model, self.args.sync_model_mib))
        await self.attacker.start()
        await self.depths.start()
        await self._recon(console)

    async def _recon(self, console: Any) -> None:
        """What an attacker on the broker learns first: the attested statement (from a challenge of
        its own) and a piece of genuine evidence to replay."""
        from protocol import bodies
        from protocol.handshake import Challenge, EvidenceResponse

        statement = self.client.statement
        self.target = Target(pool=self.pool, epoch=statement.epoch, pool_public_key=statement.pool_public_key,
                             config_digest=statement.config_digest, model_id=self.model_id,
                             attacker_address=self.attacker.address,
                             job_body=bodies.encode_job(self.inputs))
        try:
            answer = EvidenceResponse.from_bytes(await self.attacker.ask(
                self.pool, Challenge(nonce=os.urandom(32)).to_bytes(), control=True))
            self.target.evidence_platform, self.target.evidence = answer.platform, answer.evidence
        except Exception as exc:
            console.print(f"[yellow]no genuine evidence recorded ({type(exc).__name__}: {exc}); forged messages "
                          "carry random evidence[/yellow]")

    async def record_genuine_job(self) -> None:
        """Seal one job with a session of the attacker's own (anyone can attest) and run it once."""
        from protocol import bodies
        from protocol.envelope import ProducerSession

        t = self.target
        assert t is not None
        session = ProducerSession(pool=t.pool, epoch=t.epoch, pool_public_key=t.pool_public_key)
        job_id = uuid.uuid4().hex
        header = session.header("job", job_id=job_id, deadline_ms=int(time.time() * 1000) + 300_000,
                                reply_to=t.attacker_address, content_type=bodies.TENSORS, model_id=t.model_id)
        t.genuine_job = session.seal(header, t.job_body)
        # The first delivery runs and is answered on the attacker's queue; every later one is a replay.
        await self.attacker.ask(t.pool, t.genuine_job, control=False, timeout=self.args.probe_timeout,
                                correlation_id=job_id)

    def _cpu(self) -> float | None:
        return _self_cpu() if isinstance(self.worker, InProcessWorker) else _proc_cpu(self.worker.pid)

    async def measure_idle(self, n: int) -> Probes:
        await self.probe(count=min(20, n))  # warm-up
        return await self.probe(count=n)

    async def probe(self, *, count: int | None = None, until: float | None = None) -> Probes:
        return await probe(self.client, self.model_id, self.inputs, rate=self.args.probe_rate, count=count,
                           until=until, timeout=self.args.probe_timeout)

    async def settle(self, idle_p50: float) -> tuple[bool, float]:
        """Wait until the worker is quiet (little CPU, no jobs queued, a job about as fast as idle)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        give_up = started + self.args.settle
        seen = self.attacker.received
        while loop.time() < give_up and self.worker.alive():
            before = self._cpu()
            await asyncio.sleep(0.5)
            after = self._cpu()
            if before is not None and after is not None and after - before > 0.5 * QUIET_CPU_SHARE:
                continue
            if (await self.depths.jobs() or 0) > 0:
                continue
            if self.attacker.received != seen:  # answers still coming back: the worker is still at it
                seen = self.attacker.received
                continue
            check = await self.probe(count=3)
            if max(check.latencies_ms) <= 2 * idle_p50 and not check.errors + check.timeouts:
                return True, loop.time() - started
        return False, loop.time() - started

    async def run_kind(self, kind: Kind) -> Row:
        args = self.args
        row = Row(kind.name, "+".join(kind.channels))
        loop = asyncio.get_running_loop()
        if not self.worker.alive():
            await self.worker.start()
        try:
            if kind.name == "replayed-job":
                await self.record_genuine_job()
            assert self.target is not None
            kind.build(self.target, 0)  # fail here, not inside the flood, if the wire format changed
        except Exception as exc:
            row.skipped = f"{type(exc).__name__}: {exc}"
            return row
        pre = await self.probe(count=args.pre_idle_jobs)
        row.idle_before_p50_ms = pre.pct(50)
        pid = self.worker.pid
        row.rss_before_mib = (_status_kib(pid, "VmRSS") or 0) / 1024
        hwm_reset = _reset_peak_rss(pid)
        sampler = RssSampler(pid)
        sampler.start()
        received, received_bytes = self.attacker.received, self.attacker.received_bytes
        log_before, dead_before = self.worker.log_bytes(), await self.depths.dead()
        cpu0, broker0, machine0 = self._cpu(), _proc_cpu(self.broker_pid) if self.broker_pid else None, _machine_busy()
        self_cpu0 = _self_cpu()
        wall0 = loop.time()
        flood = loop.create_task(self.attacker.flood(self.pool, kind, self.target, args.seconds,
                                                     kind.in_flight or args.in_flight,
                                                     kind.rate if kind.rate is not None else args.rate))
        probing = loop.create_task(self.probe(until=wall0 + args.seconds))
        row.sent, row.sent_bytes, row.refused_publishes, row.seconds = await flood
        wall1 = loop.time()
        cpu1, broker1, machine1 = self._cpu(), _proc_cpu(self.broker_pid) if self.broker_pid else None, _machine_busy()
        self_cpu1 = _self_cpu()
        row.backlog = await self.depths.jobs()
        probes = await probing  # jobs stuck behind the flood finish or time out
        await self.depths.jobs(purge=True)  # what the worker has still not got to: gone
        row.recovered, row.recovery_s = await self.settle(self.idle.pct(50))
        wall2, cpu2 = loop.time(), self._cpu()
        peak_kib = await sampler.stop()
        if hwm_reset:
            peak_kib = max(peak_kib, _status_kib(pid, "VmHWM") or 0)
        dead_after = await self.depths.dead()
        row.worker_died = not self.worker.alive()
        row.p50_ms, row.p95_ms = probes.pct(50), probes.pct(95)
        row.probes, row.probe_timeouts, row.probe_errors = len(probes.latencies_ms), probes.timeouts, probes.errors
        row.probe_first_error = probes.first_error
        # Against the idle jobs just before this flood: the machine is shared, and its load drifts.
        row.ratio = row.p50_ms / row.idle_before_p50_ms
        row.rss_peak_mib = peak_kib / 1024
        row.rss_growth_mib = row.rss_peak_mib - row.rss_before_mib
        span = wall1 - wall0
        if cpu0 is not None and cpu1 is not None:
            row.cpu_flood_pct = 100 * (cpu1 - cpu0) / span
        if cpu0 is not None and cpu2 is not None:
            row.cpu_total_s = cpu2 - cpu0
            # Less what serving the legitimate jobs costs an idle worker over the same time.
            extra = row.cpu_total_s - self.idle_cpu_cores * (wall2 - wall0)
            row.cpu_ms_per_msg = max(0.0, 1000 * extra / row.sent) if row.sent else None
        if broker0 is not None and broker1 is not None:
            row.broker_cpu_pct = 100 * (broker1 - broker0) / span
        row.bench_cpu_pct = 100 * (self_cpu1 - self_cpu0) / span
        if machine0 is not None and machine1 is not None and cpu0 is not None and cpu1 is not None:
            # This process (flooder and prober) counts as ours too; in-process it is the worker's figure.
            ours = (cpu1 - cpu0) + ((broker1 or 0.0) - (broker0 or 0.0))
            if not isinstance(self.worker, InProcessWorker):
                ours += self_cpu1 - self_cpu0
            row.other_cores = max(0.0, (machine1 - machine0 - ours) / span)
        if dead_before is not None and dead_after is not None:
            row.dead_lettered = dead_after - dead_before
        row.back_msgs = self.attacker.received - received
        row.back_bytes = self.attacker.received_bytes - received_bytes
        row.log_kib = (self.worker.log_bytes() - log_before) / 1024
        if row.worker_died or not row.recovered:
            # The next kind gets a worker that is not still busy with this one (same sealed state).
            await self.worker.kill()
            await self.worker.start()
            row.restarted = True
        return row

    async def cleanup(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
        await self.attacker.close()
        await self.depths.close()
        await self.worker.stop()
        await delete_pool_quietly(self.args.broker, self.pool, self.reply_name)


# -- the run ---------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", MiB), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def failures(rows: list[Row], args: argparse.Namespace) -> list[str]:
    out = []
    for r in rows:
        if r.skipped:
            continue
        if r.worker_died:
            out.append(f"{r.kind}: the worker died")
        if not r.ratio <= args.max_ratio:  # NaN (no job finished) fails too
            out.append(f"{r.kind}: legitimate median {_fmt(r.p50_ms)} ms is {_fmt(r.ratio, 2)}x idle "
                       f"(limit {args.max_ratio:g}x)")
        if r.rss_growth_mib > args.max_rss_growth_mib:
            out.append(f"{r.kind}: worker RSS grew by {r.rss_growth_mib:.0f} MiB (limit {args.max_rss_growth_mib:g})")
        if not r.recovered:
            out.append(f"{r.kind}: the worker was not quiet again within {args.settle:g} s of the flood")
    return out


COLUMNS = ("kind", "channel", "msg/s", "sent", "idle p50 ms", "legit p50 / p95 ms", "× idle", "jobs (t/o)", "worker RSS MiB (Δ)",
           "worker CPU %", "CPU ms/msg", "backlog", "dead-lettered", "recovery s", "back to attacker", "log KiB",
           "CPU % broker / bench / others")


def _cells(r: Row, args: argparse.Namespace, mark: Callable[[str], str]) -> list[str]:
    """One row of the table; ``mark`` highlights a figure that fails the check."""
    if r.skipped:
        return [r.kind, r.channels, *["-"] * (len(COLUMNS) - 3), f"skipped: {r.skipped[:60]}"]
    ratio = _fmt(r.ratio, 2)
    growth = f"{r.rss_peak_mib:.0f} ({r.rss_growth_mib:+.0f})"
    others = None if r.other_cores is None else 100 * r.other_cores
    return [
        r.kind + (" " + mark("(died)") if r.worker_died else "") + (" (restarted)" if r.restarted else ""), r.channels, f"{r.rate:.0f}",
        f"{r.sent} ({_size(r.sent_bytes)})", _fmt(r.idle_before_p50_ms, 2), f"{_fmt(r.p50_ms)} / {_fmt(r.p95_ms)}",
        mark(ratio) if not r.ratio <= args.max_ratio else ratio, f"{r.probes} ({r.probe_timeouts})",
        mark(growth) if r.rss_growth_mib > args.max_rss_growth_mib else growth, _fmt(r.cpu_flood_pct, 0),
        _fmt(r.cpu_ms_per_msg, 2), "-" if r.backlog is None else str(r.backlog),
        "-" if r.dead_lettered is None else str(r.dead_lettered),
        _fmt(r.recovery_s, 1) if r.recovered else mark(f">{args.settle:g}"),
        f"{r.back_msgs} ({_size(r.back_bytes)})", _fmt(r.log_kib, 0),
        f"{_fmt(r.broker_cpu_pct, 0)} / {_fmt(r.bench_cpu_pct, 0)} / {_fmt(others, 0)}",
    ]


def _title(bench: Bench, args: argparse.Namespace) -> str:
    where = ("this whole process (the worker runs in it)" if isinstance(bench.worker, InProcessWorker)
             else "the worker process")
    rate = "as fast as the window allows" if args.rate is None else f"{args.rate:g} msg/s"
    return (f"hostile floods, {args.seconds:g} s each at {rate} (nested-arrays 1 msg/s), one worker; idle "
            f"legitimate job p50 {bench.idle.pct(50):.2f} ms, p95 {bench.idle.pct(95):.2f} ms over "
            f"{len(bench.idle.latencies_ms)} jobs; RSS and CPU of {where}")


def _table(rows: list[Row], bench: Bench, args: argparse.Namespace) -> Any:
    from rich.table import Table

    table = Table(title=_title(bench, args), title_justify="left")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("kind", "channel") else "right")
    for r in rows:
        table.add_row(*_cells(r, args, lambda text: f"[red]{text}[/red]"))
    return table


def _markdown(rows: list[Row], bench: Bench, args: argparse.Namespace) -> str:
    lines = [_title(bench, args) + ":", "", "| " + " | ".join(COLUMNS) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in COLUMNS[2:]) + " |"]
    lines += ["| " + " | ".join(_cells(r, args, lambda text: f"**{text}**")) + " |" for r in rows]
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=200)
    kinds = [KINDS[k] for k in args.kinds]
    run_id = uuid.uuid4().hex[:10]
    main_task = asyncio.current_task()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)  # type: ignore[union-attr]
    load_start = os.getloadavg()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="enclaveq-hostile-") as tmpname:
        bench = Bench(args, run_id, Path(tmpname))
        console.print(f"run {run_id}: broker {redact_url(args.broker)}, {os.cpu_count()} CPUs, python "
                      f"{platform.python_version()}, load average {load_start[0]:.2f}; pool {bench.pool}; "
                      f"kinds {', '.join(args.kinds)}")
        try:
            with console.status("starting the worker, uploading the model, recording genuine traffic"):
                await bench.start(console)
            where = "in this process" if isinstance(bench.worker, InProcessWorker) else f"pid {bench.worker.pid}"
            console.print(f"worker {where}, RSS {(_status_kib(bench.worker.pid, 'VmRSS') or 0) / 1024:.0f} MiB; "
                          f"model {bench.model_id[:12]}…; genuine evidence recorded: "
                          f"{'yes' if bench.target and bench.target.evidence else 'no'}")
            with console.status(f"idle: {args.idle_jobs} legitimate jobs, {args.probe_rate:g} a second"):
                cpu0, t0 = bench._cpu(), time.perf_counter()
                bench.idle = await bench.measure_idle(args.idle_jobs)
                cpu1, t1 = bench._cpu(), time.perf_counter()
            idle_cpu = None if cpu0 is None or cpu1 is None else 100 * (cpu1 - cpu0) / (t1 - t0)
            bench.idle_cpu_cores = (idle_cpu or 0.0) / 100
            console.print(f"  idle: p50 {bench.idle.pct(50):.2f} ms, p95 {bench.idle.pct(95):.2f} ms, "
                          f"worker CPU {_fmt(idle_cpu, 0)} % while serving them")
            for kind in kinds:
                with console.status(f"{kind.name}: flooding for {args.seconds:g} s, then waiting for quiet"):
                    row = await bench.run_kind(kind)
                rows.append(row)
                if row.skipped:
                    console.print(f"  {kind.name:17} skipped: {row.skipped}")
                    continue
                console.print(f"  {kind.name:17} {row.rate:7.0f} msg/s  idle before {_fmt(row.idle_before_p50_ms)} ms  "
                              f"legit p50 {_fmt(row.p50_ms):>7} ms "
                              f"({_fmt(row.ratio, 2)}x)  RSS {row.rss_peak_mib:.0f} MiB "
                              f"(+{row.rss_growth_mib:.0f})  CPU {_fmt(row.cpu_flood_pct, 0)} %  "
                              f"back {row.back_msgs} msgs  recovery {_fmt(row.recovery_s)} s"
                              + (f"  first job error: {row.probe_first_error[:80]}" if row.probe_first_error else ""))
            with console.status("idle again"):
                bench.idle_after = await bench.measure_idle(min(args.idle_jobs, 100))
        finally:
            with console.status("cleaning up: stopping the worker, deleting queues"):
                await bench.cleanup()
    console.print(_table(rows, bench, args))
    if args.markdown:
        console.print(_markdown(rows, bench, args), markup=False, highlight=False, soft_wrap=True)
    console.print(f"idle after the floods: p50 {bench.idle_after.pct(50):.2f} ms, p95 {bench.idle_after.pct(95):.2f} ms;"
                  f" load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end "
                  f"({os.cpu_count()} CPUs); 'other cores' = CPU the rest of the machine took during each flood")
    failed = failures(rows, args)
    for line in failed:
        console.print(f"[red]FAIL[/red] {line}")
    if not failed:
        console.print(f"[green]OK[/green]: every flood kept the legitimate median within {args.max_ratio:g}x idle "
                      f"and the worker's RSS within +{args.max_rss_growth_mib:g} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "argv": sys.argv, "cpus": os.cpu_count(), "python": platform.python_version(),
            "broker": redact_url(args.broker), "seconds": args.seconds,
            "idle": {"p50_ms": bench.idle.pct(50), "p95_ms": bench.idle.pct(95), "jobs": len(bench.idle.latencies_ms)},
            "idle_after": {"p50_ms": bench.idle_after.pct(50), "p95_ms": bench.idle_after.pct(95)},
            "rows": [{**dataclasses.asdict(r), "rate": r.rate} for r in rows], "failures": failed,
        }, indent=2, default=str))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default=os.environ.get("ENCLAVEQ_BROKER", DEFAULT_BROKER),
                        help="amqp://… (worker in its own process; default amqp://guest:guest@127.0.0.1:5672/) "
                             "or memory://NAME (worker in this process)")
    parser.add_argument("--seconds", type=float, default=5.0, help="flood length per kind (default 5)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated subset of: {', '.join(KINDS)} (default: all)")
    parser.add_argument("--in-flight", type=int, default=32,
                        help="unconfirmed publishes the flooder keeps at once (default 32; nested-arrays uses 1)")
    parser.add_argument("--rate", default=str(DEFAULT_RATE),
                        help=f"messages/s of every kind but nested-arrays (1/s), or 'max': as fast as the "
                             f"--in-flight window allows (default {DEFAULT_RATE})")
    parser.add_argument("--idle-jobs", type=int, default=200,
                        help="legitimate jobs timed on the idle worker (default 200, at --probe-rate)")
    parser.add_argument("--pre-idle-jobs", type=int, default=50,
                        help="legitimate jobs timed right before each flood, the idle figure its ratio is "
                             "taken against (default 50)")
    parser.add_argument("--probe-rate", type=float, default=50.0,
                        help="legitimate jobs started per second, each on its own (open loop; default 50)")
    parser.add_argument("--probe-timeout", type=float, default=20.0,
                        help="a legitimate job that takes longer counts as timed out, with this latency (20 s)")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="after a flood, wait at most this long for the worker to be quiet again (60 s)")
    parser.add_argument("--sync-model-mib", type=int, default=1,
                        help="also upload a model of this many MiB, which a sync request makes the worker send "
                             "(default 1; 0: only the tiny model)")
    parser.add_argument("--max-ratio", type=float, default=2.0,
                        help="fail if a flood's legitimate median exceeds this multiple of the idle median (2.0)")
    parser.add_argument("--max-rss-growth-mib", type=float, default=256.0,
                        help="fail if the worker's peak RSS during a flood exceeds its RSS before it by more (256)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = parser.parse_args(argv)
    try:
        args.rate = None if args.rate.lower() == "max" else float(args.rate)
    except ValueError:
        parser.error("--rate takes a number of messages/s or 'max'")
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in args.kinds if k not in KINDS]
    if unknown or not args.kinds:
        parser.error(f"unknown kind(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(KINDS)}")
    if args.seconds <= 0 or args.in_flight < 1 or args.idle_jobs < 1 or args.pre_idle_jobs < 1 \
            or args.probe_rate <= 0 or (args.rate is not None and args.rate <= 0):
        parser.error("--seconds, --in-flight, --idle-jobs, --pre-idle-jobs, --probe-rate and --rate must be positive")
    return run_cleaning_up(run(args))


if __name__ == "__main__":
    sys.exit(main())
