"""Back-pressure: a producer submitting 100,000 small jobs to one slow worker (issue 16, fault 5).

    python -m bench.backpressure [--jobs N] [--window W] [--steps S] [--no-frames] [--json PATH] [--broker URL]

    make bench-backpressure BENCH_ARGS="--jobs 20000"

Does the producer keep a window of jobs in flight, or does it take the whole batch in? One
``enclaveq worker`` (sim TEE) in its own process, started through ``bench/request_reply.py``'s
``Enclaveq``, serves a model that is slow on purpose: float32 x[batch,16] is spread to 16,384
values, goes through ``S`` Tanh (default 384) and is folded back to y[batch,16]. Every row costs
the same element-wise work whatever the worker's batch size (dynamic batching cannot make it
cheaper, unlike a MatMul chain), about 2.5 ms of ONNX Runtime per job with S=384 on the 2-core
machine of docs/benchmarks.md (measured here at the start and printed). The worker runs its
measured default configuration (the CLI offers no other): nothing in it is changed for the bench.

This process submits ``N`` jobs (default 100,000) in one ``AsyncClient.submit(model_id,
generator, max_in_flight=W)`` (W default 64; framed, the SDK's default, unless ``--no-frames``).
The jobs come from a generator that counts the items the SDK takes; the result loop counts the
results. Every 0.5 s a sampler reads:

- this process's RSS (``VmRSS`` of ``/proc/self/status``);
- the jobs the SDK has taken from the generator and not yet returned a result for ("ahead");
- the jobs queue's and the client's reply queue's ready messages (a passive ``queue.declare`` on
  a channel of this process's own, which RabbitMQ answers with the ready count);

and every ``--ctl-every`` seconds (default 5; ``rabbitmqctl`` starts an Erlang VM, ~0.8 s of CPU)
``rabbitmqctl list_queues`` gives the jobs queue's messages ready + unacknowledged.

Reported: the RSS after the first 10,000 results (the reference: imports, the model, the
connection and the window's buffers are in by then), the largest RSS and the RSS at the end, as
ratios to the reference; the largest queue lengths and the largest "ahead" against W; jobs/s and
the wall time. With frames, a message carries up to W/4 jobs (``FrameSettings``), so the queue
holds fewer messages than jobs; ``--no-frames`` sends one message per job.

The pool and the client's reply queue have unique names and are deleted at the end, also after
Ctrl-C or SIGTERM; the worker is stopped with SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.request_reply import (
    DEFAULT_BROKER, Enclaveq, Workload, _find_broker_pid, _proc_cpu, cancel_on_sigterm, make_workload,
    run_cleaning_up,
)
from bench.soak import _mib, read_status_kib
from broker_adapters import _common as common
from broker_adapters import redact_url

WIDTH = 16_384  # values each row is spread to; the Tanh run over them is the per-job cost
REFERENCE_JOBS = 10_000  # results after which the RSS is the reference
SAMPLE_SECONDS = 0.5


def slow_model(steps: int) -> bytes:
    """float32 x[batch,16] -> x @ up[16,WIDTH] -> Tanh applied ``steps`` times -> @ down[WIDTH,16].

    Element-wise work per row, the same at batch 1 and 64: a fixed cost per job however the
    worker batches. The graph is row-independent, so the worker may batch it like any such model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    up = (rng.standard_normal((16, WIDTH)) / 4).astype(np.float32)
    down = (rng.standard_normal((WIDTH, 16)) / np.sqrt(WIDTH)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "up"], ["h0"])]
    nodes += [helper.make_node("Tanh", [f"h{i}"], [f"h{i + 1}"]) for i in range(steps)]
    nodes.append(helper.make_node("MatMul", [f"h{steps}", "down"], ["y"]))
    graph = helper.make_graph(
        nodes, "bench_slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        initializer=[numpy_helper.from_array(up, "up"), numpy_helper.from_array(down, "down")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def direct_ms_per_row(model: bytes, rows: int, runs: int = 20) -> float:
    """ONNX Runtime's own time per row for this model, one thread (the worker's setting)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    x = np.ones((rows, 16), np.float32)
    session.run(None, {"x": x})
    started = time.perf_counter()
    for _ in range(runs):
        session.run(None, {"x": x})
    return 1000 * (time.perf_counter() - started) / runs / rows


@dataclass(frozen=True)
class Sample:
    seconds: float  # since the first job was taken
    results: int
    ahead: int  # jobs taken from the generator without a result yet
    rss_kib: int
    jobs_ready: int | None  # the jobs queue's ready messages (passive declare)
    replies_ready: int | None  # the reply queue's ready messages


@dataclass(frozen=True)
class CtlSample:
    seconds: float
    messages: int  # ready + unacknowledged, from rabbitmqctl
    unacked: int


class Counter:
    """The jobs the SDK took from the generator and the results it gave back."""

    def __init__(self) -> None:
        self.taken = 0
        self.results = 0
        self.max_ahead = 0

    def counted(self, inputs: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        for item in inputs:
            self.taken += 1
            yield item

    def result(self) -> None:
        self.results += 1
        self.max_ahead = max(self.max_ahead, self.taken - self.results)


async def ready_count(channel: Any, queue: str) -> int | None:
    """A queue's ready messages, from RabbitMQ's answer to a passive declare."""
    try:
        declared = await channel.declare_queue(queue, passive=True)
    except Exception:  # noqa: BLE001 - a closed channel or a queue not declared yet: no sample
        return None
    return int(declared.declaration_result.message_count)


def ctl_queue(rabbitmqctl: str, queue: str) -> tuple[int, int] | None:
    """(messages, unacknowledged) of one queue, from rabbitmqctl (blocking: run it in a thread)."""
    done = subprocess.run([rabbitmqctl, "-q", "list_queues", "--no-table-headers", "name", "messages",
                           "messages_unacknowledged"], capture_output=True, text=True, timeout=30)
    for line in done.stdout.splitlines():
        name, _, rest = line.partition("\t")
        if name == queue:
            messages, unacked = rest.split("\t")
            return int(messages), int(unacked)
    return None


async def sample_queues(url: str, eq: Enclaveq, counter: Counter, started: float, samples: list[Sample],
                        ctl_samples: list[CtlSample], ctl_every: float) -> None:
    """Sample every SAMPLE_SECONDS until cancelled; rabbitmqctl every ``ctl_every`` s in a thread."""
    import aio_pika

    jobs_queue, reply_queue = common.jobs_queue(eq.pool), common.reply_queue(eq.reply_name or "")
    rabbitmqctl = shutil.which("rabbitmqctl") if ctl_every > 0 else None
    ctl_task: asyncio.Task[tuple[int, int] | None] | None = None
    ctl_at = -ctl_every
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        while True:
            now = time.perf_counter() - started
            if rabbitmqctl and ctl_task is None and now - ctl_at >= ctl_every:
                ctl_at = now
                ctl_task = asyncio.create_task(asyncio.to_thread(ctl_queue, rabbitmqctl, jobs_queue))
            if ctl_task is not None and ctl_task.done():
                with contextlib.suppress(Exception):
                    found = ctl_task.result()
                    if found is not None:
                        ctl_samples.append(CtlSample(ctl_at, *found))
                ctl_task = None
            if channel.is_closed:
                channel = await connection.channel()
            samples.append(Sample(now, counter.results, counter.taken - counter.results,
                                  read_status_kib(os.getpid(), "VmRSS"),
                                  await ready_count(channel, jobs_queue), await ready_count(channel, reply_queue)))
            await asyncio.sleep(SAMPLE_SECONDS)
    finally:
        if ctl_task is not None:
            ctl_task.cancel()
        await connection.close()


def _largest(values: list[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


async def run(args: argparse.Namespace) -> int:
    run_id = f"bp-{uuid.uuid4().hex[:10]}"
    model = slow_model(args.steps)
    workload = Workload(f"slow (float32 [1,16], {args.steps} Tanh over {WIDTH:,} values)", model,
                        make_workload("tiny").samples)
    cancel_on_sigterm()
    one, batched = direct_ms_per_row(model, 1), direct_ms_per_row(model, 16)
    print(f"run {run_id}: broker {redact_url(args.broker)}, {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}, load average {os.getloadavg()[0]:.2f}, RabbitMQ node pid "
          f"{_find_broker_pid() or 'not local'}; {args.jobs:,} jobs, W={args.window}, "
          f"{'framed' if args.frames else 'one message per job'}, model {workload.name}: ONNX Runtime directly "
          f"{one:.2f} ms/row at batch 1, {batched:.2f} ms/row at batch 16", flush=True)
    counter = Counter()
    samples: list[Sample] = []
    ctl_samples: list[CtlSample] = []
    errors = 0
    seconds = 0.0
    worker_cpu: float | None = None
    with tempfile.TemporaryDirectory(prefix="enclaveq-bench-backpressure-") as tmpname:
        eq = Enclaveq(args.broker, run_id, workload, Path(tmpname), None)
        sampler: asyncio.Task[None] | None = None
        try:
            await eq.start()
            assert eq.proc is not None
            cpu_before = _proc_cpu(eq.proc.pid)
            print(f"worker pid {eq.proc.pid} (pool {eq.pool}); producer RSS before the first job "
                  f"{_mib(read_status_kib(os.getpid(), 'VmRSS'))}", flush=True)
            started = time.perf_counter()
            sampler = asyncio.create_task(sample_queues(args.broker, eq, counter, started, samples, ctl_samples,
                                                        args.ctl_every))
            last_at, last_done = 0.0, 0
            async with contextlib.aclosing(eq.client.submit(
                    eq.model_id, counter.counted(workload.inputs(args.jobs)), max_in_flight=args.window,
                    frames=None if args.frames else False)) as results:
                async for result in results:
                    counter.result()
                    if not result.ok:
                        errors += 1
                        if errors == 1:
                            print(f"first enclaveq error: {result.error}", file=sys.stderr)
                    if counter.results % REFERENCE_JOBS == 0:
                        now = time.perf_counter() - started
                        recent = [s for s in samples if s.seconds >= last_at]
                        print(f"  {counter.results:>9,} results {now:7.1f} s "
                              f"{(counter.results - last_done) / max(now - last_at, 1e-9):6.0f} jobs/s  RSS "
                              f"{_mib(read_status_kib(os.getpid(), 'VmRSS')):>10}  ahead max "
                              f"{max((s.ahead for s in recent), default=0):>4}  jobs queue ready max "
                              f"{_largest([s.jobs_ready for s in recent])}  errors {errors}", flush=True)
                        last_at, last_done = now, counter.results
            seconds = time.perf_counter() - started
            cpu_after = _proc_cpu(eq.proc.pid)
            worker_cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
        finally:
            if sampler is not None:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sampler
            await eq.cleanup()
    end_rss = read_status_kib(os.getpid(), "VmRSS")
    if counter.results != args.jobs:
        print(f"only {counter.results:,} of {args.jobs:,} results came back", file=sys.stderr)
        return 1
    reference = next((s for s in samples if s.results >= min(REFERENCE_JOBS, args.jobs)), None)
    ref_kib = reference.rss_kib if reference is not None else samples[0].rss_kib
    max_kib = max([s.rss_kib for s in samples] + [end_rss])
    jobs_ready, replies_ready = _largest([s.jobs_ready for s in samples]), _largest([s.replies_ready for s in samples])
    ctl_max = max((c.messages for c in ctl_samples), default=None)
    ahead = max(counter.max_ahead, max((s.ahead for s in samples), default=0))
    print(f"{args.jobs:,} jobs in {seconds:.1f} s ({args.jobs / seconds:.0f} jobs/s), errors {errors}"
          + ("" if worker_cpu is None else f", worker CPU {1000 * worker_cpu / args.jobs:.2f} ms/job"))
    print(f"producer RSS after {REFERENCE_JOBS:,} results {_mib(ref_kib)}, largest {_mib(max_kib)} "
          f"({max_kib / ref_kib:.3f}x), at the end {_mib(end_rss)} ({end_rss / ref_kib:.3f}x); "
          f"{len(samples)} samples every {SAMPLE_SECONDS:g} s")
    print(f"window W={args.window}: jobs taken ahead of their results at most {ahead} (checked at every result "
          f"and sample); jobs queue ready messages at most {jobs_ready}, reply queue at most {replies_ready}"
          + ("" if ctl_max is None else f"; rabbitmqctl (ready + unacked) at most {ctl_max} in "
             f"{len(ctl_samples)} listings"))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "argv": sys.argv,
            "cpus": os.cpu_count(), "python": platform.python_version(), "model": workload.name,
            "direct_ms_per_row": {"batch1": one, "batch16": batched}, "jobs": args.jobs, "window": args.window,
            "frames": args.frames, "seconds": seconds, "errors": errors, "reference_rss_kib": ref_kib,
            "max_rss_kib": max_kib, "end_rss_kib": end_rss, "max_ahead": ahead, "max_jobs_ready": jobs_ready,
            "max_replies_ready": replies_ready, "max_ctl_messages": ctl_max,
            "samples": [asdict(s) for s in samples], "ctl_samples": [asdict(c) for c in ctl_samples],
        }, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backpressure",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs in all (default 100000)")
    parser.add_argument("--window", type=int, default=64, help="max_in_flight (default 64)")
    parser.add_argument("--steps", type=int, default=384,
                        help=f"Tanh passes over {WIDTH:,} values per job: the worker's cost per job "
                             "(default 384, ~2.5 ms on the 2-core bench machine)")
    parser.add_argument("--no-frames", dest="frames", action="store_false",
                        help="one message per job (default: framed, the SDK's default)")
    parser.add_argument("--ctl-every", type=float, default=5.0,
                        help="seconds between rabbitmqctl listings (default 5; 0: none)")
    parser.add_argument("--broker", default=os.environ.get("ENCLAVEQ_BROKER", DEFAULT_BROKER),
                        help="AMQP URL (default amqp://guest:guest@127.0.0.1:5672/)")
    parser.add_argument("--json", metavar="PATH", help="also write the samples as JSON")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.window < 1 or args.steps < 1 or args.ctl_every < 0:
        parser.error("--jobs, --window and --steps must be positive, --ctl-every not negative")
    if not args.broker.lower().startswith(("amqp://", "amqps://")):
        parser.error("the queue lengths are read from RabbitMQ: --broker must be an amqp:// URL")
    return run_cleaning_up(run(args))


if __name__ == "__main__":
    sys.exit(main())
