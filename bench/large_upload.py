"""Large model upload: enclaveq's sealed, chunked upload against plain aio-pika, in one run.

    python -m bench.large_upload [--mb N] [--broker URL] [--repeat R] [--workers W] [--only SYSTEM]
                                 [--window K] [--json PATH]

One ONNX model of ``N`` MiB (default 300: a float32 embedding table looked up by Gather, built
here with onnx.helper; the bytes do not matter to the transfer) moves through the same RabbitMQ
twice, the receiving side in its own process:

baseline
    plain aio-pika, no crypto, no ONNX. This process publishes the model's bytes as 4 MiB
    messages (the SDK's chunk size), transient and mandatory, on a publisher-confirm channel,
    with at most ``--window`` (4, the SDK's) confirms outstanding, to a plain classic queue (the
    kind of queue a worker's control subscription is). A consumer process (prefetch 16, as the
    worker's control consumer) receives them, acks each, and once it holds every message joins
    them into one bytes object and says "done" on a reply queue. Timed: first publish -> "done".
    This is what RabbitMQ itself costs to carry the bytes between two processes.

enclaveq
    ``python -m enclaveq worker`` from this tree, started with the CLI (``sim init``,
    ``policy init``), one attested ``AsyncClient``, and ``upload_model(bytes)``, exactly what ``enclaveq model upload`` runs:
    it seals every chunk (AES-256-GCM), broadcasts each on the pool's control fanout with 4 in
    flight, and waits for each chunk's sealed acknowledgement. On the last chunk the worker
    assembles the model, checks its SHA-256, loads it into ONNX Runtime and seals it to disk
    before it answers. Timed: ``upload_model`` call -> return ("total"), and call -> the
    acknowledgement of every chunk but the one that completed the model ("transfer": the part
    comparable with the baseline). Between rounds the model is deleted so it uploads again.

Reported per system: seconds, MiB/s, the CPU seconds of this process, of the receiving
process(es) and of the RabbitMQ node (when it runs on this machine), the cores every other
program on the machine took meanwhile ("other load": above about 0.15 the run was disturbed),
and the ratios
enclaveq/baseline MiB/s for the transfer and the total. ``--repeat R`` alternates which system
goes first; the table shows medians.

Every queue and pool the run declares has a unique name and is deleted at the end, also after
Ctrl-C; the worker and the consumer are stopped with SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass

from broker_adapters import redact_url
from pathlib import Path

import numpy as np

from .request_reply import (run_cleaning_up, DEFAULT_BROKER, _CpuMeter, _find_broker_pid, _median, _stop_process,
                            delete_pool_quietly, serve_until_signalled)

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
CHUNK_BYTES = 4 * MiB  # producer_sdk.core.MODEL_CHUNK_BYTES
WINDOW = 4  # chunks in flight in AsyncClient.upload_model
CONTROL_PREFETCH = 16  # the AMQP adapter's prefetch for a worker's control subscription


def large_model(mib: int, seed: int = 0) -> bytes:
    """ids int64 [n] -> table[ids] @ proj: a valid ONNX model of about ``mib`` MiB (all but a few
    KiB of it the table's float32 weights)."""
    from onnx import TensorProto, helper, numpy_helper

    dim = 1024
    rows = max(1, mib * MiB // (4 * dim))
    rng = np.random.default_rng(seed)
    table = rng.integers(-8, 9, (rows, dim), dtype=np.int8).astype(np.float32)
    proj = rng.integers(-8, 9, (dim, 4), dtype=np.int8).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
         helper.make_node("MatMul", ["rows", "proj"], ["y"])],
        "bench_large",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        initializer=[numpy_helper.from_array(table, "table"), numpy_helper.from_array(proj, "proj")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    del table
    return model.SerializeToString()


@dataclass
class Phase:
    system: str
    round: int
    bytes: int
    seconds: float
    transfer_seconds: float
    cpu_client_s: float | None
    cpu_server_s: float | None
    cpu_broker_s: float | None
    cpu_machine_s: float | None = None

    @property
    def other_cores(self) -> float | None:
        """Average cores used by everything else on the machine during the phase."""
        if self.cpu_machine_s is None:
            return None
        ours = sum(v for v in (self.cpu_client_s, self.cpu_server_s, self.cpu_broker_s) if v is not None)
        return max(0.0, (self.cpu_machine_s - ours) / self.seconds)

    @property
    def mib_per_s(self) -> float:
        return self.bytes / MiB / self.seconds

    @property
    def transfer_mib_per_s(self) -> float:
        return self.bytes / MiB / self.transfer_seconds

    def summary(self) -> dict:
        return {**asdict(self), "mib_per_s": round(self.mib_per_s, 1),
                "transfer_mib_per_s": round(self.transfer_mib_per_s, 1),
                "other_cores": None if self.other_cores is None else round(self.other_cores, 2)}


# -- the baseline: plain aio-pika ------------------------------------------------------------
async def _consumer_main(url: str, queue: str, done_queue: str, prefetch: int) -> None:
    """The baseline's receiving process: take every chunk, ack it, join them, say "done"."""
    import aio_pika

    conn = await aio_pika.connect_robust(url)
    publish = await conn.channel(publisher_confirms=True)
    consume = await conn.channel(publisher_confirms=False)
    await consume.set_qos(prefetch_count=prefetch)
    q = await consume.declare_queue(queue, passive=True)
    uploads: dict[str, dict[int, bytes]] = {}

    async def on_message(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        upload, index, count = msg.correlation_id, int(msg.headers["index"]), int(msg.headers["count"])
        parts = uploads.setdefault(upload, {})
        parts[index] = msg.body
        await msg.ack()
        if len(parts) == count:
            whole = b"".join(parts[i] for i in range(count))
            del uploads[upload]
            await publish.default_exchange.publish(
                aio_pika.Message(str(len(whole)).encode(), correlation_id=upload), routing_key=done_queue)

    await q.consume(on_message, no_ack=False)
    await serve_until_signalled(conn)


class Baseline:
    def __init__(self, url: str, run_id: str, tmp: Path, window: int) -> None:
        self.url, self.tmp, self.window = url, tmp, window
        self.queue = f"bench.{run_id}.chunks"
        self.done_queue = f"bench.{run_id}.done"
        self.proc: subprocess.Popen | None = None
        self._conn = None
        self._consume = None
        self._done: dict[str, asyncio.Future] = {}

    async def start(self) -> None:
        import aio_pika

        self._conn = await aio_pika.connect_robust(self.url)
        admin = await self._conn.channel()
        await admin.declare_queue(self.queue, durable=False, arguments={"x-queue-type": "classic"})
        await admin.declare_queue(self.done_queue, durable=False)
        await admin.close()
        cmd = [sys.executable, "-m", "bench.large_upload", "--_consumer", "--broker", self.url,
               "--_queue", self.queue, "--_done", self.done_queue]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(self.tmp / "consumer.log", "wb"),
                                     start_new_session=True, cwd=ROOT)
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 30)
        if b"ready" not in line:
            raise RuntimeError("the baseline consumer did not start:\n" + (self.tmp / "consumer.log").read_text())
        self._publish = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
        self._consume = await self._conn.channel()
        done = await self._consume.declare_queue(self.done_queue, passive=True)
        await done.consume(self._on_done, no_ack=True)

    async def _on_done(self, msg) -> None:
        future = self._done.get(msg.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(int(msg.body))

    async def upload(self, data: bytes) -> tuple[float, float]:
        import aio_pika

        upload = uuid.uuid4().hex
        count = -(-len(data) // CHUNK_BYTES)
        finished = self._done[upload] = asyncio.get_running_loop().create_future()
        window = asyncio.Semaphore(self.window)
        exchange = self._publish.default_exchange
        view = memoryview(data)

        async def one(index: int) -> None:
            async with window:
                body = bytes(view[index * CHUNK_BYTES:(index + 1) * CHUNK_BYTES])
                await exchange.publish(aio_pika.Message(body, correlation_id=upload,
                                                        headers={"index": index, "count": count}),
                                       routing_key=self.queue, mandatory=True)

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        received = await asyncio.wait_for(finished, 600)
        seconds = time.perf_counter() - started
        self._done.pop(upload, None)
        if received != len(data):
            raise RuntimeError(f"the baseline consumer assembled {received} bytes, expected {len(data)}")
        return seconds, seconds

    async def cleanup(self) -> None:
        await _stop_process(self.proc, "baseline consumer")
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._consume.close()  # our own consumer first: no "cancelled by the broker"
            with contextlib.suppress(Exception):
                ch = await self._conn.channel()
                for q in (self.queue, self.done_queue):
                    await ch.queue_delete(q)
                await ch.close()
            with contextlib.suppress(Exception):
                await self._conn.close()


# -- enclaveq ---------------------------------------------------------------------------------
class Enclaveq:
    def __init__(self, url: str, run_id: str, tmp: Path, workers: int) -> None:
        self.url, self.tmp, self.workers = url, tmp, workers
        self.pool = f"bench-{run_id}"
        self.procs: list[subprocess.Popen] = []
        self.client = None
        self.reply_name: str | None = None

    async def start(self) -> None:
        from producer_sdk import AsyncClient

        # `python -m enclaveq` from this tree: the worker runs the same code as this process's SDK.
        exe = [sys.executable, "-m", "enclaveq"]
        sim, policy = self.tmp / "sim", self.tmp / "policy.toml"
        for cmd in ([*exe, "sim", "init", "--dir", str(sim)],
                    [*exe, "policy", "init", "--sim-dir", str(sim), "--out", str(policy)]):
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[3:5])} failed: {done.stderr.strip()}")
        for index in range(self.workers):
            # Further workers join the pool by mutual attestation; each has its own sealed state.
            log_path = self.tmp / f"worker-{index}.log"
            proc = subprocess.Popen([*exe, "worker", "--broker", self.url, "--pool", self.pool, "--sim-dir", str(sim),
                                     "--state-dir", str(self.tmp / f"state-{index}")], cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"), start_new_session=True)
            self.procs.append(proc)
            deadline = time.monotonic() + 60
            while b"ready; send SIGTERM" not in log_path.read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the worker did not start:\n{log_path.read_text()[-3000:]}")
                await asyncio.sleep(0.1)
        self.client = AsyncClient(self.url, self.pool, policy, timeout=600)
        self.reply_name = self.client.name
        await self.client.connect()

    async def upload(self, data: bytes) -> tuple[float, float]:
        stamps: list[float] = []
        started = time.perf_counter()
        model_id = await self.client.upload_model(data, progress=lambda done, total: stamps.append(time.perf_counter()))
        seconds = time.perf_counter() - started
        # Every chunk but the completing one is answered as soon as the worker has stored it in
        # memory; the completing one waits for SHA-256, ONNX Runtime and sealed storage.
        transfer = (stamps[-2] if len(stamps) > 1 else stamps[-1]) - started
        await self.client.delete_model(model_id)  # so that the next round uploads it again
        return seconds, transfer

    async def cleanup(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
        for proc in self.procs:
            await _stop_process(proc, "worker")
        await delete_pool_quietly(self.url, self.pool, self.reply_name)


# -- the run --------------------------------------------------------------------------------
def _table(results: list[Phase], args, size: int):
    from rich.table import Table

    rounds = max((r.round for r in results), default=0) + 1
    table = Table(title=f"model upload over RabbitMQ: {size / MiB:.0f} MiB in {-(-size // CHUNK_BYTES)} chunks of "
                        f"4 MiB, {args.workers} worker(s)" + (f", median of {rounds} rounds" if rounds > 1 else ""),
                  title_justify="left")
    for col in ("system", "seconds", "MiB/s", "transfer s", "transfer MiB/s", "CPU s: client", "receiver", "broker",
                "other load (cores)"):
        table.add_column(col, justify="left" if col == "system" else "right")
    fmt = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for name in ("baseline", "enclaveq"):
        rs = [r for r in results if r.system == name]
        if rs:
            table.add_row(name, fmt(_median([r.seconds for r in rs])), fmt(_median([r.mib_per_s for r in rs]), 1),
                          fmt(_median([r.transfer_seconds for r in rs])),
                          fmt(_median([r.transfer_mib_per_s for r in rs]), 1),
                          fmt(_median([r.cpu_client_s for r in rs])), fmt(_median([r.cpu_server_s for r in rs])),
                          fmt(_median([r.cpu_broker_s for r in rs])), fmt(_median([r.other_cores for r in rs])))
    return table


def _ratios(results: list[Phase]) -> dict[str, float | None]:
    pairs = [(b, e) for b in results if b.system == "baseline"
             for e in results if e.system == "enclaveq" and e.round == b.round]
    return {"total": _median([e.mib_per_s / b.mib_per_s for b, e in pairs]),
            "transfer": _median([e.transfer_mib_per_s / b.transfer_mib_per_s for b, e in pairs])}


async def run(args) -> int:
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=150)
    run_id = uuid.uuid4().hex[:10]
    broker_pid = _find_broker_pid()
    main_task = asyncio.current_task()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    built = time.perf_counter()
    data = await asyncio.to_thread(large_model, args.mb)
    console.print(f"run {run_id}: broker {redact_url(args.broker)}, {os.cpu_count()} CPUs, python "
                  f"{platform.python_version()}, load average {os.getloadavg()[0]:.2f}, RabbitMQ node pid "
                  f"{broker_pid or 'not local'}; model {len(data) / MiB:.1f} MiB built in "
                  f"{time.perf_counter() - built:.1f} s")
    results: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="enclaveq-bench-") as tmpname:
        tmp = Path(tmpname)
        baseline = Baseline(args.broker, run_id, tmp, args.window)
        enclaveq = Enclaveq(args.broker, run_id, tmp, args.workers)
        try:
            await baseline.start()
            await enclaveq.start()
            systems = {"baseline": (baseline, (baseline.proc.pid,)),
                       "enclaveq": (enclaveq, tuple(p.pid for p in enclaveq.procs))}
            for rnd in range(args.repeat):
                order = ["baseline", "enclaveq"] if rnd % 2 == 0 else ["enclaveq", "baseline"]
                for name in order:
                    if args.only and name != args.only:
                        continue
                    system, pids = systems[name]
                    meter = _CpuMeter(pids[0], broker_pid, pids[1:])
                    before = meter.read()
                    with console.status(f"round {rnd + 1}/{args.repeat}: {name}: {len(data) / MiB:.0f} MiB"):
                        seconds, transfer = await system.upload(data)
                    client, server, broker, machine = _CpuMeter.diff(before, meter.read())
                    r = Phase(name, rnd, len(data), seconds, transfer, client, server, broker, machine)
                    results.append(r)
                    other = "" if r.other_cores is None else f"  other load {r.other_cores:.2f} cores"
                    console.print(f"  round {rnd + 1} {name:9} {r.seconds:6.2f} s  {r.mib_per_s:6.1f} MiB/s  "
                                  f"(transfer {r.transfer_seconds:6.2f} s, {r.transfer_mib_per_s:6.1f} MiB/s){other}")
        finally:
            with console.status("cleaning up: stopping worker and consumer, deleting queues"):
                await enclaveq.cleanup()
                await baseline.cleanup()
    console.print(_table(results, args, len(data)))
    ratios = _ratios(results)
    busy = [r.other_cores for r in results if r.other_cores is not None]
    if busy and max(busy) > 0.15:
        console.print(f"[yellow]other programs used up to {max(busy):.2f} of {os.cpu_count()} cores during a phase: "
                      "the numbers are disturbed; rerun on a quiet machine or use --repeat[/yellow]")
    if ratios["total"] is not None:
        console.print(f"enclaveq/baseline MiB/s: transfer {ratios['transfer']:.2f}, total (with the worker's "
                      f"SHA-256, ONNX Runtime load and sealed store) {ratios['total']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "argv": sys.argv, "cpus": os.cpu_count(), "python": platform.python_version(),
            "model_bytes": len(data), "workers": args.workers, "results": [r.summary() for r in results],
            "ratios": {k: None if v is None else round(v, 3) for k, v in ratios.items()},
        }, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.large_upload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=300, help="model size in MiB (default 300)")
    parser.add_argument("--broker", default=os.environ.get("ENCLAVEQ_BROKER", DEFAULT_BROKER),
                        help="AMQP URL (default amqp://guest:guest@127.0.0.1:5672/)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of (baseline, enclaveq), alternating which goes first; medians shown (default 1)")
    parser.add_argument("--workers", type=int, default=1,
                        help="enclaveq workers on the pool; every one receives every chunk (default 1)")
    parser.add_argument("--window", type=int, default=WINDOW,
                        help=f"baseline: unconfirmed 4 MiB publishes at once (default {WINDOW}, the SDK's window)")
    parser.add_argument("--only", choices=("baseline", "enclaveq"), help="run one system only")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    # The baseline consumer runs this module again in a child process with these.
    parser.add_argument("--_consumer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_queue", help=argparse.SUPPRESS)
    parser.add_argument("--_done", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._consumer:
        asyncio.run(_consumer_main(args.broker, args._queue, args._done, CONTROL_PREFETCH))
        return 0
    if args.mb < 1 or args.repeat < 1 or args.workers < 1 or args.window < 1:
        parser.error("--mb, --repeat, --workers and --window must be positive")
    return run_cleaning_up(run(args))


if __name__ == "__main__":
    sys.exit(main())
