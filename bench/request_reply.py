"""Request/reply throughput: enclaveq over RabbitMQ against plain aio-pika, or over Mosquitto
against plain aiomqtt, in one run.

    python -m bench.request_reply [--jobs N] [--broker URL] [--concurrency C[,C...]]
                                  [--model tiny|magika] [--profile] [--json PATH]

Two systems move the same number of jobs through the same broker, each with ``C`` requests
in flight and the answering side in its own process:

baseline
    plain aio-pika, no crypto, no inference. A responder process consumes a durable quorum
    queue (prefetch 16, the worker's, manual acks), publishes a reply of the size of an
    enclaveq result to the client's durable quorum reply queue on a publisher-confirm channel
    (persistent, mandatory), waits for the confirm and only then acks the request. The client
    publishes persistent, mandatory requests of the size of an enclaveq request on a confirm
    channel and acks every reply. Queues and their arguments (delivery limits, at-least-once
    dead-lettering, reject-publish) are those enclaveq's AMQP adapter declares. These are
    exactly the delivery guarantees enclaveq gives.

baseline with an ``mqtt://`` URL (``bench/mqtt_baseline.py``)
    plain aiomqtt over MQTT 5, QoS 1 both ways, no crypto, no inference. A responder process
    takes requests through a shared subscription with a persistent session and Receive Maximum
    16, publishes a reply of the size of an enclaveq result to the request's response topic
    with its correlation data and awaits the PUBACK. aiomqtt acknowledges every incoming
    message on receipt (it has no manual acks), before the reply: an advantage over enclaveq,
    whose worker acks after its result's PUBACK. The client publishes requests of the size of
    an enclaveq request at QoS 1 (awaiting each PUBACK) and reads replies from its own topic
    with a persistent session. The enclaveq phase then runs over the same Mosquitto (worker
    started with ``--broker mqtt://...``).

enclaveq
    one real worker started with the CLI (``enclaveq sim init``, ``enclaveq policy init``,
    ``enclaveq worker``) and the producer ``AsyncClient.submit`` with ``max_in_flight=C``; the
    model is a tiny ONNX graph (float32 [1,16] + 1) built here, or Magika's real classifier.

For each system: a warm-up batch (not timed), then ``N`` timed jobs. Reported: jobs/s, p50 and
p99 latency (from sealing/publishing a request to having its result in hand), the CPU time per
job of the client, of the answering process and of the broker (the RabbitMQ node, or the
Mosquitto process listening on the URL's port, when it runs on this machine), the cores other
programs took meanwhile, and the ratio enclaveq/baseline jobs/s.
``--repeat R`` runs R rounds, alternating which system goes first; the table then shows
medians and the ratio is the median of the per-round ratios (each round's two phases run back
to back, which cancels most of a busy machine's drift).

``--profile`` samples the answering process and the client during each timed phase, with
py-spy when it is installed (every thread, low overhead) or cProfile otherwise (main thread
only), and prints the top functions and a breakdown by area. Profiled runs are slower: use
their numbers for "where", never for "how fast".

Every queue, exchange, topic, session and pool the run declares has a unique name and is
deleted (MQTT sessions: ended) at the end, also after Ctrl-C; the worker and the responder are
stopped with SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import datetime
import json
import os
import platform
import pstats
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable, Coroutine, Iterator, Mapping

import numpy as np

from broker_adapters import redact_url

DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672/"
# The worker's own prefetch with the default config: max(2 * max_jobs_in_flight, 16).
WORKER_PREFETCH = 16
# AsyncClient.consume_replies' prefetch.
CLIENT_REPLY_PREFETCH = 256
TICKS = os.sysconf("SC_CLK_TCK")


# -- small helpers ---------------------------------------------------------------------------
def _proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS
    except (OSError, IndexError, ValueError):
        return None


def _find_broker_pid() -> int | None:
    """The local RabbitMQ node (beam.smp), if the broker runs on this machine."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == "beam.smp":
                cmdline = (entry / "cmdline").read_bytes()
                if b"rabbit" in cmdline:
                    return int(entry.name)
        except OSError:
            continue
    return None


def _is_mqtt(url: str) -> bool:
    return url.split(":", 1)[0].lower() in ("mqtt", "mqtts")


def _find_listener_pid(host: str, port: int) -> int | None:
    """The local process listening on ``host:port`` (the Mosquitto a URL names), if any.

    Matched by port and by socket inode, not by name: the tests' private Mosquittos listen on
    other ports of the same machine."""
    try:
        wanted = {str(info[4][0]) for info in socket.getaddrinfo(host, port, socket.AF_INET)}
        for address in wanted:
            with socket.socket() as probe:
                probe.bind((address, 0))  # fails for an address of another machine
    except (OSError, UnicodeError):
        return None
    wanted_raw = {socket.inet_aton(a) for a in wanted}
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A":  # 0A: LISTEN
                continue
            address, _, port_hex = fields[1].partition(":")
            if int(port_hex, 16) != port:
                continue
            if table.endswith("tcp") and address != "00000000":
                # /proc/net/tcp holds the IPv4 address as a little-endian hex word.
                if bytes.fromhex(address)[::-1] not in wanted_raw:
                    continue
            inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    return int(entry.name)
        except OSError:
            continue
    return None


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class PhaseResult:
    system: str
    concurrency: int
    jobs: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)
    errors: int = 0
    cpu_client_s: float | None = None
    cpu_server_s: float | None = None
    cpu_broker_s: float | None = None
    cpu_machine_s: float | None = None
    profiled: bool = False
    round: int = 0

    @property
    def other_cores(self) -> float | None:
        """Average cores used by everything else on the machine during the phase."""
        if self.cpu_machine_s is None or self.seconds <= 0:
            return None
        ours = sum(v for v in (self.cpu_client_s, self.cpu_server_s, self.cpu_broker_s) if v is not None)
        return max(0.0, (self.cpu_machine_s - ours) / self.seconds)

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds if self.seconds > 0 else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def cpu_ms_per_job(self, which: str) -> float | None:
        value = getattr(self, f"cpu_{which}_s")
        return None if value is None else 1000 * value / self.jobs

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "latencies_ms"}
        out.update(jobs_per_s=round(self.jobs_per_s, 1), p50_ms=round(self.pct(50), 2), p99_ms=round(self.pct(99), 2),
                   other_cores=None if self.other_cores is None else round(self.other_cores, 2),
                   cpu_ms_per_job={w: (None if v is None else round(v, 3))
                                   for w in ("client", "server", "broker") for v in [self.cpu_ms_per_job(w)]})
        return out


