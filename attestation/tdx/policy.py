"""The ``[tdx]`` policy table -> :class:`TdxPolicy` (strict; every problem names ``[tdx] key``).

::

    [tdx]
    mrtd = ["<96 hex>", ...]               # allowed MRTD values (omit: any)
    rtmr0 = ["<96 hex>", ...]              # ... likewise rtmr1, rtmr2, rtmr3
    mrconfigid = ["<96 hex>", ...]
    mrowner = ["<96 hex>", ...]
    mrownerconfig = ["<96 hex>", ...]
    mrseam = ["<96 hex>", ...]             # allowed TDX module measurements
    xfam = "<16 hex>"                      # XFAM, 8 raw bytes (u64 LE) as in the quote
    xfam_mask = "<16 hex>"
    td_attributes = "<16 hex>"             # TD_ATTRIBUTES, 8 raw bytes (u64 LE) as in the quote
    td_attributes_mask = "<16 hex>"
    debug_allowed = false                  # TD_ATTRIBUTES bit 0 (TUD.DEBUG) refused unless true
    min_tee_tcb_svn = "<32 hex>"           # every byte of TEE_TCB_SVN must be >= this one's
    accepted_tcb_statuses = ["UpToDate"]   # judged against Intel collateral (TCB Info + QE Identity)
    accepted_advisory_ids = []
    require_collateral = true              # no collateral (TCB Info, QE Identity, the PCK chain's
                                           #   CRLs) = a violation; false: accept it unevaluated
                                           #   (claims: tcb_evaluated = false)
    collateral_grace_seconds = 0           # accept a CRL / TCB Info / QE Identity at most this long
                                           #   past its nextUpdate (0..2592000, i.e. 30 days)
    allow_expired_collateral = false       # discouraged (older policies): true accepts collateral
                                           #   however stale; not together with a grace

Code pin: the table must set ``mrtd``, ``rtmr0``, ``rtmr1`` and ``rtmr2`` together. MRTD is only
the TD firmware (every TD booted on a cloud's stock OVMF shares it); RTMR0-2 are extended by that
firmware with its configuration, the boot loader and kernel, and the kernel command line and
initrd, so only all four together name the code running in the TD. RTMR3 (all zeros when unused)
and the other registers may be added but never stand in for these. A top-level ``measurements``
entry compares MRTD alone, so it is never a TDX pin (docs/policy.md). The check runs in
``__post_init__``: ``TdxPolicy(...)`` built in Python is judged exactly as the TOML table is.

``mrseam`` and ``td_attributes`` go beyond the list in issue 3 (cheap, and go-tdx-guest offers
them). Shared rules (hex = raw quote bytes, lists, masks, TCB): :mod:`attestation.intel.policy`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any
from collections.abc import Mapping

from attestation.errors import PolicyError
from attestation.intel.policy import TableReader
from attestation.policy import raw_table

__all__ = ["CODE_PIN_KEYS", "MEASUREMENT_KEYS", "TdxPolicy"]

# Registers that, together, pin the code of a TD (see the module docstring).
CODE_PIN_KEYS = ("mrtd", "rtmr0", "rtmr1", "rtmr2")
MEASUREMENT_KEYS = ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mrconfigid", "mrowner", "mrownerconfig", "mrseam")
_KEYS = MEASUREMENT_KEYS + (
    "xfam", "xfam_mask", "td_attributes", "td_attributes_mask", "debug_allowed", "min_tee_tcb_svn",
    "accepted_tcb_statuses", "accepted_advisory_ids", "require_collateral", "collateral_grace_seconds",
    "allow_expired_collateral",
)


@dataclass(frozen=True)
class TdxPolicy:
    """The parsed ``[tdx]`` table. None means "not checked"."""

    mrtd: tuple[bytes, ...] | None = None
    rtmr0: tuple[bytes, ...] | None = None
    rtmr1: tuple[bytes, ...] | None = None
    rtmr2: tuple[bytes, ...] | None = None
    rtmr3: tuple[bytes, ...] | None = None
    mrconfigid: tuple[bytes, ...] | None = None
    mrowner: tuple[bytes, ...] | None = None
    mrownerconfig: tuple[bytes, ...] | None = None
    mrseam: tuple[bytes, ...] | None = None
    xfam: bytes | None = None
    xfam_mask: bytes | None = None
    td_attributes: bytes | None = None
    td_attributes_mask: bytes | None = None
    debug_allowed: bool = False
    min_tee_tcb_svn: bytes | None = None
    accepted_tcb_statuses: tuple[str, ...] = ("UpToDate",)
    accepted_advisory_ids: tuple[str, ...] = ()
    require_collateral: bool = True
    collateral_grace_seconds: int = 0
    allow_expired_collateral: bool = False

    def __post_init__(self) -> None:
        # Re-read the fields through the table reader: the constructor and the TOML loader run the
        # same checks, so a policy object built in Python cannot be weaker than a file.
        for key, value in _parse(raw_table(self, fields(self))).items():
            object.__setattr__(self, key, value)

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> TdxPolicy:
        return cls(**_parse(table))

    def to_table(self) -> dict[str, Any]:
        """The TOML table (``from_table(to_table())`` gives an equal policy)."""
        out: dict[str, Any] = {}
        for key in MEASUREMENT_KEYS:
            values = getattr(self, key)
            if values is not None:
                out[key] = [v.hex() for v in values]
        for key in ("xfam", "xfam_mask", "td_attributes", "td_attributes_mask", "min_tee_tcb_svn"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value.hex()
        out["debug_allowed"] = self.debug_allowed
        out["accepted_tcb_statuses"] = list(self.accepted_tcb_statuses)
        out["accepted_advisory_ids"] = list(self.accepted_advisory_ids)
        out["require_collateral"] = self.require_collateral
        out["collateral_grace_seconds"] = self.collateral_grace_seconds
        if self.allow_expired_collateral:  # discouraged: written only when set
            out["allow_expired_collateral"] = True
        return out


def _parse(table: Mapping[str, Any]) -> dict[str, Any]:
    r = TableReader("tdx", table, _KEYS)
    measurements = {key: r.hex_list(key, 48) for key in MEASUREMENT_KEYS}
    xfam, xfam_mask = r.masked_bytes("xfam", 8)
    td_attributes, td_attributes_mask = r.masked_bytes("td_attributes", 8)
    tcb = r.tcb()
    debug_allowed = r.boolean("debug_allowed", False)
    min_tee_tcb_svn = r.hex_value("min_tee_tcb_svn", 16)
    # Checked last, so a malformed value is named before the missing pin.
    missing = [key for key in CODE_PIN_KEYS if measurements[key] is None]
    if missing:
        raise PolicyError(
            f"policy table [tdx] must pin the code it trusts: set {', '.join(CODE_PIN_KEYS)} together "
            f"(missing: {', '.join(missing)}). MRTD is only the TD firmware, shared by every TD on the same "
            "OVMF, and RTMRs are extended by the TD's own software: neither alone names the code in the TD"
        )
    return dict(
        **measurements,
        xfam=xfam, xfam_mask=xfam_mask,
        td_attributes=td_attributes, td_attributes_mask=td_attributes_mask,
        debug_allowed=debug_allowed, min_tee_tcb_svn=min_tee_tcb_svn,
        **tcb,
    )
