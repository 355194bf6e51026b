"""Evidence from Gramine's ``/dev/attestation``: Intel SGX DCAP quotes inside a Gramine enclave.

Gramine (gramine-sgx) exposes remote attestation as pseudo-files (Gramine documentation,
"Attestation and Secret Provisioning", the /dev/attestation interface):

- ``attestation_type`` (RO): "dcap" when the manifest says ``sgx.remote_attestation = "dcap"``;
  "none" when attestation is off (and under gramine-direct); "epid" for the retired EPID scheme.
- ``user_report_data`` (RW, exactly 64 bytes): the report data of the next quote.
- ``quote`` (RO): reading it makes Gramine ask the Quoting Enclave for an SGX ECDSA quote over
  the current ``user_report_data``.
- ``my_target_info`` (RO, 512 bytes), ``target_info`` (RW) and ``report`` (RO, 432 bytes): local
  attestation. Reading ``report`` makes Gramine run EREPORT *inside the enclave* for the target
  in ``target_info`` over ``user_report_data``; with our own target info that is a report of
  this enclave about itself (Gramine's CI-Examples/python/scripts/sgx-report.py does exactly
  this). Its 384-byte body is the one a quote carries, but unlike a quote (which the host's
  quoting enclave produces) the host cannot substitute it: :meth:`GramineSgxProvider.local_report`.

``user_report_data`` is one per enclave process, so a lock covers the write and the read: two
threads asking at once would otherwise get each other's quotes. Gramine's pseudo-files hold no
generation counter; the quote is instead checked to carry our report data (:mod:`.binding`).
"""

from __future__ import annotations

import errno
import threading
from pathlib import Path

from .binding import REPORT_DATA_SIZE, bound_report_data
from .errors import ProviderFailed, ProviderNotSupported, ProviderUnavailable
from .fileops import FileOps, OsFileOps

__all__ = ["ATTESTATION_DIR", "GramineSgxProvider", "gramine_attestation_type", "gramine_sealing_key"]

ATTESTATION_DIR = Path("dev/attestation")
QUOTE_MAX = 64 * 1024   # an SGX quote with its PCK chain is about 5 KiB
TARGET_INFO_SIZE = 512  # sgx_target_info_t
LOCAL_REPORT_SIZE = 432  # sgx_report_t: 384-byte body, KEYID (32), MAC (16)


def _errno_text(exc: OSError) -> str:
    return f"{errno.errorcode.get(exc.errno or 0, '?')}: {exc.strerror or exc}"


def gramine_attestation_type(root: Path = Path("/"), *, ops: FileOps | None = None) -> str | None:
    """Gramine's ``attestation_type`` ("dcap", "none", "epid"), or None outside Gramine."""
    path = Path(root) / ATTESTATION_DIR / "attestation_type"
    if not path.exists():
        return None
    try:
        return (ops or OsFileOps()).read(path, 256).decode("ascii", "replace").strip()
    except OSError as exc:
        raise ProviderFailed(f"cannot read {path} ({_errno_text(exc)})") from None


