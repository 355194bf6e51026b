"""The answering processes of ``bench/throughput.py``'s peer systems, one process each.

    python -m bench.peers plain    --broker URL --queue NAME [--reply-bytes N]
    python -m bench.peers dramatiq --broker URL --queue NAME --model PATH
    python -m bench.peers celery   --broker URL --queue NAME --model PATH

The benchmark starts each as a child process, waits for its ``ready`` line on stdout and stops
it with SIGTERM at the end; nobody else is meant to run them. The client sides (what a user
of each system writes to send jobs) live in ``bench/throughput.py``; the pieces both sides need
(the Dramatiq actor, the Celery app and task) are built by the functions here so that the two
sides agree on names.

plain
    the simplest aio-pika request/reply responder: consumes a queue with prefetch 16 (the
    enclaveq worker's), acks each request at once, then publishes a reply (random bytes of the
    size of a sealed enclaveq result, transient, no publisher confirms) to the request's
    ``reply_to`` with its correlation id. No inference.
dramatiq
    a Dramatiq ``Worker`` with 8 threads on a ``RabbitmqBroker`` (no publisher confirms, the
    default middleware; queue prefetch is Dramatiq's default of 2 x threads = 16), started in
    this process the way the ``dramatiq`` command starts one (its process-forking CLI adds a
    supervisor and nothing else). The actor runs the ONNX model with ONNX Runtime (one shared
    session) and returns the outputs by publishing them as JSON to the reply queue the message
    names, with the broker's own per-thread pika channel. Dramatiq's Results middleware is not
    used: its backends are Redis, Memcached and an in-process stub, none of them RabbitMQ.
celery
    a Celery worker, ``--pool solo`` (one process, one job at a time), AMQP broker, ``rpc://``
    result backend (results come back as messages to the caller's reply queue), Celery's
    defaults otherwise (prefetch multiplier 4, early acks, JSON). Gossip, mingle, event
    heartbeats and remote control are off so that the worker declares nothing beyond the task
    queue and its exchange. The task runs the ONNX model with ONNX Runtime.

ONNX Runtime sessions use one intra-op and one inter-op thread, as the enclaveq worker's do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
from typing import Any

DRAMATIQ_THREADS = 8
DRAMATIQ_ACTOR = "bench_throughput_infer"
CELERY_TASK = "bench_throughput.infer"
PLAIN_PREFETCH = 16


def onnx_session(model_path: str) -> Any:
    """An ONNX Runtime session configured like the enclaveq worker's (1 intra-op, 1 inter-op thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])


def infer(session: Any, x: list[float]) -> list[float]:
    """Runs the tiny model (float32 x[1,16] -> y) on a JSON list; returns y as a JSON list."""
    import numpy as np

    (y,) = session.run(["y"], {"x": np.asarray(x, dtype=np.float32).reshape(1, 16)})
    return [float(v) for v in y.ravel()]


# -- Dramatiq ---------------------------------------------------------------------------------
def without_heartbeats(url: str) -> str:
    """``url`` with AMQP heartbeats off. pika's blocking connections (Dramatiq) and py-amqp's
    (Celery's client) send heartbeats only while in use, so the broker would drop them while
    other systems are measured; on a local broker heartbeats change nothing else."""
    return url + ("&" if "?" in url else "?") + "heartbeat=0"


def dramatiq_broker(url: str) -> Any:
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    return RabbitmqBroker(url=without_heartbeats(url), confirm_delivery=False)


def dramatiq_actor(broker: Any, queue: str, session: Any = None) -> Any:
    """The benchmark's actor on ``queue``. The client declares it without a session (it only
    sends); the worker process with one. Arguments: x (16 floats), reply queue, correlation id."""
    import dramatiq
    import pika  # type: ignore[import-untyped,unused-ignore]
    import pika.exceptions  # type: ignore[import-untyped,unused-ignore]

    def bench_throughput_infer(x: list[float], reply_to: str, correlation_id: str) -> None:
        if session is None:
            raise RuntimeError("this actor runs in the bench.peers dramatiq process")
        body = json.dumps(infer(session, x)).encode()
        props = pika.BasicProperties(correlation_id=correlation_id, content_type="application/json")
        for attempt in range(2):
            try:
                broker.channel.basic_publish(exchange="", routing_key=reply_to, body=body, properties=props)
                return
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError):
                # A worker thread's publishing connection idles (no heartbeats) while other
                # systems are measured; the broker may have closed it: reconnect once.
                del broker.connection
                if attempt:
                    raise

    return dramatiq.actor(actor_name=DRAMATIQ_ACTOR, queue_name=queue, broker=broker, max_retries=0)(
        bench_throughput_infer)


