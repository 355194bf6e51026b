"""Evidence providers: how a worker inside a real TEE obtains evidence binding its report data.

Each provider has ``platform`` ("tdx", "snp", "sgx", "nitro") and ``evidence(report_data)``
(64 bytes in, the platform's evidence out), like the simulated
:class:`attestation.sim.provider.SimProvider`, so the attestation exchange with producers is
the same for real and simulated evidence.

- :class:`ConfigfsTsmProvider`  Linux configfs-tsm: TDX quotes, SEV-SNP reports (+ certificate table)
- :class:`GramineSgxProvider`   Gramine's /dev/attestation: SGX DCAP quotes
- :class:`NitroNsmProvider`     /dev/nsm: not supported in this build (see its module)
- :func:`detect_tee`, :func:`provider_for`   ``enclaveq worker --tee auto|sim|sgx|tdx|snp|nitro``

Every provider takes ``root`` (default ``/``) so that tests run it against a fake tree, and the
file-backed ones take ``ops`` (:mod:`.fileops`) to emulate device semantics there
(:mod:`.fakes`). Errors: :mod:`.errors`.
"""

from .configfs_tsm import ConfigfsTsmProvider, TsmReport, parse_cert_table
from .detect import REAL_TEES, TEE_CHOICES, detect_tee, provider_for
from .errors import NoTeeDetected, ProviderError, ProviderFailed, ProviderNotSupported, ProviderUnavailable
from .gramine import GramineSgxProvider
from .nitro_nsm import NitroNsmProvider

__all__ = [
    "ConfigfsTsmProvider",
    "GramineSgxProvider",
    "NitroNsmProvider",
    "NoTeeDetected",
    "ProviderError",
    "ProviderFailed",
    "ProviderNotSupported",
    "ProviderUnavailable",
    "REAL_TEES",
    "TEE_CHOICES",
    "TsmReport",
    "detect_tee",
    "parse_cert_table",
    "provider_for",
]
