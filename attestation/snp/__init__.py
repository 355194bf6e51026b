"""AMD SEV-SNP attestation reports: parse (``abi``), authenticate (``verify``: report signature,
ARK -> ASK/ASVK -> VCEK/VLEK chain, TCB and chip binding), judge (``policy`` + ``validate``).

``PLATFORM`` implements :class:`attestation.platforms.Platform` for the front door;
``trust.SNP_ROOTS`` are the pinned AMD ARK fingerprints (Milan, Genoa, Turin); ``kds`` loads
and classifies AMD certificates and defines the optional KDS fetcher protocol.

Importing this package is cheap and has no dependency on :mod:`attestation.platforms` or
:mod:`attestation.trust` (names are loaded on first use), so ``attestation.trust`` can import
``attestation.snp.trust`` for its defaults without an import cycle.
"""

from __future__ import annotations

import importlib
from typing import Any
from collections.abc import Sequence

from attestation.snp.policy import SnpPolicy

__all__ = [
    "ARK_FINGERPRINTS",
    "AttestationReport",
    "CLAIM_KEYS",
    "KdsFetcher",
    "PLATFORM",
    "SNP_ROOTS",
    "SnpEvidence",
    "SnpPlatform",
    "SnpPolicy",
    "TcbParts",
    "clear_caches",
    "load_certificates",
    "parse_report",
    "verify_report",
]

_LAZY = {
    "ARK_FINGERPRINTS": "attestation.snp.trust",
    "SNP_ROOTS": "attestation.snp.trust",
    "AttestationReport": "attestation.snp.abi",
    "TcbParts": "attestation.snp.abi",
    "parse_report": "attestation.snp.abi",
    "KdsFetcher": "attestation.snp.kds",
    "load_certificates": "attestation.snp.kds",
    "CLAIM_KEYS": "attestation.snp.verify",
    "SnpEvidence": "attestation.snp.verify",
    "clear_caches": "attestation.snp.verify",
    "verify_report": "attestation.snp.verify",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'attestation.snp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


class SnpPlatform:
    """The SEV-SNP :class:`~attestation.platforms.Platform`."""

    name = "snp"
    section = SnpPolicy

    def verify(self, evidence: bytes, inputs: Any) -> Any:
        from attestation.snp.verify import verify_report

        return verify_report(evidence, inputs)

    def violations(self, verified: Any, section: Any, inputs: Any) -> Sequence[Any]:
        from attestation.snp.validate import violations

        return violations(verified, section, inputs)

    def __repr__(self) -> str:
        return "<SEV-SNP platform>"


PLATFORM = SnpPlatform()
