"""The public Python API is what ``enclaveq`` exports: every exported name exists, nothing public
is left out of ``__all__``, the whole error tree is importable from one place, and the libraries
never reach up into the application package."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import enclaveq
import producer_sdk.errors

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("attestation", "broker_adapters", "enclave_worker", "producer_sdk", "protocol")

DOCUMENTED = {
    "Client", "AsyncClient", "JobResult", "ModelInfo", "Claims", "Policy", "load_policy",
    "generate_signing_key", "load_signing_key", "save_signing_key", "public_key_bytes", "parse_public_key",
    "EnclaveqError", "AttestationFailed", "EpochRollback", "JobError", "JobTimeout", "PolicyError", "KeyFileError",
}


def test_every_exported_name_is_importable():
    for name in enclaveq.__all__:
        assert hasattr(enclaveq, name), name


def test_every_public_member_is_exported():
    public = {name for name, value in vars(enclaveq).items()
              if not name.startswith("_") and not inspect.ismodule(value)}
    assert public <= set(enclaveq.__all__), public - set(enclaveq.__all__)


def test_the_documented_names_are_exported():
    assert DOCUMENTED <= set(enclaveq.__all__)


def test_the_whole_sdk_error_tree_is_exported():
    errors = {name for name, value in vars(producer_sdk.errors).items()
              if inspect.isclass(value) and issubclass(value, producer_sdk.errors.EnclaveqError)}
    assert errors <= set(enclaveq.__all__), errors - set(enclaveq.__all__)


def test_the_clients_are_the_sdk_clients():
    from producer_sdk import AsyncClient, Client

    assert enclaveq.Client is Client and enclaveq.AsyncClient is AsyncClient


def test_client_takes_explicit_keyword_arguments():
    for cls in (enclaveq.Client, enclaveq.AsyncClient):
        params = inspect.signature(cls).parameters.values()
        assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params), cls
    assert list(inspect.signature(enclaveq.Client).parameters) == list(inspect.signature(enclaveq.AsyncClient).parameters)


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_library_imports_the_application_package():
    offenders = [f"{path.relative_to(ROOT)} imports {module}"
                 for lib in LIBRARIES for path in sorted((ROOT / lib).rglob("*.py"))
                 for module in _imported_modules(path) if module == "enclaveq" or module.startswith("enclaveq.")]
    assert offenders == []


def test_attestation_does_not_import_the_worker_or_the_sdk():
    offenders = [f"{path.relative_to(ROOT)} imports {module}"
                 for path in sorted((ROOT / "attestation").rglob("*.py"))
                 for module in _imported_modules(path)
                 if module.split(".")[0] in ("enclave_worker", "producer_sdk", "broker_adapters")]
    assert offenders == []
