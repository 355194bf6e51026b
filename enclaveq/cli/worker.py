"""`enclaveq worker`: run an enclave worker (enclave_worker.Worker) until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

from enclave_worker.config import DEFAULT_WORKER_CONFIG
from enclave_worker.errors import WorkerStartupError

from ..durations import DURATION
from .collateral import collateral_option, collateral_source_for
from .exits import EXIT_FAILED, debug_wanted, describe, exit_code_of, reportable
from .log_format import LOG_FORMAT_ENV, LOG_FORMATS, configure_logging
from .params import BROKER_URL

EXIT_REFUSED = 3
# The same choices as attestation.providers.TEE_CHOICES (kept literal: importing attestation is slow).
TEE_CHOICES = ("auto", "sim", "sgx", "tdx", "snp", "nitro")


@click.command("worker")
@click.option("--broker", "broker_url", type=BROKER_URL, help="Broker URL: memory://NAME, amqp(s)://user:pass@host:5672/ or mqtt(s)://user:pass@host:1883/ (MQTT 5; TLS options in docs/architecture.md). A RabbitMQ cluster: its nodes' URLs separated by commas; the worker fails over between them (docs/operations.md).")
@click.option("--pool", metavar="NAME", help="Worker pool to serve (producers address jobs to a pool).")
@click.option("--sim-dir", type=click.Path(path_type=Path), default=None,
              help="Simulation directory from `enclaveq sim init` (the simulated TEE's keys). "
                   "Required with --tee sim; refused with any other TEE.")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="Where sealed pool keys and models live. Default: SIM_DIR/state with --tee sim; on a "
                   "real TEE a fresh private temporary directory, removed at exit. On SGX (EGETKEY) and SEV-SNP "
                   "(firmware-derived key) pass a persistent directory to keep pool keys and models across "
                   "restarts; TDX and Nitro have no sealing key, so their workers get both from a live pool "
                   "member at every start.")
@click.option("--tee", type=click.Choice(TEE_CHOICES), default=None,
              help="Which TEE provides the evidence (each choice is explained above). "
                   "Default: sim when --sim-dir is given, otherwise auto.")
@click.option("--metrics-port", type=click.IntRange(min=1, max=65535), default=None, metavar="PORT",
              help="Serve Prometheus metrics on METRICS_ADDR:PORT.")
@click.option("--metrics-addr", default="127.0.0.1", show_default=True, metavar="ADDR",
              help="Address the metrics and health endpoints are served on, with --metrics-port/--health-port "
                   "(0.0.0.0 in a container, so that Prometheus and health checks reach it; metrics are counts "
                   "and latencies, never payloads).")
@click.option("--health-port", type=click.IntRange(min=1, max=65535), default=None, metavar="PORT",
              help="Serve GET /live (200 while running) and GET /ready (200 once joined with a key and consuming, "
                   "503 before and while stopping) on METRICS_ADDR:PORT.")
@click.option("--rotate-every", type=DURATION, default=None,
              help="Rotate the pool key automatically when the current epoch is older than this (e.g. 12h). "
                   "Any member with this option may rotate; the pool's rotation lock lets one of them do it.")
@click.option("--rotation-grace", type=DURATION, default="5m", show_default=True,
              help="How long the previous epoch's key still opens jobs after a rotation this worker makes "
                   "(--rotate-every), before every member erases it. It must not exceed the measured "
                   "max_rotation_grace_seconds (1h by default): a longer one is refused, with or without "
                   "--rotate-every.")
@collateral_option
@click.option("--join-without-collateral", is_flag=True,
              help="Real TEEs: admit and join peers without collateral, judging them by their measurements "
                   "and vendor signatures alone (their TCB, and whether their PCK/VCEK was revoked, is not "
                   "evaluated). Without it and without --collateral, the worker joins no pool and admits no peer.")
@click.option("--print-measurement", is_flag=True,
              help="Print this worker's measurement (hex) and exit: pin it in a policy. "
                   "Simulation only: on a real TEE the hardware reports the measurement.")
@click.option("--log-level", default="INFO", show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--log-format", type=click.Choice(LOG_FORMATS, case_sensitive=False), default="text", show_default=True,
              envvar=LOG_FORMAT_ENV, show_envvar=True,
              help="text: one readable line per record. json: one JSON object per line on stderr (ts, level, "
                   "logger, msg; exc_type and exc with an exception), for log pipelines (docs/operations.md).")
def worker_command(broker_url: str | None, pool: str | None, sim_dir: Path | None, state_dir: Path | None,
                   tee: str | None, metrics_port: int | None, metrics_addr: str, health_port: int | None,
                   rotate_every: float | None, rotation_grace: float, collateral_dir: Path | None,
                   join_without_collateral: bool, print_measurement: bool, log_level: str, log_format: str) -> None:
    """Run an enclave worker for one pool, inside a TEE or in the clearly labelled simulation.

    The worker answers attestation challenges with fresh evidence binding its pool key and the
    producer's nonce, holds uploaded models in sealed storage, runs jobs and sends back sealed
    results. It runs until SIGTERM or SIGINT, then finishes in-flight jobs, returns the rest to
    the queue and exits 0. Exit 3 means it refused to start (e.g. the requested TEE is not there,
    its state directory is in use by another worker, or it was not admitted to its pool).

    \b
    --tee chooses where the evidence comes from:
      auto   detect the TEE (configfs-tsm, Gramine, /dev/nsm); refuse to start
             if there is none: it never falls back to simulation
      sim    the simulation: evidence signed by the key in --sim-dir; no
             confidentiality against whoever runs this machine, accepted only
             by policies that allow simulation
      sgx    Intel SGX under Gramine: DCAP quotes from /dev/attestation (the
             manifest must set sgx.remote_attestation = "dcap")
      tdx    Intel TDX guest: quotes from Linux configfs-tsm
             (/sys/kernel/config/tsm/report, Linux 6.7+)
      snp    AMD SEV-SNP guest: reports from Linux configfs-tsm
      nitro  AWS Nitro Enclave (/dev/nsm): recognised, not supported in this build

    \b
    Sealing: SGX under Gramine seals with EGETKEY (MRENCLAVE), SEV-SNP with a
    key the AMD secure processor derives for this launch image
    (/dev/sev-guest); with a persistent --state-dir pool keys and models
    survive a restart. TDX and Nitro have no sealing key: a restarted worker
    gets them again from a live member of its pool; if every worker of the
    pool stops, the pool is founded anew and producers attest and upload
    their models again.

    \b
    Pools: workers on one host or many share a pool when they run exactly the
    same image: simulated workers with the same --sim-dir, workers on genuine
    hardware with the same measurement (each admits only its own; see
    docs/multi-host.md). A new worker joins by mutual attestation; each needs
    a --state-dir of its own. Exit 3 also means this worker was not admitted,
    or, on a TEE without a join policy, that the pool already has a worker.
    Keys rotate with `enclaveq pool rotate` or --rotate-every.

    \b
    Collateral: on SGX, TDX and SEV-SNP a worker judges the TCB of workers
    joining its pool (and of the members it joins) with --collateral DIR
    (`enclaveq collateral fetch`; default: the collateral cache if it
    exists). Without any, the worker joins no pool and admits no peer unless
    --join-without-collateral; then their TCB is not evaluated, and it says so.

    \b
    Examples:
      enclaveq worker --broker amqp://guest:guest@127.0.0.1:5672/ --pool demo --sim-dir ./sim
      enclaveq worker --broker amqp://guest:guest@10.0.0.5:5672/ --pool demo --tee auto
      enclaveq worker --broker amqp://guest:guest@10.0.0.5:5672/ --pool demo --tee tdx --collateral ./collateral
    """
    from enclave_worker.measurement import measure_worker

    config = DEFAULT_WORKER_CONFIG
    if tee is None:
        tee = "sim" if sim_dir is not None else "auto"
    if tee == "sim" and sim_dir is None:
        raise click.UsageError("Missing option '--sim-dir': the simulation (--tee sim) needs the directory "
                               "made by `enclaveq sim init --dir DIR`")
    if tee != "sim" and sim_dir is not None:
        raise click.UsageError(f"--sim-dir is only for --tee sim; --tee {tee} takes its evidence from the TEE")
    if print_measurement:
        if tee != "sim":
            raise click.UsageError(
                "--print-measurement prints the simulated worker's measurement (--tee sim). On a real TEE "
                "the hardware reports the measurement to pin: SGX MRENCLAVE (gramine-sgx-sign), TDX MRTD "
                "and RTMRs, the SNP launch measurement, Nitro PCRs (nitro-cli build-enclave)")
        click.echo(measure_worker(config.measured()).value.hex())
        return
    if not broker_url or not pool:
        raise click.UsageError("--broker and --pool are required to run a worker")
    if rotation_grace > config.max_rotation_grace_seconds:
        raise click.UsageError(f"--rotation-grace must not exceed {config.max_rotation_grace_seconds:g}s, the "
                               "measured configuration's max_rotation_grace_seconds")
    if rotate_every is not None and rotate_every < 1:
        raise click.UsageError("--rotate-every must be at least 1s")
    rotation = {"rotate_every": rotate_every, "rotation_grace": rotation_grace}
    # Where the worker's peers' collateral comes from (real TEEs judge their TCB with it).
    collateral = collateral_source_for(collateral_dir) if tee != "sim" else None
    if join_without_collateral and collateral_dir is not None:
        raise click.UsageError("--join-without-collateral waives what --collateral gives: pass one of them")
    metrics = (metrics_addr, metrics_port, health_port)
    configure_logging(log_level, log_format)
    try:
        if sim_dir is not None:  # --tee sim (checked above)
            asyncio.run(_serve(broker_url, pool, tee, sim_dir, state_dir or sim_dir / "state", metrics, rotation))
        elif state_dir is not None:
            asyncio.run(_serve(broker_url, pool, tee, None, state_dir, metrics, rotation,
                               explicit_state_dir=True, collateral=collateral,
                               join_without_collateral=join_without_collateral))
        else:
            with tempfile.TemporaryDirectory(prefix="enclaveq-state-") as scratch:
                asyncio.run(_serve(broker_url, pool, tee, None, Path(scratch), metrics, rotation,
                                   collateral=collateral, join_without_collateral=join_without_collateral))
    except Exception as exc:
        if log_format == "json":
            exit_as_a_record(exc)
        if not isinstance(exc, WorkerStartupError):
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_REFUSED)


def exit_as_a_record(exc: Exception) -> NoReturn:
    """With --log-format json a log pipeline reads stderr: the error that ends the worker is a
    record too, in the words and with the exit code exits.py gives it (a bug: its traceback)."""
    log = logging.getLogger("enclaveq.worker")
    if not reportable(exc):
        log.error("the worker failed", exc_info=exc)
        sys.exit(EXIT_FAILED)
    log.error("error: %s", describe(exc), exc_info=exc if debug_wanted(sys.argv[1:]) else None)
    sys.exit(exit_code_of(exc))


def refuse_unopenable_state(state_dir: Path, pool: str) -> None:
    """On TDX and Nitro (and SGX/SNP without their sealing key) the sealing key is ephemeral:
    state sealed by an earlier run can never be opened, so say so plainly instead of failing
    later with "does not unseal"."""
    stale = Path(state_dir) / pool / "pool.sealed"
    if stale.exists():
        raise WorkerStartupError(
            f"{stale} was sealed by an earlier worker; this TEE gives no sealing key that survives a "
            "restart (TDX and Nitro have none), so it cannot be opened again. Remove it (the worker then "
            "gets the pool key from a live member, or founds the pool anew) or omit --state-dir.")


@contextlib.contextmanager
def endpoint_refusal(what: str, addr: str, port: int) -> Iterator[None]:
    """An endpoint that cannot be served (the address does not resolve or is not this host's,
    the port is taken or privileged) refuses the start in one line, like any other refusal."""
    try:
        yield
    except OSError as exc:
        # asyncio's bind error wraps the system's words in its own ("error while attempting to bind
        # on address (...): address already in use"): the system's words, from the errno, suffice.
        code = exc.errno
        if code is not None and code > 0 and not isinstance(exc, socket.gaierror):
            reason = os.strerror(code)
        else:  # a name that does not resolve: getaddrinfo's own words
            reason = exc.strerror or str(exc) or type(exc).__name__
        where = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        raise WorkerStartupError(f"cannot serve {what} on {where}: {reason[:1].lower()}{reason[1:]}") from None


async def _serve(broker_url: str, pool: str, tee: str, sim_dir: Path | None, state_dir: Path,
                 metrics: tuple[str, int | None, int | None],
                 rotation: dict[str, Any], explicit_state_dir: bool = False, collateral: Any = None,
                 join_without_collateral: bool = False) -> None:
    from enclave_worker.health import HealthServer
    from enclave_worker.platform import sim_identity, tee_identity
    from enclave_worker.worker import Worker

    # Every WorkerConfig field is measured: the worker runs exactly the configuration it attests.
    config = DEFAULT_WORKER_CONFIG
    if sim_dir is not None:  # --tee sim
        identity = sim_identity(sim_dir, config)
    else:
        identity = tee_identity(tee, config, collateral=collateral, join_without_collateral=join_without_collateral)
        if explicit_state_dir and not identity.persistent_sealing:
            refuse_unopenable_state(state_dir, pool)
    worker = Worker(broker_url=broker_url, pool=pool, identity=identity, state_dir=state_dir, config=config,
                    **rotation)
    metrics_addr, metrics_port, health_port = metrics
    if metrics_port:
        with endpoint_refusal("metrics", metrics_addr, metrics_port):
            worker.metrics.serve(metrics_port, addr=metrics_addr)
    health = HealthServer(lambda: worker.ready)
    if health_port:
        with endpoint_refusal("health checks", metrics_addr, health_port):
            await health.start(health_port, metrics_addr)  # live at once; ready once started below
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await worker.start()
    logging.getLogger("enclaveq.worker").info("ready; send SIGTERM or SIGINT to stop")
    await stop.wait()
    logging.getLogger("enclaveq.worker").info("stopping: finishing in-flight jobs")
    await worker.stop()
    await health.close()
