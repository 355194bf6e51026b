"""Soak: a worker's resident memory over many jobs (does it grow with the jobs it has run?).

    python -m bench.soak [--jobs N] [--concurrency C] [--sample-every K] [--json PATH] [--broker URL]

    make bench-soak BENCH_ARGS="--jobs 20000"

One ``enclaveq worker`` (sim TEE) in its own process, started through ``bench/request_reply.py``'s
``Enclaveq`` (``enclaveq sim init``, ``enclaveq policy init``, ``enclaveq worker``), runs ``N`` tiny
jobs (default 100,000; float32 x[1,16] -> x + 1) that this process submits in one
``AsyncClient.submit`` (framed, the default) with ``C`` jobs in flight (default 64).

The worker's RSS (``VmRSS`` of ``/proc/PID/status``) is read before the first job, after every
``K`` results (default 10,000; a progress line each time) and once the last result is in. The
first sample after ``K`` jobs is the reference: by then the model is loaded, the thread pools and
buffers have their working size. Reported: that RSS, the RSS at the end and the growth in percent
(target: within 5 %), plus the peak (``VmHWM``).

The worker remembers every job it answered until the job's deadline (replay refusal,
``enclave_worker/replay_guard.py``; ~230 bytes an entry, one per sealed message, so one per frame
here). With the SDK's default deadline of 120 s (``--timeout``) a run shorter than that only adds
entries; with a deadline shorter than the run the set reaches its steady size.

The pool and the client's reply queue have unique names and are deleted at the end, also after
Ctrl-C or SIGTERM; the worker is stopped with SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.request_reply import (
    DEFAULT_BROKER, Enclaveq, _find_broker_pid, _proc_cpu, cancel_on_sigterm, make_workload, run_cleaning_up,
)
from broker_adapters import redact_url

TARGET_PCT = 5.0  # allowed RSS growth from the reference sample to the end


def read_status_kib(pid: int, field: str) -> int:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of ``/proc/PID/status``, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


@dataclass(frozen=True)
class Sample:
    jobs: int  # results received when the sample was taken
    seconds: float  # since the first job was submitted
    rss_kib: int
    hwm_kib: int
    worker_cpu_s: float | None


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


async def run(args: argparse.Namespace) -> int:
    run_id = uuid.uuid4().hex[:10]
    workload = make_workload("tiny")
    broker_pid = _find_broker_pid()
    cancel_on_sigterm()
    print(f"run {run_id}: broker {redact_url(args.broker)}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.2f}, RabbitMQ node pid {broker_pid or 'not local'}; "
          f"{args.jobs} jobs, C={args.concurrency}, job deadline {args.timeout:g} s, model {workload.name}", flush=True)
    samples: list[Sample] = []
    errors = 0
    with tempfile.TemporaryDirectory(prefix="enclaveq-bench-soak-") as tmpname:
        eq = Enclaveq(args.broker, f"soak-{run_id}", workload, Path(tmpname), None)
        try:
            await eq.start()
            assert eq.proc is not None
            pid = eq.proc.pid
            started = time.perf_counter()

            def sample(done: int) -> Sample:
                s = Sample(done, time.perf_counter() - started, read_status_kib(pid, "VmRSS"),
                           read_status_kib(pid, "VmHWM"), _proc_cpu(pid))
                samples.append(s)
                return s

            first = sample(0)
            print(f"worker pid {pid} (pool {eq.pool}); RSS before the first job {_mib(first.rss_kib)}", flush=True)
            done = 0
            last_at, last_jobs = 0.0, 0
            started = time.perf_counter()  # the samples' clock starts with the first job
            batch = workload.inputs(args.jobs)
            async with contextlib.aclosing(eq.client.submit(eq.model_id, batch, max_in_flight=args.concurrency,
                                                            timeout=args.timeout)) as results:
                async for result in results:
                    done += 1
                    if not result.ok:
                        errors += 1
                        if errors == 1:
                            print(f"first enclaveq error: {result.error}", file=sys.stderr)
                    if done % args.sample_every == 0 or done == args.jobs:
                        s = sample(done)
                        rate = (done - last_jobs) / max(s.seconds - last_at, 1e-9)
                        last_at, last_jobs = s.seconds, done
                        print(f"  {done:>9,} jobs  {s.seconds:7.1f} s  {rate:7.0f} jobs/s  worker RSS "
                              f"{_mib(s.rss_kib):>11}  peak {_mib(s.hwm_kib):>11}  errors {errors}", flush=True)
        finally:
            await eq.cleanup()
    reference = next((s for s in samples if s.jobs >= min(args.sample_every, args.jobs)), None)
    end = samples[-1] if samples and samples[-1].jobs == args.jobs else None
    growth = None
    if reference is not None and end is not None:
        growth = 100 * (end.rss_kib - reference.rss_kib) / reference.rss_kib
        verdict = "meets" if abs(growth) <= TARGET_PCT else "misses"
        seconds = end.seconds
        cpu = (None if end.worker_cpu_s is None or samples[0].worker_cpu_s is None
               else end.worker_cpu_s - samples[0].worker_cpu_s)
        print(f"{args.jobs:,} jobs in {seconds:.1f} s ({args.jobs / seconds:.0f} jobs/s), errors {errors}"
              + ("" if cpu is None else f", worker CPU {1000 * cpu / args.jobs:.3f} ms/job"))
        print(f"worker RSS after {reference.jobs:,} jobs {_mib(reference.rss_kib)}, at the end "
              f"{_mib(end.rss_kib)}: {growth:+.2f} % ({verdict} the {TARGET_PCT:g} % target); "
              f"peak {_mib(end.hwm_kib)}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "argv": sys.argv, "cpus": os.cpu_count(), "python": platform.python_version(), "model": workload.name,
            "jobs": args.jobs, "concurrency": args.concurrency, "timeout_s": args.timeout, "errors": errors,
            "samples": [asdict(s) for s in samples],
            "rss_growth_pct": None if growth is None else round(growth, 3), "target_pct": TARGET_PCT,
        }, indent=2))
    return 0 if growth is not None else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs in all (default 100000)")
    parser.add_argument("--concurrency", type=int, default=64, help="jobs in flight (default 64)")
    parser.add_argument("--sample-every", type=int, default=10_000,
                        help="results between RSS samples and progress lines; the first is the reference "
                             "(default 10000)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="each job's deadline in seconds (default 120, the SDK's); the worker remembers "
                             "answered jobs until their deadline (replay refusal), so a run shorter than this "
                             "never sees an entry go")
    parser.add_argument("--broker", default=os.environ.get("ENCLAVEQ_BROKER", DEFAULT_BROKER),
                        help="broker URL (default amqp://guest:guest@127.0.0.1:5672/)")
    parser.add_argument("--json", metavar="PATH", help="also write the samples as JSON")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.concurrency < 1 or args.sample_every < 1 or args.timeout <= 0:
        parser.error("--jobs, --concurrency, --sample-every and --timeout must be positive")
    return run_cleaning_up(run(args))


if __name__ == "__main__":
    sys.exit(main())
