"""The front door: ``verify_evidence(platform, evidence, policy, ...)`` -> :class:`Claims`.

Every caller (producer SDK, pool join, CLI) verifies evidence through :func:`verify_evidence`,
whatever the platform:

- simulated evidence (``"sim"``) is parsed and authenticated here, against the simulation root
  the policy pins, then judged by the common checks of :mod:`attestation.validate`;
- hardware evidence goes to its platform's ``PLATFORM`` (found by :mod:`attestation.registry`):
  ``verify`` parses and authenticates it against the trust anchors into a
  :class:`~attestation.platforms.Verified`; the common checks then run on its platform-neutral
  :class:`Claims` (:func:`claims_of`) and, when the policy has the platform's table, the
  platform's own ``violations`` against that table. Without the table (the top-level
  ``measurements`` route) the defaults a table has apply: the collateral defaults of
  :mod:`attestation.collateral_rules` (collateral required, none stale) and the default TCB
  judgement (:data:`TOP_LEVEL_TCB_STATUSES`: ``UpToDate`` only; no advisory accepted; a revoked
  PCK certificate is already ``EvidenceInvalid`` in ``verify``). Every violation is raised at once.

:func:`verify_hardware` parses and authenticates without judging (the CLI's no-policy mode, the
benchmarks). The clock is never read here: ``now`` is an argument, so tests pin it and run offline.

Acceptance of simulated evidence is logged as a WARNING on the ``enclaveq.attestation`` logger
every single time: simulation is never accepted silently.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from cryptography import x509

from attestation.claims import Claims
from attestation.collateral_rules import DEFAULT_RULES, collateral_violations
from attestation.errors import EvidenceMalformed, PolicyViolation, UnsupportedPlatform, Violation
from attestation.policy import Policy
from attestation.sim import abi as sim_abi
from attestation.sim import verify as sim_verify
from attestation.validate import claim_violations, validate_claims
from attestation import registry
from attestation.platforms import VerificationInputs, Verified
from attestation.registry import ALL_PLATFORMS
from attestation.trust import DEFAULT_TRUST, TrustAnchors

__all__ = ["SUPPORTED_PLATFORMS", "TOP_LEVEL_ADVISORY_IDS", "TOP_LEVEL_TCB_STATUSES", "claims_of", "verify_evidence",
           "verify_hardware"]

logger = logging.getLogger("enclaveq.attestation")


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


SUPPORTED_PLATFORMS: tuple[str, ...] = ALL_PLATFORMS

# The TCB judgement of a policy without the evidence's platform table: the defaults of an [sgx] /
# [tdx] table's accepted_tcb_statuses and accepted_advisory_ids (attestation.intel.policy), which
# the top-level route has no key to relax (tests/test_tcb_fail_closed.py checks they agree).
TOP_LEVEL_TCB_STATUSES: tuple[str, ...] = ("UpToDate",)
TOP_LEVEL_ADVISORY_IDS: tuple[str, ...] = ()


def _top_level_tcb_violations(platform: str, verified: Verified) -> list[Violation]:
    """The default TCB judgement of evidence whose TCB status was evaluated (vendor collateral
    given); without collateral there is no status and ``collateral_violations`` refuses instead."""
    status = verified.tcb_status
    if status is None:
        return []
    found: list[Violation] = []
    if status not in TOP_LEVEL_TCB_STATUSES:
        relax = ("a revoked TCB is never acceptable" if status == "Revoked" else
                 f"a [{platform}] table's accepted_tcb_statuses can accept others")
        found.append(Violation(
            f"{platform}.tcb_status", status,
            f"one of [{', '.join(TOP_LEVEL_TCB_STATUSES)}] (the default accepted_tcb_statuses: the policy has no "
            f"[{platform}] table; {relax})",
        ))
    unaccepted = [a for a in verified.advisory_ids if a not in TOP_LEVEL_ADVISORY_IDS]
    if unaccepted:
        found.append(Violation(
            f"{platform}.advisory_ids", ", ".join(unaccepted),
            f"no advisories (the default accepted_advisory_ids = []: the policy has no [{platform}] table; "
            f"a [{platform}] table's accepted_advisory_ids can accept them)",
        ))
    return found


def claims_of(verified: Verified) -> Claims:
    """The platform-neutral view of a hardware platform's verified evidence."""
    return Claims(
        platform=verified.platform, measurement=verified.measurement, debug=verified.debug,
        security_version=verified.security_version, report_data=verified.report_data,
        issued_at=verified.issued_at, simulated=verified.simulated, chain=verified.chain,
        details=verified.claims, trailing_bytes=verified.trailing_bytes, tcb_status=verified.tcb_status,
        advisory_ids=verified.advisory_ids, tcb_evaluated=verified.tcb_evaluated, collateral=verified.collateral,
    )


