"""Strict readers for the ``[sgx]`` and ``[tdx]`` policy tables, and the checks they share.

Conventions of both tables (documented for users in each platform's ``policy.py``):

- byte values are hex strings of the raw bytes *as they appear in the quote* (multi-byte
  integer fields such as ATTRIBUTES, XFRM, XFAM, TD_ATTRIBUTES are little-endian there, so
  ATTRIBUTES.FLAGS = 0x05 is ``"0500000000000000"``; this is also how Intel's collateral JSON
  writes them);
- "allowed values" keys take a list (a single value is accepted as a one-item list); an empty
  list is refused, since it would refuse every quote;
- ``X`` + ``X_mask``: the quote passes when ``value & mask == X & mask``; the mask defaults to all
  ones, a mask without its value is refused, and so is a value with bits outside its mask (it
  would look checked but not be);
- TCB: ``accepted_tcb_statuses`` (default ``["UpToDate"]``) and ``accepted_advisory_ids``
  (default none) are judged against Intel collateral (TCB Info, QE Identity; and the PCK chain's
  CRLs for revocation). ``Revoked`` cannot be accepted. Without that collateral the evidence is
  refused (``<platform>.collateral``, "collateral required") unless ``require_collateral = false``
  (default true), which accepts it with claims saying ``tcb_evaluated = false``. Collateral that is
  given is always judged: a CRL, TCB Info or QE Identity past its ``nextUpdate`` by more than
  ``collateral_grace_seconds`` (default 0, at most 2592000 = 30 days) is a ``<platform>.collateral``
  violation. ``allow_expired_collateral = true`` (older policies; discouraged) accepts any
  staleness and cannot be combined with a grace. The rules: :mod:`attestation.collateral_rules`.

Every problem is a :class:`PolicyError` naming ``[platform] key``.
"""

from __future__ import annotations

from typing import Any, overload
from collections.abc import Iterable, Mapping

from attestation.collateral_rules import MAX_GRACE_SECONDS, collateral_violations, rules_of
from attestation.errors import PolicyError, Violation
from attestation.intel.tcb_status import TCB_STATUSES

__all__ = [
    "TableReader",
    "masked_violation",
    "one_of",
    "tcb_violations",
]

_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


