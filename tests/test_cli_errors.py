"""Every mistake a user makes gets one clear line and the right exit code (issue 14).

A table of mistakes, each run through the real command line in its own process: the exit code
(0 success, 1 the operation failed, 2 usage or input error, 3 a worker refused to start, 130
interrupted), one line on stderr naming the problem, no traceback, and never a password.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import numpy as np

import aio_pika

from bench.backpressure import ready_count
from producer_sdk.core import inbox_name

from .processes import ROOT, enclaveq
from .support import batch_of, mlp_model
from .test_pipeline_sdk import write_pipeline
from .test_cli import conn, deployment  # noqa: F401 - the worker process fixture of the CLI tests

SECRET = "s3cr@t-pa55"


@dataclass(frozen=True)
class Mistake:
    args: tuple[str, ...]
    code: int
    says: str


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-errors")
    enclaveq("sim", "init", "--dir", str(root / "sim"))
    enclaveq("policy", "init", "--sim-dir", str(root / "sim"), "--out", str(root / "policy.toml"))
    (root / "empty.toml").write_text("")
    (root / "broken.toml").write_text("measurements = [\n")
    (root / "unknown-key.toml").write_text((root / "policy.toml").read_text() + "\nfavourite_colour = 'blue'\n")
    (root / "not-a-key.pem").write_text("not a key at all\n")
    return {"dir": root, "sim": root / "sim", "policy": root / "policy.toml"}


def attest(url: str, policy: Path, *extra: str) -> tuple[str, ...]:
    return ("attest", "--broker", url, "--pool", "cli-errors", "--policy", str(policy), "--timeout", "10", *extra)


def connection(sim: dict[str, Path]) -> tuple[str, ...]:
    # A broker nothing listens on: every mistake below is caught before anything connects.
    return ("--broker", f"amqp://guest:{SECRET}@127.0.0.1:{unused_port()}/", "--pool", "p", "--policy",
            str(sim["policy"]))


MODEL_ID = "ab" * 32


def unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assert_one_clear_line(result: subprocess.CompletedProcess, mistake: Mistake) -> None:
    shown = f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert result.returncode == mistake.code, shown
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, shown
    assert SECRET not in result.stderr + result.stdout, shown
    assert mistake.says in result.stderr, shown
    errors = [line for line in result.stderr.splitlines() if line.startswith(("error:", "Error:"))]
    assert len(errors) == 1, shown


BAD_URLS = [
    pytest.param("foo://127.0.0.1/", "unsupported broker URL scheme 'foo'", id="unknown scheme"),
    pytest.param(f"amqp://guest:{SECRET}@127.0.0.1:notaport/", "is not a number from 1 to 65535", id="port not a number"),
    pytest.param(f"guest:{SECRET}@127.0.0.1:5672", "is not a broker URL", id="no scheme"),
]


@pytest.mark.parametrize("url, says", BAD_URLS)
@pytest.mark.parametrize("command", ["attest", "worker"])
def test_a_bad_broker_url_is_a_usage_error_in_every_command(sim, url, says, command):
    args = attest(url, sim["policy"]) if command == "attest" else ("worker", "--broker", url, "--pool", "p",
                                                                   "--sim-dir", str(sim["sim"]))
    assert_one_clear_line(enclaveq(*args, check=False), Mistake(args, 2, says))


@pytest.mark.parametrize("policy, says", [
    ("empty.toml", "policy key 'measurements' is missing"),
    ("broken.toml", "is not valid TOML"),
    ("unknown-key.toml", "favourite_colour"),
], ids=["empty", "invalid TOML", "unknown key"])
def test_attest_names_what_is_wrong_in_a_policy_file(sim, policy, says):
    args = attest("amqp://guest:guest@127.0.0.1:5672/", sim["dir"] / policy)
    assert_one_clear_line(enclaveq(*args, check=False), Mistake(args, 2, says))


@pytest.mark.parametrize("scheme", ["amqp", "mqtt"])
def test_a_broker_that_is_not_there_is_named_with_its_address(sim, scheme):
    port = unused_port()
    args = attest(f"{scheme}://guest:{SECRET}@127.0.0.1:{port}/", sim["policy"])
    assert_one_clear_line(enclaveq(*args, check=False), Mistake(args, 1, f"no broker listens on 127.0.0.1:{port}"))


@pytest.mark.parametrize("scheme", ["amqp", "mqtt"])
def test_a_broker_that_is_not_there_is_one_line_naming_its_url_once(sim, scheme):
    # It read "cannot reach the broker at URL: cannot connect to URL: ..." (and, over MQTT, five
    # more lines of the MQTT client's warnings).
    port = unused_port()
    args = attest(f"{scheme}://guest:{SECRET}@127.0.0.1:{port}/", sim["policy"])
    result = enclaveq(*args, check=False)
    assert_one_clear_line(result, Mistake(args, 1, f"cannot connect to {scheme}://***@127.0.0.1:{port}/: "))
    assert result.stderr.count(f"127.0.0.1:{port}/") == 1, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.rabbitmq
def test_a_wrong_password_is_said_as_such(sim, rabbitmq_url):
    args = attest(f"amqp://guest:{SECRET}@127.0.0.1:5672/", sim["policy"])
    assert_one_clear_line(enclaveq(*args, check=False), Mistake(args, 1, "refused the user name or password"))


@pytest.mark.rabbitmq
def test_an_unknown_virtual_host_is_named(sim, rabbitmq_url):
    args = attest("amqp://guest:guest@127.0.0.1:5672/no-such-vhost", sim["policy"])
    assert_one_clear_line(enclaveq(*args, check=False), Mistake(args, 1, "virtual host 'no-such-vhost' does not exist"))


@pytest.mark.rabbitmq
@pytest.mark.parametrize("url, says", [
    (f"amqp://guest:{SECRET}@127.0.0.1:5672/", "refused the user name or password"),
    ("amqp://guest:guest@127.0.0.1:5672/no-such-vhost", "virtual host 'no-such-vhost' does not exist"),
    ("amqp://guest:guest@127.0.0.1:{port}/", "no broker listens on 127.0.0.1:{port}"),
], ids=["wrong password", "wrong vhost", "wrong port"])
def test_a_worker_that_cannot_reach_its_broker_says_why_in_one_line_and_stops(sim, rabbitmq_url, url, says):
    port = unused_port()
    args = ("worker", "--broker", url.format(port=port), "--pool", "cli-errors", "--sim-dir", str(sim["sim"]),
            "--state-dir", str(sim["dir"] / "state"))
    result = enclaveq(*args, check=False)
    assert_one_clear_line(result, Mistake(args, 1, says.format(port=port)))
    assert len(result.stderr.splitlines()) <= 3, result.stderr  # the simulation warning, the error


def test_a_worker_whose_state_directory_cannot_be_used_refuses_to_start(sim, tmp_path):
    not_a_directory = tmp_path / "state"
    not_a_directory.write_text("a file")
    args = ("worker", "--broker", "memory://cli-errors", "--pool", "cli-errors", "--sim-dir", str(sim["sim"]),
            "--state-dir", str(not_a_directory))
    assert_one_clear_line(enclaveq(*args, check=False), Mistake(args, 3, f"{not_a_directory}"))


@pytest.mark.parametrize("make_args, says", [
    (lambda d: ("keys", "show", str(d / "missing.key")), "no key file at"),
    (lambda d: ("keys", "show", str(d / "policy.toml")), "is not a PEM Ed25519"),
    (lambda d: ("policy", "init", "--sim-dir", str(d / "missing-sim"), "--out", str(d / "p.toml")),
     "create it with `enclaveq sim init"),
], ids=["missing key file", "not a key file", "missing simulation directory"])
def test_files_that_cannot_be_used_are_input_errors(sim, make_args, says):
    args = make_args(sim["dir"])
    assert_one_clear_line(enclaveq(*args, check=False), Mistake(args, 2, says))


def test_debug_shows_the_traceback_of_an_error(sim):
    args = ("--debug", *attest("amqp://guest:guest@127.0.0.1:5672/", sim["dir"] / "empty.toml"))
    result = enclaveq(*args, check=False)
    assert result.returncode != 0 and "Traceback" in result.stderr and "PolicyError" in result.stderr


def interrupted_once(args: tuple[str, ...], condition: Callable[[], bool], what: str) -> tuple[int, str, str]:
    """Run ``enclaveq ARGS`` in a process of its own, press Ctrl-C (SIGINT) once ``condition()``
    holds (bounded: the command must still be running then), and return its exit code and output."""
    proc = subprocess.Popen([sys.executable, "-m", "enclaveq", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline and proc.poll() is None, f"not reached while the command ran: {what}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def _ready_messages(url: str, queue: str) -> int:
    """A RabbitMQ queue's ready messages, asked over AMQP (fast enough to poll; 0 if not there yet)."""
    async def ask() -> int:
        connection = await aio_pika.connect(url)
        async with connection:
            return await ready_count(await connection.channel(), queue) or 0
    return asyncio.run(ask())


