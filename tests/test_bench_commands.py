"""The documented benchmark commands run and print what docs/benchmarks.md quotes from them.

These check that the commands work and say what they measure, on a few jobs; they assert no
figure (performance claims come from running the benchmarks, never from the test suite).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench(module: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={"COLUMNS": "200", "PATH": str(Path(sys.executable).parent)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return " ".join(done.stdout.split())  # rich wraps long lines at its width


@pytest.mark.usefixtures("rabbitmq_url")
def test_the_latency_bench_splits_the_guarantees_into_quorum_queues_their_reply_queue_and_the_rest():
    out = _bench("bench.latency", "--jobs", "20", "--warmup", "2")
    for row in ("aio-pika plain", "aio-pika + guarantees, classic queues", "aio-pika + guarantees, classic reply queue",
                "aio-pika + guarantees", "enclaveq run"):
        assert row in out
    assert "enclaveq p50 - plain p50 =" in out
    assert "quorum queues instead of classic ones" in out
    assert "a classic reply queue (DESIGN §5 requires a quorum job queue" in out


@pytest.mark.usefixtures("rabbitmq_url")
def test_the_throughput_bench_says_what_the_clis_files_cost_and_the_ratio_they_allow(tmp_path):
    out = _bench("bench.throughput", "--only", "framed,cli,sdk-files", "--jobs", "200", "--warmup", "20",
                 "--cli-dir", str(tmp_path))
    assert "CLI / SDK (framed)" in out  # ("once started" needs the timed run to outlast the warm-up's)
    assert "CLI / SDK + np.load/np.savez" in out  # the SDK doing the CLI's work, files and all
    assert "files: the kernel's least per job" in out
    assert "CLI / SDK at most, cores busy" in out
    assert list(tmp_path.iterdir()) == []  # the inputs, results and scratch files are gone
