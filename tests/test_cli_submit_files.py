"""The .npz files of `enclaveq submit` (enclaveq/cli/npz_files.py): what it writes np.load reads,
what np.load reads it reads, unreadable files are named instead of stopping the batch, and the
read-ahead and the writer stay within their windows."""

from __future__ import annotations

import json
import os
import threading
import time
import zipfile

import numpy as np
import onnxruntime as ort
import pytest

from enclaveq.cli.npz_files import ReadAhead, ResultWriter, parse_npz, read_npz, write_npz
from protocol.tensors import DTYPES

from .processes import enclaveq
from .support import mlp_model
from .test_cli import conn, deployment  # noqa: F401 - the worker process fixture of the CLI tests

RNG = np.random.default_rng(7)


def _arrays() -> dict[str, np.ndarray]:
    arrays = {f"t_{name}": (RNG.standard_normal((3, 4)) * 50).astype(dtype) for name, dtype in DTYPES.items()}
    arrays |= {
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 3), np.int64),
        "unicode": np.array([["héllo", ""], ["wörld", "x"]]),
        "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        "strided": np.arange(20, dtype=np.int32)[::3],
        "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
        "wide": np.arange(40_000, dtype=np.float64).reshape(200, 200),
        "naïve name": np.ones(2, np.uint8),
    }
    return arrays


def _same(got: np.ndarray, expected: np.ndarray) -> bool:
    return got.dtype == expected.dtype and got.shape == expected.shape and np.array_equal(got, expected)


def test_what_write_npz_writes_np_load_reads_for_every_dtype(tmp_path):
    arrays = _arrays()
    write_npz(tmp_path / "out.npz", arrays)
    with zipfile.ZipFile(tmp_path / "out.npz") as archive:
        assert archive.testzip() is None
    with np.load(tmp_path / "out.npz") as npz:
        assert sorted(npz.files) == sorted(arrays)
        for name, value in arrays.items():
            assert _same(npz[name], value), name


def test_string_results_are_written_as_unicode_arrays_that_load_without_pickle(tmp_path):
    # The SDK returns ONNX string tensors as object arrays of str.
    labels = np.empty((2, 1), dtype=object)
    labels[:, 0] = ["cat", "hot dog"]
    write_npz(tmp_path / "out.npz", {"label": labels, "none": np.empty((0,), dtype=object)})
    with np.load(tmp_path / "out.npz", allow_pickle=False) as npz:
        assert npz["label"].tolist() == [["cat"], ["hot dog"]] and npz["label"].dtype.kind == "U"
        assert npz["none"].shape == (0,)


def test_objects_other_than_strings_are_refused_rather_than_pickled(tmp_path):
    with pytest.raises(ValueError, match="pickle"):
        write_npz(tmp_path / "out.npz", {"x": np.array([{1: 2}], dtype=object)})


def test_results_are_readable_by_their_owner_only_and_never_written_through_a_symlink(tmp_path):
    outputs = {"file": np.arange(3, dtype=np.int64), "allow_pickle": np.ones(2, np.float32)}
    write_npz(tmp_path / "result.npz", outputs)
    assert (tmp_path / "result.npz").stat().st_mode & 0o777 == 0o600
    with np.load(tmp_path / "result.npz") as data:  # output names that np.savez would choke on round-trip
        assert sorted(data.files) == ["allow_pickle", "file"]
        np.testing.assert_array_equal(data["file"], outputs["file"])
    target = tmp_path / "elsewhere"
    target.write_bytes(b"untouched")
    (tmp_path / "planted.npz").symlink_to(target)
    write_npz(tmp_path / "planted.npz", outputs)  # replaces the link, never writes through it
    assert target.read_bytes() == b"untouched"
    assert not (tmp_path / "planted.npz").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "planted.npz", "result.npz"]  # no leftovers


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed, write_npz], ids=lambda f: f.__name__)
def test_read_npz_gives_what_np_load_gives(tmp_path, save):
    arrays = _arrays()
    if save is write_npz:
        write_npz(tmp_path / "in.npz", arrays)
    else:
        save(tmp_path / "in.npz", **arrays)
    got = read_npz(tmp_path / "in.npz")
    with np.load(tmp_path / "in.npz", allow_pickle=False) as npz:
        assert sorted(got) == sorted(npz.files)
        for name in npz.files:
            assert _same(got[name], npz[name]), name


