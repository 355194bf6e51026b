"""Attestation policy: the TOML file a producer (or a pool) judges evidence by.

Owns the policy format, its strict loading (every unknown key, wrong type or out-of-range value
is a :class:`PolicyError` that names the key) and writing. The format is documented with an
example in ``docs/policy.md``; in short::

    version = 1                              # policy format version
    measurements = ["<hex>", ...]            # allowed code identities: at least one
    min_security_version = 0
    debug_allowed = false
    max_evidence_age_seconds = 300
    max_clock_skew_seconds = 60
    nonce_required = true

    [simulation]                             # absent = simulation refused
    allow = true
    root_sha256 = "<hex fingerprint of the simulation root>"

Platform-neutral rules live at the top level; each platform's rules live in a table named after
it: ``[simulation]``, ``[sgx]``, ``[tdx]``, ``[snp]``, ``[nitro]``. A platform table is parsed by
that platform's own ``policy`` module (``attestation/<platform>/policy.py``), equally strictly.
Evidence from a hardware platform is accepted only if the policy has that platform's table (or
lists its measurement at the top level): naming a platform is how a policy opts into it.

Defaults are the safe choice: simulation refused, debug refused, nonce required.
"""

from __future__ import annotations

import os
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import tomli_w

from attestation.errors import PolicyError

__all__ = [
    "POLICY_VERSION",
    "Policy",
    "policy_from_mapping",
    "policy_from_toml",
    "policy_to_toml",
    "load_policy",
    "write_policy",
]

POLICY_VERSION = 1
RESERVED_PLATFORM_TABLES = ("sgx", "tdx", "snp", "nitro")
# Measurement sizes across platforms: simulation and SGX MRENCLAVE are 32 bytes, TDX MRTD,
# SNP MEASUREMENT and Nitro PCRs are 48.
MEASUREMENT_SIZES = (32, 48)

# Where each Policy field lives in the TOML file: error messages name the file's key.
_TOML_KEY = {
    "measurements": "measurements",
    "allow_simulation": "simulation.allow",
    "sim_root_sha256": "simulation.root_sha256",
    "min_security_version": "min_security_version",
    "debug_allowed": "debug_allowed",
    "max_evidence_age_seconds": "max_evidence_age_seconds",
    "nonce_required": "nonce_required",
    "max_clock_skew_seconds": "max_clock_skew_seconds",
}
_TOP_LEVEL_KEYS = (
    "version",
    "measurements",
    "min_security_version",
    "debug_allowed",
    "max_evidence_age_seconds",
    "max_clock_skew_seconds",
    "nonce_required",
    "simulation",
) + RESERVED_PLATFORM_TABLES
_SIMULATION_KEYS = {"allow": "allow_simulation", "root_sha256": "sim_root_sha256"}


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    # fromhex tolerates whitespace; a policy value must be plain hex digits.
    return all(c in "0123456789abcdefABCDEF" for c in text)