class GramineSgxProvider:
    """SGX DCAP quotes through Gramine. ``ops`` is for tests (see :mod:`.fileops`)."""

    platform = "sgx"

    def __init__(self, *, root: Path = Path("/"), ops: FileOps | None = None) -> None:
        self._ops = ops or OsFileOps()
        self._dir = Path(root) / ATTESTATION_DIR
        if not self._dir.is_dir():
            raise ProviderUnavailable(
                f"{self._dir} not found: not running inside a Gramine SGX enclave (start the worker "
                "with gramine-sgx and a manifest that sets sgx.remote_attestation = \"dcap\")"
            )
        kind = gramine_attestation_type(root, ops=self._ops)
        if kind == "dcap":
            pass
        elif kind is None:
            raise ProviderUnavailable(f"{self._dir / 'attestation_type'} not found: not a Gramine attestation interface")
        elif kind == "none":
            raise ProviderUnavailable(
                "Gramine reports attestation_type 'none': remote attestation is off (gramine-direct, "
                "or the manifest lacks sgx.remote_attestation = \"dcap\")"
            )
        elif kind == "epid":
            raise ProviderNotSupported("Gramine is configured for EPID attestation, which Intel retired; "
                                       "set sgx.remote_attestation = \"dcap\" in the manifest")
        else:
            raise ProviderNotSupported(f"Gramine attestation_type {kind[:32]!r} is not supported (only 'dcap')")
        self._lock = threading.Lock()

    def evidence(self, report_data: bytes) -> bytes:
        """A fresh SGX DCAP quote binding ``report_data`` (exactly 64 bytes)."""
        if not isinstance(report_data, (bytes, bytearray)) or len(report_data) != REPORT_DATA_SIZE:
            raise ValueError(f"report_data must be exactly {REPORT_DATA_SIZE} bytes")
        report_data = bytes(report_data)
        with self._lock:
            try:
                self._ops.write(self._dir / "user_report_data", report_data)
            except OSError as exc:
                raise ProviderFailed(f"Gramine refused {self._dir / 'user_report_data'} ({_errno_text(exc)})") from None
            try:
                quote = self._ops.read(self._dir / "quote", QUOTE_MAX)
            except OSError as exc:
                raise ProviderFailed(
                    f"Gramine produced no quote ({_errno_text(exc)}): is the host's quoting service "
                    "(AESM with the DCAP quote provider library, or the PCCS it uses) running?"
                ) from None
        if not quote:
            raise ProviderFailed(f"{self._dir / 'quote'} is empty")
        try:
            bound = bound_report_data("sgx", quote)
        except ValueError as exc:
            raise ProviderFailed(f"Gramine returned an unusable quote: {exc}") from None
        if bound != report_data:
            raise ProviderFailed("Gramine returned a quote for other report data than ours "
                                 "(another process writing /dev/attestation/user_report_data?)")
        return quote

    def local_report(self, report_data: bytes) -> bytes:
        """This enclave's own SGX report (EREPORT targeted at itself) over ``report_data``: 432
        bytes, the 384-byte report body first. :class:`ProviderUnavailable` if this Gramine has
        no local-report interface, :class:`ProviderFailed` if it refuses."""
        if not isinstance(report_data, (bytes, bytearray)) or len(report_data) != REPORT_DATA_SIZE:
            raise ValueError(f"report_data must be exactly {REPORT_DATA_SIZE} bytes")
        for name in ("my_target_info", "target_info", "report"):
            if not (self._dir / name).exists():
                raise ProviderUnavailable(f"{self._dir / name} not found: this Gramine has no local SGX reports")
        with self._lock:
            try:
                target = self._ops.read(self._dir / "my_target_info", TARGET_INFO_SIZE)
                self._ops.write(self._dir / "target_info", target)
                self._ops.write(self._dir / "user_report_data", bytes(report_data))
                report = self._ops.read(self._dir / "report", 4 * LOCAL_REPORT_SIZE)
            except OSError as exc:
                raise ProviderFailed(f"Gramine gave no local SGX report ({_errno_text(exc)})") from None
        if len(report) != LOCAL_REPORT_SIZE:
            raise ProviderFailed(f"Gramine's local SGX report is {len(report)} bytes, not {LOCAL_REPORT_SIZE}")
        if report[320:384] != bytes(report_data):
            raise ProviderFailed("Gramine's local SGX report carries other report data than ours")
        return report


# Gramine derives these with EGETKEY (SEAL_KEY) and exposes them as 16-byte pseudo-files
# (Gramine documentation, "/dev/attestation/keys"): ``_sgx_mrenclave`` is bound to this exact
# enclave measurement, ``_sgx_mrsigner`` to the enclave signer (survives upgrades).
SEALING_KEY_FILES = {"mrenclave": "keys/_sgx_mrenclave", "mrsigner": "keys/_sgx_mrsigner"}
SEALING_KEY_SIZE = 16


def gramine_sealing_key(policy: str = "mrenclave", *, root: Path = Path("/"), ops: FileOps | None = None) -> bytes:
    """The enclave's 16-byte SGX sealing key (EGETKEY) under ``policy``, read from Gramine.

    ``ProviderUnavailable`` outside Gramine or on a Gramine without the keys interface;
    ``ProviderFailed`` if the pseudo-file cannot be read or has the wrong size.
    """
    if policy not in SEALING_KEY_FILES:
        raise ValueError(f"sealing policy must be one of {sorted(SEALING_KEY_FILES)}")
    path = Path(root) / ATTESTATION_DIR / SEALING_KEY_FILES[policy]
    if not path.exists():
        raise ProviderUnavailable(f"{path} not found: this Gramine exposes no SGX sealing keys")
    try:
        key = (ops or OsFileOps()).read(path, 64)
    except OSError as exc:
        raise ProviderFailed(f"cannot read the SGX sealing key {path} ({_errno_text(exc)})") from None
    if len(key) != SEALING_KEY_SIZE:
        raise ProviderFailed(f"{path} gave {len(key)} bytes; an SGX sealing key has {SEALING_KEY_SIZE}")
    return key
