"""Intel SGX DCAP quotes (version 3, ECDSA-P256, PCK chain via Platform or Processor CA).

``abi`` parses, ``verify`` authenticates (-> ``Verified``), ``policy`` reads ``[sgx]``,
``validate`` judges. :data:`PLATFORM` is what ``attestation.registry`` loads.
"""

from __future__ import annotations

from attestation.platforms import PlatformFunctions

from .policy import SgxPolicy
from .validate import violations as _violations
from .verify import verify_quote

__all__ = ["PLATFORM", "SgxPolicy", "verify_quote"]


PLATFORM = PlatformFunctions(name="sgx", section=SgxPolicy, verify=verify_quote, violations=_violations)
