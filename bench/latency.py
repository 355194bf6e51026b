"""Latency of one job at a time: enclaveq's ``AsyncClient.run`` against plain aio-pika request/reply.

    python -m bench.latency [--jobs N] [--warmup W] [--repeat R] [--profile] [--json PATH] [--broker URL]

    make bench-latency BENCH_ARGS="--jobs 1000"

No concurrency: each system sends one job, waits for its answer, then sends the next. ``N``
timed round trips (default 500) after ``W`` untimed ones (default 50), per system and round.

aio-pika plain [plain]
    ``bench/throughput.py``'s ``PlainAioPika`` run one job at a time: a responder process acks
    each request at once and publishes a transient reply without confirms to the client's
    exclusive reply queue; requests are transient, unconfirmed, on a classic queue, of the size
    of a sealed enclaveq request (replies: of a sealed result). No crypto, no inference.
enclaveq run [enclaveq]
    one ``enclaveq worker`` (sim TEE) started through ``bench/request_reply.py``'s ``Enclaveq``,
    and ``AsyncClient.run(model_id, {"x": ...})`` of its tiny ONNX model (float32 x[1,16] -> x + 1):
    one sealed message per job (``run`` never frames), enclaveq's delivery guarantees (quorum
    queues, publisher confirms, the worker acks after its result's confirm).

aio-pika + guarantees [baseline], for diagnosis
    ``bench/request_reply.py``'s ``Baseline`` one job at a time: enclaveq's delivery guarantees
    (durable quorum queues, persistent mandatory messages on publisher-confirm channels, the
    responder acks a request only after its reply's confirm) without crypto or inference. It
    tells how much of enclaveq's latency the guarantees cost on this broker; the target compares
    enclaveq with plain.
aio-pika + guarantees, classic queues [classic], for diagnosis
    the same, on durable classic queues: persistent messages, confirms and the ack after the
    reply's confirm are all there, but a classic queue delivers a message before it is on disk,
    where a quorum queue delivers it only once its Raft log is written and synced. The two
    guarantees rows split the guarantees' cost into the quorum queues' part and the rest.
    enclaveq itself always uses quorum queues (docs/architecture.md, DESIGN §5).
aio-pika + guarantees, classic reply queue [classic-reply], for diagnosis
    the guarantees with the quorum job queue DESIGN §5 requires and a durable classic reply
    queue (DESIGN asks only for a durable one): how much of the quorum queues' cost a classic
    reply queue would save.

Reported: p50/p90/p99/mean of the round trip (from calling ``publish``/``run`` to holding the
answer), the CPU ms per job of the client, the answering process and the RabbitMQ node, and
the difference of the p50s (target: enclaveq p50 <= plain p50 + 1 ms). ``--repeat R`` runs R
rounds alternating which system goes first; the table shows medians over rounds.

``--breakdown`` also times the stages of each enclaveq job on the client (sealing, publish until
the broker's confirm, publish until the result's message arrives, opening it, decoding) by
wrapping three of the client's methods for this run, and reads the worker's own time per request
(delivery to its result's confirm and ack: ``enclaveq_worker_job_seconds`` from the worker's
``--metrics-port``); it prints the medians.

``--profile`` (a separate, slower run: use it for "where", not "how fast") runs the enclaveq
phase with cProfile in this process (the client) and in the worker (``bench/request_reply.py``'s
SIGUSR1/SIGUSR2 wrapper) and prints the top functions and a breakdown by area of each.

Every queue and pool the run declares has a unique name and is deleted at the end, also after
Ctrl-C or SIGTERM; the worker and the responder are stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from bench.request_reply import (
    DEFAULT_BROKER, _CpuMeter, _find_broker_pid, _median, _phase, Baseline, cancel_on_sigterm, Enclaveq, make_workload, PhaseResult, print_profiles, Profiler, run_cleaning_up, warn_if_disturbed, Workload,
)
from bench.throughput import PlainAioPika
from broker_adapters import redact_url

SYSTEMS = {"plain": "aio-pika plain", "classic": "aio-pika + guarantees, classic queues",
           "classic-reply": "aio-pika + guarantees, classic reply queue",
           "baseline": "aio-pika + guarantees", "enclaveq": "enclaveq run"}
STAGES = ("seal", "publish -> confirm", "publish -> result arrives", "open result", "decode, wake caller")
TARGET_MS = 1.0  # enclaveq p50 may exceed plain p50 by at most this much
JOB_TIMEOUT = 120.0


class MeteredEnclaveq(Enclaveq):
    """``Enclaveq`` whose worker serves its Prometheus metrics on a free local port (``--breakdown``)."""

    metrics_port: int | None = None

    async def _start_worker(self, cmd: list[str], log_path: Path) -> subprocess.Popen:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.metrics_port = probe.getsockname()[1]
        return await super()._start_worker([*cmd, "--metrics-port", str(self.metrics_port)], log_path)

    async def worker_seconds(self) -> tuple[float, float] | None:
        """(sum of seconds, count) of the worker's ``enclaveq_worker_job_seconds`` histogram."""
        if self.metrics_port is None:
            return None
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
        values = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in ("enclaveq_worker_job_seconds_sum", "enclaveq_worker_job_seconds_count"):
                values[name.rsplit("_", 1)[1]] = float(value)
        return (values["sum"], values["count"]) if len(values) == 2 else None


