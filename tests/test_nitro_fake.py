"""Nitro attestation documents from the fake AWS PKI (attestation.testing.nitro): every
syntactic rule, the envelope, the chain profile, time, CRLs and debug -- without the vectors."""

from __future__ import annotations

from datetime import datetime, timedelta, UTC

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.errors import EvidenceInvalid, EvidenceMalformed
from attestation.nitro import PLATFORM, NitroSection
from attestation.nitro.abi import NitroEvidence, parse_evidence
from attestation.platforms import Platform, Verified
from attestation.testing.nitro import DEBUG_PCRS, FakeNitro, default_pcrs, make_certificate, sign_es384

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
pytestmark = pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")


@pytest.fixture(scope="module")
def fake() -> FakeNitro:
    return FakeNitro(now=NOW)


def verify(fake: FakeNitro, doc: bytes, now: datetime | None = None, **inputs) -> Verified:
    return PLATFORM.verify(doc, fake.inputs(now, **inputs))


def test_platform_object_implements_the_contract():
    for name in ("name", "section", "verify", "violations"):  # Platform is not runtime_checkable
        assert hasattr(PLATFORM, name), name
    assert set(Platform.__annotations__) <= set(dir(PLATFORM))
    assert PLATFORM.name == "nitro"
    assert PLATFORM.section is NitroSection


def test_valid_document_verifies(fake):
    statement = bytes(range(64))
    verified = verify(fake, fake.document(user_data=statement, nonce=b"n" * 32, public_key=b"k" * 91))
    assert verified.platform == "nitro"
    assert set(verified.claims) == {"module_id", "digest", "timestamp", "pcrs", "public_key", "user_data", "nonce"}
    pcrs = default_pcrs()
    assert verified.claims["pcrs"] == {str(i): v for i, v in pcrs.items()}
    assert verified.measurement == pcrs[0]
    assert verified.report_data == statement
    assert verified.claims["user_data"] == statement and verified.claims["nonce"] == b"n" * 32
    assert verified.claims["public_key"] == b"k" * 91
    assert verified.claims["module_id"] == fake.module_id and verified.claims["digest"] == "SHA384"
    assert verified.issued_at == NOW and verified.issued_at.tzinfo is not None
    assert verified.claims["timestamp"] == int(NOW.timestamp() * 1000)
    assert verified.debug is False and verified.simulated is False
    assert verified.trailing_bytes == 0
    assert isinstance(verified.report, NitroEvidence)
    assert [c.subject for c in verified.chain] == [c.subject.rfc4514_string() for c in (fake.leaf, *reversed(fake.cas))]


def test_tagged_and_untagged_and_trailing(fake):
    tagged = fake.document(tagged=True)
    assert tagged[0] == 0xD2
    assert verify(fake, tagged).report.tagged is True
    assert verify(fake, fake.document()).report.tagged is False
    verified = verify(fake, fake.document(trailing=b"\x00" * 17))
    assert verified.trailing_bytes == 17
    # A second complete document after the first is still only trailing bytes.
    doc = fake.document()
    assert verify(fake, doc + doc).trailing_bytes == len(doc)
    assert verify(fake, bytearray(doc)).trailing_bytes == 0
    assert verify(fake, memoryview(doc)).trailing_bytes == 0


def test_absent_and_null_optional_fields(fake):
    verified = verify(fake, fake.document())
    assert verified.claims["user_data"] is None and verified.claims["nonce"] is None
    assert verified.claims["public_key"] is None
    assert verified.report_data == b""
    verified = verify(fake, fake.document(user_data=None, nonce=None, public_key=None))
    assert verified.report_data == b"" and verified.claims["user_data"] is None
    assert verify(fake, fake.document(user_data=b"", nonce=b"")).claims["user_data"] == b""


@pytest.mark.parametrize("name", ["public_key", "user_data", "nonce"])
def test_size_limits_of_optional_fields(fake, name):
    assert verify(fake, fake.document(**{name: b"\x01" * 1024})).claims[name] == b"\x01" * 1024
    with pytest.raises(EvidenceMalformed, match=f"{name} is 1025 bytes"):
        verify(fake, fake.document(**{name: b"\x01" * 1025}))
    with pytest.raises(EvidenceMalformed, match=name):
        verify(fake, fake.document(**{name: "text, not bytes"}))


def test_public_key_must_not_be_empty(fake):
    with pytest.raises(EvidenceMalformed, match="public_key is 0 bytes"):
        verify(fake, fake.document(public_key=b""))


