"""A private RabbitMQ node (or cluster of them) for tests that stop, restart or kill their broker.

The machine's RabbitMQ on 127.0.0.1:5672 belongs to every test; a test that takes its broker
down starts one of these instead: its own node name, AMQP and distribution ports, data and log
directories and Erlang cookie (all under the test's ``tmp_path``), no plugins (so no second
management listener), run as the current user, stopped afterwards. :class:`PrivateCluster`
joins three such nodes (one shared cookie) into a cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRabbitmq:
    def __init__(self, root: Path, *, home: Path | None = None, config: str = "") -> None:
        server = RABBITMQ_BIN / "rabbitmq-server"
        if not server.exists() and shutil.which("rabbitmq-server") is None:
            pytest.fail("rabbitmq-server is not installed")
        self.server = str(server if server.exists() else shutil.which("rabbitmq-server"))
        self.ctl = str(RABBITMQ_BIN / "rabbitmqctl" if (RABBITMQ_BIN / "rabbitmqctl").exists() else "rabbitmqctl")
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.node = f"eqtest-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        (root / "enabled_plugins").write_text("[].\n")
        (root / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n" + config)
        self.env = {**os.environ, "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_PORT": str(self.port),
                    "RABBITMQ_DIST_PORT": str(free_port()), "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
                    "RABBITMQ_LOG_BASE": str(root / "log"), "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
                    "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"), "RABBITMQ_PID_FILE": str(root / "pid"),
                    # The Erlang cookie lives in $HOME: this node's own, or its cluster's.
                    "HOME": str(home or root)}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def rabbitmqctl(self, *args: str, timeout: float = 120) -> str:
        return subprocess.run([self.ctl, "-n", self.node, *args], env=self.env, check=True, capture_output=True,
                              text=True, timeout=timeout).stdout

    def start(self) -> PrivateRabbitmq:
        self.spawn()
        try:
            self.await_started()
        except BaseException:
            self.stop()  # never leave a half-started node behind
            raise
        return self

    def spawn(self) -> None:
        """Launch the node and return at once (:meth:`await_started` waits for it to boot)."""
        self.proc = subprocess.Popen([self.server], env=self.env, cwd=self.root, stdout=open(self.root / "server.log", "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def await_started(self, timeout: float = 120) -> None:
        """Wait (bounded) until the node has booted and its AMQP listener accepts connections."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        # The listener opens late in the boot. Until then, watch the port: each rabbitmqctl is an
        # Erlang VM of its own (about a CPU second), which would slow the boot it waits for.
        while not self._listening():
            assert self.proc.poll() is None, f"RabbitMQ node {self.node} exited: {self.root / 'server.log'}"
            assert time.monotonic() < deadline, f"RabbitMQ node {self.node} did not start within {timeout:g} s"
            time.sleep(0.1)
        while True:  # the boot's end; await_startup fails at once if the Erlang node is not up at all
            try:
                self.rabbitmqctl("await_startup", "--timeout", "30", timeout=60)
                break
            except subprocess.CalledProcessError:
                assert self.proc.poll() is None, f"RabbitMQ node {self.node} exited: {self.root / 'server.log'}"
                assert time.monotonic() < deadline, f"RabbitMQ node {self.node} did not start within {timeout:g} s"
                time.sleep(0.5)
        self.wait_listening()

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def wait_listening(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self._listening():
            assert time.monotonic() < deadline, f"RabbitMQ node {self.node} not listening after {timeout}s"
            time.sleep(0.1)

    def stop_app(self) -> None:
        self.rabbitmqctl("stop_app")

    def start_app(self) -> None:
        self.rabbitmqctl("start_app")
        self.wait_listening()

    def stop(self) -> None:
        self.terminate()
        self.wait_stopped()

    def terminate(self) -> None:
        """Ask the node to shut down gracefully and return at once: SIGTERM to the server
        script, which hands it on to the Erlang VM (RabbitMQ's own shutdown, as ``rabbitmqctl
        stop`` would trigger, without starting a CLI VM for it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def wait_stopped(self, timeout: float = 30) -> None:
        """Wait for the node to exit after :meth:`terminate`; kill it if it takes over ``timeout``."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the script and its Erlang VM
            self.proc.wait()
        self.proc = None

    def beam_pid(self) -> int:
        """The Erlang VM's process id (the server script's child), for a kill -9 of the node."""
        return int(self.rabbitmqctl("eval", "list_to_integer(os:getpid()).").strip())

    def kill(self) -> None:
        """SIGKILL the node, as a crashed host would: no goodbye to clients or to the cluster."""
        os.kill(self.beam_pid(), signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(timeout=60)
        self.proc = None


class PrivateCluster:
    """Three private nodes joined into one cluster (the first is the seed), sharing a cookie.

    They boot side by side: the others find the seed by RabbitMQ's own peer discovery (its
    classic config backend, the seed the only node listed) and join it as they boot, retrying
    until the seed answers."""

    def __init__(self, root: Path, size: int = 3) -> None:
        home = root / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        seed = PrivateRabbitmq(root / "node0", home=home)
        # 240 tries 0.5 s apart: as long as await_started waits for a node to boot.
        join_seed = ("cluster_formation.peer_discovery_backend = classic_config\n"
                     f"cluster_formation.classic_config.nodes.1 = {seed.node}\n"
                     "cluster_formation.discovery_retry_limit = 240\ncluster_formation.discovery_retry_interval = 500\n")
        self.nodes = [seed, *(PrivateRabbitmq(root / f"node{i}", home=home, config=join_seed) for i in range(1, size))]

    @property
    def urls(self) -> str:
        """The cluster's node URLs as enclaveq takes them: one comma-separated --broker value."""
        return ",".join(node.url for node in self.nodes)

    def start(self) -> PrivateCluster:
        try:
            for node in self.nodes:
                node.spawn()
            each(PrivateRabbitmq.await_started, self.nodes)
            running = json.loads(self.nodes[0].rabbitmqctl("cluster_status", "--formatter", "json"))["running_nodes"]
            assert sorted(running) == sorted(n.node for n in self.nodes), running
            self.await_feature_flags()
        except BaseException:
            self.stop()
            raise
        return self

    def await_feature_flags(self, timeout: float = 60) -> None:
        """Every node has every feature flag on (quorum queues above all). A node that has just
        joined may still be taking the cluster's flags: a quorum queue declared on it then fails
        ("the corresponding feature flag is disabled", seen once in CI). Enabled cluster-wide from
        the seed, then waited for on each node."""
        self.nodes[0].rabbitmqctl("enable_feature_flag", "all")
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            while True:
                flags = json.loads(node.rabbitmqctl("list_feature_flags", "name", "state", "--formatter", "json"))
                off = [flag["name"] for flag in flags if flag["state"] != "enabled"]
                if not off:
                    break
                assert time.monotonic() < deadline, f"{node.node}: feature flags still off: {off}"
                time.sleep(0.2)

    def live(self) -> list[PrivateRabbitmq]:
        return [node for node in self.nodes if node.proc is not None]

    def leader_of(self, queue: str) -> PrivateRabbitmq:
        """The node that leads quorum queue ``queue`` (asked of any live node)."""
        out = self.live()[0].rabbitmqctl("list_queues", "name", "leader", "members", "--formatter", "json")
        rows = {row["name"]: row for row in json.loads(out)}
        assert queue in rows, f"no queue {queue!r} on the cluster: {sorted(rows)}"
        return next(node for node in self.nodes if node.node == rows[queue]["leader"])

    def members_of(self, queue: str) -> list[str]:
        out = self.live()[0].rabbitmqctl("list_queues", "name", "members", "--formatter", "json")
        return next(row["members"] for row in json.loads(out) if row["name"] == queue)

    def stop(self) -> None:
        """Stop every node, all at once (each shuts down on its own: nothing of the cluster is kept)."""
        for node in self.nodes:
            node.terminate()
        for node in self.nodes:
            node.wait_stopped()


def each(action: Callable[[PrivateRabbitmq], object], nodes: list[PrivateRabbitmq]) -> None:
    """``action(node)`` for every node at once, each in its own thread; returns when all are done,
    raising the first failure."""
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        for future in [pool.submit(action, node) for node in nodes]:
            future.result()
