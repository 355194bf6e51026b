"""Judge verified Nitro evidence against the ``[nitro]`` policy table, reporting every failure.

Fields (``Violation.field``): ``nitro.pcr0`` .. ``nitro.pcr8``, ``nitro.module_id``,
``nitro.debug``. Report data binding and evidence age (``issued_at`` = the signed
``timestamp``) are checked by the front door for every platform, not here.
"""

from __future__ import annotations

from collections.abc import Sequence

from attestation.errors import Violation
from attestation.nitro.policy import NitroSection
from attestation.nitro.verify import DEBUG_PCRS
from attestation.platforms import VerificationInputs, Verified

__all__ = ["violations"]


def _one_of(values: Sequence[str]) -> str:
    return f"one of [{', '.join(values)}]"


def violations(verified: Verified, section: NitroSection | None, inputs: VerificationInputs | None = None) -> list[Violation]:
    """Every way ``verified`` fails ``section`` (empty: accepted). ``section=None`` (no
    ``[nitro]`` table) checks only that the enclave is not in debug mode."""
    found: list[Violation] = []
    claims = verified.claims
    pcrs = claims["pcrs"]
    if section is not None:
        for index in range(9):
            allowed = section.pcr_allowed(index)
            if allowed is None:
                continue
            value = pcrs.get(str(index))
            if value is None:
                found.append(Violation(f"nitro.pcr{index}", "absent from the document", _one_of(allowed)))
            elif value.hex() not in allowed:
                found.append(Violation(f"nitro.pcr{index}", value.hex(), _one_of(allowed)))
        if not section.module_id_allowed(claims["module_id"]):
            found.append(Violation("nitro.module_id", claims["module_id"],
                                   f"{_one_of(section.module_id or ())} ('*' ends a prefix)"))
    debug_allowed = section.debug_allowed if section is not None else False
    if verified.debug and not debug_allowed:
        zero = [f"PCR{i}" for i in DEBUG_PCRS if str(i) in pcrs and not any(pcrs[str(i)])]
        found.append(Violation("nitro.debug",
                               f"true ({', '.join(zero)} all zero: a debug-mode enclave, readable by its host)",
                               "false ([nitro] debug_allowed = false)"))
    return found