@pytest.mark.parametrize("name", ["module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle"])
def test_missing_or_null_mandatory_field(fake, name):
    with pytest.raises(EvidenceMalformed, match=f"lacks mandatory field '{name}'"):
        verify(fake, fake.document(omit=[name]))
    with pytest.raises(EvidenceMalformed, match=f"'{name}' is null"):
        verify(fake, fake.document(**{name: None}))


@pytest.mark.parametrize("extra", [{"extra": 1}, {"User_data": b"x"}, {1: b"x"}, {b"nonce": b"x"}])
def test_unknown_fields_are_refused(fake, extra):
    with pytest.raises(EvidenceMalformed, match="unknown fields"):
        verify(fake, fake.document(extra=extra))


def test_duplicate_keys_are_refused(fake):
    # {"module_id": ..., ..., "module_id": ...}: cbor2 would keep the last; we refuse the map.
    payload = cbor2.dumps(fake.fields())
    head, count = payload[0], len(fake.fields())
    assert head == 0xA0 + count
    dup = bytes([0xA0 + count + 1]) + payload[1:] + cbor2.dumps("module_id") + cbor2.dumps("i-evil")
    with pytest.raises(EvidenceMalformed, match="not valid CBOR"):
        verify(fake, fake.document(payload=dup))


def test_indefinite_lengths_are_refused(fake):
    payload = cbor2.dumps(fake.fields())
    indefinite = b"\xbf" + payload[1:] + b"\xff"  # same map, indefinite length
    with pytest.raises(EvidenceMalformed, match="not valid CBOR"):
        verify(fake, fake.document(payload=indefinite))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("module_id", "", "module_id must be a non-empty text"),
        ("module_id", b"i-0", "module_id must be a non-empty text"),
        ("digest", "SHA256", "digest must be"),
        ("digest", "sha384", "digest must be"),
        ("digest", b"SHA384", "digest must be"),
        ("timestamp", 0, "timestamp must be"),
        ("timestamp", -5, "timestamp must be"),
        ("timestamp", True, "timestamp must be"),
        ("timestamp", 1.5e12, "timestamp must be"),
        ("timestamp", 2**64 - 1, "timestamp must be"),
        ("timestamp", "1700000000000", "timestamp must be"),
        ("pcrs", {}, "pcrs must be a map of 1..32"),
        ("pcrs", [bytes(48)], "pcrs must be a map"),
        ("pcrs", {i: bytes(48) for i in range(33)}, "pcrs must be a map of 1..32"),
        ("pcrs", {0: bytes(48), 32: bytes(48)}, "not a PCR index"),
        ("pcrs", {0: bytes(48), -1: bytes(48)}, "not a PCR index"),
        ("pcrs", {"0": bytes(48)}, "not a PCR index"),
        ("pcrs", {0: bytes(47)}, "PCR0 must be 32, 48 or 64 bytes, got 47"),
        ("pcrs", {0: bytes(48), 1: bytes(65)}, "PCR1 must be 32, 48 or 64 bytes"),
        ("pcrs", {0: "00" * 48}, "PCR0 must be"),
        ("pcrs", {1: bytes(48)}, "lacks PCR0"),
        ("certificate", b"", "certificate is 0 bytes"),
        ("certificate", b"\x30" * 1025, "certificate is 1025 bytes"),
        ("certificate", b"not DER at all", "certificate is not a DER X.509"),
        ("certificate", "text", "certificate must be a byte string"),
        ("cabundle", [], "cabundle must be an array of 1..16"),
        ("cabundle", b"\x30", "cabundle must be an array"),
        ("cabundle", [b"\x30"] * 17, "cabundle must be an array of 1..16"),
        ("cabundle", [b""], r"cabundle\[0\] is 0 bytes"),
        ("cabundle", [b"\x30" * 1025], r"cabundle\[0\] is 1025 bytes"),
        ("cabundle", ["text"], r"cabundle\[0\] must be a byte string"),
        ("cabundle", [b"garbage"], r"cabundle\[0\] is not a DER X.509"),
    ],
)
def test_field_syntax(fake, field, value, message):
    with pytest.raises(EvidenceMalformed, match=message):
        verify(fake, fake.document(**{field: value}))


