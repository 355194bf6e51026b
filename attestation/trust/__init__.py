"""Pinned vendor trust anchors: SHA-256 fingerprints of the DER root certificates.

Roots are pinned by fingerprint: a root certificate is accepted only if it hashes to a pinned
value and signs itself. Intel's and AWS's arrive with the evidence (the PCK chain, Nitro's
cabundle). AMD's are also shipped, with their intermediates (ARK and ASK/ASVK per product line,
in ``amd/``, checked against the pins when loaded), because a host's certificate table or a KDS
lookup gives a user only the VCEK or VLEK; a chain the user gives is still used first. One module
per vendor holds its values and their provenance:

- :mod:`attestation.trust.intel`: Intel SGX Root CA (the root of SGX and of TDX quotes);
- :mod:`attestation.trust.amd`: AMD ARK per product line (Milan, Genoa, Turin);
- :mod:`attestation.trust.aws`: AWS Nitro Enclaves Root-G1.

This package owns :class:`TrustAnchors` and :data:`DEFAULT_TRUST`; it imports nothing from the
platform packages, so any of them may import it. Tests inject their own ``TrustAnchors`` with
fake roots (attestation/testing) instead of these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from attestation.trust.amd import ARK_FINGERPRINTS as AMD_ARKS
from attestation.trust.amd import SNP_ROOTS
from attestation.trust.aws import AWS_NITRO_ROOT_G1
from attestation.trust.intel import INTEL_SGX_ROOT_CA

__all__ = ["AMD_ARKS", "AWS_NITRO_ROOT_G1", "DEFAULT_TRUST", "INTEL_SGX_ROOT_CA", "SNP_ROOTS", "TrustAnchors"]


@dataclass(frozen=True)
class TrustAnchors:
    """Per platform, the root fingerprints (32-byte SHA-256 of DER) a verifier accepts."""

    roots: Mapping[str, frozenset[bytes]] = field(default_factory=dict)

    def for_platform(self, platform: str) -> frozenset[bytes]:
        return self.roots.get(platform, frozenset())

    def with_roots(self, platform: str, *fingerprints: bytes) -> TrustAnchors:
        merged = dict(self.roots)
        merged[platform] = frozenset(merged.get(platform, frozenset()) | set(fingerprints))
        return TrustAnchors(merged)


DEFAULT_TRUST = TrustAnchors({
    "sgx": frozenset({INTEL_SGX_ROOT_CA}),
    "tdx": frozenset({INTEL_SGX_ROOT_CA}),
    "snp": SNP_ROOTS,
    "nitro": frozenset({AWS_NITRO_ROOT_G1}),
})