@dataclass(frozen=True)
class Policy:
    """What evidence must satisfy. Construction validates and normalises (hex to lowercase,
    duplicate measurements dropped); any problem is a :class:`PolicyError` naming the TOML key.
    """

    measurements: tuple[str, ...]
    allow_simulation: bool = False
    sim_root_sha256: str | None = None
    min_security_version: int = 0
    debug_allowed: bool = False
    max_evidence_age_seconds: int = 300
    nonce_required: bool = True
    max_clock_skew_seconds: int = 60
    # Parsed platform tables by name ("sgx", ...): each its platform's own frozen section.
    platforms: Mapping[str, Any] = field(default_factory=dict)
    _measurement_set: frozenset[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def fail(name: str, problem: str) -> PolicyError:
            return PolicyError(f"policy key {_TOML_KEY[name]!r} {problem}")

        for name in ("allow_simulation", "debug_allowed", "nonce_required"):
            value = getattr(self, name)
            if type(value) is not bool:
                raise fail(name, f"must be true or false, got {_describe(value)}")
        for name, minimum in (
            ("min_security_version", 0),
            ("max_evidence_age_seconds", 1),
            ("max_clock_skew_seconds", 0),
        ):
            value = getattr(self, name)
            if type(value) is not int:
                raise fail(name, f"must be an integer, got {_describe(value)}")
            if value < minimum:
                raise fail(name, f"must be at least {minimum}, got {value}")

        measurements = self.measurements
        if isinstance(measurements, str) or not isinstance(measurements, (list, tuple)):
            raise fail("measurements", f"must be a list of hex strings, got {_describe(measurements)}")
        if not measurements and not self.platforms:
            raise fail(
                "measurements",
                "is empty: list at least one allowed measurement "
                "(`enclaveq policy init` writes the current worker's), or add a platform table "
                "([sgx], [tdx], [snp], [nitro]) that pins one",
            )
        normalised: list[str] = []
        for index, item in enumerate(measurements):
            if type(item) is not str:
                raise fail("measurements", f"item {index} must be a hex string, got {_describe(item)}")
            if not _is_hex(item) or len(item) // 2 not in MEASUREMENT_SIZES or len(item) % 2:
                raise fail(
                    "measurements",
                    f"item {index} must be {' or '.join(str(2 * n) for n in MEASUREMENT_SIZES)} "
                    f"hex digits, got {item!r}",
                )
            if item.lower() not in normalised:
                normalised.append(item.lower())
        object.__setattr__(self, "measurements", tuple(normalised))
        object.__setattr__(self, "platforms", _check_platforms(self.platforms))
        _refuse_dropped_top_level_rules(self)
        object.__setattr__(self, "_measurement_set", frozenset(bytes.fromhex(m) for m in normalised))

        root = self.sim_root_sha256
        if root is not None:
            if type(root) is not str or len(root) != 64 or not _is_hex(root):
                raise fail("sim_root_sha256", f"must be 64 hex digits (a SHA-256 fingerprint), got {_describe(root)}")
            object.__setattr__(self, "sim_root_sha256", root.lower())
        if self.allow_simulation and self.sim_root_sha256 is None:
            raise fail(
                "sim_root_sha256",
                "is required when simulation.allow = true: it pins which simulation root to trust "
                "(`enclaveq sim init` prints it)",
            )

    def section(self, platform: str) -> Any:
        """The parsed ``[platform]`` table, or None when the policy does not name that platform."""
        return self.platforms.get(platform)

    def allows_measurement(self, measurement: bytes) -> bool:
        return measurement in self._measurement_set

    @property
    def sim_root_fingerprint(self) -> bytes | None:
        """``sim_root_sha256`` as 32 bytes, or None."""
        return None if self.sim_root_sha256 is None else bytes.fromhex(self.sim_root_sha256)


# The size of the measurement each hardware platform's evidence is judged by on the top-level
# route (SGX MRENCLAVE; TDX MRTD; SNP MEASUREMENT; Nitro PCR0).
_TOP_LEVEL_SIZE = {"sgx": 32, "tdx": 48, "snp": 48, "nitro": 48}


def _check_platforms(platforms: Any) -> dict[str, Any]:
    """``platforms`` must map platform names to that platform's own parsed section, so a
    section that skipped its constructor's checks (a plain dict, another platform's) is refused."""
    if not isinstance(platforms, Mapping):
        raise PolicyError(f"Policy platforms must be a mapping of platform name to section, got {_describe(platforms)}")
    if not platforms:
        return {}
    from attestation.registry import platform

    out: dict[str, Any] = {}
    for name, section in platforms.items():
        if name not in RESERVED_PLATFORM_TABLES:
            raise PolicyError(f"policy table [{name}] is not a platform; platforms: {', '.join(RESERVED_PLATFORM_TABLES)}")
        section_class = platform(name).section
        if type(section) is not section_class:
            raise PolicyError(f"policy table [{name}] must be an {section_class.__name__}, got {_describe(section)}")
        out[name] = section
    return out


def _refuse_dropped_top_level_rules(policy: Policy) -> None:
    """A platform with its own table is judged by that table alone: a top-level rule that looks
    as if it applied to it would silently not. Such a policy is ambiguous and refused."""
    tables = sorted(policy.platforms)
    if not tables:
        return
    for index, item in enumerate(policy.measurements):
        size = len(item) // 2
        shadowed = [name for name in tables if _TOP_LEVEL_SIZE[name] == size]
        if shadowed:
            where = ", ".join(f"[{name}]" for name in shadowed)
            raise PolicyError(
                f"policy key 'measurements' item {index} ({size} bytes) is ambiguous: evidence of a platform "
                f"with its own table ({where}) is judged by that table alone, so this top-level pin would be "
                "silently ignored for it. Move the pin into the table (or use a separate policy for "
                "simulation)"
            )
    if not policy.measurements:
        # With no top-level measurement, only platforms with tables are accepted: these rules
        # would apply to nothing, although the policy reads as if they tightened the tables.
        if policy.min_security_version != 0:
            raise PolicyError(
                f"policy key 'min_security_version' = {policy.min_security_version} applies to no evidence: "
                "platform tables have their own minimums ([sgx] min_isvsvn, [tdx] min_tee_tcb_svn, "
                "[snp] min_guest_svn / min_tcb); set those instead"
            )
        if policy.debug_allowed:
            raise PolicyError(
                "policy key 'debug_allowed' = true applies to no evidence: platform tables have their own "
                "debug_allowed; set it there"
            )


def raw_table(section: Any, section_fields: Any) -> dict[str, Any]:
    """A platform section's fields as the TOML table they would come from (bytes as hex, tuples
    as lists, None omitted), for the section's ``__post_init__`` to re-read with the loader's
    own checks. Values of the wrong type pass through unchanged, so the reader names them."""

    def raw(value: Any) -> Any:
        if isinstance(value, (bytes, bytearray)):
            return bytes(value).hex()
        if isinstance(value, (list, tuple)):
            return [raw(item) for item in value]
        return value

    return {f.name: raw(getattr(section, f.name)) for f in section_fields
            if f.init and getattr(section, f.name) is not None}


def _check_keys(table: Mapping[str, Any], known: tuple[str, ...] | list[str], where: str) -> None:
    for key in table:
        if key in known:
            continue
        raise PolicyError(
            f"unknown policy key {key!r} at {where}; known keys: {', '.join(known)}"
        )


def policy_from_mapping(data: Mapping[str, Any]) -> Policy:
    """Build a :class:`Policy` from the parsed TOML structure (strict: unknown keys refused)."""
    if not isinstance(data, Mapping):
        raise PolicyError(f"a policy must be a table, got {_describe(data)}")
    _check_keys(data, _TOP_LEVEL_KEYS, "top level")
    version = data.get("version", POLICY_VERSION)
    if type(version) is not int:
        raise PolicyError(f"policy key 'version' must be an integer, got {_describe(version)}")
    if version != POLICY_VERSION:
        raise PolicyError(f"policy key 'version' is {version}; this enclaveq reads version {POLICY_VERSION}")
    if "measurements" not in data and not any(name in data for name in RESERVED_PLATFORM_TABLES):
        raise PolicyError(
            "policy key 'measurements' is missing: list at least one allowed measurement, "
            "or add a platform table ([sgx], [tdx], [snp], [nitro])"
        )
    kwargs: dict[str, Any] = {
        key: data[key]
        for key in _TOP_LEVEL_KEYS
        if key in data and key not in ("version", "simulation") + RESERVED_PLATFORM_TABLES
    }
    kwargs.setdefault("measurements", ())
    platforms = {}
    for name in RESERVED_PLATFORM_TABLES:
        if name in data:
            platforms[name] = _platform_section(name, data[name])
    kwargs["platforms"] = platforms
    simulation = data.get("simulation", {})
    if not isinstance(simulation, Mapping):
        raise PolicyError(f"policy key 'simulation' must be a table, got {_describe(simulation)}")
    _check_keys(simulation, list(_SIMULATION_KEYS), "[simulation]")
    for toml_key, field_name in _SIMULATION_KEYS.items():
        if toml_key in simulation:
            kwargs[field_name] = simulation[toml_key]
    return Policy(**kwargs)


def _platform_section(name: str, table: Any) -> Any:
    if not isinstance(table, Mapping):
        raise PolicyError(f"policy key {name!r} must be a table, got {_describe(table)}")
    from attestation.errors import UnsupportedPlatform
    from attestation.registry import platform

    try:
        section_class = platform(name).section
    except UnsupportedPlatform:
        raise PolicyError(f"policy table [{name}] is not supported by this version of enclaveq") from None
    try:
        section = section_class.from_table(dict(table))
    except PolicyError as exc:
        message = str(exc)
        raise PolicyError(message if f"[{name}]" in message else f"[{name}] {message}") from None
    # Each section checks in its own constructor that it pins code (docs/policy.md, "What pins
    # code"), so a section built in Python is refused exactly as this table would be.
    return section


def policy_from_toml(text: str) -> Policy:
    """Parse policy TOML text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy is not valid TOML: {exc}") from None
    return policy_from_mapping(data)


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and check a policy file. Every problem is a :class:`PolicyError` naming the file."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise PolicyError(f"{path}: policy file not found") from None
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: policy file is not UTF-8 text") from None
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy file: {exc.strerror}") from None
    try:
        return policy_from_toml(text)
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc}") from None


def policy_to_toml(policy: Policy) -> str:
    """The TOML text of ``policy`` (loads back to an equal :class:`Policy`)."""
    data: dict[str, Any] = {
        "version": POLICY_VERSION,
        "measurements": list(policy.measurements),
        "min_security_version": policy.min_security_version,
        "debug_allowed": policy.debug_allowed,
        "max_evidence_age_seconds": policy.max_evidence_age_seconds,
        "max_clock_skew_seconds": policy.max_clock_skew_seconds,
        "nonce_required": policy.nonce_required,
    }
    simulation: dict[str, Any] = {"allow": policy.allow_simulation}
    if policy.sim_root_sha256 is not None:
        simulation["root_sha256"] = policy.sim_root_sha256
    data["simulation"] = simulation
    for name, section in sorted(policy.platforms.items()):
        data[name] = section.to_table()
    header = ["# enclaveq attestation policy; format: docs/policy.md"]
    if policy.allow_simulation:
        header.append(
            "# WARNING: [simulation] allow = true accepts SIMULATED evidence, "
            "which gives no confidentiality. Development only."
        )
    return "\n".join(header) + "\n\n" + tomli_w.dumps(data, multiline_strings=False)


def write_policy(path: str | os.PathLike[str], policy: Policy, *, force: bool = False) -> Path:
    """Write ``policy`` to ``path``. Refuses to replace an existing file unless ``force``
    (:class:`FileExistsError`). The write is atomic: readers see the old or the new file."""
    path = Path(path)
    text = policy_to_toml(policy).encode("utf-8")
    # Write a temporary file first, so a reader never sees half a policy; then either link it
    # into place (fails if the target exists: no check-then-write race) or rename over it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