def test_pcr_sizes_32_48_64_accepted(fake):
    pcrs = {0: b"\x01" * 32, 1: b"\x02" * 48, 2: b"\x03" * 64, 31: b"\x04" * 48}
    assert verify(fake, fake.document(pcrs=pcrs)).claims["pcrs"] == {str(k): v for k, v in pcrs.items()}


def test_timestamp_limits(fake):
    assert verify(fake, fake.document(timestamp=1)).issued_at == datetime(1970, 1, 1, 0, 0, 0, 1000, tzinfo=UTC)
    with pytest.raises(EvidenceMalformed, match="timestamp"):
        verify(fake, fake.document(timestamp=253_402_300_800_000))


@pytest.mark.parametrize(
    "protected, message",
    [
        (cbor2.dumps({1: -7}), "alg ES384"),        # ES256
        (cbor2.dumps({1: -36}), "alg ES384"),       # ES512
        (cbor2.dumps({1: "ES384"}), "alg ES384"),
        (cbor2.dumps({}), "alg ES384"),
        (cbor2.dumps({4: b"kid"}), "alg ES384"),
        (cbor2.dumps({1: -35, 2: [4]}), "critical"),
        (b"", "protected header is 0 bytes"),
        (cbor2.dumps([1, -35]), "must be a CBOR map"),
        (cbor2.dumps({1: -35}) + b"\x00", "after its CBOR item"),
        (b"\xa1\x01", "not valid CBOR"),
    ],
)
def test_protected_header_must_declare_es384(fake, protected, message):
    with pytest.raises(EvidenceMalformed, match=message):
        verify(fake, fake.document(protected=protected))


def test_protected_header_may_carry_other_signed_labels(fake):
    verify(fake, fake.document(protected=cbor2.dumps({1: -35, 4: b"key-id"})))


@pytest.mark.parametrize("unprotected", [{1: -35}, {1: -7}, {2: [1]}])
def test_unprotected_header_must_not_carry_alg_or_crit(fake, unprotected):
    with pytest.raises(EvidenceMalformed, match="unprotected header"):
        verify(fake, fake.document(unprotected=unprotected))


def test_unprotected_header_other_labels_are_ignored(fake):
    # Unsigned and never interpreted: cannot change what is believed.
    verify(fake, fake.document(unprotected={4: b"kid"}))


def _envelope(fake, mutate) -> bytes:
    outer = cbor2.loads(fake.document())
    mutate(outer)
    return cbor2.dumps(outer)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda o: o.append(b""), "array of 4"),
        (lambda o: o.pop(), "array of 4"),
        (lambda o: o.__setitem__(2, None), "detached"),
        (lambda o: o.__setitem__(2, "text"), "payload must be a byte string"),
        (lambda o: o.__setitem__(2, b""), "payload is 0 bytes"),
        (lambda o: o.__setitem__(2, b"\xa0" * 16385), "payload is 16385 bytes"),
        (lambda o: o.__setitem__(3, o[3][:95]), "signature is 95 bytes"),
        (lambda o: o.__setitem__(3, o[3] + b"\x00"), "signature is 97 bytes"),
        (lambda o: o.__setitem__(1, []), "unprotected header must be a map"),
        (lambda o: o.__setitem__(0, {1: -35}), "protected header must be a byte string"),
    ],
)
def test_envelope_shape(fake, mutate, message):
    with pytest.raises(EvidenceMalformed, match=message):
        verify(fake, _envelope(fake, mutate))


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (cbor2.dumps(cbor2.CBORTag(98, [])), "not valid CBOR"),  # only tag 18 is allowed
        (cbor2.dumps({"a": 1}), "COSE_Sign1 array"),
        (cbor2.dumps(None), "COSE_Sign1 array"),
        (b"\xff", "not valid CBOR"),
        (b"\x81" * 64 + b"\x00", "not valid CBOR"),  # nesting deeper than any document
        (b"\x00" * (1024 * 1024 + 1), "more than"),
    ],
)
def test_not_a_document(fake, data, message):
    with pytest.raises(EvidenceMalformed, match=message):
        verify(fake, data)


def test_non_bytes_input():
    for value in ("a string", None, 42, [b"x"]):
        with pytest.raises(EvidenceMalformed, match="must be bytes"):
            parse_evidence(value)


# -- signature ---------------------------------------------------------------------------------

