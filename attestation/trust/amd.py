"""AMD's SEV-SNP trust anchors: each product's pinned ARK fingerprint and AMD's published chains.

The pin is the SHA-256 fingerprint (of the DER) of each product's ARK. Each ARK is pinned *per
product*: a chain whose ARK is the Genoa root is only accepted for a Genoa VCEK/VLEK and a Genoa
report.

AMD's published chains are also built in (``attestation/trust/amd/*.pem``, the KDS
``/vcek/v1/<product>/cert_chain`` (ASK + ARK) and ``/vlek/v1/<product>/cert_chain`` (ASVK + ARK)
of Milan, Genoa and Turin), so a VCEK or VLEK alone suffices, as in go-sev-guest
(``verify/trust/``) and virtee/sev (``certs/snp/builtin/``). They are trust anchors, not a
second source of trust: :func:`bundled_chain` loads a file only if its ARK hashes to the pin
above and signs itself, and its ASK/ASVK is a CA named for that product and signed by that ARK
(RSASSA-PSS/SHA-384, as AMD signs); a file that fails is refused (:class:`BundledChainError`),
never skipped. The verifier still checks every chain, built in or given, against the pinned ARKs
of its trust anchors, and uses a built-in chain only when the user's certificates (``--cert``,
the report's certificate table) do not complete the VCEK/VLEK's chain.

The six files are byte-identical copies of google/go-sev-guest ``verify/trust/ask_ark_milan.pem``,
``ask_ark_genoa.pem``, ``ask_ark_milan_vlek.pem``, ``ask_ark_genoa_vlek.pem`` (commits 94ceba6d,
6c4b3306) and ``ask_ark_turin_vcek.pem``, ``ask_ark_turin_vlek.pem`` (commit 6953342c), with the
SHA-256s listed in the project's vectors' SOURCES.md; the Milan and Genoa ASK/ASVK/ARK there are
the same certificates as in confidential-containers/trustee and virtee/sev.

Provenance of the values (all three ARKs are RSA-4096, self-signed with RSASSA-PSS/SHA-384):

- ``ARK-Milan`` (2020-10-22 .. 2045-10-22) and ``ARK-Genoa`` (2022-01-26 .. 2047-01-26):
  computed from the ARK certificates in the project's test vectors, which are byte-identical
  copies from three independent repositories (confidential-containers/trustee, google/go-sev-
  guest ``verify/trust/ask_ark_*.pem``, virtee/sev ``src/certs/snp/builtin/*/ark.pem``), i.e.
  AMD KDS ``cert_chain`` output; each verifies its own signature and signs the ASK/ASVK there.
- ``ARK-Turin`` (2023-05-15 .. 2048-05-15): computed from the ARK in google/go-sev-guest
  ``verify/trust/ask_ark_turin_vlek.pem`` (KDS ``/vlek/v1/Turin/cert_chain``); the certificate
  is self-signed (checked) and the same fingerprint is pinned independently by other public
  SEV-SNP verifiers; it is also the ARK of ``ask_ark_turin_vcek.pem``. No Turin report is among
  the project's vectors, so the Turin chains are checked (pin, signatures) but no real Turin
  VCEK/VLEK is verified through them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

__all__ = [
    "ARK_MILAN", "ARK_GENOA", "ARK_TURIN", "ARK_FINGERPRINTS", "PRODUCT_OF_ARK", "SNP_ROOTS",
    "BUNDLED_CHAIN_FILES", "BundledChain", "BundledChainError", "bundled_chain", "bundled_chains",
    "load_bundled_chain",
]

ARK_MILAN = bytes.fromhex("69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd")
ARK_GENOA = bytes.fromhex("4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1")
ARK_TURIN = bytes.fromhex("1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a")

# Product line -> pinned ARK fingerprint.
ARK_FINGERPRINTS: dict[str, bytes] = {"Milan": ARK_MILAN, "Genoa": ARK_GENOA, "Turin": ARK_TURIN}
# Fingerprint -> product line: a genuine AMD ARK names the only product it may certify.
PRODUCT_OF_ARK: dict[bytes, str] = {fp: product for product, fp in ARK_FINGERPRINTS.items()}

# Every pinned ARK: what the default trust anchors accept for "snp".
SNP_ROOTS: frozenset[bytes] = frozenset(ARK_FINGERPRINTS.values())

# (product, signing key) -> the built-in chain file under attestation/trust/amd/.
BUNDLED_CHAIN_FILES: dict[tuple[str, str], str] = {
    ("Milan", "vcek"): "ask_ark_milan.pem",
    ("Milan", "vlek"): "ask_ark_milan_vlek.pem",
    ("Genoa", "vcek"): "ask_ark_genoa.pem",
    ("Genoa", "vlek"): "ask_ark_genoa_vlek.pem",
    ("Turin", "vcek"): "ask_ark_turin_vcek.pem",
    ("Turin", "vlek"): "ask_ark_turin_vlek.pem",
}
# The intermediate's CN AMD gives each signing key (ASK for VCEKs, ASVK for VLEKs).
_INTERMEDIATE_CN = {"vcek": "SEV-{product}", "vlek": "SEV-VLEK-{product}"}
# How AMD signs its chain (AMD #57230): RSASSA-PSS, SHA-384, MGF1-SHA-384, 48-byte salt, RSA-4096.
_AMD_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


class BundledChainError(RuntimeError):
    """A built-in AMD chain file is missing or fails its check (the installed package was altered)."""


@dataclass(frozen=True)
class BundledChain:
    """One built-in AMD chain, checked: ``intermediate`` (ASK or ASVK) signed by ``ark`` (pinned)."""

    product: str
    signing_key: str                   # "vcek" (ASK) or "vlek" (ASVK)
    intermediate: x509.Certificate
    ark: x509.Certificate


def _common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else ""


def _check_signed(child: x509.Certificate, parent: x509.Certificate, what: str) -> None:
    if child.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS or not isinstance(
            child.signature_hash_algorithm, hashes.SHA384):
        raise BundledChainError(f"{what} is not signed with RSASSA-PSS/SHA-384")
    key = parent.public_key()
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size != 4096:
        raise BundledChainError(f"{what}: the signer's key is not RSA-4096")
    if child.issuer != parent.subject:
        raise BundledChainError(f"{what}: issuer {child.issuer.rfc4514_string()!r} is not the ARK")
    try:
        key.verify(child.signature, child.tbs_certificate_bytes, _AMD_PSS, hashes.SHA384())
    except InvalidSignature:
        raise BundledChainError(f"{what}: the ARK's signature does not verify") from None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def load_bundled_chain(product: str, signing_key: str, data: bytes, *, source: str = "<data>") -> BundledChain:
    """Parse and check one chain PEM (ASK or ASVK, and the ARK, in any order) for ``product``.

    The ARK must hash to ``ARK_FINGERPRINTS[product]`` and sign itself; the other certificate
    must be a CA named ``SEV-<product>`` (``vcek``) or ``SEV-VLEK-<product>`` (``vlek``), signed
    by the ARK. Anything else is a :class:`BundledChainError` naming ``source``.
    """
    if product not in ARK_FINGERPRINTS or signing_key not in _INTERMEDIATE_CN:
        raise BundledChainError(f"{source}: no pinned ARK for {product!r} {signing_key!r}")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise BundledChainError(f"{source}: not a PEM certificate chain ({exc})") from None
    pinned = ARK_FINGERPRINTS[product]
    arks = [c for c in certs if c.fingerprint(hashes.SHA256()) == pinned]
    others = [c for c in certs if c.fingerprint(hashes.SHA256()) != pinned]
    if len(certs) != 2 or len(arks) != 1:
        raise BundledChainError(f"{source}: expected the {product} ARK (SHA-256 {pinned.hex()}) and one "
                                f"intermediate, found {len(certs)} certificate(s), {len(arks)} of them the pinned ARK")
    ark, intermediate = arks[0], others[0]
    _check_signed(ark, ark, f"{source}: ARK-{product}")
    want_cn = _INTERMEDIATE_CN[signing_key].format(product=product)
    if _common_name(intermediate) != want_cn:
        raise BundledChainError(f"{source}: the intermediate is {_common_name(intermediate)!r}, not {want_cn!r}")
    if not (_is_ca(ark) and _is_ca(intermediate)):
        raise BundledChainError(f"{source}: the ARK and {want_cn} must both be CAs")
    _check_signed(intermediate, ark, f"{source}: {want_cn}")
    return BundledChain(product, signing_key, intermediate, ark)


@functools.cache
def bundled_chain(product: str, signing_key: str) -> BundledChain | None:
    """The checked built-in chain for ``product`` and ``signing_key`` ("vcek"/"vlek"), None if
    there is none for that pair; :class:`BundledChainError` if its file is missing or fails its
    check. Loaded once per process, at first use (each check is two RSA-4096 verifications)."""
    name = BUNDLED_CHAIN_FILES.get((product, signing_key))
    if name is None:
        return None
    source = f"attestation/trust/amd/{name}"
    try:
        data = resources.files(__package__ or "attestation.trust").joinpath("amd", name).read_bytes()
    except OSError as exc:
        raise BundledChainError(f"{source}: cannot be read ({exc}); the package is incomplete") from None
    return load_bundled_chain(product, signing_key, data, source=source)


def bundled_chains() -> tuple[BundledChain, ...]:
    """Every built-in chain, checked (all six load or this raises)."""
    chains = (bundled_chain(product, key) for product, key in BUNDLED_CHAIN_FILES)
    return tuple(chain for chain in chains if chain is not None)
