"""The policy's judgement of collateral: is it there when the policy needs it, and is it fresh.

Owns the rules shared by the ``[sgx]``, ``[tdx]`` and ``[snp]`` tables (parsed by each table's
reader into a :class:`CollateralRules`) and :func:`collateral_violations`, which applies them to
a :class:`~attestation.platforms.Verified`. The verifiers only *report*: which collateral documents
they used (``Verified.collateral``, each with its issue date and nextUpdate) and what the TCB
judgement needed but was not given (``Verified.collateral_missing``). Judging happens here, against
the injected ``now``; nothing here is cached, so a warm verification is judged at its own time.

- ``require_collateral`` (default true): evidence whose TCB could not be evaluated (no Intel TCB
  Info / QE Identity / PCK chain CRLs; no CRL from the AMD ARK) is a ``<platform>.collateral``
  violation saying "collateral required" and how to fix it. ``false`` accepts such evidence; its
  claims then say ``tcb_evaluated = false``. Collateral that *is* given is always judged.
- ``collateral_grace_seconds`` (default 0, at most 30 days): a document (CRL, TCB Info, QE
  Identity) whose nextUpdate is in the past by at most this many seconds is accepted; beyond it,
  a ``<platform>.collateral`` violation naming the document, its nextUpdate and by how much.
- ``allow_expired_collateral`` (SGX/TDX only, kept for older policies, discouraged): true accepts
  any staleness. Refused together with a non-zero grace.

A policy without the evidence's platform table (the top-level ``measurements`` route) is judged
by :data:`DEFAULT_RULES`: it fails closed too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from attestation.errors import Violation

__all__ = ["DEFAULT_RULES", "MAX_GRACE_SECONDS", "CollateralRules", "collateral_violations", "rules_of"]

MAX_GRACE_SECONDS = 30 * 24 * 3600

_KIND_NAMES = {"crl": "CRL", "tcb_info": "TCB Info", "qe_identity": "QE Identity"}


def _iso(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class CollateralRules:
    """The collateral keys of one platform table (already checked by its reader)."""

    require_collateral: bool = True
    collateral_grace_seconds: int = 0
    allow_expired_collateral: bool = False


DEFAULT_RULES = CollateralRules()


def rules_of(section: Any) -> CollateralRules:
    """The rules of a parsed ``[sgx]`` / ``[tdx]`` / ``[snp]`` section (defaults for None)."""
    if section is None:
        return DEFAULT_RULES
    return CollateralRules(section.require_collateral, section.collateral_grace_seconds,
                           getattr(section, "allow_expired_collateral", False))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def collateral_violations(platform: str, verified: Any, rules: CollateralRules, now: datetime) -> list[Violation]:
    """Every collateral violation of ``verified`` under ``rules`` at ``now`` (empty: accepted)."""
    field = f"{platform}.collateral"
    found: list[Violation] = []
    missing = tuple(getattr(verified, "collateral_missing", ()))
    if missing and rules.require_collateral:
        found.append(Violation(
            field,
            f"collateral required: the TCB was not evaluated (missing: {'; '.join(missing)})",
            f"evidence judged against the vendor's collateral: pass --collateral DIR (see `enclaveq collateral "
            f"fetch`) or set [{platform}] require_collateral = false to accept evidence whose TCB is not evaluated",
        ))
    if rules.allow_expired_collateral:
        return found
    grace = rules.collateral_grace_seconds
    for use in getattr(verified, "collateral", ()):
        late = use.stale_by(now)
        if late <= grace:
            continue
        assert use.next_update is not None
        found.append(Violation(
            field,
            f"stale {_KIND_NAMES.get(use.kind, use.kind)} of {use.issuer!r}: nextUpdate {_iso(use.next_update)} "
            f"was {_duration(late)} ({late:.0f} s) before the verification time {_iso(now)}",
            f"collateral past its nextUpdate by at most {grace} s (policy [{platform}] collateral_grace_seconds = "
            f"{grace}{'' if platform == 'snp' else ', allow_expired_collateral = false'}): fetch fresh collateral",
        ))
    return found
