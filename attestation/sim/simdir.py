"""The on-disk simulation directory: its file names, and loading it with full checks.

A simulation directory stands in for what a real TEE gets from its hardware: a vendor root
(``root.pem``), a per-machine attestation signing key and its certificate
(``attestation-key.pem``, ``attestation-cert.pem``), and a fused per-CPU secret from which
sealing keys are derived (``platform-secret``). :func:`attestation.sim.init.init_sim_dir`
creates one; :func:`open_sim_dir` loads one and refuses anything missing or inconsistent with
:class:`SimDirError`, so a worker never starts on half a directory.

The root *private* key is not in the directory: it is thrown away after ``init`` signed the
attestation certificate (see :mod:`attestation.sim.init`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.errors import SimDirError

__all__ = [
    "ROOT_CERT",
    "ATTESTATION_KEY",
    "ATTESTATION_CERT",
    "PLATFORM_SECRET",
    "SIM_FILES",
    "PLATFORM_SECRET_SIZE",
    "SimDir",
    "LoadedSimDir",
    "open_sim_dir",
    "read_platform_secret",
]

ROOT_CERT = "root.pem"
ATTESTATION_KEY = "attestation-key.pem"
ATTESTATION_CERT = "attestation-cert.pem"
PLATFORM_SECRET = "platform-secret"
SIM_FILES = (ROOT_CERT, ATTESTATION_KEY, ATTESTATION_CERT, PLATFORM_SECRET)
PLATFORM_SECRET_SIZE = 32


@dataclass(frozen=True)
class SimDir:
    """Where a simulation directory lives and the fingerprint a policy must pin to trust it."""

    path: Path
    root_sha256: str  # lowercase hex SHA-256 of root.pem's DER certificate
    files: tuple[Path, ...]  # the files of the directory, in SIM_FILES order


@dataclass(frozen=True)
class LoadedSimDir:
    """A checked simulation directory, in memory (what :class:`SimProvider` signs with)."""

    sim_dir: SimDir
    root: x509.Certificate
    attestation_cert: x509.Certificate
    attestation_key: ec.EllipticCurvePrivateKey


def _read(path: Path, name: str) -> bytes:
    try:
        return (path / name).read_bytes()
    except FileNotFoundError:
        raise SimDirError(
            f"simulation directory {path} has no {name}; create one with `enclaveq sim init --dir {path}`"
        ) from None
    except OSError as exc:
        raise SimDirError(f"cannot read {path / name}: {exc.strerror}") from None


def read_platform_secret(path: str | os.PathLike[str] | SimDir) -> bytes:
    """The simulated CPU fuse secret (32 bytes). Raises :class:`SimDirError` if absent or wrong size."""
    base = path.path if isinstance(path, SimDir) else Path(path)
    secret = _read(base, PLATFORM_SECRET)
    if len(secret) != PLATFORM_SECRET_SIZE:
        raise SimDirError(
            f"{base / PLATFORM_SECRET} is {len(secret)} bytes, expected {PLATFORM_SECRET_SIZE}: corrupt"
        )
    return secret


def open_sim_dir(path: str | os.PathLike[str] | SimDir) -> LoadedSimDir:
    """Load and check a simulation directory: all files present and parseable, the key matches
    the certificate, and the certificate is signed by the root."""
    base = path.path if isinstance(path, SimDir) else Path(path)
    if not base.is_dir():
        raise SimDirError(
            f"simulation directory {base} does not exist; create it with `enclaveq sim init --dir {base}`"
        )
    try:
        root = x509.load_pem_x509_certificate(_read(base, ROOT_CERT))
    except ValueError:
        raise SimDirError(f"{base / ROOT_CERT} is not a PEM certificate: corrupt") from None
    try:
        cert = x509.load_pem_x509_certificate(_read(base, ATTESTATION_CERT))
    except ValueError:
        raise SimDirError(f"{base / ATTESTATION_CERT} is not a PEM certificate: corrupt") from None
    try:
        key = serialization.load_pem_private_key(_read(base, ATTESTATION_KEY), password=None)
    except (ValueError, TypeError):
        raise SimDirError(f"{base / ATTESTATION_KEY} is not an unencrypted PEM private key: corrupt") from None
    read_platform_secret(base)

    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SimDirError(f"{base / ATTESTATION_KEY} is not an ECDSA P-256 key")
    if key.public_key() != cert.public_key():
        raise SimDirError(f"{base / ATTESTATION_KEY} does not belong to {base / ATTESTATION_CERT}")
    try:
        cert.verify_directly_issued_by(root)
    except Exception:  # noqa: BLE001 - InvalidSignature, ValueError, TypeError all mean the same here
        raise SimDirError(f"{base / ATTESTATION_CERT} is not issued by {base / ROOT_CERT}") from None

    sim_dir = SimDir(
        path=base,
        root_sha256=root.fingerprint(hashes.SHA256()).hex(),
        files=tuple(base / name for name in SIM_FILES),
    )
    return LoadedSimDir(sim_dir=sim_dir, root=root, attestation_cert=cert, attestation_key=key)
