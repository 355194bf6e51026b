"""``[sgx]`` policy against verified SGX evidence: every :class:`Violation` at once.

Field names are ``sgx.<claim>``: ``sgx.mrenclave``, ``sgx.mrsigner``, ``sgx.isvprodid``,
``sgx.isvsvn``, ``sgx.debug``, ``sgx.attributes``, ``sgx.xfrm``, ``sgx.miscselect``,
``sgx.tcb_status``, ``sgx.advisory_ids``, ``sgx.collateral``. Reads only ``verified.claims``, ``verified.debug`` and
the TCB result, so it judges any :class:`~attestation.platforms.Verified` of platform ``sgx``.
TCB statuses are judged when the verification had Intel collateral (``verified.tcb_status`` is
not None); ``sgx.collateral`` reports collateral that is missing (unless ``require_collateral =
false``) or stale beyond the grace; see :mod:`attestation.intel.policy` and
:mod:`attestation.collateral_rules`.
"""

from __future__ import annotations

from typing import Any

from attestation.errors import Violation
from attestation.intel.policy import masked_violation, one_of, tcb_violations

from .policy import SgxPolicy

__all__ = ["violations"]


def _now(inputs: Any) -> Any:
    # Collateral freshness is judged at the verification's own time, never the clock's.
    if inputs is None:
        raise TypeError("violations() needs the VerificationInputs (for `now`) to judge collateral freshness")
    return inputs.now


def violations(verified: Any, section: SgxPolicy, inputs: Any = None) -> list[Violation]:
    claims = verified.claims
    found: list[Violation | None] = [
        one_of("sgx.mrenclave", claims["mrenclave"], section.mrenclave, "[sgx] mrenclave"),
        one_of("sgx.mrsigner", claims["mrsigner"], section.mrsigner, "[sgx] mrsigner"),
    ]
    if section.isvprodid is not None and claims["isvprodid"] not in section.isvprodid:
        found.append(Violation("sgx.isvprodid", str(claims["isvprodid"]),
                               f"one of [{', '.join(map(str, section.isvprodid))}] (policy [sgx] isvprodid)"))
    if claims["isvsvn"] < section.min_isvsvn:
        found.append(Violation("sgx.isvsvn", str(claims["isvsvn"]), f">= {section.min_isvsvn} (policy [sgx] min_isvsvn)"))
    if verified.debug and not section.debug_allowed:
        found.append(Violation("sgx.debug", "true (ATTRIBUTES.FLAGS bit 1 DEBUG: the host can read enclave memory)",
                               "false (policy [sgx] debug_allowed = false)"))
    flags = claims["attributes_flags"].to_bytes(8, "little")
    xfrm = claims["attributes_xfrm"].to_bytes(8, "little")
    found.append(masked_violation("sgx.attributes", flags + xfrm, section.attributes, section.attributes_mask,
                                  "[sgx] attributes"))
    found.append(masked_violation("sgx.xfrm", xfrm, section.xfrm, section.xfrm_mask, "[sgx] xfrm"))
    if section.miscselect is not None and claims["miscselect"] & section.miscselect_mask != section.miscselect:
        found.append(Violation("sgx.miscselect", f"{claims['miscselect']:#010x}",
                               f"{section.miscselect:#010x} under mask {section.miscselect_mask:#010x} "
                               "(policy [sgx] miscselect, miscselect_mask)"))
    out = [v for v in found if v is not None]
    out.extend(tcb_violations("sgx", verified, section, _now(inputs)))
    return out
