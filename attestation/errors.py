"""Every error the attestation package raises, and what each one means to a caller.

::

    AttestationError                 anything that stops evidence from being accepted
    ├── EvidenceMalformed            the bytes cannot be parsed: truncated, wrong format or
    │                                version, wrong field types or sizes, bad DER, trailing data
    ├── EvidenceInvalid              parsed, but not authentic: bad signature, broken chain,
    │                                a certificate outside its validity at ``now``, untrusted root
    ├── PolicyViolation              authentic, but the policy refuses it; ``.violations`` lists
    │                                *every* failed check at once (field, value, expectation)
    ├── UnsupportedPlatform          no verifier for the named platform (lists the supported ones)
    ├── PolicyError                  the policy itself is unusable: unknown key, wrong type,
    │                                out-of-range value, unreadable file (names the key)
    └── SimDirError                  a simulation directory is missing, incomplete, corrupt,
                                     or would be overwritten without ``force``

    UnsealError                      (separate root) a sealed blob does not open: wrong key,
                                     wrong associated data, tampered, truncated. Deliberately
                                     opaque, like ``cryptography.fernet.InvalidToken``.

Decisions:

- "Simulated evidence while the policy does not allow simulation" is *not* its own exception:
  it is a :class:`Violation` with field ``allow_simulation`` inside a :class:`PolicyViolation`,
  so an operator sees it next to every other reason the evidence was refused.
- :class:`EvidenceMalformed` and :class:`EvidenceInvalid` fail fast (the first problem wins):
  once bytes are unparseable or unauthenticated, nothing else they claim is worth reporting.
  Policy validation, which only runs on authentic evidence, collects everything.
- :class:`UnsealError` does not derive from :class:`AttestationError`: a failure to open local
  sealed storage is not a judgement about someone's evidence, and code that catches
  ``AttestationError`` around a verification must not swallow it.
- Messages never contain plaintext (P10): they name fields, sizes, hashes and certificate
  subjects only. Measurements and report data are hashes, so printing them is safe.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AttestationError",
    "EvidenceMalformed",
    "EvidenceInvalid",
    "PolicyViolation",
    "Violation",
    "UnsupportedPlatform",
    "PolicyError",
    "SimDirError",
    "SimDirExists",
    "UnsealError",
]


class AttestationError(Exception):
    """Base class: the evidence (or the means to judge it) was not accepted."""


class EvidenceMalformed(AttestationError):
    """The evidence bytes cannot be parsed into the platform's format."""


class EvidenceInvalid(AttestationError):
    """The evidence parses but is not authentic (signature, chain, validity, trusted root)."""


@dataclass(frozen=True)
class Violation:
    """One failed policy check.

    ``field`` names what was checked (a claim such as ``measurement``, or ``allow_simulation``),
    ``value`` is what the evidence says, ``expected`` is what the policy demands; all three are
    human-readable strings so that the message can be shown to an operator as is.
    """

    field: str
    value: str
    expected: str

    def __str__(self) -> str:
        return f"{self.field}: got {self.value}; expected {self.expected}"


class PolicyViolation(AttestationError):
    """Authentic evidence that the policy refuses. Lists every violation, one per line."""

    def __init__(self, violations: tuple[Violation, ...] | list[Violation]) -> None:
        violations = tuple(violations)
        if not violations:
            # An empty PolicyViolation would be a refusal without a reason: a bug in the caller.
            raise ValueError("PolicyViolation needs at least one Violation")
        self.violations: tuple[Violation, ...] = violations
        super().__init__(self._render())

    def _render(self) -> str:
        n = len(self.violations)
        head = f"evidence refused by policy ({n} violation{'s' if n != 1 else ''}):"
        return "\n".join([head, *(f"  - {v}" for v in self.violations)])

    def __str__(self) -> str:
        return self._render()

    def __reduce__(self):  # keep the structured violations across pickling (process pools)
        return (type(self), (self.violations,))

    @property
    def fields(self) -> tuple[str, ...]:
        """The ``field`` of every violation, in the order they were found."""
        return tuple(v.field for v in self.violations)


class UnsupportedPlatform(AttestationError):
    """No verifier exists for the requested platform name."""

    def __init__(self, platform: str, supported: tuple[str, ...]) -> None:
        self.platform = platform
        self.supported = supported
        super().__init__(
            f"unsupported attestation platform {platform!r}; supported: {', '.join(supported)}"
        )

    def __reduce__(self):
        return (type(self), (self.platform, self.supported))


class PolicyError(AttestationError):
    """The policy (file or object) is unusable. The message names the offending key."""


class SimDirError(AttestationError):
    """A simulation directory is missing, incomplete or corrupt, or exists and would be
    overwritten without ``force``."""


class SimDirExists(SimDirError):
    """``path`` already holds the simulation files ``existing``: replacing them (``force=True``,
    the CLI's ``--force``) changes the root fingerprint every policy pins."""

    def __init__(self, path: object, existing: tuple[str, ...]) -> None:
        self.path, self.existing = path, existing
        super().__init__(f"{path} already holds a simulation directory ({', '.join(existing)}); pass force=True "
                         "to replace it, which changes the root fingerprint")


class UnsealError(Exception):
    """A sealed blob does not open. Opaque on purpose: it never says *why*."""

    def __init__(self) -> None:
        super().__init__("sealed data does not open (wrong key, wrong context, or tampered)")

    def __reduce__(self):
        return (type(self), ())