@contextlib.contextmanager
def deleted_afterwards(url: str, queue: str) -> Iterator[None]:
    """Delete ``queue`` from RabbitMQ once the block is over, whatever happened in it."""
    async def delete() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            await (await connection.channel()).queue_delete(queue)
    try:
        yield
    finally:
        asyncio.run(delete())


EVENTS = 3000  # published one at a time: seconds of publishing, to be interrupted in the middle


@pytest.mark.rabbitmq
def test_ctrl_c_during_publish_lists_every_event_published_and_stops_publishing(deployment, tmp_path,  # noqa: F811
                                                                                enclaveq_home, unique_name):
    key = tmp_path / "recipient.key"
    public = enclaveq("keys", "generate", "--kind", "recipient", "--out", str(key)).stdout.strip()
    toml = write_pipeline(tmp_path / "chain", name="chain", topics=unique_name, recipients=[bytes.fromhex(public)])
    pipeline_id = enclaveq("pipeline", "create", str(toml), *conn(deployment)).stdout.splitlines()[-1]
    stream = f"enclaveq.{deployment['pool']}.stream.{pipeline_id}"
    inbox = f"enclaveq.inbox.{inbox_name(deployment['pool'], pipeline_id, bytes.fromhex(public))}"
    with deleted_afterwards(deployment["url"], inbox):  # a pipeline's inbox outlives its pool
        events = tmp_path / "events"
        events.mkdir()
        for index, event in enumerate(batch_of(EVENTS)):
            np.savez(events / f"event-{index:04d}.npz", **event)
        # One event at a time: slow enough to be interrupted in the middle.
        returncode, out, err = interrupted_once(
            ("publish", *conn(deployment), "--pipeline", pipeline_id, "--inputs", str(events), "--topic",
             f"{unique_name}/device-1/readings", "--max-in-flight", "1"),
            lambda: _ready_messages(deployment["url"], inbox) >= 5, "five events went through the pipeline")
        assert returncode == 130, err
        assert out == "" and "Traceback" not in err
        listed = {line.split()[1]: line.split()[2] for line in err.splitlines() if line.startswith("published: ")}
        said = [line for line in err.splitlines() if "interrupted" in line]
        assert len(said) == 1 and said[0].startswith(f"interrupted: {len(listed)} of {EVENTS} events were published"), err
        assert 5 <= len(listed) < EVENTS and all(name.startswith("event-") for name in listed)
        # Nothing was published behind the list. Once the worker stopped (it finishes the events it
        # holds and returns the rest), every event that reached the broker is a result in the inbox
        # or still in the stream: the listed ones, and at most the one in flight at the interrupt.
        assert deployment["worker"].terminate() == 0
        reached = _ready_messages(deployment["url"], inbox) + _ready_messages(deployment["url"], stream)
        assert len(listed) <= reached <= len(listed) + 1, (reached, len(listed))


