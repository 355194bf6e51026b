"""Intel's TCB status vocabulary: the one list of statuses that TCB Info and QE Identity levels may
carry, that evaluation returns and that an ``[sgx]`` / ``[tdx]`` policy may accept.

The collateral parser refuses any other status (a document with an unknown status is malformed,
rather than silently treated as some known one), and the policy reader refuses to accept any
other, so both must read the same list: this one.
"""

from __future__ import annotations

__all__ = ["TCB_STATUSES"]

# As Intel's PCS API documents TCB Info ``tcbStatus``, best first.
TCB_STATUSES: tuple[str, ...] = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)