def test_read_npz_refuses_what_np_load_refuses(tmp_path):
    np.savez(tmp_path / "pickled.npz", x=np.array([{1: 2}], dtype=object))
    np.savez(tmp_path / "good.npz", x=np.arange(1000, dtype=np.int64))
    good = (tmp_path / "good.npz").read_bytes()
    corrupt = bytearray(good)
    corrupt[len(good) // 2] ^= 0xFF  # inside x's data: the CRC no longer matches
    with pytest.raises(ValueError, match="allow_pickle"):
        read_npz(tmp_path / "pickled.npz")
    with pytest.raises(zipfile.BadZipFile, match="not a zip file"):
        parse_npz(b"just some text")
    with pytest.raises(zipfile.BadZipFile, match="CRC"):
        parse_npz(bytes(corrupt))
    with pytest.raises(Exception):  # noqa: B017 - np.load's own error for a truncated archive
        parse_npz(good[:-40])


def test_read_ahead_yields_every_file_in_order_and_an_unreadable_one_as_its_error(tmp_path):
    paths = []
    for i in range(50):
        paths.append(tmp_path / f"job-{i:03d}.npz")
        np.savez(paths[-1], x=np.full((2,), i, np.int32))
    paths.insert(10, tmp_path / "missing.npz")
    reader = ReadAhead(paths, files=8)
    items = list(reader)
    reader.close()
    assert [index for index, _ in items] == list(range(len(paths)))
    assert isinstance(items[10][1], FileNotFoundError)
    values = [int(item["x"][0]) for _, item in items if not isinstance(item, Exception)]
    assert values == list(range(50))


def test_read_ahead_reads_no_more_than_its_window_ahead(tmp_path):
    window, count = 8, 200
    state = {"read": 0, "consumed": 0, "most_ahead": 0}
    caught_up = threading.Event()

    def read(path):
        state["most_ahead"] = max(state["most_ahead"], state["read"] - state["consumed"])
        state["read"] += 1
        if state["read"] - state["consumed"] >= window:
            caught_up.set()
        return {"x": np.zeros(1)}

    reader = ReadAhead([tmp_path / f"{i}.npz" for i in range(count)], files=window, read=read)
    for index, _ in reader:
        state["consumed"] = index + 1
        if index % 50 == 0:  # let the reader run as far ahead as it may
            assert caught_up.wait(10)
            caught_up.clear()
    reader.close()
    assert state["read"] == count
    # The window, plus the chunk being read and the chunk being consumed.
    assert state["most_ahead"] <= window + 2 * (window // 4)


def test_result_writer_writes_every_result_and_names_one_it_cannot_write(tmp_path):
    failed: list[tuple[str, Exception]] = []
    writer = ResultWriter(tmp_path, lambda name, exc: failed.append((name, exc)), results=4)
    for i in range(30):
        writer.put(f"job-{i:02d}.npz", {"y": np.full((3,), i, np.float32)})
    writer.put("no-such-dir/job.npz", {"y": np.zeros(1)})
    writer.close()
    assert [name for name, _ in failed] == ["no-such-dir/job.npz"] and isinstance(failed[0][1], OSError)
    assert writer.written == 30
    for i in range(30):
        with np.load(tmp_path / f"job-{i:02d}.npz") as npz:
            assert npz["y"].tolist() == [i] * 3


def test_result_writer_put_waits_while_the_writer_is_a_window_behind(tmp_path):
    release = threading.Event()
    written: list[str] = []

    def slow_write(path, arrays):
        release.wait(10)
        written.append(path)

    writer = ResultWriter(tmp_path, lambda name, exc: None, results=2, write=slow_write)
    for i in range(2):  # a result counts until it is written
        writer.put(f"{i}.npz", {"y": np.zeros(1)})
    blocked_put_done = threading.Event()
    threading.Thread(target=lambda: (writer.put("2.npz", {"y": np.zeros(1)}), blocked_put_done.set())).start()
    assert not blocked_put_done.wait(0.2)
    release.set()
    assert blocked_put_done.wait(10)
    writer.close()
    assert len(written) == 3


def test_an_idle_writer_is_woken_by_a_burst_or_a_flush_and_reports_whole_files_per_run(tmp_path):
    runs: list[list[str]] = []
    writer = ResultWriter(tmp_path, lambda name, exc: None, results=8, wake_at=4, written=runs.append)
    writer.put("a.npz", {"y": np.zeros(1)})
    writer.put("b.npz", {"y": np.zeros(1)})
    writer.flush()  # fewer than wake_at: written because the caller's burst ended
    deadline = time.monotonic() + 10
    while writer.written < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer.written == 2 and sorted(name for run in runs for name in run) == ["a.npz", "b.npz"]
    for i in range(20):  # no flush at all: every wake_at results wake it, and a full queue never waits forever
        writer.put(f"{i:02d}.npz", {"y": np.full((1,), i, np.float32)})
    writer.close()
    assert writer.written == 22
    assert sorted(name for run in runs for name in run) == sorted(["a.npz", "b.npz", *(f"{i:02d}.npz" for i in range(20))])
    assert all(1 <= len(run) <= 8 for run in runs)


def test_submit_names_an_unreadable_file_and_writes_every_other_result(deployment, tmp_path):  # noqa: F811
    model = mlp_model(seed=5)
    (tmp_path / "m.onnx").write_bytes(model)
    owner = tmp_path / "owner.key"
    enclaveq("keys", "generate", "--out", str(owner))
    model_id = enclaveq("model", "upload", str(tmp_path / "m.onnx"), *conn(deployment), "--owner-key",
                        str(owner)).stdout.strip().splitlines()[-1]
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    bias = np.zeros(3, np.float32)
    for i in range(40):
        np.savez(jobs / f"job-{i:03d}.npz", x=np.full((2, 4), i, np.float32), bias=bias)
    (jobs / "job-005.npz").write_text("not an archive")
    # A failure line longer than the 80 columns rich wraps a pipe at, with what rich takes for markup.
    long_name = "job-040-[draft]-" + "a-rather-long-file-name-" * 4 + ".npz"
    (jobs / long_name).write_text("not an archive either")
    result = enclaveq("submit", *conn(deployment), "--model", model_id, "--inputs", str(jobs),
                      "--output", str(tmp_path / "results"), "--max-in-flight", "8",
                      "--failures", str(tmp_path / "failures.json"), check=False)
    assert result.returncode == 1
    assert "failed: job-005.npz: not a readable .npz file" in result.stderr
    long_lines = [line for line in result.stderr.splitlines()
                  if line.startswith(f"failed: {long_name}: not a readable .npz file (")]
    assert len(long_lines) == 1 and long_lines[0].endswith(")") and len(long_lines[0]) > 80, result.stderr
    assert "jobs: 41  failed: 2  " in result.stdout
    failures = json.loads((tmp_path / "failures.json").read_text())
    assert [f["file"] for f in failures] == ["job-005.npz", long_name]
    assert all("not a readable .npz" in f["error"] for f in failures)
    written = sorted(p.name for p in (tmp_path / "results").glob("*.npz"))
    assert written == [f"job-{i:03d}.npz" for i in range(40) if i != 5]
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    for i in (0, 17, 39):
        with np.load(tmp_path / "results" / f"job-{i:03d}.npz") as out:
            expected = session.run(None, {"x": np.full((2, 4), i, np.float32), "bias": bias})
            assert np.array_equal(out["logits"], expected[0]) and np.array_equal(out["label"], expected[1])


def test_submit_run_again_sends_only_the_jobs_without_a_result_and_refuses_another_models_output(
        deployment, tmp_path):  # noqa: F811
    (tmp_path / "m.onnx").write_bytes(mlp_model(seed=6))
    model_id = enclaveq("model", "upload", str(tmp_path / "m.onnx"), *conn(deployment), "--owner-key",
                        str(_owner(tmp_path))).stdout.strip().splitlines()[-1]
    jobs, results = tmp_path / "jobs", tmp_path / "results"
    jobs.mkdir()
    for i in range(12):
        np.savez(jobs / f"job-{i:03d}.npz", x=np.full((2, 4), i, np.float32), bias=np.zeros(3, np.float32))
    args = ("submit", *conn(deployment), "--model", model_id, "--inputs", str(jobs), "--output", str(results))
    enclaveq(*args)
    for i in (3, 7):  # as if a first run had stopped before these
        (results / f"job-{i:03d}.npz").unlink()
    (results / ".enclaveq-partial-123-456-job-007.npz").write_bytes(b"half")  # killed mid-write
    again = enclaveq(*args)
    assert "10 of 12 results are already in" in again.stderr and "jobs: 2  failed: 0" in again.stdout
    assert sorted(p.name for p in results.glob("*.npz")) == [f"job-{i:03d}.npz" for i in range(12)]
    assert not list(results.glob(".enclaveq-partial-*"))
    done = enclaveq(*args)
    assert "jobs: 0  failed: 0" in done.stdout
    other = enclaveq("submit", *conn(deployment), "--model", "cd" * 32, "--inputs", str(jobs), "--output",
                     str(results), check=False)
    assert other.returncode == 2 and f"holds results of model {model_id}" in other.stderr


def _owner(tmp_path):
    owner = tmp_path / "owner.key"
    if not owner.exists():
        enclaveq("keys", "generate", "--out", str(owner))
    return owner


def test_a_link_planted_at_a_result_name_is_not_taken_for_that_jobs_result(tmp_path):
    from enclaveq.cli.producer import _jobs_without_results

    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    output.mkdir()
    files = [inputs / f"job-{i}.npz" for i in range(3)]
    write_npz(output / "job-0.npz", {"y": np.zeros(1)})  # a result an earlier run wrote
    (tmp_path / "elsewhere.npz").write_bytes(b"not a result")
    (output / "job-1.npz").symlink_to(tmp_path / "elsewhere.npz")  # planted: the job must still run
    (output / "job-2.npz").mkdir()
    assert [path.name for path in _jobs_without_results(files, output, "m" * 64, "pool")] == ["job-1.npz", "job-2.npz"]


def test_the_reader_and_writer_threads_yield_the_core_to_the_event_loop(tmp_path):
    from enclaveq.cli.npz_files import BACKGROUND_NICE

    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen: list[int] = []
    writer = ResultWriter(tmp_path, lambda name, exc: None, write=lambda path, arrays: seen.append(priority()))
    writer.put("a.npz", {"y": np.zeros(1)})
    writer.close()
    reader = ReadAhead([tmp_path / "x.npz"], read=lambda path: seen.append(priority()) or {})
    assert [index for index, _ in reader] == [0]
    reader.close()
    assert seen == [min(19, priority() + BACKGROUND_NICE)] * 2
