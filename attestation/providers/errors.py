"""Errors of the evidence providers: why a worker could not obtain evidence from its TEE.

::

    ProviderError                 (separate root) no evidence could be obtained
    ├── ProviderUnavailable       not inside that TEE: the device or interface is missing, or
    │   │                         the interface belongs to another TEE (``--tee tdx`` on SNP)
    │   └── NoTeeDetected         ``--tee auto`` found no supported TEE at all
    ├── ProviderFailed            the TEE is there but refused: the kernel, Gramine or the
    │   │                         quoting service returned an error, the output was empty or
    │   │                         did not bind our report data, concurrent writers never let go
    │   └── EvidenceMismatch      the quote the host's quoting service returned describes
    │                             another TEE than the local report this TEE made of itself
    └── ProviderNotSupported      recognised, but this build cannot use it (Nitro NSM, EPID,
                                  an unknown configfs-tsm provider, SNP privlevel below floor)

Decisions:

- :class:`ProviderError` does not derive from :class:`attestation.errors.AttestationError`:
  that tree is a verifier's judgement about someone's evidence; failing to *produce* evidence
  on our own machine is a different fault, and code catching one must not swallow the other.
- Every message names the path it looked at and says what to do; none contains report data
  (it is a hash anyway) or evidence bytes.
- Wrong-size report data is a programming error, not a platform fault: ``ValueError``, as in
  :class:`attestation.sim.provider.SimProvider`.
"""

from __future__ import annotations

__all__ = [
    "ProviderError",
    "ProviderUnavailable",
    "NoTeeDetected",
    "ProviderFailed",
    "EvidenceMismatch",
    "ProviderNotSupported",
]


class ProviderError(Exception):
    """Base class: the worker could not obtain evidence from its TEE."""


class ProviderUnavailable(ProviderError):
    """Not running inside the requested TEE, or its interface is missing."""


class NoTeeDetected(ProviderUnavailable):
    """``--tee auto`` found no supported TEE (and never falls back to simulation)."""


class ProviderFailed(ProviderError):
    """The TEE interface exists but refused or returned unusable output."""


class EvidenceMismatch(ProviderFailed):
    """The TEE's evidence (made by the host's quoting service) is not of this TEE: its identity
    differs from the report the TEE made of itself. Only a host substituting quotes does that."""


class ProviderNotSupported(ProviderError):
    """The TEE (or the requested option) is recognised but not supported by this build."""
