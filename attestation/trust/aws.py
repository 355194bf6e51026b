"""Pinned AWS root for Nitro Enclaves: the SHA-256 fingerprint (of the DER) of AWS Nitro Enclaves Root-G1.

The root certificate itself travels in every attestation document (first entry of the
``cabundle``) and is accepted only if it hashes to this value and signs itself. Provenance: the
AWS Nitro Enclaves User Guide, "Verifying the root of trust", which publishes the certificate
and this fingerprint; the cabundle of every Nitro document in the project's vectors starts with it.
"""

from __future__ import annotations

__all__ = ["AWS_NITRO_ROOT_G1"]

AWS_NITRO_ROOT_G1 = bytes.fromhex("641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b")