def _machine_busy() -> float | None:
    """Busy CPU seconds of the whole machine (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / TICKS  # user nice system irq softirq steal
    except (OSError, ValueError, IndexError):
        return None


class _CpuMeter:
    """CPU seconds spent by the client (this process), the server process, the broker, and
    the whole machine (to tell how much other programs took during a phase)."""

    def __init__(self, server_pid: int | None, broker_pid: int | None, extra_server_pids: tuple[int, ...] = ()) -> None:
        self.server_pid, self.broker_pid = server_pid, broker_pid
        self.server_pids = (server_pid, *extra_server_pids) if server_pid else ()

    def _servers(self) -> float | None:
        """CPU of every answering process together (several enclaveq workers share one pool)."""
        values = [_proc_cpu(pid) for pid in self.server_pids]
        known = [v for v in values if v is not None]
        return None if not values or len(known) < len(values) else sum(known)

    def read(self) -> tuple[float | None, ...]:
        return (_self_cpu(), self._servers(), _proc_cpu(self.broker_pid) if self.broker_pid else None,
                _machine_busy())

    @staticmethod
    def diff(a, b) -> tuple[float | None, ...]:
        return tuple(None if x is None or y is None else y - x for x, y in zip(a, b))


# -- models ----------------------------------------------------------------------------------
def tiny_model() -> bytes:
    """float32 x[batch,16] -> y = x + 1: the smallest model that still runs through ONNX Runtime.

    The leading dimension is symbolic ("batch") so that a worker that batches jobs of models with a
    dynamic batch dimension can batch this one; the benchmarks still send x as [1,16]."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])], "bench_tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        initializer=[helper.make_tensor("one", TensorProto.FLOAT, [16], [1.0] * 16)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@dataclass
class Workload:
    name: str
    model_bytes: bytes
    samples: list[dict[str, np.ndarray]]
    request_bytes: int = 0
    reply_bytes: int = 0

    def inputs(self, count: int) -> Iterator[dict[str, np.ndarray]]:
        for i in range(count):
            yield self.samples[i % len(self.samples)]


def make_workload(name: str) -> Workload:
    if name == "tiny":
        rng = np.random.default_rng(0)
        samples = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(16)]
        work = Workload("tiny (float32 [1,16] + 1)", tiny_model(), samples)
    else:
        from enclaveq.bundled_model import SAMPLE_DOCUMENTS, magika_model

        m = magika_model()
        samples = [{m.input_name: m.features(doc)} for doc in SAMPLE_DOCUMENTS.values()]
        work = Workload("magika (int32 [1,2048] -> scores)", m.path.read_bytes(), samples)
    work.request_bytes, work.reply_bytes = _sealed_sizes(work)
    return work