def verify_hardware(platform: str, evidence: bytes, inputs: VerificationInputs) -> Verified:
    """Parse and authenticate hardware evidence without judging it (the CLI's no-policy mode)."""
    return registry.platform(platform).verify(evidence, inputs)


def verify_evidence(
    platform: str,
    evidence: bytes,
    policy: Policy,
    *,
    expected_report_data: bytes | None,
    now: datetime,
    certs: Sequence[x509.Certificate] = (),
    collateral: Mapping[str, Any] | None = None,
    trust: TrustAnchors | None = None,
) -> Claims:
    """Parse, authenticate and validate ``evidence``; return its claims if the policy accepts it.

    ``expected_report_data`` is the value the worker must have bound into the evidence (the
    hash of the attestation statement built around this verifier's nonce), or None when the
    policy does not require a nonce (freshness then rests on ``max_evidence_age_seconds``,
    which only evidence with a signed time can meet). ``now`` is a timezone-aware datetime.
    ``certs`` (extra certificates such as an SNP VCEK), ``collateral`` (e.g. Intel TCB Info)
    and ``trust`` (pinned roots; tests inject fakes) matter to hardware platforms only.

    Raises :class:`UnsupportedPlatform`, :class:`EvidenceMalformed`, :class:`EvidenceInvalid`
    or :class:`PolicyViolation` (all :class:`AttestationError`).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be an attestation.policy.Policy, not {type(policy).__name__}")
    if not isinstance(platform, str) or platform not in ALL_PLATFORMS:
        raise UnsupportedPlatform(str(platform), SUPPORTED_PLATFORMS)
    if not isinstance(evidence, (bytes, bytearray, memoryview)):
        raise EvidenceMalformed(f"evidence must be bytes, not {type(evidence).__name__}")
    if expected_report_data is not None:
        expected_report_data = bytes(expected_report_data)

    if platform == "sim":
        claims = _verify_sim(bytes(evidence), policy, now)
        validate_claims(claims, policy, expected_report_data=expected_report_data, now=now)
    else:
        inputs = VerificationInputs(now=now, extra_certs=tuple(certs), collateral=dict(collateral or {}),
                                    trust=trust or DEFAULT_TRUST)
        plat = registry.platform(platform)
        verified = plat.verify(bytes(evidence), inputs)
        claims = claims_of(verified)
        found = claim_violations(claims, policy, expected_report_data=expected_report_data, now=now)
        section = policy.section(platform)
        if section is not None:
            found.extend(plat.violations(verified, section, inputs))
        elif "platform" not in {v.field for v in found}:
            # The top-level route has no TCB or collateral keys: a table's defaults apply, so it
            # fails closed too (UpToDate only, no advisories, require_collateral = true, no grace).
            # Nitro has no TCB status and reports nothing missing. (A platform the top-level route
            # refuses outright, TDX and SEV-SNP, needs no second reason.)
            found.extend(_top_level_tcb_violations(platform, verified))
            found.extend(collateral_violations(platform, verified, DEFAULT_RULES, now))
        if found:
            raise PolicyViolation(found)

    if claims.simulated:
        logger.warning(
            "Accepted SIMULATED attestation evidence (measurement %s): simulation gives no "
            "confidentiality, so the host can read everything sent to this worker.",
            claims.measurement.hex(),
        )
    return claims
