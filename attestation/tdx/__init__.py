"""Intel TDX quotes (versions 4 and 5; TD report bodies TDX 1.0 and 1.5; ECDSA-P256 with the
type 6 -> type 5 certification data nesting).

``abi`` parses, ``verify`` authenticates (-> ``Verified``), ``policy`` reads ``[tdx]``,
``validate`` judges. :data:`PLATFORM` is what ``attestation.registry`` loads.
"""

from __future__ import annotations

from typing import Any, Sequence

from attestation.errors import Violation
from attestation.platforms import VerificationInputs, Verified

from .policy import TdxPolicy
from .validate import violations as _violations
from .verify import verify_quote

__all__ = ["PLATFORM", "TdxPlatform", "TdxPolicy", "verify_quote"]


class TdxPlatform:
    """``attestation.platforms.Platform`` for TDX."""

    name = "tdx"
    section = TdxPolicy

    def verify(self, evidence: bytes, inputs: VerificationInputs) -> Verified:
        return verify_quote(evidence, inputs)

    def violations(self, verified: Verified, section: Any, inputs: VerificationInputs) -> Sequence[Violation]:
        return _violations(verified, section, inputs)


PLATFORM = TdxPlatform()
