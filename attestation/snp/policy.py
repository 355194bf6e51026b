"""The ``[snp]`` policy table: what an SEV-SNP guest must be to be trusted.

::

    [snp]
    measurement = ["<96 hex>", ...]          # allowed MEASUREMENTs (launch digest)
    host_data = ["<64 hex>", ...]            # allowed HOST_DATA values
    id_key_digest = ["<96 hex>", ...]        # allowed ID-block signing keys (SHA-384 digests)
    author_key_digest = ["<96 hex>", ...]    # allowed ID-key authors
    debug_allowed = false                    # guest POLICY.DEBUG (bit 19) refused by default
    migration_agent_allowed = false          # guest POLICY.MIGRATE_MA (bit 18) refused by default
    smt_allowed = true                       # guest POLICY.SMT (bit 16) allowed by default
    vmpl = [0]                               # allowed VMPLs of the requesting software (0..3; default [0])
    min_guest_svn = 0                        # minimum GUEST_SVN
    allowed_signing_keys = ["vcek", "vlek"]  # which AMD key may have signed the report
    products = ["Milan", "Genoa", "Turin"]   # allowed product lines
    require_collateral = true                # no CRL from the chain's ARK (AMD KDS) = a violation;
                                             #   false: accept unevaluated revocation (claims:
                                             #   tcb_evaluated = false)
    collateral_grace_seconds = 0             # accept a CRL at most this long past its nextUpdate
                                             #   (0..2592000, i.e. 30 days)
    [snp.min_tcb]                            # minimum REPORTED_TCB, component by component
    bootloader = 0
    tee = 0
    snp = 0
    microcode = 0
    fmc = 0                                  # Turin only (other products have no FMC)
    [snp.min_launch_tcb]                     # minimum LAUNCH_TCB (the TCB the guest was launched
    snp = 0                                  #   on); same keys; absent = the same as min_tcb

Rules: every key is optional except that the table must pin the guest's identity with at least
one of ``measurement``, ``id_key_digest`` or ``author_key_digest`` (a table that pins nothing
would accept any VM the host cares to launch). A list key that is present must not be empty:
omit the key to leave a field unchecked. Unknown keys and wrong types are a
:class:`PolicyError` naming ``[snp] key``. Hex is normalised to lowercase; product names to
their canonical spelling.

Defaults that fail closed: ``vmpl`` absent means ``[0]`` (a report requested from a less
privileged VMPL, e.g. a paravisor's guest OS, is refused unless listed); MIGRATE_MA is refused
unless ``migration_agent_allowed``; ``min_launch_tcb`` absent means the same minimums as
``min_tcb``, so a guest launched on old firmware and hot-updated since (REPORTED_TCB new,
LAUNCH_TCB old) is refused, as go-sev-guest's minimum launch TCB does. Set ``min_launch_tcb``
explicitly (``{}`` for none) to decouple them. ``require_collateral`` (default true): revocation of
the AMD chain (ASK/ASVK, by the ARK) is evaluated only with AMD KDS's CRL for the product's ARK
(``--collateral DIR``); without it the evidence is refused ("collateral required") unless set to
false. A CRL that is given is always judged: past its nextUpdate by more than
``collateral_grace_seconds`` it is a violation (:mod:`attestation.collateral_rules`). The TCB
itself (REPORTED_TCB is the VCEK's, ``min_tcb``) needs no collateral and is always judged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from collections.abc import Mapping

from attestation.collateral_rules import MAX_GRACE_SECONDS
from attestation.errors import PolicyError
from attestation.snp.abi import PRODUCTS

__all__ = ["SnpPolicy", "TCB_COMPONENTS", "SIGNING_KEYS"]

TCB_COMPONENTS = ("bootloader", "tee", "snp", "microcode", "fmc")
SIGNING_KEYS = ("vcek", "vlek")
_HEX_LISTS = {"measurement": 48, "host_data": 32, "id_key_digest": 48, "author_key_digest": 48}
_BOOLS = {"debug_allowed": False, "migration_agent_allowed": False, "smt_allowed": True, "require_collateral": True}
_KEYS = (*_HEX_LISTS, *_BOOLS, "vmpl", "min_guest_svn", "min_tcb", "min_launch_tcb", "allowed_signing_keys",
         "products", "collateral_grace_seconds")
DEFAULT_VMPL = (0,)
_IDENTITY_KEYS = ("measurement", "id_key_digest", "author_key_digest")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _fail(key: str, problem: str) -> PolicyError:
    return PolicyError(f"[snp] {key} {problem}")


def _list(table: Mapping[str, Any], key: str) -> list[Any] | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, (list, tuple)):
        raise _fail(key, f"must be a list, got {_describe(value)}")
    if not value:
        raise _fail(key, "is an empty list; omit the key to leave it unchecked")
    return list(value)


def _hex_list(table: Mapping[str, Any], key: str, size: int) -> tuple[str, ...]:
    items = _list(table, key)
    if items is None:
        return ()
    out: list[str] = []
    for index, item in enumerate(items):
        if type(item) is not str or len(item) != 2 * size or any(c not in "0123456789abcdefABCDEF" for c in item):
            raise _fail(key, f"item {index} must be {2 * size} hex digits ({size} bytes), got {_describe(item)}")
        if item.lower() not in out:
            out.append(item.lower())
    return tuple(out)


def _int(value: Any, key: str, low: int, high: int) -> int:
    if type(value) is not int:
        raise _fail(key, f"must be an integer, got {_describe(value)}")
    if not low <= value <= high:
        raise _fail(key, f"must be in {low}..{high}, got {value}")
    return value


def _tcb_table(value: Any, key: str) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise _fail(key, f"must be a table {{{', '.join(TCB_COMPONENTS)}}}, got {_describe(value)}")
    tcb: dict[str, int] = {}
    for name, item in value.items():
        if name not in TCB_COMPONENTS:
            raise PolicyError(f"[snp] unknown policy key '{key}.{name}'; known keys: "
                              f"{', '.join(key + '.' + c for c in TCB_COMPONENTS)}")
        tcb[name] = _int(item, f"{key}.{name}", 0, 255)
    return {name: tcb[name] for name in TCB_COMPONENTS if name in tcb}


@dataclass(frozen=True)
class SnpPolicy:
    """The parsed ``[snp]`` table. Build it with :meth:`from_table` (strict) or directly
    (construction runs the same checks through :meth:`from_table`'s normal form)."""

    measurement: tuple[str, ...] = ()
    host_data: tuple[str, ...] = ()
    id_key_digest: tuple[str, ...] = ()
    author_key_digest: tuple[str, ...] = ()
    debug_allowed: bool = False
    migration_agent_allowed: bool = False
    smt_allowed: bool = True
    vmpl: tuple[int, ...] = DEFAULT_VMPL
    min_guest_svn: int = 0
    min_tcb: Mapping[str, int] = field(default_factory=dict)
    # None: the same as min_tcb (resolved at construction).
    min_launch_tcb: Mapping[str, int] | None = None
    allowed_signing_keys: tuple[str, ...] = SIGNING_KEYS
    products: tuple[str, ...] = ()
    require_collateral: bool = True
    collateral_grace_seconds: int = 0
    _sets: Mapping[str, frozenset[bytes]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Re-validate through the table form, so a directly built section is as strict.
        normal = SnpPolicy._normalise(self.to_table(raw=True))
        for key, value in normal.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_sets", {key: frozenset(bytes.fromhex(h) for h in getattr(self, key))
                                           for key in _HEX_LISTS})

    @staticmethod
    def _normalise(table: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(table, Mapping):
            raise PolicyError(f"[snp] must be a table, got {_describe(table)}")
        for key in table:
            if key not in _KEYS:
                raise PolicyError(f"[snp] unknown policy key {key!r}; known keys: {', '.join(_KEYS)}")
        out: dict[str, Any] = {}
        for key, size in _HEX_LISTS.items():
            out[key] = _hex_list(table, key, size)
        if not any(out[key] for key in _IDENTITY_KEYS):
            raise PolicyError(
                "[snp] measurement is missing: pin the guest with at least one of measurement, id_key_digest or "
                "author_key_digest (a table that pins nothing accepts any VM the host launches)"
            )
        for key, default in _BOOLS.items():
            value = table.get(key, default)
            if type(value) is not bool:
                raise _fail(key, f"must be true or false, got {_describe(value)}")
            out[key] = value
        vmpl = _list(table, "vmpl")
        out["vmpl"] = DEFAULT_VMPL if vmpl is None else tuple(sorted({_int(v, "vmpl", 0, 3) for v in vmpl}))
        out["min_guest_svn"] = _int(table.get("min_guest_svn", 0), "min_guest_svn", 0, 2**32 - 1)
        out["collateral_grace_seconds"] = _int(table.get("collateral_grace_seconds", 0), "collateral_grace_seconds",
                                               0, MAX_GRACE_SECONDS)
        out["min_tcb"] = _tcb_table(table.get("min_tcb", {}), "min_tcb")
        launch = table.get("min_launch_tcb")
        out["min_launch_tcb"] = dict(out["min_tcb"]) if launch is None else _tcb_table(launch, "min_launch_tcb")
        keys = _list(table, "allowed_signing_keys")
        if keys is None:
            out["allowed_signing_keys"] = SIGNING_KEYS
        else:
            for index, item in enumerate(keys):
                if type(item) is not str or item.lower() not in SIGNING_KEYS:
                    raise _fail("allowed_signing_keys", f"item {index} must be \"vcek\" or \"vlek\", got {_describe(item)}")
            out["allowed_signing_keys"] = tuple(k for k in SIGNING_KEYS if k in {i.lower() for i in keys})
        products = _list(table, "products")
        if products is None:
            out["products"] = ()
        else:
            canonical = {p.lower(): p for p in PRODUCTS}
            for index, item in enumerate(products):
                if type(item) is not str or item.lower() not in canonical:
                    raise _fail("products", f"item {index} must be one of {', '.join(PRODUCTS)}, got {_describe(item)}")
            wanted = {canonical[i.lower()] for i in products}
            out["products"] = tuple(p for p in PRODUCTS if p in wanted)
        return out

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> SnpPolicy:
        """Parse the ``[snp]`` TOML table. Raises :class:`PolicyError` naming ``[snp] key``."""
        return cls(**cls._normalise(table))

    def to_table(self, *, raw: bool = False) -> dict[str, Any]:
        """The TOML table (loads back to an equal section). Unchecked fields are omitted."""
        table: dict[str, Any] = {}
        for key in _HEX_LISTS:
            value = getattr(self, key)
            if value or (raw and not isinstance(value, tuple)):
                table[key] = list(value) if isinstance(value, (list, tuple)) else value
        for key in _BOOLS:
            table[key] = getattr(self, key)
        if self.vmpl or (raw and not isinstance(self.vmpl, tuple)):
            table["vmpl"] = list(self.vmpl) if isinstance(self.vmpl, (list, tuple)) else self.vmpl
        table["min_guest_svn"] = self.min_guest_svn
        table["collateral_grace_seconds"] = self.collateral_grace_seconds
        if self.min_tcb or (raw and not isinstance(self.min_tcb, Mapping)):
            table["min_tcb"] = dict(self.min_tcb) if isinstance(self.min_tcb, Mapping) else self.min_tcb
        launch = self.min_launch_tcb
        if launch is not None and (raw or not isinstance(launch, Mapping) or dict(launch) != dict(self.min_tcb)):
            table["min_launch_tcb"] = dict(launch) if isinstance(launch, Mapping) else launch
        keys = self.allowed_signing_keys
        table["allowed_signing_keys"] = list(keys) if isinstance(keys, (list, tuple)) else keys
        if self.products or (raw and not isinstance(self.products, tuple)):
            table["products"] = list(self.products) if isinstance(self.products, (list, tuple)) else self.products
        return table

    def allows(self, key: str, value: bytes) -> bool:
        """True if hex-list ``key`` is unchecked or lists ``value``."""
        return not getattr(self, key) or value in self._sets[key]
