"""The worker's (simulated) measurement: a hash of its own code and its measured configuration.

A real TEE measures the loaded image in hardware; the simulation computes the equivalent in
software so that policies can pin "this code with this configuration" the same way:

    code_digest   = SHA-256(msgpack(["enclaveq/sim/measurement/v1/code",
                                     [[relative_path, SHA-256(file bytes)], ...]]))
    config_digest = SHA-256(canonical msgpack of the measured config mapping)
    value         = SHA-256(msgpack(["enclaveq/sim/measurement/v1", code_digest, config_digest]))

The code is every ``.py`` file of the packages the worker runs -- ``enclave_worker``,
``protocol`` and ``attestation`` -- found from each package's ``__file__``; ``__pycache__`` is
skipped, and the project's ``tests/`` is not part of any of these packages. Paths are
``<package>/<posix path inside it>`` and sorted by their UTF-8 bytes, so the value is the same
in every process, on every machine and under every locale. Canonical msgpack here means: map
keys are strings and sorted, tuples become lists, and only plain data (None, bool, int, float,
str, bytes, lists, mappings) is accepted -- anything else is a ``TypeError``, never a silent
``repr``.

This is a *self*-measurement: a compromised host can lie about it. That is exactly why
simulated evidence gives no confidentiality and has to be allowed explicitly in a policy.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from collections.abc import Iterable, Mapping

import msgpack

__all__ = [
    "MEASUREMENT_DOMAIN",
    "MEASURED_PACKAGES",
    "Measurement",
    "canonical_config_bytes",
    "config_digest",
    "code_entries",
    "code_digest",
    "measure_worker",
]

MEASUREMENT_DOMAIN = "enclaveq/sim/measurement/v1"
MEASURED_PACKAGES = ("enclave_worker", "protocol", "attestation")


class SupportsMeasured(Protocol):
    def measured(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class Measurement:
    """A worker measurement: ``value`` (32 bytes) is what evidence carries and policies pin."""

    value: bytes
    code_digest: bytes
    config_digest: bytes

    def hex(self) -> str:
        return self.value.hex()


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _canonical(value: Any, where: str) -> Any:
    if value is None or type(value) in (bool, int, float, str, bytes):
        return value
    if isinstance(value, Mapping):
        out = {}
        for key in sorted(value, key=lambda k: k.encode("utf-8") if isinstance(k, str) else b""):
            if not isinstance(key, str):
                raise TypeError(f"measured config keys must be strings; {where} has {key!r}")
            out[key] = _canonical(value[key], f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(f"measured config value {where} has unsupported type {type(value).__name__}")


def canonical_config_bytes(config: Mapping[str, Any] | SupportsMeasured) -> bytes:
    """The canonical msgpack encoding of the measured config (sorted keys, plain data only)."""
    if hasattr(config, "measured"):
        config = config.measured()
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping or have .measured(), not {type(config).__name__}")
    return _pack(_canonical(config, "config"))


def config_digest(config: Mapping[str, Any] | SupportsMeasured) -> bytes:
    """SHA-256 of :func:`canonical_config_bytes`."""
    return hashlib.sha256(canonical_config_bytes(config)).digest()


def _package_roots(packages: Iterable[str]) -> dict[str, Path]:
    roots = {}
    for name in packages:
        module = importlib.import_module(name)
        file = getattr(module, "__file__", None)
        if not file:
            raise RuntimeError(f"package {name!r} has no __file__; cannot measure its code")
        roots[name] = Path(file).resolve().parent
    return roots


def code_entries(roots: Mapping[str, Path]) -> list[tuple[str, bytes]]:
    """``(relative path, SHA-256)`` of every ``.py`` file under each root, sorted by path."""
    entries = []
    for name, root in roots.items():
        for path in root.rglob("*.py"):
            relative = path.relative_to(root)
            if "__pycache__" in relative.parts or not path.is_file():
                continue
            entries.append((f"{name}/{relative.as_posix()}", hashlib.sha256(path.read_bytes()).digest()))
    entries.sort(key=lambda entry: entry[0].encode("utf-8"))
    return entries


def code_digest(roots: Mapping[str, Path]) -> bytes:
    """The digest of the sorted code entries under ``roots`` (package name -> directory)."""
    listing = [[path, digest] for path, digest in code_entries(roots)]
    return hashlib.sha256(_pack([MEASUREMENT_DOMAIN + "/code", listing])).digest()


def _combine(code: bytes, config: bytes) -> bytes:
    return hashlib.sha256(_pack([MEASUREMENT_DOMAIN, code, config])).digest()


def measure_worker(config: Mapping[str, Any] | SupportsMeasured) -> Measurement:
    """Measure the worker's code (:data:`MEASURED_PACKAGES`) together with its ``config``.

    ``config`` is a mapping, or an object with ``.measured()`` such as
    :data:`enclave_worker.config.DEFAULT_WORKER_CONFIG`.
    """
    code = code_digest(_package_roots(MEASURED_PACKAGES))
    conf = config_digest(config)
    return Measurement(value=_combine(code, conf), code_digest=code, config_digest=conf)
