"""The policy checks common to every platform: judge authentic :class:`Claims` against a
:class:`Policy`, reporting every failure at once.

Runs only after the evidence has been authenticated (by :mod:`attestation.sim.verify` or a
platform's ``verify``). :func:`claim_violations` returns the failures of these checks:

- simulated evidence is refused unless the policy sets ``[simulation] allow = true``;
- evidence of a platform that has no table of its own in the policy (and simulated evidence) is
  judged by the generic ``measurements`` allow-list, ``min_security_version`` and
  ``debug_allowed``; a hardware platform with neither its table nor any measurement is refused.
  A platform *with* its table (``[sgx]``, ``[tdx]``, ``[snp]``, ``[nitro]``) skips these: its own
  ``validate`` module judges it by that table, and :mod:`attestation.verify` adds those
  violations to the same list;
- evidence that carries a signed time (Nitro, simulation) must be no older than
  ``max_evidence_age_seconds`` and no further in the future than ``max_clock_skew_seconds``;
- the report data must equal the value the verifier expects (bound to its nonce); when the
  verifier expects none, the policy must not set ``nonce_required``.

:func:`validate_claims` raises them together as one :class:`PolicyViolation`. Each
:class:`Violation` names the field, the value the evidence has and what the policy expects.
Nothing here reads a clock: ``now`` is passed in.
"""

from __future__ import annotations

import hmac
from datetime import datetime, timedelta

from attestation.claims import Claims
from attestation.errors import PolicyViolation, Violation
from attestation.policy import Policy

__all__ = ["claim_violations", "validate_claims"]


def _iso(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


# Platforms whose evidence the top-level `measurements` route cannot judge soundly.
_TABLE_ONLY = {
    "tdx": "a [tdx] table pinning mrtd and rtmr0-2: a top-level measurement compares MRTD alone, the "
           "firmware shared by every TD booted with it",
    "snp": "an [snp] table: a top-level measurement does not check the VMPL, the migration agent or the "
           "launch TCB",
}


def claim_violations(
    claims: Claims,
    policy: Policy,
    *,
    expected_report_data: bytes | None,
    now: datetime,
) -> list[Violation]:
    """Every way in which ``claims`` fail ``policy`` at ``now`` (empty list: accepted)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    found: list[Violation] = []

    if claims.simulated and not policy.allow_simulation:
        found.append(
            Violation(
                "allow_simulation",
                f"simulated evidence from platform {claims.platform!r}",
                "hardware TEE evidence: simulation gives no confidentiality and is refused "
                "unless the policy sets [simulation] allow = true",
            )
        )

    # A hardware platform with its own policy table is judged by that table (pins, debug, SVNs:
    # attestation/<platform>/validate.py); the generic allow-list covers the others.
    own_table = claims.platform != "sim" and policy.section(claims.platform) is not None
    if not own_table and claims.platform != "sim" and not policy.measurements:
        found.append(
            Violation(
                "platform",
                claims.platform,
                f"a [{claims.platform}] table in the policy (or its measurement in `measurements`): "
                "the policy does not accept this platform",
            )
        )
    elif not own_table and claims.platform in _TABLE_ONLY:
        # The top-level allow-list compares one value: for these platforms that value does not
        # identify the code (TDX MRTD is the firmware every TD on a cloud shares) or leaves out
        # what isolates it (SEV-SNP VMPL, the migration agent, the launch TCB). Only a table pins.
        found.append(Violation("platform", claims.platform, _TABLE_ONLY[claims.platform]))
    elif not own_table:
        if not policy.allows_measurement(claims.measurement):
            found.append(
                Violation(
                    "measurement",
                    claims.measurement.hex(),
                    f"one of policy measurements [{', '.join(policy.measurements)}]",
                )
            )

        if claims.security_version < policy.min_security_version:
            found.append(
                Violation(
                    "security_version",
                    str(claims.security_version),
                    f">= {policy.min_security_version} (policy min_security_version)",
                )
            )

        if claims.debug and not policy.debug_allowed:
            found.append(
                Violation(
                    "debug",
                    "true (debug mode: the host can inspect the TEE's memory)",
                    "false (policy debug_allowed = false)",
                )
            )

    if claims.issued_at is not None:  # only evidence with a signed time can be aged
        oldest = now - timedelta(seconds=policy.max_evidence_age_seconds)
        newest = now + timedelta(seconds=policy.max_clock_skew_seconds)
        if claims.issued_at < oldest:
            found.append(
                Violation(
                    "issued_at",
                    f"{_iso(claims.issued_at)} (stale: {(now - claims.issued_at).total_seconds():.3f} s old)",
                    f"not before {_iso(oldest)} (policy max_evidence_age_seconds = "
                    f"{policy.max_evidence_age_seconds})",
                )
            )
        elif claims.issued_at > newest:
            found.append(
                Violation(
                    "issued_at",
                    f"{_iso(claims.issued_at)} (in the future by "
                    f"{(claims.issued_at - now).total_seconds():.3f} s)",
                    f"not after {_iso(newest)} (policy max_clock_skew_seconds = "
                    f"{policy.max_clock_skew_seconds})",
                )
            )

    if expected_report_data is not None:
        # Not secret, but compare_digest costs nothing and avoids a habit that matters elsewhere.
        if not hmac.compare_digest(claims.report_data, expected_report_data):
            found.append(
                Violation(
                    "report_data",
                    claims.report_data.hex(),
                    f"{expected_report_data.hex()} (bound to this verifier's nonce; "
                    "a mismatch means replayed or foreign evidence)",
                )
            )
    elif policy.nonce_required:
        found.append(
            Violation(
                "report_data",
                f"{claims.report_data.hex()} (not checked: the verifier supplied no expected value)",
                "a value bound to the verifier's fresh nonce (policy nonce_required = true)",
            )
        )
    return found


def validate_claims(
    claims: Claims,
    policy: Policy,
    *,
    expected_report_data: bytes | None,
    now: datetime,
) -> Claims:
    """Return ``claims`` if the policy accepts them; else raise one :class:`PolicyViolation`
    listing every violation."""
    found = claim_violations(claims, policy, expected_report_data=expected_report_data, now=now)
    if found:
        raise PolicyViolation(found)
    return claims
