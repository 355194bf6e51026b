"""A fake AWS Nitro attestation PKI in memory, and a builder of signed attestation documents.

:class:`FakeNitro` mints a P-384 root (like AWS Nitro Enclaves Root-G1), a chain of CA
certificates shaped like AWS's (regional, zonal, instance: critical basicConstraints with
decreasing pathLenConstraint, keyCertSign) and a P-384 leaf (digitalSignature, not a CA), all
relative to an injected ``now``. :meth:`FakeNitro.document` builds an ES384 COSE_Sign1 over an
attestation document with any field chosen, omitted, nulled or added, and knobs to break the
envelope (protected header, tag, signature, trailing bytes) -- for tests only. Verify against
it with ``fake.inputs()`` (its root pinned as the only Nitro trust anchor).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, UTC
from typing import Any
from collections.abc import Iterable, Mapping

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from attestation.nitro.abi import ALG_ES384, encode_cose_sign1, sig_structure
from attestation.platforms import VerificationInputs
from attestation.trust import TrustAnchors

__all__ = ["FakeNitro", "DEBUG_PCRS", "default_pcrs", "sign_es384", "make_certificate"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ES384_PROTECTED = cbor2.dumps({1: ALG_ES384})


def default_pcrs(seed: str = "enclaveq-fake-enclave") -> dict[int, bytes]:
    """16 SHA-384 PCRs shaped like a production enclave: 0-4 and 8 measured, the rest zero."""
    return {i: (hashlib.sha384(f"{seed}/pcr{i}".encode()).digest() if i in (0, 1, 2, 3, 4, 8) else bytes(48))
            for i in range(16)}


# A debug-mode enclave: every PCR is zero.
DEBUG_PCRS: Mapping[int, bytes] = {i: bytes(48) for i in range(16)}


def sign_es384(key: ec.EllipticCurvePrivateKey, protected: bytes, payload: bytes) -> bytes:
    """The raw r || s (48 + 48 bytes, big-endian) ES384 signature of a COSE_Sign1."""
    r, s = decode_dss_signature(key.sign(sig_structure(protected, payload), ec.ECDSA(hashes.SHA384())))
    return r.to_bytes(48, "big") + s.to_bytes(48, "big")


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "enclaveq FAKE Nitro PKI (tests only)"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def make_certificate(
    common_name: str,
    public_key: Any,
    *,
    issuer: x509.Certificate | None,
    issuer_key: Any,
    not_before: datetime,
    not_after: datetime,
    ca: bool,
    path_length: int | None = None,
    digital_signature: bool | None = None,
    key_cert_sign: bool | None = None,
    basic_constraints: bool = True,
    basic_constraints_critical: bool = True,
    key_usage: bool = True,
    extra_extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
) -> x509.Certificate:
    """One certificate in the AWS Nitro profile (``issuer=None``: self-signed). Every knob
    exists to build a certificate that breaks that profile."""
    subject = _name(common_name)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if basic_constraints:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None),
                                        critical=basic_constraints_critical)
    if key_usage:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=(not ca) if digital_signature is None else digital_signature,
                content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False,
                key_cert_sign=ca if key_cert_sign is None else key_cert_sign,
                crl_sign=ca, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    for extension, critical in extra_extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA384())


def _der(cert: x509.Certificate | bytes) -> bytes:
    return cert if isinstance(cert, bytes) else cert.public_bytes(Encoding.DER)


_UNSET: Any = object()


@dataclass
class FakeNitro:
    """Root -> ``intermediates`` CAs -> leaf, valid around ``now``; ``document()`` signs."""

    now: datetime
    intermediates: int = 3
    leaf_lifetime: timedelta = timedelta(hours=3)
    ca_lifetime: timedelta = timedelta(days=20)
    module_id: str = "i-0123456789abcdef0-enc0123456789abcdef"
    root_key: ec.EllipticCurvePrivateKey = field(init=False)
    root: x509.Certificate = field(init=False)
    ca_keys: list[ec.EllipticCurvePrivateKey] = field(init=False)
    cas: list[x509.Certificate] = field(init=False)  # root first, like cabundle
    leaf_key: ec.EllipticCurvePrivateKey = field(init=False)
    leaf: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        if self.now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        self.root_key = ec.generate_private_key(ec.SECP384R1())
        self.root = make_certificate(
            "fake.nitro-enclaves", self.root_key.public_key(), issuer=None, issuer_key=self.root_key,
            not_before=self.now - timedelta(days=365), not_after=self.now + timedelta(days=3650), ca=True,
        )
        self.ca_keys, self.cas = [self.root_key], [self.root]
        for depth in range(self.intermediates):
            key = ec.generate_private_key(ec.SECP384R1())
            cert = make_certificate(
                f"fake-ca-{depth}.nitro-enclaves", key.public_key(), issuer=self.cas[-1], issuer_key=self.ca_keys[-1],
                not_before=self.now - timedelta(days=1), not_after=self.now + self.ca_lifetime, ca=True,
                path_length=self.intermediates - 1 - depth,
            )
            self.ca_keys.append(key)
            self.cas.append(cert)
        self.leaf_key, self.leaf = self.issue_leaf()

    # -- trust ---------------------------------------------------------------------------------
    @property
    def root_sha256(self) -> bytes:
        return self.root.fingerprint(hashes.SHA256())

    @property
    def trust(self) -> TrustAnchors:
        return TrustAnchors({"nitro": frozenset({self.root_sha256})})

    def inputs(self, now: datetime | None = None, **kwargs: Any) -> VerificationInputs:
        return VerificationInputs(now=now or self.now, trust=kwargs.pop("trust", self.trust), **kwargs)

    # -- certificates --------------------------------------------------------------------------
    def issue_leaf(self, *, curve: ec.EllipticCurve | None = None, not_before: datetime | None = None,
                   not_after: datetime | None = None, **profile: Any) -> tuple[Any, x509.Certificate]:
        """A leaf key and certificate from the last CA; ``profile`` goes to :func:`make_certificate`
        (e.g. ``ca=True`` or ``digital_signature=False`` to break it)."""
        key = ec.generate_private_key(curve or ec.SECP384R1())
        profile.setdefault("ca", False)
        cert = make_certificate(
            f"{self.module_id}.fake.aws", key.public_key(), issuer=self.cas[-1], issuer_key=self.ca_keys[-1],
            not_before=not_before or self.now - timedelta(seconds=3), not_after=not_after or self.now + self.leaf_lifetime,
            **profile,
        )
        return key, cert

    @property
    def cabundle(self) -> list[bytes]:
        return [_der(c) for c in self.cas]

    # -- documents -----------------------------------------------------------------------------
    def fields(self, **overrides: Any) -> dict[str, Any]:
        """The attestation document map (before CBOR), defaults filled in, in the NSM's order.

        A key given as ``None`` is encoded as CBOR null; optional fields are absent unless
        given. ``timestamp`` may be a datetime; ``certificate``/``cabundle`` may hold
        certificate objects."""
        doc: dict[str, Any] = {
            "module_id": self.module_id,
            "digest": "SHA384",
            "timestamp": self.now,
            "pcrs": default_pcrs(),
            "certificate": self.leaf,
            "cabundle": self.cas,
        }
        doc.update(overrides)
        if isinstance(doc.get("timestamp"), datetime):
            doc["timestamp"] = (doc["timestamp"] - _EPOCH) // timedelta(milliseconds=1)
        if isinstance(doc.get("certificate"), x509.Certificate):
            doc["certificate"] = _der(doc["certificate"])
        if isinstance(doc.get("cabundle"), (list, tuple)):
            doc["cabundle"] = [_der(c) if isinstance(c, x509.Certificate) else c for c in doc["cabundle"]]
        return doc

    def document(
        self,
        *,
        omit: Iterable[str] = (),
        extra: Mapping[Any, Any] | None = None,
        payload: bytes | None = None,
        protected: bytes = ES384_PROTECTED,
        unprotected: Mapping[Any, Any] | None = None,
        tagged: bool = False,
        trailing: bytes = b"",
        signing_key: Any = None,
        signature: bytes | None = None,
        **fields: Any,
    ) -> bytes:
        """A signed attestation document (raw CBOR bytes, as the NSM returns it).

        ``fields`` override document fields (see :meth:`fields`); ``omit`` drops some,
        ``extra`` adds unknown ones; ``payload`` replaces the whole encoded payload. The
        envelope knobs build broken documents: another ``protected`` header, ``tagged``
        (CBOR tag 18), a ``signing_key`` other than the leaf's, a literal ``signature``,
        ``trailing`` bytes after the structure."""
        if payload is None:
            doc = self.fields(**fields)
            for name in omit:
                doc.pop(name, None)
            doc.update(extra or {})
            payload = cbor2.dumps(doc)
        if signature is None:
            signature = sign_es384(signing_key or self.leaf_key, protected, payload)
        return encode_cose_sign1(protected, unprotected or {}, payload, signature, tagged=tagged) + trailing
