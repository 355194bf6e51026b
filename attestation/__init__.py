"""Attestation: turn a worker's evidence into trusted claims, or a typed, explained refusal.

Front door: :func:`verify_evidence` (parse -> verify -> validate, for any platform), judged
against a :class:`Policy` loaded with :func:`load_policy`. The hardware TEEs live in
subpackages (``sgx``, ``tdx`` with the shared ``intel``, ``snp``, ``nitro``), each with an
``abi`` (bytes <-> dataclasses), a ``verify`` (signatures, chains), a ``policy`` (its table) and
a ``validate`` module, under the contract of :mod:`attestation.platforms`; ``sim`` is the
clearly labelled simulation (no confidentiality). Pinned vendor roots: :mod:`attestation.trust`.
Errors: :mod:`attestation.errors`.
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