class EnclaveqRun:
    """``AsyncClient.run`` of the tiny model, one job after the other, on a worker ``Enclaveq`` started.

    With ``breakdown``, the client's ``_publish``, ``_resolve`` and its core's ``receive`` are
    wrapped (on the instances, for this run only) to stamp each job's stages."""

    def __init__(self, eq: Enclaveq, workload: Workload, *, breakdown: bool = False) -> None:
        self.eq, self.workload, self.breakdown = eq, workload, breakdown
        self.stages_ms: dict[str, list[float]] = {stage: [] for stage in STAGES}
        self._stamps: dict[str, float] = {}

    def _wrap(self) -> None:
        client, stamps = self.eq.client, self._stamps
        publish, resolve, receive = client._publish, client._resolve, client._core.receive

        async def timed_publish(*args: Any, **kwargs: Any) -> None:
            stamps["publish"] = time.perf_counter()
            await publish(*args, **kwargs)
            stamps["confirm"] = time.perf_counter()

        def timed_receive(*args: Any, **kwargs: Any) -> Any:
            stamps["arrived"] = time.perf_counter()
            return receive(*args, **kwargs)

        def timed_resolve(*args: Any, **kwargs: Any) -> None:
            stamps["opened"] = time.perf_counter()
            resolve(*args, **kwargs)

        client._publish, client._resolve, client._core.receive = timed_publish, timed_resolve, timed_receive

    def _unwrap(self) -> None:
        client = self.eq.client
        for name in ("_publish", "_resolve"):
            client.__dict__.pop(name, None)
        client._core.__dict__.pop("receive", None)

    def _record(self, t0: float, end: float) -> None:
        s = self._stamps
        if not {"publish", "confirm", "arrived", "opened"} <= s.keys():
            return
        for stage, (a, b) in zip(STAGES, ((t0, s["publish"]), (s["publish"], s["confirm"]),
                                          (s["publish"], s["arrived"]), (s["arrived"], s["opened"]),
                                          (s["opened"], end))):
            self.stages_ms[stage].append(1000 * (b - a))

    async def batch(self, n: int, concurrency: int) -> tuple[float, list[float], int]:
        assert concurrency == 1, "one job at a time"
        latencies: list[float] = []
        errors = 0
        if self.breakdown:
            self._wrap()
            for values in self.stages_ms.values():
                values.clear()  # the timed phase's stages only, not the warm-up's
        try:
            started = time.perf_counter()
            for inputs in self.workload.inputs(n):
                self._stamps.clear()
                t0 = time.perf_counter()
                try:
                    await self.eq.client.run(self.eq.model_id, inputs, timeout=JOB_TIMEOUT)
                    end = time.perf_counter()
                    latencies.append(1000 * (end - t0))
                    if self.breakdown:
                        self._record(t0, end)
                except Exception as exc:
                    errors += 1
                    if errors == 1:
                        print(f"first enclaveq error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return time.perf_counter() - started, latencies, errors
        finally:
            if self.breakdown:
                self._unwrap()


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None or v != v else f"{v:.{digits}f}"  # v != v: NaN


def _stats(results: list[PhaseResult], key: str) -> dict[str, float | None]:
    rs = [r for r in results if r.system == key]
    return {
        "p50": _median([r.pct(50) for r in rs]), "p90": _median([r.pct(90) for r in rs]),
        "p99": _median([r.pct(99) for r in rs]),
        "mean": _median([float(np.mean(r.latencies_ms)) for r in rs if r.latencies_ms]),
        "client": _median([r.cpu_ms_per_job("client") for r in rs]),
        "server": _median([r.cpu_ms_per_job("server") for r in rs]),
        "broker": _median([r.cpu_ms_per_job("broker") for r in rs]),
        "other": _median([r.other_cores for r in rs]),
    }


async def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=150)
    run_id = uuid.uuid4().hex[:10]
    workload = make_workload("tiny")
    broker_pid = _find_broker_pid()
    cancel_on_sigterm()
    console.print(f"run {run_id}: broker {redact_url(args.broker)}, {os.cpu_count()} CPUs, python "
                  f"{platform.python_version()}, load average {os.getloadavg()[0]:.2f}, RabbitMQ node pid "
                  f"{broker_pid or 'not local'}; request {workload.request_bytes} B, reply {workload.reply_bytes} B"
                  + ("; profiling with cProfile" if args.profile else ""))
    results: list[PhaseResult] = []
    profiles: list[Profiler] = []
    with tempfile.TemporaryDirectory(prefix="enclaveq-bench-lat-") as tmpname:
        tmp = Path(tmpname)
        plain = PlainAioPika(args.broker, run_id, workload, tmp)
        baseline = Baseline(args.broker, f"lat-{run_id}", workload, tmp, None)
        classic = Baseline(args.broker, f"lat-classic-{run_id}", workload, tmp, None, queue_type="classic")
        classic_reply = Baseline(args.broker, f"lat-classic-reply-{run_id}", workload, tmp, None,
                                 queue_type="classic-reply")
        profile_tool = "cprofile" if args.profile else None
        metered = MeteredEnclaveq(args.broker, f"lat-{run_id}", workload, tmp, profile_tool) if args.breakdown else None
        eq = metered or Enclaveq(args.broker, f"lat-{run_id}", workload, tmp, profile_tool)
        enclaveq_run = EnclaveqRun(eq, workload, breakdown=args.breakdown)
        worker_ms: list[float] = []  # per round: the worker's mean time per request
        try:
            with console.status("starting the responders and the worker"):
                await plain.start()
                await baseline.start()
                await classic.start()
                await classic_reply.start()
                await eq.start()
            assert plain.proc is not None and baseline.proc is not None and eq.proc is not None
            assert classic.proc is not None and classic_reply.proc is not None
            console.print(f"plain responder pid {plain.proc.pid}, guarantees responder pid {baseline.proc.pid}, "
                          f"enclaveq worker pid {eq.proc.pid} (pool {eq.pool})")
            systems: dict[str, tuple[Any, int]] = {"plain": (plain, plain.proc.pid),
                                                   "classic": (classic, classic.proc.pid),
                                                   "classic-reply": (classic_reply, classic_reply.proc.pid),
                                                   "baseline": (baseline, baseline.proc.pid),
                                                   "enclaveq": (enclaveq_run, eq.proc.pid)}
            keys = list(systems)
            for rnd in range(args.repeat):
                shift = rnd % len(keys)  # rotate the order, so that no system always goes first
                for key in keys[shift:] + keys[:shift]:
                    system, pid = systems[key]
                    # The profilers (enclaveq phase only) use _phase's own naming of the worker's dumps.
                    profile = ("cprofile", tmp, pid) if args.profile and key == "enclaveq" else None
                    with console.status(f"round {rnd + 1}/{args.repeat}: {SYSTEMS[key]}: {args.warmup} warm-up + "
                                        f"{args.jobs} timed jobs, one at a time"):
                        if args.warmup:
                            await system.batch(args.warmup, 1)
                        before = await metered.worker_seconds() if metered and key == "enclaveq" else None
                        r = await _phase(system, args.jobs, 0, 1, key, _CpuMeter(pid, broker_pid), profile, profiles)
                        after = await metered.worker_seconds() if metered and before is not None else None
                    if before is not None and after is not None and after[1] > before[1]:
                        worker_ms.append(1000 * (after[0] - before[0]) / (after[1] - before[1]))
                    r.round = rnd
                    results.append(r)
                    other = "" if r.other_cores is None else f"  other load {r.other_cores:.2f} cores"
                    console.print(f"  round {rnd + 1} {SYSTEMS[key]:22} p50 {_fmt(r.pct(50)):>6} ms  "
                                  f"p90 {_fmt(r.pct(90)):>6} ms  p99 {_fmt(r.pct(99)):>6} ms  errors {r.errors}{other}")
        finally:
            with console.status("cleaning up: stopping processes, deleting queues and the pool"):
                for owner in (eq, classic_reply, classic, baseline, plain):
                    try:
                        await owner.cleanup()
                    except Exception as exc:
                        print(f"clean-up of {type(owner).__name__} failed: {type(exc).__name__}: {exc}",
                              file=sys.stderr)
        rounds = f", median of {args.repeat} rounds" if args.repeat > 1 else ""
        table = Table(title=f"one job at a time: {args.jobs} timed round trips (+{args.warmup} warm-up) per system"
                            f"{rounds}; model {workload.name}; RabbitMQ {redact_url(args.broker)}", title_justify="left")
        for col in ("system", "p50 ms", "p90 ms", "p99 ms", "mean ms", "errors", "CPU ms/job: client", "server",
                    "broker", "other load (cores)"):
            table.add_column(col, justify="left" if col == "system" else "right")
        stats = {key: _stats(results, key) for key in SYSTEMS}
        for key, s in stats.items():
            table.add_row(SYSTEMS[key], _fmt(s["p50"]), _fmt(s["p90"]), _fmt(s["p99"]), _fmt(s["mean"]),
                          str(sum(r.errors for r in results if r.system == key)), _fmt(s["client"]),
                          _fmt(s["server"]), _fmt(s["broker"]), _fmt(s["other"]))
        console.print(table)
        p50_plain, p50_eq = stats["plain"]["p50"], stats["enclaveq"]["p50"]
        diff = None if p50_plain is None or p50_eq is None else p50_eq - p50_plain
        if diff is not None:
            verdict = "[green]meets[/green]" if diff <= TARGET_MS else "[red]misses[/red]"
            console.print(f"enclaveq p50 - plain p50 = {diff:+.2f} ms ({verdict} the +{TARGET_MS:g} ms target)"
                          + (f"; per round: {', '.join(f'{d:+.2f}' for d in _round_diffs(results))}"
                             if args.repeat > 1 else ""))
        p50_guarantees = stats["baseline"]["p50"]
        if p50_plain is not None and p50_guarantees is not None and p50_eq is not None:
            console.print(f"of the difference: the guarantees (aio-pika + guarantees - plain) "
                          f"{p50_guarantees - p50_plain:+.2f} ms, the rest (enclaveq - aio-pika + guarantees) "
                          f"{p50_eq - p50_guarantees:+.2f} ms")
        p50_classic = stats["classic"]["p50"]
        if p50_plain is not None and p50_guarantees is not None and p50_classic is not None:
            console.print(f"of the guarantees: persistent messages, confirms and ack after the reply's confirm "
                          f"(on classic queues - plain) {p50_classic - p50_plain:+.2f} ms; quorum queues instead "
                          f"of classic ones (a Raft log written and synced before each delivery) "
                          f"{p50_guarantees - p50_classic:+.2f} ms")
        p50_classic_reply = stats["classic-reply"]["p50"]
        if p50_plain is not None and p50_guarantees is not None and p50_classic_reply is not None:
            console.print(f"of the quorum queues: a classic reply queue (DESIGN §5 requires a quorum job queue, "
                          f"only a durable reply queue) would save {p50_guarantees - p50_classic_reply:.2f} ms; "
                          f"those guarantees alone then cost {p50_classic_reply - p50_plain:+.2f} ms over plain")
        breakdown: dict[str, float | None] = {}
        if args.breakdown:
            breakdown = {stage: _median(values) for stage, values in enclaveq_run.stages_ms.items()}
            breakdown["worker: delivery -> result confirmed, acked (mean)"] = _median(worker_ms)
            t = Table(title="enclaveq run, per job (last round's medians; the worker's: its histogram's mean)",
                      title_justify="left")
            t.add_column("stage")
            t.add_column("ms", justify="right")
            for stage, value in breakdown.items():
                t.add_row(stage, _fmt(value, 3))
            console.print(t)
        warn_if_disturbed(console, results)
        if args.profile:
            console.print("[yellow]profiled run: the latencies above are raised by the profiler[/yellow]")
            print_profiles(console, profiles, args.top)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "argv": sys.argv, "cpus": os.cpu_count(), "python": platform.python_version(), "model": workload.name,
            "request_bytes": workload.request_bytes, "reply_bytes": workload.reply_bytes, "profiled": args.profile,
            "results": [dict(r.summary(), p90_ms=round(r.pct(90), 3)) for r in results],
            "stats_ms": stats, "p50_difference_ms": None if diff is None else round(diff, 3),
            "breakdown_ms": breakdown,
            "target_ms": TARGET_MS,
        }, indent=2))
    return 0


