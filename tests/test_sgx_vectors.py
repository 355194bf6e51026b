"""The real SGX DCAP quote in ../shared/vectors: parses to EXPECTED.json, verifies against the
pinned Intel SGX Root CA inside its chain's validity, and refuses every tampered or truncated
variant with a typed error."""

from __future__ import annotations

import json
from datetime import datetime, UTC

import pytest
from cryptography import x509

from attestation.errors import EvidenceInvalid, EvidenceMalformed
from attestation.platforms import VerificationInputs
from attestation.sgx import PLATFORM
from attestation.sgx.abi import parse_quote
from attestation.testing.intel import FakeIntelPki, mutation_failures, quote_regions
from attestation.trust import DEFAULT_TRUST, INTEL_SGX_ROOT_CA, TrustAnchors

from .intel_vectors import AlsoRevokes

pytestmark = pytest.mark.vectors

NAME = "sgx/trustee/occlum_quote.dat"
INSIDE = datetime(2026, 11, 27, tzinfo=UTC)
AT = VerificationInputs(now=INSIDE)


@pytest.fixture
def quote(vectors_dir) -> bytes:
    return (vectors_dir / NAME).read_bytes()


@pytest.fixture
def expected(vectors_dir) -> dict:
    return json.loads((vectors_dir / "EXPECTED.json").read_text())[NAME]


def _report_matches(body, exp: dict) -> None:
    assert body.cpusvn.hex() == exp["cpusvn"]
    assert body.miscselect == exp["miscselect"]
    assert body.isv_ext_prod_id.hex() == exp["isv_ext_prod_id"]
    assert body.attributes_flags == exp["attributes_flags"]
    assert body.attributes_xfrm == exp["attributes_xfrm"]
    assert body.debug is exp["debug"]
    assert body.mrenclave.hex() == exp["mrenclave"]
    assert body.mrsigner.hex() == exp["mrsigner"]
    assert body.config_id.hex() == exp["config_id"]
    assert body.isvprodid == exp["isvprodid"]
    assert body.isvsvn == exp["isvsvn"]
    assert body.config_svn == exp["config_svn"]
    assert body.isv_family_id.hex() == exp["isv_family_id"]
    assert body.report_data.hex() == exp["report_data"]


def test_parsed_values_equal_expected(quote, expected):
    q = parse_quote(quote)
    assert len(quote) == expected["size"]
    assert q.header.version == expected["version"]
    assert q.header.att_key_type == expected["att_key_type"]
    assert hex(q.header.tee_type) == expected["tee_type"]
    assert q.header.qe_vendor_id.hex() == expected["qe_vendor_id"]
    assert q.header.user_data.hex() == expected["user_data"]
    assert q.header.qe_svn == expected["qe_svn"]
    assert q.header.pce_svn == expected["pce_svn"]
    assert len(q.signed_region) == 432 and expected["signed_region"] == "0..431 (432 bytes)"
    assert q.signature_data_len == expected["sig_data_len"]
    assert q.trailing_bytes == expected["trailing_bytes_after_sig"]
    _report_matches(q.body, expected["body"])
    sig = q.signature_data
    assert sig.attestation_key.hex() == expected["attestation_key_xy"]
    assert sig.nested is False and expected["outer_cert_type"] is None
    _report_matches(sig.qe_report, expected["qe_report"])
    assert len(sig.qe_auth_data) == expected["qe_auth_data_len"]
    assert sig.certification.type == expected["inner_cert_type"]
    assert len(sig.certification.data) == expected["inner_cert_size"] == expected["pck_chain_pem_len"]
    chain = sig.certification.pck_chain.certs
    assert [c.subject.rfc4514_string() for c in chain] == [
        e["subject"] for e in expected["pck_chain"]["chain"]
    ]


def test_verifies_and_claims_equal_expected(quote, expected):
    v = PLATFORM.verify(quote, AT)
    body = expected["body"]
    assert v.platform == "sgx"
    assert v.measurement.hex() == body["mrenclave"]
    assert v.report_data.hex() == body["report_data"]
    assert v.debug is True  # an Occlum debug enclave
    assert v.trailing_bytes == 0
    assert v.tcb_status is None and v.advisory_ids == ()  # no collateral: no TCB judgement
    assert set(v.claims) == {"mrenclave", "mrsigner", "isvprodid", "isvsvn", "attributes_flags", "attributes_xfrm",
                             "miscselect", "cpusvn", "config_svn", "report_data", "qe_svn", "pce_svn", "fmspc"}
    assert v.claims["mrenclave"].hex() == body["mrenclave"]
    assert v.claims["mrsigner"].hex() == body["mrsigner"]
    assert v.claims["isvprodid"] == body["isvprodid"] and v.claims["isvsvn"] == body["isvsvn"]
    assert v.claims["attributes_flags"] == body["attributes_flags"]
    assert v.claims["attributes_xfrm"] == body["attributes_xfrm"]
    assert v.claims["miscselect"] == body["miscselect"]
    assert v.claims["cpusvn"].hex() == body["cpusvn"]
    assert v.claims["config_svn"] == body["config_svn"]
    assert v.claims["report_data"].hex() == body["report_data"]
    assert v.claims["qe_svn"] == expected["qe_svn"] and v.claims["pce_svn"] == expected["pce_svn"]
    assert v.claims["fmspc"].hex() == expected["pck_fmspc"]
    exp_chain = expected["pck_chain"]["chain"]
    assert [(c.not_before.isoformat(), c.not_after.isoformat()) for c in v.chain] == [
        (e["not_before"], e["not_after"]) for e in exp_chain
    ]
    assert "CN=Intel SGX PCK Platform CA" in v.chain[1].subject
    assert v.chain[-1].sha256 == INTEL_SGX_ROOT_CA