def test_signature_by_another_key_fails(fake):
    other = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(EvidenceInvalid, match="signature does not verify"):
        verify(fake, fake.document(signing_key=other))
    with pytest.raises(EvidenceInvalid, match="signature does not verify"):
        verify(fake, fake.document(signing_key=fake.ca_keys[-1]))
    with pytest.raises(EvidenceInvalid, match="signature does not verify"):
        verify(fake, fake.document(signature=bytes(96)))
    with pytest.raises(EvidenceInvalid, match="signature does not verify"):
        verify(fake, fake.document(signature=b"\xff" * 96))


def test_signature_binds_protected_header_and_payload(fake):
    # The signature over one protected header does not carry over to another.
    payload = cbor2.dumps(fake.fields())
    sig = sign_es384(fake.leaf_key, cbor2.dumps({1: -35}), payload)
    protected_b = cbor2.dumps({1: -35, 4: b"k"})
    with pytest.raises(EvidenceInvalid, match="signature"):
        verify(fake, fake.document(payload=payload, protected=protected_b, signature=sig))
    # r and s swapped.
    with pytest.raises(EvidenceInvalid, match="signature"):
        verify(fake, fake.document(payload=payload, signature=sig[48:] + sig[:48]))


# -- chain ---------------------------------------------------------------------------------------

def test_wrong_root_fails(fake):
    other = FakeNitro(now=NOW, intermediates=1)
    with pytest.raises(EvidenceInvalid, match="not a pinned trust anchor"):
        verify(fake, other.document())
    with pytest.raises(EvidenceInvalid, match="not a pinned trust anchor"):
        verify(other, fake.document())
    # The real AWS root pinned (the default trust) does not accept the fake PKI either.
    from attestation.platforms import VerificationInputs
    with pytest.raises(EvidenceInvalid, match="not a pinned trust anchor"):
        PLATFORM.verify(fake.document(), VerificationInputs(now=NOW))


def test_bundle_order_and_completeness(fake):
    with pytest.raises(EvidenceInvalid, match="not a pinned trust anchor"):
        verify(fake, fake.document(cabundle=list(reversed(fake.cas))))      # leaf-first order
    with pytest.raises(EvidenceInvalid, match="not a pinned trust anchor"):
        verify(fake, fake.document(cabundle=fake.cas[1:]))                  # root missing
    with pytest.raises(EvidenceInvalid, match="not signed by"):
        verify(fake, fake.document(cabundle=[fake.cas[0], fake.cas[1], fake.cas[3]]))  # gap
    with pytest.raises(EvidenceInvalid, match="not signed by"):
        verify(fake, fake.document(cabundle=[fake.cas[0], fake.cas[2], fake.cas[1], fake.cas[3]]))
    with pytest.raises(EvidenceInvalid):
        verify(fake, fake.document(cabundle=[fake.cas[0]]))                 # leaf not issued by root


def test_leaf_from_a_foreign_pki_fails(fake):
    other = FakeNitro(now=NOW)
    with pytest.raises(EvidenceInvalid, match="not signed by"):
        verify(fake, fake.document(certificate=other.leaf, signing_key=other.leaf_key))


def test_root_only_chain_shape(fake):
    """A leaf issued directly by the root (no intermediates) is a valid shape."""
    flat = FakeNitro(now=NOW, intermediates=0)
    assert len(verify(flat, flat.document()).chain) == 2


