"""The front door: ``verify_evidence(platform, evidence, policy, ...)`` -> :class:`Claims`.

Every caller (producer SDK, pool join, CLI) verifies evidence through :func:`verify_evidence`,
whatever the platform. Each platform plugs in one function that parses its evidence (its
``abi``) and checks authenticity against the trust anchors the policy names (its ``verify``),
returning :class:`Claims`; the shared :mod:`attestation.validate` then judges the claims
against the policy and reports every violation at once. The clock is never read here: ``now``
is an argument, so tests pin it and run offline.

Acceptance of simulated evidence is logged as a WARNING on the ``enclaveq.attestation`` logger
every single time (P8): simulation is never accepted silently.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Callable

from attestation.claims import Claims
from attestation.errors import EvidenceMalformed, PolicyViolation, UnsupportedPlatform, Violation
from attestation.policy import Policy
from attestation.sim import abi as sim_abi
from attestation.sim import verify as sim_verify
from attestation.validate import validate_claims

__all__ = ["SUPPORTED_PLATFORMS", "verify_evidence"]

logger = logging.getLogger("enclaveq.attestation")

# parse + authenticate: (evidence bytes, policy, now) -> Claims
PlatformVerifier = Callable[[bytes, Policy, datetime], Claims]


def _verify_sim(evidence: bytes, policy: Policy, now: datetime) -> Claims:
    parsed = sim_abi.parse_evidence(evidence)
    root = policy.sim_root_fingerprint
    if root is None:
        # No simulation root pinned means the policy cannot even authenticate simulated
        # evidence (a policy that allows simulation must pin one, Policy enforces it). Refuse
        # on the one thing that is certain; claims from unauthenticated bytes are not reported.
        raise PolicyViolation(
            [
                Violation(
                    "allow_simulation",
                    "simulated evidence",
                    "hardware TEE evidence: the policy does not allow simulation "
                    "(no [simulation] table with allow = true and root_sha256)",
                )
            ]
        )
    return sim_verify.verify_sim_evidence(parsed, trusted_root_sha256=root, now=now)


# SGX, TDX, SEV-SNP and Nitro register here as their abi/verify modules land.
_PLATFORMS: dict[str, PlatformVerifier] = {"sim": _verify_sim}
SUPPORTED_PLATFORMS: tuple[str, ...] = tuple(sorted(_PLATFORMS))


def verify_evidence(
    platform: str,
    evidence: bytes,
    policy: Policy,
    *,
    expected_report_data: bytes | None,
    now: datetime,
) -> Claims:
    """Parse, authenticate and validate ``evidence``; return its claims if the policy accepts it.

    ``expected_report_data`` is the 64-byte value the worker must have bound into the evidence
    (the hash of the attestation statement built around this verifier's nonce), or None when
    the policy does not require a nonce (freshness then rests on ``max_evidence_age_seconds``).
    ``now`` is a timezone-aware datetime.

    Raises :class:`UnsupportedPlatform`, :class:`EvidenceMalformed`, :class:`EvidenceInvalid`
    or :class:`PolicyViolation` (all :class:`AttestationError`).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be an attestation.policy.Policy, not {type(policy).__name__}")
    verifier = _PLATFORMS.get(platform) if isinstance(platform, str) else None
    if verifier is None:
        raise UnsupportedPlatform(str(platform), SUPPORTED_PLATFORMS)
    if not isinstance(evidence, (bytes, bytearray, memoryview)):
        raise EvidenceMalformed(f"evidence must be bytes, not {type(evidence).__name__}")
    if expected_report_data is not None:
        expected_report_data = bytes(expected_report_data)

    claims = verifier(bytes(evidence), policy, now)
    validate_claims(claims, policy, expected_report_data=expected_report_data, now=now)

    if claims.simulated:
        logger.warning(
            "Accepted SIMULATED attestation evidence (measurement %s): simulation gives no "
            "confidentiality, so the host can read everything sent to this worker.",
            claims.measurement.hex(),
        )
    return claims