def test_every_single_byte_change_is_refused(quote):
    """Every byte of the signed region, the signature length and the signature data (signatures,
    attestation key, QE report, QE auth data, the certification data headers) is flipped twice
    (XOR 0x01 and 0xff); every 7th byte of the PEM chain three times (XOR 0x01, 0x20, 0xff).
    3,682 mutants; each must fail with EvidenceMalformed or EvidenceInvalid."""
    r = quote_regions(parse_quote(quote))
    dense = range(r.signed[0], r.certification[0])
    assert mutation_failures(PLATFORM.verify, quote, AT, dense, (0x01, 0xFF)) == []
    sparse = range(r.certification[0], r.certification[1], 7)
    assert mutation_failures(PLATFORM.verify, quote, AT, sparse, (0x01, 0x20, 0xFF)) == []


def test_every_truncation_is_malformed(quote):
    for length in range(len(quote)):
        with pytest.raises(EvidenceMalformed):
            PLATFORM.verify(quote[:length], AT)


def test_trailing_bytes_are_tolerated_and_counted(quote):
    for junk in (b"\x00" * 70, b"this is not signed by anyone, ok?!!!!!!", b"\xff"):
        v = PLATFORM.verify(quote + junk, AT)
        assert v.trailing_bytes == len(junk)
        assert v.measurement == PLATFORM.verify(quote, AT).measurement


@pytest.mark.parametrize("when", ["2023-04-26T15:35:17+00:00", "2026-11-27T00:00:00+00:00",
                                  "2030-04-26T15:35:16+00:00"])
def test_verifies_inside_chain_validity(quote, when):
    PLATFORM.verify(quote, VerificationInputs(now=datetime.fromisoformat(when)))


@pytest.mark.parametrize("when, word", [("2030-04-26T15:35:17+00:00", "expired"),
                                        ("2040-01-01T00:00:00+00:00", "expired"),
                                        ("2023-04-26T15:35:15+00:00", "not valid before")])
def test_fails_outside_chain_validity(quote, when, word):
    with pytest.raises(EvidenceInvalid, match=word):
        PLATFORM.verify(quote, VerificationInputs(now=datetime.fromisoformat(when)))


def test_wrong_root_fails(quote):
    fake = FakeIntelPki(INSIDE)
    for trust in (TrustAnchors({}), fake.trust(), TrustAnchors({"snp": frozenset({INTEL_SGX_ROOT_CA})}),
                  TrustAnchors({"tdx": frozenset({INTEL_SGX_ROOT_CA})})):
        with pytest.raises(EvidenceInvalid, match="not a pinned trust anchor"):
            PLATFORM.verify(quote, VerificationInputs(now=INSIDE, trust=trust))
    assert DEFAULT_TRUST.for_platform("sgx") == {INTEL_SGX_ROOT_CA}


def test_real_crls_are_checked(quote, vectors_dir):
    """Intel's PCK CRL and root CRL (from the TDX collateral: the same Platform CA and root issue
    this SGX quote's chain) are applied to it: they do not revoke it, a CRL in the Platform CA's
    name that the Platform CA did not sign is refused, and the PCK CRL listing the quote's PCK
    certificate makes verification fail."""
    coll = vectors_dir / "tdx/go-tdx-guest/collateral"
    crls = [x509.load_der_x509_crl((coll / "pckcrl").read_bytes()),
            x509.load_der_x509_crl((coll / "rootcrl.der").read_bytes())]
    v = PLATFORM.verify(quote, VerificationInputs(now=INSIDE, collateral={"crls": crls}))
    assert v.measurement
    # A CRL that claims the Platform CA as issuer but is signed by another key is an error.
    fake = FakeIntelPki(INSIDE)
    forged = (x509.CertificateRevocationListBuilder().issuer_name(crls[0].issuer)
              .last_update(INSIDE).next_update(INSIDE).sign(fake.ca_key, crls[0].signature_hash_algorithm))
    with pytest.raises(EvidenceInvalid, match="CRL"):
        PLATFORM.verify(quote, VerificationInputs(now=INSIDE, collateral={"crls": [forged]}))
    leaf = parse_quote(quote).signature_data.certification.pck_chain.certs[0]
    revoking = AlsoRevokes(crls[0], leaf.serial_number)
    with pytest.raises(EvidenceInvalid, match=f"serial {leaf.serial_number:x}.* is revoked"):
        PLATFORM.verify(quote, VerificationInputs(now=INSIDE, collateral={"crls": [revoking, crls[1]]}))


def test_tdx_quote_is_refused_with_a_hint(vectors_dir):
    with pytest.raises(EvidenceMalformed, match="use platform tdx"):
        PLATFORM.verify((vectors_dir / "tdx/trustee/tdx_quote_4.dat").read_bytes(), AT)
