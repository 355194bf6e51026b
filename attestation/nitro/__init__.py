"""AWS Nitro Enclaves attestation documents: ``abi`` (COSE_Sign1/CBOR -> dataclasses),
``verify`` (AWS root, chain, validity, ES384), ``policy`` (the ``[nitro]`` table) and
``validate`` (PCRs, module_id, debug). ``PLATFORM`` implements
:class:`attestation.platforms.Platform`.

``Verified`` for Nitro: ``measurement`` = PCR0; ``report_data`` = ``user_data`` (b"" when
absent); ``debug`` = PCR0, PCR1 or PCR2 all zero; ``issued_at`` = ``timestamp``; ``claims`` =
``module_id digest timestamp pcrs public_key user_data nonce`` with ``pcrs`` as
``{"0": bytes, ...}``; ``report`` = the parsed :class:`~attestation.nitro.abi.NitroEvidence`.
"""

from __future__ import annotations

from attestation.nitro.abi import NitroEvidence, parse_evidence
from attestation.nitro.policy import NitroSection
from attestation.nitro.validate import violations
from attestation.nitro.verify import verify_evidence
from attestation.platforms import PlatformFunctions

__all__ = ["PLATFORM", "NitroEvidence", "NitroSection", "parse_evidence"]


PLATFORM = PlatformFunctions(name="nitro", section=NitroSection, verify=verify_evidence, violations=violations)
