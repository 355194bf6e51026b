"""AMD SEV-SNP attestation reports: parse (``abi``), authenticate (``verify``: report signature,
ARK -> ASK/ASVK -> VCEK/VLEK chain, TCB and chip binding), judge (``policy`` + ``validate``).

``kds`` loads and classifies AMD certificates and defines the optional KDS fetcher protocol.
The pinned AMD ARK fingerprints (Milan, Genoa, Turin) live with the other vendor pins, in
:mod:`attestation.trust.amd`. :data:`PLATFORM` is what ``attestation.registry`` loads.
"""

from __future__ import annotations

from attestation.platforms import PlatformFunctions
from attestation.snp.abi import AttestationReport, TcbParts, parse_report
from attestation.snp.kds import KdsFetcher, load_certificates
from attestation.snp.policy import SnpPolicy
from attestation.snp.validate import violations
from attestation.snp.verify import CLAIM_KEYS, SnpEvidence, clear_caches, verify_report

__all__ = [
    "AttestationReport",
    "CLAIM_KEYS",
    "KdsFetcher",
    "PLATFORM",
    "SnpEvidence",
    "SnpPolicy",
    "TcbParts",
    "clear_caches",
    "load_certificates",
    "parse_report",
    "verify_report",
]


PLATFORM = PlatformFunctions(name="snp", section=SnpPolicy, verify=verify_report, violations=violations)