class TableReader:
    """Reads one platform table: every key must be known, every value of the right type."""

    def __init__(self, platform: str, table: Mapping[str, Any], known: Iterable[str]) -> None:
        self.platform = platform
        if not isinstance(table, Mapping):
            raise PolicyError(f"policy table [{platform}] must be a table, got {_describe(table)}")
        self.table = table
        known = tuple(known)
        for key in table:
            if key not in known:
                raise PolicyError(f"unknown policy key '[{platform}] {key}'; known keys: {', '.join(known)}")

    def fail(self, key: str, problem: str) -> PolicyError:
        return PolicyError(f"policy key '[{self.platform}] {key}' {problem}")

    def boolean(self, key: str, default: bool) -> bool:
        value = self.table.get(key, default)
        if type(value) is not bool:
            raise self.fail(key, f"must be true or false, got {_describe(value)}")
        return value

    @overload
    def integer(self, key: str, default: int, *, maximum: int) -> int: ...

    @overload
    def integer(self, key: str, default: None, *, maximum: int) -> int | None: ...

    def integer(self, key: str, default: int | None, *, maximum: int) -> int | None:
        """``key`` as an integer in 0..maximum; absent: ``default`` (None only if that is the default)."""
        value = self.table.get(key, default)
        if value is None and default is None:
            return None
        if type(value) is not int:
            raise self.fail(key, f"must be an integer, got {_describe(value)}")
        if not 0 <= value <= maximum:
            raise self.fail(key, f"must be in 0..{maximum}, got {value}")
        return value

    def _hex(self, key: str, value: Any, size: int, where: str = "") -> bytes:
        if type(value) is not str or len(value) != 2 * size or not set(value) <= _HEX_DIGITS:
            raise self.fail(key, f"{where}must be {2 * size} hex digits ({size} bytes), got {_describe(value)}")
        return bytes.fromhex(value)

    def hex_value(self, key: str, size: int) -> bytes | None:
        if key not in self.table:
            return None
        return self._hex(key, self.table[key], size)

    def hex_list(self, key: str, size: int) -> tuple[bytes, ...] | None:
        if key not in self.table:
            return None
        value = self.table[key]
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise self.fail(key, f"must be a list of hex strings, got {_describe(value)}")
        if not items:
            raise self.fail(key, "is an empty list, which would refuse every quote (omit the key to allow any)")
        out: list[bytes] = []
        for index, item in enumerate(items):
            parsed = self._hex(key, item, size, f"item {index} ")
            if parsed not in out:
                out.append(parsed)
        return tuple(out)

    def int_list(self, key: str, *, maximum: int) -> tuple[int, ...] | None:
        if key not in self.table:
            return None
        value = self.table[key]
        items = [value] if type(value) is int else value
        if not isinstance(items, (list, tuple)):
            raise self.fail(key, f"must be an integer or a list of integers, got {_describe(value)}")
        if not items:
            raise self.fail(key, "is an empty list, which would refuse every quote (omit the key to allow any)")
        out: list[int] = []
        for index, item in enumerate(items):
            if type(item) is not int or not 0 <= item <= maximum:
                raise self.fail(key, f"item {index} must be an integer in 0..{maximum}, got {_describe(item)}")
            if item not in out:
                out.append(item)
        return tuple(out)

    def str_list(self, key: str, default: tuple[str, ...], *, allowed: Iterable[str] | None = None) -> tuple[str, ...]:
        if key not in self.table:
            return default
        value = self.table[key]
        if not isinstance(value, (list, tuple)):
            raise self.fail(key, f"must be a list of strings, got {_describe(value)}")
        allowed = tuple(allowed) if allowed is not None else None
        out: list[str] = []
        for index, item in enumerate(value):
            if type(item) is not str or not item:
                raise self.fail(key, f"item {index} must be a non-empty string, got {_describe(item)}")
            if allowed is not None and item not in allowed:
                raise self.fail(key, f"item {index} {item!r} is not one of {', '.join(allowed)}")
            if item not in out:
                out.append(item)
        return tuple(out)

    def masked_bytes(self, key: str, size: int) -> tuple[bytes | None, bytes | None]:
        """``key`` and ``key_mask``; the mask defaults to all ones when the value is given."""
        value = self.hex_value(key, size)
        mask = self.hex_value(f"{key}_mask", size)
        if value is None:
            if mask is not None:
                raise self.fail(f"{key}_mask", f"is given without '[{self.platform}] {key}'")
            return None, None
        if mask is None:
            mask = b"\xff" * size
        if any(v & ~m & 0xFF for v, m in zip(value, mask)):
            raise self.fail(key, f"has bits set outside '[{self.platform}] {key}_mask' "
                                 "(they would never be compared)")
        return value, mask

    def masked_int(self, key: str, *, bits: int) -> tuple[int | None, int | None]:
        maximum = (1 << bits) - 1
        value = self.integer(key, None, maximum=maximum)
        mask = self.integer(f"{key}_mask", None, maximum=maximum)
        if value is None:
            if mask is not None:
                raise self.fail(f"{key}_mask", f"is given without '[{self.platform}] {key}'")
            return None, None
        if mask is None:
            mask = maximum
        if value & ~mask:
            raise self.fail(key, f"has bits set outside '[{self.platform}] {key}_mask' "
                                 "(they would never be compared)")
        return value, mask

    def tcb(self) -> dict[str, Any]:
        """The TCB and collateral keys, as the section's field names."""
        statuses = self.str_list("accepted_tcb_statuses", ("UpToDate",), allowed=TCB_STATUSES)
        if "Revoked" in statuses:
            raise self.fail("accepted_tcb_statuses", "must not contain 'Revoked': a revoked TCB is never acceptable")
        if not statuses:
            raise self.fail("accepted_tcb_statuses", "is an empty list, which would refuse every quote "
                                                     "verified with collateral")
        advisories = self.str_list("accepted_advisory_ids", ())
        grace = self.integer("collateral_grace_seconds", 0, maximum=MAX_GRACE_SECONDS)
        allow_expired = self.boolean("allow_expired_collateral", False)
        if allow_expired and grace:
            raise self.fail("allow_expired_collateral", f"= true cannot be combined with '[{self.platform}] "
                                                        "collateral_grace_seconds': set only the grace (preferred: "
                                                        "allow_expired_collateral accepts any staleness)")
        return dict(accepted_tcb_statuses=statuses, accepted_advisory_ids=advisories,
                    require_collateral=self.boolean("require_collateral", True),
                    collateral_grace_seconds=grace, allow_expired_collateral=allow_expired)


def one_of(field: str, value: bytes, allowed: tuple[bytes, ...] | None, key: str) -> Violation | None:
    if allowed is None or value in allowed:
        return None
    return Violation(field, value.hex(), f"one of [{', '.join(v.hex() for v in allowed)}] (policy {key})")


def masked_violation(field: str, value: bytes, expected: bytes | None, mask: bytes | None, key: str) -> Violation | None:
    if expected is None or mask is None:
        return None
    masked = bytes(v & m for v, m in zip(value, mask))
    if masked == expected:
        return None
    return Violation(field, value.hex(), f"{expected.hex()} under mask {mask.hex()} (policy {key}, {key}_mask)")


def tcb_violations(platform: str, verified: Any, section: Any, now: Any) -> list[Violation]:
    """TCB judgement of ``section`` (accepted_tcb_statuses, accepted_advisory_ids and the collateral
    keys) against a verified SGX/TDX quote at ``now``."""
    statuses, advisories = section.accepted_tcb_statuses, section.accepted_advisory_ids
    found: list[Violation] = []
    status = verified.tcb_status
    if status is not None:
        if status not in statuses:
            found.append(Violation(f"{platform}.tcb_status", status,
                                   f"one of [{', '.join(statuses)}] (policy [{platform}] accepted_tcb_statuses)"))
        unaccepted = [a for a in verified.advisory_ids if a not in advisories]
        if unaccepted:
            found.append(Violation(f"{platform}.advisory_ids", ", ".join(unaccepted),
                                   f"only advisories in [{', '.join(advisories)}] (policy [{platform}] "
                                   "accepted_advisory_ids)"))
    found.extend(collateral_violations(platform, verified, rules_of(section), now))
    return found
