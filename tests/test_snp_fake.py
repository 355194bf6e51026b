"""SEV-SNP verification against a fake AMD (attestation.testing.snp): what the vectors cannot show.

Each product (Milan, Genoa, Turin) with VCEK and VLEK, report versions 2-5, TCB and chip-ID
binding, product consistency, the KDS fetcher, CRLs, expiry, wrong roots and odd certificates.
"""

from __future__ import annotations

from datetime import datetime, timedelta, UTC

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from attestation.errors import AttestationError, EvidenceInvalid, EvidenceMalformed
from attestation.platforms import VerificationInputs
from attestation.snp import PLATFORM, clear_caches
from attestation.snp.abi import encode_tcb
from attestation.snp.kds import AMD_PSS, KdsFetcher, cert_chain_url, cert_info
from attestation.testing.snp import FakeAmd, amd_name, fake_rsa_key
from attestation.trust import TrustAnchors
from attestation.trust.amd import SNP_ROOTS

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
PRODUCTS = ("Milan", "Genoa", "Turin")


@pytest.fixture(scope="module")
def amd() -> FakeAmd:
    return FakeAmd(now=NOW)


def _inputs(amd: FakeAmd, certs, *, now=NOW, trust=None, **kw) -> VerificationInputs:
    return VerificationInputs(now=now, extra_certs=tuple(certs), trust=trust or amd.trust(), **kw)


def _verify(amd: FakeAmd, evidence, certs=None, **kw):
    return PLATFORM.verify(evidence.report, _inputs(amd, evidence.certs if certs is None else certs, **kw))


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("signing_key", ["vcek", "vlek"])
def test_each_product_and_key_kind_verifies(amd, product, signing_key):
    ev = amd.evidence(product, signing_key, measurement=b"\x42" * 48, report_data=b"\x07" * 64)
    verified = _verify(amd, ev)
    assert verified.claims["product"] == product
    assert verified.claims["signing_key"] == signing_key
    expected_tcb = {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    if product == "Turin":
        expected_tcb["fmc"] = 1
    assert verified.claims["reported_tcb"] == expected_tcb
    assert verified.measurement == b"\x42" * 48 and verified.report_data == b"\x07" * 64
    assert [c.subject.split(",")[0] for c in verified.chain] == [
        "CN=SEV-VCEK" if signing_key == "vcek" else "CN=SEV-VLEK",
        f"CN=SEV-{product}" if signing_key == "vcek" else f"CN=SEV-VLEK-{product}",
        f"CN=ARK-{product}",
    ]
    assert verified.report.product_name == {"Milan": "Milan-B0", "Genoa": "Genoa", "Turin": "Turin-B0"}[product]
    if signing_key == "vlek":
        assert verified.report.csp_id == "CN=cc.example.test"


@pytest.mark.parametrize("version", [2, 3, 4, 5])
def test_report_versions_2_to_5_verify(amd, version):
    ev = amd.evidence("Genoa", version=version, launch_mit_vector=5 if version >= 4 else 0)
    verified = _verify(amd, ev)
    assert verified.claims["version"] == version
    assert verified.report.report.launch_mit_vector == (5 if version >= 4 else None)


def test_the_fake_chain_is_not_trusted_under_the_real_amd_roots(amd):
    ev = amd.evidence("Milan")
    _verify(amd, ev)  # fills the chain cache: the cache must not carry trust across anchors
    with pytest.raises(EvidenceInvalid, match="is not a pinned AMD root"):
        _verify(amd, ev, trust=TrustAnchors({"snp": SNP_ROOTS}))


def test_an_impostor_ark_with_the_right_name_fails_even_when_pinned(amd):
    ev = amd.evidence("Milan")
    impostor_key = fake_rsa_key("asvk")  # any other RSA-4096 key
    name = amd.ark("Milan").subject
    impostor = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(impostor_key.public_key())
                .serial_number(7).not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=9))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(impostor_key, hashes.SHA384(), rsa_padding=AMD_PSS))
    trust = TrustAnchors({"snp": frozenset({impostor.fingerprint(hashes.SHA256())})})
    with pytest.raises(EvidenceInvalid, match="ASK certificate .* is not signed by"):
        _verify(amd, ev, certs=(ev.leaf, ev.issuer, impostor), trust=trust)


