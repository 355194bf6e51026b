"""`enclaveq worker`: run an enclave worker until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import click

from .config import DEFAULT_WORKER_CONFIG
from .errors import WorkerStartupError

EXIT_REFUSED = 3


@click.command("worker")
@click.option("--broker", "broker_url", metavar="URL", help="Broker URL: memory://NAME or amqp://user:pass@host:5672/.")
@click.option("--pool", metavar="NAME", help="Worker pool to serve (producers address jobs to a pool).")
@click.option("--sim-dir", type=click.Path(path_type=Path), required=True,
              help="Simulation directory from `enclaveq sim init` (the simulated TEE's keys).")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="Where sealed pool keys and models live. Default: SIM_DIR/state.")
@click.option("--tee", type=click.Choice(["sim"]), default="sim", show_default=True,
              help="Which TEE provides evidence. Only the clearly labelled simulation exists in this version.")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on 127.0.0.1:PORT.")
@click.option("--print-measurement", is_flag=True,
              help="Print this worker's measurement (hex) and exit: pin it in a policy.")
@click.option("--log-level", default="INFO", show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def worker_command(broker_url, pool, sim_dir, state_dir, tee, metrics_port, print_measurement, log_level):
    """Run a (simulated) enclave worker for one pool.

    The worker answers attestation challenges with fresh evidence binding its pool key and the
    producer's nonce, holds uploaded models in sealed storage, runs jobs and sends back sealed
    results. It runs until SIGTERM or SIGINT, then finishes in-flight jobs, returns the rest to
    the queue and exits 0. Exit 3 means it refused to start (e.g. the pool already has a worker).

    \b
    Example:
      enclaveq worker --broker amqp://guest:guest@127.0.0.1:5672/ --pool demo --sim-dir ./sim
    """
    from .measurement import measure_worker

    config = DEFAULT_WORKER_CONFIG
    if print_measurement:
        click.echo(measure_worker(config.measured()).value.hex())
        return
    if not broker_url or not pool:
        raise click.UsageError("--broker and --pool are required to run a worker")
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        asyncio.run(_serve(broker_url, pool, sim_dir, state_dir or sim_dir / "state", metrics_port))
    except WorkerStartupError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_REFUSED)


async def _serve(broker_url, pool, sim_dir, state_dir, metrics_port) -> None:
    from .platform import sim_identity
    from .worker import Worker

    # Every WorkerConfig field is measured: the worker runs exactly the configuration it attests.
    config = DEFAULT_WORKER_CONFIG
    identity = sim_identity(sim_dir, config)
    worker = Worker(broker_url=broker_url, pool=pool, identity=identity, state_dir=state_dir, config=config)
    if metrics_port:
        worker.metrics.serve(metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await worker.start()
    logging.getLogger("enclaveq.worker").info("ready; send SIGTERM or SIGINT to stop")
    await stop.wait()
    logging.getLogger("enclaveq.worker").info("stopping: finishing in-flight jobs")
    await worker.stop()
