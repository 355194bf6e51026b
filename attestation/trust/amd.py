"""Pinned AMD roots for SEV-SNP: the SHA-256 fingerprint (of the DER) of each product's ARK.

Only fingerprints are pinned (see :mod:`attestation.trust`): the ARK certificate itself comes
with the user's certificates (`--cert`, AMD KDS ``/vcek/v1/<product>/cert_chain`` or
``/vlek/v1/<product>/cert_chain``, ASK or ASVK first, then the ARK) and is accepted only if it
hashes to one of these values and signs itself. Each ARK is pinned *per product*: a chain whose
ARK is the Genoa root is only accepted for a Genoa VCEK/VLEK and a Genoa report.

Provenance of the values (all three ARKs are RSA-4096, self-signed with RSASSA-PSS/SHA-384):

- ``ARK-Milan`` (2020-10-22 .. 2045-10-22) and ``ARK-Genoa`` (2022-01-26 .. 2047-01-26):
  computed from the ARK certificates in the project's test vectors, which are byte-identical
  copies from three independent repositories (confidential-containers/trustee, google/go-sev-
  guest ``verify/trust/ask_ark_*.pem``, virtee/sev ``src/certs/snp/builtin/*/ark.pem``), i.e.
  AMD KDS ``cert_chain`` output; each verifies its own signature and signs the ASK/ASVK there.
- ``ARK-Turin`` (2023-05-15 .. 2048-05-15): computed from the ARK in google/go-sev-guest
  ``verify/trust/ask_ark_turin_vlek.pem`` (KDS ``/vlek/v1/Turin/cert_chain``); the certificate
  is self-signed (checked) and the same fingerprint is pinned independently by other public
  SEV-SNP verifiers. No Turin report or Turin ARK file is among the project's vectors, so the
  value is not exercised by a test against a real Turin chain.
"""

from __future__ import annotations

__all__ = ["ARK_MILAN", "ARK_GENOA", "ARK_TURIN", "ARK_FINGERPRINTS", "PRODUCT_OF_ARK", "SNP_ROOTS"]

ARK_MILAN = bytes.fromhex("69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd")
ARK_GENOA = bytes.fromhex("4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1")
ARK_TURIN = bytes.fromhex("1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a")

# Product line -> pinned ARK fingerprint.
ARK_FINGERPRINTS: dict[str, bytes] = {"Milan": ARK_MILAN, "Genoa": ARK_GENOA, "Turin": ARK_TURIN}
# Fingerprint -> product line: a genuine AMD ARK names the only product it may certify.
PRODUCT_OF_ARK: dict[bytes, str] = {fp: product for product, fp in ARK_FINGERPRINTS.items()}

# Every pinned ARK: what the default trust anchors accept for "snp".
SNP_ROOTS: frozenset[bytes] = frozenset(ARK_FINGERPRINTS.values())