@pytest.mark.rabbitmq
def test_ctrl_c_exits_130_says_so_and_keeps_the_results_already_written(deployment, tmp_path, enclaveq_home):  # noqa: F811
    model = tmp_path / "model.onnx"
    model.write_bytes(mlp_model(seed=7))
    model_id = enclaveq("model", "upload", str(model), *conn(deployment)).stdout.strip().splitlines()[-1]
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for index, job in enumerate(batch_of(400)):
        np.savez(inputs / f"job-{index:04d}.npz", **job)
    # One job at a time, one message each: slow enough to be interrupted in the middle.
    command = ("submit", *conn(deployment), "--model", model_id, "--inputs", str(inputs), "--output", str(output),
               "--max-in-flight", "1", "--frame-jobs", "0")
    returncode, _, err = interrupted_once(
        command, lambda: output.is_dir() and len(list(output.glob("*.npz"))) >= 5, "five results were written")
    assert returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err and "run the same command again" in err
    said = [line for line in err.splitlines() if "interrupted" in line]
    assert len(said) == 1 and said[0].startswith("interrupted: "), err  # said once, with what was kept
    written = sorted(output.glob("*.npz"))
    assert 5 <= len(written) < 400
    for path in written:  # every result kept is whole
        with np.load(path) as data:
            assert data["logits"].shape == (2, 3)
    # As it said: the same command again finishes the batch (and deletes its reply queue, which
    # waited for it on the broker), sending only the jobs without a result.
    again = enclaveq(*command)
    assert f"jobs: {400 - len(written)}  failed: 0" in again.stdout, again.stdout + again.stderr
    assert len(list(output.glob("*.npz"))) == 400 and not (output / ".enclaveq-journal").exists()