def test_a_vcek_of_one_product_under_another_products_ask_fails(amd):
    key = ec.generate_private_key(ec.SECP384R1())
    leaf = amd.endorsement_cert("Milan", "vcek", chip_id=bytes(range(64)), public_key=key.public_key(),
                                issuer=(amd.ask("Genoa"), fake_rsa_key("ask")))
    ev = amd.evidence("Milan", leaf=(leaf, key), cpuid=None)
    with pytest.raises(EvidenceInvalid, match="product line is inconsistent"):
        _verify(amd, ev, certs=(leaf, amd.ask("Genoa"), amd.ark("Genoa")))


def test_the_reports_cpuid_must_name_the_certificates_product(amd):
    ev = amd.evidence("Milan", cpuid=(0x19, 0x11, 0x01))  # a Genoa CPUID in a Milan-signed report
    with pytest.raises(EvidenceInvalid, match="report CPUID family 0x19 model 0x11 says Genoa"):
        _verify(amd, ev)
    unknown = amd.evidence("Milan", cpuid=(0x1A, 0x50, 0x00))
    with pytest.raises(EvidenceInvalid, match="not a supported product line"):
        _verify(amd, unknown)


def test_an_unknown_product_name_fails(amd):
    key = ec.generate_private_key(ec.SECP384R1())
    leaf = amd.endorsement_cert("Milan", "vcek", chip_id=bytes(range(64)), public_key=key.public_key(),
                                product_name="Venice-A0")
    ev = amd.evidence("Milan", leaf=(leaf, key))
    with pytest.raises(EvidenceInvalid, match="productName 'Venice-A0' is not a supported product line"):
        _verify(amd, ev)