def _round_diffs(results: list[PhaseResult]) -> list[float]:
    """Per round: enclaveq p50 - plain p50."""
    index = {(r.round, r.system): r for r in results}
    rounds = sorted({r.round for r in results})
    return [index[(n, "enclaveq")].pct(50) - index[(n, "plain")].pct(50)
            for n in rounds if (n, "enclaveq") in index and (n, "plain") in index]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500, help="timed round trips per system and round (default 500)")
    parser.add_argument("--warmup", type=int, default=50, help="untimed round trips before each phase (default 50)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds, alternating which system goes first; medians shown (default 1)")
    parser.add_argument("--broker", default=os.environ.get("ENCLAVEQ_BROKER", DEFAULT_BROKER),
                        help="AMQP URL of the RabbitMQ both systems share (default amqp://guest:guest@127.0.0.1:5672/)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the client and the worker during the enclaveq phases (slower)")
    parser.add_argument("--breakdown", action="store_true",
                        help="time the stages of each enclaveq job (client stamps, worker metrics)")
    parser.add_argument("--top", type=int, default=25, help="functions shown per profile (default 25)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.warmup < 0 or args.repeat < 1:
        parser.error("--jobs and --repeat must be positive and --warmup non-negative")
    if not args.broker.lower().startswith(("amqp://", "amqps://")):
        parser.error("the plain baseline is aio-pika: give an amqp:// URL")
    return run_cleaning_up(run(args))


if __name__ == "__main__":
    sys.exit(main())