def input_files(folder: Path) -> dict[str, Path]:
    np.savez(folder / "archive.npz", x=np.ones(3, np.float32))
    np.save(folder / "x.npy", np.ones(3, np.float32))
    (folder / "empty.npy").write_bytes(b"")
    np.save(folder / "complex.npy", np.ones(3, np.complex64))
    (folder / "text.npy").write_text("not numpy at all")
    (folder / "empty.onnx").write_bytes(b"")
    return {p.name: p for p in folder.iterdir()}


INPUT_MISTAKES = [
    pytest.param(lambda f: ("run", "--model", MODEL_ID, "--input", f"x={f['archive.npz']}", "--output", "o.npz"),
                 "an .npz archive, not a .npy file", id="npz where npy is expected"),
    pytest.param(lambda f: ("run", "--model", MODEL_ID, "--input", f"x={f['complex.npy']}", "--output", "o.npz"),
                 "dtype complex64 is not supported", id="complex input"),
    pytest.param(lambda f: ("run", "--model", MODEL_ID, "--input", f"x={f['text.npy']}", "--output", "o.npz"),
                 "not a .npy file", id="text file as npy"),
    pytest.param(lambda f: ("run", "--model", MODEL_ID, "--input", f"x={f['empty.npy']}", "--output", "o.npz"),
                 "not a .npy file", id="empty file as npy"),
    pytest.param(lambda f: ("run", "--model", MODEL_ID, "--input", f"x={f['complex.npy']}", "--output",
                            "missing/dir/out.npz"), "the directory missing/dir does not exist",
                 id="run output in a missing directory"),
    pytest.param(lambda f: ("model", "delete", "not-an-id"), "is not a model id", id="malformed model id"),
    pytest.param(lambda f: ("model", "delete", MODEL_ID.upper()), "model ids are lower case", id="upper-case model id"),
    pytest.param(lambda f: ("model", "upload", str(f["empty.onnx"])), "the file is empty", id="empty model file"),
    pytest.param(lambda f: ("run", "--timeout", "0", "--model", MODEL_ID, "--input", f"x={f['archive.npz']}",
                            "--output", "o.npz"), "'--timeout': 0.0 is not in the range", id="zero timeout"),
    pytest.param(lambda f: ("run", "--timeout", "-1", "--model", MODEL_ID, "--input", f"x={f['archive.npz']}",
                            "--output", "o.npz"), "'--timeout': -1.0 is not in the range", id="negative timeout"),
    pytest.param(lambda f: ("submit", "--model", MODEL_ID, "--inputs", str(f["archive.npz"].parent), "--output",
                            "out", "--max-in-flight", "0"), "'--max-in-flight': 0 is not in the range",
                 id="no job in flight"),
    pytest.param(lambda f: ("submit", "--model", MODEL_ID, "--inputs", str(f["archive.npz"].parent), "--output",
                            str(f["archive.npz"])), "is a file", id="submit output is a file"),
    pytest.param(lambda f: ("submit", "--model", MODEL_ID, "--inputs", str(f["archive.npz"].parent), "--output",
                            "out", "--failures", "missing/dir/failures.json"),
                 "--failures missing/dir/failures.json: the directory missing/dir does not exist",
                 id="submit failures in a missing directory"),
    pytest.param(lambda f: ("submit", "--model", MODEL_ID, "--inputs", str(f["archive.npz"].parent), "--output",
                            "out", "--failures", "archive.npz/failures.json"),
                 "archive.npz is not a directory", id="submit failures under a file"),
]