@pytest.mark.parametrize("product, component", [
    (product, component) for product in PRODUCTS
    for component in ("bootloader", "tee", "snp", "microcode") + (("fmc",) if product == "Turin" else ())
])
def test_a_reported_tcb_other_than_the_certificates_fails(amd, product, component):
    tcb = {"fmc": 1, "bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    if product != "Turin":
        del tcb["fmc"]  # Milan and Genoa have no FMC
    other = dict(tcb, **{component: tcb[component] + 1})
    ev = amd.evidence(product, tcb=tcb, reported_tcb=encode_tcb(other, product))
    with pytest.raises(EvidenceInvalid, match=rf"REPORTED_TCB .* not the TCB the VCEK was issued for.*{component} "):
        _verify(amd, ev)


def test_reserved_tcb_bytes_take_part_in_the_binding(amd):
    tcb = {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    ev = amd.evidence("Milan", tcb=tcb, reported_tcb=encode_tcb(tcb, "Milan", reserved=(0, 1, 0, 0)))
    with pytest.raises(EvidenceInvalid, match="reserved SPLs"):
        _verify(amd, ev)


def test_a_vlek_report_is_bound_to_the_vleks_tcb_too(amd):
    ev = amd.evidence("Genoa", "vlek", reported_tcb=encode_tcb(
        {"bootloader": 3, "tee": 0, "snp": 7, "microcode": 115}, "Genoa"))
    with pytest.raises(EvidenceInvalid, match="issued for"):
        _verify(amd, ev)


@pytest.mark.parametrize("product", PRODUCTS)
def test_a_chip_id_other_than_the_vceks_hwid_fails(amd, product):
    chip = bytearray((b"\x5a" * 8 + bytes(56)) if product == "Turin" else bytes(range(64)))
    chip[3] ^= 1
    ev = amd.evidence(product, chip_id=(b"\x5a" * 8 + bytes(56)) if product == "Turin" else bytes(range(64)))
    bad = amd.evidence(product, leaf=(ev.leaf, ev.leaf_key), chip_id=bytes(chip))
    with pytest.raises(EvidenceInvalid, match="CHIP_ID .* is not the VCEK's hwID"):
        _verify(amd, bad)


def test_a_turin_vcek_carries_an_8_byte_hwid_and_a_64_byte_one_is_accepted_too(amd):
    ev = amd.evidence("Turin")
    assert len(cert_info(ev.leaf).extensions.hwid) == 8
    _verify(amd, ev)
    key = ec.generate_private_key(ec.SECP384R1())
    chip = b"\x5a" * 8 + bytes(56)
    leaf = amd.endorsement_cert("Turin", "vcek", tcb={"fmc": 1, "bootloader": 3, "tee": 0, "snp": 8, "microcode": 115},
                                hwid=chip, public_key=key.public_key())
    _verify(amd, amd.evidence("Turin", leaf=(leaf, key), chip_id=chip))


def test_an_octet_string_wrapped_hwid_is_read(amd):
    key = ec.generate_private_key(ec.SECP384R1())
    leaf = amd.endorsement_cert("Genoa", "vcek", chip_id=bytes(range(64)), hwid_encoding="octet",
                                public_key=key.public_key())
    assert leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4")).value.value[:2] == b"\x04\x40"
    _verify(amd, amd.evidence("Genoa", leaf=(leaf, key)))


def test_a_masked_chip_id_skips_the_hwid_check_but_must_be_zero(amd):
    ev = amd.evidence("Milan")
    masked = amd.evidence("Milan", leaf=(ev.leaf, ev.leaf_key), mask_chip_key=True, chip_id=bytes(64))
    assert _verify(amd, masked).claims["chip_id"] == bytes(64)
    not_zero = amd.evidence("Milan", leaf=(ev.leaf, ev.leaf_key), mask_chip_key=True)
    with pytest.raises(EvidenceInvalid, match="MASK_CHIP_KEY is set but the report's CHIP_ID is not zero"):
        _verify(amd, not_zero)


def test_a_report_signed_by_another_key_fails(amd):
    ev = amd.evidence("Milan")
    other = ec.generate_private_key(ec.SECP384R1())
    forged = amd.evidence("Milan", leaf=(ev.leaf, other))
    with pytest.raises(EvidenceInvalid, match="report signature does not verify with the VCEK key"):
        _verify(amd, forged)


def test_an_unsigned_report_fails(amd):
    ev = amd.evidence("Milan", raw_signing_key=7)
    with pytest.raises(EvidenceInvalid, match="not signed"):
        _verify(amd, ev)


def test_the_report_says_which_key_kind_must_have_signed_it(amd):
    vcek = amd.evidence("Genoa", "vcek")
    vlek = amd.evidence("Genoa", "vlek")
    with pytest.raises(EvidenceInvalid, match="signed by a VLEK .* no VLEK certificate was given"):
        _verify(amd, vlek, certs=vcek.certs)
    with pytest.raises(EvidenceInvalid, match="signed by a VCEK .* no VCEK certificate was given"):
        _verify(amd, vcek, certs=vlek.certs)
    # a VLEK report whose SIGNING_KEY claims VCEK cannot borrow the VLEK
    relabelled = amd.evidence("Genoa", "vlek", raw_signing_key=0)
    with pytest.raises(EvidenceInvalid, match="no VCEK certificate was given"):
        _verify(amd, relabelled)


def test_the_vcek_is_picked_among_several_by_chip_id(amd):
    first = amd.evidence("Milan", chip_id=b"\x01" * 64)
    second = amd.evidence("Milan", chip_id=b"\x02" * 64)
    assert _verify(amd, second, certs=(first.leaf, second.leaf, second.issuer, second.ark)).claims["chip_id"] == b"\x02" * 64


def test_certificates_that_fit_no_role_are_named_when_nothing_fits(amd):
    key256 = ec.generate_private_key(ec.SECP256R1())
    wrong_curve = amd.endorsement_cert("Milan", "vcek", chip_id=bytes(range(64)), public_key=key256.public_key())
    missing_spl = amd.endorsement_cert("Milan", "vcek", chip_id=bytes(range(64)), drop=("3.8",))
    ev = amd.evidence("Milan")
    with pytest.raises(EvidenceInvalid, match=r"no VCEK .*Ignored certificate\(s\):.*not P-384.*SPL extension\(s\) \.3\.8 missing"):
        _verify(amd, ev, certs=(wrong_curve, missing_spl, ev.issuer, ev.ark))


def test_an_intermediate_with_a_short_rsa_key_fails(amd):
    short = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ark_key = fake_rsa_key("ark")
    ask = (x509.CertificateBuilder().subject_name(amd_name("SEV-Milan")).issuer_name(amd.ark("Milan").subject)
           .public_key(short.public_key()).serial_number(99).not_valid_before(NOW - timedelta(days=1))
           .not_valid_after(NOW + timedelta(days=30))
           .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
           .sign(ark_key, hashes.SHA384(), rsa_padding=AMD_PSS))
    key = ec.generate_private_key(ec.SECP384R1())
    leaf = amd.endorsement_cert("Milan", chip_id=bytes(range(64)), public_key=key.public_key(), issuer=(ask, short))
    ev = amd.evidence("Milan", leaf=(leaf, key))
    with pytest.raises(EvidenceInvalid, match="not RSA-4096"):
        _verify(amd, ev, certs=(leaf, ask, amd.ark("Milan")))


def test_a_certificate_signed_with_other_pss_parameters_fails(amd):
    from cryptography.hazmat.primitives.asymmetric import padding

    key = ec.generate_private_key(ec.SECP384R1())
    ask_key = fake_rsa_key("ask")
    leaf = (x509.CertificateBuilder().subject_name(amd_name("SEV-VCEK")).issuer_name(amd.ask("Milan").subject)
            .public_key(key.public_key()).serial_number(5).not_valid_before(NOW - timedelta(days=1))
            .not_valid_after(NOW + timedelta(days=30)))
    template = amd.endorsement_cert("Milan", chip_id=bytes(range(64)))
    for ext in template.extensions:
        leaf = leaf.add_extension(ext.value, critical=False)
    leaf = leaf.sign(ask_key, hashes.SHA384(), rsa_padding=padding.PSS(padding.MGF1(hashes.SHA384()), 32))
    leaf.verify_directly_issued_by(amd.ask("Milan"))  # fine by its own declared parameters...
    with pytest.raises(EvidenceInvalid, match="not signed by"):  # ...but not AMD's
        _verify(amd, amd.evidence("Milan", leaf=(leaf, key)))


def test_expired_and_not_yet_valid_certificates_fail_and_pass_inside_their_validity(amd):
    key = ec.generate_private_key(ec.SECP384R1())
    leaf = amd.endorsement_cert("Genoa", chip_id=bytes(range(64)), public_key=key.public_key(),
                                not_before=NOW - timedelta(days=10), not_after=NOW - timedelta(days=1))
    ev = amd.evidence("Genoa", leaf=(leaf, key))
    with pytest.raises(EvidenceInvalid, match="expired"):
        _verify(amd, ev)
    assert _verify(amd, ev, now=NOW - timedelta(days=2)).claims["product"] == "Genoa"
    with pytest.raises(EvidenceInvalid, match="not valid before"):
        _verify(amd, ev, now=NOW - timedelta(days=11))
    short_lived = FakeAmd(now=NOW, days=5, products=("Genoa",))  # ASK and ARK end before the VCEK
    ev = short_lived.evidence("Genoa")
    assert _verify(short_lived, ev, now=NOW + timedelta(days=4)).claims["product"] == "Genoa"
    with pytest.raises(EvidenceInvalid, match="SEV-Genoa.*expired"):
        _verify(short_lived, ev, now=NOW + timedelta(days=6))


def _crl(issuer_cert, issuer_key, serials, *, name=None):
    builder = (x509.CertificateRevocationListBuilder().issuer_name(name or issuer_cert.subject)
               .last_update(NOW - timedelta(days=1)).next_update(NOW + timedelta(days=7)))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - timedelta(hours=1)).build())
    return builder.sign(issuer_key, hashes.SHA384(), rsa_padding=AMD_PSS)


