"""Pinned Intel root for SGX and TDX: the SHA-256 fingerprint (of the DER) of the Intel SGX Root CA.

The root certificate itself travels in every quote (the PCK chain of certification data type 5)
and in the TCB Info / QE Identity issuer chains; it is accepted only if it hashes to this value
and signs itself. Provenance: Intel PCS publishes the "Intel SGX Root CA" certificate; the same
certificate ends every PCK chain in the project's SGX and TDX vectors. TDX quotes chain to the
same root, so the default trust anchors pin it for both platforms.
"""

from __future__ import annotations

__all__ = ["INTEL_SGX_ROOT_CA"]

INTEL_SGX_ROOT_CA = bytes.fromhex("44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3")
