"""Pinned vendor trust anchors: SHA-256 fingerprints of the DER root certificates.

Only fingerprints are pinned, never certificate files: the root certificate itself arrives with
the evidence (Intel's PCK chain and Nitro's cabundle carry it) or with the user's collateral
(AMD's ARK/ASK, from `--cert` or a collateral directory), and is accepted only if it hashes to a
pinned value and signs itself. The values are public facts published by each vendor:

- Intel SGX Root CA (also the root of TDX quotes): Intel PCS, "Intel SGX Root CA" certificate.
- AMD ARK per product line (Milan, Genoa, Turin): AMD KDS `/vcek/v1/<product>/cert_chain`.
- AWS Nitro Enclaves Root-G1: the AWS Nitro Enclaves User Guide, "Verifying the root of trust".

Tests inject their own ``TrustAnchors`` with fake roots (attestation/testing) instead of these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Mapping


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


INTEL_SGX_ROOT_CA = bytes.fromhex("44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3")
AWS_NITRO_ROOT_G1 = bytes.fromhex("641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b")
# AMD ARKs per product line (Milan, Genoa, Turin); provenance in attestation/snp/trust.py.
from attestation.snp.trust import ARK_FINGERPRINTS as AMD_ARKS, SNP_ROOTS  # noqa: E402

DEFAULT_TRUST = TrustAnchors({
    "sgx": frozenset({INTEL_SGX_ROOT_CA}),
    "tdx": frozenset({INTEL_SGX_ROOT_CA}),
    "snp": SNP_ROOTS,
    "nitro": frozenset({AWS_NITRO_ROOT_G1}),
})