def test_crls_from_the_collateral_are_applied(amd):
    ev = amd.evidence("Milan")
    ark_key = fake_rsa_key("ark")
    unrelated = _crl(amd.ark("Milan"), ark_key, [12345])
    assert _verify(amd, ev, collateral={"crls": (unrelated,)}).claims["product"] == "Milan"
    revoked = _crl(amd.ark("Milan"), ark_key, [ev.issuer.serial_number])
    with pytest.raises(EvidenceInvalid, match="is revoked"):
        _verify(amd, ev, collateral={"crls": (revoked,)})
    forged = _crl(amd.ark("Milan"), fake_rsa_key("ask"), [12345])  # ARK's name, another key
    with pytest.raises(EvidenceInvalid, match="not signed by it"):
        _verify(amd, ev, collateral={"crls": (forged,)})
    with pytest.raises(EvidenceMalformed, match="not a CRL"):
        _verify(amd, ev, collateral={"crls": ("junk",)})


class _Kds:
    """A fake AMD KDS over a fake AMD: serves VCEKs by URL and the cert_chain PEMs."""

    def __init__(self, amd: FakeAmd, vceks: dict[str, bytes], fail: bool = False) -> None:
        self.amd, self.vceks, self.fail, self.urls = amd, vceks, fail, []

    def get(self, url: str) -> bytes:
        self.urls.append(url)
        if self.fail:
            raise ConnectionError("network unreachable")
        if url in self.vceks:
            return self.vceks[url]
        for product in PRODUCTS:
            for kind in ("vcek", "vlek"):
                if url == cert_chain_url(product, kind):
                    inter = self.amd.ask(product) if kind == "vcek" else self.amd.asvk(product)
                    return inter.public_bytes(Encoding.PEM) + self.amd.ark(product).public_bytes(Encoding.PEM)
        raise LookupError(f"404 {url}")


