"""A private Mosquitto for tests that restart, reconfigure or TLS-protect their broker.

The shared Mosquitto on 127.0.0.1:1883 belongs to every test; a test that stops its broker or
needs another listener starts one of these instead: its own port, its own config, its own
persistence directory, stopped (and its files kept under the test's ``tmp_path``) afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateMosquitto:
    """``mosquitto -c <own config>`` on a free port, with persistence flushed on every change
    (so a restart loses nothing the broker acknowledged) and no queue limits (a pool with no
    worker online holds its whole batch, as ``docs/architecture.md`` asks of deployments)."""

    def __init__(self, root: Path, *, listener: str = "", extra: str = "") -> None:
        binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if binary is None:
            pytest.fail("mosquitto is not installed")
        self.binary = binary
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "data").mkdir(exist_ok=True)
        self.port = free_port()
        self.config = root / "mosquitto.conf"
        self.log_path = root / "mosquitto.log"
        # Started as root, Mosquitto drops to the "mosquitto" user, which cannot write the test's
        # tmp_path: it would keep no persistence (and could not read a password file there).
        as_root = "user root\n" if os.geteuid() == 0 else ""
        self.config.write_text(
            as_root + f"persistence true\npersistence_location {root / 'data'}/\nautosave_interval 1\n"
            "autosave_on_changes true\nmax_queued_messages 0\nmax_inflight_messages 0\n"
            f"log_dest file {self.log_path}\nlog_type error\nlog_type warning\nlog_type notice\n"
            + (listener or f"listener {self.port} 127.0.0.1\nallow_anonymous true\n") + extra
        )
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}/"

    def start(self, timeout: float = 20) -> PrivateMosquitto:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                pytest.fail(f"private mosquitto exited with {self.proc.returncode}:\n{log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"private mosquitto not listening on {self.port} after {timeout}s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the broker (SIGTERM saves its persistence file; SIGKILL does not)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
