"""Intel TDX quotes (versions 4 and 5; TD report bodies TDX 1.0 and 1.5; ECDSA-P256 with the
type 6 -> type 5 certification data nesting).

``abi`` parses, ``verify`` authenticates (-> ``Verified``), ``policy`` reads ``[tdx]``,
``validate`` judges. :data:`PLATFORM` is what ``attestation.registry`` loads.
"""

from __future__ import annotations

from attestation.platforms import PlatformFunctions

from .policy import TdxPolicy
from .validate import violations as _violations
from .verify import verify_quote

__all__ = ["PLATFORM", "TdxPolicy", "verify_quote"]


PLATFORM = PlatformFunctions(name="tdx", section=TdxPolicy, verify=verify_quote, violations=_violations)
