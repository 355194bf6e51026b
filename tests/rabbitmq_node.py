"""A private RabbitMQ node (or cluster of them) for tests that stop, restart or kill their broker.

The machine's RabbitMQ on 127.0.0.1:5672 belongs to every test; a test that takes its broker
down starts one of these instead: its own node name, AMQP and distribution ports, data and log
directories and Erlang cookie (all under the test's ``tmp_path``), no plugins (so no second
management listener), run as the current user, stopped afterwards. :class:`PrivateCluster`
joins three such nodes (one shared cookie) into a cluster.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRabbitmq:
    def __init__(self, root: Path, *, home: Path | None = None) -> None:
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
        (root / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n")
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
        self.proc = subprocess.Popen([self.server], env=self.env, cwd=self.root, stdout=open(self.root / "server.log", "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._await_startup()
        except BaseException:
            self.stop()  # never leave a half-started node behind
            raise
        return self

    def _await_startup(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 120
        while True:  # await_startup fails at once until the Erlang node is up at all
            try:
                self.rabbitmqctl("await_startup", "--timeout", "30", timeout=60)
                break
            except subprocess.CalledProcessError:
                assert self.proc.poll() is None, f"RabbitMQ node {self.node} exited: {self.root / 'server.log'}"
                assert time.monotonic() < deadline, f"RabbitMQ node {self.node} did not start within 120 s"
                time.sleep(0.5)
        self.wait_listening()

    def wait_listening(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                assert time.monotonic() < deadline, f"RabbitMQ node {self.node} not listening after {timeout}s"
                time.sleep(0.1)

    def stop_app(self) -> None:
        self.rabbitmqctl("stop_app")

    def start_app(self) -> None:
        self.rabbitmqctl("start_app")
        self.wait_listening()

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.rabbitmqctl("stop", timeout=60)
        except (subprocess.SubprocessError, OSError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
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
    """Three private nodes joined into one cluster (the first is the seed), sharing a cookie."""

    def __init__(self, root: Path, size: int = 3) -> None:
        home = root / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        self.nodes = [PrivateRabbitmq(root / f"node{i}", home=home) for i in range(size)]

    @property
    def urls(self) -> str:
        """The cluster's node URLs as enclaveq takes them: one comma-separated --broker value."""
        return ",".join(node.url for node in self.nodes)

    def start(self) -> PrivateCluster:
        try:
            for node in self.nodes:
                node.start()
            seed = self.nodes[0]
            for node in self.nodes[1:]:
                node.rabbitmqctl("stop_app")
                node.rabbitmqctl("join_cluster", seed.node)
                node.start_app()
            running = json.loads(seed.rabbitmqctl("cluster_status", "--formatter", "json"))["running_nodes"]
            assert sorted(running) == sorted(n.node for n in self.nodes), running
        except BaseException:
            self.stop()
            raise
        return self

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
        for node in reversed(self.nodes):
            node.stop()