@pytest.mark.parametrize("product", PRODUCTS)
def test_a_fetcher_if_given_fetches_the_missing_vcek_and_chain(amd, product):
    from attestation.snp.abi import decode_tcb
    from attestation.snp.kds import vcek_url

    ev = amd.evidence(product)
    url = vcek_url(product, ev.fields.chip_id, decode_tcb(ev.fields.reported_tcb, product))
    kds = _Kds(amd, {url: ev.leaf.public_bytes(Encoding.DER)})
    assert isinstance(kds, KdsFetcher)
    verified = _verify(amd, ev, certs=(), fetcher=kds)
    assert verified.claims["product"] == product
    assert kds.urls == [url, cert_chain_url(product, "vcek")]
    with pytest.raises(EvidenceInvalid, match="no VCEK certificate was given: pass it with --cert"):
        _verify(amd, ev, certs=())  # no fetcher: nothing is fetched
    with pytest.raises(EvidenceInvalid, match="ConnectionError: network unreachable"):
        _verify(amd, ev, certs=(), fetcher=_Kds(amd, {}, fail=True))


def test_a_v2_report_without_cpuid_makes_the_fetcher_try_each_product(amd):
    from attestation.snp.abi import decode_tcb
    from attestation.snp.kds import vcek_url

    ev = amd.evidence("Genoa", version=2)
    url = vcek_url("Genoa", ev.fields.chip_id, decode_tcb(ev.fields.reported_tcb, "Genoa"))
    kds = _Kds(amd, {url: ev.leaf.public_bytes(Encoding.PEM)})
    assert _verify(amd, ev, certs=(), fetcher=kds).claims["product"] == "Genoa"
    assert [u.split("/")[5] for u in kds.urls[:2]] == ["Milan", "Genoa"]