def _sealed_sizes(work: Workload) -> tuple[int, int]:
    """Sizes of a real sealed enclaveq request and result for this workload, for the baseline."""
    import onnxruntime as ort

    from protocol import bodies, crypto
    from protocol.envelope import ProducerSession, seal_result

    pool_key = crypto.public_bytes(crypto.generate_private_key())
    session = ProducerSession(pool="bench-00000000", epoch=1, pool_public_key=pool_key)
    header = session.header("job", job_id=uuid.uuid4().hex, deadline_ms=int(time.time() * 1000) + 120_000,
                            reply_to="enclaveq.reply.producer-" + "0" * 16, content_type=bodies.TENSORS,
                            model_id="0" * 64)
    request = session.seal(header, bodies.encode_job(work.samples[0]))
    sess = ort.InferenceSession(work.model_bytes, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outputs = dict(zip(names, sess.run(names, work.samples[0])))
    result = seal_result(os.urandom(32), header, "ok", bodies.TENSORS, bodies.encode_tensors_body(outputs))
    return len(request), len(result)


# -- profiling -------------------------------------------------------------------------------
# The server process is wrapped in cProfile that SIGUSR1 starts and SIGUSR2 stops and dumps,
# so that only the timed phase is profiled. Used for the worker (around enclaveq.cli:main,
# the real CLI entry point) and for the baseline responder.
_CPROFILE_WRAPPER = r"""
import cProfile, signal, sys
prefix = sys.argv[1]
target = sys.argv[2]
sys.argv = sys.argv[3:]
state = {"prof": None, "n": 0}
def start(*_):
    state["prof"] = cProfile.Profile()
    state["prof"].enable()
def stop(*_):
    prof = state["prof"]
    if prof is not None:
        prof.disable()
        prof.dump_stats(f"{prefix}.{state['n']}.prof")
        state["n"] += 1
        state["prof"] = None
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, stop)
if target == "enclaveq":
    from enclaveq.cli import main
    try:
        main()
    except SystemExit:
        pass
else:
    import runpy
    runpy.run_module(target, run_name="__main__")
"""


def _pyspy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


class Profiler:
    """Profiles one process (the server via pid, or this process) over one timed phase."""

    def __init__(self, tool: str, label: str, out: Path, pid: int, *, own: bool) -> None:
        self.tool, self.label, self.out, self.pid, self.own = tool, label, out, pid, own
        self._spy: subprocess.Popen | None = None
        self._prof: cProfile.Profile | None = None
        self._n_before = 0

    async def start(self) -> None:
        if self.tool == "py-spy":
            spy = _pyspy()
            assert spy is not None, "run() checks that py-spy is installed"
            self._spy = subprocess.Popen(
                [spy, "record", "--pid", str(self.pid), "--rate", "250", "--format", "raw", "--nonblocking",
                 "--output", str(self.out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
            await asyncio.sleep(0.5)  # let it attach before the phase starts
        elif self.own:
            self._prof = cProfile.Profile()
            self._prof.enable()
        else:
            os.kill(self.pid, signal.SIGUSR1)
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.tool == "py-spy" and self._spy is not None:
            self._spy.send_signal(signal.SIGINT)
            try:
                await asyncio.to_thread(self._spy.wait, 30)
            except subprocess.TimeoutExpired:
                self._spy.kill()
        elif self.own and self._prof is not None:
            self._prof.disable()
            self._prof.dump_stats(str(self.out))
        elif not self.own:
            os.kill(self.pid, signal.SIGUSR2)
            for _ in range(100):  # the dump takes a moment
                if self.out.exists():
                    break
                await asyncio.sleep(0.05)

    def report(self, top: int) -> tuple[list[tuple[str, float, float]], dict[str, float], str]:
        """(rows of (function, self %, inclusive %), self % by area, unit note)."""
        if self.tool == "py-spy":
            return _pyspy_report(self.out, top)
        return _cprofile_report(self.out, top)


# Areas to sum self time into, matched against file paths (and builtin names for cProfile).
_AREAS = [
    ("crypto (AES-GCM/HKDF/HPKE)", ("protocol/crypto", "cryptography/", "AESGCM", "HKDF", "encrypt", "decrypt",
                                     "derive", "hpke", "_rust")),
    ("msgpack + protocol parsing", ("protocol/", "msgpack", "packb", "unpackb")),
    ("onnxruntime inference", ("onnxruntime", "InferenceSession", "models.py")),
    ("numpy", ("numpy",)),
    ("enclaveq worker", ("enclave_worker/",)),
    ("enclaveq producer SDK", ("producer_sdk/",)),
    ("enclaveq broker adapter", ("broker_adapters/",)),
    ("metrics (prometheus_client)", ("prometheus_client",)),
    ("AMQP client (aio-pika/aiormq/pamqp)", ("aio_pika", "aiormq", "pamqp", "yarl", "multidict")),
    ("MQTT client (aiomqtt/paho)", ("aiomqtt", "paho/")),
    ("threads (to_thread, executor)", ("concurrent/futures", "threading.py", "to_thread", "threads.py")),
    ("socket I/O", ("sock_send", "sock_recv", "'send' of", "'recv' of", "_SelectorSocketTransport",
                    "selector_events", "sslproto", "transports")),
    ("idle wait (epoll)", ("poll' of 'select", "epoll", "selectors.py")),
    ("asyncio machinery", ("asyncio/", "_asyncio", "Future", "Task", "call_soon")),
    ("logging", ("logging/",)),
    ("uuid/os.urandom", ("uuid.py", "urandom")),
    ("bench harness", ("bench/",)),
]


def _area(key: str) -> str:
    for area, needles in _AREAS:
        if any(n in key for n in needles):
            return area
    return "other"


def _short(path_func: str) -> str:
    for marker in ("site-packages/", "/lib/python3", str(Path(__file__).resolve().parents[1]) + "/"):
        if marker in path_func:
            path_func = path_func.split(marker, 1)[1]
            if marker == "/lib/python3":
                path_func = path_func.split("/", 1)[1] if "/" in path_func else path_func
    return path_func


def _cprofile_report(path: Path, top: int):
    stats = pstats.Stats(str(path))
    raw = stats.stats  # type: ignore[attr-defined]  # not in typeshed's pstats.Stats
    total = sum(v[2] for v in raw.values()) or 1e-9  # sum of self times
    rows = []
    by_area: dict[str, float] = defaultdict(float)
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in raw.items():
        key = f"{func} ({_short(filename)}:{line})" if filename != "~" else func
        by_area[_area(key if filename == "~" else filename + " " + func)] += tt
        rows.append((key, 100 * tt / total, 100 * ct / total, nc))
    rows.sort(key=lambda r: -r[1])
    return ([(k, s, c) for k, s, c, _ in rows[:top]],
            {a: 100 * t / total for a, t in sorted(by_area.items(), key=lambda kv: -kv[1])},
            f"cProfile, main thread only, {total:.2f}s of self time; inclusive % can exceed 100 (recursion, coroutines)")


def _pyspy_report(path: Path, top: int):
    self_counts: dict[str, int] = defaultdict(int)
    incl_counts: dict[str, int] = defaultdict(int)
    by_area: dict[str, int] = defaultdict(int)
    total = 0
    if not path.exists():
        return [], {}, "py-spy wrote no samples"
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame_key(f) for f in stack.split(";")]
        self_counts[frames[-1]] += n
        for f in set(frames):
            incl_counts[f] += n
        # Attribute the sample to the innermost frame that belongs to a known area, so that
        # time in stdlib helpers counts toward whoever called them.
        area = "other"
        for f in reversed(frames):
            area = _area(f)
            if area not in ("other", "asyncio machinery"):
                break
        by_area[area] += n
    total = total or 1
    rows = sorted(self_counts, key=lambda k: -self_counts[k])[:top]
    return ([(k, 100 * self_counts[k] / total, 100 * incl_counts[k] / total) for k in rows],
            {a: 100 * c / total for a, c in sorted(by_area.items(), key=lambda kv: -kv[1])},
            f"py-spy, all non-idle threads, {total} samples at 250 Hz; area = innermost known frame")


def _frame_key(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py path)" without the line number
    name, _, loc = frame.partition(" (")
    loc = loc.rstrip(")")
    file = loc.rsplit(":", 1)[0]
    return f"{name} ({_short(file)})"


# -- the baseline: plain aio-pika ------------------------------------------------------------
async def _responder_main(url: str, queue: str, prefetch: int, reply_bytes: int) -> None:
    """The baseline's answering process: consume, reply with confirm, then ack."""
    import aio_pika

    reply_body = os.urandom(reply_bytes)
    conn = await aio_pika.connect_robust(url)
    publish = await conn.channel(publisher_confirms=True, on_return_raises=True)
    consume = await conn.channel(publisher_confirms=False)
    await consume.set_qos(prefetch_count=prefetch)
    q = await consume.declare_queue(queue, passive=True)
    exchange = publish.default_exchange

    async def on_message(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        await exchange.publish(
            aio_pika.Message(reply_body, correlation_id=msg.correlation_id,
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=msg.reply_to or "", mandatory=True)
        await msg.ack()

    await q.consume(on_message, no_ack=False)
    await serve_until_signalled(conn)


async def serve_until_signalled(conn) -> None:
    """A baseline responder process: say "ready", serve until SIGTERM or SIGINT, disconnect."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await conn.close()


async def _start_responder(module: str, args: list[str], tmp: Path, profile_tool: str | None) -> subprocess.Popen:
    """Run a baseline responder (``python -m module args``) and wait for its "ready" line."""
    if profile_tool == "cprofile":
        cmd = [sys.executable, "-c", _CPROFILE_WRAPPER, str(tmp / "responder"), module, "x", *args]
    else:
        cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(tmp / "responder.log", "wb"),
                            start_new_session=True, cwd=str(Path(__file__).resolve().parent.parent))
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
    if b"ready" not in line:
        raise RuntimeError("the baseline responder did not start:\n" + (tmp / "responder.log").read_text())
    return proc


class Baseline:
    def __init__(self, url: str, run_id: str, workload: Workload, tmp: Path, profile_tool: str | None,
                 plain_queues: bool = False, queue_type: str = "quorum") -> None:
        self.url, self.workload, self.tmp, self.profile_tool = url, workload, tmp, profile_tool
        self.plain_queues = plain_queues
        # "classic": the same persistent messages, confirms and ack-after-confirm on durable classic
        # queues, which deliver a message before it is on disk (a quorum queue delivers it only once
        # its Raft log is written and synced): it tells what the quorum queues cost, for diagnosis.
        # "classic-reply": the quorum job queue DESIGN §5 asks for, a durable classic reply queue
        # (DESIGN asks only for a durable one): what classic reply queues would save.
        if queue_type not in ("quorum", "classic", "classic-reply"):
            raise ValueError(f"queue_type must be quorum, classic or classic-reply, not {queue_type!r}")
        self.queue_type = queue_type
        self.jobs_queue = f"bench.{run_id}.jobs"
        self.reply_queue = f"bench.{run_id}.reply"
        self.dead_queue = f"bench.{run_id}.dead"
        self.dlx = f"bench.{run_id}.dlx"
        self.proc: subprocess.Popen | None = None
        self._conn: Any = None
        self._pending: dict[str, asyncio.Future] = {}
        self._body = os.urandom(workload.request_bytes)
        self._publish: Any = None
        self._consume: Any = None

    async def start(self) -> None:
        import aio_pika

        from broker_adapters import PoolSettings
        from broker_adapters._common import DEAD_DELIVERY_LIMIT, REPLY_DELIVERY_LIMIT

        self._conn = await aio_pika.connect_robust(self.url)
        admin = await self._conn.channel()
        # The very topology enclaveq's AMQP adapter declares for a pool and a reply queue:
        # durable quorum queues, the jobs queue with a delivery limit and at-least-once
        # dead-lettering to a fanout exchange bound to a quorum dead-letter queue.
        jobs_args: dict[str, Any] = {"x-queue-type": "quorum", "x-delivery-limit": PoolSettings().delivery_limit - 1}
        reply_args: dict[str, Any] = {"x-queue-type": "quorum", "x-delivery-limit": REPLY_DELIVERY_LIMIT - 1}
        if self.queue_type == "classic":  # delivery limits and at-least-once dead-lettering are quorum-only
            jobs_args = reply_args = {"x-queue-type": "classic"}
        if self.queue_type == "classic-reply":
            reply_args = {"x-queue-type": "classic"}
        if self.queue_type != "classic" and not self.plain_queues:
            dlx = await admin.declare_exchange(self.dlx, aio_pika.ExchangeType.FANOUT, durable=True)
            dead = await admin.declare_queue(self.dead_queue, durable=True, arguments={
                "x-queue-type": "quorum", "x-delivery-limit": DEAD_DELIVERY_LIMIT - 1})
            await dead.bind(dlx, "")
            jobs_args.update({"x-dead-letter-exchange": self.dlx, "x-dead-letter-strategy": "at-least-once",
                              "x-overflow": "reject-publish"})
        await admin.declare_queue(self.jobs_queue, durable=True, arguments=jobs_args)
        await admin.declare_queue(self.reply_queue, durable=True, arguments=reply_args)
        await admin.close()
        args = ["--_responder", "--broker", self.url, "--_queue", self.jobs_queue,
                "--_prefetch", str(WORKER_PREFETCH), "--_reply-bytes", str(self.workload.reply_bytes)]
        self.proc = await _start_responder("bench.request_reply", args, self.tmp, self.profile_tool)
        self._publish = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
        self._consume = await self._conn.channel(publisher_confirms=False)
        await self._consume.set_qos(prefetch_count=CLIENT_REPLY_PREFETCH)
        reply_q = await self._consume.declare_queue(self.reply_queue, passive=True)
        await reply_q.consume(self._on_reply, no_ack=False)

    async def _on_reply(self, msg) -> None:
        future = self._pending.get(msg.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(msg.body)
        await msg.ack()

    async def batch(self, n: int, concurrency: int) -> tuple[float, list[float], int]:
        import aio_pika

        loop = asyncio.get_running_loop()
        exchange = self._publish.default_exchange
        latencies: list[float] = []
        remaining = n
        errors = 0

        async def lane() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                cid = uuid.uuid4().hex
                future = loop.create_future()
                self._pending[cid] = future
                t0 = time.perf_counter()
                try:
                    await exchange.publish(
                        aio_pika.Message(self._body, correlation_id=cid, message_id=cid, reply_to=self.reply_queue,
                                         delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=self.jobs_queue, mandatory=True)
                    await asyncio.wait_for(future, 120)
                    latencies.append(1000 * (time.perf_counter() - t0))
                except Exception:
                    errors += 1
                finally:
                    self._pending.pop(cid, None)

        started = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies, errors

    async def cleanup(self) -> None:
        await _stop_process(self.proc, "baseline responder")
        if self._conn is not None:
            with contextlib.suppress(Exception):
                if self._consume is not None:
                    await self._consume.close()  # our reply consumer first: no "cancelled by the broker"
            with contextlib.suppress(Exception):
                ch = await self._conn.channel()
                for q in (self.jobs_queue, self.reply_queue, self.dead_queue):
                    await ch.queue_delete(q)
                await ch.exchange_delete(self.dlx)
                await ch.close()
            with contextlib.suppress(Exception):
                await self._conn.close()


class MqttBaseline:
    """The baseline over MQTT 5: plain aiomqtt, QoS 1 both ways (bench/mqtt_baseline.py)."""

    def __init__(self, url: str, run_id: str, workload: Workload, tmp: Path, profile_tool: str | None) -> None:
        self.url, self.run_id, self.workload, self.tmp, self.profile_tool = url, run_id, workload, tmp, profile_tool
        self.proc: subprocess.Popen | None = None
        self._client: Any = None

    async def start(self) -> None:
        from bench.mqtt_baseline import BaselineClient

        args = ["--_responder", "--broker", self.url, "--_run-id", self.run_id,
                "--_prefetch", str(WORKER_PREFETCH), "--_reply-bytes", str(self.workload.reply_bytes)]
        self.proc = await _start_responder("bench.mqtt_baseline", args, self.tmp, self.profile_tool)
        self._client = BaselineClient(self.url, self.run_id, self.workload.request_bytes, CLIENT_REPLY_PREFETCH)
        await self._client.connect()

    async def batch(self, n: int, concurrency: int) -> tuple[float, list[float], int]:
        return await self._client.batch(n, concurrency)

    async def cleanup(self) -> None:
        from bench.mqtt_baseline import end_sessions

        await _stop_process(self.proc, "baseline responder")
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
        try:
            await end_sessions(self.url, self.run_id)  # after the responder: ending a live session kicks it
        except Exception as exc:
            print(f"could not end the baseline's MQTT sessions: {type(exc).__name__}: {exc}", file=sys.stderr)


# -- enclaveq ---------------------------------------------------------------------------------
class _Stamped(Mapping):
    """One job's inputs; notes when the SDK starts sealing them (after its window admitted the
    job), which is where this job's latency starts."""

    __slots__ = ("_inputs", "_stamps", "_index")

    def __init__(self, inputs: dict, stamps: dict, index: int) -> None:
        self._inputs, self._stamps, self._index = inputs, stamps, index

    def __getitem__(self, key):
        return self._inputs[key]

    def __iter__(self):
        return iter(self._inputs)

    def __len__(self) -> int:
        return len(self._inputs)

    def items(self):
        self._stamps.setdefault(self._index, time.perf_counter())
        return self._inputs.items()


def _enclaveq_exe() -> str:
    candidate = Path(sys.executable).parent / "enclaveq"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("enclaveq")
    if found:
        return found
    sys.exit("the `enclaveq` command is not installed in this environment; run: .venv/bin/pip install -e '.[test]'")


class Enclaveq:
    def __init__(self, url: str, run_id: str, workload: Workload, tmp: Path, profile_tool: str | None,
                 workers: int = 1) -> None:
        self.url, self.workload, self.tmp, self.profile_tool = url, workload, tmp, profile_tool
        self.workers = workers
        self.extra_procs: list[subprocess.Popen] = []
        self.pool = f"bench-{run_id}"
        self.sim_dir = tmp / "sim"
        self.policy = tmp / "policy.toml"
        self.proc: subprocess.Popen | None = None
        self.client: Any = None
        self.model_id: str | None = None
        self.reply_name: str | None = None

    async def start(self) -> None:
        from producer_sdk import AsyncClient

        exe = _enclaveq_exe()
        for cmd in ([exe, "sim", "init", "--dir", str(self.sim_dir)],
                    [exe, "policy", "init", "--sim-dir", str(self.sim_dir), "--out", str(self.policy)]):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[1:3])} failed: {done.stderr.strip()}")
        args = ["worker", "--broker", self.url, "--pool", self.pool, "--sim-dir", str(self.sim_dir)]
        if self.profile_tool == "cprofile":
            cmd = [sys.executable, "-c", _CPROFILE_WRAPPER, str(self.tmp / "worker"), "enclaveq", "enclaveq", *args]
        else:
            cmd = [exe, *args]
        self.proc = await self._start_worker(cmd, self.tmp / "worker.log")
        for index in range(1, self.workers):
            # Further workers join the pool by mutual attestation, each with its own sealed state.
            extra = [exe, *args, "--state-dir", str(self.tmp / f"state-{index}")]
            self.extra_procs.append(await self._start_worker(extra, self.tmp / f"worker-{index}.log"))
        self.client = AsyncClient(self.url, self.pool, self.policy, timeout=120)
        self.reply_name = self.client.name
        await self.client.connect()
        self.model_id = await self.client.upload_model(self.workload.model_bytes)

    async def _start_worker(self, cmd: list[str], log_path: Path) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"), start_new_session=True)
        deadline = time.monotonic() + 60
        while b"ready; send SIGTERM" not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{log_path.read_text()[-3000:]}")
            await asyncio.sleep(0.1)
        return proc

    async def batch(self, n: int, concurrency: int) -> tuple[float, list[float], int]:
        return await timed_submit(self.client, self.model_id, self.workload.inputs(n), max_in_flight=concurrency)

    async def cleanup(self) -> None:
        if self.client is not None:
            await asyncio.sleep(0.1)  # let cancelled jobs of an interrupted batch unwind first
            with contextlib.suppress(Exception):
                await self.client.close()  # an ephemeral client deletes its reply queue
        for proc in self.extra_procs:
            await _stop_process(proc, "worker")
        await _stop_process(self.proc, "worker")
        await delete_pool_quietly(self.url, self.pool, self.reply_name)


async def delete_pool_quietly(url: str, pool: str, reply_name: str | None) -> None:
    """Remove what a benchmark run declared; a failure is reported, never raised."""
    from broker_adapters import open_broker  # imported late, like every enclaveq import here

    broker = open_broker(url)
    try:
        await broker.connect()
        with contextlib.suppress(Exception):
            await broker.delete_pool(pool)
        if reply_name:
            with contextlib.suppress(Exception):
                await broker.delete_reply_queue(reply_name)
    except Exception as exc:
        print(f"could not delete pool {pool!r}: {exc}", file=sys.stderr)
    finally:
        with contextlib.suppress(Exception):
            await broker.close()


async def _stop_process(proc: subprocess.Popen | None, what: str) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.to_thread(proc.wait, 30)
    except subprocess.TimeoutExpired:
        print(f"{what} did not stop within 30 s of SIGTERM; killing it", file=sys.stderr)
        proc.kill()
        proc.wait()


# -- the run --------------------------------------------------------------------------------
async def _phase(system, n: int, warmup: int, concurrency: int, name: str, meter: _CpuMeter,
                 profile: tuple[str, Path, int] | None, profiles: list) -> PhaseResult:
    if warmup:
        await system.batch(warmup, concurrency)
    profilers = []
    if profile:
        tool, tmp, server_pid = profile
        ext = "txt" if tool == "py-spy" else "prof"
        server_label = "enclaveq worker" if name == "enclaveq" else "baseline responder"
        client_label = "enclaveq producer" if name == "enclaveq" else "baseline client"
        index = len(profiles)
        profilers = [
            Profiler(tool, f"{server_label} (C={concurrency})",
                     tmp / (f"{'worker' if name == 'enclaveq' else 'responder'}.{_server_profile_index(profiles, name)}.{ext}"
                            if tool == "cprofile" else f"server-{index}.{ext}"), server_pid, own=False),
            Profiler(tool, f"{client_label} (C={concurrency})", tmp / f"client-{index}.{ext}", os.getpid(), own=True),
        ]
        for p in profilers:
            await p.start()
    before = meter.read()
    seconds, latencies, errors = await system.batch(n, concurrency)
    after = meter.read()
    for p in profilers:
        await p.stop()
    profiles.extend(profilers)
    client, server, broker, machine = _CpuMeter.diff(before, after)
    return PhaseResult(name, concurrency, n - errors, seconds, latencies, errors, client, server, broker, machine,
                       profiled=bool(profile))


def _server_profile_index(profiles: list, name: str) -> int:
    label = "enclaveq worker" if name == "enclaveq" else "baseline responder"
    return sum(1 for p in profiles if p.label.startswith(label))



async def timed_submit(client: Any, model_id: str, inputs: Any, *, kept: Callable[[Any], None] | None = None,
                       **options: Any) -> tuple[float, list[float], int]:
    """``client.submit(model_id, inputs, **options)`` timed: (seconds, per-job latencies in ms from
    the moment the SDK took each job, errors). The first error is printed. ``kept(result)``, if
    given, is called with each successful result before its latency is taken (e.g. to write it)."""
    stamps: dict[int, float] = {}
    latencies: list[float] = []
    errors = 0
    batch = (_Stamped(job, stamps, i) for i, job in enumerate(inputs))
    started = time.perf_counter()
    async with contextlib.aclosing(client.submit(model_id, batch, **options)) as results:
        async for result in results:
            if result.ok and kept is not None:
                kept(result)
            now = time.perf_counter()
            if result.ok:
                latencies.append(1000 * (now - stamps.pop(result.index)))
            else:
                errors += 1
                if errors == 1:
                    print(f"first enclaveq error: {result.error}", file=sys.stderr)
    return time.perf_counter() - started, latencies, errors


def cancel_on_sigterm() -> None:
    """A SIGTERM (e.g. from `timeout`) cancels the running benchmark, which then cleans up as
    after Ctrl-C: processes stopped, queues and pools deleted."""
    main_task = asyncio.current_task()
    assert main_task is not None
    with contextlib.suppress(NotImplementedError, RuntimeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)


def warn_if_disturbed(console: Any, results: list[PhaseResult]) -> None:
    """Say so when other programs took a noticeable share of the cores during a phase."""
    busy = [r.other_cores for r in results if r.other_cores is not None]
    if busy and max(busy) > 0.15:
        console.print(f"[yellow]other programs used up to {max(busy):.2f} of {os.cpu_count()} cores during a phase: "
                      "the numbers are disturbed; rerun on a quiet machine or use --repeat[/yellow]")


def print_profiles(console: Any, profiles: list[Profiler], top: int) -> None:
    """Each profile's top functions by self time, then its time by area."""
    from rich.table import Table

    for p in profiles:
        rows, areas, note = p.report(top)
        t = Table(title=f"{p.label}: top {top} functions by self time ({note})", title_justify="left")
        t.add_column("function")
        t.add_column("self %", justify="right")
        t.add_column("incl %", justify="right")
        for key, self_pct, incl_pct in rows:
            t.add_row(key[:110], f"{self_pct:.1f}", f"{incl_pct:.1f}")
        console.print(t)
        a = Table(title=f"{p.label}: time by area", title_justify="left")
        a.add_column("area")
        a.add_column("%", justify="right")
        for area, pct in areas.items():
            if pct >= 0.5:
                a.add_row(area, f"{pct:.1f}")
        console.print(a)

def _median(values):
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def _pairs(results: list[PhaseResult]) -> dict[int, list[tuple[PhaseResult, PhaseResult]]]:
    """(baseline, enclaveq) phases of the same round and concurrency, ran back to back."""
    out: dict[int, list] = defaultdict(list)
    index = {(r.concurrency, r.round, r.system): r for r in results}
    for (c, rnd, system), r in sorted(index.items()):
        if system == "baseline" and (c, rnd, "enclaveq") in index:
            out[c].append((r, index[(c, rnd, "enclaveq")]))
    return out


def _ratios(results: list[PhaseResult]) -> dict[int, float]:
    """Per concurrency: the median over rounds of enclaveq/baseline jobs/s."""
    return {c: _median([e.jobs_per_s / b.jobs_per_s for b, e in pairs if b.jobs_per_s])
            for c, pairs in _pairs(results).items()}


def _table(results: list[PhaseResult], workload: Workload, args):
    from rich.table import Table

    rounds = max((r.round for r in results), default=0) + 1
    over = ("Mosquitto (MQTT 5, QoS 1; baseline plain aiomqtt)" if _is_mqtt(args.broker) else "RabbitMQ")
    title = (f"request/reply over {over}: {args.jobs} timed jobs (+{args.warmup} warm-up) per phase"
             + (f", median of {rounds} rounds" if rounds > 1 else "")
             + f"; model {workload.name}; request {workload.request_bytes} B, reply {workload.reply_bytes} B")
    table = Table(title=title, title_justify="left")
    for col in ("system", "C", "jobs/s", "p50 ms", "p99 ms", "errors", "CPU ms/job: client", "server", "broker",
                "other load (cores)", "enclaveq/baseline"):
        table.add_column(col, justify="left" if col == "system" else "right")
    fmt = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    ratios = _ratios(results)
    for c in sorted({r.concurrency for r in results}):
        for name in ("baseline", "enclaveq"):
            rs = [r for r in results if r.concurrency == c and r.system == name]
            if not rs:
                continue
            ratio = ""
            if name == "enclaveq" and ratios.get(c) is not None:
                value = ratios[c]
                colour = "green" if value >= 0.80 else "red"
                ratio = f"[{colour}]{value:.2f}[/{colour}]"
                if rounds > 1:
                    each = [e.jobs_per_s / b.jobs_per_s for b, e in _pairs(results)[c]]
                    ratio += f" ({min(each):.2f}-{max(each):.2f})"
            table.add_row(name, str(c), fmt(_median([r.jobs_per_s for r in rs]), 0),
                          fmt(_median([r.pct(50) for r in rs]), 1), fmt(_median([r.pct(99) for r in rs]), 1),
                          str(sum(r.errors for r in rs)),
                          fmt(_median([r.cpu_ms_per_job("client") for r in rs])),
                          fmt(_median([r.cpu_ms_per_job("server") for r in rs])),
                          fmt(_median([r.cpu_ms_per_job("broker") for r in rs])),
                          fmt(_median([r.other_cores for r in rs])), ratio)
        table.add_section()
    return table


async def run(args) -> int:
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=150)
    concurrencies = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    profile_tool = None
    if args.profile:
        profile_tool = args.profiler or ("py-spy" if _pyspy() else "cprofile")
        if profile_tool == "py-spy" and not _pyspy():
            sys.exit("py-spy is not installed: `.venv/bin/pip install py-spy`, or use --profiler cprofile")
    run_id = uuid.uuid4().hex[:10]
    workload = make_workload(args.model)
    mqtt = _is_mqtt(args.broker)
    if mqtt:
        from broker_adapters.mqtt_url import parse_mqtt_url

        endpoint = parse_mqtt_url(args.broker)
        broker_pid = _find_listener_pid(endpoint.host, endpoint.port)
    else:
        broker_pid = _find_broker_pid()
    cancel_on_sigterm()
    console.print(f"run {run_id}: broker {redact_url(args.broker)}, {os.cpu_count()} CPUs, python {platform.python_version()}"
                  f", load average {os.getloadavg()[0]:.2f}, {'Mosquitto' if mqtt else 'RabbitMQ node'} pid "
                  f"{broker_pid or 'not local'}"
                  + (f", profiling with {profile_tool}" if profile_tool else ""))
    results: list[PhaseResult] = []
    profiles: list[Profiler] = []
    with tempfile.TemporaryDirectory(prefix="enclaveq-bench-") as tmpname:
        tmp = Path(tmpname)
        baseline: Baseline | MqttBaseline
        if mqtt:
            baseline = MqttBaseline(args.broker, run_id, workload, tmp, profile_tool)
        else:
            baseline = Baseline(args.broker, run_id, workload, tmp, profile_tool, args.baseline_plain_queues)
        enclaveq = Enclaveq(args.broker, run_id, workload, tmp, profile_tool, workers=args.workers)
        try:
            await baseline.start()
            await enclaveq.start()
            assert baseline.proc is not None and enclaveq.proc is not None and enclaveq.model_id is not None
            console.print(f"baseline responder pid {baseline.proc.pid}, enclaveq worker pid {enclaveq.proc.pid} "
                          f"(pool {enclaveq.pool}, model {enclaveq.model_id[:12]}…)")
            systems = {"baseline": (baseline, baseline.proc.pid), "enclaveq": (enclaveq, enclaveq.proc.pid)}
            for rnd in range(args.repeat):
                for c in concurrencies:
                    # Alternate which system goes first, so that a slow drift of the machine
                    # does not always favour the same one.
                    order = ["baseline", "enclaveq"] if (rnd % 2 == 0) != args.reverse else ["enclaveq", "baseline"]
                    for name in order:
                        if args.only and name != args.only:
                            continue
                        system, pid = systems[name]
                        extra = tuple(p.pid for p in enclaveq.extra_procs) if name == "enclaveq" else ()
                        meter = _CpuMeter(pid, broker_pid, extra)
                        with console.status(f"round {rnd + 1}/{args.repeat}: {name}, C={c}: "
                                            f"{args.warmup} warm-up + {args.jobs} timed jobs"):
                            r = await _phase(system, args.jobs, args.warmup, c, name, meter,
                                             (profile_tool, tmp, pid) if profile_tool else None, profiles)
                        r.round = rnd
                        results.append(r)
                        other = "" if r.other_cores is None else f"  other load {r.other_cores:.2f} cores"
                        console.print(f"  round {rnd + 1} {name:9} C={c:<4} {r.jobs_per_s:8.0f} jobs/s  "
                                      f"p50 {r.pct(50):7.1f} ms  p99 {r.pct(99):7.1f} ms  errors {r.errors}{other}")
        finally:
            with console.status("cleaning up: stopping worker and responder, deleting queues"):
                await enclaveq.cleanup()
                await baseline.cleanup()
        console.print(_table(results, workload, args))
        ratios = _ratios(results)
        for c, value in ratios.items():
            verdict = "[green]meets[/green]" if value >= 0.80 else "[red]below[/red]"
            console.print(f"C={c}: enclaveq/baseline = {value:.2f} ({verdict} the 0.80 target)")
        warn_if_disturbed(console, results)
        if profile_tool:
            console.print("[yellow]profiled run: throughput above is lowered by the profiler[/yellow]")
            print_profiles(console, profiles, args.top)
            if args.keep_profiles:
                dest = Path(args.keep_profiles)
                dest.mkdir(parents=True, exist_ok=True)
                for p in profiles:
                    if p.out.exists():
                        shutil.copy(p.out, dest / p.out.name)
                console.print(f"raw profiles copied to {dest}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "argv": sys.argv, "cpus": os.cpu_count(), "python": platform.python_version(), "model": workload.name,
            "request_bytes": workload.request_bytes, "reply_bytes": workload.reply_bytes,
            "results": [r.summary() for r in results], "ratios": {str(c): round(v, 3) for c, v in ratios.items()},
        }, indent=2))
    return 0