@pytest.mark.parametrize(
    "profile, message",
    [
        (dict(ca=True, path_length=0), "leaf certificate .* is a CA"),
        (dict(digital_signature=False), "does not allow digitalSignature"),
        (dict(key_usage=False), "does not allow digitalSignature"),
        (dict(extra_extensions=[(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"), True)]),
         "unsupported critical extension"),
    ],
)
def test_leaf_profile(fake, profile, message):
    key, leaf = fake.issue_leaf(**profile)
    with pytest.raises(EvidenceInvalid, match=message):
        verify(fake, fake.document(certificate=leaf, signing_key=key))


def test_leaf_without_basic_constraints_is_fine(fake):
    key, leaf = fake.issue_leaf(basic_constraints=False)
    verify(fake, fake.document(certificate=leaf, signing_key=key))


def test_leaf_key_must_be_p384(fake):
    key, leaf = fake.issue_leaf(curve=ec.SECP256R1())
    with pytest.raises(EvidenceInvalid, match="P-384"):
        verify(fake, fake.document(certificate=leaf, signing_key=key))


def _chain_with(fake: FakeNitro, **ca_profile) -> tuple[list[x509.Certificate], object, x509.Certificate]:
    """root -> one bad CA -> leaf: returns (cabundle, leaf key, leaf)."""
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_profile.setdefault("ca", True)
    ca = make_certificate("bad-ca", ca_key.public_key(), issuer=fake.root, issuer_key=fake.root_key,
                          not_before=NOW - timedelta(days=1), not_after=NOW + timedelta(days=1), **ca_profile)
    leaf_key = ec.generate_private_key(ec.SECP384R1())
    leaf = make_certificate("leaf", leaf_key.public_key(), issuer=ca, issuer_key=ca_key,
                            not_before=NOW - timedelta(hours=1), not_after=NOW + timedelta(hours=1), ca=False)
    return [fake.root, ca], leaf_key, leaf


@pytest.mark.parametrize(
    "profile, message",
    [
        (dict(ca=False), "is not a CA"),
        (dict(basic_constraints=False), "is not a CA"),
        (dict(basic_constraints_critical=False), "is not a CA"),
        (dict(key_cert_sign=False), "does not allow keyCertSign"),
        (dict(key_usage=False), "does not allow keyCertSign"),
    ],
)
def test_intermediate_profile(fake, profile, message):
    bundle, key, leaf = _chain_with(fake, **profile)
    with pytest.raises(EvidenceInvalid, match=message):
        verify(fake, fake.document(cabundle=bundle, certificate=leaf, signing_key=key))


def test_good_intermediate_passes(fake):
    bundle, key, leaf = _chain_with(fake, path_length=0)
    verify(fake, fake.document(cabundle=bundle, certificate=leaf, signing_key=key))


def test_path_length_constraint(fake):
    # cas[-1] has pathLen 0: a CA below it (then the leaf) exceeds it.
    sub_key = ec.generate_private_key(ec.SECP384R1())
    sub = make_certificate("sub-ca", sub_key.public_key(), issuer=fake.cas[-1], issuer_key=fake.ca_keys[-1],
                           not_before=NOW - timedelta(days=1), not_after=NOW + timedelta(days=1), ca=True)
    leaf_key = ec.generate_private_key(ec.SECP384R1())
    leaf = make_certificate("leaf", leaf_key.public_key(), issuer=sub, issuer_key=sub_key,
                            not_before=NOW - timedelta(hours=1), not_after=NOW + timedelta(hours=1), ca=False)
    with pytest.raises(EvidenceInvalid, match="allows 0 CA certificates below it"):
        verify(fake, fake.document(cabundle=[*fake.cas, sub], certificate=leaf, signing_key=leaf_key))


# -- time ----------------------------------------------------------------------------------------

def test_validity_of_every_certificate(fake):
    doc = fake.document()
    verify(fake, doc, NOW + fake.leaf_lifetime)
    with pytest.raises(EvidenceInvalid, match="leaf certificate .* expired"):
        verify(fake, doc, NOW + fake.leaf_lifetime + timedelta(seconds=1))
    with pytest.raises(EvidenceInvalid, match="leaf certificate .* not valid before"):
        verify(fake, doc, NOW - timedelta(seconds=4))
    # An intermediate that expired while the leaf is still valid.
    key, leaf = fake.issue_leaf(not_after=NOW + fake.ca_lifetime + timedelta(days=1))
    late = fake.document(certificate=leaf, signing_key=key)
    verify(fake, late, NOW + fake.ca_lifetime)
    with pytest.raises(EvidenceInvalid, match="intermediate certificate .* expired"):
        verify(fake, late, NOW + fake.ca_lifetime + timedelta(seconds=1))
    with pytest.raises(ValueError, match="timezone-aware"):
        verify(fake, doc, NOW.replace(tzinfo=None))


def test_expired_root_fails():
    fake = FakeNitro(now=NOW, intermediates=0)
    old_root = make_certificate("fake.nitro-enclaves", fake.root_key.public_key(), issuer=None, issuer_key=fake.root_key,
                                not_before=NOW - timedelta(days=10), not_after=NOW - timedelta(days=1), ca=True)
    from attestation.trust import TrustAnchors
    trust = TrustAnchors({"nitro": frozenset({old_root.fingerprint(hashes.SHA256())})})
    with pytest.raises(EvidenceInvalid, match="root certificate .* expired"):
        PLATFORM.verify(fake.document(cabundle=[old_root]), fake.inputs(trust=trust))


def test_cached_chain_still_checks_time(fake):
    doc = fake.document()
    verify(fake, doc)  # warm the cache
    with pytest.raises(EvidenceInvalid, match="expired"):
        verify(fake, doc, NOW + timedelta(days=365))
    verify(fake, doc)


# -- CRLs ----------------------------------------------------------------------------------------

def _crl(issuer: x509.Certificate, key, serials: list[int]) -> x509.CertificateRevocationList:
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject)
               .last_update(NOW - timedelta(hours=1)).next_update(NOW + timedelta(days=1)))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - timedelta(minutes=1)).build())
    return builder.sign(key, hashes.SHA384())


