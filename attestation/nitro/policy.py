"""The ``[nitro]`` policy table: which Nitro enclaves a producer accepts.

::

    [nitro]
    pcr0 = ["<96 hex digits>", ...]        # enclave image (EIF) measurement: allowed values
    pcr1 = ["<hex>", ...]                  # kernel and bootstrap
    pcr2 = ["<hex>", ...]                  # application
    pcr3 = ["<hex>", ...]                  # IAM role of the parent instance
    pcr4 = ["<hex>", ...]                  # parent instance ID
    pcr8 = ["<hex>", ...]                  # enclave image signing certificate
    # pcr5, pcr6, pcr7 likewise (unused by AWS today)
    module_id = ["i-0a22e5c5f24d22174-enc*", "i-0123456789abcdef0-enc0123456789abcdef"]
    debug_allowed = false                  # debug enclaves (all-zero PCR0/1/2) refused

Every ``pcrN`` is a list of allowed values (any one may match), 32, 48 or 64 bytes in hex
(Nitro PCRs are SHA-384: 96 hex digits); a key that is absent is not checked. ``module_id`` is a
list of allowed NSM module IDs (``i-<instance>-enc<enclave>``): an entry is matched exactly,
or, if it ends with ``*``, as a prefix (``"i-0a22e5c5f24d22174-enc*"`` is every enclave on that
instance; the enclave part changes on every launch, so exact IDs suit only a pinned, running
enclave). ``*`` anywhere else, or alone, is refused.

The table must pin enclave code: ``pcr0`` (image) or ``pcr2`` (application). ``pcr1`` (kernel and
bootstrap) is the same for every enclave built with the same tooling, and ``pcr8`` (signing
certificate) covers any image its key signs, so neither counts alone. A ``[nitro]`` table
replaces the top-level ``measurements`` allow-list for Nitro evidence, so a table without a pin
would accept any enclave on any AWS account.

Loading is strict: an unknown key, a wrong type or a malformed value is a :class:`PolicyError`
naming ``[nitro] <key>``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any
from collections.abc import Mapping

from attestation.errors import PolicyError

__all__ = ["PCR_KEYS", "CODE_PCR_KEYS", "NitroSection"]

PCR_KEYS = tuple(f"pcr{i}" for i in range(9))
# PCR0 (the whole image) or PCR2 (the application) names the enclave's code. PCR1 (kernel and
# bootstrap) is the same for every enclave built with the same tooling, and PCR8 (the signing
# certificate) any image its key signs: both may be added, neither is a pin on its own.
CODE_PCR_KEYS = ("pcr0", "pcr2")
_KEYS = PCR_KEYS + ("module_id", "debug_allowed")
_PCR_HEX_LENGTHS = (64, 96, 128)
_HEX = frozenset("0123456789abcdefABCDEF")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:57] + '...' if len(text) > 60 else text}"


def _fail(key: str, problem: str) -> PolicyError:
    return PolicyError(f"policy key [nitro] {key} {problem}")


def _string_list(key: str, value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise _fail(key, f"must be a list of strings, got {_describe(value)}")
    if not value:
        raise _fail(key, "is an empty list, which would refuse every enclave: list at least one value or omit the key")
    for index, item in enumerate(value):
        if type(item) is not str:
            raise _fail(key, f"item {index} must be a string, got {_describe(item)}")
    return list(value)


def _pcr_values(key: str, value: Any) -> tuple[str, ...]:
    normalised: list[str] = []
    for index, item in enumerate(_string_list(key, value)):
        if len(item) not in _PCR_HEX_LENGTHS or not _HEX.issuperset(item):
            raise _fail(key, f"item {index} must be 64, 96 or 128 hex digits (a 32/48/64-byte PCR), got {item!r}")
        if item.lower() not in normalised:
            normalised.append(item.lower())
    return tuple(normalised)


def _module_ids(value: Any) -> tuple[str, ...]:
    patterns: list[str] = []
    for index, item in enumerate(_string_list("module_id", value)):
        stem = item[:-1] if item.endswith("*") else item
        if not stem:
            raise _fail("module_id", f"item {index} {item!r} matches every module ID: omit the key instead")
        if "*" in stem:
            raise _fail("module_id", f"item {index} {item!r}: '*' is only allowed at the end (a prefix)")
        if item not in patterns:
            patterns.append(item)
    return tuple(patterns)


@dataclass(frozen=True)
class NitroSection:
    """The parsed ``[nitro]`` table. Construction validates and normalises (hex lowercased,
    duplicates dropped); ``None`` means "not checked"."""

    pcr0: tuple[str, ...] | None = None
    pcr1: tuple[str, ...] | None = None
    pcr2: tuple[str, ...] | None = None
    pcr3: tuple[str, ...] | None = None
    pcr4: tuple[str, ...] | None = None
    pcr5: tuple[str, ...] | None = None
    pcr6: tuple[str, ...] | None = None
    pcr7: tuple[str, ...] | None = None
    pcr8: tuple[str, ...] | None = None
    module_id: tuple[str, ...] | None = None
    debug_allowed: bool = False

    def __post_init__(self) -> None:
        for key in PCR_KEYS:
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, _pcr_values(key, value))
        if self.module_id is not None:
            object.__setattr__(self, "module_id", _module_ids(self.module_id))
        if type(self.debug_allowed) is not bool:
            raise _fail("debug_allowed", f"must be true or false, got {_describe(self.debug_allowed)}")
        if all(getattr(self, key) is None for key in CODE_PCR_KEYS):
            raise PolicyError(
                "policy table [nitro] must pin the enclave code: set [nitro] pcr0 (image) or pcr2 (application). "
                "pcr1 (kernel and bootstrap) is shared by every enclave built with the same tooling and pcr8 "
                "(signing certificate) covers any image that key signs, so neither is a pin on its own"
            )

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> NitroSection:
        if not isinstance(table, Mapping):
            raise PolicyError(f"policy table [nitro] must be a table, got {_describe(table)}")
        for key in table:
            if key not in _KEYS:
                raise PolicyError(f"unknown policy key [nitro] {key!r}; known keys: {', '.join(_KEYS)}")
        return cls(**{key: table[key] for key in _KEYS if key in table})

    def to_table(self) -> dict[str, Any]:
        """The TOML table (absent keys stay absent: TOML has no null)."""
        table: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            table[f.name] = list(value) if isinstance(value, tuple) else value
        return table

    def pcr_allowed(self, index: int) -> tuple[str, ...] | None:
        """Allowed hex values for PCR ``index`` (0..8), or None when not checked."""
        return getattr(self, f"pcr{index}")

    def module_id_allowed(self, module_id: str) -> bool:
        if self.module_id is None:
            return True
        return any(module_id.startswith(p[:-1]) if p.endswith("*") else module_id == p
                   for p in self.module_id)