def run_cleaning_up(main_coroutine: Coroutine[Any, Any, int]) -> int:
    """A bench's exit code; Ctrl-C exits 130 after the bench's own clean-up (queues, processes)."""
    try:
        return asyncio.run(main_coroutine)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; queues and processes were cleaned up", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.request_reply", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="timed jobs per system and concurrency (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="untimed warm-up jobs before each phase (default 200)")
    parser.add_argument("--broker", default=os.environ.get("ENCLAVEQ_BROKER", DEFAULT_BROKER),
                        help="AMQP URL (default amqp://guest:guest@127.0.0.1:5672/), or an mqtt:// URL "
                             "(e.g. mqtt://127.0.0.1:1883/) to compare against plain aiomqtt over MQTT 5")
    parser.add_argument("--concurrency", default="16,64",
                        help="requests in flight; a comma-separated list runs each (default 16,64)")
    parser.add_argument("--model", choices=("tiny", "magika"), default="tiny")
    parser.add_argument("--profile", action="store_true", help="profile server and client during the timed phases")
    parser.add_argument("--profiler", choices=("py-spy", "cprofile"), default=None,
                        help="default: py-spy if installed, else cProfile")
    parser.add_argument("--top", type=int, default=20, help="functions shown per profile (default 20)")
    parser.add_argument("--keep-profiles", metavar="DIR", help="copy raw profile files to DIR")
    parser.add_argument("--baseline-plain-queues", action="store_true",
                        help="baseline jobs queue without enclaveq's dead-lettering arguments (diagnosis only)")
    parser.add_argument("--only", choices=("baseline", "enclaveq"), help="run one system only")
    parser.add_argument("--workers", type=int, default=1,
                        help="enclaveq workers sharing the pool (joined by mutual attestation; default 1). "
                             "The server CPU column then sums all of them")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of (baseline, enclaveq) phases per C, alternating which goes first; "
                             "the table shows medians, the ratio is the median of per-round ratios (default 1)")
    parser.add_argument("--reverse", action="store_true", help="run enclaveq first in the first round")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    # The baseline responder runs this module again in a child process with these.
    parser.add_argument("--_responder", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_queue", help=argparse.SUPPRESS)
    parser.add_argument("--_prefetch", type=int, default=WORKER_PREFETCH, help=argparse.SUPPRESS)
    parser.add_argument("--_reply-bytes", dest="_reply_bytes", type=int, default=256, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._responder:
        asyncio.run(_responder_main(args.broker, args._queue, args._prefetch, args._reply_bytes))
        return 0
    if args.jobs < 1 or args.warmup < 0 or args.repeat < 1:
        parser.error("--jobs and --repeat must be positive and --warmup non-negative")
    if args.baseline_plain_queues and _is_mqtt(args.broker):
        parser.error("--baseline-plain-queues applies to the AMQP baseline only")
    return run_cleaning_up(run(args))


if __name__ == "__main__":
    sys.exit(main())