def dramatiq_queues(queue: str) -> list[str]:
    """Every queue Dramatiq's RabbitmqBroker declares for ``queue``: itself, delay, dead-letter."""
    from dramatiq.common import dq_name, xq_name

    return [queue, dq_name(queue), xq_name(queue)]


def _serve_dramatiq(url: str, queue: str, model_path: str) -> None:
    from dramatiq import Worker

    broker = dramatiq_broker(url)
    dramatiq_actor(broker, queue, onnx_session(model_path))
    worker = Worker(broker, worker_threads=DRAMATIQ_THREADS)
    worker.start()
    _ready_then_wait()
    worker.stop()
    broker.close()


# -- Celery -----------------------------------------------------------------------------------
def celery_app(url: str, queue: str, session: Any = None) -> Any:
    """The benchmark's Celery app: tasks go to ``queue`` (a direct exchange of the same name),
    results come back over ``rpc://``."""
    from celery import Celery  # type: ignore[import-untyped,unused-ignore]
    from kombu import Exchange, Queue

    app = Celery(f"bench-throughput-{queue}", broker=url, backend="rpc://", set_as_current=False)
    app.conf.update(
        task_queues=[Queue(queue, Exchange(queue, type="direct"), routing_key=queue)],
        task_default_queue=queue, task_default_exchange=queue, task_default_routing_key=queue,
        task_create_missing_queues=False,
        worker_enable_remote_control=False,  # no celery.pidbox exchange or queues
        worker_send_task_events=False, task_send_sent_event=False,
        broker_connection_retry_on_startup=True,
        broker_heartbeat=0,  # see without_heartbeats()
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,  # the "ready" line goes to the benchmark, not to the log
    )

    @app.task(name=CELERY_TASK)
    def bench_throughput_infer(x: list[float]) -> list[float]:
        if session is None:
            raise RuntimeError("this task runs in the bench.peers celery process")
        return infer(session, x)

    return app


def _serve_celery(url: str, queue: str, model_path: str) -> None:
    from celery.signals import worker_ready  # type: ignore[import-untyped,unused-ignore]

    app = celery_app(url, queue, onnx_session(model_path))

    def announce(**_: Any) -> None:
        print("ready", flush=True)

    worker_ready.connect(announce, weak=False)
    # SIGTERM: Celery's warm shutdown (finish the current task, return the prefetched ones).
    app.worker_main(["worker", "--pool", "solo", "--queues", queue, "--hostname", f"{queue}@%h",
                     "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING"])


# -- plain aio-pika ---------------------------------------------------------------------------
async def _serve_plain(url: str, queue: str, reply_bytes: int) -> None:
    import aio_pika

    from bench.request_reply import serve_until_signalled

    reply_body = os.urandom(reply_bytes)
    conn = await aio_pika.connect_robust(url)
    channel = await conn.channel(publisher_confirms=False)
    await channel.set_qos(prefetch_count=PLAIN_PREFETCH)
    q = await channel.declare_queue(queue, passive=True)
    exchange = channel.default_exchange

    async def on_message(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        await msg.ack()
        await exchange.publish(aio_pika.Message(reply_body, correlation_id=msg.correlation_id),
                               routing_key=msg.reply_to or "")

    await q.consume(on_message, no_ack=False)
    await serve_until_signalled(conn)


# -- process plumbing -------------------------------------------------------------------------
def _ready_then_wait() -> None:
    """Say "ready" and block until SIGTERM or SIGINT (for the thread-based peers)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print("ready", flush=True)
    while not stop.wait(1.0):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("system", choices=("plain", "dramatiq", "celery"))
    parser.add_argument("--broker", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--model", help="ONNX model file (dramatiq, celery)")
    parser.add_argument("--reply-bytes", type=int, default=256, help="reply size (plain)")
    args = parser.parse_args(argv)
    if args.system == "plain":
        asyncio.run(_serve_plain(args.broker, args.queue, args.reply_bytes))
    elif not args.model:
        parser.error(f"{args.system} needs --model")
    elif args.system == "dramatiq":
        _serve_dramatiq(args.broker, args.queue, args.model)
    else:
        _serve_celery(args.broker, args.queue, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
