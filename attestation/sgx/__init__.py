"""Intel SGX DCAP quotes (version 3, ECDSA-P256, PCK chain via Platform or Processor CA).

``abi`` parses, ``verify`` authenticates (-> ``Verified``), ``policy`` reads ``[sgx]``,
``validate`` judges. :data:`PLATFORM` is what ``attestation.registry`` loads.
"""

from __future__ import annotations

from typing import Any, Sequence

from attestation.errors import Violation
from attestation.platforms import VerificationInputs, Verified

from .policy import SgxPolicy
from .validate import violations as _violations
from .verify import verify_quote

__all__ = ["PLATFORM", "SgxPlatform", "SgxPolicy", "verify_quote"]


class SgxPlatform:
    """``attestation.platforms.Platform`` for SGX."""

    name = "sgx"
    section = SgxPolicy

    def verify(self, evidence: bytes, inputs: VerificationInputs) -> Verified:
        return verify_quote(evidence, inputs)

    def violations(self, verified: Verified, section: Any, inputs: VerificationInputs) -> Sequence[Violation]:
        return _violations(verified, section, inputs)


PLATFORM = SgxPlatform()
