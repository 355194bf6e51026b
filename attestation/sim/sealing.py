"""Simulated sealing: keys bound to (this machine, this measurement), and a fixed AEAD recipe.

Real TEEs derive sealing keys from a fused CPU secret and the enclave's measurement (SGX
MRENCLAVE policy, SNP's MSG_KEY_REQ with the measurement mixed in), so only the same code on the
same machine can unseal. The simulation mirrors that with the directory's ``platform-secret``:

    sealing_key = HKDF-SHA256(ikm=platform-secret, salt=none,
                              info="enclaveq/sim/sealing/v1" || measurement, length=32)

Same directory and measurement -> same key (sealed storage survives a restart); any other
measurement -> an unrelated key (a changed worker cannot read its predecessor's secrets).

:func:`seal` / :func:`unseal` are a Fernet-style recipe with fixed choices: AES-256-GCM, a fresh
random 96-bit nonce per call (never derived or counted: a counter would live in state the host
can roll back, and one repeated nonce under the same key breaks AES-GCM), caller-supplied
associated data that names what the blob is for. Blob layout: ``version (1 byte, 0x01) || nonce (12) ||
ciphertext || tag (16)``; the version byte is also authenticated (it is part of the AAD).
Every failure to open is the same opaque :class:`UnsealError`.

The platform secret sits in a file the host can read: simulated sealing protects nothing
against the host. It exists so that code paths match real TEEs.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from attestation.errors import UnsealError
from attestation.sim.abi import MEASUREMENT_SIZE
from attestation.sim.simdir import SimDir, read_platform_secret

__all__ = ["SEALING_LABEL", "SEAL_VERSION", "sealing_key", "seal", "unseal", "UnsealError"]

SEALING_LABEL = b"enclaveq/sim/sealing/v1"
SEAL_VERSION = 1
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
_HEADER = bytes([SEAL_VERSION])


def sealing_key(sim_dir: str | os.PathLike[str] | SimDir, measurement: bytes) -> bytes:
    """The 32-byte sealing key of ``measurement`` on the simulated machine ``sim_dir``."""
    if type(measurement) is not bytes or len(measurement) != MEASUREMENT_SIZE:
        raise ValueError(f"measurement must be {MEASUREMENT_SIZE} bytes")
    secret = read_platform_secret(sim_dir)
    # The label is fixed-length and comes first, so label || measurement is unambiguous.
    return HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_SIZE,
        salt=None,
        info=SEALING_LABEL + measurement,
    ).derive(secret)


def _aad(aad: bytes) -> bytes:
    # Authenticate the version byte too, so a future format cannot be confused with this one.
    return _HEADER + aad


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt and authenticate ``plaintext``; ``aad`` is authenticated but not stored."""
    if len(key) != KEY_SIZE:
        raise ValueError(f"sealing key must be {KEY_SIZE} bytes")
    nonce = os.urandom(NONCE_SIZE)
    return _HEADER + nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(aad))


def unseal(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Open a blob from :func:`seal` with the same key and ``aad``, or raise :class:`UnsealError`."""
    if len(key) != KEY_SIZE:
        raise ValueError(f"sealing key must be {KEY_SIZE} bytes")
    if (
        not isinstance(blob, (bytes, bytearray))
        or len(blob) < 1 + NONCE_SIZE + TAG_SIZE
        or blob[0] != SEAL_VERSION
    ):
        raise UnsealError()
    nonce, ciphertext = bytes(blob[1 : 1 + NONCE_SIZE]), bytes(blob[1 + NONCE_SIZE :])
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, _aad(aad))
    except InvalidTag:
        raise UnsealError() from None
