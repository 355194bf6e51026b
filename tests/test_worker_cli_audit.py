"""`enclaveq worker` audit: what its help says, how it refuses bad endpoint options and endpoints
it cannot serve, and one worker per state directory.

The command-line rows run the real `enclaveq worker` in its own process with a simulation
directory, on RabbitMQ, each on a pool of its own (deleted afterwards by the ``rabbitmq_url``
fixture). A bad option is exit 2 and a refused start exit 3, each one line, never a traceback.
The in-process rows check that a ``Worker`` holds its state directory's lock only while it runs.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker_adapters.errors import BrokerUnavailable
from enclave_worker.errors import WorkerStartupError

from .processes import ROOT, WorkerProcess, enclaveq
from .support import running_worker

# A refused start happens before the worker connects to anything: it must not take long.
REFUSAL_SECONDS = 30


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("worker-cli-audit")
    enclaveq("sim", "init", "--dir", str(root / "sim"))
    return root / "sim"


@pytest.fixture
def listening() -> Iterator[int]:
    """A port something else already listens on (127.0.0.1)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield int(taken.getsockname()[1])


def worker_run(url: str, pool: str, sim: Path, *extra: str) -> subprocess.CompletedProcess:
    """`enclaveq worker` expected to exit by itself (a refusal); killed and failed if it does not."""
    args = [sys.executable, "-m", "enclaveq", "worker", "--broker", url, "--pool", pool, "--sim-dir", str(sim), *extra]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=REFUSAL_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the worker started instead of refusing to:\n{err[-3000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def assert_refused(result: subprocess.CompletedProcess, code: int, says: str) -> str:
    """Exit ``code``, no traceback, exactly one error line, which contains ``says``; that line."""
    shown = f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert result.returncode == code, shown
    assert "Traceback" not in result.stderr + result.stdout, shown
    errors = [line for line in result.stderr.splitlines() if line.startswith(("error:", "Error:"))]
    assert len(errors) == 1, shown
    assert says in errors[0], shown
    return errors[0]


def help_text() -> str:
    return " ".join(enclaveq("worker", "--help").stdout.split())


# -- the help says what the worker does ------------------------------------------------------------


def test_the_help_says_what_happens_without_collateral_to_a_longer_grace_and_to_a_second_worker():
    text = help_text()
    # Collateral: without any, the worker joins no pool unless --join-without-collateral.
    collateral = text[text.index("Collateral:"):text.index("Examples:")]
    assert "joins no pool and admits no peer unless --join-without-collateral" in collateral, collateral
    # --rotation-grace: a longer grace than the measured maximum is refused, with or without --rotate-every.
    assert "capped" not in text and "caps it" not in text
    start = text.index("--rotation-grace DURATION")
    grace = text[start:text.index("--collateral", start)]
    assert "refused" in grace and "With --rotate-every" not in grace, grace
    # A second simulated worker joins; "the pool already has a worker" only without a join policy.
    assert "simulated workers" in text and "without a join policy" in text, text


# -- bad endpoint options: exit 2; endpoints that cannot be served: exit 3 ---------------------------


def test_a_metrics_port_out_of_range_is_a_usage_error(rabbitmq_url, pool, sim):
    assert_refused(worker_run(rabbitmq_url, pool, sim, "--metrics-port", "70000"), 2, "--metrics-port")


def test_a_metrics_port_already_in_use_refuses_the_start_in_one_line(rabbitmq_url, pool, sim, listening):
    line = assert_refused(worker_run(rabbitmq_url, pool, sim, "--metrics-port", str(listening)), 3,
                          f"cannot serve metrics on 127.0.0.1:{listening}")
    assert "address already in use" in line.lower(), line


def test_a_health_port_already_in_use_refuses_the_start_in_one_line(rabbitmq_url, pool, sim, listening):
    line = assert_refused(worker_run(rabbitmq_url, pool, sim, "--health-port", str(listening)), 3,
                          f"on 127.0.0.1:{listening}")
    assert "health" in line and "address already in use" in line.lower(), line


def test_a_metrics_address_that_does_not_resolve_refuses_the_start_in_one_line(rabbitmq_url, pool, sim):
    assert_refused(worker_run(rabbitmq_url, pool, sim, "--metrics-addr", "999.1.1.1", "--metrics-port", "9"), 3,
                   "cannot serve metrics on 999.1.1.1:9")


# -- one worker per state directory ------------------------------------------------------------------


def test_a_second_worker_on_a_state_directory_in_use_is_refused_and_a_new_one_starts_once_it_is_free(
        rabbitmq_url, pool, sim, tmp_path):
    state = tmp_path / "state"
    first = WorkerProcess(rabbitmq_url, pool, sim, tmp_path / "first.log", "--state-dir", str(state)).wait_ready()
    try:
        line = assert_refused(worker_run(rabbitmq_url, pool, sim, "--state-dir", str(state)), 3,
                              "is in use by another worker")
        assert str(state) in line and f"pid {first.proc.pid}" in line, line
        assert first.proc.poll() is None, first.log()  # the first keeps running
        assert first.terminate() == 0, first.log()
    finally:
        first.close()
    again = WorkerProcess(rabbitmq_url, pool, sim, tmp_path / "again.log", "--state-dir", str(state)).wait_ready()
    try:
        assert again.terminate() == 0, again.log()
    finally:
        again.close()
    assert "Traceback" not in first.log() + again.log()


async def test_an_in_process_worker_holds_its_state_directory_only_while_it_runs(tee, memory_url, pool):
    first, second = tee.worker(memory_url, pool), tee.worker(memory_url, pool)
    await first.start()
    try:
        lock = first.sealed_state.dir / "worker.lock"
        assert stat.S_IMODE(lock.lstat().st_mode) == 0o600
        assert lock.read_text().split() == [str(os.getpid())]
        with pytest.raises(WorkerStartupError, match=f"{re.escape(str(first.sealed_state.dir))} is in use by "
                                                     f"another worker \\(pid {os.getpid()}\\)"):
            await second.start()
    finally:
        await second.stop()
        await first.stop()
    async with running_worker(tee, memory_url, pool) as again:  # released at stop, not at process exit
        assert again.keyring.has_keys


async def test_a_worker_whose_start_fails_releases_its_state_directory(tee, memory_url, pool):
    failed = tee.worker(memory_url, pool)

    async def unreachable() -> None:
        raise BrokerUnavailable("the broker is not there")

    failed._broker.connect = unreachable
    with pytest.raises(BrokerUnavailable):
        await failed.start()
    async with running_worker(tee, memory_url, pool) as again:  # no stop() needed after a failed start
        assert again.keyring.has_keys


async def test_a_lock_file_that_is_a_symlink_is_never_followed(tee, memory_url, pool, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("not the worker's\n")
    folder = tee.state_dir / pool
    folder.mkdir(parents=True)
    (folder / "worker.lock").symlink_to(target)
    worker = tee.worker(memory_url, pool)
    with pytest.raises(WorkerStartupError, match="worker.lock"):
        await worker.start()
    await worker.stop()
    assert target.read_text() == "not the worker's\n"
