"""Shared fixtures: which real brokers and vectors are available, how to treat their absence, and
the pools, brokers and simulated TEEs the tests run on.

Without ENCLAVEQ_REQUIRE_BROKERS / ENCLAVEQ_VECTORS a missing RabbitMQ, Mosquitto, rabbitmqctl or
vector folder skips the tests that need it, with the reason. With them (as `.ci/run` sets) the
same absence is a failure, so CI can never go green by skipping.

A test is marked ``rabbitmq``, ``mosquitto`` or ``vectors`` by asking for the fixture that needs
it (``-m rabbitmq`` selects them; nobody decorates tests by hand). The fixtures import the code
under test only when they run, so a package that is broken for a moment fails the tests that use
it, not the collection of the whole suite.

Plain helpers (timeouts, waiting for an event, batches, direct onnxruntime runs) live in
``tests/support.py``; worker processes in ``tests/processes.py``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .mosquitto import PrivateMosquitto
    from .mqtt_spy import Spy as MqttSpy

RABBITMQ_URL = os.environ.get("ENCLAVEQ_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
MOSQUITTO_URL = os.environ.get("ENCLAVEQ_MQTT_URL", "mqtt://127.0.0.1:1883/")
REQUIRE_BROKERS = os.environ.get("ENCLAVEQ_REQUIRE_BROKERS") == "1"

# The fixture a test asks for -> the marker it gets.
MARKER_OF_FIXTURE = {"rabbitmq_url": "rabbitmq", "rabbitmqctl": "rabbitmq", "mosquitto_url": "mosquitto",
                     "tls_mosquitto": "mosquitto", "private_mosquitto": "mosquitto",
                     "vectors_dir": "vectors"}


def pytest_itemcollected(item: pytest.Item) -> None:
    """Mark each test by the fixtures it needs, at collection, so that ``-m`` can select on them.

    The fixtures add the same marker when they run (for tests that ask for them dynamically);
    selection happens before any fixture runs, hence this hook. ``broker_url``'s RabbitMQ half
    carries its marker in its parameter."""
    for fixture in getattr(item, "fixturenames", ()):
        if fixture in MARKER_OF_FIXTURE:
            item.add_marker(MARKER_OF_FIXTURE[fixture])
    # Tests that run alone, in `make test`'s second, serial pass (the first runs the others on two
    # processes): the firehose traces every message of the shared broker, so no other test may
    # publish meanwhile; the compose stack builds images and runs five containers on the machine's
    # two cores. (Others mark themselves `serial`: the three-node cluster, the 300 MiB model.)
    if "firehose" in getattr(item, "fixturenames", ()) or item.get_closest_marker("compose"):
        item.add_marker("serial")


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _need(available: bool, what: str, problem: str = "not reachable") -> None:
    if available:
        return
    if REQUIRE_BROKERS:
        pytest.fail(f"{what} is required (ENCLAVEQ_REQUIRE_BROKERS=1) but {problem}")
    pytest.skip(f"{what} {problem}; set ENCLAVEQ_REQUIRE_BROKERS=1 to make this a failure")


@pytest.fixture(autouse=True)
def enclaveq_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$ENCLAVEQ_HOME in tmp_path for every test: no test reads or writes the real ~/.config/enclaveq
    (the default owner key, the producer's remembered pool epochs). Tests that need it ask for it.
    Likewise no default collateral cache: a machine's ~/.cache/enclaveq/collateral (which every
    verifying command reads when it exists) would change what a test checks."""
    home = tmp_path / "enclaveq-home"
    monkeypatch.setenv("ENCLAVEQ_HOME", str(home))
    monkeypatch.delenv("ENCLAVEQ_COLLATERAL_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return home


@pytest.fixture(autouse=True)
def fresh_log_budget() -> None:
    """Each test starts with the worker's full budget of flood-caused log lines, as a new worker
    process would: one test's flood must not silence the line another test looks for."""
    from enclave_worker.budget import noisy

    noisy.reset()


# -- what the machine provides ----------------------------------------------------------------


@pytest.fixture
async def rabbitmq_url(request: pytest.FixtureRequest, unique_name: str) -> AsyncIterator[str]:
    """The RabbitMQ broker. Afterwards the pool named ``unique_name`` (the ``pool`` fixture) is
    deleted from it, whatever the test declared, and the pipeline inboxes the test declared itself,
    so the shared broker keeps no leftovers."""
    request.node.add_marker("rabbitmq")
    _need(_listening("127.0.0.1", 5672), "RabbitMQ on 127.0.0.1:5672")
    yield RABBITMQ_URL
    await _delete_what_the_test_left(RABBITMQ_URL, unique_name)


@pytest.fixture
def rabbitmqctl(request: pytest.FixtureRequest):
    """The local RabbitMQ node's `rabbitmqctl` (topology listings, closing connections, tracing)."""
    request.node.add_marker("rabbitmq")
    path = shutil.which("rabbitmqctl")
    _need(path is not None, "rabbitmqctl", "not installed")
    from .support import Rabbitmqctl

    return Rabbitmqctl(path)


@pytest.fixture
async def mosquitto_url(request: pytest.FixtureRequest, unique_name: str) -> AsyncIterator[str]:
    """The Mosquitto broker. Afterwards the pool named ``unique_name`` is deleted from it (its
    retained records and persistent sessions), and the pipeline inboxes the test declared itself,
    so the shared broker keeps no leftovers."""
    request.node.add_marker("mosquitto")
    _need(_listening("127.0.0.1", 1883), "Mosquitto on 127.0.0.1:1883")
    yield MOSQUITTO_URL
    await _delete_what_the_test_left(MOSQUITTO_URL, unique_name)


async def _delete_what_the_test_left(url: str, pool: str) -> None:
    """The pool ``pool`` on the broker at ``url``, and the pipeline inboxes the test declared there
    itself (``support.DECLARED_INBOXES``: an inbox outlives its pool)."""
    from broker_adapters import open_broker

    from .support import DECLARED_INBOXES

    async with open_broker(url) as broker:
        await broker.delete_pool(pool)
        for declared in [entry for entry in DECLARED_INBOXES if entry[0] == url]:
            DECLARED_INBOXES.discard(declared)
            await broker.delete_inbox(declared[1])


@pytest.fixture
async def firehose(rabbitmq_url, rabbitmqctl):
    """Every body and header RabbitMQ carries while the test runs, copied by its firehose tracer."""
    import aio_pika

    captured: list[bytes] = []
    connection = await aio_pika.connect(rabbitmq_url)
    channel = await connection.channel()
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind("amq.rabbitmq.trace", routing_key="#")

    async def keep(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        captured.append(message.body)
        for value in (message.headers or {}).values():
            captured.append(repr(value).encode())
        await message.ack()
    await queue.consume(keep)
    await asyncio.to_thread(rabbitmqctl, "trace_on")
    try:
        yield captured
    finally:
        await asyncio.to_thread(rabbitmqctl, "trace_off")
        await connection.close()


@pytest.fixture
async def mqtt_spy(private_mosquitto: PrivateMosquitto) -> AsyncIterator[MqttSpy]:
    """A client of ``private_mosquitto`` subscribed to `#` for the whole test, keeping everything."""
    from .mqtt_spy import Spy

    spy = Spy("127.0.0.1", private_mosquitto.port)
    await spy.start()
    yield spy
    await spy.stop()


@pytest.fixture
def lone_founder(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests with an MQTT spy (``mqtt_spy``). The spy's `#` matches the control channel, so the founder's join request and model sync
    request are routable (not refused as having no subscriber): it listens for members that do
    not exist, two join rounds of 1.5 s and 30 s of model sync silence. Shorter here: a lone
    worker hears nobody either way, and it publishes the same messages for the spy to see."""
    monkeypatch.setattr("enclave_worker.membership.JOIN_WAIT_SECONDS", 0.2)
    monkeypatch.setattr("enclave_worker.model_sync.MODEL_WAIT_SECONDS", 0.5)


@pytest.fixture
def private_mosquitto(tmp_path: Path) -> Iterator[PrivateMosquitto]:
    """A Mosquitto of the test's own (own port, config and persistence), for tests that restart it."""
    from .mosquitto import PrivateMosquitto

    broker = PrivateMosquitto(tmp_path / "mosquitto").start()
    yield broker
    broker.stop()


@pytest.fixture
def private_rabbitmq(request: pytest.FixtureRequest, tmp_path: Path):
    """A RabbitMQ node of the test's own (own name, ports, data and cookie), for tests that stop it."""
    request.node.add_marker("rabbitmq")
    from .rabbitmq_node import PrivateRabbitmq

    node = PrivateRabbitmq(tmp_path / "rabbitmq").start()
    yield node
    node.stop()


@pytest.fixture
def private_cluster(request: pytest.FixtureRequest, tmp_path: Path):
    """Three RabbitMQ nodes of the test's own, joined into one cluster, for tests that kill one."""
    request.node.add_marker("rabbitmq")
    from .rabbitmq_node import PrivateCluster

    cluster = PrivateCluster(tmp_path / "cluster").start()
    yield cluster
    cluster.stop()


@pytest.fixture
def vectors_dir(request: pytest.FixtureRequest) -> Path:
    request.node.add_marker("vectors")
    configured = os.environ.get("ENCLAVEQ_VECTORS")
    path = Path(configured) if configured else Path(__file__).resolve().parents[1] / ".." / "shared" / "vectors"
    if path.is_dir():
        return path.resolve()
    if configured:
        pytest.fail(f"ENCLAVEQ_VECTORS={configured} is not a directory")
    pytest.skip("attestation vectors not found; set ENCLAVEQ_VECTORS=../shared/vectors")


# -- brokers and pools -------------------------------------------------------------------------


@pytest.fixture
def unique_name() -> str:
    """A pool or queue name no other test run (or CI run on the same brokers) will use."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def pool(unique_name: str) -> str:
    """The name of the test's own pool (deleted from RabbitMQ afterwards, by ``rabbitmq_url``)."""
    return unique_name


@pytest.fixture
def memory_url(unique_name: str) -> Iterator[str]:
    """An in-process broker of the test's own, forgotten afterwards."""
    yield f"memory://{unique_name}"
    from broker_adapters.memory import forget_memory_broker

    forget_memory_broker(unique_name)


@pytest.fixture(params=["memory", pytest.param("amqp", marks=pytest.mark.rabbitmq),
                        pytest.param("mqtt", marks=pytest.mark.mosquitto)])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Runs the test three times: on the in-process broker, on RabbitMQ and on Mosquitto."""
    names = {"memory": "memory_url", "amqp": "rabbitmq_url", "mqtt": "mosquitto_url"}
    return str(request.getfixturevalue(names[request.param]))


@pytest.fixture(params=[pytest.param("amqp", marks=pytest.mark.rabbitmq),
                        pytest.param("mqtt", marks=pytest.mark.mosquitto)])
def process_broker_url(request: pytest.FixtureRequest) -> str:
    """RabbitMQ, then Mosquitto: the brokers a worker *process* can reach (conftest's
    ``broker_url`` also has memory://, which lives in this process only)."""
    names = {"amqp": "rabbitmq_url", "mqtt": "mosquitto_url"}
    return str(request.getfixturevalue(names[request.param]))


@pytest.fixture
def lose_connection(request: pytest.FixtureRequest):
    """``await lose_connection(broker)`` drops the adapter's connection the way the network would,
    and lets it recover. On RabbitMQ the broker closes it through rabbitmqctl, which a test that
    runs on RabbitMQ therefore needs."""
    from .support import lose_connection

    callspec = getattr(request.node, "callspec", None)
    on_rabbitmq = "rabbitmq_url" in request.fixturenames or (
        callspec is not None and callspec.params.get("broker_url") == "amqp")
    rabbitmqctl = request.getfixturevalue("rabbitmqctl") if on_rabbitmq else None

    async def lose(broker) -> None:
        await lose_connection(broker, rabbitmqctl)

    return lose


# -- trusted execution environments ------------------------------------------------------------


@pytest.fixture
def tee(tmp_path: Path):
    """A simulated TEE, and a policy that trusts it and pins the current worker."""
    from .support import SimTEE

    return SimTEE(tmp_path)


@pytest.fixture(scope="module")
def amd():
    """A fake AMD key hierarchy (ARK, ASK, VCEK) that signs real-format SEV-SNP reports."""
    from attestation.testing.snp import FakeAmd

    return FakeAmd()