@pytest.mark.parametrize("make_args, says", INPUT_MISTAKES)
def test_input_mistakes_are_named_before_anything_is_sent(sim, tmp_path, make_args, says):
    command = make_args(input_files(tmp_path))
    split = 2 if command[0] == "model" else 1
    args = (*command[:split], *connection(sim), *command[split:])
    result = subprocess.run([sys.executable, "-m", "enclaveq", *args], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert_one_clear_line(result, Mistake(args, 2, says))
    if command[0] == "submit":  # refused before anything is sent, or created
        assert not (tmp_path / "out").exists()


# Every command that connects to a pool loads --policy and --producer-key before it connects: a
# file it cannot use is an input error (exit 2) in the line `attest` prints, whatever the command.
CONNECTING_COMMANDS = [
    pytest.param(lambda f: ("attest",), id="attest"),
    pytest.param(lambda f: ("run", "--model", MODEL_ID, "--input", f"x={f['x.npy']}", "--output", "o.npz"), id="run"),
    pytest.param(lambda f: ("submit", "--model", MODEL_ID, "--inputs", str(f["archive.npz"].parent), "--output",
                            "out"), id="submit"),
    pytest.param(lambda f: ("model", "list"), id="model list"),
    pytest.param(lambda f: ("model", "upload", str(f["model.onnx"])), id="model upload"),
    pytest.param(lambda f: ("pipeline", "list"), id="pipeline list"),
    pytest.param(lambda f: ("publish", "--pipeline", MODEL_ID, "--text", "hello"), id="publish"),
]

UNUSABLE_FILES = [
    pytest.param("--policy", "empty.toml", "empty.toml: policy key 'measurements' is missing", id="empty policy"),
    pytest.param("--policy", "broken.toml", "is not valid TOML", id="invalid TOML policy"),
    pytest.param("--policy", "unknown-key.toml", "favourite_colour", id="policy with an unknown key"),
    pytest.param("--producer-key", "not-a-key.pem", "not-a-key.pem is not a PEM Ed25519", id="bad producer key"),
]


@pytest.mark.parametrize("option, name, says", UNUSABLE_FILES)
@pytest.mark.parametrize("make_args", CONNECTING_COMMANDS)
def test_a_policy_or_producer_key_that_cannot_be_used_is_an_input_error_in_every_command(
        sim, tmp_path, make_args, option, name, says):
    files = input_files(tmp_path)
    files["model.onnx"] = tmp_path / "model.onnx"
    files["model.onnx"].write_bytes(b"not empty")
    command = make_args(files)
    split = 2 if command[0] in ("model", "pipeline") else 1
    given = {"--policy": str(sim["policy"]), option: str(sim["dir"] / name)}
    args = (*command[:split], "--broker", f"amqp://guest:{SECRET}@127.0.0.1:{unused_port()}/", "--pool", "p",
            *(item for pair in given.items() for item in pair), "--timeout", "5", *command[split:])
    result = subprocess.run([sys.executable, "-m", "enclaveq", *args], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert_one_clear_line(result, Mistake(args, 2, says))


@pytest.mark.parametrize("command", [("run",), ("submit",), ("attest",), ("model", "list"), ("model", "delete"),
                                     ("model", "upload"), ("sim", "init"), ("policy", "init")])
def test_every_command_help_shows_an_example(command):
    assert "Example" in enclaveq(*command, "--help").stdout


def test_sim_init_force_warns_that_sealed_state_will_not_open_any_more(sim, tmp_path):
    again = tmp_path / "sim"
    enclaveq("sim", "init", "--dir", str(again))
    result = enclaveq("sim", "init", "--dir", str(again), "--force")
    assert "will no longer unseal" in result.stderr


def test_sim_init_on_an_existing_directory_names_the_option_not_the_python_argument(sim, tmp_path):
    again = tmp_path / "sim"
    enclaveq("sim", "init", "--dir", str(again))
    args = ("sim", "init", "--dir", str(again))
    result = enclaveq(*args, check=False)
    assert_one_clear_line(result, Mistake(args, 2, "already holds a simulation directory"))
    assert "pass --force to replace it" in result.stderr and "force=True" not in result.stderr, result.stderr


@pytest.mark.rabbitmq
def test_model_list_on_a_pool_without_models_says_so(deployment):  # noqa: F811
    result = enclaveq("model", "list", *conn(deployment))
    assert result.stdout == "" and "no models on pool" in result.stderr


@pytest.mark.rabbitmq
async def test_attest_timeout_bounds_the_wait_for_evidence(sim, rabbitmq_url, unique_name):
    # A "worker" that takes challenges and never answers: only --timeout ends the wait.
    from broker_adapters import open_broker

    async def ignore(delivery):
        await delivery.ack()

    async with open_broker(rabbitmq_url) as broker:
        await broker.declare_pool(unique_name)
        await broker.consume_control(unique_name, ignore)
        args = ("attest", "--broker", rabbitmq_url, "--pool", unique_name, "--policy", str(sim["policy"]),
                "--timeout", "2")
        started = time.monotonic()
        result = await asyncio.to_thread(enclaveq, *args, check=False)
        waited = time.monotonic() - started
    assert_one_clear_line(result, Mistake(args, 1, "answered the attestation challenge within 2"))
    assert waited < 9, f"attest waited {waited:.1f} s: the fixed 10 s, not --timeout 2"


def test_pool_status_on_a_pipe_is_one_whole_line_per_member_however_long_its_worker_id(capsys):
    from enclaveq.cli.producer import _print_members
    from protocol.bodies import MemberStatus

    worker_id = "worker-[bold]-" + "k8s-pod-name-" * 16
    member = MemberStatus(worker_id=worker_id, platform="sim", measurement=b"\x01" * 32, epoch=1, model_count=2,
                          model_ids=(), pipelines=0, jobs_in_flight=0, max_jobs_in_flight=8, jobs_ok=5,
                          jobs_failed=0, uptime_seconds=100, max_batch_rows=64, ready=True)
    _print_members([member], 1)
    header, row = capsys.readouterr().out.splitlines()  # captured: not a terminal
    assert header.split() == ["WORKER", "PLATFORM", "MEASUREMENT", "EPOCH", "READY", "MODELS", "PIPELINES", "IN",
                              "FLIGHT", "OK", "FAILED", "UPTIME", "BATCH", "ROWS"]
    assert row.split() == [worker_id, "sim", "0101010101010101...", "1", "yes", "2", "0", "0/8", "5", "0", "1m40s",
                           "64"]
