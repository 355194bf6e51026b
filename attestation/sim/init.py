"""Create a simulation directory: a throw-away "vendor" root, an attestation key, a fuse secret.

:func:`init_sim_dir` writes four files (see :mod:`attestation.sim.simdir`):

- ``root.pem`` -- a self-signed ECDSA P-256 CA, subject CN "enclaveq SIMULATION root — no
  confidentiality". Its SHA-256 fingerprint is what a policy pins in ``[simulation]
  root_sha256``.
- ``attestation-key.pem`` (mode 0600) and ``attestation-cert.pem`` -- the key that signs
  simulated evidence, certified by the root (not a CA, digitalSignature only).
- ``platform-secret`` (mode 0600) -- 32 random bytes standing in for the CPU fuse secret that
  sealing keys are derived from (:mod:`attestation.sim.sealing`).

The root **private** key is generated, used to sign the two certificates, and dropped: it is
never written anywhere. Nobody needs it after ``init`` (the root only ever certifies this one
attestation key), and not keeping it means a leaked simulation directory cannot be used to mint
further certificates under the root. To rotate, run ``init --force``: this makes a new root
with a new fingerprint, so every policy that pinned the old one stops trusting the directory.

Simulation gives **no confidentiality**: the host can read the attestation key and the platform
secret. It exists so that development and CI exercise the same code paths as real TEEs.
"""

from __future__ import annotations

import os
import secrets
from datetime import datetime, timedelta, UTC
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from attestation.errors import SimDirError, SimDirExists
from attestation.sim.simdir import (
    ATTESTATION_CERT,
    ATTESTATION_KEY,
    PLATFORM_SECRET,
    PLATFORM_SECRET_SIZE,
    ROOT_CERT,
    SIM_FILES,
    SimDir,
)

__all__ = [
    "ROOT_COMMON_NAME",
    "ATTESTATION_COMMON_NAME",
    "BACKDATE",
    "init_sim_dir",
    "build_root_certificate",
    "build_attestation_certificate",
]

ROOT_COMMON_NAME = "enclaveq SIMULATION root — no confidentiality"
ATTESTATION_COMMON_NAME = "enclaveq SIMULATION attestation key — no confidentiality"
# Certificates start a little before `now`, so a worker whose clock runs slightly behind the
# machine that ran `init` does not see them as "not yet valid".
BACKDATE = timedelta(minutes=5)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "enclaveq simulation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def build_root_certificate(
    key: ec.EllipticCurvePrivateKey,
    *,
    not_before: datetime,
    not_after: datetime,
    common_name: str = ROOT_COMMON_NAME,
) -> x509.Certificate:
    """A self-signed CA that may certify end-entity attestation keys only (path length 0)."""
    name = _name(common_name)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def build_attestation_certificate(
    public_key: ec.EllipticCurvePublicKey,
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    not_before: datetime,
    not_after: datetime,
    common_name: str = ATTESTATION_COMMON_NAME,
) -> x509.Certificate:
    """An end-entity certificate for an evidence-signing key, issued by ``issuer_cert``."""
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    # Create the temporary file with its final mode (no window where a secret is world-readable),
    # fsync it, then rename over the target so a reader never sees half a file.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed `mode`; we want exactly this one
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def init_sim_dir(
    path: str | os.PathLike[str],
    *,
    now: datetime | None = None,
    days: int = 3650,
    force: bool = False,
) -> SimDir:
    """Create a simulation directory at ``path`` and return where it is and its root fingerprint.

    Refuses (:class:`SimDirError`) if ``path`` already holds any simulation file, unless
    ``force`` is true, in which case every file is replaced (and the root fingerprint changes).
    ``now`` defaults to the real clock; certificates are valid from ``now - 5 min`` for ``days``.
    """
    if type(days) is not int or days < 1:
        raise ValueError("days must be a positive integer")
    if now is None:
        now = datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    now = now.astimezone(UTC).replace(microsecond=0)  # X.509 times have second precision

    base = Path(path)
    if base.exists() and not base.is_dir():
        raise SimDirError(f"{base} exists and is not a directory")
    existing = [name for name in SIM_FILES if (base / name).exists()]
    if existing and not force:
        raise SimDirExists(base, tuple(existing))
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SimDirError(f"cannot create {base}: {exc.strerror}") from None

    not_before, not_after = now - BACKDATE, now + timedelta(days=days)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = build_root_certificate(root_key, not_before=not_before, not_after=not_after)
    attestation_key = ec.generate_private_key(ec.SECP256R1())
    attestation_cert = build_attestation_certificate(
        attestation_key.public_key(), root, root_key, not_before=not_before, not_after=not_after
    )
    del root_key  # deliberately never written: see the module docstring

    pem = serialization.Encoding.PEM
    try:
        _write_atomically(base / PLATFORM_SECRET, secrets.token_bytes(PLATFORM_SECRET_SIZE), 0o600)
        _write_atomically(
            base / ATTESTATION_KEY,
            attestation_key.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            0o600,
        )
        _write_atomically(base / ATTESTATION_CERT, attestation_cert.public_bytes(pem), 0o644)
        _write_atomically(base / ROOT_CERT, root.public_bytes(pem), 0o644)
    except OSError as exc:
        raise SimDirError(f"cannot write the simulation directory {base}: {exc.strerror}") from None

    return SimDir(
        path=base,
        root_sha256=root.fingerprint(hashes.SHA256()).hex(),
        files=tuple(base / name for name in SIM_FILES),
    )