def test_crls_when_given(fake):
    doc = fake.document()
    revoked_leaf = _crl(fake.cas[-1], fake.ca_keys[-1], [fake.leaf.serial_number])
    with pytest.raises(EvidenceInvalid, match="revoked"):
        verify(fake, doc, collateral={"crls": [revoked_leaf]})
    revoked_ca = _crl(fake.root, fake.root_key, [fake.cas[1].serial_number])
    with pytest.raises(EvidenceInvalid, match="revoked"):
        verify(fake, doc, collateral={"crls": [revoked_ca]})
    verify(fake, doc, collateral={"crls": [_crl(fake.cas[-1], fake.ca_keys[-1], [12345])]})
    forged = _crl(fake.cas[-1], ec.generate_private_key(ec.SECP384R1()), [fake.leaf.serial_number])
    with pytest.raises(EvidenceInvalid, match="not signed by"):
        verify(fake, doc, collateral={"crls": [forged]})
    with pytest.raises(TypeError):
        verify(fake, doc, collateral={"crls": [b"not a CRL"]})


# -- debug ---------------------------------------------------------------------------------------

def test_debug_documents(fake):
    assert verify(fake, fake.document(pcrs=DEBUG_PCRS)).debug is True
    for index in (0, 1, 2):
        pcrs = default_pcrs()
        pcrs[index] = bytes(48)
        assert verify(fake, fake.document(pcrs=pcrs)).debug is True, index
    for index in (3, 4, 8):  # IAM role, instance, signer: zero in real production documents
        pcrs = default_pcrs()
        pcrs[index] = bytes(48)
        assert verify(fake, fake.document(pcrs=pcrs)).debug is False, index
    assert verify(fake, fake.document()).debug is False
    assert verify(fake, fake.document(pcrs={0: bytes(32)})).debug is True


# -- hostile CBOR ----------------------------------------------------------------------------------

def _text(value: str) -> bytes:
    raw = value.encode()
    return b"\x7a" + len(raw).to_bytes(4, "big") + raw


@pytest.mark.parametrize(
    "data",
    [
        # A decimal fraction with a 960 kB mantissa: cbor2's own decoding takes minutes.
        b"\xc4\x82\x1b\x00\x00\x00\x00\x7f\xff\xff\xff\xc2\x5a\x00\x0f\x00\x00" + b"\xff" * 0xF0000,
        b"\x84" + b"\xc4\x82\x00\xc2\x5a\x00\x0f\x00\x00" + b"\xff" * 0xF0000,
        b"\xd8\x23" + _text("(a*)*" * 150_000),                       # regex, compiled by cbor2
        b"\xd8\x24" + _text("Content-Type: text/plain\n" + "X: y\n" * 150_000),  # MIME message
        b"\xd9\xd9\xf7\x84\x00\x00\x00\x00",                              # self-described CBOR
        b"\xd8\x1c\x81\xd8\x1d\x00",                                      # shared-reference cycle
    ],
)
def test_cbor_tags_are_refused_without_being_interpreted(data):
    import time

    start = time.perf_counter()
    with pytest.raises(EvidenceMalformed, match="not valid CBOR"):
        parse_evidence(data)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("field, value", [
    ("timestamp", cbor2.CBORTag(1, 1740830400)),
    ("module_id", cbor2.CBORTag(32, "https://example.com")),
    ("user_data", cbor2.CBORTag(24, b"\xa0")),
    ("pcrs", cbor2.CBORTag(259, {0: bytes(48)})),
    ("cabundle", cbor2.CBORTag(258, [b"\x30"])),
    ("certificate", cbor2.CBORTag(18, b"\x30")),
])
def test_tags_inside_the_document_are_refused(fake, field, value):
    with pytest.raises(EvidenceMalformed, match="not valid CBOR"):
        verify(fake, fake.document(**{field: value}))
    with pytest.raises(EvidenceMalformed, match="not valid CBOR"):
        verify(fake, fake.document(protected=cbor2.dumps({1: -35, 4: value})))
