"""Events/s through the text-embedding pipeline, against the same chain run directly, in one run.

    python -m bench.pipeline [--broker URL] [--events N] [--concurrency C] [--json PATH]

enclaveq
    one real worker started with the CLI (``enclaveq sim init``, ``policy init``, ``worker``);
    the text-embedding example (raw sentence -> BertTokenizer graph -> all-MiniLM-L6-v2 int8 ->
    mean pooling + L2) created with ``AsyncClient.create_pipeline`` on topics unique to the run;
    ``AsyncEventPublisher.publish_many`` (``C`` in flight, each confirmed by the broker) and an
    ``AsyncResultSubscriber`` that opens and checks every result. Timed from the first publish to
    the last result opened: sealing, the broker both ways, the chain in the worker, sealing to
    the recipient, opening and the origin check.
direct
    the same three graphs with onnxruntime (+ extensions) in this process, one event after the
    other (``enclaveq.pipeline_examples.run_directly``): no broker, no crypto, no second process.

Everything the run declares (pool, stream, inbox) carries the run id and is deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from .request_reply import Enclaveq, _stop_process, delete_pool_quietly, make_workload, run_cleaning_up

SENTENCES = [
    "Hello, my dog is cute",
    "The production database is down and customers cannot log in.",
    "Quarterly revenue grew by twelve percent.",
    "Please reset my password, I am locked out.",
    "The cat sat on the mat all afternoon.",
]


def sentences(n: int) -> list[str]:
    return [f"{SENTENCES[i % len(SENTENCES)]} ({i})" for i in range(n)]


def direct(toml: Path, texts: list[str]) -> float:
    from enclaveq.pipeline_examples import load_chain

    chain = load_chain(toml)
    for text in texts[:20]:  # warm-up: sessions made, caches filled
        chain({"text": np.array([text], dtype=object)})
    started = time.perf_counter()
    for text in texts:
        chain({"text": np.array([text], dtype=object)})
    return len(texts) / (time.perf_counter() - started)


async def through_enclaveq(url: str, run_id: str, tmp: Path, texts: list[str], concurrency: int) -> float:
    from enclaveq.pipeline_examples import write_example
    from producer_sdk import AsyncEventPublisher, AsyncResultSubscriber
    from protocol import crypto
    from protocol.pipeline import load_pipeline_toml

    system = Enclaveq(url, run_id, make_workload("tiny"), tmp, None)
    inbox = None
    try:
        await system.start()
        recipient = crypto.generate_private_key()
        toml = write_example("text-embedding", tmp / "text", [crypto.public_bytes(recipient).hex()])
        spec, models = load_pipeline_toml(toml)
        spec = dataclasses.replace(spec, source_topic=f"bench/{run_id}/text",
                                   sink_topic=f"bench/{run_id}/embeddings")
        pipeline_id = await system.client.create_pipeline(spec, models=models)
        async with AsyncEventPublisher(url, system.pool, system.policy, pipeline_id) as publisher, \
                AsyncResultSubscriber(url, system.pool, system.policy, pipeline_id, recipient) as subscriber:
            inbox = subscriber.inbox
            await publisher.publish_many(texts[:20], max_in_flight=concurrency)  # warm-up
            for _ in range(20):
                await subscriber.receive(timeout=120)
            started = time.perf_counter()
            publishing = asyncio.ensure_future(publisher.publish_many(texts, max_in_flight=concurrency))
            for _ in texts:
                await subscriber.receive(timeout=120)
            elapsed = time.perf_counter() - started
            await publishing
            if publisher.errors:
                raise RuntimeError(f"{len(publisher.errors)} events failed: {publisher.errors[0]}")
        return len(texts) / elapsed
    finally:
        if system.client is not None and inbox is not None:
            with contextlib.suppress(Exception):
                await system.client._broker.delete_inbox(inbox)
        await system.cleanup()
        await _stop_process(system.proc, "worker")
        await delete_pool_quietly(url, system.pool, None)


async def run(args: argparse.Namespace) -> int:
    run_id = uuid.uuid4().hex[:10]
    texts = sentences(args.events)
    load = os.getloadavg()[0]
    print(f"run {run_id}: broker {args.broker}, {os.cpu_count()} CPUs, load average {load:.2f}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="enclaveq-bench-") as tmp:
        eq = await through_enclaveq(args.broker, run_id, Path(tmp), texts, args.concurrency)
        toml = Path(tmp) / "text" / "pipeline.toml"
        dr = await asyncio.to_thread(direct, toml, texts)
    ratio = eq / dr
    print(f"text-embedding pipeline, {args.events} events, C={args.concurrency}, broker {args.broker}")
    print(f"  enclaveq (publish -> result opened, 1 worker): {eq:8.1f} events/s")
    print(f"  direct onnxruntime chain (1 process):          {dr:8.1f} events/s")
    print(f"  enclaveq / direct: {ratio:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": run_id, "broker": args.broker, "events": args.events,
                                               "concurrency": args.concurrency, "enclaveq_events_s": eq,
                                               "direct_events_s": dr, "ratio": ratio, "load": load}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    return run_cleaning_up(run(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
