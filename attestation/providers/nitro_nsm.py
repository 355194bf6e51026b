"""AWS Nitro Enclaves: the Nitro Secure Module (``/dev/nsm``) -- not supported in this build.

An attestation document comes from the NSM device through an ioctl carrying CBOR-encoded
request and response buffers (``Attestation {user_data, nonce, public_key}``); the 64-byte
report data would go in ``user_data`` (the document allows up to 1024 bytes there).

Decision (issue 3, item 6): use a maintained Python library for the device if one exists, as an
optional import, else refuse clearly. The Python NSM libraries on PyPI are
``aws-nsm-interface`` 1.0.0 (last release November 2020) and its fork
``aws-nsm-interface-verifiably`` 1.0.1 (March 2022); neither has been maintained for years, so
neither is used, and the ioctl is not hand-rolled here (a wrong buffer size on a kernel
interface is a memory-safety bug, and nothing on this machine could test it). AWS maintains the
Rust ``aws-nitro-enclaves-nsm-api`` crate; a small native helper built on it would be the way to
add Nitro later. Verification of Nitro documents is unaffected: only *producing* them in a
worker is missing.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ProviderNotSupported, ProviderUnavailable

__all__ = ["NSM_DEVICE", "NOT_SUPPORTED", "NitroNsmProvider"]

NSM_DEVICE = Path("dev/nsm")
NOT_SUPPORTED = (
    "Nitro NSM needs a maintained Python library for /dev/nsm (or a native helper around AWS's "
    "aws-nitro-enclaves-nsm-api); the only PyPI candidates, aws-nsm-interface (2020) and "
    "aws-nsm-interface-verifiably (2022), are unmaintained. Nitro evidence is not supported in "
    "this build; producers can still verify Nitro attestation documents."
)


class NitroNsmProvider:
    """Refuses at construction: ``ProviderUnavailable`` outside a Nitro Enclave (no
    ``/dev/nsm``), ``ProviderNotSupported`` inside one."""

    platform = "nitro"

    def __init__(self, *, root: Path = Path("/")) -> None:
        device = Path(root) / NSM_DEVICE
        if not device.exists():
            raise ProviderUnavailable(f"{device} not found: not running inside an AWS Nitro Enclave")
        raise ProviderNotSupported(NOT_SUPPORTED)

    def evidence(self, report_data: bytes) -> bytes:  # pragma: no cover - never constructed
        raise ProviderNotSupported(NOT_SUPPORTED)
