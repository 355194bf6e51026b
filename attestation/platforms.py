"""The contract every hardware TEE platform implements, and what verification may use besides the evidence.

A hardware platform is a package ``attestation/<name>/`` (``sgx``, ``tdx``, ``snp``, ``nitro``):

- ``abi``      bytes -> frozen dataclasses, no judgement; every malformed input is ``EvidenceMalformed``;
- ``verify``   signatures, certificate chains to pinned roots, CRLs, collateral -> :class:`Verified`;
               every authenticity failure is ``EvidenceInvalid``;
- ``policy``   its TOML table (``[sgx]``, ``[tdx]``, ``[snp]``, ``[nitro]``) -> a frozen section;
- ``validate`` a section against :class:`Verified` -> every ``Violation`` at once;

and its ``__init__`` exposes ``PLATFORM``, a :class:`Platform` (all four build it as a
:class:`PlatformFunctions` from their ``verify`` and ``validate`` functions). Nothing registers
itself: :mod:`attestation.registry` names the platforms and imports ``attestation.<name>`` when
one is first asked for. :func:`attestation.verify.verify_evidence` calls ``PLATFORM.verify``, adds
the checks common to all platforms (:mod:`attestation.validate`: report data binding, evidence
age where the evidence carries a signed time, and for a platform without its own table in the
policy the generic measurement allow-list), adds ``PLATFORM.violations`` when the policy has the
platform's table, and raises one ``PolicyViolation`` listing everything.

The simulation (``attestation/sim``) is not a :class:`Platform`: the front door authenticates it
against the policy's pinned simulation root and judges its :class:`~attestation.claims.Claims`
with the common checks only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from collections.abc import Callable, Mapping, Sequence

from cryptography import x509

from .claims import CertSummary, CollateralUse
from .errors import Violation
from .trust import DEFAULT_TRUST, TrustAnchors


@dataclass(frozen=True)
class VerificationInputs:
    """Everything a verifier may consult besides the evidence. All of it is explicit: nothing is
    fetched unless the caller passed a fetcher, and the clock is ``now``."""

    now: datetime
    # Extra certificates from the user (`--cert`): SNP VCEK/VLEK, ASK/ARK, or chain completions.
    extra_certs: tuple[x509.Certificate, ...] = ()
    # Platform collateral, e.g. {"tcb_info": bytes, "qe_identity": bytes, "crls": [CRL, ...]};
    # each platform documents the keys it reads (see attestation/<platform>/verify.py).
    collateral: Mapping[str, Any] = field(default_factory=dict)
    trust: TrustAnchors = DEFAULT_TRUST
    # Optional network fetcher for collateral; None (the default) means offline.
    fetcher: Any = None


@dataclass(frozen=True)
class Verified:
    """Authentic evidence, not yet judged against a policy."""

    platform: str
    measurement: bytes          # SGX mrenclave, TDX mrtd, SNP measurement, Nitro pcr0, sim measurement
    report_data: bytes          # the 64 bytes bound by the worker (Nitro: user_data, padded/checked by the platform)
    debug: bool
    claims: Mapping[str, Any]   # every parsed field, names as in the `evidence verify --json` contract; bytes stay bytes
    chain: tuple[CertSummary, ...] = ()
    trailing_bytes: int = 0     # bytes after the signed structure: outside every signature, reported not trusted
    issued_at: datetime | None = None   # only platforms whose evidence carries a signed time (Nitro, sim)
    security_version: int = 0
    simulated: bool = False
    tcb_status: str | None = None       # Intel TCB status when collateral was given
    advisory_ids: tuple[str, ...] = ()
    report: Any = None                  # the platform's parsed dataclass, for its validator
    # Collateral: every document used (with its age at inputs.now), and what the platform's TCB
    # judgement needed but was not given (empty: the TCB was evaluated; always empty for platforms
    # without collateral, Nitro and simulation). The policy judges both (attestation.collateral_rules).
    collateral: tuple[CollateralUse, ...] = ()
    collateral_missing: tuple[str, ...] = ()
    tcb_evaluated: bool = False         # True when the TCB was judged against the vendor's collateral


class PolicySection(Protocol):
    """A platform's policy table, parsed. ``from_table`` raises PolicyError naming `[platform] key`."""

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> PolicySection: ...

    def to_table(self) -> dict[str, Any]: ...


class Platform(Protocol):
    """What ``attestation.<name>.PLATFORM`` provides (read-only attributes, so frozen dataclasses fit)."""

    @property
    def name(self) -> str: ...

    @property
    def section(self) -> type[PolicySection]: ...

    def verify(self, evidence: bytes, inputs: VerificationInputs) -> Verified: ...

    def violations(self, verified: Verified, section: Any, inputs: VerificationInputs) -> Sequence[Violation]: ...


@dataclass(frozen=True)
class PlatformFunctions:
    """A ``Platform`` made of a platform's module-level functions (what most platforms need)."""

    name: str
    section: type[PolicySection]
    verify: Callable[[bytes, VerificationInputs], Verified]
    violations: Callable[[Verified, Any, VerificationInputs], Sequence[Violation]]

    def __repr__(self) -> str:
        return f"<platform {self.name}>"