def test_trailing_bytes_and_debug_are_reported(amd):
    ev = amd.evidence("Turin", policy=(1 << 17) | (1 << 19), trailing=b"\xaa" * 33)
    verified = _verify(amd, ev)
    assert verified.trailing_bytes == 33 and verified.debug is True


def test_bytes_and_certificates_of_fake_evidence_fail_typed_when_flipped(amd):
    ev = amd.evidence("Turin", version=5)
    inputs = _inputs(amd, ev.certs)
    PLATFORM.verify(ev.report, inputs)
    for index in range(0, len(ev.report), 3):
        flipped = ev.report[:index] + bytes([ev.report[index] ^ 0x01]) + ev.report[index + 1:]
        with pytest.raises(AttestationError):
            PLATFORM.verify(flipped, inputs)


def test_clearing_the_caches_changes_nothing_but_speed(amd):
    ev = amd.evidence("Milan")
    first = _verify(amd, ev)
    clear_caches()
    assert _verify(amd, ev).claims == first.claims


def test_inputs_must_be_well_formed(amd):
    ev = amd.evidence("Milan")
    with pytest.raises(EvidenceMalformed, match="x509.Certificate"):
        _verify(amd, ev, certs=(b"not a certificate",))
    with pytest.raises(ValueError, match="timezone-aware"):
        _verify(amd, ev, now=datetime(2026, 1, 1))


def _table(blobs: list[bytes]) -> bytes:
    """A GHCB certificate table (random GUIDs: the verifier classifies certificates by content)."""
    import os
    import struct

    offset = 24 * (len(blobs) + 1)
    entries, data = b"", b""
    for blob in blobs:
        entries += os.urandom(16) + struct.pack("<II", offset + len(data), len(blob))
        data += blob
    return entries + bytes(24) + data


def test_certificates_in_a_table_after_the_report_are_used(amd):
    ev = amd.evidence("Genoa")
    der = [c.public_bytes(Encoding.DER) for c in ev.certs]
    with_table = ev.report + _table([b"not a certificate", *der])
    verified = PLATFORM.verify(with_table, _inputs(amd, ()))
    assert verified.claims["product"] == "Genoa" and verified.trailing_bytes == len(with_table) - 1184
    # a table that is not one is just trailing bytes
    for junk in (_table(der)[:30], b"\xff" * 24 + bytes(24), _table(der)[:-1]):
        with pytest.raises(EvidenceInvalid, match="no VCEK certificate was given"):
            PLATFORM.verify(ev.report + junk, _inputs(amd, ()))
        assert PLATFORM.verify(ev.report + junk, _inputs(amd, ev.certs)).trailing_bytes == len(junk)


def test_the_callers_certificates_win_over_a_table(amd):
    ev = amd.evidence("Milan")
    key = ec.generate_private_key(ec.SECP384R1())
    # same chip and TCB, another key, not AMD-signed: it fits the report's CHIP_ID and TCB
    impostor = amd.endorsement_cert("Milan", chip_id=ev.fields.chip_id, public_key=key.public_key(),
                                    issuer=(amd.ask("Milan"), fake_rsa_key("asvk")))
    report = ev.report + _table([impostor.public_bytes(Encoding.DER)])
    assert PLATFORM.verify(report, _inputs(amd, ev.certs)).claims["product"] == "Milan"
    with pytest.raises(EvidenceInvalid, match="not signed by"):
        PLATFORM.verify(report, _inputs(amd, ev.certs[1:]))
