"""Attestation: turn a worker's evidence into trusted claims, or a typed, explained refusal.

Front door: :func:`verify_evidence` (parse -> verify -> validate, for any platform), judged
against a :class:`Policy` loaded with :func:`load_policy`. Platforms live in subpackages with an
``abi`` (bytes <-> dataclasses), a ``verify`` (signatures, chains) and, where needed, a
``validate`` module; ``sim`` is the clearly labelled simulation (no confidentiality), the real
TEEs follow. Errors: :mod:`attestation.errors`.
"""

from attestation.claims import CertSummary, Claims
from attestation.errors import (
    AttestationError,
    EvidenceInvalid,
    EvidenceMalformed,
    PolicyError,
    PolicyViolation,
    SimDirError,
    UnsealError,
    UnsupportedPlatform,
    Violation,
)
from attestation.policy import Policy, load_policy, write_policy
from attestation.verify import SUPPORTED_PLATFORMS, verify_evidence

__all__ = [
    "AttestationError",
    "CertSummary",
    "Claims",
    "EvidenceInvalid",
    "EvidenceMalformed",
    "Policy",
    "PolicyError",
    "PolicyViolation",
    "SUPPORTED_PLATFORMS",
    "SimDirError",
    "UnsealError",
    "UnsupportedPlatform",
    "Violation",
    "load_policy",
    "verify_evidence",
    "write_policy",
]
