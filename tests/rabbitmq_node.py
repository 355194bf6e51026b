"""A private RabbitMQ node for tests that stop, restart or cluster their broker.

The machine's RabbitMQ on 127.0.0.1:5672 belongs to every test; a test that takes its broker
down starts one of these instead: its own node name, AMQP and distribution ports, data and log
directories and Erlang cookie (all under the test's ``tmp_path``), no plugins (so no second
management listener), run as the current user, stopped afterwards.
"""

from __future__ import annotations

import os
import shutil
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
    def __init__(self, root: Path) -> None:
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
                    "HOME": str(root)}  # the Erlang cookie lives in $HOME: this node's own
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
