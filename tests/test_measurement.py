"""The worker measurement: deterministic, and sensitive to code and to measured configuration."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import attestation
import enclave_worker
import protocol
from enclave_worker.config import DEFAULT_WORKER_CONFIG, MiB, WorkerConfig
from enclave_worker.measurement import (
    MEASURED_PACKAGES,
    canonical_config_bytes,
    code_digest,
    code_entries,
    config_digest,
    measure_worker,
)

REPO = Path(__file__).resolve().parents[1]


def test_measuring_twice_gives_the_same_value():
    first = measure_worker(DEFAULT_WORKER_CONFIG)
    second = measure_worker(DEFAULT_WORKER_CONFIG)
    assert first == second
    assert len(first.value) == 32
    assert first.hex() == first.value.hex()


def test_another_process_computes_the_same_value():
    script = (
        "from enclave_worker.measurement import measure_worker;"
        "from enclave_worker.config import DEFAULT_WORKER_CONFIG;"
        "print(measure_worker(DEFAULT_WORKER_CONFIG).hex())"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin", "LC_ALL": "C"},
    )
    assert result.stdout.strip() == measure_worker(DEFAULT_WORKER_CONFIG).hex()


@pytest.mark.parametrize(
    "change",
    [
        {"max_message_bytes": 65 * MiB},
        {"max_tensor_bytes": 16 * MiB},
        {"max_model_bytes": 1024 * MiB},
        {"intra_op_threads": 2},
        {"max_jobs_in_flight": 9},
        {"max_batch_rows": 32},
        {"max_queue_delay_us": 500},
        {"preferred_batch_rows": (8,)},
        {"version": "2"},
    ],
)
def test_changing_any_measured_setting_changes_the_measurement(change):
    baseline = measure_worker(DEFAULT_WORKER_CONFIG)
    changed = measure_worker(dataclasses.replace(DEFAULT_WORKER_CONFIG, **change))
    assert changed.value != baseline.value
    assert changed.config_digest != baseline.config_digest
    assert changed.code_digest == baseline.code_digest


def test_a_mapping_and_the_config_object_with_the_same_fields_measure_the_same():
    assert measure_worker(DEFAULT_WORKER_CONFIG.measured()) == measure_worker(DEFAULT_WORKER_CONFIG)


def test_key_order_does_not_matter_but_types_do():
    assert config_digest({"a": 1, "b": {"y": 2, "x": 3}}) == config_digest({"b": {"x": 3, "y": 2}, "a": 1})
    assert config_digest({"a": 1}) != config_digest({"a": True})
    assert config_digest({"a": 1}) != config_digest({"a": "1"})
    assert config_digest({"a": [1, 2]}) == config_digest({"a": (1, 2)})


def test_the_config_digest_is_the_sha256_of_the_canonical_msgpack():
    import hashlib

    import msgpack

    config = {"b": 2, "a": b"\x01"}
    assert canonical_config_bytes(config) == msgpack.packb({"a": b"\x01", "b": 2}, use_bin_type=True)
    assert config_digest(config) == hashlib.sha256(canonical_config_bytes(config)).digest()


@pytest.mark.parametrize("bad", [{"a": object()}, {1: "x"}, {"a": {1, 2}}, ["not", "a", "mapping"]])
def test_config_values_that_have_no_canonical_encoding_are_refused(bad):
    with pytest.raises(TypeError):
        config_digest(bad)


def test_the_measured_code_is_the_three_worker_packages_and_nothing_else():
    roots = {name: Path(module.__file__).parent for name, module in
             (("enclave_worker", enclave_worker), ("protocol", protocol), ("attestation", attestation))}
    assert MEASURED_PACKAGES == ("enclave_worker", "protocol", "attestation")
    paths = [path for path, _ in code_entries(roots)]
    assert "enclave_worker/measurement.py" in paths
    assert "attestation/sim/abi.py" in paths
    assert "protocol/__init__.py" in paths
    assert all(p.endswith(".py") and "__pycache__" not in p for p in paths)
    assert not any(p.startswith("tests/") for p in paths)
    assert paths == sorted(paths)


@pytest.fixture
def package_copy(tmp_path):
    root = tmp_path / "pkg"
    shutil.copytree(Path(enclave_worker.__file__).parent, root, ignore=shutil.ignore_patterns("__pycache__"))
    return {"enclave_worker": root}


def test_changing_one_byte_of_code_changes_the_code_digest(package_copy):
    before = code_digest(package_copy)
    target = package_copy["enclave_worker"] / "config.py"
    target.write_bytes(target.read_bytes().replace(b"max_jobs_in_flight: int = 8", b"max_jobs_in_flight: int = 9"))
    assert code_digest(package_copy) != before


def test_adding_a_python_file_changes_the_code_digest(package_copy):
    before = code_digest(package_copy)
    (package_copy["enclave_worker"] / "sub").mkdir()
    (package_copy["enclave_worker"] / "sub" / "extra.py").write_text("x = 1\n")
    assert code_digest(package_copy) != before


def test_renaming_a_file_changes_the_code_digest(package_copy):
    before = code_digest(package_copy)
    root = package_copy["enclave_worker"]
    (root / "config.py").rename(root / "config2.py")
    assert code_digest(package_copy) != before


def test_bytecode_caches_and_non_python_files_are_not_measured(package_copy):
    before = code_digest(package_copy)
    cache = package_copy["enclave_worker"] / "__pycache__"
    cache.mkdir()
    (cache / "config.cpython-311.pyc").write_bytes(b"\x00" * 16)
    (cache / "stray.py").write_text("not measured\n")
    (package_copy["enclave_worker"] / "README.txt").write_text("notes")
    assert code_digest(package_copy) == before


def test_worker_config_refuses_nonsense_limits():
    with pytest.raises(ValueError, match="max_jobs_in_flight"):
        WorkerConfig(max_jobs_in_flight=0)
    with pytest.raises(ValueError, match="version"):
        WorkerConfig(version="")
    with pytest.raises(ValueError, match="max_queue_delay_us"):
        WorkerConfig(max_queue_delay_us=-1)
    with pytest.raises(ValueError, match="preferred_batch_rows"):
        WorkerConfig(max_batch_rows=8, preferred_batch_rows=(16,))


def test_the_default_worker_config_is_the_documented_one():
    from importlib.metadata import version

    assert DEFAULT_WORKER_CONFIG.measured() == {
        "max_message_bytes": 64 * MiB,
        "max_tensor_bytes": 32 * MiB,
        "max_model_bytes": 512 * MiB,
        "intra_op_threads": 1,
        "max_jobs_in_flight": 8,
        "max_batch_rows": 64,
        "max_queue_delay_us": 0,
        "preferred_batch_rows": (),
        "max_rotation_grace_seconds": 3600,
        "custom_op_domains": {"ai.onnx.contrib": f"onnxruntime-extensions {version('onnxruntime-extensions')}"},
        "version": "1",
    }
