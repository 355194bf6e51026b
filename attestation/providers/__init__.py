"""Evidence providers: how a worker inside a real TEE obtains evidence binding its report data.

Each provider has ``platform`` ("tdx", "snp", "sgx", "nitro") and ``evidence(report_data)``
(64 bytes in, the platform's evidence out), like the simulated
:class:`attestation.sim.provider.SimProvider`, so the attestation exchange with producers is
the same for real and simulated evidence.

- :class:`ConfigfsTsmProvider`  Linux configfs-tsm: TDX quotes, SEV-SNP reports (+ certificate table)
- :class:`GramineSgxProvider`   Gramine's /dev/attestation: SGX DCAP quotes
- :class:`NitroNsmProvider`     /dev/nsm: not supported in this build (see its module)
- :func:`detect_tee`, :func:`provider_for`   ``enclaveq worker --tee auto|sim|sgx|tdx|snp|nitro``

Besides evidence, a worker asks its TEE two things (the ioctls behind them: :mod:`.ioctl`):

- :mod:`.self_identity`  what this TEE is, from a source the host cannot substitute (SGX's own
  EREPORT via Gramine, TDX's TDREPORT via :mod:`.tdx_guest`, the SNP report, the Nitro
  document): the pool's join policy admits exactly that identity;
- :mod:`.snp_derived_key`  SEV-SNP's firmware-derived sealing key (MSG_KEY_REQ); SGX's comes
  from Gramine (:func:`.gramine.gramine_sealing_key`).

Every provider takes ``root`` (default ``/``) so that tests run it against a fake tree, and the
file-backed ones take ``ops`` (:mod:`.fileops`) to emulate device semantics there
(:mod:`.fakes`). Errors: :mod:`.errors`.
"""

from .configfs_tsm import ConfigfsTsmProvider, TsmReport, parse_cert_table
from .detect import REAL_TEES, TEE_CHOICES, detect_tee, provider_for
from .errors import (EvidenceMismatch, NoTeeDetected, ProviderError, ProviderFailed, ProviderNotSupported,
                     ProviderUnavailable)
from .gramine import GramineSgxProvider
from .nitro_nsm import NitroNsmProvider

__all__ = [
    "ConfigfsTsmProvider",
    "EvidenceMismatch",
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
