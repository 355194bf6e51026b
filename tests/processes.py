"""Run enclaveq commands as real processes (workers that can be SIGKILLed, CLI calls)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def enclaveq(*args: str, check: bool = True, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "enclaveq", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"enclaveq {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


class WorkerProcess:
    """`enclaveq worker` in its own process, its log in a file, started and waited for readiness."""

    def __init__(self, broker_url: str, pool: str, sim_dir: Path, log_path: Path, *extra: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "enclaveq", "worker", "--broker", broker_url, "--pool", pool,
             "--sim-dir", str(sim_dir), *extra],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> WorkerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "ready; send SIGTERM" in self.log():
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode} before it was ready:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.log()}")

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        """Return once ``text`` is in the worker's log; fail if the worker exits or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None  # before reading: an exited worker's log is complete
            if text in self.log():
                return
            if exited or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the worker log after {timeout}s:\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()
