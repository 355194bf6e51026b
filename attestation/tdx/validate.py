"""``[tdx]`` policy against verified TDX evidence: every :class:`Violation` at once.

Field names are ``tdx.<claim>``: ``tdx.mrtd``, ``tdx.rtmr0`` .. ``tdx.rtmr3``, ``tdx.mrconfigid``,
``tdx.mrowner``, ``tdx.mrownerconfig``, ``tdx.mrseam``, ``tdx.xfam``, ``tdx.td_attributes``,
``tdx.debug``, ``tdx.tee_tcb_svn``, ``tdx.tcb_status``, ``tdx.advisory_ids``, ``tdx.collateral``. TCB statuses are
judged when the verification had Intel collateral; ``tdx.collateral`` reports collateral that is
missing (unless ``require_collateral = false``) or stale beyond the grace; see
:mod:`attestation.intel.policy` and :mod:`attestation.collateral_rules`.
"""

from __future__ import annotations

from typing import Any

from attestation.errors import Violation
from attestation.intel.policy import masked_violation, one_of, tcb_violations

from .policy import MEASUREMENT_KEYS, TdxPolicy

__all__ = ["violations"]


def _now(inputs: Any) -> Any:
    # Collateral freshness is judged at the verification's own time, never the clock's.
    if inputs is None:
        raise TypeError("violations() needs the VerificationInputs (for `now`) to judge collateral freshness")
    return inputs.now


def violations(verified: Any, section: TdxPolicy, inputs: Any = None) -> list[Violation]:
    claims = verified.claims
    found: list[Violation | None] = [
        one_of(f"tdx.{key}", claims[key], getattr(section, key), f"[tdx] {key}") for key in MEASUREMENT_KEYS
    ]
    found.append(masked_violation("tdx.xfam", claims["xfam"], section.xfam, section.xfam_mask, "[tdx] xfam"))
    found.append(masked_violation("tdx.td_attributes", claims["td_attributes"], section.td_attributes,
                                  section.td_attributes_mask, "[tdx] td_attributes"))
    if verified.debug and not section.debug_allowed:
        found.append(Violation("tdx.debug", "true (TD_ATTRIBUTES bit 0 TUD.DEBUG: the host can read TD memory)",
                               "false (policy [tdx] debug_allowed = false)"))
    minimum = section.min_tee_tcb_svn
    svn = claims["tee_tcb_svn"]
    if minimum is not None:
        low = [i for i, (have, need) in enumerate(zip(svn, minimum)) if have < need]
        if low:
            found.append(Violation("tdx.tee_tcb_svn", svn.hex(),
                                   f"every component >= {minimum.hex()} (policy [tdx] min_tee_tcb_svn; "
                                   f"component{'s' if len(low) > 1 else ''} {', '.join(map(str, low))} lower)"))
    out = [v for v in found if v is not None]
    out.extend(tcb_violations("tdx", verified, section, _now(inputs)))
    return out
