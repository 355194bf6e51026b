"""The ``[sgx]`` policy table -> :class:`SgxPolicy` (strict; every problem names ``[sgx] key``).

::

    [sgx]
    mrenclave = ["<64 hex>", ...]          # allowed MRENCLAVE values (omit: any)
    mrsigner = ["<64 hex>", ...]           # allowed MRSIGNER values (omit: any)
    isvprodid = 0                          # allowed ISVPRODID (an integer or a list)
    min_isvsvn = 0                         # ISVSVN must be at least this (default 0: any version)
    debug_allowed = false                  # ATTRIBUTES.FLAGS bit 1 (DEBUG) refused unless true
    attributes = "<32 hex>"                # the 16-byte ATTRIBUTES field (FLAGS || XFRM, both u64 LE,
    attributes_mask = "<32 hex>"           #   raw as in the quote, like Intel's QE Identity JSON)
    xfrm = "<16 hex>"                      # XFRM alone (8 bytes, raw LE), for policies that only
    xfrm_mask = "<16 hex>"                 #   care about the enabled XSAVE features
    miscselect = 0                         # MISCSELECT (u32 integer)
    miscselect_mask = 4294967295
    accepted_tcb_statuses = ["UpToDate"]   # judged against Intel collateral (TCB Info + QE Identity)
    accepted_advisory_ids = []             # every advisory of the TCB level must be listed here
    require_collateral = true              # no collateral (TCB Info, QE Identity, the PCK chain's
                                           #   CRLs) = a violation; false: accept it unevaluated
                                           #   (claims: tcb_evaluated = false)
    collateral_grace_seconds = 0           # accept a CRL / TCB Info / QE Identity at most this long
                                           #   past its nextUpdate (0..2592000, i.e. 30 days)
    allow_expired_collateral = false       # discouraged (older policies): true accepts collateral
                                           #   however stale; not together with a grace

Choice for ATTRIBUTES: ``attributes`` covers FLAGS and XFRM together (16 bytes, as Intel's QE
Identity does); ``xfrm`` is a convenience for XFRM alone. Both may be given; both are checked.
Masks: ``value & mask == expected & mask``; the mask defaults to all ones; see
:mod:`attestation.intel.policy` for the shared rules (hex = raw quote bytes, lists, TCB).

Code pin: the table must set ``mrenclave``, or ``mrsigner`` together with ``isvprodid``. MRSIGNER
alone names a signing key, and that key may sign any number of products: each of them would be
accepted. The check runs in ``__post_init__``, so ``SgxPolicy(...)`` built in Python is judged
exactly as the TOML table is (values may be given as bytes or as hex).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any
from collections.abc import Mapping

from attestation.errors import PolicyError
from attestation.intel.policy import TableReader
from attestation.policy import raw_table

__all__ = ["SgxPolicy"]

_KEYS = (
    "mrenclave", "mrsigner", "isvprodid", "min_isvsvn", "debug_allowed",
    "attributes", "attributes_mask", "xfrm", "xfrm_mask", "miscselect", "miscselect_mask",
    "accepted_tcb_statuses", "accepted_advisory_ids", "require_collateral", "collateral_grace_seconds",
    "allow_expired_collateral",
)


@dataclass(frozen=True)
class SgxPolicy:
    """The parsed ``[sgx]`` table. None means "not checked"."""

    mrenclave: tuple[bytes, ...] | None = None
    mrsigner: tuple[bytes, ...] | None = None
    isvprodid: tuple[int, ...] | None = None
    min_isvsvn: int = 0
    debug_allowed: bool = False
    attributes: bytes | None = None
    attributes_mask: bytes | None = None
    xfrm: bytes | None = None
    xfrm_mask: bytes | None = None
    miscselect: int | None = None
    miscselect_mask: int | None = None
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
    def from_table(cls, table: Mapping[str, Any]) -> SgxPolicy:
        return cls(**_parse(table))

    def to_table(self) -> dict[str, Any]:
        """The TOML table (``from_table(to_table())`` gives an equal policy)."""
        out: dict[str, Any] = {}
        for key in ("mrenclave", "mrsigner"):
            values = getattr(self, key)
            if values is not None:
                out[key] = [v.hex() for v in values]
        if self.isvprodid is not None:
            out["isvprodid"] = list(self.isvprodid)
        out["min_isvsvn"] = self.min_isvsvn
        out["debug_allowed"] = self.debug_allowed
        for key in ("attributes", "attributes_mask", "xfrm", "xfrm_mask"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value.hex()
        if self.miscselect is not None:
            out["miscselect"] = self.miscselect
            out["miscselect_mask"] = self.miscselect_mask
        out["accepted_tcb_statuses"] = list(self.accepted_tcb_statuses)
        out["accepted_advisory_ids"] = list(self.accepted_advisory_ids)
        out["require_collateral"] = self.require_collateral
        out["collateral_grace_seconds"] = self.collateral_grace_seconds
        if self.allow_expired_collateral:  # discouraged: written only when set
            out["allow_expired_collateral"] = True
        return out


def _parse(table: Mapping[str, Any]) -> dict[str, Any]:
    r = TableReader("sgx", table, _KEYS)
    attributes, attributes_mask = r.masked_bytes("attributes", 16)
    xfrm, xfrm_mask = r.masked_bytes("xfrm", 8)
    miscselect, miscselect_mask = r.masked_int("miscselect", bits=32)
    tcb = r.tcb()
    out: dict[str, Any] = dict(
        mrenclave=r.hex_list("mrenclave", 32),
        mrsigner=r.hex_list("mrsigner", 32),
        isvprodid=r.int_list("isvprodid", maximum=0xFFFF),
        min_isvsvn=r.integer("min_isvsvn", 0, maximum=0xFFFF),
        debug_allowed=r.boolean("debug_allowed", False),
        attributes=attributes, attributes_mask=attributes_mask,
        xfrm=xfrm, xfrm_mask=xfrm_mask,
        miscselect=miscselect, miscselect_mask=miscselect_mask,
        **tcb,
    )
    if out["mrenclave"] is None:
        if out["mrsigner"] is None:
            raise PolicyError("policy table [sgx] must pin the code it trusts: set mrenclave, or mrsigner together "
                              "with isvprodid (a table without them accepts any enclave the host launches)")
        if out["isvprodid"] is None:
            raise PolicyError("policy table [sgx] must pin the code it trusts: mrsigner without isvprodid accepts "
                              "every product that key ever signed; set isvprodid (and min_isvsvn, default 0: "
                              "any version), or pin mrenclave")
    return out
